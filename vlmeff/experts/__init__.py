"""Expert skipping for MoE vision-language models: a site of its own (routed experts inside the LLM).

    handle = vlmeff.skip_experts(model, thresholds=(tau_text, tau_visual))      # or schedule="modes.json"
    schedule = vlmeff.calibrate(model, data, method="modes", target_skip=0.7, path="modes.json")
"""
from .calibrate import calibrate, easyvqa_calibration, frontier_search
from .skip import ExpertSkipPatch, skip_experts, skip_pairs

__all__ = ["ExpertSkipPatch", "calibrate", "easyvqa_calibration", "frontier_search", "skip_experts", "skip_pairs"]
