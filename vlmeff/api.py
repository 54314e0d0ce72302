"""`vlmeff.patch`: one line to make a loaded model cheaper, one line (`.unpatch()`) to undo it."""
from .calibration import infoflow_settings
from .engine.llm import STAGED, InLLMReduction, first_prunable_layer, resolved_stages
from .engine.lvlm import PreLLMReduction
from .engine.vit import ViTReduction, default_layer
from .errors import UnsupportedModelError
from .models import find_adapter
from .patching import Patch
from .pruners.select import check_keep
from .registry import ModelContext, check_option_names, method_info, methods, part_of, resolve_options

# (model kind, where the method acts) -> the engine that installs it, built as engine(patch, adapter, method, keep,
# options) and installed by engine.install(); a method acts at the first of its `acts_in` sites listed here
ENGINES = {
    ("vit", "vision encoder"): ViTReduction,
    ("lvlm", "before LLM"): PreLLMReduction,
    ("lvlm", "inside LLM"): InLLMReduction,
}
SITES = ("vision encoder", "before LLM", "inside LLM")     # in the order a forward reaches them


def patch(model, method="cls", keep=None, **options):
    """Patch `model` (this instance only) with a token-reduction method, or with several acting at different sites.

    keep: visual tokens kept per image (per sample for methods inside the LLM), an int count or a float ratio in
    (0, 1]. options: the method's options (`vlmeff.method_info(method).options`: each with its default and what it
    accepts), all checked here against the model. Several methods stack as a list of (method, options) pairs, the
    budget among the options, one per site, e.g. `vlmeff.patch(model, [("cls", {"keep": 192}), ("fastv",
    {"keep": 0.5})])`: cls keeps 192 tokens per image before the LLM, FastV half of what reaches it, from its layer K.
    Returns a `Patch` (context manager, `.unpatch()` removing every stage, `.config`, `.stats`).
    Raises TypeError (method not a str, unknown option, option or keep of the wrong type), ValueError (unknown
    method, budget or option out of range, a [CLS] method on a model without [CLS], two methods at one site),
    RuntimeError (a model already compiled or patched) or UnsupportedModelError (unsupported model). On an error the
    model is unchanged.
    """
    if isinstance(method, (list, tuple)):
        if keep is not None or options:
            raise TypeError("with a list of methods, give each its keep and options in its (method, options) pair: "
                            "vlmeff.patch(model, [(\"cls\", {\"keep\": 192}), (\"fastv\", {\"keep\": 0.5})])")
        return _patch_stages(model, method)
    refuse_compiled(model)
    adapter = find_adapter(model)
    stages = _checked_stages(model, adapter, method, keep, options)
    handle = Patch(model, stages[0].config if len(stages) == 1 else _spanning_config(method, stages))
    _install(handle, adapter, stages)
    return handle


class _Stage:
    """One checked method of a patch: where it acts and its resolved options."""

    def __init__(self, method, site, keep, options):
        self.method, self.site, self.keep, self.options = method, site, keep, options
        self.config = {"method": method, "keep": keep, **options}


def _checked_stages(model, adapter, method, keep, options):
    """The checked stages of one method: one, or one per site for a method that spans sites (VFlowOpt: its tower
    half gets the budget keep, its LLM half the stage layers and ratios; a schedule file fills both)."""
    info = method_info(method)
    if info.spans is None:
        return [_checked_stage(model, adapter, method, keep, options)]
    check_option_names(info, options)
    if adapter.kind != "lvlm":
        raise ValueError(f"method {method!r} acts on LVLMs (before and inside the LLM), not on {adapter.family}")
    keep, options = infoflow_settings(model, keep, options)
    return [_checked_stage(model, adapter, method, stage_keep,
                           {name: options[name] for name in info.spans[site] if name in options},
                           part_of(info, site), site)
            for site, stage_keep in (("before LLM", keep), ("inside LLM", None))]


def _spanning_config(method, stages):
    """`Patch.config` of a method acting at several sites: its budget and every stage's options in one dict."""
    config = {"method": method, "keep": stages[0].keep}
    for stage in stages:
        config.update(stage.options)
    return config


def _checked_stage(model, adapter, method, keep, options, info=None, site=None):
    info = info or method_info(method)
    if keep is not None:
        check_keep(keep)
    site = site or site_of(info, adapter.kind)
    if site is None:
        usable = [m.name for m in methods() if site_of(m, adapter.kind)]
        raise ValueError(f"method {method!r} does not act on {adapter.family}; methods that do: {', '.join(usable)}")
    refuse_compiled_layers(model, adapter, site)
    if info.needs_cls and not adapter.has_cls:
        usable = [m.name for m in methods() if not m.needs_cls and site_of(m, adapter.kind)]
        raise ValueError(f"method {method!r} reads the [CLS] token, which {adapter.family} does not have; "
                         f"methods that work on it: {', '.join(usable)}")
    options = resolve_options(info, options, model_context(adapter, keep, site))
    if site == "inside LLM" and method in STAGED:
        options = resolved_stages(model, adapter, method, keep, options)
    return _Stage(method, site, keep, options)


