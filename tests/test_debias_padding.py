"""Attention Debiasing's padding suppression (`debiased`, padding="pixels"): the tokens of square-padding patches
score 0 at the first stage and the budget shrinks to the other tokens, as the reference's `generate_pad_mask`
(written here again, from its definition, as the oracle) does from the original image size."""
import numpy as np
import pytest
import torch
from PIL import Image

import vlmeff
from lvlm_models import IMAGE, batch, logits, pixels, prompt, setup_any, tiny_llava
from opcount import OpCounter
from test_llm_stage import eager_rows
from vlmeff.pruners import debias

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
FILL, TOLERANCE = debias.pad_fill(CLIP_MEAN, CLIP_STD)


def reference_pad_ratios(width, height, grid, size):
    """[grid * grid] 1 - each patch's overlap with the content rectangle of a (width, height) image padded to a
    square and resized to size x size, the content centred (the reference's rule, loop by loop)."""
    p = size / grid
    if width < height:
        pad = (height - width) / (2 * height) * size
        left, right, top, bottom = pad, size - pad, 0, size
    elif height < width:
        pad = (width - height) / (2 * width) * size
        left, right, top, bottom = 0, size, pad, size - pad
    else:
        left, right, top, bottom = 0, size, 0, size
    ratios = []
    for i in range(grid):
        for j in range(grid):
            w = max(0.0, min((j + 1) * p, right) - max(j * p, left))
            h = max(0.0, min((i + 1) * p, bottom) - max(i * p, top))
            ratios.append(1 - w * h / (p * p))
    return np.array(ratios)


def padded_pixels(width, height, size, seed=0):
    """[1, 3, size, size] normalised pixels of random content (width, height) scaled to fit and centred, the rest
    the fill colour: pixel-aligned square padding."""
    g = torch.Generator().manual_seed(seed)
    x = FILL.view(1, 3, 1, 1).repeat(1, 1, size, size)
    w, h = round(width * size / max(width, height)), round(height * size / max(width, height))
    left, top = (size - w) // 2, (size - h) // 2
    x[:, :, top:top + h, left:left + w] = torch.randn(1, 3, h, w, generator=g)
    return x


@pytest.mark.parametrize("width,height", [(16, 32), (24, 32), (32, 20), (32, 8), (32, 32)])
def test_shares_equal_the_reference_rule_where_the_padding_is_pixel_aligned(width, height):
    shares = debias.padding_shares(padded_pixels(width, height, 32), 8, FILL, TOLERANCE)[0].numpy()
    np.testing.assert_allclose(shares, reference_pad_ratios(width, height, 4, 32), atol=1e-7)


