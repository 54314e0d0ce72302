"""Prefill of a LLaVA-1.5-7B-shaped model (CLIP ViT-L/14-336 + Llama-7B dimensions, depth cut, random weights),
unpatched vs `cls` keeping 576 -> 192 / 128 / 64 visual tokens (--suite pre), or vs FastV / PyramidDrop inside the
LLM and `cls` + FastV stacked (--suite llm), or the selections by diversity (--suite diversity), in one run.

Prints per variant: prefill time (vision tower + LLM prefill, `logits_to_keep=1`, as generate's first step),
measured speedup, the FLOPs ratio of tower + projector + LLM layers (target: speedup >= 0.9 x FLOPs ratio), the
KV-cache bytes, the aten ops launching work that the patch adds to one prefill and its host syncs (a GPU pays a
few microseconds per launch; the prompt rebuild reads the new length once), and the scoring overhead (`cls` at
keep=1.0 vs unpatched; target <= 2%).

    python benchmarks/lvlm_prefill.py                       # CPU: tower 4 layers, LLM 2 layers
    python benchmarks/lvlm_prefill.py --tower-layers 24 --llm-layers 32 --dtype fp16 --batch 8   # a GPU
    python benchmarks/lvlm_prefill.py --suite llm --llm-layers 4   # CPU: inside the LLM (FastV K = 1 of 4)
    python benchmarks/lvlm_prefill.py --suite transition --llm-layers 4   # CPU: TransPrune beside PyramidDrop
    python benchmarks/lvlm_prefill.py --suite infoflow --llm-layers 4     # CPU: VFlowOpt beside received
    python benchmarks/lvlm_prefill.py --suite diversity --llm-layers 4    # CPU: DivPrune, CDPruner, VisPruner, DART,
                                                                          #   SparseVLM
"""
import argparse

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

import vlmeff
from common import add_device_args, device_and_dtype, machine, time_interleaved
from vlmeff.models.hf_vision import HFViTAdapter
from vlmeff.opcount import count_ops

IMAGE_TOKEN = 32000
BUDGETS = [192, 128, 64]
# variant -> vlmeff.patch arguments (None: unpatched). "pre": before the LLM; "llm": inside it (FastV's K and
# PyramidDrop's layers scaled to --llm-layers), and a composition of both sites
SUITES = {
    "pre": {"unpatched": None, "cls keep=1.0 (overhead)": dict(method="cls", keep=1.0),
            **{f"cls keep={k}": dict(method="cls", keep=k) for k in BUDGETS}},
    "llm": {"unpatched": None, "fastv keep=1.0 (overhead)": dict(method="fastv", keep=1.0),
            "fastv keep=0.5": dict(method="fastv", keep=0.5), "fastv keep=0.25": dict(method="fastv", keep=0.25),
            "pdrop (lambda 0.5)": dict(method="pdrop"),
            "cls 192 + fastv 0.5": dict(method=[("cls", {"keep": 192}), ("fastv", {"keep": 0.5})])},
    # the selections by diversity before the LLM, beside cls at the same budgets, and DART and SparseVLM inside it
    "diversity": {"unpatched": None, "cdpruner keep=1.0 (overhead)": dict(method="cdpruner", keep=1.0),
                  **{f"{m} keep={k}": dict(method=m, keep=k) for k in (192, 64)
                     for m in ("cls", "divprune", "cdpruner", "vispruner")},
                  "dart keep=64": dict(method="dart", keep=64),
                  "sparsevlm (its 192 schedule)": dict(method="sparsevlm"),
                  "sparsevlm keep=0.3": dict(method="sparsevlm", keep=0.3)},
    "transition": None,         # transition_suite(depth): its full budget has one ratio per stage of the depth
    "infoflow": None,           # infoflow_suite(depth): likewise
}


def transition_suite(depth):
    """TransPrune: its 7 / 9 / 12 of 32 scaled to `depth` (4 layers: 1, 2 keeping 0.625, 0.125), at full budget for
    the cost of TTV and IGA, and at a 50 % average budget over stages 1, 2, 3 (fewer on shallower models; 75 % on
    2 layers, whose layer 0 alone is half); PyramidDrop beside it."""
    stages = len(vlmeff.pruners.stages.default_schedule("transition", depth)[0])
    layers = list(range(1, min(4, depth)))
    keep = 0.5 if depth > 2 else 0.75
    return {"unpatched": None, "pdrop (lambda 0.5)": dict(method="pdrop"),
            "transition 1.0 (overhead)": dict(method="transition", ratios=[1.0] * stages),
            "transition (paper's schedule)": dict(method="transition"),
            f"transition keep={keep} ({','.join(map(str, layers))})": dict(method="transition", keep=keep,
                                                                            layers=layers)}


def infoflow_suite(depth):
    """VFlowOpt: its released 25 % setting (the tower keeps 26.5 %, the LLM stages at 9 / 18 of 28, scaled, 98.3 %
    and 86.3 % of that), at full budget for the cost of the context map (two passes over the tower layer's rows)
    and at a 12.5 % tower keep; `received` (one pass) at the released setting's tower keep beside it."""
    stages = len(vlmeff.pruners.stages.default_schedule("infoflow", depth)[0])
    released = vlmeff.pruners.stages.VFLOWOPT_25["vit_keep"]
    return {"unpatched": None, "infoflow 1.0 (overhead)": dict(method="infoflow", keep=1.0, ratios=[1.0] * stages),
            f"received keep={released:.3f}": dict(method="received", keep=released),
            "infoflow (released 25 %)": dict(method="infoflow"),
            "infoflow keep=0.125": dict(method="infoflow", keep=0.125)}


