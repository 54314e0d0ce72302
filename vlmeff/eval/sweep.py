"""`sweep`: one model on one task, unpatched and with each method at each budget, into a table and two plots.

    from vlmeff.eval import sweep
    rows = sweep("tiny-llava-evqa", "easyvqa", ["cls", "cls:reduce=merge", "pool"], [0.25, 0.125], "runs/sweep")

Each run is one `evaluate` call with its own run folder under `out` (see `rundir`):

    out/unpatched/, out/cls-0.25/, out/cls_reduce=merge-0.25/, ...   one run folder each (the method spec, its
                                                                     ':' and ',' made '_', then the budget)
    out/sweep.md, out/sweep.csv          one row per run (`table_row`), the unpatched one first
    out/accuracy_vs_tokens.png           the main metric against the visual tokens kept, and
    out/accuracy_vs_prefill.png          against the measured prefill time: one line per method, the unpatched
                                         model dashed, a panel per question kind when the task has kinds

A re-run on the same folder reads finished runs back (nothing loaded or computed for them), resumes an
unfinished one where it stopped and refuses a folder holding another config's results, exactly as `evaluate`
does; overwrite=True computes every run anew. The model is loaded once, at the first run that computes
something, and every patch of the sweep is tried on it right then, so that a bad method option fails before the
long runs rather than after them.

A sweep can also be written as a YAML (or JSON) file, read by `read_spec`: the keys are `sweep`'s arguments.

    model: tiny-llava-evqa
    task: easyvqa
    methods: [cls, "cls:reduce=merge", random, pool]
    budgets: [0.25, 0.125, 64]
    limit: 1000
    out: runs/sweep
"""
from __future__ import annotations

import ast
import csv
import functools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ..pruners.select import check_keep
from ..registry import _did_you_mean, check_option_names, method_info
from . import runner
from .runner import DTYPES
from .tasks import TASKS, get_task

RUN_OPTIONS = ("data", "split", "dtype", "device_map", "max_new_tokens")   # passed on to every `evaluate`
MAIN_METRICS = {"pope": ("f1", "accuracy"), "mme": ("perception", "cognition")}   # default: ("accuracy",)
MEASURED = ("prefill_ms", "decode_ms_per_token", "ms_per_example", "prefill_speedup", "speedup")
PLOTS = {"accuracy_vs_tokens.png": ("visual_tokens", "visual tokens per example"),
         "accuracy_vs_prefill.png": ("prefill_ms", "measured prefill time per batch (ms)")}


@dataclass(frozen=True)
class Run:
    """One run of a sweep: `label` is "unpatched" or the method spec as given."""
    label: str
    method: str | None = None
    keep: int | float | None = None
    options: dict = field(default_factory=dict)

    @property
    def folder(self):
        """The run folder's name under the sweep's out: 'unpatched', 'cls-0.25', 'cls_reduce=merge-64'."""
        if self.method is None:
            return "unpatched"
        return f"{re.sub(r'[^A-Za-z0-9._=-]+', '_', self.label)}-{self.keep}"

    @property
    def name(self):
        """How the output names the run: 'unpatched', 'cls 0.25'."""
        return self.label if self.method is None else f"{self.label} {self.keep}"


def stage_specs(spec):
    """The method specs of a stacked spec: 'cls:keep=128+fastv' -> ['cls:keep=128', 'fastv'] (split at the '+'
    outside brackets); a single method's spec -> [spec]."""
    return split_top_level(spec, "+")


def stages_of(spec, keep):
    """`vlmeff.patch`'s list of (method, options) for a stacked spec: each stage's own keep=, else the run's."""
    stages = []
    for part in stage_specs(spec):
        name, options = parse_method_spec(part)
        stages.append((name, {"keep": keep, **options}))
    return stages


