"""`visionzip` feeds the LLM the rows the reference VisionZip (dvlab-research/VisionZip, CVPR 2025) feeds it.

The oracle is written from the reference algorithm with plain loops over tokens and the unpatched model's own
weights (eager [CLS] attention computed here, not by vlmeff's capture); the patched model's LLM-input rows must equal
it, on a tiny random LLaVA and on the embedded `tiny-llava-evqa`.
"""
import math
import re

import pytest
import torch

import vlmeff
from lvlm_models import IMAGE, batch, logits, pixels, prompt, tiny_llava
from opcount import count_ops
from vlmeff.engine.rows import _visionzip
from vlmeff.models.llava import with_cls_row


def reference_rows(model, pixel_values, keep, contextual, cls_token="keep", order="reference",
                   aggregate="target+mean"):
    """Per image, the [K, D_text] rows VisionZip feeds the LLM (its `CLIPVisionTower_VisionZip.forward` + LLaVA's
    projector), for the unpatched `model`.

    Reference steps: the tower layer whose output is the feature layer gives, from its eager attention, the
    [CLS] -> patch row summed over heads, and its keys averaged over heads (`metric`). [CLS] plus the
    keep - contextual - 1 best patches are dominant, taken in sequence order. The other patches, in sequence order,
    give `contextual` targets at stride max(1, R // contextual); every other one joins the target of highest cosine
    similarity of keys (the first on ties); a contextual token = target + mean of its members. Fed: dominant, then
    contextual. Variants for the other conventions (cls_token="drop": [CLS] neither counted nor fed;
    order="raster": every token at its position) and for a mutant (aggregate="mean": mean over target and members).
    """
    tower, feature_layer = model.model.vision_tower, model.config.vision_feature_layer
    with torch.no_grad():
        hidden = tower(pixel_values, output_hidden_states=True).hidden_states
        layer = tower.encoder.layers[len(hidden) + feature_layer - 1]        # its output is hidden[feature_layer]
        features, attn = hidden[feature_layer], layer.self_attn
        h = layer.layer_norm1(hidden[feature_layer - 1])
        heads, head_dim = attn.num_heads, attn.head_dim
        q = (attn.q_proj(h) * attn.scale).unflatten(-1, (heads, head_dim))   # [n, T, H, d]
        k = attn.k_proj(h).unflatten(-1, (heads, head_dim))
        fed = []
        for i in range(features.shape[0]):
            T = features.shape[1]
            # fp32 sums as the reference's (float64 would decide near-ties differently from it)
            cls_attention = torch.stack([torch.softmax(k[i, :, head] @ q[i, 0, head], dim=0)
                                         for head in range(heads)]).sum(dim=0).tolist()
            patches = sorted(range(1, T), key=lambda t: -cls_attention[t])
            n_dominant = keep - contextual - (1 if cls_token == "keep" else 0)
            dominant = sorted(([0] if cls_token == "keep" else []) + patches[:n_dominant])
            remaining = [t for t in range(1, T) if t not in dominant]
            step = max(1, len(remaining) // contextual) if contextual else 1
            targets = [remaining[p] for p in range(0, len(remaining), step)][:contextual]
            others = [t for t in remaining if t not in targets]
            members = {t: [] for t in targets}
            if targets and others:                       # contextual=0: the rest is dropped
                # the similarities with the reference's arithmetic (normalised head-mean keys of the remaining
                # tokens, one matrix product), which decides exact and near ties of plain-background patches
                keys = k[i, remaining].mean(dim=1)
                unit = dict(zip(remaining, keys / keys.norm(dim=-1, keepdim=True)))
                sims = (torch.stack([unit[t] for t in others]) @ torch.stack([unit[g] for g in targets]).T).tolist()
                for t, row in zip(others, sims):
                    members[targets[row.index(max(row))]].append(t)      # the first of equal maxima
            tokens = {t: features[i, t] for t in dominant}
            for g in targets:
                group = members[g]
                if aggregate == "mean":
                    tokens[g] = features[i, [g] + group].mean(dim=0)
                else:
                    tokens[g] = features[i, g] + (features[i, group].mean(dim=0) if group else 0)
            sequence = dominant + targets if order == "reference" else sorted(dominant + targets)
            fed.append(model.model.multi_modal_projector(torch.stack([tokens[t] for t in sequence])))
    return fed


def patched_rows(model, inputs, keep, **options):
    """Per image, the rows the patched model hands the LLM, checked against the LLM's own inputs_embeds."""
    seen = {}
    lm = model.model.language_model
    handles = [model.model.register_forward_pre_hook(lambda m, a, kw: seen.update(outer=kw), with_kwargs=True),
               lm.register_forward_pre_hook(lambda m, a, kw: seen.update(inner=kw), with_kwargs=True)]
    try:
        with vlmeff.patch(model, "visionzip", keep=keep, **options):
            logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    rows = list(seen["outer"]["mm_encoder_outputs"]["image"].pooler_output)
    image = seen["outer"]["input_ids"] == model.config.image_token_id
    assert torch.equal(seen["inner"]["inputs_embeds"][image], torch.cat(rows))      # scattered in order
    return rows


def assert_rows_equal(got, expected):
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def rows_differ(got, expected):
    return any(g.shape != e.shape or not torch.allclose(g, e, atol=1e-4, rtol=1e-4) for g, e in zip(got, expected))


def tiny_inputs(n=2):
    ids, mask = batch([prompt([1, 5, 6], 1, [7, 8, 9]), prompt([1, 5], 1, [7, 8, 9, 10, 11])][:n])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(n))


