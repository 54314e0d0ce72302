"""Every option is checked once, at patch time, against its declared type and range (model-dependent ones against
the model), with a message naming the option, the value and what is accepted; a failed patch leaves the model as
it was; compiled models are refused."""
import math
import re

import numpy as np
import pytest
import torch

import vlmeff
from lvlm_models import logits, tiny_llava
from models import images, run, tiny_timm_vit
from test_lvlm import two_samples
from test_lvlm_families import FAMILIES
from test_qwen_vl import tiny_qwen
from vlmeff import api, registry
from vlmeff.models import find_adapter
from vlmeff.models.timm_vit import TimmViTAdapter

# tiny_timm_vit: 4 layers, default pruning layer 1, 64 patches. tiny_llava: 3-layer CLIP tower, features taken
# after tower layer 1 (vision_feature_layer=-2), 16 patches per image.
VIT_SCORE = "with start <= end <= 1; indices lie in \\[-4, 3\\]"
LLAVA_SCORE = "with start <= end <= 1; indices lie in \\[-3, 2\\]"
CONTEXTUAL = r"an int count >= 0 of contextual tokens \(at most keep - 1 = 3 for keep=4\) or a float share"
R = r"None \(derived from keep\), an int >= 0 merged in every layer, or a list of 4 ints >= 0"

VIT_CASES = [   # (method, options, error, accepted): each value alone makes vlmeff.patch raise
    ("cls", dict(score_layers="0"), TypeError, VIT_SCORE),
    ("cls", dict(score_layers=(0,)), ValueError, VIT_SCORE),
    ("cls", dict(score_layers=[]), ValueError, VIT_SCORE),
    ("cls", dict(score_layers=[0, 1, 2]), ValueError, VIT_SCORE),
    ("cls", dict(score_layers=0.5), TypeError, VIT_SCORE),
    ("cls", dict(score_layers=True), TypeError, VIT_SCORE),
    ("cls", dict(score_layers=7), ValueError, VIT_SCORE),
    ("cls", dict(score_layers=2), ValueError, VIT_SCORE),                   # after the pruning layer 1
    ("cls", dict(score_layers=(1, 0)), ValueError, VIT_SCORE),
    ("cls", dict(score_layers=(0, True)), ValueError, VIT_SCORE),
    ("cls", dict(layer=2, score_layers=(0, 3)), ValueError, "start <= end <= 2"),
    ("received", dict(score_layers=-1), ValueError, VIT_SCORE),             # layer 3 > pruning layer 1
    ("cls", dict(layer=True), TypeError, r"a layer index in \[-4, 3\]"),
    ("cls", dict(layer=1.0), TypeError, r"a layer index in \[-4, 3\]"),
    ("cls", dict(layer="1"), TypeError, r"a layer index in \[-4, 3\]"),
    ("cls", dict(layer=4), ValueError, r"a layer index in \[-4, 3\]"),
    ("pool", dict(layer=-5), ValueError, r"a layer index in \[-4, 3\]"),
    ("cls", dict(reduce="Drop"), ValueError, "drop, merge"),
    ("cls", dict(reduce=["drop"]), TypeError, "drop, merge"),
    ("random", dict(reduce=None), TypeError, "drop, merge"),
    ("cls", dict(positions="compact"), ValueError, "positions applies to LVLMs"),
    ("random", dict(seed="0"), TypeError, r"an int in \[0, 2\*\*64\)"),
    ("random", dict(seed=1.5), TypeError, r"an int in \[0, 2\*\*64\)"),
    ("random", dict(seed=True), TypeError, r"an int in \[0, 2\*\*64\)"),
    ("random", dict(seed=-1), ValueError, r"an int in \[0, 2\*\*64\)"),
    ("random", dict(seed=2 ** 64), ValueError, r"an int in \[0, 2\*\*64\)"),
    ("tome", dict(r=2.5), TypeError, R),
    ("tome", dict(r=True), TypeError, R),
    ("tome", dict(r="2"), TypeError, R),
    ("tome", dict(r=-1), ValueError, R),
    ("tome", dict(r=[1, 2]), ValueError, R),
    ("tome", dict(r=[1, 2, 3, True]), ValueError, R),
    ("tome", dict(r=[1, 2, 3, -1]), ValueError, R),
    ("tome", dict(r=2, prop_attn="no"), TypeError, "True or False"),
    ("tome", dict(r=2, prop_attn=1), TypeError, "True or False"),
    ("tome", dict(r=2, prop_attn=None), TypeError, "True or False"),
]

