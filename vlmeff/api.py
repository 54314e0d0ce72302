"""`vlmeff.patch`: one line to make a loaded model cheaper, one line (`.unpatch()`) to undo it."""
from .engine.lvlm import PreLLMReduction
from .engine.vit import ViTReduction
from .errors import UnsupportedModelError
from .models import find_adapter
from .patching import Patch
from .pruners.select import check_keep
from .registry import method_info, methods, resolve_options


def patch(model, method="cls", keep=None, **options):
    """Patch `model` (this instance only) with a token-reduction method.

    keep: visual tokens kept per image, an int count or a float ratio in (0, 1]. options: the method's options
    (`vlmeff.method_info(method).options`). Returns a `Patch` (context manager, `.unpatch()`, `.config`, `.stats`).
    Raises ValueError (unknown method, budget out of range, a [CLS] method on a model without [CLS]),
    TypeError (unknown option) or UnsupportedModelError (unsupported model).
    """
    info = method_info(method)
    options = resolve_options(info, options)
    if keep is not None:
        check_keep(keep)
    adapter = find_adapter(model)
    if adapter.kind not in info.model_kinds:
        usable = [m.name for m in methods() if adapter.kind in m.model_kinds]
        raise ValueError(f"method {method!r} does not act on {adapter.family}; methods that do: {', '.join(usable)}")
    if info.needs_cls and not adapter.has_cls:
        usable = [m.name for m in methods() if not m.needs_cls and adapter.kind in m.model_kinds]
        raise ValueError(f"method {method!r} reads the [CLS] token, which {adapter.family} does not have; "
                         f"methods that work on it: {', '.join(usable)}")
    engine = ViTReduction if adapter.kind == "vit" else PreLLMReduction
    reduction = engine(None, adapter, method, keep, options)
    handle = Patch(model, {"method": method, "keep": keep, **options})
    reduction.patch = handle
    try:
        reduction.install()
    except Exception:
        handle.unpatch()
        raise
    return handle


__all__ = ["Patch", "UnsupportedModelError", "method_info", "methods", "patch"]
