"""The `vlmeff` command line.

    vlmeff methods                      # the method registry
    vlmeff showcase                     # easy-VQA accuracy and time of tiny-llava-evqa, unpatched vs patched
    vlmeff showcase --model tiny-llava-scenes   # the same on multi-object scenes, per question kind
    vlmeff eval --task pope --model llava-hf/llava-1.5-7b-hf --method cls --keep 64 --out runs/pope-cls64
    torchrun --nproc_per_node 4 -m vlmeff eval ...     # data parallel: 4 processes, one result (vlmeff.eval.parallel)
    vlmeff sweep --task pope --model llava-hf/llava-1.5-7b-hf --methods cls visionzip --budgets 192 128 64 \
        --out runs/pope-sweep           # or: vlmeff sweep --config sweep.yaml (see vlmeff.eval.sweep)
    vlmeff calibrate --model tiny-llava-scenes --method debiased --split train --out debias.json   # vlmeff.calibrate
    vlmeff calibrate --model tiny-llava-evqa --method infoflow --budget 0.25 --n 30 --out infoflow-25.json
"""
import argparse
from pathlib import Path

import torch
from tqdm import tqdm

import vlmeff

from . import zoo

SHOWCASE_MODELS = [name for name in zoo.names() if name != "tiny-vit-evqa"]  # the ViT answers no questions


def parse_method(spec):
    """'cls' or 'cls:reduce=merge,score_layers=1' -> ('cls', {'reduce': 'merge', 'score_layers': 1})."""
    from .eval.sweep import parse_method_spec

    try:
        return parse_method_spec(spec)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def cmd_methods(args):
    print(f"{'method':10s} {'acts in':28s} {'models':10s} description")
    for m in vlmeff.methods():
        print(f"{m.name:10s} {', '.join(m.acts_in):28s} {', '.join(m.model_kinds):10s} {m.description}")
        print(f"{'':10s} paper: {m.paper}")
        for o in m.options.values():
            print(f"{'':10s} {o.name}={o.default!r}: {o.accepted_text()}")


def cmd_showcase(args):
    """The sweep preset on an embedded model and the test split of its dataset: the rows as they come, with the
    columns showcase has always printed."""
    from .eval import get_task, load_examples
    from .eval.sweep import plan, sweep

    task = zoo.dataset(args.model)
    total = len(load_examples(get_task(task)))       # the test split, built once for the count and the runs
    out = Path(args.out) if args.out else None
    print(f"{args.model} on {subset_line(min(args.limit or total, total), total, task)}")
    print(f"batch {args.batch_size}, {torch.get_num_threads()} CPU threads")
    try:
        print_loaded_runs(out, plan(args.methods, args.budgets), args.overwrite)
        print(f"{'method':22s} {'keep':>7s} {'visual tokens':>13s} {'accuracy':>9s} {'ms/question':>12s} "
              f"{'speedup':>8s} {'LLM FLOPs':>10s}")
        sweep(args.model, task, args.methods, args.budgets, out, limit=args.limit, batch_size=args.batch_size,
              overwrite=args.overwrite, on_run=print_showcase_row)
    except (FileExistsError, TypeError, ValueError) as error:   # a refused folder, a bad method spec or option
        raise SystemExit(f"vlmeff showcase: {error}") from error
    if out:
        print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)} and a run folder per run")


OUTPUTS = ("sweep.md", "sweep.csv", "accuracy_vs_tokens.png", "accuracy_vs_prefill.png")
DATASET_NAMES = {"easyvqa": "easy-VQA", "scenes": "scenes"}


def subset_line(n, total, data="easyvqa"):
    """Which questions a showcase measures: README's accuracy table is the full split, the default run is not."""
    name = DATASET_NAMES[data]
    if n >= total:
        return f"all {total} {name} test questions (the full split, as README's accuracy table)"
    return (f"the first {n} of {total} {name} test questions (--limit {n}); README's accuracy table is the full "
            f"split (--limit 0), so its figures differ from these")


def print_loaded_runs(out, runs, overwrite):
    """Says which runs an earlier sweep or showcase in `out` finished, and so are read back, not measured."""
    from .eval.sweep import finished

    reused = [run.name for run in runs if out and not overwrite and finished(out / run.folder)]
    if reused:
        print(f"{len(reused)} of {len(runs)} runs loaded from {out}, computed earlier and not re-measured "
              f"({', '.join(reused)}); --overwrite recomputes them, or choose another --out folder")


