"""Pruning inside the LLM (FastV, PyramidDrop, Attention Debiasing) on tiny random LVLMs of the LLaVA and Qwen-VL
lines: full budget is the unpatched model in every generate mode, scores equal eager attention, the pruned forward
equals an oracle that runs the decoder on the kept tokens itself, cache / batch / labels / multi-turn consistency,
composition with a method before the LLM, calibration files, and errors."""
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import vlmeff
from lvlm_models import (EVERY_FAMILY, GENERATE_MODES, IMAGE, Recorder, generate, labelled, language_model_inputs,
                         logits, run_generate, setup_any, single, tiny_llava)
from opcount import OpCounter
from vlmeff.errors import UnsupportedModelError
from vlmeff.flops import staged_prefill_flops
from vlmeff.pruners import debias, stages

LLM_FAMILIES = [f for f in EVERY_FAMILY if f != "gemma3"]
ORACLE_FAMILIES = ["llava", "next", "qwen2", "qwen2_5"]      # decoders without deepstack additions


def pdrop_full(model):
    n = len(stages.scaled_pdrop(model.config.text_config.num_hidden_layers,
                                max(1, len(getattr(model.config.vision_config, "deepstack_visual_indexes", None)
                                           or [])))[0])
    return dict(ratios=[1.0] * n)


def full_budget(method, model):
    return dict(keep=1.0) if method in ("fastv", "dart") else pdrop_full(model)


# a pruning call of each scorer of the engine (VFlowOpt's with its tower stage: the prompt the LLM gets is shorter)
PRUNED = {"fastv": dict(keep=0.5), "transition": {}, "infoflow": dict(keep=0.5), "dart": dict(keep=0.5),
          "sparsevlm": {}}
ON_THE_CALLERS_PROMPT = {m: o for m, o in PRUNED.items() if m != "infoflow"}


# -- full budget: the unpatched model ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LLM_FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "pdrop", "dart", "sparsevlm"])
def test_full_budget_is_identical_and_unpatch_restores(family, method):
    model, inputs = setup_any(family)
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    full = scored_full_budget(method, model) if method == "sparsevlm" else full_budget(method, model)
    with vlmeff.patch(model, method, **full) as patch:
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs), ref_tokens)
        tokens = patch.stats["visual_tokens"]
        assert all(v == tokens["LLM input"] for v in tokens.values())
    keep = dict(keep=0.25) if method in ("fastv", "dart") else {}
    with vlmeff.patch(model, method, **keep) as patch:
        pruned = logits(model, inputs)
        assert pruned.shape == ref_logits.shape and not torch.allclose(pruned, ref_logits)
        assert patch.stats["prefill_flops"] < patch.stats["prefill_flops_unpatched"]
    assert torch.equal(logits(model, inputs), ref_logits)
    assert torch.equal(generate(model, inputs), ref_tokens)
    assert "forward" not in vars(model) and "generate" not in vars(model)


def scored_full_budget(method, model):
    """TransPrune / VFlowOpt with every stage (and VFlowOpt's tower) at ratio 1.0: nothing dropped, all scored."""
    with vlmeff.patch(model, method) as patch:
        stages = len(patch.config["layers"])
    return dict(ratios=[1.0] * stages, **({"keep": 1.0} if method == "infoflow" else {}))


@pytest.mark.parametrize("mode", [m for m in GENERATE_MODES if m not in ("prompt_lookup", "assistant")])
@pytest.mark.parametrize("family", ["llava", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["transition", "infoflow", "sparsevlm"])
def test_every_generate_mode_at_a_scored_full_budget(family, mode, method):
    """Every mode at full budget, with the scores computed, is the unpatched model's."""
    model, inputs = setup_any(family)
    ref = run_generate(model, inputs, mode, None)
    with vlmeff.patch(model, method, **scored_full_budget(method, model)):
        out = run_generate(model, inputs, mode, None)
    if torch.is_tensor(ref):
        assert torch.equal(out, ref)
    else:
        assert torch.equal(out.sequences, ref.sequences)
        assert torch.equal(torch.stack(out.scores), torch.stack(ref.scores))


@pytest.mark.parametrize("mode", [m for m in GENERATE_MODES if m not in ("prompt_lookup", "assistant")])
@pytest.mark.parametrize("family", ["llava", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", PRUNED)
def test_every_generate_mode_on_the_pruned_cache_equals_recomputation(family, mode, method):
    """FastV keep=0.5, TransPrune at its default stages (renumbered positions on LLaVA: new tokens' positions shift
    while decoding): beams reorder the pruned cache, returned sequences expand it, sampling draws from its logits;
    every mode equals generate without a cache (each step recomputed on the whole sequence, pruned again)."""
    model, inputs = setup_any(family)
    with vlmeff.patch(model, method, **PRUNED[method]):
        cached = run_generate(model, inputs, mode, None)
        recomputed = run_generate(model, inputs, mode, None, use_cache=False)
    if torch.is_tensor(cached):
        assert torch.equal(cached, recomputed)
        return
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(recomputed.scores), atol=5e-5, rtol=1e-5)


# -- scores: the eager attention row ---------------------------------------------------------------------------
def eager_rows(model, inputs):
    """Per layer, the head-mean attention row of each sample's last token [B, L], from the unpatched model run with
    eager attention and output_attentions (materialised matrices, written by transformers, not by vlmeff)."""
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})
    return [a[:, :, -1].mean(1) for a in out.attentions]


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_scores_equal_the_eager_attention_row(family):
    """FastV ranks by layer K - 1's last-token row, PyramidDrop by each stage layer's own (at full budget the stage
    layers see the unpruned sequence, so every stage's row is the unpatched model's)."""
    model, inputs = setup_any(family)
    rows = eager_rows(model, inputs)
    with vlmeff.patch(model, "fastv", keep=1.0) as patch:
        logits(model, inputs)
        (first,) = patch.stats["llm_scores"]
        scores, visual = first.scores, first.visual
    K = stages.scale_layer(2, model.config.text_config.num_hidden_layers,
                           max(1, len(getattr(model.config.vision_config, "deepstack_visual_indexes", None) or [])))
    torch.testing.assert_close(scores, rows[K - 1].float(), atol=1e-6, rtol=1e-5)
    assert torch.equal(visual, inputs["input_ids"] == IMAGE)
    full = pdrop_full(model)
    with vlmeff.patch(model, "pdrop", **full) as patch:
        logits(model, inputs)
        layers = [int(k.split()[-1]) for k in patch.stats["visual_tokens"] if k.startswith("after")]
        for layer, stage in zip(layers, patch.stats["llm_scores"]):
            torch.testing.assert_close(stage.scores, rows[layer].float(), atol=1e-6, rtol=1e-5)


