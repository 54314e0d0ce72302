"""Qwen2-VL, Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (`*ForConditionalGeneration`): a native-resolution ViT with
2-D RoPE, a PatchMerger (merge x merge patches -> one token) and a causal LM with M-RoPE.

Visual tokens: `get_image_features` returns one [N_i, D] block per image, N_i = t * h * w / merge^2 rows in
raster order over the (h / merge, w / merge) grid of each frame; each block fills a contiguous run of
`image_token_id` placeholders. Qwen3-VL also returns `deepstack_features` (one [N_i, D] block per image and per
deepstack layer, added to the LM's first hidden states at the image positions): `encode` concatenates them to the
main features along the last dim, so the engine reduces them with the same rows (and the same merge weights), and
`encoder_outputs` splits them back.

Positions: M-RoPE (t, h, w) from the model's own `get_rope_index` on the full prompt; the engine keeps the
positions of the kept tokens, so every kept token keeps its original position. They are handed to the model as a
(3, B, L) tensor, the layout the model builds itself in `forward`: the optional fourth "text" row of generate's
(4, B, L) layout only feeds packed-sequence detection, which a pruned (gapped) numbering would trip.

Scores: the ViT has no [CLS]; `received` is the mean attention each patch receives at one vision block (default:
the last block; Qwen2.5-VL: the last full-attention block), from the block's post-RoPE q/k, per image (per
frame), in query chunks, then averaged over each merge group to give one score per feature row. Qwen2.5-VL runs
its blocks on a window-permuted order of the merge groups; scores are mapped back to the merger's output order.
"""
import functools
import sys
from types import SimpleNamespace

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from ..pruners.infoflow import context_attention
from ..pruners.scores import received_attention
from .decoder import DecoderAdapter

QUERY_CHUNK = 256


