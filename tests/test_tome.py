"""`tome` against an independent ToMe (Bolya et al., ICLR 2023) written here from the algorithm, as
facebookresearch/ToMe computes it on timm: bipartite soft matching (a = even, b = odd positions, the class /
prefix tokens neither merge nor receive, a-tokens ranked by their best cosine score, the top r merge), the
size-weighted average merge, sizes tracked across layers, the merge between attention and MLP, proportional
attention (+ log(size) on the logits) in every layer once sizes exist, and the survivors laid out as
[prefix, unmerged a (ascending when there is a prefix), b] for the next layer's split.
"""
import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vlmeff
from models import images, run, tiny_clip, tiny_dinov2, tiny_siglip, tiny_timm_vit
from opcount import count_ops

BUGS = ("unweighted", "sizes_not_log", "prefix_not_protected", "prop_attn_only_when_merging")


# -- the oracle -----------------------------------------------------------------------------------------------------
def oracle_merge(x, sizes, keys, r, prefix, bug=None):
    """One ToMe merge, one sample at a time, with Python lists. x [B, N, D], sizes [B, N] or None, keys [B, H, N, d]."""
    B, N, _ = x.shape
    protected = 0 if bug == "prefix_not_protected" else prefix
    r = min(r, (N - protected) // 2)
    if r <= 0:
        return x, sizes
    sizes = torch.ones(B, N) if sizes is None else sizes
    new_x, new_sizes = [], []
    for s in range(B):
        metric = keys[s].mean(dim=0)
        metric = metric / metric.norm(dim=-1, keepdim=True)
        a_pos = [i for i in range(protected, N) if i % 2 == 0]
        b_pos = [j for j in range(protected, N) if j % 2 == 1]
        cos = (metric[a_pos] @ metric[b_pos].T).tolist()
        best = {i: max(range(len(b_pos)), key=lambda j: row[j]) for i, row in zip(a_pos, cos)}
        score = {i: row[best[i]] for i, row in zip(a_pos, cos)}
        ranked = sorted(a_pos, key=lambda i: -score[i])
        merged, kept_a = ranked[:r], ranked[r:]
        if protected:
            kept_a = sorted(kept_a)
        rows, row_sizes = [x[s, i] for i in range(protected)], [sizes[s, i] for i in range(protected)]
        rows += [x[s, i] for i in kept_a]
        row_sizes += [sizes[s, i] for i in kept_a]
        for j, pos in enumerate(b_pos):
            group = [pos] + [i for i in merged if best[i] == j]
            w = sizes[s, group] if bug != "unweighted" else torch.ones(len(group))
            rows.append((x[s, group] * w[:, None]).sum(0) / w.sum())
            row_sizes.append(sizes[s, group].sum())
        new_x.append(torch.stack(rows))
        new_sizes.append(torch.stack(row_sizes))
    return torch.stack(new_x), torch.stack(new_sizes)


def oracle_attention(q, k, v, scale, sizes, bug=None):
    """softmax(q k^T * scale + log(sizes)) v by hand, q/k/v [B, H, N, d], sizes [B, N] or None."""
    logits = q @ k.transpose(-1, -2) * scale
    if sizes is not None:
        logits = logits + (sizes if bug == "sizes_not_log" else sizes.log())[:, None, None, :]
    return logits.softmax(dim=-1) @ v


def oracle_layers(blocks, t, schedule, prefix, prop_attn, bug, attend, mlp):
    """The ToMe layer loop: attend(block, t, sizes) -> (t after the attention residual, keys [B, H, N, d])."""
    sizes = None
    for block, r in zip(blocks, schedule):
        bias = sizes if prop_attn and (bug != "prop_attn_only_when_merging" or r > 0) else None
        t, keys = attend(block, t, bias)
        t, sizes = oracle_merge(t, sizes, keys, r, prefix, bug)
        t = mlp(block, t)
    return t


def heads(t, n_heads):
    B, N, _ = t.shape
    return t.view(B, N, n_heads, -1).transpose(1, 2)


def oracle_timm(model, x, schedule, prop_attn=True, bug=None):
    def attend(blk, t, sizes):
        a, (B, N, _) = blk.attn, t.shape
        q, k, v = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4)
        q, k = a.q_norm(q), a.k_norm(k)
        o = oracle_attention(q, k, v, a.scale, sizes, bug).transpose(1, 2).reshape(B, N, -1)
        return t + blk.ls1(a.proj(a.norm(o))), k

    with torch.no_grad():
        t = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        t = oracle_layers(model.blocks, t, schedule, model.num_prefix_tokens, prop_attn, bug, attend,
                          lambda blk, t: t + blk.ls2(blk.mlp(blk.norm2(t))))
        return model.forward_head(model.norm(t))


