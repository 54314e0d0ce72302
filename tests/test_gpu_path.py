"""The GPU path of the one-shot methods (cls, received, random, pool, reduce="merge") on ViTs and towers, checked
on a CPU: fullgraph torch.compile equals eager, fake tensors run through, no host sync, and launch counts pinned."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import vlmeff
from models import images, run, tiny_clip, tiny_dinov2, tiny_siglip, tiny_timm_vit
from opcount import OpCounter, count_ops
from vlmeff.engine.rows import reduce_rows
from vlmeff.kernels.attention_rows import attention_rows
from vlmeff.pruners import cls_attention, merge_into_kept, received_attention

MODELS = {"timm": tiny_timm_vit, "timm-reg": lambda: tiny_timm_vit(reg_tokens=2, qk_norm=True), "clip": tiny_clip,
          "dinov2": tiny_dinov2, "siglip": tiny_siglip}
METHODS = {"cls": dict(keep=16), "cls-merge": dict(keep=16, reduce="merge"), "received": dict(keep=12),
           "received-merge": dict(keep=12, reduce="merge", layer=2), "random": dict(keep=10),
           "random-merge": dict(keep=10, reduce="merge"), "pool": dict(keep=16), "cls-last": dict(keep=8, layer=-1)}


def cases(models, methods):
    return [(m, k) for m in models for k in methods if not (k.startswith("cls") and m == "siglip")]


def patch(model, case):
    return vlmeff.patch(model, method=case.split("-")[0], **METHODS[case])


@pytest.mark.parametrize("name,case", cases(["timm"], ["cls", "cls-merge", "received", "random", "pool", "cls-last"])
                         + [("clip", "received-merge"), ("dinov2", "pool"), ("siglip", "received"),
                            ("timm-reg", "cls-merge")])
def test_fullgraph_compile_equals_eager(name, case):
    model, x = MODELS[name](), images()
    h = patch(model, case)
    eager = run(model, x)
    eager_stats = h.stats["visual_tokens"]
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")   # fullgraph: a graph break raises
    assert torch.equal(run(compiled, x), eager)
    assert h.stats["visual_tokens"] == eager_stats


@pytest.mark.parametrize("name,case", cases(MODELS, METHODS))
def test_runs_under_fake_tensors(name, case):
    model = MODELS[name]()
    h = patch(model, case)
    expected = run(model, images()).shape
    with FakeTensorMode(allow_non_fake_inputs=True):
        out = run(model, torch.empty(2, 3, 32, 32))        # any data read (item, nonzero, bool(t)) would raise
    assert out.shape == expected
    assert list(h.stats["visual_tokens"].values())[-1] == [METHODS[case]["keep"]] * 2


def added_ops(model, x, **kwargs):
    """Ops a patch adds to a warm forward (layout constants are built by the first call), and its host syncs."""
    _, base = count_ops(model, x)
    with vlmeff.patch(model, **kwargs) as h:
        model(x)
        _, patched = count_ops(model, x)
    return patched.total - base.total, patched.syncs, h


# launches added to tiny_timm_vit's forward before this rewrite (same counter), each with 2 nonzero syncs: cls 32,
# received 36, random 26, pool 37, cls + merge 45, cls at full budget 32
@pytest.mark.parametrize("kwargs,launches", [
    (dict(method="cls", keep=16), 9),          # [CLS] row 4, pad + topk + sort, gather, kept indices for stats
    (dict(method="received", keep=16), 10),    # as cls, with q and k copied for the batched matmul
    (dict(method="random", keep=16), 2),       # rows are a layout constant: gather + kept indices
    (dict(method="pool", keep=16), 1),         # segments are a layout constant: one gather_merge
    # cls + metric mean + the fused nearest-kept assignment (1, was 8) + segments (2) + gather_merge; was 20
    (dict(method="cls", keep=16, reduce="merge"), 13),
    (dict(method="cls", keep=1.0), 0), (dict(method="received", keep=64), 0), (dict(method="pool", keep=64), 0),
])
def test_launch_counts_are_pinned_and_there_is_no_sync(kwargs, launches):
    added, syncs, _ = added_ops(tiny_timm_vit(), images(), **kwargs)
    assert (added, syncs) == (launches, 0)


@pytest.mark.parametrize("make", [tiny_clip, tiny_dinov2])
def test_towers_add_the_same_launches(make):
    assert added_ops(make(), images(), method="cls", keep=16)[:2] == (9, 0)
    assert added_ops(make(), images(), method="received", keep=16)[:2] == (10, 0)


def test_full_budget_computes_no_scores_and_reduced_forward_records_them():
    model = tiny_timm_vit()
    _, _, h = added_ops(model, images(), method="cls", keep=1.0)
    assert "scores" not in h.stats and "kept" not in h.stats
    _, _, h = added_ops(model, images(), method="cls", keep=16)
    assert h.stats["scores"].shape == (2, 64) and h.stats["kept"].shape == (2, 16)


def test_attention_rows_is_four_launches_for_one_row():
    q = torch.randn(2, 4, 1, 8)
    k = torch.randn(2, 30, 2, 8).transpose(1, 2)     # heads side by side per token, as a k projection writes them
    probs, counter = count_ops(attention_rows, q, k, 0.3)
    assert counter.total == 4 and counter.syncs == 0 and probs.shape == (2, 1, 30)


def lvlm_like_inputs(n=3, N=20, D=6):
    """Feature blocks with protected rows that are not a prefix (LLaVA-NeXT's newline rows), scores, metric."""
    g = torch.Generator().manual_seed(0)
    x, scores, metric = (torch.randn(n, N, D, generator=g), torch.rand(n, N, generator=g),
                         torch.randn(n, N, 4, generator=g))
    protected = torch.zeros(N, dtype=torch.bool)
    protected[[4, 9, 14, 19]] = True
    return x, scores, metric, protected


@pytest.mark.parametrize("method,options,grids", [
    ("cls", dict(reduce="drop"), None), ("cls", dict(reduce="merge"), None), ("random", dict(seed=3), None),
    ("random", dict(seed=3, reduce="merge"), None), ("pool", {}, ((4, 4),)), ("divprune", {}, None),
    ("cdpruner", {}, None), ("vispruner", dict(important_ratio=0.5, step=8), None)])
def test_lvlm_reduction_reads_no_device_data(method, options, grids):
    x, scores, metric, protected = lvlm_like_inputs()
    args = (method, options, x, 6, protected, scores, metric, grids)
    reduce_rows(*args)                                    # warm: layout constants
    with torch.no_grad(), OpCounter() as counter:
        out, _, rows = reduce_rows(*args)
    assert counter.syncs == 0 and out.shape == (3, 4 + 6, 6)
    assert protected[rows].sum(dim=1).tolist() == [4, 4, 4]          # every protected row kept
    with FakeTensorMode(allow_non_fake_inputs=True):   # the CPU protected mask stays a real host tensor
        fake = reduce_rows(method, options, torch.empty(3, 20, 6), 6, protected, torch.empty(3, 20),
                           torch.empty(3, 20, 4), grids)[0]
    assert fake.shape == out.shape


def test_scorers_and_merge_read_no_device_data():
    q, k, x, metric = torch.randn(2, 4, 12, 8), torch.randn(2, 4, 12, 8), torch.randn(2, 12, 5), torch.randn(2, 12, 3)
    keep = torch.tensor([[0, 3, 7], [1, 2, 11]])
    with torch.no_grad(), OpCounter() as counter:
        cls_attention(q[:, :, :1], k, 0.3), received_attention(q, k, 0.3, chunk=5)
        merge_into_kept(x, keep, metric, fixed=1)
    assert counter.syncs == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["cls", "cls-merge", "received", "random", "pool"])
