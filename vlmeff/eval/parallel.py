"""Data-parallel evaluation: N processes share a run's batches, and their union is scored once.

    torchrun --nproc_per_node 4 -m vlmeff eval --model llava-hf/llava-1.5-7b-hf --task pope --out runs/pope
    accelerate launch --num_processes 4 -m vlmeff eval --model ... --task pope --out runs/pope

or `evaluate_parallel(...)` (the arguments of `evaluate`) in a script started by either launcher. A process learns
its place from the variables the launchers set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and joins a
torch.distributed group (NCCL when CUDA is available, each process on cuda:LOCAL_RANK; gloo on the CPU), unless
the script has joined one already (accelerate's `PartialState()`). Without a launcher it is `evaluate`.

Sharding is by batch, not by example: the one-process batch grid (consecutive batches of `batch_size`) is dealt
round robin, process r computing batches r, r + N, r + 2N, ... So every example sits in the same batch, with the
same padding, as in the one-process run, and the union of the shards' predictions is that run's predictions; the
processes differ in load by one batch at most.

    out/config.json, predictions.jsonl, timings.jsonl, results.json   the union, as one process writes them
    out/parts/rank-R-of-N/                                            process R's own run folder (`rundir`)

Each process appends its predictions to its part as they are made, so an interrupted run resumes per process
(relaunched with the same N; with another N the parts of that N are computed afresh). After the last batch the
processes exchange their predictions (`all_gather_object`), every process scores the union (MME's two questions
per image and MMBench's circular groups may fall to different processes: only the union is scored) and returns
the results, and process 0 writes the union's files. A refusal (a finished or foreign out folder) or a failure
in one process is raised in all of them, so none waits forever for the others.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

from .rundir import MemoryRun, RunFolder
from .runner import checked_config, compute, evaluate, load_model, plan_run, run_results

RAISED_AS_IS = {"FileExistsError": FileExistsError, "ValueError": ValueError}    # refusals the CLI reports
# how long a process waits in an exchange for the slowest one: a resumed process whose part is complete waits
# there for the others' whole remaining work (torch's default, 10-30 minutes, would end long runs)
EXCHANGE_TIMEOUT = datetime.timedelta(hours=48)


def launcher_ranks(environ=None):
    """(rank, world, local_rank) from the variables torchrun and accelerate launch set: RANK, WORLD_SIZE and
    LOCAL_RANK (default: RANK, as on one machine); (0, 1, 0) without WORLD_SIZE. ValueError naming a variable
    whose value is not accepted."""
    environ = os.environ if environ is None else environ
    world = environ_int(environ, "WORLD_SIZE", 1, minimum=1)
    if world == 1:
        return 0, 1, 0
    if "RANK" not in environ:
        raise ValueError(f"WORLD_SIZE={world} but RANK is not set; accepted: RANK in [0, {world - 1}] (torchrun "
                         "and accelerate launch set both)")
    rank = environ_int(environ, "RANK", 0, minimum=0)
    if rank >= world:
        raise ValueError(f"RANK={rank} with WORLD_SIZE={world}; accepted: RANK in [0, {world - 1}]")
    return rank, world, environ_int(environ, "LOCAL_RANK", rank, minimum=0)


def environ_int(environ, name, default, minimum):
    text = environ.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}={text!r}; accepted: an integer >= {minimum}")
    return value


class Group:
    """This process's place in a torch.distributed group, and the two exchanges a parallel run makes. They go
    through `exchange`, a gloo group over the same processes (objects travel through host memory whatever the
    main group's backend, with EXCHANGE_TIMEOUT); None for a group of one."""

    def __init__(self, rank, world, exchange=None):
        self.rank, self.world, self.exchange = rank, world, exchange

    def all_gather(self, value):
        """[the value of process 0, of process 1, ...] on every process (any picklable value)."""
        values = [None] * self.world
        dist.all_gather_object(values, value, group=self.exchange)
        return values

    def agree(self, action):
        """action()'s value, once every process has run its own action: if any of them raised, all raise (this
        one its own error; the others a FileExistsError / ValueError like the failed one's, else RuntimeError,
        naming the process). Without it a failed process would leave the others waiting in the next exchange."""
        try:
            value, failure = action(), None
        except Exception as error:      # noqa: BLE001 (every failure must reach the other processes)
            value, failure = None, error
        failures = self.all_gather(None if failure is None else (type(failure).__name__, str(failure)))
        if failure is not None:
            raise failure
        for rank, failed in enumerate(failures):
            if failed is not None:
                name, message = failed
                raise RAISED_AS_IS.get(name, RuntimeError)(f"process {rank} of {self.world} failed: {message}")
        return value


@contextlib.contextmanager
def process_group():
    """The `Group` of this process: the torch.distributed group already joined (by accelerate's
    `PartialState()` or the script), else the one the launcher's variables describe (joined here, and left on
    exit: NCCL on cuda:LOCAL_RANK when CUDA is available, gloo otherwise); a group of one without a launcher."""
    if dist.is_available() and dist.is_initialized():
        with exchange_group() as exchange:
            yield Group(dist.get_rank(), dist.get_world_size(), exchange)
        return
    rank, world, local_rank = launcher_ranks()
    if world == 1:
        yield Group(0, 1)
        return
    backend = "gloo"
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} but {count} GPUs are visible; accepted: LOCAL_RANK in "
                             f"[0, {count - 1}] (one process per GPU)")
        torch.cuda.set_device(local_rank)       # "cuda" now means this process's GPU (models, collectives)
        backend = "nccl"
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=EXCHANGE_TIMEOUT)
    try:
        with exchange_group() as exchange:
            yield Group(rank, world, exchange)
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def exchange_group():
    """A gloo group of all the processes of the initialised default group, for the exchanges; removed on exit."""
    exchange = dist.new_group(backend="gloo", timeout=EXCHANGE_TIMEOUT)
    try:
        yield exchange
    finally:
        dist.destroy_process_group(exchange)


