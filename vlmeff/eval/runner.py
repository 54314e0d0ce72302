"""`evaluate`: one LVLM on one task, unpatched or patched, predictions saved as they are made.

    results = evaluate("tiny-llava-evqa", "easyvqa", method="cls", keep=64, limit=256, out="runs/cls64")

Examples go in batches of `batch_size` on a fixed grid over the selected examples (the first `limit`; with
`shard=(rank, world)`, every `world`-th batch from `rank`, see `Plan.shard`), each batch one greedy `generate`
call on left-padded prompts built with the processor's chat template. `out/` (see `rundir`) gets each batch's
predictions as soon as they exist; a re-run on it computes only the batches that miss some prediction, whole, so
every example is predicted in the same batch, with the same padding, as in an uninterrupted run: the final results
are the same (the measured latencies and memory aside). The patch is applied once around the loop and removed after
it, also when the loop fails.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .. import api, zoo
from ..models import find_adapter
from ..registry import method_info
from . import metrics
from .efficiency import BatchTimer, example_counts, peak_memory_bytes, reset_peak_memory, summarize
from .rundir import MemoryRun, RunFolder
from .sources import load_examples
from .tasks import Task, get_task

DTYPES = ("auto", "float32", "float16", "bfloat16")


def evaluate(model, task, method=None, keep=None, limit=None, out=None, batch_size=16, overwrite=False, *,
             data=None, split=None, dtype="auto", device_map=None, max_new_tokens=None, shard=None, progress=True,
             reuse_finished=False, loader=None, **method_options) -> dict:
    """Accuracy and cost of `model` on `task`; returns (and writes to out/results.json) the results.

    model: an embedded name (`vlmeff.zoo.names()`), a local path or hub name (loaded with
    `AutoModelForImageTextToText.from_pretrained(model, dtype=dtype, device_map=device_map)` and
    `AutoProcessor`; see `load_model`), or a loaded (model, processor) pair. task: a name of
    `vlmeff.eval.TASKS`; data: its dataset (hub name or local path, see `sources`; default the task's); split:
    default the task's. method / keep / method_options: as `vlmeff.patch` takes them (method None: unpatched).
    limit: the first N examples (None or 0: all); shard: (rank, world) to take every world-th batch of them
    from rank (`Plan.shard`; `vlmeff.eval.evaluate_parallel` runs all the shards and scores their union).
    max_new_tokens: default the task's. out: the folder to save to and resume from (None: nothing saved); a
    folder holding a finished result or another config's results is a FileExistsError unless overwrite=True;
    with reuse_finished=True a finished result of this same config is returned as stored (nothing is loaded or
    computed; `vlmeff sweep` re-runs so). loader: a function () -> (model, processor) called instead of
    `load_model(model, dtype, device_map)` when a batch is to be computed, for a caller that holds that model
    already (a sweep loads it once for all its runs); the run records `model`'s name all the same.

    Returns {"config", "n", "metrics" (metrics.score), "metrics_per_kind" (kind -> metrics, for tasks with
    kinds), "efficiency" (see `efficiency`: per-example means of visual tokens, prompt tokens, prefill FLOPs and
    KV-cache bytes, patched and unpatched, and "timing": prefill / decode latency and peak memory)}.
    """
    spec, config = checked_config(model, task, method, keep, limit, batch_size, data, split, dtype, max_new_tokens,
                                  shard, method_options)
    run = RunFolder(out, config, overwrite, reuse_finished) if out is not None else MemoryRun()  # before data loads
    if run.finished is not None:
        return run.finished
    plan = plan_run(spec, config)
    compute(plan, run, loader or (lambda: load_model(model, dtype, device_map)), progress)
    results = run_results(plan, run.predictions(), run.timings())
    run.finish(results)
    return results


@dataclass(frozen=True)
class Plan:
    """What a run computes: its task, config (see `run_config`), examples, and the batches of the batch grid
    (see `batch_grid`) it computes: (batch number, [example indices])."""
    spec: Task
    config: dict
    examples: Sequence
    batches: list

    @property
    def positions(self):
        return [i for _, batch in self.batches for i in batch]

    def shard(self, rank, world):
        """The share of process `rank` of `world`: every world-th batch from `rank`. Whole batches, so that each
        example is in the same batch, with the same padding, as in the one-process run: the shards' predictions
        together are that run's."""
        return Plan(self.spec, {**self.config, "shard": [rank, world]}, self.examples, self.batches[rank::world])


def checked_config(model, task, method, keep, limit, batch_size, data, split, dtype, max_new_tokens, shard,
                   options):
    """(the `Task`, the run's config): the arguments checked (ValueError) before anything loads."""
    spec = get_task(task)
    check_run(spec, method, keep, data, dtype, limit, batch_size, shard)
    return spec, run_config(model, spec, method, keep, options, data, split, dtype, limit, shard, batch_size,
                            max_new_tokens or spec.max_new_tokens)


def plan_run(spec, config):
    """The `Plan` of a run of `config`: its examples (opened here, built on access), its batches (its shard's)."""
    examples = load_examples(spec, config["data"], config["split"])
    whole = Plan(spec, {**config, "shard": None}, examples,
                 batch_grid(len(examples), config["limit"], config["batch_size"]))
    return whole.shard(*config["shard"]) if config["shard"] else whole


def compute(plan, run, loader, progress=True, desc=None):
    """Predicts the batches of `plan` that miss a prediction in `run` (whole, see the module's docstring),
    calling loader() -> (model, processor) only if there is one."""
    config, done = plan.config, run.predictions()
    pending = [(b, batch) for b, batch in plan.batches if any(i not in done for i in batch)]
    if not pending:
        return
    loaded, processor = loader()
    method, keep, options = config["method"], config["keep"], config["options"]
    label = f"{method} {keep}" if method is not None else "unpatched"
    with tqdm(total=len(plan.positions), initial=sum(i in done for i in plan.positions),
              desc=desc or f"{plan.spec.name} {label}", unit="q", disable=not progress, leave=False) as bar:
        with patched(loaded, method, keep, options) as handle:
            predict(loaded, processor, plan.examples, pending, done, run, handle, config["max_new_tokens"], bar)


def run_results(plan, predictions, timings, processes=1):
    """results.json of `plan`'s examples, from their prediction lines (index -> line) and the batch timings."""
    lines = [predictions[i] for i in plan.positions]
    return {"config": plan.config, "n": len(lines), **scores(plan.spec.name, lines),
            "efficiency": summarize(lines, timings, processes)}


def check_run(spec, method, keep, data, dtype, limit, batch_size, shard):
    """The arguments the run needs before anything loads; ValueError naming the value and what is accepted."""
    if method is None and keep is not None:
        raise ValueError(f"keep={keep!r} needs a method; methods: {', '.join(m.name for m in api.methods())}")
    if method is not None:
        from .sweep import stage_specs         # a stacked spec 'cls:keep=128+fastv': every stage's method name
        for part in stage_specs(method):
            method_info(part.partition(":")[0])    # the options are checked against the model
    if data is not None and spec.embedded:
        raise ValueError(f"task {spec.name!r} reads the embedded data (vlmeff.data); data= is for the "
                         "HF dataset tasks")
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; accepted: {', '.join(DTYPES)}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit={limit} is negative; accepted: None or 0 (all examples), or a count >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; accepted: an integer >= 1")
    if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
        raise ValueError(f"shard={shard!r}; accepted: (rank, world) with 0 <= rank < world")


def run_config(model, spec, method, keep, options, data, split, dtype, limit, shard, batch_size, max_new_tokens):
    """Everything that decides the predictions: a folder resumes only a run of the same config. The batch size
    is part of it (padding changes a batch's numbers slightly)."""
    return {"model": model_name(model), "task": spec.name, "data": str(data) if data else spec.hub,
            "split": split or spec.split, "method": method, "keep": keep, "options": dict(sorted(options.items())),
            "limit": limit or None, "shard": list(shard) if shard else None, "batch_size": batch_size,
            "max_new_tokens": max_new_tokens,
            "dtype": str(model[0].dtype).removeprefix("torch.") if isinstance(model, tuple) else dtype}


def model_name(model):
    """The name a run records: the name or path given, or a loaded model's class and origin."""
    if isinstance(model, tuple):
        return f"{type(model[0]).__name__}({getattr(model[0], 'name_or_path', '') or 'in memory'})"
    return str(model)


def batch_grid(count, limit, batch_size):
    """The batches of a run, [(batch number, [example indices])]: the first `limit` examples (all without one)
    cut into consecutive batches of `batch_size`."""
    positions = list(range(min(limit, count) if limit else count))
    return [(b, positions[start:start + batch_size]) for b, start in enumerate(range(0, len(positions), batch_size))]


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model, dtype="auto", device_map=None):
    """(model, processor) for an embedded name, a local path or hub name (from_pretrained), or a loaded pair
    (returned as it is). device_map: from_pretrained's (transformers needs accelerate for it); None loads the
    model whole and moves it to cuda if there is one, else leaves it on the cpu. ValueError for a model that
    answers no questions (the embedded ViT classifier)."""
    if isinstance(model, tuple):
        return model
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if model in zoo.names():
        loaded, processor = zoo.load(model, default_device() if device_map in (None, "auto") else device_map)
        loaded = loaded if dtype == "auto" else loaded.to(torch_dtype)
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        placement = {"device_map": device_map} if device_map is not None else {}
        loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=torch_dtype, **placement).eval()
        loaded = loaded if device_map is not None else loaded.to(default_device())
        processor = AutoProcessor.from_pretrained(model)
    if find_adapter(loaded).kind == "vit":
        raise ValueError(f"{model} is a ViT classifier; vlmeff eval answers questions with a vision-language "
                         f"model, e.g. {', '.join(n for n in zoo.names() if 'vit' not in n)}")
    return loaded, processor


