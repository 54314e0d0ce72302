"""Token reduction inside a vision transformer, through hooks and instance-level forward overrides.

Sites: `cls`, `received`, `random` and `pool` reduce the tokens once, on the output of layer `layer`; `tome`
merges r tokens between the attention and MLP branches of every layer. Prefix tokens ([CLS], registers) are never reduced.
"""
import torch

from ..pruners import resolve_keep
from ..pruners.reduce import merge_groups
from ..pruners.tome import tome_merge
from ..registry import score_layer_range
from .capture import QKCapture
from .rows import reduce_rows


def default_layer(depth):
    """Prune after a quarter of the layers (layer 3 of 12), early enough to save most of the compute."""
    return depth // 4


def tome_schedule(r, keep, n_patches, depth):
    """Tokens merged per layer: r (an int for every layer, or a list with one int per layer), or, with r None, the
    schedule that leaves exactly `keep` of the n_patches patch tokens (`tome_schedule_to_keep`)."""
    if r is not None and keep is not None:
        raise ValueError(f"method 'tome' takes r (tokens merged per layer) or keep (tokens left), not both; "
                         f"got r={r!r} and keep={keep!r}")
    if r is None:
        if keep is None:
            raise ValueError("method 'tome' needs r (tokens merged per layer) or keep (tokens left at the end)")
        if n_patches is None:
            raise ValueError("this model's token count is not fixed; give method 'tome' an explicit r")
        return tome_schedule_to_keep(n_patches, resolve_keep(keep, n_patches), depth, keep)
    # r's type and range (an int >= 0 or one per layer) were checked by the registry
    return [int(v) for v in r] if isinstance(r, (list, tuple)) else [int(r)] * depth


def tome_fewest_tokens(n_patches, depth):
    """The fewest patch tokens ToMe can leave of n_patches after `depth` layers: each layer merges at most half
    of the unprotected tokens (`pruners.tome.max_merge`)."""
    for _ in range(depth):
        n_patches -= n_patches // 2
    return n_patches


def tome_schedule_to_keep(n_patches, k, depth, keep=None):
    """Per-layer r that leaves exactly k of n_patches tokens, as even as ToMe's cap allows: a layer merges at most
    half of its tokens, i.e. at most the tokens left after it. One token at a time goes to the layer with the
    smallest r that can still take one (the earliest on ties). ValueError naming the fewest reachable count when
    k is below it."""
    fewest = tome_fewest_tokens(n_patches, depth)
    if k < fewest:
        raise ValueError(f"keep={k if keep is None else keep!r} asks method 'tome' for {k} of the {n_patches} patch "
                         f"tokens, but ToMe merges at most half of the tokens per layer, so {depth} layers leave at "
                         f"least {fewest}; use keep >= {fewest}")
    schedule = [0] * depth
    for _ in range(n_patches - k):
        caps, left = [0] * depth, k
        for i in reversed(range(depth)):
            caps[i], left = left, left + schedule[i]
        i = min((i for i in range(depth) if schedule[i] < caps[i]), key=schedule.__getitem__)
        schedule[i] += 1
    return schedule


