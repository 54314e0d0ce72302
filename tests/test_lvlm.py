"""Pre-LLM visual-token reduction on LLaVA: equality at full budget, batching, cache, multi-image, multi-turn."""
import copy

import pytest
import torch

import vlmeff
from opcount import OpCounter
from vlmeff.models import find_adapter
from vlmeff.patching import Patch
from lvlm_models import IMAGE, PAD, Recorder, batch, generate, logits, pixels, prompt, tiny_llava

METHODS = [("cls", {}), ("cls", dict(score_layers=0)), ("cls", dict(reduce="merge")), ("visionzip", {}),
           ("visionzip", dict(contextual=2)), ("received", {}), ("random", {}), ("pool", {}), ("divprune", {}),
           ("cdpruner", {}), ("cdpruner", dict(relevance="none")), ("vispruner", {}), ("vispruner", dict(step=1))]


def two_samples():
    ids, mask = batch([prompt([1, 5, 6], 1, [7, 8, 9]), prompt([1, 5], 1, [7, 8, 9, 10, 11])])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))


@pytest.mark.parametrize("method,options", METHODS)
def test_full_budget_is_identical(method, options):
    model, inputs = tiny_llava(), two_samples()
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    with vlmeff.patch(model, method=method, keep=1.0, **options) as h:
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs), ref_tokens)
        assert h.stats["visual_tokens"] == {"input": [16, 16], "before LLM": [16, 16]}
    assert torch.equal(logits(model, inputs), ref_logits)
    assert "forward" not in vars(model) and "generate" not in vars(model)


@pytest.mark.parametrize("method,options", METHODS)
def test_batch_equals_samples_one_by_one(method, options):
    model, inputs = tiny_llava(), two_samples()
    with vlmeff.patch(model, method=method, keep=5, **options) as h:
        batched = logits(model, inputs)[:, -1]
        tokens = generate(model, inputs)
        for i in range(2):
            valid = inputs["attention_mask"][i].bool()
            alone = dict(input_ids=inputs["input_ids"][i:i + 1, valid], pixel_values=inputs["pixel_values"][i:i + 1])
            torch.testing.assert_close(logits(model, alone)[0, -1], batched[i], atol=1e-4, rtol=1e-4)
            new = generate(model, alone)[0, alone["input_ids"].shape[1]:]
            assert torch.equal(new, tokens[i, inputs["input_ids"].shape[1]:])
    # pool keeps the largest grid that fits the budget: 2 x 2 of the 4 x 4 patches
    assert h.stats["visual_tokens"]["before LLM"] == [4 if method == "pool" else 5]


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_cached_generation_equals_recomputation(positions):
    model, inputs = tiny_llava(), two_samples()
    with vlmeff.patch(model, method="cls", keep=4, positions=positions):
        cached = generate(model, inputs, return_dict_in_generate=True, output_logits=True)
        fresh = generate(model, inputs, use_cache=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(fresh.logits), atol=1e-4, rtol=1e-4)
    # the caller's prompt comes back in front of the answer
    assert torch.equal(cached.sequences[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])