def print_showcase_row(row, loaded):
    from .eval.sweep import cell, kinds

    by_kind = "  " + " ".join(f"{kind} {row[key]:.3f}" for key, kind in kinds(row))
    tqdm.write(f"{row['method']:22s} {row['keep'] or '-':>7} {row['visual_tokens']:>13g} {row['accuracy']:9.4f} "
               f"{cell(row['ms_per_example'], '.2f'):>12} {cell(row['speedup'], '.2f'):>8} "
               f"{row['prefill_flops_ratio']:10.2f}" + by_kind + ("  (loaded)" * loaded))


def cmd_sweep(args):
    from .eval.sweep import plan, read_spec, sweep

    try:
        settings = sweep_settings(args, read_spec(args.config) if args.config else {})
        print_loaded_runs(Path(settings["out"]), plan(settings["methods"], settings["budgets"]),
                          settings["overwrite"])
        sweep(**settings)
    except (FileExistsError, TypeError, ValueError) as error:   # a bad file, a refused folder, a bad method option
        raise SystemExit(f"vlmeff sweep: {error}") from error
    out = Path(settings["out"])
    print((out / "sweep.md").read_text())
    print(f"wrote {', '.join(str(out / name) for name in OUTPUTS)} and a run folder per run")


SWEEP_DEFAULTS = {"model": "tiny-llava-evqa", "batch_size": 16, "overwrite": False}
SWEEP_REQUIRED = ("methods", "budgets", "out")


def sweep_settings(args, from_file):
    """sweep()'s arguments: the defaults, updated with the file's (--config), updated with the options given on
    the command line. The task defaults to an embedded model's dataset."""
    given = {key: value for key, value in vars(args).items() if key not in ("command", "run", "config")}
    settings = {**SWEEP_DEFAULTS, **from_file, **given}
    missing = [key for key in SWEEP_REQUIRED if key not in settings]
    if missing:
        raise SystemExit(f"vlmeff sweep: missing {', '.join(missing)}; give them as options "
                         f"({', '.join('--' + key for key in missing)}) or as keys of the --config file")
    if "task" not in settings:
        if settings["model"] not in zoo.names():
            raise SystemExit(f"vlmeff sweep: --task (or the file's task) is needed for {settings['model']!r}, "
                             f"which is not an embedded model")
        settings["task"] = zoo.dataset(settings["model"])
    return settings


def cmd_eval(args):
    """One process, or each process of torchrun / accelerate launch (`vlmeff.eval.parallel`): the first prints."""
    from .eval import evaluate_parallel
    from .eval.parallel import launcher_ranks

    method, options = args.method or (None, {})
    try:
        results = evaluate_parallel(args.model, args.task, method=method, keep=args.keep, limit=args.limit,
                                    out=args.out, batch_size=args.batch_size, overwrite=args.overwrite,
                                    data=args.data, split=args.split, dtype=args.dtype, device_map=args.device_map,
                                    max_new_tokens=args.max_new_tokens, **options)
    except (FileExistsError, ValueError) as error:    # a refused folder, a bad task / split / method option
        raise SystemExit(f"vlmeff eval: {error}") from error
    if launcher_ranks()[0] == 0:
        print_results(results, Path(args.out) / "results.json")


