"""Pre-LLM visual-token reduction on LLaVA-NeXT, LLaVA-OneVision, InternVL and Gemma 3 (tiny random models)."""
import copy

import pytest
import torch

import vlmeff
from lvlm_models import (EVERY_FAMILY, FAMILIES, GENERATE_MODES, IMAGE, SCORER, Recorder, assert_same_generation,
                         generate, labelled, logits, pad_left, run_generate, setup, setup_any, single, tiny_internvl,
                         tiny_onevision)


def sample(inputs, i):
    """Sample i of a left-padded batch, unpadded, with its own image inputs."""
    valid = inputs["attention_mask"][i].bool()
    out = {"input_ids": inputs["input_ids"][i:i + 1, valid]}
    if "token_type_ids" in inputs:
        out["token_type_ids"] = inputs["token_type_ids"][i:i + 1, valid]
    if "image_sizes" in inputs:
        out.update(pixel_values=inputs["pixel_values"][i:i + 1], image_sizes=inputs["image_sizes"][i:i + 1])
    elif inputs["pixel_values"].shape[0] == 3:      # internvl: tiles 0-1 are sample 0's, tile 2 sample 1's
        out["pixel_values"] = inputs["pixel_values"][[0, 1]] if i == 0 else inputs["pixel_values"][[2]]
    else:
        out["pixel_values"] = inputs["pixel_values"][i:i + 1]
    return out


def newline_rows(model, inputs):
    """Per image, the packed rows equal to `image_newline` (anyres families)."""
    kw = {k: inputs[k] for k in ("pixel_values", "image_sizes")}
    with torch.no_grad():
        feats = model.model.get_image_features(**kw).pooler_output
    return [(f == model.model.image_newline).all(dim=1).nonzero().squeeze(1) for f in feats]


