"""Reducers: shrink a token sequence given what to keep. Merges by assignment (`merge_into_kept`, `pool`) end in
`kernels.gather_merge` (one fused launch); a pure drop is one `gather`; VisionZip's contextual tokens are a dense
one-hot product (`contextual_merge`); ToMe merges with its own fused op (`kernels.tome_merge`, `pruners.tome`)."""
import torch

from ..kernels import gather_merge, nearest_kept, segments_from_assignment


def reduce_by_assignment(x, dst, num_out, sizes=None, drops=True):
    """Average tokens into output slots.

    x: [B, N, D]; dst: [B, N] int64 output slot in [0, num_out) of every token, -1 to drop it (`drops=False`
    promises there is none, saving a launch); sizes: [B, N] token sizes (how many original patches each token
    stands for), None for all 1. Output slot k is the size-weighted mean of its members, in their original order.
    Returns (x' [B, num_out, D], sizes' [B, num_out]).
    Launches: `segments_from_assignment` (2, 3 with drops), gather_merge (+ gather with sizes); no host sync.
    """
    index, offsets = segments_from_assignment(dst, num_out, drops)
    weight = None if sizes is None else sizes.gather(1, index)
    # segments built this way are valid by construction: skip the checks' host sync
    return gather_merge(x, index, offsets, weight, validate=False)


def gather_rows(t, rows):
    """t [B, N, C] at rows [B, K] -> [B, K, C]: one gather."""
    return t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1]))


def drop_tokens(x, keep_idx, sizes=None):
    """Keep tokens keep_idx [B, K] of x [B, N, D], drop the rest: one gather (two with sizes), bit-exact.
    Returns (x' [B, K, D], sizes' [B, K], None when sizes is None: every kept token still stands for itself)."""
    return gather_rows(x, keep_idx), None if sizes is None else sizes.gather(1, keep_idx)


def merge_into_kept(x, keep_idx, metric, sizes=None, targets=None, fixed=0):
    """Keep keep_idx [B, K] and merge every other token into its most similar kept token (cosine of `metric`
    [B, N, C]) by size-weighted average. Kept tokens that may not receive merges (prefix tokens such as [CLS],
    row separators): the first `fixed` ones (a protected prefix, sorted first in keep_idx), and, if given, those
    where `targets` [B, K] bool is False. Returns (x' [B, K, D], sizes' [B, K]).
    Launches: the assignment (`kernels.nearest_kept`, one fused launch on CUDA), then `reduce_by_assignment` (3).
    """
    dst = nearest_kept(metric, keep_idx, fixed, targets)
    return reduce_by_assignment(x, dst, keep_idx.shape[1], sizes, drops=False)


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
    # counts in float32: bf16 holds integers exactly only up to 256, and a target may gather more members
    counts = members.sum(dim=1, dtype=torch.float32).clamp_min(1)[..., None]
    mean = ((members.transpose(1, 2) @ x) / counts).to(x.dtype)                   # divided in float32
    return x[:, targets] + mean, step


def merge_groups(reduce, n, N, device):
    """Where each row went: `reduce(x)` -> x' [n, K, ...] the reduction to trace (its selection and assignment
    fixed by its scores and metric, not by x), run on the identity block [n, N, N] (float32), whose outputs are then
    positive combinations of their members' one-hot rows. -> [n, N] long: each input row's output, -1 if dropped."""
    reduced = reduce(torch.eye(N, device=device).expand(n, N, N).contiguous())
    weight, output = reduced.max(dim=1)
    return torch.where(weight > 0, output, -1)
