"""The lmms-eval plugin. Its request handling (`vlmeff.eval.lmms_requests`) is tested without lmms-eval; with the
`lmms` extra installed, lmms-eval's own registry and `simple_evaluate` run the plugin on local tasks (a generation,
a multiple-choice and a multi-round one, YAMLs loading a saved dataset) with the embedded tiny-llava-evqa, patched."""
import importlib.util
import math
import tomllib
from pathlib import Path

import datasets
import pytest
import torch
from PIL import Image

import vlmeff
from vlmeff import zoo
from vlmeff.eval import Example, evaluate, runner
from vlmeff.eval.rundir import read_jsonl
from vlmeff.eval.lmms_requests import (DEFAULT_MAX_NEW_TOKENS, ModelArgs, continuation_loss, converse, cut_at_stops,
                                       example_of, generation_settings, parse_model_args, request_batches)

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = 8
ANSWERS = ["circle", "rectangle", "triangle", "red", "green", "blue", "black", "gray", "teal", "brown", "yellow",
           "yes", "no"]


# -- model_args --------------------------------------------------------------------------------------------------
def test_model_args_split_into_the_loader_s_and_the_patch():
    # as lmms-eval hands them: --model_args parsed (numbers converted), --batch_size as text, --device
    args = {"pretrained": "tiny-llava-evqa", "method": "cls", "keep": 64, "reduce": "merge", "batch_size": "4",
            "device": "cpu"}
    assert parse_model_args(args) == ModelArgs("tiny-llava-evqa", "auto", "cpu", 4, "cls", 64, {"reduce": "merge"})
    assert parse_model_args({"pretrained": "p", "dtype": "bfloat16", "device_map": "auto"}) == ModelArgs(
        "p", "bfloat16", "auto", 1, None, None, {})
    assert args["reduce"] == "merge"                                  # the caller's dict is left as it was


def test_bad_model_args_name_what_is_accepted():
    with pytest.raises(ValueError, match="model_args needs pretrained=NAME_OR_PATH"):
        parse_model_args({"method": "cls"})
    with pytest.raises(ValueError, match=r"unknown model_args key 'kep' for method 'cls'; accepted: pretrained, dtype, "
                                         r"device, device_map, batch_size, method, keep, layer, .*did you mean 'keep'"):
        parse_model_args({"pretrained": "p", "method": "cls", "kep": 64})
    with pytest.raises(ValueError, match="unknown model_args key 'r' for method 'cls'"):   # tome's, not cls's
        parse_model_args({"pretrained": "p", "method": "cls", "keep": 8, "r": 4})
    with pytest.raises(ValueError, match="unknown model_args key 'reduce' for the unpatched model"):
        parse_model_args({"pretrained": "p", "reduce": "merge"})
    with pytest.raises(ValueError, match="keep=64 needs a method"):
        parse_model_args({"pretrained": "p", "keep": 64})
    with pytest.raises(ValueError, match="unknown method 'clss'"):
        parse_model_args({"pretrained": "p", "method": "clss"})
    with pytest.raises(ValueError, match="dtype='fp16'; accepted: auto, float32, float16, bfloat16"):
        parse_model_args({"pretrained": "p", "dtype": "fp16"})
    with pytest.raises(ValueError, match="batch_size='auto'; accepted: an integer >= 1"):
        parse_model_args({"pretrained": "p", "batch_size": "auto"})
    with pytest.raises(ValueError, match="batch_size=0; accepted: an integer >= 1"):
        parse_model_args({"pretrained": "p", "batch_size": 0})
    with pytest.raises(ValueError, match="device='cpu' and device_map='auto'; accepted: one of them"):
        parse_model_args({"pretrained": "p", "device": "cpu", "device_map": "auto"})


