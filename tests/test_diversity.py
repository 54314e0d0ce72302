"""DivPrune, CDPruner and VisPruner (selections by diversity, before the LLM): the batched selections equal direct
per-block oracles written from the papers' descriptions (Python loops, float64, brute-force determinants), the
engine keeps what the oracles keep on the model's own features, on every family that can serve them."""
import copy

import pytest
import torch

import vlmeff
from lvlm_models import (A, B, EVERY_FAMILY, IMAGE, batch, generate, logits, pixels, prompt, qwen_inputs, setup_any,
                         tiny_llava)
from test_lvlm import two_samples
from test_lvlm_families import sample
from vlmeff.engine import prompt as prompts
from vlmeff.engine.rows import reduce_rows
from vlmeff.pruners.diversity import (conditional_dpp, important_and_diverse, instruction_relevance, max_min_diversity,
                                      relevance_scale)


# -- direct oracles: one block, written from the method descriptions -------------------------------------------
def cosines(features):
    unit = features.double() / features.double().norm(dim=1, keepdim=True)
    return (unit @ unit.T).fill_diagonal_(1.0).tolist()


def direct_divprune(features, k):
    """Greedy max-min on 1 - cosine: first the row whose nearest other row is farthest, then the row farthest from
    the picked ones; ties to the lower row."""
    n = len(features)
    dist = [[1 - c for c in row] for row in cosines(features)]
    first = max(range(n), key=lambda j: (sorted(dist[i][j] for i in range(n))[1] if n > 1 else 0.0, -j))
    chosen = [first]
    while len(chosen) < k:
        rest = [j for j in range(n) if j not in chosen]
        chosen.append(max(rest, key=lambda j: (min(dist[s][j] for s in chosen), -j)))
    return sorted(chosen)


def direct_cdpruner(features, relevance, k):
    """Greedy MAP of the DPP with kernel diag(r) S diag(r): each step adds the row that makes det(L_Y) largest."""
    r = relevance.detach().double()
    kernel = r[:, None] * torch.tensor(cosines(features), dtype=torch.float64) * r[None]
    chosen = []
    for _ in range(k):
        rest = [j for j in range(len(features)) if j not in chosen]

        def det(j):
            idx = torch.tensor(chosen + [j])
            return float(torch.linalg.det(kernel[idx][:, idx]))
        chosen.append(max(rest, key=lambda j: (det(j), -j)))
    return sorted(chosen)


def direct_vispruner(attention, features, k, ratio, step):
    """floor(k ratio) rows of highest attention; the rest de-duplicated: alternate positions A / B, each A row's
    best cosine with B, the `step` most redundant A rows go, survivors by descending redundancy, then B."""
    n = len(features)
    order = sorted(range(n), key=lambda j: (-float(attention[j]), j))
    important = int(k * ratio)
    kept, rest = order[:important], order[important:]
    if k == important:
        return sorted(kept)
    cos = cosines(features)
    while len(rest) > k - important:
        remove = min(step, len(rest) - (k - important))
        a, b = rest[0::2], rest[1::2]
        redundancy = {i: max(cos[i][j] for j in b) for i in a}
        ranked = sorted(range(len(a)), key=lambda p: (-redundancy[a[p]], p))
        rest = [a[p] for p in ranked[remove:]] + b
    return sorted(kept + rest)


def blocks(seed, n=3, rows=14, dim=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rows, dim, generator=g), torch.rand(n, rows, generator=g)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 2, 5, 13, 14])
def test_max_min_diversity_equals_the_direct_oracle(seed, k):
    features, _ = blocks(seed)
    got = max_min_diversity(features, k)
    assert got.tolist() == [direct_divprune(f, k) for f in features]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [1, 3, 7, 14])
