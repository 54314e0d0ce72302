"""`Patch.track_merges`: stats["groups"] says where each patch went (its output token, -1 dropped), traced by
running the reduction on an identity block; checked against what drops and grid pooling do by construction, and
ToMe's composed merges against the token counts; tracking changes no output."""
import pytest
import torch

import vlmeff
from lvlm_models import IMAGE, logits, setup_any
from models import images, tiny_timm_vit
from vlmeff.pruners.reduce import merge_groups


def vit_groups(method, **options):
    model, x = tiny_timm_vit(), images()
    with torch.no_grad():
        plain = model(x)
    with vlmeff.patch(model, method, **options) as patch:
        with torch.no_grad():
            untracked = model(x)
        assert "groups" not in patch.stats
        patch.track_merges = True
        with torch.no_grad():
            tracked = model(x)
        stats = dict(patch.stats)
    assert torch.equal(tracked, untracked)
    return stats, plain


def test_merge_groups_of_a_drop_and_of_a_mean():
    rows = torch.tensor([[2, 0]])
    drop = merge_groups(lambda x: x[:, rows[0]], 1, 4, "cpu")
    assert drop.tolist() == [[1, -1, 0, -1]]
    pairs = merge_groups(lambda x: x.view(1, 2, 2, 4).mean(2), 1, 4, "cpu")
    assert pairs.tolist() == [[0, 0, 1, 1]]


def test_dropped_patches_are_minus_one_and_kept_ones_their_slot():
    stats, _ = vit_groups("cls", keep=4)
    groups, kept = stats["groups"], stats["kept"]
    for b in range(groups.shape[0]):
        expected = torch.full_like(groups[b], -1)
        expected[kept[b]] = torch.arange(1, kept.shape[1] + 1)       # slot 0 is [CLS]
        assert torch.equal(groups[b], expected)


def test_pooled_patches_go_to_their_grid_cell():
    stats, _ = vit_groups("pool", keep=4)                           # a 4 x 4 patch grid in 2 x 2 cells
    groups = stats["groups"]
    side = int(groups.shape[1] ** 0.5)
    i, j = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    cell = (i // (side // 2)) * 2 + j // (side // 2) + 1
    assert torch.equal(groups, cell.expand_as(groups))


def test_tome_sources_compose_over_the_merges():
    stats, _ = vit_groups("tome", r=3)
    groups = stats["groups"]
    final = list(stats["visual_tokens"].values())[-1][0]
    assert groups.shape == (2, 64) and final == 64 - 4 * 3             # every input patch, after the 4 merges
    for b in range(groups.shape[0]):
        assert (groups[b] >= 1).all()                               # nothing dropped, nothing in [CLS]
        assert len(set(groups[b].tolist())) == final
        assert sorted(torch.bincount(groups[b]).tolist())[-1] >= 2


@pytest.mark.parametrize("order", ["tome", "raster"])
def test_tome_slots_after_one_merge_follow_the_order(order):
    """One merge (layer 0): each group is one b-token (even patch: [CLS] is position 0, so b = odd positions) with
    the a-tokens merged into it, or one unmerged a-token. The output slots (1 on: slot 0 is [CLS]) are ToMe's
    [unmerged a ascending, b] or, in raster order, the survivors by position."""
    stats, _ = vit_groups("tome", r=[5, 0, 0, 0], order=order)
    for groups in stats["groups"].tolist():
        members = {}
        for patch, slot in enumerate(groups):
            members.setdefault(slot, []).append(patch)
        assert len(members) == 64 - 5 and sum(len(m) > 1 for m in members.values()) <= 5
        def survivor(slot):
            b = [p for p in members[slot] if p % 2 == 0]
            assert len(b) == 1 or len(members[slot]) == 1               # one b-token, or a lone a-token
            return b[0] if b else members[slot][0]
        if order == "raster":
            key = survivor
        else:
            key = lambda slot: (survivor(slot) % 2 == 0, survivor(slot))  # unmerged a first, then b
        assert sorted(members, key=key) == list(range(1, 64 - 5 + 1))


def test_tome_sources_are_built_on_the_tokens_device():
    model = tiny_timm_vit().to("meta")
    with vlmeff.patch(model, "tome", r=[3, 3, 0, 0]) as patch:
        patch.track_merges = True
        with torch.no_grad():
            model(torch.empty(2, 3, 32, 32, device="meta"))
        assert patch.stats["groups"].shape == (2, 64) and patch.stats["groups"].device.type == "meta"


@pytest.mark.parametrize("method,options", [("cls", dict(keep=4)), ("pool", dict(keep=4)),
                                            ("cls", dict(keep=4, reduce="merge")), ("visionzip", dict(keep=6))])
def test_lvlm_groups_cover_each_image_and_tracking_changes_nothing(method, options):
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, method, **options) as patch:
        untracked = logits(model, inputs)
        patch.track_merges = True
        tracked = logits(model, inputs)
        groups, kept = patch.stats["groups"], patch.stats["kept"]
    assert torch.equal(tracked, untracked)
    n_images = int((inputs["input_ids"] == IMAGE).sum()) // 16
    assert len(groups) == n_images
    for g, rows in zip(groups, kept):
        assert g.shape == (16,)
        if options.get("reduce") == "merge" or method == "pool":
            assert (g >= 0).all()
        if method == "cls" and "reduce" not in options:
            assert torch.equal(torch.nonzero(g >= 0)[:, 0], rows.sort().values)


@pytest.mark.parametrize("family", ["next", "qwen2"])
def test_views_split_each_image_into_its_grids_and_the_demo_draws_each(family):
    """LLaVA-NeXT: the base view, then the unpadded crops (newline rows left out); Qwen2-VL: the merged grid."""
    from PIL import Image

    from vlmeff.demo.runner import DemoModel
    model, inputs = setup_any(family)
    with vlmeff.patch(model, "pool", keep=4) as patch:
        patch.track_merges = True
        logits(model, inputs)
        stats = dict(patch.stats)
    for groups, views in zip(stats["groups"], stats["views"]):
        rows = torch.cat([r for _, r in views])
        assert len(set(rows.tolist())) == rows.numel() and all(r.numel() == h * w for (h, w), r in views)
        assert (groups[rows] >= 0).all()                      # pool merges every free row
        others = torch.ones(groups.numel(), dtype=torch.bool)
        others[rows] = False
        if family == "next":
            assert len(views) == 2 and others.any()           # the newline rows: protected, in no view
    demo = DemoModel(model, None, "lvlm", family)
    pictures, note = demo._overlays(Image.new("RGB", (40, 60)), stats)
    assert note == "" and len(pictures) == len(stats["views"][0])
    if family == "next":
        assert [c.split(":")[0] for _, c in pictures] == ["before LLM, base view", "before LLM, crops"]
