"""One reduction step over the rows of sequences that share a layout: the selector + reducer half of a method,
used by both the ViT engine (hidden states after a layer) and the pre-LLM engine (feature blocks)."""
import torch

from ..pruners import (contextual_merge, drop_tokens, merge_into_kept, pool_views, random_scores, reduce_by_assignment,
                       resolve_keep, topk_keep_indices)
from ..registry import contextual_count


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
        return _visionzip(x, scores, metric, prot, free, k, options)
    chosen = free[topk_keep_indices(scores[:, free], k)]
    rows = torch.cat([prot.expand(n, -1), chosen], dim=1).sort(dim=1).values
    if options.get("reduce") == "merge":
        out, sizes = merge_into_kept(x, rows, metric, sizes, targets=~protected[rows])
    else:
        out, sizes = drop_tokens(x, rows, sizes)
    return out, sizes, rows


def _visionzip(x, scores, metric, prot, free, k, options):
    """VisionZip (Yang et al., CVPR 2025) on blocks x [n, N, D]: the free rows with the highest [CLS] attention
    (`scores` [n, N]; equal scores: the lower row first) are dominant, the other free rows fold into `contextual`
    tokens by key similarity (`metric` [n, N, C], the scoring layer's keys averaged over heads; `contextual_merge`).

    prot / free: protected / free row indices [P] / [F] (ascending); k: the budget over the free rows.
    options (see the registry entry): contextual, an int count or a float share of k (`visionzip_counts`);
    cls_token: "keep" (VisionZip) counts [CLS] as one of the k - contextual dominant tokens: in a block of patch rows
    only (no protected row) k - contextual - 1 rows are dominant and one slot is left for the [CLS] row that the
    adapter puts in front (`LlavaAdapter.encode_reduced`, on "default" and "full" features alike); blocks with
    protected rows (LLaVA-NeXT's newline rows) carry no [CLS] and get no slot for it. "drop" (vlmeff's earlier
    convention): k - contextual rows are dominant, [CLS] is not fed ("default" features) or is a protected row
    outside the budget ("full"). order: "reference" (VisionZip) gives the protected and dominant rows in ascending
    order, then the contextual tokens in target order; "raster" gives every output at the row of its dominant token
    or contextual target, ascending.
    A full budget (k == F) returns the blocks unchanged, [CLS] not added.
    Returns (x' [n, K, D], None, rows [n, K]): rows, ascending, are the protected, dominant and target rows (under
    order="reference" the i-th output is not the i-th row's token: only their set matters with compact positions).
    Host-sync free: every shape comes from P, F, k and the options.
    """
    n, N, D = x.shape
    every_row_free = prot.numel() == 0
    dominant, contextual = visionzip_counts(k, options, cls_slot=every_row_free)
    if k == free.numel():
        return x, None, torch.arange(N, device=x.device).expand(n, -1)
    ranked = (scores if every_row_free else scores[:, free]).argsort(dim=1, descending=True, stable=True)
    kept_rows, rest = ranked[:, :dominant].sort(dim=1).values, ranked[:, dominant:].sort(dim=1).values
    if not every_row_free:                           # positions among the free rows -> rows; protected rows kept
        kept_rows, rest = free[kept_rows], free[rest]
        kept_rows = torch.cat([prot.expand(n, -1), kept_rows], dim=1).sort(dim=1).values
    kept = _gather_rows(x, kept_rows)
    if contextual == 0:
        return kept, None, kept_rows
    merged, step = contextual_merge(_gather_rows(x, rest), _gather_rows(metric, rest), contextual)
    targets = rest[:, :contextual * step:step]
    rows, order = torch.cat([kept_rows, targets], dim=1).sort(dim=1)
    out = torch.cat([kept, merged], dim=1)
    if options["order"] == "raster":
        out = out.gather(1, order[..., None].expand(-1, -1, D))
    return out, None, rows


def visionzip_counts(k, options, cls_slot=True):
    """(dominant rows, contextual tokens) for a budget of k tokens per image (the options were validated by the
    registry at patch time; a count above k - 1 is known only now when keep is a ratio, a ValueError).

    contextual: an int count in [0, k - 1], or a float share of k in [0, 1), rounded and capped at k - 1, so that
    at least one dominant token ([CLS] with cls_token="keep") is left. cls_slot: whether the block leaves a dominant
    slot for [CLS] when cls_token="keep" (see `_visionzip`).
    """
    c = contextual_count(options["contextual"], k)
    return k - c - (cls_slot and options["cls_token"] == "keep"), c


def _gather_rows(t, rows):
    """t [n, N, C] at rows [n, K] -> [n, K, C]."""
    return t.gather(1, rows[..., None].expand(-1, -1, t.shape[-1]))


def _order_groups(group, num_groups):
    """Relabel group ids [N] so that outputs follow their first member's position.
    Returns (dst [N] new slot of every row, first [num_groups] first member row of each slot, ascending)."""
    positions = torch.arange(group.numel(), device=group.device)
    first = torch.full((num_groups,), group.numel(), device=group.device).scatter_reduce(0, group, positions, "amin")
    order = first.argsort()
    relabel = torch.empty_like(order).scatter_(0, order, torch.arange(num_groups, device=group.device))
    return relabel[group], first[order]
