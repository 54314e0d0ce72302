"""Ahead-of-time compile every variant of the Triton kernels (gather-merge, ToMe's merge, the nearest-kept
assignment) for real GPUs, without a GPU.

Triton ships ptxas, so `triton.compile` of an `ASTSource` for a `GPUTarget` runs the whole pipeline (TTIR, TTGIR,
LLVM, PTX, cubin) on a CPU. This proves that the launcher cannot pick a variant the installed Triton fails to
compile: each of `launch_configs()`, for each target, under two argument specialisations (nothing divisible by
16, and the usual contiguous launch with D and the pointers 16-aligned).

    TRITON_INTERPRET=0 python -m vlmeff.kernels.compile_check [--arch 80 90]

prints one JSON object (Triton version and path, number compiled, seconds, failures) and exits 1 on any failure.
Run it in a process of its own: the interpreter (TRITON_INTERPRET=1) cannot compile.
"""
import argparse
import importlib
import json
import sys
import time

SPECIALISATIONS = ("generic", "aligned")
# integer arguments that are multiples of 16 in an aligned launch (D % 16 == 0, contiguous x and out)
_ALIGNED_INTS = ("D", "stride_xb", "stride_xn", "stride_yb", "stride_yk")


def _gather_merge_source(config):
    from .triton_gather_merge import NUM_WARPS, _gather_merge_kernel as kernel

    dtype, has_weight, block_k, block_d = config
    types = {"x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "weight_ptr": "*fp32", "total_ptr": "*fp32",
             "index_ptr": "*i64", "offsets_ptr": "*i64"}
    return kernel, NUM_WARPS, types, {"HAS_WEIGHT": has_weight, "BLOCK_K": block_k, "BLOCK_D": block_d}


def _tome_merge_source(config):
    from .triton_tome_merge import BLOCK_R, NUM_WARPS, _tome_merge_kernel as kernel

    dtype, block_k, block_d = config
    types = {"x_ptr": f"*{dtype}", "sizes_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "out_sizes_ptr": f"*{dtype}",
             "log_ptr": f"*{dtype}", "unm_ptr": "*i64", "src_ptr": "*i64", "dst_ptr": "*i64"}
    return kernel, NUM_WARPS, types, {"BLOCK_K": block_k, "BLOCK_D": block_d, "BLOCK_R": BLOCK_R}


def _nearest_kept_source(config):
    from .triton_nearest_kept import NUM_WARPS, _nearest_kept_kernel as kernel

    block_n, block_j, block_c = config
    types = {"metric_ptr": "*fp32", "keep_ptr": "*i64", "targets_ptr": "*u8", "dst_ptr": "*i64"}
    return kernel, NUM_WARPS, types, {"BLOCK_N": block_n, "BLOCK_J": block_j, "BLOCK_C": block_c}


# kernel name -> its compile source; the launcher module of kernel `name` is `triton_<name>`
SOURCES = {"gather_merge": _gather_merge_source, "tome_merge": _tome_merge_source,
           "nearest_kept": _nearest_kept_source}


def compile_variant(config, arch, specialisation, kernel_name="gather_merge"):
    """Compile one variant of a kernel (`launch_configs()` of its module) for sm<arch>; returns the compiled
    kernel. Raises whatever Triton raises when it fails."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, num_warps, types, constexprs = SOURCES[kernel_name](config)
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    attrs = {}
    if specialisation == "aligned":
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
                 if n.endswith("_ptr") or n in _ALIGNED_INTS}
    source = ASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def compile_all(archs=(80, 90)):
    """Compile every launch configuration for every arch and specialisation. Returns a report dict:
    triton version and path, compiled count, seconds, failures [{kernel, config, arch, specialisation, error}]."""
    import triton

    from . import triton_gather_merge

    if triton_gather_merge.INTERPRET:
        raise RuntimeError("TRITON_INTERPRET=1 makes interpreter kernels, which cannot be compiled: run with "
                           "TRITON_INTERPRET=0")
    failures, count, t0 = [], 0, time.perf_counter()
    for arch in archs:
        for specialisation in SPECIALISATIONS:
            for name in SOURCES:
                for config in importlib.import_module(f"{__package__}.triton_{name}").launch_configs():
                    count += 1
                    try:
                        compile_variant(config, arch, specialisation, name)
                    except Exception as error:   # noqa: BLE001 - every compiler failure is a finding to report
                        first = next((line for line in str(error).splitlines() if "error" in line), str(error))
                        failures.append({"kernel": name, "config": config, "arch": arch,
                                         "specialisation": specialisation,
                                         "error": f"{type(error).__name__}: {first.strip()[:300]}"})
    return {"triton": triton.__version__, "path": triton.__file__, "compiled": count,
            "seconds": round(time.perf_counter() - t0, 1), "failures": failures}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="CUDA compute capabilities")
    report = compile_all(tuple(parser.parse_args().arch))
    print(json.dumps(report))
    sys.exit(1 if report["failures"] else 0)


if __name__ == "__main__":
    main()
