"""Fused Triton gather-and-merge (the CUDA path of `vlmeff.kernels.gather_merge`; also runs in the interpreter).

Pull design: one program per (tile of BLOCK_K output tokens, tile of BLOCK_D hidden units, batch) walks its
tokens' segments member by member, accumulates w * x and sum(w) in fp32 registers and stores each output element
once. No atomics, so the result is deterministic and bf16 needs no atomic support. Pure drop (segments of size 1)
is the same kernel with a single loop iteration.

The launcher picks from a small fixed set of compiled variants (`launch_configs`): each variant costs a JIT
compile on first use, and the test suite AOT-compiles every one of them for sm80 and sm90 under each supported
Triton (`vlmeff.kernels.compile_check`).
"""
import torch
import triton
import triton.language as tl

# Whether `@triton.jit` below produced interpreter functions: triton reads TRITON_INTERPRET at decoration time,
# so setting the variable after this module was imported has no effect.
INTERPRET = bool(triton.knobs.runtime.interpret)

TILE_ELEMENTS = 4096          # BLOCK_K * BLOCK_D: enough work per program to hide latency, few enough registers
BLOCK_D_CHOICES = (32, 64, 128, 256)   # 256: 512 B of bf16 per row chunk (16-byte vector loads), D=1024 in 4 tiles
X_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}   # x / out element types
NUM_WARPS = 4


# K and the index-side strides are not specialised: Triton would otherwise compile a new variant whenever one of
# them is 1 or changes its divisibility by 16 (K changes from layer to layer), for no faster code. D and the x /
# out strides stay specialised: their divisibility by 16 is what allows 16-byte vector loads and stores.
@triton.jit(do_not_specialize=("K", "stride_ib", "stride_ob", "stride_wb", "stride_tb"))
def _gather_merge_kernel(
    x_ptr, index_ptr, offsets_ptr, weight_ptr, out_ptr, total_ptr,
    K, D,
    stride_xb, stride_xn, stride_ib, stride_ob, stride_wb, stride_yb, stride_yk, stride_tb,
    HAS_WEIGHT: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)   # int64 before any stride product: B * N * D may exceed 2**31
    rows = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    row_mask = rows < K
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cols = tl.max_contiguous(tl.multiple_of(cols, BLOCK_D), BLOCK_D)   # one contiguous, aligned run per row
    col_mask = cols < D

    start = tl.load(offsets_ptr + b * stride_ob + rows, mask=row_mask, other=0)
    length = tl.load(offsets_ptr + b * stride_ob + rows + 1, mask=row_mask, other=0) - start
    # The tile's mask comes from its own [BLOCK_K, 1] copy of the lengths, not from expanding the 1-d member
    # mask: a 1-d value used both alone and expanded into the tile gets rewritten into the tile's slice layout by
    # Triton 3.6's layout-conversion pass, leaving the 1-d loads with a mask whose layout differs from their
    # pointers' ("'tt.load' op failed to verify that mask type matches ptr type", and "'arith.uitofp' ... cast
    # incompatible" on member.to(float32)): the kernel failed to compile for BLOCK_K >= 32.
    tile_length = length[:, None]
    x_base = x_ptr + b * stride_xb + cols[None, :]

    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    total = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # Members in order, as the reference sums them. Rows with shorter segments idle (masked, no memory traffic)
    # until the tile's longest segment is done.
    for j in range(0, tl.max(length, axis=0)):
        member = j < length
        src = tl.load(index_ptr + b * stride_ib + start + j, mask=member, other=0)   # int64 token ids
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + b * stride_wb + start + j, mask=member, other=0.0)
        else:
            w = tl.where(member, 1.0, 0.0)
        vals = tl.load(x_base + src[:, None] * stride_xn, mask=(j < tile_length) & col_mask[None, :], other=0.0)
        acc += vals.to(tl.float32) * w[:, None]
        total += w

    # IEEE division (not Triton's fast fp32 divide) so results match the reference and pure gather is exact;
    # the clamp gives an empty segment 0 / tiny = 0.
    denom = tl.broadcast_to(tl.maximum(total, 1.1754943508222875e-38)[:, None], (BLOCK_K, BLOCK_D))
    out = tl.math.div_rn(acc, denom)
    y_ptrs = out_ptr + b * stride_yb + rows[:, None].to(tl.int64) * stride_yk + cols[None, :]
    tl.store(y_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])
    # every D tile computed the same totals; the first one writes them
    tl.store(total_ptr + b * stride_tb + rows, total, mask=row_mask & (pid_d == 0))


def tile_shape(D):
    """(BLOCK_K, BLOCK_D) for hidden size D: the smallest listed BLOCK_D that covers D (256 beyond), and as many
    rows as fill TILE_ELEMENTS. The same tile for every K: rows past K are masked and cost no memory traffic, and
    one variant per BLOCK_D keeps run-time JIT compiles (and the AOT proof) small."""
    block_d = next((c for c in BLOCK_D_CHOICES if c >= D), BLOCK_D_CHOICES[-1])
    return TILE_ELEMENTS // block_d, block_d


def launch_config(dtype, has_weight, D):
    """The compiled variant a launch uses: (x dtype name, HAS_WEIGHT, BLOCK_K, BLOCK_D)."""
    return (X_DTYPES[dtype], has_weight) + tile_shape(D)


def launch_configs():
    """Every (x dtype name, HAS_WEIGHT, BLOCK_K, BLOCK_D) that `launch_config` can return."""
    return [(name, has_weight) + (TILE_ELEMENTS // block_d, block_d)
            for name in X_DTYPES.values() for has_weight in (False, True) for block_d in BLOCK_D_CHOICES]


def gather_merge_triton(x, index, offsets, weight=None):
    """Launch the fused kernel on validated inputs: x [B, N, D] (fp32/fp16/bf16), index [B, M] int64,
    offsets [B, K + 1] int64, weight [B, M] or None. Returns (out [B, K, D] in x.dtype, total [B, K] float32).
    Reads no tensor data on the host (no synchronisation): the grid depends on shapes only."""
    B, _, D = x.shape
    K = offsets.shape[1] - 1
    # unit stride along the contiguous dimension is what makes the loads wide; the index tensors are tiny
    x = x if x.stride(-1) == 1 else x.contiguous()
    index, offsets = index.contiguous(), offsets.contiguous()
    # fp32 weights whatever the caller passed: one pointer type, so `launch_configs` lists every variant
    weight = weight.to(torch.float32).contiguous() if weight is not None else None
    out = torch.empty(B, K, D, device=x.device, dtype=x.dtype)
    total = torch.empty(B, K, device=x.device, dtype=torch.float32)
    if B * K == 0:
        return out, total
    _, has_weight, block_k, block_d = launch_config(x.dtype, weight is not None, D)
    grid = (triton.cdiv(K, block_k), max(triton.cdiv(D, block_d), 1), B)   # D == 0 still writes the totals
    w = weight if has_weight else total   # placeholder pointer, never read when HAS_WEIGHT is False
    with torch.cuda.device_of(x):   # triton launches on the current device, which need not be x's
        _gather_merge_kernel[grid](
            x, index, offsets, w, out, total,
            K, D,
            x.stride(0), x.stride(1), index.stride(0), offsets.stride(0), w.stride(0),
            out.stride(0), out.stride(1), total.stride(0),
            HAS_WEIGHT=has_weight, BLOCK_K=block_k, BLOCK_D=block_d,
            num_warps=NUM_WARPS,
        )
    return out, total