def _patch_stages(model, entries):
    """A patch of several methods, each (method, options) or a method name, at most one per site."""
    refuse_compiled(model)
    adapter = find_adapter(model)
    stages = []
    for entry in entries:
        name, options = (entry, {}) if isinstance(entry, str) else _pair(entry)
        options = dict(options)
        stages.extend(_checked_stages(model, adapter, name, options.pop("keep", None), options))
    sites = [s.site for s in stages]
    if not stages or len(set(sites)) != len(sites):
        raise ValueError(f"a list of methods needs one method per site (vision encoder, before LLM, inside LLM); got "
                         f"{', '.join(f'{s.method} ({s.site})' for s in stages) or 'none'}")
    if adapter.pixel_patch_rows and "before LLM" in sites and any(
            s.method == "debiased" and s.options["padding"] == "pixels" for s in stages):
        raise ValueError("debiased padding='pixels' finds padding tokens in the images' patches, which a method "
                         "before the LLM has already reduced; pass padding='off' to stack debiased behind it")
    config = {"method": "+".join(dict.fromkeys(s.method for s in stages)), "keep": None,
              "stages": [s.config for s in stages]}
    handle = Patch(model, config)
    _install(handle, adapter, stages)
    return handle


def _pair(entry):
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[1], dict)):
        raise TypeError(f"each entry of a list of methods is a method name or a (method, options dict) pair; got "
                        f"{entry!r}")
    return entry


def _install(handle, adapter, stages):
    """Install the stages' engines, the deepest site first, so that an earlier site's wrapper encloses a later
    one's (the pre-LLM wrapper hands the reduced prompt to the in-LLM one). Undone entirely on any error."""
    try:
        for stage in sorted(stages, key=lambda s: -SITES.index(s.site)):
            ENGINES[adapter.kind, stage.site](handle, adapter, stage.method, stage.keep, stage.options).install()
    except BaseException:
        handle.unpatch()
        raise


def site_of(info, kind):
    """Where the method of `info` acts on a model of `kind`: the first of its `acts_in` sites that has an engine
    for that kind, or None."""
    return next((s for s in info.acts_in if (kind, s) in ENGINES), None)


def model_context(adapter, keep, site="before LLM"):
    """The `ModelContext` that option ranges are checked in: the layers `layer` / `score_layers` index (a ViT's
    own, an LVLM's vision tower, or its decoder for methods inside the LLM) and the layer reduced after by default."""
    if adapter.kind == "vit":
        depth = len(adapter.layers)
        return ModelContext("vit", adapter.family, depth, default_layer(depth), keep=keep)
    if site == "inside LLM":
        depth = adapter.decoder.depth
        return ModelContext(adapter.kind, adapter.family, depth, 0, adapter.mrope, keep,
                            first_layer=first_prunable_layer(adapter))
    depth = len(adapter.tower.layers)
    return ModelContext(adapter.kind, adapter.family, depth, adapter.score_layer % depth, adapter.mrope, keep)


def _compiled(module):
    """torch.compile(module) (an OptimizedModule) or module.compile() (compiled in place)."""
    optimized = type(module).__name__ == "OptimizedModule" and hasattr(module, "_orig_mod")
    return optimized or getattr(module, "_compiled_call_impl", None) is not None


def _compiled_error(what):
    return RuntimeError(
        f"{what} is already compiled: torch.compile's code does not see the hooks vlmeff adds later (dynamo does "
        "not guard on module hooks), so it would keep running unpatched. Patch first, then compile: "
        "patch = vlmeff.patch(model, ...); model = torch.compile(model)")


def refuse_compiled(model):
    """RuntimeError if `model` itself is compiled (checked before the adapter, which does not know OptimizedModule)."""
    if _compiled(model):
        inner = getattr(model, "_orig_mod", model)
        raise _compiled_error(f"this {type(inner).__name__}")


def refuse_compiled_layers(model, adapter, site):
    """RuntimeError if a module that contains or lies inside the layers the patch hooks is compiled (e.g. a
    compiled vision tower or block); a compiled module elsewhere (an LVLM's language model for a method before the
    LLM) is fine."""
    if adapter.kind == "vit":
        layers = adapter.layers
    else:
        layers = adapter.decoder.layers if site == "inside LLM" else adapter.tower.layers
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    hooked = [names[id(layer)] for layer in layers if id(layer) in names]
    for name, module in model.named_modules():
        if _compiled(module) and any(_encloses(name, h) or _encloses(h, name) for h in hooked):
            raise _compiled_error(f"{name} ({type(module).__name__}) of this {type(model).__name__}")


def _encloses(outer, inner):
    """Module path `outer` is `inner` or one of its ancestors ("" is the root)."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


__all__ = ["ENGINES", "Patch", "UnsupportedModelError", "method_info", "methods", "patch"]
