"""Capture q/k of chosen ViT layers as the model computes them (no eager attention, no N x N matrix)."""
import functools
import operator

import torch

from ..pruners.infoflow import context_attention
from ..pruners.scores import received_attention


class QKCapture:
    """Forward hooks that keep, for each layer in `layers`, the keys [B, H, N, d] and the queries [B, H, Q, d]
    of the latest forward: Q = 1 ([CLS] row) for queries="cls", all tokens for "all", none for None.
    The hooks stay until the owning patch is removed."""

    def __init__(self, patch, vit_adapter, layers, queries="cls"):
        self.layers = list(layers)
        self.store = {}
        self.scale = {}
        for i in self.layers:
            q_mod, k_mod, to_heads, self.scale[i] = vit_adapter.qk_modules(i)
            if queries == "cls":
                patch.hook(q_mod.register_forward_hook(self._keeper(("q", i), lambda t, f=to_heads: f(t)[:, :, :1])))
            elif queries == "all":
                patch.hook(q_mod.register_forward_hook(self._keeper(("q", i), to_heads)))
            patch.hook(k_mod.register_forward_hook(self._keeper(("k", i), to_heads)))

    def _keeper(self, key, transform):
        def hook(module, args, out):
            self.store[key] = transform(out)
        return hook

    def keys(self, i):
        return self.store[("k", i)]

    def attention_scores(self):
        """Attention each token receives [B, N], averaged over heads and the captured queries, summed over the
        captured layers (VTC-CLS's layer ensemble): the [CLS] row's attention with queries="cls", the mean attention
        received (`received`) with "all". The captured queries decide which score it is, so one computation serves
        both."""
        return _total(received_attention(self.store[("q", i)], self.store[("k", i)], self.scale[i])
                      for i in self.layers)

    def context_scores(self, threshold):
        """VFlowOpt's context map [B, N] (`vlmeff.pruners.infoflow.context_attention`), summed over the captured
        layers."""
        return _total(context_attention(self.store[("q", i)], self.store[("k", i)], self.scale[i], threshold)
                      for i in self.layers)

    def clear(self):
        self.store.clear()


def _total(scores):
    """Sum of per-layer scores without Python sum's extra `0 + first` launch."""
    return functools.reduce(operator.add, scores)


class TowerCapture:
    """What the pre-LLM engine reads from a tower whose layers a ViT adapter describes: per-image scores of the
    tower tokens at `layers` (empty for a score-free method, scorer None) and the key metric at `metric_layer`,
    mapped to feature rows by `to_rows` ([n_img, T, ...] -> [n_img, N, ...])."""

    def __init__(self, patch, vit_adapter, scorer, layers, metric_layer, to_rows):
        self.scorer, self.metric_layer, self.to_rows = scorer, metric_layer, to_rows
        queries = {"cls": "cls", "received": "all", "context": "all"}.get(scorer)
        self.qk = QKCapture(patch, vit_adapter, layers, queries=queries)
        self.metric_qk = None
        if metric_layer is not None:
            reuse = metric_layer in self.qk.layers
            self.metric_qk = self.qk if reuse else QKCapture(patch, vit_adapter, [metric_layer], queries=None)

    def scores(self, threshold=None):
        """Per-image scores of the feature rows [n_img, N], or None for score-free methods (threshold: the context
        scorer's, see `QKCapture.context_scores`)."""
        if self.scorer is None:
            return None
        if self.scorer == "context":
            return self.to_rows(self.qk.context_scores(threshold))
        return self.to_rows(self.qk.attention_scores())

    def metric(self):
        """Per-image merge metric [n_img, N, C] float32 (whatever the tower's dtype: the matching ranks its cosine
        similarities): the metric layer's keys averaged over heads."""
        return self.to_rows(self.metric_qk.keys(self.metric_layer).mean(dim=1, dtype=torch.float32))

    def clear(self):
        self.qk.clear()
        if self.metric_qk is not None:
            self.metric_qk.clear()