def oracle_hf(model, x, schedule, prop_attn=True, bug=None):
    """CLIP / SigLIP (layer_norm1/2, self_attn) and DINOv2 (norm1/2, attention, layer scales); last_hidden_state."""
    dinov2 = hasattr(model.encoder, "layer")
    prefix = 0 if "siglip" in model.config.model_type else 1

    def attend(layer, t, sizes):
        attn = layer.attention if dinov2 else layer.self_attn
        h = (layer.norm1 if dinov2 else layer.layer_norm1)(t)
        n_heads = model.config.num_attention_heads
        q, k, v = (heads(proj(h), n_heads) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
        scale = attn.scaling if dinov2 else attn.scale
        o = oracle_attention(q, k, v, scale, sizes, bug).transpose(1, 2).flatten(2)
        o = attn.o_proj(o) if dinov2 else attn.out_proj(o)
        return t + (layer.layer_scale1(o) if dinov2 else o), k

    def mlp(layer, t):
        if dinov2:
            return t + layer.layer_scale2(layer.mlp(layer.norm2(t)))
        return t + layer.mlp(layer.layer_norm2(t))

    with torch.no_grad():
        t = model.embeddings(x)
        if hasattr(model, "pre_layrnorm"):
            t = model.pre_layrnorm(t)
        layers = model.encoder.layer if dinov2 else model.encoder.layers
        t = oracle_layers(layers, t, schedule, prefix, prop_attn, bug, attend, mlp)
        if dinov2:
            return model.layernorm(t)
        return model.post_layernorm(t) if hasattr(model, "head") else t


TIMM = {"timm": tiny_timm_vit, "timm-6x144": lambda: tiny_timm_vit(depth=6, img_size=48),
        "timm-reg": lambda: tiny_timm_vit(reg_tokens=2, qk_norm=True),
        "timm-no-cls": lambda: tiny_timm_vit(class_token=False, global_pool="avg")}
HF = {"clip": tiny_clip, "dinov2": tiny_dinov2, "siglip": tiny_siglip}
SCHEDULES = [4, [4, 0, 0, 2], [8, 0, 3, 0], 12, [0, 5, 0, 1], 40]      # 40: every layer at its cap


def full_schedule(r, depth):
    return [r] * depth if isinstance(r, int) else r + [0] * (depth - len(r))


def inputs_for(name, batch=3):
    side = 48 if name == "timm-6x144" else 32
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(5))


def patched_output(model, x, **options):
    with vlmeff.patch(model, method="tome", **options):
        return run(model, x)


# -- the oracle itself is right where nothing merges ----------------------------------------------------------------
@pytest.mark.parametrize("name", [*TIMM, *HF])
def test_oracle_without_merges_is_the_model(name):
    model = {**TIMM, **HF}[name]()
    x = inputs_for(name)
    oracle = (oracle_timm if name in TIMM else oracle_hf)(model, x, [0] * 6)
    torch.testing.assert_close(oracle, run(model, x), atol=1e-5, rtol=0)


