"""MoE expert skipping (MoDES) benchmarks, two parts.

`evqa`: on the embedded `tiny-llava-moe-evqa`, for each target share of expert slots skipped, MoDES calibrated on
easy-VQA TRAIN questions (`vlmeff.calibrate(..., method="modes")`) next to a single-threshold baseline (alpha = 1,
tau_text = tau_visual, bisected on the same calibration data to the skip ratio MoDES reaches there): easy-VQA TEST
accuracy (greedy, exact match, as `vlmeff.zoo.evaluate`), the skip ratio measured on the test prompts, and the
prefill time of one batch of test prompts.

`prefill`: a Qwen3-VL-MoE-shaped language model (random weights, depth cut) prefilling a prompt of mostly image
tokens, thresholds set so that 0 / 50 / 70 / 85 % of the expert slots are skipped: measured speedup of the LM
prefill against the share of expert FLOPs removed and the whole-prefill FLOPs ratio.

    python benchmarks/moe_prefill.py evqa --limit 1024            # CPU, a stated subset of the test questions
    python benchmarks/moe_prefill.py prefill --layers 4
"""
import argparse
import time

import torch
from tqdm import tqdm

import vlmeff
from common import add_device_args, device_and_dtype, machine, time_interleaved
from vlmeff.experts import easyvqa_calibration
from vlmeff.experts.calibrate import answer_log_probs

TARGETS = [0.5, 0.7, 0.85]


def test_batches(processor, limit, batch_size):
    from vlmeff.data import easyvqa

    questions, answers, image_ids = easyvqa.questions("test")
    images = easyvqa.load_images("test")
    rows = list(range(len(questions)))[:limit]
    return [[(images[image_ids[r]], questions[r], answers[r]) for r in rows[b:b + batch_size]]
            for b in range(0, len(rows), batch_size)]


def accuracy(model, processor, batches):
    hits = n = 0
    for batch in tqdm(batches, desc="easy-VQA test", leave=False):
        answers = vlmeff.zoo.ask(model, processor, [i for i, _, _ in batch], [q for _, q, _ in batch])
        hits += sum(p == a for p, (_, _, a) in zip(answers, batch))
        n += len(batch)
    return hits / n


def prompt_inputs(processor, batch):
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for _, q, _ in batch]
    texts = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return dict(processor(images=[i for i, _, _ in batch], text=texts, padding=True, return_tensors="pt"))


def calibration_skip(model, calib, thresholds, alpha=None):
    with vlmeff.skip_experts(model, thresholds=thresholds, alpha=alpha) as handle:
        answer_log_probs(model, calib)
        return handle.stats["skip_ratio"]


def single_threshold(model, calib, target, steps=14):
    """Smallest tau (bisection) with alpha = 1 and tau_text = tau_visual whose calibration skip ratio >= target."""
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if calibration_skip(model, calib, (mid, mid)) >= target else (mid, hi)
    return hi


def evqa(args):
    model, processor = vlmeff.zoo.load("tiny-llava-moe-evqa")
    calib = easyvqa_calibration(processor, n=args.calib, seed=args.seed)
    batches = test_batches(processor, args.limit, 64)
    timing = prompt_inputs(processor, batches[0])
    n = sum(map(len, batches))
    print(f"machine: {machine(torch.device('cpu'))}; easy-VQA test questions: {n}; calibration: {args.calib} "
          f"train questions, seed {args.seed}; grid {args.grid}")

    def measure(label, thresholds, alpha=None):
        with vlmeff.skip_experts(model, thresholds=thresholds, alpha=alpha) as handle:
            with torch.no_grad():
                model(**timing)
            test_skip = handle.stats["skip_ratio"]
            text, visual = handle.stats["skip_ratio_text"], handle.stats["skip_ratio_visual"]
            acc = accuracy(model, processor, batches)
        return dict(label=label, thresholds=thresholds, test_skip=test_skip, text=text, visual=visual, acc=acc)

    rows = [dict(label="unpatched", thresholds=(0.0, 0.0), test_skip=0.0, text=0.0, visual=0.0,
                 acc=accuracy(model, processor, batches))]
    schedules = {}
    for target in args.targets:
        t0 = time.time()
        schedule = vlmeff.calibrate(model, calib, method="modes", target_skip=target, grid_size=args.grid,
                                    seed=args.seed, path=f"{args.out}/modes-{int(target * 100)}.json")
        schedules[target] = schedule
        tau = single_threshold(model, calib, schedule["calibration_skip"])
        print(f"target {target}: calibrated in {time.time() - t0:.0f} s ({schedule['evaluations']} grid "
              f"evaluations), MoDES thresholds {schedule['thresholds']}, alpha {schedule['alpha']}, "
              f"calibration skip {schedule['calibration_skip']:.3f}; single threshold {tau:.4f}")
        rows.append(dict(measure("MoDES", tuple(schedule["thresholds"]), schedule["alpha"]), target=target))
        rows.append(dict(measure("single threshold", (tau, tau)), target=target))

    fns = {"unpatched": lambda: model(**timing)}
    handles = {}
    for row in rows[1:]:
        key = f"{row['label']} @ {int(row['target'] * 100)}%"

        def run(row=row, key=key):
            with vlmeff.skip_experts(model, thresholds=row["thresholds"],
                                     alpha=schedules[row["target"]]["alpha"] if row["label"] == "MoDES" else None):
                model(**timing)
        fns[key] = run
        handles[key] = row
    with torch.no_grad():
        times = time_interleaved(fns, torch.device("cpu"), rounds=args.rounds)
    base = times["unpatched"]
    print(f"\nprefill of one batch: {timing['input_ids'].shape[0]} test prompts x {timing['input_ids'].shape[1]} "
          "tokens, grouped_mm, fp32")
    print("| variant | target | skipped on test (all / text / visual) | easy-VQA acc | prefill ms | speedup |")
    print("|---|---|---|---|---|---|")
    print(f"| unpatched | - | 0 | {rows[0]['acc']:.4f} | {base * 1e3:.1f} | 1.00x |")
    for key, row in handles.items():
        print(f"| {row['label']} | {int(row['target'] * 100)}% | {row['test_skip']:.3f} / {row['text']:.3f} / "
              f"{row['visual']:.3f} | {row['acc']:.4f} | {times[key] * 1e3:.1f} | {base / times[key]:.2f}x |")


