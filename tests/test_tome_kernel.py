"""ToMe's fused merge (`kernels.tome_merge`: Triton kernel, run by the interpreter on CPU; see conftest.py) against
a loop oracle written from ToMe's definition and against the PyTorch reference; its custom op under
torch.compile and opcheck, its gradients, its run-time fallback, its launcher's shapes-only grid and its sm90 PTX."""
import re
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernel_checks import break_kernel, sm90_ptx
from vlmeff import kernels
from vlmeff.kernels import KernelFallbackWarning, dispatch, tome_merge
from vlmeff.kernels.reference import tome_merge_reference
from vlmeff.pruners.tome import bipartite_soft_matching

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_interpreter = pytest.mark.skipif(dispatch._backend(torch.empty(0)) != "triton-interpret",
                                       reason="TRITON_INTERPRET=1 was not set before the kernel import")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def loop_oracle(x, sizes, unm, src, dst, protected):
    """ToMe's merge from its definition, one output token at a time, in float64: positions 0..protected-1 are
    kept as they are; the unprotected even positions form set a and the unprotected odd ones set b (ToMe splits
    the whole sequence by parity and keeps the prefix out of the matching); a-token unm[i] stays; a-token src[j]
    joins b-token dst[j]; a b-token becomes the size-weighted mean of itself and the a-tokens that joined it.
    Output order: protected, unm, b.
    Returns (out, sizes', log(sizes')) float64."""
    B, N, D = x.shape
    w = torch.ones(B, N, dtype=torch.float64) if sizes is None else sizes.double()
    a_pos = [p for p in range(protected, N) if p % 2 == 0]
    b_pos = [p for p in range(protected, N) if p % 2 == 1]
    outs, totals = [], []
    for b in range(B):
        groups = [[p] for p in range(protected)] + [[a_pos[int(i)]] for i in unm[b]]
        joined = {j: [a_pos[int(s)] for s, d in zip(src[b], dst[b]) if int(d) == j] for j in range(len(b_pos))}
        groups += [[b_pos[j]] + joined[j] for j in range(len(b_pos))]
        for members in groups:
            weight = w[b, members]
            outs.append((x[b, members].double() * weight[:, None]).sum(0) / weight.sum())
            totals.append(weight.sum())
    out, total = torch.stack(outs).view(B, -1, D), torch.stack(totals).view(B, -1)
    return out, total, total.log()


def matching_case(B, N, D, r, protected, dtype, sized=True, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(device, dtype)
    metric = torch.randn(B, N, 6, generator=g).to(device)
    sizes = torch.randint(1, 5, (B, N), generator=g).to(device, dtype) if sized else None
    return (x, sizes) + bipartite_soft_matching(metric, r, protected)


def check_against_oracle(case, protected, rtol):
    before = dict(kernels.BACKEND_CALLS)
    out, sizes, log = tome_merge(*case, protected, with_log=True)
    oracle = loop_oracle(*case, protected)
    x = case[0]
    for got, want in zip((out, sizes, log), oracle):
        assert got.dtype == x.dtype and got.is_contiguous()
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol)
    return {k: kernels.BACKEND_CALLS[k] - before[k] for k in before}


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 67, 300])
@pytest.mark.parametrize("protected", [0, 1, 2, 5])
@pytest.mark.parametrize("sized", [False, True])
def test_kernel_matches_loop_oracle(dtype, D, protected, sized):
    # r = 21 merges: two chunks of BLOCK_R = 16, the second one partial; N odd and even around the prefix
    for N, r in ((50, 21), (33, 3)):
        case = matching_case(3, N, D, r, protected, dtype, sized, seed=N + D)
        ran = check_against_oracle(case, protected, 1e-6 if dtype == torch.float32 else 1e-2)
        assert ran["triton-interpret"] == 1 and ran["reference"] == 0     # the kernel ran, not the reference


@needs_interpreter
def test_kernel_tiles_rows_past_one_program():
    # D = 300: 16-row tiles, so unmerged a rows, the a / b boundary and b rows fall in different programs
    case = matching_case(2, 197, 300, 60, 1, torch.float32, seed=3)
    check_against_oracle(case, 1, 1e-6)


def test_reference_matches_loop_oracle():
    for sized in (False, True):
        case = matching_case(2, 41, 7, 12, 1, torch.float64, sized)
        for got, want in zip(tome_merge_reference(*case, 1, True), loop_oracle(*case, 1)):
            torch.testing.assert_close(got, want)
    assert tome_merge_reference(*case, 1, False)[2].shape == (2, 0)


@needs_interpreter
def test_without_log_writes_no_log():
    case = matching_case(2, 20, 8, 4, 1, torch.float32)
    out, sizes, log = tome_merge(*case, 1)
    assert log.shape == (2, 0)
    torch.testing.assert_close(out.double(), loop_oracle(*case, 1)[0], rtol=1e-6, atol=1e-6)


def test_float64_runs_the_reference():
    case = matching_case(2, 20, 8, 4, 1, torch.float64)
    assert check_against_oracle(case, 1, 1e-12)["reference"] == 1


