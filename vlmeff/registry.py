"""The method registry: one record per method, each option declared with its type and range, and the one check
of a `vlmeff.patch` call's options (`resolve_options`).

Adding an option is one line, e.g. `ORDER = Option("order", "tome", *choice("tome", "raster"))` or
`Option("fused", False, (bool,), accepted="True or False")`, then naming it in the method's `register` call.
"""
import difflib
import numbers
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from .pruners.stages import VFLOWOPT_25


@dataclass(frozen=True)
class ModelContext:
    """What option ranges depend on, read from the model's adapter by `vlmeff.patch`.

    kind ("vit" or "lvlm"), family (the model's name in messages), depth (layers that `layer` and `score_layers`
    index: the ViT's layers, the LVLM's vision tower, or for methods inside the LLM its decoder layers), reduce_layer (the layer after which the tokens are
    reduced unless `layer` says otherwise: a quarter of a ViT's depth, an LVLM tower's feature layer), mrope
    (positions are M-RoPE), keep (the budget of the call), options (the call's options, resolved so far),
    first_layer (methods inside the LLM: the shallowest decoder layer whose input may be pruned).
    """

    kind: str
    family: str
    depth: int
    reduce_layer: int
    mrope: bool = False
    keep: object = None
    options: dict = field(default_factory=dict)
    first_layer: int = 1          # inside the LLM: the shallowest layer that may prune (deepstack models: deeper)

    @property
    def last(self):
        return self.depth - 1

    @property
    def prune_layer(self):
        """The layer the tokens are reduced after, in [0, depth): `layer` if given (checked first), else the default."""
        layer = self.options.get("layer")
        return self.reduce_layer if layer is None else layer % self.depth


@dataclass(frozen=True)
class Option:
    """One option of a method.

    types: the Python types it takes (`int` means any integral number, `float` any non-integral real; bool is
    never an int, it is accepted only where `bool` is listed); valid(value, ctx) -> bool: the range, which may
    read the model and the other options through `ctx` (a `ModelContext`); accepted: what is accepted, in words
    (`vlmeff methods` prints it); on_model(ctx) -> str: the same with the model's numbers filled in, for ranges
    that depend on the model. A wrong type is a TypeError, a value out of range a ValueError, both naming the
    option, the value and what is accepted.
    """

    name: str
    default: object
    types: tuple
    valid: Callable = lambda value, ctx: True
    accepted: str = ""
    on_model: Optional[Callable] = None

    def __repr__(self):
        return f"Option({self.name}={self.default!r}: {self.accepted})"

    def accepted_text(self, ctx=None):
        """What is accepted; on the model of `ctx` if given."""
        return self.on_model(ctx) if ctx is not None and self.on_model is not None else self.accepted

    def check(self, value, ctx, method):
        """`value` with numbers made plain (int / float), or TypeError / ValueError naming what is accepted."""
        if not _has_type(value, self.types):
            raise TypeError(self._message(value, ctx, method))
        value = _plain(value)
        if not self.valid(value, ctx):
            raise ValueError(self._message(value, ctx, method))
        return value

    def _message(self, value, ctx, method):
        return (f"method {method!r} on {ctx.family}: {self.name}={value!r} is not accepted; "
                f"accepted: {self.accepted_text(ctx)}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _has_type(value, types):
    if isinstance(value, bool):
        return bool in types
    if isinstance(value, numbers.Integral):
        return int in types
    if isinstance(value, numbers.Real) and float in types:
        return True
    return isinstance(value, tuple(t for t in types if t not in (bool, int, float)))


def _plain(value):
    """numpy / torch-free plain numbers: Integral -> int, other Real -> float, recursively in lists and tuples."""
    if _is_int(value):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, (list, tuple)):
        return (list if isinstance(value, list) else tuple)(_plain(v) for v in value)
    return value


def choice(*values):
    """(types, valid, accepted) of an option that takes one of the given strings."""
    return (str,), lambda value, ctx: value in values, ", ".join(values)


def _index(value, ctx):
    return _is_int(value) and -ctx.depth <= value < ctx.depth