CONVENTIONS = [dict(), dict(cls_token="drop"), dict(order="raster"), dict(cls_token="drop", order="raster")]


@pytest.mark.parametrize("keep,contextual", [(8, 2), (5, 1), (3, 2), (6, 0)])
@pytest.mark.parametrize("options", CONVENTIONS)
def test_tiny_llava_feeds_the_reference_rows(keep, contextual, options):
    model, inputs = tiny_llava(), tiny_inputs()
    got = patched_rows(model, inputs, keep, contextual=contextual, **options)
    assert_rows_equal(got, reference_rows(model, inputs["pixel_values"], keep, contextual, **options))


def test_default_is_the_reference_convention_and_the_oracle_sees_each_deviation():
    model, inputs = tiny_llava(), tiny_inputs()
    got = patched_rows(model, inputs, 8, contextual=3)
    assert [g.shape[0] for g in got] == [8, 8]                      # [CLS] + 4 patches + 3 contextual
    expected = reference_rows(model, inputs["pixel_values"], 8, 3)
    assert_rows_equal(got, expected)
    for mutant in (dict(cls_token="drop"), dict(order="raster"), dict(aggregate="mean")):
        assert rows_differ(got, reference_rows(model, inputs["pixel_values"], 8, 3, **mutant)), mutant


@pytest.mark.parametrize("options", [dict(), dict(order="raster")])
def test_full_strategy_counts_its_cls_row_among_the_dominant_tokens(options):
    model, inputs = tiny_llava("full"), tiny_inputs()
    ids, mask = batch([prompt([1, 5, 6], 1, [7, 8, 9], 17), prompt([1, 5], 1, [7, 8, 9, 10, 11], 17)])
    inputs.update(input_ids=ids, attention_mask=mask)
    with vlmeff.patch(model, "visionzip", keep=6, contextual=2, **options) as h:
        logits(model, inputs)
    assert all(rows[0] == 0 for rows in h.stats["kept"])            # [CLS] keeps its own placeholder
    got = patched_rows(model, inputs, 6, contextual=2, **options)
    assert_rows_equal(got, reference_rows(model, inputs["pixel_values"], 6, 2, **options))


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_full_budget_feeds_the_unpatched_features(strategy):
    model, inputs = tiny_llava(strategy), tiny_inputs()
    if strategy == "full":
        ids, mask = batch([prompt([1, 5, 6], 1, [7, 8, 9], 17), prompt([1, 5], 1, [7, 8, 9, 10, 11], 17)])
        inputs.update(input_ids=ids, attention_mask=mask)
    reference = logits(model, inputs)
    with vlmeff.patch(model, "visionzip", keep=1.0) as h:
        assert torch.equal(logits(model, inputs), reference)
    assert h.stats["visual_tokens"]["before LLM"] == h.stats["visual_tokens"]["input"]