def cmd_calibrate(args):
    """Fit a method's calibration on questions of a task's split (default train) and write its schedule file."""
    from .calibration import calibrate, plot_trend, task_batches
    from .eval.runner import load_model

    task = args.task or (zoo.dataset(args.model) if args.model in zoo.names() else None)
    if task is None:
        raise SystemExit(f"vlmeff calibrate: --task is needed for {args.model!r}, which is not an embedded model")
    if Path(args.out).exists() and not args.overwrite:
        raise SystemExit(f"vlmeff calibrate: {args.out} exists; pass --overwrite to replace it")
    try:
        model, processor = load_model(args.model, args.dtype)
        batches = task_batches(model, processor, task, args.split, args.n, args.batch_size, args.seed, args.data)
        if args.method == "debiased":
            options = {"base": args.base, "layer": args.layer, "layers": args.layers}
        else:
            options = {"budget": args.budget, "trials": args.trials, "initial": args.initial,
                       "seed": args.search_seed, "patience": args.patience, "layers": args.layers,
                       "resume": args.resume}
        schedule = calibrate(model, batches, method=args.method, path=args.out, **options)
        if args.plot and args.method == "debiased":
            plot_trend(schedule, args.plot)
    except ValueError as error:
        raise SystemExit(f"vlmeff calibrate: {error}") from error
    if args.method == "infoflow":
        print(f"infoflow at budget {schedule['budget']} on {schedule['samples']} {task} {args.split} questions: "
              f"r_v {schedule['vit_keep']:.4f}, LLM stages {schedule['llm_keep']} at layers {schedule['layers']}, "
              f"t {schedule['threshold']:.3f}, alpha_v {schedule['entropy_weight']:.3f}; mean cosine "
              f"{schedule['objective']:.5f} after {schedule['trials']} trials ({schedule['seconds']:.0f} s), "
              f"average share {schedule['average_share']:.4f}; wrote {args.out}")
        return
    print(f"{args.method} ({schedule.get('base', '')}) on {schedule.get('samples')} {task} {args.split} questions: "
          f"{schedule.get('trend', '')} trend {schedule.get('coefficients', '')}; wrote {args.out}")


def print_results(results, path):
    """The metrics, per kind, and the efficiency of an eval run."""
    c, e = results["config"], results["efficiency"]
    patch = f"{c['method']} keep={c['keep']} {c['options'] or ''}".strip() if c["method"] else "unpatched"
    print(f"{c['model']} on {c['task']} ({c['split']}, {results['n']} examples), {patch}")
    print("metrics:", format_metrics(results["metrics"]))
    for kind, values in results.get("metrics_per_kind", {}).items():
        print(f"  {kind}: {format_metrics(values)}")
    print("efficiency, mean per example (unpatched in brackets):")
    for key in ("visual_tokens", "prompt_tokens", "prefill_flops", "kv_cache_bytes"):
        print(f"  {key:15s} {e[key]:14.6g} ({e[key + '_unpatched']:.6g})")
    print(f"  prefill FLOPs ratio {e['prefill_flops_ratio']:.4f}")
    t = e["timing"]
    processes = f", {t['processes']} processes" if t["processes"] > 1 else ""
    print(f"timing on {t['device']} ({t['timer']}, {t['batches']} batches of {c['batch_size']}{processes}): "
          f"prefill {format_value(t['prefill_ms'])} ms per batch, decode {format_value(t['decode_ms_per_token'])} "
          f"ms per token, peak memory {format_value(t['peak_memory_bytes'] and t['peak_memory_bytes'] / 2**20)} MiB "
          f"({t['peak_memory']})")
    print(f"wrote {path}")


def format_metrics(values):
    return ", ".join(f"{k} {format_value(v)}" for k, v in values.items())


