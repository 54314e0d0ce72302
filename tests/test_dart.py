"""DART (duplication-aware pruning inside the LLM): the batched selection equals a direct per-sample oracle, the
engine keeps what the oracle keeps on the model's own keys and states, kept counts, options."""
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import vlmeff
from lvlm_models import IMAGE, language_model_inputs, logits, setup_any
from test_llm_stage import oracle_logits
from vlmeff.pruners.dart import _pivots, duplication_aware_keep, pivot_shares


def direct_dart(hidden, key_norm, visual, text, budget, image_pivots, text_pivots, split):
    """One sample, written from DART's description with Python sets and loops: pivots are the image / text
    columns of largest key norm, visited in ascending column order; each takes its share of the remaining image
    columns, least cosine-similar first. Returns the kept visual columns (a set)."""
    image_cols = [c for c in range(len(visual)) if visual[c]]
    text_cols = [c for c in range(len(text)) if text[c]]

    def by_norm(cols):
        return sorted(cols, key=lambda c: -float(key_norm[c]))
    n_text = len(text_cols)
    if split == "exact":
        pi, pt = min(image_pivots, budget), min(text_pivots, n_text)
        rest = budget - pi
        shares = [rest // (pi + pt) + (j < rest % (pi + pt)) for j in range(pi + pt)]
    else:
        pi, pt = min(image_pivots, len(image_cols)), min(text_pivots, n_text)
        shares = [budget // (image_pivots + text_pivots)] * (pi + pt)
    pivots = sorted(by_norm(image_cols)[:pi]) + sorted(by_norm(text_cols)[:pt])
    kept = set(pivots[:pi])
    for pivot, share in zip(pivots, shares):
        candidates = [c for c in image_cols if c not in kept]
        cos = {c: float(torch.nn.functional.cosine_similarity(hidden[pivot], hidden[c], dim=0)) for c in candidates}
        kept |= set(sorted(candidates, key=lambda c: cos[c])[:share])
    return kept


def batched(hidden, key_norm, visual, text, budgets, image_pivots, text_pivots, split):
    plans = [pivot_shares(k, int(v.sum()), int(t.sum()), image_pivots, text_pivots, split)
             for k, v, t in zip(budgets, visual, text)]
    shares = torch.tensor([s for _, s, _ in plans])
    widths = [int(w) for w in shares.amax(0)]
    kept = duplication_aware_keep(hidden, key_norm, visual, text, torch.tensor([p for p, _, _ in plans]),
                                  text.sum(1).clamp(max=text_pivots), shares, widths, image_pivots)
    return kept, [total for _, _, total in plans]


@pytest.mark.parametrize("split", ["exact", "reference"])
@pytest.mark.parametrize("seed,D", [(seed, 8) for seed in range(6)] + [(6, 2), (7, 2)])
def test_selection_equals_the_direct_oracle(seed, D, split):
    """D = 2: states narrower than the pivot slots (the sequence length, not the width, bounds the pivots)."""
    g = torch.Generator().manual_seed(seed)
    B, L = 3, 40
    hidden, key_norm = torch.randn(B, L, D, generator=g), torch.rand(B, L, generator=g)
    visual = torch.zeros(B, L, dtype=torch.bool)
    visual[0, 3:27], visual[1, 5:13], visual[1, 15:30], visual[2, 10:14] = True, True, True, True
    last = torch.where(visual, torch.arange(L), -1).amax(1, keepdim=True)
    text = (torch.arange(L) > last) & (torch.rand(B, L, generator=g) < 0.7)
    text[2] = False                                        # a prompt that ends with its image: no text pivot
    budgets = [int(torch.randint(1, int(v.sum()) + 1, (), generator=g)) for v in visual]
    budgets[2] = 2                                         # fewer than the image pivots
    kept, totals = batched(hidden, key_norm, visual, text, budgets, 4, 3, split)
    for b in range(B):
        expected = direct_dart(hidden[b], key_norm[b], visual[b], text[b], budgets[b], 4, 3, split)
        assert set(kept[b].nonzero()[:, 0].tolist()) == expected
        assert int(kept[b].sum()) == totals[b] == len(expected)
        if split == "exact":
            assert totals[b] == budgets[b]


def test_the_selection_builds_every_tensor_on_the_states_device():
    """On `meta` (a GPU stands in): a helper tensor made on the host would meet the device's tensors and fail."""
    B, L, P = 2, 12, 5
    visual = torch.zeros(B, L, dtype=torch.bool, device="meta")
    kept = duplication_aware_keep(torch.empty(B, L, 4, device="meta"), torch.empty(B, L, device="meta"), visual,
                                  visual, torch.ones(B, dtype=torch.long, device="meta"),
                                  torch.ones(B, dtype=torch.long, device="meta"),
                                  torch.ones(B, P, dtype=torch.long, device="meta"), [1] * P, 2)
    assert kept.device.type == "meta" and kept.shape == (B, L) and kept.dtype == torch.bool


def test_reference_split_keeps_dart_s_counts():
    """DART's scripts with max_num_trunction M keep 4 + 8 floor(M / 8) of LLaVA-1.5's 576: 196 / 132 / 68."""
    assert [pivot_shares(m, 576, 20, 4, 4, "reference")[2] for m in (192, 128, 64)] == [196, 132, 68]
    assert [pivot_shares(m, 576, 20, 4, 4, "exact")[2] for m in (192, 128, 64)] == [192, 128, 64]
    assert pivot_shares(64, 576, 20, 4, 4, "exact")[1] == [8, 8, 8, 8, 7, 7, 7, 7]
    assert pivot_shares(10, 6, 20, 4, 4, "reference")[2] == 6          # no more than there are
    assert pivot_shares(0, 0, 3, 4, 4, "exact") == (0, [0] * 8, 0)
    assert pivot_shares(1, 1, 3, 4, 4, "exact") == (1, [0] * 8, 1)      # one visual token: it is the pivot
    # one text token: the three text slots without a pivot pick nothing, in both splits
    assert pivot_shares(80, 100, 1, 4, 4, "reference") == (4, [10] * 5 + [0] * 3, 54)
    assert pivot_shares(80, 100, 1, 4, 4, "exact") == (4, [16, 15, 15, 15, 15, 0, 0, 0], 80)


def test_pivots_come_first_in_column_order_and_fillers_last():
    """`_pivots`: the valid columns ascending, then fillers (column 0, invalid), even when a pivot is the last
    column; a one-column sequence without pivots gives one filler."""
    key_norm = torch.tensor([[0.5, 0.1, 0.9, 0.2, 0.3, 0.8, 0.1, 0.1, 0.1, 0.7]])
    allowed = torch.zeros(1, 10, dtype=torch.bool)
    allowed[0, [2, 9]] = True
    columns, valid = _pivots(key_norm, allowed, 4, torch.tensor([2]))
    assert columns.tolist() == [[2, 9, 0, 0]] and valid.tolist() == [[True, True, False, False]]
    columns, valid = _pivots(torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.bool), 1, torch.tensor([0]))
    assert columns.tolist() == [[0]] and valid.tolist() == [[False]]


def model_keys_and_states(model, inputs, K):
    """Without vlmeff: layer K - 1's post-RoPE keys (its k_proj output, rotated by transformers' own
    apply_rotary_pos_emb) and layer K's input through the final norm, from the unpatched model."""
    lm = model.model.language_model
    seen = {}
    handle = lm.layers[K - 1].self_attn.k_proj.register_forward_hook(lambda m, a, out: seen.update(k=out))
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    embeds, positions = language_model_inputs(model, inputs)
    cos, sin = lm.rotary_emb(embeds, positions)
    attn = lm.layers[K - 1].self_attn
    k = seen["k"].unflatten(-1, (-1, attn.head_dim)).transpose(1, 2)
    _, k = apply_rotary_pos_emb(k, k, cos, sin)
    with torch.no_grad():
        states = lm.norm(out.hidden_states[K])
    return k.abs().sum(dim=(1, 3)), states


@pytest.mark.parametrize("family", ["llava", "qwen2"])
@pytest.mark.parametrize("keep", [5, 0.25])
def test_the_engine_keeps_what_the_oracle_keeps(family, keep):
    model, inputs = setup_any(family)
    with vlmeff.patch(model, "dart", keep=keep, text_pivots=2) as patch:
        out = logits(model, inputs)[:, -1]
        kept, K = patch.stats["llm_kept"], patch.config["layer"]
    norms, states = model_keys_and_states(model, inputs, K)
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    visual = ids == IMAGE
    for b in range(ids.shape[0]):
        last = int(visual[b].nonzero().max())
        text = mask[b] & ~visual[b] & (torch.arange(ids.shape[1]) > last)
        budget = keep if isinstance(keep, int) else round(keep * int(visual[b].sum()))
        expected = direct_dart(states[b], norms[b], visual[b], text, budget, 4, 2, "exact")
        assert set((kept[b] & visual[b]).nonzero()[:, 0].tolist()) == expected
    assert torch.equal(kept | visual, torch.ones_like(kept))                  # only visual tokens go
    if family == "llava":
        torch.testing.assert_close(out, oracle_logits(model, inputs, kept, K), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("options, error, words", [
    (dict(keep=None), ValueError, "needs keep"),
    (dict(keep=4, image_pivots=0), ValueError, "image_pivots=0"),
    (dict(keep=4, text_pivots=-1), ValueError, "text_pivots=-1"),
    (dict(keep=4, text_pivots=1.5), TypeError, "text_pivots=1.5"),
    (dict(keep=4, split="floor"), ValueError, "split='floor'"),
    (dict(keep=4, layer=0), ValueError, "layer=0"),
])
def test_bad_options_are_clear_errors(options, error, words):
    model, _ = setup_any("llava")
    with pytest.raises(error, match=words.replace("(", r"\(")):
        vlmeff.patch(model, "dart", **options)