# -- the pruned forward: an oracle that runs the decoder on the kept tokens ---------------------------------------
def oracle_logits(model, inputs, kept, K):
    """Logits of each sample's last token [B, V] computed without vlmeff: the language model's own layers run on the
    sample alone (no padding, causal attention), on every token before layer K and on the columns `kept` [B, L]
    from layer K on, each with its original position (the position ids the model gave it)."""
    lm = model.model.language_model
    embeds, positions = language_model_inputs(model, inputs)
    B, L = embeds.shape[:2]
    out = []
    with torch.no_grad():
        for b in range(B):
            columns = inputs["attention_mask"][b].bool()
            h, pos = embeds[b:b + 1, columns], positions[..., b:b + 1, :][..., columns]
            rope = lm.rotary_emb(h, pos)
            for i, layer in enumerate(lm.layers):
                if i == K:
                    h, pos = h[:, kept[b][columns]], pos[..., kept[b][columns]]
                    rope = lm.rotary_emb(h, pos)
                h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=None)
            out.append(model.lm_head(lm.norm(h))[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("family", ORACLE_FAMILIES)
def test_pruned_forward_equals_the_decoder_run_on_the_kept_tokens(family):
    model, inputs = setup_any(family)
    with vlmeff.patch(model, "fastv", keep=0.25) as patch:
        out = logits(model, inputs)[:, -1]
        kept = patch.stats["llm_kept"]
    K = stages.scale_layer(2, model.config.text_config.num_hidden_layers)
    visual = inputs["input_ids"] == IMAGE
    assert torch.equal((kept & visual).sum(1), (visual.sum(1) * 0.25).round().long())
    assert torch.equal(kept | visual, torch.ones_like(kept))           # only visual tokens are dropped
    torch.testing.assert_close(out, oracle_logits(model, inputs, kept, K), atol=2e-5, rtol=1e-5)


def test_pruned_forward_with_new_pad_slots_equals_the_oracle():
    """One sample drops 12 visual tokens, the text-only one none: the stage layout pads the first by 12 slots."""
    from lvlm_models import A, C, qwen_inputs, tiny_qwen
    model = tiny_qwen("qwen2")
    inputs = qwen_inputs([A, C])
    with vlmeff.patch(model, "fastv", keep=4) as patch:
        out = logits(model, inputs)[:, -1]
        kept = patch.stats["llm_kept"]
    assert kept.sum(1).tolist() == [inputs["attention_mask"].shape[1] - 12, inputs["attention_mask"].shape[1]]
    torch.testing.assert_close(out, oracle_logits(model, inputs, kept, 1), atol=2e-5, rtol=1e-5)


def test_the_kept_tokens_are_the_top_scored_visual_tokens():
    model, inputs = setup_any("llava")
    rows = eager_rows(model, inputs)
    with vlmeff.patch(model, "fastv", keep=5) as patch:
        logits(model, inputs)
        kept = patch.stats["llm_kept"]
    visual = inputs["input_ids"] == IMAGE
    for b in range(2):
        scores = rows[0][b].masked_fill(~visual[b], -1)                 # K = 1 on 4 layers: layer 0's row
        assert set(scores.topk(5).indices.tolist()) == set((kept[b] & visual[b]).nonzero()[:, 0].tolist())


# -- consistency: cache, batch, labels, follow-up turns ---------------------------------------------------------
@pytest.mark.parametrize("family", LLM_FAMILIES)
@pytest.mark.parametrize("method", ["fastv", "pdrop"])
def test_cached_generation_equals_recomputation_without_cache(family, method):
    """Without a cache generate recomputes the whole sequence at every step; the scoring query stays the prompt's
    last token, so every step prunes what the cached prefill pruned."""
    model, inputs = setup_any(family)
    kw = dict(return_dict_in_generate=True, output_logits=True)
    keep = dict(keep=0.5) if method == "fastv" else {}
    with vlmeff.patch(model, method, **keep):
        cached = generate(model, inputs, **kw)
        recomputed = generate(model, inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", LLM_FAMILIES)
@pytest.mark.parametrize("method", PRUNED)
def test_batch_equals_samples_one_by_one(family, method):
    """The samples of the batch keep different column counts (different padding, or images), so the stage layout
    has new pad slots; each sample's logits and tokens equal its own run alone (TransPrune: renumbered positions on
    the LLaVA line)."""
    model, inputs = setup_any(family)
    alone_inputs = single(inputs)
    with vlmeff.patch(model, method, **PRUNED[method]):
        batched = logits(model, inputs)[0, -1]
        tokens = generate(model, inputs)
        alone = logits(model, alone_inputs)[0, -1]
        alone_tokens = generate(model, alone_inputs)
    torch.testing.assert_close(batched, alone, atol=2e-5, rtol=1e-5)
    L, L0 = inputs["input_ids"].shape[1], alone_inputs["input_ids"].shape[1]
    assert torch.equal(tokens[0, L:], alone_tokens[0, L0:])


@pytest.mark.parametrize("method", ["fastv", "dart"])
def test_samples_without_images_and_with_two_images_in_one_batch(method):
    from lvlm_models import B, C, qwen_inputs, tiny_qwen
    model = tiny_qwen("qwen2")
    inputs = qwen_inputs([B, C])
    with vlmeff.patch(model, method, keep=4) as patch:
        out = logits(model, inputs)
        assert patch.stats["visual_tokens"]["LLM input"] == [16, 0]
        assert patch.stats["visual_tokens"]["after LLM layer 1"] == [4, 0]
        text_alone = logits(model, qwen_inputs([C]))
    torch.testing.assert_close(out[1, -1], text_alone[0, -1], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llava", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ON_THE_CALLERS_PROMPT)
def test_loss_with_labels_is_the_cross_entropy_of_the_reduced_sequence(family, method):
    """Labels on every text token and on the placeholders too (the hardest case: dropped tokens have labels).
    Oracle: the reduced sequence is the kept columns; each kept token predicts the next kept one."""
    model, inputs = setup_any(family)
    inputs = labelled(inputs)
    ids = inputs["input_ids"]
    inputs["labels"] = ids.masked_fill(inputs["attention_mask"] == 0, -100)
    caller_labels = inputs["labels"].clone()
    with vlmeff.patch(model, method, **PRUNED[method]) as patch, torch.no_grad():
        out = model(**inputs)
        kept = patch.stats["llm_kept"]
    assert torch.equal(inputs["labels"], caller_labels)                  # the caller's tensor is untouched
    per_token, targets = [], []
    for b in range(ids.shape[0]):
        columns = kept[b].nonzero()[:, 0]
        per_token.append(out.logits[b, columns[:-1]])
        targets.append(caller_labels[b, columns[1:]])
    oracle = torch.nn.functional.cross_entropy(torch.cat(per_token).float(), torch.cat(targets), ignore_index=-100)
    torch.testing.assert_close(out.loss, oracle, atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        ref = model(**inputs).loss
        with vlmeff.patch(model, "fastv", keep=1.0):
            assert torch.equal(model(**inputs).loss, ref)


def test_follow_up_turn_continues_on_the_pruned_cache():
    """Turn 2 on the returned cache equals the oracle run on the full conversation with turn 1's kept tokens."""
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "fastv", keep=0.25) as patch:
        first = generate(model, inputs, return_dict_in_generate=True)
        kept = patch.stats["llm_kept"]
        ids2 = torch.cat([first.sequences, torch.tensor([[7, 8], [9, 10]])], dim=1)
        mask2 = torch.cat([inputs["attention_mask"], torch.ones(2, ids2.shape[1] - kept.shape[1], dtype=torch.long)],
                          dim=1)
        second = generate(model, dict(input_ids=ids2, attention_mask=mask2), cache=first.cache,
                          return_dict_in_generate=True, output_logits=True)
    grown = torch.cat([kept, torch.ones(2, ids2.shape[1] - kept.shape[1], dtype=torch.bool)], dim=1)
    turn2 = dict(input_ids=ids2, attention_mask=mask2, pixel_values=inputs["pixel_values"])
    # the oracle numbers positions like generate does: attended tokens from 0
    turn2["position_ids"] = (mask2.cumsum(1) - 1).clamp(min=0)
    torch.testing.assert_close(second.logits[0], oracle_logits(model, turn2, grown, 1), atol=2e-5, rtol=1e-5)


def test_decoding_on_the_pruned_cache_reads_the_host_as_unpatched():
    """A decode step: the added work is the stage masks, no host read."""
    model, inputs = setup_any("llava")

    def step_syncs():
        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            with OpCounter() as counter:
                model(input_ids=torch.tensor([[5], [6]]), attention_mask=mask, cache=out.cache)
        return counter.syncs

    base = step_syncs()
    with vlmeff.patch(model, "fastv", keep=0.25):
        assert step_syncs() == base


def test_prefill_adds_one_host_read():
    model, inputs = setup_any("llava")
    with OpCounter() as base, torch.no_grad():
        model(**inputs)
    with vlmeff.patch(model, "fastv", keep=0.25), OpCounter() as patched, torch.no_grad():
        model(**inputs)
    assert patched.syncs - base.syncs == 1


# -- FLOPs ------------------------------------------------------------------------------------------------------
def test_prefill_flops_match_torch_flop_counter():
    """The stats' FastV count equals torch's count of the decoder layers' matmuls (batch 1, no padding), up to the
    one scoring row. Eager attention: torch counts its attention matmuls (CPU SDPA is not counted)."""
    model = tiny_llava()
    model.set_attn_implementation({"text_config": "eager"})
    inputs = single(setup_any("llava")[1])
    with vlmeff.patch(model, "fastv", keep=4) as patch, torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model(**inputs)
        stats = patch.stats
    counts = counter.get_flop_counts()
    layers = sum(sum(v.values()) for k, v in counts.items() if ".layers." in k and k.count(".") == 4)
    assert stats["prefill_flops"] == staged_prefill_flops(model.config.text_config, inputs["input_ids"].shape[1],
                                                          [(1, 12)])
    assert abs(layers - stats["prefill_flops"]) / stats["prefill_flops"] < 0.01


def test_staged_flops_by_hand():
    from vlmeff.flops import layer_flops, llm_dims
    cfg = tiny_llava().config.text_config
    _, dim, attn, kv, mlp, mats = llm_dims(cfg)
    one = lambda n: layer_flops(n, dim, attn, mlp, mats, kv_dim=kv)  # noqa: E731
    assert staged_prefill_flops(cfg, 30, [(1, 10), (3, 5)]) == one(30) + 2 * one(20) + one(15)


def test_pdrop_keep_is_the_average_share_over_the_layers():
    """keep=0.5 with stages at layers 1, 2, 3 of 4: lambda solves (1 + l + l^2 + l^3) / 4 = 0.5."""
    ratios = stages.average_budget_ratios(0.5, [1, 2, 3], 4)
    lam = ratios[0]
    assert abs((1 + lam + lam ** 2 + lam ** 3) / 4 - 0.5) < 1e-12 and ratios[2] == pytest.approx(lam ** 3)
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "pdrop", keep=0.5) as patch:
        logits(model, inputs)
    kept = [patch.stats["visual_tokens"][f"after LLM layer {i}"][0] for i in (1, 2, 3)]
    assert kept == [max(1, round(16 * r)) for r in ratios]


def test_eval_counts_of_an_in_llm_method_are_per_layer():
    from vlmeff.eval.efficiency import example_counts, mean_over_layers
    assert mean_over_layers(16, [(1, 12)], 4) == (16 + 3 * 4) / 4
    assert mean_over_layers(16, [], 4) == 16
    model, inputs = setup_any("llava")
    cfg = model.config.text_config
    with vlmeff.patch(model, "fastv", keep=4) as patch:
        logits(model, inputs)
    counts = example_counts(inputs, [1, 1], IMAGE, patch.stats, cfg, 4)
    assert [c["visual_tokens"] for c in counts] == [7.0, 7.0]
    assert sum(c["prefill_flops"] for c in counts) == patch.stats["prefill_flops"]
    assert sum(c["kv_cache_bytes"] for c in counts) == patch.stats["kv_cache_bytes"]
    assert sum(c["prefill_flops_unpatched"] for c in counts) == patch.stats["prefill_flops_unpatched"]


def test_method_specs_keep_list_values_whole():
    from vlmeff.eval.sweep import parse_method_spec
    assert parse_method_spec("pdrop:layers=[1,3,5],ratios=(0.5,0.25,0.1)") == (
        "pdrop", {"layers": [1, 3, 5], "ratios": (0.5, 0.25, 0.1)})
    assert parse_method_spec("debiased:base=pdrop,schedule=runs/a.json") == (
        "debiased", {"base": "pdrop", "schedule": "runs/a.json"})
    from vlmeff.eval.sweep import plan, stages_of
    assert stages_of("cls:keep=128+fastv:layer=2", 0.5) == [("cls", {"keep": 128}),
                                                            ("fastv", {"keep": 0.5, "layer": 2})]
    with pytest.raises(TypeError, match="method 'fastv' got unknown option"):
        plan(["cls:keep=128+fastv:layr=2"], [0.5])


# -- composition ------------------------------------------------------------------------------------------------
def test_composition_of_a_vision_side_and_an_llm_side_method():
    model, inputs = setup_any("llava")
    ref = logits(model, inputs)
    ref_tokens = generate(model, inputs)
    with vlmeff.patch(model, [("cls", {"keep": 8}), ("fastv", {"keep": 0.5})]) as patch:
        out = logits(model, inputs)
        tokens = patch.stats["visual_tokens"]
        assert tokens["before LLM"] == [8, 8] and tokens["LLM input"] == [8, 8]
        assert tokens["after LLM layer 1"] == [4, 4]
        assert patch.stats["prefill_flops"] < patch.stats["prefill_flops_unpatched"]
        assert patch.config["method"] == "cls+fastv" and len(patch.config["stages"]) == 2
        generate(model, inputs)
    assert not torch.allclose(out[:, -1], ref[:, -1])
    with vlmeff.patch(model, [("cls", {"keep": 1.0}), ("fastv", {"keep": 1.0})]):
        assert torch.equal(logits(model, inputs), ref)
        assert torch.equal(generate(model, inputs), ref_tokens)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(generate(model, inputs), ref_tokens)
    assert "forward" not in vars(model) and "generate" not in vars(model)


def test_composition_errors():
    model, inputs = setup_any("llava")
    with pytest.raises(ValueError, match="one method per site"):
        vlmeff.patch(model, [("fastv", {"keep": 0.5}), ("pdrop", {})])
    with pytest.raises(TypeError, match="give each its keep"):
        vlmeff.patch(model, [("fastv", {"keep": 0.5})], keep=0.5)
    with pytest.raises(TypeError, match="pair"):
        vlmeff.patch(model, [("fastv", 0.5)])
    assert torch.equal(logits(model, inputs), logits(tiny_llava(), inputs))


# -- options and errors -----------------------------------------------------------------------------------------
def test_layer_defaults_scale_with_depth_and_explicit_settings_win():
    assert [stages.scale_layer(2, d) for d in (2, 8, 32, 40)] == [1, 1, 2, 3]
    assert stages.scaled_pdrop(32) == ((8, 16, 24), (0.5, 0.25, 0.125))
    assert stages.scaled_pdrop(8) == ((2, 4, 6), (0.5, 0.25, 0.125))
    assert stages.scaled_pdrop(4) == ((1, 2, 3), (0.5, 0.25, 0.125))
    assert stages.scaled_pdrop(2) == ((1,), (0.125,))               # three stages on one layer: the smallest budget
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "fastv", keep=0.5, layer=3) as patch:
        logits(model, inputs)
        assert "after LLM layer 3" in patch.stats["visual_tokens"]
    with vlmeff.patch(model, "pdrop", layers=[1, 3], ratios=[0.5, 0.25]) as patch:
        logits(model, inputs)
        assert patch.stats["visual_tokens"]["after LLM layer 3"] == [4, 4]


@pytest.mark.parametrize("method, kwargs, error, words", [
    ("fastv", {}, ValueError, "needs keep"),
    ("pdrop", dict(keep=4), ValueError, "no token count"),
    ("pdrop", dict(keep=0.5, ratios=[0.5, 0.2, 0.1]), ValueError, "not both"),
    ("pdrop", dict(keep=0.2), ValueError, "below 0.25 is out of reach"),
    ("fastv", dict(keep=0.5, layer=0), ValueError, r"layer=0 .*\[1, 3\]"),
    ("fastv", dict(keep=0.5, layer=4), ValueError, "layer=4"),
    ("fastv", dict(keep=0.5, layer=1.5), TypeError, "layer=1.5"),
    ("pdrop", dict(layers=[2, 1]), ValueError, "increasing"),
    ("pdrop", dict(layers=[1, 2], ratios=[0.5]), ValueError, "2 non-increasing"),
    ("pdrop", dict(ratios=[0.5, 0.6, 0.1]), ValueError, "non-increasing"),
    ("debiased", dict(keep=0.5), ValueError, "schedule=None"),
    ("debiased", dict(base="pdrop", layer=2, schedule="llava-1.5"), ValueError, "None only"),
    ("debiased", dict(keep=0.5, schedule="nowhere.json"), ValueError, "neither a file nor a preset"),
    ("debiased", dict(base="pdrop", schedule="llava-1.5"), ValueError, "reference's fastv trend"),
])
def test_bad_options_are_clear_errors(method, kwargs, error, words):
    model, inputs = setup_any("llava")
    with pytest.raises(error, match=words):
        vlmeff.patch(model, method, **kwargs)
    assert not hasattr(model, "_vlmeff_patch") and "forward" not in vars(model)


def test_unsupported_families_and_modes_are_clear_errors():
    model, _ = setup_any("gemma3")
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        vlmeff.patch(model, "fastv", keep=0.5)
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "fastv", keep=0.5), pytest.raises(ValueError, match="assisted"):
        model.generate(**single(inputs), prompt_lookup_num_tokens=2, max_new_tokens=2)
    with vlmeff.patch(model, "fastv", keep=0.5), pytest.raises(ValueError, match="DynamicCache"):
        model.generate(**inputs, max_new_tokens=2, cache_implementation="static")


def test_qwen3_deepstack_layers_keep_every_token():
    model, inputs = setup_any("qwen3")                    # deepstack after layers 0 and 1: pruning from layer 2
    with pytest.raises(ValueError, match=r"layer=1 .*\[2, 2\]"):
        vlmeff.patch(model, "fastv", keep=0.5, layer=1)
    with vlmeff.patch(model, "fastv", keep=0.5) as patch:
        logits(model, inputs)
        assert "after LLM layer 2" in patch.stats["visual_tokens"]


# -- Attention Debiasing ----------------------------------------------------------------------------------------
def test_debiasing_by_hand():
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    ordinals = torch.tensor([[0, 1, 2, 3]])
    # 1 / w = 1 + i: w = 1, 1/2, 1/3, 1/4
    out = debias.debiased(scores, ordinals, "cubic", [1.0, 1.0, 0.0, 0.0], positions=4)
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.15, 0.2 / 3, 0.025]]))
    # exp(b i), b = ln 2: w = 1, 1/2, 1/4, 1/8; ordinals past the fitted range take the last one's weight
    out = debias.debiased(scores, torch.tensor([[0, 1, 2, 9]]), "exponential", [1.0, 0.6931471805599453],
                          positions=3)
    torch.testing.assert_close(out, torch.tensor([[0.4, 0.15, 0.05, 0.025]]))