def test_conditional_dpp_equals_greedy_log_det(seed, k):
    features, raw = blocks(seed, dim=20)             # 20 > 14 rows: the kernel has full rank
    relevance = relevance_scale(raw)
    got = conditional_dpp(features, relevance, k)
    assert got.tolist() == [direct_cdpruner(f, r, k) for f, r in zip(features, relevance)]
    # the first pick has the largest gain r_i^2 S_ii = r_i^2: the most relevant row is always kept
    assert all(int(r.argmax()) in row for r, row in zip(relevance, got.tolist()))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k,ratio,step", [(6, 0.5, 8), (5, 0.5, 8), (7, 0.3, 2), (4, 0.0, 1), (4, 1.0, 8),
                                          (13, 0.5, 3), (1, 0.5, 8)])
def test_important_and_diverse_equals_the_direct_oracle(seed, k, ratio, step):
    features, attention = blocks(seed, rows=15)      # odd rest counts occur: A holds ceil(R / 2) rows
    got = important_and_diverse(attention, features, k, ratio, step)
    assert got.tolist() == [direct_vispruner(a, f, k, ratio, step) for a, f in zip(attention, features)]


def test_relevance_scale_and_instruction_relevance():
    raw = torch.tensor([[0.2, -0.4, 0.6], [0.5, 0.5, 0.5]])
    scaled = relevance_scale(raw)
    torch.testing.assert_close(scaled[0], (raw[0] + 0.4 + 1e-6) / 1.0)
    torch.testing.assert_close(scaled[1], torch.ones(3))          # no spread: the similarity kernel alone
    features, text = torch.randn(2, 5, 8), torch.randn(2, 8)
    expected = torch.nn.functional.cosine_similarity(features, text[:, None], dim=2)
    torch.testing.assert_close(instruction_relevance(features, text), expected)
    assert torch.equal(instruction_relevance(features, torch.zeros(2, 8)), torch.zeros(2, 5))


@pytest.mark.parametrize("method", ["divprune", "cdpruner", "vispruner"])
def test_protected_rows_are_kept_and_the_free_rows_selected_alone(method):
    features, attention = blocks(7, n=2, rows=12)
    protected = torch.zeros(12, dtype=torch.bool)
    protected[[3, 8, 11]] = True                       # row separators (LLaVA-NeXT newlines) in the middle
    free = (~protected).nonzero().squeeze(1)
    options = dict(important_ratio=0.5, step=8)
    out, _, rows = reduce_rows(method, options, features, 4, protected, attention, features)
    for b in range(2):
        f, a = features[b, free], attention[b, free]
        if method == "divprune":
            picked = direct_divprune(f, 4)
        elif method == "cdpruner":
            picked = direct_cdpruner(f, relevance_scale(a[None])[0], 4)
        else:
            picked = direct_vispruner(a, f, 4, 0.5, 8)
        assert rows[b].tolist() == sorted([3, 8, 11] + free[picked].tolist())
        assert torch.equal(out[b], features[b, rows[b]])


# -- on the model's own features ----------------------------------------------------------------------------------
def llava_features(model, pixel_values):
    """(post-projector features [n, 16, D], pre-projector tower features [n, 16, Dv], eager [CLS] attention [n, 16]
    at the feature layer): tiny LLaVA takes hidden_states[-2] without [CLS]."""
    tower = copy.deepcopy(model.model.vision_tower)
    tower.set_attn_implementation("eager")
    with torch.no_grad():
        projected = torch.stack(list(model.model.get_image_features(pixel_values=pixel_values,
                                                                    return_dict=True).pooler_output))
        out = tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    return projected, out.hidden_states[-2][:, 1:], out.attentions[-2][:, :, 0, 1:].mean(dim=1)


def direct_instructions(model, ids, mask, owners):
    """Per image (owners: its sample), the mean input embedding of its sample's attended non-image tokens."""
    table = model.get_input_embeddings().weight.detach()
    out = []
    for b in owners:
        tokens = [int(t) for t, m in zip(ids[b], mask[b]) if m and t != IMAGE]
        out.append(table[tokens].double().mean(0) if tokens else torch.zeros(table.shape[1], dtype=torch.float64))
    return out


def multi_image_batch():
    ids, mask = batch([prompt([1, 5], 2, [7, 8]), [1, 5, 6, 7, 8, 9], prompt([1, 20, 21], 1, [9])])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=pixels(3)), [0, 0, 2]


