"""What every LVLM adapter provides to the pre-LLM engine (`vlmeff.engine.lvlm`), with the defaults of a HF
model whose `model.model.get_image_features` returns one feature block per image from a CLIP/SigLIP tower."""
import functools

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..engine.capture import TowerCapture
from .decoder import DecoderAdapter
from .hf_vision import HFViTAdapter


def tower_layer(feature_layer, depth):
    """The tower layer whose output is `hidden_states[feature_layer]` (the deepest one when several are used)."""
    if not isinstance(feature_layer, int):
        feature_layer = feature_layer[-1]
    return feature_layer % (depth + 1) - 1


class LVLMAdapter:
    """An LVLM seen as: image feature blocks that fill runs of `image_token_id` placeholders in the prompt.

    Attributes: family, image_kwargs (kwargs the vision encoder consumes, popped before the LLM call), mrope
    (positions are M-RoPE, kept as original), image_token_id, text_config, pad_token_id, tower (a ViT adapter for
    score capture), has_cls, score_layer (tower layer scored), feature_prefix (leading tower tokens kept as
    features, e.g. [CLS] with the "full" strategy), stacked_features (see `encoder_outputs`),
    reduces_before_projector (the family implements `encode_reduced`), pixel_patch_rows (pixel values [n, C, H, W],
    one tower patch per feature row: VFlowOpt's entropy), multi_view (base-view-and-crops blocks: VFlowOpt
    recycles there). Subclasses override what their family does
    differently.
    """

    kind = "lvlm"
    mrope = False
    image_kwargs = ("pixel_values", "image_sizes", "vision_feature_layer", "vision_feature_select_strategy")
    tower_adapter = HFViTAdapter
    feature_prefix = 0
    stacked_features = False
    reduces_before_projector = False
    pixel_patch_rows = False
    multi_view = False          # blocks of a base view and its crops (LLaVA-NeXT / OneVision's anyres)

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.family = type(model).__name__
        self.image_token_id = cfg.image_token_id
        self.text_config = cfg.text_config
        self.pad_token_id = cfg.text_config.pad_token_id or 0
        self.tower = self.tower_adapter(model.model.vision_tower)
        self.has_cls = self.tower.has_cls

    @functools.cached_property
    def decoder(self):
        """The language model, for methods inside the LLM (UnsupportedModelError where they cannot act)."""
        return DecoderAdapter(self.model.model.language_model, self.family)

    def encode(self, image_kwargs):
        """Per-image feature blocks [N_i, D] (list), from the model's own `get_image_features`."""
        return list(self.model.model.get_image_features(**image_kwargs, return_dict=True).pooler_output)

    def capture(self, patch, scorer, layers, metric):
        """Hooks on the tower giving per-image scores ("cls", "received" or None) and, if `metric`, the merge
        metric, both aligned with feature rows by `tower_rows_to_features`."""
        return TowerCapture(patch, self.tower, scorer, layers, self.score_layer if metric else None,
                            self.tower_rows_to_features)

    def tower_rows_to_features(self, t):
        """Per-image tower values [n, T, ...] -> feature rows [n, N, ...]: drop prefix tokens that are not features."""
        return t[:, self.tower.num_prefix_tokens - self.feature_prefix:]

    def protected_rows(self, features):
        """Per image, bool [N_i] on the CPU (the reduction reads it on the host, so a device mask would cost a sync):
        rows kept regardless of the budget (the prefix rows)."""
        return [torch.arange(f.shape[0]) < self.feature_prefix for f in features]

    def layout_key(self, i, features):
        """A host value (hashable) such that images with equal keys have equal `protected_rows` and
        `image_grids`, so that the engine reduces them in one batch: here the row count (protected rows are the
        prefix rows)."""
        return features[i].shape[0]

    def image_grids(self, i, protected):
        """For `pool`: the (h, w) grids that image i's unprotected feature rows form one after another (protected:
        its bool [N_i] from `protected_rows`)."""
        return (self.tower.patch_grid(int((~protected).sum())),)

    def input_features(self, blocks):
        """The channels of feature blocks [..., N, C] that the LLM takes as its input embeddings (where a family
        carries more in its blocks, e.g. Qwen3-VL's deepstack features): here all of them."""
        return blocks

    def encoder_outputs(self, features):
        """`mm_encoder_outputs` for reduced blocks [k_i, D], in the layout `get_image_features` gives: the list of
        blocks, or, where forward takes a tensor (`stacked_features`: fixed-size images or tiles, all reduced to one
        k), the blocks stacked [n_images, k, D]. One entry per image is what `generate` needs to give every beam /
        returned sequence its own sample's images (`GenerationMixin._expand_multimodal_outputs` repeats whole
        entries per sample)."""
        pooled = torch.stack(list(features)) if self.stacked_features else list(features)
        return {"image": BaseModelOutputWithPooling(pooler_output=pooled)}
