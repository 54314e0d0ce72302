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


def contextual_merge(x, metric, contextual):
    """VisionZip's contextual tokens: fold the tokens left after the dominant ones into `contextual` tokens.

    x: [B, R, D] the remaining tokens in their original order; metric: [B, R, C] their keys (head mean);
    1 <= contextual <= R. As in VisionZip: the targets are every step-th remaining token, step = R // contextual,
    the first `contextual` of them; every other token joins the target whose normalised key is most similar (the
    first on ties); a contextual token is its target + the plain mean of its members (the target alone when it
    has none). Returns (tokens [B, contextual, D] in target order, step): the targets are positions
    0, step, ..., (contextual - 1) * step of the R tokens. A dense one-hot product: no sort, no host sync.
    """
    B, R, D = x.shape
    step = R // contextual
    targets = slice(0, contextual * step, step)
    keys = metric / metric.norm(dim=-1, keepdim=True)
    nearest = (keys @ keys[:, targets].transpose(1, 2)).argmax(dim=-1)              # [B, R] -> target
    nearest[:, targets] = contextual              # a target is no member: send it to a spare column, dropped below
    members = torch.zeros(B, R, contextual + 1, dtype=x.dtype, device=x.device).scatter_(2, nearest[..., None], 1)
    members = members[..., :contextual]                                             # [B, R, contextual] one-hot
    mean = (members.transpose(1, 2) @ x) / members.sum(dim=1).clamp_min(1)[..., None]
    return x[:, targets] + mean, step