def part_folder(out, rank, world):
    return Path(out) / "parts" / f"rank-{rank}-of-{world}"


def evaluate_parallel(model, task, method=None, keep=None, limit=None, out=None, batch_size=16, overwrite=False,
                      *, data=None, split=None, dtype="auto", device_map=None, max_new_tokens=None, progress=True,
                      **method_options) -> dict:
    """`evaluate` (same arguments, same results) with the batches shared by the processes of a launcher (see the
    module's docstring); returns the results on every process. Without a launcher it is `evaluate`.
    device_map must stay None with several processes: each holds its model whole on its own device."""
    run = dict(data=data, split=split, dtype=dtype, max_new_tokens=max_new_tokens, progress=progress)
    with process_group() as group:
        if group.world == 1:
            return evaluate(model, task, method, keep, limit, out, batch_size, overwrite, device_map=device_map,
                            **run, **method_options)
        if device_map is not None:
            raise ValueError(f"device_map={device_map!r} with {group.world} processes; accepted: None (each "
                             "process holds its model whole on its own device)")
        spec, config = checked_config(model, task, method, keep, limit, batch_size, data, split, dtype,
                                      max_new_tokens, None, method_options)     # the same on every process
        union = group.agree(lambda: open_union(out, config, overwrite) if group.rank == 0 else None)
        whole = group.agree(lambda: plan_run(spec, config))
        mine = whole.shard(group.rank, group.world)
        label = f"{whole.spec.name} {method or 'unpatched'}, process {group.rank + 1}/{group.world}"
        part = group.agree(lambda: compute_part(mine, out, model, progress, label))
        shared = group.all_gather((list(part.predictions().values()), part.timings()))
        predictions = {line["index"]: line for lines, _ in shared for line in lines}
        timings = sorted((t for _, records in shared for t in records), key=lambda t: t["batch"])
        results = run_results(whole, predictions, timings, processes=group.world)
        group.agree(lambda: write_union(union, whole, predictions, timings, results) if group.rank == 0 else None)
        return results


def open_union(out, config, overwrite):
    """The union's run folder (process 0 only): refused as `RunFolder` refuses; overwrite also removes the parts."""
    if out is None:
        return MemoryRun()
    union = RunFolder(out, config, overwrite)
    if overwrite:
        remove_parts(out)
    return union


def remove_parts(out):
    """Deletes the parts' run files and then their folders, if nothing else is left in them."""
    parts = Path(out) / "parts"
    for folder in sorted(parts.glob("rank-*-of-*")):
        for name in ("config.json", "predictions.jsonl", "timings.jsonl"):
            (folder / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        parts.rmdir()


def compute_part(plan, out, model, progress, label):
    """This process's run folder (or memory, without out), its missing batches computed."""
    part = RunFolder(part_folder(out, *plan.config["shard"]), plan.config) if out is not None else MemoryRun()
    compute(plan, part, lambda: load_model(model, plan.config["dtype"]), progress, label)
    return part


def write_union(union, whole, predictions, timings, results):
    """The union's predictions (in example order), timings (in batch order) and, last, results.json."""
    union.replace_predictions([predictions[i] for i in whole.positions])
    union.replace_timings(timings)
    union.finish(results)

