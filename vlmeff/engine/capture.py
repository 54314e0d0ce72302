"""Capture q/k of chosen ViT layers as the model computes them (no eager attention, no N x N matrix)."""
from ..pruners import cls_attention


class QKCapture:
    """Forward hooks that keep, for each layer in `layers`, the keys [B, H, N, d] and (unless keys_only) the
    [CLS] query [B, H, 1, d] of the latest forward. The hooks stay until the owning patch is removed."""

    def __init__(self, patch, vit_adapter, layers, keys_only=False):
        self.layers = list(layers)
        self.store = {}
        self.scale = {}
        for i in self.layers:
            q_mod, k_mod, to_heads, self.scale[i] = vit_adapter.qk_modules(i)
            if not keys_only:
                patch.hook(q_mod.register_forward_hook(self._keeper(("q", i), lambda t, f=to_heads: f(t)[:, :, :1])))
            patch.hook(k_mod.register_forward_hook(self._keeper(("k", i), to_heads)))

    def _keeper(self, key, transform):
        def hook(module, args, out):
            self.store[key] = transform(out)
        return hook

    def keys(self, i):
        return self.store[("k", i)]

    def cls_scores(self):
        """[CLS] -> token attention [B, N], head-mean, summed over the captured layers (VTC-CLS ensemble)."""
        return sum(cls_attention(self.store[("q", i)], self.store[("k", i)], self.scale[i]) for i in self.layers)

    def clear(self):
        self.store.clear()
