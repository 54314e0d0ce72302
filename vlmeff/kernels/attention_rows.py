"""Attention probabilities of a few query rows (e.g. [CLS], last query) without forming the N x N matrix."""
import torch


def attention_rows(q_rows, k, scale):
    """Head-mean softmax(q_rows @ k^T * scale).

    q_rows: [B, H, Q, d] queries of the rows wanted; k: [B, Hk, N, d] keys, Hk dividing H (grouped-query
    attention: query head h reads key head h // (H / Hk), as `repeat_interleave` would give). Returns [B, Q, N]
    float32 probabilities averaged over the H heads. Computed in float32: scores feed rankings, where bf16 logits
    would reorder near-ties. Costs B*H*Q*N*d multiply-adds: Q/N of the attention's own Q @ K^T.
    """
    B, H, Q, d = q_rows.shape
    Hk = k.shape[1]
    if H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hk})")
    # group the H / Hk query heads of each key head as extra rows instead of repeating k
    q = q_rows.float().reshape(B, Hk, (H // Hk) * Q, d)
    probs = torch.softmax((q @ k.float().transpose(-1, -2)) * scale, dim=-1)   # [B, Hk, (H / Hk) * Q, N]
    return probs.reshape(B, H, Q, -1).mean(dim=1)
