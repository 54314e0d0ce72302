"""Effective bandwidth of gather_merge variants at LVLM sizes, and attention_rows against a full attention call.

gather_merge: 576 visual tokens -> 64 / 144, hidden 1024 / 4096, for drop (segments of one token) and merge
(every token averaged into one of the outputs, with size weights). Variants, timed interleaved in one run:
  fused     the Triton kernel (CUDA only; validate=False, i.e. without the host-synchronising index checks)
  fused+chk the same with validate=True (the default)
  reference the PyTorch reference (gather + scatter_add + divide)
  compiled  torch.compile of the reference
Effective bandwidth = minimal bytes (member rows, index, offsets, weights read; outputs and totals written) / time.

attention_rows: head-mean softmax of one query row against all keys, next to one full SDPA call (Q = K = V of
all N tokens) at the same size, which is the attention it scores.

    python benchmarks/kernels.py            # CUDA if present (bf16), else CPU (fp32; no Triton timing there)
    python benchmarks/kernels.py --quick    # a small subset
    python benchmarks/kernels.py --threads 1   # CPU: one thread is steadier on a shared machine
"""
import argparse
import statistics
import time
import warnings

import torch
import torch.nn.functional as F

from common import add_device_args, device_and_dtype, machine
from vlmeff.kernels import KernelFallbackWarning, gather_merge, segments_from_assignment
from vlmeff.kernels.attention_rows import attention_rows
from vlmeff.kernels.reference import gather_merge_reference

N_TOKENS = 576


def time_interleaved(fns, device, rounds, iters, warmup=2):
    """Median seconds per call of each callable in `fns`, `iters` calls per timing, variants interleaved per round.
    CUDA timings use events, so the host-side launch gap between calls is not counted twice."""
    times = {name: [] for name in fns}
    for r in range(warmup + rounds):
        for name, fn in fns.items():
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                end.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                for _ in range(iters):
                    fn()
                elapsed = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(elapsed / iters)
    return {name: statistics.median(t) for name, t in times.items()}


def make_case(mode, B, K, D, dtype, device):
    """Inputs of one gather_merge call: keep K random tokens of 576 (drop), or also average every other token
    into a random kept one (merge, weighted by token sizes)."""
    x = torch.randn(B, N_TOKENS, D, device=device, dtype=dtype)
    keep = torch.rand(B, N_TOKENS, device=device).argsort(dim=1)[:, :K].sort(dim=1).values
    slots = torch.arange(K, device=device).expand(B, K)
    if mode == "drop":
        dst = torch.full((B, N_TOKENS), -1, device=device).scatter_(1, keep, slots)
        weight = None
    else:
        dst = torch.randint(0, K, (B, N_TOKENS), device=device).scatter_(1, keep, slots)
        weight = torch.randint(1, 4, (B, N_TOKENS), device=device).float()
    index, offsets = segments_from_assignment(dst, K)
    return x, index, offsets, weight


def traffic_bytes(x, index, offsets, weight):
    members = int(offsets[:, -1].sum())
    B, K, D = x.shape[0], offsets.shape[1] - 1, x.shape[2]
    read = members * (D * x.element_size() + index.element_size() + (4 if weight is not None else 0))
    return read + offsets.numel() * 8 + B * K * (D * x.element_size() + 4)


def bench_gather_merge(args, device, dtype):
    batches = [1, 8] if args.quick else [1, 8, 32]
    hiddens = [1024] if args.quick else [1024, 4096]
    names = (["fused", "fused+chk"] if device.type == "cuda" else []) + ["reference", "compiled"]
    print(f"\n## gather_merge: {N_TOKENS} -> K tokens, {dtype}, effective GB/s (median of {args.rounds} rounds)")
    print(f"{'mode':5s} {'B':>3s} {'K':>4s} {'D':>5s} {'MB':>7s} " + " ".join(f"{n:>10s}" for n in names)
          + "  " + " ".join(f"{n + '/ref':>14s}" for n in names if n != "reference"))
    for mode in ("drop", "merge"):
        for D in hiddens:
            for K in (64, 144):
                for B in batches:
                    x, index, offsets, weight = make_case(mode, B, K, D, dtype, device)
                    torch._dynamo.reset()   # a fresh static-shape compile per size, never the recompile limit
                    compiled = torch.compile(gather_merge_reference, dynamic=False)
                    fns = {"reference": lambda: gather_merge_reference(x, index, offsets, weight),
                           "compiled": lambda: compiled(x, index, offsets, weight)}
                    if device.type == "cuda":
                        fns = {"fused": lambda: gather_merge(x, index, offsets, weight, validate=False),
                               "fused+chk": lambda: gather_merge(x, index, offsets, weight), **fns}
                    with torch.inference_mode():
                        sec = time_interleaved(fns, device, args.rounds, 20 if device.type == "cuda" else 1)
                    nbytes = traffic_bytes(x, index, offsets, weight)
                    gbs = {n: nbytes / sec[n] / 1e9 for n in names}
                    print(f"{mode:5s} {B:3d} {K:4d} {D:5d} {nbytes / 1e6:7.1f} "
                          + " ".join(f"{gbs[n]:10.2f}" for n in names) + "  "
                          + " ".join(f"{gbs[n] / gbs['reference']:14.2f}" for n in names if n != "reference"))


def bench_attention_rows(args, device, dtype):
    shapes = [(16, 577, 64), (32, 640, 128)]
    batches = [1, 8] if args.quick else [1, 2, 4, 8]
    print(f"\n## attention_rows (1 query row) vs one full SDPA call at the same size, {dtype}, ms")
    print(f"{'B':>3s} {'H':>3s} {'N':>4s} {'d':>4s} {'rows':>9s} {'SDPA':>9s} {'full NxN row':>13s} {'rows/SDPA':>10s}")
    for H, N, d in shapes:
        for B in batches:
            q, k, v = (torch.randn(B, H, N, d, device=device, dtype=dtype) for _ in range(3))
            scale = d ** -0.5
            fns = {"rows": lambda: attention_rows(q[:, :, :1], k, scale),
                   "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                   # what the rows replace: materialise softmax(Q K^T) for all N queries, keep one row
                   "full": lambda: torch.softmax(q.float() @ k.float().transpose(-1, -2) * scale, -1)[:, :, 0].mean(1)}
            with torch.inference_mode():
                ms = {n: s * 1e3 for n, s in time_interleaved(fns, device, args.rounds,
                                                              20 if device.type == "cuda" else 1).items()}
            print(f"{B:3d} {H:3d} {N:4d} {d:4d} {ms['rows']:9.3f} {ms['sdpa']:9.3f} {ms['full']:13.3f} "
                  f"{ms['rows'] / ms['sdpa']:10.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser, cuda_dtype="bf16")
    parser.add_argument("--rounds", type=int, default=None, help="default 20 on CUDA, 7 on CPU")
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, hidden 1024 only")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    # a kernel variant that fell back to the reference must not be timed as "fused"
    warnings.simplefilter("error", KernelFallbackWarning)
    args.rounds = args.rounds or (20 if device.type == "cuda" else 7)
    torch.manual_seed(0)
    print(f"{machine(device)}, torch {torch.__version__}")
    bench_gather_merge(args, device, dtype)
    bench_attention_rows(args, device, dtype)


if __name__ == "__main__":
    main()
