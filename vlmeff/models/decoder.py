"""An LVLM's language model as the in-LLM engine (`vlmeff.engine.llm`) sees it: decoder layers of HF's
Llama-like form (`input_layernorm`, `self_attn` with `q_proj` / `k_proj`, optional per-head `q_norm` / `k_norm`,
rotary positions in the rotate-half form of `apply_rotary_pos_emb`) and a final `norm`. Knows no method.
"""
import torch

from ..errors import UnsupportedModelError


class DecoderAdapter:
    """layers, norm, config (the text config), depth; `query_key` turns what a layer's q / k projections wrote into
    the post-RoPE queries and keys its attention uses."""

    def __init__(self, language_model, family):
        self.model = language_model
        self.family = family
        self.config = language_model.config
        self.layers = list(getattr(language_model, "layers", []))
        self.norm = getattr(language_model, "norm", None)
        self.depth = len(self.layers)
        layer_types = set(getattr(self.config, "layer_types", None) or ["full_attention"])
        sliding = getattr(self.config, "use_sliding_window", False) or layer_types != {"full_attention"}
        attention = [getattr(layer, "self_attn", None) for layer in self.layers]
        if not self.layers or self.norm is None or sliding or not all(
                hasattr(a, "q_proj") and hasattr(a, "k_proj") and hasattr(layer, "input_layernorm")
                for a, layer in zip(attention, self.layers)):
            why = "sliding-window attention layers" if self.layers and sliding else "a decoder of another form"
            raise UnsupportedModelError(
                f"{family}'s language model has {why}; vlmeff prunes inside decoders whose layers all use full causal "
                "attention (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2/2.5/3-VL, InternVL). Use a method that acts "
                "before the LLM on it")

    def attention(self, i):
        return self.layers[i].self_attn

    def query_key(self, i, q, k, q_rope, k_rope):
        """Layer i's q / k projection outputs q [B, Q, H * d], k [B, N, Hk * d] with the (cos, sin) of their
        positions (q_rope: each [B | 1, Q, d], k_rope: each [B | 1, N, d]) -> post-RoPE q [B, H, Q, d] and
        k [B, Hk, N, d]: viewed as heads, normed per head where the layer does (`q_norm` / `k_norm`), rotated as the
        model rotates them."""
        return self._heads(i, q, "q_norm", q_rope), self._heads(i, k, "k_norm", k_rope)

    def key(self, i, k, k_rope):
        """Layer i's k projection output [B, N, Hk * d] -> its post-RoPE keys [B, Hk, N, d] (see `query_key`)."""
        return self._heads(i, k, "k_norm", k_rope)

    def _heads(self, i, x, norm, rope):
        attn = self.attention(i)
        x = x.unflatten(-1, (-1, attn.head_dim))
        if hasattr(attn, norm):
            x = getattr(attn, norm)(x)
        return rotate(x.transpose(1, 2), *rope)


def rotate(x, cos, sin):
    """x [B, H, N, d] rotated by (cos, sin) [B | 1, N, d]: `x cos + rotate_half(x) sin`, what the modeling modules'
    `apply_rotary_pos_emb` computes for each of q and k (this one rotates a single tensor: q and k have different
    lengths here); M-RoPE (Qwen-VL) is folded into cos / sin by the model's rotary embedding already."""
    half = x.shape[-1] // 2
    return x * cos[:, None] + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin[:, None]
