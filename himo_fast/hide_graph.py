"""HiDe replayed from CUDA graphs: its forward and its backward each captured once per
(device, stream, shape, dtype, τ), then one replay a call.

Why: eagerly, HiDe on the triton backend is host-bound. One forward+backward dispatches
16 Triton launches and ≈ 75 torch ops at 128 x 768, ≈ 525 launches at 1024 x 768
(benchmarks/launch_count.py), several µs of host time each, against issue 15's goals of
0.25 ms and 1.5 ms. A replay costs one launch for the whole graph; what remains on the
host is one copy in, the replay and the clones out, in each direction.

How a graph stays correct where an eager call would be:
- The outputs and the input's gradient are cloned out of the static buffers, so a later
  call never overwrites a result the caller holds.
- Each forward replay bumps the entry's generation. A backward whose forward is not the
  latest one (two HiDe calls before one backward, activation checkpointing) replays its
  forward first, from the input it saved: the saved state is then its own again.
- Each stream has entries of its own, so that replays on two streams never share buffers.
- Eager (``factors._HiDeFactors``) where a graph cannot be: while the stream is already
  capturing (an outer graph holds HiDe's kernels), under torch.compile (it traces the
  eager path), in inference mode (its tensors cannot be copied into later), and for every
  key whose capture failed (warned once per key).

``Runner`` is what captures and replays; ``CudaGraphRunner`` does it with a CUDA graph,
and the tests hold the buffer, clone and generation logic to the eager path with a
stand-in that re-runs the captured function into the same buffers.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Protocol

import torch

from .factors import HiDeOps, Saved, _HiDeFactors, hide_backward, hide_forward, refuse_double_backward

# Entries kept per cache (least recently used dropped first). A key is one shape, dtype,
# τ, device and stream: a training run uses one or two (a last, smaller batch).
MAX_ENTRIES = 4


class Runner(Protocol):
    def capture(self, fn: Callable[[], object]) -> object:
        """Capture ``fn`` (which reads and writes only tensors it closes over or returns)
        and return what it returned: tensors the replays write again."""

    def replay(self) -> None:
        ...


class CudaGraphRunner:
    """A CUDA graph, captured on a side stream after one eager warm-up call there (a
    Triton kernel's first launch compiles; cuBLAS and cuSOLVER set up their workspaces
    per stream). Nothing here synchronises the host: torch.cuda.graph's context manager
    does (to free memory first), which would break a step that runs under
    set_sync_debug_mode("error") from its first call. The backward's graph shares the
    forward's memory pool, as torch.cuda.make_graphed_callables does."""

    def __init__(self, pool=None):
        self.graph = torch.cuda.CUDAGraph()
        self.pool = pool
        self.stream = torch.cuda.Stream()

    def capture(self, fn):
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            fn()
            # thread_local: another thread's cudaMalloc (a data loader's pinned memory)
            # does not invalidate this capture.
            self.graph.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                self.graph.capture_end()
        torch.cuda.current_stream().wait_stream(self.stream)
        return out

    def replay(self):
        self.graph.replay()

    def sibling(self) -> "CudaGraphRunner":
        """A runner whose graph shares this one's memory pool (captured after it)."""
        return CudaGraphRunner(self.graph.pool())


class _Entry:
    """One key's static buffers and its two graphs."""

    def __init__(self, u: torch.Tensor, tau: float, ops: HiDeOps, runner: Runner):
        self.u = u.detach().clone()
        self.forward_runner = runner
        captured = {}

        def forward():
            outputs, saved = hide_forward(self.u, tau, False, ops)
            captured["saved"] = saved
            return outputs, saved.tensors

        self.outputs, tensors = runner.capture(forward)
        self.saved = captured["saved"]._replace(tensors=tensors)
        self.generation = 0
        # The backward's warm-up call reads the saved state: a replay fills it first.
        self.run_forward(u)
        self.grads = tuple(torch.zeros_like(t) for t in self.outputs)
        sibling = getattr(runner, "sibling", None)
        self.backward_runner = sibling() if sibling is not None else type(runner)()
        self.grad_u = self.backward_runner.capture(lambda: hide_backward(self.saved, *self.grads))

    def run_forward(self, u: torch.Tensor) -> int:
        """Replay the forward on ``u``; the generation its saved state now belongs to."""
        self.u.copy_(u)
        self.forward_runner.replay()
        self.generation += 1
        return self.generation

    def run_backward(self, grads) -> torch.Tensor:
        for static, grad in zip(self.grads, grads):
            if grad is None:
                static.zero_()
            else:
                static.copy_(grad)
        self.backward_runner.replay()
        return self.grad_u.clone()


class _GraphedHiDe(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, entry: _Entry):
        ctx.entry = entry
        ctx.set_materialize_grads(False)  # an unused factor's gradient: zero_() in place
        ctx.generation = entry.run_forward(u)
        ctx.save_for_backward(u)
        return tuple(t.clone() for t in entry.outputs)

    @staticmethod
    def backward(ctx, grad_z, grad_b, grad_mean):
        refuse_double_backward()
        entry = ctx.entry
        if entry.generation != ctx.generation:  # another forward replayed since
            entry.run_forward(ctx.saved_tensors[0])
        return entry.run_backward((grad_z, grad_b, grad_mean)), None


def graphs_apply(u: torch.Tensor) -> bool:
    """Whether a call on ``u`` may replay a graph (see the module's docstring)."""
    return (not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
            and not (u.is_cuda and torch.cuda.is_current_stream_capturing()))


class GraphCache:
    """HiDe's graphs, one entry per key, made by ``runner()`` (a ``Runner`` class or
    factory; the backward's runner is the forward's ``sibling()`` where it has one).
    backends.py gives the triton backend one on CUDA tensors."""

    def __init__(self, runner: Callable[[], Runner] = CudaGraphRunner):
        self.runner = runner
        self.entries: OrderedDict = OrderedDict()
        self.failed: set = set()

    def _key(self, u: torch.Tensor, tau: float, ops: HiDeOps):
        stream = torch.cuda.current_stream(u.device) if u.is_cuda else None
        return (u.device, stream, tuple(u.shape), u.dtype, float(tau), ops)

    def _entry(self, u, tau, ops) -> _Entry | None:
        key = self._key(u, tau, ops)
        if key in self.failed:
            return None
        entry = self.entries.get(key)
        if entry is None:
            try:
                with torch.no_grad():
                    entry = _Entry(u, tau, ops, self.runner())
            except Exception as err:  # noqa: BLE001 - any capture failure: stay eager
                self.failed.add(key)
                warnings.warn(f"himo_fast: HiDe could not be captured in a CUDA graph for "
                              f"shape {tuple(u.shape)}, {u.dtype}, tau={tau} ({err}); it runs "
                              "eagerly there", stacklevel=5)
                return None
            self.entries[key] = entry
            while len(self.entries) > MAX_ENTRIES:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        return entry

    def factors(self, u: torch.Tensor, tau: float, ops: HiDeOps):
        """(Z, B, ū) of HiDe on ``u`` (compute dtype) with the masked layout, from the
        key's graphs where they apply, else eagerly; gradients as factors._HiDeFactors."""
        entry = self._entry(u, tau, ops) if graphs_apply(u) else None
        if entry is None:
            return _HiDeFactors.apply(u, tau, False, ops)
        return _GraphedHiDe.apply(u, entry)
