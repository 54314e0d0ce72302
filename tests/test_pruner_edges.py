"""Edge cases of the budget check and of pooling that the mutation trial run (docs/mutation.md) found untested:
each test here kills mutants that survived the rest of the suite."""
from fractions import Fraction

import pytest
import torch

from vlmeff.pruners import pool_assignment, pool_views, resolve_keep
from vlmeff.pruners.pool import pool_grid, split_budget


def test_a_zero_ratio_is_rejected_not_rounded_up_to_one_token():
    with pytest.raises(ValueError, match=r"keep=0\.0"):
        resolve_keep(0.0, 16)


def best_grid_key(h, w, keep):
    """Oracle of pool_grid's contract by brute force: the most cells h' * w' <= keep (h' <= h, w' <= w), then the
    aspect h'/w' closest to h/w. Returns that (cells, aspect distance) pair; equally good grids are all right."""
    return max((hp * wp, -abs(hp / wp - h / w))
               for hp in range(1, h + 1) for wp in range(1, w + 1) if hp * wp <= keep)


@pytest.mark.parametrize("h, w", [(8, 2), (4, 1), (1, 5), (3, 7), (6, 6), (5, 3)])
def test_pool_grid_is_the_best_grid_within_the_budget(h, w):
    for keep in range(1, h * w + 1):
        hp, wp = pool_grid(h, w, keep)
        assert 1 <= hp <= h and 1 <= wp <= w
        assert (hp * wp, -abs(hp / wp - h / w)) == best_grid_key(h, w, keep), (h, w, keep)
    assert pool_grid(8, 2, 4) == (4, 1) and pool_grid(4, 1, 3) == (3, 1)   # one cell wide: the grid's own aspect


def largest_remainders(sizes, keep):
    """Hamilton apportionment of keep over sizes (exact fractions; ties to the first part), before the rule that
    every part gets at least one token."""
    quotas = [Fraction(keep * s, sum(sizes)) for s in sizes]
    shares = [int(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - shares[i]), i))
    for i in order[:keep - sum(shares)]:
        shares[i] += 1
    return shares


def test_split_budget_gives_the_largest_remainders_and_at_least_one_per_part():
    for sizes in ([2, 3, 4], [16, 48], [7, 5, 3], [9, 1, 4, 4], [5, 5, 5]):
        for keep in range(len(sizes), sum(sizes) + 1):
            shares = split_budget(sizes, keep)
            assert sum(shares) == keep and min(shares) >= 1
            if min(largest_remainders(sizes, keep)) >= 1:
                assert shares == largest_remainders(sizes, keep), (sizes, keep)
    assert split_budget([2, 3, 4], 4) == [1, 1, 2]       # quotas 0.89, 1.33, 1.78: the two largest remainders
    assert split_budget([1, 100], 5) == [1, 4]           # quotas 0.05, 4.95 -> [0, 5]; the empty part takes one


@pytest.mark.parametrize("grids, keep", [([(4, 4)], 4), ([(2, 2), (2, 4)], 3)])
def test_pool_assignments_are_made_on_the_requested_device(grids, keep):
    """No host tensor in a GPU forward: the assignment is built where the tokens are (checked on 'meta')."""
    meta = torch.device("meta")
    assert pool_assignment(*grids[0], keep, meta)[0].device == meta
    dst, cells = pool_views(grids, keep, meta)
    assert dst.device == meta and dst.shape == (sum(h * w for h, w in grids),)
    assert cells == pool_views(grids, keep)[1]
