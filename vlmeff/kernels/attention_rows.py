"""Attention probabilities of a few query rows (e.g. [CLS], last query) without forming the N x N matrix, in as
few launches as possible: a whole SDPA call is one kernel, so every extra small op of a score costs about as much."""
import torch


def attention_rows(q_rows, k, scale, mean_rows=False, chunk=None, key_mask=None):
    """Head-mean softmax(q_rows @ k^T * scale).

    q_rows: [B, H, Q, d] queries of the rows wanted; k: [B, Hk, N, d] keys, Hk dividing H (grouped-query
    attention: query head h reads key head h // (H / Hk), as `repeat_interleave` would give). Returns [B, Q, N]
    float32 probabilities averaged over the H heads, or with `mean_rows` [B, N] averaged over the Q rows too
    (queries then processed `chunk` at a time, so memory stays O(chunk x N)). key_mask [B, N] bool (one query row
    only): the keys the row may attend to (padding and later tokens False), the others get probability 0.
    Computed in float32: scores feed rankings, where bf16 logits would reorder near-ties. Costs B*H*Q*N*d
    multiply-adds: Q/N of the attention's own Q @ K^T (one row: Hk times that, see `_one_row`).
    Launches (float32 inputs): one row 4 (diag_embed, baddbmm, softmax, mean); Q rows in one chunk 5 (two copies
    into the batched-matmul layout, baddbmm, softmax, mean).
    """
    B, H, Q, d = q_rows.shape
    Hk = k.shape[1]
    if H % Hk:
        raise ValueError(f"query heads ({H}) must be a multiple of key heads ({Hk})")
    if key_mask is not None and Q != 1:
        raise ValueError("key_mask is supported for one query row")
    if Q == 1:
        probs = _one_row(q_rows, k, scale, key_mask)
        return probs if mean_rows else probs[:, None]
    # [B * Hk, N, d] contiguous float32: one copy at most (none for contiguous float32 keys)
    keys = k.to(torch.float32, memory_format=torch.contiguous_format).reshape(B * Hk, k.shape[2], d).transpose(1, 2)
    if not mean_rows:
        return _rows(q_rows, keys, scale, Hk, mean_rows=False)
    chunk = chunk or Q
    total = None
    for start in range(0, Q, chunk):
        share = min(chunk, Q - start) / Q          # this chunk's share of the mean over rows
        part = _rows(q_rows[:, :, start:start + chunk], keys, scale, Hk, mean_rows=True)
        if total is None:
            total = part if share == 1 else part * share
        else:
            total = torch.add(total, part, alpha=share)
    return total


def _rows(q_rows, keys_t, scale, Hk, mean_rows):
    """q_rows [B, H, Q, d], keys_t [B * Hk, d, N] -> head-mean probabilities [B, Q, N] (mean_rows: [B, N])."""
    B, H, Q, d = q_rows.shape
    # the H / Hk query heads of each key head become extra rows instead of repeating k
    q = q_rows.to(torch.float32, memory_format=torch.contiguous_format).reshape(B * Hk, (H // Hk) * Q, d)
    logits = torch.baddbmm(q.new_empty(()), q, keys_t, beta=0, alpha=scale)      # [B * Hk, (H / Hk) * Q, N]
    probs = logits.softmax(dim=-1).view(B, Hk, H // Hk, Q, keys_t.shape[-1])
    return probs.mean(dim=(1, 2, 3)) if mean_rows else probs.mean(dim=(1, 2))


def _one_row(q_rows, k, scale, key_mask=None):
    """One query row [B, H, 1, d] against k [B, Hk, N, d] -> [B, N], reading k where it lies (key_mask [B, N]:
    the keys attended, one more launch).

    The keys are read in token-major layout [B, N, Hk * d] (a view of what the k projection wrote, no copy) and
    multiplied by a block-diagonal [Hk * d, H] matrix holding each head's query in its key head's rows: one
    batched matmul gives the [B, N, H] logits of every head (Hk times the multiply-adds of the row, which are
    tiny), where a per-head matmul would first copy k into head-major layout.
    """
    B, H, _, d = q_rows.shape
    Hk, N = k.shape[1], k.shape[2]
    q = q_rows[:, :, 0].float().view(B, Hk, H // Hk, d)
    # blocks[b, i, j, i', g] = q[b, i, g, j] if i == i' else 0
    blocks = torch.diag_embed(q.permute(0, 3, 2, 1), dim1=1, dim2=3).reshape(B, Hk * d, H)
    keys = k.transpose(1, 2).reshape(B, N, Hk * d).float()
    logits = torch.baddbmm(keys.new_empty(()), keys, blocks, beta=0, alpha=scale)   # [B, N, H]
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, :, None], float("-inf"))
    return logits.softmax(dim=1).mean(dim=2)


def causal_rows_mean(q_rows, k, scale, query_columns, row_weight, key_valid):
    """Head-mean, then weighted row-mean, causal softmax(q_rows @ k^T * scale) of query rows at various columns.

    q_rows [B, H, Q, d] the queries of the rows, which sit at columns query_columns [B, Q] (long) of the keys
    k [B, Hk, N, d] (grouped-query attention as in `attention_rows`); row_weight [B, Q] float (a row's share of its
    sample's mean: 1 / rows for a real row, 0 for a filler row); key_valid [B, N] bool the keys any row may attend to
    (padding False). Row r attends to the valid keys at columns <= query_columns[:, r]. Returns [B, N] float32.
    Costs B*H*Q*N*d multiply-adds (the Q rows of the attention's own Q @ K^T) and a [B, H, Q, N] float32 buffer.
    """
    B, H, Q, d = q_rows.shape
    Hk, N = k.shape[1], k.shape[2]
    keys = k.to(torch.float32, memory_format=torch.contiguous_format).reshape(B * Hk, N, d).transpose(1, 2)
    q = q_rows.to(torch.float32, memory_format=torch.contiguous_format).reshape(B * Hk, (H // Hk) * Q, d)
    logits = torch.baddbmm(q.new_empty(()), q, keys, beta=0, alpha=scale).view(B, H, Q, N)
    allowed = key_valid[:, None] & (torch.arange(N, device=k.device) <= query_columns[..., None])    # [B, Q, N]
    probs = logits.masked_fill(~allowed[:, None], float("-inf")).softmax(-1).mean(1)                 # [B, Q, N]
    return torch.einsum("bqn,bq->bn", probs, row_weight.float())


def weighted_rows_mean(q_rows, k, scale, row_weight, chunk=256):
    """Sum over rows, weighted, of the head-mean softmax(q_rows @ k^T * scale): sum_i row_weight[:, i] * A[:, i, :].

    q_rows [B, H, Q, d], k [B, Hk, N, d] (grouped-query attention as in `attention_rows`), row_weight [B, Q] float.
    Returns [B, N] float32. Queries go `chunk` at a time (a [B, H, chunk, N] float32 buffer, never N x N); rows of
    weight 0 cost what the others cost (their number is data, not a shape).
    """
    B, H, Q, d = q_rows.shape
    Hk = k.shape[1]
    keys = k.to(torch.float32, memory_format=torch.contiguous_format).reshape(B * Hk, k.shape[2], d).transpose(1, 2)
    total = None
    for start in range(0, Q, chunk):
        probs = _rows(q_rows[:, :, start:start + chunk], keys, scale, Hk, mean_rows=False)      # [B, chunk, N]
        part = torch.bmm(row_weight[:, None, start:start + chunk].float(), probs)[:, 0]
        total = part if total is None else total + part
    return total
