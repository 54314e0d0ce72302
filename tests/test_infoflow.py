"""VFlowOpt (`infoflow`) across the pre-LLM and in-LLM engines, on tiny random LVLMs of the LLaVA and Qwen-VL lines
and the bundled models: full budget is the unpatched model; the context map equals eager attention's; the patch
entropy equals a by-hand histogram; every LLM stage keeps the top tower scores; the search is deterministic, meets
its budget and beats random settings; schedules round-trip and refuse another model."""
import json
import math

import numpy as np
import pytest
import torch

import vlmeff
from lvlm_models import EVERY_FAMILY, GENERATE_MODES, generate, logits, run_generate, setup_any
from vlmeff.calibration import calibrate, infoflow_bounds, task_batches
from vlmeff.pruners import infoflow, stages

FAMILIES = [f for f in EVERY_FAMILY if f not in ("gemma3",)]


def stage_count(model):
    with vlmeff.patch(model, "infoflow") as patch:
        return len(patch.config["layers"])


def pruning(model, keep=0.5, ratios=(0.75, 0.5)):
    """A pruning setting: the last of `ratios` for each of the model's LLM stages (one on a 2-layer decoder)."""
    return dict(keep=keep, ratios=list(ratios[-stage_count(model):]))


def full(model):
    """keep 1.0 in the tower and at every LLM stage: nothing dropped, everything scored."""
    return dict(keep=1.0, ratios=[1.0] * stage_count(model))


# -- full budget: the unpatched model ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_full_budget_is_identical_and_unpatch_restores(family):
    model, inputs = setup_any(family)
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    with vlmeff.patch(model, "infoflow", **full(model)) as patch:
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs), ref_tokens)
        assert patch.stats["llm_scores"]                         # the LLM stages ranked
    with vlmeff.patch(model, "infoflow") as patch:
        generate(model, inputs)
        assert patch.stats["prefill_flops"] < patch.stats["prefill_flops_unpatched"]
        tokens = patch.stats["visual_tokens"]
        assert sum(tokens["before LLM"]) < sum(tokens["input"])
    assert torch.equal(logits(model, inputs), ref_logits)
    assert torch.equal(generate(model, inputs), ref_tokens)


@pytest.mark.parametrize("mode", ["beams", "sample_n"])
def test_pruned_beams_and_returned_sequences_rank_each_copy_by_its_sample(mode):
    """generate expands the batch (beams, n sequences) after the tower: the LLM stages still get every row's scores;
    each copy keeps what its sample alone keeps."""
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "infoflow", keep=0.5, ratios=[0.5, 0.25]) as patch:
        run_generate(model, inputs, mode, None)
        scores = patch.stats["llm_scores"][0].scores
    copies = GENERATE_MODES[mode].get("num_beams", GENERATE_MODES[mode].get("num_return_sequences"))
    assert scores.shape[0] == 2 * copies
    assert torch.equal(scores, scores[::copies].repeat_interleave(copies, dim=0))
    assert not torch.equal(scores[0], scores[-1])


# -- pruned: labels (every generate mode, batch against each sample alone: tests/test_llm_stage.py's PRUNED) -------
def test_labels_give_the_reduced_sequences_loss():
    from lvlm_models import labelled
    model, inputs = setup_any("llava")
    inputs = labelled(inputs)
    with vlmeff.patch(model, "infoflow", **full(model)):
        full_loss = model(**inputs).loss
    torch.testing.assert_close(full_loss, model(**inputs).loss)
    with vlmeff.patch(model, "infoflow", keep=0.5, ratios=[0.5, 0.25]):
        loss = model(**inputs).loss
    assert torch.isfinite(loss) and not torch.isclose(loss, full_loss)


