"""Builds himo_fast and its compiled extension ``himo_fast._C``.

The CPU kernels are always built. The CUDA kernels are added when the installed torch is
a CUDA build and nvcc is found, unless HIMO_FAST_SKIP_CUDA=1; with them the sync-free
eigendecomposition on cuSOLVER when its header and library are found (toolkit or pip). Architectures: the visible
GPUs' when there are any, else Hopper (sm_90a) and Ampere (sm_80); HIMO_FAST_CUDA_ARCHS
(e.g. "90a;80") overrides. The CPU kernels use AVX2+FMA vectors when the build machine
has them (HIMO_FAST_CPU_VECTOR=avx2|default overrides). The torch version built against is recorded in
himo_fast/_build_info.py and checked at import.
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup


def _locate_cuda_home():
    """A CUDA_HOME that holds the runtime library: torch guesses it from nvcc's folder,
    wrong where nvcc on the PATH is a wrapper or link (/usr/local/bin/nvcc)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [Path(os.path.realpath(nvcc)).parent.parent] if nvcc else []
    candidates.append(Path("/usr/local/cuda"))
    for home in candidates:
        if (home / "lib64" / "libcudart.so").exists() and (home / "bin" / "nvcc").exists():
            os.environ["CUDA_HOME"] = str(home)
            return


_locate_cuda_home()

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pragma: no cover - message for users of plain `pip install .`
    sys.exit("himo_fast needs torch to build; install torch first, then "
             "`pip install --no-build-isolation .`")

ROOT = Path(__file__).parent


def cuda_archs():
    env = os.environ.get("HIMO_FAST_CUDA_ARCHS", "").strip()
    if env:
        return [a.strip() for a in env.replace(",", ";").split(";") if a.strip()]
    if torch.cuda.is_available():
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
        return sorted(f"{major}{minor}{'a' if major == 9 else ''}" for major, minor in caps)
    return ["90a", "80"]


def gencode(arch):
    return f"-gencode=arch=compute_{arch},code=sm_{arch}"


def cpu_vector_flags():
    """at::vec picks its implementation at compile time: AVX2 where the build CPU has it."""
    choice = os.environ.get("HIMO_FAST_CPU_VECTOR", "").strip().lower()
    if not choice:
        try:
            flags = Path("/proc/cpuinfo").read_text().split()
        except OSError:
            flags = []
        choice = "avx2" if {"avx2", "fma"} <= set(flags) else "default"
    if choice == "avx2":
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    if choice != "default":
        raise SystemExit(f"HIMO_FAST_CPU_VECTOR must be avx2 or default, got {choice!r}")
    return []


def with_cuda():
    if os.environ.get("HIMO_FAST_SKIP_CUDA", "0") == "1":
        return False
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def cusolver():
    """(include dir, library file) of cuSOLVER: the toolkit's, else the one torch's pip
    dependencies ship (nvidia/*/); None when neither has both."""
    homes = [Path(cpp_extension.CUDA_HOME)] if cpp_extension.CUDA_HOME else []
    layouts = [(h / "include", h / "lib64") for h in homes]
    site = Path(torch.__file__).resolve().parent.parent / "nvidia"
    layouts += [(d / "include", d / "lib") for d in sorted(site.glob("*")) if d.is_dir()]
    for inc, lib in layouts:
        libs = sorted(lib.glob("libcusolver.so*"))
        if (inc / "cusolverDn.h").exists() and libs:
            return inc, libs[0]
    return None


def cusolver_rpaths(lib):
    """Where _C looks for cuSOLVER at run time (torch loads it only on first use): where it
    was found, and, for torch's pip CUDA wheels (site-packages/nvidia/...), the same folder
    relative to the installed package, so that a wheel built on one machine (the GPU call's
    prebuilt one, benchmarks/fetch_wheels.sh) finds that machine's."""
    site = Path(torch.__file__).resolve().parent.parent
    try:
        return [f"$ORIGIN/../{lib.parent.resolve().relative_to(site)}", str(lib.parent)]
    except ValueError:  # the toolkit's
        return [str(lib.parent)]


def extension():
    sources = ["csrc/ops.cpp", "csrc/dual_infonce.cpp", "csrc/dual_infonce_tiles.cpp",
               "csrc/sym_eigh.cpp"]
    # No FMA contraction: the forward's s·dot - max and the backward's s·dot - lse must
    # round the same way, or a softmax that should be exactly 1 is not (tile_math.h).
    cxx = ["-O3", "-fopenmp", "-ffp-contract=off"] + cpu_vector_flags()
    extra = {"cxx": cxx}
    include_dirs = [str(ROOT / "csrc")]
    link = ["-fopenmp"]
    if sys.platform.startswith("linux"):
        # The process's libstdc++.so, by name: on a GPU machine the toolchain linked the
        # C++ runtime statically, a second libstdc++ inside torch's process, and formatting
        # an integer into an error message segfaulted in std::codecvt. Named before the
        # compiler's implicit -lstdc++, the shared one resolves every symbol, so no member
        # of a static libstdc++.a is pulled in, whatever flags the toolchain adds.
        link.append("-l:libstdc++.so.6")
    if with_cuda():
        sources += ["csrc/dual_infonce_cuda.cu", "csrc/dual_infonce_tiles_cuda.cu"]
        cxx.append("-DHIMO_WITH_CUDA")
        extra["nvcc"] = ["-O3", "-DHIMO_WITH_CUDA", "--fmad=false"] + [
            gencode(a) for a in cuda_archs()]
        found = cusolver()
        if found is not None:  # the sync-free eigh for HiDe (csrc/sym_eigh_cuda.cu)
            inc, lib = found
            sources.append("csrc/sym_eigh_cuda.cu")
            cxx.append("-DHIMO_WITH_CUSOLVER")
            extra["nvcc"].append("-DHIMO_WITH_CUSOLVER")
            include_dirs.append(str(inc))
            link += [str(lib)] + [f"-Wl,-rpath,{d}" for d in cusolver_rpaths(lib)]
        cls = cpp_extension.CUDAExtension
    else:
        cls = cpp_extension.CppExtension
    return cls("himo_fast._C", sources, extra_compile_args=extra,
               extra_link_args=link, include_dirs=include_dirs)


def write_build_info():
    (ROOT / "himo_fast" / "_build_info.py").write_text(
        '"""Written by setup.py: what himo_fast._C was compiled against."""\n'
        f"TORCH_VERSION = {torch.__version__!r}\n")


ext = extension()
write_build_info()
setup(
    packages=["himo_fast", "himo_fast.train", "himo_fast.kernels"],
    package_dir={"himo_fast": "himo_fast", "himo_fast.train": "himo_fast/train", "himo_fast.kernels": "kernels"},
    ext_modules=[ext],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
