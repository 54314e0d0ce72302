"""gather_merge (Triton kernel, run by the interpreter on CPU; see conftest.py) against the PyTorch reference,
segments_from_assignment, the custom op under torch.compile, and attention_rows."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vlmeff import kernels
from vlmeff.kernels import gather_merge, segments_from_assignment, validate_segments
from vlmeff.kernels.attention_rows import attention_rows
from vlmeff.kernels.reference import gather_merge_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_interpreter = pytest.mark.skipif(kernels._backend(torch.empty(0)) != "triton-interpret",
                                       reason="TRITON_INTERPRET=1 was not set before the kernel import")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


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


def test_float64_runs_reference():
    before = dict(kernels.BACKEND_CALLS)
    check_matches_reference(*random_case(2, 10, 4, 3, torch.float64))
    assert kernels.BACKEND_CALLS["reference"] == before["reference"] + 1


def test_autograd_uses_reference():
    x, index, offsets, weight = random_case(2, 10, 4, 3, torch.float32)
    x.requires_grad_(True)
    before = kernels.BACKEND_CALLS["reference"]
    gather_merge(x, index, offsets, weight)[0].sum().backward()   # the custom op has no backward
    assert kernels.BACKEND_CALLS["reference"] == before + 1 and x.grad is not None


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


def test_custom_op_under_compile(monkeypatch):
    monkeypatch.setattr(kernels, "_backend", lambda x: "reference")
    x, index, offsets, weight = random_case(2, 16, 8, 5, torch.float32)
    fn = torch.compile(lambda x, i, o, w: gather_merge(x * 2, i, o, w)[0] + 1, fullgraph=True)
    before = kernels.BACKEND_CALLS["reference"]
    expected = gather_merge_reference(x * 2, index, offsets, weight)[0] + 1
    torch.testing.assert_close(fn(x, index, offsets, weight), expected)
    assert kernels.BACKEND_CALLS["reference"] > before   # the op's implementation ran inside the compiled graph


def sm90_ptx(dtype):
    """PTX of the kernel compiled ahead of time for an H100 (no GPU needed: triton ships ptxas), specialised as a
    launch with aligned pointers and D and the row strides divisible by 16 would be."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from vlmeff.kernels.triton_gather_merge import _gather_merge_kernel as kernel

    types = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "weight_ptr": "*fp32", "total_ptr": "*fp32",
             "index_ptr": "*i64", "offsets_ptr": "*i64"}
    constexprs = {"HAS_WEIGHT": True, "BLOCK_K": 16, "BLOCK_D": 256}
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
               if n.endswith("_ptr") or n in ("D", "stride_xb", "stride_xn", "stride_yb", "stride_yk")}
    source = ASTSource(kernel, signature, constexprs, aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


@pytest.mark.parametrize("dtype,vectors", [("bf16", 4), ("fp32", 8)])
def test_kernel_compiles_for_sm90_with_16_byte_accesses(dtype, vectors):
    # each thread's 32 elements of the 16 x 256 tile must move as 16-byte vectors: 4 per load and per store in
    # bf16, 8 in fp32. In a subprocess without TRITON_INTERPRET: the interpreter patches triton.language while
    # it runs kernels, which breaks compiling in the same process.
    pytest.importorskip("triton")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"import test_kernels as t; print(t.sm90_ptx({dtype!r}))")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    ptx = run.stdout
    assert len(re.findall(r"ld\.global\S*\.v4", ptx)) == vectors
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
