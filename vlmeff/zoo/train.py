"""Training recipe of the embedded models, staged like LLaVA, on easy-VQA train minus 400 held-out validation images.

Stage 1 (tower)   CLIP vision tower + linear head on its [CLS] pooled output, 24 shape x colour classes, horizontal
                  flips. Labels come from the questions (`easyvqa.label_candidates`); an image whose labels are only
                  partly known counts through the likelihood of its candidate set, -log sum_{c in candidates} p(c)
                  (plain cross-entropy when the label is known).
Stage 2 (LLaVA)   tower frozen, its layer -2 patch features computed once and cached; projector + LM trained on
                  all QA pairs of an image packed into one sequence of independent one-turn conversations sharing the
                  image prefix (`encode_packs`), loss on the answer tokens (word + </s>) only. The MoE LM adds
                  Qwen3-MoE's load-balancing loss so that the router spreads tokens over the experts. Held-out answer
                  accuracy stays below 0.95 for ~1,000 steps (the yes/no questions, e.g. "is there not a blue
                  shape?", lag), then jumps to ~0.995; 2,400 steps leave a margin (curve in docs/zoo.md).
ViT               the stage-1 objective on a timm ViT classifier.

tiny-llava-scenes (multi-object scenes, `vlmeff.data.scenes`; train images for training, val images for every
choice) follows the same two stages. Its stage 1 starts from the easy-VQA tower of stage 1 and adds, to an image-level
[CLS] objective (which colour + shape pairs occur, multi-label), a per-patch one on the layer -2 patch features LLaVA
feeds the LM (which object class covers the patch, `Scene.patch_labels`): objects in a scene are small, and the LM
needs patch features that say what each patch shows. Stage 2 is the easy-VQA stage 2 with an 8-layer LM.

    python -m vlmeff.zoo.train --model all|tiny-llava-evqa|tiny-llava-moe-evqa|tiny-vit-evqa|tiny-llava-scenes [--out DIR]

The stage-1 towers are kept in --work and reused (by both easy-VQA VLMs, and by later runs with the same seed and steps).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm
from transformers import CLIPVisionModel, LlavaForConditionalGeneration
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

from vlmeff.data import easyvqa, scenes
from vlmeff.zoo import build

WEIGHTS = Path(__file__).parent / "weights"
MODELS = ("tiny-llava-evqa", "tiny-llava-moe-evqa", "tiny-vit-evqa", "tiny-llava-scenes")


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


def optimize(opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, loss: torch.Tensor) -> None:
    """One optimiser step on loss, then one scheduler step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()


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
        optimize(opt, sched, loss)
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


def saved_tower(folder: Path) -> dict[str, torch.Tensor]:
    """The vision tower of a VLM saved by stage 2 (shipped or a checkpoint): its stage-1 tower, kept frozen there."""
    state = load_file(folder / "model.safetensors")
    prefix = "vision_tower."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def stage1_scenes_tower(work: Path, steps: int, seed: int, init_state: dict[str, torch.Tensor],
                        batch: int = 64, lr: float = 1.5e-3) -> dict[str, torch.Tensor]:
    """Stage 1 for scenes: the tower, warm-started from init_state, learns which colour + shape pairs occur (BCE on
    its [CLS] pooled output) and which object class covers each patch (cross-entropy on its layer -2 patch features).
    Returns its state dict (cached in work)."""
    path = work / f"stage1-scenes-tower-s{seed}-n{steps}-lr{lr:g}.safetensors"
    if path.exists():
        return load_file(path)
    seed_all(seed)
    proc = build.build_processor(dataset="scenes").image_processor
    data = {}
    for split in ("train", "val"):
        scs, _ = scenes.load_split(split)
        data[split] = (proc([sc.render() for sc in tqdm(scs, desc=f"rendering {split} scenes")], return_tensors="pt")["pixel_values"],
                       torch.from_numpy(np.stack([sc.presence() for sc in scs])).float(),
                       torch.from_numpy(np.stack([sc.patch_labels(build.PATCH).reshape(-1) for sc in scs])))
    tower = CLIPVisionModel(build.vision_config())
    tower.load_state_dict(init_state)
    hidden = tower.config.hidden_size
    heads = torch.nn.ModuleDict(dict(presence=torch.nn.Linear(hidden, data["train"][1].shape[1]),
                                     patch=torch.nn.Linear(hidden, scenes.N_OBJECT_CLASSES)))
    net = torch.nn.ModuleDict(dict(tower=tower, heads=heads)).train()

    def forward(x):
        out = tower(pixel_values=x, output_hidden_states=True)
        return heads["presence"](out.pooler_output), heads["patch"](out.hidden_states[-2][:, 1:])

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = schedule(opt, steps, warmup=30)
    pixels, presence, labels = data["train"]
    it, bar, t0 = batches(len(pixels), batch, g), tqdm(range(steps), desc="stage 1 (scenes tower)"), time.time()
    for step in bar:
        idx = next(it)
        pres_logits, patch_logits = forward(pixels[idx])
        loss = F.binary_cross_entropy_with_logits(pres_logits, presence[idx]) + F.cross_entropy(
            patch_logits.flatten(0, 1), labels[idx].flatten())
        optimize(opt, sched, loss)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 100 == 0 or step + 1 == steps:
            net.eval()
            with torch.no_grad():
                outs = [forward(x) for x in data["val"][0].split(256)]
            net.train()
            pres = torch.cat([o[0] for o in outs]) > 0
            patch = torch.cat([o[1] for o in outs]).argmax(-1)
            obj = data["val"][2] > 0
            tqdm.write(f"stage 1 (scenes) step {step + 1}: loss {loss.item():.4f}, val presence exact "
                       f"{(pres == data['val'][1].bool()).all(1).float().mean():.4f}, object-patch acc "
                       f"{(patch[obj] == data['val'][2][obj]).float().mean():.4f}")
    print(f"stage 1 (scenes): {time.time() - t0:.0f} s")
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