# -- the scores: eager attention's context map, a by-hand entropy --------------------------------------------------
def eager_context(model, inputs, layer, threshold):
    """VFlowOpt's map from the tower's eager attention (written here, as the reference computes it on its N x N
    head-mean matrix; an empty context set takes the most-received token): [n_img, T] over the tower tokens."""
    model.set_attn_implementation({"vision_config": "eager"})
    try:
        with torch.no_grad():
            attn = model.model.vision_tower(inputs["pixel_values"], output_attentions=True).attentions[layer]
    finally:
        model.set_attn_implementation({"vision_config": "sdpa"})
    maps = []
    for a in attn.double().mean(1):
        received = a.mean(0)
        context = torch.nonzero(received > threshold * received.mean())[:, 0]
        if context.numel() == 0:
            context = received.argmax()[None]
        maps.append(a[context].mean(0))
    return torch.stack(maps)


@pytest.mark.parametrize("threshold", [0.0, 1.0, 1.5, 1e6])
def test_context_map_equals_eager_attention(threshold):
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "infoflow", keep=0.5, threshold=threshold) as patch:
        model(**inputs)
        scores = torch.stack(patch.stats["scores"])
        kept = patch.stats["kept"]
    expected = eager_context(model, inputs, model.config.vision_config.num_hidden_layers - 2, threshold)[:, 1:]
    torch.testing.assert_close(scores.double(), expected, atol=1e-6, rtol=1e-5)
    for rows, s in zip(kept, expected):                               # the tower stage keeps the top half
        assert set(rows.tolist()) == set(s.topk(8).indices.tolist())


def test_context_attention_and_weighted_rows_by_hand():
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8)
    a = (q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.3).softmax(-1).mean(1)       # [2, 6, 6]
    received = a.mean(1)
    for t in (0.0, 1.2, 100.0):
        got = infoflow.context_attention(q, k, 0.3, t, chunk=4)
        for b in range(2):
            g = received[b] > t * received[b].mean()
            g = g if g.any() else received[b] == received[b].max()
            torch.testing.assert_close(got[b], a[b][g].mean(0), atol=1e-6, rtol=1e-5)


def numpy_entropy(levels):
    counts = np.bincount(levels.ravel(), minlength=256) / levels.size
    nz = counts[counts > 0]
    return float(-(nz * np.log2(nz)).sum())


def test_patch_entropy_by_hand():
    """Two 2 x 2 patches of a 2 x 4 grey image: 'pixels' undoes the normalisation, 'reference' wraps x * 255."""
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    grey = np.array([[0, 0, 10, 20], [0, 0, 30, 40]], dtype=np.float64)        # intensities
    pixels = torch.tensor((grey / 255 - 0.5) / 0.25).float().expand(1, 3, 2, 4).clone()
    got = infoflow.patch_entropy(pixels, 2, "pixels", mean, std)
    torch.testing.assert_close(got, torch.tensor([[0.0, 2.0]]), atol=1e-5, rtol=0)
    # reference: normalised -2.0 -> -510 -> wraps to 2; x 0.3333 x 3 = 1.9998 -> 2
    wrapped = np.remainder(np.trunc(((grey / 255 - 0.5) / 0.25) * 255), 256)
    levels = np.round(wrapped * 0.3333 * 3).astype(int)
    expected = [numpy_entropy(levels[:, :2]), numpy_entropy(levels[:, 2:])]
    got = infoflow.patch_entropy(pixels, 2, "reference")
    torch.testing.assert_close(got, torch.tensor([expected]).float(), atol=1e-5, rtol=0)
    assert levels[0, 0] == 2


def test_entropy_term_is_added_to_the_context_map():
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "infoflow", keep=0.5) as patch:
        model(**inputs)
        context = torch.stack(patch.stats["scores"])
    with vlmeff.patch(model, "infoflow", keep=0.5, entropy_weight=0.5, entropy="reference") as patch:
        model(**inputs)
        weighted = torch.stack(patch.stats["scores"])
    entropy = infoflow.patch_entropy(inputs["pixel_values"], 8, "reference")
    torch.testing.assert_close(weighted, context + 0.5 * entropy.softmax(-1))