def test_reduced_prompt_reaches_the_llm_with_the_kept_tokens():
    model, inputs = tiny_llava(), two_samples()
    seen = {}
    model.model.language_model.register_forward_pre_hook(
        lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with vlmeff.patch(model, method="cls", keep=3, positions="original") as h:
        logits(model, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    for i in range(2):
        image_pos = (ids[i] == IMAGE).nonzero().squeeze(1)
        kept_pos = image_pos[h.stats["kept"][i]]
        text_pos = ((ids[i] != IMAGE) & mask[i].bool()).nonzero().squeeze(1)
        expected = torch.cat([kept_pos, text_pos]).sort().values
        original_positions = torch.arange(ids.shape[1])       # a forward numbers the padded prompt 0 .. L-1
        got = seen["position_ids"][i][seen["attention_mask"][i].bool()]
        assert torch.equal(got, original_positions[expected])
    assert seen["inputs_embeds"].shape[1] == max(int(m.sum()) for m in mask) - 13


def test_a_forward_after_a_cache_numbers_the_kept_tokens_after_it():
    # positions="original" without position_ids: a forward numbers the new tokens past_length .. past_length + L - 1
    # (mutation survivor: `+ past_length` -> `- past_length` passed every test with an empty cache)
    model = tiny_llava()
    ids = torch.tensor([prompt([1, 5], 1, [7, 8])])
    with torch.no_grad():
        cache = model(input_ids=torch.tensor([[1, 6, 9]]), use_cache=True).past_key_values
    with vlmeff.patch(model, method="cls", keep=3, positions="original") as h, \
            Recorder(model.model.language_model) as rec, torch.no_grad():
        model(input_ids=ids, pixel_values=pixels(1), past_key_values=cache)
    kept = torch.cat([2 + h.stats["kept"][0], torch.tensor([0, 1, 18, 19, 20])]).sort().values
    assert torch.equal(rec.kwargs["position_ids"][0], 3 + kept)


def test_multi_image_prompt_and_text_only_sample_in_one_batch():
    model = tiny_llava()
    ids, mask = batch([prompt([1, 5], 2, [7, 8]), [1, 5, 6, 7, 8, 9], prompt([1], 1, [9])])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3))
    with vlmeff.patch(model, method="cls", keep=0.25) as h:
        out = logits(model, inputs)
        tokens = generate(model, inputs)
        assert h.stats["visual_tokens"] == {"input": [16, 16, 16], "before LLM": [4, 4, 4]}
        text_only = generate(model, dict(input_ids=ids[1:2, mask[1].bool()]))
    assert out.shape[1] == ids.shape[1] - 2 * 12         # the two-image sample is the longest
    assert torch.equal(tokens[1, ids.shape[1]:], text_only[0, 6:])
    # the multi-image sample alone gives the same answer
    alone = dict(input_ids=ids[:1, mask[0].bool()], pixel_values=pixels(3)[:2])
    with vlmeff.patch(model, method="cls", keep=0.25):
        assert torch.equal(generate(model, alone)[0, alone["input_ids"].shape[1]:], tokens[0, ids.shape[1]:])


def follow_up_turn(sequences, mask, follow_up):
    """The next turn's inputs: the returned sequences [B, T] + follow_up [B, F], the prompt's mask extended by ones."""
    ids = torch.cat([sequences, follow_up], dim=1)
    ones = torch.ones(ids.shape[0], ids.shape[1] - mask.shape[1], dtype=mask.dtype)
    return dict(input_ids=ids, attention_mask=torch.cat([mask, ones], dim=1))


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_multi_turn_continuation_on_the_reduced_cache(positions):
    model, inputs = tiny_llava(), two_samples()
    follow_up = torch.tensor([[11, 12], [13, 14]])
    with vlmeff.patch(model, method="cls", keep=4, positions=positions):
        first = generate(model, inputs, return_dict_in_generate=True)
        turn2 = follow_up_turn(first.sequences, inputs["attention_mask"], follow_up)
        continued = generate(model, turn2, cache=first.cache)
        recomputed = generate(model, dict(turn2, pixel_values=inputs["pixel_values"]))
        first = generate(model, inputs, return_dict_in_generate=True)
        with pytest.warns(FutureWarning, match="past_key_values"):     # the deprecated name: transformers warns
            deprecated = generate(model, turn2, past_key_values=first.cache)
    assert torch.equal(continued, recomputed)
    assert torch.equal(deprecated, recomputed)


