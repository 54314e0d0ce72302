"""Where the methods that act inside the LLM prune: their papers' layers at their papers' depth, scaled to the
model's depth by one rule (`scale_layer`), explicit settings as given. Pure arithmetic: knows no model."""
import math
from dataclasses import dataclass

PAPER_DEPTH = 32                  # LLaVA-1.5-7B's 32 decoder layers, where FastV and PyramidDrop set their layers
FASTV_LAYER = 2                   # FastV: K = 2, the attention of layer K - 1 ranks the visual tokens
PDROP_LAYERS = (8, 16, 24)        # PyramidDrop on LLaVA-1.5 (its README): stages end after layers 8, 16, 24 ...
PDROP_RATIOS = (0.5, 0.25, 0.125)   # ... keeping lambda = 0.5 of the previous stage's visual tokens each time
# TransPrune (its scripts, LLaVA-1.5 and 1.6): prune after layers 7, 9, 12 (1-indexed), i.e. the inputs of layers 7,
# 9, 12, to 0.875 / 0.625 / 0.125 of the visual tokens, with TTV accumulated over layers 7..12 (1-indexed): the
# layers from the one before the first stage to the one before the last
TRANSPRUNE_LAYERS = (7, 9, 12)
TRANSPRUNE_RATIOS = (0.875, 0.625, 0.125)
# VFlowOpt (LLaVA-OneVision-7B, a 28-layer Qwen2): drops at the inputs of layers 9 and 18 (`illava_llm_k`); its
# released 25 % setting (`llava_onevision_training_free.py`): the tower keeps r_v, the LLM stages r_1 and r_2 of
# what reaches them, here as shares of the LLM's input (r_1, r_1 * r_2), and the context threshold t
VFLOWOPT_DEPTH = 28
VFLOWOPT_LAYERS = (9, 18)
VFLOWOPT_25 = dict(vit_keep=0.2651026358526424, llm_keep=(0.9833433139039235, 0.8773258179532721),
                   threshold=34.759552803070484, grid=15.580797034937687, entropy_weight=0.0)
VFLOWOPT_RATIOS = (VFLOWOPT_25["llm_keep"][0], VFLOWOPT_25["llm_keep"][0] * VFLOWOPT_25["llm_keep"][1])

# SparseVLM (its code's v1.5, LLaVA-1.5-7B): prunes the outputs of layers 2, 6, 15 (0-indexed), i.e. the inputs of
# layers 3, 7, 16, ranked by the attention of the layer before; its top-k counts per stage for each budget (the
# layer-average visual tokens it reports) of 576 visual tokens, before the recycled tokens are added
SPARSEVLM_LAYERS = (3, 7, 16)
SPARSEVLM_TOKENS = 576
SPARSEVLM_SCHEDULES = {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)}
SPARSEVLM_RATIOS = tuple(n / SPARSEVLM_TOKENS for n in SPARSEVLM_SCHEDULES[192])


@dataclass(frozen=True)
class Stage:
    """Prune the input of decoder layer `layer` to `keep` visual tokens per sample (an int count, or a float ratio of
    the sample's visual tokens at the LLM's input), ranked by the attention row of layer `score_layer` (`layer` - 1:
    the previous layer's attention, FastV; `layer`: the layer's own q / k on its unpruned input, PyramidDrop)."""

    layer: int
    keep: object
    score_layer: int


def scale_layer(layer, depth, first=1, paper_depth=PAPER_DEPTH):
    """A layer index of the paper's model (32 layers unless `paper_depth` says otherwise) on a model of `depth`
    layers: round(layer * depth / paper_depth), half up, clamped to [first, depth - 1] (`first`: the shallowest
    layer that may prune, at least 1 so that layer 0 keeps every token and the cache length generate reads)."""
    return min(depth - 1, max(first, math.floor(layer * depth / paper_depth + 0.5)))


def scaled_pdrop(depth, first=1):
    """PyramidDrop's default (layers, ratios) on `depth` layers (`scaled_schedule`)."""
    return scaled_schedule(PDROP_LAYERS, PDROP_RATIOS, depth, first)


def scaled_schedule(layers, ratios, depth, first=1, paper_depth=PAPER_DEPTH):
    """A paper's stages (layers of its `paper_depth`-layer model, ratios) on `depth` layers: the layers scaled;
    stages that land on one layer become one, keeping the deepest stage's ratio (the smaller budget)."""
    stages = {}
    for layer, ratio in zip(layers, ratios):
        stages[scale_layer(layer, depth, first, paper_depth)] = ratio
    return tuple(stages), tuple(stages.values())


