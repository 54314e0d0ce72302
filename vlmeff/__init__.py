"""vlmeff: training-free, one-line visual-token pruning and merging for ViTs and vision-language models."""
from . import zoo
from .api import patch
from .errors import UnsupportedModelError
from .experts import calibrate, skip_experts
from .patching import Patch
from .registry import MethodInfo, method_info, methods

__version__ = "0.1.0"
__all__ = ["MethodInfo", "Patch", "UnsupportedModelError", "calibrate", "method_info", "methods", "patch",
           "skip_experts", "zoo"]