def encode_packs(processor, packs: list[list[tuple[str, str]]], n_image_tokens: int) -> list[tuple[torch.Tensor, ...]]:
    """QA pairs about one image -> one packed sequence of independent one-turn prompts sharing the image prefix.

    The chat template renders each pair as "<s><|user|> <image>x256 q ? <|assistant|> a</s>"; a pack is the shared
    prefix (through the last <image>) followed by every pair's continuation. Each continuation restarts its positions
    right after the prefix and (through `packed_mask`) sees only the prefix and itself, so it is trained exactly as the
    first-turn prompt answered at inference, while the 256 image tokens are paid once per image. Returns per pack
    (ids, pos, seg, ans), each (L,): token ids, position ids, segment (0 = prefix, k = pair k), answer mask (word + </s>).
    """
    tok, image = processor.tokenizer, processor.image_token
    asst = tok.convert_tokens_to_ids("<|assistant|>")
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}, {"role": "assistant", "content": a}]
            for pack in packs for q, a in pack]
    texts = [t.replace(image, image * n_image_tokens) for t in processor.apply_chat_template(msgs)]
    enc = [torch.tensor(x) for x in tok(texts, add_special_tokens=False)["input_ids"]]
    n_prefix = int(torch.nonzero(enc[0] == processor.image_token_id).max()) + 1
    out, k = [], 0
    for pack in packs:
        own, k = enc[k : k + len(pack)], k + len(pack)
        conts = [x[n_prefix:] for x in own]
        out.append((
            torch.cat([own[0][:n_prefix], *conts]),
            torch.cat([torch.arange(n_prefix)] + [torch.arange(n_prefix, n_prefix + len(c)) for c in conts]),
            torch.cat([torch.zeros(n_prefix, dtype=torch.long)] + [torch.full((len(c),), s + 1) for s, c in enumerate(conts)]),
            torch.cat([torch.zeros(n_prefix, dtype=torch.bool)] + [((c == asst).cumsum(0) > 0) & (c != asst) for c in conts]),
        ))
    return out


