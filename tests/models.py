"""Tiny random-initialised models built from configs, offline, in milliseconds."""
import timm
import torch
from transformers import CLIPVisionConfig, CLIPVisionModel, Dinov2Config, Dinov2Model, SiglipVisionConfig, SiglipVisionModel


def tiny_timm_vit(**kwargs):
    """8 x 8 = 64 patches of a 32 px image, [CLS] + optional registers, 4 layers."""
    torch.manual_seed(0)
    args = dict(img_size=32, patch_size=4, embed_dim=32, depth=4, num_heads=4, num_classes=10)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**args, **kwargs}).eval()


def tiny_clip(**kwargs):
    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                           image_size=32, patch_size=4, **kwargs)
    return CLIPVisionModel(cfg).eval()


def tiny_siglip():
    torch.manual_seed(0)
    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                             image_size=32, patch_size=4)
    return SiglipVisionModel(cfg).eval()


def tiny_dinov2():
    torch.manual_seed(0)
    cfg = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, image_size=32, patch_size=4,
                       mlp_ratio=2)
    return Dinov2Model(cfg).eval()


def images(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def run(model, x):
    """The model's main output tensor."""
    with torch.no_grad():
        out = model(x) if isinstance(model, torch.nn.Module) and not hasattr(model, "config") else model(pixel_values=x)
    return out if torch.is_tensor(out) else out.last_hidden_state
