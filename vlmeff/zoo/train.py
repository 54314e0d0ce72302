"""Training recipe of the embedded models, staged like LLaVA, on easy-VQA train minus 400 held-out validation images.

Stage 1 (tower)   CLIP vision tower + linear head on its [CLS] pooled output, 24 shape x colour classes, horizontal
                  flips. Labels come from the questions (`easyvqa.label_candidates`); an image whose labels are only
                  partly known counts through the likelihood of its candidate set, -log sum_{c in candidates} p(c)
                  (plain cross-entropy when the label is known).
Stage 2 (LLaVA)   tower frozen, its layer -2 patch features computed once and cached; projector + LM trained on
                  conversations of up to 8 QA turns per image, loss on the answer tokens (word + </s>) only. The MoE
                  LM adds Qwen3-MoE's load-balancing loss so that the router spreads tokens over the experts.
ViT               the stage-1 objective on a timm ViT classifier.

    python -m vlmeff.zoo.train --model all|tiny-llava-evqa|tiny-llava-moe-evqa|tiny-vit-evqa [--out DIR]

The stage-1 tower is kept in --work and reused by both VLMs (and by later runs with the same seed and steps).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPVisionModel
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from vlmeff.data import easyvqa
from vlmeff.zoo import build

WEIGHTS = Path(__file__).parent / "weights"
MODELS = ("tiny-llava-evqa", "tiny-llava-moe-evqa", "tiny-vit-evqa")


def seed_all(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def split_ids() -> tuple[list[int], list[int]]:
    """(train image ids, validation image ids), both sorted."""
    val = easyvqa.validation_ids()
    ids = sorted(easyvqa.image_paths("train"))
    return [i for i in ids if i not in val], sorted(val)


def candidate_mask(ids: list[int]) -> torch.Tensor:
    """(N,24) bool: class k is still possible for image ids[n]."""
    cands = easyvqa.label_candidates("train")
    names = [c.split() for c in easyvqa.CLASSES]  # [colour, shape]
    return torch.tensor([[s in cands[i][0] and c in cands[i][1] for c, s in names] for i in ids])


def set_nll(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """-log P(class in allowed set): logits (B,C), allowed (B,C) bool -> scalar."""
    return (logits.logsumexp(-1) - logits.masked_fill(~allowed, float("-inf")).logsumexp(-1)).mean()


def schedule(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup, then cosine decay to 0."""
    f = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))  # noqa: E731
    return torch.optim.lr_scheduler.LambdaLR(opt, f)


def batches(n: int, size: int, g: torch.Generator):
    """Endless random batches of indices into range(n), one permutation per epoch."""
    while True:
        perm = torch.randperm(n, generator=g)
        yield from (perm[i : i + size] for i in range(0, n - size + 1, size))


