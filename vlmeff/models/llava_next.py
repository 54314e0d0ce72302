"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`, CLIP tower) and LLaVA-OneVision
(`LlavaOnevisionForConditionalGeneration`, SigLIP tower): "anyres" images.

Visual tokens: the processor cuts each image into a base view (the whole image resized to the tower's input) and
a grid of crops; the tower encodes every view ("crop") separately. `get_image_features` then packs one block per
image: the base view's P tokens, followed by the crops' tokens rearranged into one big grid, unpadded (rows or
columns that only cover the processor's padding are removed) with an `image_newline` row appended after every
grid row. OneVision may also bilinearly shrink that big grid (`vision_aspect_ratio="anyres_max_N"`), and images of
multi-image samples (`batch_num_images` > 1) are encoded as the base view only, plus one newline row.

Scores: the tower's per-crop token scores (and merge metric) are packed by the model's own `pack_image_features`,
with a zero vector in place of `image_newline`. Packing is a pure rearrangement (plus OneVision's interpolation),
so every packed row gets exactly the score of the tower token (crop, patch) it was made from, and interpolated
rows the same interpolation of the scores as their features. Newline rows are protected: always kept, outside the
budget and never merge targets.

Budget spread: one budget per image over all its non-newline rows, base view and crops together (`keep` is the
count or ratio of those rows; the selection is a global top-k over them). FasterVLM instead keeps the same k in
every view; we do not, because (1) `keep` means visual tokens per image for every family in vlmeff, (2) after
unpadding the crops hold different numbers of rows (a mostly-padding crop keeps few), so "the same k per crop" is
not defined on the packed block, and (3) [CLS] attention is a softmax within each view, so the scores of
different views are on one scale and a global top-k simply gives more tokens to views whose attention is more
concentrated. With a ratio budget the total matches FasterVLM's per-view spread up to rounding.

`pool` average-pools the base view and the packed crop grid separately (newline rows kept), the budget split
between them in proportion to their rows; a budget below one token per grid pools all their rows jointly, in
order, into contiguous runs (`engine.lvlm.pool_layout`; keep=1: their mean). Videos (`pixel_values_videos`) are not reduced.
"""
import sys

import torch

from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    reduces_before_projector = False     # blocks are packed (crops, newlines) after the projector
    pixel_patch_rows = False             # pixel values of crops [n, crops, C, H, W], features packed with newlines
    multi_view = True
    def __init__(self, model):
        super().__init__(model)
        self.layout = None           # of the latest encode: (crops per image, image_sizes, packing options)

    # -- what the engine calls ----------------------------------------------------------------------------------
    def encode(self, image_kwargs):
        """Per-image packed feature blocks [N_i, D] (list) from the model's own `get_image_features`."""
        out = self.model.model.get_image_features(**image_kwargs, return_dict=True)
        sizes = image_kwargs["image_sizes"]
        self.host_sizes = [tuple(s) for s in (sizes.tolist() if torch.is_tensor(sizes) else sizes)]
        self.layout = (self.crops_per_image(image_kwargs), sizes, self._pack_options(image_kwargs))
        return list(out.pooler_output)

    def layout_key(self, i, features):
        """Rows, views and image size (read on the host once per encode, as the model's own packing does): together
        they fix the newline rows and the crop grid."""
        return features[i].shape[0], self.layout[0][i], self.host_sizes[i]

    def tower_rows_to_features(self, t):
        """Per-crop tower values [n_crops, T] or [n_crops, T, C] (all images' crops, in order) -> per image [N_i]
        or [N_i, C] aligned with the packed rows (0 on newline rows)."""
        t = t[:, self.tower.num_prefix_tokens - self.feature_prefix:]
        squeeze = t.dim() == 2
        if squeeze:
            t = t[..., None]
        packed = self.pack(t.float() if squeeze else t)
        return [p[:, 0] for p in packed] if squeeze else packed

    def protected_rows(self, features):
        """Per image, bool [N_i] on the CPU (packed there, so reading it costs no device sync): the `image_newline`
        rows."""
        marks = torch.zeros(sum(self.layout[0]), self._tokens_per_crop(), 1)
        return [p[:, 0] > 0.5 for p in self.pack(marks, newline=1.0)]

    def image_grids(self, i, protected):
        """The base view's patch grid, then, for a block with crops, the unpadded crop grid: a newline row ends each
        of its rows (a single-view block ends with one newline row and has no crop grid)."""
        p = self._tokens_per_crop()
        rows = int(protected[p:].sum())
        cols = (protected.numel() - p) // rows - 1 if rows else 0
        return (self.tower.patch_grid(p),) + (((rows, cols),) if cols > 0 else ())

    # -- packing -------------------------------------------------------------------------------------------------
    def pack(self, values, newline=0.0):
        """values [n_crops, P, C] (every image's crops, in order) -> per image [N_i, C], packed by the model's own
        `pack_image_features` with `newline` filling the newline rows."""
        crops, sizes, options = self.layout
        blocks = list(values.split(crops))
        fill = torch.full((values.shape[-1],), newline, dtype=values.dtype, device=values.device)
        packed, _ = self.model.model.pack_image_features(blocks, sizes, image_newline=fill, **options)
        return packed

    def _pack_options(self, image_kwargs):
        strategy = image_kwargs.get("vision_feature_select_strategy")
        return {"vision_feature_select_strategy": strategy or self.model.config.vision_feature_select_strategy}

    def _tokens_per_crop(self):
        side = self.model.config.vision_config.image_size // self.model.config.vision_config.patch_size
        return side * side + self.feature_prefix

    def _num_patches(self, image_size):
        """Views (base + crops) the processor made of an image of `image_size`, as `get_image_features` counts."""
        module = sys.modules[type(self.model.model).__module__]
        return module.image_size_to_num_patches(image_size=image_size,
                                                grid_pinpoints=self.model.config.image_grid_pinpoints,
                                                patch_size=self.model.config.vision_config.image_size)

    def crops_per_image(self, image_kwargs):
        return [self._num_patches(size) for size in image_kwargs["image_sizes"]]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: as LLaVA-NeXT (see the module docstring), with a SigLIP tower (no [CLS]: use `received`),
    feature layer -1 and strategy "full" by default, the `anyres_max_N` shrink of large crop grids, and
    single-view blocks for the images of multi-image samples."""

    image_kwargs = LlavaNextAdapter.image_kwargs + ("vision_aspect_ratio", "batch_num_images")

    def _pack_options(self, image_kwargs):
        return {"vision_aspect_ratio": image_kwargs.get("vision_aspect_ratio") or self.model.config.vision_aspect_ratio}

    def crops_per_image(self, image_kwargs):
        sizes, per_sample = image_kwargs["image_sizes"], image_kwargs.get("batch_num_images")
        if per_sample is None:
            return [self._num_patches(size) for size in sizes]
        single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [self._num_patches(size) if one else 1 for size, one in zip(sizes, single)]
