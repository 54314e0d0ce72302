"""The `vlmeff` command line.

    vlmeff methods                      # the method registry
    vlmeff showcase                     # easy-VQA accuracy and time of tiny-llava-evqa, unpatched vs patched
    vlmeff showcase --model tiny-llava-scenes   # the same on multi-object scenes, per question kind
    vlmeff eval --task pope --model llava-hf/llava-1.5-7b-hf --method cls --keep 64 --out runs/pope-cls64
    torchrun --nproc_per_node 4 -m vlmeff eval ...     # data parallel: 4 processes, one result (vlmeff.eval.parallel)
"""
import argparse
import ast
import contextlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

import vlmeff

SHOWCASE_MODELS = [name for name in vlmeff.zoo.names() if name != "tiny-vit-evqa"]  # the ViT answers no questions


def parse_method(spec):
    """'cls' or 'cls:reduce=merge,score_layers=1' -> ('cls', {'reduce': 'merge', 'score_layers': 1})."""
    name, _, rest = spec.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"method option {item!r} in {spec!r} is not key=value")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            options[key] = value
    return name, options


def cmd_methods(args):
    print(f"{'method':10s} {'acts in':28s} {'models':10s} description")
    for m in vlmeff.methods():
        print(f"{m.name:10s} {', '.join(m.acts_in):28s} {', '.join(m.model_kinds):10s} {m.description}")
        print(f"{'':10s} paper: {m.paper}")
        for o in m.options.values():
            print(f"{'':10s} {o.name}={o.default!r}: {o.accepted_text()}")


def evaluate_vqa(model, processor, records, images, batch_size, desc):
    """Exact match of generated answers over (image_id, question, answer, kind) records
    -> (accuracy, {kind: accuracy}, seconds)."""
    from .zoo import ask
    right, start = [], time.perf_counter()
    for b in tqdm(range(0, len(records), batch_size), desc=desc, leave=False):
        chunk = records[b:b + batch_size]
        answers = ask(model, processor, [images[i] for i, *_ in chunk], [q for _, q, _, _ in chunk])
        right += [p == a for p, (_, _, a, _) in zip(answers, chunk)]
    seconds = time.perf_counter() - start
    by_kind = {}
    for (*_, kind), ok in zip(records, right):
        by_kind.setdefault(kind, []).append(ok)
    return sum(right) / max(len(records), 1), {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}, seconds


def cmd_showcase(args):
    from .zoo import dataset, load, vqa_split

    torch.manual_seed(0)
    model, processor = load(args.model)
    data = dataset(args.model)
    images, all_records = vqa_split(data, "test")
    records = all_records[:args.limit] if args.limit else all_records
    runs = [("unpatched", None, {})] + [(spec, keep, parse_method(spec)) for spec in args.methods for keep in args.budgets]
    out = Path(args.out) if args.out else None
    done = {} if args.overwrite else load_previous(out, args.model, len(records))
    rows = []
    print(f"{args.model} on {subset_line(len(records), len(all_records), data)}")
    print(f"batch {args.batch_size}, {torch.get_num_threads()} CPU threads")
    reused = [(label, keep) for label, keep, _ in runs if (label, keep) in done]
    if reused:
        print(resumed_line(out / "showcase.json", reused, len(runs)))
    print(f"{'method':22s} {'keep':>7s} {'visual tokens':>13s} {'accuracy':>9s} {'ms/question':>12s} "
          f"{'speedup':>8s} {'LLM FLOPs':>10s}")
    for label, keep, parsed in runs:
        if (label, keep) in done:                # resume: results already in the output folder
            rows.append(done[(label, keep)])
            print_row(rows[-1], loaded=True)
            continue
        patch = vlmeff.patch(model, method=parsed[0], keep=keep, **parsed[1]) if keep else contextlib.nullcontext()
        with patch as handle:
            accuracy, by_kind, seconds = evaluate_vqa(model, processor, records, images, args.batch_size,
                                                      f"{label} {keep or ''}")
        stats = handle.stats if handle is not None else {}
        tokens = stats.get("visual_tokens", {}).get("before LLM", [None])[0] if stats else None
        flops = stats["prefill_flops"] / stats["prefill_flops_unpatched"] if stats else 1.0
        row = dict(model=args.model, method=label, keep=keep, visual_tokens=tokens, accuracy=accuracy, by_kind=by_kind,
                   n=len(records), ms_per_question=1e3 * seconds / len(records), flops_ratio=flops)
        row["speedup"] = rows[0]["ms_per_question"] / row["ms_per_question"] if rows else 1.0
        rows.append(row)
        print_row(row)
        if out:                                  # after every run, so an interrupted showcase resumes
            out.mkdir(parents=True, exist_ok=True)
            (out / "showcase.json").write_text(json.dumps(rows, indent=1))
    if out:
        plot_accuracy(rows, out / "showcase.png", args.model)
        print(f"wrote {out / 'showcase.json'} and {out / 'showcase.png'}")


