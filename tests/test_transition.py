"""TransPrune (`transition`) on the in-LLM engine, tiny random LVLMs of the LLaVA and Qwen-VL lines and the bundled
models: full budget is the unpatched model in every generate mode; TTV equals the formula on the sublayers' inputs
and outputs captured from the unpatched model; IGA equals eager attention; the pruned forward equals an oracle that
runs each sample's decoder itself (TTV, IGA, top-k, renumbered positions); cache, batch, composition, errors."""
import pytest
import torch
import torch.nn.functional as F

import vlmeff
from lvlm_models import (EVERY_FAMILY, IMAGE, Recorder, generate, language_model_inputs, logits,
                         setup_any, tiny_llava)
from vlmeff.pruners import stages, transition

LLM_FAMILIES = [f for f in EVERY_FAMILY if f != "gemma3"]


def full(model):
    """ratios 1.0 at every default stage of the model: nothing dropped, everything scored."""
    with vlmeff.patch(model, "transition") as patch:
        n = len(patch.config["layers"])
    return dict(ratios=[1.0] * n)


# -- full budget: the unpatched model ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_full_budget_is_identical_and_unpatch_restores(family):
    model, inputs = setup_any(family)
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    with vlmeff.patch(model, "transition", **full(model)) as patch:
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs), ref_tokens)
        assert patch.stats["llm_scores"]                         # it scored
    with vlmeff.patch(model, "transition") as patch:
        pruned = logits(model, inputs)
        assert pruned.shape == ref_logits.shape and not torch.allclose(pruned, ref_logits)
        assert patch.stats["prefill_flops"] < patch.stats["prefill_flops_unpatched"]
    assert torch.equal(logits(model, inputs), ref_logits)
    assert torch.equal(generate(model, inputs), ref_tokens)


