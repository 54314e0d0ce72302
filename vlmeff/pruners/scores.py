"""Token-importance scorers."""
import torch

from ..kernels.attention_rows import attention_rows


def cls_attention(q_cls, k, scale):
    """[CLS] -> token attention, averaged over heads, without materialising N x N.

    q_cls: [B, H, 1, d] query of the [CLS] token; k: [B, H, N, d] keys of all tokens (same layer, after any q/k
    norm). Returns [B, N] float32: softmax(q_cls . k^T * scale) averaged over heads (rows sum to 1).
    """
    return attention_rows(q_cls, k, scale, mean_rows=True)


def received_attention(q, k, scale, chunk=256):
    """Mean attention each token receives, over all queries and heads, for towers without [CLS].

    q: [B, H, N, d], k: [B, H, N, d]. Returns [B, N] float32 (sums to 1 over N). Queries are processed `chunk`
    at a time so memory stays O(chunk x N), never N x N.
    """
    return attention_rows(q, k, scale, mean_rows=True, chunk=chunk)


def random_scores(n, seed, device=None):
    """Seeded pseudo-random importance [n] int64, the `random` baseline: a counter-based hash of (seed, row), so
    the same seed gives the same draw on every device, with no generator state (which torch.compile cannot
    trace). Distinct rows get distinct values (each step is a bijection of 32-bit integers): no ties."""
    mask = 0xFFFFFFFF
    x = (torch.arange(n, device=device) + ((seed * 0x9E3779B9) & mask)) & mask
    for _ in range(2):          # the "lowbias32" integer mixer (x ^ x >> 16) * odd constant, twice
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    return x ^ (x >> 16)
