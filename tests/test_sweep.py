"""`vlmeff sweep`: a row per run equal to its results.json, the Markdown / CSV table and the plots, re-runs that
load instead of recomputing, interrupted sweeps that resume, the YAML file equal to the CLI lists, and errors."""
import csv
import json
import shutil

import pytest

pytest.importorskip("easy_vqa")

from vlmeff import cli, zoo  # noqa: E402
from vlmeff.eval import runner, sweep  # noqa: E402
from vlmeff.eval.sweep import MEASURED, Run, accuracy_figure, markdown, plan, read_spec, table_row  # noqa: E402
from vlmeff.zoo import build  # noqa: E402

METHODS, BUDGETS = ["cls", "random:seed=3", "pool"], [0.25, 16]
RUNS = [("unpatched", None)] + [(m, b) for m in METHODS for b in BUDGETS]
FOLDERS = ["unpatched", "cls-0.25", "cls-16", "random_seed=3-0.25", "random_seed=3-16", "pool-0.25", "pool-16"]
LIMIT, BATCH = 8, 4


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A weights folder holding an untrained tiny-llava-evqa (a sweep needs only the shapes)."""
    folder = tmp_path_factory.mktemp("weights")
    model, processor = build.build_llava(dataset="easyvqa")
    model.save_pretrained(folder / "tiny-llava-evqa")
    processor.save_pretrained(folder / "tiny-llava-evqa")
    return folder


@pytest.fixture(autouse=True)
def untrained(weights, monkeypatch):
    monkeypatch.setattr(zoo, "WEIGHTS", weights)


@pytest.fixture(scope="module")
def reference(weights, tmp_path_factory):
    """(out folder, rows) of one uninterrupted sweep, shared by the tests that compare with it."""
    out = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(zoo, "WEIGHTS", weights)
        rows = sweep("tiny-llava-evqa", "easyvqa", METHODS, BUDGETS, out, limit=LIMIT, batch_size=BATCH,
                     progress=False)
    return out, rows


def results_of(out, folder):
    return json.loads((out / folder / "results.json").read_text())


def without_timing(results):
    return {**results, "efficiency": {k: v for k, v in results["efficiency"].items() if k != "timing"}}


def unmeasured(rows):
    return [{k: v for k, v in row.items() if k not in MEASURED} for row in rows]


def count_batches(monkeypatch):
    """Counts the batches the runner computes (the warm-up is not one)."""
    calls, original = [], runner.generate_batch
    monkeypatch.setattr(runner, "generate_batch", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


# -- the rows, the table and the plots --------------------------------------------------------------------------
def test_a_row_per_run_holds_its_results(reference):
    out, rows = reference
    assert [(r["method"], r["keep"]) for r in rows] == RUNS
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted(FOLDERS)
    kinds = sorted({kind for *_, kind in zoo.vqa_split("easyvqa", "test")[1][:LIMIT]})
    assert kinds == ["color", "shape", "yes/no"]
    assert list(rows[0]) == ["method", "keep", "visual_tokens", "accuracy", *(f"accuracy:{k}" for k in kinds),
                             "prefill_flops_ratio", "prefill_ms", "decode_ms_per_token", "ms_per_example",
                             "prefill_speedup", "speedup", "n"]
    assert [r["visual_tokens"] for r in rows] == [256, 64, 16, 64, 16, 64, 16]
    base = results_of(out, "unpatched")["efficiency"]["timing"]
    for row, folder in zip(rows, FOLDERS):
        results = results_of(out, folder)
        efficiency, timing = results["efficiency"], results["efficiency"]["timing"]
        assert results["config"]["limit"] == LIMIT and results["config"]["batch_size"] == BATCH
        assert row["accuracy"] == results["metrics"]["accuracy"] and row["n"] == results["n"] == LIMIT
        assert {k: row[f"accuracy:{k}"] for k in kinds} == {
            k: v["accuracy"] for k, v in results["metrics_per_kind"].items()}
        assert (row["visual_tokens"], row["prefill_flops_ratio"]) == (efficiency["visual_tokens"],
                                                                      efficiency["prefill_flops_ratio"])
        assert (row["prefill_ms"], row["decode_ms_per_token"], row["ms_per_example"]) == (
            timing["prefill_ms"], timing["decode_ms_per_token"], timing["generate_ms_per_example"])
        assert row["prefill_speedup"] == base["prefill_ms"] / timing["prefill_ms"]
        assert row["speedup"] == base["generate_ms_per_example"] / timing["generate_ms_per_example"]
    assert rows[0]["prefill_flops_ratio"] == 1 and all(r["prefill_flops_ratio"] < 1 for r in rows[1:])


def test_the_run_options_reach_every_run(reference):
    out, _ = reference
    configs = {folder: results_of(out, folder)["config"] for folder in FOLDERS}
    assert [(c["method"], c["keep"], c["options"]) for c in configs.values()] == [
        (None, None, {}), ("cls", 0.25, {}), ("cls", 16, {}), ("random", 0.25, {"seed": 3}),
        ("random", 16, {"seed": 3}), ("pool", 0.25, {}), ("pool", 16, {})]
    assert {c["model"] for c in configs.values()} == {"tiny-llava-evqa"}     # the name, though loaded once


def test_the_csv_and_markdown_tables_hold_the_rows(reference):
    out, rows = reference
    with open(out / "sweep.csv", newline="") as f:
        assert list(csv.DictReader(f)) == [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows]
    lines = (out / "sweep.md").read_text().splitlines()
    assert lines[0] == "# tiny-llava-evqa on easyvqa (test, 8 examples, batch 4, cpu, time.perf_counter)"
    assert lines[2] == ("| method | keep | visual tokens | accuracy | color | shape | yes/no | prefill FLOPs | "
                        "prefill ms | decode ms/token | ms/example | prefill speedup | speedup | n |")
    table = [line.strip("|").split(" | ") for line in lines[4:4 + len(rows)]]
    for cells, row in zip(table, rows):
        assert [c.strip() for c in cells] == [
            row["method"], "-" if row["keep"] is None else f"{row['keep']:g}", f"{row['visual_tokens']:.1f}",
            *(f"{row[k]:.4f}" for k in ("accuracy", "accuracy:color", "accuracy:shape", "accuracy:yes/no")),
            f"{row['prefill_flops_ratio']:.3f}",
            *(f"{row[k]:.2f}" for k in ("prefill_ms", "decode_ms_per_token", "ms_per_example", "prefill_speedup",
                                        "speedup")), str(row["n"])]
    assert lines[4 + len(rows)] == ""        # then the notes, after the last row


@pytest.mark.parametrize("x_key", ["visual_tokens", "prefill_ms"])
def test_the_plots_draw_each_method_and_the_unpatched_line(reference, x_key):
    out, rows = reference
    name = {"visual_tokens": "accuracy_vs_tokens.png", "prefill_ms": "accuracy_vs_prefill.png"}[x_key]
    assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = accuracy_figure(rows, "accuracy", x_key, "x", "title")
    axes = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["all examples", "color", "shape", "yes/no"]
    for ax, key in zip(axes, ["accuracy", "accuracy:color", "accuracy:shape", "accuracy:yes/no"]):
        dashed, cross, *methods = ax.get_lines()
        assert dashed.get_linestyle() == "--" and list(dashed.get_ydata()) == [rows[0][key]] * 2
        assert (list(cross.get_xdata()), list(cross.get_ydata())) == ([rows[0][x_key]], [rows[0][key]])
        assert [line.get_label() for line in methods] == METHODS
        for line, method in zip(methods, METHODS):
            own = [r for r in rows if r["method"] == method]
            assert list(line.get_xdata()) == [r[x_key] for r in own]
            assert list(line.get_ydata()) == [r[key] for r in own]


def test_up_to_thirty_methods_get_distinct_line_styles(reference):
    """matplotlib's colour cycle repeats after 10: the sweep of every method (12 and more) must not draw two methods
    alike."""
    _, rows = reference
    many = [rows[0]] + [dict(rows[1], method=f"m{i}") for i in range(30)]
    lines = accuracy_figure(many, "accuracy", "visual_tokens", "x", "title").axes[0].get_lines()[2:]
    styles = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}
    assert [line.get_label() for line in lines] == [f"m{i}" for i in range(30)] and len(styles) == 30


# -- re-runs, interruptions, overwrite --------------------------------------------------------------------------
def test_a_rerun_loads_the_finished_runs_and_computes_only_new_ones(reference, tmp_path, monkeypatch):
    out = tmp_path / "copy"
    shutil.copytree(reference[0], out)
    before = {p: p.read_bytes() for p in out.rglob("*.json*")}
    loaded = []
    with monkeypatch.context() as patch:
        patch.setattr(runner, "generate_batch", lambda *a, **k: pytest.fail("a finished run was recomputed"))
        patch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("nothing to compute, so nothing to load"))
        again = sweep("tiny-llava-evqa", "easyvqa", METHODS, BUDGETS, out, limit=LIMIT, batch_size=BATCH,
                      progress=False, on_run=lambda row, was_loaded: loaded.append(was_loaded))
    assert again == reference[1] and loaded == [True] * len(RUNS)
    assert {p: p.read_bytes() for p in out.rglob("*.json*")} == before
    batches, loaded = count_batches(monkeypatch), []
    grown = sweep("tiny-llava-evqa", "easyvqa", METHODS[:1], [*BUDGETS, 8], out, limit=LIMIT, batch_size=BATCH,
                  progress=False, on_run=lambda row, was_loaded: loaded.append(was_loaded))
    assert [(r["method"], r["keep"]) for r in grown] == [("unpatched", None), ("cls", 0.25), ("cls", 16), ("cls", 8)]
    assert loaded == [True, True, True, False] and len(batches) == LIMIT // BATCH      # only cls 8 computed
    assert grown[:3] == reference[1][:3] and grown[3]["visual_tokens"] == 8
    with open(out / "sweep.csv", newline="") as f:                # the table is this sweep's runs only
        assert [(r["method"], r["keep"]) for r in csv.DictReader(f)] == [
            ("unpatched", ""), ("cls", "0.25"), ("cls", "16"), ("cls", "8")]


def test_an_interrupted_sweep_resumes_to_the_same_results(reference, tmp_path, monkeypatch):
    out, rows = reference
    calls, original = [0], runner.generate_batch

    def dies_at_batch_six(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 6:                    # the third run, after its first batch: mid-run
            raise KeyboardInterrupt
        return original(*args, **kwargs)
    with monkeypatch.context() as patch:
        patch.setattr(runner, "generate_batch", dies_at_batch_six)
        with pytest.raises(KeyboardInterrupt):
            sweep("tiny-llava-evqa", "easyvqa", METHODS, BUDGETS, tmp_path, limit=LIMIT, batch_size=BATCH,
                  progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cls-0.25", "cls-16", "unpatched"]
    assert not (tmp_path / "cls-16" / "results.json").exists()
    batches = count_batches(monkeypatch)
    resumed = sweep("tiny-llava-evqa", "easyvqa", METHODS, BUDGETS, tmp_path, limit=LIMIT, batch_size=BATCH,
                    progress=False)
    assert len(batches) == 1 + (len(RUNS) - 3) * LIMIT // BATCH      # the rest of cls-16, then the 4 others
    assert unmeasured(resumed) == unmeasured(rows)
    for folder in FOLDERS:
        assert without_timing(results_of(tmp_path, folder)) == without_timing(results_of(out, folder))


def test_overwrite_recomputes_every_run(reference, tmp_path, monkeypatch):
    _, rows = reference
    first = sweep("tiny-llava-evqa", "easyvqa", ["pool"], [16], tmp_path, limit=LIMIT, batch_size=BATCH,
                  progress=False)
    batches = count_batches(monkeypatch)
    again = sweep("tiny-llava-evqa", "easyvqa", ["pool"], [16], tmp_path, limit=LIMIT, batch_size=BATCH,
                  overwrite=True, progress=False)
    assert len(batches) == 2 * LIMIT // BATCH and unmeasured(again) == unmeasured(first)
    assert unmeasured(first) == unmeasured([rows[0], rows[-1]])
    with pytest.raises(FileExistsError, match=r"holds a finished result of another config \(limit: 8 there, 4 "
                                              r"here\); re-run it with the same settings"):
        sweep("tiny-llava-evqa", "easyvqa", ["pool"], [16], tmp_path, limit=4, batch_size=BATCH, progress=False)


def test_a_sweep_without_a_folder_writes_nothing(reference, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = sweep("tiny-llava-evqa", "easyvqa", ["pool"], [16], None, limit=LIMIT, batch_size=BATCH, progress=False)
    assert unmeasured(rows) == unmeasured([reference[1][0], reference[1][-1]]) and list(tmp_path.iterdir()) == []


# -- the command line and the file ------------------------------------------------------------------------------
def cli_sweep(*args):
    cli.main(["sweep", *map(str, args)])


def test_a_config_file_runs_as_the_cli_lists(reference, tmp_path, capsys):
    out, _ = reference
    (tmp_path / "sweep.yaml").write_text(
        f"model: tiny-llava-evqa\ntask: easyvqa\nmethods: [cls, \"random:seed=3\", pool]\nbudgets: [0.25, 16]\n"
        f"limit: {LIMIT}\nbatch_size: {BATCH}\nout: {tmp_path / 'from-file'}\n")
    cli_sweep("--config", tmp_path / "sweep.yaml")
    printed = capsys.readouterr().out
    cli_sweep("--methods", *METHODS, "--budgets", *BUDGETS, "--limit", LIMIT, "--batch-size", BATCH,
              "--out", tmp_path / "from-cli")          # model and task: the defaults
    for folder in FOLDERS:
        expected = without_timing(results_of(out, folder))
        assert without_timing(results_of(tmp_path / "from-file", folder)) == expected
        assert without_timing(results_of(tmp_path / "from-cli", folder)) == expected
    assert (tmp_path / "from-file" / "sweep.md").read_text() in printed
    assert printed.rstrip().endswith("accuracy_vs_prefill.png and a run folder per run")
    assert "loaded" not in printed
    cli_sweep("--config", tmp_path / "sweep.yaml")
    assert f"7 of 7 runs loaded from {tmp_path / 'from-file'}, computed earlier and not re-measured" in \
        capsys.readouterr().out


def test_options_given_replace_the_file_s(tmp_path):
    (tmp_path / "sweep.json").write_text(json.dumps({"methods": ["cls"], "budgets": [0.25], "limit": 8,
                                                     "batch_size": 2, "out": str(tmp_path / "file")}))
    cli_sweep("--config", tmp_path / "sweep.json", "--budgets", 16, "--limit", 4, "--out", tmp_path / "given")
    assert not (tmp_path / "file").exists()
    config = results_of(tmp_path / "given", "cls-16")["config"]
    assert (config["keep"], config["limit"], config["batch_size"], config["task"]) == (16, 4, 2, "easyvqa")


@pytest.mark.parametrize("text, message", [
    ("budget: [0.25]\n", "unknown key 'budget'; accepted: model, task, methods, budgets, out, limit, batch_size, "
                         "overwrite, data, split, dtype, device_map, max_new_tokens; did you mean 'budgets'?"),
    ("budgets: [0.25, 2.5]\n", "budgets=[0.25, 2.5] is not accepted; accepted: a non-empty list of budgets: int "
                               "token counts >= 1 or float ratios in (0, 1]"),
    ("budgets: [1e-1]\n", "budgets=['1e-1'] is not accepted"),        # YAML 1.1 reads 1e-1 as a string
    ("budgets: [true]\n", "budgets=[True] is not accepted"),
    ("methods: cls\n", "methods='cls' is not accepted; accepted: a non-empty list of method specs"),
    ("methods: []\n", "methods=[] is not accepted"),
    ("task: popee\n", "task='popee' is not accepted; accepted: one of easyvqa, scenes, vqav2"),
    ("task: [pope]\n", "task=['pope'] is not accepted"),
    ("limit: -1\n", "limit=-1 is not accepted; accepted: an integer >= 0 (0 or null: all examples)"),
    ("batch_size: 0\n", "batch_size=0 is not accepted; accepted: an integer >= 1"),
    ("batch_size: 2.0\n", "batch_size=2.0 is not accepted"),
    ("overwrite: yess\n", "overwrite='yess' is not accepted; accepted: true or false"),
    ("dtype: float8\n", "dtype='float8' is not accepted; accepted: one of auto, float32, float16, bfloat16"),
    ("max_new_tokens: 0\n", "max_new_tokens=0 is not accepted; accepted: an integer >= 1, or null"),
    ("- cls\n", "holds list ['cls']; accepted: a mapping of model, task"),
    ("methods: [cls\n", "is not YAML or JSON"),
])
def test_a_bad_file_is_an_error_naming_the_key_and_value(tmp_path, capsys, text, message):
    (tmp_path / "sweep.yaml").write_text(text)
    with pytest.raises(ValueError, match="^" + str(tmp_path / "sweep.yaml")) as error:
        read_spec(tmp_path / "sweep.yaml")
    assert message in str(error.value)
    with pytest.raises(SystemExit, match="vlmeff sweep: "):
        cli_sweep("--config", tmp_path / "sweep.yaml")
    assert list(tmp_path.iterdir()) == [tmp_path / "sweep.yaml"]           # nothing ran


def test_missing_settings_and_a_task_for_a_hub_model_are_asked_for(tmp_path):
    with pytest.raises(SystemExit, match=r"missing budgets, out; give them as options \(--budgets, --out\) or "
                                         "as keys of the --config file"):
        cli_sweep("--methods", "cls")
    with pytest.raises(SystemExit, match="--task .* is needed for 'org/some-model', which is not an embedded"):
        cli_sweep("--model", "org/some-model", "--methods", "cls", "--budgets", 64, "--out", tmp_path)


@pytest.mark.parametrize("methods, budgets, error, message", [
    (["clss"], [0.25], ValueError, "unknown method 'clss'; available:"),
    (["cls:reduc=merge"], [0.25], TypeError, "method 'cls' got unknown option(s) reduc='merge'; valid:"),
    (["cls:merge"], [0.25], ValueError, "method option 'merge' in 'cls:merge' is not key=value"),
    ([7], [0.25], TypeError, "method spec 7 is not a string"),
    (["cls"], [0], ValueError, "budgets[0]=0 is not accepted: keep=0: a token count must be >= 1"),
    (["cls"], [0.5, 1.5], ValueError, "budgets[1]=1.5 is not accepted: keep=1.5: a ratio must lie in (0, 1]"),
    (["cls"], [True], TypeError, "budgets[0]=True is not accepted: keep must be an int token count"),
    (["cls"], [], TypeError, "budgets=[] is not accepted; accepted: a non-empty list"),
    ("cls", [0.25], TypeError, "methods='cls' is not accepted"),
    (["cls", "cls"], [0.25], ValueError, "runs 'cls 0.25' and 'cls 0.25' would share the run folder 'cls-0.25'"),
    (["cls:reduce='merge'", 'cls:reduce="merge"'], [8], ValueError, "would share the run folder "
                                                                    "'cls_reduce=_merge_-8'"),
])
def test_bad_methods_and_budgets_are_refused_before_any_run(methods, budgets, error, message):
    with pytest.raises(error) as raised:
        plan(methods, budgets)
    assert message in str(raised.value)


def test_a_bad_option_value_fails_when_the_model_loads_before_any_run_computes(tmp_path, monkeypatch):
    batches = count_batches(monkeypatch)
    with pytest.raises(ValueError, match="reduce='fold' is not accepted"):
        sweep("tiny-llava-evqa", "easyvqa", ["pool", "cls:reduce=fold"], [16], tmp_path, limit=LIMIT,
              batch_size=BATCH, progress=False)
    assert batches == [] and not list(tmp_path.rglob("predictions.jsonl"))
    with pytest.raises(TypeError, match="sweep got unknown option.* dtyp; accepted: data, split, dtype, device_map, "
                                        "max_new_tokens; did you mean 'dtype'"):
        sweep("tiny-llava-evqa", "easyvqa", ["pool"], [16], tmp_path, dtyp="float32")
    with pytest.raises(SystemExit, match="vlmeff sweep: .*reduce='fold' is not accepted"):
        cli_sweep("--methods", "cls:reduce=fold", "--budgets", 16, "--limit", LIMIT, "--out", tmp_path / "cli")


# -- the metrics of each task -----------------------------------------------------------------------------------
def results_for(task, lines):
    """results as evaluate returns them for these prediction lines (the scores the runner computes)."""
    efficiency = {"visual_tokens": 5.0, "prefill_flops_ratio": 1.0,
                  "timing": {"prefill_ms": 2.0, "decode_ms_per_token": None, "generate_ms_per_example": 1.0}}
    return {"config": {"task": task}, "n": len(lines), **runner.scores(task, lines), "efficiency": efficiency}


def test_pope_rows_show_f1_and_accuracy_and_f1_per_category():
    answers = [("yes", "yes", "adversarial"), ("yes", "no", "adversarial"), ("no", "no", "random"),
               ("no", "yes", "random"), ("yes", "yes", "random")]
    lines = [{"prediction": p, "reference": {"answer": a, "category": c}, "kind": c} for p, a, c in answers]
    row = table_row(Run("unpatched"), results_for("pope", lines))
    assert list(row)[2:7] == ["visual_tokens", "f1", "accuracy", "f1:adversarial", "f1:random"]
    assert (row["accuracy"], row["f1"]) == (3 / 5, 2 / 3)             # TP 2, FP 1, FN 1, TN 1
    assert (row["f1:adversarial"], row["f1:random"]) == (2 / 3, 2 / 3)  # P 1/2 R 1 there; P 1 R 1/2 here
    assert (row["prefill_speedup"], row["speedup"], row["decode_ms_per_token"]) == (1.0, 1.0, None)


def test_mme_rows_show_perception_cognition_and_each_subtask_s_score():
    answers = [("Yes", "Yes", "artwork", "a/0"), ("No", "No", "artwork", "a/0"), ("Yes", "Yes", "artwork", "a/1"),
               ("Yes", "No", "artwork", "a/1"), ("No", "Yes", "code_reasoning", "c/0"),
               ("No", "No", "code_reasoning", "c/0")]
    lines = [{"prediction": p, "reference": {"answer": a, "category": c, "image_id": i}, "kind": c}
             for p, a, c, i in answers]
    row = table_row(Run("unpatched"), results_for("mme", lines))
    assert list(row)[2:7] == ["visual_tokens", "perception", "cognition", "score:artwork", "score:code_reasoning"]
    assert (row["perception"], row["score:artwork"]) == (75 + 50, 75 + 50)      # acc 3/4, acc+ 1/2 (in points)
    assert (row["cognition"], row["score:code_reasoning"]) == (50 + 0, 50 + 0)
    heading = markdown([row], "mme").splitlines()[2]
    assert heading.startswith("| method | keep | visual tokens | perception | cognition | artwork | code_reasoning |")
    assert markdown([row], "mme").splitlines()[4].startswith("| unpatched | - | 5.0 | 125.0 | 50.0 | 125.0 | 50.0 |")
