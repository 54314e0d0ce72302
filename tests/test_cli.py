"""The `vlmeff` command line: method specs, the method table, and the showcase (a preset of `vlmeff sweep`, tested
in test_sweep.py) on a small untrained model."""
import csv

import pytest

pytest.importorskip("easy_vqa")

from vlmeff import cli, zoo  # noqa: E402
from vlmeff.data import easyvqa  # noqa: E402
from vlmeff.eval import runner  # noqa: E402
from vlmeff.zoo import build  # noqa: E402


@pytest.fixture(scope="module")
def untrained_weights(tmp_path_factory):
    """A weights folder holding untrained tiny-llava-evqa and tiny-llava-scenes (the showcase only needs the shapes)."""
    weights = tmp_path_factory.mktemp("weights")
    for name, data in (("tiny-llava-evqa", "easyvqa"), ("tiny-llava-scenes", "scenes")):
        model, processor = build.build_llava(dataset=data)
        model.save_pretrained(weights / name)
        processor.save_pretrained(weights / name)
    return weights


@pytest.fixture
def showcase(untrained_weights, monkeypatch, capsys):
    """Runs `vlmeff showcase ARGS...` on the untrained model; returns what it printed."""
    monkeypatch.setattr(zoo, "WEIGHTS", untrained_weights)

    def run(*args):
        cli.main(["showcase", *map(str, args)])
        return capsys.readouterr().out
    return run


def test_parse_method_specs():
    assert cli.parse_method("cls") == ("cls", {})
    assert cli.parse_method("cls:reduce=merge,score_layers=1") == ("cls", {"reduce": "merge", "score_layers": 1})
    with pytest.raises(Exception, match="not key=value"):
        cli.parse_method("cls:merge")


def test_methods_table(capsys):
    cli.main(["methods"])
    out = capsys.readouterr().out
    for name in ("cls", "tome", "visionzip", "received", "random", "pool", "divprune", "cdpruner", "vispruner"):
        assert f"\n{name} " in out


