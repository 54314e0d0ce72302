"""One reduction step over the rows of sequences that share a layout: the selector + reducer half of a method,
used by both the ViT engine (hidden states after a layer) and the pre-LLM engine (feature blocks).

GPU-first: which rows are protected is known on the host (a prefix count, or a CPU mask), so nothing here reads
device data; tensors that depend only on the layout (pool segments, the seeded random rows, index ranges) are
built once per device (`layout_constant`), and a forward runs only the launches that depend on the data.
"""
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes

from ..kernels import gather_merge
from ..pruners import (contextual_merge, drop_tokens, gather_rows, merge_into_kept, pool_views, random_scores,
                       resolve_keep, topk_keep_indices)
from ..pruners.diversity import conditional_dpp, important_and_diverse, max_min_diversity, relevance_scale
from ..layout import layout_constant, slot_ranges, to_device
from ..registry import contextual_count


def reduce_rows(method, options, x, keep, protected, scores=None, metric=None, grids=None, sizes=None):
    """Reduce x [n, N, D] with `method` ("cls", "received", "random", "pool", "visionzip" or a selection by
    diversity: "divprune", "cdpruner", "vispruner", see `_select_diverse`).

    protected: rows always kept, outside the budget ([CLS], registers, row separators): an int P (the first P
    rows) or a bool [N] mask, best on the CPU (a device mask is read to the host on every call: a sync; every
    adapter hands CPU masks). keep: the budget
    over the other rows (count or ratio); scores [n, N] for scored methods; metric [n, N, C] for merges
    (options["reduce"] == "merge", visionzip); grids for pool: the (h, w) grids that the unprotected rows form one
    after another, pooled apart with the budget split in proportion to their sizes; sizes [n, N] or None.
    Returns (x' [n, K, D], sizes' [n, K] or None, rows [n, K]: the kept row (or the first member) of every
    output, ascending). A full budget returns x itself (no launch): nothing is removed.
    """
    n, N, _ = x.shape
    layout = row_layout(N, protected)
    k = resolve_keep(keep, N - layout.count)
    if k == N - layout.count and method != "visionzip":
        return x, sizes, slot_ranges(1, N, x).expand(n, N)
    if method == "pool":
        index, offsets, rows = layout_constant(("pool", layout, tuple(grids), k, n), x,
                                               lambda: _pool_segments(layout, grids, k, n, x.device))
        weight = None if sizes is None else sizes.gather(1, index)
        out, sizes = gather_merge(x, index, offsets, weight, validate=False)
        return out, sizes, rows
    if method == "visionzip":
        prot, free = layout.indices(x.device), layout.free_indices(x.device)
        return _visionzip(x, scores, metric, prot, free, k, options)
    if method in DIVERSE:
        rows = _select_diverse(method, options, layout, scores, metric, k)
        out, sizes = drop_tokens(x, rows, sizes)
        return out, sizes, rows
    if method == "random":
        # one seeded draw shared by the batch (and every forward): a sequence's subset does not depend on its
        # batch neighbours; the rows depend on the layout only, so they are built once
        rows = layout_constant(("random", options["seed"], layout, k), x,
                               lambda: _select(layout, random_scores(N, options["seed"], x.device)[None], k))
        rows = rows.expand(n, -1)
    else:
        rows = _select(layout, scores, k)
    if options.get("reduce") == "merge":
        fixed = layout.count if layout.prefix else 0
        targets = None if layout.prefix else ~layout.mask(x.device)[rows]
        out, sizes = merge_into_kept(x, rows, metric, sizes, targets=targets, fixed=fixed)
    else:
        out, sizes = drop_tokens(x, rows, sizes)
    return out, sizes, rows


class RowLayout:
    """Which of N rows are protected, on the host: `count` of them, `prefix` when they are rows 0 .. count - 1.
    Hashable (a cache key); device copies of the mask / indices are made once per device."""

    def __init__(self, n, protected):
        self.n, self.protected = n, protected            # protected: tuple of row indices, ascending
        self.count = len(protected)
        self.prefix = protected == tuple(range(self.count))
        self._key = (n, protected)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, RowLayout) and self._key == other._key

    def mask(self, device):
        """[N] bool on device, True on protected rows."""
        return layout_constant(("mask", self), _Device(device), lambda: to_device(
            torch.zeros(self.n, dtype=torch.bool).index_fill_(0, torch.tensor(self.protected, dtype=torch.long),
                                                              True), device))

    def indices(self, device):
        """[count] int64 on device: the protected rows."""
        return layout_constant(("protected", self), _Device(device),
                               lambda: to_device(torch.tensor(self.protected, dtype=torch.long), device))

    def free_indices(self, device):
        """[n - count] int64 on device: the other rows."""
        free = sorted(set(range(self.n)) - set(self.protected))
        return layout_constant(("free", self), _Device(device),
                               lambda: to_device(torch.tensor(free, dtype=torch.long), device))


def row_layout(n, protected):
    """The RowLayout of n rows given protected as an int prefix count or a bool [n] mask (read on the host)."""
    if isinstance(protected, int):
        return RowLayout(n, tuple(range(protected)))
    # host data, read outside any dispatch mode (a fake tensor mode would otherwise hand back a fake copy); a device
    # mask is copied to the host first, which is a sync: callers should hand in CPU masks
    with _disable_current_modes():
        rows = protected.cpu().numpy().nonzero()[0]
    return RowLayout(n, tuple(int(i) for i in rows))


