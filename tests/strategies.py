"""Hypothesis strategies and oracles for `test_properties.py`: tiny models (built once per family, cached), prompt
batches drawn per family, valid method options, and the independent oracles the properties compare against.

Everything here is written from the README's semantics, not from vlmeff's code: a block's expected token count,
the reduced prompt a reduction must hand the LLM, the reduced labels a loss must use, and the traces (hooks,
instance overrides, marker) a patch may leave on a model.
"""
import dataclasses
import functools
import inspect
import math

import torch
from hypothesis import strategies as st

import lvlm_models as families
import models as vit_models
import vlmeff

IMAGE, VIDEO, START, END, PAD = 100, 101, 98, 99, 0
PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")   # [B, L] prompt inputs
TEXT_IDS = st.integers(3, 90)          # never pad, bos/eos, image/video placeholders or vision start/end


# -- ViTs --------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ViTFamily:
    """A tiny ViT: 32 px images, 8 x 8 = 64 patches, 4 layers; prefix = [CLS] + registers."""
    name: str
    build: object
    prefix: int
    has_cls: bool
    timm: bool
    depth: int = 4
    patches: int = 64
    grid: tuple = (8, 8)


VITS = {f.name: f for f in [
    ViTFamily("timm", vit_models.tiny_timm_vit, 1, True, True),
    ViTFamily("timm_registers", lambda: vit_models.tiny_timm_vit(reg_tokens=4), 5, True, True),
    ViTFamily("timm_no_cls", lambda: vit_models.tiny_timm_vit(class_token=False, global_pool="avg"), 0, False, True),
    ViTFamily("clip", vit_models.tiny_clip, 1, True, False),
    ViTFamily("siglip", vit_models.tiny_siglip, 0, False, False),
    ViTFamily("dinov2", vit_models.tiny_dinov2, 1, True, False),
]}


def vit_outputs(family, model, x):
    """Every output tensor of a ViT forward: timm tokens + logits, HF last_hidden_state (+ pooler_output)."""
    with torch.no_grad():
        if family.timm:
            tokens = model.forward_features(x)
            return {"tokens": tokens, "logits": model.forward_head(tokens)}
        out = model(pixel_values=x)
        res = {"tokens": out.last_hidden_state}
        if getattr(out, "pooler_output", None) is not None:
            res["pooler_output"] = out.pooler_output
        return res


# -- LVLMs -------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LVLMFamily:
    """A tiny LVLM. image: "fixed" (one block of `rows` per image), "anyres" (image sizes, packed crops),
    "tiles" (InternVL: one 4-row block per tile) or "qwen" (native resolution, h x w patches).
    score_layer: the tower layer feeding the features (valid `score_layers` end there)."""
    name: str
    build: object
    image: str
    has_cls: bool
    score_layer: int
    rows: int = 0                  # "fixed": feature rows per image
    prefix: int = 0                # "fixed": protected leading rows ([CLS] of LLaVA's "full" strategy)
    pixels: int = 32


LVLMS = {f.name: f for f in [
    LVLMFamily("llava", families.tiny_llava, "fixed", True, 1, rows=16),
    LVLMFamily("llava_full", lambda: families.tiny_llava("full"), "fixed", True, 1, rows=17, prefix=1),
    LVLMFamily("llava_next", families.tiny_next, "anyres", True, 1),
    LVLMFamily("onevision", families.tiny_onevision, "anyres", False, 2),
    LVLMFamily("internvl", families.tiny_internvl, "tiles", False, 2),
    LVLMFamily("gemma3", families.tiny_gemma3, "fixed", False, 2, rows=16, pixels=64),
    LVLMFamily("qwen2", lambda: families.tiny_qwen("qwen2"), "qwen", False, 1),
    LVLMFamily("qwen2_5", lambda: families.tiny_qwen("qwen2_5"), "qwen", False, 1),
    LVLMFamily("qwen3", lambda: families.tiny_qwen("qwen3"), "qwen", False, 2),
    LVLMFamily("qwen3_moe", lambda: families.tiny_qwen("qwen3_moe"), "qwen", False, 2),
]}
ANYRES_SIZES = [(40, 60), (30, 30), (32, 32), (64, 64), (20, 64)]      # (height, width) in pixels
QWEN_GRIDS = [(4, 4), (4, 8), (8, 4), (8, 8)]                          # patches; / 4 tokens after the merger


