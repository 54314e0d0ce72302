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


def llm_dims(text_config):
    """(layers, dim, attn_dim, kv_dim, mlp_dim, mlp_mats) of a decoder-only LM config; MoE MLPs count the
    experts each token runs (top-k routed + shared)."""
    c = text_config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    if getattr(c, "num_experts", None) or getattr(c, "n_routed_experts", None):
        per_token = getattr(c, "num_experts_per_tok", 1)
        mlp_dim = c.moe_intermediate_size * per_token + (getattr(c, "shared_expert_intermediate_size", 0) or 0)
    else:
        mlp_dim = c.intermediate_size
    return c.num_hidden_layers, c.hidden_size, c.num_attention_heads * head_dim, kv_heads * head_dim, mlp_dim, 3


def llm_prefill_flops(text_config, n):
    """Prefill FLOPs of the LM's decoder layers on a prompt of n tokens (causal attention counted in full)."""
    layers, dim, attn_dim, kv_dim, mlp_dim, mats = llm_dims(text_config)
    return layers * layer_flops(n, dim, attn_dim, mlp_dim, mats, kv_dim=kv_dim)


def kv_cache_bytes(text_config, n, bytes_per_value):
    """Bytes of the K and V caches of n tokens over all layers."""
    layers, _, _, kv_dim, _, _ = llm_dims(text_config)
    return 2 * layers * n * kv_dim * bytes_per_value


def stage_drops(visual, kept):
    """[(layer, removed)] of one sample whose `visual` tokens at the LLM input are cut to kept[s][1] from layer
    kept[s][0] on, for each stage (layer, count) of `kept` (layers increasing)."""
    drops = []
    for layer, count in kept:
        drops.append((layer, visual - count))
        visual = count
    return drops


def layer_segments(n, drops, layers):
    """[(how many consecutive decoder layers, tokens each sees)] of `layers` layers on n tokens from which, before
    decoder layer l, r tokens are removed, for each (l, r) of `drops` (layers increasing)."""
    bounds = [layer for layer, _ in drops] + [layers]
    segments = [(bounds[0], n)]
    for (layer, removed), end in zip(drops, bounds[1:]):
        n -= removed
        segments.append((end - layer, n))
    return segments


def staged_prefill_flops(text_config, n, drops):
    """Prefill FLOPs of the LM's decoder layers on a prompt of n tokens pruned as `drops` says (see
    `layer_segments`): FastV's count, each layer at its own length."""
    layers, dim, attn_dim, kv_dim, mlp_dim, mats = llm_dims(text_config)
    return sum(count * layer_flops(tokens, dim, attn_dim, mlp_dim, mats, kv_dim=kv_dim)
               for count, tokens in layer_segments(n, drops, layers))


def staged_kv_cache_bytes(text_config, n, drops, bytes_per_value):
    """Bytes of the K and V caches of an n-token prompt pruned as `drops` says (see `layer_segments`): each layer
    caches the tokens it saw."""
    layers, _, _, kv_dim, _, _ = llm_dims(text_config)
    tokens = sum(count * m for count, m in layer_segments(n, drops, layers))
    return 2 * tokens * kv_dim * bytes_per_value
