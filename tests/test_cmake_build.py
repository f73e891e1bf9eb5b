"""CMakeLists.txt builds the same sources as setup.py (issue 3: exercised in CI so that it
cannot rot): configure and build the CPU part into a temporary folder, load the library
in a fresh process (the installed extension registers the same ops), and check the op it
provides against plain torch."""
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_ran, run_fresh

ROOT = Path(__file__).resolve().parent.parent

PROBE = """
import sys, torch
torch.ops.load_library(sys.argv[1])
torch.manual_seed(0)
img, txt = (torch.nn.functional.normalize(torch.randn(9, 5, dtype=torch.float64), dim=-1) for _ in range(2))
s = torch.tensor(7.0, dtype=torch.float64)
ce, nll, _ = torch.ops.himo_fast.dual_ce([img, txt], [img, txt], s)
logits = s * img @ txt.T
want = torch.nn.functional.cross_entropy(logits, torch.arange(9), reduction="none")
want_t = torch.nn.functional.cross_entropy(logits.T, torch.arange(9), reduction="none")
err = max((ce[0] - want).abs().max().item(), (ce[1] - want_t).abs().max().item(),
          (nll[0] - want).abs().max().item())
print(err)
"""


def _cuda_hints() -> list[str]:
    """A CUDA build of torch makes its CMake config look for the toolkit and nvrtc; point
    it at them (the toolkit as setup.py finds it, nvrtc from torch's pip dependencies)."""
    if torch.version.cuda is None:
        return []
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    if not Path(home, "include", "cuda_runtime.h").exists():
        pytest.skip(f"a CUDA build of torch needs the CUDA toolkit for CMake; none at {home}")
    hints = [f"-DCUDA_TOOLKIT_ROOT_DIR={home}"]
    site = Path(torch.__file__).parent.parent
    nvrtc = sorted(glob.glob(str(site / "nvidia" / "*" / "lib" / "libnvrtc.so*")))
    if nvrtc:
        hints.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    return hints


def test_cmake_builds_the_cpu_ops(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake is not installed (.ci/run installs it)")
    build = tmp_path / "build"
    configure = [cmake, "-S", str(ROOT), "-B", str(build), "-DHIMO_FAST_CUDA=OFF",
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                 f"-DPython3_EXECUTABLE={sys.executable}", *_cuda_hints()]
    for cmd in (configure, [cmake, "--build", str(build), "-j", "2"]):
        done = subprocess.run(cmd, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (library,) = build.glob("himo_fast_ops*.so")
    assert float(assert_ran(run_fresh(PROBE, str(library))).split()[-1]) <= 1e-12
