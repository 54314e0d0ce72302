"""Fused Triton ToMe merge (the CUDA path of `vlmeff.kernels.tome_merge`; also runs in the interpreter).

One launch does what ToMe's merge does with a size channel, two gathers, a scatter_add, a concatenation, a
division and a log: it writes the merged tokens in ToMe's order [protected, unmerged a, b], their sizes, and the
log-sizes proportional attention adds to the next layers' logits.

Pull design, as `triton_gather_merge`: one program per (tile of BLOCK_K output tokens, tile of BLOCK_D hidden
units, batch) loads its own tokens' rows once, and the tiles holding b-tokens also walk the r merged a-tokens in
chunks of BLOCK_R: a [BLOCK_K, BLOCK_R] matrix holds the size of merged token j where it joins output row k (0
elsewhere), and one `tl.dot` (IEEE fp32, no TF32) adds those chunks' size-weighted rows. No atomics: the result is
deterministic, and bf16 needs no atomic support. Accumulation is fp32 whatever x's dtype.
"""
import torch
import triton
import triton.language as tl

from .triton_gather_merge import X_DTYPES, tile_shape

BLOCK_R = 16       # merged tokens per dot: tl.dot's smallest inner dimension
NUM_WARPS = 4


# As in `_gather_merge_kernel`: the counts and the index-side strides change from layer to layer and are not
# specialised (no new compile per value); D and the x / out strides stay specialised for 16-byte vector accesses.
@triton.jit(do_not_specialize=("N_OUT", "U", "R", "P", "A_START", "B_START", "HAS_SIZES", "WRITE_LOG",
                               "stride_sb", "stride_ub", "stride_rb", "stride_zb"))
def _tome_merge_kernel(
    x_ptr, sizes_ptr, unm_ptr, src_ptr, dst_ptr, out_ptr, out_sizes_ptr, log_ptr,
    N_OUT, U, R, D, P, A_START, B_START, HAS_SIZES, WRITE_LOG,
    stride_xb, stride_xn, stride_sb, stride_ub, stride_rb, stride_yb, stride_yk, stride_zb,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)   # int64 before any stride product: B * N * D may exceed 2**31
    # every per-row value is built as a [BLOCK_K, 1] column and every per-merge value in the one shape it is used
    # in: a 1-d value used both alone and expanded is what broke Triton 3.6's layout pass (`triton_gather_merge`)
    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)[:, None]
    row_ok = rows < N_OUT
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_D), BLOCK_D)[None, :]
    col_ok = cols < D

    # the input position of each output row's own token: protected, then unmerged a (a-set index unm), then b
    is_unm = (rows >= P) & (rows < P + U) & row_ok
    a_index = tl.load(unm_ptr + b * stride_ub + (rows - P), mask=is_unm, other=0)
    own = tl.where(rows < P, rows, tl.where(rows < P + U, A_START + 2 * a_index, B_START + 2 * (rows - P - U)))
    own = tl.where(row_ok, own, 0)
    # without sizes every token stands for one patch: the masked load gives 1.0
    weight = tl.load(sizes_ptr + b * stride_sb + own, mask=row_ok & (HAS_SIZES != 0), other=1.0).to(tl.float32)
    weight = tl.where(row_ok, weight, 0.0)
    x_base = x_ptr + b * stride_xb + cols
    acc = tl.load(x_base + own * stride_xn, mask=row_ok & col_ok, other=0.0).to(tl.float32) * weight
    total = weight

    b_slot = tl.where(rows >= P + U, rows - P - U, -2)   # the b-set index of a b row; -2 (never a dst) elsewhere
    merges = tl.where(pid_k * BLOCK_K + BLOCK_K > P + U, R, 0)    # tiles without b rows receive nothing
    for r0 in range(0, merges, BLOCK_R):
        as_row = r0 + tl.arange(0, BLOCK_R)[None, :]         # [1, BLOCK_R]: the merges along the dot's inner side
        dst = tl.load(dst_ptr + b * stride_rb + as_row, mask=as_row < R, other=-1)   # -1: no b row
        src_row = tl.load(src_ptr + b * stride_rb + as_row, mask=as_row < R, other=0)
        src_weight = tl.load(sizes_ptr + b * stride_sb + A_START + 2 * src_row,
                             mask=(as_row < R) & (HAS_SIZES != 0), other=1.0).to(tl.float32)
        joins = tl.where(b_slot == dst, src_weight, 0.0)     # [BLOCK_K, BLOCK_R]
        as_col = r0 + tl.arange(0, BLOCK_R)[:, None]         # [BLOCK_R, 1]: the same merges, as rows to load
        src_col = tl.load(src_ptr + b * stride_rb + as_col, mask=as_col < R, other=0)
        merged = tl.load(x_base + (A_START + 2 * src_col) * stride_xn, mask=(as_col < R) & col_ok,
                         other=0.0).to(tl.float32)
        acc += tl.dot(joins, merged, input_precision="ieee")
        total += tl.sum(joins, axis=1, keep_dims=True)

    # IEEE division (not Triton's fast fp32 divide); a masked row divides 0 by tiny (and takes no log of 0)
    safe_total = tl.maximum(total, 1.1754943508222875e-38)
    out = tl.math.div_rn(acc, tl.broadcast_to(safe_total, (BLOCK_K, BLOCK_D)))
    tl.store(out_ptr + b * stride_yb + rows.to(tl.int64) * stride_yk + cols, out.to(out_ptr.dtype.element_ty),
             mask=row_ok & col_ok)
    # every D tile computed the same sizes; the first one writes them (and their log)
    first = row_ok & (pid_d == 0)
    tl.store(out_sizes_ptr + b * stride_zb + rows, total.to(out_sizes_ptr.dtype.element_ty), mask=first)
    tl.store(log_ptr + b * stride_zb + rows, tl.log(safe_total).to(log_ptr.dtype.element_ty),
             mask=first & (WRITE_LOG != 0))