# -- the scores: TTV from captured sublayers, IGA from eager attention ---------------------------------------------
def captured_ttv(model, inputs, layers):
    """Per decoder layer in `layers`, TTV [B, L] of the unpatched model by the reference's formula, float64, from
    the inputs and outputs of its attention and MLP captured by hooks (written here, not by vlmeff): softmax over
    each sample's attended tokens."""
    lm = model.model.language_model
    seen, handles = {}, []
    for i in layers:
        for name in ("self_attn", "mlp"):
            def hook(module, args, kwargs, out, key=(i, name)):
                x = (args[0] if args else kwargs["hidden_states"]).double()
                seen[key] = (x, (out[0] if isinstance(out, tuple) else out).double())
            handles.append(getattr(lm.layers[i], name).register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        for h in handles:
            h.remove()
    valid = inputs["attention_mask"].bool()
    out = {}
    for i in layers:
        total = 0
        for name in ("self_attn", "mlp"):
            x, y = seen[i, name]
            change = (1 - F.cosine_similarity(x, y, dim=-1)).exp() * valid
            ratio = torch.where(valid, y.norm(dim=-1) / x.norm(dim=-1), 0)      # padding may embed to 0: 0 / 0
            total = total + ratio * change / change.sum(1, keepdim=True)
        out[i] = total
    return out


def normalised(scores, visual):
    s = scores.double() * visual
    return s / (s.sum(1, keepdim=True) + 1e-8)


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_ttv_equals_the_formula_on_the_unpatched_sublayers(family):
    """At full budget each stage ranks the sum of the TTV of its accumulating layers so far (score='ttv': that
    term alone, sum-normalised over each sample's visual tokens)."""
    model, inputs = setup_any(family)
    with vlmeff.patch(model, "transition", score="ttv", **full(model)) as patch:
        logits(model, inputs)
        layers, accumulate = patch.config["layers"], patch.config["accumulate"]
        scored = patch.stats["llm_scores"]
    ttv = captured_ttv(model, inputs, accumulate)
    visual = inputs["input_ids"] == IMAGE
    for layer, stage in zip(layers, scored):
        expected = sum(ttv[i] for i in accumulate if i < layer)
        torch.testing.assert_close(stage.scores.double(), normalised(expected, visual), atol=1e-6, rtol=1e-5)


def eager_attention(model, inputs):
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": "sdpa"})


@pytest.mark.parametrize("family", LLM_FAMILIES)
def test_iga_rows_equal_eager_attention(family):
    """score='iga': each stage layer's attention of the instruction tokens after the last image (head mean, then
    row mean), restricted to the visual tokens and sum-normalised, as transformers' eager attention writes it."""
    model, inputs = setup_any(family)
    attentions = eager_attention(model, inputs)
    ids = inputs["input_ids"]
    visual = ids == IMAGE
    with vlmeff.patch(model, "transition", score="iga", **full(model)) as patch:
        logits(model, inputs)
        layers, scored = patch.config["layers"], patch.stats["llm_scores"]
    L = ids.shape[1]
    for layer, stage in zip(layers, scored):
        expected = []
        for b in range(ids.shape[0]):
            last_visual = int(visual[b].nonzero().max())
            rows = list(range(last_visual + 1, L)) if last_visual < L - 1 else [L - 1]
            expected.append(attentions[layer][b, :, rows].mean(0).mean(0))
        torch.testing.assert_close(stage.scores.double(), normalised(torch.stack(expected), visual),
                                   atol=1e-6, rtol=1e-5)


# -- the pruned forward: an oracle that runs the decoder itself ------------------------------------------------
def transition_oracle(model, inputs, schedule, accumulate, renumber):
    """Last-token logits [B, V] of TransPrune computed without vlmeff: each sample alone (its attended tokens), the
    layers run one by one. TTV of the accumulating layers from hooks on their attention / MLP (float64, softmax over
    the sequence), summed and carried with the kept tokens; at each stage (layer, kept count per sample) the layer's
    q / k with transformers' `apply_rotary_pos_emb` / `repeat_kv` and a causal mask give the attention of the rows
    after the image; score = TTV / sum + IGA / sum over the visual tokens; the top-k kept in order. Positions: the
    model's own (1-D or M-RoPE) of the kept columns, or renumbered 0, 1, ... from the sample's first position (the
    reference's)."""
    embeds, positions = language_model_inputs(model, inputs)
    B, L = embeds.shape[:2]
    out = []
    for b in range(B):
        columns = inputs["attention_mask"][b].bool().nonzero()[:, 0]
        visual = inputs["input_ids"][b] == IMAGE
        out.append(_one_sample(model, embeds[b:b + 1], positions[..., b:b + 1, :], visual, columns,
                               [(layer, kept[b]) for layer, kept in schedule], accumulate, renumber))
    return torch.stack(out)


def _one_sample(model, embeds, positions, visual, columns, schedule, accumulate, renumber):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv
    lm = model.model.language_model
    captured = {}

    def capture(module, args, kwargs, out, key):
        captured[key] = ((args[0] if args else kwargs["hidden_states"]).double(),
                         (out[0] if isinstance(out, tuple) else out).double())

    handles = [getattr(lm.layers[i], name).register_forward_hook(
        lambda m, a, k, o, key=name: capture(m, a, k, o, key), with_kwargs=True)
        for i in accumulate for name in ("self_attn", "mlp")]

    def rope_of(h, cols):
        if renumber:
            return lm.rotary_emb(h, positions[..., cols[:1]] + torch.arange(len(cols)))
        return lm.rotary_emb(h, positions[..., cols])

    h, cols, ttv = embeds[:, columns], columns, torch.zeros(len(columns), dtype=torch.float64)
    try:
        with torch.no_grad():
            for i, layer in enumerate(lm.layers):
                rope = rope_of(h, cols)          # renumbered: the original positions until a stage drops tokens
                for stage_layer, kept in schedule:
                    vis = visual[cols]
                    if stage_layer != i or int(vis.sum()) <= kept:
                        continue
                    attn, normed = layer.self_attn, layer.input_layernorm(h)
                    q = attn.q_proj(normed).unflatten(-1, (-1, attn.head_dim))
                    k = attn.k_proj(normed).unflatten(-1, (-1, attn.head_dim))
                    if hasattr(attn, "q_norm"):
                        q, k = attn.q_norm(q), attn.k_norm(k)
                    q, k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), *rope)
                    n = h.shape[1]
                    scores = q @ repeat_kv(k, attn.num_key_value_groups).transpose(-1, -2) * attn.scaling
                    causal = torch.ones(n, n, dtype=torch.bool).tril()
                    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)[0].mean(0)
                    iga = probs[int(vis.nonzero().max()) + 1:].mean(0).double()
                    score = normalised(ttv[None], vis[None])[0] + normalised(iga[None], vis[None])[0]
                    keep = ~vis
                    keep[score.masked_fill(~vis, -1).topk(kept).indices] = True
                    h, cols, ttv = h[:, keep], cols[keep], ttv[keep]
                    rope = rope_of(h, cols)
                h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=None)
                if i in accumulate:
                    for name in ("self_attn", "mlp"):
                        x, y = captured[name]
                        change = (1 - F.cosine_similarity(x, y, dim=-1)).exp()[0]
                        ttv = ttv + (y.norm(dim=-1) / x.norm(dim=-1))[0] * change / change.sum()
        return model.lm_head(lm.norm(h))[0, -1]
    finally:
        for handle in handles:
            handle.remove()


