"""Structural MLP pruning (AMP): importance vs an independent autograd oracle, sliced == masked, the search's
tolerance, every family, save / reload, distillation, and composition with token patches."""
import copy
import math

import pytest
import torch
from timm.layers import GluMlp, SwiGLU
from transformers import Dinov2Config, Dinov2Model

import vlmeff
from lvlm_models import generate, llava_inputs, pixels, tiny_llava
from models import images, run, tiny_clip, tiny_dinov2, tiny_siglip, tiny_timm_vit
from vlmeff.structural import amp, sites


def tiny_dinov2_swiglu():
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=32, patch_size=4,
                       mlp_ratio=4, use_swiglu_ffn=True)
    return Dinov2Model(cfg).eval()


FAMILIES = {
    "timm": tiny_timm_vit,
    "timm-swiglu": lambda: tiny_timm_vit(mlp_layer=SwiGLU, act_layer=torch.nn.SiLU),
    "timm-glu": lambda: tiny_timm_vit(mlp_layer=GluMlp, act_layer=torch.nn.Sigmoid, mlp_ratio=2),
    "clip": tiny_clip,
    "siglip": tiny_siglip,
    "dinov2": tiny_dinov2,
    "dinov2-swiglu": tiny_dinov2_swiglu,
}


def data(n_batches=2, batch=4):
    return [images(batch, seed=10 + s) for s in range(n_batches)]


def oracle_entropy(z, temp):
    """-(1/B) sum_ij P_ij log P_ij, P = softmax_row(temp * cos(z_i, z_j)), written out term by term."""
    z = z.double()
    z = z / z.norm(dim=-1, keepdim=True)
    e = torch.exp(temp * z @ z.T)
    p = e / e.sum(-1, keepdim=True)
    return -(p * torch.log(p)).sum() / z.shape[0]


def embedding(model, x):
    """The embedding each family documents for the loss, computed here independently of vlmeff."""
    if not hasattr(model, "config"):
        return model.forward_head(model.forward_features(x), pre_logits=True)
    return model(pixel_values=x).pooler_output


def out_linears(model):
    return [s.out_linear for s in sites.family(model).slots]


def zero_columns(model, keep):
    """An unsliced copy whose output linears see only the kept neurons (the others' weight columns are zero)."""
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for lin, idx in zip(out_linears(masked), keep):
            drop = torch.ones(lin.in_features, dtype=torch.bool)
            drop[idx] = False
            lin.weight[:, drop] = 0
    return masked


def neuron_params(slot):
    """Parameters of one hidden neuron: a row (+ bias) of each input linear (two of a fused GLU fc1), a column of
    the output linear."""
    ins = [getattr(slot.module, n) for n in slot.rows + (slot.fused,) * 2 * bool(slot.fused)]
    return sum(lin.in_features + (lin.bias is not None) for lin in ins) + slot.out_linear.out_features