PAPER_SCHEDULES = {"pdrop": (PDROP_LAYERS, PDROP_RATIOS), "transition": (TRANSPRUNE_LAYERS, TRANSPRUNE_RATIOS),
                   "infoflow": (VFLOWOPT_LAYERS, VFLOWOPT_RATIOS), "sparsevlm": (SPARSEVLM_LAYERS, SPARSEVLM_RATIOS)}
PAPER_DEPTHS = {"infoflow": VFLOWOPT_DEPTH}          # the others' papers set their layers on 32


def default_schedule(method, depth, first=1):
    """The (layers, ratios) of a staged method's paper on `depth` layers (`scaled_schedule`)."""
    return scaled_schedule(*PAPER_SCHEDULES[method], depth, first, PAPER_DEPTHS.get(method, PAPER_DEPTH))


def default_accumulation(layers):
    """TransPrune's accumulating layers for stage layers (increasing): from the layer before the first stage to the
    one before the last (the reference's 7..12 of 32, 1-indexed, for stages 7, 9, 12)."""
    return tuple(range(max(0, layers[0] - 1), layers[-1]))


def default_ratios(n):
    """PyramidDrop's ratios for n explicit stages: lambda = 0.5, stage s keeps 0.5 ** s of the visual tokens."""
    return tuple(0.5 ** (s + 1) for s in range(n))


def average_share(ratios, layers, depth):
    """The share of the visual tokens the decoder layers see on average when stage s keeps ratios[s] of them from
    layers[s] on (every layer before layers[0] sees all)."""
    bounds = list(layers) + [depth]
    return (bounds[0] + sum(r * (b - a) for r, a, b in zip(ratios, bounds, bounds[1:]))) / depth


def check_reachable(share, layers, depth):
    """ValueError unless an average share `share` is reachable with stages from layers[0] on: the layers before it
    see every visual token, so the average is above layers[0] / depth."""
    floor = layers[0] / depth
    if share <= floor:
        raise ValueError(f"keep={share}: an average budget below {floor:.4g} is out of reach with stages from layer "
                         f"{layers[0]} of {depth} (the layers before it see every visual token); prune from an "
                         "earlier layer (layers=[...]) or give a larger keep")


def average_budget_ratios(share, layers, depth):
    """PyramidDrop's ratios lambda, lambda^2, ... for the stages at `layers` such that the layers see `share` of
    the visual tokens on average (bisection on lambda in (0, 1]). ValueError when the layers before the first stage
    alone see more than that."""
    check_reachable(share, layers, depth)
    return _meeting_share(share, lambda lam: [lam ** (s + 1) for s in range(len(layers))], 1.0, layers, depth)


def scaled_shape_ratios(share, shape, layers, depth):
    """The ratios min(1, c * shape[s]) for the stages at `layers`, c such that the layers see `share` of the visual
    tokens on average (bisection on c): a paper's schedule shape kept, its budget moved. ValueError when the
    layers before the first stage alone see more than that."""
    check_reachable(share, layers, depth)
    return _meeting_share(share, lambda c: [min(1.0, c * r) for r in shape], 1.0 / min(shape), layers, depth)


def _meeting_share(share, ratios_at, high, layers, depth):
    """ratios_at(x) (a tuple) for the x in (0, high] at which the layers see `share` of the visual tokens on
    average: bisection, the average share increasing in x; 60 halvings reach float precision."""
    low = 0.0
    for _ in range(60):
        x = (low + high) / 2
        low, high = (x, high) if average_share(ratios_at(x), layers, depth) < share else (low, x)
    return tuple(ratios_at(high))