class QwenVLAdapter:
    kind = "lvlm"
    image_kwargs = ("pixel_values", "image_grid_thw")
    mrope = True
    pixel_patch_rows = False
    multi_view = False
    reduces_before_projector = False     # the patch merger's 2x2 grouping needs every patch
    has_cls = False
    feature_prefix = 0

    def __init__(self, model):
        self.model = model
        self.family = type(model).__name__
        cfg = model.config
        self.visual = model.model.visual
        vcfg = self.visual.config
        self.image_token_id = cfg.image_token_id
        self.text_config = cfg.text_config
        self.pad_token_id = cfg.text_config.pad_token_id or 0
        self.merge = vcfg.spatial_merge_size
        blocks = list(self.visual.blocks)
        self.tower = SimpleNamespace(layers=blocks)
        # Qwen2.5-VL: windowed blocks except `fullatt_block_indexes`; score at the last full-attention block
        self.windowed = getattr(vcfg, "fullatt_block_indexes", None) is not None
        full = list(vcfg.fullatt_block_indexes) if self.windowed else []
        self.score_layer = (full[-1] if full else len(blocks) - 1) % len(blocks)
        self.deepstack = len(getattr(vcfg, "deepstack_visual_indexes", None) or [])
        self.grids = self.host_grids = None      # image_grid_thw of the latest encode (tensor, host tuples)
        self.output_type = BaseModelOutputWithPooling
        self._encoding = False       # the capture hooks act only while `encode` runs the tower
        self._set_rope_deltas = False

    @functools.cached_property
    def decoder(self):
        """The language model, for methods inside the LLM."""
        return DecoderAdapter(self.model.model.language_model, self.family)

    # -- features ---------------------------------------------------------------------------------------------
    def encode(self, image_kwargs):
        """Per-image feature blocks [N_i, D] (list); Qwen3-VL: [N_i, D * (1 + deepstack layers)], main first."""
        if image_kwargs.get("image_grid_thw") is None:
            raise ValueError(f"{self.family} needs image_grid_thw alongside pixel_values (the processor returns it)")
        self.grids = image_kwargs["image_grid_thw"]
        self.host_grids = [tuple(g) for g in self.grids.tolist()]     # the model's own split reads them too
        self._encoding = True
        try:
            out = self.model.model.get_image_features(**image_kwargs, return_dict=True)
        finally:
            self._encoding = False
        self.output_type = type(out)
        features = list(out.pooler_output)
        if self.deepstack:
            stacks = out.deepstack_features        # [layer][image] -> [N_i, D]
            features = [torch.cat([f] + [stacks[j][i] for j in range(self.deepstack)], dim=-1)
                        for i, f in enumerate(features)]
        return features

    def input_features(self, blocks):
        """The main merger's channels of blocks [..., N, D * (1 + deepstack layers)]: the LLM's input embeddings."""
        return blocks[..., :blocks.shape[-1] // (1 + self.deepstack)]

    def encoder_outputs(self, features):
        """The `mm_encoder_outputs` the model's forward takes for (reduced) feature blocks."""
        if not self.deepstack:
            return {"image": self.output_type(pooler_output=tuple(features))}
        parts = [f.chunk(1 + self.deepstack, dim=-1) for f in features]
        return {"image": self.output_type(
            pooler_output=tuple(p[0] for p in parts),
            deepstack_features=[tuple(p[1 + j] for p in parts) for j in range(self.deepstack)])}

    def protected_rows(self, features):
        """No protected rows; host masks (the engine reads them on the host, so a device mask would be a sync)."""
        return [torch.zeros(f.shape[0], dtype=torch.bool) for f in features]

    def layout_key(self, i, features):
        """Images of one (t, h, w) grid share their (empty) protected rows and their pool grid."""
        return self.host_grids[i]

    def image_grids(self, i, protected):
        """Image i's feature rows as one grid: the merged grid of its frames stacked vertically."""
        t, h, w = self.host_grids[i]
        return ((t * (h // self.merge), w // self.merge),)

    def _rows(self, i):
        return int(self.grids[i].prod()) // self.merge ** 2

    # -- positions --------------------------------------------------------------------------------------------
    def positions(self, kwargs):
        """Original M-RoPE positions (3, B, L) of the full prompt, from the model's own `get_rope_index`."""
        if kwargs.get("pixel_values_videos") is not None:
            raise ValueError("vlmeff reduces image tokens only; pass videos in a call without images (unpatched "
                             "path) or unpatch the model")
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        types = kwargs.get("mm_token_type_ids")
        if types is None:
            types = (ids == self.image_token_id).int()
        position_ids, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=self.grids, attention_mask=mask)
        self._set_rope_deltas = True
        return position_ids

    def _rope_deltas_hook(self, module, args, kwargs):
        """Set the base model's `rope_deltas` for the reduced prompt (as its own forward would), so that later
        steps without position_ids continue the numbering; once per reduced call."""
        if not self._set_rope_deltas:
            return
        self._set_rope_deltas = False
        pos, mask = kwargs.get("position_ids"), kwargs.get("attention_mask")
        if pos is None or pos.dim() != 3 or (mask is not None and (not torch.is_tensor(mask) or mask.dim() != 2)):
            return
        pos = pos[-3:]
        valid = torch.ones(pos.shape[1:], dtype=torch.bool, device=pos.device) if mask is None else mask.bool()
        top = pos.amax(dim=0).masked_fill(~valid, -1).amax(dim=-1)
        module.rope_deltas = (top + 1 - valid.sum(dim=-1))[:, None]

    # -- scores -----------------------------------------------------------------------------------------------
    def capture(self, patch, scorer, layers, metric):
        """Hooks giving per-image received-attention scores (scorer "received") and, if `metric`, the key merge
        metric, aligned with feature rows."""
        if scorer not in (None, "received", "context"):
            raise ValueError(f"scorer {scorer!r} is not available on {self.family} (no [CLS]); use received")
        patch.hook(self.model.model.register_forward_pre_hook(self._rope_deltas_hook, with_kwargs=True))
        return QwenVisionCapture(patch, self, layers if scorer else [], self.score_layer if metric else None)

    def window_order(self):
        """Qwen2.5-VL: for each merge group in the merger's output order, its slot in the blocks' order."""
        from transformers.vision_utils import get_vision_window_index
        v = self.visual
        index, _ = get_vision_window_index(self.grids, spatial_merge_size=self.merge, window_size=v.window_size,
                                           patch_size=v.patch_size)
        return torch.argsort(index)

    def block_rows_to_features(self, t):
        """Per-patch values [S, ...] in the blocks' order -> per-image list of [N_i, ...] per feature row (mean
        over each merge group)."""
        unit = self.merge ** 2
        t = t.reshape(t.shape[0] // unit, unit, *t.shape[1:]).mean(dim=1)
        if self.windowed:
            t = t[self.window_order().to(t.device)]
        return list(t.split([self._rows(i) for i in range(len(self.grids))]))


class QwenVisionCapture:
    """Forward pre-hooks on the attention modules of chosen vision blocks. While the adapter encodes, each hook
    recomputes the block's post-RoPE q and k from the attention's own inputs (its `qkv` projection and the rotary
    function of its modeling file) and keeps them with the block's attention segments (`cu_seqlens`)."""

    def __init__(self, patch, adapter, layers, metric_layer):
        self.adapter, self.layers, self.metric_layer = adapter, list(layers), metric_layer
        self.store = {}
        for i in sorted(set(self.layers) | ({metric_layer} - {None})):
            attn = adapter.tower.layers[i].attn
            patch.hook(attn.register_forward_pre_hook(self._keeper(i, attn), with_kwargs=True))

    def _keeper(self, i, attn):
        rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision

        def hook(module, args, kwargs):
            if not self.adapter._encoding:
                return
            x = args[0] if args else kwargs["hidden_states"]
            cu = kwargs["cu_seqlens"] if "cu_seqlens" in kwargs else args[1]
            cos, sin = kwargs["position_embeddings"]
            with torch.no_grad():
                q, k, _ = module.qkv(x).reshape(x.shape[0], 3, module.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
                q, k = rotary(q, k, cos, sin)
            self.store[i] = (q.transpose(0, 1), k.transpose(0, 1), cu, module.scaling)   # [H, S, d]
        return hook

    def scores(self, threshold=None):
        """Per-image received attention of the feature rows (list of [N_i]), summed over the captured blocks; with
        a `threshold`, VFlowOpt's context map instead (`context_attention`), per attention segment.

        Per block: the attention each patch receives, averaged over heads and over all queries of its image
        (a query in another window or frame gives it none), computed per attention segment (`cu_seqlens`: one
        per image and frame, or per window in Qwen2.5-VL's windowed blocks) in query chunks; then averaged over
        each merge group."""
        if not self.layers:
            return None
        sizes = torch.tensor([int(g.prod()) for g in self.adapter.grids])   # images stay contiguous in any order
        total = None
        for i in self.layers:
            q, k, cu, scale = self.store[i]
            bounds = cu.tolist()
            if threshold is not None:       # a context map per segment: the tokens of one image (and frame)
                per_patch = torch.cat([context_attention(q[None, :, a:b], k[None, :, a:b], scale, threshold,
                                                         chunk=QUERY_CHUNK)[0]
                                       for a, b in zip(bounds[:-1], bounds[1:])])
            else:
                summed = torch.cat([   # attention received, summed over the segment's queries
                    received_attention(q[None, :, a:b], k[None, :, a:b], scale, chunk=QUERY_CHUNK)[0] * (b - a)
                    for a, b in zip(bounds[:-1], bounds[1:])])
                per_patch = summed / sizes.repeat_interleave(sizes).to(summed.device)
            total = per_patch if total is None else total + per_patch
        return self.adapter.block_rows_to_features(total)

    def metric(self):
        """Per-image merge metric (list of [N_i, d]): keys of the metric block averaged over heads and over each
        merge group."""
        return self.adapter.block_rows_to_features(self.store[self.metric_layer][1].float().mean(dim=0))

    def clear(self):
        self.store.clear()