def kept_counts(patch):
    return [(int(k.split()[-1]), v) for k, v in patch.stats["visual_tokens"].items() if k.startswith("after")]


@pytest.mark.parametrize("positions", ["renumber", "original"])
def test_pruned_forward_equals_the_oracle_with_new_pad_slots(positions):
    """Three stages on tiny LLaVA (4 layers) on a left-padded batch whose samples keep different counts (one image:
    16 visual tokens, two: 32), so later stages work on a layout with new pad slots; TTV accumulated over layers
    0..2 (it crosses the first two stages)."""
    from lvlm_models import batch, pixels, prompt
    model = tiny_llava()
    ids, mask = batch([prompt([1, 5, 6, 7, 8, 9], 1, [7, 8]), prompt([1], 2, [7, 11, 12])])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3))
    options = dict(layers=[1, 2, 3], ratios=[0.75, 0.5, 0.25], accumulate=[0, 1, 2], positions=positions)
    with vlmeff.patch(model, "transition", **options) as patch:
        out = logits(model, inputs)[:, -1]
        schedule = kept_counts(patch)
    assert schedule == [(1, [12, 24]), (2, [8, 16]), (3, [4, 8])]
    expected = transition_oracle(model, inputs, schedule, [0, 1, 2], renumber=positions == "renumber")
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["next", "qwen2", "qwen2_5"])
def test_pruned_forward_equals_the_oracle_on_other_families(family):
    """LLaVA-NeXT (renumbered positions) and Qwen2 / 2.5-VL (M-RoPE: original positions) at the default stages."""
    model, inputs = setup_any(family)
    with vlmeff.patch(model, "transition") as patch:
        out = logits(model, inputs)[:, -1]
        schedule, accumulate = kept_counts(patch), patch.config["accumulate"]
        renumber = patch.config["positions"] == "renumber"
    assert renumber == (family == "next")
    expected = transition_oracle(model, inputs, schedule, accumulate, renumber)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-5)


def test_renumbered_and_original_positions_differ():
    """The two position options give different logits once tokens are dropped (the oracle test's two variants are
    not one computation)."""
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "transition", positions="renumber"):
        renumbered = logits(model, inputs)
    with vlmeff.patch(model, "transition", positions="original"):
        original = logits(model, inputs)
    assert not torch.allclose(renumbered[:, -1], original[:, -1], atol=1e-4)