def test_a_float_contextual_is_a_share_of_keep():
    model, inputs = tiny_llava(), tiny_inputs()
    got = patched_rows(model, inputs, 8, contextual=0.3)            # round(2.4) = 2
    assert_rows_equal(got, reference_rows(model, inputs["pixel_values"], 8, 2))


ACCEPTED = (r"accepted: an int count >= 0 of contextual tokens \(at most keep - 1 = 3 for keep=4\) or a float share of "
            r"the budget in \[0, 1\)")


@pytest.mark.parametrize("contextual,error", [
    (-1, ValueError), (4, ValueError), (1000, ValueError), (2.0, ValueError), (1.0, ValueError), (math.nan, ValueError),
    ("a", TypeError), (None, TypeError), (True, TypeError)])
def test_contextual_is_validated(contextual, error):
    model, inputs = tiny_llava(), tiny_inputs()
    with pytest.raises(error, match=re.escape(f"contextual={contextual!r} is not accepted; ") + ACCEPTED):
        with vlmeff.patch(model, "visionzip", keep=4, contextual=contextual):
            logits(model, inputs)


@pytest.mark.parametrize("option,value,message", [
    ("cls_token", "yes", "cls_token='yes' is not accepted; accepted: keep, drop"),
    ("order", "sorted", "order='sorted' is not accepted; accepted: reference, raster"),
])
def test_conventions_are_validated(option, value, message):
    model, inputs = tiny_llava(), tiny_inputs()
    with pytest.raises(ValueError, match=message):
        with vlmeff.patch(model, "visionzip", keep=4, **{option: value}):
            logits(model, inputs)


def test_cls_takes_the_first_placeholder_and_patches_keep_theirs():
    cls_rows, kept = torch.zeros(2, 1, 1), torch.ones(2, 3, 1)
    out, slots = with_cls_row(cls_rows, kept, torch.tensor([[2, 5, 7], [0, 1, 5]]), own_placeholder=False)
    assert slots.tolist() == [[0, 2, 5, 7], [0, 1, 2, 5]]          # 0 and 1 taken: the patch of row 1 moves to 2
    assert out[:, :, 0].tolist() == [[0, 1, 1, 1]] * 2
    _, slots = with_cls_row(cls_rows, kept, torch.tensor([[2, 5, 7], [0, 1, 5]]), own_placeholder=True)
    assert slots.tolist() == [[0, 3, 6, 8], [0, 1, 2, 6]]          # "full": [CLS] is placeholder 0, patch r is r + 1
    model, inputs = tiny_llava(), tiny_inputs()
    with vlmeff.patch(model, "visionzip", keep=6, contextual=2, order="raster") as h:
        logits(model, inputs)
    for rows in h.stats["kept"]:
        assert rows.shape == (6,) and rows[0] == 0 and bool((rows.diff() > 0).all())


def test_reduction_is_sync_free_with_pinned_op_count():
    n, N = 2, 256
    x, metric, scores = torch.randn(n, N, 96), torch.randn(n, N, 24), torch.rand(n, N)
    prot, free = torch.arange(0), torch.arange(N)
    options = dict(contextual=10, cls_token="keep", order="reference")
    (out, _, rows), counter = count_ops(_visionzip, x, scores, metric, prot, free, 64, options)
    assert out.shape == (n, 63, 96) and rows.shape == (n, 63)       # + [CLS] from the adapter = 64
    assert counter.syncs == 0, counter.ops
    assert counter.total <= 21, counter.ops           # 4 sorts, 3 gathers, 2 bmm, one-hot, mean, cat