@pytest.mark.parametrize("keep", [4, 1.0])
@pytest.mark.parametrize("positions", ["compact", "original"])
@pytest.mark.parametrize("masks", ["none", "first turn only", "follow-up only"])
def test_multi_turn_continuation_with_and_without_attention_masks(keep, positions, masks):
    """Two samples of one length, so a mask is optional, with 1 and 2 images, so their reduced prompts differ in
    length and the shorter one is re-padded: the follow-up on the reduced cache equals recomputing it, whichever
    turn passes a mask (the prefix swap takes the reduced prompt's mask, and the positions continue from it). The
    follow-up's own mask is kept: its second sample starts with a pad."""
    ids, mask = batch([prompt([1, 5, 6], 1, list(range(20, 36))), prompt([1], 2, [9])])
    assert bool(mask.all())
    inputs = dict(input_ids=ids, pixel_values=pixels(3))
    model = tiny_llava()
    model.generation_config.pad_token_id = None      # so generate cannot infer a missing mask from pad tokens
    with vlmeff.patch(model, method="cls", keep=keep, positions=positions):
        first = generate(model, dict(inputs, attention_mask=mask) if masks == "first turn only" else inputs,
                         return_dict_in_generate=True)
        turn2 = follow_up_turn(first.sequences, mask, torch.tensor([[11, 12], [PAD, 14]]))
        turn2["attention_mask"][1, -2] = 0
        if masks != "follow-up only":
            turn2 = dict(input_ids=turn2["input_ids"].masked_fill(turn2["input_ids"] == PAD, 15))
        continued = generate(model, turn2, cache=first.cache)
        recomputed = generate(model, dict(turn2, pixel_values=inputs["pixel_values"]))
    assert torch.equal(continued, recomputed)


def eager_cls_indices(model, pixel_values, layer, k):
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        attn = tower(pixel_values=pixel_values, output_attentions=True).attentions[layer]
    return attn[:, :, 0, 1:].mean(dim=1).topk(k).indices.sort().values


@pytest.mark.parametrize("options,hooked", [
    (dict(method="random"), {}),
    (dict(method="random", reduce="merge"), {1: "k"}),                 # the merge metric: keys of the feature layer
    (dict(method="cls"), {1: "qk"}),
    (dict(method="cls", reduce="merge"), {1: "qk"}),                   # the scores' keys are the metric's: one hook
    (dict(method="cls", score_layers=0), {0: "qk", 1: "qk"}),
    (dict(method="cls", reduce="merge", score_layers=(0, 0)), {0: "qk", 1: "k"}),
])
def test_the_tower_is_hooked_once_where_its_q_and_k_are_read(options, hooked):
    """Forward hooks on the tower's q / k projections: only the layers whose queries (scores) or keys (scores, merge
    metric) are read, one hook each; the forward runs and returns the budget."""
    model, inputs = tiny_llava(), two_samples()
    layers = model.model.vision_tower.encoder.layers
    with vlmeff.patch(model, keep=4, **options) as h:
        found = {i: "q" * len(a.q_proj._forward_hooks) + "k" * len(a.k_proj._forward_hooks)
                 for i, a in enumerate(layer.self_attn for layer in layers)}
        logits(model, inputs)
        assert h.stats["visual_tokens"]["before LLM"] == [4, 4]
    assert {i: v for i, v in found.items() if v} == hooked


def test_the_merge_metric_is_the_head_mean_of_the_keys_in_float32():
    """On a bf16 tower the merge metric is still computed in float32 (the matching ranks cosine similarities, where
    bf16 means would reorder near-ties): the head mean of the feature layer's keys, per feature row."""
    model = tiny_llava().to(torch.bfloat16)
    adapter, handle = find_adapter(model), Patch(model, {})
    keys = {}
    k_proj = model.model.vision_tower.encoder.layers[adapter.score_layer].self_attn.k_proj
    handle.hook(k_proj.register_forward_hook(lambda m, args, out: keys.setdefault("k", out)))
    capture = adapter.capture(handle, None, [], metric=True)
    try:
        with torch.no_grad():
            model.model.vision_tower(pixels(2).to(torch.bfloat16))
        metric = capture.metric()
    finally:
        handle.unpatch()
    k = keys["k"].float().view(2, 17, 4, 8)                            # [images, tokens, heads, head dim]
    assert metric.dtype == torch.float32 and metric.shape == (2, 16, 8)   # "default" features: [CLS] is no row
    torch.testing.assert_close(metric, k.mean(dim=2)[:, 1:], rtol=0, atol=1e-6)


