"""Count the aten ops that launch work (a TorchDispatchMode counter), to pin how many kernels a patch adds (tests)
and to print them next to timings (benchmarks).

Metadata-only ops (views, slices, transposes, expands, ...) launch nothing on a GPU and are left out; every other
op is counted once per call, as the GPU-path issue measured them (an unpatched timm ViT layer: about 10)."""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# ops that only rewrite a tensor's metadata (no kernel launch)
METADATA_OPS = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "slice",
    "select", "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "chunk", "lift_fresh",
    "_reshape_alias", "unflatten", "flatten", "view_as", "expand_as", "narrow", "diagonal", "_to_copy_noop",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "dim", "numel", "size", "stride",
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "split_with_sizes_copy_noop",
}


def op_name(func):
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: ...`; then `c.total` (ops that launch work), `c.ops` (a Counter by name) and
    `c.syncs` (ops that read tensor data on the host: item / nonzero / masked_select / unique ...)."""

    SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                "is_nonzero", "equal"}

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        if name not in METADATA_OPS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self):
        return sum(self.ops.values())

    @property
    def syncs(self):
        return sum(n for name, n in self.ops.items() if name in self.SYNC_OPS)


def count_ops(fn, *args, **kwargs):
    """(result, OpCounter) of fn(*args, **kwargs) under no_grad."""
    with torch.no_grad(), OpCounter() as counter:
        out = fn(*args, **kwargs)
    return out, counter
