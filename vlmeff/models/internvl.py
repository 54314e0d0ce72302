"""InternVL (HF-native `InternVLForConditionalGeneration`, the "-hf" checkpoints).

Visual tokens: the processor cuts each image into tiles (plus a thumbnail); `pixel_values` holds every tile of
every image, [n_tiles, 3, H, W]. InternViT encodes each tile ([CLS] + P patches), `get_image_features` takes the
feature layer (default -1), drops [CLS], pixel-shuffles with `downsample_ratio` 0.5 (each 2 x 2 group of
patches -> one token of 4x the width) and projects: [n_tiles, P / 4, D], filling the image's run of placeholders
tile after tile.

Blocks: one feature block per tile, so the budget (`keep`, count or ratio) applies to every tile alike, like
FasterVLM's "same k per crop". The model itself does not know which tiles belong to which image (the prompt's
`<img>...</img>` runs do), and per-tile blocks keep each block one square grid (`pool` works) and let the engine
batch all tiles in one selection. `patch.stats["visual_tokens"]` therefore lists tiles, not images.

Scores: the features carry no [CLS] after the pixel shuffle, so selection is [CLS]-free (`cls` is refused):
`received` attention at the tower layer feeding the features (q/k read after the optional q/k RMSNorm), summed
over the 4 patches of each token's pixel-shuffle group. The grouping is read off the model's own `pixel_shuffle`
applied to a map of patch indices. The merge metric (keys) is summed over the same groups.
"""
import math

import torch
from .base import ViTAdapter
from .lvlm import LVLMAdapter, tower_layer


class InternViTAdapter(ViTAdapter):
    """InternVLVisionModel (`encoder.layer[i].attention`, q/k RMSNorm when `use_qk_norm`), for score capture."""

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.family = type(model).__name__
        self.layers = list(model.encoder.layer)
        self.has_cls = True
        self.num_prefix_tokens = 1
        self.dim = self.attn_dim = cfg.hidden_size
        self.mlp_dim, self.mlp_mats = cfg.intermediate_size, 2
        size, patch = cfg.image_size, cfg.patch_size
        size = size if isinstance(size, (list, tuple)) else (size, size)
        patch = patch if isinstance(patch, (list, tuple)) else (patch, patch)
        self.grid = (size[0] // patch[0], size[1] // patch[1])

    def qk_modules(self, i):
        attn = self.layers[i].attention

        def to_heads(t):
            return t.view(*t.shape[:-1], attn.num_heads, attn.head_dim).transpose(1, 2)

        # q_norm / k_norm run right after q_proj / k_proj (nn.Identity without qk norm: the hooks still fire)
        return attn.q_norm, attn.k_norm, to_heads, attn.scale


class InternVLAdapter(LVLMAdapter):
    """Feature blocks: one [P / 4, D] block per tile (see the module docstring)."""

    image_kwargs = ("pixel_values", "vision_feature_layer", "vision_feature_select_strategy")
    tower_adapter = InternViTAdapter
    stacked_features = True

    def __init__(self, model):
        cfg = model.config
        if cfg.vision_feature_select_strategy != "default":
            raise ValueError(f"InternVL with vision_feature_select_strategy={cfg.vision_feature_select_strategy!r} "
                             "is not supported (the pixel shuffle needs the [CLS]-free 'default' features)")
        super().__init__(model)
        self.has_cls = False         # no [CLS] among the features after the pixel shuffle
        self.score_layer = tower_layer(cfg.vision_feature_layer, len(self.tower.layers))
        self._groups = {}

    def shuffle_groups(self, n_patches, device=None):
        """[M, 4] long: the patch indices (raster order, [CLS] excluded) that form each feature row, read off the
        model's `pixel_shuffle` applied to an index map."""
        key = (n_patches, str(device))
        if key not in self._groups:
            side = math.isqrt(n_patches)
            index = torch.arange(n_patches, device=device).view(1, side, side, 1)
            shuffled = self.model.model.pixel_shuffle(index, scale_factor=self.model.config.downsample_ratio)
            self._groups[key] = shuffled.reshape(-1, shuffled.shape[-1])
        return self._groups[key]

    def tower_rows_to_features(self, t):
        """Per-tile tower values [n, 1 + P] or [n, 1 + P, C] -> [n, M] / [n, M, C]: drop [CLS], sum each group."""
        t = t[:, self.tower.num_prefix_tokens:]
        groups = self.shuffle_groups(t.shape[1], t.device)
        return t[:, groups].sum(dim=2)
