"""Evaluation on VQA benchmarks: accuracy and measured cost of an LVLM, unpatched or patched.

    from vlmeff.eval import evaluate
    results = evaluate("tiny-llava-evqa", "easyvqa", method="cls", keep=64, limit=256, out="runs/cls64")
    results["metrics"], results["efficiency"]

`tasks`: the task specs and LLaVA-1.5's prompt formats; `sources`: the datasets they read; `runner`: the batched,
resumable loop; `rundir`: its output folder; `parallel`: the same loop shared by the processes of torchrun or
accelerate launch (`evaluate_parallel`); `efficiency`: what is measured and how; `metrics`: the scores, as each
benchmark's reference implementation computes them; `lmms`: a model plugin for lmms-eval (the `lmms` extra);
`sweep`: methods x budgets into a table and plots.

    from vlmeff.eval import sweep
    rows = sweep("tiny-llava-evqa", "easyvqa", ["cls", "pool"], [0.25, 0.125], out="runs/sweep", limit=256)
"""
from .parallel import evaluate_parallel
from .runner import evaluate, load_model
from .sources import load_examples
from .sweep import read_spec, sweep
from .tasks import TASKS, Example, Task, get_task

__all__ = ["TASKS", "Example", "Task", "evaluate", "evaluate_parallel", "get_task", "load_examples", "load_model",
           "read_spec", "sweep"]
