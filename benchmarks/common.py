"""Shared timing helpers: variants are timed interleaved, round after round, so that machine noise hits all alike,
and each reports its median round (robust to both slow and lucky rounds on a shared machine)."""
import statistics
import time

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_device_args(parser, cuda_dtype):
    """--device, --dtype (default `cuda_dtype` on CUDA, fp32 on CPU) and --threads."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help=f"default {cuda_dtype} on CUDA, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.set_defaults(cuda_dtype=cuda_dtype)


def device_and_dtype(args):
    """Applies --threads; (device, dtype) from --device and --dtype."""
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    return device, DTYPES[args.dtype or (args.cuda_dtype if device.type == "cuda" else "fp32")]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns, device, rounds=10, warmup=2):
    """Median seconds per call of each callable in `fns` (a dict) over interleaved rounds."""
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(warmup + rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:     # rotate: no variant always goes first
            fn = fns[name]
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
