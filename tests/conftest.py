import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter (set
# before himo_fast.kernels is first imported); with one they run compiled on CUDA.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from himo_fast.synthetic import clip_like_pairs

sys.path.insert(0, str(Path(__file__).parent))


def pairs(n, d, dtype=torch.float64, seed=None, decay=True, requires_grad=True):
    """Fresh paired, L2-normalised features (SPEC 5, himo_fast.synthetic)."""
    g = torch.Generator().manual_seed(seed if seed is not None else torch.randint(0, 2**31, ()).item())
    return [x.requires_grad_(requires_grad) for x in clip_like_pairs(n, d, dtype, generator=g, decay=decay)]


def rel(a, b, floor=1e-2):
    """‖a-b‖ / max(‖b‖, floor) in float64 (SPEC 4: gradients relative to max(‖g‖, 1e-2))."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp(min=floor)).item()


def loss_rel(a, b):
    """|a-b| / max(|b|, 1) (SPEC 4)."""
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) / max(abs(b), 1.0)


def run_fresh(code: str, *args: str, timeout: float = 300):
    """Run `code` (sys.argv[1:] = args) in a fresh Python and return the CompletedProcess:
    for what may crash or poison the process (a CUDA graph capture that fails leaves the
    context and cuSOLVER's handle broken for every later test), or must measure a process
    of its own. It runs in tests/ (importable), outside the checkout's root, so that
    `import himo_fast` is the installed package with its extension."""
    import subprocess
    import sys
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [os.path.dirname(__file__)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=os.path.dirname(__file__))


def assert_ran(out) -> str:
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"
    return out.stdout


@pytest.fixture
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    return torch.device("cuda")


@pytest.fixture
def triton_device():
    """Where the Triton kernels run here: the GPU, else the CPU under the interpreter."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not 1")
    pytest.importorskip("triton")
    return torch.device("cpu")


class LiveStorage(torch.utils._python_dispatch.TorchDispatchMode):
    """Bytes of the tensor storages created inside the mode and still alive, and their
    peak: run on meta tensors, the memory a step would hold at any size, on a machine
    without that memory (or a GPU). Storages made outside (the inputs) are not counted;
    what a compiled op holds inside itself is not seen."""

    def __init__(self):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary
        self.sizes = WeakIdKeyDictionary()
        self.now = self.peak = 0

    def _free(self, n):
        self.now -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref
        # A storage first seen as an argument was made outside (an input): counted as 0,
        # also when a view of it comes out
        for t in torch.utils._pytree.tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.sizes:
                self.sizes[t.untyped_storage()] = 0
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.sizes:
                storage, n = t.untyped_storage(), t.untyped_storage().nbytes()
                self.sizes[storage] = n
                weakref.finalize(storage, self._free, n)
                self.now += n
                self.peak = max(self.peak, self.now)
        return out
