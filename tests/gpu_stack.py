"""The GPU machine's Python stack, as near as CI gets to it on a CPU: .ci/run installs it
under $HIMO_FAST_GPU_STACK (test_gpu_machine_stack.py, test_kernels_compile.py use it).

  venv/    a Python 3.12 venv with the machine's torch 2.11 (cu130), numpy 2.5.2,
           huggingface_hub and open_clip, and this machine's Triton for the interpreter
           (3.6's fails on numpy 2.5; the GPU machine compiles and never interprets);
           where no Python 3.12 is found here, torch/ instead: torch 2.11 for this Python
  triton/  the machine's Triton 3.6 for that Python, which the kernels are compiled with
"""
import os
import sys
from pathlib import Path

STACK = os.environ.get("HIMO_FAST_GPU_STACK", "")


def python() -> str:
    """The stack's interpreter: the venv's, else this one (with torch/ on the path)."""
    venv = Path(STACK) / "venv" / "bin" / "python"
    return str(venv) if STACK and venv.exists() else sys.executable


def environ(*paths) -> dict:
    """os.environ for a run on the stack: `paths`, then torch/ when the stack has one,
    on PYTHONPATH; the variable itself left out (no nested stack runs)."""
    env = {k: v for k, v in os.environ.items() if k != "HIMO_FAST_GPU_STACK"}
    torch_dir = Path(STACK) / "torch"
    extra = [str(p) for p in paths] + ([str(torch_dir)] if torch_dir.is_dir() else [])
    env["PYTHONPATH"] = os.pathsep.join(extra)
    return env
