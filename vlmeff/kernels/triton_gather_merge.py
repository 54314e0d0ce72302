"""Fused Triton gather-and-merge (the CUDA path of `vlmeff.kernels.gather_merge`; also runs in the interpreter).

Pull design: one program per (tile of BLOCK_K output tokens, tile of BLOCK_D hidden units, batch) walks its
tokens' segments member by member, accumulates w * x and sum(w) in fp32 registers and stores each output element
once. No atomics, so the result is deterministic and bf16 needs no atomic support. Pure drop (segments of size 1)
is the same kernel with a single loop iteration.
"""
import torch
import triton
import triton.language as tl

# Whether `@triton.jit` below produced interpreter functions: triton reads TRITON_INTERPRET at decoration time,
# so setting the variable after this module was imported has no effect.
INTERPRET = bool(triton.knobs.runtime.interpret)

MAX_TILE_ELEMENTS = 4096   # BLOCK_K * BLOCK_D: enough work per program to hide latency, few enough registers
MAX_BLOCK_D = 256          # 512 B of bf16 per row chunk: 16-byte vector loads, and D=1024 still gives 4 tiles


@triton.jit
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
    x_base = x_ptr + b * stride_xb + cols[None, :]

    acc = tl.zeros((BLOCK_K, BLOCK_D), dtype=tl.float32)
    total = tl.zeros((BLOCK_K,), dtype=tl.float32)
    # Members in order, as the reference sums them. Rows with shorter segments idle (masked, no memory traffic)
    # until the tile's longest segment is done.
    for j in range(0, tl.max(length, axis=0)):
        member = j < length
        src = tl.load(index_ptr + b * stride_ib + start + j, mask=member, other=0)   # int64 token ids
        if HAS_WEIGHT:
            w = tl.load(weight_ptr + b * stride_wb + start + j, mask=member, other=0).to(tl.float32)
        else:
            w = member.to(tl.float32)
        vals = tl.load(x_base + src[:, None] * stride_xn, mask=member[:, None] & col_mask[None, :], other=0.0)
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


def gather_merge_triton(x, index, offsets, weight=None):
    """Launch the fused kernel on validated inputs: x [B, N, D] (fp32/fp16/bf16), index [B, M] int64,
    offsets [B, K + 1] int64, weight [B, M] or None. Returns (out [B, K, D] in x.dtype, total [B, K] float32)."""
    B, _, D = x.shape
    K = offsets.shape[1] - 1
    # unit stride along the contiguous dimension is what makes the loads wide; the index tensors are tiny
    x = x if x.stride(-1) == 1 else x.contiguous()
    index, offsets = index.contiguous(), offsets.contiguous()
    weight = weight.contiguous() if weight is not None else None
    out = torch.empty(B, K, D, device=x.device, dtype=x.dtype)
    total = torch.empty(B, K, device=x.device, dtype=torch.float32)
    if B * K == 0:
        return out, total
    block_d = min(MAX_BLOCK_D, triton.next_power_of_2(max(D, 1)))
    block_k = min(MAX_TILE_ELEMENTS // block_d, triton.next_power_of_2(K))
    grid = (triton.cdiv(K, block_k), max(triton.cdiv(D, block_d), 1), B)   # D == 0 still writes the totals
    w = weight if weight is not None else total   # placeholder pointer, never read when HAS_WEIGHT is False
    with torch.cuda.device_of(x):   # triton launches on the current device, which need not be x's
        _gather_merge_kernel[grid](
            x, index, offsets, w, out, total,
            K, D,
            x.stride(0), x.stride(1), index.stride(0), offsets.stride(0), w.stride(0),
            out.stride(0), out.stride(1), total.stride(0),
            HAS_WEIGHT=weight is not None, BLOCK_K=block_k, BLOCK_D=block_d,
            num_warps=4,
        )
    return out, total
