"""Shared checks of the Triton kernels: a kernel that fails to compile (the run-time fallback tests) and the PTX of a
variant compiled ahead of time for an H100 (the layout tests)."""
import os
import subprocess
import sys

from vlmeff.kernels import dispatch


def break_kernel(monkeypatch, module, kernel_name, meta_key, fails=lambda meta: True):
    """Replace module.<kernel_name> by a launcher that raises as Triton 3.6 did on GPUs ("PassManager::run failed")
    for the variants where fails(meta) and launches the real kernel otherwise; forget earlier failed variants.
    Returns the list that records meta[meta_key] of every launch attempt."""
    real, launches = getattr(module, kernel_name), []

    class Breaking:
        def __getitem__(self, grid):
            def launch(*args, **meta):
                launches.append(meta[meta_key])
                if fails(meta):
                    raise RuntimeError("PassManager::run failed")
                return real[grid](*args, **meta)
            return launch

    monkeypatch.setattr(module, kernel_name, Breaking())
    monkeypatch.setattr(dispatch, "_failed_variants", set())
    return launches


def sm90_ptx(kernel_name, config):
    """PTX of one variant compiled ahead of time for sm90 as an aligned launch specialises it
    (`compile_check.compile_variant`). In a subprocess without TRITON_INTERPRET: the interpreter patches
    triton.language while it runs kernels, which breaks compiling in the same process."""
    code = ("from vlmeff.kernels.compile_check import compile_variant; "
            f"print(compile_variant({config!r}, 90, 'aligned', {kernel_name!r}).asm['ptx'])")
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "0"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout
