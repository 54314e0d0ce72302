"""`vlmeff.calibrate`: the one entry point of every method fitted on unlabelled calibration data, and the schedule
files it writes (model identity, method, fitted values, vlmeff version), which `vlmeff.patch(..., schedule=path)`
and `vlmeff.skip_experts(..., schedule=path)` read back and check against the model.

Methods: "debiased" (Attention Debiasing: the recency trend of a host scorer's attention, fitted here), "infoflow"
(VFlowOpt's information-flow search, `calibrate_infoflow`) and "modes" (MoDES expert skipping,
`vlmeff.experts.calibrate`). Calibration runs off the hot path: host reads are fine here.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .flops import layer_segments, stage_drops
from .pruners.select import resolve_keep

CALIBRATED = ("debiased", "infoflow", "modes")


def version():
    from . import __version__
    return __version__


def model_identity(model) -> dict:
    """What a schedule for methods inside the LLM must match: architecture, decoder shape and a checksum of the
    token embeddings (another checkpoint of one architecture differs there; a dtype of the same one does not)."""
    config = model.config
    text = getattr(config, "text_config", config)
    total = float(model.get_input_embeddings().weight.detach().double().abs().sum())
    # 4 significant digits: the same checkpoint loaded in fp16, bf16 or fp32 sums to the same value at that precision
    checksum = float(f"{total:.4g}")
    return dict(model_type=config.model_type, text_model_type=text.model_type, layers=text.num_hidden_layers,
                hidden_size=text.hidden_size, vocab_size=text.vocab_size, embedding_checksum=checksum)


def calibrate(model, data, method: str, path: str | Path | None = None, progress: bool = True,
              **options) -> dict:
    """Fit `method` on `data` and return its schedule (a dict, also written as JSON to `path` if given).

    method "debiased": data is an iterable of model-input batches (dicts as the processor returns them, with images;
    calibration data, never the evaluation split); options base ("fastv" or "pdrop"), layer / layers (as in
    `vlmeff.patch`), trend ("cubic" or "exponential"; default the reference's form for the base). The base scorer
    runs at full budget on every batch; the mean score of visual token i over the batches is fitted by the trend.
    method "infoflow": VFlowOpt's search (`calibrate_infoflow`: options budget, trials, initial, seed, patience,
    layers, entropy, recycle, resume).
    method "modes": see `vlmeff.experts.calibrate.calibrate` (options target_skip, grid_size, n, seed).
    """
    if method == "modes":
        from .experts.calibrate import calibrate as calibrate_modes
        return calibrate_modes(model, data, method="modes", path=path, progress=progress, **options)
    if method not in ("debiased", "infoflow"):
        raise ValueError(f"method={method!r}: vlmeff.calibrate fits {', '.join(CALIBRATED)}")
    fit = calibrate_debiasing if method == "debiased" else calibrate_infoflow
    schedule = fit(model, data, progress=progress, **options)
    if path is not None:
        Path(path).write_text(json.dumps(schedule, indent=1))
    return schedule


def calibrate_debiasing(model, data, base="fastv", trend=None, layer=None, layers=None, progress=True):
    """The recency trend of `base`'s first-stage scores on `data` (see `calibrate`)."""
    from . import api
    from .pruners.debias import DEFAULT_TREND, TRENDS, fit_trend
    from .pruners.stages import plan_stages, scaled_pdrop
    if base not in DEFAULT_TREND:
        raise ValueError(f"base={base!r}: Attention Debiasing calibrates the scores of fastv or pdrop")
    trend = DEFAULT_TREND[base] if trend is None else trend
    if trend not in TRENDS:
        raise ValueError(f"trend={trend!r}: accepted {', '.join(TRENDS)}")
    context = api.model_context(api.find_adapter(model), None, "inside LLM")
    if base == "fastv":
        keep, options = 1.0, {"layer": layer}
    else:                                           # every stage at full budget: nothing dropped while measuring
        if layers is None:
            layers = list(scaled_pdrop(context.depth, context.first_layer)[0])
        keep, options = None, {"layers": layers, "ratios": [1.0] * len(layers)}
    positions_seen, values, samples = [], [], 0
    score_layer = plan_stages(base, keep, options, context.depth, context.first_layer)[0].score_layer
    with api.patch(model, base, keep=keep, **options) as patch, torch.no_grad():
        for batch in tqdm(list(data), desc="calibrate debiased", disable=not progress):
            model(**batch)
            if not patch.stats.get("llm_scores"):      # a batch without images: nothing to measure
                continue
            first = patch.stats["llm_scores"][0]
            positions_seen.append(first.ordinals[first.visual])
            values.append(first.scores[first.visual].double())
            samples += batch["input_ids"].shape[0]
    if not positions_seen:
        raise ValueError("the calibration data holds no images: pass an iterable of model-input batches with images")
    i = torch.cat(positions_seen)
    total, count = torch.bincount(i, weights=torch.cat(values)), torch.bincount(i)
    seen = count > 0
    positions = int(seen.long().argmin()) if not bool(seen.all()) else int(seen.shape[0])
    if positions < 4:
        raise ValueError(f"the calibration data has only {positions} visual positions; a trend needs at least 4")
    mean = (total[:positions] / count[:positions]).numpy()
    coefficients = fit_trend(mean, trend)
    return dict(method="debiased", vlmeff_version=version(), model=model_identity(model), base=base,
                score_layer=score_layer, trend=trend,
                coefficients=coefficients, positions=positions, samples=samples,
                mean_attention=[float(v) for v in mean])


