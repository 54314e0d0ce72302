"""`vlmeff eval`'s runner: every task format from a local `datasets` fixture through a tiny LLaVA, LLaVA's prompts,
resuming after interruptions, refusing folders, the FLOPs against torch's FlopCounterMode, and the CLI."""
import json
import random
import re

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from lvlm_models import tiny_llava_with_processor
import vlmeff
from vlmeff import cli, zoo
from vlmeff.eval import TASKS, evaluate, get_task, load_examples, metrics, runner
from vlmeff.eval.efficiency import BatchTimer, example_counts
from vlmeff.eval.rundir import read_jsonl

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
MEASURED = "timing"            # the efficiency entry that is measured, not counted: it differs between runs


# -- a tiny LLaVA (CLIP 32 px, patch 8: 16 patches + [CLS]; Llama 2 layers) with the embedded models' tokenizer --
@pytest.fixture(scope="module")
def tiny():
    """(model, processor): eager attention, so that torch's FlopCounterMode sees the attention matmuls; the
    tokenizer pads on the right, as the runner pads on the left whatever the tokenizer's default."""
    return tiny_llava_with_processor(attention="eager", padding_side="right")


# -- local dataset fixtures in each hub format ------------------------------------------------------------------
def picture(k):
    pixels = np.random.default_rng(k).integers(0, 256, (24 + 4 * k, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def rows_of(task):
    """Columns of 5 rows in the layout of the task's hub dataset (see vlmeff.eval.tasks)."""
    n = range(5)
    if task == "vqav2":
        return {"question_id": list(n), "question": [f"what is {k}?" for k in n], "image": [picture(k) for k in n],
                "answers": [[{"answer": a, "answer_confidence": "yes", "answer_id": j + 1} for j, a in
                             enumerate(["red"] * 7 + ["blue"] * 3)] for _ in n],
                "answer_type": ["other", "other", "yes/no", "number", "other"]}
    if task == "textvqa":
        return {"question_id": list(n), "question": [f"what does sign {k} say?" for k in n],
                "image": [picture(k) for k in n], "answers": [["stop"] * 10 for _ in n],
                "ocr_tokens": [["stop", "here"], [], ["a"], ["b", "c"], ["d"]]}
    if task == "gqa":
        return {"id": [f"q{k}" for k in n], "imageId": [f"n{k % 3}" for k in n],
                "question": [f"is the cup on the left {k}?" for k in n], "answer": ["yes", "no", "left", "cup", "no"],
                "fullAnswer": ["Yes, it is."] * 5,
                "types": [{"structural": s, "semantic": "rel", "detailed": "d"} for s in
                          ["verify", "verify", "choose", "query", "logical"]]}
    if task == "pope":
        return {"question_id": list(n), "question": [f"Is there a dog {k} in the image?" for k in n],
                "answer": ["yes", "no", "yes", "no", "no"], "image": [picture(k) for k in n],
                "category": ["adversarial", "popular", "random", "random", "popular"]}
    if task == "mme":  # MME asks two questions per image
        n = range(6)
        return {"question_id": [f"artwork/{k // 2}.jpg" for k in n], "image": [picture(k // 2) for k in n],
                "question": [f"Is this artwork {k}? Please answer yes or no." for k in n],
                "answer": ["Yes", "No", "Yes", "No", "Yes", "No"],
                "category": ["artwork", "artwork", "count", "count", "OCR", "OCR"]}
    if task == "scienceqa_img":
        return {"image": [picture(k) for k in n], "question": [f"Which is a mammal {k}?" for k in n],
                "choices": [["cat", "fish"], ["a", "b", "c"], ["x", "y"], ["p", "q", "r", "s"], ["m", "n"]],
                "answer": [0, 2, 1, 3, 0], "hint": ["Look at the picture.", "", "Read.", "", "Hint."],
                "subject": ["natural science", "social science", "language science", "natural science",
                            "social science"]}
    assert task == "mmbench"
    return {"index": list(n), "question": [f"What is shown {k}?" for k in n],
            "hint": ["Some context.", None, "nan", "More.", None],
            "A": ["a cat", "a", "x", "p", "m"], "B": ["a dog", "b", "y", "q", "n"],
            "C": ["a cow", "c", "z", None, "o"], "D": ["a pig", None, "w", None, "nan"],
            "answer": ["A", "C", "B", "A", "B"], "category": ["object", "scene", "object", "ocr", "scene"],
            "image": [picture(k) for k in n]}


def save(columns, folder, split, with_image=True):
    dataset = datasets.Dataset.from_dict(columns)
    if with_image:
        dataset = dataset.cast_column("image", datasets.Image())
    datasets.DatasetDict({split: dataset}).save_to_disk(str(folder))


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """task -> the path of a local copy of its dataset: a saved DatasetDict holding the task's default split; GQA
    as a mirror of the hub's two configs (questions holding an image id, and the images)."""
    root = tmp_path_factory.mktemp("data")
    paths = {}
    for task in ("vqav2", "textvqa", "pope", "mme", "scienceqa_img", "mmbench"):
        save(rows_of(task), root / task, TASKS[task].split)
        paths[task] = root / task
    save(rows_of("gqa"), root / "gqa" / "testdev_balanced_instructions", "testdev", with_image=False)
    save({"id": ["n2", "n0", "n1"], "image": [picture(20), picture(21), picture(22)]},
         root / "gqa" / "testdev_balanced_images", "testdev")
    paths["gqa"] = root / "gqa"
    return paths


HF_TASKS = ["vqav2", "textvqa", "gqa", "pope", "mme", "scienceqa_img", "mmbench"]


def strip_measured(results):
    return {**results, "efficiency": {k: v for k, v in results["efficiency"].items() if k != MEASURED}}


# -- prompts and references -------------------------------------------------------------------------------------
def test_prompts_are_llava_s(fixtures):
    prompts = {task: [x.prompt for x in load_examples(TASKS[task], fixtures[task])] for task in HF_TASKS}
    assert prompts["vqav2"][0] == f"what is 0?\n{SHORT}"
    assert prompts["textvqa"][0] == f"what does sign 0 say?\nReference OCR token: stop, here\n{SHORT}"
    assert prompts["textvqa"][1] == f"what does sign 1 say?\n{SHORT}"          # no OCR token: no line
    assert prompts["gqa"][2] == f"is the cup on the left 2?\n{SHORT}"
    assert prompts["pope"][1] == f"Is there a dog 1 in the image?\n{SHORT}"
    assert prompts["mme"][0] == f"Is this artwork 0?\n{SHORT}"                   # MME's instruction swapped
    assert prompts["scienceqa_img"][0] == f"Context: Look at the picture.\nWhich is a mammal 0?\nA. cat\nB. fish\n" \
                                          f"{LETTER}"
    assert prompts["scienceqa_img"][1] == f"Which is a mammal 1?\nA. a\nB. b\nC. c\n{LETTER}"   # empty context
    assert prompts["mmbench"][0] == f"Some context.\nWhat is shown 0?\nA. a cat\nB. a dog\nC. a cow\nD. a pig\n" \
                                    f"{LETTER}"
    assert prompts["mmbench"][1] == f"What is shown 1?\nA. a\nB. b\nC. c\n{LETTER}"              # no hint, no D
    assert prompts["mmbench"][2] == f"What is shown 2?\nA. x\nB. y\nC. z\nD. w\n{LETTER}"        # hint "nan"
    assert prompts["mmbench"][4] == f"What is shown 4?\nA. m\nB. n\nC. o\n{LETTER}"              # D "nan"


def test_references_and_kinds_per_task(fixtures):
    first = {task: load_examples(TASKS[task], fixtures[task])[0] for task in HF_TASKS}
    assert first["vqav2"].reference == ["red"] * 7 + ["blue"] * 3 and first["vqav2"].kind == "other"
    assert first["textvqa"].reference == ["stop"] * 10 and first["textvqa"].kind is None
    assert (first["gqa"].reference, first["gqa"].kind) == ("yes", "verify")
    assert (first["pope"].reference, first["pope"].kind) == ({"answer": "yes", "category": "adversarial"}, "adversarial")
    assert first["mme"].reference == {"answer": "Yes", "category": "artwork", "image_id": "artwork/0.jpg"}
    scienceqa = [x.reference for x in load_examples(TASKS["scienceqa_img"], fixtures["scienceqa_img"])]
    assert [r["answer"] for r in scienceqa] == [0, 2, 1, 3, 0] and scienceqa[1]["choices"] == ["a", "b", "c"]
    mmbench = load_examples(TASKS["mmbench"], fixtures["mmbench"])
    assert (mmbench[0].reference, mmbench[0].kind) == (
        {"answer": "A", "options": {"A": "a cat", "B": "a dog", "C": "a cow", "D": "a pig"}, "index": 0}, "object")
    assert mmbench[1].reference["options"] == {"A": "a", "B": "b", "C": "c"}  # the absent D is no option
    assert all(len(x.images) == 1 and x.images[0].mode == "RGB" for x in first.values())


def test_gqa_images_are_joined_on_their_id(fixtures):
    examples = load_examples(TASKS["gqa"], fixtures["gqa"])
    by_id = {"n2": picture(20), "n0": picture(21), "n1": picture(22)}
    for k in range(5):
        assert np.array_equal(np.asarray(examples[k].images[0]), np.asarray(by_id[f"n{k % 3}"].convert("RGB")))


# -- every task end to end --------------------------------------------------------------------------------------
@pytest.mark.parametrize("task", HF_TASKS)
def test_every_task_runs_end_to_end(task, tiny, fixtures, tmp_path):
    results = evaluate(tiny, task, method="cls", keep=4, data=str(fixtures[task]), batch_size=2, max_new_tokens=2,
                       out=tmp_path / "run", progress=False)
    lines = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    examples = load_examples(TASKS[task], fixtures[task])
    n = len(examples)
    assert results["n"] == n and [x["index"] for x in lines] == list(range(n))
    assert [x["reference"] for x in lines] == [examples[k].reference for k in range(n)]
    assert all(isinstance(x["prediction"], str) for x in lines)
    assert results["metrics"] == metrics.score(task, [x["prediction"] for x in lines], [x["reference"] for x in lines])
    if task == "mme":
        assert 0 <= results["metrics"]["perception"] <= 400 and results["metrics"]["cognition"] == 0
    else:
        assert 0 <= results["metrics"]["accuracy"] <= 1
    assert results["efficiency"]["visual_tokens"] == 4 and results["efficiency"]["visual_tokens_unpatched"] == 16
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results
    assert results["config"]["data"] == str(fixtures[task]) and results["config"]["split"] == TASKS[task].split


def test_a_parquet_folder_loads_with_load_dataset(tiny, tmp_path, monkeypatch):
    """A folder of split-named parquet files (what `load_dataset` opens, like a clone of a hub repository)."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    (tmp_path / "pope").mkdir()
    datasets.Dataset.from_dict(rows_of("pope")).cast_column("image", datasets.Image()).to_parquet(
        str(tmp_path / "pope" / "test.parquet"))
    results = evaluate(tiny, "pope", data=tmp_path / "pope", batch_size=2, max_new_tokens=1, progress=False)
    assert results["n"] == 5 and results["config"]["data"] == str(tmp_path / "pope")
    with pytest.raises(ValueError, match=r"unknown split 'dev' of .*pope: Unknown split \"dev\". Should be one of "
                                         r"\['test'\]"):
        evaluate(tiny, "pope", data=tmp_path / "pope", split="dev")


def test_a_model_loads_by_path(tiny, fixtures, tmp_path):
    model, processor = tiny
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    by_path = evaluate(str(tmp_path / "model"), "pope", data=str(fixtures["pope"]), batch_size=2,
                       max_new_tokens=2, progress=False)
    loaded = evaluate(tiny, "pope", data=str(fixtures["pope"]), batch_size=2, max_new_tokens=2, progress=False)
    assert by_path["metrics"] == loaded["metrics"] and by_path["config"]["model"] == str(tmp_path / "model")
    assert strip_measured(by_path)["efficiency"] == strip_measured(loaded)["efficiency"]


def test_scenes_runs_with_its_kinds(tiny, tmp_path):
    results = evaluate(tiny, "scenes", limit=12, batch_size=4, max_new_tokens=2, out=tmp_path / "run", progress=False)
    _, records = zoo.vqa_split("scenes", "test")
    lines = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    assert results["n"] == 12 and results["config"]["task"] == "scenes"
    assert [x["reference"] for x in lines] == [answer for _, _, answer, _ in records[:12]]
    kinds = {kind for *_, kind in records[:12]}
    assert set(results["metrics_per_kind"]) == kinds == {"attribute", "existence", "count", "relation"}
    for kind in kinds:  # each kind scored on its own questions
        own = [x for x, r in zip(lines, records) if r[3] == kind]
        assert results["metrics_per_kind"][kind] == metrics.score("scenes", [x["prediction"] for x in own],
                                                                  [x["reference"] for x in own])


# -- resume, refusal --------------------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def interrupt_after(monkeypatch, batches):
    """Make the runner's generate_batch fail at its call number batches + 1 (a run killed mid-batch)."""
    calls, original = [0], runner.generate_batch

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] > batches:
            raise Interrupted
        return original(*args, **kwargs)
    monkeypatch.setattr(runner, "generate_batch", failing)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_interrupted_run_resumes_to_the_same_results(seed, tiny, fixtures, tmp_path, monkeypatch):
    """Interruptions at random points: an exception after k batches, then the file cut at a random byte (a
    partial batch and a torn last line); every resume ends with the uninterrupted run's results."""
    rng = random.Random(seed)
    run = dict(method="random", keep=6, data=str(fixtures["mmbench"]), batch_size=2, max_new_tokens=3,
               progress=False)
    reference = evaluate(tiny, "mmbench", out=tmp_path / "whole", **run)
    out = tmp_path / "interrupted"
    with monkeypatch.context() as patch:
        interrupt_after(patch, rng.randrange(3))
        with pytest.raises(Interrupted):
            evaluate(tiny, "mmbench", out=out, **run)
    assert getattr(tiny[0], "_vlmeff_patch", None) is None           # the failed run removed its patch
    with monkeypatch.context() as patch:
        interrupt_after(patch, 1)
        with pytest.raises(Interrupted):
            evaluate(tiny, "mmbench", out=out, **run)
    predictions = out / "predictions.jsonl"
    data = predictions.read_bytes()
    predictions.write_bytes(data[:rng.randrange(1, len(data))])      # cut anywhere: inside a line or after one
    resumed = evaluate(tiny, "mmbench", out=out, **run)
    assert strip_measured(resumed) == strip_measured(reference)
    assert read_jsonl(predictions) == read_jsonl(tmp_path / "whole" / "predictions.jsonl")
    assert predictions.read_bytes().endswith(b"\n")


def test_a_torn_last_line_is_dropped_and_a_damaged_middle_line_refused(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"index": 0}\n{"index": 1}\n{"ind')
    assert read_jsonl(path) == [{"index": 0}, {"index": 1}]
    assert path.read_bytes() == b'{"index": 0}\n{"index": 1}\n'
    path.write_bytes(b'{"index": 0}\n{"ind\n{"index": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(path)


def test_a_finished_folder_is_refused_without_overwrite(tiny, fixtures, tmp_path, monkeypatch):
    run = dict(data=str(fixtures["pope"]), batch_size=2, max_new_tokens=2, out=tmp_path / "run", progress=False)
    first = evaluate(tiny, "pope", **run)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(FileExistsError, match="holds a finished result.*overwrite=True"):
        evaluate(tiny, "pope", **run)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before    # nothing lost
    with monkeypatch.context() as patch:     # reuse_finished: read back as stored, nothing loaded or computed
        patch.setattr(runner, "generate_batch", lambda *a, **k: pytest.fail("a finished run was recomputed"))
        assert evaluate(tiny, "pope", reuse_finished=True, loader=lambda: pytest.fail("loaded"), **run) == first
        with pytest.raises(FileExistsError, match=r"holds a finished result of another config \(limit: None "
                                                  r"there, 3 here\)"):
            evaluate(tiny, "pope", reuse_finished=True, limit=3, **run)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    again = evaluate(tiny, "pope", overwrite=True, **run)
    assert again["n"] == 5 and len(read_jsonl(tmp_path / "run" / "predictions.jsonl")) == 5


def test_a_folder_of_another_config_is_refused(tiny, fixtures, tmp_path, monkeypatch):
    run = dict(data=str(fixtures["pope"]), batch_size=2, max_new_tokens=2, out=tmp_path / "run", progress=False)
    interrupt_after(monkeypatch, 1)
    with pytest.raises(Interrupted):
        evaluate(tiny, "pope", method="cls", keep=4, **run)
    monkeypatch.undo()
    before = (tmp_path / "run" / "predictions.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match=r"another config \(keep: 4 there, 8 here\)"):
        evaluate(tiny, "pope", method="cls", keep=8, **run)
    assert (tmp_path / "run" / "predictions.jsonl").read_bytes() == before
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "predictions.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="without a config.json"):
        evaluate(tiny, "pope", **{**run, "out": tmp_path / "other"})
    assert evaluate(tiny, "pope", method="cls", keep=8, overwrite=True, **run)["efficiency"]["visual_tokens"] == 8


# -- efficiency -------------------------------------------------------------------------------------------------
def llm_layer_flops(model, inputs):
    """FLOPs torch's FlopCounterMode counts in the LLM's decoder layers during one forward (the prefill)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**inputs)
    return sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items()
               if re.search(r"language_model\.layers\.\d+$", name))


@pytest.mark.parametrize("method", [None, "cls", "pool"])
def test_prefill_flops_match_torch_flop_counter(method, tiny, fixtures, tmp_path):
    """Tolerance: none (exact equality). Both count 2 x MACs of the same matmuls of the decoder layers (q/k/v/o
    projections, QK^T and AV over all n x n pairs: eager attention computes the masked half as well, the SwiGLU
    gate/up/down); neither counts norms, softmax, RoPE or activations. Eager attention because FlopCounterMode
    has no formula for SDPA's CPU kernel (it would miss the attention); batch 1 because it counts pad positions."""
    model, processor = tiny
    keep = None if method is None else 5
    evaluate(tiny, "vqav2", method=method, keep=keep, data=str(fixtures["vqav2"]), batch_size=1, max_new_tokens=1,
             limit=3, out=tmp_path / "run", progress=False)
    lines = read_jsonl(tmp_path / "run" / "predictions.jsonl")
    examples = load_examples(TASKS["vqav2"], fixtures["vqav2"])
    for line in lines:
        inputs = runner.chat_inputs(processor, [examples[line["index"]]], model)
        assert line["prefill_flops_unpatched"] == llm_layer_flops(model, inputs)
        with runner.patched(model, method, keep, {}):
            assert line["prefill_flops"] == llm_layer_flops(model, inputs)
        assert (line["prefill_flops"] < line["prefill_flops_unpatched"]) == (method is not None)


def test_per_example_counts_sum_to_the_patch_stats(tiny, fixtures):
    """On a padded batch of prompts of different lengths (one with two images), the per-example token counts,
    FLOPs and KV-cache bytes add up to what the patch reports for the batch."""
    model, processor = tiny
    examples = load_examples(TASKS["textvqa"], fixtures["textvqa"])
    items = [examples[0], examples[1], vlmeff.eval.Example(examples[2].images * 2, "two pictures", "x", None)]
    adapter = vlmeff.models.find_adapter(model)
    with vlmeff.patch(model, method="cls", keep=3) as handle:
        _, inputs = runner.generate_batch(model, processor, items, 1, BatchTimer("cpu"))
        counts = example_counts(inputs, [1, 1, 2], adapter.image_token_id, handle.stats, adapter.text_config, 4)
    assert len(set(inputs["attention_mask"].sum(1).tolist())) == 3              # padded: three lengths,
    assert inputs["attention_mask"][:, -1].all()                                # on the left
    assert [c["visual_tokens"] for c in counts] == [3, 3, 6]
    assert [c["visual_tokens_unpatched"] for c in counts] == [16, 16, 32]
    for key in ("prefill_flops", "prefill_flops_unpatched", "kv_cache_bytes", "kv_cache_bytes_unpatched"):
        assert sum(c[key] for c in counts) == handle.stats[key], key


def test_timings_are_recorded_per_batch(tiny, fixtures, tmp_path):
    results = evaluate(tiny, "pope", data=str(fixtures["pope"]), batch_size=2, max_new_tokens=3,
                       out=tmp_path / "run", progress=False)
    timings = read_jsonl(tmp_path / "run" / "timings.jsonl")
    assert [t["batch"] for t in timings] == [0, 1, 2] and [t["size"] for t in timings] == [2, 2, 1]
    assert all(t["prefill_ms"] > 0 and 1 <= t["new_tokens"] <= 3 and t["peak_memory_bytes"] > 0 for t in timings)
    timing = results["efficiency"]["timing"]
    assert timing["device"] == "cpu" and timing["timer"] == "time.perf_counter" and timing["batches"] == 3
    whole_calls = [t["prefill_ms"] + (t["decode_ms_per_token"] or 0) * (t["new_tokens"] - 1) for t in timings]
    assert timing["generate_ms_per_example"] == pytest.approx(sum(whole_calls) / 5, rel=1e-12)
    one_token = evaluate(tiny, "pope", data=str(fixtures["pope"]), batch_size=5, max_new_tokens=1, progress=False)
    assert one_token["efficiency"]["timing"]["decode_ms_per_token"] is None    # no token after the first


def test_shards_split_the_examples(tiny, fixtures):
    run = dict(data=str(fixtures["pope"]), batch_size=2, max_new_tokens=1, progress=False)
    assert runner.batch_grid(5, None, 2) == [(0, [0, 1]), (1, [2, 3]), (2, [4])]   # shards deal whole batches
    halves = [evaluate(tiny, "pope", shard=(rank, 2), **run) for rank in (0, 1)]
    assert [h["n"] for h in halves] == [3, 2] and halves[1]["config"]["shard"] == [1, 2]


# -- errors -----------------------------------------------------------------------------------------------------
def test_a_bad_task_name_names_the_accepted_ones():
    with pytest.raises(ValueError, match="unknown task 'popee'; accepted: easyvqa, scenes, vqav2, textvqa, gqa, "
                                         "pope, mme, scienceqa_img, mmbench; did you mean 'pope'"):
        get_task("popee")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        evaluate("tiny-llava-evqa", "nope")


def test_a_bad_split_names_the_accepted_ones(tiny, fixtures):
    with pytest.raises(ValueError, match="unknown split 'dev' in .*pope; accepted: test"):
        evaluate(tiny, "pope", data=str(fixtures["pope"]), split="dev")
    with pytest.raises(ValueError, match="unknown split 'validation' of task easyvqa; accepted: train, val, test"):
        evaluate(tiny, "easyvqa", split="validation")


def test_bad_arguments_are_refused_before_anything_loads():
    with pytest.raises(ValueError, match="keep=8 needs a method"):
        evaluate("tiny-llava-evqa", "easyvqa", keep=8)
    with pytest.raises(ValueError, match="unknown method 'clss'"):
        evaluate("tiny-llava-evqa", "easyvqa", method="clss", keep=8)
    with pytest.raises(ValueError, match="task 'easyvqa' reads the embedded data"):
        evaluate("tiny-llava-evqa", "easyvqa", data="somewhere")
    with pytest.raises(ValueError, match=r"shard=\(2, 2\); accepted: \(rank, world\)"):
        evaluate("tiny-llava-evqa", "easyvqa", shard=(2, 2))


# -- the CLI on the embedded model ------------------------------------------------------------------------------
def test_cli_eval_on_easyvqa(tmp_path, capsys):
    cli.main(["eval", "--model", "tiny-llava-evqa", "--task", "easyvqa", "--method", "cls:reduce=merge",
              "--keep", "0.25", "--limit", "16", "--batch-size", "8", "--out", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["n"] == 16 and results["config"]["options"] == {"reduce": "merge"}
    assert results["efficiency"]["visual_tokens"] == 64 and results["efficiency"]["visual_tokens_unpatched"] == 256
    assert set(results["metrics_per_kind"]) <= {"shape", "color", "yes/no"}
    assert "metrics: accuracy" in printed and "prefill FLOPs ratio" in printed and "timing on cpu" in printed
    with pytest.raises(SystemExit, match="holds a finished result"):
        cli.main(["eval", "--method", "cls:reduce=merge", "--keep", "0.25", "--limit", "16", "--batch-size", "8",
                  "--out", str(tmp_path / "run")])
    with pytest.raises(SystemExit):
        cli.main(["eval", "--task", "popee", "--out", str(tmp_path / "x")])
    assert "unknown task 'popee'; accepted: easyvqa" in capsys.readouterr().err