def test_published_llava_polynomial():
    preset = debias.PRESETS["llava-1.5"]
    assert preset["coefficients"] == [1.0, 3.015e-3, -1.46e-5, 2.569e-8] and preset["positions"] == 576
    # 1 / w at the last of LLaVA-1.5's 576 tokens: 1 + 3.015e-3 * 575 - 1.46e-5 * 575^2 + 2.569e-8 * 575^3
    inv = debias.trend("cubic", preset["coefficients"], torch.tensor(575.0, dtype=torch.float64))
    assert abs(float(inv) - (1 + 1.733625 - 4.827125 + 4.883909843750)) < 1e-9


def test_fit_recovers_known_trends():
    i = torch.arange(64, dtype=torch.float64).numpy()
    cubic = 2.0 * (1 + 0.01 * i - 2e-4 * i ** 2 + 3e-6 * i ** 3)
    assert torch.allclose(torch.tensor(debias.fit_trend(cubic, "cubic"), dtype=torch.float64),
                          torch.tensor([1.0, 0.01, -2e-4, 3e-6], dtype=torch.float64), atol=1e-9)
    exponential = 0.3 * torch.exp(torch.tensor(0.02 * i)).numpy()
    assert abs(debias.fit_trend(exponential, "exponential")[1] - 0.02) < 1e-9