# -- model cache and patch traces --------------------------------------------------------------------------------
_CACHE = {}


def model_for(family):
    """The family's tiny model, built once; rebuilt if an earlier example left any trace of a patch on it (that
    example has failed already, the next one must not inherit its damage)."""
    entry = _CACHE.get(family.name)
    if entry is None or traces(entry[0]) != entry[1]:
        model = family.build()
        entry = _CACHE[family.name] = (model, traces(model))
    return entry[0]


def traces(model):
    """What a patch could leave behind: every hook (module, kind, id), every instance-level routine (an override
    such as forward / generate), every attribute naming vlmeff, global module hooks, and the classes' own
    forward / generate (which a patch must never replace)."""
    found = set()
    for name, module in model.named_modules():
        for kind, hooks in vars(module).items():
            if kind.endswith("hooks") and isinstance(hooks, dict):
                found.update((name, kind, key) for key in hooks)
        for attr, value in vars(module).items():
            if inspect.isroutine(value) or isinstance(value, functools.partial) or "vlmeff" in attr.lower():
                found.add((name, "instance attribute", attr))
        for attr in ("forward", "generate"):
            if attr in vars(type(module)):
                found.add((type(module).__qualname__, "class attribute", attr, id(vars(type(module))[attr])))
    glob = torch.nn.modules.module
    for kind in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks"):
        found.update(("<global>", kind, key) for key in getattr(glob, kind, {}))
    return frozenset(found)


# -- methods and options -----------------------------------------------------------------------------------------
def usable_methods(kind, has_cls):
    """Methods vlmeff offers for this model kind ("vit" / "lvlm") in the vision encoder or before the LLM, [CLS]
    methods only where there is a [CLS]."""
    return [m.name for m in vlmeff.methods() if kind in m.model_kinds and (has_cls or not m.needs_cls)
            and "inside LLM" not in m.acts_in]     # the in-LLM engine: its own tests (test_llm_stage, test_infoflow)


@st.composite
def score_layers(draw, last):
    """A valid score_layers for a scorer whose last allowed layer is `last`: omitted, a start, or (start, end)."""
    form = draw(st.sampled_from(["omit", "start", "range"]))
    if form == "omit":
        return {}
    start = draw(st.integers(0, last))
    if form == "start":
        return {"score_layers": start}
    return {"score_layers": (start, draw(st.integers(start, last)))}


@st.composite
def ratio(draw):
    """A budget ratio in (0, 1]: round values and arbitrary floats (whole and fractional token counts)."""
    return draw(st.one_of(st.sampled_from([1.0, 0.5, 0.25, 0.3, 0.1, 0.05]),
                          st.floats(0.02, 1.0, allow_nan=False, exclude_min=True)))


def small_count(n):
    """A count budget in [1, n], small ones (below the number of grids, heads, layers) drawn as often as any."""
    return st.one_of(st.integers(1, min(n, 4)), st.integers(1, n))


@st.composite
def lvlm_config(draw, family, min_free, full=False):
    """(method, keep, options) valid for an LVLM family whose smallest image block has `min_free` rows outside the
    protected ones. full: a budget that keeps everything (keep=1.0, or the count when every block is that size)."""
    method = draw(st.sampled_from(usable_methods("lvlm", family.has_cls)))
    info = vlmeff.method_info(method)
    if full:
        keep = 1.0
    else:
        keep = draw(st.one_of(ratio(), small_count(max(1, min_free))))
    options = {}
    if "reduce" in info.options and draw(st.booleans()):
        options["reduce"] = draw(st.sampled_from(["drop", "merge"]))
    if "positions" in info.options and draw(st.booleans()):
        # M-RoPE models (Qwen-VL) keep their original 3-D positions: "original" only
        modes = ["original"] if family.image == "qwen" else ["compact", "original"]
        options["positions"] = draw(st.sampled_from(modes))
    if "score_layers" in info.options:
        options.update(draw(score_layers(family.score_layer)))
    if "seed" in info.options and draw(st.booleans()):
        options["seed"] = draw(st.integers(0, 2 ** 16))
    if "contextual" in info.options and draw(st.booleans()):
        # a share of the budget, or (for a count budget) a count below it
        if isinstance(keep, float):
            options["contextual"] = draw(st.sampled_from([0.0, 10 / 64, 0.25, 0.5]))
        else:
            options["contextual"] = draw(st.integers(0, keep - 1))
    return method, keep, options