def build_qwen3_vl_moe(layers, device, dtype):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(0)
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [24, 20, 20], "mrope_interleaved": True}
    text = dict(vocab_size=2048, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                num_experts=128, num_experts_per_tok=8, num_hidden_layers=layers, num_attention_heads=32,
                num_key_value_heads=4, head_dim=128, max_position_embeddings=8192, rope_parameters=rope,
                pad_token_id=0, eos_token_id=2, initializer_range=0.2)     # Qwen3-VL-30B-A3B text dimensions
    vision = dict(depth=1, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=16, temporal_patch_size=2,
                  spatial_merge_size=2, out_hidden_size=2048, num_position_embeddings=64, deepstack_visual_indexes=[])
    cfg = Qwen3VLMoeConfig(vision_config=vision, text_config=text, image_token_id=100, video_token_id=101,
                           vision_start_token_id=98, vision_end_token_id=99)
    return Qwen3VLMoeForConditionalGeneration(cfg).to(device, dtype).eval()


def prefill(args):
    device, dtype = device_and_dtype(args)
    model = build_qwen3_vl_moe(args.layers, device, dtype)
    side = int(round((args.image_tokens * 4) ** 0.5))          # patches per side; merge 2 x 2 -> image tokens
    n_image = side * side // 4
    ids = torch.tensor([[1, 98] + [100] * n_image + [99] + list(range(3, 3 + args.text_tokens))], device=device)
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == 100).int(),
                  pixel_values=torch.randn(side * side, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
                  .to(device, dtype), image_grid_thw=torch.tensor([[1, side, side]], device=device))

    def forward():
        with torch.no_grad():
            model(**inputs, use_cache=False, logits_to_keep=1)

    def skipped(tau):
        """Share of expert slots skipped at tau_text = tau_visual = tau (alpha = 1) on this prompt."""
        with vlmeff.skip_experts(model, thresholds=(tau, tau)) as handle:
            forward()
            return handle.stats["skip_ratio"]

    fns, removed = {"dense": forward}, {}
    for target in args.targets:
        lo, hi = 0.0, 1.0
        for _ in range(10):                                         # bisection: the skip ratio grows with tau
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if skipped(mid) >= target else (mid, hi)
        key = f"{int(target * 100)}%"
        removed[key] = skipped(hi)

        def run(tau=hi):
            with vlmeff.skip_experts(model, thresholds=(tau, tau)):
                forward()
        fns[key] = run
    times = time_interleaved(fns, device, rounds=args.rounds, warmup=1)
    n, h, e_i, k = ids.shape[1], 2048, 768, 8
    attn = 2 * n * h * (32 * 128 + 2 * 4 * 128 + 32 * 128) + 2 * 2 * n * n * 32 * 128   # projections + SDPA
    expert, router = 2 * n * k * 3 * h * e_i, 2 * n * h * 128
    print(f"machine: {machine(device)}; {dtype}; Qwen3-VL-30B-A3B-shaped LM (hidden 2048, 128 experts of 768, "
          f"top-8), {args.layers} layer(s), 1-layer tiny vision tower; prompt {n} tokens ({n_image} image); "
          f"grouped_mm; whole prefill; median of {args.rounds} rounds")
    print("| skipped slots (target) | expert FLOPs removed | LM-layer FLOPs ratio | prefill ms | speedup |")
    print("|---|---|---|---|---|")
    print(f"| 0 | 0 | 1.00x | {times['dense'] * 1e3:.0f} | 1.00x |")
    for key, share in removed.items():
        ratio = (attn + router + expert) / (attn + router + expert * (1 - share))
        print(f"| {key} | {share:.3f} | {ratio:.2f}x | {times[key] * 1e3:.0f} | {times['dense'] / times[key]:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    e = sub.add_parser("evqa")
    e.add_argument("--limit", type=int, default=None, help="first N test questions (default all 9,673)")
    e.add_argument("--calib", type=int, default=64)
    e.add_argument("--grid", type=int, default=12)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--rounds", type=int, default=5)
    e.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    e.add_argument("--out", default="/tmp")
    p = sub.add_parser("prefill")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--image-tokens", type=int, default=1024)
    p.add_argument("--text-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--targets", type=float, nargs="+", default=TARGETS)
    add_device_args(p, "bf16")
    args = parser.parse_args()
    evqa(args) if args.part == "evqa" else prefill(args)


if __name__ == "__main__":
    main()
