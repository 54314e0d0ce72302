"""The pure tensor functions: selectors, reducers, ToMe matching, pooling (VisionZip: tests/test_visionzip.py)."""
import pytest
import torch

from vlmeff.pruners import (bipartite_soft_matching, cls_attention, drop_tokens, merge_into_kept,
                            pool_assignment, random_scores, received_attention, reduce_by_assignment, resolve_keep,
                            topk_keep_indices)
from vlmeff.pruners.pool import pool_grid, pool_views, split_budget
from vlmeff.pruners.tome import merge_wavg


def test_resolve_keep_counts_and_ratios():
    assert resolve_keep(5, 16) == 5 and resolve_keep(0.25, 16) == 4 and resolve_keep(0.01, 16) == 1
    assert resolve_keep(1.0, 16) == 16
    with pytest.raises(ValueError, match="exceeds the 16"):
        resolve_keep(17, 16)


def test_topk_keeps_original_order():
    scores = torch.tensor([[0.1, 0.9, 0.3, 0.8, 0.7]])
    assert topk_keep_indices(scores, 3).tolist() == [[1, 3, 4]]


def test_drop_and_merge_with_sizes():
    x = torch.arange(12.0).view(1, 6, 2)
    keep = torch.tensor([[0, 3]])
    out, sizes = drop_tokens(x, keep)
    assert torch.equal(out, x[:, [0, 3]]) and sizes is None          # unit sizes stay implicit
    out, sizes = drop_tokens(x, keep, torch.tensor([[2.0, 1, 1, 3, 1, 1]]))
    assert torch.equal(out, x[:, [0, 3]]) and sizes.tolist() == [[2.0, 3.0]]
    metric = torch.tensor([[[1.0, 0], [1, 0.1], [1, 0.2], [0, 1], [0.1, 1], [0.2, 1]]])
    sizes_in = torch.tensor([[1.0, 2, 1, 1, 1, 3]])
    out, sizes = merge_into_kept(x, keep, metric, sizes_in)
    assert sizes.tolist() == [[4.0, 5.0]]
    expected0 = (x[0, 0] * 1 + x[0, 1] * 2 + x[0, 2] * 1) / 4
    expected1 = (x[0, 3] + x[0, 4] + 3 * x[0, 5]) / 5
    torch.testing.assert_close(out[0], torch.stack([expected0, expected1]))


def test_bipartite_matching_protects_prefix_and_merges_r():
    torch.manual_seed(0)
    metric = torch.randn(2, 11, 8)
    metric[:, 4] = metric[:, 5]            # an obvious pair: a-token 4 -> b-token 5
    unm, src, dst = bipartite_soft_matching(metric, r=3, protected=2)
    # unprotected a = positions 2, 4, 6, 8, 10 (indices 0..4), b = positions 3, 5, 7, 9 (indices 0..3)
    assert src.shape == dst.shape == (2, 3) and unm.shape == (2, 2)
    assert (src == 1).any(1).all() and (dst[src == 1] == 1).all()                # 4 -> 5 is merged
    assert torch.equal(torch.cat([unm, src], 1).sort(1).values, torch.arange(5).expand(2, 5))
    assert torch.equal(unm, unm.sort(1).values)                                  # ToMe sorts the unmerged a
    x, sizes = torch.randn(2, 11, 4), torch.tensor([1.0, 1, 2, 1, 1, 3, 1, 1, 1, 1, 1]).expand(2, 11)[..., None]
    out, new_sizes, _ = merge_wavg(x, sizes, unm, src, dst, protected=2)
    assert out.shape == (2, 8, 4) and new_sizes.sum(1).flatten().tolist() == [14.0, 14.0]
    assert torch.equal(out[:, :2], x[:, :2])                                     # prefix first, untouched
    b5 = 2 + 2 + 1                                                               # slot of b-token 5: prefix, unm, b 0
    merged_into_5 = [2 + 2 * int(a) for a, d in zip(src[0], dst[0]) if d == 1] + [5]
    w = sizes[0, merged_into_5]
    torch.testing.assert_close(out[0, b5], (x[0, merged_into_5] * w).sum(0) / w.sum())
    assert new_sizes[0, b5].item() == w.sum().item()


