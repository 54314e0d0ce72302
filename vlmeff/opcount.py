"""Count the aten ops that launch work (a TorchDispatchMode counter), to pin how many kernels a patch adds (tests)
and to print them next to timings (benchmarks).

Metadata-only ops (views, slices, transposes, expands, ...) launch nothing on a GPU and are left out; every other
op is counted once per call, as the GPU-path issue measured them (an unpatched timm ViT layer: about 10)."""
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode

# ops that only rewrite a tensor's metadata (no kernel launch)
METADATA_OPS = {
    "view", "_unsafe_view", "reshape", "expand", "permute", "transpose", "t", "unsqueeze", "squeeze", "slice",
    "select", "as_strided", "alias", "detach", "unbind", "split", "split_with_sizes", "chunk", "lift_fresh",
    "_reshape_alias", "unflatten", "flatten", "view_as", "expand_as", "narrow", "diagonal",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "is_same_size", "dim", "numel", "size", "stride",
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
}


def op_name(func):
    return func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: ...`; then `c.total` (ops that launch work), `c.ops` (a Counter by name) and
    `c.syncs` (reads of tensor data on the host: item / nonzero / masked_select / unique ..., copies from a device
    to the CPU, and `Tensor.tolist()` / `Tensor.numpy()`, which bypass the dispatcher and are counted by wrapping
    them while the counter is active, as "tolist" / "numpy")."""

    SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive",
                "is_nonzero", "equal", "to_host", "tolist", "numpy"}
    HOST_READS = ("tolist", "numpy")

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self._originals = {}

    def __enter__(self):
        for name in self.HOST_READS:
            original = self._originals[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                if _get_current_dispatch_mode() is not None:     # host data read with the modes disabled is not
                    self.ops[_name] += 1                          # counted (e.g. `engine.rows.row_layout`)
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)
        self._originals.clear()
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = op_name(func)
        kwargs = kwargs or {}
        if name == "_to_copy" and args[0].device.type != "cpu" and str(kwargs.get("device", "")).startswith("cpu"):
            name = "to_host"                   # a device -> CPU copy waits for the device
        if name not in METADATA_OPS:
            self.ops[name] += 1
        return func(*args, **kwargs)

    @property
    def total(self):
        """Ops that launch work (host reads of `tolist` / `numpy` are not launches)."""
        return sum(n for name, n in self.ops.items() if name not in self.HOST_READS)

    @property
    def syncs(self):
        return sum(n for name, n in self.ops.items() if name in self.SYNC_OPS)


def count_ops(fn, *args, **kwargs):
    """(result, OpCounter) of fn(*args, **kwargs) under no_grad."""
    with torch.no_grad(), OpCounter() as counter:
        out = fn(*args, **kwargs)
    return out, counter
