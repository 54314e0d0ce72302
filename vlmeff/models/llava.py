"""LLaVA (`LlavaForConditionalGeneration`): a CLIP/SigLIP tower, a projector and a causal LM.

Visual tokens: `get_image_features` returns one [N, D] feature block per image, N = patches (+1 with the "full"
select strategy, which keeps [CLS]); each block fills a contiguous run of `image_token_id` placeholders.
Positions are 1-D. Scores come from the tower layer whose output is the feature layer (default -2).

The reduction runs on the projector's input, so the projector (a row-wise MLP) only maps the kept rows: for
dropping this is exactly the same as reducing its output (FasterVLM), and merges happen in the tower's feature
space, as in VisionZip.

[CLS] as a dominant token: a method option `cls_token="keep"` (visionzip, as VisionZip does) asks for the feature
layer's [CLS] row to reach the LLM as one of the kept tokens, inside the budget. The adapter then encodes with the
"full" strategy (the same tower forward, [CLS] not sliced off; with several feature layers their [CLS] rows are
concatenated like the patches'), hands only the patch rows to the reduction, which leaves one slot of its budget
free, and puts the [CLS] row in front of each reduced block, mapped by the same projector. With the "default"
strategy [CLS] has no placeholder of its own and takes the first kept one (`with_cls_row`); at a full budget the
features stay as the model makes them, without [CLS]. With "full" it keeps its own first placeholder.
"""
import torch

from .lvlm import LVLMAdapter, tower_layer


class LlavaAdapter(LVLMAdapter):
    reduces_before_projector = True
    # pixel_values [n_img, C, H, W], one tower patch per feature row in raster order (after `feature_prefix` rows):
    # what VFlowOpt's patch entropy reads
    pixel_patch_rows = True
    feeds_cls = False          # set by `capture` from the patch's cls_token option
    cls_placeholder = False    # [CLS] fed apart has a placeholder of its own ("full" strategy)

    def __init__(self, model):
        super().__init__(model)
        cfg = model.config
        self.score_layer = tower_layer(cfg.vision_feature_layer, len(self.tower.layers))
        # "default" drops [CLS] from the features; "full" keeps it as a protected first row
        self.feature_prefix = 0 if cfg.vision_feature_select_strategy == "default" else self.tower.num_prefix_tokens

    def capture(self, patch, scorer, layers, metric):
        # the patch is known from here on: with cls_token="keep" the [CLS] row is handled apart from the patch rows
        # (see the module docstring), so the reduction, its scores and its metric see patch rows only
        self.feeds_cls = patch.config.get("cls_token") == "keep" and self.has_cls and self.reduces_before_projector
        if self.feeds_cls:
            self.cls_placeholder, self.feature_prefix = self.feature_prefix > 0, 0
        return super().capture(patch, scorer, layers, metric)

    def encode_reduced(self, image_kwargs, reduce):
        """Encode with `reduce` (list of per-image rows [N, Dv], optionally the projector's `project` -> (kept rows
        list, kept row indices)) applied to the projector's input. Returns (projected kept features per image, N per
        image, kept row indices).
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
            kept, rows = reduce(list(x), project=module.forward)    # (forward: not this hook again)
            kept, rows = torch.stack(kept), torch.stack(rows)
            if cls_rows is not None and (self.cls_placeholder or kept.shape[1] < x.shape[1]):
                kept, rows = with_cls_row(cls_rows, kept, rows, self.cls_placeholder)
            seen["counts"] = [x.shape[1] + (cls_rows is not None and self.cls_placeholder)] * x.shape[0]
            seen["rows"] = list(rows)
            return (kept,)

        handle = self.model.model.multi_modal_projector.register_forward_pre_hook(reduce_input)
        try:
            features = self.encode(image_kwargs)
        finally:
            handle.remove()
        return features, seen["counts"], seen["rows"]


def with_cls_row(cls_rows, kept, rows, own_placeholder):
    """Put [CLS] in front of reduced blocks and give every output a placeholder slot.

    cls_rows [n, 1, Dv]; kept [n, K, Dv] reduced patch rows; rows [n, K] their patch rows (ascending, of N > K
    without `own_placeholder`). With `own_placeholder` ("full" features: placeholder 0 is [CLS]'s, patch r has r + 1)
    the slots are [0, rows + 1]. Without ("default"), [CLS] takes the first placeholder and every other output keeps
    its own unless all slots up to it are taken, then it moves to the next one (slot_j = max(previous row, j)), so
    slots stay distinct and ascending; with compact positions (the default) which slots are kept does not change the
    LLM's input. Returns (kept' [n, K + 1, Dv], slots [n, K + 1]).
    """
    first = rows.new_zeros(rows.shape[0], 1)          # (not zeros_like(rows[:, :1]): rows may be empty, keep=1)
    if own_placeholder:
        slots = torch.cat([first, rows + 1], dim=1)
    else:
        slots = torch.maximum(torch.cat([first, rows], dim=1), torch.arange(rows.shape[1] + 1, device=rows.device))
    return torch.cat([cls_rows, kept], dim=1), slots