@pytest.mark.parametrize("width,height", [(640, 480), (480, 640), (500, 333), (336, 200), (1000, 300)])
def test_shares_of_the_processors_padding_match_the_reference_rule(width, height):
    """transformers' LlavaImageProcessor(do_pad=True), as LLaVA-1.5 preprocesses: bicubic resizing blurs at most
    the two pixel rows or columns at the content's edge (2 / 14 of a patch); the masks at both of the reference's
    thresholds are the reference's."""
    from transformers import LlavaImageProcessor
    processor = LlavaImageProcessor(do_pad=True, size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    content = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    pixels = processor(Image.fromarray(content), return_tensors="pt")["pixel_values"]
    fill, tolerance = debias.pad_fill(processor.image_mean, processor.image_std)
    shares = debias.padding_shares(pixels, 14, fill, tolerance)[0].numpy()
    expected = reference_pad_ratios(width, height, 24, 336)
    assert np.abs(shares - expected).max() <= 2 / 14 + 1e-6
    for threshold in (0.5, 0.01):
        assert ((shares <= threshold) == (expected <= threshold)).all()


def test_fill_coloured_content_inside_the_image_is_not_padding():
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x[:, :, 8:24, 0:30] = FILL.view(1, 3, 1, 1)          # neither a full row nor a full column
    assert debias.padding_shares(x, 8, FILL, TOLERANCE).max() == 0
    x[:, :, 8:24, :] = FILL.view(1, 3, 1, 1)             # full rows: indistinguishable from padding
    assert debias.padding_shares(x, 8, FILL, TOLERANCE)[0].tolist() == [0.0] * 4 + [1.0] * 8 + [0.0] * 4


def test_pad_fill_is_the_processors_8_bit_mean_colour():
    fill, tolerance = debias.pad_fill(CLIP_MEAN, CLIP_STD)
    levels = torch.tensor([int(m * 255) for m in CLIP_MEAN], dtype=torch.float64)       # 122, 116, 104
    expected = (levels / 255 - torch.tensor(CLIP_MEAN, dtype=torch.float64)) / torch.tensor(CLIP_STD,
                                                                                            dtype=torch.float64)
    torch.testing.assert_close(fill, expected.float())
    torch.testing.assert_close(tolerance, (0.5 / 255 / torch.tensor(CLIP_STD)).float())


# -- in the engine ------------------------------------------------------------------------------------------------
def padded_inputs(rows):
    """tiny LLaVA's two samples (32 px images, 4 x 4 patches of 8 px); sample 0's top `rows` pixel rows padding."""
    model, inputs = setup_any("llava")
    pixels = inputs["pixel_values"].clone()
    pixels[0, :, :rows] = FILL.view(3, 1, 1)
    return model, dict(inputs, pixel_values=pixels)


def kept_visual(model, inputs, **options):
    with vlmeff.patch(model, "debiased", schedule="llava-1.5", **options) as patch:
        logits(model, inputs)
        kept = patch.stats["llm_kept"]
        visual = inputs["input_ids"] == IMAGE
        return [set(kept[b][visual[b]].nonzero()[:, 0].tolist()) for b in range(2)], patch


def oracle(model, inputs, keep, content):
    """Per sample, the visual ordinals the reference keeps: the score layer's eager attention row x the preset's
    weights x the padding mask, top min(keep, content tokens)."""
    rows = eager_rows(model, inputs)[0]
    visual = inputs["input_ids"] == IMAGE
    preset = debias.PRESETS["llava-1.5"]
    weights = 1 / debias.trend("cubic", preset["coefficients"], torch.arange(16.0))
    out = []
    for b in range(2):
        scores = rows[b][visual[b]] * weights * content[b]
        out.append(set(scores.topk(min(keep, int(content[b].sum()))).indices.tolist()))
    return out


@pytest.mark.parametrize("keep", [12, 6])
def test_padding_tokens_score_zero_and_the_budget_shrinks_to_the_content(keep):
    model, inputs = padded_inputs(16)                     # sample 0: its top 8 tokens are padding
    content = torch.ones(2, 16)
    content[0, :8] = 0
    kept, patch = kept_visual(model, inputs, keep=keep)
    assert kept == oracle(model, inputs, keep, content)
    assert [len(k) for k in kept] == [min(keep, 8), keep]
    assert not kept[0] & set(range(8))
    assert patch.config["padding"] == "pixels" and patch.config["pad_threshold"] == 0.5


def test_padding_off_ranks_every_token():
    model, inputs = padded_inputs(16)
    kept, patch = kept_visual(model, inputs, keep=12, padding="off")
    assert kept == oracle(model, inputs, 12, torch.ones(2, 16))


@pytest.mark.parametrize("base,threshold,padded", [("fastv", None, 4), ("pdrop", None, 8), ("fastv", 0.4, 8),
                                                   ("fastv", 0.6, 4)])
def test_thresholds_on_a_half_padded_patch_row(base, threshold, padded):
    """12 padding pixel rows: patch row 0 is all padding, row 1 half (share 0.5). FastV's 0.5 keeps a token whose
    share is not above it; PyramidDrop's 0.01 suppresses row 1 as well."""
    model, inputs = padded_inputs(12)
    options = dict(keep=16) if base == "fastv" else dict(base="pdrop", ratios=[1.0, 1.0, 1.0], schedule=None)
    if base == "pdrop":
        schedule = vlmeff.calibrate(model, [inputs], method="debiased", base="pdrop", progress=False)
        options["schedule"] = schedule
        with vlmeff.patch(model, "debiased", **options, **({} if threshold is None else
                                                             dict(pad_threshold=threshold))) as patch:
            logits(model, inputs)
            assert patch.config["pad_threshold"] == 0.01
            kept = patch.stats["llm_kept"][0][inputs["input_ids"][0] == IMAGE]
    else:
        extra = {} if threshold is None else dict(pad_threshold=threshold)
        sets, _ = kept_visual(model, inputs, **options, **extra)
        kept = torch.zeros(16, dtype=torch.bool)
        kept[list(sets[0])] = True
    assert kept.tolist() == [False] * padded + [True] * (16 - padded)


def test_a_cls_row_in_the_features_is_content():
    model = tiny_llava("full")                             # 17 tokens per image: [CLS] first
    ids, mask = batch([prompt([1, 5], 1, [7, 8], 17), prompt([1], 1, [7, 8, 9], 17)])
    inputs = dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(2))
    inputs["pixel_values"][0, :, :16] = FILL.view(3, 1, 1)
    with vlmeff.patch(model, "debiased", keep=17, schedule="llava-1.5") as patch:
        logits(model, inputs)
        kept = patch.stats["llm_kept"][0][ids[0] == IMAGE]
    assert kept.tolist() == [True] + [False] * 8 + [True] * 8


