"""Pure-PyTorch references of the fused ops (gather-and-merge, ToMe's merge): their CPU path and the test oracles
of the Triton kernels."""
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import is_fake

from ..layout import slot_ranges


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


def tome_sets(t, protected):
    """(a, b) views of t [B, N, ...]: ToMe's alternating sets, the unprotected even and odd positions (the first
    `protected` positions are in neither)."""
    a_start, b_start = 2 * ((protected + 1) // 2), 2 * (protected // 2) + 1
    return t[:, a_start::2], t[:, b_start::2]


def tome_merge_reference(x, sizes, unm, src, dst, protected, with_log):
    """ToMe's size-weighted merge: the reference of the fused kernel (`triton_tome_merge`), as ToMe writes it.

    x: [B, N, D]; sizes: [B, N] patches each token stands for, in x's dtype (None: all 1); unm [B, U], src and
    dst [B, r]: indices into the unprotected a / b sets (`tome_sets`) of the a-tokens that stay, the a-tokens
    merged away and the b-token each joins. Each b-token becomes the size-weighted mean of itself and the
    a-tokens merged into it. Returns (x' [B, N - r, D], sizes' [B, N - r], log(sizes') [B, N - r], or [B, 0]
    without with_log), in x's dtype, in ToMe's order [protected, unmerged a, b]. Sizes ride along as an extra
    channel so that one gather / scatter moves both.
    """
    xs = F.pad(x, (0, 1), value=1.0) if sizes is None else torch.cat([x * sizes[..., None], sizes[..., None]], -1)
    a, b = tome_sets(xs, protected)

    def rows(idx):
        return idx[..., None].expand(-1, -1, xs.shape[-1])
    b = b.scatter_add(1, rows(dst), a.gather(1, rows(src)))
    out = torch.cat([xs[:, :protected], a.gather(1, rows(unm)), b], dim=1)
    merged_sizes = out[..., -1]
    log = merged_sizes.log() if with_log else merged_sizes.new_empty(out.shape[0], 0)
    return out[..., :-1] / out[..., -1:], merged_sizes.contiguous(), log


def nearest_kept_reference(metric, keep_idx, fixed, targets):
    """Each token's output slot when every token merges into its most similar kept token: the reference of the
    fused kernel (`triton_nearest_kept`).

    metric: [B, N, C]; keep_idx: [B, K] int64 the kept tokens, the first `fixed` of them a protected prefix that
    receives nothing; targets: [B, K] bool, False for kept tokens that receive nothing (row separators), or None.
    Similarity: cosine of `metric` rows (the source row left unnormalised: a positive factor per row, which the
    argmax does not see); the first slot wins ties. Returns dst [B, N] int64: kept token k keeps slot k, every other
    token the slot of its nearest receiving kept token.
    """
    C = metric.shape[-1]
    metric = metric.float()
    receivers = keep_idx[:, fixed:]
    candidates = F.normalize(metric.gather(1, receivers[..., None].expand(-1, -1, C)), dim=-1)
    sim = metric @ candidates.transpose(1, 2)                                    # [B, N, K - fixed]
    if targets is not None:
        sim = sim.masked_fill(~targets[:, None, fixed:], float("-inf"))
    nearest = sim.argmax(dim=-1)
    if fixed:
        nearest = nearest + fixed
    return nearest.scatter(1, keep_idx, slot_ranges(1, keep_idx.shape[1], keep_idx).expand_as(keep_idx))