def test_cls_selection_matches_eager_oracle():
    model, inputs = tiny_llava(), two_samples()
    oracle = eager_cls_indices(model, inputs["pixel_values"], -2, 6)     # FasterVLM: layer of hidden_states[-2]
    with vlmeff.patch(model, method="cls", keep=6) as h:
        logits(model, inputs)
    assert torch.equal(torch.stack(h.stats["kept"]), oracle)


def test_full_strategy_keeps_cls_outside_the_budget():
    model = tiny_llava(strategy="full")
    ids, mask = batch([prompt([1, 5], 1, [7], tokens_per_image=17)])
    with vlmeff.patch(model, method="cls", keep=4) as h:
        logits(model, dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(1)))
    assert h.stats["visual_tokens"] == {"input": [17], "before LLM": [5]}
    assert h.stats["kept"][0][0] == 0


def test_stats_report_prefill_flops_and_kv_cache():
    model, inputs = tiny_llava(), two_samples()
    with vlmeff.patch(model, method="cls", keep=4) as h:
        logits(model, inputs)
    s = h.stats
    assert s["prefill_flops"] < s["prefill_flops_unpatched"] and s["kv_cache_bytes"] < s["kv_cache_bytes_unpatched"]
    # K and V, 4 layers, 2 kv heads x 16 dims, fp32: 12 fewer tokens per sample
    assert s["kv_cache_bytes_unpatched"] - s["kv_cache_bytes"] == 2 * 12 * (2 * 4 * 32 * 4)


def test_two_patched_llavas_do_not_interfere():
    a, b, inputs = tiny_llava(), tiny_llava(), two_samples()
    ha = vlmeff.patch(a, method="cls", keep=3)
    out_a = logits(a, inputs)
    hb = vlmeff.patch(b, method="pool", keep=4)
    assert torch.equal(logits(a, inputs), out_a)
    logits(b, inputs)
    assert ha.stats["visual_tokens"]["before LLM"] == [3, 3] and hb.stats["visual_tokens"]["before LLM"] == [4, 4]


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(method="cls", keep=17), ValueError, "exceeds the 16 visual tokens"),
    (dict(method="cls", keep=4, positions="shuffled"), ValueError, "accepted: compact, original"),
    (dict(method="cls", keep=4, layer=1), ValueError, "feature layer"),
    (dict(method="tome", r=2), ValueError, "methods that do: cdpruner, cls, dart, debiased, divprune, fastv, infoflow, "
                                           "pdrop, pool, random, received, sparsevlm, transition, visionzip, vispruner"),
    (dict(method="cls"), ValueError, "needs keep"),
])
def test_bad_input_is_a_clear_error(kwargs, error, match):
    model, inputs = tiny_llava(), two_samples()
    with pytest.raises(error, match=match):
        with vlmeff.patch(model, **kwargs):
            logits(model, inputs)
    assert not hasattr(model, "_vlmeff_patch")


def test_inputs_embeds_and_mismatched_placeholders_are_clear_errors():
    model, inputs = tiny_llava(), two_samples()
    with vlmeff.patch(model, method="cls", keep=4):
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        with pytest.raises(ValueError, match="pass input_ids, not inputs_embeds"):
            model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"])
        with pytest.raises(ValueError, match="32 image placeholders but the images give 16"):
            model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1])


def test_projector_maps_only_the_kept_rows():
    model, inputs = tiny_llava(), two_samples()
    shapes = []
    model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape)))
    ref = logits(model, inputs)
    with vlmeff.patch(model, method="cls", keep=4):
        logits(model, inputs)
    with vlmeff.patch(model, method="cls", keep=1.0):
        assert torch.equal(logits(model, inputs), ref)        # dropping before the row-wise projector is exact
    assert shapes == [(2, 16, 64), (2, 4, 64), (2, 16, 64)]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("positions", ["compact", "original"])