LLAVA_CASES = [
    ("cls", dict(score_layers=7), ValueError, LLAVA_SCORE),                 # wrapped modulo before
    ("cls", dict(score_layers=True), TypeError, LLAVA_SCORE),               # taken as 1 before
    ("cls", dict(score_layers=2), ValueError, LLAVA_SCORE),                 # after the feature layer 1
    ("cls", dict(score_layers=-4), ValueError, LLAVA_SCORE),
    ("cls", dict(score_layers=(0, 2)), ValueError, LLAVA_SCORE),
    ("received", dict(score_layers=(0,)), ValueError, LLAVA_SCORE),
    ("received", dict(score_layers="0"), TypeError, LLAVA_SCORE),
    ("visionzip", dict(score_layers=[0, 1, 2]), ValueError, LLAVA_SCORE),
    ("cls", dict(layer=1), ValueError, r"None only: on LlavaForConditionalGeneration .* feature layer \(tower layer 1\)"),
    ("cls", dict(layer=True), TypeError, "None only"),
    ("pool", dict(layer=0.5), TypeError, "None only"),
    ("cls", dict(positions="shuffled"), ValueError, "compact, original, or None for compact"),
    ("cls", dict(positions="Compact"), ValueError, "compact, original, or None for compact"),
    ("random", dict(positions=1), TypeError, "compact, original, or None for compact"),
    ("visionzip", dict(contextual=-1), ValueError, CONTEXTUAL),            # kept 5 for keep=4 before
    ("visionzip", dict(contextual=2.0), ValueError, CONTEXTUAL),           # clamped before
    ("visionzip", dict(contextual=1.0), ValueError, CONTEXTUAL),
    ("visionzip", dict(contextual=1000), ValueError, CONTEXTUAL),          # clamped before
    ("visionzip", dict(contextual=4), ValueError, CONTEXTUAL),             # no dominant token left
    ("visionzip", dict(contextual="a"), TypeError, CONTEXTUAL),
    ("visionzip", dict(contextual=None), TypeError, CONTEXTUAL),
    ("visionzip", dict(contextual=True), TypeError, CONTEXTUAL),
    ("visionzip", dict(contextual=math.nan), ValueError, CONTEXTUAL),
    ("random", dict(seed=[0]), TypeError, r"an int in \[0, 2\*\*64\)"),
    ("vispruner", dict(important_ratio=1.5), ValueError, r"a real in \[0, 1\]: the share of the budget"),
    ("vispruner", dict(important_ratio=-0.1), ValueError, r"a real in \[0, 1\]"),
    ("vispruner", dict(important_ratio=math.nan), ValueError, r"a real in \[0, 1\]"),
    ("vispruner", dict(important_ratio="half"), TypeError, r"a real in \[0, 1\]"),
    ("vispruner", dict(step=0), ValueError, r"an int >= 1: the most similar tokens removed"),
    ("vispruner", dict(step=2.0), TypeError, r"an int >= 1"),
    ("vispruner", dict(score_layers=2), ValueError, LLAVA_SCORE),
    ("cdpruner", dict(relevance="clip"), ValueError, "input_embeddings, none"),
    ("cdpruner", dict(relevance=None), TypeError, "input_embeddings, none"),
    ("divprune", dict(positions="first"), ValueError, "compact, original, or None for compact"),
]


