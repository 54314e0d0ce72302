"""Bipartite soft matching (ToMe, Bolya et al., ICLR 2023), returning an assignment for `reduce_by_assignment`."""
import torch
import torch.nn.functional as F


def bipartite_soft_matching(metric, r, protected=1):
    """Pick the r most similar (a -> b) token pairs and merge each a-token into its b-token.

    metric: [B, N, C] similarity features (ToMe: keys averaged over heads). Tokens alternate between set a (even
    positions) and set b (odd positions); every a-token proposes its most cosine-similar b-token and the r
    strongest proposals are merged. The first `protected` tokens ([CLS], registers) neither merge nor receive.
    r is capped at half of the unprotected tokens, as in ToMe.
    Returns (dst [B, N] int64 output slot per token, num_out): survivors keep their original order (ToMe
    itself concatenates [unmerged a, b]; order does not change a ViT's output, only its readability).
    """
    B, N, _ = metric.shape
    r = min(r, (N - protected) // 2)
    slots = torch.arange(N, device=metric.device).expand(B, N)
    if r <= 0:
        return slots.clone(), N
    m = F.normalize(metric.float(), dim=-1)
    scores = m[:, ::2] @ m[:, 1::2].transpose(1, 2)                       # [B, Na, Nb]
    scores[:, : (protected + 1) // 2, :] = float("-inf")                  # protected a-tokens do not merge
    scores[:, :, : protected // 2] = float("-inf")                        # protected b-tokens do not receive
    best, best_b = scores.max(dim=-1)                                     # [B, Na]
    merged_a = best.argsort(dim=-1, descending=True)[:, :r]              # [B, r] a-indices merged away
    kept = torch.ones(B, N, dtype=torch.bool, device=metric.device)
    kept[:, ::2] = kept[:, ::2].scatter(1, merged_a, False)
    slot_of = kept.long().cumsum(dim=1) - 1                               # slot of each surviving token
    target = 2 * best_b.gather(1, merged_a) + 1                           # original index of each b target
    dst = slot_of.clone()
    dst[:, ::2] = dst[:, ::2].scatter(1, merged_a, slot_of.gather(1, target))
    return dst, N - r
