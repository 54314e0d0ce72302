"""The patch API on ViTs: timm VisionTransformer and the HF towers CLIP, SigLIP, DINOv2."""
import copy

import pytest
import torch

import vlmeff
from models import images, run, tiny_clip, tiny_dinov2, tiny_siglip, tiny_timm_vit

CLS_MODELS = {"timm": tiny_timm_vit, "timm-reg": lambda: tiny_timm_vit(reg_tokens=2, qk_norm=True),
              "clip": tiny_clip, "dinov2": tiny_dinov2}
NO_CLS_MODELS = {"siglip": tiny_siglip, "timm-nocls": lambda: tiny_timm_vit(class_token=False, global_pool="avg")}
ALL_MODELS = {**CLS_MODELS, **NO_CLS_MODELS}
PREFIX = {"timm": 1, "timm-reg": 3, "clip": 1, "dinov2": 1, "siglip": 0, "timm-nocls": 0}


def applicable(cases):
    """(model name, *case) for every model the case's method applies to ([CLS] methods skip the models without)."""
    return [(name, *case) for name in ALL_MODELS for case in cases if not (case[0] == "cls" and name in NO_CLS_MODELS)]


@pytest.mark.parametrize("name,method,kwargs", applicable([
    ("cls", dict(keep=1.0)), ("cls", dict(keep=64, reduce="merge")), ("cls", dict(keep=1.0, score_layers=0)),
    ("cls", dict(keep=1.0, layer=-1)), ("random", dict(keep=1.0)), ("random", dict(keep=64, reduce="merge")),
    ("received", dict(keep=1.0)), ("received", dict(keep=1.0, reduce="merge", layer=3)), ("pool", dict(keep=64)),
    ("tome", dict(r=0))]))
def test_full_budget_is_bit_identical(name, method, kwargs):
    model, x = ALL_MODELS[name](), images()
    before = run(model, x)
    with vlmeff.patch(model, method=method, **kwargs):
        assert torch.equal(run(model, x), before)
    assert torch.equal(run(model, x), before)


@pytest.mark.parametrize("name,method,kwargs,expected", applicable([
    ("cls", dict(keep=16, layer=1), 16), ("cls", dict(keep=0.25, reduce="merge"), 16),
    ("random", dict(keep=10, layer=0), 10), ("received", dict(keep=12), 12), ("pool", dict(keep=16), 16), ("pool", dict(keep=20), 20),
    ("tome", dict(r=4), 64 - 16), ("tome", dict(keep=16), None)]))
def test_token_counts_follow_the_budget(name, method, kwargs, expected):
    model = ALL_MODELS[name]()
    h = vlmeff.patch(model, method=method, **kwargs)
    out = run(model, images(3))
    counts = h.stats["visual_tokens"]
    assert counts["input"] == [64] * 3
    final = list(counts.values())[-1]
    assert len(set(final)) == 1
    if expected is not None:
        assert final[0] == expected
    else:
        assert 16 <= final[0] < 20        # constant r = ceil(48 / 4) brings 64 tokens to 16
    if out.dim() == 3:                    # HF towers return the reduced sequence
        assert out.shape[1] == final[0] + PREFIX[name]
    assert 0 < h.stats["flops"] < h.stats["flops_unpatched"]


def test_tome_schedule_per_layer_and_pool_grid():
    model = tiny_clip()
    h = vlmeff.patch(model, method="tome", r=[8, 0, 4, 2])
    run(model, images())
    assert h.stats["visual_tokens"] == {"input": [64, 64], "layer 0": [56, 56], "layer 2": [52, 52], "layer 3": [50, 50]}
    h.unpatch()
    h = vlmeff.patch(model, method="pool", keep=20)      # 8 x 8 -> 4 x 5 cells
    run(model, images())
    assert h.stats["visual_tokens"]["after layer 1"] == [20, 20]