def train_classifier(net, head_fn, pixels, allowed, val_pixels, val_allowed, steps, lr, seed, desc, batch=64):
    """Set-likelihood training of an image classifier with horizontal flips.

    head_fn: (B,3,H,W) -> (B,24) logits. pixels (N,3,H,W), allowed (N,24) bool. Validation accuracy is on the
    validation images whose class is fully determined.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = schedule(opt, steps, warmup=50)
    known = val_allowed.sum(1) == 1
    it, bar = batches(len(pixels), batch, g), tqdm(range(steps), desc=desc)
    for step in bar:
        idx = next(it)
        x = pixels[idx]
        x = torch.where(torch.rand(len(idx), 1, 1, 1, generator=g) < 0.5, x.flip(-1), x)
        loss = set_nll(head_fn(x), allowed[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 200 == 0 or step + 1 == steps:
            net.eval()
            with torch.no_grad():
                pred = torch.cat([head_fn(x).argmax(-1) for x in val_pixels[known].split(256)])
            net.train()
            acc = val_allowed[known].float()[torch.arange(len(pred)), pred].mean().item()
            tqdm.write(f"{desc} step {step + 1}: loss {loss.item():.4f}, val acc {acc:.4f} (n={int(known.sum())})")
    return net.eval()


def stage1_tower(work: Path, steps: int, seed: int) -> dict[str, torch.Tensor]:
    """Stage 1: pretrains the CLIP tower on [CLS]; returns its state dict (cached in work)."""
    path = work / f"stage1-tower-s{seed}-n{steps}.safetensors"
    if path.exists():
        return load_file(path)
    seed_all(seed)
    tr, va = split_ids()
    images = easyvqa.load_images("train")
    proc = build.build_processor().image_processor
    pix = lambda ids: proc([images[i] for i in ids], return_tensors="pt")["pixel_values"]  # noqa: E731
    tower = CLIPVisionModel(build.vision_config()).train()
    head = torch.nn.Linear(tower.config.hidden_size, len(easyvqa.CLASSES))
    net = torch.nn.ModuleDict(dict(tower=tower, head=head))
    t0 = time.time()
    train_classifier(net, lambda x: head(tower(pixel_values=x).pooler_output), pix(tr), candidate_mask(tr),
                     pix(va), candidate_mask(va), steps, lr=1e-3, seed=seed, desc="stage 1 (CLIP tower)")
    print(f"stage 1: {time.time() - t0:.0f} s")
    work.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in tower.state_dict().items()}
    save_file(state, path)
    return state


def tower_features(model, pixel_values: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """(N,3,64,64) -> (N,256,D) frozen-tower features exactly as LLaVA selects them (layer -2, [CLS] dropped)."""
    cfg, tower = model.config, model.model.vision_tower
    with torch.no_grad():
        out = [tower(pixel_values=x, output_hidden_states=True).hidden_states[cfg.vision_feature_layer][:, 1:]
               for x in tqdm(pixel_values.split(batch), desc="caching tower features")]
    return torch.cat(out)


def encode_conversations(processor, convs: list[list[tuple[str, str]]], n_image_tokens: int):
    """Conversations (first user turn carries the image) -> token lists and answer masks, via the chat template.

    Returns ids: list of (L_i,) LongTensors with the <image> token expanded, and ans: list of (L_i,) bool masks over the
    answer tokens (answer word + </s>) that the loss is taken on.
    """
    tok = processor.tokenizer
    texts = []
    for turns in convs:
        msgs = []
        for t, (q, a) in enumerate(turns):
            content = ([{"type": "image"}] if t == 0 else []) + [{"type": "text", "text": q}]
            msgs += [{"role": "user", "content": content}, {"role": "assistant", "content": a}]
        texts.append(processor.apply_chat_template(msgs).replace(processor.image_token, processor.image_token * n_image_tokens))
    ids, ans = [], []
    asst, eos = tok.convert_tokens_to_ids("<|assistant|>"), tok.eos_token_id
    for x in tok(texts, add_special_tokens=False)["input_ids"]:
        x = torch.tensor(x)
        a, e = (x == asst).cumsum(0), (x == eos).cumsum(0) - (x == eos).long()
        ids.append(x)
        ans.append((a > e) & (x != asst))  # after an <|assistant|> tag, up to and including its </s>
    return ids, ans


def lm_forward(model, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, router_logits: bool = False):
    """Projector + LM on cached features. feats (B,256,D), ids/mask (B,L) -> (hidden (B,L,H), router logits or None)."""
    emb = model.get_input_embeddings()(ids)
    img = model.model.multi_modal_projector(feats).to(emb.dtype)
    emb = emb.masked_scatter((ids == model.config.image_token_id)[..., None], img)
    out = model.model.language_model(inputs_embeds=emb, attention_mask=mask, output_router_logits=router_logits)
    return out.last_hidden_state, getattr(out, "router_logits", None)


def pad_right(seqs: list[torch.Tensor], value) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)


def stage2_llava(name: str, tower_state, out: Path, steps: int, seed: int, batch: int = 16, turns: int = 8) -> None:
    """Stage 2: trains projector + LM on cached frozen-tower features, saves model + processor to out/name."""
    seed_all(seed)
    moe = "moe" in name
    model, processor = build.build_llava(moe=moe)
    model.model.vision_tower.load_state_dict(tower_state)
    model.model.vision_tower.requires_grad_(False)
    tok, n_img = processor.tokenizer, processor.image_processor.crop_size["height"] // processor.patch_size
    n_img *= n_img
    tr, va = split_ids()
    images = easyvqa.load_images("train")
    row = {i: r for r, i in enumerate(tr + va)}
    pixels = processor.image_processor([images[i] for i in tr + va], return_tensors="pt")["pixel_values"]
    feats = tower_features(model, pixels)  # (N,256,D)
    qa = {i: [] for i in tr + va}
    for q, a, i in zip(*easyvqa.questions("train")):
        qa[i].append((q, a))
    # validation: single-turn prompts of 1,000 held-out questions, scored on the first answer token
    rng = random.Random(seed)
    val = rng.sample([(i, q, a) for i in va for q, a in qa[i]], 1000)
    val_ids, _ = encode_conversations(processor, [[(q, a)] for _, q, a in val], n_img)
    asst = tok.convert_tokens_to_ids("<|assistant|>")

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = schedule(opt, steps, warmup=50)
    cfg = model.config.text_config
    model.train()
    bar, step, t0 = tqdm(total=steps, desc=f"stage 2 ({name})"), 0, time.time()
    while step < steps:
        # one epoch: each image's questions shuffled and cut into conversations of <= `turns` QA pairs
        convs = [(i, qs[k : k + turns]) for i in tr for qs in [rng.sample(qa[i], len(qa[i]))] for k in range(0, len(qs), turns)]
        rng.shuffle(convs)
        ids, ans = encode_conversations(processor, [c for _, c in convs], n_img)
        for b in range(0, len(convs) - batch + 1, batch):
            if step == steps:
                break
            x = pad_right(ids[b : b + batch], tok.pad_token_id)
            m = pad_right([torch.ones_like(t) for t in ids[b : b + batch]], 0)
            tgt = pad_right(ans[b : b + batch], False)[:, 1:]  # token t+1 is predicted at t
            f = feats[[row[i] for i, _ in convs[b : b + batch]]]
            h, rl = lm_forward(model, f, x, m, router_logits=moe)
            loss = F.cross_entropy(model.lm_head(h[:, :-1][tgt]), x[:, 1:][tgt])
            if moe:
                aux = load_balancing_loss_func(rl, cfg.num_experts, cfg.num_experts_per_tok, m)
                loss = loss + cfg.router_aux_loss_coef * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % 200 == 0 or step == steps:
                acc = first_token_accuracy(model, feats[[row[i] for i, _, _ in val]], val_ids, [a for *_, a in val], tok, asst)
                tqdm.write(f"stage 2 ({name}) step {step}: loss {loss.item():.4f}, val first-token acc {acc:.4f} (n=1000)")
    bar.close()
    print(f"stage 2 ({name}): {time.time() - t0:.0f} s")
    save(model.eval(), processor, out / name)


def first_token_accuracy(model, feats, ids, answers, tok, asst, batch: int = 100) -> float:
    """Share of prompts whose argmax token after <|assistant|> is the answer word. feats (N,256,D), ids list of (L_i,)."""
    model.eval()
    hits = 0
    with torch.no_grad():
        for b in range(0, len(ids), batch):
            x = pad_right(ids[b : b + batch], tok.pad_token_id)
            m = pad_right([torch.ones_like(t) for t in ids[b : b + batch]], 0)
            h, _ = lm_forward(model, feats[b : b + batch], x, m)
            last = (x == asst).long().argmax(1)  # single-turn prompts: one <|assistant|> each
            pred = model.lm_head(h[torch.arange(len(x)), last]).argmax(-1)
            hits += sum(p == tok.convert_tokens_to_ids(a) for p, a in zip(pred.tolist(), answers[b : b + batch]))
    model.train()
    return hits / len(ids)


def save(model, processor, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    print(f"saved {path}")


def train_vit(out: Path, steps: int, seed: int) -> None:
    """Trains the timm ViT classifier with the stage-1 objective, saves model.safetensors + config.json."""
    seed_all(seed)
    tr, va = split_ids()
    images = easyvqa.load_images("train")
    pre = build.ViTPreprocess()
    vit = build.build_vit().train()
    t0 = time.time()
    train_classifier(vit, vit, pre([images[i] for i in tr]), candidate_mask(tr), pre([images[i] for i in va]),
                     candidate_mask(va), steps, lr=1e-3, seed=seed, desc="ViT")
    print(f"ViT: {time.time() - t0:.0f} s")
    path = out / "tiny-vit-evqa"
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, path / "model.safetensors")
    (path / "config.json").write_text(json.dumps(dict(timm_kwargs=build.VIT_KWARGS, preprocess=pre.to_dict()), indent=1))
    print(f"saved {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="all", choices=("all",) + MODELS)
    p.add_argument("--out", type=Path, default=WEIGHTS)
    p.add_argument("--work", type=Path, default=Path("/tmp/vlmeff-zoo-work"), help="stage-1 tower cache")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stage1-steps", type=int, default=1000)
    p.add_argument("--stage2-steps", type=int, default=800)
    p.add_argument("--vit-steps", type=int, default=1000)
    a = p.parse_args(argv)
    names = MODELS if a.model == "all" else (a.model,)
    for name in names:
        if name == "tiny-vit-evqa":
            train_vit(a.out, a.vit_steps, a.seed)
        else:
            stage2_llava(name, stage1_tower(a.work, a.stage1_steps, a.seed), a.out, a.stage2_steps, a.seed)


if __name__ == "__main__":
    main()
