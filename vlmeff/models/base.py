"""What every vision-transformer adapter provides: where the layers are and how to run one of them."""
import math

from ..flops import layer_flops


class ViTAdapter:
    """A vision transformer seen as: prefix tokens ([CLS], registers) + a raster grid of patch tokens, flowing
    through `layers`. Subclasses fill the attributes in `__init__` and implement `qk_modules` / `run_block`.

    Attributes: family (str), layers (list of modules, each called as layer(x, ...) -> x [B, N, D]),
    num_prefix_tokens (int), has_cls (bool), dim / attn_dim / mlp_dim / mlp_mats (FLOP model),
    grid (h, w) of patch tokens at the model's native resolution or None.
    """

    family = "vit"
    kind = "vit"
    grid = None

    def __init__(self, model):
        self.model = model

    def qk_modules(self, i):
        """(q_module, k_module, to_heads, scale): forward hooks on the two modules see q and k of layer i (q
        first); to_heads(output) -> [B, H, N, d] as they enter the attention product. to_heads should be a view
        (reshape / transpose / slice of the module output): the capture then launches nothing, and the [CLS] row
        reads the keys where the projection wrote them (`attention_rows`)."""
        raise NotImplementedError

    def run_block(self, i, x, attn_bias, between):
        """Layer i on x [B, N, D] with an additive attention bias [B, 1, 1, N] (or None) and a callable applied
        to the residual stream between the attention and MLP branches. Returns [B, N', D]."""
        raise NotImplementedError

    def patch_grid(self, n_patches):
        """(h, w) of n_patches raster-order patch tokens."""
        if self.grid is not None and self.grid[0] * self.grid[1] == n_patches:
            return self.grid
        side = math.isqrt(n_patches)
        if side * side != n_patches:
            raise ValueError(f"{n_patches} patch tokens do not form a square grid; cannot pool them")
        return side, side

    def flops(self, tokens_per_layer):
        """FLOPs of the layers given the sequence length entering each of them."""
        return sum(layer_flops(n, self.dim, self.attn_dim, self.mlp_dim, self.mlp_mats) for n in tokens_per_layer)