def test_gradients_match_loop_oracle():
    # the custom op has no backward: with gradients required tome_merge runs the differentiable reference
    x, sizes, unm, src, dst = matching_case(2, 15, 4, 5, 1, torch.float64)
    cotangents = [torch.randn(2, 10, 4, dtype=torch.float64), torch.randn(2, 10, dtype=torch.float64)]
    grads = []
    for fn in (lambda *a: tome_merge(*a, 1, True), lambda *a: loop_oracle(*a, 1)):
        xg, sg = x.clone().requires_grad_(True), sizes.clone().requires_grad_(True)
        out, total, _ = fn(xg, sg, unm, src, dst)
        ((out * cotangents[0]).sum() + (total * cotangents[1]).sum()).backward()
        grads.append((xg.grad, sg.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)
    assert grads[0][1].abs().sum() > 0


COMPILE_BACKENDS = ["reference", pytest.param("triton-interpret", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_custom_op_under_compile_and_opcheck(monkeypatch, backend):
    monkeypatch.setattr(dispatch, "_backend", lambda x: backend)
    case = matching_case(2, 24, 8, 7, 1, torch.float32)
    compiled = torch.compile(lambda x, *rest: tome_merge(x * 2, *rest, 1, True), fullgraph=True)
    before = kernels.BACKEND_CALLS[backend]
    got = compiled(*case)
    assert kernels.BACKEND_CALLS[backend] == before + 1    # the op's implementation ran inside the compiled graph
    for g, want in zip(got, loop_oracle(case[0] * 2, *case[1:], 1)):
        torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=1e-6)
        assert g.is_contiguous()
    for sized, with_log in ((False, False), (True, True)):
        x, sizes, unm, src, dst = matching_case(2, 12, 5, 3, 1, torch.float32, sized)
        torch.library.opcheck(torch.ops.vlmeff.tome_merge.default, (x, sizes, unm, src, dst, 1, with_log))


@needs_interpreter
def test_compile_failure_falls_back_to_reference_with_one_warning(monkeypatch):
    from vlmeff.kernels import triton_tome_merge as module
    import triton
    launches = break_kernel(monkeypatch, module, "_tome_merge_kernel", "BLOCK_D")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            ran = check_against_oracle(matching_case(2, 30, 300, 7, 1, torch.float32, seed=seed), 1, 1e-6)
            assert ran["reference"] == 1
    fallbacks = [w for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    assert "tome_merge" in message and f"Triton {triton.__version__}" in message and "PassManager" in message
    assert "('fp32', 16, 256)" in message
    assert launches == [256]        # the failed variant is not retried


@needs_interpreter
@pytest.mark.parametrize("D", [3, 67, 300, 4096])
def test_launcher_reads_no_tensor_data_and_launches_its_variant(monkeypatch, D):
    from vlmeff.kernels import triton_tome_merge as module
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, args, meta))

    monkeypatch.setattr(module, "_tome_merge_kernel", Recorder())
    with FakeTensorMode():       # any host read of a value raises
        x, sizes = torch.empty(2, 51, D, dtype=torch.bfloat16), torch.empty(2, 51, dtype=torch.bfloat16)
        unm, src, dst = (torch.empty(2, n, dtype=torch.long) for n in (5, 20, 20))
        out, new_sizes, log = module.tome_merge_triton(x, sizes, unm, src, dst, 1, True)
    assert out.shape == (2, 31, D) and new_sizes.shape == log.shape == (2, 31)
    (grid, args, meta), = launched
    assert ("bf16", meta["BLOCK_K"], meta["BLOCK_D"]) == module.launch_config(torch.bfloat16, D)
    assert grid == (-(-31 // meta["BLOCK_K"]), -(-D // meta["BLOCK_D"]), 2)
    # N_OUT, U, R, D, P, A_START, B_START, HAS_SIZES, WRITE_LOG
    assert args[8:17] == (31, 5, 20, D, 1, 2, 1, 1, 1)


def test_launch_configs_are_exactly_the_launchers_choices():
    from vlmeff.kernels import triton_gather_merge, triton_tome_merge as module
    chosen = {module.launch_config(dtype, D) for dtype in DTYPES for D in range(0, 5000)}
    assert chosen == set(module.launch_configs()) and len(chosen) == 12
    assert all(block_k * block_d == triton_gather_merge.TILE_ELEMENTS for _, block_k, block_d in chosen)


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_matches_reference(dtype):
    before = kernels.BACKEND_CALLS["triton"]
    for D, r in ((67, 8), (768, 98)):
        case = matching_case(8, 197, D, r, 1, dtype, device="cuda")
        got, want = tome_merge(*case, 1, True), tome_merge_reference(*case, 1, True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6 if dtype == torch.float32 else 1e-2,
                                       atol=1e-6 if dtype == torch.float32 else 1e-2)
    assert kernels.BACKEND_CALLS["triton"] == before + 2


@pytest.mark.parametrize("dtype,vectors", [("bf16", 4), ("fp32", 8)])
def test_kernel_compiles_for_sm90_with_16_byte_accesses(dtype, vectors):
    # the 16 x 256 tile's own rows and the merged rows move as 16-byte vectors (4 loads and 4 stores per thread in
    # bf16, 8 in fp32), the division is IEEE, and the merged rows add up in fp32 FMAs (IEEE dot, no TF32 mma)
    pytest.importorskip("triton")
    ptx = sm90_ptx("tome_merge", (dtype, 16, 256))
    assert len(re.findall(r"ld\.global\S*\.v4", ptx)) == vectors
    assert len(re.findall(r"st\.global\S*\.v4", ptx)) == vectors
    assert "div.rn.f32" in ptx and "mma" not in ptx and len(re.findall(r"fma\.rn\.f32", ptx)) == 512
