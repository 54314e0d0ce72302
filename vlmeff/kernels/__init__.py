"""Gather-and-merge of retained tokens. Every reducer in vlmeff ends in `gather_merge`."""
import torch

from .reference import gather_merge_reference


def validate_segments(x, index, offsets, weight=None):
    """Raise ValueError unless (index, offsets, weight) describe valid segments over x's tokens."""
    if x.dim() != 3:
        raise ValueError(f"gather_merge expects x of shape [B, N, D], got {tuple(x.shape)}")
    B, N, _ = x.shape
    if index.dim() != 2 or index.shape[0] != B or index.dtype != torch.long:
        raise ValueError(f"index must be int64 [B={B}, M], got {index.dtype} {tuple(index.shape)}")
    if offsets.dim() != 2 or offsets.shape[0] != B or offsets.dtype != torch.long:
        raise ValueError(f"offsets must be int64 [B={B}, K + 1], got {offsets.dtype} {tuple(offsets.shape)}")
    if index.numel() and (index.min() < 0 or index.max() >= N):
        raise ValueError(f"index values must lie in [0, {N}), got [{int(index.min())}, {int(index.max())}]")
    if (offsets[:, 0] != 0).any() or (offsets.diff(dim=1) < 0).any() or (offsets[:, -1] > index.shape[1]).any():
        raise ValueError(f"offsets must start at 0, be non-decreasing and end at most at M={index.shape[1]}")
    if weight is not None and weight.shape != index.shape:
        raise ValueError(f"weight must have the shape of index {tuple(index.shape)}, got {tuple(weight.shape)}")


def gather_merge(x, index, offsets, weight=None):
    """See `gather_merge_reference` for the contract. Returns (out [B, K, D], total_weight [B, K] float32)."""
    validate_segments(x, index, offsets, weight)
    return gather_merge_reference(x, index, offsets, weight)


def segments_from_assignment(dst, num_out):
    """(index [B, N], offsets [B, num_out + 1]) for `gather_merge` from dst [B, N] int64: each token's output slot
    in [0, num_out), or -1 to drop it. Members are sorted by slot (stably, so they keep their order); dropped
    tokens come after offsets[:, -1]. No host synchronisation."""
    slot = torch.where(dst < 0, num_out, dst)
    index = slot.argsort(dim=1, stable=True)
    counts = torch.zeros(dst.shape[0], num_out + 1, dtype=torch.long, device=dst.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    offsets = torch.nn.functional.pad(counts[:, :num_out].cumsum(dim=1), (1, 0))
    return index, offsets
