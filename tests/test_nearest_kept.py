"""The fused nearest-kept assignment (`kernels.nearest_kept`: Triton kernel, run by the interpreter on CPU; see
conftest.py) against a loop oracle and the PyTorch reference; ties, zero rows, masks and prefixes; its custom op
under torch.compile and opcheck, its run-time fallback and its launcher's shapes-only grid."""
import math
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from kernel_checks import break_kernel
from vlmeff import kernels
from vlmeff.kernels import KernelFallbackWarning, dispatch, nearest_kept
from vlmeff.kernels.reference import nearest_kept_reference

needs_interpreter = pytest.mark.skipif(dispatch._backend(torch.empty(0)) != "triton-interpret",
                                       reason="TRITON_INTERPRET=1 was not set before the kernel import")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def loop_oracle(metric, keep_idx, fixed, targets):
    """From the definition, one token at a time in float64: kept token k keeps slot k; any other token goes to the
    receiving slot (k >= fixed, targets[k] when given) whose kept token's metric row has the largest cosine with
    its own, the first such slot on ties (a zero row has cosine 0 with everything); with no receiving slot, slot
    `fixed`."""
    B, N, _ = metric.shape
    K = keep_idx.shape[1]
    m = metric.double()
    dst = torch.empty(B, N, dtype=torch.long)
    for b in range(B):
        kept = {int(t): k for k, t in enumerate(keep_idx[b])}
        for n in range(N):
            if n in kept:
                dst[b, n] = kept[n]
                continue
            best, best_slot = -math.inf, fixed
            for k in range(fixed, K):
                if targets is not None and not targets[b, k]:
                    continue
                c = m[b, int(keep_idx[b, k])]
                cosine = float(m[b, n] @ c) / max(float(c.norm()), 1e-12)   # the source norm: a positive factor
                if cosine > best:
                    best, best_slot = cosine, k
            dst[b, n] = best_slot
    return dst