def eager_cls_rows(model, x, layer):
    """Oracle: the [CLS] row of layer `layer`'s full attention matrix, head-mean, from an eager run."""
    model = copy.deepcopy(model)
    if hasattr(model, "config"):
        model.set_attn_implementation("eager")
        with torch.no_grad():
            attn = model(pixel_values=x, output_attentions=True).attentions[layer]
    else:
        seen = {}
        block = model.blocks[layer].attn
        block.fused_attn = False
        block.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("attn", o))
        with torch.no_grad():
            model(x)
        attn = seen["attn"]
    return attn[:, :, 0].mean(dim=1)


@pytest.mark.parametrize("name", CLS_MODELS)
@pytest.mark.parametrize("layer,score_layers", [(1, None), (2, 0)])
def test_cls_scores_match_eager_oracle(name, layer, score_layers):
    model, x = CLS_MODELS[name](), images()
    layers = [layer] if score_layers is None else range(score_layers, layer + 1)
    oracle = sum(eager_cls_rows(model, x, i) for i in layers)[:, PREFIX[name]:]
    h = vlmeff.patch(model, method="cls", keep=8, layer=layer, score_layers=score_layers)
    run(model, x)
    torch.testing.assert_close(h.stats["scores"], oracle, atol=1e-5, rtol=0)
    assert torch.equal(h.stats["kept"], oracle.topk(8).indices.sort().values)


@pytest.mark.parametrize("name", ALL_MODELS)
def test_unpatch_restores_and_context_manager(name):
    model, x = ALL_MODELS[name](), images()
    before = run(model, x)
    method = "random" if name in NO_CLS_MODELS else "cls"
    h = vlmeff.patch(model, method=method, keep=8)
    assert not torch.equal(run(model, x), before)
    with pytest.raises(RuntimeError, match="already patched"):
        vlmeff.patch(model, method="tome", r=2)
    h.unpatch()
    assert torch.equal(run(model, x), before)
    assert not model._forward_hooks and not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    with vlmeff.patch(model, method="tome", r=4):
        assert not torch.equal(run(model, x), before)
    assert torch.equal(run(model, x), before)
    assert not any("forward" in vars(m) for m in model.modules())


def test_two_models_patched_differently_do_not_interfere():
    a, b, c, x = tiny_timm_vit(), tiny_timm_vit(), tiny_timm_vit(), images()
    ref_c = run(c, x)
    alone_a = vlmeff.patch(a, method="cls", keep=8)
    out_a = run(a, x)
    alone_a.unpatch()
    alone_b = vlmeff.patch(b, method="tome", r=6)
    out_b = run(b, x)
    alone_b.unpatch()
    ha, hb = vlmeff.patch(a, method="cls", keep=8), vlmeff.patch(b, method="tome", r=6)
    assert torch.equal(run(a, x), out_a) and torch.equal(run(b, x), out_b) and torch.equal(run(c, x), ref_c)
    assert ha.stats["visual_tokens"]["after layer 1"] == [8, 8]
    assert hb.stats["visual_tokens"]["layer 3"] == [40, 40]


@pytest.mark.parametrize("method,kwargs", [("cls", dict(keep=8)), ("cls", dict(keep=8, reduce="merge")),
                                           ("tome", dict(r=6)), ("pool", dict(keep=9)), ("random", dict(keep=5))])
