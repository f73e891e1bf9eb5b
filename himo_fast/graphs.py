"""Stages replayed from CUDA graphs: a stage's forward and its backward each captured once
per (stage, device, stream, input shapes and dtypes, fp32 matmul precision), then one replay
a call. The triton backend on CUDA runs HiDe (factors.HiDeStage) and the fused dual
InfoNCE (dual_infonce.FusedDualCE) this way (backends.py).

Why: eagerly they are host-bound at the sizes of the paper's recipe. One HiDe
forward+backward dispatches 16 Triton launches and ≈ 75 torch ops at 128 x 768, ≈ 520 on
the subspace route of 1024 x 768 (benchmarks/launch_count.py), several µs of host time
each, against issue 15's goals of 0.25 ms and 1.5 ms. A replay is one launch for the whole
graph; what remains on the host is the inputs copied in, the replay and the outputs
cloned out, in each direction.

How a graph stays correct where an eager call would be:
- The outputs and the inputs' gradients are cloned out of the static buffers, so a later
  call never overwrites a result the caller holds.
- Each forward replay bumps the entry's generation. A backward whose forward is not the
  latest one (two calls before one backward, activation checkpointing) replays its forward
  first, from the inputs it saved: the saved state is then its own again.
- Each stream has entries of its own, so that replays on two streams never share buffers.
- Eager (``stage.eager``, the autograd op) where a graph cannot be or does not pay: while
  the stream is already capturing (an outer graph holds the kernels), on a CUDA device
  other than the current one, under torch.compile (it traces the eager path), in
  inference mode (its tensors cannot be copied into later), above ``MAX_ELEMENTS`` input
  elements (a graph's private memory pool keeps its temporaries between calls, and there
  the device time dwarfs the launches), where the stage says a graph would be slower
  (``stage.graphable``: HiDe where its eigensolver while capturing is not the eager one,
  backends._pca_captures_well), and for every key whose capture failed (warned once).
- The stage's constants (τ, the eigensolver route, the label offset) are in its key;
  module-level knobs (backends.SUBSPACE_ITERATION_MAX, the kernels' block sizes) are read
  when a key is captured, not at each replay.

A stage (``Stage``) is a hashable value with four methods: ``forward`` and ``backward``
as plain functions on tensors (no autograd inside, every decision on the device, so that
they capture), ``eager``, the same computation as an autograd op, and ``graphable``.
``CudaGraphRunner`` captures and replays; the tests hold the buffer, clone and generation
logic to the eager path with a stand-in that re-runs the captured function into the same
buffers.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Callable, Protocol

import torch

from .factors import refuse_double_backward

# Entries kept per cache (least recently used dropped first). A key is one stage, shapes,
# dtype, device and stream: a training run uses two per stage (HiDe and the dual InfoNCE;
# a last, smaller batch adds its own).
MAX_ENTRIES = 8
# Graphs only for stages whose inputs hold at most this many elements (4M: N = 4096 texts
# of d = 1024, the paper-rank and single-1k workloads several times over). Above it a
# stage's device time dwarfs its launches, and the graph's private pool would keep its
# temporaries (HiDe's float64 copy of the batch, the InfoNCE's strips) between calls.
MAX_ELEMENTS = 1 << 22


class Stage(Protocol):
    def forward(self, inputs: tuple) -> tuple:
        """(outputs, saved tensors, constants): the constants (Python values the backward
        needs) must be the same for every call of one key."""

    def backward(self, inputs: tuple, saved: tuple, constants, grads: tuple) -> tuple:
        """The inputs' gradients (one per input, or None) from the outputs' (each a
        tensor: None is passed as zeros)."""

    def eager(self, *inputs):
        """The outputs, as an autograd op (where no graph applies)."""

    def graphable(self, inputs: tuple) -> bool:
        """Whether a graph of the stage on these inputs is as fast as eager kernels (a
        stage may run other kernels while capturing)."""


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

    def __init__(self, stage: Stage, inputs: tuple, runner: Runner):
        self.stage = stage
        self.inputs = tuple(t.detach().clone(memory_format=torch.contiguous_format)
                            for t in inputs)
        self.forward_runner = runner
        constants = []

        def forward():
            outputs, saved, const = stage.forward(self.inputs)
            constants.append(const)
            return tuple(outputs), tuple(saved)

        self.outputs, self.saved = runner.capture(forward)
        self.constants = constants[-1]
        self.generation = 0
        # The backward's warm-up call reads the saved state: a replay fills it first.
        self.run_forward(inputs)
        self.grads = tuple(torch.zeros_like(t) for t in self.outputs)
        sibling = getattr(runner, "sibling", None)
        self.backward_runner = sibling() if sibling is not None else type(runner)()
        self.grad_inputs = self.backward_runner.capture(lambda: tuple(
            stage.backward(self.inputs, self.saved, self.constants, self.grads)))

    def run_forward(self, inputs: tuple) -> int:
        """Replay the forward on ``inputs``; the generation its saved state now belongs to."""
        for static, t in zip(self.inputs, inputs):
            static.copy_(t)
        self.forward_runner.replay()
        self.generation += 1
        return self.generation

    def run_backward(self, grads: tuple) -> tuple:
        for static, grad in zip(self.grads, grads):
            if grad is None:
                static.zero_()
            else:
                static.copy_(grad)
        self.backward_runner.replay()
        return tuple(None if g is None else g.clone() for g in self.grad_inputs)


class _Graphed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry: _Entry, *inputs):
        ctx.entry = entry
        ctx.set_materialize_grads(False)  # an unused output's gradient: zero_() in place
        ctx.generation = entry.run_forward(inputs)
        ctx.save_for_backward(*inputs)
        return tuple(t.clone() for t in entry.outputs)

    @staticmethod
    def backward(ctx, *grads):
        refuse_double_backward(f"the fused backward of {type(ctx.entry.stage).__name__}")
        entry = ctx.entry
        if entry.generation != ctx.generation:  # another forward replayed since
            entry.run_forward(ctx.saved_tensors)
        return (None, *entry.run_backward(grads))


def graphs_apply(inputs: tuple) -> bool:
    """Whether a call on ``inputs`` may replay a graph (see the module's docstring). On
    CUDA, only on the current device (whose streams the runner captures on)."""
    first = inputs[0]
    if first.is_cuda and (first.device.index != torch.cuda.current_device()
                          or torch.cuda.is_current_stream_capturing()):
        return False
    return (not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
            and sum(t.numel() for t in inputs) <= MAX_ELEMENTS)


class GraphCache:
    """Stages' graphs, one entry per key, made by ``runner()`` (a ``Runner`` class or
    factory; the backward's runner is the forward's ``sibling()`` where it has one).
    Call it as ``cache(stage, *inputs)`` -> the stage's outputs, with autograd."""

    def __init__(self, runner: Callable[[], Runner] = CudaGraphRunner):
        self.runner = runner
        self.entries: OrderedDict = OrderedDict()
        self.failed: set = set()

    @staticmethod
    def _key(stage: Stage, inputs: tuple):
        first = inputs[0]
        stream = torch.cuda.current_stream(first.device) if first.is_cuda else None
        # The fp32 matmul precision is fixed in a graph when it is captured (cuBLAS's math
        # mode, the Triton products' dot precision): a change (open_clip turns TF32 on)
        # gets graphs of its own.
        return (stage, first.device, stream, tuple((tuple(t.shape), t.dtype) for t in inputs),
                torch.get_float32_matmul_precision())

    def _entry(self, stage: Stage, inputs: tuple) -> _Entry | None:
        key = self._key(stage, inputs)
        if key in self.failed:
            return None
        entry = self.entries.get(key)
        if entry is None:
            try:
                with torch.no_grad():
                    entry = _Entry(stage, inputs, self.runner())
            except Exception as err:  # noqa: BLE001 - any capture failure: stay eager
                self.failed.add(key)
                warnings.warn(f"himo_fast: {type(stage).__name__} could not be captured in a "
                              f"CUDA graph for inputs {key[3]} ({err}); it runs eagerly "
                              "there", stacklevel=4)
                return None
            self.entries[key] = entry
            while len(self.entries) > MAX_ENTRIES:
                self.entries.popitem(last=False)
        self.entries.move_to_end(key)
        return entry

    def __call__(self, stage: Stage, *inputs):
        entry = (self._entry(stage, inputs)
                 if graphs_apply(inputs) and stage.graphable(inputs) else None)
        if entry is None:
            return stage.eager(*inputs)
        return _Graphed.apply(entry, *inputs)