# -- the options of today's methods; a new option is one `Option(...)` line -----------------------------------
def _layer_accepted(ctx):
    if ctx.kind != "vit":
        return (f"None only: on {ctx.family} the visual tokens are reduced at the tower's feature layer "
                f"(tower layer {ctx.reduce_layer})")
    return f"None (layer {ctx.reduce_layer}, a quarter of the depth) or a layer index in [{-ctx.depth}, {ctx.last}]"


def _score_layers_valid(value, ctx):
    if value is None:
        return True
    if _is_int(value):
        return _index(value, ctx) and value % ctx.depth <= ctx.prune_layer
    return (len(value) == 2 and all(_index(v, ctx) for v in value)
            and value[0] % ctx.depth <= value[1] % ctx.depth <= ctx.prune_layer)


def score_layer_range(spec, reduce_layer, depth):
    """The layers whose scores are summed for a checked `score_layers` value: [reduce_layer] for None, s ..
    reduce_layer for an int s, start .. end for a pair (negative indices count from the end of the depth)."""
    if spec is None:
        return [reduce_layer]
    start, end = (spec, reduce_layer) if _is_int(spec) else spec
    return list(range(start % depth, end % depth + 1))


def _score_layers_accepted(ctx):
    p = ctx.prune_layer
    return (f"None (score at layer {p}, where the tokens are reduced), a first layer index s <= {p} (scores of "
            f"layers s..{p} summed), or a pair (start, end) of layer indices with start <= end <= {p}; indices lie in "
            f"[{-ctx.depth}, {ctx.last}], negative ones count from the end of the {ctx.depth} layers")


def _positions_valid(value, ctx):
    if ctx.kind != "lvlm":
        return value is None
    return value in (None, "original") if ctx.mrope else value in (None, "compact", "original")


def _positions_accepted(ctx):
    if ctx.kind != "lvlm":
        return "None only: positions applies to LVLMs (prompt positions of kept visual tokens), not to a ViT"
    if ctx.mrope:
        return f"original or None: {ctx.family} keeps the original M-RoPE positions of kept tokens"
    return "compact, original, or None for compact"


def _contextual_valid(value, ctx):
    if _is_int(value):
        return value >= 0 and (not _is_int(ctx.keep) or value <= ctx.keep - 1)
    return 0.0 <= value < 1.0          # False for nan


def _contextual_accepted(ctx):
    bound = f" (at most keep - 1 = {ctx.keep - 1} for keep={ctx.keep})" if _is_int(ctx.keep) else " (at most keep - 1)"
    return f"an int count >= 0 of contextual tokens{bound} or a float share of the budget in [0, 1)"


def _tome_r_valid(value, ctx):
    if value is None or _is_int(value):
        return value is None or value >= 0
    return len(value) == ctx.depth and all(_is_int(v) and v >= 0 for v in value)


def _tome_r_accepted(ctx):
    return (f"None (derived from keep), an int >= 0 merged in every layer, or a list of {ctx.depth} ints >= 0 "
            f"(one per layer)")


LAYER = Option("layer", None, (type(None), int), lambda v, c: v is None or (c.kind == "vit" and _index(v, c)),
               "None (a quarter of the depth) or a layer index in [-depth, depth - 1]; on an LVLM None only",
               _layer_accepted)
SCORE_LAYERS = Option("score_layers", None, (type(None), int, tuple, list), _score_layers_valid,
                      "None (score at the reduction layer p), a first layer index s (layers s..p summed) or a pair "
                      "(start, end) of layer indices with start <= end <= p", _score_layers_accepted)
REDUCE = Option("reduce", "drop", *choice("drop", "merge"))
POSITIONS = Option("positions", None, (type(None), str), _positions_valid,
                   "compact, original, or None for compact (LVLMs only; M-RoPE models: original only)",
                   _positions_accepted)
CONTEXTUAL = Option("contextual", 10 / 64, (int, float), _contextual_valid,
                    "an int count >= 0 of contextual tokens (at most keep - 1) or a float share of the budget "
                    "in [0, 1)",
                    _contextual_accepted)
