"""Model adapters: where each family keeps its visual tokens and how to shrink them. They know no method."""
import torch.nn as nn

from ..errors import UnsupportedModelError
from .gemma3 import Gemma3Adapter
from .hf_vision import HFViTAdapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter, LlavaOnevisionAdapter
from .qwen_vl import QwenVLAdapter
from .timm_vit import TimmViTAdapter

# class name -> adapter; matched by name (and the defining package) so no optional library must be importable
FAMILIES = {
    "VisionTransformer": TimmViTAdapter,
    "CLIPVisionModel": HFViTAdapter,
    "SiglipVisionModel": HFViTAdapter,
    "Dinov2Model": HFViTAdapter,
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaNextForConditionalGeneration": LlavaNextAdapter,
    "LlavaOnevisionForConditionalGeneration": LlavaOnevisionAdapter,
    "InternVLForConditionalGeneration": InternVLAdapter,
    "Gemma3ForConditionalGeneration": Gemma3Adapter,
    **dict.fromkeys(("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration",
                     "Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration"), QwenVLAdapter),
}
PACKAGES = {"VisionTransformer": "timm."}


def supported_families():
    return sorted(FAMILIES)


def find_adapter(model):
    """The adapter for `model`, or UnsupportedModelError naming the supported families."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"vlmeff.patch expects a loaded torch model (nn.Module), got {type(model).__name__}; "
            f"supported families: {', '.join(supported_families())}")
    name = type(model).__name__
    adapter = FAMILIES.get(name)
    if adapter is None or not type(model).__module__.startswith(PACKAGES.get(name, "")):
        raise UnsupportedModelError(
            f"{type(model).__name__} is not a supported model; supported families: {', '.join(supported_families())}")
    return adapter(model)