def random_keep(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(lin.in_features, generator=g)[: max(1, lin.in_features // 3)] for lin in out_linears(model)]


# -- importance -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm", "clip", "dinov2-swiglu"])
def test_importance_equals_gate_oracle(name):
    """Gates of ones g (B, N, W) multiply each output linear's input: dL/dg = a * dL/da element-wise, so the score
    is the mean over batches of mean over (B, N) of |dL/dg|, with the loss written out independently."""
    model, batches, temp = FAMILIES[name](), data(), 7.0
    expected = [torch.zeros(lin.in_features, dtype=torch.float64) for lin in out_linears(model)]
    for x in batches:
        gates = {}

        def hook(i):
            def gate(module, args):
                gates[i] = torch.ones_like(args[0], requires_grad=True)
                return (args[0] * gates[i],)
            return gate

        handles = [lin.register_forward_pre_hook(hook(i)) for i, lin in enumerate(out_linears(model))]
        loss = oracle_entropy(embedding(model, x), temp)
        grads = torch.autograd.grad(loss, [gates[i] for i in range(len(expected))])
        for h in handles:
            h.remove()
        for i, g in enumerate(grads):
            expected[i] += g.abs().double().reshape(-1, g.shape[-1]).mean(0) / len(batches)
    got = amp.taylor_importance(model, batches, temp=temp)
    for e, s in zip(expected, got):
        assert s.shape == e.shape and e.abs().max() > 0
        torch.testing.assert_close(s.double(), e, rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_entropy_loss_matches_formula():
    z = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    assert abs(amp.entropy_loss(z, 3.0).item() - oracle_entropy(z, 3.0).item()) < 1e-6
    # identical embeddings: P uniform, entropy log B; orthogonal ones at a large temp: P one-hot, entropy 0
    assert abs(amp.entropy_loss(torch.ones(4, 3), 5.0).item() - math.log(4)) < 1e-6
    assert amp.entropy_loss(torch.eye(4) * 3, 200.0).item() < 1e-6


# -- slicing ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(FAMILIES))
def test_sliced_equals_masked_unsliced(name):
    model = FAMILIES[name]()
    keep = random_keep(model)
    masked = zero_columns(model, keep)
    before = sum(p.numel() for p in model.parameters())
    per_neuron = [neuron_params(s) for s in sites.family(model).slots]
    for slot, idx in zip(sites.family(model).slots, keep):
        sites.slice_mlp(slot, idx.sort().values)
    x = images(3)
    torch.testing.assert_close(run(model, x), run(masked, x), rtol=0, atol=1e-5)
    assert amp.mlp_widths(model) == [len(k) for k in keep]
    removed = sum(c * (lin.in_features - len(k)) for c, lin, k in zip(per_neuron, out_linears(masked), keep))
    assert before - sum(p.numel() for p in model.parameters()) == removed


def test_width_zero_mlp_is_a_bias_only_mlp():
    model = tiny_timm_vit()
    keep = [torch.arange(0)] + [torch.arange(lin.in_features) for lin in out_linears(model)[1:]]
    masked = zero_columns(model, keep)
    sites.slice_mlp(sites.family(model).slots[0], keep[0])
    torch.testing.assert_close(run(model, images(2)), run(masked, images(2)), rtol=0, atol=1e-5)


# -- the search -------------------------------------------------------------------------------------------------
def replay_search(rec, tolerance, steps):
    """The binary search of methods.md, replayed from the recorded losses: the widths it must have tried and kept."""
    left, right, loss_ref, kept_loss = 0, rec.width_before, rec.loss_before, rec.loss_before
    for width, loss, accepted in rec.tried:
        mid = (left + right) // 2
        assert width == mid and accepted == (loss - loss_ref <= tolerance)
        if accepted:
            right, kept_loss = mid, loss
        else:
            left = mid
    assert len(rec.tried) == steps
    return right, kept_loss


def test_search_respects_the_tolerance_per_layer():
    model, batches, tol = tiny_timm_vit(), data(), 2e-3
    report = vlmeff.prune_mlp(model, batches, tolerance=tol, temp=10.0, steps=5, progress=False)
    assert [r.layer for r in report.layers] == [3, 2, 1, 0]
    prev = report.loss_before
    for rec in report.layers:
        assert rec.loss_before == prev
        width, loss = replay_search(rec, tol, 5)
        assert (rec.width, rec.loss_after) == (width, loss)
        assert rec.loss_after - rec.loss_before <= tol
        prev = rec.loss_after
    assert report.widths_after == amp.mlp_widths(model) == [r.width for r in report.layers][::-1]
    assert 0 < sum(report.widths_after) < sum(report.widths_before)       # some layers pruned, not all to zero
    with torch.no_grad():
        measured = sum(oracle_entropy(embedding(model, x), 10.0).item() for x in batches) / len(batches)
    assert abs(measured - report.loss_after) < 1e-5 and abs(prev - report.loss_after) < 1e-5
    assert report.loss_after - report.loss_before <= 4 * tol
    assert report.params_after < report.params_before and report.flops_after < report.flops_before
    assert not any(lin._forward_pre_hooks or lin._forward_hooks for lin in out_linears(model))   # no mask left


def test_pruned_model_compiles_fullgraph():
    """Only smaller linears are left (no hook, no mask): the pruned model compiles as one graph, same outputs."""
    model = tiny_timm_vit()
    vlmeff.prune_mlp(model, data(1), tolerance=0.01, temp=10.0, steps=3, progress=False)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    torch.testing.assert_close(run(compiled, images(2)), run(model, images(2)), rtol=0, atol=1e-6)


def test_report_counts_params_and_flops():
    model = tiny_timm_vit()
    report = vlmeff.prune_mlp(model, data(1), tolerance=1.0, steps=1, progress=False)   # every layer: 128 -> 64
    assert report.widths_before == [128] * 4 and report.widths_after == [64] * 4
    # per layer 64 neurons x (32 fc1 weights + 1 bias + 32 fc2 weights); MLP FLOPs 2 x 65 tokens x 2 x 32 x 64
    assert report.params_before - report.params_after == 4 * 64 * 65
    assert report.flops_before - report.flops_after == 4 * 2 * 65 * 2 * 32 * 64


def test_a_labelled_dataloader_is_calibration_data():
    """(images, labels) batches of a DataLoader: the labels are ignored, the result is that of the bare images."""
    x = torch.cat(data())
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.arange(len(x))), batch_size=4)
    a, b = tiny_timm_vit(), tiny_timm_vit()
    ra = vlmeff.prune_mlp(a, loader, tolerance=0.01, temp=10.0, steps=3, progress=False)
    rb = vlmeff.prune_mlp(b, data(), tolerance=0.01, temp=10.0, steps=3, progress=False)
    assert ra.widths_after == rb.widths_after and ra.loss_after == rb.loss_after


def test_zero_tolerance_never_raises_the_loss():
    model, batches = tiny_clip(), data()
    report = vlmeff.prune_mlp(model, batches, tolerance=0, temp=10.0, progress=False)
    assert report.loss_after <= report.loss_before + 1e-6


@pytest.mark.parametrize("kwargs, message", [
    (dict(tolerance=-0.1), "tolerance=-0.1"), (dict(tolerance=float("nan")), "tolerance=nan"),
    (dict(temp=0), "temp=0"), (dict(steps=0), "steps=0"), (dict(steps=2.0), "steps=2.0"),
    (dict(distill_epochs=0), "distill_epochs=0"), (dict(distill_lr=-1.0), "distill_lr=-1.0")])
def test_bad_options_are_errors_naming_the_value(kwargs, message):
    model = tiny_timm_vit()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        vlmeff.prune_mlp(model, data(1), progress=False, **kwargs)
    assert amp.mlp_widths(model) == [128] * 4


def test_bad_data_and_models_are_clear_errors():
    model = tiny_timm_vit()
    with pytest.raises(ValueError, match="data is empty"):
        vlmeff.prune_mlp(model, [], progress=False)
    with pytest.raises(TypeError, match="re-iterable.*iterator"):
        vlmeff.prune_mlp(model, iter(data(1)), progress=False)
    with pytest.raises(ValueError, match=">= 2 images.*batch of 1"):
        vlmeff.prune_mlp(model, [images(1)], progress=False)
    with pytest.raises(TypeError, match=r"pixel tensor.*shape \(4, 3\)"):
        vlmeff.prune_mlp(model, [torch.zeros(4, 3)], progress=False)
    with pytest.raises(vlmeff.UnsupportedModelError, match="does not support Linear; supported: timm"):
        vlmeff.prune_mlp(torch.nn.Linear(2, 2), data(1), progress=False)
    normed = tiny_timm_vit(scale_mlp_norm=True)
    with pytest.raises(vlmeff.UnsupportedModelError, match="Mlp normalises its hidden neurons"):
        vlmeff.prune_mlp(normed, data(1), progress=False)
    assert amp.mlp_widths(model) == [128] * 4


# -- families ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip", "siglip", "dinov2", "dinov2-swiglu", "timm-swiglu", "timm-glu"])
def test_every_family_prunes_and_runs(name):
    model = FAMILIES[name]()
    report = vlmeff.prune_mlp(model, data(1), tolerance=0.05, temp=10.0, steps=3, progress=False)
    assert report.widths_after == amp.mlp_widths(model) and sum(report.widths_after) < sum(report.widths_before)
    assert run(model, images(2)).isfinite().all()


def test_llava_tower_prunes_against_the_llm_features_and_still_generates():
    model = tiny_llava()
    inputs, reference = llava_inputs(model), copy.deepcopy(model)
    scores = amp.taylor_importance(model, [pixels(4, seed=3)], temp=10.0)
    # the tower's last layer comes after LLaVA's feature layer (-2): the LLM never sees it, so it scores 0
    assert scores[-1].abs().max() == 0 and all(s.abs().max() > 0 for s in scores[:-1])
    report = vlmeff.prune_mlp(model, [pixels(4, seed=3)], tolerance=0.01, temp=10.0, progress=False)
    assert report.widths_after[-1] == 1                          # 64 -> 32 -> ... -> 1: every step accepted
    assert report.widths_after == amp.mlp_widths(model.model.vision_tower)
    masked = zero_columns(reference, report.kept)
    with torch.no_grad():
        features = [sites.family(m).features(m, inputs["pixel_values"]) for m in (model, masked)]
    torch.testing.assert_close(*features, rtol=0, atol=1e-5)
    torch.testing.assert_close(model(**inputs).logits, masked(**inputs).logits, rtol=0, atol=1e-4)
    assert torch.equal(generate(model, inputs), generate(masked, inputs))


def test_zoo_llava_tower_prunes_and_answers():
    from vlmeff.data import easyvqa

    model, processor = vlmeff.zoo.load("tiny-llava-evqa")
    train = easyvqa.load_images("train")
    ims = [train[i] for i in sorted(train)[:8]]
    batches = [processor.image_processor(ims[:4], return_tensors="pt"),
               processor.image_processor(ims[4:], return_tensors="pt")]
    report = vlmeff.prune_mlp(model, batches, tolerance=0.01, steps=3, progress=False)
    assert sum(report.widths_after) < sum(report.widths_before)
    answers = vlmeff.zoo.ask(model, processor, ims[:2], ["what shape is in the image?"] * 2)
    assert all(a in easyvqa.answers() for a in answers)


# -- save / reload ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["timm", "clip", "dinov2-swiglu"])
def test_reloaded_model_equals_the_pruned_one(name, tmp_path):
    model = FAMILIES[name]()
    vlmeff.prune_mlp(model, data(1), tolerance=0.05, temp=10.0, steps=3, progress=False)
    vlmeff.save_pruned_mlp(model, tmp_path / "pruned.safetensors")
    fresh = FAMILIES[name]()
    assert vlmeff.load_pruned_mlp(fresh, tmp_path / "pruned.safetensors") is fresh
    assert amp.mlp_widths(fresh) == amp.mlp_widths(model)
    assert torch.equal(run(fresh, images(2)), run(model, images(2)))


def test_zoo_vit_prunes_on_train_images_and_reloads_into_a_fresh_copy(tmp_path):
    from vlmeff.data import easyvqa

    vit, preprocess = vlmeff.zoo.load("tiny-vit-evqa")
    train = easyvqa.load_images("train")
    ids = sorted(train)[:8]
    batches = [preprocess([train[i] for i in ids[:4]]), preprocess([train[i] for i in ids[4:]])]
    report = vlmeff.prune_mlp(vit, batches, tolerance=0.005, steps=2, progress=False)
    assert report.params_after < report.params_before
    vlmeff.save_pruned_mlp(vit, tmp_path / "vit.safetensors")
    fresh = vlmeff.load_pruned_mlp(vlmeff.zoo.load("tiny-vit-evqa")[0], tmp_path / "vit.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(batches[0]), vit(batches[0]))


def test_reloading_a_foreign_or_mismatched_file_is_an_error(tmp_path):
    from safetensors.torch import save_model

    save_model(tiny_timm_vit(), str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="no 'vlmeff_mlp_widths' metadata"):
        vlmeff.load_pruned_mlp(tiny_timm_vit(), tmp_path / "plain.safetensors")
    vlmeff.save_pruned_mlp(tiny_timm_vit(depth=2), tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match="stores 2 MLP widths but the model has 4"):
        vlmeff.load_pruned_mlp(tiny_timm_vit(), tmp_path / "two.safetensors")


# -- distillation -----------------------------------------------------------------------------------------------
def test_distillation_lowers_the_feature_mse_to_the_unpruned_model():
    model, batches = tiny_timm_vit(), data()
    teacher = copy.deepcopy(model)
    report = vlmeff.prune_mlp(model, batches, tolerance=0.05, temp=10.0, steps=3, distill=True, distill_epochs=3,
                              distill_lr=1e-3, progress=False)
    with torch.no_grad():
        mse = sum(torch.mean((model.forward_features(x) - teacher.forward_features(x)) ** 2).item()
                  for x in batches) / len(batches)
    assert abs(mse - report.distill["mse_after"]) < 1e-6
    assert report.distill["mse_after"] < 0.9 * report.distill["mse_before"]
    assert all(p.requires_grad for p in model.parameters()) and not model.training


# -- composition with token pruning -----------------------------------------------------------------------------
@pytest.mark.parametrize("method, kwargs", [("cls", dict(keep=0.5)), ("tome", dict(r=4))])
def test_pruned_tower_composes_with_token_patches(method, kwargs):
    model = tiny_timm_vit()
    keep = random_keep(model, seed=1)
    masked = zero_columns(model, keep)
    for slot, idx in zip(sites.family(model).slots, keep):
        sites.slice_mlp(slot, idx.sort().values)
    x = images(3)
    with vlmeff.patch(masked, method=method, **kwargs):
        expected = run(masked, x)
    with vlmeff.patch(model, method=method, **kwargs):
        got = run(model, x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got, run(model, x), atol=1e-3)       # the patch did change the output
