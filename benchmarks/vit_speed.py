"""Images/s of a ViT-B/16-shaped timm model (random weights), unpatched vs `cls` and `tome`, in one run.

Prints each variant's measured speedup next to its FLOPs ratio (unpatched / patched FLOPs from Patch.stats) and
their quotient (target >= 0.85), plus the overhead of `cls` at full budget (target <= 2%).

    python benchmarks/vit_speed.py                  # CPU here, CUDA where present
    python benchmarks/vit_speed.py --batch 64 --rounds 20 --dtype bf16
"""
import argparse

import timm
import torch

import vlmeff
from common import add_device_args, device_and_dtype, machine, time_interleaved

VARIANTS = {
    "cls keep=1.0 (overhead)": dict(method="cls", keep=1.0),
    "cls keep=0.5": dict(method="cls", keep=0.5),
    "cls keep=0.25": dict(method="cls", keep=0.25),
    "tome r=8": dict(method="tome", r=8),
    "tome r=16": dict(method="tome", r=16),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser, cuda_dtype="fp16")
    parser.add_argument("--batch", type=int, default=None, help="default 8 on CPU, 64 on CUDA")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    batch = args.batch or (64 if device.type == "cuda" else 8)

    torch.manual_seed(0)
    models = {name: timm.create_model("vit_base_patch16_224", pretrained=False).eval().to(device, dtype)
              for name in ["unpatched", *VARIANTS]}
    for name, kwargs in VARIANTS.items():
        models[name].load_state_dict(models["unpatched"].state_dict())
    patches = {name: vlmeff.patch(models[name], **kwargs) for name, kwargs in VARIANTS.items()}
    x = torch.randn(batch, 3, 224, 224, device=device, dtype=dtype)

    def runner(model):
        def run():
            with torch.inference_mode():
                model(x)
        return run

    seconds = time_interleaved({name: runner(m) for name, m in models.items()}, device, rounds=args.rounds)
    print(f"ViT-B/16 224px, batch {batch}, {dtype}, {machine(device)}, median of {args.rounds} interleaved rounds")
    print(f"{'variant':26s} {'img/s':>8s} {'patches':>9s} {'speedup':>8s} {'FLOPs ratio':>12s} {'speedup/FLOPs':>14s}")
    base = seconds["unpatched"]
    print(f"{'unpatched':26s} {batch / base:8.1f} {196:9d} {1.0:8.2f} {1.0:12.2f} {1.0:14.2f}")
    for name, p in patches.items():
        flops_ratio = p.stats["flops_unpatched"] / p.stats["flops"]
        speedup = base / seconds[name]
        left = list(p.stats["visual_tokens"].values())[-1][0]
        print(f"{name:26s} {batch / seconds[name]:8.1f} {left:9d} {speedup:8.2f} {flops_ratio:12.2f} {speedup / flops_ratio:14.2f}")
    overhead = seconds["cls keep=1.0 (overhead)"] / base - 1
    print(f"patch overhead at full budget (cls keep=1.0): {overhead * 100:+.1f}%")


if __name__ == "__main__":
    main()
