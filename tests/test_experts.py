"""MoE expert skipping (MoDES): exactness at zero thresholds, skipped pairs never computed (instrumented experts),
implementations agreeing, coexistence with visual-token pruning, calibration search and schedules, errors."""
import json
import random

import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import vlmeff
from vlmeff.experts import frontier_search, skip_pairs
from vlmeff.experts.skip import find_experts

from lvlm_models import IMAGE, A, B, qwen_inputs, tiny_llava, tiny_qwen

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
aten = torch.ops.aten


@pytest.fixture(scope="module")
def llava_moe():
    model, processor = vlmeff.zoo.load("tiny-llava-moe-evqa")
    images = [Image.new("RGB", (64, 64), colour) for colour in ("red", "navy")]
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            for q in ("what shape is in the image?", "what color is the shape?")]
    texts = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = dict(processor(images=images, text=texts, padding=True, return_tensors="pt"))
    return model, inputs, model.config.image_token_id


@pytest.fixture(scope="module")
def qwen_moe():
    return tiny_qwen("qwen3_moe"), qwen_inputs([A, B]), IMAGE


@pytest.fixture(scope="module")
def glm_moe():
    """GLM-4.5V-style: sigmoid router with a correction bias, group-limited, unsorted top-3 weights x 2.5, a shared
    expert, the first layer dense."""
    from transformers import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3], "partial_rotary_factor": 1.0}
    text = dict(vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_local_experts=8,
                num_experts_per_tok=3, n_group=2, topk_group=1, first_k_dense_replace=1, n_shared_experts=1,
                routed_scaling_factor=2.5, norm_topk_prob=True, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=512, rope_parameters=rope,
                pad_token_id=0, eos_token_id=2, initializer_range=0.2)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=4, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=64, image_size=32)
    cfg = Glm4vMoeConfig(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=101,
                         image_start_token_id=98, image_end_token_id=99)
    return Glm4vMoeForConditionalGeneration(cfg).eval(), qwen_inputs([A, B]), IMAGE


@pytest.fixture(params=["llava_moe", "qwen_moe", "glm_moe"])
def moe(request):
    return request.getfixturevalue(request.param)


def use(model, implementation):
    for _, experts in find_experts(model):
        experts.config._experts_implementation = implementation


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