# -- equality with the oracle ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("r", SCHEDULES)
@pytest.mark.parametrize("name", TIMM)
def test_timm_equals_the_oracle(name, r, prop_attn):
    model, x = TIMM[name](), inputs_for(name)
    schedule = full_schedule(r, len(model.blocks))
    expected = oracle_timm(model, x, schedule, prop_attn)
    torch.testing.assert_close(patched_output(model, x, r=schedule, prop_attn=prop_attn), expected,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("prop_attn", [True, False])
@pytest.mark.parametrize("r", [4, [4, 0, 0, 2], [0, 5, 0, 1]])
@pytest.mark.parametrize("name", HF)
def test_hf_towers_equal_the_oracle(name, r, prop_attn):
    model, x = HF[name](), inputs_for(name)
    schedule = full_schedule(r, 4)
    expected = oracle_hf(model, x, schedule, prop_attn)
    out = patched_output(model, x, r=schedule, prop_attn=prop_attn)
    assert out.shape == expected.shape == (3, 64 + (name != "siglip") - sum(schedule), 32)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_each_layer_merges_at_most_half_of_the_unprotected_tokens():
    # [CLS] + 1 register: an odd count of patch tokens after layer 0 is where "half of all tokens" would differ
    model, x = tiny_timm_vit(reg_tokens=1), inputs_for("timm")
    schedule = [31, 40, 40, 40]
    expected = oracle_timm(model, x, schedule)
    with vlmeff.patch(model, method="tome", r=schedule) as h:
        out = run(model, x)
    counts = {"input": 64, "layer 0": 33, "layer 1": 17, "layer 2": 9, "layer 3": 5}
    assert h.stats["visual_tokens"] == {stage: [n] * 3 for stage, n in counts.items()}
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_a_layer_with_nothing_to_merge_changes_nothing():
    model = tiny_timm_vit(img_size=4, depth=2)                    # one patch: the cap is 0 in every layer
    x = torch.randn(2, 3, 4, 4)
    before = run(model, x)
    with vlmeff.patch(model, method="tome", r=[3, 3]) as h:
        assert torch.equal(run(model, x), before)
    assert h.stats["visual_tokens"] == {"input": [1, 1], "layer 0": [1, 1], "layer 1": [1, 1]}


@pytest.mark.parametrize("bug", BUGS)
def test_the_oracle_comparison_catches_each_known_bug(bug):
    """Each bug of the list, put into the oracle, moves it far from the patched model: the equality tests above
    would fail on the same bug in the implementation (a prefix bug needs a model whose [CLS] is read)."""
    model, x = tiny_timm_vit(), inputs_for("timm")
    schedule = [4, 0, 0, 2] if bug == "prop_attn_only_when_merging" else [8, 8, 8, 8]
    patched = patched_output(model, x, r=schedule)
    assert (oracle_timm(model, x, schedule) - patched).abs().max() < 1e-4
    assert (oracle_timm(model, x, schedule, bug=bug) - patched).abs().max() > 1e-3


def test_raster_order_keeps_positions_and_differs_from_tome_order():
    model, x = tiny_clip(), inputs_for("clip")
    tome_order = patched_output(model, x, r=[8, 8, 0, 0])
    raster = patched_output(model, x, r=[8, 8, 0, 0], order="raster")
    assert raster.shape == tome_order.shape == (3, 49, 32)
    assert (raster - tome_order).abs().max() > 1e-3        # a different layout changes the second layer's split
    # one merging layer, then no more: the same tokens, only permuted
    one_tome, one_raster = (patched_output(model, x, r=[8, 0, 0, 0], order=o) for o in ("tome", "raster"))
    torch.testing.assert_close(one_tome.sort(dim=1).values, one_raster.sort(dim=1).values, atol=1e-5, rtol=0)
    # raster order: the [CLS] first, then the patches that survived in their original order (row 0 of
    # the first layer's output keeps the smallest surviving position): compare against ToMe order's [CLS] row
    torch.testing.assert_close(one_raster[:, 0], one_tome[:, 0], atol=1e-5, rtol=0)


def test_full_budget_and_unpatch_are_bit_identical():
    model, x = tiny_timm_vit(reg_tokens=2), images()
    before = run(model, x)
    for options in (dict(r=0), dict(keep=1.0), dict(keep=64), dict(r=[0, 0, 0, 0], order="raster")):
        assert torch.equal(patched_output(model, x, **options), before)
    patched_output(model, x, r=4)
    assert torch.equal(run(model, x), before)


# -- schedules from keep ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("keep,expected", [(16, 16), (17, 17), (5, 5), (4, 4), (63, 63), (0.25, 16), (0.3, 19),
                                           (40, 40)])