def patched(model, method, keep, options):
    """`vlmeff.patch(model, ...)` as a context (removed when it exits), or a context holding None unpatched."""
    if method is None:
        return contextlib.nullcontext()
    from .sweep import stage_specs, stages_of
    if len(stage_specs(method)) > 1:           # stacked methods: one Patch, keep for the stages without their own
        if options:
            raise ValueError(f"options {options} next to the stacked method spec {method!r}: put them in the spec "
                             "of their stage, e.g. cls:keep=128+fastv:layer=2")
        return api.patch(model, stages_of(method, keep))
    return api.patch(model, method=method, keep=keep, **options)


def predict(model, processor, examples, pending, done, run, handle, max_new_tokens, bar):
    """Generates the pending batches ((batch number, [example indices])) and appends, per batch, the lines of
    the examples not yet done and the batch's timing, after one untimed warm-up (`warm_up`)."""
    adapter = find_adapter(model)
    value_bytes = model.get_input_embeddings().weight.element_size()
    device = model.device
    warm_up(model, processor, [examples[i] for i in pending[0][1]], min(max_new_tokens, 2))
    for number, batch in pending:
        items = [examples[i] for i in batch]
        timer = BatchTimer(device)
        reset_peak_memory(device)
        answers, inputs = generate_batch(model, processor, items, max_new_tokens, timer)
        counts = example_counts(inputs, [len(x.images) for x in items], adapter.image_token_id,
                                handle.stats if handle is not None else None, adapter.text_config, value_bytes)
        lines = [{"index": i, "prediction": answer, "reference": x.reference, "kind": x.kind, **count}
                 for i, answer, x, count in zip(batch, answers, items, counts) if i not in done]
        run.append_predictions(lines)
        run.append_timing({"batch": number, "size": len(batch), **timer.record(),
                           "peak_memory_bytes": peak_memory_bytes(device), "device": str(device)})
        bar.update(len(lines))


