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
