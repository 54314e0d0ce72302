"""Embedded models: tiny VLMs and a tiny ViT trained on easy-VQA, shipped in vlmeff/zoo/weights/<name> (see docs/zoo.md).

    model, processor = vlmeff.zoo.load("tiny-llava-evqa")        # LlavaForConditionalGeneration, LlavaProcessor
    model, processor = vlmeff.zoo.load("tiny-llava-moe-evqa")    # same, Qwen3-MoE LM (8 experts, top-2)
    vit, preprocess = vlmeff.zoo.load("tiny-vit-evqa")           # timm VisionTransformer, ViTPreprocess
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

WEIGHTS = Path(__file__).parent / "weights"
_NAMES = ("tiny-llava-evqa", "tiny-llava-moe-evqa", "tiny-vit-evqa")


def names() -> list[str]:
    return list(_NAMES)


def _path(name: str, weights_dir: str | Path | None) -> Path:
    if name not in _NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_NAMES)}")
    path = Path(weights_dir or WEIGHTS) / name
    if not path.is_dir():
        raise FileNotFoundError(f"no weights for {name!r} in {path}; train them with python -m vlmeff.zoo.train")
    return path


def load(name: str, device: str | torch.device = "cpu", weights_dir: str | Path | None = None):
    """Loads an embedded model offline, in eval mode.

    VLMs return (LlavaForConditionalGeneration, LlavaProcessor) via `from_pretrained(local_dir)`. `tiny-vit-evqa` returns
    (timm VisionTransformer, ViTPreprocess): preprocess(PIL image | list) -> (B,3,64,64); model(x) -> (B,24) logits over
    preprocess.classes ("<colour> <shape>"). weights_dir defaults to the package's weights.
    """
    path = _path(name, weights_dir)
    if name == "tiny-vit-evqa":
        from safetensors.torch import load_file
        from timm.models.vision_transformer import VisionTransformer

        from vlmeff.zoo.build import ViTPreprocess

        cfg = json.loads((path / "config.json").read_text())
        model = VisionTransformer(**cfg["timm_kwargs"])
        model.load_state_dict(load_file(path / "model.safetensors"))
        return model.to(device).eval(), ViTPreprocess(**cfg["preprocess"])
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    model = LlavaForConditionalGeneration.from_pretrained(path)
    return model.to(device).eval(), LlavaProcessor.from_pretrained(path)


def _split(split: str):
    """(images: id -> PIL, [(image_id, question, answer)]) for "test", "train" or "val" (held-out train images)."""
    from vlmeff.data import easyvqa

    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; valid: 'train', 'val', 'test'")
    src = "test" if split == "test" else "train"
    keep = easyvqa.validation_ids() if split == "val" else None
    qa = [(i, q, a) for q, a, i in zip(*easyvqa.questions(src)) if keep is None or i in keep]
    return easyvqa.load_images(src), qa, easyvqa.image_labels(src)


def ask(model, processor, images: list, questions: list[str], max_new_tokens: int = 3) -> list[str]:
    """Answers one question per image with the standard HF flow (chat template, left padding, greedy)."""
    msgs = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}] for q in questions]
    texts = processor.apply_chat_template(msgs, add_generation_prompt=True)
    inputs = processor(images=images, text=texts, padding=True, return_tensors="pt").to(model.device)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [s.strip() for s in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def evaluate(name: str, split: str = "test", limit: int | None = None, batch_size: int = 64,
             device: str = "cpu", weights_dir: str | Path | None = None) -> dict:
    """Accuracy of an embedded model on easy-VQA -> dict(accuracy, n, seconds).

    VLMs: exact match of the greedy generated answer for every question of the split (the first `limit` if given),
    batched with padding. ViT: top-1 shape x colour class on the split's images whose both labels are recoverable from
    the questions (the first `limit` of them). split "val" = the 400 train images held out from training.
    """
    model, proc = load(name, device, weights_dir)
    images, qa, labels = _split(split)
    t0, hits = time.time(), 0
    if name == "tiny-vit-evqa":
        ids = [i for i in sorted({i for i, _, _ in qa}) if None not in labels[i]][:limit]
        for b in tqdm(range(0, len(ids), batch_size), desc=f"eval {name} ({split})"):
            batch = ids[b : b + batch_size]
            with torch.no_grad():
                pred = model(proc([images[i] for i in batch]).to(device)).argmax(-1).tolist()
            hits += sum(proc.classes[p] == " ".join(labels[i][::-1]) for p, i in zip(pred, batch))
        n = len(ids)
    else:
        qa = qa[:limit]
        for b in tqdm(range(0, len(qa), batch_size), desc=f"eval {name} ({split})"):
            batch = qa[b : b + batch_size]
            answers = ask(model, proc, [images[i] for i, _, _ in batch], [q for _, q, _ in batch])
            hits += sum(p == a for p, (_, _, a) in zip(answers, batch))
        n = len(qa)
    return dict(accuracy=hits / max(n, 1), n=n, seconds=round(time.time() - t0, 1))
