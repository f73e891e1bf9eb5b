"""Compile every Triton kernel of himo_fast.kernels for an H100 (sm_90) without a GPU.

Each launch wrapper runs on small CPU tensors with Triton's launcher replaced by a recorder;
every recorded launch (kernel, argument types, constexprs) is then compiled ahead of time
by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)`` (ptxas included), so a compile error
shows up in CI rather than in a GPU call. Run as a script, TRITON_INTERPRET unset (the
kernels must be JIT functions, not interpreted ones); prints one line per compiled kernel.
"""
import itertools
import os
import sys

os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {torch.float32: "*fp32", torch.float64: "*fp64", torch.bfloat16: "*bf16",
           torch.float16: "*fp16", torch.int32: "*i32"}


def record_launches(run_wrappers):
    launches = []
    original = JITFunction.run
    JITFunction.run = lambda self, *args, grid, warmup, **kwargs: launches.append((self, args, kwargs))
    try:
        run_wrappers()
    finally:
        JITFunction.run = original
    return launches


def source(fn, args, kwargs) -> ASTSource:
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constexprs = {}, {}
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params)):
        value = values[name]
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(i,)] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    return ASTSource(fn, signature, constexprs)


def wrappers():
    import kernels  # the source tree's (himo_fast.kernels when installed)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        u = torch.randn(40, 24).to(dtype)
        mean, x = kernels.centre(u)
        kernels.gram_or_cov(x, gram=False)
        kernels.gram_or_cov(x, gram=True)
        kernels.matmul_bias(u, u.T)
        kernels.matmul_bias(u, u.T, bias=torch.randn(40))
    kernels.jacobi_eigh(torch.eye(6, dtype=torch.float64), sweeps=1)
    # the tridiagonal solver at its three reductions' largest sizes (registers up to 128, one
    # program's tiles up to 256, the grid's above), where register pressure is highest
    for n in (100, 200, 768):
        kernels.tridiagonal_eigh(torch.eye(n, dtype=torch.float64))
    # the one-program reduction at 768: subspace iteration's predicated fallback
    kernels.tridiagonal_eigh(torch.eye(768, dtype=torch.float64), reduction="program",
                             run=torch.zeros(1, dtype=torch.int32))
    # subspace iteration's fused steps: the Chebyshev filter's and the deflated CG's
    blocks = [torch.randn(768, 128, dtype=torch.float64) for _ in range(5)]
    rs = torch.rand(128, dtype=torch.float64)
    b, coef = torch.ones(1, dtype=torch.float64), torch.ones(2, 128, dtype=torch.float64)
    kernels.filter_start(*blocks[:2], b, blocks[2], coef, 1e-8)
    kernels.filter_step(*blocks[:3], b, coef)
    kernels.cg_update(*blocks[:2], rs.clone(), *blocks[2:4], rs)
    kernels.cg_direction(*blocks[:4], rs)
    from kernels import infonce  # the fused dual InfoNCE, square and rectangular

    def forward_backward(branch, s):
        # the component branch in full, and by its b side (its gradient added in place)
        for comp in (branch, branch[1::2]):
            ce, nll = infonce.dual_ce(branch, comp, s, 0, 0.1)
            infonce.dual_ce_backward(ce, nll, nll, branch, comp, s, 0, 0.1)

    for dtype, route in itertools.product(
            (torch.float32, torch.float64, torch.bfloat16, torch.float16), ("recompute", "strips")):
        infonce.BACKWARD = route
        s = torch.tensor(9.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        for n, width in ((40, 24), (24, 600)):
            rows = [torch.randn(24, width).to(dtype) for _ in range(2)]
            cols = [torch.randn(n, width).to(dtype) for _ in range(2)] if n != 24 else []
            forward_backward(rows + cols, s)
    infonce.BACKWARD = "auto"
    torch.set_float32_matmul_precision("high")  # fp32 features with TF32 allowed (open_clip's)
    forward_backward([torch.randn(24, 40) for _ in range(2)], torch.tensor(9.0))
    torch.set_float32_matmul_precision("highest")


def main() -> int:
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    seen = set()
    for fn, args, kwargs in record_launches(wrappers):
        src = source(fn, args, kwargs)
        key = (fn.__name__, tuple(src.signature.items()), tuple(sorted(map(str, src.constants.items()))))
        if key in seen:
            continue
        seen.add(key)
        options = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
        compiled = triton.compile(src, target=TARGET, options=options)
        print(f"{fn.__name__} {','.join(v for v in src.signature.values() if v != 'constexpr')}: "
              f"{len(compiled.asm['cubin'])} bytes of sm_90 cubin, "
              f"{compiled.metadata.shared} bytes shared memory", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