TOME_R = Option("r", None, (type(None), int, tuple, list), _tome_r_valid,
                "None (derived from keep), an int >= 0 merged in every layer, or a list of ints >= 0, one per layer",
                _tome_r_accepted)
# VisionZip: [CLS] fed as one of the dominant tokens ("keep", as the reference) or not ("drop"); outputs in the
# reference's order (dominant, then contextual) or in raster order (see vlmeff.engine.rows._visionzip)
CLS_TOKEN = Option("cls_token", "keep", *choice("keep", "drop"))
VISIONZIP_ORDER = Option("order", "reference", *choice("reference", "raster"))
# ToMe: merged tokens in ToMe's order ([prefix, unmerged a, b], as the reference) or in raster order
TOME_ORDER = Option("order", "tome", *choice("tome", "raster"))
PROP_ATTN = Option("prop_attn", True, (bool,), accepted="True or False (proportional attention by log token size)")
SEED = Option("seed", 0, (int,), lambda v, c: 0 <= v < 2 ** 64, "an int in [0, 2**64)")


# -- inside the LLM: FastV, PyramidDrop, Attention Debiasing (layers index the decoder) ----------------------------
def _llm_layer_ok(value, ctx):
    return _index(value, ctx) and ctx.first_layer <= value % ctx.depth


def _llm_range(ctx):
    return (f"decoder layer indices in [{ctx.first_layer}, {ctx.last}] (or counted from the end, down to "
            f"{ctx.first_layer - ctx.depth}; layer 0 and the layers before {ctx.first_layer} keep every token)")


def _base_is(value, ctx, base):
    return ctx.options.get("base", base) == base


def _fastv_layer_valid(value, ctx):
    return value is None or (_base_is(value, ctx, "fastv") and _llm_layer_ok(value, ctx))


def _fastv_layer_accepted(ctx):
    if not _base_is(None, ctx, "fastv"):
        return "None only: with base='pdrop' the stages are set by layers and ratios"
    from .pruners.stages import FASTV_LAYER, scale_layer
    scaled = scale_layer(FASTV_LAYER, ctx.depth, ctx.first_layer)
    return (f"None (FastV's K = {FASTV_LAYER} of 32 layers, scaled: layer {scaled} of this model's {ctx.depth}) or "
            f"one of the {_llm_range(ctx)}")


def _stage_layers_valid(value, ctx):
    if value is None:
        return True
    if not _base_is(value, ctx, "pdrop") or not isinstance(value, (list, tuple)) or not value:
        return False
    if not all(_is_int(v) and _llm_layer_ok(v, ctx) for v in value):
        return False
    wrapped = [v % ctx.depth for v in value]
    return all(a < b for a, b in zip(wrapped, wrapped[1:]))


def _stage_layers_accepted(method, paper):
    def accepted(ctx):
        if not _base_is(None, ctx, "pdrop"):
            return "None only: with base='fastv' the stage is set by layer"
        from .pruners.stages import PAPER_DEPTH, PAPER_DEPTHS, PAPER_SCHEDULES, default_schedule
        scaled = list(default_schedule(method, ctx.depth, ctx.first_layer)[0])
        return (f"None ({paper}'s layers {list(PAPER_SCHEDULES[method][0])} of "
                f"{PAPER_DEPTHS.get(method, PAPER_DEPTH)}, scaled: {scaled} on this model) "
                f"or a non-empty list of increasing {_llm_range(ctx)}")
    return accepted


def _stage_count(ctx, method):
    from .pruners.stages import default_schedule
    layers = ctx.options.get("layers")
    return len(default_schedule(method, ctx.depth, ctx.first_layer)[0]) if layers is None else len(layers)


def _stage_ratios_valid(method):
    def valid(value, ctx):
        if value is None:
            return True
        if not _base_is(value, ctx, "pdrop") or not isinstance(value, (list, tuple)) \
                or len(value) != _stage_count(ctx, method):
            return False
        if not all(isinstance(v, float) and 0.0 < v <= 1.0 for v in value):
            return False
        return all(a >= b for a, b in zip(value, value[1:]))
    return valid


