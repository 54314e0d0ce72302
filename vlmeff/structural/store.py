"""Saving and reloading a model whose MLPs were pruned: configs cannot express per-layer widths, so the file is the
state dict (safetensors) with the widths in its metadata, and the loader re-slices a fresh model to those widths
before loading the weights.

    report = vlmeff.prune_mlp(model, data)
    vlmeff.save_pruned_mlp(model, "pruned.safetensors")
    fresh = build_the_same_unpruned_model()          # e.g. CLIPVisionModel(config) or from_pretrained(original)
    vlmeff.load_pruned_mlp(fresh, "pruned.safetensors")
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model

from .amp import mlp_widths
from .sites import family, slice_mlp

_KEY = "vlmeff_mlp_widths"


def save_pruned_mlp(model: torch.nn.Module, path: str | Path) -> None:
    """Writes the model's state dict and its MLP widths (first layer first) to a safetensors file."""
    save_model(model, str(path), metadata={_KEY: json.dumps(mlp_widths(model))})


def load_pruned_mlp(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Slices `model` (the same architecture, unpruned or not) to the widths stored in `path`, then loads the
    weights strictly; returns the model. A file without widths or with another layer count is a ValueError."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _KEY not in meta:
        raise ValueError(f"{path} has no {_KEY!r} metadata: it was not written by vlmeff.save_pruned_mlp")
    widths, slots = json.loads(meta[_KEY]), family(model).slots
    if len(widths) != len(slots):
        raise ValueError(f"{path} stores {len(widths)} MLP widths but the model has {len(slots)} MLPs")
    for slot, width in zip(slots, widths):
        if width > slot.width:
            raise ValueError(f"{path} stores width {width} for an MLP of width {slot.width}: the model is smaller "
                             "than the one that was saved")
        slice_mlp(slot, torch.arange(width))            # the shapes only: the weights are loaded next
    load_model(model, str(path), strict=True, device=str(next(model.parameters()).device))
    return model