def plot_trend(schedule, path):
    """A `debiased` schedule's mean attention over visual position, with its fitted trend, as a PNG at `path`
    (matplotlib: the `eval` extra)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .pruners.debias import trend

    mean = np.asarray(schedule["mean_attention"])
    i = np.arange(mean.shape[0], dtype=np.float64)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(i, mean, ".", markersize=3, label="mean attention (calibration data)")
    shape = trend(schedule["trend"], schedule["coefficients"], i)          # f(i) / f(0)
    scale = float(mean @ shape / (shape @ shape))                          # least-squares f(0)
    ax.plot(i, scale * shape, label=f"fitted {schedule['trend']} trend")
    ax.set(xlabel="visual token index within the image", ylabel="attention of the scoring query",
           title=f"{schedule['base']} at decoder layer {schedule['score_layer']}, {schedule['samples']} samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def task_batches(model, processor, task, split="train", n=256, batch_size=32, seed=0, data=None):
    """n questions of an evaluation task's `split` (drawn with `seed`; never pass the split you evaluate on) as
    model-input batches, prompted exactly as `vlmeff eval` prompts them (chat template, left padding); answers
    are not used."""
    import random

    from .eval import get_task
    from .eval.runner import chat_inputs
    from .eval.sources import load_examples

    examples = load_examples(get_task(task), data, split)
    if n > len(examples):
        raise ValueError(f"n={n}: the {split} split of {task} has {len(examples)} questions")
    picked = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [chat_inputs(processor, [examples[i] for i in picked[start:start + batch_size]], model)
            for start in range(0, n, batch_size)]


def load_schedule(schedule, model, method, base, score_layer):
    """A `debiased` schedule (a path, its loaded dict or a preset name) checked against the model, the base and the
    layer whose attention it debiases (`score_layer`): a file for another model, method, base or layer is a
    ValueError naming the mismatch. Presets are the reference's fixed weights and are not checked for the layer."""
    from .pruners.debias import PRESETS, TRENDS, trend
    if isinstance(schedule, str) and schedule in PRESETS:
        preset = PRESETS[schedule]
        if preset["base"] != base:
            raise ValueError(f"schedule={schedule!r} is the reference's {preset['base']} trend; got base={base!r}")
        return dict(preset, method="debiased", preset=schedule)
    if isinstance(schedule, (str, os.PathLike)) and not Path(schedule).is_file():
        raise ValueError(f"schedule={str(schedule)!r} is neither a file nor a preset ({', '.join(PRESETS)}); "
                         "write one with vlmeff.calibrate(model, data, method='debiased', path=...)")
    schedule = _read_schedule(schedule, method)
    if schedule.get("base") != base:
        raise ValueError(f"this schedule was fitted on base {schedule.get('base')!r}; got base={base!r}")
    if schedule.get("score_layer") != score_layer:
        raise ValueError(f"this schedule was fitted on the attention of decoder layer {schedule.get('score_layer')}; "
                         f"this patch scores at layer {score_layer} (calibrate with the same layer / layers)")
    _check_identity(schedule, model, method)
    coefficients, kind, positions = schedule.get("coefficients"), schedule.get("trend"), schedule.get("positions")
    lengths = {"exponential": (2,), "cubic": (1, 2, 3, 4)}
    if (kind not in TRENDS or not isinstance(coefficients, list) or len(coefficients) not in lengths[kind]
            or not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in coefficients)
            or not isinstance(positions, int) or isinstance(positions, bool) or positions < 1
            or not np.isfinite(coefficients).all()
            or np.min(trend(kind, coefficients, np.arange(positions, dtype=np.float64))) <= 0):
        raise ValueError("this schedule's trend is malformed (trend, coefficients, positions; the trend must be "
                         "positive over the positions)")
    return schedule


