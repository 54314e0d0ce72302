"""SparseVLM (text raters, rater-guided stages inside the LLM, recycling by DPC-kNN): the batched pieces equal
direct per-sample oracles (Python loops, float64), the engine equals a decoder run written here from the
algorithm on the model's own layers, the reference's counts, full budget, batching, cache and composition."""
import math

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

import vlmeff
from lvlm_models import IMAGE, generate, language_model_inputs, logits, setup_any
from vlmeff.pruners import stages
from vlmeff.pruners.sparsevlm import dpc_knn_merge, recycled_counts, select_raters


# -- direct oracles ----------------------------------------------------------------------------------------------
def direct_raters(embeds, visual_cols, text_cols):
    """The text columns whose mean (over visual tokens) softmax share of the visual-to-text dot products exceeds
    the mean share; all text columns when none does."""
    V, T = embeds[visual_cols].double(), embeds[text_cols].double()
    share = torch.softmax(V @ T.T, dim=1).mean(0)
    raters = [c for c, r in zip(text_cols, share.tolist()) if r > float(share.mean())]
    return raters or list(text_cols)


def direct_dpc(x, clusters):
    """DPC-kNN of the rows of x [n, C] into `clusters` clusters: (centres in order, members per centre, merged)."""
    n, C = x.shape
    x = x.double()
    dist = [[float((x[i] - x[j]).norm()) / math.sqrt(C) for j in range(n)] for i in range(n)]
    density = [math.exp(-sum(d * d for d in sorted(row)[:clusters]) / clusters) for row in dist]
    top = max(max(row) for row in dist)
    delta = [min([dist[i][j] for j in range(n) if density[j] > density[i]], default=top) for i in range(n)]
    centres = sorted(range(n), key=lambda i: (-density[i] * delta[i], i))[:clusters]
    members = {c: [c] for c in centres}
    for i in range(n):
        if i not in centres:
            members[min(centres, key=lambda c: (dist[c][i], centres.index(c)))].append(i)
    merged = [x[members[c]].sum(0) / (len(members[c]) + 1e-6) for c in centres]
    return centres, members, merged


def test_recycled_counts_give_the_reference_s_token_counts():
    """SparseVLM v1.5 on 576 tokens: 300 + 9, 200 + 4, 110 + 3 (budget 192); 66 + 16, 30 + 2, 17 + 1 (budget 64)."""
    for budget, totals in ((192, [309, 204, 113]), (128, [312, 117, 39]), (96, [249, 55, 27]), (64, [82, 32, 18])):
        exact, ratios = stages.sparsevlm_schedule(budget / 576)
        assert exact
        now, seen = 576, []
        for ratio in ratios:
            top = round(ratio * 576)
            now = top + recycled_counts(now - top)[1]
            seen.append(now)
        assert seen == totals
    assert recycled_counts(0) == (0, 0) and recycled_counts(1) == (1, 1) and recycled_counts(40) == (13, 2)


def test_reference_budgets_take_the_reference_schedule_on_its_depth():
    planned = stages.plan_stages("sparsevlm", 128 / 576, {}, 32)
    assert [(s.layer, s.score_layer) for s in planned] == [(3, 2), (7, 6), (16, 15)]
    assert [round(s.keep * 576) for s in planned] == [303, 110, 36]
    # another budget: the nearest schedule's shape, scaled to the average share
    other = stages.plan_stages("sparsevlm", 0.25, {}, 32)
    assert stages.average_share([s.keep for s in other], [3, 7, 16], 32) == pytest.approx(0.25)
    shape = [n / 576 for n in (303, 110, 36)]                                      # 144 tokens: nearest 128
    assert [s.keep / r for s, r in zip(other, shape)] == pytest.approx([other[0].keep / shape[0]] * 3)


@pytest.mark.parametrize("seed", range(4))
def test_raters_equal_the_direct_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    B, L, D = 3, 20, 8
    embeds = torch.randn(B, L, D, generator=g)
    visual = torch.zeros(B, L, dtype=torch.bool)
    visual[0, 2:10], visual[1, 1:5], visual[1, 7:12], visual[2, 3:15] = True, True, True, True
    text = [list(range(10, 20)), list(range(12, 17)), list(range(15, 20))]
    Q = max(map(len, text))
    rows = torch.tensor([t + [t[-1]] * (Q - len(t)) for t in text])
    real = torch.tensor([[j < len(t) for j in range(Q)] for t in text])
    weights = select_raters(embeds, visual, rows, real)
    for b in range(B):
        raters = direct_raters(embeds[b], visual[b].nonzero()[:, 0].tolist(), text[b])
        got = {int(c) for c, w in zip(rows[b], weights[b]) if w > 0}
        assert got == set(raters)
        torch.testing.assert_close(weights[b].sum(), torch.tensor(1.0))
    flat = torch.zeros(1, 6, 4)                            # equal relevance everywhere: every text row rates
    v = torch.tensor([[True, True, False, False, False, False]])
    w = select_raters(flat, v, torch.tensor([[2, 3, 4, 5]]), torch.ones(1, 4, dtype=torch.bool))
    assert torch.equal(w, torch.full((1, 4), 0.25))