def test_full_budget_is_exact_on_padded_batches(side, positions):
    """Forward numbers the padded prompt 0 .. L-1, generate from the mask: at full budget the patched model gives
    the LLM exactly what the unpatched one would (no re-derived positions)."""
    model = tiny_llava()
    ids, mask = batch([prompt([1, 5, 6], 1, [7, 8, 9]), prompt([1], 1, [7, 8, 9, 10, 11, 12, 13])], side=side)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    with vlmeff.patch(model, method="cls", keep=1.0, positions=positions):
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs), ref_tokens)


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_gives_original_positions_in_its_own_numbering(side):
    """Reduced, positions="original": the prefill of generate gets generate's numbering of the caller's prompt
    (mask cumsum) at the kept tokens (a forward's 0 .. L-1 is tested above)."""
    model, (ids, mask) = tiny_llava(), batch([prompt([1, 5, 6], 1, [7, 8, 9]), prompt([1], 1, [7, 8, 9, 10])], side)
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    with vlmeff.patch(model, method="cls", keep=3, positions="original") as h, \
            Recorder(model.model.language_model) as rec, torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, suppress_tokens=[IMAGE])      # one LLM call: the prefill
    numbering = mask.cumsum(1) - 1
    got, got_mask = rec.kwargs["position_ids"], rec.kwargs["attention_mask"].bool()
    assert got.shape[1] == ids.shape[1] - 13
    for i in range(2):
        image_pos = (ids[i] == IMAGE).nonzero().squeeze(1)
        kept = torch.cat([image_pos[h.stats["kept"][i]], ((ids[i] != IMAGE) & mask[i].bool()).nonzero().squeeze(1)])
        assert torch.equal(got[i][got_mask[i]], numbering[i, kept.sort().values])


def test_a_sample_with_an_all_zero_mask_behaves_like_unpatched():
    """Its placeholders still take its image's kept features (the model scatters features whatever the mask);
    the other samples are unaffected."""
    model = tiny_llava()
    ids, mask = batch([prompt([1, 5, 6], 1, [7, 8, 9]), prompt([1, 5], 1, [7, 8, 9, 10, 11]), prompt([1], 1, [7])])
    mask[2] = 0
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3))
    ref = logits(model, inputs)
    with vlmeff.patch(model, method="cls", keep=1.0):
        assert torch.equal(logits(model, inputs), ref)
    two = dict(input_ids=ids[:2], attention_mask=mask[:2], pixel_values=pixels(3)[:2])
    with vlmeff.patch(model, method="cls", keep=4) as h:
        out = logits(model, inputs)
        assert h.stats["visual_tokens"]["before LLM"] == [4, 4, 4]
        torch.testing.assert_close(out[:2, -1], logits(model, two)[:, -1], atol=1e-5, rtol=1e-5)


def test_follow_up_turn_with_cache_raises_no_deprecation_warning(recwarn):
    """transformers v5 names the KV cache `cache` (past_key_values is deprecated, a FutureWarning): the continuation
    on the reduced cache takes that name and passes it on as it is."""
    model, inputs = tiny_llava(), two_samples()
    follow_up = torch.tensor([[11, 12], [13, 14]])
    with vlmeff.patch(model, method="cls", keep=4):
        first = generate(model, inputs, return_dict_in_generate=True)
        turn2 = follow_up_turn(first.sequences, inputs["attention_mask"], follow_up)
        continued = generate(model, turn2, cache=first.cache)
        recomputed = generate(model, dict(turn2, pixel_values=inputs["pixel_values"]))
    assert torch.equal(continued, recomputed)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def count_host_reads(fn):
    """(result, reads): ops that read tensor data on the host, `.tolist()` included (OpCounter.syncs)."""
    with torch.no_grad(), OpCounter() as counter:
        out = fn()
    return out, counter.syncs