# -- the LLM stages rank by the tower's scores ---------------------------------------------------------------------
def protected_rows(model, inputs):
    """Per image, the rows the family always keeps (LLaVA-NeXT's newlines), from an adapter's own encode."""
    from vlmeff.models import find_adapter
    adapter = find_adapter(model)
    with torch.no_grad():          # this adapter's encode sets the layout its rows and grids are read from
        features = adapter.encode({k: inputs[k] for k in adapter.image_kwargs if k in inputs})
    return adapter, adapter.protected_rows(features)


@pytest.mark.parametrize("family", ["llava", "qwen2", "next"])
def test_llm_stages_keep_the_top_tower_scores(family):
    """Each LLM stage ranks the kept rows by their tower scores; protected rows (newlines) score 1, as the
    reference hands them on, and so stay."""
    model, inputs = setup_any(family)
    _, protected = protected_rows(model, inputs)
    with vlmeff.patch(model, "infoflow", **pruning(model, 0.75, (0.5, 0.25))) as patch:
        model(**inputs)
        stats = patch.stats
        layers = patch.config["layers"]
    handed = [s.masked_fill(p, 1.0) for s, p in zip(stats["scores"], protected)]
    kept_scores = torch.cat([s[r] for s, r in zip(handed, stats["kept"])])
    first = stats["llm_scores"][0]
    visual = first.visual_input
    ordinal = visual.flatten().cumsum(0).view_as(visual) - 1
    expected = torch.where(visual, kept_scores[ordinal.clamp(min=0)], 0)
    torch.testing.assert_close(first.scores.float(), expected.float())       # the stage ranks the tower's scores
    alive = stats["llm_kept"]
    final = stats["visual_tokens"][f"after LLM layer {layers[-1]}"]
    for b in range(visual.shape[0]):
        top = expected[b].masked_fill(~visual[b], -1).topk(final[b]).indices
        assert set(torch.nonzero(alive[b] & visual[b])[:, 0].tolist()) == set(top.tolist())
    newlines = sum(int(p.sum()) for p in protected)
    assert (family == "next") == (newlines > 0) and int((expected == 1.0).sum()) == newlines


def test_llm_stage_without_tower_scores_is_a_clear_error():
    """A direct call of the base model skips the tower stage (it wraps the model's forward): no scores, an error,
    also right after a call that had them."""
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "infoflow", keep=1.0), torch.no_grad():
        model(**inputs)
        with pytest.raises(ValueError, match="vision tower's scores"):
            model.model(**inputs)


# -- options, errors, config -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family, kwargs, error, words", [
    ("llava", dict(threshold=-1.0), ValueError, "threshold=-1.0"),
    ("llava", dict(threshold=float("nan")), ValueError, "threshold=nan"),
    ("llava", dict(entropy_weight="high"), TypeError, "entropy_weight='high'"),
    ("llava", dict(entropy="wrapped"), ValueError, "entropy='wrapped'"),
    ("llava", dict(image_std=(0.2, 0.0, 0.2)), ValueError, "image_std"),
    ("llava", dict(ratios=[0.5]), ValueError, "ratios=[0.5]"),
    ("llava", dict(radius=3), TypeError, "unknown option"),
    ("qwen2", dict(entropy_weight=0.5), ValueError, "one tower patch per feature row"),
    ("llava", dict(schedule="nowhere.json"), ValueError, "not a file"),
])
def test_bad_options_are_clear_errors(family, kwargs, error, words):
    model, _ = setup_any(family)
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        vlmeff.patch(model, "infoflow", **kwargs)
    assert not hasattr(model, "_vlmeff_patch")


def test_defaults_are_the_released_25_percent_setting_scaled_from_28_layers():
    model, _ = setup_any("llava")                # a 4-layer decoder: layers 9, 18 of 28 -> 1, 3
    with vlmeff.patch(model, "infoflow") as patch:
        c = patch.config
    assert c["keep"] == stages.VFLOWOPT_25["vit_keep"] and c["threshold"] == stages.VFLOWOPT_25["threshold"]
    assert c["layers"] == [1, 3] and c["entropy_weight"] == 0.0
    r_1, r_2 = stages.VFLOWOPT_25["llm_keep"]
    assert c["ratios"] == [r_1, r_1 * r_2]
    assert stages.default_schedule("infoflow", 28)[0] == (9, 18)


