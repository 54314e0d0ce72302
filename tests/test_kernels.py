"""gather_merge (Triton kernel, run by the interpreter on CPU; see conftest.py) against the PyTorch reference and
a plain loop oracle, segments_from_assignment, the custom op under torch.compile, the kernel's run-time fallback,
the AOT compile of every kernel variant under each supported Triton, and attention_rows."""
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from vlmeff import kernels
from vlmeff.kernels import (KernelFallbackWarning, gather_merge, segments_from_assignment,
                            validate_segments)
from vlmeff.kernels import dispatch
from vlmeff.kernels.attention_rows import attention_rows
from vlmeff.kernels.reference import gather_merge_reference
from kernel_checks import break_kernel, sm90_ptx
from opcount import count_ops

REPO = Path(__file__).resolve().parent.parent
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_interpreter = pytest.mark.skipif(dispatch._backend(torch.empty(0)) != "triton-interpret",
                                       reason="TRITON_INTERPRET=1 was not set before the kernel import")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def loop_oracle(x, index, offsets, weight=None):
    """gather_merge written from its definition, one segment at a time, in float64: output k of batch b is
    sum_j w_j x[b, index[b, j]] / sum_j w_j over j in [offsets[b, k], offsets[b, k + 1]), zero when empty.
    Differentiable (plain torch ops), so its autograd is the gradient oracle. Returns (out, total) float64."""
    B, _, D = x.shape
    outs, totals = [], []
    for b in range(B):
        for k in range(offsets.shape[1] - 1):
            lo, hi = int(offsets[b, k]), int(offsets[b, k + 1])
            acc, total = torch.zeros(D, dtype=torch.float64), torch.zeros((), dtype=torch.float64)
            for j in range(lo, hi):
                w = torch.ones((), dtype=torch.float64) if weight is None else weight[b, j].double()
                acc = acc + w * x[b, int(index[b, j])].double()
                total = total + w
            outs.append(acc / total if hi > lo else acc)
            totals.append(total)
    K = offsets.shape[1] - 1
    return torch.stack(outs).view(B, K, D), torch.stack(totals).view(B, K)