def test_batch_equals_samples_one_by_one(method, kwargs):
    model, x = tiny_clip(), images(3)
    with vlmeff.patch(model, method=method, **kwargs):
        batched = run(model, x)
        single = torch.cat([run(model, x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_merge_tracks_sizes_and_changes_output():
    model, x = tiny_clip(), images()
    with vlmeff.patch(model, method="cls", keep=8) as drop:
        dropped = run(model, x)
    with vlmeff.patch(model, method="cls", keep=8, reduce="merge") as merge:
        merged = run(model, x)
    assert merge.stats["visual_tokens"] == drop.stats["visual_tokens"]
    assert not torch.equal(dropped, merged)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="cls", keep=0), ValueError, "count must be >= 1"),
    (dict(method="cls", keep=1.5), ValueError, r"ratio must lie in \(0, 1\]"),
    (dict(method="cls", keep=65), ValueError, "exceeds the 64 visual tokens"),
    (dict(method="cls", keep="half"), TypeError, "int token count"),
    (dict(method="cls"), ValueError, "needs keep"),
    (dict(method="tome", r=-1), ValueError, "int >= 0"),
    (dict(method="tome", r=[1, 2]), ValueError, "list of 4 ints"),
    (dict(method="tome"), ValueError, "needs r"),
    (dict(method="magic", keep=8), ValueError,
     "unknown method 'magic'; available: cdpruner, cls, dart, debiased, divprune, fastv, infoflow, pdrop, pool, "
     "random, received, sparsevlm, tome, transition, visionzip, vispruner"),
    (dict(method="cls", keep=8, ratio=3), TypeError, "valid: keep, layer, positions, reduce, score_layers"),
    (dict(method="cls", keep=8, reduce="sum"), ValueError, "accepted: drop, merge"),
    (dict(method="cls", keep=8, layer=4), ValueError, r"layer index in \[-4, 3\]"),
    (dict(method="cls", keep=8, layer=1, score_layers=2), ValueError, "start <= end"),
])
def test_bad_input_is_a_clear_error(kwargs, error, match):
    model = tiny_timm_vit()
    with pytest.raises(error, match=match):
        vlmeff.patch(model, **kwargs)
    assert not hasattr(model, "_vlmeff_patch")


@pytest.mark.parametrize("name", ALL_MODELS)
def test_received_scores_match_eager_oracle(name):
    model, x = ALL_MODELS[name](), images()
    model_copy = copy.deepcopy(model)
    if hasattr(model_copy, "config"):
        model_copy.set_attn_implementation("eager")
        with torch.no_grad():
            attn = model_copy(pixel_values=x, output_attentions=True).attentions[1]
    else:
        seen = {}
        model_copy.blocks[1].attn.fused_attn = False
        model_copy.blocks[1].attn.attn_drop.register_forward_hook(lambda m, i, o: seen.setdefault("attn", o))
        with torch.no_grad():
            model_copy(x)
        attn = seen["attn"]
    oracle = attn.mean(dim=2).mean(dim=1)[:, PREFIX[name]:]     # mean over queries, then heads
    h = vlmeff.patch(model, method="received", keep=8, layer=1)
    run(model, x)
    torch.testing.assert_close(h.stats["scores"], oracle, atol=1e-5, rtol=0)


def test_lvlm_only_method_on_a_vit_is_a_clear_error():
    with pytest.raises(ValueError, match="'visionzip' does not act on timm VisionTransformer; methods that do"):
        vlmeff.patch(tiny_timm_vit(), method="visionzip", keep=8)


def test_unsupported_objects_name_the_supported_families():
    with pytest.raises(vlmeff.UnsupportedModelError, match="supported families: .*CLIPVisionModel"):
        vlmeff.patch("not a model", method="cls", keep=8)
    with pytest.raises(vlmeff.UnsupportedModelError, match="Linear is not a supported model"):
        vlmeff.patch(torch.nn.Linear(2, 2), method="cls", keep=8)


def test_cls_on_siglip_names_alternatives():
    with pytest.raises(ValueError, match="SiglipVisionModel does not have; methods that work on it: pool, random, received, tome"):
        vlmeff.patch(tiny_siglip(), method="cls", keep=8)


def test_method_records():
    names = [m.name for m in vlmeff.methods()]
    assert {"cls", "tome", "random", "pool"} <= set(names)
    info = vlmeff.method_info("tome")
    assert info.paper.startswith("ToMe") and "vision encoder" in info.acts_in and "vit" in info.model_kinds
    with pytest.raises(ValueError, match="unknown method"):
        vlmeff.method_info("nope")


@pytest.mark.parametrize("name,method,kwargs", applicable([
    ("cls", dict(keep=8, layer=-1)), ("cls", dict(keep=8, layer=3, score_layers=1)), ("received", dict(keep=8, layer=-1)),
    ("random", dict(keep=8, layer=3, reduce="merge")), ("cls", dict(keep=8, layer=-1, reduce="merge"))]))