DATASET_NAMES = {"easyvqa": "easy-VQA", "scenes": "scenes"}


def subset_line(n, total, data="easyvqa"):
    """Which questions a showcase measures: README's accuracy table is the full split, the default run is not."""
    name = DATASET_NAMES[data]
    if n >= total:
        return f"all {total} {name} test questions (the full split, as README's accuracy table)"
    return (f"the first {n} of {total} {name} test questions (--limit {n}); README's accuracy table is the full "
            f"split (--limit 0), so its figures differ from these")


def resumed_line(path, reused, n_runs):
    """Says that runs were read back from an earlier showcase rather than measured, and how to re-measure them."""
    names = ", ".join(f"{label} {keep}" if keep else label for label, keep in reused)
    return (f"{len(reused)} of {n_runs} runs loaded from {path}, computed by an earlier showcase and not re-measured "
            f"({names}); --overwrite recomputes them, or choose another --out folder")


def load_previous(out, model, n):
    """(method, keep) -> row of an earlier showcase in `out`; a folder holding other results is an error."""
    path = out / "showcase.json" if out else None
    if path is None or not path.exists():
        return {}
    rows = json.loads(path.read_text())
    if any(r.get("model") != model or r["n"] != n for r in rows):
        raise SystemExit(f"{path} holds results of another model or question count; resume it with the same "
                         f"--model and --limit, replace them with --overwrite, or choose another --out folder")
    return {(r["method"], r["keep"]): r for r in rows}


def print_row(row, loaded=False):
    kinds = "  " + " ".join(f"{k} {v:.3f}" for k, v in row.get("by_kind", {}).items())
    print(f"{row['method']:22s} {row['keep'] or '-':>7} {row['visual_tokens'] or 'all':>13} {row['accuracy']:9.4f} "
          f"{row['ms_per_question']:12.2f} {row['speedup']:8.2f} {row['flops_ratio']:10.2f}" + kinds
          + ("  (loaded)" * loaded))


def plot_accuracy(rows, path, title):
    """Accuracy against visual tokens kept, one line per method, the unpatched model as a dashed line: one panel
    for all questions, then one per question kind."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [("all questions", lambda r: r["accuracy"])] + [
        (kind, lambda r, kind=kind: r["by_kind"][kind]) for kind in rows[0].get("by_kind", {})]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for ax, (name, accuracy) in zip(axes[0], panels):
        ax.axhline(accuracy(rows[0]), ls="--", color="gray", label="unpatched")
        for method in dict.fromkeys(r["method"] for r in rows[1:]):
            points = sorted((r["visual_tokens"], accuracy(r)) for r in rows if r["method"] == method)
            ax.plot(*zip(*points), marker="o", label=method)
        ax.set(xscale="log", xlabel="visual tokens per image", ylabel="accuracy", title=name)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


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
                                           "of its dataset (easy-VQA or scenes), unpatched vs patched")
    show.add_argument("--model", default="tiny-llava-evqa", choices=SHOWCASE_MODELS,
                      help="embedded VLM to evaluate (default: %(default)s)")
    show.add_argument("--methods", nargs="+", default=["cls", "random", "pool"],
                      help="method specs, e.g. cls  cls:reduce=merge  received (default: %(default)s)")
    show.add_argument("--budgets", nargs="+", type=float, default=[0.25, 0.125, 0.0625],
                      help="keep ratios, one run per method and budget (default: %(default)s)")
    show.add_argument("--limit", type=int_at_least(0), default=1000,
                      help="the first N test questions (default: %(default)s); 0: all of them (easy-VQA 9,673, "
                           "scenes 7,876), the full split that README's accuracy tables measure")
    show.add_argument("--batch-size", type=int_at_least(1), default=64,
                      help="questions per padded generate call (default: %(default)s); the time per question "
                           "depends on it")
    show.add_argument("--out", default=None,
                      help="folder for showcase.json and an accuracy plot; runs already there are loaded, not "
                           "re-measured (the output says so)")
    show.add_argument("--overwrite", action="store_true",
                      help="re-measure every run and replace the results already in --out")
    show.set_defaults(run=cmd_showcase)
    add_eval_parser(sub)
    return parser


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


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