def parse_method_spec(spec):
    """'cls' or 'cls:reduce=merge,score_layers=(1,2)' -> ('cls', {'reduce': 'merge', 'score_layers': (1, 2)});
    values are Python literals where they parse as one, else strings; commas inside brackets belong to the value.
    ValueError for an option that is not key=value."""
    if len(stage_specs(spec)) > 1:              # stacked: the options live in each stage's spec
        for part in stage_specs(spec):
            parse_method_spec(part)
        return spec, {}
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, split_top_level(rest, ",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"method option {item!r} in {spec!r} is not key=value")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return name, options


def split_top_level(text, separator):
    """'a=1,b=[1,2],c=x' -> ['a=1', 'b=[1,2]', 'c=x'] for ",": split at the separators outside brackets and
    parentheses, so that list values such as layers=[1,3,5] stay whole."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += (char in "([") - (char in ")]")
        if char == separator and depth == 0:
            items.append(text[start:i])
            start = i + 1
    return items + [text[start:]]


def plan(methods, budgets):
    """The runs of a sweep: unpatched, then each method spec at each budget. ValueError / TypeError naming the
    spec or budget that is not accepted (an unknown method or option name, a budget out of range, a repeated
    one); option values are checked on the model, when it loads."""
    check_list("methods", methods, "method specs such as cls, cls:reduce=merge, visionzip:contextual=0.1")
    check_list("budgets", budgets, "budgets: int token counts >= 1 or float ratios in (0, 1]")
    for k, budget in enumerate(budgets):
        try:
            check_keep(budget)
        except (TypeError, ValueError) as error:
            raise type(error)(f"budgets[{k}]={budget!r} is not accepted: {error}") from None
    runs = [Run("unpatched")]
    for spec in methods:
        if not isinstance(spec, str):
            raise TypeError(f"method spec {spec!r} is not a string; accepted: a method name, then ':' and "
                            "key=value options, e.g. cls:reduce=merge")
        name, options = parse_method_spec(spec)
        for stage, stage_options in stages_of(spec, None):
            stage_options.pop("keep")
            check_option_names(method_info(stage), stage_options)
        runs += [Run(spec, name, budget, options) for budget in budgets]
    refuse_repeats(runs)
    return runs


def check_list(key, values, accepted):
    if not isinstance(values, (list, tuple)) or not values:
        raise TypeError(f"{key}={values!r} is not accepted; accepted: a non-empty list of {accepted}")


def refuse_repeats(runs):
    """ValueError for two runs with one folder: a spec or budget given twice (or two specs spelt alike)."""
    seen = {}
    for run in runs:
        if run.folder in seen:
            raise ValueError(f"runs {seen[run.folder]!r} and {run.name!r} would share the run folder "
                             f"{run.folder!r}; give each method spec and budget once")
        seen[run.folder] = run.name


def sweep(model, task, methods, budgets, out, limit=None, batch_size=16, overwrite=False, *, progress=True,
          on_run=None, **run_options) -> list[dict]:
    """Evaluates `model` on `task` unpatched and with each of `methods` (specs as `parse_method_spec` reads them)
    at each of `budgets` (`vlmeff.patch`'s keep); returns one row per run (`table_row`) and, with an `out`
    folder, writes the run folders, the table and the plots there (see the module's docstring). out=None: runs
    in memory, nothing saved or resumed. limit, batch_size, overwrite and run_options (data, split, dtype,
    device_map, max_new_tokens) are `evaluate`'s. on_run(row, loaded): called after each run, loaded telling
    whether it was read back from `out` rather than computed."""
    spec = get_task(task)
    unknown = sorted(set(run_options) - set(RUN_OPTIONS))
    if unknown:
        raise TypeError(f"sweep got unknown option(s) {', '.join(unknown)}; accepted: {', '.join(RUN_OPTIONS)}"
                        f"{_did_you_mean(unknown[0], RUN_OPTIONS)}")
    runs = plan(methods, budgets)
    loader = shared_loader(model, runs, run_options.get("dtype", "auto"), run_options.get("device_map"))
    rows = []
    for run in tqdm(runs, desc=f"sweep {spec.name}", unit="run", disable=not progress):
        folder = Path(out) / run.folder if out is not None else None
        loaded = not overwrite and finished(folder)
        results = runner.evaluate(model, spec.name, method=run.method, keep=run.keep, limit=limit, out=folder,
                           batch_size=batch_size, overwrite=overwrite, progress=progress, reuse_finished=True,
                           loader=loader, **run_options, **run.options)
        rows.append(table_row(run, results, rows[0] if rows else None))
        if on_run is not None:
            on_run(rows[-1], loaded)
    if out is not None:
        write_outputs(rows, Path(out), title(results), main_metrics(spec.name)[0])
    return rows


def finished(folder):
    """Whether a run folder holds a finished run (which a sweep reads back instead of computing it)."""
    return folder is not None and (folder / "results.json").exists()


def shared_loader(model, runs, dtype, device_map):
    """A function that loads the model once (the first call; later calls return the same pair) and tries every
    patch of the sweep on it, so that a bad option value is an error before any run computes."""
    @functools.cache
    def load():
        loaded = runner.load_model(model, dtype, device_map)
        for run in runs[1:]:
            runner.patched(loaded[0], run.method, run.keep, run.options).unpatch()
        return loaded
    return load


# -- the table ----------------------------------------------------------------------------------------------------
def main_metrics(task):
    """The metrics a sweep's table and plots show for a task, the plotted one first."""
    return MAIN_METRICS.get(task, ("accuracy",))


def kind_value(task, kind, values):
    """The per-kind figure of a kind's metrics: the first main metric; MME's kinds are its subtasks, whose
    figure is the subtask's score (acc + acc+)."""
    if task == "mme":
        return values["subtasks"][kind]["score"]
    return values[main_metrics(task)[0]]


def kind_metric(task):
    return "score" if task == "mme" else main_metrics(task)[0]


def table_row(run, results, unpatched=None):
    """The row of one run, from its results (evaluate's, as results.json holds them), flat, in column order:
    method, keep, visual_tokens (mean per example), the task's main metrics, '<metric>:<kind>' per kind,
    prefill_flops_ratio, prefill_ms (mean per batch), decode_ms_per_token, ms_per_example (the whole generate
    call per example), prefill_speedup and speedup (the unpatched row's prefill_ms and ms_per_example over this
    row's), n."""
    task, efficiency = results["config"]["task"], results["efficiency"]
    timing = efficiency["timing"]
    row = {"method": run.label, "keep": run.keep, "visual_tokens": efficiency["visual_tokens"]}
    row.update((name, results["metrics"][name]) for name in main_metrics(task))
    row.update((f"{kind_metric(task)}:{kind}", kind_value(task, kind, values))
               for kind, values in results.get("metrics_per_kind", {}).items())
    row.update(prefill_flops_ratio=efficiency["prefill_flops_ratio"], prefill_ms=timing["prefill_ms"],
               decode_ms_per_token=timing["decode_ms_per_token"],
               ms_per_example=timing.get("generate_ms_per_example"))      # absent in run folders older than it
    base = unpatched or row
    row["prefill_speedup"] = ratio(base["prefill_ms"], row["prefill_ms"])
    row["speedup"] = ratio(base["ms_per_example"], row["ms_per_example"])
    row["n"] = results["n"]
    return row


def ratio(numerator, denominator):
    return None if numerator is None or not denominator else numerator / denominator


def kinds(row):
    """The per-kind columns of a row: [(column key, kind)]."""
    return [(key, key.partition(":")[2]) for key in row if ":" in key]


def columns(row):
    """(key, Markdown header, format) of each column of a row."""
    fixed = {"method": ("method", "s"), "keep": ("keep", "g"), "visual_tokens": ("visual tokens", ".1f"),
             "prefill_flops_ratio": ("prefill FLOPs", ".3f"), "prefill_ms": ("prefill ms", ".2f"),
             "decode_ms_per_token": ("decode ms/token", ".2f"), "ms_per_example": ("ms/example", ".2f"),
             "prefill_speedup": ("prefill speedup", ".2f"), "speedup": ("speedup", ".2f"), "n": ("n", "d")}
    metric_format = ".1f" if "perception" in row else ".4f"       # MME's points, else fractions
    labels = dict(kinds(row))
    return [(key, *fixed.get(key, (labels.get(key, key), metric_format))) for key in row]


def cell(value, fmt):
    return "-" if value is None else format(value, fmt)


def markdown(rows, heading):
    """The table as Markdown: a heading line, then a row per run."""
    cols = columns(rows[0])
    lines = [f"# {heading}", "", "| " + " | ".join(header for _, header, _ in cols) + " |",
             "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(row[key], fmt) for key, _, fmt in cols) + " |" for row in rows]
    notes = ("visual tokens, prefill FLOPs (LLM prefill, patched / unpatched): means per example; prefill ms: "
             "mean per batch, to the first new token; ms/example: the whole generate call per example; speedups: "
             "the unpatched run's time over the run's, measured; per-kind columns: "
             + (", ".join(f"{kind} = {key}" for key, kind in kinds(rows[0])) or "none"))
    return "\n".join(lines + ["", notes, ""])


def title(results):
    c, timing = results["config"], results["efficiency"]["timing"]
    return (f"{c['model']} on {c['task']} ({c['split']}, {results['n']} examples, batch {c['batch_size']}, "
            f"{timing['device']}, {timing['timer']})")


def write_outputs(rows, out, heading, metric):
    """sweep.md, sweep.csv and the plots of `metric` in `out`."""
    (out / "sweep.md").write_text(markdown(rows, heading))
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    for name, (x_key, x_label) in PLOTS.items():
        accuracy_figure(rows, metric, x_key, x_label, heading).savefig(out / name, dpi=110)


# -- the plots ----------------------------------------------------------------------------------------------------
def panels(row, metric):
    """(title, column key, metric) of each panel: all examples with `metric`, then one per kind."""
    return [("all examples", metric, metric)] + [(kind, key, key.partition(":")[0]) for key, kind in kinds(row)]


def accuracy_figure(rows, metric, x_key, x_label, heading):
    """A matplotlib Figure: per panel (`panels`), each method's metric against row[x_key] over its budgets (a line), the
    unpatched row as a dashed horizontal line (and a cross at its own x). Up to 4 panels a line."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    shown = panels(rows[0], metric)
    across = min(4, len(shown))
    down = math.ceil(len(shown) / across)
    figure = Figure(figsize=(4.2 * across, 3.8 * down), layout="constrained")
    axes = figure.subplots(down, across, squeeze=False).ravel()
    unpatched, patched = rows[0], rows[1:]
    for ax, (name, key, ylabel) in zip(axes, shown):
        ax.axhline(unpatched[key], ls="--", color="gray", label="unpatched")
        ax.plot([unpatched[x_key]], [unpatched[key]], "x", color="gray")
        for i, method in enumerate(dict.fromkeys(r["method"] for r in patched)):
            points = [(r[x_key], r[key]) for r in patched if r["method"] == method]
            # matplotlib's colours repeat after 10: methods 11-20 get squares on dashed lines, 21-30 triangles, dotted
            ax.plot(*zip(*points), color=colormaps["tab10"].colors[i % 10], marker="os^"[i // 10 % 3],
                    ls=("-", "--", ":")[i // 10 % 3], label=method)
        ax.set(xlabel=x_label, ylabel=ylabel, title=name)
        if x_key == "visual_tokens":          # budgets halve from one to the next: even steps on a log2 axis
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
    for ax in axes[len(shown):]:
        ax.set_visible(False)
    axes[0].legend(fontsize="small")
    figure.suptitle(heading, fontsize="medium")
    return figure


# -- a sweep written as a file ------------------------------------------------------------------------------------
def is_text(value):
    return isinstance(value, str) and value != ""


def is_count(minimum):
    return lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def optional(check):
    return lambda value: value is None or check(value)


def list_of(check):
    return lambda value: isinstance(value, list) and bool(value) and all(map(check, value))


def is_budget(value):
    try:
        check_keep(value)
    except (TypeError, ValueError):
        return False
    return True


def one_of(names):
    return lambda value: isinstance(value, str) and value in names


SPEC_KEYS = {    # key -> (check of the value as YAML reads it, what is accepted)
    "model": (is_text, "an embedded model name, a local path or a hub name"),
    "task": (one_of(TASKS), f"one of {', '.join(TASKS)}"),
    "methods": (list_of(is_text), "a non-empty list of method specs such as cls, cls:reduce=merge"),
    "budgets": (list_of(is_budget), "a non-empty list of budgets: int token counts >= 1 or float ratios in (0, 1]"),
    "out": (is_text, "a folder"),
    "limit": (optional(is_count(0)), "an integer >= 0 (0 or null: all examples)"),
    "batch_size": (is_count(1), "an integer >= 1"),
    "overwrite": (lambda value: isinstance(value, bool), "true or false"),
    "data": (optional(is_text), "a dataset: a hub name or a local path, or null (the task's)"),
    "split": (optional(is_text), "a split name, or null (the task's)"),
    "dtype": (one_of(DTYPES), f"one of {', '.join(DTYPES)}"),
    "device_map": (optional(is_text), "from_pretrained's device_map, e.g. auto, or null"),
    "max_new_tokens": (optional(is_count(1)), "an integer >= 1, or null (the task's)"),
}


def read_spec(path):
    """The `sweep` arguments a YAML or JSON file holds (a mapping of SPEC_KEYS). ValueError naming the file and
    the unknown key (with the closest known one) or the key whose value is not accepted, and what is."""
    import yaml

    try:
        spec = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not YAML or JSON: {error}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} holds {type(spec).__name__} {spec!r}; accepted: a mapping of "
                         f"{', '.join(SPEC_KEYS)}")
    for key, value in spec.items():
        if key not in SPEC_KEYS:
            raise ValueError(f"{path}: unknown key {key!r}; accepted: {', '.join(SPEC_KEYS)}"
                             f"{_did_you_mean(str(key), SPEC_KEYS)}")
        check, accepted = SPEC_KEYS[key]
        if not check(value):
            raise ValueError(f"{path}: {key}={value!r} is not accepted; accepted: {accepted}")
    return spec