def _stage_ratios_accepted(method, defaults):
    def accepted(ctx):
        if not _base_is(None, ctx, "pdrop"):
            return "None only: with base='fastv' the budget is keep"
        return (f"None ({defaults}) or a list of {_stage_count(ctx, method)} non-increasing floats in (0, 1], one per "
                "stage: the share of the sample's visual tokens kept after it")
    return accepted


def stage_options(method, paper, ratio_defaults):
    """The `layers` and `ratios` options of a staged in-LLM method (PyramidDrop's form), its paper's defaults
    scaled to the model's depth."""
    from .pruners.stages import PAPER_DEPTH, PAPER_DEPTHS, PAPER_SCHEDULES
    layers = Option("layers", None, (type(None), list, tuple), _stage_layers_valid,
                    f"None ({paper}'s {', '.join(map(str, PAPER_SCHEDULES[method][0]))} of "
                    f"{PAPER_DEPTHS.get(method, PAPER_DEPTH)} layers, scaled) or a list of increasing decoder layer "
                    "indices >= 1", _stage_layers_accepted(method, paper))
    ratios = Option("ratios", None, (type(None), list, tuple), _stage_ratios_valid(method),
                    f"None ({ratio_defaults}) or one non-increasing float in (0, 1] per stage",
                    _stage_ratios_accepted(method, ratio_defaults))
    return layers, ratios


def _dart_layer_accepted(ctx):
    from .pruners.stages import FASTV_LAYER, scale_layer
    scaled = scale_layer(FASTV_LAYER, ctx.depth, ctx.first_layer)
    return (f"None (DART's K = {FASTV_LAYER} of 32 layers, scaled: layer {scaled} of this model's {ctx.depth}) or "
            f"one of the {_llm_range(ctx)}")


# DART: the layer whose input is pruned (pivots from the keys of the layer before), the pivots of each kind, and how
# the budget is split over them: "exact" keeps keep tokens, "reference" as DART's scripts 4 + 8 floor(keep / 8)
DART_LAYER = Option("layer", None, (type(None), int), lambda v, c: v is None or _llm_layer_ok(v, c),
                    "None (DART's K = 2 of 32 layers, scaled to the model's depth) or a decoder layer index >= 1",
                    _dart_layer_accepted)
IMAGE_PIVOTS = Option("image_pivots", 4, (int,), lambda v, c: v >= 1, "an int >= 1 (DART: 4)")
TEXT_PIVOTS = Option("text_pivots", 4, (int,), lambda v, c: v >= 0, "an int >= 0 (DART: 4)")
DART_SPLIT = Option("split", "exact", *choice("exact", "reference"))


def _schedule_valid(value, ctx):
    return value is not None


LLM_LAYER = Option("layer", None, (type(None), int), _fastv_layer_valid,
                   "None (FastV's K = 2 of 32 layers, scaled to the model's depth) or a decoder layer index >= 1",
                   _fastv_layer_accepted)
PDROP_LAYERS, PDROP_RATIOS = stage_options("pdrop", "PyramidDrop", "0.5, 0.25, 0.125 ...: lambda = 0.5 per stage")
TRANSITION_LAYERS, TRANSITION_RATIOS = stage_options(
    "transition", "TransPrune", "0.875, 0.625, 0.125 for three stages, lambda = 0.5 per stage otherwise")

SPARSEVLM_LAYERS, SPARSEVLM_RATIOS = stage_options(
    "sparsevlm", "SparseVLM", "300, 200, 110 of 576: its 192-token schedule; with keep, the schedule of that budget")
RECYCLE_TOKENS = Option("recycle", True, (bool,),
                        accepted="True (SparseVLM v1.5: part of the pruned tokens merged into recycled ones) or False")


