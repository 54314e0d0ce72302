"""Data-parallel `vlmeff eval`: two CPU processes (torchrun, gloo) give the one-process run's results and
predictions, each computing whole batches of the one-process grid, resuming per process, refusing together."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from lvlm_models import tiny_llava_with_processor
from vlmeff.eval import evaluate, metrics
from vlmeff.eval.parallel import Group, launcher_ranks, open_union, part_folder
from vlmeff.eval.rundir import read_jsonl
from vlmeff.eval.runner import batch_grid

ROOT = Path(__file__).resolve().parents[1]
# MME asks two questions per image. Here the two questions of every image are 3 to 5 apart, so that with batches
# of 2 dealt to two processes (batches 0, 2 -> process 0: questions 0, 1, 4, 5; batches 1, 3 -> process 1) each
# image has one question on either process: MME can only be scored on the union.
IMAGE_OF_QUESTION = [0, 1, 2, 0, 3, 2, 1, 3]
CATEGORY_OF_IMAGE = ["artwork", "count", "OCR", "code_reasoning"]
RUN = ["--task", "mme", "--method", "cls", "--keep", "4", "--batch-size", "2", "--max-new-tokens", "3"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random LLaVA (CLIP 32 px, patch 8: 16 patches + [CLS]; Llama 2 layers), saved."""
    model, processor = tiny_llava_with_processor()
    folder = tmp_path_factory.mktemp("model")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mme_dir(tmp_path_factory):
    """8 MME questions on 4 images in lmms-lab/MME's layout; prompts of 8 lengths, so batches are padded."""
    rng = np.random.default_rng(0)
    pictures = [Image.fromarray(rng.integers(0, 256, (28 + 4 * k, 36, 3), dtype=np.uint8)) for k in range(4)]
    columns = {"question_id": [f"{CATEGORY_OF_IMAGE[i]}/{i}.jpg" for i in IMAGE_OF_QUESTION],
               "image": [pictures[i] for i in IMAGE_OF_QUESTION],
               "question": [f"Is this {'very ' * k}artwork {k}? Please answer yes or no." for k in range(8)],
               "answer": ["Yes", "Yes", "No", "No", "Yes", "Yes", "No", "No"],
               "category": [CATEGORY_OF_IMAGE[i] for i in IMAGE_OF_QUESTION]}
    folder = tmp_path_factory.mktemp("mme")
    dataset = datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(folder))
    return folder


def launch(launcher, *args):
    """Runs `LAUNCHER... -m vlmeff eval ARGS` from the repository root; the finished process."""
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", *launcher, "-m", "vlmeff", "eval", *map(str, args)]
    return subprocess.run(command, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=300)


def torchrun(*args):
    return launch(["torch.distributed.run", "--standalone", "--nproc_per_node", "2"], *args)


def without_timing(results):
    return {**results, "efficiency": {k: v for k, v in results["efficiency"].items() if k != "timing"}}


def indices(path):
    return [line["index"] for line in read_jsonl(path)]


def batches(path):
    return [(t["batch"], t["size"]) for t in read_jsonl(path)]


