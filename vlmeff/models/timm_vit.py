"""timm `VisionTransformer`: blocks live in `model.blocks`; q/k are seen after `attn.q_norm` / `attn.k_norm`."""
from .base import ViTAdapter


class TimmViTAdapter(ViTAdapter):
    family = "timm VisionTransformer"

    def __init__(self, model):
        super().__init__(model)
        self.layers = list(model.blocks)
        self.num_prefix_tokens = model.num_prefix_tokens
        self.has_cls = getattr(model, "cls_token", None) is not None
        attn, mlp = self.layers[0].attn, self.layers[0].mlp
        self.dim = model.embed_dim
        self.attn_dim = attn.num_heads * attn.head_dim
        swiglu = hasattr(mlp, "fc1_g")
        self.mlp_dim = (mlp.fc1_g if swiglu else mlp.fc1).out_features
        self.mlp_mats = 3 if swiglu else 2
        if not getattr(model, "dynamic_img_size", False):    # timm sets it on the model (its PatchEmbed only flattens)
            self.grid = tuple(model.patch_embed.grid_size)
        for block in self.layers:
            if type(block).__name__ != "Block" or type(block.attn).__name__ != "Attention":
                raise TypeError(f"vlmeff supports timm ViT blocks of type Block/Attention, got "
                                f"{type(block).__name__}/{type(block.attn).__name__}")

    def qk_modules(self, i):
        attn = self.layers[i].attn
        return attn.q_norm, attn.k_norm, lambda t: t, attn.scale

    def run_block(self, i, x, attn_bias, between):
        # timm Block.forward with a hook between the two residual branches
        b = self.layers[i]
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x), attn_mask=attn_bias)))
        x = between(x)
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x))))