def _transition_layers(ctx):
    """TransPrune's stage layers on the model of `ctx` (the call's, checked before, or the paper's scaled)."""
    from .pruners.stages import default_schedule
    layers = ctx.options.get("layers") or default_schedule("transition", ctx.depth, ctx.first_layer)[0]
    return [v % ctx.depth for v in layers]


def _first_transition_stage(ctx):
    return _transition_layers(ctx)[0]


def _accumulate_valid(value, ctx):
    if value is None:
        return True
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) and _index(v, ctx) for v in value):
        return False
    wrapped = [v % ctx.depth for v in value]
    if not all(a < b for a, b in zip(wrapped, wrapped[1:])):
        return False
    # TTV ranks from the first stage on: some accumulating layer must run before it (score="iga" needs none)
    return ctx.options.get("score") == "iga" or any(v < _first_transition_stage(ctx) for v in wrapped)


def _accumulate_accepted(ctx):
    from .pruners.stages import default_accumulation
    scaled = list(default_accumulation(_transition_layers(ctx)))
    return (f"None (TransPrune's layers 7..12 of 32, 1-indexed: from the layer before the first stage to the one "
            f"before the last, {scaled} here) or a list of increasing decoder layer indices in [0, {ctx.last}] (or "
            f"counted from the end) with at least one before the first stage, layer {_first_transition_stage(ctx)} "
            "(unless score='iga'); layers at or after the last stage add nothing")


def _llm_positions_valid(value, ctx):
    return value in (None, "original") or (value == "renumber" and not ctx.mrope)


# TransPrune's TTV layers, its score terms, and the positions of the kept tokens: the reference renumbers them
# (0, 1, ... over the kept sequence, shifted likewise while decoding); "original" keeps the rotary angles each token
# had, as FastV / PyramidDrop here. M-RoPE models keep them (the reference has no M-RoPE path to follow)
ACCUMULATE = Option("accumulate", None, (type(None), list, tuple), _accumulate_valid,
                    "None (TransPrune's 7..12 of 32, scaled) or a list of increasing decoder layer indices",
                    _accumulate_accepted)
TTV_SCORE = Option("score", "both", *choice("both", "ttv", "iga"))
RENUMBER = Option("positions", None, (type(None), str), _llm_positions_valid,
                  "None (renumber, as the reference, on 1-D RoPE models; original on M-RoPE ones), 'renumber' "
                  "(1-D RoPE models) or 'original'",
                  lambda c: ("None (original on this M-RoPE model) or 'original'" if c.mrope else
                             "None (renumber on this model), 'renumber' or 'original'"))
DEBIAS_BASE = Option("base", "fastv", *choice("fastv", "pdrop"))
SCHEDULE = Option("schedule", None, (type(None), str, dict, os.PathLike), _schedule_valid,
                  "a calibration file written by vlmeff.calibrate(model, data, method='debiased') (path or its "
                  "loaded dict) or the preset 'llava-1.5' (the reference's FastV polynomial for LLaVA-1.5-7B)")

# Attention Debiasing's padding suppression: tokens of square-padding patches (found in the pixel values, where the
# processor padded with its mean colour) score 0 at the first stage, and the budget shrinks to the other tokens
PADDING = Option("padding", "pixels", *choice("pixels", "off"))
PAD_THRESHOLD = Option("pad_threshold", None, (type(None), int, float),
                       lambda v, c: v is None or 0.0 <= v <= 1.0,
                       "None (the reference's 0.5 with base fastv, 0.01 with pdrop) or a share in [0, 1]: a token "
                       "whose patch is more than this share padding scores 0")


# VFlowOpt: the tower half (context threshold t, entropy term, the layer scored: `score_layers` as for received)
# and the LLM half (`layers`, `ratios` of the LLM's input), or both from a searched schedule file; the defaults are
# the reference's released 25 % setting
def _finite(value, ctx):
    return value == value and abs(value) != float("inf")


def _channels_valid(positive):
    def valid(value, ctx):
        return (isinstance(value, (list, tuple)) and len(value) == 3
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and _finite(v, ctx)
                        and (v > 0 or not positive) for v in value))
    return valid


