"""ToMe (Token Merging, Bolya et al., ICLR 2023): bipartite soft matching and the size-weighted merge.

Tokens alternate between set a (even positions) and set b (odd positions) of the current sequence. The first
`protected` positions ([CLS], registers, any prefix token) are sliced out of both sets: they neither merge nor
receive, which is what ToMe's -inf scores do for its class and distillation tokens, without the fill.

The merge is one fused launch on CUDA (`kernels.tome_merge`: the merged rows, their sizes and log-sizes), ToMe's
own gather / scatter on a CPU (`kernels.reference.tome_merge_reference`).
"""
import torch

from ..kernels import tome_merge as fused_merge
from ..kernels.reference import tome_sets as _sets


def max_merge(n_tokens, protected):
    """The most tokens one layer can merge (ToMe's cap: half of the unprotected tokens)."""
    return max(0, (n_tokens - protected) // 2)


def bipartite_soft_matching(metric, r, protected=1, sort_unmerged=True):
    """The r most similar (a -> b) pairs, as ToMe chooses them.

    metric: [B, N, C] (ToMe: the layer's keys averaged over heads); 0 < r <= max_merge(N, protected).
    Every unprotected a-token proposes its most cosine-similar unprotected b-token; the r strongest proposals
    merge. Returns indices into the unprotected a / b sets (`_sets`): unm [B, Na - r] a-tokens that stay (sorted
    ascending when sort_unmerged, as ToMe sorts them when there is a class token; else in ToMe's edge order),
    src [B, r] a-tokens merged away and dst [B, r] the b-token each of them joins.
    """
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = _sets(metric, protected)
    node_max, node_idx = (a @ b.transpose(1, 2)).max(dim=-1)          # best b for each a: [B, Na]
    edges = node_max.argsort(dim=-1, descending=True)
    src, unm = edges[:, :r], edges[:, r:]
    if sort_unmerged:
        unm = unm.sort(dim=-1).values
    return unm, src, node_idx.gather(1, src)


def merge_wavg(x, sizes, unm, src, dst, protected=1, with_log=False):
    """ToMe's size-weighted merge of the matching (`bipartite_soft_matching`), one fused launch on CUDA.

    x: [B, N, D]; sizes: [B, N, 1] patches each token stands for, in x's dtype (None: all 1). Each b-token
    becomes the size-weighted mean of itself and the a-tokens merged into it. Returns (x' [B, N - r, D],
    sizes' [B, N - r, 1], log(sizes') [B, N - r] with with_log, else None) in ToMe's order: [protected tokens,
    unmerged a, b].
    """
    out, sizes, log = fused_merge(x, None if sizes is None else sizes[..., 0], unm, src, dst, protected, with_log)
    return out, sizes[..., None], log if with_log else None


def raster_positions(unm, n_tokens, protected=1):
    """Original positions [B, N - r] of the tokens `merge_wavg` returns, in its order (ToMe order)."""
    a_pos, b_pos = _sets(torch.arange(n_tokens, device=unm.device)[None], protected)
    head = torch.arange(protected, device=unm.device).expand(unm.shape[0], -1)
    return torch.cat([head, a_pos.expand(unm.shape[0], -1).gather(1, unm), b_pos.expand(unm.shape[0], -1)], dim=1)


def tome_merge(x, sizes, metric, r, protected=1, order="tome", with_log=False):
    """One ToMe step on x [B, N, D]: merge r tokens (capped at `max_merge`), protected tokens untouched.

    sizes: [B, N, 1] or None; metric: [B, N, C]. order "tome": [protected, unmerged a (ascending when there are
    protected tokens, as ToMe does with a class token), b], what the next layer's a/b split sees in ToMe;
    "raster": survivors in their original order. Returns (x', sizes', log(sizes') [B, N - r] with with_log, else
    None) with N - r tokens; nothing changes (and the log is None) when no token merges.
    """
    r = min(r, max_merge(x.shape[1], protected))
    if r <= 0:
        return x, sizes, None
    unm, src, dst = bipartite_soft_matching(metric, r, protected, sort_unmerged=order == "tome" and protected > 0)
    x, sizes, log = merge_wavg(x, sizes, unm, src, dst, protected, with_log)
    if order == "raster":
        order_idx = raster_positions(unm, metric.shape[1], protected).argsort(dim=1)
        x, sizes = x.gather(1, order_idx[..., None].expand_as(x)), sizes.gather(1, order_idx[..., None])
        log = None if log is None else log.gather(1, order_idx)
    return x, sizes, log
