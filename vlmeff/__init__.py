"""vlmeff: training-free, one-line visual-token pruning and merging for ViTs and vision-language models."""
from . import zoo
from .api import patch
from .errors import UnsupportedModelError
from .calibration import calibrate
from .experts import skip_experts
from .patching import Patch
from .registry import MethodInfo, method_info, methods
from .structural import MlpPruneReport, load_pruned_mlp, prune_mlp, save_pruned_mlp

__version__ = "0.1.0"
__all__ = ["MethodInfo", "MlpPruneReport", "Patch", "UnsupportedModelError", "calibrate", "load_pruned_mlp",
           "method_info", "methods", "patch", "prune_mlp", "save_pruned_mlp", "skip_experts", "zoo"]