def _assert_refused(model, method, keep, options, error, accepted):
    name, value = list(options.items())[-1]          # the bad one; any others are valid
    with pytest.raises(error) as info:
        vlmeff.patch(model, method=method, keep=keep, **options)
    message = str(info.value)
    assert type(info.value) is error
    assert f"{name}={value!r} is not accepted" in message
    assert f"method {method!r} on " in message
    assert re.search("accepted: .*" + accepted, message), message
    assert not hasattr(model, "_vlmeff_patch")


@pytest.mark.parametrize("method,options,error,accepted", VIT_CASES)
def test_bad_vit_option_is_refused_at_patch_time(method, options, error, accepted):
    keep = None if method == "tome" else 8
    _assert_refused(tiny_timm_vit(), method, keep, options, error, accepted)


@pytest.fixture(scope="module")
def llava():
    return tiny_llava()


@pytest.mark.parametrize("method,options,error,accepted", LLAVA_CASES)
def test_bad_lvlm_option_is_refused_at_patch_time(llava, method, options, error, accepted):
    _assert_refused(llava, method, 4, options, error, accepted)


def test_mrope_model_refuses_compact_positions():
    model = tiny_qwen("qwen2")
    _assert_refused(model, "received", 4, dict(positions="compact"), ValueError,
                    "original or None: Qwen2VLForConditionalGeneration keeps the original M-RoPE positions")
    vlmeff.patch(model, "received", keep=4, positions="original").unpatch()


@pytest.mark.parametrize("method", [{"cls"}, None, 1])
def test_method_that_is_not_a_string_is_a_type_error(method):
    with pytest.raises(TypeError, match=r"method must be a str, one of cdpruner, cls, dart, debiased, divprune, fastv, "
                                        r"infoflow, pdrop, pool, random, received, sparsevlm, tome, transition, "
                                        r"visionzip, vispruner \(or a list of \(method, "
                                        r"options\) pairs\); got " + re.escape(repr(method))):
        vlmeff.patch(tiny_timm_vit(), method=method, keep=8)


def test_unknown_option_lists_keep_and_suggests_the_closest_name():
    with pytest.raises(TypeError, match=r"method 'cls' got unknown option\(s\) kep=0.25; valid: keep, layer, "
                                        r"positions, reduce, score_layers; did you mean 'keep'\?$"):
        vlmeff.patch(tiny_timm_vit(), method="cls", kep=0.25)
    with pytest.raises(TypeError, match=r"unknown option\(s\) score_layer=1; .*did you mean 'score_layers'\?"):
        vlmeff.patch(tiny_timm_vit(), method="cls", keep=8, score_layer=1)
    with pytest.raises(ValueError, match=r"unknown method 'rnadom'; available: .*; did you mean 'random'\?"):
        vlmeff.patch(tiny_timm_vit(), method="rnadom", keep=8)


# methods whose budget is not a count, or that need an option: PyramidDrop's keep is an average share of the visual
# tokens over the decoder layers; Attention Debiasing needs its fitted trend (here the published preset)
BUDGET_AND_REQUIRED = {"pdrop": (0.75, {}), "transition": (0.75, {}), "debiased": (4, {"schedule": "llava-1.5"}),
                       "infoflow": (0.5, {}), "sparsevlm": (0.75, {})}
# the layers the in-LLM defaults scale to on tiny LLaVA's 4 decoder layers, as Patch.config shows them
RESOLVED = {"fastv": {"layer": 1}, "dart": {"layer": 1}, "debiased": {"layer": 1, "pad_threshold": 0.5}, "pdrop": {"layers": [1, 2, 3]},
            "transition": {"layers": [1, 2], "accumulate": [0, 1], "positions": "renumber"},
            "sparsevlm": {"layers": [1, 2], "positions": "renumber"},
            "infoflow": {"layers": [1, 3], "ratios": [0.9833433139039235, 0.9833433139039235 * 0.8773258179532721]}}


def test_every_method_patches_with_its_defaults_and_forward_runs(llava):
    vit, x = tiny_timm_vit(), images()
    for info in vlmeff.methods():
        for kind, model, call in (("vit", vit, lambda: run(vit, x)), ("lvlm", llava, lambda: logits(llava, two_samples()))):
            if kind not in info.model_kinds:
                continue
            keep, required = BUDGET_AND_REQUIRED.get(info.name, (4, {}))
            with vlmeff.patch(model, info.name, keep=keep, **required) as p:
                call()
            config = {"method": info.name, "keep": keep, **info.defaults, **required, **RESOLVED.get(info.name, {})}
            if info.name == "pdrop":              # lambda solved for the average budget: (1 + l + l^2 + l^3) / 4
                lam = p.config["ratios"][0]
                assert (1 + lam + lam ** 2 + lam ** 3) / 4 == pytest.approx(keep)
                config["ratios"] = [lam, lam ** 2, lam ** 3]
                assert p.config["ratios"] == pytest.approx(config["ratios"])
                config["ratios"] = p.config["ratios"]
            if info.name == "transition":         # TransPrune's shape 0.625 : 0.125 scaled to the average budget
                high, low = p.config["ratios"]
                assert (1 + 1 * high + 2 * low) / 4 == pytest.approx(keep) and high == pytest.approx(min(1.0, 5 * low))
                config["ratios"] = p.config["ratios"]
            if info.name == "sparsevlm":          # the 192-token schedule's last two stages, scaled to the average
                high, low = p.config["ratios"]
                assert (1 + 1 * high + 2 * low) / 4 == pytest.approx(keep) and high / low == pytest.approx(200 / 110)
                config["ratios"] = p.config["ratios"]
            if info.name == "debiased":           # the preset, as loaded
                config["schedule"] = p.config["schedule"]
                assert p.config["schedule"]["preset"] == "llava-1.5"
            assert p.config == config
            assert p.stats["visual_tokens"], (info.name, kind)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen2", "qwen3"])
def test_every_family_bounds_score_layers_by_its_tower_and_patches_with_defaults(family):
    """The context read from each adapter: the tower depth (from the config) bounds score_layers, and every
    method that acts on the family patches with its defaults."""
    model = tiny_qwen(family) if family.startswith("qwen") else FAMILIES[family][0]()
    vision = model.config.vision_config
    depth = vision.depth if family.startswith("qwen") else vision.num_hidden_layers
    with pytest.raises(ValueError, match=rf"score_layers={depth} is not accepted; .*indices lie in \[-{depth}, "
                                         rf"{depth - 1}\]"):
        vlmeff.patch(model, "received", keep=4, score_layers=depth)
    has_cls = find_adapter(model).has_cls
    in_llm = {"fastv", "pdrop", "debiased", "transition", "infoflow", "dart", "sparsevlm"}
    for info in vlmeff.methods():
        if "lvlm" in info.model_kinds and (has_cls or not info.needs_cls) and not (
                family == "gemma3" and info.name in in_llm):         # sliding-window LM: refused, see test_llm_stage
            keep, required = BUDGET_AND_REQUIRED.get(info.name, (4, {}))
            vlmeff.patch(model, info.name, keep=keep, **required).unpatch()
    assert not hasattr(model, "_vlmeff_patch")