class ExpertRows(TorchDispatchMode):
    """Counts the token rows each expert's first (gate-up) projection computes, per MoE layer, from the matmuls
    themselves: eager's per-expert mm, grouped_mm's offsets, batched_mm's gathered per-row weights."""

    def __init__(self, model):
        super().__init__()
        self.layers = {}
        for layer, experts in find_experts(model):
            weight = experts.gate_up_proj
            self.layers[weight.untyped_storage().data_ptr()] = (layer, weight[0].numel())
        self.rows = torch.zeros(len(self.layers), find_experts(model)[0][1].num_experts, dtype=torch.long)

    def _layer(self, tensor):
        return self.layers.get(tensor.untyped_storage().data_ptr()) if isinstance(tensor, torch.Tensor) else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.mm.default and self._layer(args[1]):
            layer, per_expert = self._layer(args[1])
            self.rows[layer, args[1].storage_offset() // per_expert] += args[0].shape[0]
        elif func is aten._grouped_mm.default and self._layer(args[1]):
            offs = kwargs.get("offs", args[2] if len(args) > 2 else None)
            self.rows[self._layer(args[1])[0]] += torch.diff(offs.long(), prepend=offs.new_zeros(1).long())
        elif func is aten.index.Tensor and self._layer(args[0]):
            self.rows[self._layer(args[0])[0]] += torch.bincount(args[1][0], minlength=self.rows.shape[1])
        return func(*args, **kwargs)


def expected_rows(routing, visual, alpha, thresholds, n_experts):
    """Oracle from the rule: keep (t, s) iff alpha[l, m(t)] * w[t, s] / sum_s w[t, s] >= tau[m(t)]."""
    rows = torch.zeros(len(routing), n_experts, dtype=torch.long)
    skipped = {False: [0, 0], True: [0, 0]}
    for layer, (weights, index) in enumerate(routing):
        for t in range(weights.shape[0]):
            m = bool(visual[t])
            total = float(weights[t].sum())
            for s in range(weights.shape[1]):
                keep = alpha[layer][int(m)] * float(weights[t, s]) / total >= thresholds[int(m)]
                rows[layer, index[t, s]] += keep
                skipped[m][0] += not keep
                skipped[m][1] += 1
    return rows, skipped


def record_routing(model):
    routing, handles = [], []
    for _, experts in find_experts(model):
        router = next(m for name, m in model.named_modules() if name.endswith("mlp.gate")
                      and any(e is experts for e in model.get_submodule(name.rsplit(".", 1)[0]).children()))
        handles.append(router.register_forward_hook(lambda mod, args, out: routing.append((out[1], out[2]))))
    return routing, handles


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_zero_thresholds_give_the_unpatched_outputs(moe, implementation):
    model, inputs, _ = moe
    use(model, implementation)
    before = logits(model, inputs)
    with vlmeff.skip_experts(model, thresholds=(0.0, 0.0)) as handle:
        patched = logits(model, inputs)
        assert handle.stats["skip_ratio"] == 0.0
    assert torch.equal(patched, before)
    assert torch.equal(logits(model, inputs), before)
    assert all(e._is_expert_parallel is False and "forward" not in vars(e) for _, e in find_experts(model))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_skipped_pairs_never_reach_an_expert(moe, implementation):
    model, inputs, image_id = moe
    use(model, implementation)
    n_layers = len(find_experts(model))
    alpha = [[1.0, 0.9], [0.7, 1.3], [1.1, 0.8]][:n_layers]
    thresholds = (0.3, 0.55)
    routing, handles = record_routing(model)
    try:
        with vlmeff.skip_experts(model, thresholds=thresholds, alpha=alpha) as handle, ExpertRows(model) as rows:
            logits(model, inputs)
        stats = handle.stats
    finally:
        for h in handles:
            h.remove()
    visual = (inputs["input_ids"] == image_id).reshape(-1)
    real = inputs["attention_mask"].reshape(-1).bool()
    expected, _ = expected_rows(routing, visual, alpha, thresholds, rows.rows.shape[1])
    assert torch.equal(rows.rows, expected)
    routed = sum(w.numel() for w, _ in routing)
    assert 0 < int(expected.sum()) < routed
    # stats count the real (non-padding) tokens only
    _, skipped = expected_rows([(w[real], i[real]) for w, i in routing], visual[real], alpha, thresholds,
                               rows.rows.shape[1])
    assert stats["skip_ratio_text"] == pytest.approx(skipped[False][0] / skipped[False][1])
    assert stats["skip_ratio_visual"] == pytest.approx(skipped[True][0] / skipped[True][1])
    assert stats["pairs"] == dict(text=skipped[False][1], visual=skipped[True][1])
    assert len(stats["layers"]) == n_layers


def test_implementations_agree_when_patched(moe):
    model, inputs, _ = moe
    outs, ratios = {}, {}
    for implementation in IMPLEMENTATIONS:
        use(model, implementation)
        with vlmeff.skip_experts(model, thresholds=(0.35, 0.6)) as handle:
            outs[implementation] = logits(model, inputs)
            ratios[implementation] = handle.stats["skip_ratio"]
    use(model, "grouped_mm")
    assert len(set(ratios.values())) == 1 and ratios["eager"] > 0.3
    for implementation in IMPLEMENTATIONS[1:]:
        torch.testing.assert_close(outs[implementation], outs["eager"], atol=1e-4, rtol=1e-4)


def test_skip_rule_is_scale_and_order_free():
    torch.manual_seed(0)
    probs = torch.rand(7, 3).softmax(-1)
    visual = torch.tensor([0, 1, 1, 0, 1, 0, 0], dtype=torch.bool)
    alpha, taus = torch.tensor([0.8, 1.5]), torch.tensor([0.25, 0.4])
    perm = torch.stack([torch.randperm(3) for _ in range(7)])
    reference = skip_pairs(probs, visual, alpha, taus)
    scaled = skip_pairs(2.5 * probs.gather(1, perm), visual, alpha, taus)      # DeepSeek-V3: x2.5, unsorted
    assert torch.equal(scaled, reference.gather(1, perm))
    expected = [[alpha[int(v)] * p / probs[t].sum() < taus[int(v)] for p in probs[t]] for t, v in enumerate(visual)]
    assert reference.tolist() == [[bool(x) for x in row] for row in expected]


def test_coexists_with_visual_token_pruning(llava_moe):
    model, inputs, image_id = llava_moe
    n_layers, k = len(find_experts(model)), model.config.text_config.num_experts_per_tok
    tokens = vlmeff.patch(model, method="pool", keep=16)
    experts = vlmeff.skip_experts(model, thresholds=(0.0, 0.9))
    try:
        with pytest.raises(RuntimeError, match="already patched"):
            vlmeff.skip_experts(model, thresholds=(0.1, 0.1))
        with pytest.raises(RuntimeError, match="already patched"):
            vlmeff.patch(model, method="random", keep=8)
        logits(model, inputs)
        # the MoE layers saw the pruned prompt: 16 visual tokens per image, 2 images
        assert experts.stats["pairs"]["visual"] == 2 * 16 * k * n_layers
        assert experts.stats["skip_ratio_text"] == 0.0 and experts.stats["skip_ratio_visual"] > 0.4
    finally:
        experts.unpatch()
        tokens.unpatch()
    assert getattr(model, "_vlmeff_patch", None) is None and getattr(model, "_vlmeff_expert_skip", None) is None


def test_stats_reset_and_accumulate(qwen_moe):
    model, inputs, _ = qwen_moe
    with vlmeff.skip_experts(model, thresholds=(0.3, 0.3)) as handle:
        logits(model, inputs)
        once = handle.stats["pairs"]
        logits(model, inputs)
        assert handle.stats["pairs"] == {m: 2 * n for m, n in once.items()}
        handle.stats = {}
        assert handle.stats["pairs"] == dict(text=0, visual=0)


@pytest.mark.parametrize("thresholds", [(-0.1, 0.2), (0.2, 1.5), (0.1,), "0.1", (0.1, None)])
def test_thresholds_out_of_range_are_refused(qwen_moe, thresholds):
    with pytest.raises(ValueError, match="thresholds="):
        vlmeff.skip_experts(qwen_moe[0], thresholds=thresholds)
    assert getattr(qwen_moe[0], "_vlmeff_expert_skip", None) is None


def test_bad_alpha_and_missing_thresholds_are_refused(qwen_moe):
    with pytest.raises(ValueError, match=r"alpha of shape \(2, 2\): expected 3 MoE layers"):
        vlmeff.skip_experts(qwen_moe[0], thresholds=(0.1, 0.1), alpha=[[1, 1], [1, 1]])
    with pytest.raises(ValueError, match="needs thresholds"):
        vlmeff.skip_experts(qwen_moe[0])


def test_dense_model_is_refused():
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration has no routed-experts module"):
        vlmeff.skip_experts(tiny_llava(), thresholds=(0.1, 0.1))


def _monotone_table(rng, n, m):
    """f, g non-decreasing in both indices (cumulative sums of random non-negative steps)."""
    f = torch.rand(n, m, generator=rng).cumsum(0).cumsum(1)
    g = torch.rand(n, m, generator=rng).cumsum(0).cumsum(1)
    return f / f.max(), g


@pytest.mark.parametrize("seed", range(30))
def test_frontier_search_finds_the_exhaustive_optimum(seed):
    rng = torch.Generator().manual_seed(seed)
    n, m = 3 + seed % 5, 2 + seed % 7
    f, g = _monotone_table(rng, n, m)
    target = float(torch.rand(1, generator=rng)) * 0.9 + 0.05
    feasible = [(float(g[i, j]), i, j) for i in range(n) for j in range(m) if f[i, j] >= target]
    i, j, fv, gv, evaluations = frontier_search(lambda i, j: (float(f[i, j]), float(g[i, j])), n, m, target)
    assert gv == min(feasible)[0] and fv >= target and f[i, j] >= target
    assert evaluations <= 2 * n + m


def test_frontier_search_unreachable_target():
    with pytest.raises(ValueError, match="target_skip=0.99 is not reached"):
        frontier_search(lambda i, j: (0.1 * (i + j), 0.0), 3, 3, 0.99)


@pytest.fixture(scope="module")
def calibration(llava_moe, tmp_path_factory):
    from vlmeff.experts import easyvqa_calibration

    model, processor = vlmeff.zoo.load("tiny-llava-moe-evqa")
    batches = easyvqa_calibration(processor, n=8, batch_size=8, seed=3)
    path = tmp_path_factory.mktemp("modes") / "schedule.json"
    schedule = vlmeff.calibrate(model, batches, method="modes", target_skip=0.6, grid_size=5, path=path,
                                progress=False)
    return model, batches, schedule, path


def test_calibration_reaches_the_target_and_round_trips(calibration):
    model, batches, schedule, path = calibration
    assert json.loads(path.read_text()) == schedule
    assert schedule["calibration_skip"] >= 0.6 and schedule["evaluations"] <= 2 * 5 + 5
    alpha = torch.tensor(schedule["alpha"])
    assert alpha.shape == (2, 2) and torch.allclose(alpha.sum(0), torch.ones(2))
    for grid in schedule["grids"]:         # distinct thresholds: a repeated quantile would cost evaluations only
        assert 2 <= len(grid) <= 5 and all(a < b for a, b in zip(grid, grid[1:])) and grid[0] == 0.0
    inputs = {k: v for k, v in batches[0].items() if k != "answer_mask"}
    with vlmeff.skip_experts(model, schedule=path) as handle:
        logits(model, inputs)
        assert handle.stats["skip_ratio"] == pytest.approx(schedule["calibration_skip"])
        assert handle.config["thresholds"] == tuple(schedule["thresholds"])


def test_kl_of_a_rounded_copy_is_zero_not_negative():
    """A distribution changed by rounding only: its KL sums to a tiny negative number, which would make alpha
    negative (refused by skip_experts); each token's KL is floored at 0."""
    from vlmeff.experts.calibrate import mean_kl
    reference = torch.randn(3, 11).log_softmax(-1)
    assert mean_kl([reference], [reference + 1e-6]) == 0.0
    shifted = torch.randn(3, 11).log_softmax(-1)
    expected = float((reference.exp() * (reference - shifted)).sum()) / 3
    assert mean_kl([reference], [shifted]) == pytest.approx(expected, rel=1e-6)


def test_schedule_for_another_model_is_refused(calibration, qwen_moe, tmp_path):
    _, _, schedule, path = calibration
    with pytest.raises(ValueError, match="calibrated for another model .*moe_layers: schedule 2 != model 3"):
        vlmeff.skip_experts(qwen_moe[0], schedule=path)
    other = vlmeff.zoo.load("tiny-llava-moe-evqa")[0]
    with torch.no_grad():
        other.model.language_model.layers[0].mlp.gate.weight.mul_(1.01)
    with pytest.raises(ValueError, match="router_checksum"):
        vlmeff.skip_experts(other, schedule=path)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps(dict(schedule, method="cls")))
    with pytest.raises(ValueError, match="method='cls', expected 'modes'"):
        vlmeff.skip_experts(calibration[0], schedule=wrong)


def test_calibrate_refuses_bad_options(qwen_moe):
    with pytest.raises(ValueError, match="method='fastv'"):
        vlmeff.calibrate(qwen_moe[0], [], method="fastv")
    with pytest.raises(ValueError, match="target_skip=1.2"):
        vlmeff.calibrate(qwen_moe[0], [], method="modes", target_skip=1.2)


def test_calibration_data_is_seeded_train_data():
    from vlmeff.data import easyvqa
    from vlmeff.experts import easyvqa_calibration

    processor = vlmeff.zoo.load("tiny-llava-moe-evqa")[1]
    first, again = (easyvqa_calibration(processor, n=4, batch_size=4, seed=1)[0] for _ in range(2))
    assert torch.equal(first["input_ids"], again["input_ids"])
    questions, answers, _ = easyvqa.questions("train")
    rows = random.Random(1).sample(range(len(questions)), 4)
    answer_ids = first["input_ids"][:, 1:][first["answer_mask"][:, :-1]]
    expected = [processor.tokenizer(answers[r], add_special_tokens=False).input_ids[0] for r in rows]
    assert answer_ids.tolist() == expected
