"""SparseVLM (Zhang et al., ICML 2025; the v1.5 algorithm its code runs by default): text raters chosen once from
the LLM's input, visual tokens ranked at each stage by the raters' attention, and part of the pruned tokens recycled
into a few merged tokens by density-peak (DPC-kNN) clustering. Pure tensor functions; host ints are shapes only."""
import torch

from .reduce import gather_rows


def select_raters(embeds, visual, rows, real):
    """The text raters of each sample, as row weights [B, Q] float32 (1 / raters on a rater, 0 elsewhere).

    embeds [B, L, D] the LLM's input (layer 0's hidden states); visual [B, L] bool its visual columns; rows [B, Q]
    long the text columns after the image (the candidates), real [B, Q] bool which of them are real (filler rows
    repeat one). A text token's relevance is the mean over the visual tokens v of softmax over the text tokens of
    v . t (unscaled dot products, as the reference); the raters are the text tokens of relevance above the mean
    (strict). When none is above (all equal), every real row rates: the reference averages an empty set (NaN).
    """
    text = gather_rows(embeds, rows).float()                                          # [B, Q, D]
    logits = embeds.float() @ text.transpose(1, 2)                                    # [B, L, Q]
    probs = logits.masked_fill(~real[:, None], float("-inf")).softmax(dim=-1)
    relevance = torch.einsum("blq,bl->bq", probs, visual.float()) / visual.sum(1, keepdim=True).clamp_min(1)
    mean = (relevance * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1)
    raters = real & (relevance > mean)
    raters = torch.where(raters.any(dim=1, keepdim=True), raters, real)
    return raters / raters.sum(1, keepdim=True).clamp_min(1)


def recycled_counts(pruned):
    """(candidates, clusters) that recycling takes from `pruned` tokens (host int), as the reference counts them:
    int(0.3 m) + 1 candidates, the highest-scored pruned ones, folded into int(candidates / 10) + 1 clusters;
    (0, 0) when nothing was pruned."""
    if pruned <= 0:
        return 0, 0
    candidates = int(0.3 * pruned) + 1
    return candidates, int(candidates / 10) + 1


def dpc_knn_merge(x, count, clusters, max_clusters):
    """Density-peak clustering with kNN density (the reference's DPC-kNN) of candidate tokens x [B, R, C]: the
    first count[b] rows of sample b are real; clusters [B] (<= count) per sample; max_clusters: their maximum (a
    host int, the output width).

    Distances ||x_i - x_j|| / sqrt(C); density rho_i = exp(-mean of the squared distances to its clusters[b]
    nearest rows, itself included); delta_i = the distance to the nearest denser row (the densest: the largest
    distance of its sample); the centres are the rows of largest rho * delta, in that order; every row joins its
    nearest centre (ties: the earlier centre), a centre its own cluster. Each merged token is the members' sum over
    (their count + 1e-6), as the reference divides. The reference adds U(0, 1) * 1e-6 noise to rho to break ties;
    here ties go to the lower row (stable sorts).
    Returns (centres [B, max_clusters] their candidate rows, merged [B, max_clusters, C] float32); slots past a
    sample's clusters are filler (centres distinct, merged arbitrary).
    """
    B, R, C = x.shape
    x = x.float()
    slots = torch.arange(R, device=x.device)
    real = slots < count[:, None]                                                   # [B, R]
    pair = real[:, :, None] & real[:, None, :]
    dist = torch.cdist(x, x) / C ** 0.5
    nearest = dist.masked_fill(~pair, float("inf")).sort(dim=2, stable=True).values
    within = slots < clusters[:, None, None]                                          # the k nearest, self included
    density = torch.exp(-(nearest.masked_fill(~within, 0) ** 2).sum(2) / clusters[:, None].clamp_min(1))
    denser = pair & (density[:, None, :] > density[:, :, None])
    farthest = dist.masked_fill(~pair, float("-inf")).amax(dim=(1, 2))
    delta = dist.masked_fill(~denser, float("inf")).amin(dim=2)
    delta = torch.where(denser.any(dim=2), delta, farthest[:, None])
    peak = (density * delta).masked_fill(~real, float("-inf"))
    centres = peak.argsort(dim=1, descending=True, stable=True)[:, :max_clusters]    # [B, K]
    live = torch.arange(max_clusters, device=x.device) < clusters[:, None]             # [B, K]
    to_centre = dist.gather(1, centres[..., None].expand(-1, -1, R))                 # [B, K, R]
    assign = to_centre.masked_fill(~live[..., None], float("inf")).argmin(dim=1)     # [B, R]: first on ties
    own = torch.where(live, torch.arange(max_clusters, device=x.device), assign.gather(1, centres))
    assign = assign.scatter(1, centres, own)                                           # a centre: its own cluster
    member = (assign[:, None, :] == torch.arange(max_clusters, device=x.device)[None, :, None]) & real[:, None]
    member = member & live[..., None]
    merged = (member.float() @ x) / (member.sum(2, keepdim=True) + 1e-6)
    return centres, merged