@pytest.mark.parametrize("model,method,options,config", [
    ("vit", "cls", dict(layer=np.int64(2), score_layers=[np.int32(0), -2]), dict(layer=2, score_layers=[0, -2])),
    ("vit", "cls", dict(layer=-2, score_layers=-4), dict(layer=-2, score_layers=-4)),
    ("vit", "tome", dict(r=(0, 4, np.int64(2), 0), prop_attn=False), dict(r=(0, 4, 2, 0), prop_attn=False)),
    ("vit", "random", dict(seed=2 ** 64 - 1, reduce="merge"), dict(seed=2 ** 64 - 1, reduce="merge")),
    ("lvlm", "cls", dict(score_layers=(-3, 1), positions="original"), dict(score_layers=(-3, 1))),
    ("lvlm", "visionzip", dict(contextual=3), dict(contextual=3)),
    ("lvlm", "visionzip", dict(contextual=0), dict(contextual=0)),
    ("lvlm", "visionzip", dict(contextual=np.float32(0.5)), dict(contextual=0.5)),
])
def test_valid_values_patch_with_plain_numbers_in_the_config(llava, model, method, options, config):
    target = tiny_timm_vit() if model == "vit" else llava
    with vlmeff.patch(target, method, keep=None if method == "tome" else 4, **options) as p:   # tome: r or keep
        if model == "vit":
            run(target, images())
        else:
            logits(target, two_samples())
    for name, value in config.items():
        assert p.config[name] == value and type(p.config[name]) is type(value)
        if isinstance(value, (list, tuple)):
            assert all(type(v) is int for v in p.config[name])


def test_contextual_count_at_forward_time():
    assert registry.contextual_count(3, 4) == 3
    assert registry.contextual_count(0, 1) == 0
    assert registry.contextual_count(0.5, 4) == 2
    assert registry.contextual_count(0.99, 4) == 3           # a share keeps one dominant token
    assert registry.contextual_count(0.6, 1) == 0
    with pytest.raises(ValueError, match=r"contextual=4 needs a budget of at least 5 tokens, but keep gives 4 .*"
                                         r"accepted: a count <= keep - 1 or a float share in \[0, 1\)"):
        registry.contextual_count(4, 4)


def test_contextual_count_above_a_ratio_budget_is_an_error_at_forward(llava):
    with vlmeff.patch(llava, "visionzip", keep=0.25, contextual=1000):     # 0.25 of 16 patches: 4 tokens
        with pytest.raises(ValueError, match="contextual=1000 needs a budget of at least 1001 tokens"):
            logits(llava, two_samples())


def test_cli_methods_prints_every_option_with_what_it_accepts(capsys):
    from vlmeff import cli
    cli.cmd_methods(None)
    out = capsys.readouterr().out
    for info in vlmeff.methods():
        for option in info.options.values():
            assert f"{option.name}={option.default!r}: {option.accepted}" in out


# -- compiled models -------------------------------------------------------------------------------------------
def test_dynamo_does_not_retrace_for_hooks_added_after_compiling():
    """Why vlmeff refuses compiled models: a hook added later is not seen by the compiled code. If this starts
    failing, torch re-traces on new hooks and patching a compiled model could be allowed."""
    model, x = tiny_timm_vit(), images()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        before = compiled(x)
        handle = model.blocks[1].register_forward_hook(lambda m, a, out: out * 0)
        after, eager = compiled(x), model(x)
    handle.remove()
    assert torch.equal(after, before) and not torch.allclose(eager, before)


def test_a_compiled_model_is_refused():
    model = tiny_timm_vit()
    with pytest.raises(RuntimeError, match=r"this VisionTransformer is already compiled: .* Patch first, then "
                                           r"compile: patch = vlmeff.patch\(model, ...\); model = torch.compile"):
        vlmeff.patch(torch.compile(model, backend="eager"), "cls", keep=8)
    assert not hasattr(model, "_vlmeff_patch")
    model.compile(backend="eager")                                   # compiled in place
    with pytest.raises(RuntimeError, match="this VisionTransformer is already compiled"):
        vlmeff.patch(model, "tome", r=2)
    assert not hasattr(model, "_vlmeff_patch")