def test_recycling_where_images_are_one_stacked_tensor_is_refused():
    model, _ = setup_any("internvl")
    with pytest.raises(ValueError, match="recycle=True"):
        vlmeff.patch(model, "infoflow", recycle=True)
    vlmeff.patch(model, "infoflow").unpatch()


def test_a_video_only_call_leaves_the_video_be():
    """The tower stage reduces images only; a call with a video and no image is not pruned (no error)."""
    from lvlm_models import pad_left
    model, _ = setup_any("onevision")
    pixels = torch.randn(1, 2, 3, 32, 32)
    with torch.no_grad():
        features = model.model.get_video_features(pixels)
    n = features.pooler_output.shape[:-1].numel()                      # [videos, tokens, D]: one placeholder each
    ids, mask = pad_left([[5, 6] + [model.config.video_token_id] * n + [7, 8]])
    video = dict(input_ids=ids, attention_mask=mask, pixel_values_videos=pixels)
    ref = logits(model, video)
    with vlmeff.patch(model, "infoflow", keep=0.5) as patch:
        assert torch.equal(logits(model, video), ref)
        assert patch.stats["visual_tokens"]["LLM input"] == [0]


def test_a_method_at_a_site_infoflow_holds_is_refused():
    model, _ = setup_any("llava")
    with pytest.raises(ValueError, match="one method per site"):
        vlmeff.patch(model, [("infoflow", {}), ("fastv", {"keep": 0.5})])
    with vlmeff.patch(model, [("infoflow", {"keep": 0.5})]) as patch:
        assert patch.config["method"] == "infoflow"


def test_prefill_adds_no_host_read_over_its_two_engines():
    """The tower stage reads the host once (the prompt layout), the LLM stages once (their counts); decoding none."""
    from opcount import OpCounter
    model, inputs = setup_any("llava")

    def syncs(method, **options):
        with vlmeff.patch(model, method, **options), torch.no_grad():
            with OpCounter() as prefill:
                model(**inputs, use_cache=True)
        return prefill.syncs

    assert syncs("infoflow", keep=0.5, ratios=[0.5, 0.25]) == syncs("received", keep=0.5) + 1


# -- the budget constraint ------------------------------------------------------------------------------------------
def test_last_ratio_is_the_references_formula_at_28_layers_and_meets_the_budget_at_any_depth():
    for r_v, r_1 in [(0.25, 0.6), (0.3, 0.9), (0.375, 0.5334)]:
        reference = min(1.0, ((28 * 0.25 - r_v * 9 - r_v * r_1 * 9) / 10) / (r_v * r_1))
        assert math.isclose(stages.infoflow_last_ratio(0.25, r_v, r_1, (9, 18), 28), reference)
    for depth, layers in [(8, (3, 5)), (2, (1, 1)), (40, (13, 26))]:
        r_2 = stages.infoflow_last_ratio(0.125, 0.15, 0.8, layers, depth)
        k1, k2 = layers
        share = (k1 * 0.15 + (k2 - k1) * 0.15 * 0.8 + (depth - k2) * 0.15 * 0.8 * r_2) / depth
        assert math.isclose(share, 0.125)
    assert stages.infoflow_last_ratio(0.9, 0.25, 0.6, (9, 18), 28) == 1.0        # out of reach: keeps all


def test_bounds_scale_with_the_budget():
    assert infoflow_bounds(0.25) == [("vit_keep", 0.25, 0.375), ("first_keep", 0.2 / 0.375, 1.0),
                                     ("threshold", 0.0, 50.0), ("entropy_weight", -1.0, 1.0)]
    assert infoflow_bounds(0.1, entropy=False)[0] == ("vit_keep", 0.1, 0.15000000000000002)


