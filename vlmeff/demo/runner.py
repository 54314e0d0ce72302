"""The demo's model: loaded once, then each request runs it unpruned and pruned (`DemoModel.ask`).

Concurrent requests share the model but never a patch: `ask` patches, runs and unpatches under one lock, so a
request sees only its own method and budget, and the model is unpatched between requests."""
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import vlmeff
from vlmeff.api import site_of
from vlmeff.errors import UnsupportedModelError
from vlmeff.registry import methods

from .core import DemoInputError, Run, check_budget, check_question, comparison, grid_of, kept_mask, \
    merge_overlay, merged_patches, open_image, overlay

MAX_NEW_TOKENS = 8
TOP = 5                                  # ViT: predictions shown
# options a method cannot run without, filled for the demo: the reference's preset where the method has one
REQUIRED = {"debiased": {"schedule": "llava-1.5"}}


@dataclass
class Result:
    """What the page shows for one request."""

    table: list                          # comparison rows (what, unpruned, pruned)
    overlays: list = field(default_factory=list)   # (PIL image, caption) per stage
    note: str = ""                       # e.g. why no overlay is drawn


class TimmPreprocess:
    """A timm model's own eval transform: PIL images -> [B, 3, H, W]; `classes` its label names (ImageNet's for a
    1,000-class head without names of its own)."""

    def __init__(self, model):
        import timm.data
        config = timm.data.resolve_data_config({}, model=model)
        config["input_size"] = (3, *model.patch_embed.img_size)    # the size it was built for, not its cfg's
        self.transform = timm.data.create_transform(**config)
        names = model.pretrained_cfg.get("label_names")
        if names is None and model.num_classes == 1000:
            names = timm.data.ImageNetInfo().label_descriptions()
        self.classes = list(names) if names is not None else [f"class {k}" for k in range(model.num_classes)]

    def __call__(self, images):
        return torch.stack([self.transform(image) for image in images])


def load(name_or_path: str):
    """(model, processor, kind) of an embedded model name (`vlmeff.zoo`), a timm hub name ("timm/vit_..."), or a
    transformers LVLM by local folder or hub name (`AutoModelForImageTextToText` + `AutoProcessor`)."""
    if name_or_path in vlmeff.zoo.names():
        model, processor = vlmeff.zoo.load(name_or_path)
        return model, processor, "vit" if name_or_path == "tiny-vit-evqa" else "lvlm"
    if name_or_path.startswith("timm/"):
        import timm
        model = timm.create_model("hf-hub:" + name_or_path, pretrained=True).eval()
        return model, TimmPreprocess(model), "vit"
    import transformers
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    if not (hasattr(config, "vision_config") and hasattr(config, "text_config")):
        raise UnsupportedModelError(f"{name_or_path!r} is a {type(config).__name__}: the demo takes a vision-language "
                                    "model (transformers) or a timm ViT ('timm/<name>')")
    model = transformers.AutoModelForImageTextToText.from_pretrained(name_or_path).eval()
    return model, transformers.AutoProcessor.from_pretrained(name_or_path), "lvlm"


