"""Structural MLP pruning (AMP) of the embedded easy-VQA models: accuracy vs parameters, FLOPs and measured
images/s, at several tolerances, with and without distillation, in one run.

Calibration (importance, search and distillation) uses TRAIN images only (the first `--calib` train images outside
the 400 held-out validation ids); accuracy is measured on the TEST split, exactly as `vlmeff.zoo.evaluate` does
(ViT: top-1 "<colour> <shape>" class on the test images whose labels are recoverable; LLaVA: exact match of the
greedy answer on the first `--limit` test questions). Images/s: the pruned part's forward (the ViT; LLaVA's tower +
projector via get_image_features) at `--batch`, all variants timed interleaved (benchmarks/common.py).

    python benchmarks/mlp_prune.py --model vit
    python benchmarks/mlp_prune.py --model llava --limit 500 --tolerances 0.005 0.02
"""
import argparse
import copy
import json

import torch

import vlmeff
from common import add_device_args, device_and_dtype, machine, time_interleaved
from vlmeff.data import easyvqa
from vlmeff.structural.sites import family, pixels


def calibration(preprocess, n, batch):
    """Batches of the first n train images outside the validation ids."""
    images, held_out = easyvqa.load_images("train"), easyvqa.validation_ids()
    ids = [i for i in sorted(images) if i not in held_out][:n]
    return [preprocess([images[i] for i in ids[b : b + batch]]) for b in range(0, len(ids), batch)]


def vit_accuracy(model, preprocess, device, limit=None, batch=128):
    images, labels = easyvqa.load_images("test"), easyvqa.image_labels("test")
    ids = [i for i in sorted(images) if None not in labels[i]][:limit]
    hits = 0
    with torch.no_grad():
        for b in range(0, len(ids), batch):
            chunk = ids[b : b + batch]
            pred = model(preprocess([images[i] for i in chunk]).to(device)).argmax(-1).tolist()
            hits += sum(preprocess.classes[p] == " ".join(labels[i][::-1]) for p, i in zip(pred, chunk))
    return hits / len(ids), len(ids)


def llava_accuracy(model, processor, limit, batch=64):
    images = easyvqa.load_images("test")
    qa = list(zip(*easyvqa.questions("test")))[:limit]
    hits = 0
    for b in range(0, len(qa), batch):
        chunk = qa[b : b + batch]
        answers = vlmeff.zoo.ask(model, processor, [images[i] for _, _, i in chunk], [q for q, _, _ in chunk])
        hits += sum(p == a for p, (_, a, _) in zip(answers, chunk))
    return hits / len(qa), len(qa)


def tower_params(model):
    """Parameters of the pruned part (the ViT; LLaVA's vision tower)."""
    return sum(p.numel() for p in family(model).tower.parameters())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["vit", "llava"], default="vit")
    ap.add_argument("--tolerances", type=float, nargs="+", default=[0.005, 0.02, 0.05])
    ap.add_argument("--temp", type=float, default=20.0)
    ap.add_argument("--calib", type=int, default=512, help="train images for importance, search and distillation")
    ap.add_argument("--calib-batch", type=int, default=64)
    ap.add_argument("--distill-epochs", type=int, default=3)
    ap.add_argument("--distill-lr", type=float, default=1e-4)
    ap.add_argument("--limit", type=int, default=None, help="test images (vit) / questions (llava); default all")
    ap.add_argument("--batch", type=int, default=64, help="batch of the images/s timing")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=None)
    add_device_args(ap, "fp32")
    args = ap.parse_args()
    device, dtype = device_and_dtype(args)
    if args.model == "llava" and args.limit is None:
        args.limit = 1000

    base, proc = vlmeff.zoo.load("tiny-vit-evqa" if args.model == "vit" else "tiny-llava-evqa", device)
    base = base.to(dtype)
    preprocess = proc if args.model == "vit" else (lambda ims: proc.image_processor(ims, return_tensors="pt"))
    data = calibration(preprocess, args.calib, args.calib_batch)
    accuracy = ((lambda m: vit_accuracy(m, proc, device, args.limit)) if args.model == "vit"
                else (lambda m: llava_accuracy(m, proc, args.limit)))

    variants, rows = {"unpruned": base}, {}
    for tol in args.tolerances:
        for distill in (False, True):
            name = f"tol={tol:g}" + (f" + distill {args.distill_epochs} ep" if distill else "")
            model = copy.deepcopy(base)
            r = vlmeff.prune_mlp(model, data, tolerance=tol, temp=args.temp, distill=distill,
                                 distill_epochs=args.distill_epochs, distill_lr=args.distill_lr)
            print(name, r.summary(), "widths", r.widths_after, f"{r.seconds}s", r.distill or "")
            variants[name] = model
            rows[name] = dict(params=tower_params(model), flops=r.flops_after, widths=r.widths_after,
                              loss=r.distill["loss_after"] if distill else r.loss_after, seconds=r.seconds,
                              mse=r.distill and [r.distill["mse_before"], r.distill["mse_after"]])
            rows.setdefault("unpruned", dict(params=tower_params(base), flops=r.flops_before, widths=r.widths_before,
                                             loss=r.loss_before, seconds=0, mse=None))
    x = pixels(base, data[0])[:1].repeat(args.batch, 1, 1, 1)

    def forward(m):
        feats = family(m).features
        return lambda: feats(m, x)

    with torch.no_grad():
        secs = time_interleaved({n: forward(m) for n, m in variants.items()}, device, rounds=args.rounds)
    print(f"\n{args.model}: {machine(device)}, {dtype}, images/s at batch {args.batch}; accuracy on test "
          f"({'first ' + str(args.limit) if args.limit else 'all'})\n")
    print("| variant | MLP widths | tower params | FLOPs/image | calib loss | accuracy | images/s | speedup |")
    print("|---|---|---|---|---|---|---|---|")
    order = ["unpruned"] + [n for n in variants if n != "unpruned"]
    for n in order:
        acc, count = accuracy(variants[n])
        rows[n].update(accuracy=acc, n=count, images_per_s=args.batch / secs[n], speedup=secs["unpruned"] / secs[n])
        row = rows[n]
        print(f"| {n} | {'/'.join(map(str, row['widths']))} | {row['params']:,} | {row['flops'] / 1e6:.1f} M | "
              f"{row['loss']:.4f} | {acc:.1%} | {row['images_per_s']:.0f} | {row['speedup']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), machine=machine(device), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