def test_keep_reaches_the_budget_exactly(keep, expected):
    model = tiny_timm_vit()
    with vlmeff.patch(model, method="tome", keep=keep) as h:
        out = run(model, images(3))
    final = list(h.stats["visual_tokens"].values())[-1]
    assert final == [expected] * 3 and out.shape == (3, 10)


def test_keep_schedules_are_even_and_capped():
    from vlmeff.engine.vit import tome_schedule
    assert tome_schedule(None, 16, 64, 4) == [12, 12, 12, 12]
    assert tome_schedule(None, 17, 64, 4) == [12, 12, 12, 11]
    assert tome_schedule(None, 5, 64, 4) == [24, 20, 10, 5]         # each layer at most half of its tokens
    assert tome_schedule(None, 1, 64, 7) == [16, 16, 16, 8, 4, 2, 1]
    assert tome_schedule(None, 4, 64, 4) == [32, 16, 8, 4]


def test_fewest_tokens_halves_rounding_the_survivors_up():
    from vlmeff.engine.vit import tome_fewest_tokens
    assert tome_fewest_tokens(64, 7) == 1                              # 32 16 8 4 2 1 1: a lone token stays
    assert tome_fewest_tokens(10, 2) == 3                              # 5, then 5 - 2
    assert tome_fewest_tokens(64, 0) == 64


def test_schedule_errors_name_what_is_missing():
    from vlmeff.engine.vit import tome_schedule, tome_schedule_to_keep
    with pytest.raises(ValueError, match=r"^method 'tome' needs r \(tokens merged per layer\) or keep \(tokens left "
                                         r"at the end\)$"):
        tome_schedule(None, None, 64, 4)
    assert tome_schedule(3, None, None, 2) == [3, 3]                   # an explicit r needs no token count
    with pytest.raises(ValueError, match=r"^keep=1 asks method 'tome' for 1 of the 16 patch tokens, .* at least 2;"):
        tome_schedule_to_keep(16, 1, 3)                                # a count, not a ratio: named as the count


def test_a_vit_of_any_image_size_needs_an_explicit_r():
    """timm's dynamic_img_size: the patch count depends on the image, so no keep can be turned into a schedule; an
    explicit r works on any size."""
    model = tiny_timm_vit(dynamic_img_size=True)
    with pytest.raises(ValueError, match=r"^this model's token count is not fixed; give method 'tome' an explicit r$"):
        vlmeff.patch(model, method="tome", keep=16)
    assert not hasattr(model, "_vlmeff_patch")
    with vlmeff.patch(model, method="tome", r=2) as h:
        run(model, torch.randn(2, 3, 24, 24))                          # 6 x 6 patches, not the 8 x 8 of 32 px
    assert list(h.stats["visual_tokens"].values())[-1] == [36 - 4 * 2] * 2


@pytest.mark.parametrize("keep,fewest", [(1, 4), (3, 4), (0.01, 4)])
def test_unreachable_keep_names_the_fewest_tokens(keep, fewest):
    model = tiny_timm_vit()
    with pytest.raises(ValueError, match=rf"keep={keep}.*4 layers leave at least {fewest}; use keep >= {fewest}"):
        vlmeff.patch(model, method="tome", keep=keep)
    assert not hasattr(model, "_vlmeff_patch")


R_ACCEPTED = r"accepted: None \(derived from keep\), an int >= 0 merged in every layer, or a list of 4 ints >= 0"