# -- the search on the bundled model ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def evqa():
    from vlmeff import zoo
    model, processor = zoo.load("tiny-llava-evqa")
    return model, task_batches(model, processor, "easyvqa", "train", n=24, batch_size=12, seed=0)


@pytest.fixture(scope="module")
def searched(evqa):
    model, batches = evqa
    return calibrate(model, batches, method="infoflow", budget=0.125, trials=20, initial=6, progress=False)


def test_search_is_deterministic_and_meets_its_budget(evqa, searched):
    model, batches = evqa
    runs = [calibrate(model, batches[:1], method="infoflow", budget=0.125, trials=5, initial=3, progress=False)
            for _ in range(2)]
    assert runs[0]["history"] == runs[1]["history"] and runs[0]["ratios"] == runs[1]["ratios"]
    assert abs(searched["average_share"] - 0.125) < 0.125 / 100          # whole tokens: within 1 % of the budget
    assert searched["layers"] == [1] and searched["trials"] == 20      # a 2-layer LM: both stages on layer 1
    assert [name for name, _, _ in searched["space"]] == ["vit_keep", "threshold", "entropy_weight"]   # r_1: none
    low, high = 0.125, 0.1875
    assert all(low <= h["point"][0] <= high for h in searched["history"])


def test_search_layers_are_checked_before_any_work(evqa):
    model, batches = evqa
    for layers in ([0, 1], [1, 2], [1]):
        bad = layers != [1]
        if bad:
            with pytest.raises(ValueError, match=r"layers=\["):
                calibrate(model, batches, method="infoflow", budget=0.25, layers=layers, progress=False)
    assert calibrate(model, batches[:1], method="infoflow", budget=0.25, layers=[-1], trials=1,
                     progress=False)["layers"] == [1]


def test_search_beats_random_settings_of_the_same_budget(evqa, searched):
    """Paired with the search's seed (the same first draws, then the GP's picks against more random ones), the
    search's best is at least the best of as many random trials (here they tie: the best is one of the shared
    draws), and it beats the typical setting of another random search. An unpaired best-of-20 (seed 7) is no
    stable bar: it beat the search by 0.001 on the dependency versions of 2026-12-03."""
    model, batches = evqa
    paired = calibrate(model, batches, method="infoflow", budget=0.125, trials=20, progress=False, random_only=True)
    assert searched["searched"]["objective"] >= paired["searched"]["objective"]      # the best of as many trials
    assert abs(paired["average_share"] - 0.125) < 0.002
    other = calibrate(model, batches, method="infoflow", budget=0.125, trials=20, progress=False, seed=7,
                      random_only=True)
    assert searched["searched"]["objective"] > np.median([h["objective"] for h in other["history"]])


def test_an_interrupted_search_resumes_from_its_trials(evqa):
    """A 3-trial run resumed to 5 tells the optimiser its 3 trials and runs 2 more; resuming a finished run runs
    none and returns its setting."""
    model, batches = evqa
    one = batches[:1]
    short = calibrate(model, one, method="infoflow", budget=0.25, trials=3, initial=2, progress=False)
    longer = calibrate(model, one, method="infoflow", budget=0.25, trials=5, initial=2, progress=False, resume=short)
    assert longer["history"][:3] == short["history"] and longer["trials"] == 5
    again = calibrate(model, one, method="infoflow", budget=0.25, trials=5, initial=2, progress=False, resume=longer)
    assert again["history"] == longer["history"] and again["ratios"] == longer["ratios"]
    with pytest.raises(ValueError, match="resume: this schedule's search"):
        calibrate(model, one, method="infoflow", budget=0.125, trials=5, progress=False, resume=short)


def test_search_stops_early_without_improvement(evqa):
    model, batches = evqa
    stopped = calibrate(model, batches[:1], method="infoflow", budget=0.25, trials=50, initial=3, patience=2,
                        progress=False)
    assert stopped["trials"] < 50