def test_a_compiled_block_or_tower_is_refused_a_compiled_language_model_is_not():
    model = tiny_timm_vit()
    model.blocks[2].attn.compile(backend="eager")
    with pytest.raises(RuntimeError, match=r"blocks.2.attn \(Attention\) of this VisionTransformer is already compiled"):
        vlmeff.patch(model, "cls", keep=8)
    llava, inputs = tiny_llava(), two_samples()
    llava.model.vision_tower.compile(backend="eager")
    with pytest.raises(RuntimeError, match=r"model.vision_tower \(CLIPVisionModel\) of this Llava.* already compiled"):
        vlmeff.patch(llava, "cls", keep=4)
    llava = tiny_llava()
    reference = vlmeff.patch(tiny_llava(), "cls", keep=4)
    expected = logits(reference.model, inputs)
    llava.model.language_model.compile(backend="eager")             # the pre-LLM patch hooks nothing in the LLM
    with vlmeff.patch(llava, "cls", keep=4) as p:
        torch.testing.assert_close(logits(llava, inputs), expected, rtol=0, atol=1e-6)
    assert p.stats["visual_tokens"]["before LLM"] == [4, 4]


# -- a failed patch leaves nothing behind ----------------------------------------------------------------------
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs",
              "_backward_hooks", "_backward_pre_hooks")


def _state(model):
    """Per module: its hook dicts' keys and its instance attributes (method overrides live there)."""
    return {name: ({d: list(getattr(m, d)) for d in HOOK_DICTS}, sorted(vars(m)))
            for name, m in model.named_modules()}


def _raise_on_call(n, original):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("injected install failure")
        return original(*args, **kwargs)
    return wrapper, calls


@pytest.mark.parametrize("model_kind,method,options,target", [
    ("vit", "cls", dict(keep=8), (TimmViTAdapter, "qk_modules", 1)),      # after the stats hooks
    ("vit", "received", dict(keep=8, score_layers=0), (TimmViTAdapter, "qk_modules", 2)),  # after q/k hooks too
    ("vit", "tome", dict(r=2), (vlmeff.Patch, "override", 3)),          # after hooks and two layer overrides
    ("lvlm", "cls", dict(keep=4), (vlmeff.Patch, "override", 2)),       # after the tower hooks and forward
])
def test_a_failed_install_leaves_no_hook_no_override_and_no_marker(monkeypatch, model_kind, method, options, target):
    model = tiny_timm_vit() if model_kind == "vit" else tiny_llava()
    forward = (lambda m: run(m, images())) if model_kind == "vit" else (lambda m: logits(m, two_samples()))
    forward(model)                  # transformers adds its own output-recording hooks on the first forward
    before = _state(model)
    cls, name, n = target
    wrapper, calls = _raise_on_call(n, getattr(cls, name))
    monkeypatch.setattr(cls, name, wrapper)
    with pytest.raises(RuntimeError, match="injected install failure"):
        vlmeff.patch(model, method, **options)
    assert len(calls) == n
    monkeypatch.undo()
    assert _state(model) == before and not hasattr(model, "_vlmeff_patch")
    # patching again works and behaves as on a fresh model
    fresh = tiny_timm_vit() if model_kind == "vit" else tiny_llava()
    with vlmeff.patch(model, method, **options), vlmeff.patch(fresh, method, **options):
        assert torch.equal(forward(model), forward(fresh))
    assert _state(model) == before


# -- engines: built from a table, given the Patch -------------------------------------------------------------
def test_engine_is_chosen_by_site_and_built_with_the_patch(monkeypatch):
    seen = {}

    class RecordingEngine:
        def __init__(self, patch, adapter, method, keep, options):
            seen.update(active=patch.active, config=dict(patch.config), adapter=type(adapter).__name__)
            self.patch = patch

        def install(self):
            seen["installed_on"] = self.patch

    info = registry.MethodInfo("probe", "test", "-", ("inside LLM", "before LLM"), ("lvlm",),
                               {"seed": registry.SEED})
    monkeypatch.setitem(registry._METHODS, "probe", info)
    monkeypatch.setitem(api.ENGINES, ("lvlm", "inside LLM"), RecordingEngine)
    p = vlmeff.patch(tiny_llava(), "probe", keep=3, seed=5)
    assert seen == dict(active=True, config={"method": "probe", "keep": 3, "seed": 5}, adapter="LlavaAdapter",
                        installed_on=p)


