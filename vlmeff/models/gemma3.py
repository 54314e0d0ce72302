"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower, average-pooling projector, Gemma 3 LM.

Visual tokens: SigLIP (no [CLS]) encodes each image (or pan-and-scan crop) to a p x p patch grid;
`Gemma3MultiModalProjector` average-pools it to `mm_tokens_per_image` tokens (kernel p / sqrt(mm_tokens)),
normalises and projects: one [mm_tokens_per_image, D] block per image, one run of placeholders each.

Scores: `received` attention at the last tower layer (the features are its post-layernormed output), pooled to
the feature rows by the projector's own `avg_pool`, like the features; the merge metric likewise. `cls` is refused
(no [CLS]). Each image is one block with its own budget; blocks are square grids, so `pool` works.

Image tokens attend to each other bidirectionally within a contiguous run (`token_type_ids` == 1). The engine
shrinks `token_type_ids` with the ids (it gathers every [B, L] per-token tensor), so the kept tokens of an image
stay one contiguous bidirectional run.
"""
from .lvlm import LVLMAdapter


class Gemma3Adapter(LVLMAdapter):
    image_kwargs = ("pixel_values",)
    stacked_features = True

    def __init__(self, model):
        super().__init__(model)
        self.score_layer = len(self.tower.layers) - 1          # features = post_layernorm(last layer's output)
        self.projector = model.model.multi_modal_projector

    def tower_rows_to_features(self, t):
        """Per-image tower values [n, P] or [n, P, C] -> [n, M] / [n, M, C], average-pooled like the features."""
        p = self.projector.patches_per_image
        squeeze = t.dim() == 2
        x = t[:, None] if squeeze else t.transpose(1, 2)          # [n, C, P]
        x = self.projector.avg_pool(x.reshape(x.shape[0], x.shape[1], p, p)).flatten(2)
        return x[:, 0] if squeeze else x.transpose(1, 2)

    def image_grids(self, i, protected):
        n = int((~protected).sum())
        side = self.projector.tokens_per_side
        if side * side != n:
            raise ValueError(f"{n} Gemma 3 tokens do not form the {side} x {side} grid; cannot pool them")
        return ((side, side),)
