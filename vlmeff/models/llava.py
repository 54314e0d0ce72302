"""LLaVA (`LlavaForConditionalGeneration`): a CLIP/SigLIP tower, a projector and a causal LM.

Visual tokens: `get_image_features` returns one [N, D] feature block per image, N = patches (+1 with the "full"
select strategy, which keeps [CLS]); each block fills a contiguous run of `image_token_id` placeholders.
Positions are 1-D. Scores come from the tower layer whose output is the feature layer (default -2).

The reduction runs on the projector's input, so the projector (a row-wise MLP) only maps the kept rows: for
dropping this is exactly the same as reducing its output (FasterVLM), and merges happen in the tower's feature
space, as in VisionZip.

[CLS] fed although the features drop it: a method option `cls_token="keep"` (visionzip, as VisionZip does) asks
for the feature layer's [CLS] row to reach the LLM as one of the kept tokens. With the "default" strategy the
adapter then encodes with the "full" one (the same tower forward, [CLS] not sliced off; several feature layers:
their [CLS] rows concatenated like the patches'), reduces the N patch rows, and puts the [CLS] row, projected by
the same projector, in front of each reduced block; the method leaves one slot of its budget for it.
"""
import torch

from .lvlm import LVLMAdapter, tower_layer


class LlavaAdapter(LVLMAdapter):
    reduces_before_projector = True
    feeds_cls = False      # set by `capture` from the patch's cls_token option

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.score_layer = tower_layer(cfg.vision_feature_layer, len(self.tower.layers))
        # "default" drops [CLS] from the features; "full" keeps it as a protected first row
        self.feature_prefix = 0 if cfg.vision_feature_select_strategy == "default" else self.tower.num_prefix_tokens

    def capture(self, patch, scorer, layers, metric):
        # the patch is known from here on: a method that feeds [CLS] (cls_token="keep") gets it added back to
        # features that drop it; features that keep it ("full") already hold it as their protected first row
        self.feeds_cls = patch.config.get("cls_token") == "keep" and self.has_cls and self.feature_prefix == 0
        return super().capture(patch, scorer, layers, metric)

    def encode_reduced(self, image_kwargs, reduce):
        """Encode with `reduce` (list of per-image rows [N, Dv] -> (kept rows list, kept row indices)) applied to
        the projector's input. Returns (projected kept features per image, N per image, kept row indices).
        With `feeds_cls`, each image's [CLS] row goes in front of its reduced rows (see `with_cls_row`)."""
        if image_kwargs.get("image_sizes") is not None:     # towers that split one flat sequence per image size
            features = self.encode(image_kwargs)
            kept, rows = reduce(features)
            return kept, [f.shape[0] for f in features], rows
        seen = {}
        if self.feeds_cls:
            image_kwargs = {**image_kwargs, "vision_feature_select_strategy": "full"}

        def reduce_input(module, args):
            x = args[0]                                      # [n_img, N, Dv]: LLaVA images share one size
            cls_rows, x = (x[:, :1], x[:, 1:]) if self.feeds_cls else (None, x)
            seen["counts"] = [x.shape[1]] * x.shape[0]
            kept, rows = reduce(list(x))
            kept, rows = torch.stack(kept), torch.stack(rows)
            if cls_rows is not None and kept.shape[1] < x.shape[1]:
                kept, rows = with_cls_row(cls_rows, kept, rows)
            seen["rows"] = list(rows)
            return (kept,)

        handle = self.model.model.multi_modal_projector.register_forward_pre_hook(reduce_input)
        try:
            features = self.encode(image_kwargs)
        finally:
            handle.remove()
        return features, seen["counts"], seen["rows"]


def with_cls_row(cls_rows, kept, rows):
    """Put [CLS] in front of reduced blocks and give it a placeholder.

    cls_rows [n, 1, Dv]; kept [n, K, Dv] reduced patch rows; rows [n, K] their placeholder slots (ascending, of
    N > K). Returns (kept' [n, K + 1, Dv], slots [n, K + 1]): [CLS] takes the first placeholder of the run, every
    other output keeps its own slot unless all slots up to it are taken, then it moves to the next one
    (slot_j = max(previous row, j)), so slots stay distinct and ascending. With compact positions (the default)
    which slots are kept does not change the LLM's input.
    """
    n, K = rows.shape
    shifted = torch.cat([torch.zeros_like(rows[:, :1]), rows], dim=1)
    slots = torch.maximum(shifted, torch.arange(K + 1, device=rows.device))
    return torch.cat([cls_rows, kept], dim=1), slots