# -- VFlowOpt: the information-flow search ------------------------------------------------------------------------
def infoflow_bounds(budget, entropy=True, recycle=False, stages=2):
    """VFlowOpt's search space for an average budget T (`llava_ov_opt_all.py`, written there for T = 0.25):
    (name, low, high) of r_v in [T, 1.5 T] (the tower's keep), r_1 in [0.8 T / 1.5 T, 1] (the first LLM stage's
    keep of what reaches it: r_v r_1 >= 0.8 T), the context threshold t in [0, 50], with recycling the merge grid m
    in [3, 24] and, where the model's pixels give patch entropy, its weight alpha_v in [-1, 1]. Scaled with T as the
    reference's bounds are at 0.25; r_v's upper end at most 1. Without recycling (the reference's single-image path)
    m has no effect and is not searched; with the two LLM stages on one layer (`stages=1`, a shallow model) only
    r_1 r_2 matters, which the constraint sets: r_1 is not searched (1)."""
    space = [("vit_keep", budget, min(1.0, 1.5 * budget))]
    if stages == 2:
        space.append(("first_keep", 0.8 / 1.5, 1.0))
    space.append(("threshold", 0.0, 50.0))
    if recycle:
        space.append(("grid", 3.0, 24.0))
    if entropy:
        space.append(("entropy_weight", -1.0, 1.0))
    return space


