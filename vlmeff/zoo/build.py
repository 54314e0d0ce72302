"""Configs, tokenizer and processor of the embedded models, built offline from code (no hub).

VLMs: LLaVA = CLIP vision tower (64 px, patch 4 -> [CLS] + 256 patches, hidden 96, 4 layers) + 2-layer GELU MLP
projector + a small causal LM, tokenised with a word-level tokenizer over the dataset's vocabulary:
    dataset "easyvqa": Llama with 2 layers, or Qwen3-MoE (8 experts / top-2) with 2 layers
    dataset "scenes":  Llama with 8 layers (MLP width 256), deep enough for in-LLM methods (FastV's K=2, PyramidDrop's stages)
The processor emits 256 <image> placeholders per image (the [CLS] row is dropped by LLaVA's
"default" feature selection).

Prompt format (the processor's chat template):
    <s><|user|> <image> what color is the shape ? <|assistant|> blue</s><|user|> ... <|assistant|>
"""
from __future__ import annotations

import numpy as np
import tokenizers
import torch
from PIL import Image
from tokenizers import models, normalizers, pre_tokenizers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
)
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from vlmeff.data import easyvqa, scenes

DATASETS = ("easyvqa", "scenes")
IMAGE_SIZE, PATCH = 64, 4
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<image>", "<|user|>", "<|assistant|>"]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>' }}"
    "{% if m['content'] is string %}{{ ' ' + m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}{{ ' <image>' }}{% elif c['type'] == 'text' %}{{ ' ' + c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ ' ' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _check_dataset(dataset: str) -> str:
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; valid: {', '.join(map(repr, DATASETS))}")
    return dataset


def vocabulary(dataset: str = "easyvqa") -> list[str]:
    """Special tokens, then every word of the dataset's questions and answers (lowercased, '?' split off).

    easyvqa: the words of the train questions and answers; scenes: every word its templates can produce.
    """
    if _check_dataset(dataset) == "scenes":
        return SPECIAL_TOKENS + scenes.question_words()
    qs, ans, _ = easyvqa.questions("train")
    return SPECIAL_TOKENS + sorted({w for t in qs + ans + easyvqa.answers() for w in easyvqa.words(t)})


def build_tokenizer(dataset: str = "easyvqa") -> PreTrainedTokenizerFast:
    """Word-level tokenizer (lowercases, splits punctuation), padding on the left for batched generation."""
    vocab = {w: i for i, w in enumerate(vocabulary(dataset))}
    tk = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+, so "shape?" -> "shape", "?"
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        extra_special_tokens=["<image>", "<|user|>", "<|assistant|>"], padding_side="left",
        model_max_length=1024,
    )


def build_processor(tokenizer: PreTrainedTokenizerFast | None = None, dataset: str = "easyvqa") -> LlavaProcessor:
    tokenizer = tokenizer or build_tokenizer(dataset)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH, chat_template=CHAT_TEMPLATE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,  # +[CLS], then dropped
    )


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=96, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH, projection_dim=96,
    )


def text_config(tokenizer: PreTrainedTokenizerFast, moe: bool, num_layers: int = 2,
                intermediate_size: int = 512) -> LlamaConfig | Qwen3MoeConfig:
    common = dict(
        vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    if not moe:
        return LlamaConfig(intermediate_size=intermediate_size, **common)
    # every layer sparse; the aux load-balancing loss (applied in training) keeps all experts in use
    return Qwen3MoeConfig(
        head_dim=32, intermediate_size=512, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
        decoder_sparse_step=1, norm_topk_prob=True, router_aux_loss_coef=0.02, **common,
    )


def build_llava(moe: bool = False, dataset: str = "easyvqa") -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Randomly initialised tiny LLaVA (dense Llama or Qwen3-MoE LM) and its processor, for easyvqa or scenes."""
    if moe and _check_dataset(dataset) != "easyvqa":
        raise ValueError("the MoE LM is built for dataset 'easyvqa' only")
    processor = build_processor(dataset=dataset)
    tok = processor.tokenizer
    # scenes: 4x the layers at half the MLP width (a CPU-trainable budget)
    depth = dict(num_layers=8, intermediate_size=256) if dataset == "scenes" else {}
    cfg = LlavaConfig(
        vision_config=vision_config(), text_config=text_config(tok, moe, **depth), image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(cfg)
    gc = model.generation_config
    gc.pad_token_id, gc.bos_token_id, gc.eos_token_id = tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    gc.do_sample, gc.max_new_tokens = False, 4
    return model.eval(), processor


VIT_KWARGS = dict(
    img_size=IMAGE_SIZE, patch_size=PATCH, embed_dim=96, depth=4, num_heads=4, mlp_ratio=4.0,
    num_classes=len(easyvqa.CLASSES), class_token=True, global_pool="token",
)


def build_vit():
    """Randomly initialised timm ViT classifier, (B,3,64,64) -> (B,24) shape x colour logits."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**VIT_KWARGS).eval()


class ViTPreprocess:
    """Preprocessing of `tiny-vit-evqa`: PIL image or list -> (B,3,64,64) float tensor.

    RGB, bicubic resize to 64x64, scale to [0,1], normalise with the CLIP mean/std. `classes[k]` names logit k
    ("<colour> <shape>", k = shape * 8 + colour).
    """

    def __init__(self, image_size: int = IMAGE_SIZE, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, classes=easyvqa.CLASSES):
        self.image_size, self.mean, self.std, self.classes = image_size, tuple(mean), tuple(std), tuple(classes)

    def __call__(self, images) -> torch.Tensor:
        images = [images] if isinstance(images, Image.Image) else list(images)
        size = (self.image_size, self.image_size)
        x = torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize(size, Image.BICUBIC)).copy()) for im in images])
        x = x.permute(0, 3, 1, 2).float() / 255
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    def to_dict(self) -> dict:
        return dict(image_size=self.image_size, mean=self.mean, std=self.std, classes=self.classes)