def format_value(value):
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def task_name(text):
    """An argparse type: a task name, the error naming the value and the accepted ones."""
    from .eval import get_task

    try:
        return get_task(text).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def keep_value(text):
    """An argparse type for --keep: '64' -> 64 (a count per image), '0.25' -> 0.25 (a ratio)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; accepted: an int count per image or a "
                                         "ratio in (0, 1]") from None


def int_at_least(minimum):
    """An argparse type: an integer >= minimum, the error naming the value and what is accepted."""
    def parse(text):
        value = int(text)                        # a ValueError makes argparse say "invalid integer >= N value"
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below {minimum}; accepted: an integer >= {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def build_parser():
    parser = argparse.ArgumentParser(prog="vlmeff", description="Training-free visual-token reduction")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("methods", help="list the methods").set_defaults(run=cmd_methods)
    show = sub.add_parser("showcase", help="accuracy (per question kind) and time of an embedded VLM on the test split "
                                           "of its dataset (easy-VQA or scenes), unpatched vs patched: a preset of "
                                           "vlmeff sweep")
    show.add_argument("--model", default="tiny-llava-evqa", choices=SHOWCASE_MODELS,
                      help="embedded VLM to evaluate (default: %(default)s)")
    show.add_argument("--methods", nargs="+", default=["cls", "random", "pool"],
                      help="method specs, e.g. cls  cls:reduce=merge  received (default: %(default)s)")
    show.add_argument("--budgets", nargs="+", type=keep_value, default=[0.25, 0.125, 0.0625],
                      help="keep ratios (or int token counts), one run per method and budget (default: "
                           "%(default)s)")
    show.add_argument("--limit", type=int_at_least(0), default=1000,
                      help="the first N test questions (default: %(default)s); 0: all of them (easy-VQA 9,673, "
                           "scenes 7,876), the full split that README's accuracy tables measure")
    show.add_argument("--batch-size", type=int_at_least(1), default=64,
                      help="questions per padded generate call (default: %(default)s); the time per question "
                           "depends on it")
    show.add_argument("--out", default=None,
                      help="folder for a run folder per run, the table (sweep.md, sweep.csv) and the plots, as "
                           "vlmeff sweep writes them; runs already finished there are loaded, not re-measured "
                           "(the output says so)")
    show.add_argument("--overwrite", action="store_true",
                      help="re-measure every run and replace the results already in --out")
    show.set_defaults(run=cmd_showcase)
    add_eval_parser(sub)
    add_calibrate_parser(sub)
    add_sweep_parser(sub)
    return parser


def add_sweep_parser(sub):
    """`vlmeff sweep`: every option defaults to absent, so that only the ones given replace the --config file's."""
    from .eval import TASKS
    from .eval.runner import DTYPES

    sw = sub.add_parser("sweep", argument_default=argparse.SUPPRESS,
                        help="one LVLM on one task, unpatched and with each method at each budget: a table "
                             "(Markdown, CSV) and plots of accuracy against visual tokens and prefill time")
    sw.add_argument("--config", default=None,
                    help="a YAML or JSON file of the settings below (keys model, task, methods, budgets, out, "
                         "limit, batch_size, overwrite, data, split, dtype, device_map, max_new_tokens); options "
                         "given here replace its values")
    sw.add_argument("--model", help="an embedded model, a local path or a hub name (default: tiny-llava-evqa)")
    sw.add_argument("--task", type=task_name,
                    help=f"one of {', '.join(TASKS)} (default: an embedded model's dataset)")
    sw.add_argument("--methods", nargs="+", help="method specs, e.g. cls  cls:reduce=merge  visionzip:contextual=8")
    sw.add_argument("--budgets", nargs="+", type=keep_value,
                    help="visual tokens kept per image, one run per method and budget: int counts or ratios")
    sw.add_argument("--out", help="folder for a run folder per run, sweep.md, sweep.csv and the plots; finished "
                                  "runs there are loaded, unfinished ones resume")
    sw.add_argument("--limit", type=int_at_least(0), help="the first N examples (default or 0: all)")
    sw.add_argument("--batch-size", type=int_at_least(1), help="examples per generate call (default: 16)")
    sw.add_argument("--overwrite", action="store_true", help="recompute every run, replacing those in --out")
    sw.add_argument("--dtype", choices=DTYPES, help="dtype to load the model in (default: auto)")
    sw.add_argument("--device-map", help="from_pretrained's device_map, e.g. auto (default: the whole model on "
                                         "cuda if available, else cpu)")
    sw.add_argument("--split", help="dataset split (default: the task's)")
    sw.add_argument("--data", help="dataset: a hub name or local path (default: the task's)")
    sw.add_argument("--max-new-tokens", type=int_at_least(1), help="generation length (default: the task's)")
    sw.set_defaults(run=cmd_sweep)


def add_eval_parser(sub):
    from .eval import TASKS
    from .eval.runner import DTYPES

    ev = sub.add_parser("eval", help="accuracy and measured cost of an LVLM on a VQA benchmark, unpatched or "
                                     "patched; resumable")
    ev.add_argument("--model", default="tiny-llava-evqa",
                    help="an embedded model, a local path or a hub name (default: %(default)s)")
    ev.add_argument("--task", type=task_name, default="easyvqa", help=f"one of {', '.join(TASKS)} "
                                                                      "(default: %(default)s)")
    ev.add_argument("--method", type=parse_method, default=None,
                    help="method spec, e.g. cls  cls:reduce=merge  visionzip:contextual=8 (default: unpatched)")
    ev.add_argument("--keep", type=keep_value, default=None, help="visual tokens kept per image: a count or a ratio")
    ev.add_argument("--limit", type=int_at_least(0), default=None, help="the first N examples (default or 0: all)")
    ev.add_argument("--out", required=True,
                    help="folder for predictions.jsonl and results.json; an unfinished run there resumes")
    ev.add_argument("--overwrite", action="store_true", help="replace a finished or different run in --out")
    ev.add_argument("--batch-size", type=int_at_least(1), default=16, help="questions per generate call "
                                                                           "(default: %(default)s)")
    ev.add_argument("--dtype", choices=DTYPES, default="auto", help="dtype to load the model in (default: %(default)s)")
    ev.add_argument("--device-map", default=None, help="from_pretrained's device_map, e.g. auto (needs accelerate; "
                                                       "default: the whole model on cuda if available, else cpu)")
    ev.add_argument("--split", default=None, help="dataset split (default: the task's)")
    ev.add_argument("--data", default=None, help="dataset: a hub name or local path (default: the task's)")
    ev.add_argument("--max-new-tokens", type=int_at_least(1), default=None,
                    help="generation length (default: the task's)")
    ev.set_defaults(run=cmd_eval)