@pytest.mark.parametrize("seed", range(4))
def test_dpc_knn_merge_equals_the_direct_oracle(seed):
    g = torch.Generator().manual_seed(seed)
    counts, clusters = torch.tensor([12, 7, 1]), torch.tensor([2, 3, 1])
    x = torch.randn(3, 12, 5, generator=g)
    centres, merged = dpc_knn_merge(x, counts, clusters, 3)
    for b in range(3):
        n, c = int(counts[b]), int(clusters[b])
        want_centres, _, want_merged = direct_dpc(x[b, :n], c)
        assert centres[b, :c].tolist() == want_centres
        torch.testing.assert_close(merged[b, :c].double(), torch.stack(want_merged), atol=1e-5, rtol=1e-5)
        assert len(set(centres[b].tolist())) == 3                                  # filler slots stay distinct


# -- the engine against a decoder run written here ----------------------------------------------------------------
def attention_probs(layer, h, rope):
    """Head-mean causal softmax attention [L, L] of a Llama decoder layer on its input h [1, L, D]."""
    attn = layer.self_attn
    normed = layer.input_layernorm(h)
    q = attn.q_proj(normed).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(normed).view(1, h.shape[1], -1, attn.head_dim).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *rope)
    k = repeat_kv(k, attn.num_key_value_groups)
    logits_ = (q @ k.transpose(2, 3)) * attn.scaling
    causal = torch.ones(h.shape[1], h.shape[1], dtype=torch.bool).tril()
    return logits_.masked_fill(~causal, float("-inf")).softmax(-1).mean(1)[0]


def direct_sparsevlm(model, inputs, plan, recycle, renumber):
    """Per sample: (last-token logits, the sample's kept columns) of SparseVLM run layer by layer on the sample
    alone; a merged token takes its cluster centre's column (and position), as vlmeff lays it out."""
    lm = model.model.language_model
    embeds, positions = language_model_inputs(model, inputs)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    out, kept_sets = [], []
    with torch.no_grad():
        for b in range(ids.shape[0]):
            cols = mask[b].nonzero()[:, 0].tolist()                # the sample's columns in the batch
            h = embeds[b:b + 1, cols]
            pos0 = positions[b, cols]
            visual0 = [bool(ids[b, c] == IMAGE) for c in cols]
            n = sum(visual0)
            last = max(i for i, v in enumerate(visual0) if v)
            raters = direct_raters(h[0], [i for i, v in enumerate(visual0) if v], list(range(last + 1, len(cols))))
            origin = list(range(len(cols)))                        # sample column of each current column
            dropped = set()
            now = n
            rope = lm.rotary_emb(h, pos0[None])
            score = None
            for i, layer in enumerate(lm.layers):
                stage = next((s for s, (at, _) in enumerate(plan) if at == i), None)
                if stage is not None:
                    vis = [j for j, o in enumerate(origin) if visual0[o]]
                    k = min(now, max(1, min(n, round(plan[stage][1] * n))))
                    ranked = sorted(vis, key=lambda j: -float(score[j]))
                    top, pruned = ranked[:k], ranked[k:]
                    centres = []
                    if recycle and pruned:
                        n_rec, c = recycled_counts(len(pruned))
                        candidates = pruned[:n_rec]
                        picked, _, merged = direct_dpc(h[0, candidates], c)
                        centres = [candidates[p] for p in picked]
                        for j, m in zip(centres, merged):
                            h[0, j] = m.to(h.dtype)
                    keep = sorted(set(range(len(origin))) - set(vis) | set(top) | set(centres))
                    dropped |= {origin[j] for j in vis if j not in keep}
                    origin = [origin[j] for j in keep]
                    h = h[:, keep]
                    now = len(top) + len(centres)
                    pos = pos0[origin]
                    if renumber:
                        pos = pos - torch.tensor([sum(d < o for d in dropped) for o in origin])
                    rope = lm.rotary_emb(h, pos[None])
                if any(at == i + 1 for at, _ in plan):
                    probs = attention_probs(layer, h, rope)
                    rows = [origin.index(r) for r in raters]
                    score = probs[rows].mean(0)
                h = layer(h, attention_mask=None, position_embeddings=rope, position_ids=None)
            out.append(model.lm_head(lm.norm(h))[0, -1])
            kept_sets.append({cols[o] for o in origin})
    return torch.stack(out), kept_sets