def calibration_batches(model):
    inputs = setup_any("llava")[1]
    return [inputs, dict(inputs, pixel_values=torch.flip(inputs["pixel_values"], dims=[0]))]


def test_calibration_file_round_trips_and_debiasing_changes_the_ranking(tmp_path):
    model, inputs = setup_any("llava")
    path = tmp_path / "debias.json"
    schedule = vlmeff.calibrate(model, calibration_batches(model), method="debiased", base="fastv", path=path,
                                progress=False)
    saved = json.loads(path.read_text())
    assert saved == schedule
    assert saved["method"] == "debiased" and saved["base"] == "fastv" and saved["positions"] == 16
    assert saved["vlmeff_version"] == vlmeff.__version__ and saved["model"]["layers"] == 4
    assert saved["coefficients"][0] == 1.0 and len(saved["coefficients"]) == 4
    # the mean attention per position is the calibration data's: recompute it from the eager oracle
    rows = eager_rows(model, inputs)[0]
    visual = inputs["input_ids"] == IMAGE
    flipped = eager_rows(model, dict(inputs, pixel_values=torch.flip(inputs["pixel_values"], dims=[0])))[0]
    mean = torch.stack([rows[visual].view(2, 16), flipped[visual].view(2, 16)]).mean(dim=(0, 1))
    torch.testing.assert_close(torch.tensor(saved["mean_attention"]), mean, atol=1e-6, rtol=1e-5)
    with vlmeff.patch(model, "debiased", keep=5, schedule=path) as patch:
        logits(model, inputs)
        debiased_kept = patch.stats["llm_kept"]
        assert patch.config["schedule"]["coefficients"] == saved["coefficients"]
    with vlmeff.patch(model, "debiased", keep=5, schedule=saved):
        logits(model, inputs)
    with vlmeff.patch(model, "fastv", keep=5) as patch:
        logits(model, inputs)
        plain_kept = patch.stats["llm_kept"]
    weights = 1 / debias.trend("cubic", saved["coefficients"], torch.arange(16.0))
    for b in range(2):
        expected = (rows[b][visual[b]] * weights).topk(5).indices
        assert set(expected.tolist()) == set(debiased_kept[b][visual[b]].nonzero()[:, 0].tolist())
    assert debiased_kept.shape == plain_kept.shape


