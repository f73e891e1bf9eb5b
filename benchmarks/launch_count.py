"""How many launches one HiDe forward+backward makes on the triton backend's CUDA route,
counted on the CPU (Triton's interpreter runs the kernels on CPU tensors):

    python benchmarks/launch_count.py [--n 1024] [--d 768] [--tau 0.9] [--graphs] [--loss]

Triton kernel launches (each interpreted call counted) and torch ops that launch work (a
TorchDispatchMode; views and the interpreter's own tensor copies left out). Eagerly each
costs host time, a few µs through torch's dispatcher and more through Triton's launcher, so
their count is the eager step's host floor whatever the GPU does. Counted here on
2026-12-04 at 128 x 768 and 300 x 260 (the subspace-iteration route of 1024 x 768): both
above issue 15's goals by host time alone; see benchmarks/README.md ("The eager host floor").

``--graphs``: the same step with the stages replayed from their graphs (himo_fast/graphs.py,
the triton backend's default on CUDA): what is left on the host per call, a replay counted
as one launch (a stand-in that does not re-run the kernels). ``--loss``: a whole MoLo
forward+backward (square, n pairs: HiDe, the component products, the fused dual InfoNCE)
instead of HiDe alone.
"""
import argparse
import collections
import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

# Ops that launch nothing (views, metadata, allocation).
NO_LAUNCH = {"view", "t", "transpose", "permute", "expand", "slice", "select", "as_strided",
             "unsqueeze", "squeeze", "diagonal", "alias", "detach", "_unsafe_view", "reshape",
             "unbind", "split", "lift_fresh", "empty", "empty_like", "new_empty",
             "empty_strided"}


class CountedReplay:
    """A graph's stand-in: captured by one eager call, each replay counted, not run."""
    replays = 0

    def capture(self, fn):
        return fn()

    def replay(self):
        CountedReplay.replays += 1


def count(n: int, d: int, tau: float = 0.9, graphs: bool = False, loss: bool = False) -> dict:
    import triton.runtime.interpreter as interpreter
    import himo_fast
    from himo_fast import backends, graphs as stage_graphs

    impl = backends.triton_impl(backends.triton_hide_ops("cuda"),
                                stage_graphs.GraphCache(CountedReplay) if graphs else None)
    g = torch.Generator().manual_seed(0)
    u = (torch.randn(n, d, generator=g, dtype=torch.float64)
         * torch.logspace(0, -3, d, dtype=torch.float64)).float().requires_grad_()
    weight = torch.randn(n, d, generator=g)
    launches, ops, inside = collections.Counter(), collections.Counter(), [False]
    original = interpreter.InterpretedFunction.run

    def run(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        inside[0] = True
        try:
            return original(self, *args, **kwargs)
        finally:
            inside[0] = False

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in NO_LAUNCH and not inside[0]:
                ops[name] += 1
            return func(*args, **(kwargs or {}))

    v = (u.detach() + 0.1 * torch.randn(n, d, generator=g)).requires_grad_()
    s = torch.tensor(10.0, requires_grad=True)
    molo = himo_fast.MoLo(tau=tau)

    def step():
        u.grad = None
        if loss:
            molo._loss(impl, v, u, s, None, False).backward()
        else:
            (impl.reconstruction(u, tau) * weight).sum().backward()

    step()  # first call: the capture preparation's extra solve is not the step's
    interpreter.InterpretedFunction.run = run
    try:
        launches.clear()
        CountedReplay.replays = 0
        with Ops():
            step()
    finally:
        interpreter.InterpretedFunction.run = original
    return dict(n=n, d=d, tau=tau, graphs=graphs, loss=loss, graph_replays=CountedReplay.replays,
                triton_launches=sum(launches.values()),
                torch_ops=sum(ops.values()), triton=dict(launches.most_common()),
                torch=dict(ops.most_common()))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1024)
    p.add_argument("--d", type=int, default=768)
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--graphs", action="store_true", help="the stages replayed from graphs")
    p.add_argument("--loss", action="store_true", help="a whole MoLo step, not HiDe alone")
    a = p.parse_args(argv)
    res = count(a.n, a.d, a.tau, a.graphs, a.loss)
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