def test_divprune_keeps_the_oracle_rows_of_the_projected_features():
    model, inputs = tiny_llava(), two_samples()
    projected, _, _ = llava_features(model, inputs["pixel_values"])
    with vlmeff.patch(model, "divprune", keep=5) as h:
        logits(model, inputs)
    assert [r.tolist() for r in h.stats["kept"]] == [direct_divprune(f, 5) for f in projected]
    assert h.stats["scores"] == [None, None]


def test_cdpruner_keeps_the_oracle_rows_with_each_images_own_prompt():
    model = tiny_llava()
    inputs, owners = multi_image_batch()
    projected, _, _ = llava_features(model, inputs["pixel_values"])
    texts = direct_instructions(model, inputs["input_ids"], inputs["attention_mask"], owners)
    with vlmeff.patch(model, "cdpruner", keep=6) as h:
        logits(model, inputs)
    for f, t, kept, scores in zip(projected, texts, h.stats["kept"], h.stats["scores"]):
        raw = torch.nn.functional.cosine_similarity(f.double(), t[None], dim=1)
        torch.testing.assert_close(scores.double(), raw, atol=1e-5, rtol=0)
        assert kept.tolist() == direct_cdpruner(f, relevance_scale(raw[None])[0], 6)
    with vlmeff.patch(model, "cdpruner", keep=6, relevance="none") as h:
        logits(model, inputs)
    assert [r.tolist() for r in h.stats["kept"]] == [direct_cdpruner(f, torch.ones(16), 6) for f in projected]


def test_instruction_vectors_find_each_images_sample_without_a_host_read():
    model = tiny_llava()
    inputs, owners = multi_image_batch()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    starts = torch.tensor([1, 17, 33])
    got = prompts.instruction_vectors(ids, mask, IMAGE, model.get_input_embeddings().weight, starts)
    for g, expected in zip(got, direct_instructions(model, ids, mask, owners)):
        torch.testing.assert_close(g.double(), expected, atol=1e-6, rtol=0)
    only_images = torch.full((1, 16), IMAGE)
    assert torch.equal(prompts.instruction_vectors(only_images, None, IMAGE, model.get_input_embeddings().weight,
                                                   torch.tensor([1])).detach(), torch.zeros(1, 64))


def test_vispruner_keeps_the_oracle_rows_by_cls_attention_and_tower_features():
    model, inputs = tiny_llava(), two_samples()
    _, tower_features, attention = llava_features(model, inputs["pixel_values"])
    for ratio in (0.5, 0.2):
        with vlmeff.patch(model, "vispruner", keep=7, important_ratio=ratio) as h:
            logits(model, inputs)
        assert [r.tolist() for r in h.stats["kept"]] == [direct_vispruner(a, f, 7, ratio, 8)
                                                         for a, f in zip(attention, tower_features)]
        torch.testing.assert_close(torch.stack(h.stats["scores"]), attention, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["divprune", "cdpruner", "vispruner"])
def test_multi_image_batch_equals_each_sample_alone(method):
    model = tiny_llava()
    inputs, _ = multi_image_batch()
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    with vlmeff.patch(model, method, keep=0.25) as h:
        tokens = generate(model, inputs)
        kept = [r.tolist() for r in h.stats["kept"]]
        assert h.stats["visual_tokens"] == {"input": [16, 16, 16], "before LLM": [4, 4, 4]}
        for i, images in ((0, [0, 1]), (2, [2])):
            alone = dict(input_ids=ids[i:i + 1, mask[i].bool()], pixel_values=inputs["pixel_values"][images])
            new = generate(model, alone)[0, alone["input_ids"].shape[1]:]
            assert torch.equal(new, tokens[i, ids.shape[1]:])
            assert [r.tolist() for r in h.stats["kept"]] == [kept[j] for j in images]


# -- every family ------------------------------------------------------------------------------------------------
SIMILARITY = ["divprune", "cdpruner"]
CLS_FAMILIES = ["llava", "next"]


