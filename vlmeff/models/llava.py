"""LLaVA (`LlavaForConditionalGeneration`): a CLIP/SigLIP tower, a projector and a causal LM.

Visual tokens: `get_image_features` returns one [N, D] feature block per image, N = patches (+1 with the "full"
select strategy, which keeps [CLS]); each block fills a contiguous run of `image_token_id` placeholders.
Positions are 1-D. Scores come from the tower layer whose output is the feature layer (default -2).
"""
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..engine.capture import TowerCapture
from .hf_vision import HFViTAdapter


class LlavaAdapter:
    family = "LlavaForConditionalGeneration"
    kind = "lvlm"
    image_kwargs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
    extra_sequence_kwargs = ()       # per-token inputs besides ids / mask / positions to shrink with them
    mrope = False

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.image_token_id = cfg.image_token_id
        self.text_config = cfg.text_config
        self.tower = HFViTAdapter(model.model.vision_tower)
        self.has_cls = self.tower.has_cls
        self.pad_token_id = cfg.text_config.pad_token_id or 0
        layer = cfg.vision_feature_layer
        if not isinstance(layer, int):
            layer = layer[-1]        # several feature layers are concatenated; score at the deepest
        self.score_layer = layer % (len(self.tower.layers) + 1) - 1
        # "default" drops [CLS] from the features; "full" keeps it as a protected first token
        self.feature_prefix = 0 if cfg.vision_feature_select_strategy == "default" else self.tower.num_prefix_tokens

    def encode(self, image_kwargs):
        """Per-image feature blocks [N_i, D] (list) from the model's own `get_image_features`."""
        return list(self.model.model.get_image_features(**image_kwargs, return_dict=True).pooler_output)

    def capture(self, patch, scorer, layers, metric):
        """Hooks on the tower that give per-image scores ("cls", "received" or None) and, if `metric`, the merge
        metric, both aligned with feature rows."""
        return TowerCapture(patch, self.tower, scorer, layers, self.score_layer if metric else None,
                            self.tower_rows_to_features)

    def tower_rows_to_features(self, t):
        """Align per-tower-token values [n_img, 1 + P, ...] with feature rows: drop [CLS] unless it is a feature."""
        return t[:, self.tower.num_prefix_tokens - self.feature_prefix:]

    def protected_rows(self, features):
        """Per image, bool [N_i]: rows kept regardless of the budget (here the [CLS] row of "full" features)."""
        return [torch.arange(f.shape[0], device=f.device) < self.feature_prefix for f in features]

    def feature_grid(self, n):
        return self.tower.patch_grid(n)

    @staticmethod
    def encoder_outputs(features):
        return {"image": BaseModelOutputWithPooling(pooler_output=features)}
