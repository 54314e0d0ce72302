"""Pure-PyTorch reference of the gather-and-merge op: the CPU path and the test oracle of the Triton kernel."""
import torch
from torch._subclasses.fake_tensor import is_fake


def _host_reads_are_free(t):
    """Reading t's values on the host costs nothing: a real CPU tensor, outside torch.compile tracing. On CUDA
    it would be a host synchronisation, and fake / traced tensors have no values."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling() and not is_fake(t)


def gather_merge_reference(x, index, offsets, weight=None):
    """Weighted segment mean of gathered rows.

    x: [B, N, D] tokens. index: [B, M] int64 rows of x, grouped by output token. offsets: [B, K + 1] int64,
    output token k of batch b averages rows index[b, offsets[b, k]:offsets[b, k + 1]]; entries of index past
    offsets[b, K] belong to no output (dropped tokens). weight: [B, M] per-member weights (token sizes or
    scores), or None for weight 1.
    Returns (out [B, K, D] in x.dtype, total [B, K] float32 = sum of member weights; an empty segment gives a
    zero row and total 0), both contiguous. Accumulates in float32.
    """
    B, N, D = x.shape
    K = offsets.shape[1] - 1
    if _host_reads_are_free(offsets):
        # members past offsets[:, -1] are dropped: skip them
        used = int(offsets[:, -1].max()) if offsets.numel() else 0
        index = index[:, :used]
        weight = None if weight is None else weight[:, :used]
    M = index.shape[1]
    # output slot of each member: the segment whose [start, end) holds its position; K for dropped members
    pos = torch.arange(M, device=x.device).expand(B, M)
    slot = torch.searchsorted(offsets[:, 1:].contiguous(), pos.contiguous(), right=True).clamp_max(K)
    w = torch.ones(B, M, device=x.device, dtype=torch.float32) if weight is None else weight.float()
    # whole-row index_select / index_add_ over flattened batches: one index per row, where gather / scatter_add_
    # with an index expanded over D read one per element (5-20x slower on CPU). index_add_ on CPU adds in index
    # order, so members are summed in order, as the Triton kernel does.
    batch = torch.arange(B, device=x.device)[:, None]
    rows = x.reshape(B * N, D).index_select(0, (index + batch * N).flatten()).float() * w.reshape(B * M, 1)
    out = torch.zeros(B * (K + 1), D, device=x.device, dtype=torch.float32)
    out.index_add_(0, (slot + batch * (K + 1)).flatten(), rows)
    total = torch.zeros(B, K + 1, device=x.device, dtype=torch.float32).scatter_add_(1, slot, w)
    # slot K collected the dropped members. The division writes a fresh contiguous out; total is copied out of
    # its [B, K + 1] buffer, so both match the custom op's fake (contiguous) outputs under torch.compile
    out, total = out.view(B, K + 1, D)[:, :K], total[:, :K].contiguous()
    out = out / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    return out.to(x.dtype), total