def test_an_engine_constructor_error_removes_the_patch(monkeypatch):
    class Failing:
        def __init__(self, patch, *args):
            assert patch.active
            raise ValueError("injected constructor failure")

    model = tiny_timm_vit()
    monkeypatch.setitem(api.ENGINES, ("vit", "vision encoder"), Failing)
    with pytest.raises(ValueError, match="injected constructor failure"):
        vlmeff.patch(model, "cls", keep=8)
    assert not hasattr(model, "_vlmeff_patch")


def test_new_call_empties_the_stats():
    p = vlmeff.patch(tiny_timm_vit(), "cls", keep=8)
    run(p.model, images())
    assert p.stats["visual_tokens"]["after layer 1"] == [8, 8]
    p.new_call()
    assert p.stats == {}


@pytest.mark.parametrize("keep,error,match", [
    (True, TypeError, r"keep must be an int token count >= 1 or a float ratio in \(0, 1\], got True"),
    ("4", TypeError, r"keep must be an int token count >= 1 or a float ratio in \(0, 1\], got '4'"),
    (math.nan, ValueError, r"keep=nan: a ratio must lie in \(0, 1\]"),
    (0.0, ValueError, r"keep=0.0: a ratio must lie in \(0, 1\]"),
    (-3, ValueError, r"keep=-3: a token count must be >= 1"),
])
def test_bad_keep_is_refused_at_patch_time(keep, error, match):
    model = tiny_timm_vit()
    with pytest.raises(error, match=match):
        vlmeff.patch(model, "random", keep=keep)
    assert not hasattr(model, "_vlmeff_patch")


def test_a_failed_call_leaves_no_stats_of_the_previous_one(llava):
    vit = tiny_timm_vit()
    with vlmeff.patch(vit, "cls", keep=16) as p:
        run(vit, images())
        assert p.stats["visual_tokens"]["input"] == [64, 64]
        with pytest.raises(RuntimeError):
            vit.blocks[0](torch.randn(2, 65, 7))                       # the first block's hooks see a bad width
        assert p.stats == {}
    with vlmeff.patch(llava, "cls", keep=4) as p:
        logits(llava, two_samples())
        assert p.stats["visual_tokens"]
        with pytest.raises(Exception):
            llava(input_ids=torch.tensor([[1, 2]]), pixel_values=torch.randn(1, 3, 7, 7))
        assert p.stats == {}


def test_patch_messages_name_the_model_and_the_remedy(llava):
    """Killed mutants of patching.py: the class name and the remedy in the double-patch and override errors, and
    empty stats before the first call."""
    vit = tiny_timm_vit()
    with vlmeff.patch(vit, "cls", keep=16) as p:
        assert p.stats == {}
        with pytest.raises(RuntimeError, match=r"^VisionTransformer is already patched with method 'cls'; "
                                               r"call \.unpatch\(\) on that patch first$"):
            vlmeff.patch(vit, "random", keep=8)
    llava.generate = llava.generate                      # other code's instance override, before vlmeff's
    try:
        with pytest.raises(RuntimeError, match=r"^LlavaForConditionalGeneration\.generate is already overridden on "
                                               r"this instance by other code$"):
            vlmeff.patch(llava, "cls", keep=4)
    finally:
        del llava.generate
    assert not hasattr(llava, "_vlmeff_patch")


def test_vit_option_errors_name_the_model_family():
    with pytest.raises(ValueError, match=r"^method 'cls' on timm VisionTransformer: layer=9 is not accepted"):
        vlmeff.patch(tiny_timm_vit(), "cls", keep=16, layer=9)


def test_patch_repr_names_model_config_and_state():
    vit = tiny_timm_vit()
    p = vlmeff.patch(vit, "cls", keep=16)
    assert repr(p) == ("Patch(VisionTransformer, method='cls', keep=16, layer=None, score_layers=None, "
                       "reduce='drop', positions=None)")
    p.unpatch()
    assert repr(p).endswith("positions=None, removed)")
