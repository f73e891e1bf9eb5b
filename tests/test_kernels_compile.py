"""Every Triton kernel compiles for sm_90 (H100) on a machine without a GPU: a compile
error costs a CI run here, not a device call (tests/compile_for_sm90.py)."""
import os
import subprocess
import sys

import pytest

from gpu_stack import STACK, environ, python

pytest.importorskip("triton")

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_for_sm90.py")
KERNELS = ("_centre_kernel", "_syrk_kernel", "_matmul_bias_kernel", "_jacobi_rotations_kernel",
           "_jacobi_step_kernel", "_lse_rows_kernel", "_ce_grad_kernel",
           "_ce_weight_kernel", "_row_dots_kernel", "_tridiagonalize_kernel",
           "_tridiagonalize_resident_kernel", "_bisect_kernel", "_inverse_iteration_kernel",
           "_cluster_orthonormalize_kernel", "_reflect_products_kernel", "_reflect_update_kernel",
           "_apply_reflectors_kernel", "_shifts_and_clusters_kernel", "_cg_update_kernel",
           "_cg_direction_kernel", "_filter_start_kernel", "_filter_step_kernel")


# The GPU machine's Triton, another version than the one installed here, in triton/ of
# $HIMO_FAST_GPU_STACK (gpu_stack.py; .ci/run installs it), run by that stack's Python.
# Triton 3.6 rejected a float64 tl.dot that 3.8 compiles, so each version is compiled for.
def compile_all(executable=sys.executable, env=None):
    env = {k: v for k, v in (env or os.environ).items() if k != "TRITON_INTERPRET"}
    version = subprocess.run([executable, "-c", "import triton; print(triton.__version__)"],
                             capture_output=True, text=True, env=env, check=True).stdout.strip()
    done = subprocess.run([executable, SCRIPT], capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, f"triton {version}:\n{done.stdout}{done.stderr}"
    compiled = [line.split()[0] for line in done.stdout.splitlines()]
    for name in KERNELS:
        assert name in compiled, f"{name} was not compiled:\n{done.stdout}"
    # fp32, fp64 and bf16 inputs each give their own matmul_bias binaries
    assert compiled.count("_matmul_bias_kernel") >= 3, done.stdout
    # the fused InfoNCE in fp32, fp64, bf16 and fp16; its backward with row statistics,
    # column ones or both, in BLOCK_D chunks of two widths, or as strips of weights
    assert compiled.count("_lse_rows_kernel") >= 8, done.stdout  # rows only, rows and columns
    assert compiled.count("_ce_grad_kernel") >= 20, done.stdout
    assert compiled.count("_ce_weight_kernel") >= 8, done.stdout
    return version


def test_every_kernel_compiles_for_sm90():
    compile_all()


@pytest.mark.skipif(not STACK, reason="HIMO_FAST_GPU_STACK names no folder with the GPU "
                    "machine's Triton (.ci/run installs one)")
def test_every_kernel_compiles_for_sm90_with_the_gpu_machines_triton():
    import triton
    path = os.path.join(STACK, "triton")
    version = compile_all(python(), environ(path))
    assert version != triton.__version__, f"{path} holds the installed triton {version}"