def test_schedule_round_trips_and_refuses_another_model(evqa, searched, tmp_path):
    model, batches = evqa
    path = tmp_path / "infoflow.json"
    path.write_text(json.dumps(searched))
    with vlmeff.patch(model, "infoflow", schedule=str(path)) as patch:
        assert patch.config["keep"] == searched["vit_keep"] and patch.config["ratios"] == searched["ratios"]
        assert patch.config["threshold"] == searched["threshold"]
    with vlmeff.patch(model, "infoflow", keep=0.125, schedule=path):         # keep may name the budget
        pass
    with pytest.raises(ValueError, match="do not also give keep=0.5"):
        vlmeff.patch(model, "infoflow", keep=0.5, schedule=path)
    with pytest.raises(ValueError, match="do not also give threshold"):
        vlmeff.patch(model, "infoflow", threshold=3.0, schedule=path)
    other, _ = setup_any("llava")
    with pytest.raises(ValueError, match="calibrated on another model"):
        vlmeff.patch(other, "infoflow", schedule=path)
    broken = dict(searched, ratios="half")
    with pytest.raises(ValueError, match="malformed"):
        vlmeff.patch(model, "infoflow", schedule=broken)
    with pytest.raises(ValueError, match="for method 'debiased'"):
        vlmeff.patch(model, "infoflow", schedule=dict(searched, method="debiased"))


def test_bundled_moe_model_full_budget_and_pruned():
    from vlmeff import zoo
    model, processor = zoo.load("tiny-llava-moe-evqa")
    batch = task_batches(model, processor, "easyvqa", "train", n=4, batch_size=4, seed=1)[0]
    ref = model.generate(**batch, max_new_tokens=2, do_sample=False)
    with vlmeff.patch(model, "infoflow", keep=1.0, ratios=[1.0]):
        assert torch.equal(model.generate(**batch, max_new_tokens=2, do_sample=False), ref)
    with vlmeff.patch(model, "infoflow", keep=0.25, ratios=[0.5]) as patch:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        assert patch.stats["visual_tokens"]["after LLM layer 1"] == [32] * 4



# -- recycling ---------------------------------------------------------------------------------------------------------
def test_recycling_by_hand():
    """A 4 x 4 grid, m = 2, the 8 lowest of 16 scores are candidates. Cell 0 holds candidates 1, 4, 5 (scores 1, 2,
    3): they fold into row 5, (1 * 1 + 2 * 4 + 3 * 5) / 6 = 4. Cell 1 holds row 3 alone: it stays as it is. Cell 2
    holds none. Cell 3 holds 10, 11, 14, 15 (scores 4, 5, 6, 0.5): they fold into row 14, 186.5 / 15.5."""
    cells, count = infoflow.grid_cells([(4, 4)], 2)
    assert count == 4 and cells.view(4, 4).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    x = torch.arange(16.0).view(1, 16, 1)
    scores = torch.tensor([[9, 1, 8, 7, 2, 3, 10, 11, 12, 13, 4, 5, 14, 15, 6, 0.5]])
    out, keep = infoflow.recycle(x, scores, cells, count, 8)
    assert torch.nonzero(~keep[0])[:, 0].tolist() == [1, 4, 10, 11, 15]
    expected = x.clone()
    expected[0, 5, 0], expected[0, 14, 0] = 4.0, 186.5 / 15.5
    torch.testing.assert_close(out, expected)