# -- every family -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["scorer", "random", "pool"])
def test_full_budget_is_identical_and_unpatch_restores(family, method):
    model, inputs = setup(family)
    method = SCORER[family] if method == "scorer" else method
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    with vlmeff.patch(model, method=method, keep=1.0) as h:
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs), ref_tokens)
        counts = h.stats["visual_tokens"]
        assert counts["input"] == counts["before LLM"]
    with vlmeff.patch(model, method=method, keep=0.5):
        assert logits(model, inputs).shape[1] < ref_logits.shape[1]
    assert torch.equal(logits(model, inputs), ref_logits)
    assert torch.equal(generate(model, inputs), ref_tokens)
    assert "forward" not in vars(model) and "generate" not in vars(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_samples_one_by_one(family):
    model, inputs = setup(family)
    with vlmeff.patch(model, method=SCORER[family], keep=0.5) as h:
        batched = logits(model, inputs)[:, -1]
        batched_counts = h.stats["visual_tokens"]["before LLM"]
        tokens = generate(model, inputs)
        alone_counts = []
        for i in range(2):
            alone = sample(inputs, i)
            torch.testing.assert_close(logits(model, alone)[0, -1], batched[i], atol=1e-4, rtol=1e-4)
            alone_counts += h.stats["visual_tokens"]["before LLM"]
            new = generate(model, alone)[0, alone["input_ids"].shape[1]:]
            assert torch.equal(new, tokens[i, inputs["input_ids"].shape[1]:])
    assert alone_counts == batched_counts


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_generation_equals_recomputation(family):
    model, inputs = setup(family)
    with vlmeff.patch(model, method=SCORER[family], keep=0.5):
        cached = generate(model, inputs, return_dict_in_generate=True, output_logits=True)
        fresh = generate(model, inputs, use_cache=False, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(cached.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(fresh.logits), atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.sequences[:, :inputs["input_ids"].shape[1]], inputs["input_ids"])


@pytest.mark.parametrize("family", ["onevision", "internvl", "gemma3"])
def test_cls_is_refused_naming_the_alternatives(family):
    model, _ = setup(family)
    with pytest.raises(ValueError, match=r"\[CLS\].*received"):
        vlmeff.patch(model, method="cls", keep=0.5)
    assert "forward" not in vars(model)


# -- LLaVA-NeXT / OneVision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["next", "onevision", "onevision_shrunk"])
def test_newline_rows_are_kept_outside_the_budget(family):
    model, inputs = setup(family)
    newlines = newline_rows(model, inputs)
    with vlmeff.patch(model, method=SCORER[family], keep=3) as h:
        logits(model, inputs)
    counts = h.stats["visual_tokens"]
    for n_in, n_out, nl, kept in zip(counts["input"], counts["before LLM"], newlines, h.stats["kept"]):
        assert nl.numel() > 0 and n_out == 3 + nl.numel()
        assert set(nl.tolist()) <= set(kept.tolist())
    # 40 x 60 px: 16 base + 6 x 8 unpadded crop grid + 6 newlines; shrunk (anyres_max_1) to 3 x 4 + 3 newlines
    assert counts["input"] == ([16 + 12 + 3, 36] if family == "onevision_shrunk" else [16 + 48 + 6, 36])


def test_next_cls_scores_match_eager_oracle():
    """Every packed row's score is the eager [CLS] attention (tower layer of hidden_states[-2]) of the tower token
    (view, patch) whose projected feature the row holds; the selection is the global top-k of those."""
    model, inputs = setup("next")
    views = torch.cat([inputs["pixel_values"][0], inputs["pixel_values"][1, :3]])
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        out = tower(pixel_values=views, output_attentions=True, output_hidden_states=True)
        cls = out.attentions[-2][:, :, 0, 1:].mean(dim=1).flatten()                   # [views * 16]
        token_features = model.model.multi_modal_projector(out.hidden_states[-2][:, 1:]).flatten(0, 1)
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    newlines = newline_rows(model, inputs)
    with vlmeff.patch(model, method="cls", keep=10) as h:
        logits(model, inputs)
    for i, (f, nl) in enumerate(zip(packed, newlines)):
        rows = torch.ones(f.shape[0], dtype=torch.bool)
        rows[nl] = False
        source = torch.cdist(f[rows], token_features).argmin(dim=1)                  # the token each row holds
        assert source.unique().numel() == rows.sum()
        oracle = cls[source]
        torch.testing.assert_close(h.stats["scores"][i][rows], oracle, atol=1e-6, rtol=1e-5)
        free = rows.nonzero().squeeze(1)
        expected = torch.cat([nl, free[oracle.topk(10).indices]]).sort().values
        assert torch.equal(h.stats["kept"][i], expected)
    # the base view's rows come first and hold its tokens in raster order
    assert torch.equal(torch.cdist(packed[0][:16], token_features).argmin(dim=1), torch.arange(16))


def test_onevision_multi_image_sample_has_single_view_blocks():
    """Images of a multi-image sample are encoded as the base view only (+ one newline): pool works there."""
    model = tiny_onevision()
    ids, mask = pad_left([[1, 5] + [IMAGE] * 17 + [98] + [IMAGE] * 17 + [7, 8]])
    pixel_values = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values,
                  image_sizes=torch.tensor([[40, 60], [30, 30]]), batch_num_images=torch.tensor([2]))
    ref = logits(model, inputs)
    for method in ("received", "pool"):
        with vlmeff.patch(model, method=method, keep=1.0):
            assert torch.equal(logits(model, inputs), ref)
        with vlmeff.patch(model, method=method, keep=4) as h:
            logits(model, inputs)
        assert h.stats["visual_tokens"] == {"input": [17, 17], "before LLM": [5, 5]}
        assert [int(k[-1]) for k in h.stats["kept"]] == [16, 16]          # the newline row


def grid_pool_oracle(block, grids, shares, newlines):
    """Loop oracle of `pool` on a packed block: the free rows (all but newlines) are the given raster grids one
    after another, each average-pooled to its (h', w'); outputs follow their first row, newline rows kept."""
    free = [r for r in range(block.shape[0]) if r not in set(newlines.tolist())]
    cell, offset, start = {}, 0, 0
    for (h, w), (hp, wp) in zip(grids, shares):
        for j in range(h * w):
            cell[free[start + j]] = offset + (j // w) * hp // h * wp + (j % w) * wp // w
        offset, start = offset + hp * wp, start + h * w
    out, seen = [], set()
    for r in range(block.shape[0]):
        if r not in cell:
            out.append(block[r])
        elif cell[r] not in seen:
            seen.add(cell[r])
            out.append(block[[s for s in cell if cell[s] == cell[r]]].mean(dim=0))
    return torch.stack(out)


def pooled_anyres(family, keep):
    """(unreduced packed blocks, newline rows per block, the blocks the LLM got, the patch) of `pool` at keep."""
    model, inputs = setup(family)
    with torch.no_grad():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    newlines = newline_rows(model, inputs)
    with vlmeff.patch(model, method="pool", keep=keep) as h, Recorder(model.model) as rec:
        logits(model, inputs)
    return packed, newlines, rec.kwargs["mm_encoder_outputs"]["image"].pooler_output, h


@pytest.mark.parametrize("family", ["next", "onevision", "onevision_shrunk"])
def test_pool_on_anyres_pools_base_view_and_crop_grid_apart(family):
    """keep=20: image 0 has 16 base rows + a 6 x 8 crop grid (3 x 4 when shrunk), image 1 16 + 4 x 4; the budget is
    split over the two grids in proportion to their sizes (largest remainders)."""
    packed, newlines, given, h = pooled_anyres(family, keep=20)
    crop_grid = (3, 4) if family == "onevision_shrunk" else (6, 8)
    shares = {(6, 8): [(2, 2), (3, 5)], (3, 4): [(3, 3), (3, 3)]}[crop_grid]    # budgets 5 + 15, 11 + 9
    expected = [grid_pool_oracle(packed[0], [(4, 4), crop_grid], shares, newlines[0]),
                grid_pool_oracle(packed[1], [(4, 4), (4, 4)], [(3, 3), (3, 3)], newlines[1])]   # budgets 10 + 10
    assert h.stats["visual_tokens"]["before LLM"] == [e.shape[0] for e in expected]
    for g, e in zip(given, expected):
        torch.testing.assert_close(g, e)


# -- InternVL -----------------------------------------------------------------------------------------------------
def test_internvl_received_is_summed_over_pixel_shuffle_groups():
    """Per tile: eager received attention at the feature layer's tower layer (after q/k norm), [CLS] column
    dropped, summed over the 2 x 2 patch group behind each token."""
    model, inputs = setup("internvl")
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        attn = tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-1]
    received = attn.mean(dim=1).mean(dim=1)[:, 1:].view(3, 2, 2, 2, 2)       # [tile, row pair, 2, col pair, 2]
    oracle = received.sum(dim=(2, 4)).flatten(1)                              # [tile, 4]
    with vlmeff.patch(model, method="received", keep=2) as h:
        logits(model, inputs)
    torch.testing.assert_close(torch.stack(h.stats["scores"]), oracle, atol=1e-6, rtol=1e-5)
    assert torch.equal(torch.stack(h.stats["kept"]), oracle.topk(2).indices.sort().values)
    assert h.stats["visual_tokens"] == {"input": [4, 4, 4], "before LLM": [2, 2, 2]}     # per tile


def test_internvl_pixel_shuffle_groups_are_2x2_patch_blocks():
    model = tiny_internvl()
    from vlmeff.models.internvl import InternVLAdapter
    groups = InternVLAdapter(model).shuffle_groups(64)                      # 8 x 8 patches -> 4 x 4 tokens
    for token, members in enumerate(groups.tolist()):
        i, j = divmod(token, 4)
        assert sorted(members) == [8 * r + c for r in (2 * i, 2 * i + 1) for c in (2 * j, 2 * j + 1)]


# -- Gemma 3 ------------------------------------------------------------------------------------------------------
def test_gemma3_received_is_pooled_like_the_features():
    model, inputs = setup("gemma3")
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        attn = tower(pixel_values=inputs["pixel_values"], output_attentions=True).attentions[-1]
    oracle = attn.mean(dim=1).mean(dim=1).view(2, 4, 2, 4, 2).mean(dim=(2, 4)).flatten(1)   # avg-pool 2 x 2
    with vlmeff.patch(model, method="received", keep=2) as h:
        logits(model, inputs)
    torch.testing.assert_close(torch.stack(h.stats["scores"]), oracle, atol=1e-6, rtol=1e-5)


def test_gemma3_token_type_ids_shrink_with_the_ids():
    model, inputs = setup("gemma3")
    seen = {}
    model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    with vlmeff.patch(model, method="received", keep=1):
        logits(model, inputs)
    ids, types = seen["input_ids"], seen["token_type_ids"]
    assert ids.shape == types.shape and ids.shape[1] == inputs["input_ids"].shape[1] - 15
    assert torch.equal(types, (ids == IMAGE).long())


def test_gemma3_follow_up_turn_on_the_reduced_cache():
    """The caller's token_type_ids of turn 2 start with the full prompt's: their prefix is swapped for the reduced
    one like the ids' (here the dropped placeholders outnumber the tokens after the image, so a stale prefix would
    mark the new text tokens as image tokens, attending bidirectionally)."""
    model, inputs = setup("gemma3")
    follow_up = torch.tensor([[11, 12, 13], [13, 14, 15]])
    with vlmeff.patch(model, method="received", keep=2):
        first = generate(model, inputs, return_dict_in_generate=True)
        ids2 = torch.cat([first.sequences, follow_up], dim=1)
        grow = ids2.shape[1] - inputs["input_ids"].shape[1]
        turn2 = dict(input_ids=ids2,
                     attention_mask=torch.cat([inputs["attention_mask"], torch.ones(2, grow, dtype=torch.long)], 1),
                     token_type_ids=torch.cat([inputs["token_type_ids"], torch.zeros(2, grow, dtype=torch.long)], 1))
        kw = dict(return_dict_in_generate=True, output_logits=True)
        continued = generate(model, turn2, cache=first.cache, **kw)
        recomputed = generate(model, dict(turn2, pixel_values=inputs["pixel_values"]), **kw)
    assert torch.equal(continued.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(recomputed.logits), atol=1e-4, rtol=1e-4)


# -- every family, LLaVA and Qwen-VL included: generate modes, labels, stats --------------------------------------
@pytest.mark.parametrize("mode", GENERATE_MODES)
@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_every_generate_mode_equals_unpatched_at_full_budget(family, mode):
    """Beams and returned sequences get their own sample's images (InternVL / Gemma 3 used to hand all samples'
    features as one tensor, so that beams of sample 0 saw sample 1's) and the caller's prompt in front."""
    model, inputs = setup_any(family)
    assistant = copy.deepcopy(model) if mode == "assistant" else None
    ref = run_generate(model, inputs, mode, assistant)
    with vlmeff.patch(model, method=SCORER[family], keep=1.0):
        out = run_generate(model, inputs, mode, assistant)
    assert_same_generation(out, ref)


@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_returned_sequences_and_beams_follow_their_sample_when_reduced(family):
    """keep=0.5: every returned sequence equals its own sample's, generated alone; each row starts with the
    caller's prompt."""
    model, inputs = setup_any(family)
    kwargs = dict(max_new_tokens=3, suppress_tokens=[IMAGE], do_sample=False, num_beams=2, num_return_sequences=2)
    with vlmeff.patch(model, method=SCORER[family], keep=0.5), torch.no_grad():
        batched = model.generate(**inputs, **kwargs)
        alone = model.generate(**single(inputs), **kwargs)
    L, L0 = inputs["input_ids"].shape[1], single(inputs)["input_ids"].shape[1]
    assert batched.shape[0] == 4
    assert torch.equal(batched[:, :L], inputs["input_ids"].repeat_interleave(2, dim=0))
    assert torch.equal(batched[:2, L:], alone[:, L0:])


@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_loss_with_labels_is_the_cross_entropy_of_the_reduced_prompts(family):
    """The samples lose different numbers of tokens (different padding), so the rebuilt batch has new pad slots:
    their labels must be ignored. Oracle: cross-entropy of the logits over the reduced prompt the LLM got, labels
    built from its ids (text tokens that are attended)."""
    model, inputs = setup_any(family)
    inputs = labelled(inputs)
    with vlmeff.patch(model, method=SCORER[family], keep=0.5), Recorder(model.model) as rec, torch.no_grad():
        out = model(**inputs)
    ids, mask = rec.kwargs.get("input_ids", rec.args[0] if rec.args else None), rec.kwargs["attention_mask"]
    assert ids.shape[1] < inputs["input_ids"].shape[1] and not bool(mask.all())     # reduced, re-padded
    target = ids.masked_fill((ids == IMAGE) | (mask == 0), -100)
    oracle = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), target[:, 1:].flatten(),
                                               ignore_index=-100)
    torch.testing.assert_close(out.loss, oracle, atol=1e-6, rtol=1e-6)
    # at full budget the loss is the unpatched one, bit for bit
    with torch.no_grad():
        ref = model(**inputs).loss
        with vlmeff.patch(model, method=SCORER[family], keep=1.0):
            assert torch.equal(model(**inputs).loss, ref)


