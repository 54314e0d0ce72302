"""Tensors that depend only on a layout (index ranges, pool cells, a seeded draw), built once per device.

Rebuilding them every forward costs launches (and a host-to-device copy would be a sync); a cached tensor costs
nothing. While torch.compile traces, or under fake tensors, they are built in place instead: the graph then holds
the (constant-foldable) ops, and no fake tensor ever enters the cache.
"""
import torch
from torch._subclasses.fake_tensor import FakeTensor

_CACHE = {}
_MAX_ENTRIES = 512     # layouts seen by one process are few; the cap only bounds pathological use


def layout_constant(key, like, build):
    """build() -> a tensor (or tuple of tensors) on like.device, made once per (key, device); `key` must name
    everything the result depends on besides the device."""
    if torch.compiler.is_compiling() or isinstance(like, FakeTensor):
        return build()
    entry = _CACHE.get((key, like.device))
    if entry is None:
        # built outside inference mode: an inference tensor in the cache would break later autograd forwards
        with torch.inference_mode(False):
            entry = build()
        if any(isinstance(t, FakeTensor) for t in (entry if isinstance(entry, tuple) else (entry,))):
            return entry       # built under a FakeTensorMode with real inputs: never cache it
        if len(_CACHE) >= _MAX_ENTRIES:
            _CACHE.clear()
        _CACHE[(key, like.device)] = entry
    return entry


def slot_ranges(batch, n, like):
    """[batch, n] int64 contiguous on like.device: 0 .. n - 1 on every row (slot ids, segment bounds)."""
    return layout_constant(("slots", batch, n), like,
                           lambda: torch.arange(n, device=like.device).expand(batch, n).contiguous())


def to_device(t, device):
    """A host tensor on device, without a stream sync on CUDA (pinned, non-blocking copy)."""
    device = torch.device(device)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