def launch_config(dtype, D):
    """The compiled variant a launch uses: (x dtype name, BLOCK_K, BLOCK_D); sizes and the log are run-time
    flags, so they add no variant."""
    return (X_DTYPES[dtype],) + tile_shape(D)


def launch_configs():
    """Every (x dtype name, BLOCK_K, BLOCK_D) that `launch_config` can return."""
    return sorted({launch_config(dtype, D) for dtype in X_DTYPES for D in (1, 33, 65, 129, 257)})


def tome_merge_triton(x, sizes, unm, src, dst, protected, with_log):
    """Launch the fused merge: x [B, N, D] (fp32/fp16/bf16), sizes [B, N] in x's dtype or None, unm [B, U], src
    and dst [B, r] int64 indices into the unprotected a / b sets (`pruners.tome`). Returns (out [B, N - r, D],
    sizes' [B, N - r], log(sizes') [B, N - r], or [0] without with_log), all in x's dtype and contiguous. Reads no
    tensor data on the host: the grid depends on shapes only."""
    B, N, D = x.shape
    r, U = src.shape[1], unm.shape[1]
    n_out = N - r
    x = x if x.stride(-1) == 1 else x.contiguous()
    unm, src, dst = unm.contiguous(), src.contiguous(), dst.contiguous()
    out = torch.empty(B, n_out, D, device=x.device, dtype=x.dtype)
    out_sizes = torch.empty(B, n_out, device=x.device, dtype=x.dtype)
    log = torch.empty(B, n_out if with_log else 0, device=x.device, dtype=x.dtype)
    if B * n_out == 0:
        return out, out_sizes, log
    sizes = out_sizes if sizes is None else sizes.contiguous()    # placeholder pointer, never read without sizes
    _, block_k, block_d = launch_config(x.dtype, D)
    grid = (triton.cdiv(n_out, block_k), max(triton.cdiv(D, block_d), 1), B)
    a_start, b_start = 2 * ((protected + 1) // 2), 2 * (protected // 2) + 1
    with torch.cuda.device_of(x):   # triton launches on the current device, which need not be x's
        _tome_merge_kernel[grid](
            x, sizes, unm, src, dst, out, out_sizes, log if with_log else out_sizes,
            n_out, U, r, D, protected, a_start, b_start, int(sizes is not out_sizes), int(with_log),
            x.stride(0), x.stride(1), sizes.stride(0), unm.stride(0), src.stride(0),
            out.stride(0), out.stride(1), out_sizes.stride(0),
            BLOCK_K=block_k, BLOCK_D=block_d, BLOCK_R=BLOCK_R, num_warps=NUM_WARPS,
        )
    return out, out_sizes, log
