"""Where each family keeps its MLPs, its image embedding and its output features, and how one MLP is sliced.

Knows no pruning method: `MlpSlot` names the linears that produce (rows) and read (columns) the hidden neurons of one
MLP; `Family` bundles a model's slots with two functions of (model, batch):
- `embed` -> (B, D): the image embedding of the label-free loss (timm: pre-logits pooled features; CLIP / DINOv2: the
  pooler output, i.e. the normalised [CLS]; SigLIP: the attention-pool head, or the token mean without a head;
  LLaVA: the mean of the projected image tokens the LLM reads),
- `features` -> (B, N, D): the tower's output tokens, the target of distillation (LLaVA: the projected image tokens).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from vlmeff.errors import UnsupportedModelError

SUPPORTED = ("timm VisionTransformer", "CLIPVisionModel", "SiglipVisionModel", "Dinov2Model",
             "LlavaForConditionalGeneration (its vision tower)")


@dataclass(frozen=True)
class MlpSlot:
    """One MLP: `rows` are linears whose output row j is hidden neuron j (fc1; gate and up of a SwiGLU), `fused` a
    linear of 2 x width rows whose rows j and width + j feed neuron j (timm GluMlp's fc1), `out` reads the neurons."""

    module: nn.Module
    rows: tuple[str, ...]
    out: str
    fused: str | None = None

    @property
    def width(self) -> int:
        return getattr(self.module, self.out).in_features

    @property
    def out_linear(self) -> nn.Linear:
        return getattr(self.module, self.out)


@dataclass(frozen=True)
class Family:
    name: str
    tower: nn.Module                     # the module that holds the slots (trained by distillation)
    slots: tuple[MlpSlot, ...]
    embed: Callable[[nn.Module, object], torch.Tensor]
    features: Callable[[nn.Module, object], torch.Tensor]


def pixels(model: nn.Module, batch) -> torch.Tensor:
    """The (B, 3, H, W) pixel tensor of a batch (a tensor, a mapping with "pixel_values", or an (images, labels, ...)
    tuple / list as a DataLoader over a labelled dataset yields), on the model's device and in its floating dtype."""
    x = batch["pixel_values"] if isinstance(batch, Mapping) and "pixel_values" in batch else batch
    x = x[0] if isinstance(x, (tuple, list)) and x else x
    if not torch.is_tensor(x) or x.dim() != 4:
        got = type(x).__name__ if not torch.is_tensor(x) else f"a tensor of shape {tuple(x.shape)}"
        raise TypeError(f"each batch of data must be a (B, 3, H, W) pixel tensor, a mapping with 'pixel_values' or "
                        f"an (images, ...) tuple; "
                        f"got {got}")
    p = next(model.parameters())
    return x.to(p.device, p.dtype if p.dtype.is_floating_point else x.dtype)


def _linear_names(module: nn.Module, names: tuple[str, ...]) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def mlp_slot(mlp: nn.Module) -> MlpSlot:
    """The slot of one MLP module of a supported family; an unknown MLP or a hidden-size norm is an error."""
    norm = getattr(mlp, "norm", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise UnsupportedModelError(f"{type(mlp).__name__} normalises its hidden neurons ({type(norm).__name__}); "
                                    "slicing them would change that norm's statistics, so it is not supported")
    if _linear_names(mlp, ("fc1_g", "fc1_x", "fc2")):                  # timm SwiGLU
        return MlpSlot(mlp, ("fc1_g", "fc1_x"), "fc2")
    if _linear_names(mlp, ("gate_proj", "up_proj", "down_proj")):      # HF DINOv2 SwiGLU
        return MlpSlot(mlp, ("gate_proj", "up_proj"), "down_proj")
    if _linear_names(mlp, ("fc1", "fc2")):
        from timm.layers import GluMlp

        if isinstance(mlp, GluMlp):                                    # fc1 -> chunk(2) -> gate * value
            return MlpSlot(mlp, (), "fc2", fused="fc1")
        return MlpSlot(mlp, ("fc1",), "fc2")                           # timm Mlp, CLIP, SigLIP, DINOv2
    raise UnsupportedModelError(f"unknown MLP {type(mlp).__name__}: expected fc1/fc2, fc1_g/fc1_x/fc2 or "
                                "gate_proj/up_proj/down_proj linears")


def _hf_tower(model, layers, pool) -> Family:
    def features(m, batch):
        return m(pixel_values=pixels(m, batch)).last_hidden_state

    def embed(m, batch):
        out = m(pixel_values=pixels(m, batch))
        return pool(out)

    return Family(type(model).__name__, model, tuple(mlp_slot(layer.mlp) for layer in layers), embed, features)


def _siglip_pool(out) -> torch.Tensor:
    return out.pooler_output if out.pooler_output is not None else out.last_hidden_state.mean(1)


def family(model: nn.Module) -> Family:
    """The family of a supported model; anything else raises UnsupportedModelError naming the supported ones."""
    from timm.models.vision_transformer import VisionTransformer
    from transformers import CLIPVisionModel, Dinov2Model, LlavaForConditionalGeneration, SiglipVisionModel

    if isinstance(model, VisionTransformer):
        return Family("timm", model, tuple(mlp_slot(b.mlp) for b in model.blocks),
                      lambda m, b: m.forward_head(m.forward_features(pixels(m, b)), pre_logits=True),
                      lambda m, b: m.forward_features(pixels(m, b)))
    if isinstance(model, CLIPVisionModel):
        return _hf_tower(model, model.encoder.layers, lambda out: out.pooler_output)
    if isinstance(model, SiglipVisionModel):
        return _hf_tower(model, model.encoder.layers, _siglip_pool)
    if isinstance(model, Dinov2Model):
        return _hf_tower(model, model.encoder.layer, lambda out: out.pooler_output)
    if isinstance(model, LlavaForConditionalGeneration):
        tower = model.model.vision_tower
        inner = family(tower)
        return Family("llava", tower, inner.slots, lambda m, b: _llava_features(m, b).mean(1), _llava_features)
    raise UnsupportedModelError(f"MLP pruning does not support {type(model).__name__}; supported: "
                                f"{', '.join(SUPPORTED)}")


def _llava_features(model, batch) -> torch.Tensor:
    """(B, N, D_text): the projected image tokens LLaVA feeds its LLM (its feature layer and selection)."""
    cfg = model.config
    out = model.model.get_image_features(pixel_values=pixels(model, batch),
                                         vision_feature_layer=cfg.vision_feature_layer,
                                         vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    return torch.stack(list(out.pooler_output))


def slice_mlp(slot: MlpSlot, keep: torch.Tensor) -> None:
    """Keeps the hidden neurons `keep` (K,) (long, any order) of one MLP, in place: the linears' parameters are
    replaced by their sliced copies, so hooks and references to the modules survive."""
    width = slot.width
    keep = keep.to(slot.out_linear.weight.device)
    for name in slot.rows:
        _slice_rows(getattr(slot.module, name), keep)
    if slot.fused:
        _slice_rows(getattr(slot.module, slot.fused), torch.cat([keep, keep + width]))
    out = slot.out_linear
    out.weight = nn.Parameter(out.weight.detach()[:, keep].clone(), requires_grad=out.weight.requires_grad)
    out.in_features = len(keep)


def _slice_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    linear.weight = nn.Parameter(linear.weight.detach()[rows].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[rows].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(rows)
