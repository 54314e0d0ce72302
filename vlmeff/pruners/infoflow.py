"""VFlowOpt's importance map (arXiv 2508.05211; its code: `siglip_encoder.py`, `llava_qwen_training_free.py`):
the attention that the image's context tokens pay to each patch, plus an optional patch-entropy term, computed at
one tower layer and reused by every later pruning stage. Pure tensor functions: they know no model."""
import math

import torch

from ..kernels.attention_rows import attention_rows, weighted_rows_mean

GREY_WEIGHT = 0.3333        # the reference's channel weights (not exactly 1/3)


def context_attention(q, k, scale, threshold, chunk=256):
    """VFlowOpt's context map [B, N] float32 from one layer's queries and keys q, k [B, H, N, d].

    With A the head-mean attention [B, N, N] (never formed: rows go `chunk` at a time) and r = A.mean over rows (the
    attention each token receives), the context tokens are G = {i : r_i > threshold * mean(r)} and
    ctx_j = mean over i in G of A[i, j]. When no token passes the threshold the reference averages an empty set
    (NaN scores); here G is then the most-received token(s). Two passes over the query rows.
    """
    received = attention_rows(q, k, scale, mean_rows=True, chunk=chunk)                  # [B, N]
    context = received > threshold * received.mean(-1, keepdim=True)
    most = received == received.amax(-1, keepdim=True)
    context = torch.where(context.any(-1, keepdim=True), context, most)
    weight = context / context.sum(-1, keepdim=True)
    return weighted_rows_mean(q, k, scale, weight, chunk)


def patch_entropy(pixel_values, patch, form="pixels", mean=None, std=None):
    """Shannon entropy (bits) of each patch's grey-level histogram: [n, C, H, W] pixels -> [n, (H/p) * (W/p)]
    float32, patches in raster order.

    form "pixels" (the paper: the entropy of the image patch): the processor's normalisation undone with the
    per-channel `mean` and `std` (sequences or [C] tensors), intensities 0..255, grey = the channel mean, rounded,
    256 bins. form "reference" (its code): the normalised values times 255 cast to uint8, which wraps negative values
    around (CLIP / SigLIP inputs are mostly negative or above 1), grey weights 0.3333 each, rounded.
    """
    n, C, H, W = pixel_values.shape
    x = pixel_values.float()
    if form == "pixels":
        mean_t = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, C, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, C, 1, 1)
        grey = ((x * std_t + mean_t).clamp(0, 1) * 255).mean(1)
    else:
        # float -> uint8 truncates toward zero and wraps modulo 256, as the reference's `.to(torch.uint8)` does
        wrapped = torch.remainder(torch.trunc(x * 255), 256)
        grey = (wrapped * GREY_WEIGHT).sum(1)
    levels = grey.round().clamp(0, 255).long()                                   # [n, H, W]
    cells = levels.unfold(1, patch, patch).unfold(2, patch, patch).reshape(n, (H // patch) * (W // patch), -1)
    ones = torch.ones_like(cells, dtype=torch.float32)
    p = torch.zeros(*cells.shape[:2], 256, device=x.device).scatter_add_(2, cells, ones) / cells.shape[-1]
    return -(p * torch.log2(p + 1e-10)).sum(-1)


def importance(context, entropy, weight):
    """VFlowOpt's score [n, N]: context [n, N] + weight * softmax over the N patches of entropy [n, N] (None or
    weight 0: the context map alone, as in every released configuration)."""
    if entropy is None or weight == 0:
        return context
    return context + weight * entropy.softmax(-1)


def grid_cells(grids, m, device=None):
    """VFlowOpt's merge cells of rows laid out as the grids [(h, w), ...] one after another (a base view, then its
    crops): row (i, j) of grid g lies in cell (g, floor(i / m), floor(j / m)), m > 0 a real (the reference's
    `illava_vit_m`). Returns ([sum h * w] long cell ids, distinct across grids; the number of cells, a host int)."""
    ids, offset = [], 0
    for h, w in grids:
        i = torch.arange(h, device=device).repeat_interleave(w)
        j = torch.arange(w, device=device).repeat(h)
        across = math.floor((w - 1) / m) + 1
        ids.append(offset + torch.floor(i / m).long() * across + torch.floor(j / m).long())
        offset += (math.floor((h - 1) / m) + 1) * across
    return torch.cat(ids), offset


def recycle(x, scores, cells, cell_count, candidates):
    """VFlowOpt's recycling of pruned tokens (the reference's anyres path, `llava_qwen_training_free.py`).

    x [n, N, D] rows, scores [n, N], cells [N] long and cell_count (`grid_cells`), candidates: how many of the
    lowest-scored rows are candidates for removal (a host int). The candidates of each cell fold into one token, the
    score-weighted mean sum_i w_i x_i (w = score / the cell's candidates' score sum, in float32), written at the
    cell's best-scored candidate, which stays; the other candidates go. Returns (x' [n, N, D], keep [n, N] bool).
    How many rows stay depends on how many cells the candidates fall in: data, which the caller reads.
    """
    n, N, D = x.shape
    rank = scores.argsort(dim=1).argsort(dim=1)               # 0: the lowest score; distinct, so ties break by order
    candidate = rank < candidates
    cells = cells.expand(n, N)
    ranked = rank.masked_fill(~candidate, -1)
    best = ranked.new_full((n, cell_count), -1).scatter_reduce(1, cells, ranked, "amax")
    target = candidate & (rank == best.gather(1, cells))
    weight = torch.where(candidate, scores, 0).float()
    total = weight.new_zeros(n, cell_count).scatter_add_(1, cells, weight)
    index = cells[..., None].expand(n, N, D)
    folded = weight.new_zeros(n, cell_count, D).scatter_add_(1, index, weight[..., None] * x.float())
    folded = (folded / total[..., None]).gather(1, index).to(x.dtype)
    return torch.where(target[..., None], folded, x), ~candidate | target
