"""Pre-LLM reduction on Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE: tiny random models built from configs,
inputs built by hand (patch 4, merge 2: an image of h x w patches gives h * w / 4 visual tokens)."""
import pytest
import torch
from transformers.vision_utils import get_vision_window_index

import vlmeff
from lvlm_models import IMAGE, A, B, C, Recorder, tiny_qwen
from lvlm_models import qwen_inputs as inputs
from vlmeff.pruners import pool_assignment

FAMILIES = ["qwen2", "qwen2_5", "qwen3", "qwen3_moe"]
METHODS = [("received", {}), ("random", {}), ("pool", {}), ("received", {"reduce": "merge"})]


@pytest.fixture(scope="module", params=FAMILIES)
def model(request):
    return tiny_qwen(request.param)


def logits(model, **kwargs):
    with torch.no_grad():
        return model(**kwargs).logits


def generate(model, **kwargs):
    with torch.no_grad():
        return model.generate(**kwargs, max_new_tokens=4, do_sample=False, suppress_tokens=[IMAGE])


@pytest.mark.parametrize("method,options", METHODS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_full_budget_is_exact(model, method, options):
    x = inputs([A, B, C])
    ref, ref_gen = logits(model, **x), generate(model, **x)
    with vlmeff.patch(model, method, keep=1.0, **options) as p:
        assert torch.equal(logits(model, **x), ref)
        assert p.stats["visual_tokens"] == {"input": [16, 8, 8], "before LLM": [16, 8, 8]}
        assert torch.equal(generate(model, **x), ref_gen)


def test_full_budget_is_exact_right_padded(model):
    """Right padding: M-RoPE positions from the model's own `get_rope_index` with the mask, as its forward and
    generate compute them."""
    x = inputs([A, B, C])
    ids, mask = x["input_ids"], x["attention_mask"]
    shift = mask.sum(1, keepdim=True) - mask.shape[1]           # roll each sample's tokens to the left end
    order = (torch.arange(ids.shape[1]) - shift) % ids.shape[1]
    x = dict(x, input_ids=ids.gather(1, order), attention_mask=mask.gather(1, order))
    x["mm_token_type_ids"] = (x["input_ids"] == IMAGE).int()
    assert x["attention_mask"][:, 0].all() and not x["attention_mask"][:, -1].all()
    ref, ref_gen = logits(model, **x), generate(model, **x)
    with vlmeff.patch(model, "received", keep=1.0):
        assert torch.equal(logits(model, **x), ref)
        assert torch.equal(generate(model, **x), ref_gen)


@pytest.mark.parametrize("method,options", METHODS, ids=lambda v: v if isinstance(v, str) else str(v))
def test_batch_equals_samples_one_by_one(model, method, options):
    samples = [A, B, C]
    x = inputs(samples)
    with vlmeff.patch(model, method, keep=0.5, **options) as p:
        batched = logits(model, **x)[:, -1]
        assert p.stats["visual_tokens"] == {"input": [16, 8, 8], "before LLM": [8, 4, 4]}
        assert p.stats["prefill_flops"] < p.stats["prefill_flops_unpatched"]
        singles = [logits(model, **inputs([sample]))[0, -1] for sample in samples]
    torch.testing.assert_close(batched, torch.stack(singles), atol=1e-5, rtol=0)
    assert not torch.allclose(batched[:2], logits(model, **x)[:2, -1], atol=1e-3)   # the reduction did act


def test_cached_generate_equals_uncached(model):
    x = inputs([A, B, C])
    with vlmeff.patch(model, "received", keep=0.25):
        cached = generate(model, **x)
        uncached = generate(model, **x, use_cache=False)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached[:, :x["input_ids"].shape[1]], x["input_ids"])   # the caller's prompt comes back


