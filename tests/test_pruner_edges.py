"""Edge cases of the budget check and of pooling that the mutation trial run (docs/mutation.md) found untested:
each test here kills mutants that survived the rest of the suite."""
from fractions import Fraction

import pytest
import torch

from vlmeff.pruners import contextual_merge, pool_assignment, pool_views, reduce_by_assignment, resolve_keep
from vlmeff.pruners.pool import pool_grid, split_budget
from vlmeff.pruners.reduce import merge_groups
from vlmeff.pruners.tome import bipartite_soft_matching, max_merge, merge_wavg, raster_positions, tome_merge


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])   # the fused kernel, and the reference
def test_reduce_by_assignment_drops_the_rows_sent_to_minus_one(dtype):
    """The default (drops=True): a row with slot -1 joins no output; the others are size-weighted means (loop oracle)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 3, generator=g, dtype=dtype)
    sizes = torch.tensor([[1.0, 2, 1, 3, 1, 1, 2], [2.0, 1, 1, 1, 4, 1, 1]], dtype=dtype)
    dst = torch.tensor([[0, -1, 1, 0, -1, 2, 1], [-1, 2, 2, 0, 1, -1, 0]])
    out, new_sizes = reduce_by_assignment(x, dst, 3, sizes)
    for b in range(2):
        for slot in range(3):
            rows = [i for i in range(7) if dst[b, i] == slot]
            w = sizes[b, rows]
            torch.testing.assert_close(out[b, slot], (x[b, rows] * w[:, None]).sum(0) / w.sum())
            assert new_sizes[b, slot].item() == w.sum().item()


def test_contextual_merge_in_bfloat16_counts_past_256_exactly():
    """All keys tie, so the first target takes every member: 257 (and 598) of them, counts that are not bfloat16
    numbers (256, 600), so they must be summed in float32; the tokens come back in bfloat16. x is 0 but for one
    member (1), so the first contextual token is 1 / members, rounded once."""
    for R, members in ((259, 257), (600, 598)):
        x = torch.zeros(1, R, 1, dtype=torch.bfloat16)
        x[0, 7] = 1.0
        out, step = contextual_merge(x, torch.ones(1, R, 2), 2)
        assert step == R // 2 and out.dtype == torch.bfloat16
        assert out[0, 0, 0] == torch.tensor(1 / members, dtype=torch.bfloat16) and out[0, 1, 0] == 0


def test_contextual_merge_and_merge_groups_build_on_the_tokens_device():
    """On `meta` (a GPU stands in): a helper tensor made on the host would meet the device's tensors and fail."""
    out, step = contextual_merge(torch.empty(2, 9, 4, device="meta"), torch.empty(2, 9, 3, device="meta"), 3)
    assert out.device.type == "meta" and out.shape == (2, 3, 4) and step == 3
    groups = merge_groups(lambda x: x[:, :3], 2, 5, "meta")
    assert groups.device.type == "meta" and groups.shape == (2, 5)


def _representative(row, protected):
    """The original position an output row of a merge of the identity stands at: the b-token (ToMe's b set: the odd
    positions past the protected prefix) among its members when it has one, else its only member."""
    members = row.nonzero()[:, 0].tolist()
    b_members = [p for p in members if p >= protected and p % 2 == 1]
    assert len(b_members) <= 1 and (b_members or len(members) == 1)
    return b_members[0] if b_members else members[0]


@pytest.mark.parametrize("protected", [0, 1, 2])
def test_tome_merge_orders_by_the_reference_or_by_raster_position(protected):
    """Merging the identity [B, N, N] shows where every output row stands. The defaults are ToMe's (one protected
    [CLS], ToMe order, no log): [protected, unmerged a ascending when there is a prefix, b]. "raster": the same rows
    sorted by position. B = 5 exceeds the unmerged a-tokens."""
    B, N, r = 5, 11 + protected, 4
    x = torch.eye(N).expand(B, N, N).contiguous()
    metric = torch.randn(B, N, 6, generator=torch.Generator().manual_seed(protected))
    tome_rows, sizes, log = tome_merge(x, None, metric, r, protected)
    assert tome_rows.shape == (B, N - r, N) and log is None and sizes.shape == (B, N - r, 1)
    raster_rows, raster_sizes, raster_log = tome_merge(x, None, metric, r, protected, order="raster")
    assert raster_log is None
    a_set, b_set = [p for p in range(protected, N) if p % 2 == 0], [p for p in range(protected, N) if p % 2]
    n_unmerged = len(a_set) - r
    for b in range(B):
        tome_pos = [_representative(row, protected) for row in tome_rows[b]]
        raster_pos = [_representative(row, protected) for row in raster_rows[b]]
        assert raster_pos == sorted(tome_pos)                                  # every row, by position
        assert tome_pos[:protected] == list(range(protected))
        unmerged = tome_pos[protected:protected + n_unmerged]
        assert set(unmerged) <= set(a_set)
        assert unmerged == sorted(unmerged) or protected == 0                  # sorted only behind a prefix
        assert tome_pos[protected + n_unmerged:] == b_set                      # every b, in order
        for j, p in enumerate(raster_pos):                                     # the rows themselves moved with it
            i = tome_pos.index(p)
            assert torch.equal(raster_rows[b, j], tome_rows[b, i]) and raster_sizes[b, j] == sizes[b, i]
    if protected == 1:          # the defaults are ToMe's: protected=1, order="tome", sorted unmerged, no log
        default = tome_merge(x, None, metric, r)
        assert torch.equal(default[0], tome_rows) and default[2] is None
        matching = bipartite_soft_matching(metric, r)
        assert all(torch.equal(d, e) for d, e in zip(matching, bipartite_soft_matching(metric, r, 1, True)))
        merged = merge_wavg(x, None, *matching)
        assert torch.equal(merged[0], tome_rows) and merged[2] is None
        assert torch.equal(raster_positions(matching[0], N), raster_positions(matching[0], N, 1))


def test_tome_merge_with_nothing_to_merge_returns_its_input():
    """r = 0, or one unprotected token (nothing to pair it with): the input itself, and no log even if asked."""
    x, metric = torch.randn(2, 6, 3), torch.randn(2, 6, 4)
    for n_tokens, protected, r in ((6, 1, 0), (2, 1, 3), (1, 0, 1)):
        out, sizes, log = tome_merge(x[:, :n_tokens], None, metric[:, :n_tokens], r, protected, with_log=True)
        assert torch.equal(out, x[:, :n_tokens]) and sizes is None and log is None
    assert max_merge(2, 1) == 0 and max_merge(3, 1) == 1 and max_merge(1, 0) == 0


def test_raster_positions_are_made_on_the_tokens_device():
    unm = torch.empty(3, 2, dtype=torch.long, device="meta")
    assert raster_positions(unm, 9, 2).device.type == "meta"
