"""HF vision towers used inside LVLMs: CLIP, SigLIP and DINOv2 (transformers v5 layout, no `.vision_model`)."""
from .base import ViTAdapter


class HFViTAdapter(ViTAdapter):
    """CLIPVisionModel / SiglipVisionModel (`encoder.layers[i].self_attn`, layer_norm1/2) and Dinov2Model
    (`encoder.layer[i].attention`, norm1/2, layer scales)."""

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.family = type(model).__name__
        self.dinov2 = hasattr(model.encoder, "layer")
        self.layers = list(model.encoder.layer if self.dinov2 else model.encoder.layers)
        self.has_cls = "siglip" not in cfg.model_type
        self.num_prefix_tokens = 1 if self.has_cls else 0
        self.dim = cfg.hidden_size
        self.attn_dim = cfg.hidden_size
        self.mlp_dim = int(cfg.hidden_size * cfg.mlp_ratio) if self.dinov2 else cfg.intermediate_size
        self.mlp_mats = 3 if getattr(cfg, "use_swiglu_ffn", False) else 2
        self.patch_size = cfg.patch_size
        side = cfg.image_size // cfg.patch_size
        self.grid = (side, side)

    def _attn(self, i):
        layer = self.layers[i]
        return layer.attention if self.dinov2 else layer.self_attn

    def qk_modules(self, i):
        attn = self._attn(i)
        head_dim = attn.head_dim

        def to_heads(t):
            return t.view(*t.shape[:-1], -1, head_dim).transpose(1, 2)

        return attn.q_proj, attn.k_proj, to_heads, attn.scaling if self.dinov2 else attn.scale

    def run_block(self, i, x, attn_bias, between):
        # the layer's own forward with a hook between the two residual branches
        layer = self.layers[i]
        if self.dinov2:
            h, _ = layer.attention(layer.norm1(x), attention_mask=attn_bias)
            x = layer.drop_path(layer.layer_scale1(h)) + x
            x = between(x)
            return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))) + x
        h, _ = layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=attn_bias)
        x = x + h
        x = between(x)
        return x + layer.mlp(layer.layer_norm2(x))
