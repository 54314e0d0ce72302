"""`vlmeff.patch`: one line to make a loaded model cheaper, one line (`.unpatch()`) to undo it."""
from .engine.lvlm import PreLLMReduction
from .engine.vit import ViTReduction, default_layer
from .errors import UnsupportedModelError
from .models import find_adapter
from .patching import Patch
from .pruners.select import check_keep
from .registry import ModelContext, method_info, methods, resolve_options

# (model kind, where the method acts) -> the engine that installs it, built as engine(patch, adapter, method, keep,
# options) and installed by engine.install(); a method acts at the first of its `acts_in` sites listed here
ENGINES = {
    ("vit", "vision encoder"): ViTReduction,
    ("lvlm", "before LLM"): PreLLMReduction,
}


def patch(model, method="cls", keep=None, **options):
    """Patch `model` (this instance only) with a token-reduction method.

    keep: visual tokens kept per image, an int count or a float ratio in (0, 1]. options: the method's options
    (`vlmeff.method_info(method).options`: each with its default and what it accepts), all checked here against
    the model. Returns a `Patch` (context manager, `.unpatch()`, `.config`, `.stats`).
    Raises TypeError (method not a str, unknown option, option or keep of the wrong type), ValueError (unknown
    method, budget or option out of range, a [CLS] method on a model without [CLS]), RuntimeError (a model
    already compiled or patched) or UnsupportedModelError (unsupported model). On an error the model is unchanged.
    """
    info = method_info(method)
    if keep is not None:
        check_keep(keep)
    refuse_compiled(model)
    adapter = find_adapter(model)
    refuse_compiled_layers(model, adapter)
    site = site_of(info, adapter.kind)
    if site is None:
        usable = [m.name for m in methods() if site_of(m, adapter.kind)]
        raise ValueError(f"method {method!r} does not act on {adapter.family}; methods that do: {', '.join(usable)}")
    if info.needs_cls and not adapter.has_cls:
        usable = [m.name for m in methods() if not m.needs_cls and site_of(m, adapter.kind)]
        raise ValueError(f"method {method!r} reads the [CLS] token, which {adapter.family} does not have; "
                         f"methods that work on it: {', '.join(usable)}")
    options = resolve_options(info, options, model_context(adapter, keep))
    handle = Patch(model, {"method": method, "keep": keep, **options})
    try:
        ENGINES[adapter.kind, site](handle, adapter, method, keep, options).install()
    except BaseException:
        handle.unpatch()
        raise
    return handle


def site_of(info, kind):
    """Where the method of `info` acts on a model of `kind`: the first of its `acts_in` sites that has an engine
    for that kind, or None."""
    return next((s for s in info.acts_in if (kind, s) in ENGINES), None)


def model_context(adapter, keep):
    """The `ModelContext` that option ranges are checked in: the layers `layer` / `score_layers` index (a ViT's
    own, an LVLM's vision tower) and the layer reduced after by default."""
    if adapter.kind == "vit":
        depth = len(adapter.layers)
        return ModelContext("vit", adapter.family, depth, default_layer(depth), keep=keep)
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


def refuse_compiled_layers(model, adapter):
    """RuntimeError if a module that contains or lies inside the layers the patch hooks is compiled (e.g. a
    compiled vision tower or block); a compiled module elsewhere (an LVLM's language model) is fine."""
    layers = adapter.layers if adapter.kind == "vit" else adapter.tower.layers
    names = {id(m): name for name, m in model.named_modules(remove_duplicate=False)}
    hooked = [names[id(layer)] for layer in layers if id(layer) in names]
    for name, module in model.named_modules():
        if _compiled(module) and any(_encloses(name, h) or _encloses(h, name) for h in hooked):
            raise _compiled_error(f"{name} ({type(module).__name__}) of this {type(model).__name__}")


def _encloses(outer, inner):
    """Module path `outer` is `inner` or one of its ancestors ("" is the root)."""
    return outer == "" or inner == outer or inner.startswith(outer + ".")


__all__ = ["ENGINES", "Patch", "UnsupportedModelError", "method_info", "methods", "patch"]
