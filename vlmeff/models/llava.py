"""LLaVA (`LlavaForConditionalGeneration`): a CLIP/SigLIP tower, a projector and a causal LM.

Visual tokens: `get_image_features` returns one [N, D] feature block per image, N = patches (+1 with the "full"
select strategy, which keeps [CLS]); each block fills a contiguous run of `image_token_id` placeholders.
Positions are 1-D. Scores come from the tower layer whose output is the feature layer (default -2).
"""
from .lvlm import LVLMAdapter, tower_layer


class LlavaAdapter(LVLMAdapter):
    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.score_layer = tower_layer(cfg.vision_feature_layer, len(self.tower.layers))
        # "default" drops [CLS] from the features; "full" keeps it as a protected first row
        self.feature_prefix = 0 if cfg.vision_feature_select_strategy == "default" else self.tower.num_prefix_tokens
