"""Token-importance scorers."""
import torch


def cls_attention(q_cls, k, scale):
    """[CLS] -> token attention, averaged over heads, without materialising N x N.

    q_cls: [B, H, 1, d] query of the [CLS] token; k: [B, H, N, d] keys of all tokens (same layer, after any q/k
    norm). Returns [B, N] float32: softmax(q_cls . k^T * scale) averaged over heads (rows sum to 1).
    """
    logits = torch.matmul(q_cls.float(), k.float().transpose(-1, -2)) * scale
    return logits.softmax(dim=-1).mean(dim=1)[:, 0]


def random_scores(batch, n, generator=None, device=None):
    """Uniform random importance [batch, n], the `random` baseline."""
    return torch.rand(batch, n, generator=generator, device=device)
