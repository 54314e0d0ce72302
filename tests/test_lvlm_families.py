"""Pre-LLM visual-token reduction on LLaVA-NeXT, LLaVA-OneVision, InternVL and Gemma 3 (tiny random models)."""
import copy

import pytest
import torch
from transformers import (CLIPVisionConfig, Gemma3Config, Gemma3ForConditionalGeneration, InternVLConfig,
                          InternVLForConditionalGeneration, LlamaConfig, LlavaNextConfig,
                          LlavaNextForConditionalGeneration, LlavaOnevisionConfig,
                          LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig)

import vlmeff
from lvlm_models import Recorder, generate, logits

IMAGE, PAD = 100, 0
TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
            initializer_range=0.2)
TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4)
PINPOINTS = [[32, 64], [64, 32], [64, 64]]     # 32 px views of 4 x 4 patches: 1 x 2, 2 x 1 or 2 x 2 crops


# -- tiny models --------------------------------------------------------------------------------------------------
def tiny_next():
    torch.manual_seed(0)
    cfg = LlavaNextConfig(vision_config=CLIPVisionConfig(**TOWER, image_size=32, patch_size=8),
                          text_config=LlamaConfig(**TEXT), image_token_id=IMAGE, image_grid_pinpoints=PINPOINTS)
    return LlavaNextForConditionalGeneration(cfg).eval()


def tiny_onevision(aspect="anyres_max_9"):
    torch.manual_seed(0)
    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**TOWER, image_size=32, patch_size=8),
                               text_config=Qwen2Config(**TEXT), image_token_id=IMAGE, video_token_id=101,
                               image_grid_pinpoints=PINPOINTS, vision_aspect_ratio=aspect)
    return LlavaOnevisionForConditionalGeneration(cfg).eval()


def tiny_internvl():
    torch.manual_seed(0)
    cfg = InternVLConfig(vision_config=dict(**TOWER, image_size=[32, 32], patch_size=[8, 8], use_qk_norm=True),
                         text_config=dict(model_type="qwen2", **TEXT), image_token_id=IMAGE)
    model = InternVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():                       # make the q/k norms matter (they start as all-ones scales)
        for layer in model.model.vision_tower.encoder.layer:
            layer.attention.q_norm.weight.uniform_(0.5, 2.0)
            layer.attention.k_norm.weight.uniform_(0.5, 2.0)
    return model


def tiny_gemma3():
    """SigLIP 64 px / patch 8 (8 x 8 patches) pooled to 4 x 4 = 16 tokens per image; sliding + full LM layers."""
    torch.manual_seed(0)
    text = dict(TEXT, head_dim=16, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    cfg = Gemma3Config(vision_config=dict(**TOWER, image_size=64, patch_size=8), text_config=text,
                       mm_tokens_per_image=16, image_token_id=IMAGE, boi_token_index=98, eoi_token_index=99)
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():                       # the projector starts at zero: give the images a voice
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.3)
    return model


# -- inputs -------------------------------------------------------------------------------------------------------
def pad_left(prompts):
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), PAD)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):], mask[i, L - len(p):] = torch.tensor(p), 1
    return ids, mask


def prompts_for(counts):
    """Two samples with different text lengths, one image run each (`counts` placeholders)."""
    heads, tails = [[1, 5, 6], [1, 5]], [[98], [98]]
    return [h + [IMAGE] * c + t + [7, 8, 9] for h, c, t in zip(heads, counts, tails)]


def anyres_inputs(model):
    """Image 0: 40 x 60 px -> base + 2 x 2 crops; image 1: 30 x 30 px -> base + 1 x 2 crops (3 of 5 view slots)."""
    pixel_values = torch.randn(2, 5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    sizes = torch.tensor([[40, 60], [30, 30]])
    counts = [f.shape[0] for f in model.model.get_image_features(pixel_values, sizes).pooler_output]
    ids, mask = pad_left(prompts_for(counts))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, image_sizes=sizes)


def internvl_inputs(model):
    """Sample 0: an image of 2 tiles (2 x 4 tokens), sample 1: an image of 1 tile."""
    ids, mask = pad_left(prompts_for([8, 4]))
    pixel_values = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values)


def gemma3_inputs(model):
    ids, mask = pad_left(prompts_for([16, 16]))
    pixel_values = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, token_type_ids=(ids == IMAGE).long())


FAMILIES = {
    "next": (tiny_next, anyres_inputs),
    "onevision": (tiny_onevision, anyres_inputs),
    "onevision_shrunk": (lambda: tiny_onevision("anyres_max_1"), anyres_inputs),   # big crop grids interpolated
    "internvl": (tiny_internvl, internvl_inputs),
    "gemma3": (tiny_gemma3, gemma3_inputs),
}
SCORER = {"next": "cls", "onevision": "received", "onevision_shrunk": "received", "internvl": "received",
          "gemma3": "received"}


def setup(family):
    build, inputs = FAMILIES[family]
    model = build()
    return model, inputs(model)


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


@pytest.mark.parametrize("family", ["next", "onevision", "onevision_shrunk"])
def test_pool_on_anyres_pools_base_view_and_crop_grid_apart(family):
    """keep=20: image 0 has 16 base rows + a 6 x 8 crop grid (3 x 4 when shrunk), image 1 16 + 4 x 4; the budget is
    split over the two grids in proportion to their sizes (largest remainders)."""
    model, inputs = setup(family)
    with torch.no_grad():
        packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    newlines = newline_rows(model, inputs)
    with vlmeff.patch(model, method="pool", keep=20) as h, Recorder(model.model) as rec:
        logits(model, inputs)
    given = rec.kwargs["mm_encoder_outputs"]["image"].pooler_output
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
        continued = generate(model, turn2, past_key_values=first.past_key_values, **kw)
        recomputed = generate(model, dict(turn2, pixel_values=inputs["pixel_values"]), **kw)
    assert torch.equal(continued.sequences, recomputed.sequences)
    torch.testing.assert_close(torch.stack(continued.logits), torch.stack(recomputed.logits), atol=1e-4, rtol=1e-4)