INFOFLOW_LAYERS, INFOFLOW_RATIOS = stage_options(
    "infoflow", "VFlowOpt", "0.9833, 0.8627: the released 25 % setting's r_1 and r_1 * r_2")
THRESHOLD = Option("threshold", VFLOWOPT_25["threshold"], (int, float), lambda v, c: _finite(v, c) and v >= 0,
                   "a real >= 0: context tokens receive more than threshold x the mean attention (default: the "
                   "released 25 % setting's t = 34.76)")
ENTROPY_WEIGHT = Option("entropy_weight", 0.0, (int, float), _finite,
                        "a finite real alpha_v: the weight of the softmax of patch entropy added to the context map "
                        "(0, as in every released setting: no entropy term)")
ENTROPY = Option("entropy", "pixels", *choice("pixels", "reference"))
IMAGE_MEAN = Option("image_mean", (0.48145466, 0.4578275, 0.40821073), (list, tuple), _channels_valid(False),
                    "three per-channel means of the processor's normalisation (default CLIP's): infoflow's "
                    "entropy='pixels', debiased's padding='pixels' (its fill colour)")
IMAGE_STD = Option("image_std", (0.26862954, 0.26130258, 0.27577711), (list, tuple), _channels_valid(True),
                   "three per-channel standard deviations > 0 of the processor's normalisation (default CLIP's)")
RECYCLE = Option("recycle", None, (type(None), bool),
                 accepted="None (as the reference: on LLaVA-NeXT / OneVision's base-and-crops blocks, plain top-k "
                          "elsewhere), True or False")
GRID = Option("grid", VFLOWOPT_25["grid"], (int, float), lambda v, c: _finite(v, c) and v >= 1,
              "a real m >= 1: recycled candidates are grouped by m x m cells of the patch grid (default: the released "
              "25 % setting's m = 15.58)")
INFOFLOW_SCHEDULE = Option("schedule", None, (type(None), str, dict, os.PathLike), lambda v, c: True,
                           "None (the options as given) or a schedule written by vlmeff.calibrate(model, data, "
                           "method='infoflow', budget=...) (path or its loaded dict): keep (the tower's r_v), "
                           "threshold, entropy_weight, entropy, recycle, grid, layers and ratios come from it (keep "
                           "may repeat the budget it was searched for)")

# the selections by diversity (vlmeff.pruners.diversity): VisPruner's share of important tokens and its
# de-duplication step; CDPruner's instruction relevance (its reference reads a CLIP text tower the LVLM lacks)
IMPORTANT_RATIO = Option("important_ratio", 0.5, (int, float), lambda v, c: 0.0 <= v <= 1.0,
                         "a real in [0, 1]: the share of the budget kept by [CLS] attention, floored (VisPruner: 0.5)")
DEDUP_STEP = Option("step", 8, (int,), lambda v, c: v >= 1,
                    "an int >= 1: the most similar tokens removed per de-duplication round (VisPruner: 8)")
RELEVANCE = Option("relevance", "input_embeddings", *choice("input_embeddings", "none"))


def contextual_count(contextual, k):
    """Contextual tokens out of a budget of k (VisionZip): a count as given, a share rounded, at most k - 1 so
    one dominant token stays. A count above k - 1, possible only when keep is a ratio, is a ValueError."""
    if _is_int(contextual):
        if contextual > k - 1:
            raise ValueError(f"contextual={contextual} needs a budget of at least {contextual + 1} tokens, but keep "
                             f"gives {k} for this image; accepted: a count <= keep - 1 or a float share in [0, 1)")
        return contextual
    return min(k - 1, round(contextual * k))


@dataclass(frozen=True)
class MethodInfo:
    """name; description (one line); paper; acts_in: where it can act ("vision encoder", "before LLM");
    model_kinds: on which model kinds ("vit", "lvlm"); options: option name -> `Option` (`.default`,
    `.accepted_text()`), in the order they are checked; needs_cls: the scorer reads the [CLS] token."""

    name: str
    description: str
    paper: str
    acts_in: tuple
    model_kinds: tuple
    options: dict = field(default_factory=dict)
    needs_cls: bool = False
    # a method whose stages act at several sites (VFlowOpt: before and inside the LLM): site -> its options' names
    spans: Optional[dict] = None

    @property
    def defaults(self):
        """option name -> default value"""
        return {name: option.default for name, option in self.options.items()}


