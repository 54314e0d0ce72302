"""Embedded models: tiny VLMs and a tiny ViT trained offline here, shipped in vlmeff/zoo/weights/<name> (docs/zoo.md).

    model, processor = vlmeff.zoo.load("tiny-llava-evqa")        # LlavaForConditionalGeneration, LlavaProcessor
    model, processor = vlmeff.zoo.load("tiny-llava-moe-evqa")    # same, Qwen3-MoE LM (8 experts, top-2)
    vit, preprocess = vlmeff.zoo.load("tiny-vit-evqa")           # timm VisionTransformer, ViTPreprocess
    model, processor = vlmeff.zoo.load("tiny-llava-scenes")      # LLaVA with an 8-layer LM, multi-object scenes

The first three are trained on easy-VQA, `tiny-llava-scenes` on `vlmeff.data.scenes`; `dataset(name)` says which.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

WEIGHTS = Path(__file__).parent / "weights"
_NAMES = ("tiny-llava-evqa", "tiny-llava-moe-evqa", "tiny-vit-evqa", "tiny-llava-scenes")


def names() -> list[str]:
    return list(_NAMES)


def _check_name(name: str) -> str:
    if name not in _NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(_NAMES)}")
    return name


def dataset(name: str) -> str:
    """The dataset an embedded model was trained on and is evaluated on: "easyvqa" or "scenes"."""
    return "scenes" if _check_name(name).endswith("-scenes") else "easyvqa"


def _path(name: str, weights_dir: str | Path | None) -> Path:
    path = Path(weights_dir or WEIGHTS) / _check_name(name)
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


def _check_split(split: str) -> str:
    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown split {split!r}; valid: 'train', 'val', 'test'")
    return split


def vqa_split(data: str, split: str = "test") -> tuple[dict, list[tuple[int, str, str, str]]]:
    """(images: id -> PIL, [(image_id, question, answer, kind)]) of "easyvqa" or "scenes".

    split "train", "val" or "test". easy-VQA "val" = the 400 train images held out from training; its kinds are
    "shape", "color" and "yes/no" (by answer). Scenes: the split of `vlmeff.data.scenes`, kinds as it defines them.
    """
    _check_split(split)
    if data not in ("easyvqa", "scenes"):
        raise ValueError(f"unknown embedded dataset {data!r}; valid: 'easyvqa', 'scenes'")
    if data == "scenes":
        from vlmeff.data import scenes

        images, questions = scenes.load_split(split)
        return {k: sc.render() for k, sc in enumerate(images)}, [(q.image_id, q.question, q.answer, q.kind) for q in questions]
    from vlmeff.data import easyvqa

    src = "test" if split == "test" else "train"
    held_out = easyvqa.validation_ids() if src == "train" else set()
    kind = lambda a: "yes/no" if a in ("yes", "no") else "shape" if a in easyvqa.SHAPES else "color"  # noqa: E731
    qa = [(i, q, a, kind(a)) for q, a, i in zip(*easyvqa.questions(src)) if (i in held_out) == (split == "val")]
    return easyvqa.load_images(src), qa


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
    """Accuracy of an embedded model on the split of its dataset -> dict(accuracy, n, seconds, per_kind).

    VLMs: exact match of the greedy generated answer for every question of the split (the first `limit` if given),
    batched with padding; per_kind: kind -> (accuracy, n) (`vqa_split` names the kinds). ViT: top-1 shape x colour
    class on the split's easy-VQA images whose both labels are recoverable from the questions (the first `limit`).
    """
    model, proc = load(name, device, weights_dir)
    images, qa = vqa_split(dataset(name), split)
    t0, per_kind = time.time(), {}
    if name == "tiny-vit-evqa":
        from vlmeff.data import easyvqa

        labels = easyvqa.image_labels("test" if split == "test" else "train")
        ids = [i for i in sorted({i for i, *_ in qa}) if None not in labels[i]][:limit]
        hits = 0
        for b in tqdm(range(0, len(ids), batch_size), desc=f"eval {name} ({split})"):
            batch = ids[b : b + batch_size]
            with torch.no_grad():
                pred = model(proc([images[i] for i in batch]).to(device)).argmax(-1).tolist()
            hits += sum(proc.classes[p] == " ".join(labels[i][::-1]) for p, i in zip(pred, batch))
        return dict(accuracy=hits / max(len(ids), 1), n=len(ids), seconds=round(time.time() - t0, 1), per_kind={})
    qa = qa[:limit]
    right = []
    for b in tqdm(range(0, len(qa), batch_size), desc=f"eval {name} ({split})"):
        batch = qa[b : b + batch_size]
        answers = ask(model, proc, [images[i] for i, *_ in batch], [q for _, q, _, _ in batch])
        right += [p == a for p, (_, _, a, _) in zip(answers, batch)]
    for (*_, kind), ok in zip(qa, right):
        per_kind.setdefault(kind, []).append(ok)
    return dict(accuracy=sum(right) / max(len(qa), 1), n=len(qa), seconds=round(time.time() - t0, 1),
                per_kind={k: (sum(v) / len(v), len(v)) for k, v in sorted(per_kind.items())})
