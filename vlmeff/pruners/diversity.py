"""Selectors by diversity: DivPrune's max-min subset, CDPruner's conditional DPP and VisPruner's important-plus-
diverse tokens. Pure tensor functions over batches of feature blocks; every loop runs a host-known number of steps
(from k and the block's row count), so nothing here reads device data.

Similarities are computed in float32 from L2-normalised rows (`F.normalize`, eps 1e-12); the references compute
them in the model's dtype (fp16) without eps, which gives the same picks up to rounding ties.
"""
import torch
import torch.nn.functional as F

from .reduce import gather_rows


def cosine_matrix(features):
    """features [n, N, C] -> [n, N, N] float32 cosine similarities of every pair of rows."""
    unit = F.normalize(features.float(), dim=-1)
    return unit @ unit.transpose(1, 2)


def max_min_diversity(features, k):
    """DivPrune (Alvar et al., CVPR 2025): the k rows of features [n, N, C] picked greedily by max-min distance,
    the distance being 1 - cosine. The first pick is the row whose nearest other row is farthest (per row the
    second-smallest distance: the smallest is its own, 0); each next pick is the row farthest from the rows picked
    so far (largest minimum distance). Equal scores: the lower row (torch.argmax). Picked rows score -inf, so the k
    picks are distinct: the reference leaves them at their self-distance (about 0) and can pick a row twice when
    every remaining row duplicates a picked one, keeping fewer than k distinct tokens.
    Returns the picked rows [n, k], ascending. Launches: 4 per pick, no host sync.
    """
    n, N, _ = features.shape
    distance = 1 - cosine_matrix(features)
    score = distance.topk(min(2, N), dim=1, largest=False).values[:, -1]       # distance to the nearest other row
    picks = []
    for step in range(k):
        pick = score.argmax(dim=1)
        picks.append(pick)
        row = gather_rows(distance, pick[:, None])[:, 0]
        score = row if step == 0 else torch.minimum(score, row)               # min distance to the picked rows
        score = score.scatter(1, pick[:, None], float("-inf"))                # stays -inf: min(-inf, .) = -inf
    return torch.stack(picks, dim=1).sort(dim=1).values


def relevance_scale(relevance):
    """CDPruner's min-max normalisation of relevance [n, N] per row: (r - min + 1e-6) / (max - min), every value
    > 0, as the reference (which takes min / max over the whole batch of one image's crops: here one block). A
    row of equal values (no instruction to compare with) would divide by 0 there: the range is floored at 1e-6,
    which scales such a row to 1 (the kernel is then the similarity alone)."""
    low, high = relevance.amin(dim=1, keepdim=True), relevance.amax(dim=1, keepdim=True)
    return (relevance - low + 1e-6) / (high - low).clamp_min(1e-6)


def instruction_relevance(features, text):
    """Cosine of each row of features [n, N, C] with its block's instruction vector text [n, C] -> [n, N] float32
    (a zero text vector gives 0 everywhere)."""
    unit = F.normalize(features.float(), dim=-1)
    return (unit @ F.normalize(text.float(), dim=-1)[:, :, None]).squeeze(2)


def conditional_dpp(features, relevance, k):
    """CDPruner (Zhang et al., NeurIPS 2025): the k rows of features [n, N, C] picked by greedy MAP inference
    (Chen et al., NeurIPS 2018's fast incremental Cholesky form) of the DPP with kernel L = diag(r) S diag(r),
    S the cosine similarities of the rows (not shifted), r = relevance [n, N] (> 0, `relevance_scale`).

    Every step picks the unpicked row of largest marginal gain d2 (the lower row on ties), adds its orthogonalised
    kernel row e = (L[j] - sum_s c_s[j] c_s) / sqrt(d2[j]) to the basis and lowers every gain by e^2. Exactly k
    steps, no early stop, as the reference. One guard: a pick whose gain is at most 1e-10 (the kernel's rank is
    spent: duplicate rows, or k above the feature dimension) adds nothing (e = 0), so the remaining picks go to the
    unpicked rows by the gains left, always k distinct rows; the reference divides by sqrt(0) or by the root of a
    round-off negative there, which gives NaN and repeated picks.
    Returns the picked rows [n, k], ascending. Launches: about 12 per pick, no host sync.
    """
    n, N, _ = features.shape
    kernel = relevance[:, :, None] * cosine_matrix(features) * relevance[:, None, :]
    gain = (relevance * relevance).float()          # diag(L) = r^2 (S_ii = 1 exactly, not as rounded: equal
                                                    # relevances tie, and go to the lower row)
    taken = torch.zeros_like(gain, dtype=torch.bool)
    basis = kernel.new_zeros(n, k, N)
    picks = []
    for step in range(k):
        pick = gain.masked_fill(taken, float("-inf")).argmax(dim=1)
        picks.append(pick)
        taken = taken.scatter(1, pick[:, None], True)
        e = gather_rows(kernel, pick[:, None])[:, 0]
        if step:
            known = basis[:, :step]                                           # [n, step, N]
            e = e - (known.gather(2, pick[:, None, None].expand(-1, step, 1)) * known).sum(dim=1)
        left = gain.gather(1, pick[:, None])
        e = e * torch.where(left > 1e-10, left.clamp_min(1e-10).rsqrt(), 0.0)
        basis[:, step] = e
        gain = gain - e * e
    return torch.stack(picks, dim=1).sort(dim=1).values


def important_and_diverse(attention, features, k, important_ratio, step):
    """VisPruner (Zhang et al., ICCV 2025): k rows of features [n, N, C], the floor(k * important_ratio) rows of
    highest attention [n, N] ([CLS] attention) and k minus those kept by de-duplicating the rest.

    The rest, in descending attention, is split by alternate positions into A (even) and B (odd); each A row's
    score is its largest cosine with a B row; the min(step, R - diverse) A rows of highest score go (R: rows left),
    and the rest becomes A's survivors in descending score, then B in its order; repeated until `diverse` rows
    are left. Ties: the lower row first (stable sorts; the reference's sorts are not stable). When R is odd, A
    holds the ceil(R / 2) even positions: the reference's batched indexing raises an IndexError then (for
    LLaVA-1.5's 576 rows, whenever the important count is odd).
    Returns the kept rows [n, k], ascending. Launches: about 8 per round (ceil((N - k) / step) rounds), no sync.
    """
    important = int(k * important_ratio)
    diverse = k - important
    order = attention.argsort(dim=1, descending=True, stable=True)
    kept, rest = order[:, :important], order[:, important:]
    if diverse:
        unit = F.normalize(features.float(), dim=-1)
        while rest.shape[1] > diverse:
            remove = min(step, rest.shape[1] - diverse)
            a, b = rest[:, 0::2], rest[:, 1::2]
            redundancy = (gather_rows(unit, a) @ gather_rows(unit, b).transpose(1, 2)).amax(dim=2)
            survivors = redundancy.argsort(dim=1, descending=True, stable=True)[:, remove:]
            rest = torch.cat([a.gather(1, survivors), b], dim=1)
        kept = torch.cat([kept, rest], dim=1)
    return kept.sort(dim=1).values