@st.composite
def vit_config(draw, family, full=False):
    """(method, keep, options) valid for a ViT family. full: a budget that changes nothing."""
    method = draw(st.sampled_from(usable_methods("vit", family.has_cls)))
    info = vlmeff.method_info(method)
    options = {}
    if method == "tome":
        if "prop_attn" in info.options and draw(st.booleans()):
            options["prop_attn"] = draw(st.booleans())
        if "order" in info.options and draw(st.booleans()):
            options["order"] = draw(st.sampled_from(["tome", "raster"]))
        if full:                           # r and keep exclude each other: r=0, or keep=1.0 alone
            return (method, None, dict(options, r=0)) if draw(st.booleans()) else (method, 1.0, options)
        form = draw(st.sampled_from(["r", "r per layer", "keep"]))
        if form == "r":
            return method, None, dict(options, r=draw(st.integers(0, 40)))
        if form == "r per layer":
            return method, None, dict(options, r=draw(st.lists(st.integers(0, 20), min_size=4, max_size=4)))
        return method, draw(st.one_of(ratio(), small_count(family.patches))), options
    keep = 1.0 if full else draw(st.one_of(ratio(), small_count(family.patches)))
    if full and draw(st.booleans()):
        keep = family.patches
    layer = draw(st.integers(-family.depth, family.depth - 1))
    if draw(st.booleans()):
        options["layer"] = layer
    else:
        layer = family.depth // 4          # README: the default prunes after a quarter of the layers
    if "reduce" in info.options and draw(st.booleans()):
        options["reduce"] = draw(st.sampled_from(["drop", "merge"]))
    if "score_layers" in info.options:
        options.update(draw(score_layers(layer % family.depth)))
    if "seed" in info.options and draw(st.booleans()):
        options["seed"] = draw(st.integers(0, 2 ** 16))
    return method, keep, options


# -- token-count oracles -----------------------------------------------------------------------------------------
def budget(keep, n):
    """Rows kept out of n free rows (README: an int count, or a ratio of n, at least 1). A ratio landing exactly on
    .5 may round either way: returns the set of acceptable counts."""
    if isinstance(keep, int):
        return {keep}
    exact = keep * n
    lo = max(1, min(n, math.floor(exact)))
    hi = max(1, min(n, math.ceil(exact)))
    if abs(exact - math.floor(exact) - 0.5) < 1e-9:
        return {lo, hi}
    return {max(1, min(n, math.floor(exact + 0.5)))}