def add_calibrate_parser(sub):
    from .calibration import CALIBRATED
    from .eval.runner import DTYPES

    cal = sub.add_parser("calibrate", help="fit a method's calibration (vlmeff.calibrate) on questions of a task's "
                                           "training split and write its schedule file")
    cal.add_argument("--model", default="tiny-llava-evqa",
                     help="an embedded model, a local path or a hub name (default: %(default)s)")
    cal.add_argument("--method", choices=[m for m in CALIBRATED if m != "modes"], default="debiased",
                     help="the method to calibrate (default: %(default)s; MoDES: vlmeff.calibrate in Python)")
    cal.add_argument("--base", choices=["fastv", "pdrop"], default="fastv",
                     help="debiased: the scorer whose trend is fitted (default: %(default)s)")
    cal.add_argument("--layer", type=int, default=None, help="debiased on fastv: its layer K (default: FastV's, scaled)")
    cal.add_argument("--layers", type=int, nargs="+", default=None,
                     help="debiased on pdrop: its stage layers (default: PyramidDrop's, scaled); infoflow: its two "
                          "LLM stage layers (default: VFlowOpt's 9 and 18 of 28, scaled)")
    cal.add_argument("--budget", type=float, default=0.25,
                     help="infoflow: the average share of visual tokens the decoder layers see (default: %(default)s)")
    cal.add_argument("--trials", type=int_at_least(1), default=300,
                     help="infoflow: settings evaluated (default: %(default)s, the reference's)")
    cal.add_argument("--initial", type=int_at_least(1), default=27,
                     help="infoflow: random settings before the Gaussian process picks (default: %(default)s)")
    cal.add_argument("--search-seed", type=int, default=42,
                     help="infoflow: the optimiser's seed (default: %(default)s)")
    cal.add_argument("--patience", type=int_at_least(1), default=None,
                     help="infoflow: stop after this many trials without improvement (default: never)")
    cal.add_argument("--resume", default=None,
                     help="infoflow: a schedule of an interrupted or shorter search to go on from (its trials are not "
                          "run again); with --overwrite, --out may be that file")
    cal.add_argument("--task", type=task_name, default=None, help="the task whose questions calibrate (default: an "
                                                                  "embedded model's dataset)")
    cal.add_argument("--split", default="train", help="never the split you evaluate on (default: %(default)s)")
    cal.add_argument("--data", default=None, help="dataset: a hub name or local path (default: the task's)")
    cal.add_argument("--n", type=int_at_least(1), default=256, help="questions (default: %(default)s)")
    cal.add_argument("--batch-size", type=int_at_least(1), default=32, help="(default: %(default)s)")
    cal.add_argument("--seed", type=int, default=0, help="which questions are drawn (default: %(default)s)")
    cal.add_argument("--dtype", choices=DTYPES, default="auto", help="(default: %(default)s)")
    cal.add_argument("--out", required=True, help="the schedule file (JSON) to write")
    cal.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    cal.add_argument("--plot", default=None, help="also draw the mean attention and its fitted trend to this PNG")
    cal.set_defaults(run=cmd_calibrate)
    from .demo import DESCRIPTION, add_arguments, run as run_demo
    demo = sub.add_parser("demo", help="a Gradio page: the patches a method keeps, the answer with and without "
                                       "pruning, tokens, FLOPs and latency (needs the demo extra)",
                          description=DESCRIPTION)
    add_arguments(demo)
    demo.set_defaults(run=run_demo)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