@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_stats_belong_to_the_last_call(family):
    """A call without images records no visual tokens and equal FLOPs; generate's own decode steps record nothing."""
    from vlmeff.flops import llm_prefill_flops
    model, inputs = setup_any(family)
    text = dict(input_ids=inputs["input_ids"][:, -4:], attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    cfg = model.config.text_config
    with vlmeff.patch(model, method=SCORER[family], keep=0.5) as h, torch.no_grad():
        model(**inputs)
        reduced = h.stats["visual_tokens"]
        model(**text)
        assert h.stats["visual_tokens"] == {"input": [], "before LLM": []}
        assert h.stats["kept"] == [] and h.stats["scores"] == []
        assert h.stats["prefill_flops"] == h.stats["prefill_flops_unpatched"] == h.stats["flops"]
        assert h.stats["prefill_flops"] == llm_prefill_flops(cfg, 3) + llm_prefill_flops(cfg, 4)
        assert h.stats["kv_cache_bytes"] == h.stats["kv_cache_bytes_unpatched"]
        model.generate(**inputs, max_new_tokens=2, suppress_tokens=[IMAGE])
        assert h.stats["visual_tokens"] == reduced
        model.generate(**text, max_new_tokens=2, suppress_tokens=[IMAGE])
        assert h.stats["visual_tokens"] == {"input": [], "before LLM": []}


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_pool_below_one_token_per_grid_pools_the_grids_jointly(family):
    """keep=1 on blocks of two grids (base view, crop grid): every budget >= 1 is met, the free rows pooled
    jointly into one token (their mean), in front of the kept newline rows."""
    packed, newlines, given, h = pooled_anyres(family, keep=1)
    for block, nl, got in zip(packed, newlines, given):
        free = torch.ones(block.shape[0], dtype=torch.bool)
        free[nl] = False
        torch.testing.assert_close(got, torch.cat([block[free].mean(dim=0, keepdim=True), block[nl]]))
    assert h.stats["visual_tokens"]["before LLM"] == [1 + nl.numel() for nl in newlines]


@pytest.mark.parametrize("family", EVERY_FAMILY)
def test_assisted_decoding_on_a_reduced_prompt_equals_greedy(family):
    """Prompt lookup and an (unpatched) assistant model verify their drafts against the patched model: greedy
    tokens come out (transformers runs assisted decoding at batch size 1)."""
    model, inputs = setup_any(family)
    inputs, assistant = single(inputs), copy.deepcopy(model)
    kwargs = dict(max_new_tokens=4, suppress_tokens=[IMAGE], do_sample=False)
    with vlmeff.patch(model, method=SCORER[family], keep=0.5), torch.no_grad():
        greedy = model.generate(**inputs, **kwargs)
        assert torch.equal(model.generate(**inputs, **kwargs, prompt_lookup_num_tokens=2), greedy)
        assert torch.equal(model.generate(**inputs, **kwargs, assistant_model=assistant), greedy)
    assert greedy.shape[1] == inputs["input_ids"].shape[1] + 4