def collate(items: list[tuple[torch.Tensor, ...]], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pads packs -> ids, pos, seg (padding = -1), ans, each (B,L)."""
    pad = lambda k, v: torch.nn.utils.rnn.pad_sequence([t[k] for t in items], batch_first=True, padding_value=v)  # noqa: E731
    return pad(0, pad_id), pad(1, 0), pad(2, -1), pad(3, False)


def packed_mask(seg: torch.Tensor) -> torch.Tensor:
    """(B,L) segments -> (B,1,L,L) bool attention mask: causal, and a token sees the prefix (0) and its own segment."""
    L = seg.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    return (causal & ((seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])))[:, None]


def lm_forward(model, feats: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor | None = None,
               router_logits: bool = False):
    """Projector + LM on cached features: feats (B,256,D), ids/pos (B,L), mask (B,L) or (B,1,L,L)
    -> (hidden (B,L,H), router logits per layer or None)."""
    emb = model.get_input_embeddings()(ids)
    img = model.model.multi_modal_projector(feats).to(emb.dtype)
    emb = emb.masked_scatter((ids == model.config.image_token_id)[..., None], img)
    out = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos,
                                     output_router_logits=router_logits)
    return out.last_hidden_state, getattr(out, "router_logits", None)


def easyvqa_stage2_data() -> tuple[list, list[list[tuple[str, str]]], int]:
    """(images, QA pairs per image, number of training images): training images first, then the held-out ones."""
    tr, va = split_ids()
    images = easyvqa.load_images("train")
    qa = {i: [] for i in tr + va}
    for q, a, i in zip(*easyvqa.questions("train")):
        qa[i].append((q, a))
    return [images[i] for i in tr + va], [qa[i] for i in tr + va], len(tr)


def scenes_stage2_data(train_per_kind: int = 2, train_images: int | None = None
                       ) -> tuple[list, list[list[tuple[str, str]]], int]:
    """Same for scenes: the first train_images of the train split (None: its default size; image k is the same
    whatever the number), with up to train_per_kind questions of each kind per image, then the val split (as
    `scenes.load_split` makes it)."""
    images, qa = [], []
    splits = {"train": scenes.load_split("train", train_images, per_kind=train_per_kind),
              "val": scenes.load_split("val")}
    for split, (scs, questions) in splits.items():
        per_image = [[] for _ in scs]
        for q in questions:
            per_image[q.image_id].append((q.question, q.answer))
        images += [sc.render() for sc in tqdm(scs, desc=f"rendering {split} scenes")]
        qa += per_image
    return images, qa, len(splits["train"][0])


def stage2_llava(name: str, tower_state, out: Path, steps: int, seed: int, batch: int = 16,
                 checkpoints: Path | None = None, lr: float = 1e-3, train_per_kind: int = 2,
                 train_images: int | None = None, init: Path | None = None) -> None:
    """Stage 2: trains projector + LM on cached frozen-tower features, saves model + processor to out/name (and, given
    checkpoints, every 200 steps to checkpoints/name-step<N>). Given init (a saved model of the same architecture, e.g.
    a checkpoint or the shipped weights), projector + LM start from its weights instead of random ones, so a finished
    run can be continued on a new schedule; the tower is always tower_state."""
    seed_all(seed)
    moe, dataset = "moe" in name, ("scenes" if "scenes" in name else "easyvqa")
    model, processor = build.build_llava(moe=moe, dataset=dataset)
    if init is not None:
        def trained(state):  # name -> shape of every weight stage 2 trains
            return {k: v.shape for k, v in state.items() if not k.startswith("model.vision_tower.")}
        start = LlavaForConditionalGeneration.from_pretrained(init).state_dict()
        if trained(start) != trained(model.state_dict()):
            wrong = sorted(set(trained(start).items()) ^ set(trained(model.state_dict()).items()))
            raise ValueError(f"--scenes-stage2-init {init}: not a {name} model (weights that differ in name or "
                             f"shape: {[k for k, _ in wrong[:3]]})")
        model.load_state_dict({k: v for k, v in start.items() if k in trained(start)}, strict=False)
    model.model.vision_tower.load_state_dict(tower_state)
    model.model.vision_tower.requires_grad_(False)
    n_img = (processor.image_processor.crop_size["height"] // processor.patch_size) ** 2
    pad_id = processor.tokenizer.pad_token_id
    images, qa, n_train = scenes_stage2_data(train_per_kind, train_images) if dataset == "scenes" else easyvqa_stage2_data()
    pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    feats = tower_features(model, pixels)  # (N,256,D), training images first
    packs = encode_packs(processor, qa, n_img)  # one pack per image, all its questions

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    sched = schedule(opt, steps, warmup=50)
    cfg = model.config.text_config
    g = torch.Generator().manual_seed(seed)
    it, bar, t0 = batches(n_train, batch, g), tqdm(range(steps), desc=f"stage 2 ({name})"), time.time()
    model.train()
    for step in bar:
        idx = next(it).tolist()
        ids, pos, seg, ans = collate([packs[r] for r in idx], pad_id)
        tgt = ans[:, 1:]  # token t+1 is predicted at t
        h, rl = lm_forward(model, feats[idx], ids, packed_mask(seg), pos, router_logits=moe)
        loss = F.cross_entropy(model.lm_head(h[:, :-1][tgt]), ids[:, 1:][tgt])
        if moe:
            aux = load_balancing_loss_func(rl, cfg.num_experts, cfg.num_experts_per_tok, (seg >= 0).long())
            loss = loss + cfg.router_aux_loss_coef * aux
        optimize(opt, sched, loss)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 200 == 0 or step + 1 == steps:
            acc, n = answer_accuracy(model, feats, packs, range(n_train, len(packs)), pad_id)
            tqdm.write(f"stage 2 ({name}) step {step + 1}: loss {loss.item():.4f}, val answer acc {acc:.4f} (n={n})")
            if checkpoints:
                save(model.eval(), processor, checkpoints / f"{name}-step{step + 1}")
                model.train()
    print(f"stage 2 ({name}): {time.time() - t0:.0f} s")
    save(model.eval(), processor, out / name)


def answer_accuracy(model, feats, packs, rows, pad_id: int, batch: int = 32) -> tuple[float, int]:
    """Teacher-forced accuracy of the answer word (argmax right after <|assistant|>) over the packs' questions.

    Each packed question is computed exactly like its one-turn prompt, so this equals the first generated token.
    """
    model.eval()
    hits = n = 0
    rows = list(rows)
    with torch.no_grad():
        for b in range(0, len(rows), batch):
            r = rows[b : b + batch]
            ids, pos, seg, ans = collate([packs[k] for k in r], pad_id)
            h, _ = lm_forward(model, feats[r], ids, packed_mask(seg), pos)
            first = ans[:, 1:] & ~ans[:, :-1]  # answer words: start of each answer span
            first = torch.cat([torch.zeros_like(first[:, :1]), first], 1)
            pred = model.lm_head(h[:, :-1][first[:, 1:]]).argmax(-1)
            hits += int((pred == ids[first]).sum())
            n += int(first.sum())
    model.train()
    return hits / n, n


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
    p.add_argument("--stage2-steps", type=int, default=2400,
                   help="held-out answer accuracy jumps from < 0.95 to ~0.995 after 1,000-1,400 steps")
    p.add_argument("--vit-steps", type=int, default=600)
    p.add_argument("--scenes-stage1-steps", type=int, default=900)
    p.add_argument("--scenes-stage1-lr", type=float, default=1.5e-3,
                   help="5e-4 left the object-patch accuracy at 0.54 after 500 steps and the LM at 0.59 (docs/zoo.md)")
    p.add_argument("--scenes-stage2-steps", type=int, default=1800,
                   help="held-out accuracy still rises at the end: 0.66 / 0.75 / 0.77 at steps 1,000 / 1,400 / 1,800")
    p.add_argument("--scenes-stage2-lr", type=float, default=1e-3)
    p.add_argument("--scenes-questions-per-kind", type=int, default=2, help="per train image, in stage 2")
    p.add_argument("--scenes-train-images", type=int, default=None,
                   help="stage 2: the first N images of the train split, which is generated, so more than its 8,000 "
                        "(default) can be drawn")
    p.add_argument("--scenes-stage2-init", type=Path, default=None,
                   help="stage 2 starts from this saved model (a checkpoint, or the shipped weights' folder) to "
                        "continue a run on a new schedule: its tower (stage 1 is skipped), projector and LM")
    p.add_argument("--threads", type=int, help="torch CPU threads; 1 is much faster on a CPU shared with other jobs")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    names = MODELS if a.model == "all" else (a.model,)
    for name in names:
        if name == "tiny-vit-evqa":
            train_vit(a.out, a.vit_steps, a.seed)
        elif name == "tiny-llava-scenes":
            if a.scenes_stage2_init:  # a continued run keeps the tower it was trained on
                tower = saved_tower(a.scenes_stage2_init)
            else:
                tower = stage1_scenes_tower(a.work, a.scenes_stage1_steps, a.seed, saved_tower(WEIGHTS / "tiny-llava-evqa"),
                                            lr=a.scenes_stage1_lr)
            stage2_llava(name, tower, a.out, a.scenes_stage2_steps, a.seed, checkpoints=a.work / "checkpoints",
                         lr=a.scenes_stage2_lr, train_per_kind=a.scenes_questions_per_kind, train_images=a.scenes_train_images,
                         init=a.scenes_stage2_init)
        else:
            stage2_llava(name, stage1_tower(a.work, a.stage1_steps, a.seed), a.out, a.stage2_steps, a.seed)


if __name__ == "__main__":
    main()
