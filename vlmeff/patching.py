"""`Patch`: the handle returned by `vlmeff.patch`; owns every hook and instance-level override it installed."""
import contextlib

_MISSING = object()


class Patch:
    """A patch applied to one model instance.

    `config`: method, keep and resolved options. `stats`: those of the last call only (emptied when a call
    starts, see `new_call`): `visual_tokens` maps each stage ("input", "after layer i", ...) to the visual-token
    count per image, `flops` / `flops_unpatched` the estimated FLOPs of the patched layers with and without the
    patch. `unpatch()` (or leaving a `with` block)
    removes everything, restoring the model's original, bit-identical outputs.

    `track_merges = True` (for inspection, e.g. the demo; off by default) adds `stats["groups"]`: per image, the
    output token each input patch went into (-1: dropped), from the reduction run once more on an identity block
    (merged tokens are positive combinations of their members), and for LVLMs `stats["views"]`: per image, its grids
    [((h, w), feature rows)] (LLaVA-NeXT: base view, then the crops). Methods inside the LLM keep or drop: they
    record `llm_kept` instead.
    """

    ATTR = "_vlmeff_patch"

    def __init__(self, model, config):
        existing = getattr(model, self.ATTR, None)
        if existing is not None:
            raise RuntimeError(f"{type(model).__name__} is already patched with method {existing.config['method']!r}; "
                               "call .unpatch() on that patch first")
        self.model = model
        self.config = config
        self.stats = {}
        # what a pre-LLM stage hands to an in-LLM one of the same call (VFlowOpt's tower scores, [B, L] over the
        # prompt the LLM gets, 0 off the image placeholders), None outside a call with images
        self.visual_scores = None
        self.track_merges = False
        self._handles = []
        self._overridden = []          # (object, name, the value it had on the instance or _MISSING)
        self._depth = 0                # nesting of `calling` blocks
        setattr(model, self.ATTR, self)

    def new_call(self):
        """Engines call this when a patched call starts, so that `stats` never describes an earlier call (a call
        that raises leaves them empty; what a completed call records is the engine's: see its docstring)."""
        self.stats = {}
        self.visual_scores = None

    @contextlib.contextmanager
    def calling(self):
        """A block around a patched call of the caller: the outermost one starts a new call (`new_call`), nested
        ones (an engine's wrapper inside another's, the forwards generate makes) do not."""
        if self._depth == 0:
            self.new_call()
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:          # nothing of this call reaches a later, direct call of a submodule
                self.visual_scores = None

    def hook(self, handle):
        self._handles.append(handle)

    def override(self, obj, name, fn):
        """Set `obj.<name>` (a method such as forward or generate) on this instance only; the class is untouched.
        This patch may override a name it overrode already (the engines of one patch stack, the later wrapping the
        earlier); a name some other code set on the instance is an error."""
        ours = any(o is obj and n == name for o, n, _ in self._overridden)
        if name in vars(obj) and not ours:
            raise RuntimeError(f"{type(obj).__name__}.{name} is already overridden on this instance by other code")
        self._overridden.append((obj, name, vars(obj).get(name, _MISSING)))
        setattr(obj, name, fn)

    @property
    def active(self):
        return getattr(self.model, self.ATTR, None) is self

    def unpatch(self):
        if not self.active:
            return
        for handle in self._handles:
            handle.remove()
        for obj, name, previous in reversed(self._overridden):
            if previous is _MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, previous)
        self._handles.clear()
        self._overridden.clear()
        delattr(self.model, self.ATTR)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unpatch()

    def __repr__(self):
        options = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"Patch({type(self.model).__name__}, {options}{'' if self.active else ', removed'})"