def table(out):
    """The rows of the sweep.csv a showcase writes."""
    with open(out / "sweep.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_showcase_runs_every_method_and_writes_results(tmp_path, showcase, monkeypatch):
    args = ("--limit", 8, "--batch-size", 4, "--methods", "cls", "pool", "--budgets", 0.25, 0.125,
            "--out", tmp_path / "out")
    showcase(*args)
    rows = table(tmp_path / "out")
    assert [(r["method"], r["keep"]) for r in rows] == [("unpatched", ""), ("cls", "0.25"), ("cls", "0.125"),
                                                        ("pool", "0.25"), ("pool", "0.125")]
    assert [r["visual_tokens"] for r in rows] == ["256.0", "64.0", "32.0", "64.0", "32.0"]
    assert all(r["n"] == "8" and 0 <= float(r["accuracy"]) <= 1 for r in rows)
    for name in ("accuracy_vs_tokens.png", "accuracy_vs_prefill.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # a second run resumes from the folder instead of recomputing or overwriting
    monkeypatch.setattr(runner, "generate_batch", lambda *a, **k: pytest.fail("finished runs must not be recomputed"))
    showcase(*args)
    assert table(tmp_path / "out") == rows
    with pytest.raises(SystemExit, match=r"another config \(limit: 8 there, 16 here\)"):
        showcase("--limit", 16, "--batch-size", 4, "--out", tmp_path / "out")
    with pytest.raises(SystemExit, match=r"another config \(batch_size: 4 there, 64 here\)"):
        showcase("--limit", 8, "--out", tmp_path / "out")     # the batch size changes the padding, so the answers


def test_showcase_rerun_says_its_results_were_loaded_and_overwrite_recomputes(tmp_path, showcase, monkeypatch):
    args = ("--limit", 4, "--methods", "cls", "--budgets", 0.25, "--out", tmp_path / "out")
    first = showcase(*args)
    assert "loaded" not in first
    second = showcase(*args)
    assert (f"2 of 2 runs loaded from {tmp_path / 'out'}, computed earlier and not re-measured (unpatched, "
            f"cls 0.25); --overwrite recomputes them, or choose another --out folder") in second
    assert [line.endswith("(loaded)") for line in second.splitlines()[-3:-1]] == [True, True]
    # a new run next to the stored ones: only the stored ones are said to be loaded
    third = showcase("--limit", 4, "--methods", "cls", "--budgets", 0.25, 0.125, "--out", tmp_path / "out")
    assert "2 of 3 runs loaded from" in third and "(unpatched, cls 0.25);" in third
    assert [line.endswith("(loaded)") for line in third.splitlines()[-4:-1]] == [True, True, False]
    measured = []
    real = runner.predict
    monkeypatch.setattr(runner, "predict", lambda *a, **k: measured.append(a[6] and a[6].config["keep"])
                        or real(*a, **k))
    fourth = showcase(*args, "--overwrite")
    assert measured == [None, 0.25] and "loaded" not in fourth
    assert [(r["method"], r["keep"]) for r in table(tmp_path / "out")] == [
        ("unpatched", ""), ("cls", "0.25")]            # the table of this showcase's runs, not the third's
    with pytest.raises(SystemExit, match=r"pass overwrite=True \(--overwrite\) to replace it"):
        showcase("--limit", 8, "--out", tmp_path / "out")


def test_showcase_says_which_subset_it_measured(showcase):
    total = len(easyvqa.questions("test")[0])
    out = showcase("--limit", 4, "--methods", "cls", "--budgets", 0.25)
    assert out.splitlines()[0] == (f"tiny-llava-evqa on the first 4 of {total} easy-VQA test questions (--limit 4); "
                                   f"README's accuracy table is the full split (--limit 0), so its figures differ "
                                   f"from these")
    assert cli.subset_line(total, total) == (f"all {total} easy-VQA test questions (the full split, as README's "
                                             f"accuracy table)")


def test_showcase_on_scenes_reports_every_question_kind(tmp_path, showcase):
    out = showcase("--model", "tiny-llava-scenes", "--limit", 24, "--batch-size", 8, "--methods", "random",
                   "--budgets", 0.0625, "--out", tmp_path / "scenes")
    total = len(zoo.vqa_split("scenes", "test")[1])
    assert out.splitlines()[0].startswith(f"tiny-llava-scenes on the first 24 of {total} scenes test questions")
    rows = table(tmp_path / "scenes")
    _, questions = zoo.vqa_split("scenes", "test")
    kinds = sorted({kind for *_, kind in questions[:24]})
    assert kinds == ["attribute", "count", "existence", "relation"]
    assert [[key.removeprefix("accuracy:") for key in r if key.startswith("accuracy:")] for r in rows] == [kinds] * 2
    assert [r["visual_tokens"] for r in rows] == ["256.0", "16.0"]
    for r in rows:  # the overall accuracy is the question-weighted mean of the kinds
        n = {k: sum(q[3] == k for q in questions[:24]) for k in kinds}
        assert float(r["accuracy"]) == pytest.approx(sum(float(r[f"accuracy:{k}"]) * n[k] for k in kinds) / 24)
    for line, r in zip(out.splitlines()[3:5], rows):  # the printed rows carry each kind's accuracy
        assert line.endswith("  " + " ".join(f"{k} {float(r[f'accuracy:{k}']):.3f}" for k in kinds))


def test_every_showcase_option_has_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["showcase", "--help"])
    text = " ".join(capsys.readouterr().out.split())   # argparse wraps lines
    assert "--model {tiny-llava-evqa,tiny-llava-moe-evqa,tiny-llava-scenes} embedded VLM to evaluate (default: tiny-llava-evqa)" in text
    assert "--batch-size BATCH_SIZE questions per padded generate call (default: 64)" in text
    showcase_parser = cli.build_parser()._subparsers._group_actions[0].choices["showcase"]
    assert [a.dest for a in showcase_parser._actions if not a.help] == []


@pytest.mark.parametrize("option, value, message", [
    ("--limit", "-1", "argument --limit: -1 is below 0; accepted: an integer >= 0"),
    ("--batch-size", "0", "argument --batch-size: 0 is below 1; accepted: an integer >= 1"),
    ("--batch-size", "two", "argument --batch-size: invalid integer >= 1 value: 'two'"),
    ("--model", "tiny-vit-evqa", "argument --model: invalid choice: 'tiny-vit-evqa'"),
])
def test_showcase_rejects_bad_counts_naming_the_option(capsys, option, value, message):
    with pytest.raises(SystemExit):
        cli.main(["showcase", option, value])
    assert message in capsys.readouterr().err


def test_showcase_refuses_a_bad_method_spec_before_any_run(tmp_path):
    with pytest.raises(SystemExit, match="vlmeff showcase: unknown method 'clss'; available:"):
        cli.main(["showcase", "--methods", "clss", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_calibrate_writes_a_schedule_that_patch_accepts(tmp_path, untrained_weights, monkeypatch, capsys):
    """`vlmeff calibrate` on the train split of the scenes model (8-layer LM): a debiased schedule for it that
    `vlmeff.patch` reloads; an existing file is not overwritten."""
    import vlmeff

    monkeypatch.setattr(zoo, "WEIGHTS", untrained_weights)
    out = tmp_path / "debias.json"
    args = ["calibrate", "--model", "tiny-llava-scenes", "--n", "8", "--batch-size", "4", "--out", str(out)]
    cli.main([*args, "--plot", str(tmp_path / "trend.png")])
    assert (tmp_path / "trend.png").read_bytes()[:4] == b"\x89PNG"
    assert "8 scenes train questions" in capsys.readouterr().out
    model, _ = zoo.load("tiny-llava-scenes")
    with vlmeff.patch(model, "debiased", keep=0.25, schedule=out) as patch:
        assert patch.config["schedule"]["samples"] == 8 and patch.config["schedule"]["positions"] == 256
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        cli.main(args)
    with pytest.raises(SystemExit, match="the train split of scenes has"):
        cli.main([*args[:-2], "--n", "10000000", "--out", str(tmp_path / "other.json")])


def test_calibrate_infoflow_searches_resumes_and_eval_takes_its_schedule(tmp_path, untrained_weights, monkeypatch,
                                                                         capsys):
    """`vlmeff calibrate --method infoflow`: a short search on the scenes model's train split, resumed to more
    trials, then `vlmeff eval --method infoflow:schedule=...` at the schedule's budget."""
    import json
    monkeypatch.setattr(zoo, "WEIGHTS", untrained_weights)
    out = tmp_path / "infoflow.json"
    args = ["calibrate", "--model", "tiny-llava-scenes", "--method", "infoflow", "--budget", "0.125", "--n", "4",
            "--batch-size", "4", "--initial", "2", "--out", str(out)]
    cli.main([*args, "--trials", "2"])
    assert "infoflow at budget 0.125 on 4 scenes train questions" in capsys.readouterr().out
    cli.main([*args, "--trials", "3", "--resume", str(out), "--overwrite"])
    schedule = json.loads(out.read_text())
    # at most the budget: r_2 <= 1 may leave it short (the paper's min(1, ...)) where r_v r_1 is small
    assert schedule["trials"] == 3 and schedule["layers"] == [3, 5] and schedule["average_share"] <= 0.125 + 1 / 256
    cli.main(["eval", "--model", "tiny-llava-scenes", "--task", "scenes", "--method", f"infoflow:schedule={out}",
              "--keep", "0.125", "--limit", "4", "--batch-size", "4", "--out", str(tmp_path / "run")])
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["config"]["method"] == "infoflow" and results["efficiency"]["visual_tokens"] < 40


def test_eval_of_a_stacked_method_spec(tmp_path, untrained_weights, monkeypatch, capsys):
    """`--method cls:keep=128+fastv --keep 0.5`: cls keeps 128 tokens before the LLM, FastV half of them inside."""
    import json
    monkeypatch.setattr(zoo, "WEIGHTS", untrained_weights)
    out = tmp_path / "run"
    cli.main(["eval", "--model", "tiny-llava-scenes", "--task", "scenes", "--method", "cls:keep=128+fastv",
              "--keep", "0.5", "--limit", "4", "--batch-size", "4", "--out", str(out)])
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["method"] == "cls:keep=128+fastv" and results["config"]["keep"] == 0.5
    # 128 tokens reach the LLM; from layer 1 of 8 on, 64: the layer mean is (128 + 7 * 64) / 8
    assert results["efficiency"]["visual_tokens"] == (128 + 7 * 64) / 8
    with pytest.raises(SystemExit, match="unknown method 'fast'"):
        cli.main(["eval", "--model", "tiny-llava-scenes", "--task", "scenes", "--method", "cls:keep=128+fast",
                  "--keep", "0.5", "--limit", "4", "--out", str(tmp_path / "other")])