_METHODS = {}


def register(name, description, paper, acts_in, model_kinds, options=(), needs_cls=False, spans=None):
    """Add a method; `options`: its `Option`s, in checking order (`layer` before `score_layers`, which reads it)."""
    info = MethodInfo(name, description, paper, acts_in, model_kinds, {o.name: o for o in options}, needs_cls,
                      spans)
    _METHODS[name] = info
    return info


register("cls", "Keep the patches the [CLS] token attends to most (FasterVLM; VTC-CLS with score_layers)",
         "FasterVLM arXiv 2412.01818; VTC-CLS arXiv 2412.05819", ("vision encoder", "before LLM"), ("vit", "lvlm"),
         (LAYER, SCORE_LAYERS, REDUCE, POSITIONS), needs_cls=True)
register("visionzip", "Keep dominant patches by [CLS] attention and fold the rest into contextual tokens (VisionZip)",
         "VisionZip arXiv 2412.04467", ("before LLM",), ("lvlm",),
         (CONTEXTUAL, CLS_TOKEN, VISIONZIP_ORDER, LAYER, SCORE_LAYERS, POSITIONS), needs_cls=True)
register("received", "Keep the patches that receive the most attention, mean over all queries (towers without [CLS])",
         "attention-received scoring as in VFlowOpt's context map / Zero-TPrune's first step, simplified",
         ("vision encoder", "before LLM"), ("vit", "lvlm"), (LAYER, SCORE_LAYERS, REDUCE, POSITIONS))
register("tome", "Merge the r most similar token pairs in every layer by bipartite soft matching",
         "ToMe: Token Merging, Bolya et al., ICLR 2023", ("vision encoder",), ("vit",), (TOME_R, PROP_ATTN, TOME_ORDER))
register("random", "Keep a uniformly random subset of patches (baseline)", "baseline", ("vision encoder", "before LLM"),
         ("vit", "lvlm"), (LAYER, REDUCE, SEED, POSITIONS))
register("pool", "Average-pool the patch grid down to the budget (baseline)", "baseline",
         ("vision encoder", "before LLM"), ("vit", "lvlm"), (LAYER, POSITIONS))
register("divprune", "Keep the most diverse visual tokens: greedy max-min cosine distance over the projected "
         "features, before the LLM (DivPrune)", "DivPrune arXiv 2503.02175", ("before LLM",), ("lvlm",), (POSITIONS,))
register("cdpruner", "Keep the visual tokens of largest conditional diversity: greedy MAP of a DPP whose kernel weighs "
         "feature similarity by relevance to the prompt (CDPruner)", "CDPruner arXiv 2506.10967", ("before LLM",),
         ("lvlm",), (RELEVANCE, POSITIONS))
register("vispruner", "Keep the patches [CLS] attends to most plus diverse ones from de-duplicating the rest "
         "(VisPruner)", "VisPruner arXiv 2412.01818", ("before LLM",), ("lvlm",),
         (IMPORTANT_RATIO, DEDUP_STEP, LAYER, SCORE_LAYERS, POSITIONS), needs_cls=True)
register("fastv", "Drop the visual tokens the last prompt token attends to least at decoder layer K - 1, from "
         "layer K on (FastV)", "FastV arXiv 2403.06764", ("inside LLM",), ("lvlm",), (LLM_LAYER,))
register("pdrop", "Drop visual tokens in stages inside the LLM, ranked by the last instruction token's attention "
         "(PyramidDrop)", "PyramidDrop arXiv 2410.17247", ("inside LLM",), ("lvlm",), (PDROP_LAYERS, PDROP_RATIOS))