def test_received_matches_eager_oracle(model):
    x = inputs([A, B])
    visual = model.model.visual
    with vlmeff.patch(model, "received", keep=0.5) as p:
        logits(model, **x)
        scores = p.stats["scores"]
    # default score block: the last one (Qwen2.5-VL: the last full-attention block)
    block = visual.blocks[getattr(visual.config, "fullatt_block_indexes", [len(visual.blocks) - 1])[-1]]
    with Recorder(block) as rec, torch.no_grad():
        model.model.get_image_features(x["pixel_values"], x["image_grid_thw"])
        attn = block.attn
        h = block.norm1(rec.args[0])
        S, H = h.shape[0], attn.num_heads
        q, k, _ = attn.qkv(h).view(S, 3, H, -1).unbind(1)
        cos, sin = (t.float()[:, None] for t in rec.kwargs["position_embeddings"])
        half = q.shape[-1] // 2
        q, k = ((t.float() * cos + torch.cat([-t[..., half:], t[..., :half]], -1).float() * sin) for t in (q, k))
        sizes = x["image_grid_thw"].prod(-1).tolist()        # patches per image (each image its own segment)
        per_patch = []
        for qi, ki in zip(q.split(sizes), k.split(sizes)):
            probs = torch.softmax(torch.einsum("qhd,khd->hqk", qi, ki) * attn.scaling, dim=-1)   # full N x N
            per_patch.append(probs.mean(dim=(0, 1)))
        per_row = torch.cat(per_patch).view(-1, 4).mean(dim=1)                # mean over each 2 x 2 merge group
        if hasattr(visual, "window_size"):      # Qwen2.5-VL: blocks see a window-permuted order of merge groups
            index, _ = get_vision_window_index(x["image_grid_thw"], 2, visual.window_size, visual.patch_size)
            assert not torch.equal(index, torch.arange(index.numel()))
            per_row = per_row[torch.argsort(index)]
    expected = per_row.split([s // 4 for s in sizes])
    assert len(scores) == 3
    for got, want in zip(scores, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_score_layers_add_blocks(model):
    """score_layers=0: blocks 0 .. score layer; each block gives every image scores summing to 1 over its patches
    (Qwen2.5-VL's windowed blocks included), i.e. 1 / 4 over its merged rows."""
    layers = model.model.visual.blocks
    last = getattr(model.config.vision_config, "fullatt_block_indexes", [len(layers) - 1])[-1]
    with vlmeff.patch(model, "received", keep=0.5, score_layers=0) as p:
        logits(model, **inputs([A, B]))
    for scores in p.stats["scores"]:
        torch.testing.assert_close(scores.sum(), torch.tensor((last + 1) / 4))


def test_kept_tokens_keep_original_positions(model):
    x = inputs([A, B, C])
    lm = model.model.language_model
    with Recorder(lm) as rec:
        logits(model, **x)
        original = rec.kwargs["position_ids"]
        deltas_before = model.model.rope_deltas.clone()
        with vlmeff.patch(model, "received", keep=0.5) as p:
            logits(model, **x)
        reduced, reduced_mask = rec.kwargs["position_ids"], rec.kwargs["attention_mask"]
    assert original.shape[0] == 3 and reduced.shape[0] == 3
    # rebuild which prompt tokens stayed from the kept feature rows of each image
    ids, mask = x["input_ids"], x["attention_mask"].bool()
    keep = (ids != IMAGE).flatten()
    runs = (ids == IMAGE).flatten().nonzero().squeeze(1).split(p.stats["visual_tokens"]["input"])
    for run, rows in zip(runs, p.stats["kept"]):
        keep[run[rows]] = True
    keep = keep.view_as(ids) & mask
    for b in range(ids.shape[0]):
        assert torch.equal(reduced[:, b, reduced_mask[b].bool()], original[:, b, keep[b]])
    # the base model's rope_deltas describe the reduced prompt (8 + 8 placeholders dropped from A and B)
    assert torch.equal(model.model.rope_deltas, deltas_before + torch.tensor([[8], [8], [0]]))


def test_multi_turn_continues_on_the_reduced_cache(model):
    x = inputs([A, B])
    with vlmeff.patch(model, "received", keep=0.5), torch.no_grad():
        first = model.generate(**x, max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE],
                               return_dict_in_generate=True)
        ids = torch.cat([first.sequences, torch.tensor([[30, 31], [32, 33]])], dim=1)
        follow = dict(x, input_ids=ids, attention_mask=torch.cat([x["attention_mask"], torch.ones(2, 5)], 1).long(),
                      mm_token_type_ids=(ids == IMAGE).int())
        images = {k: follow.pop(k) for k in ("pixel_values", "image_grid_thw")}
        kw = dict(max_new_tokens=3, do_sample=False, suppress_tokens=[IMAGE], return_dict_in_generate=True,
                  output_logits=True)
        cached = model.generate(**follow, cache=first.cache, **kw)
        fresh = model.generate(**follow, **images, **kw)       # the whole conversation reduced from scratch
    assert torch.equal(cached.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(fresh.logits), atol=1e-4, rtol=0)


def test_pool_uses_each_images_grid(model):
    x = inputs([B])                                       # two images of 8 tokens: grids 2 x 4 and 4 x 2
    with torch.no_grad():
        out = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"], return_dict=True)
    with vlmeff.patch(model, "pool", keep=2) as p, Recorder(model.model) as rec:
        logits(model, **x)
        given = rec.kwargs["mm_encoder_outputs"]["image"]
    for i, (h, w) in enumerate([(2, 4), (4, 2)]):
        cells, (hp, wp) = pool_assignment(h, w, 2)
        first = [int((cells == c).nonzero()[0]) for c in range(hp * wp)]
        assert p.stats["kept"][i].tolist() == sorted(first)
        order = sorted(range(hp * wp), key=lambda c: first[c])
        pooled = lambda f: torch.stack([f[cells == c].mean(dim=0) for c in order])
        torch.testing.assert_close(given.pooler_output[i], pooled(out.pooler_output[i]))
        for j, stack in enumerate(getattr(out, "deepstack_features", None) or []):     # Qwen3-VL: pooled alike
            torch.testing.assert_close(given.deepstack_features[j][i], pooled(stack[i]))


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])      # deepstack features exist on Qwen3-VL only
def test_deepstack_features_follow_the_kept_rows(family):
    model = tiny_qwen(family)
    x = inputs([A, B])
    with torch.no_grad():
        out = model.model.get_image_features(x["pixel_values"], x["image_grid_thw"], return_dict=True)
    with vlmeff.patch(model, "received", keep=0.25) as p, Recorder(model.model) as rec:
        logits(model, **x)
        given = rec.kwargs["mm_encoder_outputs"]["image"]
    assert type(given) is type(out) and len(given.deepstack_features) == 2
    for i, rows in enumerate(p.stats["kept"]):
        assert torch.equal(given.pooler_output[i], out.pooler_output[i][rows])
        for j in range(2):
            assert torch.equal(given.deepstack_features[j][i], out.deepstack_features[j][i][rows])


@pytest.mark.parametrize("method", ["cls", "visionzip"])
def test_cls_methods_raise_naming_alternatives(model, method):
    with pytest.raises(ValueError, match="does not have.*received"):
        vlmeff.patch(model, method, keep=0.5)
    assert not hasattr(model, "_vlmeff_patch")


def test_unpatch_restores_bit_identical_outputs(model):
    x = inputs([A, B, C])
    ref = logits(model, **x)
    p = vlmeff.patch(model, "received", keep=0.5, reduce="merge")
    assert logits(model, **x).shape[1] < ref.shape[1]
    p.unpatch()
    assert torch.equal(logits(model, **x), ref)
    assert "forward" not in vars(model) and "generate" not in vars(model)
    assert not model.model._forward_pre_hooks
    assert not any(block.attn._forward_pre_hooks for block in model.model.visual.blocks)
