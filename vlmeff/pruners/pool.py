"""Spatial average pooling of the patch grid to a budget, the `pool` baseline."""
import torch


def pool_grid(h, w, keep):
    """The output grid (h', w') with the most cells h' * w' <= keep (ties: the aspect closest to h x w)."""
    best = (1, 1)
    for hp in range(1, h + 1):
        wp = min(w, keep // hp)
        if wp < 1:
            break
        key = (hp * wp, -abs(hp / wp - h / w))
        if key > (best[0] * best[1], -abs(best[0] / best[1] - h / w)):
            best = (hp, wp)
    return best


def pool_assignment(h, w, keep, device=None):
    """dst [h * w]: the output cell of every raster-order patch when an h x w grid is average-pooled into the
    non-overlapping (h', w') grid of `pool_grid`. Returns (dst, (h', w'))."""
    hp, wp = pool_grid(h, w, keep)
    rows = torch.arange(h, device=device) * hp // h
    cols = torch.arange(w, device=device) * wp // w
    return (rows[:, None] * wp + cols[None, :]).reshape(-1), (hp, wp)


def split_budget(sizes, keep):
    """keep split over parts of the given sizes in proportion to them (largest remainders; every part at least 1,
    taken from the largest share), so that a full budget gives every part its size."""
    if keep < len(sizes):
        raise ValueError(f"pool needs at least one token per grid: {len(sizes)} grids, budget {keep}")
    total = sum(sizes)
    shares = [keep * s // total for s in sizes]
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(keep * sizes[i] % total), i))
    for i in by_remainder[:keep - sum(shares)]:
        shares[i] += 1
    for i in [i for i, share in enumerate(shares) if share == 0]:
        shares[max(range(len(shares)), key=shares.__getitem__)] -= 1
        shares[i] = 1
    return shares


def pool_views(grids, keep, device=None):
    """Pools rows that are several raster-order grids one after another ([(h, w), ...], e.g. a base view then a
    crop grid), each on its own, the budget split in proportion to their sizes (`split_budget`).
    Returns (dst [sum h * w]: the output cell of every row, number of cells)."""
    dst, offset = [], 0
    for (h, w), k in zip(grids, split_budget([h * w for h, w in grids], keep)):
        cells, (hp, wp) = pool_assignment(h, w, k, device)
        dst.append(cells + offset)
        offset += hp * wp
    return torch.cat(dst), offset