register("debiased", "FastV or PyramidDrop with the positional (recency) trend removed from their scores "
         "(Attention Debiasing)", "Attention Debiasing arXiv 2508.17807", ("inside LLM",), ("lvlm",),
         (DEBIAS_BASE, LLM_LAYER, PDROP_LAYERS, PDROP_RATIOS, SCHEDULE, PADDING, PAD_THRESHOLD, IMAGE_MEAN,
          IMAGE_STD))
register("transition", "Drop visual tokens in stages inside the LLM, ranked by how much the layers transform them "
         "(token transition variation) plus the instruction's attention (TransPrune)", "TransPrune arXiv 2507.20630",
         ("inside LLM",), ("lvlm",), (TRANSITION_LAYERS, TRANSITION_RATIOS, TTV_SCORE, ACCUMULATE, RENUMBER))


register("dart", "Keep the visual tokens least similar to a few pivot tokens (largest key norms) at decoder layer K, "
         "inside the LLM (DART)", "DART arXiv 2502.11494", ("inside LLM",), ("lvlm",),
         (DART_LAYER, IMAGE_PIVOTS, TEXT_PIVOTS, DART_SPLIT))


register("sparsevlm", "Drop visual tokens in three stages inside the LLM, ranked by the attention of text raters "
         "chosen by relevance to the image, recycling part of the pruned ones into merged tokens (SparseVLM)",
         "SparseVLM arXiv 2410.04417", ("inside LLM",), ("lvlm",),
         (SPARSEVLM_LAYERS, SPARSEVLM_RATIOS, RECYCLE_TOKENS, RENUMBER))


register("infoflow", "Prune visual tokens after the tower by the attention of its context tokens (+ patch entropy), "
         "then again inside the LLM with the same scores; searched settings from vlmeff.calibrate (VFlowOpt)",
         "VFlowOpt arXiv 2508.05211", ("before LLM", "inside LLM"), ("lvlm",),
         (INFOFLOW_SCHEDULE, THRESHOLD, ENTROPY_WEIGHT, ENTROPY, IMAGE_MEAN, IMAGE_STD, RECYCLE, GRID, LAYER,
          SCORE_LAYERS, POSITIONS, INFOFLOW_LAYERS, INFOFLOW_RATIOS),
         spans={"before LLM": ("schedule", "threshold", "entropy_weight", "entropy", "image_mean", "image_std",
                               "recycle", "grid", "layer", "score_layers", "positions"),
                "inside LLM": ("layers", "ratios")})


def part_of(info, site):
    """The record of a method that spans sites (`MethodInfo.spans`) restricted to the options of one site."""
    return replace(info, options={name: info.options[name] for name in info.spans[site]})


def methods():
    """All method records, sorted by name."""
    return [_METHODS[name] for name in sorted(_METHODS)]


def method_info(name):
    """The record of one method; TypeError for a non-string, ValueError naming the known methods otherwise."""
    available = ", ".join(sorted(_METHODS))
    if not isinstance(name, str):
        raise TypeError(f"method must be a str, one of {available} (or a list of (method, options) pairs); got "
                        f"{name!r}")
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {available}{_did_you_mean(name, _METHODS)}")
    return _METHODS[name]


def check_option_names(info, options):
    """TypeError on an unknown option, listing the valid ones (and the budget `keep`) with the closest name."""
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        valid = sorted([*info.options, "keep"])
        given = ", ".join(f"{name}={options[name]!r}" for name in unknown)
        raise TypeError(f"method {info.name!r} got unknown option(s) {given}; valid: {', '.join(valid)}"
                        f"{_did_you_mean(unknown[0], valid)}")


def resolve_options(info, options, ctx):
    """The method's defaults updated with `options`, each value checked against its `Option` on the model
    described by `ctx` (a `ModelContext`), in declaration order. Numbers come back plain (int / float)."""
    check_option_names(info, options)
    resolved = {}
    for name, option in info.options.items():
        value = options.get(name, option.default)
        resolved[name] = option.check(value, replace(ctx, options=dict(resolved)), info.name)
    return resolved


def _did_you_mean(name, candidates):
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
