"""Which implementation runs a `gather_merge` call, as the custom op `vlmeff::gather_merge` (opaque to
torch.compile).

CUDA tensors run the fused Triton kernel; CPU tensors run it in Triton's interpreter when TRITON_INTERPRET=1 was
set before `triton_gather_merge` was imported (lazily, by the first call that may use it; tests set it in
conftest.py), else the PyTorch reference; without triton everything runs the reference. Autograd runs the
(differentiable) reference. A kernel variant that fails to compile or launch is never retried: that call and every
later one of the same variant run the reference, after one `KernelFallbackWarning` naming the Triton version.
"""
import os
import warnings
from typing import Optional

import torch

from .reference import gather_merge_reference
from .segments import check_layout, check_values

# calls per backend ("triton", "triton-interpret", "reference") that produced a result: lets tests check which
# path really ran
BACKEND_CALLS = dict.fromkeys(("triton", "triton-interpret", "reference"), 0)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_module = None      # the kernel module once imported, False when triton is not importable
_failed_variants = set()   # (device, launch config) whose kernel raised: they run the reference from then on


class KernelFallbackWarning(RuntimeWarning):
    """The Triton kernel failed for one configuration; the PyTorch reference computes it instead."""


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


def _reference(x, index, offsets, weight):
    BACKEND_CALLS["reference"] += 1
    return gather_merge_reference(x, index, offsets, weight)


def _kernel_or_fallback(backend, x, index, offsets, weight):
    """The Triton kernel's result, or the reference's when this variant failed (now or before)."""
    module = _kernels()
    variant = (str(x.device), module.launch_config(x.dtype, weight is not None, x.shape[2]))
    if variant in _failed_variants:
        return _reference(x, index, offsets, weight)
    try:
        result = module.gather_merge_triton(x, index, offsets, weight)
    except torch.OutOfMemoryError:
        raise   # not the kernel's fault, and the reference would need the memory too
    except Exception as error:   # noqa: BLE001 - a compiler or launch failure must never reach the user
        _failed_variants.add(variant)
        import triton
        reason = next((line for line in str(error).splitlines() if line.strip()), "")[:200]
        warnings.warn(KernelFallbackWarning(
            f"vlmeff: the Triton gather_merge kernel failed on Triton {triton.__version__} for variant {variant} "
            f"({type(error).__name__}: {reason}); this variant runs the PyTorch reference from now on (slower, "
            f"same results). `python -m vlmeff.kernels.compile_check` checks every variant on this Triton."),
            stacklevel=2)
        return _reference(x, index, offsets, weight)
    BACKEND_CALLS[backend] += 1
    return result


@torch.library.custom_op("vlmeff::gather_merge", mutates_args=())
def _gather_merge_op(x: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, weight: Optional[torch.Tensor],
                     validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if validate:
        check_values(x, index, offsets)
    backend = _backend(x)
    if backend == "reference":
        return _reference(x, index, offsets, weight)
    return _kernel_or_fallback(backend, x, index, offsets, weight)


@_gather_merge_op.register_fake
def _(x, index, offsets, weight, validate):
    # contiguous, as both real implementations return them
    B, _, D = x.shape
    K = offsets.shape[1] - 1
    return x.new_empty(B, K, D), x.new_empty(B, K, dtype=torch.float32)


def gather_merge(x, index, offsets, weight=None, validate=True):
    """Weighted segment mean of gathered rows; see `gather_merge_reference` for the contract.

    x [B, N, D], index [B, M] int64, offsets [B, K + 1] int64, weight [B, M] or None.
    Returns (out [B, K, D] in x.dtype, total_weight [B, K] float32), both contiguous. `validate=False` skips the
    value checks (and their host sync) for callers whose segments are valid by construction, e.g.
    `segments_from_assignment`; invalid indices then read out of bounds. When autograd needs gradients this runs
    the (differentiable) reference instead of the custom op.
    """
    check_layout(x, index, offsets, weight)
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        if validate:
            check_values(x, index, offsets)
        return _reference(x, index, offsets, weight)
    return torch.ops.vlmeff.gather_merge(x, index, offsets, weight, validate)