def calibrate_infoflow(model, data, budget=0.25, trials=300, initial=27, seed=42, patience=None, layers=None,
                       entropy="pixels", recycle=None, progress=True, random_only=False, resume=None):
    """VFlowOpt's search: the settings of `infoflow` that keep the last prompt token's final hidden state closest (sum
    of cosines over the calibration samples) to the unpatched model's, under the average budget `budget`.

    data: model-input batches with images (calibration data, never the evaluation split). The variables and their
    bounds are `infoflow_bounds(budget)`; the LLM's last stage keeps r_2 = `infoflow_last_ratio(...)`, the paper's
    constraint recomputed for this model's depth and stage layers (`layers`: two decoder layers, default VFlowOpt's
    9 and 18 of 28 scaled), so the decoder layers see `budget` of the visual tokens on average (recycled tokens
    add to what the tower keeps: the realised share is measured and returned). recycle: as `vlmeff.patch`'s option
    (None: where the reference recycles). Optimiser:
    scikit-optimize's `Optimizer` (a Gaussian process, as the reference: `initial` random points first, then the
    acquisition's picks; `seed` its random_state), `trials` evaluations with a progress bar; it stops early after
    `patience` trials without improvement, or on Ctrl-C, returning the best so far. random_only: every trial a
    random point (the baseline the search is compared with). resume: a schedule this search wrote (a path or its
    dict; an interrupted or shorter run on the same model, data, budget and space): its trials are told to the
    optimiser, not run again, and the search goes on up to `trials` in all. Returns the schedule: the best setting,
    its objective (mean cosine), the average visual share the calibration samples saw with it, every trial.
    """
    import torch.nn.functional as F
    try:
        from skopt import Optimizer
        from skopt.space import Real
    except ImportError:
        raise ImportError("vlmeff.calibrate(method='infoflow') searches with scikit-optimize: "
                          "pip install 'vlmeff[search]'") from None

    from . import api
    from .pruners.stages import VFLOWOPT_25, default_schedule, infoflow_last_ratio
    if not isinstance(budget, float) or not 0.0 < budget < 1.0:
        raise ValueError(f"budget={budget!r}: the average share of visual tokens the decoder layers see, a float in "
                         "(0, 1)")
    if not (isinstance(trials, int) and trials >= 1 and isinstance(initial, int) and 1 <= initial):
        raise ValueError(f"trials={trials!r}, initial={initial!r}: ints >= 1")
    adapter = api.find_adapter(model)
    depth, first = adapter.decoder.depth, api.first_prunable_layer(adapter)
    if layers is None:
        layers = list(default_schedule("infoflow", depth, first)[0])
    given = layers
    layers = [layer % depth for layer in layers] if all(isinstance(v, int) for v in layers) else []
    layers = layers * 2 if len(layers) == 1 else layers                                    # one merged stage
    if len(layers) != 2 or not first <= layers[0] <= layers[1] < depth:
        raise ValueError(f"layers={given!r}: VFlowOpt's search places two LLM stages, decoder layers K1 <= K2 in "
                         f"[{first}, {depth - 1}] (or counted from the end)")
    recycles = adapter.multi_view if recycle is None else recycle
    space = infoflow_bounds(budget, entropy=adapter.pixel_patch_rows, recycle=recycles,
                            stages=1 if layers[0] == layers[1] else 2)
    batches = list(data)
    reference = [_last_hidden(model, batch)
                 for batch in tqdm(batches, desc="infoflow: unpatched", disable=not progress)]

    def setting(point):
        values = {"first_keep": 1.0, **dict(zip([name for name, _, _ in space], point))}
        r_2 = infoflow_last_ratio(budget, values["vit_keep"], values["first_keep"], layers, depth)
        ratios = [values["first_keep"], values["first_keep"] * r_2]
        stage_layers, stage_ratios = _stage_plan(layers, ratios)
        grid = {"grid": values["grid"]} if recycles else {}
        return values, dict(keep=values["vit_keep"], threshold=values["threshold"],
                                 entropy_weight=values.get("entropy_weight", 0.0), entropy=entropy, recycle=recycles,
                                 layers=stage_layers, ratios=stage_ratios, **grid)

    def objective(point):
        return objective_at(setting(point)[1])

    def objective_at(options):
        total = 0.0
        with api.patch(model, "infoflow", **options):
            for batch, expected in zip(batches, reference):
                total += float(F.cosine_similarity(_last_hidden(model, batch), expected, dim=-1).nan_to_num(0).sum())
        return total / sum(r.shape[0] for r in reference)

    optimizer = Optimizer([Real(low, high, name=name) for name, low, high in space], random_state=seed,
                          n_initial_points=trials + 1 if random_only else initial)
    history, best, since, start = [], None, 0, time.perf_counter()
    if resume is not None:
        history, spent = _resumed_trials(resume, model, budget, space)
        optimizer.tell([h["point"] for h in history], [-h["objective"] for h in history])
        best = max(history, key=lambda h: h["objective"])
        since, start = len(history) - 1 - history.index(best), start - spent
    bar = tqdm(total=trials, initial=len(history), desc=f"infoflow search (budget {budget})", disable=not progress)
    try:
        for _ in range(len(history), trials):
            point = [min(max(float(v), low), high) for v, (_, low, high) in zip(optimizer.ask(), space)]
            value = objective(point)
            optimizer.tell(point, -value)
            history.append({"point": point, "objective": value})
            improved = best is None or value > best["objective"]
            best, since = (history[-1], 0) if improved else (best, since + 1)
            bar.update(1)
            bar.set_postfix(best=f"{best['objective']:.5f}")
            if patience is not None and since >= patience:
                break
    except KeyboardInterrupt:
        if best is None:
            raise
    finally:
        bar.close()
    values, options = setting(best["point"])
    searched = dict(objective=best["objective"], ratios=list(options["ratios"]))
    counts = _visual_counts(model, batches, options)
    options["ratios"][-1] = _meeting_last_ratio(counts, budget, depth, options["ratios"])
    if options["ratios"] != searched["ratios"]:         # whole tokens: re-measured at the last ratio that meets it
        best = dict(best, objective=objective_at(options))
        counts = _visual_counts(model, batches, options)
    r_2 = options["ratios"][-1] / (options["ratios"][-2] if len(options["ratios"]) > 1 else values["first_keep"])
    return dict(method="infoflow", vlmeff_version=version(), model=model_identity(model), budget=budget,
                vit_keep=values["vit_keep"], llm_keep=[values["first_keep"], r_2], threshold=values["threshold"],
                entropy_weight=options["entropy_weight"], entropy=entropy, recycle=recycles,
                grid=options.get("grid", VFLOWOPT_25["grid"]), layers=options["layers"],
                ratios=options["ratios"], objective=best["objective"], average_share=average_share(counts, depth),
                searched=searched,
                samples=sum(r.shape[0] for r in reference), trials=len(history), initial=initial, seed=seed,
                optimizer="skopt GP" if not random_only else "random", seconds=time.perf_counter() - start,
                space=[list(s) for s in space], history=history)