def random_case(B, N, K, C, fixed=0, masked=False, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(B, N, C, generator=g)
    # the protected prefix (positions 0 .. fixed-1) first, then sorted picks, as the selections order them
    keep = torch.stack([torch.cat([torch.arange(fixed), (torch.randperm(N - fixed, generator=g)[:K - fixed] + fixed)
                                   .sort().values]) for _ in range(B)])
    targets = (torch.rand(B, K, generator=g) > 0.3) if masked else None
    return metric.to(device), keep.to(device), fixed, None if targets is None else targets.to(device)


def check(case):
    before = dict(kernels.BACKEND_CALLS)
    dst = nearest_kept(*case)
    assert dst.dtype == torch.long and torch.equal(dst.cpu(), loop_oracle(*(t.cpu() if torch.is_tensor(t) else t
                                                                           for t in case)))
    return {k: kernels.BACKEND_CALLS[k] - before[k] for k in before}


@needs_interpreter
@pytest.mark.parametrize("C", [3, 16, 64, 100, 256])
@pytest.mark.parametrize("fixed", [0, 1, 3])
@pytest.mark.parametrize("masked", [False, True])
def test_kernel_matches_loop_oracle(C, fixed, masked):
    # K = 40: two or more chunks of kept tokens for every tile shape (BLOCK_J 16 .. 128 -> K spans 1-3 chunks)
    ran = check(random_case(3, 150, 40, C, fixed, masked, seed=C + fixed))
    assert ran["triton-interpret"] == 1 and ran["reference"] == 0


@needs_interpreter
def test_ties_go_to_the_first_slot_across_chunks_and_zero_rows_score_zero():
    # kept tokens 2 and 40 (slots 1 and 20: different chunks at BLOCK_J = 16) have the same row; token 5 is
    # closest to both: the first slot wins. A zero kept row scores 0, below any positive cosine
    metric, keep, fixed, targets = random_case(1, 60, 24, 200, seed=1)    # BLOCK_C 256: BLOCK_J 16
    keep = torch.arange(0, 48, 2)[None]
    metric[0, keep[0, 20]] = metric[0, keep[0, 1]]
    metric[0, 5] = metric[0, keep[0, 1]] + 0.01 * torch.randn(200)
    metric[0, keep[0, 7]] = 0
    case = (metric, keep, 0, None)
    dst = nearest_kept(*case)
    assert dst[0, 5] == 1 and torch.equal(dst, loop_oracle(*case))


@needs_interpreter
def test_a_token_with_no_receiving_slot_goes_to_the_first_receiver_slot():
    metric, keep, _, _ = random_case(2, 30, 6, 8, fixed=2)
    targets = torch.zeros(2, 6, dtype=torch.bool)
    dst = nearest_kept(metric, keep, 2, targets)
    free = torch.ones(2, 30, dtype=torch.bool).scatter(1, keep, False)
    assert (dst[free] == 2).all() and torch.equal(dst, nearest_kept_reference(metric, keep, 2, targets))


def test_reference_matches_loop_oracle():
    for fixed, masked in ((0, False), (2, True)):
        case = random_case(2, 40, 9, 5, fixed, masked)
        assert torch.equal(nearest_kept_reference(*case), loop_oracle(*case))


def test_wide_metrics_run_the_reference():
    assert check(random_case(2, 30, 6, 300))["reference"] == 1      # wider than the kernel's 256 channels


COMPILE_BACKENDS = ["reference", pytest.param("triton-interpret", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_custom_op_under_compile_and_opcheck(monkeypatch, backend):
    monkeypatch.setattr(dispatch, "_backend", lambda x: backend)
    case = random_case(2, 24, 7, 8, 1, True)
    compiled = torch.compile(lambda m, *rest: nearest_kept(m * 2, *rest), fullgraph=True)
    before = kernels.BACKEND_CALLS[backend]
    assert torch.equal(compiled(*case), loop_oracle(*case))
    assert kernels.BACKEND_CALLS[backend] == before + 1
    for fixed, masked in ((0, False), (1, True)):
        torch.library.opcheck(torch.ops.vlmeff.nearest_kept.default, random_case(2, 12, 4, 5, fixed, masked))


@needs_interpreter
def test_compile_failure_falls_back_to_reference_with_one_warning(monkeypatch):
    from vlmeff.kernels import triton_nearest_kept as module
    import triton
    launches = break_kernel(monkeypatch, module, "_nearest_kept_kernel", "BLOCK_C")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            assert check(random_case(2, 30, 6, 64, seed=seed))["reference"] == 1
    fallbacks = [w for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    assert "nearest_kept" in message and f"Triton {triton.__version__}" in message and "(32, 32, 64)" in message
    assert launches == [64]


@needs_interpreter
@pytest.mark.parametrize("C", [3, 64, 256])
def test_launcher_reads_no_tensor_data_and_launches_its_variant(monkeypatch, C):
    from vlmeff.kernels import triton_nearest_kept as module
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, args, meta))

    monkeypatch.setattr(module, "_nearest_kept_kernel", Recorder())
    with FakeTensorMode():       # any host read of a value raises
        metric, keep = torch.empty(2, 197, C), torch.empty(2, 50, dtype=torch.long)
        dst = module.nearest_kept_triton(metric, keep, 1, torch.empty(2, 50, dtype=torch.bool))
    assert dst.shape == (2, 197)
    (grid, args, meta), = launched
    assert (meta["BLOCK_N"], meta["BLOCK_J"], meta["BLOCK_C"]) == module.launch_config(C)
    assert grid == (-(-197 // meta["BLOCK_N"]), 2)
    assert args[4:9] == (197, 50, C, 1, 1)        # N, K, C, FIXED, HAS_TARGETS


def test_launch_configs_are_exactly_the_launchers_choices():
    from vlmeff.kernels import triton_nearest_kept as module
    chosen = {module.launch_config(C) for C in range(1, 257)}
    assert chosen == set(module.launch_configs()) and len(chosen) == 5
    assert all(block_n >= 16 and block_n * block_c <= 4096 for block_n, _, block_c in chosen)


@needs_cuda
def test_cuda_matches_reference():
    before = kernels.BACKEND_CALLS["triton"]
    for C, fixed, masked in ((64, 1, False), (128, 0, True)):
        case = random_case(4, 577, 144, C, fixed, masked, device="cuda")
        assert torch.equal(nearest_kept(*case), nearest_kept_reference(*case))
    assert kernels.BACKEND_CALLS["triton"] == before + 2