def test_follow_up_turn_on_the_pruned_cache_shifts_new_positions():
    """Turn 2 continues on turn 1's pruned cache: each new token's renumbered position is its position less the
    visual tokens dropped, so turn 2's first logits equal an oracle that runs the whole conversation with turn 1's
    kept tokens from layer 1 on, numbered 0, 1, ... (the reference's renumbering)."""
    from lvlm_models import batch, pixels, prompt
    model = tiny_llava()
    ids, mask = batch([prompt([1, 5, 6], 1, [7, 8, 9])])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(1))
    options = dict(layers=[1], ratios=[0.25], accumulate=[0])
    with vlmeff.patch(model, "transition", **options) as patch:
        first = generate(model, inputs, return_dict_in_generate=True)
        kept = patch.stats["llm_kept"][0]
        ids2 = torch.cat([first.sequences, torch.tensor([[7, 8]])], dim=1)
        second = generate(model, dict(input_ids=ids2, attention_mask=torch.ones_like(ids2)), cache=first.cache,
                          return_dict_in_generate=True, output_logits=True)
    # the oracle: the conversation with the pruned image from layer 1 on, renumbered positions
    lm = model.model.language_model
    turn2 = dict(input_ids=ids2, attention_mask=torch.ones_like(ids2), pixel_values=inputs["pixel_values"])
    with Recorder(lm) as rec, torch.no_grad():
        model(**turn2)
    h = rec.kwargs["inputs_embeds"]
    keep = torch.cat([kept, torch.ones(ids2.shape[1] - kept.shape[0], dtype=torch.bool)])
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            if i == 1:
                h = h[:, keep]
            pos = torch.arange(h.shape[1])[None]
            h = layer(h, attention_mask=None, position_embeddings=lm.rotary_emb(h, pos), position_ids=None)
        expected = model.lm_head(lm.norm(h))[0, -1]
    torch.testing.assert_close(second.logits[0][0], expected, atol=2e-5, rtol=1e-5)


# -- budgets, schedules, options ------------------------------------------------------------------------------
def test_paper_schedule_on_32_layers_and_its_scaling():
    assert stages.default_schedule("transition", 32) == ((7, 9, 12), (0.875, 0.625, 0.125))
    assert stages.default_accumulation((7, 9, 12)) == tuple(range(6, 12))          # 7..12, 1-indexed
    # 28 layers (Qwen2): round(7 * 28 / 32) = 6, round(7.875) = 8, round(10.5) = 11
    assert stages.default_schedule("transition", 28) == ((6, 8, 11), (0.875, 0.625, 0.125))
    # 4 layers: 7 and 9 land on layer 1 (the deeper ratio stays), 12 on 2 (1.5 rounds half up)
    assert stages.default_schedule("transition", 4) == ((1, 2), (0.625, 0.125))
    # the paper's average share on 32 layers: (7 + 2 * 0.875 + 3 * 0.625 + 20 * 0.125) / 32 = 236 / 576 tokens
    assert stages.average_share((0.875, 0.625, 0.125), (7, 9, 12), 32) * 576 == pytest.approx(236.25)


def test_keep_scales_the_papers_shape_to_the_average_budget():
    ratios = stages.scaled_shape_ratios(0.25, (0.875, 0.625, 0.125), (2, 3, 5), 16)
    assert stages.average_share(ratios, (2, 3, 5), 16) == pytest.approx(0.25)
    c = ratios[0] / 0.875                                    # one factor for every stage: the shape is kept
    assert ratios == pytest.approx((0.875 * c, 0.625 * c, 0.125 * c))
    # a large budget saturates the first stages at 1
    big = stages.scaled_shape_ratios(0.8, (0.875, 0.625, 0.125), (2, 3, 5), 16)
    assert big[0] == 1.0 and stages.average_share(big, (2, 3, 5), 16) == pytest.approx(0.8)
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "transition", keep=0.5, layers=[1, 2, 3]) as patch:
        logits(model, inputs)
        assert stages.average_share(patch.config["ratios"], [1, 2, 3], 4) == pytest.approx(0.5)
        assert patch.config["ratios"][0] / patch.config["ratios"][2] == pytest.approx(7.0)
    with pytest.raises(ValueError, match="out of reach"):
        vlmeff.patch(model, "transition", keep=0.2, layers=[1, 2, 3])


