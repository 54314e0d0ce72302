"""The method registry: one record per method, and validation of a method's options."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class MethodInfo:
    """name; description (one line); paper; acts_in: where it can act ("vision encoder", "before LLM");
    model_kinds: on which model kinds ("vit", "lvlm"); options: option -> default; needs_cls: the scorer reads
    the [CLS] token."""

    name: str
    description: str
    paper: str
    acts_in: tuple
    model_kinds: tuple
    options: dict = field(default_factory=dict)
    needs_cls: bool = False


_METHODS = {}


def register(info):
    _METHODS[info.name] = info
    return info


register(MethodInfo(
    "cls", "Keep the patches the [CLS] token attends to most (FasterVLM; VTC-CLS with score_layers)",
    "FasterVLM arXiv 2412.01818; VTC-CLS arXiv 2412.05819", ("vision encoder", "before LLM"), ("vit", "lvlm"),
    {"layer": None, "score_layers": None, "reduce": "drop", "positions": None}, needs_cls=True))
register(MethodInfo(
    "visionzip", "Keep dominant patches by [CLS] attention and fold the rest into contextual tokens (VisionZip)",
    "VisionZip arXiv 2412.04467", ("before LLM",), ("lvlm",),
    {"contextual": 10 / 64, "score_layers": None, "layer": None, "positions": None}, needs_cls=True))
register(MethodInfo(
    "received", "Keep the patches that receive the most attention, mean over all queries (towers without [CLS])",
    "attention-received scoring as in VFlowOpt's context map / Zero-TPrune's first step, simplified",
    ("vision encoder", "before LLM"), ("vit", "lvlm"),
    {"layer": None, "score_layers": None, "reduce": "drop", "positions": None}))
register(MethodInfo(
    "tome", "Merge the r most similar token pairs in every layer by bipartite soft matching",
    "ToMe: Token Merging, Bolya et al., ICLR 2023", ("vision encoder",), ("vit",),
    {"r": None, "prop_attn": True, "order": "tome"}))
register(MethodInfo(
    "random", "Keep a uniformly random subset of patches (baseline)", "baseline", ("vision encoder", "before LLM"),
    ("vit", "lvlm"), {"layer": None, "reduce": "drop", "seed": 0, "positions": None}))
register(MethodInfo(
    "pool", "Average-pool the patch grid down to the budget (baseline)", "baseline", ("vision encoder", "before LLM"),
    ("vit", "lvlm"), {"layer": None, "positions": None}))

REDUCE_MODES = ("drop", "merge")


def methods():
    """All method records, sorted by name."""
    return [_METHODS[name] for name in sorted(_METHODS)]


def method_info(name):
    """The record of one method; ValueError naming the known methods otherwise."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def resolve_options(info, options):
    """The method's defaults updated with `options`; TypeError listing the valid options on an unknown one."""
    unknown = sorted(set(options) - set(info.options))
    if unknown:
        valid = ", ".join(sorted(info.options)) or "none"
        raise TypeError(f"method {info.name!r} got unknown option(s) {', '.join(unknown)}; valid options: {valid}")
    resolved = {**info.options, **options}
    if "reduce" in resolved and resolved["reduce"] not in REDUCE_MODES:
        raise ValueError(f"reduce={resolved['reduce']!r}; accepted: {', '.join(REDUCE_MODES)}")
    return resolved
