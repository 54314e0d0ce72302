"""LLaVA (`LlavaForConditionalGeneration`): a CLIP/SigLIP tower, a projector and a causal LM.

Visual tokens: `get_image_features` returns one [N, D] feature block per image, N = patches (+1 with the "full"
select strategy, which keeps [CLS]); each block fills a contiguous run of `image_token_id` placeholders.
Positions are 1-D. Scores come from the tower layer whose output is the feature layer (default -2).

The reduction runs on the projector's input, so the projector (a row-wise MLP) only maps the kept rows: for
dropping this is exactly the same as reducing its output (FasterVLM), and merges happen in the tower's feature
space, as in VisionZip.
"""
import torch

from .lvlm import LVLMAdapter, tower_layer


class LlavaAdapter(LVLMAdapter):
    reduces_before_projector = True

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.score_layer = tower_layer(cfg.vision_feature_layer, len(self.tower.layers))
        # "default" drops [CLS] from the features; "full" keeps it as a protected first row
        self.feature_prefix = 0 if cfg.vision_feature_select_strategy == "default" else self.tower.num_prefix_tokens

    def encode_reduced(self, image_kwargs, reduce):
        """Encode with `reduce` (list of per-image rows [N, Dv] -> (kept rows list, kept row indices)) applied to
        the projector's input. Returns (projected kept features per image, N per image, kept row indices)."""
        if image_kwargs.get("image_sizes") is not None:     # towers that split one flat sequence per image size
            features = self.encode(image_kwargs)
            kept, rows = reduce(features)
            return kept, [f.shape[0] for f in features], rows
        seen = {}

        def reduce_input(module, args):
            x = args[0]                                      # [n_img, N, Dv]: LLaVA images share one size
            seen["counts"] = [x.shape[1]] * x.shape[0]
            kept, seen["rows"] = reduce(list(x))
            return (torch.stack(kept),)

        handle = self.model.model.multi_modal_projector.register_forward_pre_hook(reduce_input)
        try:
            features = self.encode(image_kwargs)
        finally:
            handle.remove()
        return features, seen["counts"], seen["rows"]
