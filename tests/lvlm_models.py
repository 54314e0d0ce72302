"""Tiny random-initialised LLaVA models and inputs, built from configs offline."""
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE = 100
PAD = 0


def tiny_llava(strategy="default"):
    """CLIP tower (32 px, patch 8: 16 patches + [CLS], 3 layers) + Llama (4 layers, GQA)."""
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=32, patch_size=8)
    text = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=PAD,
                       bos_token_id=1, eos_token_id=2, initializer_range=0.2)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE, vision_feature_layer=-2,
                      vision_feature_select_strategy=strategy)
    return LlavaForConditionalGeneration(cfg).eval()


def prompt(text_before, n_images, text_after, tokens_per_image=16):
    ids = list(text_before)
    for _ in range(n_images):
        ids += [IMAGE] * tokens_per_image + [3]
    return ids + list(text_after)


def batch(prompts, side="left"):
    """Pad a list of id lists into (input_ids, attention_mask)."""
    L = max(map(len, prompts))
    ids = torch.full((len(prompts), L), PAD)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for i, p in enumerate(prompts):
        span = slice(L - len(p), L) if side == "left" else slice(0, len(p))
        ids[i, span], mask[i, span] = torch.tensor(p), 1
    return ids, mask


def pixels(n, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, **kwargs):
    """Greedy, 4 new tokens, never the image placeholder (a generated placeholder breaks no-cache runs)."""
    image = getattr(model.config, "image_token_id", IMAGE)
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=[image], **kwargs)


class Recorder:
    """Arguments of the latest call of a module (forward pre-hook)."""

    def __init__(self, module):
        self.args = self.kwargs = None
        self.handle = module.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        self.args, self.kwargs = args, kwargs

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()