def test_recycling_edge_cases_by_hand():
    """A lone candidate in a cell stays as it is (its own group); an odd grid edge gets its own cell column and row;
    half-precision rows come back in their dtype (the fold itself in float32)."""
    cells, count = infoflow.grid_cells([(5, 5)], 2)
    assert count == 9 and cells.view(5, 5)[:, 4].tolist() == [2, 2, 5, 5, 8] and cells.view(5, 5)[4].tolist() == [
        6, 6, 7, 7, 8]
    x = torch.randn(1, 25, 3)
    scores = torch.arange(25.0)[None] + 1
    out, keep = infoflow.recycle(x, scores, cells, count, 1)
    assert bool(keep.all()) and torch.equal(out, x)
    # the 4 lowest, rows 0..3 of the top grid row: 0, 1 in cell 0 fold into 1; 2, 3 in cell 1 fold into 3
    half = x.bfloat16()
    out, keep = infoflow.recycle(half, scores, cells, count, 4)
    assert out.dtype == torch.bfloat16 and torch.nonzero(~keep[0])[:, 0].tolist() == [0, 2]
    h = half[0].float()
    torch.testing.assert_close(out[0, 1].float(), ((1 * h[0] + 2 * h[1]) / 3).bfloat16().float())
    torch.testing.assert_close(out[0, 3].float(), ((3 * h[2] + 4 * h[3]) / 7).bfloat16().float())
    assert torch.equal(out[0, 4:], half[0, 4:])


def test_grid_cells_of_a_view_and_its_crops_with_a_real_m():
    cells, count = infoflow.grid_cells([(3, 3), (2, 5)], 2.5)        # floor(i / 2.5): 0, 0, 0 for i < 3
    assert cells[:9].tolist() == [0] * 9
    assert cells[9:].tolist() == [1, 1, 1, 2, 2, 1, 1, 1, 2, 2] and count == 3


def recycled_rows_oracle(scores, protected, grids, keep, m):
    """The rows VFlowOpt's recycling keeps for one image, by plain Python: protected rows, free non-candidates and
    the best candidate of each cell (cells numbered per grid of the free rows, as the reference groups them)."""
    free = [r for r in range(len(protected)) if not protected[r]]
    N = len(protected)                        # the reference's N counts the newline rows too
    candidates = min(len(free), min(len(free), round(N * (1 - keep))) + int(N / (m * m)))
    order = sorted(free, key=lambda r: (float(scores[r]), r))[:candidates]
    cell_of, start = {}, 0
    for g, (h, w) in enumerate(grids):
        for n, r in enumerate(free[start:start + h * w]):
            cell_of[r] = (g, math.floor((n // w) / m), math.floor((n % w) / m))
        start += h * w
    best = {}
    for r in order:                                          # ascending score: the last one seen per cell is its best
        best[cell_of[r]] = r
    return sorted(set(range(len(protected))) - set(order) | set(best.values()))


@pytest.mark.parametrize("family", ["next", "onevision"])
def test_recycling_on_anyres_blocks_keeps_the_oracles_rows(family):
    model, inputs = setup_any(family)
    adapter, protected = protected_rows(model, inputs)
    with vlmeff.patch(model, "infoflow", keep=0.5, grid=2.0) as patch:
        model(**inputs)
        stats = patch.stats
        for i, (rows, scores) in enumerate(zip(stats["kept"], stats["scores"])):
            grids = adapter.image_grids(i, protected[i])
            assert rows.tolist() == recycled_rows_oracle(scores, protected[i].tolist(), grids, 0.5, 2.0)
        assert stats["visual_tokens"]["before LLM"] == [len(r) for r in stats["kept"]]
    with vlmeff.patch(model, "infoflow", keep=0.5, recycle=False) as patch:
        model(**inputs)
        free = [int((~p).sum()) for p in protected]
        assert patch.stats["visual_tokens"]["before LLM"] == [
            int(p.sum()) + round(0.5 * f) for p, f in zip(protected, free)]


def test_recycling_on_llava_when_asked_matches_the_oracle_and_caches():
    model, inputs = setup_any("llava")
    kw = dict(return_dict_in_generate=True, output_logits=True)
    with vlmeff.patch(model, "infoflow", keep=0.5, recycle=True, grid=2.0) as patch:
        cached = generate(model, inputs, **kw)
        for rows, scores in zip(patch.stats["kept"], patch.stats["scores"]):
            assert rows.tolist() == recycled_rows_oracle(scores, [False] * 16, [(4, 4)], 0.5, 2.0)
        recomputed = generate(model, inputs, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