@pytest.mark.parametrize("method", ["cls", "divprune", "cdpruner", "vispruner"])
@pytest.mark.parametrize("keep", [4, 1.0])
def test_prompt_rebuild_reads_the_host_once(monkeypatch, keep, method):
    """A reduced call reads the host once outside the vision encoder and the reduction itself (`reduce_rows`,
    owned by the reduction): placeholder count, new length, padding side and stats lengths in one `.tolist()`.
    CDPruner's instructions (each image's sample found on the device) and the projected metric read nothing."""
    import vlmeff.engine.lvlm as engine
    model, inputs = tiny_llava(), two_samples()
    _, encoder_reads = count_host_reads(lambda: model.model.get_image_features(inputs["pixel_values"]))
    reduction_reads = []
    reduce_rows = engine.reduce_rows

    def counted_reduce_rows(*args, **kwargs):
        out, reads = count_host_reads(lambda: reduce_rows(*args, **kwargs))
        reduction_reads.append(reads)
        return out

    monkeypatch.setattr(engine, "reduce_rows", counted_reduce_rows)
    handle = Patch(model, {"method": method, "keep": keep})
    reduction = engine.PreLLMReduction(handle, find_adapter(model), method, keep,       # as vlmeff.patch builds it
                                       vlmeff.method_info(method).defaults)
    reduction.install()
    try:
        _, reads = count_host_reads(lambda: reduction.reduce_inputs(inputs, numbering="forward"))
    finally:
        handle.unpatch()
    assert len(reduction_reads) == 1
    assert reads - reduction_reads[0] - encoder_reads == 1


@pytest.mark.parametrize("right", [False, True])
def test_shrink_matches_a_loop_oracle(right):
    """Every per-token input keeps the kept tokens in order, padded on the caller's side: ids with the pad token,
    labels -100, the mask and everything else 0; an [3, B, L] input (M-RoPE positions) alike."""
    from vlmeff.engine.prompt import shrink
    gen = torch.Generator().manual_seed(0)
    B, L = 3, 9
    keep = torch.rand(B, L, generator=gen) < 0.6
    keep[1] = False                                             # a sample that keeps nothing
    ids = torch.randint(3, 50, (B, L), generator=gen)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones(B, L, dtype=torch.long), labels=ids + 100,
                  position_ids=torch.arange(3 * B * L).view(3, B, L), pixel_values=torch.ones(B, L, 1))
    new_length = int(keep.sum(1).max())
    out = shrink(dict(kwargs), keep, new_length, right, pad_token_id=7)
    pads = {"input_ids": 7, "labels": -100, "attention_mask": 0, "position_ids": 0}
    for name, pad in pads.items():
        value = kwargs[name]
        expected = torch.full((*value.shape[:-1], new_length), pad)
        for b in range(B):
            row = value[..., b, keep[b]]
            span = slice(0, row.shape[-1]) if right else slice(new_length - row.shape[-1], new_length)
            expected[..., b, span] = row
        assert torch.equal(out[name], expected), name
    assert out["pixel_values"] is kwargs["pixel_values"]        # not a per-token input


def test_kv_cache_bytes_count_the_llm_dtype_with_and_without_images():
    """A tower and projector in another dtype than the LLM do not change the KV-cache bytes (review finding: the
    image path counted the features' dtype, the text-only path the model's)."""
    model, inputs = tiny_llava(), two_samples()
    model.model.vision_tower.to(torch.float64)
    model.model.multi_modal_projector.to(torch.float64)
    per_token = 2 * 4 * 2 * 16 * 4                   # K and V x 4 layers x 2 kv heads x head dim 16 x fp32 bytes
    with vlmeff.patch(model, method="cls", keep=4) as h, torch.no_grad():
        model(**{**inputs, "pixel_values": inputs["pixel_values"].double()})
        kept_tokens = sum(h.stats["visual_tokens"]["before LLM"]) + int((inputs["input_ids"] != IMAGE).sum())
        assert h.stats["kv_cache_bytes"] == per_token * (kept_tokens - int((inputs["attention_mask"] == 0).sum()))
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        assert h.stats["kv_cache_bytes"] == per_token * int(inputs["attention_mask"].sum())