def warm_up(model, processor, items, max_new_tokens):
    """One untimed generate call on a batch, so that the first measured batch pays no one-time cost: on a GPU
    the kernels, the allocator and cuBLAS / cuDNN's choices; on the CPU too (the first batch of a process
    measured twice as slow as the next on tiny-llava-evqa, which made the unpatched baseline of a sweep look
    slow); and a patch's per-device tensors, built at its first call."""
    inputs = chat_inputs(processor, items, model)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)


def generate_batch(model, processor, items, max_new_tokens, timer):
    """Greedy answers to a batch of `Example`s -> (answers, the processor's inputs), timed by `timer`."""
    inputs = chat_inputs(processor, items, model)
    timer.start()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, streamer=timer)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return [a.strip() for a in answers], inputs


def chat_inputs(processor, items, model):
    """The processor's inputs for a batch of `Example`s, on the model's device (floats in its dtype): each prompt
    the user turn [image x n, prompt text] in the processor's chat template, padded on the left. A batch of
    text-only examples (lmms-eval has some) passes no images: processors index the first one otherwise."""
    messages = [[{"role": "user", "content": [*({"type": "image"} for _ in x.images),
                                              {"type": "text", "text": x.prompt}]}] for x in items]
    texts = processor.apply_chat_template(messages, add_generation_prompt=True)
    images = [x.images for x in items] if any(x.images for x in items) else None
    inputs = processor(images=images, text=texts, padding=True, padding_side="left", return_tensors="pt")
    return inputs.to(device=model.device, dtype=model.dtype)


def scores(task, lines):
    """{"metrics": over all lines, "metrics_per_kind": kind -> metrics (only for tasks whose examples have kinds)}."""
    result = {"metrics": metrics.score(task, [x["prediction"] for x in lines], [x["reference"] for x in lines])}
    kinds = sorted({x["kind"] for x in lines if x["kind"] is not None})
    if kinds:
        result["metrics_per_kind"] = {
            kind: metrics.score(task, [x["prediction"] for x in lines if x["kind"] == kind],
                                [x["reference"] for x in lines if x["kind"] == kind]) for kind in kinds}
    return result
