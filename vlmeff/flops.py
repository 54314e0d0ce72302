"""Analytic FLOP counts (2 x multiply-accumulates) of transformer layers, for `Patch.stats`."""


def layer_flops(n, dim, attn_dim, mlp_dim, mlp_mats=2, kv_dim=None, n_kv=None):
    """FLOPs of one pre-norm transformer layer on n query tokens attending to n_kv keys (default n).

    q/o projections: 2 n dim attn_dim; k/v projections: 2 n dim kv_dim (GQA: kv_dim < attn_dim);
    scores and weighted sum: 2 n n_kv attn_dim; MLP: mlp_mats n dim mlp_dim (3 for SwiGLU). Norms, softmax and
    biases are ignored, as in FastV / PyramidDrop.
    """
    kv_dim = attn_dim if kv_dim is None else kv_dim
    n_kv = n if n_kv is None else n_kv
    macs = 2 * n * dim * attn_dim + 2 * n * dim * kv_dim + 2 * n * n_kv * attn_dim + mlp_mats * n * dim * mlp_dim
    return 2 * macs
