"""One reduction step over the rows of sequences that share a layout: the selector + reducer half of a method,
used by both the ViT engine (hidden states after a layer) and the pre-LLM engine (feature blocks)."""
import torch

from ..pruners import (contextual_merge, drop_tokens, merge_into_kept, pool_views, random_scores, reduce_by_assignment,
                       resolve_keep, topk_keep_indices)


def reduce_rows(method, options, x, keep, protected, scores=None, metric=None, grids=None, sizes=None):
    """Reduce x [n, N, D] with `method` ("cls", "received", "random", "pool" or "visionzip").

    protected [N] bool: rows always kept, outside the budget ([CLS], registers, row separators); keep: the
    budget over the other rows (count or ratio); scores [n, N] for scored methods; metric [n, N, C] for merges
    (options["reduce"] == "merge", visionzip); grids for pool: the (h, w) grids that the unprotected rows form one
    after another, pooled apart with the budget split in proportion to their sizes; sizes [n, N] or None.
    Returns (x' [n, K, D], sizes' [n, K] or None, rows [n, K]: the kept row (or the first member) of every
    output, ascending).
    """
    n, N, _ = x.shape
    prot, free = protected.nonzero().squeeze(1), (~protected).nonzero().squeeze(1)
    k = resolve_keep(keep, free.numel())
    if method == "pool":
        cells, n_cells = pool_views(grids, k, device=x.device)
        group = torch.empty(N, dtype=torch.long, device=x.device)
        group[prot] = torch.arange(prot.numel(), device=x.device)
        group[free] = prot.numel() + cells
        dst, rows = _order_groups(group, prot.numel() + n_cells)
        out, sizes = reduce_by_assignment(x, dst.expand(n, N), rows.numel(), sizes)
        return out, sizes, rows.expand(n, -1)
    if method == "random":
        # one seeded draw shared by the batch: a sequence's subset does not depend on its batch neighbours
        gen = torch.Generator().manual_seed(options["seed"])
        scores = random_scores(1, N, generator=gen).to(x.device).expand(n, -1)
    if method == "visionzip":
        return _visionzip(x, scores, metric, prot, free, k, options["contextual"])
    chosen = free[topk_keep_indices(scores[:, free], k)]
    rows = torch.cat([prot.expand(n, -1), chosen], dim=1).sort(dim=1).values
    if options.get("reduce") == "merge":
        out, sizes = merge_into_kept(x, rows, metric, sizes, targets=~protected[rows])
    else:
        out, sizes = drop_tokens(x, rows, sizes)
    return out, sizes, rows


def _visionzip(x, scores, metric, prot, free, k, contextual):
    """Dominant rows by score; the other free rows folded into `contextual` tokens (a count, or a share of k)."""
    n = x.shape[0]
    c = min(k - 1, round(contextual * k) if isinstance(contextual, float) else contextual)
    ranked = scores[:, free].argsort(dim=1, descending=True)
    dominant = torch.cat([prot.expand(n, -1), free[ranked[:, :k - c]]], dim=1).sort(dim=1).values
    if c <= 0:
        out, sizes = drop_tokens(x, dominant)
        return out, None, dominant
    remaining = free[ranked[:, k - c:]].sort(dim=1).values
    out, rows = contextual_merge(x, dominant, remaining, metric, c)
    return out, None, rows


def _order_groups(group, num_groups):
    """Relabel group ids [N] so that outputs follow their first member's position.
    Returns (dst [N] new slot of every row, first [num_groups] first member row of each slot, ascending)."""
    positions = torch.arange(group.numel(), device=group.device)
    first = torch.full((num_groups,), group.numel(), device=group.device).scatter_reduce(0, group, positions, "amin")
    order = first.argsort()
    relabel = torch.empty_like(order).scatter_(0, order, torch.arange(num_groups, device=group.device))
    return relabel[group], first[order]