def test_behind_a_method_before_the_llm_it_says_to_turn_padding_off():
    model, inputs = padded_inputs(16)
    with pytest.raises(ValueError, match="padding='off'"):
        vlmeff.patch(model, [("pool", {"keep": 8}), ("debiased", {"keep": 4, "schedule": "llava-1.5"})])
    assert not hasattr(model, "_vlmeff_patch")
    with vlmeff.patch(model, [("pool", {"keep": 8}),
                              ("debiased", {"keep": 4, "schedule": "llava-1.5", "padding": "off"})]) as patch:
        out = logits(model, inputs)
        assert patch.config["stages"][1]["padding"] == "off"
    assert out.shape[0] == 2 and torch.isfinite(out).all()


@pytest.mark.parametrize("options,words", [(dict(padding="yes"), "pixels, off"),
                                           (dict(pad_threshold=1.5), "a share in [0, 1]"),
                                           (dict(pad_threshold="0.5"), "a share in [0, 1]")])
def test_bad_padding_options_are_clear_errors(options, words):
    model, _ = setup_any("llava")
    with pytest.raises((TypeError, ValueError), match=words.replace("[", r"\[").replace("]", r"\]")):
        vlmeff.patch(model, "debiased", keep=4, schedule="llava-1.5", **options)


def test_padding_adds_no_host_read():
    model, inputs = padded_inputs(16)
    with vlmeff.patch(model, "debiased", keep=4, schedule="llava-1.5", padding="off"), OpCounter() as off, \
            torch.no_grad():
        model(**inputs)
    with vlmeff.patch(model, "debiased", keep=4, schedule="llava-1.5"), OpCounter() as on, torch.no_grad():
        model(**inputs)
    assert on.syncs == off.syncs


def test_other_families_never_square_pad():
    """Qwen2-VL resizes to whole patches: nothing to suppress, so the default changes nothing there."""
    model, inputs = setup_any("qwen2")
    with vlmeff.patch(model, "debiased", keep=4, schedule=vlmeff.calibrate(model, [inputs], method="debiased",
                                                                          progress=False)) as on:
        a = logits(model, inputs)
        kept_on = on.stats["llm_kept"]
    with vlmeff.patch(model, "debiased", keep=4, padding="off", schedule=on.config["schedule"]) as off:
        b = logits(model, inputs)
        assert torch.equal(kept_on, off.stats["llm_kept"])
    assert torch.equal(a, b)