def test_reduction_after_the_last_layer(name, method, kwargs):
    """Regression (issue 11 item 4): the end-of-forward hook cleared the captured q/k before the reduction after
    the last layer read them (KeyError: ('q', 3))."""
    model, x = ALL_MODELS[name](), images()
    scored = method == "cls" and "reduce" not in kwargs
    if scored:
        layers = range(kwargs.get("score_layers", 3), 4)
        oracle = sum(eager_cls_rows(model, x, i) for i in layers)[:, PREFIX[name]:]
    h = vlmeff.patch(model, method=method, **kwargs)
    out = run(model, x)
    assert h.stats["visual_tokens"]["after layer 3"] == [8, 8]
    if out.dim() == 3:
        assert out.shape[1] == 8 + PREFIX[name]
    if scored:
        torch.testing.assert_close(h.stats["scores"], oracle, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method,kwargs", [("cls", dict(keep=8)), ("cls", dict(keep=8, reduce="merge")),
                                           ("received", dict(keep=8)), ("random", dict(keep=8)), ("pool", dict(keep=9)),
                                           ("tome", dict(r=4)), ("cls", dict(keep=1.0))])
def test_empty_batch_behaves_like_the_unpatched_model(method, kwargs):
    model, empty = tiny_timm_vit(), torch.empty(0, 3, 32, 32)
    expected = run(model, empty)
    with vlmeff.patch(model, method=method, **kwargs) as h:
        out = run(model, empty)
    assert out.shape == expected.shape == (0, 10)
    assert h.stats["visual_tokens"]["input"] == [] and h.stats["flops"] == 0


@pytest.mark.parametrize("name", CLS_MODELS)
def test_merges_never_reach_the_prefix_tokens(name):
    """The prefix rows ([CLS], registers) leave the reduction layer exactly as they entered it: no pruned token
    merges into them (a mutant letting [CLS] receive merges changes outputs by up to 2.9)."""
    model, x, layer = CLS_MODELS[name](), images(), 1
    h = vlmeff.patch(model, method="cls", keep=8, reduce="merge", layer=layer)
    seen = {}
    block = model.blocks[layer] if hasattr(model, "blocks") else model.encoder.layers[layer] \
        if hasattr(model.encoder, "layers") else model.encoder.layer[layer]
    before = block.register_forward_hook(lambda m, i, o: seen.setdefault("before", o), prepend=True)
    after = block.register_forward_hook(lambda m, i, o: seen.setdefault("after", o))
    run(model, x)
    before.remove(), after.remove(), h.unpatch()
    p = PREFIX[name]
    assert seen["after"].shape[1] == p + 8
    assert torch.equal(seen["after"][:, :p], seen["before"][:, :p])
    assert not torch.equal(seen["after"][:, p:], seen["before"].gather(
        1, (h.stats["kept"] + p)[..., None].expand(-1, -1, seen["before"].shape[-1])))     # patches did merge


@pytest.mark.parametrize("keep,expected", [(0.2, 13), (0.3, 19), (0.55, 35)])
def test_ratio_budgets_round_to_the_nearest_count(keep, expected):
    """64 x 0.2 = 12.8 -> 13 (truncation would give 12), 19.2 -> 19, 35.2 -> 35."""
    model = tiny_timm_vit()
    h = vlmeff.patch(model, method="cls", keep=keep)
    run(model, images())
    assert h.stats["visual_tokens"]["after layer 1"] == [expected] * 2


def test_flops_match_a_hand_count():
    """tiny_timm_vit: D = 32, 4 heads x 8, MLP 128, 4 layers, 64 patches + [CLS]; cls keep=16 after layer 1.
    Per layer on n tokens, multiply-adds: q, k, v, o projections 4 n D^2, Q K^T and A V 2 n^2 D, MLP 2 n D 128."""
    def layer(n):
        return 2 * (4 * n * 32 * 32 + 2 * n * n * 32 + 2 * n * 32 * 128)

    model = tiny_timm_vit()
    h = vlmeff.patch(model, method="cls", keep=16, layer=1)
    run(model, images(3))
    assert h.stats["flops"] == 3 * (2 * layer(65) + 2 * layer(17)) == 3 * (2 * 2_138_240 + 2 * 454_784)
    assert h.stats["flops_unpatched"] == 3 * 4 * layer(65)
