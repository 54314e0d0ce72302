"""DART (Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters More",
arXiv 2502.11494): keep the visual tokens that duplicate the pivots least. Pure tensor functions; the engine
(`vlmeff.engine.llm`) calls them at the input of decoder layer K.

The reference (LLaVA-1.5, K = 2, batch of one): pivots are the 4 image tokens and the 4 text tokens after the
image whose post-RoPE keys of layer K - 1 have the largest L1 norm (heads concatenated); each pivot in turn takes
the TOPK image tokens least cosine-similar to it (on layer K - 1's output through the LLM's final norm) among those
no pivot has taken yet, image pivots excluded; the image pivots and every token taken are kept.
"""
import torch
import torch.nn.functional as F

from .reduce import gather_rows


def key_l1_norms(k):
    """k [B, Hk, L, d] a layer's post-RoPE keys -> [B, L] float32: the L1 norm of each column's keys, all heads
    concatenated. (Grouped-query models: the reference repeats the kv heads first, which scales every column's norm
    by the same factor and leaves the ranking as it is.)"""
    return k.float().abs().sum(dim=(1, 3))


def pivot_shares(kept, n_visual, n_text, image_pivots, text_pivots, split):
    """Host arithmetic of one sample: (image pivots, picks per pivot slot, visual tokens kept).

    kept: the budget (visual tokens, <= n_visual); n_text: the text tokens after the sample's last visual token.
    Slots: `image_pivots` image slots, then `text_pivots` text slots; a slot without a pivot (fewer candidates)
    picks 0. split "exact": the image pivots (at most `kept`) count into the budget, the rest is split over the
    pivots, the first (rest mod pivots) in visiting order taking one more, so `kept` tokens stay. "reference" (DART's
    scripts with max_num_trunction M = kept): every pivot picks floor(M / (image_pivots + text_pivots)), the image
    pivots stay on top: 4 + 8 floor(M / 8) tokens (132 for M = 128), as far as there are tokens to pick.
    """
    slots = image_pivots + text_pivots
    if n_visual == 0:
        return 0, [0] * slots, 0
    if split == "exact":
        pi, pt = min(image_pivots, kept), min(text_pivots, n_text)
        base, extra = divmod(kept - pi, pi + pt)
        order = [base + (j < extra) for j in range(pi + pt)]          # visiting order: image pivots, then text ones
        shares = order[:pi] + [0] * (image_pivots - pi) + order[pi:] + [0] * (text_pivots - pt)
        return pi, shares, kept
    pi, pt = min(image_pivots, n_visual), min(text_pivots, n_text)
    each = kept // slots
    shares, left = [], n_visual - pi
    for j in range(slots):
        real = j < pi if j < image_pivots else j - image_pivots < pt
        take = min(each, left) if real else 0
        shares.append(take)
        left -= take
    return pi, shares, pi + sum(shares)


def duplication_aware_keep(hidden, key_norm, visual, text, image_count, text_count, shares, widths, image_slots):
    """DART's selection over a batch: [B, L] bool, the visual columns kept.

    hidden [B, L, D]: the columns' states through the final norm (similarity); key_norm [B, L]: `key_l1_norms`
    (pivots); visual / text [B, L] bool: the visual columns and the text columns pivots are drawn from;
    image_count / text_count [B] int64: pivots of each kind per sample (at most `image_slots` / the other slots);
    shares [B, P] int64: the picks of each pivot slot, the `image_slots` image slots first (`pivot_shares`);
    widths: P host ints, each slot's largest share over the batch (the width of its topk).
    Pivots are visited in ascending column order (the reference visits Python's set order of their positions, an
    artefact of hashing); each takes its share of the visual columns least cosine-similar to it that are neither
    image pivots nor taken before.
    Launches: 2 x (topk, where, argsort, 2 gathers) for the pivots, normalize + gather + bmm, then about 9 per slot
    with a non-zero width; no host sync.
    """
    L = hidden.shape[1]
    text_slots = shares.shape[1] - image_slots
    image, image_valid = _pivots(key_norm, visual, min(L, image_slots), image_count)
    texts, _ = _pivots(key_norm, text, min(L, text_slots), text_count)
    slots = list(range(image.shape[1])) + [image_slots + j for j in range(texts.shape[1])]
    unit = F.normalize(hidden.float(), dim=-1)
    similarity = unit @ gather_rows(unit, torch.cat([image, texts], dim=1)).transpose(1, 2)      # [B, L, pivots]
    kept = torch.zeros_like(visual).scatter_(1, image, image_valid)
    for pivot, slot in enumerate(slots):
        if widths[slot] == 0:
            continue
        free = visual & ~kept
        dissimilarity = (-similarity[..., pivot]).masked_fill(~free, float("-inf"))
        picked = dissimilarity.topk(min(widths[slot], L), dim=1).indices
        take = (torch.arange(picked.shape[1], device=picked.device) < shares[:, slot, None]) & free.gather(1, picked)
        # topk's columns are distinct: one scatter of the taken ones, or-ed in, never clears a kept column
        kept = kept | torch.zeros_like(kept).scatter_(1, picked, take)
    return kept


def _pivots(key_norm, allowed, slots, count):
    """The count [B] columns of largest key_norm among `allowed` [B, L], ascending, then `slots - count` invalid
    fillers (column 0): (columns [B, slots], valid [B, slots])."""
    top = key_norm.masked_fill(~allowed, float("-inf")).topk(slots, dim=1).indices
    rank = torch.arange(slots, device=top.device)
    valid = rank < count[:, None]
    order = torch.where(valid, top, key_norm.shape[1] + rank).argsort(dim=1)
    return torch.where(valid, top, 0).gather(1, order), valid.gather(1, order)
