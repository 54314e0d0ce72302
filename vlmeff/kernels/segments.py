"""The segment format of `gather_merge` (index [B, M], offsets [B, K + 1]): building it from an assignment of
tokens to output slots, and checking it."""
import torch

from ..layout import slot_ranges


def segments_from_assignment(dst, num_out, drops=True):
    """(index [B, N], offsets [B, num_out + 1]) for `gather_merge` from dst [B, N] int64: each token's output slot
    in [0, num_out), or -1 to drop it (nothing else: other values wrap modulo num_out + 1); `drops=False` promises
    there is no -1, saving a launch. Members are sorted by slot (stably, so they keep their order); dropped tokens
    come after offsets[:, -1]. The segments are valid whatever dst holds, so `gather_merge(..., validate=False)` is
    safe on them. Three launches (two without drops), no host synchronisation."""
    # -1 -> num_out: dropped tokens sort after every slot (one op, where torch.where needs three)
    slot = dst.remainder(num_out + 1) if drops else dst
    sorted_slot, index = slot.sort(dim=1, stable=True)
    # offsets[b, k] = number of members of slots < k = first position of slot k in the sorted row
    return index, torch.searchsorted(sorted_slot, slot_ranges(dst.shape[0], num_out + 1, dst))


def check_layout(x, index, offsets, weight):
    """Shape, dtype and device checks: free (no data access), so they also run while torch.compile traces."""
    if x.dim() != 3:
        raise ValueError(f"gather_merge expects x of shape [B, N, D], got {tuple(x.shape)}")
    B = x.shape[0]
    if index.dim() != 2 or index.shape[0] != B or index.dtype != torch.long:
        raise ValueError(f"index must be int64 [B={B}, M], got {index.dtype} {tuple(index.shape)}")
    if offsets.dim() != 2 or offsets.shape[0] != B or offsets.shape[1] < 1 or offsets.dtype != torch.long:
        raise ValueError(f"offsets must be int64 [B={B}, K + 1], got {offsets.dtype} {tuple(offsets.shape)}")
    if weight is not None and weight.shape != index.shape:
        raise ValueError(f"weight must have the shape of index {tuple(index.shape)}, got {tuple(weight.shape)}")
    if any(t.device != x.device for t in (index, offsets, weight) if t is not None):
        raise ValueError(f"index, offsets and weight must be on x's device {x.device}")


def check_values(x, index, offsets):
    """Range and monotonicity checks. They read the data (one host sync); the Triton kernel does no bounds checks."""
    N, M = x.shape[1], index.shape[1]
    index_bad = ((index < 0) | (index >= N)).any()
    offsets_bad = (offsets[:, 0] != 0).any() | (offsets.diff(dim=1) < 0).any() | (offsets[:, -1] > M).any()
    index_bad, offsets_bad = torch.stack([index_bad, offsets_bad]).tolist()   # the one host sync
    if index_bad:
        raise ValueError(f"index values must lie in [0, {N}), got [{int(index.min())}, {int(index.max())}]")
    if offsets_bad:
        raise ValueError(f"offsets must start at 0, be non-decreasing and end at most at M={M}")


def validate_segments(x, index, offsets, weight=None):
    """Raise ValueError unless (index, offsets, weight) describe valid segments over x's tokens."""
    check_layout(x, index, offsets, weight)
    check_values(x, index, offsets)