# -- generation ---------------------------------------------------------------------------------------------------
def test_generation_settings_of_a_task_s_gen_kwargs():
    assert generation_settings({}) == ({"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "num_beams": 1,
                                        "do_sample": False}, [], [])
    greedy = {"until": "\n", "max_new_tokens": 16, "temperature": 0, "top_p": None, "num_beams": 1,
              "image_aspect_ratio": "pad"}
    assert generation_settings(greedy) == ({"max_new_tokens": 16, "num_beams": 1, "do_sample": False}, ["\n"],
                                           ["image_aspect_ratio"])
    sampled = {"until": ["USER:", "\n\n"], "temperature": 0.7, "top_p": 0.9, "num_beams": 2}
    assert generation_settings(sampled) == ({"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "num_beams": 2,
                                             "do_sample": True, "temperature": 0.7, "top_p": 0.9},
                                            ["USER:", "\n\n"], [])
    assert generation_settings({"do_sample": True})[0]["temperature"] == 1.0
    assert generation_settings({"do_sample": False, "temperature": 0.5})[0] == {
        "max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "num_beams": 1, "do_sample": False}


@pytest.mark.parametrize("gen_kwargs, message", [
    ({"until": 5}, "until=5; accepted: a string or a list of strings"),
    ({"until": ["a", 1]}, r"until=\['a', 1\]; accepted"),
    ({"max_new_tokens": 0}, "max_new_tokens=0; accepted: an integer >= 1"),
    ({"num_beams": 1.5}, "num_beams=1.5; accepted: an integer >= 1"),
    ({"temperature": -1}, "temperature=-1; accepted: a number >= 0"),
    ({"top_p": 1.5}, r"top_p=1.5; accepted: a number in \(0, 1\]"),
    ({"do_sample": "yes"}, "do_sample='yes'; accepted: true or false"),
])
def test_bad_gen_kwargs_name_what_is_accepted(gen_kwargs, message):
    with pytest.raises(ValueError, match=message):
        generation_settings(gen_kwargs)


def test_answers_are_cut_at_the_first_stop_and_stripped():
    assert cut_at_stops("red\nblue", ["\n"]) == "red"
    assert cut_at_stops(" red. USER: more", ["USER:", "."]) == "red"
    assert cut_at_stops(" red ", []) == "red" and cut_at_stops("red", [""]) == "red"


def test_requests_batch_by_their_gen_kwargs_in_request_order():
    a, b = {"max_new_tokens": 3}, {"max_new_tokens": 3, "until": ["\n"]}
    assert request_batches([a, a, b, dict(a), b, a], 2) == [(a, [0, 1]), (a, [3, 5]), (b, [2, 4])]
    assert request_batches([a, a, a], 5) == [(a, [0, 1, 2])]


def test_a_request_becomes_a_vlmeff_example():
    image = Image.new("RGBA", (8, 8))
    example = example_of("<image>\nWhat color is the shape?", [image])
    assert example.prompt == "What color is the shape?" and example.reference is None and example.kind is None
    assert [x.mode for x in example.images] == ["RGB"]
    assert example_of("two <image> <image> pictures", [image, image]).prompt == "two   pictures"
    assert example_of("text only", None).images == [] and example_of("text only", []).images == []
    with pytest.raises(TypeError, match="takes PIL images; this request has a str visual \\('clip.mp4'\\)"):
        example_of("a video", ["clip.mp4"])


def test_continuation_loss_reads_the_rows_that_predict_the_continuation():
    """Logits of a 4-token sequence whose continuation is its last 2 tokens: rows 1 and 2 predict them; rows 0 and
    3 must not count (set to values that would change any result)."""
    rows = [[50.0, -50.0, 0.0], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [-50.0, 50.0, 0.0]]
    logits = torch.tensor([[math.log(p) if 0 < p < 1 else p for p in row] for row in rows])
    loss, greedy = continuation_loss(logits, torch.tensor([2, 0]))
    assert loss == pytest.approx(-(math.log(0.5) + math.log(0.6)) / 2) and greedy
    loss, greedy = continuation_loss(logits, torch.tensor([1, 0]))
    assert loss == pytest.approx(-(math.log(0.3) + math.log(0.6)) / 2) and not greedy
    assert continuation_loss(logits, torch.tensor([1]))[0] == pytest.approx(-math.log(0.3))   # row 2 alone


def test_multi_round_requests_follow_the_task_s_rounds():
    calls = []

    def answer(context, visuals):
        calls.append(("answer", context, visuals))
        return f"A{len([c for c in calls if c[0] == 'answer']) - 1}"

    def next_round(previous, round_index, info):
        calls.append(("next", previous, round_index, info))
        if round_index == 1:
            return ["image 1"], "second question", False, previous, {"seen": 1}
        return None, None, True, [previous[0], "rewritten by the task"], None

    assert converse("first question", ["image 0"], next_round, answer) == ["A0", "rewritten by the task"]
    assert calls == [("answer", "first question", ["image 0"]), ("next", ["A0"], 1, None),
                     ("answer", "second question", ["image 1"]), ("next", ["A0", "A1"], 2, {"seen": 1})]


def test_a_text_only_batch_reaches_the_model_without_images():
    model, processor = zoo.load("tiny-llava-evqa")
    inputs = runner.chat_inputs(processor, [Example([], "hello", None, None)] * 2, model)
    assert "pixel_values" not in inputs and inputs["input_ids"].shape[0] == 2


# -- through lmms-eval ----------------------------------------------------------------------------------------------
TASK = """task: {name}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.{doc_to_text}
"""
TASKS = {
    "vlmeff_evqa": TASK + """output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""",
    "vlmeff_evqa_choice": TASK + f"""output_type: multiple_choice
doc_to_choice: {ANSWERS}
doc_to_target: !function utils.doc_to_target
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "vlmeff_evqa_rounds": TASK + """output_type: generate_until_multi_round
doc_to_target: answer
process_results: !function utils.rounds_results
generation_kwargs:
  max_new_tokens: 3
metric_list:
  - metric: both_rounds
    aggregation: mean
    higher_is_better: true
""",
}
UTILS = f'''ANSWERS = {ANSWERS}


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def doc_to_target(doc):
    return ANSWERS.index(doc["answer"])


def rounds(doc, lmms_eval_specific_kwargs=None, previous_output=None, round_idx=None, previous_round_info=None):
    """Asks the question, then again with the image once more; two rounds."""
    if round_idx is None:
        return doc["question"]
    if round_idx == 1:
        return [doc["image"].convert("RGB")], doc["question"], False, previous_output, None
    return None, None, True, previous_output, None


def rounds_results(doc, results):
    return {{"both_rounds": float(list(results[0]) == [doc["answer"]] * 2)}}
'''


@pytest.fixture(scope="module")
def local_tasks(tmp_path_factory):
    """A folder of task YAMLs over the first QUESTIONS easy-VQA test questions, saved with save_to_disk."""
    images, records = zoo.vqa_split("easyvqa", "test")
    rows = records[:QUESTIONS]
    folder = tmp_path_factory.mktemp("lmms_tasks")
    dataset = datasets.Dataset.from_dict({"image": [images[i] for i, *_ in rows], "question": [r[1] for r in rows],
                                          "answer": [r[2] for r in rows]}).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(folder / "data"))
    for name, text in TASKS.items():
        doc_to_text = "rounds" if name.endswith("rounds") else "doc_to_text"
        (folder / f"{name}.yaml").write_text(text.format(name=name, data=folder / "data", doc_to_text=doc_to_text))
    (folder / "utils.py").write_text(UTILS)
    return folder


@pytest.fixture
def registered(tmp_path, monkeypatch):
    """lmms-eval's registry after loading the `lmms_eval.models` entry points, with this checkout's entry point
    (pyproject.toml's, written to a dist-info on sys.path: the installed vlmeff may be another checkout)."""
    pytest.importorskip("lmms_eval")
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lmms_eval.models"]
    info = tmp_path / "vlmeff_checkout-0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vlmeff-checkout\nVersion: 0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in declared.items())
    (info / "entry_points.txt").write_text(f"[lmms_eval.models]\n{lines}")
    monkeypatch.syspath_prepend(str(tmp_path))
    import lmms_eval.models

    lmms_eval.models.MODEL_REGISTRY_V2.load_entrypoint_manifests(overwrite=True)   # as lmms-eval's import does
    return lmms_eval.models


def test_lmms_eval_resolves_the_plugin(registered):
    from vlmeff.eval.lmms import VlmeffLmms

    assert registered.get_model("vlmeff") is VlmeffLmms
    model = VlmeffLmms.create_from_arg_string("pretrained=tiny-llava-evqa,method=cls,keep=16,reduce=merge",
                                              {"batch_size": "2", "device": "cpu"})
    assert model.patch.config["reduce"] == "merge" and model.patch.config["keep"] == 16 and model.batch_size == 2
    patched = model.model
    model.clean()
    assert getattr(patched, "_vlmeff_patch", None) is None          # clean() unpatched the model
    with pytest.raises(ValueError, match="did you mean 'keep'"):
        VlmeffLmms.create_from_arg_string("pretrained=tiny-llava-evqa,method=cls,kep=16")


def test_lmms_eval_runs_local_tasks_with_the_plugin(registered, local_tasks, monkeypatch, tmp_path):
    """Generation: the answers vlmeff eval gives (same prompts, same batches of 2, same patch). Multiple choice:
    every answer word scored, the right one the least loss and the only greedy one, its loss HF's own loss of the
    patched model. Two rounds: the same answer twice."""
    from lmms_eval import evaluator
    from lmms_eval.tasks import TaskManager

    if importlib.util.find_spec("filelock._api") is None:
        # lmms-eval 0.7.3's simple_evaluate first patches filelock._api, which filelock 4 no longer has (the
        # lmms extra pins filelock < 4); that patch only matters for datasets' locks across processes
        monkeypatch.setattr(evaluator, "_enable_reentrant_filelocks", lambda: None)
    out = evaluator.simple_evaluate(model="vlmeff", model_args="pretrained=tiny-llava-evqa,method=cls,keep=64",
                                    tasks=list(TASKS), batch_size=2, device="cpu", log_samples=True,
                                    task_manager=TaskManager(include_path=str(local_tasks), include_defaults=False))
    samples = {name: sorted(out["samples"][name], key=lambda s: s["doc_id"]) for name in TASKS}
    reference = evaluate("tiny-llava-evqa", "easyvqa", method="cls", keep=64, limit=QUESTIONS, batch_size=2,
                         max_new_tokens=3, out=tmp_path / "vlmeff_eval", progress=False)
    predicted = [line["prediction"] for line in read_jsonl(tmp_path / "vlmeff_eval" / "predictions.jsonl")]
    _, records = zoo.vqa_split("easyvqa", "test")
    generated = [s["resps"][0][0] for s in samples["vlmeff_evqa"]]
    assert len(generated) == QUESTIONS and generated == predicted
    assert out["results"]["vlmeff_evqa"]["exact_match,none"] == reference["metrics"]["accuracy"] == 1.0

    choice = samples["vlmeff_evqa_choice"]
    for sample, (_, _, answer, _) in zip(choice, records):
        losses, greedy = zip(*(response[0] for response in sample["resps"]))
        assert ANSWERS[min(range(len(ANSWERS)), key=losses.__getitem__)] == answer
        assert [ANSWERS[k] for k, g in enumerate(greedy) if g] == [answer]
    assert out["results"]["vlmeff_evqa_choice"]["acc,none"] == 1.0
    first_losses = [response[0][0] for response in choice[0]["resps"]]
    assert first_losses[ANSWERS.index(records[0][2])] == pytest.approx(hf_loss(records[0], records[0][2]), rel=1e-5)

    assert [s["resps"][0][0] for s in samples["vlmeff_evqa_rounds"]] == [[p, p] for p in predicted]
    assert out["results"]["vlmeff_evqa_rounds"]["both_rounds,none"] == 1.0


def hf_loss(record, answer):
    """transformers' own loss of `answer` after the question's prompt, on the patched model: labels -100 but on
    the answer's tokens (as lmms-eval's llava_hf computes a loglikelihood)."""
    model, processor = zoo.load("tiny-llava-evqa")
    images, _ = zoo.vqa_split("easyvqa", "test")
    inputs = runner.chat_inputs(processor, [Example([images[record[0]]], record[1], None, None)], model)
    ids = processor.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -ids.shape[1]:] = ids
    with vlmeff.patch(model, method="cls", keep=64), torch.no_grad():
        return model(**inputs, labels=labels).loss.item()

