"""Structural pruning: weights are removed for real (smaller and faster models), unlike the token patches."""
from .amp import MlpPruneReport, entropy_loss, mlp_widths, prune_mlp, taylor_importance
from .store import load_pruned_mlp, save_pruned_mlp

__all__ = ["MlpPruneReport", "entropy_loss", "load_pruned_mlp", "mlp_widths", "prune_mlp", "save_pruned_mlp",
           "taylor_importance"]
