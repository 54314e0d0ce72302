"""`vlmeff.calibrate`: the one entry point of every method fitted on unlabelled calibration data, and the schedule
files it writes (model identity, method, fitted values, vlmeff version), which `vlmeff.patch(..., schedule=path)`
and `vlmeff.skip_experts(..., schedule=path)` read back and check against the model.

Methods: "debiased" (Attention Debiasing: the recency trend of a host scorer's attention, fitted here) and "modes"
(MoDES expert skipping, `vlmeff.experts.calibrate`). Calibration runs off the hot path: host reads are fine here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

CALIBRATED = ("debiased", "modes")


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
    method "modes": see `vlmeff.experts.calibrate.calibrate` (options target_skip, grid_size, n, seed).
    """
    if method == "modes":
        from .experts.calibrate import calibrate as calibrate_modes
        return calibrate_modes(model, data, method="modes", path=path, progress=progress, **options)
    if method != "debiased":
        raise ValueError(f"method={method!r}: vlmeff.calibrate fits {', '.join(CALIBRATED)}")
    schedule = calibrate_debiasing(model, data, progress=progress, **options)
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
    if isinstance(schedule, (str, os.PathLike)):
        path = Path(schedule)
        if not path.is_file():
            raise ValueError(f"schedule={str(schedule)!r} is neither a file nor a preset ({', '.join(PRESETS)}); "
                             "write one with vlmeff.calibrate(model, data, method='debiased', path=...)")
        try:
            schedule = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"schedule file {str(path)!r} is not a vlmeff calibration file: {error}") from None
    if not isinstance(schedule, dict):
        raise ValueError(f"schedule must be a calibration file, its dict or a preset; got {type(schedule).__name__}")
    if schedule.get("method") != method:
        raise ValueError(f"this schedule is for method {schedule.get('method')!r}, not {method!r}")
    if schedule.get("base") != base:
        raise ValueError(f"this schedule was fitted on base {schedule.get('base')!r}; got base={base!r}")
    if schedule.get("score_layer") != score_layer:
        raise ValueError(f"this schedule was fitted on the attention of decoder layer {schedule.get('score_layer')}; "
                         f"this patch scores at layer {score_layer} (calibrate with the same layer / layers)")
    identity = model_identity(model)
    mismatched = {k: (v, identity.get(k)) for k, v in (schedule.get("model") or {}).items() if identity.get(k) != v}
    if "model" not in schedule or mismatched:
        found = ", ".join(f"{k}: file {a!r}, model {b!r}" for k, (a, b) in mismatched.items()) or "no model identity"
        raise ValueError(f"this schedule was calibrated on another model ({found}); calibrate this model with "
                         "vlmeff.calibrate(model, data, method='debiased')")
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