def plan_stages(method, keep, options, depth, first=1):
    """The `Stage`s of an in-LLM method with checked options, layers increasing: keep after each stage layer (an int
    count per sample or a ratio of the sample's visual tokens at the LLM's input), scored at the previous layer's
    attention (FastV) or at the stage layer's own q / k (PyramidDrop, TransPrune). TransPrune given keep (an
    average share) keeps its ratios' shape, scaled to the budget (`scaled_shape_ratios`); PyramidDrop takes
    lambda ** s."""
    base = options.get("base", method)
    if base in ("fastv", "dart"):         # one stage at layer K, scored at K - 1 (DART: K = 2 of 32 as FastV)
        layer = options.get("layer")
        layer = scale_layer(FASTV_LAYER, depth, first) if layer is None else layer % depth
        return [Stage(layer, keep, layer - 1)]
    layers, ratios = options.get("layers"), options.get("ratios")
    if layers is None:
        layers, scaled_ratios = default_schedule(base, depth, first)
        ratios = scaled_ratios if ratios is None else ratios
    elif ratios is None:
        ratios = stage_ratios(base, len(layers))
    layers = [layer % depth for layer in layers]
    if keep is not None and base == "sparsevlm":
        if options.get("ratios") is None:     # else: the ratios this keep resolved to at patch time, as they are
            layers, ratios = sparsevlm_stages(keep, options.get("layers") is None, layers, depth, first)
    elif keep is not None and base == "transition":    # an average budget: the paper's shape, scaled to meet it
        ratios = scaled_shape_ratios(keep, ratios, layers, depth)
    elif keep is not None:               # an average budget: the geometric ratios lambda ** s that meet it
        ratios = average_budget_ratios(keep, layers, depth)
    # SparseVLM ranks by the attention of the layer before each stage, the others by the stage layer's own
    score_offset = 1 if base == "sparsevlm" else 0
    return [Stage(layer, ratio, layer - score_offset) for layer, ratio in zip(layers, ratios)]


def sparsevlm_stages(keep, paper_layers, layers, depth, first=1):
    """(layers, ratios) of SparseVLM for a budget `keep` on `depth` layers: the paper's stage layers scaled
    (`paper_layers`) or `layers` as given, with the ratios of `sparsevlm_schedule`: the reference's own at one of
    its budgets on three stages, otherwise the schedule's shape (PyramidDrop's lambda ** s for another number of
    explicit stages) scaled to the average share keep."""
    exact, shape = sparsevlm_schedule(keep)
    if paper_layers:
        layers, shape = scaled_schedule(SPARSEVLM_LAYERS, shape, depth, first)
    elif len(layers) != len(shape):
        shape = default_ratios(len(layers))
    if exact and len(layers) == len(SPARSEVLM_LAYERS):
        return layers, shape
    return layers, scaled_shape_ratios(keep, shape, layers, depth)


def sparsevlm_schedule(keep):
    """(exact, ratios): SparseVLM's schedule (its top-k counts / 576 per stage) for the budget nearest keep * 576
    of the reference's 192, 128, 96 and 64, and whether keep is that budget. `plan_stages` uses it as it is for an
    exact budget on three stages, and otherwise scales its shape so that the decoder layers see `keep` of the
    visual tokens on average, the recycled tokens not counted (`scaled_shape_ratios`)."""
    tokens = keep * SPARSEVLM_TOKENS
    budget = min(SPARSEVLM_SCHEDULES, key=lambda b: (abs(b - tokens), -b))
    return abs(tokens - budget) < 1e-6, tuple(n / SPARSEVLM_TOKENS for n in SPARSEVLM_SCHEDULES[budget])


def stage_ratios(method, n):
    """The ratios of n explicit stages of a staged method: TransPrune's 0.875 / 0.625 / 0.125 for three stages,
    VFlowOpt's released two, PyramidDrop's lambda ** s otherwise (`default_ratios`)."""
    paper = PAPER_SCHEDULES.get(method, (None, PDROP_RATIOS))[1]
    if method in ("transition", "infoflow") and n == len(paper):
        return paper
    return default_ratios(n)


def infoflow_last_ratio(share, vit_keep, first_keep, layers, depth):
    """VFlowOpt's budget constraint, for any depth: the LLM's last stage keeps r_2 (of what reaches it) such that the
    decoder layers see `share` of the image's visual tokens on average, when the tower keeps vit_keep (r_v: every
    layer before layers[0] sees it), the stage at layers[0] keeps first_keep (r_1) of that and the stage at
    layers[1] r_2 of what is left:
        (K1 r_v + (K2 - K1) r_v r_1 + (D - K2) r_v r_1 r_2) / D = share,   K1, K2 = layers, D = depth
    (the reference's r_2 = min(1, ((28 T - 9 r_v - 9 r_v r_1) / 10) / (r_v r_1)) at K = 9, 18 of 28). Clamped to
    [1e-3, 1]: a budget out of reach from above keeps r_2 = 1 (the average then exceeds `share`), from below 1e-3."""
    k1, k2 = layers
    rest = (depth * share - k1 * vit_keep - (k2 - k1) * vit_keep * first_keep) / ((depth - k2) * vit_keep * first_keep)
    return min(1.0, max(1e-3, rest))
