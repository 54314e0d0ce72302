"""Run the Triton kernels in Triton's interpreter on CPU-only machines. Triton reads TRITON_INTERPRET when a kernel
is decorated, i.e. when `vlmeff.kernels.triton_gather_merge` is first imported (lazily, at the first call), so it
is set here, before any test runs. On a GPU machine the compiled kernels run instead; an explicit value wins."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the models under test are tiny: one thread is as fast, and it does not fight other processes for the cores
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_layout_constants():
    """Every test builds the layout constants it uses (`vlmeff.layout.layout_constant` caches them per process):
    no test passes on constants an earlier test built, and a mutation run, whose mutants fork from a process that
    already ran the tests, exercises the mutated builders."""
    from vlmeff import layout

    layout._CACHE.clear()
    yield
