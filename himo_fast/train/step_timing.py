"""Quick check of the loss: MoLo forward+backward on generated CLIP-like
features (SPEC 5: decaying text spectrum, shared mean direction, correlated images), per
backend, printing the loss, the chosen m and the median time per step. ``--graph``: the
step captured once in a CUDA graph and replayed on each new batch (the triton backend's
HiDe is capturable; a capture that fails ends the process)."""
import argparse
import time

import torch

import himo_fast
from himo_fast.reference import component_count
from himo_fast.synthetic import clip_like_pairs


def clip_like_features(n, d, device, dtype, generator):
    return [x.requires_grad_() for x in clip_like_pairs(n, d, dtype, device, generator)]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m himo_fast", description=__doc__)
    p.add_argument("--n", type=int, default=1024, help="batch size")
    p.add_argument("--d", type=int, default=768, help="embedding dim")
    p.add_argument("--tau", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--backend", action="append", help="repeatable; default: all available")
    p.add_argument("--graph", action="store_true", help="time CUDA-graph replays of the step")
    a = p.parse_args(argv)
    if a.graph and not a.device.startswith("cuda"):
        p.error(f"--graph needs a CUDA device, got --device {a.device}")
    dtype = getattr(torch, a.dtype)
    names = a.backend or himo_fast.available_backends(a.device)
    scale = torch.tensor(100.0, device=a.device, requires_grad=True)
    print(f"N={a.n} d={a.d} tau={a.tau} device={a.device} dtype={a.dtype}")
    for name in names:
        loss = himo_fast.MoLo(tau=a.tau, backend=name)
        g = torch.Generator().manual_seed(0)  # the same batches for every backend
        steps = _graph_steps if a.graph else _eager_steps
        out, u, times = steps(loss, a, dtype, scale, g)
        med = sorted(times[1:])[len(times[1:]) // 2]  # first step is warm-up
        m = int(component_count(u, a.tau))
        print(f"{name + (' (graph)' if a.graph else ''):>10}: global={out['contrastive_loss'].item():.4f} "
              f"component={out['component_loss'].item():.4f} m={m} "
              f"time/step={med * 1e3:.1f} ms")


def _eager_steps(loss, a, dtype, scale, g):
    """Per batch: forward+backward, timed with the device synchronised around it."""
    cuda = a.device.startswith("cuda")
    times = []
    for _ in range(a.steps + 1):
        v, u = clip_like_features(a.n, a.d, a.device, dtype, g)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = loss(v, u, scale, output_dict=True)
        sum(out.values()).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, u, times


def capture(step):
    """``step`` captured once as a CUDA graph, after two warm-up calls on a side stream
    (compiles, workspaces): (the graph, what the captured call returned)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out


def _graph_steps(loss, a, dtype, scale, g):
    """The step captured once on static inputs, then per batch: copy in, replay."""
    v, u = clip_like_features(a.n, a.d, a.device, dtype, g)

    def step():
        for t in (v, u, scale):
            t.grad = None
        out = loss(v, u, scale, output_dict=True)
        sum(out.values()).backward()
        return out
    graph, out = capture(step)
    times = []
    for _ in range(a.steps + 1):
        new_v, new_u = clip_like_features(a.n, a.d, a.device, dtype, g)
        with torch.no_grad():
            v.copy_(new_v)
            u.copy_(new_u)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, u, times


if __name__ == "__main__":
    main()
