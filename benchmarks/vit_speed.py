"""Images/s of a ViT-B/16-shaped timm model (random weights), unpatched vs `cls` and `tome`, in one run.

Prints, per variant: the measured speedup next to its FLOPs ratio (unpatched / patched FLOPs from Patch.stats) and
their quotient (target >= 0.85), the aten ops that launch work per forward and the host syncs (a GPU pays a few
microseconds per launch, so ops are what a small batch costs), and a launch-overhead proxy: the speedup on a
model of the same depth and token count but width 64, where every op costs its dispatch, not its FLOPs (a CPU
stand-in for a launch-bound GPU at small batch). Also the overhead of `cls` at full budget (target <= 2%).
With `--compile`, every variant runs as `torch.compile(model)` (on CUDA, `--compile reduce-overhead` adds CUDA
graphs).

    python benchmarks/vit_speed.py                  # CPU here, CUDA where present
    python benchmarks/vit_speed.py --batch 64 --rounds 20 --dtype bf16
    python benchmarks/vit_speed.py --batch 64 --compile max-autotune-no-cudagraphs
"""
import argparse

import timm
import torch

import vlmeff
from common import add_device_args, device_and_dtype, machine, time_interleaved
from vlmeff.opcount import count_ops

VARIANTS = {
    "cls keep=1.0 (overhead)": dict(method="cls", keep=1.0),
    "cls keep=0.5": dict(method="cls", keep=0.5),
    "cls keep=0.25": dict(method="cls", keep=0.25),
    "tome r=8": dict(method="tome", r=8),
    "tome r=16": dict(method="tome", r=16),
}


def build(names, device, dtype, **model_args):
    """One model per variant with the unpatched model's weights, each patched with its variant."""
    torch.manual_seed(0)
    models = {name: timm.create_model("vit_base_patch16_224", pretrained=False, **model_args).eval().to(device, dtype)
              for name in names}
    for name in names:
        models[name].load_state_dict(models["unpatched"].state_dict())
    patches = {name: vlmeff.patch(models[name], **kwargs) for name, kwargs in VARIANTS.items()}
    return models, patches


def runner(model, x):
    def run():
        with torch.inference_mode():
            model(x)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser, cuda_dtype="fp16")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        help="run every variant as torch.compile(model, mode=MODE) (default mode: 'default')")
    parser.add_argument("--proxy-batch", type=int, default=1, help="batch of the width-64 launch-overhead proxy")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    batch = args.batch or (64 if device.type == "cuda" else 8)
    names = ["unpatched", *VARIANTS]

    models, patches = build(names, device, dtype)
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)
    counts = {name: count_ops(m, x[:1])[1] for name, m in models.items()}
    callables = {name: (torch.compile(m, mode=args.compile) if args.compile else m) for name, m in models.items()}
    seconds = time_interleaved({name: runner(m, x) for name, m in callables.items()}, device, rounds=args.rounds)

    # launch-overhead proxy: same depth, patch grid and methods, width 64 (4 heads): dispatch-bound
    narrow, _ = build(names, device, dtype, embed_dim=64, num_heads=4)
    small = torch.randn(args.proxy_batch, 3, 224, 224, device=device, dtype=dtype)
    narrow = {name: (torch.compile(m, mode=args.compile) if args.compile else m) for name, m in narrow.items()}
    proxy = time_interleaved({name: runner(m, small) for name, m in narrow.items()}, device, rounds=args.rounds)

    mode = f", torch.compile mode={args.compile}" if args.compile else ", eager"
    print(f"ViT-B/16 224px, batch {batch}, {dtype}{mode}, {machine(device)}, median of {args.rounds} interleaved rounds")
    print(f"launch proxy: width 64, batch {args.proxy_batch}; ops = aten ops launching work per forward (batch 1)")
    print(f"{'variant':26s} {'img/s':>8s} {'patches':>8s} {'speedup':>8s} {'FLOPs ratio':>12s} {'speedup/FLOPs':>14s}"
          f" {'ops':>5s} {'syncs':>6s} {'proxy speedup':>14s}")
    base, proxy_base = seconds["unpatched"], proxy["unpatched"]
    for name in names:
        p = patches.get(name)
        flops_ratio = p.stats["flops_unpatched"] / p.stats["flops"] if p else 1.0
        left = list(p.stats["visual_tokens"].values())[-1][0] if p else 196
        speedup = base / seconds[name]
        print(f"{name:26s} {batch / seconds[name]:8.1f} {left:8d} {speedup:8.2f} {flops_ratio:12.2f}"
              f" {speedup / flops_ratio:14.2f} {counts[name].total:5d} {counts[name].syncs:6d}"
              f" {proxy_base / proxy[name]:14.2f}")
    overhead = seconds["cls keep=1.0 (overhead)"] / base - 1
    print(f"patch overhead at full budget (cls keep=1.0): {overhead * 100:+.1f}%")


if __name__ == "__main__":
    main()