def test_schedule_for_another_model_or_method_is_refused(tmp_path):
    model, _ = setup_any("llava")
    schedule = vlmeff.calibrate(model, calibration_batches(model), method="debiased", progress=False)
    other = tiny_llava()
    with torch.no_grad():
        other.get_input_embeddings().weight.mul_(1.5)
    with pytest.raises(ValueError, match="another model .*embedding_checksum"):
        vlmeff.patch(other, "debiased", keep=0.5, schedule=schedule)
    with pytest.raises(ValueError, match="fitted on base 'fastv'"):
        vlmeff.patch(model, "debiased", base="pdrop", schedule=schedule)
    with pytest.raises(ValueError, match="decoder layer 0; this patch scores at layer 1"):
        vlmeff.patch(model, "debiased", keep=0.5, layer=2, schedule=schedule)
    with pytest.raises(ValueError, match="for method 'modes'"):
        vlmeff.patch(model, "debiased", keep=0.5, schedule=dict(schedule, method="modes"))
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not a vlmeff calibration file"):
        vlmeff.patch(model, "debiased", keep=0.5, schedule=broken)
    for bad in (dict(trend="quartic"), dict(trend="exponential", coefficients=[1.0]), dict(coefficients=[]),
                dict(positions=0), dict(coefficients=[1.0, -1.0])):      # the last: not positive over 16 positions
        with pytest.raises(ValueError, match="malformed"):
            vlmeff.patch(model, "debiased", keep=0.5, schedule=dict(schedule, **bad))
    with pytest.raises(ValueError, match="vlmeff.calibrate fits"):
        vlmeff.calibrate(model, [], method="fastv")


def test_calibration_is_deterministic_and_pdrop_uses_an_exponential():
    model, _ = setup_any("llava")
    data = calibration_batches(model)
    a = vlmeff.calibrate(model, data, method="debiased", progress=False)
    b = vlmeff.calibrate(model, data, method="debiased", progress=False)
    assert a == b
    p = vlmeff.calibrate(model, data, method="debiased", base="pdrop", progress=False)
    assert p["trend"] == "exponential" and len(p["coefficients"]) == 2 and p["score_layer"] == 1
    with vlmeff.patch(model, "debiased", base="pdrop", schedule=p) as patch:
        logits(model, data[0])
        assert patch.stats["visual_tokens"]["after LLM layer 3"] == [2, 2]


def test_debiased_preset_runs_on_llava():
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "debiased", keep=0.5, schedule="llava-1.5") as patch:
        logits(model, inputs)
        assert patch.config["schedule"]["preset"] == "llava-1.5"


def test_continuation_with_masked_new_tokens_equals_the_oracle():
    """A forward on the pruned cache whose new columns are partly masked (sample 0 ignores its first new token):
    the stage layers' masks carry the caller's mask of the new columns."""
    model, inputs = setup_any("llava")
    new = torch.tensor([[7, 8], [9, 10]])
    grown_mask = torch.cat([inputs["attention_mask"], torch.tensor([[0, 1], [1, 1]])], dim=1)
    with vlmeff.patch(model, "fastv", keep=0.25) as patch, torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        kept = patch.stats["llm_kept"]
        out = model(input_ids=new, attention_mask=grown_mask, cache=prefill.cache).logits[:, -1]
    full = dict(input_ids=torch.cat([inputs["input_ids"], new], dim=1), attention_mask=grown_mask,
                pixel_values=inputs["pixel_values"])
    grown = torch.cat([kept, torch.ones(2, 2, dtype=torch.bool)], dim=1)
    torch.testing.assert_close(out, oracle_logits(model, full, grown, 1), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["fastv", "sparsevlm"])
