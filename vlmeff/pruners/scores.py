"""Token-importance scorers."""
import torch

from ..kernels.attention_rows import attention_rows


def cls_attention(q_cls, k, scale):
    """[CLS] -> token attention, averaged over heads, without materialising N x N.

    q_cls: [B, H, 1, d] query of the [CLS] token; k: [B, H, N, d] keys of all tokens (same layer, after any q/k
    norm). Returns [B, N] float32: softmax(q_cls . k^T * scale) averaged over heads (rows sum to 1).
    """
    return attention_rows(q_cls, k, scale)[:, 0]


def received_attention(q, k, scale, chunk=256):
    """Mean attention each token receives, over all queries and heads, for towers without [CLS].

    q: [B, H, N, d], k: [B, H, N, d]. Returns [B, N] float32 (sums to 1 over N). Queries are processed `chunk`
    at a time so memory stays O(chunk x N), never N x N.
    """
    total = torch.zeros(q.shape[0], k.shape[2], device=q.device, dtype=torch.float32)
    for start in range(0, q.shape[2], chunk):
        total += attention_rows(q[:, :, start:start + chunk], k, scale).sum(dim=1)
    return total / q.shape[2]


def random_scores(batch, n, generator=None, device=None):
    """Uniform random importance [batch, n], the `random` baseline."""
    return torch.rand(batch, n, generator=generator, device=device)