class _Device:
    """A stand-in `like` for layout_constant when only a device is at hand."""

    def __init__(self, device):
        self.device = torch.device(device)


def _select(layout, scores, k):
    """Rows to keep [n, count + k], ascending: every protected row and the k best-scored others (scores [n, N])."""
    if layout.count == 0:
        return topk_keep_indices(scores, k)
    # above every score: inf, or for integer scores (`random_scores`, below 2 ** 32) a float that int64 holds exactly
    top = float("inf") if scores.is_floating_point() else float(2 ** 62)
    if layout.prefix:        # protected rows outrank every score
        ranked = F.pad(scores[:, layout.count:], (layout.count, 0), value=top)
    else:
        ranked = scores.masked_fill(layout.mask(scores.device), top)
    return topk_keep_indices(ranked, layout.count + k)


DIVERSE = ("divprune", "cdpruner", "vispruner")


def _select_diverse(method, options, layout, scores, metric, k):
    """Rows to keep [n, count + k], ascending, for the selections by diversity (`vlmeff.pruners.diversity`), made
    over the free rows alone (protected rows are kept and take no part): "divprune" by max-min distance of
    `metric` [n, N, C]; "cdpruner" by the conditional DPP of `metric` with relevance `scores` [n, N] scaled over the
    free rows (None: the similarity kernel alone); "vispruner" by [CLS] attention `scores` and de-duplication on
    `metric` (options: important_ratio, step)."""
    if layout.count:
        free = layout.free_indices(metric.device)
        metric, scores = metric[:, free], None if scores is None else scores[:, free]
    if method == "divprune":
        picked = max_min_diversity(metric, k)
    elif method == "cdpruner":
        if scores is None:
            relevance = metric.new_ones(metric.shape[:2], dtype=torch.float32)
        else:
            relevance = relevance_scale(scores)
        picked = conditional_dpp(metric, relevance, k)
    else:
        picked = important_and_diverse(scores, metric, k, options["important_ratio"], options["step"])
    if not layout.count:
        return picked
    protected = layout.indices(picked.device).expand(picked.shape[0], -1)
    return torch.cat([protected, free[picked]], dim=1).sort(dim=1).values


def _pool_segments(layout, grids, k, n, device):
    """gather_merge segments of `pool` for n sequences: (index [n, N], offsets [n, K + 1], rows [n, K]).
    Protected rows stay on their own; the free rows pool into the cells of `pool_views`; outputs follow their
    first member's position."""
    cells, n_cells = pool_views(grids, k, device=device)
    N, P = layout.n, layout.count
    group = torch.empty(N, dtype=torch.long, device=device)
    group[layout.indices(device)] = torch.arange(P, device=device)
    group[layout.free_indices(device)] = P + cells
    dst, rows = _order_groups(group, P + n_cells)
    index = dst.argsort(stable=True)
    counts = torch.zeros(P + n_cells, dtype=torch.long, device=device).scatter_add_(0, dst, torch.ones_like(dst))
    offsets = F.pad(counts.cumsum(0), (1, 0))
    return tuple(t.expand(n, -1).contiguous() for t in (index, offsets, rows))


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
        return x, None, slot_ranges(1, N, x).expand(n, -1)
    ranked = (scores if every_row_free else scores[:, free]).argsort(dim=1, descending=True, stable=True)
    kept_rows, rest = ranked[:, :dominant].sort(dim=1).values, ranked[:, dominant:].sort(dim=1).values
    if not every_row_free:                           # positions among the free rows -> rows; protected rows kept
        kept_rows, rest = free[kept_rows], free[rest]
        kept_rows = torch.cat([prot.expand(n, -1), kept_rows], dim=1).sort(dim=1).values
    kept = gather_rows(x, kept_rows)
    if contextual == 0:
        return kept, None, kept_rows
    merged, step = contextual_merge(gather_rows(x, rest), gather_rows(metric, rest), contextual)
    targets = rest[:, :contextual * step:step]
    rows, order = torch.cat([kept_rows, targets], dim=1).sort(dim=1)
    out = torch.cat([kept, merged], dim=1)
    if options["order"] == "raster":
        out = out.gather(1, order[..., None].expand(-1, -1, D))
    return out, None, rows


def visionzip_counts(k, options, cls_slot):
    """(dominant rows, contextual tokens) for a budget of k tokens per image (the options were validated by the
    registry at patch time; a count above k - 1 is known only now when keep is a ratio, a ValueError).

    contextual: an int count in [0, k - 1], or a float share of k in [0, 1), rounded and capped at k - 1, so that
    at least one dominant token ([CLS] with cls_token="keep") is left. cls_slot: whether the block leaves a dominant
    slot for [CLS] when cls_token="keep" (see `_visionzip`).
    """
    c = contextual_count(options["contextual"], k)
    return k - c - (cls_slot and options["cls_token"] == "keep"), c


def _order_groups(group, num_groups):
    """Relabel group ids [N] so that outputs follow their first member's position.
    Returns (dst [N] new slot of every row, first [num_groups] first member row of each slot, ascending)."""
    positions = torch.arange(group.numel(), device=group.device)
    first = torch.full((num_groups,), group.numel(), device=group.device).scatter_reduce(0, group, positions, "amin")
    order = first.argsort()
    relabel = torch.empty_like(order).scatter_(0, order, torch.arange(num_groups, device=group.device))
    return relabel[group], first[order]
