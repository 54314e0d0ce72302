"""ToMe (Token Merging, Bolya et al., ICLR 2023): bipartite soft matching and the size-weighted merge.

Tokens alternate between set a (even positions) and set b (odd positions) of the current sequence. The first
`protected` positions ([CLS], registers, any prefix token) are sliced out of both sets: they neither merge nor
receive, which is what ToMe's -inf scores do for its class and distillation tokens, without the fill.

The merge runs ToMe's own gather / scatter structure on the token rows and bypasses `kernels.gather_merge`
(`reduce_by_assignment` stays for the other methods): building its segments costs more launches than the merge.
"""
import torch
import torch.nn.functional as F

def max_merge(n_tokens, protected):
    """The most tokens one layer can merge (ToMe's cap: half of the unprotected tokens)."""
    return max(0, (n_tokens - protected) // 2)


def _sets(t, protected):
    """(a, b) views of t [B, N, ...]: the unprotected even and odd positions."""
    a_start, b_start = 2 * ((protected + 1) // 2), 2 * (protected // 2) + 1
    return t[:, a_start::2], t[:, b_start::2]


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


def merge_wavg(x, sizes, unm, src, dst, protected=1):
    """ToMe's size-weighted merge of the matching (`bipartite_soft_matching`).

    x: [B, N, D]; sizes: [B, N, 1] patches each token stands for, in x's dtype (None: all 1). Each b-token
    becomes the size-weighted mean of itself and the a-tokens merged into it. Returns (x' [B, N - r, D],
    sizes' [B, N - r, 1]) in ToMe's order: [protected tokens, unmerged a, b]. Sizes ride along as an extra channel
    so that one gather / scatter moves both.
    """
    xs = F.pad(x, (0, 1), value=1.0) if sizes is None else torch.cat([x * sizes, sizes], dim=-1)
    a, b = _sets(xs, protected)
    rows = lambda idx: idx[..., None].expand(-1, -1, xs.shape[-1])
    b = b.scatter_add(1, rows(dst), a.gather(1, rows(src)))
    out = torch.cat([xs[:, :protected], a.gather(1, rows(unm)), b], dim=1)
    return out[..., :-1] / out[..., -1:], out[..., -1:]


def raster_positions(unm, n_tokens, protected=1):
    """Original positions [B, N - r] of the tokens `merge_wavg` returns, in its order (ToMe order)."""
    a_pos, b_pos = _sets(torch.arange(n_tokens, device=unm.device)[None], protected)
    head = torch.arange(protected, device=unm.device).expand(unm.shape[0], -1)
    return torch.cat([head, a_pos.expand(unm.shape[0], -1).gather(1, unm), b_pos.expand(unm.shape[0], -1)], dim=1)


def tome_merge(x, sizes, metric, r, protected=1, order="tome"):
    """One ToMe step on x [B, N, D]: merge r tokens (capped at `max_merge`), protected tokens untouched.

    sizes: [B, N, 1] or None; metric: [B, N, C]. order "tome": [protected, unmerged a (ascending when there are
    protected tokens, as ToMe does with a class token), b], what the next layer's a/b split sees in ToMe;
    "raster": survivors in their original order. Returns (x', sizes') with N - r tokens.
    """
    r = min(r, max_merge(x.shape[1], protected))
    if r <= 0:
        return x, sizes
    unm, src, dst = bipartite_soft_matching(metric, r, protected, sort_unmerged=order == "tome" and protected > 0)
    x, sizes = merge_wavg(x, sizes, unm, src, dst, protected)
    if order == "raster":
        order_idx = raster_positions(unm, metric.shape[1], protected).argsort(dim=1)[..., None]
        x, sizes = x.gather(1, order_idx.expand_as(x)), sizes.gather(1, order_idx)
    return x, sizes