def test_a_generated_placeholder_id_is_no_visual_token_when_generate_recomputes(method):
    """generate(use_cache=False) re-reads the tokens it generated: one that is the video placeholder id (forced here)
    must not join the visual tokens (or shift SparseVLM's text raters), as the cached run never prunes it."""
    from transformers import LogitsProcessor, LogitsProcessorList
    from lvlm_models import VIDEO

    class ForceFirst(LogitsProcessor):
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt_length:
                scores = torch.full_like(scores, float("-inf"))
                scores[:, VIDEO] = 0.0
            return scores

    model, inputs = setup_any("qwen2")
    prompt_length = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True,
              logits_processor=LogitsProcessorList([ForceFirst()]))
    with vlmeff.patch(model, method, **PRUNED[method]), torch.no_grad():
        cached = model.generate(**inputs, **kw)
        recomputed = model.generate(**inputs, use_cache=False, **kw)
    assert (cached.sequences[:, prompt_length] == VIDEO).all()
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("method, kwargs, launches", [
    ("fastv", dict(keep=1.0), 33),        # the plan and the scoring row only: nothing to drop, the layout stays
    ("fastv", dict(keep=0.25), 88),       # + selection, compaction, gathers, the stage mask, spreading back
    ("pdrop", {}, 272),                   # three stages, each scoring at its own layer (norm, q / k projections)
    ("dart", dict(keep=1.0), 21),         # the plan only: nothing to drop, no pivots
    ("dart", dict(keep=0.25), 114),       # + pivots, similarities, one topk round per pivot, then as fastv
    ("sparsevlm", {}, 367),               # raters, two stages scored by their rows, recycling by DPC-kNN
])
def test_prefill_launch_counts_are_pinned(method, kwargs, launches):
    """Ops a patch adds to a prefill of tiny LLaVA (the GPU path counts launches: each costs microseconds)."""
    from opcount import count_ops
    model, inputs = setup_any("llava")

    def run():
        with torch.no_grad():
            model(**inputs)

    run()
    base = count_ops(run)[1]
    with vlmeff.patch(model, method, **kwargs):
        run()
        patched = count_ops(run)[1]
    assert (patched.total - base.total, patched.syncs - base.syncs) == (launches, 1)


@pytest.mark.parametrize("name", ["tiny-llava-evqa", "tiny-llava-moe-evqa"])
@pytest.mark.parametrize("method, full, pruned, kept", [
    ("fastv", dict(keep=1.0), dict(keep=0.25), 64),
    ("transition", dict(ratios=[1.0]), dict(keep=0.75), 128),     # one stage keeping 0.5: the layers see 0.75
])
def test_bundled_models_full_budget_and_pruned(name, method, full, pruned, kept):
    """The embedded models (Llama and Qwen3-MoE LMs, 2 layers: K = 1): full budget is the unpatched model, a
    pruned call keeps `kept` of their 256 visual tokens from layer 1 on, and the undo is exact."""
    from vlmeff.data import easyvqa
    model, processor = vlmeff.zoo.load(name)
    questions, _, image_ids = easyvqa.questions("train")
    image = easyvqa.load_images("train")[image_ids[0]]
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": questions[0]}]}]]
    inputs = processor(images=[image], text=processor.apply_chat_template(messages, add_generation_prompt=True),
                       return_tensors="pt")
    ref = generate(model, inputs)
    with vlmeff.patch(model, method, **full):
        assert torch.equal(generate(model, inputs), ref)
    with vlmeff.patch(model, method, **pruned) as patch:
        generate(model, inputs)
        assert patch.stats["visual_tokens"] == {"LLM input": [256], "after LLM layer 1": [kept]}
    assert torch.equal(generate(model, inputs), ref)


def test_qwen3_vl_moe():
    """The MoE decoder of Qwen3-VL-MoE (deepstack, M-RoPE): cached generation equals recomputation, full budget
    equals unpatched."""
    from lvlm_models import A, B, qwen_inputs, tiny_qwen
    model = tiny_qwen("qwen3_moe")
    inputs = qwen_inputs([A, B])
    ref = generate(model, inputs)
    kw = dict(return_dict_in_generate=True, output_logits=True)
    with vlmeff.patch(model, "fastv", keep=1.0):
        assert torch.equal(generate(model, inputs), ref)
    with vlmeff.patch(model, "fastv", keep=0.25) as patch:
        cached = generate(model, inputs, **kw)
        recomputed = generate(model, inputs, use_cache=False, **kw)
        assert patch.stats["visual_tokens"]["after LLM layer 2"] == [4, 4]
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("method, options", [("fastv", dict(keep=0.25)), ("transition", {}), ("infoflow", {}),
                                             ("dart", dict(keep=0.25)), ("sparsevlm", {})])
def test_torch_compile_of_a_patched_model_equals_eager(method, options):
    """Patch, then compile: the compiled forward prunes like eager; the patch adds one graph break to the
    model's own (the prefill's host read), none while decoding."""
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, method, **options):
        eager = logits(model, inputs)
        torch._dynamo.reset()
        compiled = logits(torch.compile(model), inputs)
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


# -- edge cases a review found ----------------------------------------------------------------------------------
def test_loss_when_the_prompt_starts_with_dropped_image_tokens():
    """No BOS: column 0 is a placeholder and may be dropped; the first kept token then has no predecessor in the
    reduced sequence, so its label is no target (the oracle's cross-entropy starts at the second kept token)."""
    from lvlm_models import batch, pixels, prompt
    model = tiny_llava()
    ids, mask = batch([prompt([], 1, [7, 8, 9, 10, 11]), prompt([1, 5], 1, [7, 8])])     # sample 0: no padding
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2), labels=ids.masked_fill(mask == 0, -100))
    with vlmeff.patch(model, "fastv", keep=0.25) as patch, torch.no_grad():
        out = model(**inputs)
        kept = patch.stats["llm_kept"]
    per_token, targets = [], []
    for b in range(2):
        columns = kept[b].nonzero()[:, 0]         # the caller's padding included, as the unpatched loss sees it
        per_token.append(out.logits[b, columns[:-1]])
        targets.append(inputs["labels"][b, columns[1:]])
    oracle = torch.nn.functional.cross_entropy(torch.cat(per_token).float(), torch.cat(targets), ignore_index=-100)
    torch.testing.assert_close(out.loss, oracle, atol=1e-6, rtol=1e-6)


def test_an_all_padding_row_and_numpy_budgets():
    import numpy as np
    model, inputs = setup_any("llava")
    alone = dict(single(inputs))
    padded = dict(input_ids=torch.cat([inputs["input_ids"][:1], torch.zeros_like(inputs["input_ids"][:1])]),
                  attention_mask=torch.cat([inputs["attention_mask"][:1],
                                            torch.zeros_like(inputs["attention_mask"][:1])]),
                  pixel_values=inputs["pixel_values"][:1])
    with vlmeff.patch(model, "fastv", keep=np.int64(100)) as patch:      # more than the 16: all kept
        logits(model, inputs)
        assert patch.stats["visual_tokens"]["after LLM layer 1"] == [16, 16]
    with vlmeff.patch(model, "fastv", keep=4):
        torch.testing.assert_close(logits(model, padded)[0, -1], logits(model, alone)[0, -1], atol=2e-5, rtol=1e-5)


