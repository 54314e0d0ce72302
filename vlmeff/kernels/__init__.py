"""Gather-and-merge of retained tokens. Every reducer in vlmeff ends in `gather_merge`.

Dispatch: CUDA tensors run the fused Triton kernel; CPU tensors run it in Triton's interpreter when
TRITON_INTERPRET=1 was set before `triton_gather_merge` was imported (lazily, by the first call that may use it;
tests set it in conftest.py), else the PyTorch reference; without triton everything runs the reference.
The op is the custom op `vlmeff::gather_merge`, opaque to torch.compile.
"""
import os
from typing import Optional

import torch

from .reference import gather_merge_reference

# calls per backend ("triton", "triton-interpret", "reference"): lets tests check which path really ran
BACKEND_CALLS = dict.fromkeys(("triton", "triton-interpret", "reference"), 0)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_module = None   # the kernel module once imported, False when triton is not importable


def _kernels():
    global _triton_module
    if _triton_module is None:
        try:
            from . import triton_gather_merge as module
        except ImportError:
            module = False
        _triton_module = module
    return _triton_module


def _backend(x):
    """Which path runs x: "triton", "triton-interpret" or "reference". Imports triton only where it may be used."""
    if x.dtype not in _TRITON_DTYPES:
        return "reference"
    if x.is_cuda:
        module = _kernels()
        return ("triton-interpret" if module.INTERPRET else "triton") if module else "reference"
    if x.device.type == "cpu" and (_triton_module or os.environ.get("TRITON_INTERPRET") == "1"):
        module = _kernels()
        return "triton-interpret" if module and module.INTERPRET else "reference"
    return "reference"


def _check_layout(x, index, offsets, weight):
    """Shape, dtype and device checks: free (no data access), so they also run while torch.compile traces."""
    if x.dim() != 3:
        raise ValueError(f"gather_merge expects x of shape [B, N, D], got {tuple(x.shape)}")
    B = x.shape[0]
    if index.dim() != 2 or index.shape[0] != B or index.dtype != torch.long:
        raise ValueError(f"index must be int64 [B={B}, M], got {index.dtype} {tuple(index.shape)}")
    if offsets.dim() != 2 or offsets.shape[0] != B or offsets.shape[1] < 1 or offsets.dtype != torch.long:
        raise ValueError(f"offsets must be int64 [B={B}, K + 1], got {offsets.dtype} {tuple(offsets.shape)}")
    if weight is not None and weight.shape != index.shape:
        raise ValueError(f"weight must have the shape of index {tuple(index.shape)}, got {tuple(weight.shape)}")
    if any(t.device != x.device for t in (index, offsets, weight) if t is not None):
        raise ValueError(f"index, offsets and weight must be on x's device {x.device}")


def _check_values(x, index, offsets):
    """Range and monotonicity checks. They read the data (one host sync); the Triton kernel does no bounds checks."""
    N, M = x.shape[1], index.shape[1]
    index_bad = ((index < 0) | (index >= N)).any()
    offsets_bad = (offsets[:, 0] != 0).any() | (offsets.diff(dim=1) < 0).any() | (offsets[:, -1] > M).any()
    index_bad, offsets_bad = torch.stack([index_bad, offsets_bad]).tolist()   # the one host sync
    if index_bad:
        raise ValueError(f"index values must lie in [0, {N}), got [{int(index.min())}, {int(index.max())}]")
    if offsets_bad:
        raise ValueError(f"offsets must start at 0, be non-decreasing and end at most at M={M}")


def validate_segments(x, index, offsets, weight=None):
    """Raise ValueError unless (index, offsets, weight) describe valid segments over x's tokens."""
    _check_layout(x, index, offsets, weight)
    _check_values(x, index, offsets)


@torch.library.custom_op("vlmeff::gather_merge", mutates_args=())
def _gather_merge_op(x: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, weight: Optional[torch.Tensor],
                     validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if validate:
        _check_values(x, index, offsets)
    backend = _backend(x)
    BACKEND_CALLS[backend] += 1
    if backend == "reference":
        return gather_merge_reference(x, index, offsets, weight)
    return _kernels().gather_merge_triton(x, index, offsets, weight)


@_gather_merge_op.register_fake
def _(x, index, offsets, weight, validate):
    B, _, D = x.shape
    K = offsets.shape[1] - 1
    return x.new_empty(B, K, D), x.new_empty(B, K, dtype=torch.float32)


def gather_merge(x, index, offsets, weight=None, validate=True):
    """Weighted segment mean of gathered rows; see `gather_merge_reference` for the contract.

    x [B, N, D], index [B, M] int64, offsets [B, K + 1] int64, weight [B, M] or None.
    Returns (out [B, K, D] in x.dtype, total_weight [B, K] float32). `validate=False` skips the value checks
    (and their host sync) for callers whose segments are valid by construction, e.g. `segments_from_assignment`;
    invalid indices then read out of bounds. When autograd needs gradients this runs the (differentiable)
    reference instead of the custom op.
    """
    _check_layout(x, index, offsets, weight)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        if validate:
            _check_values(x, index, offsets)
        BACKEND_CALLS["reference"] += 1
        return gather_merge_reference(x, index, offsets, weight)
    return torch.ops.vlmeff.gather_merge(x, index, offsets, weight, validate)


def segments_from_assignment(dst, num_out):
    """(index [B, N], offsets [B, num_out + 1]) for `gather_merge` from dst [B, N] int64: each token's output slot
    in [0, num_out), or -1 to drop it. Members are sorted by slot (stably, so they keep their order); dropped
    tokens come after offsets[:, -1]. No host synchronisation."""
    slot = torch.where(dst < 0, num_out, dst)
    index = slot.argsort(dim=1, stable=True)
    counts = torch.zeros(dst.shape[0], num_out + 1, dtype=torch.long, device=dst.device)
    counts.scatter_add_(1, slot, torch.ones_like(slot))
    offsets = torch.nn.functional.pad(counts[:, :num_out].cumsum(dim=1), (1, 0))
    return index, offsets