def random_case(B, N, D, num_out, dtype, device="cpu", weighted=True, drop=True, seed=0):
    """x [B, N, D] and segments from a random assignment of tokens to num_out slots (-1 = dropped)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g).to(device, dtype)
    dst = torch.randint(-1 if drop else 0, num_out, (B, N), generator=g).to(device)
    index, offsets = segments_from_assignment(dst, num_out)
    weight = (torch.rand(B, N, generator=g) + 0.5).to(device) if weighted else None
    return x, index, offsets, weight


def check_matches_reference(x, index, offsets, weight):
    out, total = gather_merge(x, index, offsets, weight)
    ref_out, ref_total = gather_merge_reference(x, index, offsets, weight)
    # the kernel sums members in the reference's order; bf16 may still differ by one ulp, because the
    # interpreter truncates fp32 -> bf16 where torch (and compiled Triton) rounds to nearest even
    torch.testing.assert_close(out, ref_out, rtol=1e-6 if x.dtype == torch.float32 else None,
                               atol=1e-6 if x.dtype == torch.float32 else None)
    torch.testing.assert_close(total, ref_total, rtol=1e-6, atol=1e-6)
    assert out.dtype == x.dtype and total.dtype == torch.float32


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("D", [3, 67, 256])
@pytest.mark.parametrize("weighted", [False, True])
def test_merge_matches_reference(dtype, D, weighted):
    # 12 slots for 40 tokens with drops: segments of 0 to ~8 members, dropped members past offsets[:, -1]
    before = kernels.BACKEND_CALLS["triton-interpret"]
    check_matches_reference(*random_case(2, 40, D, 12, dtype, weighted=weighted))
    assert kernels.BACKEND_CALLS["triton-interpret"] == before + 1   # the kernel ran, not the reference


@needs_interpreter
def test_tail_masks():
    # K not a multiple of BLOCK_K (BLOCK_K = 4096 / 256 = 16 here) and D not a multiple of BLOCK_D: 3 x 2 tiles
    check_matches_reference(*random_case(1, 90, 300, 37, torch.float32))


@needs_interpreter
@pytest.mark.parametrize("dtype", DTYPES)
def test_pure_gather_is_bit_exact(dtype):
    B, N, D, K = 3, 50, 67, 20
    x = torch.randn(B, N, D).to(dtype)
    keep = torch.rand(B, N).argsort(dim=1)[:, :K].sort(dim=1).values
    dst = torch.full((B, N), -1).scatter_(1, keep, torch.arange(K).expand(B, K))
    out, total = gather_merge(x, *segments_from_assignment(dst, K))
    assert torch.equal(out, x.gather(1, keep[..., None].expand(B, K, D)))
    assert torch.equal(total, torch.ones(B, K))


@needs_interpreter
def test_all_kept_is_identity():
    x = torch.randn(2, 33, 67, dtype=torch.bfloat16)
    out, total = gather_merge(x, *segments_from_assignment(torch.arange(33).expand(2, 33), 33), validate=False)
    assert torch.equal(out, x) and torch.equal(total, torch.ones(2, 33))


@needs_interpreter
def test_empty_segments_and_no_outputs():
    x = torch.randn(1, 4, 5)
    index = torch.tensor([[2, 0, 3, 1]])
    out, total = gather_merge(x, index, torch.tensor([[0, 2, 2, 3]]), torch.tensor([[1.0, 3.0, 2.0, 9.0]]))
    assert torch.equal(out[0, 1], torch.zeros(5)) and torch.equal(total, torch.tensor([[4.0, 0.0, 2.0]]))
    torch.testing.assert_close(out[0, 0], (x[0, 2] + 3 * x[0, 0]) / 4)
    assert torch.equal(out[0, 2], x[0, 3])   # member 1 (past offsets[:, -1]) is dropped
    out, total = gather_merge(x, index, torch.tensor([[0]]))
    assert out.shape == (1, 0, 5) and total.shape == (1, 0)


def test_float64_runs_reference_and_matches_loop_oracle():
    x, index, offsets, weight = random_case(2, 10, 4, 3, torch.float64)
    before = kernels.BACKEND_CALLS["reference"]
    out, total = gather_merge(x, index, offsets, weight)
    assert kernels.BACKEND_CALLS["reference"] == before + 1   # float64 has no kernel variant
    oracle_out, oracle_total = loop_oracle(x, index, offsets, weight)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, oracle_out, rtol=1e-6, atol=1e-6)   # the reference accumulates in fp32
    torch.testing.assert_close(total, oracle_total.float())


@pytest.mark.parametrize("weighted", [False, True])
def test_autograd_gradients_match_loop_oracle(weighted):
    # the custom op has no backward: with gradients required gather_merge runs the differentiable reference, whose
    # gradients must be those of the definition, for x and for the weights, through out and through total
    x, index, offsets, weight = random_case(2, 10, 4, 3, torch.float64, weighted=weighted)
    cot_out, cot_total = torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    grads = []
    for fn in (gather_merge, loop_oracle):
        xg = x.clone().requires_grad_(True)
        wg = weight.clone().requires_grad_(True) if weighted else None
        out, total = fn(xg, index, offsets, wg)
        ((out * cot_out).sum() + (total * cot_total).sum()).backward()
        grads.append((xg.grad, wg.grad if weighted else None))
    (x_grad, w_grad), (x_grad_oracle, w_grad_oracle) = grads
    torch.testing.assert_close(x_grad, x_grad_oracle, rtol=1e-6, atol=1e-6)
    if weighted:
        torch.testing.assert_close(w_grad, w_grad_oracle, rtol=1e-5, atol=1e-6)
    assert x_grad.abs().sum() > 0


def test_autograd_gradcheck():
    # finite differences (x and weights): the reference's backward is the derivative of its forward. It computes
    # in float32 even for float64 inputs, so steps of 1e-3 (central differences: O(1e-6) error) keep the fp32
    # rounding (~1e-7 / 2e-3) far below the tolerance
    x, index, offsets, weight = random_case(1, 6, 3, 2, torch.float64)
    x.requires_grad_(True)
    weight = weight.double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: gather_merge(x, index, offsets, w), (x, weight),
                                    eps=1e-3, atol=1e-4, rtol=1e-3)


def test_segments_from_assignment():
    dst = torch.tensor([[2, -1, 0, 2, 0, -1], [1, 1, 1, 1, 1, 1]])
    index, offsets = segments_from_assignment(dst, 3)
    assert index.tolist() == [[2, 4, 0, 3, 1, 5], [0, 1, 2, 3, 4, 5]]
    assert offsets.tolist() == [[0, 2, 2, 4], [0, 0, 6, 6]]
    # random: each segment holds exactly its tokens, in increasing order; dropped ones follow offsets[:, -1]
    dst = torch.randint(-1, 7, (4, 50))
    index, offsets = segments_from_assignment(dst, 7)
    for b in range(4):
        for k in range(7):
            members = index[b, offsets[b, k]:offsets[b, k + 1]]
            assert members.tolist() == (dst[b] == k).nonzero().flatten().tolist()
        assert sorted(index[b, offsets[b, -1]:].tolist()) == (dst[b] < 0).nonzero().flatten().tolist()


def test_segments_from_assignment_ops():
    # remainder, sort, arange, its contiguous copy, searchsorted (it was 9: where + its scalar and compare,
    # zeros, ones_like, scatter_add_, cumsum, pad); none reads data on the host
    _, counter = count_ops(segments_from_assignment, torch.randint(-1, 16, (2, 64)), 16)
    assert counter.total == 5 and counter.syncs == 0, counter.ops


BAD_INPUTS = {
    "index out of range": (lambda x, i, o: (x, i + 10, o), "index values"),
    "negative index": (lambda x, i, o: (x, i - 1, o), "index values"),
    "non-monotonic offsets": (lambda x, i, o: (x, i, o.flip(1)), "non-decreasing"),
    "offsets past M": (lambda x, i, o: (x, i, o + torch.tensor([0, 0, 9])), "non-decreasing"),
    "int32 index": (lambda x, i, o: (x, i.int(), o), "int64"),
    "float offsets": (lambda x, i, o: (x, i, o.float()), "int64"),
    "x not 3-d": (lambda x, i, o: (x[0], i, o), r"\[B, N, D\]"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_segments_rejected(case):
    make, message = BAD_INPUTS[case]
    args = make(torch.randn(2, 5, 3), torch.tensor([[0, 1, 4, 2], [3, 3, 0, 1]]), torch.tensor([[0, 2, 3], [0, 1, 4]]))
    with pytest.raises(ValueError, match=message):
        validate_segments(*args)
    with pytest.raises(ValueError, match=message):
        gather_merge(*args)   # value checks run inside the custom op


def test_weight_shape_rejected():
    with pytest.raises(ValueError, match="weight"):
        gather_merge(torch.randn(1, 3, 2), torch.tensor([[0, 1]]), torch.tensor([[0, 2]]), torch.ones(1, 3))


COMPILE_BACKENDS = ["reference", pytest.param("triton-interpret", marks=needs_interpreter)]


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
@pytest.mark.parametrize("mode", ["drop", "merge"])
def test_custom_op_under_compile_matches_loop_oracle_and_eager_strides(monkeypatch, backend, mode):
    # drop: random / pool / cls (dropped members past offsets[:, -1]); merge: tome (every token in a segment,
    # weighted). The compiled graph checks the real outputs against the fake's shapes and strides: the
    # reference once returned total as a [B, K + 1] slice ("expected stride 18==17")
    monkeypatch.setattr(dispatch, "_backend", lambda x: backend)
    x, index, offsets, weight = random_case(2, 24, 8, 17, torch.float32, drop=mode == "drop",
                                            weighted=mode == "merge")
    fn = lambda x, i, o, w: gather_merge(x * 2, i, o, w, validate=False)
    compiled = torch.compile(fn, fullgraph=True)
    before = kernels.BACKEND_CALLS[backend]
    out, total = compiled(x, index, offsets, weight)
    assert kernels.BACKEND_CALLS[backend] == before + 1   # the op's implementation ran inside the compiled graph
    oracle_out, oracle_total = loop_oracle(x * 2, index, offsets, weight)
    torch.testing.assert_close(out, oracle_out.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, oracle_total.float())
    eager_out, eager_total = fn(x, index, offsets, weight)
    assert (out.shape, out.stride(), total.shape, total.stride()) == \
        (eager_out.shape, eager_out.stride(), eager_total.shape, eager_total.stride())
    assert out.is_contiguous() and total.is_contiguous()


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_custom_op_passes_opcheck(monkeypatch, backend):
    # schema, fake implementation (shapes, strides, dtypes) against the real one, and AOT dispatch
    monkeypatch.setattr(dispatch, "_backend", lambda x: backend)
    for weighted in (False, True):
        x, index, offsets, weight = random_case(2, 12, 5, 4, torch.float32, weighted=weighted)
        torch.library.opcheck(torch.ops.vlmeff.gather_merge.default, (x, index, offsets, weight, False))


@needs_interpreter
def test_compile_failure_falls_back_to_reference_with_one_warning(monkeypatch):
    # the kernel variant with BLOCK_D = 256 fails as Triton 3.6 failed on GPUs; the others still compile
    from vlmeff.kernels import triton_gather_merge as module
    import triton
    launches = break_kernel(monkeypatch, module, "_gather_merge_kernel", "BLOCK_D",
                            fails=lambda meta: meta["BLOCK_D"] == 256)
    before = dict(kernels.BACKEND_CALLS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in range(3):
            case = random_case(2, 30, 300, 7, torch.float32, seed=seed)   # D = 300: BLOCK_D = 256
            out, total = gather_merge(*case)
            oracle_out, oracle_total = loop_oracle(*case)
            torch.testing.assert_close(out, oracle_out.float(), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(total, oracle_total.float())
        narrow = random_case(2, 30, 67, 7, torch.float32)                 # D = 67: BLOCK_D = 128 still compiles
        torch.testing.assert_close(gather_merge(*narrow)[0], loop_oracle(*narrow)[0].float(), rtol=1e-5, atol=1e-5)
    fallbacks = [w for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    assert f"Triton {triton.__version__}" in message and "PassManager::run failed" in message
    assert "('fp32', True, 16, 256)" in message
    assert launches == [256, 128]   # the failed variant is not retried on later calls
    assert kernels.BACKEND_CALLS["reference"] == before["reference"] + 3
    assert kernels.BACKEND_CALLS["triton-interpret"] == before["triton-interpret"] + 1


def test_out_of_memory_is_not_a_kernel_failure(monkeypatch):
    # an allocation failure says nothing about the kernel: it reaches the caller, and the variant is not disabled
    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(dispatch, "_backend", lambda x: "triton")
    monkeypatch.setattr(dispatch, "_kernels", lambda: type("Module", (), {
        "launch_config": staticmethod(lambda *a: ("fp32", False, 16, 256)),
        "gather_merge_triton": staticmethod(out_of_memory)}))
    monkeypatch.setattr(dispatch, "_failed_variants", set())
    with pytest.raises(torch.OutOfMemoryError):
        gather_merge(*random_case(1, 4, 3, 2, torch.float32, weighted=False))
    assert not dispatch._failed_variants


@needs_interpreter
@pytest.mark.parametrize("D", [3, 67, 300, 4096])
def test_launcher_reads_no_tensor_data(monkeypatch, D):
    # under FakeTensorMode any host read of a value (.item, .tolist, int(t), nonzero) raises: the launcher must
    # size its grid from shapes only, and launch exactly the variant `launch_config` names
    from vlmeff.kernels import triton_gather_merge as module
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **meta: launched.append((grid, meta))

    monkeypatch.setattr(module, "_gather_merge_kernel", Recorder())
    with FakeTensorMode():
        x = torch.empty(2, 50, D, dtype=torch.bfloat16)
        index, offsets = torch.empty(2, 50, dtype=torch.long), torch.empty(2, 21, dtype=torch.long)
        out, total = module.gather_merge_triton(x, index, offsets, torch.empty(2, 50, dtype=torch.float16))
    assert out.shape == (2, 20, D) and total.shape == (2, 20)
    (grid, meta), = launched
    block_k, block_d = meta["BLOCK_K"], meta["BLOCK_D"]
    assert ("bf16", meta["HAS_WEIGHT"], block_k, block_d) == module.launch_config(torch.bfloat16, True, D)
    assert grid == (-(-20 // block_k), -(-D // block_d), 2)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_reference_and_op_read_no_tensor_data_on_fake_tensors(device):
    # fake tensors (FakeTensorMode; CUDA ones need no GPU) have no values: the reference's CPU shortcut (a host
    # read of offsets[:, -1]) must not run on them nor on CUDA, and the custom op answers with its fake
    with FakeTensorMode():
        x = torch.empty(2, 10, 4, device=device)
        index, offsets = (torch.empty(2, n, dtype=torch.long, device=device) for n in (10, 4))
        weight = torch.empty(2, 10, device=device)
        for out, total in (gather_merge_reference(x, index, offsets, weight),
                           gather_merge(x, index, offsets, weight, validate=False)):
            assert (out.shape, out.stride(), total.shape, total.stride()) == ((2, 3, 4), (12, 4, 1), (2, 3), (3, 1))
            assert out.device.type == device


def test_launch_configs_are_exactly_the_launchers_choices():
    # the AOT proof compiles `launch_configs()`: it must hold every variant the launcher can pick, and no other
    from vlmeff.kernels import triton_gather_merge as module
    chosen = {module.launch_config(dtype, has_weight, D)
              for dtype in DTYPES for has_weight in (False, True) for D in range(0, 5000)}
    assert chosen == set(module.launch_configs()) and len(module.launch_configs()) == 24
    assert all(block_k * block_d == module.TILE_ELEMENTS for _, _, block_k, block_d in chosen)


# The oldest Triton the kernel must compile on (torch 2.11 images ship it), unpacked from its wheel into a side
# folder by `.ci/oldest-triton` (which .ci/run calls); VLMEFF_OLDEST_TRITON may point elsewhere. The newest is
# the installed one (torch 2.14 pins it).
OLDEST_TRITON = "3.6.0"
NEWEST_TRITON = "3.8."


def oldest_triton_folder():
    """The side folder of the oldest Triton. Missing, the test fails (it is not skipped: an unchecked Triton is
    how the kernel broke on GPUs) rather than download 190 MB behind the back of an offline test suite."""
    folder = Path(os.environ.get("VLMEFF_OLDEST_TRITON", REPO / ".ci" / f"triton-{OLDEST_TRITON}"))
    if not (folder / "triton" / "__init__.py").exists():
        pytest.fail(f"no Triton {OLDEST_TRITON} in {folder}, which the AOT compile check needs: run "
                    f".ci/oldest-triton (pip download + unzip), or set VLMEFF_OLDEST_TRITON to a folder holding "
                    f"an unpacked triton=={OLDEST_TRITON} wheel.")
    return folder


def compile_check(tmp_path, name, arch, first_on_path=None):
    """Start `python -m vlmeff.kernels.compile_check --arch <arch>` in a fresh process (the interpreter of this
    one cannot compile) with a cold Triton cache, optionally with another Triton first on the path."""
    path = [str(first_on_path)] if first_on_path else []
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path / f"{name}-{arch}"),
           "PYTHONPATH": os.pathsep.join(path + [str(REPO)] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    return subprocess.Popen([sys.executable, "-m", "vlmeff.kernels.compile_check", "--arch", str(arch)],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_kernel_variant_compiles_for_sm80_and_sm90_on_oldest_and_newest_triton(tmp_path):
    pytest.importorskip("triton")
    # one process per (Triton, arch), all at once: each compiles on one core
    oldest = oldest_triton_folder()
    runs = {(version, arch): compile_check(tmp_path, name, arch, folder)
            for version, name, folder in ((OLDEST_TRITON, "oldest", oldest), (NEWEST_TRITON, "newest", None))
            for arch in (80, 90)}
    for (version, arch), run in runs.items():
        stdout, stderr = run.communicate(timeout=600)
        assert stdout.strip(), f"Triton {version} sm{arch}: compile_check printed nothing\n{stderr[-3000:]}"
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["triton"].startswith(version), report["path"]
        assert report["compiled"] == (24 + 12 + 5) * 2   # (gather_merge, tome_merge, nearest_kept) x 2 specialisations
        assert report["failures"] == [] and run.returncode == 0, \
            f"Triton {version} sm{arch}: " + json.dumps(report["failures"][:5], indent=1)


@pytest.mark.parametrize("dtype,vectors,loads", [("bf16", 4, 23), ("fp32", 8, 43)])
def test_kernel_compiles_for_sm90_with_16_byte_accesses(dtype, vectors, loads):
    # each thread's 32 elements of the 16 x 256 tile must move as 16-byte vectors: 4 per load and per store in
    # bf16, 8 in fp32; and the per-row index / weight loads must not be duplicated across layouts (a [BLOCK_K, 1]
    # formulation once made 69 global loads per member step instead of 13). The 16 x 256 weighted variant, as an
    # aligned launch (pointers, D and the row strides divisible by 16) specialises it.
    pytest.importorskip("triton")
    ptx = sm90_ptx("gather_merge", (dtype, True, 16, 256))
    assert len(re.findall(r"ld\.global\S*\.v4", ptx)) == vectors
    assert len(re.findall(r"ld\.global", ptx)) == loads
    assert len(re.findall(r"st\.global\S*\.v4", ptx)) == vectors
    assert "div.rn.f32" in ptx


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_cuda_matches_reference(dtype, weighted):
    before = dict(kernels.BACKEND_CALLS)
    for D in (67, 4096):
        check_matches_reference(*random_case(4, 576, D, 144, dtype, "cuda", weighted))   # merge
        check_matches_reference(*random_case(4, 576, D, 576, dtype, "cuda", weighted))   # mostly single members
    assert sum(kernels.BACKEND_CALLS[k] - before[k] for k in ("triton", "triton-interpret")) == 4


@pytest.mark.parametrize("H,Hk", [(4, 4), (4, 2)])
def test_attention_rows_matches_full_softmax(H, Hk):
    B, N, d, scale = 2, 30, 8, 8 ** -0.5
    q, k = torch.randn(B, H, N, d), torch.randn(B, Hk, N, d)
    rows = torch.tensor([0, N - 1])
    full = torch.softmax(q @ k.repeat_interleave(H // Hk, dim=1).transpose(-1, -2) * scale, dim=-1)   # [B, H, N, N]
    torch.testing.assert_close(attention_rows(q[:, :, rows], k, scale), full[:, :, rows].mean(dim=1))