class DemoModel:
    """One loaded model and what the demo does with it. kind: "lvlm" (answers a question) or "vit" (classifies)."""

    def __init__(self, model, processor, kind: str, name: str = ""):
        self.model, self.processor, self.kind, self.name = model, processor, kind, name
        self.lock = threading.Lock()
        self.methods = [m.name for m in methods() if site_of(m, kind) and self._patches(m.name)]
        if not self.methods:
            raise UnsupportedModelError(f"no vlmeff method applies to {type(model).__name__} ({name or 'this model'})")

    @classmethod
    def load(cls, name_or_path: str):
        return cls(*load(name_or_path), name=name_or_path)

    def _patches(self, method):
        """Whether the method applies to this model at a middle budget (some need [CLS], or an LM deep enough)."""
        try:
            vlmeff.patch(self.model, method, keep=0.75, **REQUIRED.get(method, {})).unpatch()
            return True
        except (ValueError, TypeError, UnsupportedModelError):
            return False

    # -- one request ------------------------------------------------------------------------------------------
    def ask(self, image, question, method: str, keep) -> Result:
        """Runs the request unpruned and pruned; DemoInputError (its message for the page) for a bad input."""
        image = open_image(image)
        if self.kind == "lvlm":
            question = check_question(question)
        if method not in self.methods:
            raise DemoInputError(f"method {method!r} is not available on this model; available: "
                                 f"{', '.join(self.methods)}")
        inputs = self._inputs(image, question)
        with self.lock, torch.no_grad():
            base_out, base_seconds = self._timed(inputs)
            try:
                patch = vlmeff.patch(self.model, method, keep=check_budget(keep, self._tokens(inputs)),
                                     **REQUIRED.get(method, {}))
            except (ValueError, TypeError) as error:      # the registry's message names the option and the range
                raise DemoInputError(str(error)) from None
            with patch:
                patch.track_merges = True          # stats["groups"]: where each patch went (a merge overlay)
                out, seconds = self._timed(inputs)
                stats = dict(patch.stats)
        flops = stats.get("prefill_flops_unpatched", stats.get("flops_unpatched", 0))
        tokens = {k: v[0] for k, v in stats["visual_tokens"].items()}
        base = Run(self._answer(base_out, inputs), {"input": next(iter(tokens.values()))}, flops, base_seconds)
        pruned = Run(self._answer(out, inputs), tokens, stats.get("prefill_flops", stats.get("flops", 0)), seconds)
        overlays, note = self._overlays(image, stats)
        return Result(comparison(base, pruned), overlays, note)

    def _inputs(self, image, question):
        if self.kind == "vit":                  # the zoo's ViTPreprocess or TimmPreprocess
            return {"x": self.processor([image])}
        messages = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return dict(self.processor(images=[image], text=text, return_tensors="pt"))

    def _timed(self, inputs):
        start = time.perf_counter()
        if self.kind == "vit":
            out = self.model(inputs["x"])
        else:
            out = self.model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        return out, time.perf_counter() - start

    def _tokens(self, inputs):
        """The visual tokens of the request's image at the model's input (the budget's range)."""
        if self.kind == "vit":
            return int(np.prod(self.model.patch_embed.grid_size))
        image_token = self.model.config.image_token_id
        return int((inputs["input_ids"][0] == image_token).sum())

    def _answer(self, out, inputs):
        if self.kind == "vit":
            probs = out.float().softmax(-1)[0]
            top = probs.topk(min(TOP, probs.numel()))
            return ", ".join(f"{self._label(int(i))} {float(p):.0%}" for p, i in zip(top.values, top.indices))
        new = out[:, inputs["input_ids"].shape[1]:]
        return self.processor.batch_decode(new, skip_special_tokens=True)[0].strip()

    def _label(self, index):
        return self.processor.classes[index]

    # -- which patches were kept ----------------------------------------------------------------------------------
    def _overlays(self, image, stats):
        """[(overlay, caption)] per stage, and a note where none can be drawn."""
        if "llm_scores" in stats:
            return self._llm_overlays(image, stats)
        groups = stats.get("groups")
        if groups is None:
            return [], "this method records no kept or merged patches: no overlay"
        groups = groups[0].cpu().numpy()
        stages = list(stats["visual_tokens"])
        stage = stages[-1] if len(stages) == 2 else "after " + stages[-1]
        # the image's views (LLaVA-NeXT: base view and crops); a ViT or a single-grid image: one square grid
        try:
            views = stats["views"][0] if "views" in stats else [(grid_of(groups.shape[0]), np.arange(groups.shape[0]))]
        except ValueError:                                  # a ViT whose patches form no square grid
            views = []
        if not views:
            return [], "this model's visual tokens form no patch grid: no overlay"
        names = ["base view", "crops"] if len(views) == 2 else [f"view {v}" for v in range(len(views))]
        out = []
        for name, (grid, rows) in zip(names, views):
            view = groups[np.asarray(rows)]
            merged = merged_patches(view)
            where = stage if len(views) == 1 else f"{stage}, {name}"
            if not merged.any():
                out.append((overlay(image, (view >= 0).reshape(grid)),
                            f"{where}: {int((view >= 0).sum())} of {view.size} patches kept"))
            else:
                out.append((merge_overlay(image, view.reshape(grid)),
                            f"{where}: {view.size} patches -> {len(set(view[view >= 0].tolist()))} tokens, "
                            f"{int(merged.sum())} merged, {int((view < 0).sum())} dropped"))
        return out, ""

    def _llm_overlays(self, image, stats):
        """Inside the LLM, the patches each stage keeps: the next stage's visual columns (mapped back to the
        input), the last one's from `llm_kept`."""
        stages = stats["llm_scores"]
        visual = stages[0].visual_input[0]
        n = int(visual.sum())
        try:
            grid = grid_of(n)
        except ValueError:
            return [], f"the {n} visual tokens of this model's image do not form one square patch grid: no overlay"
        ordinal = visual.long().cumsum(0) - 1                  # input column -> raster index of its patch
        out = []
        for s, (layer, counts) in enumerate(stats["llm_stages"]):
            if s + 1 < len(stages):
                nxt = stages[s + 1]
                columns = nxt.origin[0][nxt.visual[0]] if nxt.origin is not None else visual.nonzero()[:, 0]
            else:
                columns = (stats["llm_kept"][0] & visual).nonzero()[:, 0]
            rows = ordinal[columns].cpu().numpy()
            out.append((overlay(image, kept_mask(rows, grid)), f"from LLM layer {layer}: {len(rows)} of {n} kept"))
        return out, ""