@pytest.mark.parametrize("options,error,match", [
    (dict(r=2.5), TypeError, r"r=2.5 is not accepted; " + R_ACCEPTED),
    (dict(r=True), TypeError, r"r=True is not accepted; " + R_ACCEPTED),
    (dict(r=-1), ValueError, r"r=-1 is not accepted; " + R_ACCEPTED),
    (dict(r=[1, 2]), ValueError, r"r=\[1, 2\] is not accepted; " + R_ACCEPTED),
    (dict(r=[1, 2, 3, 2.0]), ValueError, R_ACCEPTED),
    (dict(r="4"), TypeError, r"r='4' is not accepted; " + R_ACCEPTED),
    (dict(r=4, keep=16), ValueError, "r .* or keep .*, not both"),
    (dict(), ValueError, "needs r .* or keep"),
    (dict(r=4, prop_attn="no"), TypeError, r"prop_attn='no' is not accepted; accepted: True or False"),
    (dict(r=4, order="sorted"), ValueError, r"order='sorted' is not accepted; accepted: tome, raster"),
])
def test_bad_options_are_clear_errors(options, error, match):
    model = tiny_timm_vit()
    with pytest.raises(error, match=match):
        vlmeff.patch(model, method="tome", **options)
    assert not hasattr(model, "_vlmeff_patch")


# -- launches -------------------------------------------------------------------------------------------------------
# aten ops a layer adds (tests/opcount.py): a merge = 8 matching (key mean, norm, div, bmm, max, argsort, sort of
# the unmerged, gather of the targets) + 1 fused merge (`kernels.tome_merge`: rows, sizes and the log-sizes of
# proportional attention in one launch on CUDA); a layer without a merge reuses the bias of the latest merge:
# nothing added. Before the fused merge: 15 for a first merge, 16 for a later one (size channel, 2 gathers,
# scatter_add, cat, division, log); the target is at most 12.
MERGE = 9


@pytest.mark.parametrize("schedule,prop_attn,expected", [
    ([4, 0, 0, 0], True, MERGE),
    ([4, 0, 0, 2], True, 2 * MERGE),
    ([4, 4, 4, 4], True, 4 * MERGE),
    ([0, 4, 0, 0], False, MERGE),
    ([4, 4, 0, 0], False, 2 * MERGE),
])
def test_added_launches_are_pinned(schedule, prop_attn, expected):
    model, x = tiny_timm_vit(), images()
    _, plain = count_ops(model, x)
    with vlmeff.patch(model, method="tome", r=schedule, prop_attn=prop_attn):
        _, patched = count_ops(model, x)
    assert patched.syncs == 0
    assert patched.total - plain.total == expected, patched.ops - plain.ops
    # the log-size mask keeps SDPA on its fused CPU kernel in every layer
    assert patched.ops["_scaled_dot_product_flash_attention_for_cpu"] == 4


# -- torch.compile and fake tensors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_timm_vit, tiny_clip])
def test_compiles_fullgraph_and_equals_eager(make):
    model, x = make(), images()
    with vlmeff.patch(model, method="tome", r=[4, 0, 0, 2]) as h:
        eager = run(model, x)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(x) if make is tiny_timm_vit else None
        torch._dynamo.reset()
        compiled = run(torch.compile(model, fullgraph=True, backend="aot_eager"), x)
        assert h.stats["visual_tokens"]["layer 3"] == [58, 58]
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=0)
    if explanation is not None:
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1


def test_runs_under_fake_tensors():
    model = tiny_timm_vit()
    with vlmeff.patch(model, method="tome", r=[4, 0, 0, 2]) as h:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            out = model(mode.from_tensor(images()))
    assert out.shape == (2, 10) and h.stats["visual_tokens"]["layer 3"] == [58, 58]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_sync_on_cuda():
    model, x = tiny_timm_vit().cuda(), images().cuda()
    with vlmeff.patch(model, method="tome", r=[4, 0, 0, 2]):
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                model(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