def alone(family, inputs, i):
    if family.startswith("qwen"):
        return qwen_inputs([[A, B][i]])
    if family == "llava":
        valid = inputs["attention_mask"][i].bool()
        return dict(input_ids=inputs["input_ids"][i:i + 1, valid], pixel_values=inputs["pixel_values"][i:i + 1])
    return sample(inputs, i)


def family_cases():
    return ([(f, m) for f in EVERY_FAMILY for m in SIMILARITY]
            + [(f, "vispruner") for f in CLS_FAMILIES])


@pytest.mark.parametrize("family,method", family_cases())
def test_full_budget_is_identical_and_reduced_batches_equal_each_sample(family, method):
    model, inputs = setup_any(family)
    ref_logits, ref_tokens = logits(model, inputs), generate(model, inputs)
    with vlmeff.patch(model, method, keep=1.0) as h:
        assert torch.equal(logits(model, inputs), ref_logits)
        assert torch.equal(generate(model, inputs), ref_tokens)
        assert h.stats["visual_tokens"]["input"] == h.stats["visual_tokens"]["before LLM"]
    with vlmeff.patch(model, method, keep=0.5) as h:
        batched = logits(model, inputs)[:, -1]
        counts = h.stats["visual_tokens"]
        assert all(n < m for n, m in zip(counts["before LLM"], counts["input"]))
        tokens = generate(model, inputs)
        for i in range(2):
            one = alone(family, inputs, i)
            torch.testing.assert_close(logits(model, one)[0, -1], batched[i], atol=1e-4, rtol=1e-4)
            new = generate(model, one)[0, one["input_ids"].shape[1]:]     # shorter when it ends with EOS
            assert torch.equal(new, tokens[i, inputs["input_ids"].shape[1]:][:new.numel()])
    assert torch.equal(logits(model, inputs), ref_logits)
    assert "forward" not in vars(model) and "generate" not in vars(model)


@pytest.mark.parametrize("family", ["onevision", "internvl", "gemma3", "qwen2"])
def test_vispruner_without_cls_is_refused_naming_the_alternatives(family):
    model, _ = setup_any(family)
    with pytest.raises(ValueError, match=r"\[CLS\].*divprune"):
        vlmeff.patch(model, "vispruner", keep=0.5)
    assert "forward" not in vars(model)


@pytest.mark.parametrize("method", SIMILARITY + ["vispruner"])
def test_composition_with_an_llm_side_method_undoes_exactly(method):
    model, inputs = setup_any("llava")
    ref, ref_tokens = logits(model, inputs), generate(model, inputs)
    with vlmeff.patch(model, [(method, {"keep": 8}), ("fastv", {"keep": 0.5})]) as patch:
        out = logits(model, inputs)
        tokens = patch.stats["visual_tokens"]
        assert tokens["before LLM"] == [8, 8] and tokens["after LLM layer 1"] == [4, 4]
    assert not torch.allclose(out[:, -1], ref[:, -1])
    with vlmeff.patch(model, [(method, {"keep": 1.0}), ("fastv", {"keep": 1.0})]):
        assert torch.equal(logits(model, inputs), ref)
    assert torch.equal(logits(model, inputs), ref) and torch.equal(generate(model, inputs), ref_tokens)


def test_conditional_dpp_keeps_k_distinct_rows_past_the_kernels_rank():
    """Plain-background images give duplicate features: once the kernel's rank is spent, the picks go on to k
    distinct rows (the reference's sqrt(0) gives NaN and repeated picks there)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 3, 8, generator=g)
    features = base[:, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])]          # rank 3, 12 rows
    for relevance in (torch.ones(1, 12), relevance_scale(torch.rand(1, 12, generator=g))):
        picked = conditional_dpp(features, relevance, 9)
        assert picked.shape == (1, 9) and len(set(picked[0].tolist())) == 9
        assert picked[0].tolist() == sorted(picked[0].tolist())
        first = conditional_dpp(features, relevance, 3)[0].tolist()
        assert sorted(r % 3 for r in first) == [0, 1, 2]                    # three picks span the rank