@pytest.mark.parametrize("family, kwargs, error, words", [
    ("qwen2", dict(positions="renumber"), ValueError, "positions='renumber'"),
    ("llava", dict(positions="shifted"), ValueError, "'renumber' or 'original'"),
    ("llava", dict(score="ttv+iga"), ValueError, "both, ttv, iga"),
    ("llava", dict(accumulate=[2, 1]), ValueError, "accumulate=[2, 1]"),
    ("llava", dict(accumulate=[9]), ValueError, "accumulate=[9]"),
    ("llava", dict(layers=[1, 2], ratios=[0.5]), ValueError, "list of 2"),
    ("llava", dict(keep=0.5, ratios=[0.5, 0.25]), ValueError, "not both"),
    ("llava", dict(keep=8), ValueError, "float ratio"),
    ("llava", dict(layers=[0]), ValueError, "layers=[0]"),
])
def test_bad_options_are_clear_errors(family, kwargs, error, words):
    model, _ = setup_any(family)
    with pytest.raises(error, match=__import__("re").escape(words)):
        vlmeff.patch(model, "transition", **kwargs)
    assert "forward" not in vars(model)


def test_options_resolved_in_the_config():
    model, _ = setup_any("llava")
    with vlmeff.patch(model, "transition", accumulate=[-4, -3]) as patch:
        assert patch.config == dict(method="transition", keep=None, layers=[1, 2], ratios=[0.625, 0.125],
                                    accumulate=[0, 1], score="both", positions="renumber")
    model, _ = setup_any("qwen3")              # deepstack: the first two layers keep every token
    with vlmeff.patch(model, "transition") as patch:
        assert (patch.config["layers"], patch.config["accumulate"], patch.config["positions"]) == (
            [2], [1], "original")


