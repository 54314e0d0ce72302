"""Fused Triton assignment of every token to its kept token (the CUDA path of `vlmeff.kernels.nearest_kept`; also
runs in the interpreter).

One launch does what `merge_into_kept` did with eight: gather the kept tokens' metric rows, normalise them, one
similarity product, mask the kept tokens that may not receive, argmax, offset by the protected prefix, and give
each kept token its own slot. One program per (tile of BLOCK_N tokens, batch) holds its tokens' metric rows and
walks the kept tokens in chunks of BLOCK_J: a `tl.dot` (IEEE fp32) of the rows with the chunk's normalised rows,
a running maximum that keeps the first index on ties (as `torch.argmax`), and the chunk's match of kept indices
against the tile's tokens.
"""
import torch
import triton
import triton.language as tl

BLOCK_C_CHOICES = (16, 32, 64, 128, 256)    # metric width, padded; wider metrics run the reference
TILE_ELEMENTS = 2048                        # BLOCK_N * BLOCK_C (and BLOCK_J * BLOCK_C) register tiles
NUM_WARPS = 4


@triton.jit(do_not_specialize=("N", "K", "C", "FIXED", "HAS_TARGETS", "stride_mb", "stride_mn", "stride_kb",
                               "stride_tb", "stride_db"))
def _nearest_kept_kernel(
    metric_ptr, keep_ptr, targets_ptr, dst_ptr,
    N, K, C, FIXED, HAS_TARGETS,
    stride_mb, stride_mn, stride_kb, stride_tb, stride_db,
    BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    # each value is built in the one shape it is used in (see `triton_gather_merge` on Triton 3.6's layout pass)
    tokens = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]            # [BLOCK_N, 1]
    token_ok = tokens < N
    channels = tl.arange(0, BLOCK_C)[None, :]                            # [1, BLOCK_C]
    channel_ok = channels < C
    rows = tl.load(metric_ptr + b * stride_mb + tokens * stride_mn + channels, mask=token_ok & channel_ok,
                   other=0.0).to(tl.float32)

    best = tl.full((BLOCK_N, 1), float("-inf"), tl.float32)
    best_slot = tl.full((BLOCK_N, 1), 0, tl.int64) + FIXED     # torch.argmax over only -inf picks the first
    own_slot = tl.full((BLOCK_N, 1), -1, tl.int64)
    for j0 in range(0, K, BLOCK_J):
        slot_row = (j0 + tl.arange(0, BLOCK_J)[None, :]).to(tl.int64)   # [1, BLOCK_J]
        kept_row = tl.load(keep_ptr + b * stride_kb + slot_row, mask=slot_row < K, other=-1)
        own_slot = tl.maximum(own_slot, tl.max(tl.where(kept_row == tokens, slot_row, -1), axis=1, keep_dims=True))
        # without a targets mask every kept token past the prefix receives: the masked load gives 1
        target = tl.load(targets_ptr + b * stride_tb + slot_row, mask=(slot_row < K) & (HAS_TARGETS != 0), other=1)
        receives = (slot_row >= FIXED) & (slot_row < K) & (target != 0)
        slot_col = j0 + tl.arange(0, BLOCK_J)[:, None]                   # [BLOCK_J, 1]
        kept_col = tl.load(keep_ptr + b * stride_kb + slot_col, mask=slot_col < K, other=0)
        candidates = tl.load(metric_ptr + b * stride_mb + kept_col * stride_mn + channels,
                             mask=(slot_col < K) & channel_ok, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(candidates * candidates, axis=1, keep_dims=True))
        # F.normalize: divided by max(norm, 1e-12), so a zero row stays zero
        candidates = tl.math.div_rn(candidates, tl.broadcast_to(tl.maximum(norm, 1e-12), (BLOCK_J, BLOCK_C)))
        similarity = tl.dot(rows, tl.trans(candidates), input_precision="ieee")     # [BLOCK_N, BLOCK_J]
        similarity = tl.where(receives, similarity, float("-inf"))
        chunk_best = tl.max(similarity, axis=1, keep_dims=True)
        chunk_slot = tl.min(tl.where(similarity == chunk_best, slot_row, K), axis=1, keep_dims=True)
        better = chunk_best > best                 # strictly: an earlier chunk wins ties
        best = tl.where(better, chunk_best, best)
        best_slot = tl.where(better, chunk_slot, best_slot)

    dst = tl.where(own_slot >= 0, own_slot, best_slot)
    tl.store(dst_ptr + b * stride_db + tokens, dst, mask=token_ok)


def tile_shape(C):
    """(BLOCK_N, BLOCK_J, BLOCK_C) for metric width C <= 256: the smallest listed BLOCK_C that covers C, and as many
    tokens (and kept tokens per chunk) as fill TILE_ELEMENTS, at least 16 (tl.dot's smallest side)."""
    block_c = next(c for c in BLOCK_C_CHOICES if c >= C)
    block_n = max(16, TILE_ELEMENTS // block_c)
    return block_n, block_n, block_c


def supports(C):
    return C <= BLOCK_C_CHOICES[-1]


def launch_config(C):
    """The compiled variant a launch uses: (BLOCK_N, BLOCK_J, BLOCK_C); the metric is always fp32 and the targets
    mask a run-time flag."""
    return tile_shape(C)


def launch_configs():
    """Every (BLOCK_N, BLOCK_J, BLOCK_C) that `launch_config` can return."""
    return [tile_shape(c) for c in BLOCK_C_CHOICES]


def nearest_kept_triton(metric, keep_idx, fixed, targets):
    """Launch the fused assignment: metric [B, N, C] float32 (C <= 256), keep_idx [B, K] int64, fixed the protected
    prefix of keep_idx that receives nothing, targets [B, K] bool (False: receives nothing) or None. Returns dst
    [B, N] int64. Reads no tensor data on the host: the grid depends on shapes only."""
    B, N, C = metric.shape
    K = keep_idx.shape[1]
    metric = metric if metric.stride(-1) == 1 else metric.contiguous()
    keep_idx = keep_idx.contiguous()
    dst = torch.empty(B, N, device=metric.device, dtype=torch.long)
    if B * N == 0:
        return dst
    # bool read as uint8 (a view, no copy); a one-byte placeholder when there is no mask, never read
    flags = (torch.empty(1, 1, device=metric.device, dtype=torch.uint8) if targets is None
             else targets.contiguous().view(torch.uint8))
    block_n, block_j, block_c = launch_config(C)
    with torch.cuda.device_of(metric):
        _nearest_kept_kernel[(triton.cdiv(N, block_n), B)](
            metric, keep_idx, flags, dst,
            N, K, C, fixed, int(targets is not None),
            metric.stride(0), metric.stride(1), keep_idx.stride(0), flags.stride(0), dst.stride(0),
            BLOCK_N=block_n, BLOCK_J=block_j, BLOCK_C=block_c, num_warps=NUM_WARPS,
        )
    return dst