def pool_cells(h, w, k):
    """Cells of the largest h' x w' grid (h' <= h, w' <= w) with h' * w' <= k (README: pool)."""
    return max(hp * min(w, k // hp) for hp in range(1, h + 1) if k // hp >= 1)


def expected_rows(method, keep, block):
    """Acceptable row counts of a feature block after the reduction, or None where the README gives no exact
    count (pool over a packed anyres block, whose budget is split between two grids): then only a bound."""
    free = block.rows - block.protected
    counts = budget(keep, free)
    if method == "visionzip" and block.cls_row:
        # VisionZip feeds [CLS] as one of its dominant tokens (inside the budget); the rest of vlmeff keeps prefix
        # rows outside it: either convention is a count the user asked for
        return {block.protected + k for k in counts} | counts
    if method == "pool":
        if block.grid is None:
            return None
        return {block.protected + pool_cells(*block.grid, k) for k in counts}
    return {block.protected + k for k in counts}


def tome_counts(n, schedule):
    """ToMe: each layer merges min(r, n // 2) of the n patch tokens (at most half: bipartite halves)."""
    for r in schedule:
        n -= min(r, n // 2)
    return n


def tome_reachable(n, depth):
    """The fewest patch tokens ToMe can reach in `depth` layers (halving each layer)."""
    for _ in range(depth):
        n -= n // 2
    return n


# -- LVLM prompts ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Block:
    """One feature block (an image, or an InternVL tile): rows it fills, rows protected from the budget
    (newlines, [CLS]), and its grid for pool when it is one square-ish raster grid."""
    rows: int
    protected: int
    grid: tuple = None
    cls_row: bool = False        # the protected row is [CLS] (LLaVA's "full" features)


@dataclasses.dataclass
class Prompts:
    """A drawn batch: `inputs` for the model, `templates` per sample (text ids and ("block", j) items, in order),
    `blocks` (all blocks in prompt order), `side` of the padding, and how to cut out sample i alone."""
    family: LVLMFamily
    inputs: dict
    templates: list
    blocks: list
    side: str
    images: list              # per sample: its image specs
    texts: list               # per sample: its text segments (one more than its images)
    labels_on_images: bool = False

    @property
    def batch(self):
        return len(self.templates)

    def sample_blocks(self, i):
        """Indices (into `blocks`) of sample i's blocks."""
        return [item[1] for item in self.templates[i] if isinstance(item, tuple)]


def expand(template, counts):
    """A template's token ids with block j as counts[j] placeholders."""
    ids = []
    for item in template:
        ids += [IMAGE] * counts[item[1]] if isinstance(item, tuple) else [item]
    return ids


def pad(prompts, side, value=PAD):
    """Id lists -> (input_ids, attention_mask) [B, L], padded on `side`."""
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), value)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        span = slice(L - len(p), L) if side == "left" else slice(0, len(p))
        ids[i, span], mask[i, span] = torch.tensor(p, dtype=torch.long), 1
    return ids, mask


@st.composite
def image_spec(draw, family):
    """(what the family's image needs, pixel seed): an anyres image size, a tile count, a Qwen patch grid, or None."""
    seed = draw(st.integers(0, 1000))
    if family.image == "anyres":
        return (draw(st.sampled_from(ANYRES_SIZES)), seed)
    if family.image == "tiles":
        return (draw(st.integers(1, 3)), seed)
    if family.image == "qwen":
        return (draw(st.sampled_from(QWEN_GRIDS)), seed)
    return (None, seed)


@st.composite
def prompt_specs(draw, family, max_batch=3, max_images=2, images=True, labels=False):
    """Plain, printable description of a padded batch (`build_prompts` makes the inputs): 1..max_batch samples
    with 0..max_images images each (at least one image in the batch when `images`), text before, between and
    after the images, left or right padding; labels_on_images: whether labels keep the placeholders' ids."""
    B = draw(st.integers(1, max_batch))
    specs = [draw(st.lists(image_spec(family), min_size=0, max_size=max_images)) for _ in range(B)]
    if images and not any(specs):
        specs[draw(st.integers(0, B - 1))] = [draw(image_spec(family))]
    texts = [[draw(st.lists(TEXT_IDS, min_size=1, max_size=4)) for _ in range(len(s) + 1)] for s in specs]
    side = draw(st.sampled_from(["left", "right"]))
    return dict(specs=specs, texts=texts, side=side, labels_on_images=labels and draw(st.booleans()))


def build_prompts(family, specs, texts, side, labels_on_images=False):
    """inputs, templates and blocks of samples with image `specs` and text segments `texts` (one more than
    images), e.g. specs [[(None, 3)], []] and texts [[[1, 5], [7]], [[1, 2, 3]]]."""
    per_image_blocks = image_blocks(family, specs)
    templates, blocks, j = [], [], 0
    for spec, text, image_blocks_ in zip(specs, texts, per_image_blocks):
        t = list(text[0])
        for seg, bl in zip(text[1:], image_blocks_):
            wrap = family.image == "qwen"
            t += [START] * wrap
            for b in bl:
                t.append(("block", j))
                blocks.append(b)
                j += 1
            t += [END] * wrap + list(seg)
        templates.append(t)
    ids, mask = pad([expand(t, [b.rows for b in blocks]) for t in templates], side)
    inputs = dict(input_ids=ids, attention_mask=mask)
    if family.name == "gemma3":          # bidirectional attention within each image run
        inputs["token_type_ids"] = (ids == IMAGE).long()
    if family.image == "qwen":
        inputs["mm_token_type_ids"] = (ids == IMAGE).int()
    inputs.update(image_inputs(family, specs))
    return Prompts(family, inputs, templates, blocks, side, specs, texts, labels_on_images)


def _pixels(shape, seed):
    """Gaussian pixels (or Qwen's flattened patches) of `shape`, reproducible from `seed`."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def image_inputs(family, specs):
    """The image kwargs of a batch (none when no sample has an image)."""
    flat = [s for spec in specs for s in spec]
    out = {}
    if not flat:
        return out
    if family.image == "fixed":
        out["pixel_values"] = torch.cat([_pixels((1, 3, family.pixels, family.pixels), seed) for _, seed in flat])
    elif family.image == "anyres":
        out["pixel_values"] = torch.cat([_pixels((1, 5, 3, 32, 32), seed) for _, seed in flat])
        out["image_sizes"] = torch.tensor([size for size, _ in flat])
        if family.name == "onevision":
            out["batch_num_images"] = torch.tensor([len(s) for s in specs])
    elif family.image == "tiles":
        out["pixel_values"] = torch.cat([_pixels((tiles, 3, 32, 32), seed) for tiles, seed in flat])
    else:
        out["pixel_values"] = torch.cat([_pixels((h * w, families.PATCH_DIM), seed) for (h, w), seed in flat])
        out["image_grid_thw"] = torch.tensor([[1, h, w] for (h, w), _ in flat])
    return out


def image_blocks(family, specs):
    """Per sample, per image: its feature blocks. Anyres blocks are measured on the model's own (unpatched)
    get_image_features: rows, and newline rows (equal to `image_newline`) as the protected ones."""
    if family.image == "fixed":
        side = math.isqrt(family.rows - family.prefix)
        return [[[Block(family.rows, family.prefix, (side, side), family.prefix > 0)] for _ in spec] for spec in specs]
    if family.image == "tiles":
        return [[[Block(4, 0, (2, 2))] * tiles for tiles, _ in spec] for spec in specs]
    if family.image == "qwen":
        return [[[Block(h * w // 4, 0, (h // 2, w // 2))] for (h, w), _ in spec] for spec in specs]
    flat = [s for spec in specs for s in spec]
    if not flat:
        return [[] for _ in specs]
    kw = image_inputs(family, specs)
    model = model_for(family)           # unpatched here: prompts are built before any patch
    with torch.no_grad():
        packed = model.model.get_image_features(**kw).pooler_output
    newline = model.model.image_newline
    out, it = [], iter(packed)
    for spec in specs:
        per_image = []
        for _ in spec:
            f = next(it)
            n_newlines = int((f == newline).all(dim=1).sum())
            single_view = f.shape[0] == 17 and n_newlines == 1           # base view only (+ one newline)
            per_image.append([Block(f.shape[0], n_newlines, (4, 4) if single_view else None)])
        out.append(per_image)
    return out


# -- reduced-prompt oracles --------------------------------------------------------------------------------------
def reduced_ids(p, counts_out):
    """Per sample, the unpadded ids the LLM must get: the prompt with block j as counts_out[j] placeholders."""
    return [expand(t, counts_out) for t in p.templates]


def labels_for(p):
    """Labels a trainer would pass: the ids, -100 on padding and (unless labels_on_images) on placeholders."""
    ids, mask = p.inputs["input_ids"], p.inputs["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    if not p.labels_on_images:
        labels = labels.masked_fill(ids == IMAGE, -100)
    return labels


def reduced_loss(p, logits, llm_mask, counts_out):
    """Cross-entropy of the reduced prompt: labels built from the reduced ids (placeholders -100 unless
    labels_on_images), placed where the LLM's attention mask has the sample's tokens, -100 elsewhere;
    next-token shift as in transformers' causal-LM loss."""
    labels = torch.full(logits.shape[:2], -100, dtype=torch.long)
    for i, ids in enumerate(reduced_ids(p, counts_out)):
        row = torch.tensor(ids)
        if not p.labels_on_images:
            row = row.masked_fill(row == IMAGE, -100)
        where = llm_mask[i].bool() if llm_mask is not None else torch.ones(logits.shape[1], dtype=torch.bool)
        labels[i, where] = row
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100)


def sample_alone(p, i):
    """Sample i of a drawn batch as its own unpadded batch of one, with the same images and text."""
    return build_prompts(p.family, [p.images[i]], [p.texts[i]], p.side, p.labels_on_images)