def test_a_direct_language_model_call_after_a_vlm_call_is_not_pruned():
    model, inputs = setup_any("llava")
    lm = model.model.language_model
    embeds = torch.randn(2, inputs["input_ids"].shape[1], 64)
    with torch.no_grad():
        ref = lm(inputs_embeds=embeds).last_hidden_state
        with vlmeff.patch(model, "fastv", keep=4):
            model(**inputs)
            assert torch.equal(lm(inputs_embeds=embeds).last_hidden_state, ref)


def test_generate_inputs_keyword_and_stats_without_cache():
    """generate(inputs=...) keeps the prompt's query when recomputing; stats describe the prompt's prefill."""
    model, inputs = setup_any("llava")
    kw = dict(return_dict_in_generate=True, output_logits=True)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    with vlmeff.patch(model, "fastv", keep=0.25) as patch:
        cached = generate(model, inputs, **kw)
        cached_stats = dict(patch.stats)
        recomputed = generate(model, dict(rest, inputs=inputs["input_ids"]), use_cache=False, **kw)
        for key in ("prefill_flops", "prefill_flops_unpatched", "kv_cache_bytes", "kv_cache_bytes_unpatched"):
            assert patch.stats[key] == cached_stats[key]
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=2e-5, rtol=1e-5)


def test_ordinals_restart_at_each_image():
    from lvlm_models import B, qwen_inputs, tiny_qwen
    model = tiny_qwen("qwen2")
    with vlmeff.patch(model, "fastv", keep=1.0) as patch:
        logits(model, qwen_inputs([B]))
        (stage,) = patch.stats["llm_scores"]
    assert stage.ordinals[stage.visual].tolist() == list(range(8)) * 2       # two images of 8 tokens


def test_calibration_skips_batches_without_images():
    from lvlm_models import C, qwen_inputs, tiny_qwen
    model = tiny_qwen("qwen2")
    with pytest.raises(ValueError, match="holds no images"):
        vlmeff.calibrate(model, [qwen_inputs([C])], method="debiased", progress=False)


# -- survivors of a mutation run (tools/mutation.sh 'vlmeff.engine.llm.*' ...) -------------------------------------
def staged_oracle(model, inputs, stages):
    """Last-token logits [B, V] of PyramidDrop computed without vlmeff: each sample alone, at each stage layer
    (layer, kept count) the last token's head-mean attention over the current tokens, materialised from the layer's
    q / k with transformers' own `apply_rotary_pos_emb` / `repeat_kv`, ranks the visual tokens."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
    lm = model.model.language_model
    with Recorder(lm) as rec, torch.no_grad():
        model(**inputs)
    embeds = rec.kwargs["inputs_embeds"]
    out = []
    with torch.no_grad():
        for b in range(embeds.shape[0]):
            columns = inputs["attention_mask"][b].bool()
            h, pos = embeds[b:b + 1, columns], torch.arange(embeds.shape[1])[None, columns]
            visual = inputs["input_ids"][b, columns] == IMAGE
            for i, layer in enumerate(lm.layers):
                rope = lm.rotary_emb(h, pos)
                for stage_layer, kept in stages:
                    if stage_layer == i and int(visual.sum()) > kept[b]:
                        attn, normed = layer.self_attn, layer.input_layernorm(h)
                        q = attn.q_proj(normed).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
                        k = attn.k_proj(normed).unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
                        q, k = apply_rotary_pos_emb(q, k, *rope)
                        row = (q[:, :, -1:] @ repeat_kv(k, attn.num_key_value_groups).transpose(-1, -2)
                               * attn.scaling).softmax(-1)[0, :, 0].mean(0)
                        keep = ~visual
                        keep[row.masked_fill(~visual, -1).topk(kept[b]).indices] = True
                        h, pos, visual = h[:, keep], pos[:, keep], visual[keep]
                        rope = lm.rotary_emb(h, pos)
                h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=None)
            out.append(model.lm_head(lm.norm(h))[0, -1])
    return torch.stack(out)


def test_pdrop_stages_with_new_pad_slots_equal_the_oracle():
    """Three stages on a batch whose samples keep different counts (one image: 16 visual tokens, two: 32), so the
    second and third stages work on a layout that already has pad slots (the caller's padding, kept as columns,
    and the first stage's new ones)."""
    from lvlm_models import batch, pixels, prompt
    model = tiny_llava()
    ids, mask = batch([prompt([1, 5, 6, 7, 8, 9], 1, [7, 8]), prompt([1], 2, [7])])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3))
    layers = model.model.language_model.layers
    with vlmeff.patch(model, "pdrop", layers=[1, 2, 3], ratios=[0.5, 0.25, 0.125]) as patch, \
            Recorder(layers[2]) as second, Recorder(layers[3]) as third:
        out = logits(model, inputs)[:, -1]
        assert patch.stats["visual_tokens"]["after LLM layer 3"] == [2, 4]
        first_stage, second_stage, _ = patch.stats["llm_scores"]
    # each layer gets the stage's layout (after its own stage's pruning), as long as the sample with the fewest
    # drops (the one-image sample: 8, 4, 2), the caller's padding counting as columns
    L = ids.shape[1]
    assert second.args[0].shape[1] == L - 8 - 4 and third.args[0].shape[1] == L - 8 - 4 - 2
    # a later stage's visual columns keep their ordinals of the LLM input: 8 and 16 of the first stage's kept ones
    for b, n in enumerate([8, 16]):
        later = second_stage.ordinals[b][second_stage.visual[b]]
        earlier = first_stage.ordinals[b][first_stage.visual[b]]
        assert later.numel() == n and set(later.tolist()) <= set(earlier.tolist())
    stages_kept = [(1, [8, 16]), (2, [4, 8]), (3, [2, 4])]
    torch.testing.assert_close(out, staged_oracle(model, inputs, stages_kept), atol=2e-5, rtol=1e-5)


def test_text_only_prefill_stats_and_decoding_without_a_mask():
    from vlmeff.flops import kv_cache_bytes, llm_prefill_flops
    model, inputs = setup_any("llava")
    cfg = model.config.text_config
    text = dict(input_ids=torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]]),
                attention_mask=torch.ones(2, 4, dtype=torch.long))
    with vlmeff.patch(model, "fastv", keep=4) as patch:
        logits(model, text)
        assert patch.stats == {"visual_tokens": {"LLM input": [0, 0]}, "llm_stages": [],
                               "prefill_flops": 2 * llm_prefill_flops(cfg, 4), "flops": 2 * llm_prefill_flops(cfg, 4),
                               "prefill_flops_unpatched": 2 * llm_prefill_flops(cfg, 4),
                               "flops_unpatched": 2 * llm_prefill_flops(cfg, 4),
                               "kv_cache_bytes": 2 * kv_cache_bytes(cfg, 4, 4),
                               "kv_cache_bytes_unpatched": 2 * kv_cache_bytes(cfg, 4, 4)}
        # two samples of one length, no mask at all: prefill and a decode step on the pruned cache
        same = dict(input_ids=inputs["input_ids"][:1].repeat(2, 1)[:, 1:], pixel_values=inputs["pixel_values"])
        with torch.no_grad():
            prefill = model(**same, use_cache=True)
            kept = patch.stats["llm_kept"]
            step = model(input_ids=torch.tensor([[5], [6]]), cache=prefill.cache).logits[:, -1]
    full = dict(input_ids=torch.cat([same["input_ids"], torch.tensor([[5], [6]])], 1),
                attention_mask=torch.ones(2, same["input_ids"].shape[1] + 1, dtype=torch.long),
                pixel_values=same["pixel_values"])
    grown = torch.cat([kept, torch.ones(2, 1, dtype=torch.bool)], 1)
    torch.testing.assert_close(step, oracle_logits(model, full, grown, 1), atol=2e-5, rtol=1e-5)