class ViTReduction:
    """Installs `method` on a ViT adapter's layers and records `patch.stats` on every forward."""

    def __init__(self, patch, adapter, method, keep, options):
        # option types and ranges (layer and score_layers within the depth, positions None) were checked by the
        # registry in vlmeff.patch
        self.patch, self.adapter, self.method, self.keep, self.options = patch, adapter, method, keep, options
        self.depth = len(adapter.layers)
        self.prefix = adapter.num_prefix_tokens
        grid = adapter.grid
        self.n_patches = grid[0] * grid[1] if grid else None
        if method == "tome":
            self.schedule = tome_schedule(options["r"], keep, self.n_patches, self.depth)
            self.prop_attn, self.order = options["prop_attn"], options["order"]
        else:
            if keep is None:
                raise ValueError(f"method {method!r} needs keep (an int count or a ratio in (0, 1])")
            if self.n_patches is not None:
                resolve_keep(keep, self.n_patches)
            layer = default_layer(self.depth) if options["layer"] is None else options["layer"]
            self.layer = layer % self.depth
            self.score_layers = self._score_layers(options.get("score_layers"))
        self.state = {}

    def _score_layers(self, spec):
        if self.method not in ("cls", "received"):
            return []
        return score_layer_range(spec, self.layer, self.depth)

    # -- installation -------------------------------------------------------------------------------------------
    def install(self):
        a, p = self.adapter, self.patch
        p.hook(a.layers[0].register_forward_pre_hook(self._start))
        for i, layer in enumerate(a.layers):
            p.hook(layer.register_forward_pre_hook(self._count(i)))
        p.hook(a.layers[-1].register_forward_hook(self._finish))
        if self.method == "tome":
            merging = [i for i, r in enumerate(self.schedule) if r > 0]
            self.keys = QKCapture(p, a, merging, queries=None)
            # ToMe's proportional attention acts in every layer once sizes exist, merging or not
            overridden = range(merging[0], self.depth) if merging and self.prop_attn else merging
            for i in overridden:
                p.override(a.layers[i], "forward", self._tome_forward(i, self.schedule[i]))
            return
        self.scored = QKCapture(p, a, self.score_layers, queries="all" if self.method == "received" else "cls")
        merge_metric = self.options.get("reduce") == "merge" and self.layer not in self.score_layers
        self.keys = QKCapture(p, a, [self.layer], queries=None) if merge_metric else self.scored
        # prepended: on the last layer the reduction runs before `_finish` records the stats
        p.hook(a.layers[self.layer].register_forward_hook(self._reduce_after_layer, prepend=True))

    # -- per-forward state --------------------------------------------------------------------------------------
    def _start(self, module, args):
        self.patch.new_call()                  # a forward that fails leaves no stats of an earlier one
        x = args[0]
        n_patches = x.shape[1] - self.prefix
        self.state = dict(sizes=None, batch=x.shape[0], n_patches=n_patches, tokens=[],
                          visual={"input": [n_patches] * x.shape[0]})

    def _count(self, i):
        def hook(module, args):
            self.state["tokens"].append(args[0].shape[1])
        return hook

    def _finish(self, module, args, out):
        s, a = self.state, self.adapter
        n0 = s["n_patches"] + self.prefix
        self.patch.stats = {
            "visual_tokens": s["visual"],
            "flops": s["batch"] * a.flops(s["tokens"]),
            "flops_unpatched": s["batch"] * a.flops([n0] * self.depth),
        }
        # for inspection and plots: patch-token scores [B, N] and kept patch indices [B, K] of the last forward
        self.patch.stats.update({key: s[key] for key in ("scores", "kept") if key in s})
        if "source" in s:                                  # ToMe: each token's output, composed over the merges
            weight, output = s["source"].max(dim=1)
            s["groups"] = torch.where(weight > 0, output, -1)
        if "groups" in s:                                  # patches only: the prefix rows are never reduced
            self.patch.stats["groups"] = s["groups"][:, self.prefix:]
        for capture in {id(c): c for c in (getattr(self, "scored", None), self.keys) if c is not None}.values():
            capture.clear()      # release the layer activations held for scoring

    def _record(self, stage, x):
        self.state["visual"][stage] = [x.shape[1] - self.prefix] * x.shape[0]

    # -- reductions ---------------------------------------------------------------------------------------------
    def _reduce_after_layer(self, module, args, out):
        p, N = self.prefix, out.shape[1]
        stage = f"after layer {self.layer}"
        if resolve_keep(self.keep, N - p) == N - p:     # full budget (a static fact of the shape): no launch at all
            self._release()
            self._record(stage, out)
            return None
        scores = self.scored.attention_scores() if self.method in ("cls", "received") else None
        merge = self.options.get("reduce") == "merge"
        metric = self.keys.keys(self.layer).mean(dim=1, dtype=torch.float32) if merge else None
        self._release()
        grids = (self.adapter.patch_grid(N - p),) if self.method == "pool" else None
        sizes = self.state["sizes"]
        x, self.state["sizes"], rows = reduce_rows(self.method, self.options, out, self.keep, p, scores,
                                                   metric, grids, sizes)
        if self.patch.track_merges:
            self.state["groups"] = merge_groups(lambda ident: reduce_rows(self.method, self.options, ident, self.keep,
                                                                          p, scores, metric, grids, sizes)[0],
                                                *out.shape[:2], out.device)
        if self.method != "pool":
            self.state["kept"] = rows[:, p:] - p if p else rows
        if scores is not None:
            self.state["scores"] = scores[:, p:]
        self._record(stage, x)
        return x

    def _source(self, x):
        """[B, N_now, N] which input tokens each current token holds (the identity before the first merge)."""
        source = self.state.get("source")
        if source is None:
            B, N = x.shape[:2]
            source = torch.eye(N, device=x.device).expand(B, N, N).contiguous()
        return source

    def _release(self):
        """The captured q/k are consumed once per forward: release them as soon as the reduction has read them."""
        self.scored.clear()
        self.keys.clear()

    def _tome_forward(self, i, r):
        """Layer i's forward: attention with the log-size bias of the latest merge (proportional attention), then
        r merges (ToMe's place, between attention and MLP), sizes tracked in `state`."""
        def merge(x):
            metric = self.keys.keys(i).mean(dim=1)
            if self.patch.track_merges:            # the same matching on the tokens' one-hot sources so far
                self.state["source"] = tome_merge(self._source(x), self.state["sizes"], metric, r, self.prefix,
                                                  self.order)[0]
            x, self.state["sizes"], log_sizes = tome_merge(x, self.state["sizes"], metric, r, self.prefix, self.order,
                                                           with_log=self.prop_attn)
            if log_sizes is not None:     # once per merge, reused by the layers up to the next merge
                self.state["attn_bias"] = log_sizes[:, None, None, :]
            self._record(f"layer {i}", x)
            return x

        def forward(x, *args, **kwargs):
            # extra arguments (a None attention mask from the HF encoder loop) carry nothing for vision towers
            return self.adapter.run_block(i, x, self.state.get("attn_bias"), merge if r > 0 else _unchanged)

        return forward


def _unchanged(x):
    return x