def test_cuda_forward_never_syncs(case):
    model, x = tiny_timm_vit().cuda(), images().cuda()
    with patch(model, case):
        run(model, x)                                     # warm: layout constants, kernel compilation
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            run(model, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", ["cls", "cls-merge", "received", "random", "pool", "tome"])
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_cuda_compile_and_cuda_graphs_equal_eager(case, mode):
    """The routes README recommends for speed: torch.compile (inductor) and CUDA graphs ("reduce-overhead")."""
    model, x = tiny_timm_vit().cuda(), images(8).cuda()
    with (vlmeff.patch(model, method="tome", r=4) if case == "tome" else patch(model, case)) as h:
        eager = run(model, x)
        eager_stats = h.stats["visual_tokens"]
        torch._dynamo.reset()
        compiled = torch.compile(model, mode=mode, fullgraph=True)
        for _ in range(3):                               # warm-up runs, then the recorded graph replays
            out = run(compiled, x.clone())
        torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-4)
        assert h.stats["visual_tokens"] == eager_stats


def test_layout_constants_built_under_inference_mode_still_serve_autograd():
    """A cached layout tensor (here `random`'s rows) first built under torch.inference_mode() must not be an
    inference tensor: a later forward that autograd records saves it for backward."""
    model, x = tiny_timm_vit(), images()
    with vlmeff.patch(model, method="random", keep=5, seed=123):
        with torch.inference_mode():
            run(model, x)
        model(x).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None


def test_op_counter_sees_host_reads_that_bypass_the_dispatcher():
    t = torch.arange(4)
    with OpCounter() as counter:
        t.tolist(), t.numpy(), (t + 1).sum().item()
    assert counter.syncs == 3 and counter.total == 3            # tolist, numpy, item; add and sum launch
    assert torch.Tensor.tolist is not None and "counted" not in repr(torch.Tensor.tolist)   # restored
