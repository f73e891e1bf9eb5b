"""Every torch.library op of himo_fast: the schemas and per-device kernels are in
csrc/ops.cpp (the dispatcher routes by device); their fake kernels and autograd are here,
with the Python callables the stages use. Registered at import, so that nothing registers
while torch.compile traces.

- ``dual_ce(global_branch, comp_branch, scale, label_offset, label_smoothing, keep_logits,
  strip_rows, route, col_grad) -> (ce, nll, logits)``: the fused dual InfoNCE (csrc/dual_infonce.h),
  by GEMM strips of logits (route "strips") or fused tiles ("tiles": tensor-core tiles on
  CUDA for bf16/fp16, their CPU twin on CPU, no logits in memory). Each
  branch is [a_r, b_r] (square) or [a_r, b_r, a_c, b_c]; comp_branch may be its b side
  alone ([b_r] or [b_r, b_c]) when its a side is the global branch's: the backward then adds
  that gradient into the global branch's and returns b's only. ce and nll are [4, B] in the
  scale's dtype (the accumulation dtype: the caller's rule, pca.compute_dtype); logits
  are the forward's dot products when ``keep_logits`` (the backward then skips their
  recompute), else empty. The backward forms g·(softmax - y) per logit from the saved
  nll, so a solved row (one pair) gets exactly zero gradient; ``col_grad`` says how it
  forms a square branch's columns' gradient ("accumulate", "recompute" from the transposed
  weights, no fp32 accumulator; "auto": the device's rule).
- ``sym_eigh(a, algorithm) -> (eigenvalues ascending, eigenvectors, info)``: the symmetric
  eigendecomposition without a host read of the solver's status (cuSOLVER on CUDA).
- ``fused_dual_ce(global_branch, comp_branch, scale, label_offset, label_smoothing) ->
  (ce, nll)``: dual_ce's contract (the short comp_branch included) in fused Triton tiles
  (himo_fast.kernels.infonce), no
  logits in memory. Defined here in Python (CUDA tensors, or CPU ones under
  TRITON_INTERPRET=1), whether or not the C++ extension is built.

``REGISTERED`` is False without the compiled extension (its callables then cannot run).
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import _extension

_LIB = "himo_fast"
# label_offset, label_smoothing, keep_logits, strip_rows, route, col_grad
_DUAL_CE_OPTIONS = (0, 0.0, False, 0, "strips", "auto")


def _refuse_double_backward():
    # The backward ops have no derivative of their own: autograd would treat the gradient
    # as a constant and return a silently wrong second order.
    from .factors import refuse_double_backward
    refuse_double_backward("the compiled dual InfoNCE")


def _per_row(global_branch, scale):
    """An empty [4, B] in the accumulation dtype: the shape of ce and of nll (fake kernels)."""
    a = global_branch[0]
    return a.new_empty((4, a.shape[0]), dtype=scale.dtype)


def _grads_like(global_branch, comp_branch, scale):
    """Empty gradients of the branches and the scale (the backward ops' fake kernels)."""
    return ([torch.empty_like(t) for t in global_branch],
            [torch.empty_like(t) for t in comp_branch], scale.new_empty(()))


def _one_per_input(ctx, *grads):
    """The gradients for the inputs the op was called with. torch 2.11 (the GPU machine's)
    passes the autograd function only the arguments that differ from their defaults and
    wants exactly one gradient each; 2.14 also takes one per schema argument."""
    return grads[:len(ctx.needs_input_grad)]


def _ready(grad, like):
    """An upstream gradient as the backward ops take it: contiguous, zeros where None."""
    return grad.contiguous() if grad is not None else torch.zeros_like(like)


def kept_logits_shape(b: int, n: int, square: bool) -> tuple[int, int, int]:
    """The shape of dual_ce's kept logits: one GEMM per branch square, two otherwise."""
    return (2 if square else 4, b, n)


def _logits_shape(global_branch, keep_logits):
    b = global_branch[0].shape[0]
    square = len(global_branch) == 2
    n = b if square else global_branch[2].shape[0]
    return kept_logits_shape(b, n, square) if keep_logits else (0,)


def _register() -> bool:
    if _extension.extension() is None:
        return False

    @torch.library.register_fake(f"{_LIB}::dual_ce")
    def _(global_branch, comp_branch, scale, label_offset=0, label_smoothing=0.0,
          keep_logits=False, strip_rows=0, route="strips", col_grad="auto"):
        return (_per_row(global_branch, scale), _per_row(global_branch, scale),
                global_branch[0].new_empty(_logits_shape(global_branch, keep_logits),
                                           dtype=scale.dtype))

    @torch.library.register_fake(f"{_LIB}::dual_ce_backward")
    def _(grad_ce, grad_nll, nll, logits, global_branch, comp_branch, scale, label_offset=0,
          label_smoothing=0.0, strip_rows=0, route="strips", col_grad="auto"):
        return _grads_like(global_branch, comp_branch, scale)

    def setup_context(ctx, inputs, output):
        global_branch, comp_branch, scale, *options = inputs
        options = list(options) + list(_DUAL_CE_OPTIONS[len(options):])
        ctx.save_for_backward(*global_branch, *comp_branch, scale, output[1], output[2])
        ctx.mark_non_differentiable(output[2])
        ctx.counts = (len(global_branch), len(comp_branch))
        label_offset, label_smoothing, _keep, strip_rows, route, col_grad = options
        ctx.options = (label_offset, label_smoothing, strip_rows, route, col_grad)

    def backward(ctx, grad_ce, grad_nll, _grad_logits):
        _refuse_double_backward()
        *saved, nll, logits = ctx.saved_tensors
        n_global, n_comp = ctx.counts
        global_branch, comp_branch = saved[:n_global], saved[n_global:n_global + n_comp]
        scale = saved[-1]
        d_global, d_comp, d_scale = torch.ops.himo_fast.dual_ce_backward(
            _ready(grad_ce, nll), _ready(grad_nll, nll), nll, logits, global_branch, comp_branch,
            scale, *ctx.options)
        d_scale = d_scale.to(scale.dtype).reshape(scale.shape)
        return _one_per_input(ctx, list(d_global), list(d_comp), d_scale, None, None, None, None,
                              None, None)

    torch.library.register_autograd(f"{_LIB}::dual_ce", backward, setup_context=setup_context)

    @torch.library.register_fake(f"{_LIB}::sym_eigh")
    def _(a, algorithm="syevd"):  # eigenvectors column-major, as LAPACK and cuSOLVER write them
        return (a.new_empty(a.shape[:1]), a.new_empty(a.shape).mT,
                a.new_empty((), dtype=torch.int32))
    return True


REGISTERED = _register()
# Whether sym_eigh has its cuSOLVER kernel (csrc/sym_eigh_cuda.cu).
SYM_EIGH_ON_CUDA = REGISTERED and _extension.extension().built_with_cusolver()


@torch.library.custom_op(f"{_LIB}::fused_dual_ce", mutates_args=(), device_types=("cuda", "cpu"))
def fused_dual_ce(global_branch: list[Tensor], comp_branch: list[Tensor], scale: Tensor,
                  label_offset: int = 0, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor]:
    """(ce, nll), each [4, B]: dual_ce's, from the fused Triton kernels."""
    from .kernels import infonce  # triton is imported only when this op runs
    return infonce.dual_ce(global_branch, comp_branch, scale, label_offset, label_smoothing)


@torch.library.custom_op(f"{_LIB}::fused_dual_ce_backward", mutates_args=(),
                         device_types=("cuda", "cpu"))
def fused_dual_ce_backward(grad_ce: Tensor, grad_nll: Tensor, nll: Tensor,
                           global_branch: list[Tensor], comp_branch: list[Tensor], scale: Tensor,
                           label_offset: int = 0, label_smoothing: float = 0.0
                           ) -> tuple[list[Tensor], list[Tensor], Tensor]:
    from .kernels import infonce
    return infonce.dual_ce_backward(grad_ce, grad_nll, nll, global_branch, comp_branch, scale,
                                    label_offset, label_smoothing)


@fused_dual_ce.register_fake
def _(global_branch, comp_branch, scale, label_offset=0, label_smoothing=0.0):
    return _per_row(global_branch, scale), _per_row(global_branch, scale)


@fused_dual_ce_backward.register_fake
def _(grad_ce, grad_nll, nll, global_branch, comp_branch, scale, label_offset=0,
      label_smoothing=0.0):
    return _grads_like(global_branch, comp_branch, scale)


def _fused_setup_context(ctx, inputs, output):
    global_branch, comp_branch, scale, *options = inputs
    ctx.save_for_backward(*global_branch, *comp_branch, scale, output[1])
    ctx.counts = (len(global_branch), len(comp_branch))
    ctx.options = tuple(options) + (0, 0.0)[len(options):]


def _fused_backward(ctx, grad_ce, grad_nll):
    _refuse_double_backward()
    *saved, scale, nll = ctx.saved_tensors
    n_global = ctx.counts[0]
    d_global, d_comp, d_scale = fused_dual_ce_backward(
        _ready(grad_ce, nll), _ready(grad_nll, nll), nll, saved[:n_global], saved[n_global:],
        scale, *ctx.options)
    return _one_per_input(ctx, list(d_global), list(d_comp), d_scale.reshape(scale.shape), None,
                          None)


fused_dual_ce.register_autograd(_fused_backward, setup_context=_fused_setup_context)


def dual_ce(global_branch, comp_branch, scale, label_offset: int = 0,
            label_smoothing: float = 0.0, keep_logits: bool = False, strip_rows: int = 0,
            route: str = "strips", col_grad: str = "auto"):
    """(ce, nll), each [4, B]: see the module docstring."""
    ce, nll, _ = torch.ops.himo_fast.dual_ce(list(global_branch), list(comp_branch), scale,
                                             label_offset, label_smoothing, keep_logits,
                                             strip_rows, route, col_grad)
    return ce, nll


def sym_eigh(a: torch.Tensor, algorithm: str = "syevd"):
    """(eigenvalues ascending, eigenvectors) like torch.linalg.eigh, with no host read of
    the solver's status. A failure can only come from non-finite input, which makes the
    loss NaN through the reconstruction anyway."""
    w, v, _ = torch.ops.himo_fast.sym_eigh(a, algorithm)
    return w, v