def build(tower_layers, llm_layers, device, dtype):
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=tower_layers,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    text = LlamaConfig(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=llm_layers,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, pad_token_id=0)
    # the feature layer -2 needs at least two tower layers; LLaVA-1.5 runs all 24 and reads layer 23's output
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    return LlavaForConditionalGeneration(cfg).eval().to(device, dtype)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_device_args(parser, cuda_dtype="fp16")
    parser.add_argument("--tower-layers", type=int, default=4)
    parser.add_argument("--llm-layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--text-tokens", type=int, default=64, help="prompt text tokens around the image (LLaVA ~64)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--suite", choices=SUITES, default="pre",
                        help="pre: cls before the LLM; llm: FastV, PyramidDrop inside it and cls + FastV; "
                             "transition: TransPrune beside PyramidDrop; infoflow: VFlowOpt beside received; "
                             "diversity: DivPrune, CDPruner, VisPruner beside cls, DART and SparseVLM")
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)

    torch.manual_seed(0)
    model = build(args.tower_layers, args.llm_layers, device, dtype)
    before, after = args.text_tokens // 2, args.text_tokens - args.text_tokens // 2
    row = [1] + list(range(100, 100 + before - 1)) + [IMAGE_TOKEN] * 576 + list(range(200, 200 + after))
    inputs = dict(input_ids=torch.tensor([row] * args.batch, device=device),
                  pixel_values=torch.randn(args.batch, 3, 336, 336, device=device, dtype=dtype))

    def prefill():
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    suites = {"transition": transition_suite, "infoflow": infoflow_suite}
    variants = suites[args.suite](args.llm_layers) if args.suite in suites else SUITES[args.suite]
    stats = {}

    def runner(name, patch):
        def run():
            if patch is None:
                return prefill()
            method = patch.pop("method")
            try:
                with vlmeff.patch(model, method, **patch) as h:
                    prefill()
            finally:
                patch["method"] = method
            stats[name] = h.stats
        return run

    counts = {name: count_ops(runner(name, patch))[1] for name, patch in variants.items()}
    seconds = time_interleaved({name: runner(name, patch) for name, patch in variants.items()}, device,
                               rounds=args.rounds, warmup=1)
    tower = HFViTAdapter(model.model.vision_tower)
    # the tower runs on all 577 tokens, patched or not; the projector maps only the rows that are kept
    projector = sum(2 * m.in_features * m.out_features for m in model.model.multi_modal_projector.modules()
                    if isinstance(m, torch.nn.Linear))
    tower_flops = args.batch * tower.flops([577] * len(tower.layers))

    def vision_flops(kept):
        return tower_flops + args.batch * kept * projector

    print(f"LLaVA-1.5-7B shape (tower {args.tower_layers}/24 layers, LLM {args.llm_layers}/32 layers), batch "
          f"{args.batch}, {args.text_tokens} text tokens, {dtype}, {machine(device)}, median of {args.rounds} "
          "interleaved rounds")
    print(f"{'variant':30s} {'visual':>13s} {'prefill ms':>11s} {'speedup':>8s} {'FLOPs ratio':>12s} "
          f"{'speedup/FLOPs':>14s} {'KV MiB':>8s} {'ops added':>10s} {'syncs':>6s}")
    base = seconds["unpatched"]
    reference = next(iter(stats.values()))
    base_flops = vision_flops(576) + reference["prefill_flops_unpatched"]
    print(f"{'unpatched':30s} {'576':>13s} {base * 1e3:11.1f} {1.0:8.2f} {1.0:12.2f} {1.0:14.2f} "
          f"{reference['kv_cache_bytes_unpatched'] / 2**20:8.1f} {0:10d} {counts['unpatched'].syncs:6d}")
    for name, s in stats.items():
        tokens = s["visual_tokens"]
        into_llm = tokens["before LLM"][0] if "before LLM" in tokens else 576
        after = [v[0] for k, v in tokens.items() if k.startswith("after LLM layer")]
        visual = f"{into_llm}" + "".join(f">{n}" for n in after)       # e.g. 576>288: 288 from layer K on
        ratio = base_flops / (vision_flops(into_llm) + s["prefill_flops"])
        speedup = base / seconds[name]
        print(f"{name:30s} {visual:>13s} {seconds[name] * 1e3:11.1f} {speedup:8.2f} "
              f"{ratio:12.2f} {speedup / ratio:14.2f} {s['kv_cache_bytes'] / 2**20:8.1f} "
              f"{counts[name].total - counts['unpatched'].total:10d} {counts[name].syncs:6d}")
    overhead = next(name for name in variants if "overhead" in name)
    print(f"scoring overhead at full budget ({overhead}): {(seconds[overhead] / base - 1) * 100:+.1f}% of the "
          f"unpatched prefill")


if __name__ == "__main__":
    main()
