"""Reducers: shrink a token sequence given what to keep. Both drop and merge end in `kernels.gather_merge`."""
import torch
import torch.nn.functional as F

from ..kernels import gather_merge, segments_from_assignment


def reduce_by_assignment(x, dst, num_out, sizes=None):
    """Average tokens into output slots.

    x: [B, N, D]; dst: [B, N] int64 output slot in [0, num_out) of every token, -1 to drop it; sizes: [B, N]
    token sizes (how many original patches each token stands for), None for all 1. Output slot k is the
    size-weighted mean of its members, in their original order. Returns (x' [B, num_out, D], sizes' [B, num_out]).
    """
    index, offsets = segments_from_assignment(dst, num_out)
    weight = None if sizes is None else sizes.gather(1, index)
    # segments built by segments_from_assignment are valid by construction: skip the checks' host sync
    out, total = gather_merge(x, index, offsets, weight, validate=False)
    return out, total


def keep_assignment(keep_idx, n):
    """dst [B, n]: kept token keep_idx[b, j] -> slot j, every other token -> -1 (dropped)."""
    dst = torch.full((keep_idx.shape[0], n), -1, dtype=torch.long, device=keep_idx.device)
    return dst.scatter_(1, keep_idx, torch.arange(keep_idx.shape[1], device=keep_idx.device).expand_as(keep_idx))


def drop_tokens(x, keep_idx, sizes=None):
    """Keep tokens keep_idx [B, K] of x [B, N, D] (sorted indices), drop the rest. Returns (x' [B, K, D], sizes')."""
    return reduce_by_assignment(x, keep_assignment(keep_idx, x.shape[1]), keep_idx.shape[1], sizes)


def merge_into_kept(x, keep_idx, metric, sizes=None, targets=None):
    """Keep keep_idx [B, K] and merge every other token into its most similar kept token (cosine of `metric`
    [B, N, C]) by size-weighted average. `targets` [B, K] bool marks which kept tokens may receive merges
    (default: all; prefix tokens such as [CLS] are excluded by the caller). Returns (x' [B, K, D], sizes' [B, K]).
    """
    B, N, _ = x.shape
    dst = keep_assignment(keep_idx, N)
    m = F.normalize(metric.float(), dim=-1)
    sim = m @ m.gather(1, keep_idx[..., None].expand(-1, -1, m.shape[-1])).transpose(1, 2)   # [B, N, K]
    if targets is not None:
        sim = sim.masked_fill(~targets[:, None, :], float("-inf"))
    nearest = sim.argmax(dim=-1)
    dst = torch.where(dst < 0, nearest, dst)
    return reduce_by_assignment(x, dst, keep_idx.shape[1], sizes)


def contextual_merge(x, dominant, remaining, metric, contextual):
    """VisionZip-style reduction: keep the dominant tokens and fold the remaining ones into `contextual` tokens.

    x: [B, N, D]; dominant: [B, Kd] and remaining: [B, R] disjoint token indices (sorted); metric: [B, N, C].
    Contextual targets are `contextual` of the remaining tokens at a uniform stride; every other remaining token
    joins its most cosine-similar target, and each contextual token is target + mean(its members), as in
    VisionZip. Returns (x' [B, Kd + contextual, D], rows [B, Kd + contextual]): each output sits at the row of
    its dominant token or target, in ascending row order.
    """
    B, N, _ = x.shape
    R = remaining.shape[1]
    stride = torch.arange(contextual, device=x.device) * (R // contextual)
    targets = remaining[:, stride]                                                  # [B, C]
    rows = torch.cat([dominant, targets], dim=1).sort(dim=1).values
    dst = keep_assignment(rows, N)
    m = F.normalize(metric.float(), dim=-1)
    gather = lambda idx: m.gather(1, idx[..., None].expand(-1, -1, m.shape[-1]))
    nearest = (gather(remaining) @ gather(targets).transpose(1, 2)).argmax(dim=-1)  # [B, R] -> target
    target_slot = dst.gather(1, targets)                                            # [B, C]
    members = dst.gather(1, remaining) < 0                                          # not a target itself
    dst = dst.scatter(1, remaining, torch.where(members, target_slot.gather(1, nearest), dst.gather(1, remaining)))
    # weights: 1 for kept rows, 1 / (members of its target) for folded rows -> weighted mean x total = t + mean
    counts = torch.zeros(B, rows.shape[1], device=x.device).scatter_add_(
        1, target_slot.gather(1, nearest), members.float())
    weight = torch.ones(B, N, device=x.device)
    folded = 1 / counts.gather(1, target_slot.gather(1, nearest)).clamp_min(1)
    weight = weight.scatter(1, remaining, torch.where(members, folded, 1.0))
    out, total = reduce_by_assignment(x, dst, rows.shape[1], weight)
    return (out.float() * total[..., None]).to(x.dtype), rows