@pytest.mark.parametrize("recycle", [True, False])
@pytest.mark.parametrize("positions", ["renumber", "original"])
@pytest.mark.parametrize("keep", [None, 0.45])
def test_the_engine_equals_the_direct_decoder_run(recycle, positions, keep):
    model, inputs = setup_any("llava")
    with vlmeff.patch(model, "sparsevlm", keep=keep, recycle=recycle, positions=positions) as patch:
        out = logits(model, inputs)[:, -1]
        kept = patch.stats["llm_kept"]
        plan = list(zip(patch.config["layers"], patch.config["ratios"]))
        counts = patch.stats["visual_tokens"]
    want, kept_sets = direct_sparsevlm(model, inputs, plan, recycle, positions == "renumber")
    for b, expected in enumerate(kept_sets):
        assert set(kept[b].nonzero()[:, 0].tolist()) & set(inputs["attention_mask"][b].nonzero()[:, 0].tolist()) \
            == expected
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-5)
    # 16 visual tokens, stages at layers 1, 2 of 4: the top counts plus the clusters of the recycled candidates
    tops = [round(r * 16) for _, r in plan]
    totals, now = [], 16
    for t in tops:
        now = min(now, t) + (recycled_counts(now - min(now, t))[1] if recycle else 0)
        totals.append(now)
    assert [counts[f"after LLM layer {layer}"] for layer, _ in plan] == [[t, t] for t in totals]


def test_a_576_token_image_keeps_the_counts_of_the_resolved_schedule():
    """LLaVA-1.5's 576 tokens on a 4-layer LM: the stages keep round(ratio * 576) of Patch.config's ratios plus
    the recycled clusters, for the default schedule and for a budget whose shape is scaled."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_id=250,
                                                      vision_feature_layer=-2)).eval()
    inputs = dict(input_ids=torch.tensor([[1, 5, 6] + [250] * 576 + [7, 8, 9]]),
                  pixel_values=torch.randn(1, 3, 336, 336))
    for keep, expected in ((None, [212, 114]), (0.3, [71, 32])):
        with vlmeff.patch(model, "sparsevlm", keep=keep) as patch, torch.no_grad():
            model(**inputs)
        now, counts = 576, []
        for ratio in patch.config["ratios"]:
            top = min(now, round(ratio * 576))
            now = top + recycled_counts(now - top)[1]
            counts.append(now)
        assert counts == expected
        assert [patch.stats["visual_tokens"][f"after LLM layer {layer}"] for layer in (1, 2)] == [[c] for c in counts]


def test_full_budget_is_identical_and_batches_equal_samples_and_cache_is_consistent():
    model, inputs = setup_any("llava")
    ref, ref_tokens = logits(model, inputs), generate(model, inputs)
    with vlmeff.patch(model, "sparsevlm", ratios=[1.0, 1.0]):
        assert torch.equal(logits(model, inputs), ref)
        assert torch.equal(generate(model, inputs), ref_tokens)
    with vlmeff.patch(model, "sparsevlm"):
        batched = logits(model, inputs)[:, -1]
        cached = generate(model, inputs, return_dict_in_generate=True, output_logits=True)
        fresh = generate(model, inputs, use_cache=False, return_dict_in_generate=True, output_logits=True)
        for b in range(2):
            valid = inputs["attention_mask"][b].bool()
            alone = dict(input_ids=inputs["input_ids"][b:b + 1, valid], pixel_values=inputs["pixel_values"][b:b + 1])
            torch.testing.assert_close(logits(model, alone)[0, -1], batched[b], atol=1e-4, rtol=1e-4)
    assert torch.equal(cached.sequences, fresh.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(fresh.logits), atol=1e-4, rtol=1e-4)
    assert torch.equal(logits(model, inputs), ref) and "forward" not in vars(model)


@pytest.mark.parametrize("family", ["qwen2", "next", "internvl"])
def test_other_families_run_and_undo(family):
    model, inputs = setup_any(family)
    ref = logits(model, inputs)
    with vlmeff.patch(model, "sparsevlm", keep=0.5 if family == "qwen2" else None) as patch:
        out = logits(model, inputs)
        generate(model, inputs)
        assert patch.config["positions"] == ("original" if family == "qwen2" else "renumber")
    assert out.shape == ref.shape and not torch.allclose(out[:, -1], ref[:, -1])
    assert torch.equal(logits(model, inputs), ref)


def test_composition_with_a_method_before_the_llm_undoes_exactly():
    model, inputs = setup_any("llava")
    ref = logits(model, inputs)
    with vlmeff.patch(model, [("divprune", {"keep": 8}), ("sparsevlm", {})]) as patch:
        logits(model, inputs)
        tokens = patch.stats["visual_tokens"]
        assert tokens["before LLM"] == [8, 8] and tokens["LLM input"] == [8, 8]
    with vlmeff.patch(model, [("divprune", {"keep": 1.0}), ("sparsevlm", {"ratios": [1.0, 1.0]})]):
        assert torch.equal(logits(model, inputs), ref)
    assert torch.equal(logits(model, inputs), ref)


@pytest.mark.parametrize("options, error, words", [
    (dict(keep=4), ValueError, "average share"),
    (dict(keep=0.5, ratios=[0.5, 0.2]), ValueError, "not both"),
    (dict(recycle=1), TypeError, "recycle=1"),
    (dict(ratios=[0.5]), ValueError, "a list of 2 non-increasing floats"),
    (dict(layers=[0, 2]), ValueError, "layers=\\[0, 2\\]"),
])
def test_bad_options_are_clear_errors(options, error, words):
    model, _ = setup_any("llava")
    with pytest.raises(error, match=words):
        vlmeff.patch(model, "sparsevlm", **options)
    assert "forward" not in vars(model)
