"""Which implementation runs a `gather_merge` / `tome_merge` / `nearest_kept` call, as the custom ops
`vlmeff::gather_merge`, `vlmeff::tome_merge` and `vlmeff::nearest_kept` (opaque to torch.compile).

CUDA tensors run the fused Triton kernels; CPU tensors run them in Triton's interpreter when TRITON_INTERPRET=1 was
set before `triton_gather_merge` was imported (lazily, by the first call that may use it; tests set it in
conftest.py), else the PyTorch reference; without triton everything runs the reference. Autograd runs the
(differentiable) reference. A kernel variant that fails to compile or launch is never retried: that call and every
later one of the same variant run the reference, after one `KernelFallbackWarning` naming the Triton version.
"""
import importlib
import os
import warnings
from typing import Optional

import torch

from .reference import gather_merge_reference, nearest_kept_reference, tome_merge_reference
from .segments import check_layout, check_values

# calls per backend ("triton", "triton-interpret", "reference") that produced a result: lets tests check which
# path really ran
BACKEND_CALLS = dict.fromkeys(("triton", "triton-interpret", "reference"), 0)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_triton_modules = {}       # kernel module name -> the module once imported, False when triton is not importable
_failed_variants = set()   # (kernel, device, launch config) whose kernel raised: they run the reference from then on


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel failed for one configuration; the PyTorch reference computes it instead."""


def _kernels(name="triton_gather_merge"):
    """The kernel module `name` of this package, imported on first use (triton reads TRITON_INTERPRET then)."""
    if name not in _triton_modules:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ImportError:
            module = False
        _triton_modules[name] = module
    return _triton_modules[name]


def _backend(x):
    """Which path runs x: "triton", "triton-interpret" or "reference". Imports triton only where it may be used."""
    if x.dtype not in _TRITON_DTYPES:
        return "reference"
    if x.is_cuda:
        module = _kernels()
        return ("triton-interpret" if module.INTERPRET else "triton") if module else "reference"
    if x.device.type == "cpu" and (_triton_modules.get("triton_gather_merge")
                                   or os.environ.get("TRITON_INTERPRET") == "1"):
        module = _kernels()
        return "triton-interpret" if module and module.INTERPRET else "reference"
    return "reference"


def _counted_reference(reference, *args):
    BACKEND_CALLS["reference"] += 1
    return reference(*args)


def _kernel_or_fallback(backend, kernel, config, launch, reference, args):
    """launch(*args) of the Triton kernel module `kernel` in variant `config`, or reference(*args) when this
    variant failed (now or before)."""
    variant = (kernel, str(args[0].device), config)
    if variant in _failed_variants:
        return _counted_reference(reference, *args)
    try:
        result = launch(*args)
    except torch.OutOfMemoryError:
        raise   # not the kernel's fault, and the reference would need the memory too
    except Exception as error:   # noqa: BLE001 - a compiler or launch failure must never reach the user
        _failed_variants.add(variant)
        import triton
        reason = next((line for line in str(error).splitlines() if line.strip()), "")[:200]
        warnings.warn(KernelFallbackWarning(
            f"vlmeff: the Triton kernel {kernel} failed on Triton {triton.__version__} for variant {variant[1:]} "
            f"({type(error).__name__}: {reason}); this variant runs the PyTorch reference from now on (slower, "
            f"same results). `python -m vlmeff.kernels.compile_check` checks every variant on this Triton."),
            stacklevel=3)
        return _counted_reference(reference, *args)
    BACKEND_CALLS[backend] += 1
    return result


@torch.library.custom_op("vlmeff::gather_merge", mutates_args=())
def _gather_merge_op(x: torch.Tensor, index: torch.Tensor, offsets: torch.Tensor, weight: Optional[torch.Tensor],
                     validate: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if validate:
        check_values(x, index, offsets)
    backend = _backend(x)
    args = (x, index, offsets, weight)
    if backend == "reference":
        return _counted_reference(gather_merge_reference, *args)
    module = _kernels()
    return _kernel_or_fallback(backend, "gather_merge", module.launch_config(x.dtype, weight is not None, x.shape[2]),
                               module.gather_merge_triton, gather_merge_reference, args)


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
        return _counted_reference(gather_merge_reference, x, index, offsets, weight)
    return torch.ops.vlmeff.gather_merge(x, index, offsets, weight, validate)


@torch.library.custom_op("vlmeff::tome_merge", mutates_args=())
def _tome_merge_op(x: torch.Tensor, sizes: Optional[torch.Tensor], unm: torch.Tensor, src: torch.Tensor,
                   dst: torch.Tensor, protected: int,
                   with_log: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = _backend(x)
    args = (x, sizes, unm, src, dst, protected, with_log)
    if backend == "reference":
        return _counted_reference(tome_merge_reference, *args)
    module = _kernels("triton_tome_merge")
    return _kernel_or_fallback(backend, "tome_merge", module.launch_config(x.dtype, x.shape[2]),
                               module.tome_merge_triton, tome_merge_reference, args)


@_tome_merge_op.register_fake
def _(x, sizes, unm, src, dst, protected, with_log):
    # contiguous, as both real implementations return them
    B, N, D = x.shape
    n_out = N - src.shape[1]
    return x.new_empty(B, n_out, D), x.new_empty(B, n_out), x.new_empty(B, n_out if with_log else 0)


def tome_merge(x, sizes, unm, src, dst, protected, with_log=False):
    """ToMe's size-weighted merge in one fused launch on CUDA; see `tome_merge_reference` for the contract.

    x [B, N, D], sizes [B, N] in x's dtype or None, unm [B, U], src / dst [B, r] int64 indices into ToMe's a / b
    sets. Returns (x' [B, N - r, D], sizes' [B, N - r], log(sizes') [B, N - r] or [B, 0] without with_log), in
    x's dtype. When autograd needs gradients this runs the (differentiable) reference instead of the custom op.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (sizes is not None and sizes.requires_grad)):
        return _counted_reference(tome_merge_reference, x, sizes, unm, src, dst, protected, with_log)
    return torch.ops.vlmeff.tome_merge(x, sizes, unm, src, dst, protected, with_log)


@torch.library.custom_op("vlmeff::nearest_kept", mutates_args=())
def _nearest_kept_op(metric: torch.Tensor, keep_idx: torch.Tensor, fixed: int,
                     targets: Optional[torch.Tensor]) -> torch.Tensor:
    args = (metric, keep_idx, fixed, targets)
    module = _kernels("triton_nearest_kept")
    # the kernel holds a metric row in registers: wider metrics run the reference
    backend = _backend(metric) if module and module.supports(metric.shape[-1]) else "reference"
    if backend == "reference":
        return _counted_reference(nearest_kept_reference, *args)
    return _kernel_or_fallback(backend, "nearest_kept", module.launch_config(metric.shape[-1]),
                               module.nearest_kept_triton, nearest_kept_reference, args)


@_nearest_kept_op.register_fake
def _(metric, keep_idx, fixed, targets):
    return keep_idx.new_empty(metric.shape[:2])


def nearest_kept(metric, keep_idx, fixed=0, targets=None):
    """Each token's slot when every token merges into its most similar kept token, one fused launch on CUDA; see
    `nearest_kept_reference`. metric [B, N, C] (float32 in the kernel), keep_idx [B, K] int64, targets [B, K] bool
    or None. Returns dst [B, N] int64."""
    return torch.ops.vlmeff.nearest_kept(metric.float(), keep_idx, fixed, targets)