def _resumed_trials(schedule, model, budget, space):
    """(the trials, the seconds spent) of an infoflow schedule to resume, checked against this search."""
    schedule = _read_schedule(schedule, "infoflow")
    _check_identity(schedule, model, "infoflow")
    if schedule.get("budget") != budget or schedule.get("space") != [list(s) for s in space] \
            or not schedule.get("history"):
        raise ValueError(f"resume: this schedule's search (budget {schedule.get('budget')!r}, space "
                         f"{schedule.get('space')!r}) is not this one (budget {budget!r}, space "
                         f"{[list(s) for s in space]!r}), or holds no trials")
    return [dict(h) for h in schedule["history"]], schedule.get("seconds", 0.0)        # the caller's stays as it is


def _stage_plan(layers, ratios):
    """Two LLM stages (layers K1 <= K2, shares of the LLM input kept) as the engine takes them: one stage when both
    land on one layer (a model shallower than the paper's), keeping the smaller share."""
    if layers[0] == layers[1]:
        return [layers[1]], [ratios[1]]
    return list(layers), list(ratios)


def _last_hidden(model, batch):
    """The final hidden state (after the last norm) [B, D] float32 of each sample's last attended prompt token (the
    mask is the language model's: a reduction before the LLM shortens the prompt)."""
    from .models import find_adapter
    decoder, seen = find_adapter(model).decoder, {}
    handles = [decoder.norm.register_forward_hook(lambda m, a, out: seen.update(out=out)),
               decoder.model.register_forward_pre_hook(lambda m, a, kw: seen.update(mask=kw.get("attention_mask")),
                                                       with_kwargs=True)]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    out, mask = seen["out"], seen["mask"]
    columns = torch.arange(out.shape[1], device=out.device)
    last = (torch.full(out.shape[:1], out.shape[1] - 1, device=out.device) if mask is None
            else torch.where(mask.bool().to(out.device), columns, -1).amax(1))
    return out[torch.arange(out.shape[0], device=out.device), last].float()


def _visual_counts(model, batches, options):
    """Per batch, what infoflow with `options` kept: (visual tokens per image at the input, per sample at the LLM's
    input, [(stage layer, per sample after it)])."""
    from . import api
    counts = []
    with api.patch(model, "infoflow", **options) as patch, torch.no_grad():
        for batch in batches:
            model(**batch)
            tokens = patch.stats["visual_tokens"]
            counts.append((tokens["input"], tokens["LLM input"], patch.stats["llm_stages"]))
    return counts


def average_share(counts, depth):
    """The share of the visual tokens the decoder layers see on average (token-weighted: summed over samples and
    layers, over depth x the input tokens) from `_visual_counts`."""
    seen, inputs = _token_layers(counts, depth)
    return seen / (inputs * depth)


def _token_layers(counts, depth):
    """(visual tokens summed over the samples and the first `depth` decoder layers, visual tokens at the input) from
    `_visual_counts`, with the per-sample stage arithmetic the stats use (`vlmeff.flops`)."""
    seen = inputs = 0
    for images, into_llm, stages in counts:
        inputs += sum(images)
        for b, n in enumerate(into_llm):
            drops = stage_drops(n, [(layer, kept[b]) for layer, kept in stages])
            seen += sum(layers * tokens for layers, tokens in layer_segments(n, drops, depth))
    return seen, inputs


def _meeting_last_ratio(counts, budget, depth, ratios):
    """The last LLM stage's ratio that brings the realised average share closest to `budget`: kept counts are
    whole tokens (n x ratio rounded per sample), so the paper's fractional constraint misses it by up to a token per
    layer; the earlier stages and the LLM's input do not depend on that ratio. A host search over the ratios j / n
    that keep exactly j of some sample's n tokens, at most the previous stage's ratio."""
    last = counts[0][2][-1][0]
    before_last, inputs_total = _token_layers([(i, n, s[:-1]) for i, n, s in counts], last)
    # visual tokens summed over the samples that the last stage should keep
    want = (budget * inputs_total * depth - before_last) / (depth - last)
    inputs = [n for _, into_llm, _ in counts for n in into_llm if n]
    ceiling = ratios[-2] if len(ratios) > 1 else 1.0
    candidates = sorted({min(ceiling, j / n) for n in set(inputs) for j in range(1, n + 1)} | {ceiling})
    return min(candidates, key=lambda r: (abs(sum(resolve_keep(r, n) for n in inputs) - want), abs(r - ratios[-1])))