def test_pool_grid_and_assignment():
    assert pool_grid(8, 8, 16) == (4, 4) and pool_grid(8, 8, 20) == (4, 5) and pool_grid(4, 4, 5) == (2, 2)
    dst, (h, w) = pool_assignment(4, 4, 4)
    assert (h, w) == (2, 2)
    assert dst.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_pool_views_split_the_budget_by_size():
    assert split_budget([16, 48], 20) == [5, 15] and split_budget([16, 48], 64) == [16, 48]
    assert split_budget([1000, 1, 1], 3) == [1, 1, 1] and sum(split_budget([7, 5, 3], 11)) == 11
    with pytest.raises(ValueError, match="at least one token per grid: 2 grids, budget 1"):
        split_budget([4, 4], 1)
    dst, n = pool_views([(4, 4)], 4)
    assert n == 4 and torch.equal(dst, pool_assignment(4, 4, 4)[0])
    dst, n = pool_views([(2, 2), (2, 4)], 3)                       # budgets 1 + 2: one cell, then 1 x 2 cells
    assert n == 3 and dst.tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 1, 1, 2, 2]


def test_received_attention_matches_full_softmax():
    q, k = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    full = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1)          # [B, H, N, N]
    torch.testing.assert_close(received_attention(q, k, 0.5, chunk=3), full.mean(dim=2).mean(dim=1))


@pytest.mark.parametrize("H,Hk,token_major", [(4, 4, True), (4, 2, True), (6, 3, False)])
def test_cls_attention_matches_full_softmax(H, Hk, token_major):
    """The one-row path (block-diagonal queries against token-major keys), grouped-query heads included."""
    B, N, d, scale = 2, 11, 8, 0.4
    q = torch.randn(B, H, N, d)
    k = torch.randn(B, N, Hk, d).transpose(1, 2) if token_major else torch.randn(B, Hk, N, d)
    full = torch.softmax(q @ k.repeat_interleave(H // Hk, dim=1).transpose(-1, -2) * scale, dim=-1)   # [B, H, N, N]
    torch.testing.assert_close(cls_attention(q[:, :, :1], k, scale), full[:, :, 0].mean(dim=1))


def test_random_scores_are_a_seeded_counter_hash():
    """Oracle: the lowbias32 mixer written with Python ints; distinct rows never tie; seeds give other draws."""
    def mix(seed, i):
        x = (i + seed * 0x9E3779B9) & 0xFFFFFFFF
        for _ in range(2):
            x = ((x ^ (x >> 16)) * 0x45D9F3B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    scores = random_scores(500, seed=7)
    assert scores.tolist() == [mix(7, i) for i in range(500)]
    assert scores.unique().numel() == 500
    assert not torch.equal(random_scores(500, seed=8), scores)
    assert random_scores(4, seed=-3).tolist() == [mix(-3, i) for i in range(4)]


def test_merge_never_feeds_the_tokens_that_may_not_receive():
    """Row 0 ([CLS]) is the most similar kept token of every pruned row, yet receives nothing: with `fixed` (a
    protected prefix) and with a `targets` mask (protected rows anywhere) alike."""
    x = torch.randn(1, 6, 3)
    metric = torch.tensor([[[1.0, 0], [1, 0.01], [0.9, 0.1], [0, 1], [1, 0.02], [0.2, 1]]])
    keep = torch.tensor([[0, 3]])
    for kwargs in (dict(fixed=1), dict(targets=torch.tensor([[False, True]]))):
        out, sizes = merge_into_kept(x, keep, metric, **kwargs)
        assert torch.equal(out[0, 0], x[0, 0]) and sizes.tolist() == [[1.0, 5.0]]
        torch.testing.assert_close(out[0, 1], x[0, 1:].mean(0))
    out, sizes = merge_into_kept(x, keep, metric)           # unrestricted, row 0 takes its neighbours
    assert sizes.tolist() == [[4.0, 2.0]]