def test_stage_arithmetic_by_hand():
    assert stages.default_ratios(3) == (0.5, 0.25, 0.125)
    assert stages.average_share([0.5, 0.25], [1, 3], 8) == (1 + 0.5 * 2 + 0.25 * 5) / 8
    with pytest.raises(ValueError, match="below 0.125 is out of reach with stages from layer 1 of 8"):
        stages.average_budget_ratios(0.125, [1, 3], 8)             # exactly the floor: lambda would be 0
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "pdrop", layers=[1, 3]) as patch:
        assert patch.config["ratios"] == [0.5, 0.25]


def test_debias_functions_by_hand():
    import numpy as np
    assert debias.trend("exponential", [1.0, 0.5], np.array([2.0]))[0] == pytest.approx(np.e)
    assert debias.trend("exponential", [1.0, 0.5], torch.tensor([2.0]))[0].item() == pytest.approx(np.e)
    i = np.arange(32, dtype=np.float64)
    assert debias.fit_trend(0.3 * np.exp(0.05 * i), "exponential") == [1.0, pytest.approx(0.05)]
    with pytest.raises(ValueError, match="not positive over the visual positions"):
        debias.fit_trend(1 - i / 10, "cubic")                    # falls through zero at i = 10
    reweight = debias.recency_reweighter({"schedule": dict(trend="cubic", coefficients=[1.0, 1.0], positions=4)})
    scores, ordinals = torch.tensor([[0.4, 0.4]]), torch.tensor([[0, 1]])
    torch.testing.assert_close(reweight(scores, ordinals, 0), torch.tensor([[0.4, 0.2]]))
    assert torch.equal(reweight(scores, ordinals, 1), scores)    # later stages rank raw scores
    exponential = debias.recency_reweighter({"schedule": dict(trend="exponential", coefficients=[1.0, np.log(2)],
                                                              positions=4)})
    torch.testing.assert_close(exponential(scores, ordinals, 0), torch.tensor([[0.4, 0.2]]))


def test_stats_of_a_pruned_prefill_by_hand():
    """FastV keep=4 on tiny LLaVA (4 layers, K = 1), two samples of 23 and 25 attended tokens with 16 visual each:
    layer 0 sees 23 / 25 tokens, layers 1-3 see 11 / 13."""
    from vlmeff.flops import layer_flops, llm_dims
    model, inputs = setup_any("llava")
    cfg = model.config.text_config
    _, dim, attn, kv, mlp, mats = llm_dims(cfg)

    def layer(n):
        return layer_flops(n, dim, attn, mlp, mats, kv_dim=kv)

    lengths = inputs["attention_mask"].sum(1).tolist()
    with vlmeff.patch(model, "fastv", keep=4) as patch:
        logits(model, inputs)
    stats = patch.stats
    assert stats["visual_tokens"] == {"LLM input": [16, 16], "after LLM layer 1": [4, 4]}
    assert stats["llm_stages"] == [(1, [4, 4])]
    assert stats["prefill_flops"] == stats["flops"] == sum(layer(n) + 3 * layer(n - 12) for n in lengths)
    assert stats["prefill_flops_unpatched"] == stats["flops_unpatched"] == sum(4 * layer(n) for n in lengths)
    kv_per_token = 2 * kv * 4                                   # K and V, float32
    assert stats["kv_cache_bytes"] == sum(n + 3 * (n - 12) for n in lengths) * kv_per_token
    assert stats["kv_cache_bytes_unpatched"] == sum(4 * n for n in lengths) * kv_per_token


def test_pdrop_stats_by_hand_and_a_one_token_image():
    from lvlm_models import qwen_inputs, tiny_qwen
    from vlmeff.flops import layer_flops, llm_dims
    model, inputs = setup_any("llava")
    _, dim, attn, kv, mlp, mats = llm_dims(model.config.text_config)
    lengths = inputs["attention_mask"].sum(1).tolist()
    with vlmeff.patch(model, "pdrop") as patch:                # layers 1, 2, 3 keep 8, 4, 2 of 16
        logits(model, inputs)
    assert patch.stats["prefill_flops"] == sum(
        sum(layer_flops(m, dim, attn, mlp, mats, kv_dim=kv) for m in (n, n - 8, n - 12, n - 14)) for n in lengths)
    # a 2 x 2-patch image gives Qwen2-VL one visual token: any ratio keeps it (at least one token per sample)
    qwen = tiny_qwen("qwen2")
    with vlmeff.patch(qwen, "fastv", keep=0.25) as patch:
        logits(qwen, qwen_inputs([[[1, 5], (2, 2, 7), [6, 7]]]))
        assert patch.stats["visual_tokens"] == {"LLM input": [1], "after LLM layer 1": [1]}


def test_a_steep_schedule_changes_the_ranking_as_weighted():
    """1 / w = 1 + 10 i: the weights fall 150-fold over 16 tokens, so the debiased choice differs from FastV's and
    is the top of the weighted eager attention row."""
    model, inputs = setup_any("llava")
    schedule = vlmeff.calibrate(model, calibration_batches(model), method="debiased", progress=False)
    steep = dict(schedule, coefficients=[1.0, 10.0])
    rows = eager_rows(model, inputs)[0]
    visual = inputs["input_ids"] == IMAGE
    with vlmeff.patch(model, "fastv", keep=5) as patch:
        logits(model, inputs)
        plain = patch.stats["llm_kept"]
    with vlmeff.patch(model, "debiased", keep=5, schedule=steep) as patch:
        logits(model, inputs)
        debiased_kept = patch.stats["llm_kept"]
    assert not torch.equal(plain, debiased_kept)
    weights = 1 / (1 + 10 * torch.arange(16.0))
    for b in range(2):
        expected = (rows[b][visual[b]] * weights).topk(5).indices
        assert set(expected.tolist()) == set(debiased_kept[b][visual[b]].nonzero()[:, 0].tolist())