@pytest.mark.parametrize("n", [1, 3])
def test_full_budget_returns_every_block_unchanged_with_its_rows(n):
    # k == F: the blocks as they are, every row kept, for any number of blocks (mutation survivor: a row table of
    # 2 rows expanded to n passed with the usual 2)
    x, metric, scores = torch.randn(n, 20, 8), torch.randn(n, 20, 4), torch.rand(n, 20)
    options = dict(contextual=2, cls_token="keep", order="reference")
    out, sizes, rows = _visionzip(x, scores, metric, torch.arange(0), torch.arange(20), 20, options)
    assert out is x and sizes is None and torch.equal(rows, torch.arange(20).expand(n, 20))


@pytest.mark.parametrize("options", CONVENTIONS)
def test_llava_next_blocks_have_no_cls_slot(options):
    """LLaVA-NeXT's packed blocks carry newline rows and no [CLS]: keep - contextual dominant + contextual rows,
    newlines outside the budget, under every convention."""
    from test_lvlm_families import newline_rows, setup
    model, inputs = setup("next")
    newlines = newline_rows(model, inputs)
    with vlmeff.patch(model, "visionzip", keep=10, contextual=2, **options) as h:
        logits(model, inputs)
    assert h.stats["visual_tokens"]["before LLM"] == [10 + nl.numel() for nl in newlines]
    for rows, nl in zip(h.stats["kept"], newlines):
        assert set(nl.tolist()) <= set(rows.tolist())


# -- the embedded model ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_inputs():
    pytest.importorskip("easy_vqa")
    from vlmeff.data import easyvqa
    model, processor = vlmeff.zoo.load("tiny-llava-evqa")
    images = easyvqa.load_images("test")
    questions = ["what shape is in the image?", "what color is the shape?", "is there a circle?"] * 3
    messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    texts = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[images[i] for i in range(len(questions))], text=texts, padding=True,
                       return_tensors="pt")
    return model, dict(inputs)


@pytest.mark.parametrize("keep,contextual", [(64, 10), (32, 5), (16, 2)])
@pytest.mark.parametrize("options", [dict(), dict(cls_token="drop", order="raster")])
def test_embedded_model_feeds_the_reference_rows(zoo_inputs, keep, contextual, options):
    model, inputs = zoo_inputs
    got = patched_rows(model, inputs, keep, contextual=contextual, **options)
    expected = reference_rows(model, inputs["pixel_values"], keep, contextual, **options)
    assert_rows_equal(got, expected)
    if not options:
        for mutant in (dict(cls_token="drop"), dict(aggregate="mean")):
            assert rows_differ(got, reference_rows(model, inputs["pixel_values"], keep, contextual, **mutant))


def test_embedded_model_default_options_are_visionzip_54_plus_10(zoo_inputs):
    model, inputs = zoo_inputs
    assert_rows_equal(patched_rows(model, inputs, 64), reference_rows(model, inputs["pixel_values"], 64, 10))


@pytest.mark.parametrize("strategy", ["default", "full"])
def test_keep_one_feeds_only_the_cls_token(strategy):
    """keep=1 leaves no dominant patch and no contextual token: the LLM gets the [CLS] row alone (found by the
    property test: the empty patch rows once gave [CLS] no placeholder)."""
    model, inputs = tiny_llava(strategy), tiny_inputs()
    if strategy == "full":                           # 17 placeholders: [CLS] + 16 patches
        ids, mask = batch([prompt([1, 5, 6], 1, [7, 8, 9], 17), prompt([1, 5], 1, [7, 8, 9, 10, 11], 17)])
        inputs.update(input_ids=ids, attention_mask=mask)
    with vlmeff.patch(model, "visionzip", keep=1) as h:
        logits(model, inputs)
    assert h.stats["visual_tokens"]["before LLM"] == [1] * len(h.stats["visual_tokens"]["input"])