@pytest.fixture(scope="module")
def one_process(model_dir, mme_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "run"
    results = evaluate(str(model_dir), "mme", method="cls", keep=4, batch_size=2, max_new_tokens=3,
                       data=str(mme_dir), out=out, progress=False)
    return results, out


@pytest.fixture(scope="module")
def two_processes(model_dir, mme_dir, tmp_path_factory):
    """The same run by two processes (torchrun, gloo): (the launch, its out folder)."""
    out = tmp_path_factory.mktemp("two") / "run"
    done = torchrun("--model", model_dir, "--data", mme_dir, *RUN, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    return done, out


def copy_of(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "run")
    return tmp_path / "run"


def test_two_processes_give_the_one_process_run(one_process, two_processes):
    """Results and predictions equal; each process computed whole batches of the one-process grid (the same
    sizes, so the same padding), and MME was scored on their union only."""
    (reference, reference_out), (done, out) = one_process, two_processes
    results = json.loads((out / "results.json").read_text())
    assert without_timing(results) == without_timing(reference)
    assert read_jsonl(out / "predictions.jsonl") == read_jsonl(reference_out / "predictions.jsonl")
    assert results["efficiency"]["timing"]["processes"] == 2 and results["efficiency"]["timing"]["batches"] == 4
    assert done.stdout.count("metrics: perception") == 1                              # process 0 prints
    parts = out / "parts"
    assert indices(parts / "rank-0-of-2" / "predictions.jsonl") == [0, 1, 4, 5]
    assert indices(parts / "rank-1-of-2" / "predictions.jsonl") == [2, 3, 6, 7]
    assert batches(out / "timings.jsonl") == batches(reference_out / "timings.jsonl") == [(b, 2) for b in range(4)]
    for rank in (0, 1):                        # a shard alone cannot be scored: its images have one question
        lines = read_jsonl(parts / f"rank-{rank}-of-2" / "predictions.jsonl")
        with pytest.raises(ValueError, match="two questions per image"):
            metrics.score("mme", [x["prediction"] for x in lines], [x["reference"] for x in lines])


def test_both_processes_refuse_a_finished_folder(two_processes, model_dir, mme_dir, tmp_path):
    out = copy_of(two_processes[1], tmp_path)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    refused = torchrun("--model", model_dir, "--data", mme_dir, *RUN, "--out", out)
    assert refused.returncode != 0
    assert refused.stderr.count("holds a finished result") == 2, refused.stderr[-3000:]
    assert "process 0 of 2 failed" in refused.stderr                    # process 1 says whose refusal it was
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_each_process_resumes_its_own_part(one_process, two_processes, model_dir, mme_dir, tmp_path):
    """Interrupted: process 0 lost its last batch, process 1 half of its last one (the other half torn); each
    computes only those batches again, and the union is the one-process run's."""
    (reference, reference_out), out = one_process, copy_of(two_processes[1], tmp_path)
    (out / "results.json").unlink()
    parts = out / "parts"
    part0, part1 = parts / "rank-0-of-2" / "predictions.jsonl", parts / "rank-1-of-2" / "predictions.jsonl"
    part0.write_bytes(b"".join(part0.read_bytes().splitlines(keepends=True)[:2]))
    part1.write_bytes(part1.read_bytes()[:len(b"".join(part1.read_bytes().splitlines(keepends=True)[:3])) + 10])
    resumed = torchrun("--model", model_dir, "--data", mme_dir, *RUN, "--out", out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert without_timing(json.loads((out / "results.json").read_text())) == without_timing(reference)
    assert read_jsonl(out / "predictions.jsonl") == read_jsonl(reference_out / "predictions.jsonl")
    assert batches(parts / "rank-0-of-2" / "timings.jsonl") == [(0, 2), (2, 2), (2, 2)]     # batch 2 again
    assert batches(parts / "rank-1-of-2" / "timings.jsonl") == [(1, 2), (3, 2), (3, 2)]     # batch 3 again


def test_accelerate_launch_gives_the_one_process_run(one_process, model_dir, mme_dir, tmp_path):
    pytest.importorskip("accelerate")
    reference, _ = one_process
    out = tmp_path / "accelerate"
    done = launch(["accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no"],
                  "--model", model_dir, "--data", mme_dir, *RUN, "--out", out)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert without_timing(results) == without_timing(reference)
    assert results["efficiency"]["timing"]["processes"] == 2


# -- pieces -----------------------------------------------------------------------------------------------------
def test_shards_deal_whole_batches_of_the_one_process_grid():
    grid = batch_grid(11, None, 3)
    assert grid == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6, 7, 8]), (3, [9, 10])]
    assert batch_grid(11, 7, 3) == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6])]
    shards = [grid[rank::3] for rank in range(3)]
    assert shards == [[grid[0], grid[3]], [grid[1]], [grid[2]]]


def test_launcher_ranks_read_the_launchers_variables():
    assert launcher_ranks({}) == (0, 1, 0)
    assert launcher_ranks({"WORLD_SIZE": "1", "RANK": "0"}) == (0, 1, 0)
    assert launcher_ranks({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert launcher_ranks({"WORLD_SIZE": "2", "RANK": "1"}) == (1, 2, 1)        # LOCAL_RANK: RANK by default
    with pytest.raises(ValueError, match=r"WORLD_SIZE='two'; accepted: an integer >= 1"):
        launcher_ranks({"WORLD_SIZE": "two"})
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 but RANK is not set; accepted: RANK in \[0, 1\]"):
        launcher_ranks({"WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match=r"RANK=2 with WORLD_SIZE=2; accepted: RANK in \[0, 1\]"):
        launcher_ranks({"WORLD_SIZE": "2", "RANK": "2"})
    with pytest.raises(ValueError, match=r"LOCAL_RANK='-1'; accepted: an integer >= 0"):
        launcher_ranks({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"})


class Canned(Group):
    """A group whose exchange returns what the other processes are given to say (no torch.distributed)."""

    def __init__(self, rank, others):
        super().__init__(rank, len(others) + 1)
        self.others = others

    def all_gather(self, value):
        return [*self.others[:self.rank], value, *self.others[self.rank:]]


def test_a_failure_in_one_process_is_raised_in_every_process():
    assert Canned(0, [None]).agree(lambda: 7) == 7
    refused = ("FileExistsError", "runs/x holds a finished result")
    with pytest.raises(FileExistsError, match=r"^process 0 of 2 failed: runs/x holds a finished result$"):
        Canned(1, [refused]).agree(lambda: 7)
    with pytest.raises(RuntimeError, match=r"^process 2 of 3 failed: CUDA out of memory$"):
        Canned(0, [None, ("OutOfMemoryError", "CUDA out of memory")]).agree(lambda: 7)

    def fail():
        raise KeyError("own")
    with pytest.raises(KeyError, match="own"):                      # a process raises its own error as it is
        Canned(0, [refused]).agree(fail)


def test_overwrite_removes_the_parts_and_nothing_else(tmp_path):
    config = {"task": "mme"}
    open_union(tmp_path, config, overwrite=False)
    for rank in (0, 1):
        part = part_folder(tmp_path, rank, 2)
        part.mkdir(parents=True)
        for name in ("config.json", "predictions.jsonl", "timings.jsonl"):
            (part / name).write_text("{}\n")
    (part_folder(tmp_path, 0, 2) / "notes.txt").write_text("mine")
    (tmp_path / "results.json").write_text("{}")
    with pytest.raises(FileExistsError, match="holds a finished result"):
        open_union(tmp_path, config, overwrite=False)
    open_union(tmp_path, config, overwrite=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "config.json", "parts", "parts/rank-0-of-2", "parts/rank-0-of-2/notes.txt"]