def infoflow_settings(model, keep, options):
    """The budget and options of `vlmeff.patch(model, "infoflow", ...)`: as given, keep defaulting to the released
    25 % setting's r_v; with `schedule`, keep and the searched options (threshold, entropy_weight, entropy, recycle,
    grid, layers, ratios) from the file (checked against the model), which the call must not also give."""
    from .pruners.stages import VFLOWOPT_25
    schedule = options.get("schedule")
    if schedule is None:
        return (VFLOWOPT_25["vit_keep"] if keep is None else keep), options
    searched = ("threshold", "entropy_weight", "entropy", "recycle", "grid", "layers", "ratios")
    schedule = load_infoflow_schedule(schedule, model)
    # keep may name the budget the schedule was searched for (a sweep gives every run a budget), nothing else
    doubled = [n for n in searched if n in options] + (
        [f"keep={keep!r}"] if keep is not None and keep != schedule.get("budget") else [])
    if doubled:
        raise ValueError(f"method 'infoflow': schedule= sets keep (its tower's r_v), {', '.join(searched)}; do not "
                         f"also give {', '.join(doubled)} (keep may be the schedule's budget, "
                         f"{schedule.get('budget')!r})")
    return schedule["vit_keep"], dict(options, **{n: schedule[n] for n in searched})


def load_infoflow_schedule(schedule, model):
    """An `infoflow` schedule (a path or its loaded dict) checked against the model: ValueError naming what does not
    fit (another method, another model, malformed values)."""
    schedule = _read_schedule(schedule, "infoflow")
    _check_identity(schedule, model, "infoflow")
    numbers_ok = all(isinstance(schedule.get(n), (int, float)) and not isinstance(schedule.get(n), bool)
                     and math.isfinite(schedule[n]) for n in ("vit_keep", "threshold", "entropy_weight"))
    lists_ok = all(isinstance(schedule.get(n), list) and schedule[n] for n in ("layers", "ratios"))
    if (not numbers_ok or not lists_ok or schedule.get("entropy") not in ("pixels", "reference")
            or not isinstance(schedule.get("recycle"), bool) or not isinstance(schedule.get("grid"), (int, float))):
        raise ValueError("this infoflow schedule is malformed (vit_keep, threshold, entropy_weight, entropy, recycle, "
                         "grid, layers, ratios); write it with vlmeff.calibrate(model, data, method='infoflow', "
                         "budget=...)")
    return schedule


def _read_schedule(schedule, method):
    """A schedule dict from a path or a dict; ValueError for anything else or another method's file."""
    if isinstance(schedule, (str, os.PathLike)):
        path = Path(schedule)
        if not path.is_file():
            raise ValueError(f"schedule={str(schedule)!r} is not a file; write one with vlmeff.calibrate(model, data, "
                             f"method={method!r}, path=...)")
        try:
            schedule = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"schedule file {str(path)!r} is not a vlmeff calibration file: {error}") from None
    if not isinstance(schedule, dict):
        raise ValueError(f"schedule must be a calibration file or its dict; got {type(schedule).__name__}")
    if schedule.get("method") != method:
        raise ValueError(f"this schedule is for method {schedule.get('method')!r}, not {method!r}")
    return schedule


def _check_identity(schedule, model, method):
    """ValueError unless the schedule's model identity is this model's (`model_identity`)."""
    identity = model_identity(model)
    mismatched = {k: (v, identity.get(k)) for k, v in (schedule.get("model") or {}).items() if identity.get(k) != v}
    if "model" not in schedule or mismatched:
        found = ", ".join(f"{k}: file {a!r}, model {b!r}" for k, (a, b) in mismatched.items()) or "no model identity"
        raise ValueError(f"this schedule was calibrated on another model ({found}); calibrate this model with "
                         f"vlmeff.calibrate(model, data, method={method!r})")
