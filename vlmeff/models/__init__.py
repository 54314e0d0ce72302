"""Model adapters: where each family keeps its visual tokens and how to shrink them. They know no method."""
import torch.nn as nn

from ..errors import UnsupportedModelError
from .hf_vision import HFViTAdapter
from .timm_vit import TimmViTAdapter

# class name -> (adapter, kind); matched by name so that optional libraries need not be importable
VIT_FAMILIES = {
    "VisionTransformer": TimmViTAdapter,
    "CLIPVisionModel": HFViTAdapter,
    "SiglipVisionModel": HFViTAdapter,
    "Dinov2Model": HFViTAdapter,
}


def supported_families():
    return sorted(VIT_FAMILIES)


def find_adapter(model):
    """The adapter for `model`, or UnsupportedModelError naming the supported families."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"vlmeff.patch expects a loaded torch model (nn.Module), got {type(model).__name__}; "
            f"supported families: {', '.join(supported_families())}")
    adapter = VIT_FAMILIES.get(type(model).__name__)
    if adapter is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a supported model; supported families: {', '.join(supported_families())}")
    return adapter(model)