# -- GPU-path properties: host reads, launches -------------------------------------------------------------------
def test_prefill_reads_the_host_once_and_decoding_as_unpatched():
    from opcount import OpCounter
    model, inputs = setup_any("llava")

    def syncs():
        with torch.no_grad():
            with OpCounter() as prefill:
                out = model(**inputs, use_cache=True)
            mask = torch.cat([inputs["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
            with OpCounter() as step:
                model(input_ids=torch.tensor([[5], [6]]), attention_mask=mask, cache=out.cache)
        return prefill.syncs, step.syncs

    base = syncs()
    with vlmeff.patch(model, "transition"):
        assert syncs() == (base[0] + 1, base[1])


def test_ttv_costs_a_few_launches_per_accumulating_layer():
    """What TTV adds per accumulating layer (attention + MLP), counted: the difference of accumulating over one and
    over two layers (same stages), pinned."""
    from opcount import count_ops
    model, inputs = setup_any("llava")

    def run():
        with torch.no_grad():
            model(**inputs)

    counts = []
    for accumulate in ([0], [0, 1]):
        with vlmeff.patch(model, "transition", layers=[2], ratios=[0.5], accumulate=accumulate, score="ttv"):
            run()
            counts.append(count_ops(run)[1].total)
    assert counts[1] - counts[0] == 30          # 15 per sublayer, the running sum included


# -- model lines, composition (compile, the bundled models: tests/test_llm_stage.py) ------------------------
def test_qwen3_vl_moe():
    from lvlm_models import A, B, qwen_inputs, tiny_qwen
    model = tiny_qwen("qwen3_moe")
    inputs = qwen_inputs([A, B])
    ref = generate(model, inputs)
    kw = dict(return_dict_in_generate=True, output_logits=True)
    with vlmeff.patch(model, "transition", ratios=[1.0]):
        assert torch.equal(generate(model, inputs), ref)
    with vlmeff.patch(model, "transition") as patch:
        cached = generate(model, inputs, **kw)
        recomputed = generate(model, inputs, use_cache=False, **kw)
        assert patch.stats["visual_tokens"]["after LLM layer 2"] == [2, 2]
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=2e-5, rtol=1e-5)


def test_composition_with_a_vision_side_method_and_exact_undo():
    model, inputs = setup_any("llava")
    ref = logits(model, inputs)
    with vlmeff.patch(model, [("cls", {"keep": 8}), ("transition", {})]) as patch:
        out = logits(model, inputs)
        assert patch.stats["visual_tokens"]["LLM input"] == [8, 8]
        assert patch.stats["visual_tokens"]["after LLM layer 2"] == [1, 1]
    with vlmeff.patch(model, "cls", keep=8):
        assert not torch.allclose(out, logits(model, inputs))
    assert torch.equal(logits(model, inputs), ref)


def test_transition_functions_by_hand():
    """y = x: no change (cos 1), ratio 1, so TTV is uniform over the valid tokens; y = -2x at one token: cos -1
    there, weight e^2 against e^0, ratio 2. Scores: each term sum-normalised over the visual columns."""
    x = torch.randn(1, 4, 8)
    valid = torch.tensor([[False, True, True, True]])
    assert torch.allclose(transition.transition_variation(x, x, valid), torch.tensor([[0, 1 / 3, 1 / 3, 1 / 3]]))
    y = x.clone()
    y[0, 3] = -2 * x[0, 3]
    e2 = torch.tensor(2.0).exp()
    expected = torch.tensor([[0, 1 / (2 + e2), 1 / (2 + e2), 2 * e2 / (2 + e2)]])
    torch.testing.assert_close(transition.transition_variation(x, y, valid), expected)
    visual = torch.tensor([[False, True, True, False]])
    ttv, iga = torch.tensor([[5.0, 1.0, 3.0, 7.0]]), torch.tensor([[9.0, 2.0, 2.0, 9.0]])
    torch.testing.assert_close(transition.transition_scores(ttv, iga, visual), torch.tensor([[0, 0.75, 1.25, 0]]))
    torch.testing.assert_close(transition.transition_scores(ttv, iga, visual, "ttv"), torch.tensor([[0, .25, .75, 0]]))
    torch.testing.assert_close(transition.transition_scores(None, iga, visual), torch.tensor([[0, 0.5, 0.5, 0]]))
    torch.testing.assert_close(transition.transition_scores(ttv, iga, visual, "iga"), torch.tensor([[0, .5, .5, 0]]))


def test_a_full_budget_first_stage_before_a_pruning_one_shifts_by_the_pruning_stage():
    """Stage 1 keeps every token (no layout change), stage 2 drops: decoding shifts positions by stage 2's drops
    (the cache remembers the stages that changed the layout): cached generation equals recomputation."""
    model, inputs = setup_any("llava")
    kw = dict(return_dict_in_generate=True, output_logits=True, max_new_tokens=3, do_sample=False)
    with vlmeff.patch(model, "transition", layers=[1, 2], ratios=[1.0, 0.25]):
        with torch.no_grad():
            cached = model.generate(**inputs, **kw)
            recomputed = model.generate(**inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(recomputed.logits), atol=2e-5, rtol=1e-5)


def test_stage_ratio_defaults_and_the_budget_floor():
    """Explicit layers without ratios: TransPrune's three for three stages, lambda ** s otherwise; PyramidDrop
    keeps lambda ** s for three. A budget at the floor (the layers before the first stage alone) is refused, naming
    the first stage's layer."""
    assert stages.stage_ratios("transition", 3) == (0.875, 0.625, 0.125)
    assert stages.stage_ratios("transition", 2) == (0.5, 0.25)
    assert stages.stage_ratios("pdrop", 3) == (0.5, 0.25, 0.125)
    with pytest.raises(ValueError, match=r"below 0.125 is out of reach with stages from layer 2 of 16 \(the layers "
                                         r"before it see every visual token\); prune from an earlier layer"):
        stages.scaled_shape_ratios(0.125, (0.875, 0.625, 0.125), (2, 3, 5), 16)


def test_ttv_of_half_precision_states_is_computed_in_float32():
    """bf16 sublayer states: norms and dot products accumulate in float32 (a bf16 reduction over 4,096 channels
    would be off by far more than the tolerance)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 6, 4096) * 3, torch.randn(2, 6, 4096)
    y[:, :3] += 4 * x[:, :3]
    valid = torch.ones(2, 6, dtype=torch.bool)
    out = transition.transition_variation(x.bfloat16(), y.bfloat16(), valid)
    assert out.dtype == torch.float32
    xd, yd = x.bfloat16().double(), y.bfloat16().double()
    change = (1 - F.cosine_similarity(xd, yd, dim=-1)).exp()
    expected = yd.norm(dim=-1) / xd.norm(dim=-1) * change / change.sum(1, keepdim=True)
    torch.testing.assert_close(out.double(), expected, atol=0, rtol=5e-4)      # the bf16 products x * y: ~1e-4


def test_a_sample_without_an_image_adds_one_instruction_row(monkeypatch):
    """A text-only sample beside one with an image: its IGA takes its query row alone, not its whole prompt (the
    rows' buffer stays the image sample's instruction length), and its output is the unpatched model's."""
    import vlmeff.engine.llm as engine
    from lvlm_models import A, C, qwen_inputs, tiny_qwen
    model = tiny_qwen("qwen2")
    inputs = qwen_inputs([A, C])
    shapes = []

    def recorded(q, *args):
        shapes.append(q.shape[2])
        return causal_rows_mean(q, *args)

    causal_rows_mean = engine.causal_rows_mean
    monkeypatch.setattr(engine, "causal_rows_mean", recorded)
    ref = logits(model, qwen_inputs([C]))[0, -1]
    with vlmeff.patch(model, "transition") as patch:
        out = logits(model, inputs)
        assert patch.stats["visual_tokens"]["LLM input"] == [16, 0]
    # sample A: [1, 5, 6] <start> 16 image tokens <end> [7, 8, 9]: the rows after the image are <end>, 7, 8, 9
    assert shapes == [4]
    torch.testing.assert_close(out[1, -1], ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(accumulate=[]), dict(accumulate=[3]), dict(layers=[1, 2], accumulate=[2]),
                                    dict(score="ttv", accumulate=[1, 2])])
def test_ttv_without_an_accumulating_layer_before_the_first_stage_is_refused(kwargs):
    model, _ = setup_any("llava")
    with pytest.raises(ValueError, match=r"accumulate=.* is not accepted; .*at least one before the first stage, "
                                         r"layer 1 \(unless score='iga'\)"):
        vlmeff.patch(model, "transition", **kwargs)
    vlmeff.patch(model, "transition", score="iga", **{k: v for k, v in kwargs.items() if k != "score"}).unpatch()


def test_a_direct_decoding_call_numbers_new_tokens_like_generate():
    """model(...) on the returned cache without position ids (the model numbers the new token past + 0) gives the
    logits generate's second step gave with its own position ids (renumbered: both shifted by the dropped tokens)."""
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "transition"), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
        prefill = model(**inputs, use_cache=True)
        first = out.sequences[:, -2:-1]
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(first)], 1)
        step = model(input_ids=first, attention_mask=mask, cache=prefill.past_key_values)
    torch.testing.assert_close(step.logits[:, -1], out.logits[1], atol=2e-5, rtol=1e-5)
