"""Two gloo processes: the distributed modes against single-process / per-rank truths."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD, B, D = 2, 6, 10


def _features():
    g = torch.Generator().manual_seed(1234)
    mk = lambda: torch.nn.functional.normalize(torch.randn(WORLD * B, D, generator=g, dtype=torch.float64), dim=-1)
    return mk(), mk()


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _grads(loss, *leaves):
    loss.backward()
    return [t.grad.clone() for t in leaves]


def _worker(rank, init_file, backends):
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import himo_fast
    from official import official_hide, official_loss
    from conftest import loss_rel, rel

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    V, U = _features()
    sl = slice(rank * B, (rank + 1) * B)
    for backend in backends:
        # 1. The authors' recipe: local loss, no-grad gather, per-rank PCA.
        v, u, s = _leaf(V[sl]), _leaf(U[sl]), _leaf(torch.tensor(9.0, dtype=torch.float64))
        loss = himo_fast.MoLo(local_loss=True, gather_with_grad=False, rank=rank, world_size=WORLD,
                              backend=backend)(v, u, s)
        ours = [loss.detach()] + _grads(loss, v, u, s)
        v2, u2, s2 = _leaf(V[sl]), _leaf(U[sl]), _leaf(torch.tensor(9.0, dtype=torch.float64))
        all_comp = torch.cat([official_hide(U[r * B:(r + 1) * B], 0.9) for r in range(WORLD)]).detach()
        ref_loss = sum(official_loss(v2, u2, s2, comp=official_hide(u2, 0.9), all_image=V, all_text=U,
                                     all_comp=all_comp, rank=rank))
        ref = [ref_loss.detach()] + _grads(ref_loss, v2, u2, s2)
        assert loss_rel(ours[0], ref[0]) <= 1e-8, (backend, "recipe loss")
        for a, b in zip(ours[1:], ref[1:]):
            assert rel(a, b) <= 1e-8, (backend, "recipe grad")

        # 2. Global PCA with gradient through the gather equals the whole-batch loss.
        Vw, Uw, sw = _leaf(V), _leaf(U), _leaf(torch.tensor(9.0, dtype=torch.float64))
        whole = himo_fast.MoLo(backend="reference")(Vw, Uw, sw)
        whole_g = _grads(whole, Vw, Uw, sw)
        for local_loss in (False, True):
            v, u, s = _leaf(V[sl]), _leaf(U[sl]), _leaf(torch.tensor(9.0, dtype=torch.float64))
            loss = himo_fast.MoLo(local_loss=local_loss, gather_with_grad=True, rank=rank,
                                  world_size=WORLD, pca_scope="global", backend=backend)(v, u, s)
            gv, gu, gs = _grads(loss, v, u, s)
            mean_loss = loss.detach().clone()
            dist.all_reduce(mean_loss)
            mean_loss /= WORLD
            assert loss_rel(mean_loss, whole.detach()) <= 1e-8, (backend, local_loss)
            if not local_loss:
                assert loss_rel(loss.detach(), whole.detach()) <= 1e-8
            assert rel(gv, WORLD * whole_g[0][sl]) <= 1e-8, (backend, local_loss, "v")
            assert rel(gu, WORLD * whole_g[1][sl]) <= 1e-8, (backend, local_loss, "u")
            dist.all_reduce(gs)  # summed over ranks: world_size x the whole-batch gradient
            assert rel(gs, WORLD * whole_g[2]) <= 1e-8, (backend, local_loss, "scale")
        # 3. label_smoothing=0: the global branch is open_clip's ClipLoss, every flag combination.
        from open_clip.loss import ClipLoss
        for local_loss in (False, True):
            for with_grad in (False, True):
                flags = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=WORLD)
                v, u, s = _leaf(V[sl]), _leaf(U[sl]), _leaf(torch.tensor(9.0, dtype=torch.float64))
                ours = himo_fast.MoLo(label_smoothing=0.0, backend=backend, **flags)(
                    v, u, s, output_dict=True)["contrastive_loss"]
                g_ours = _grads(ours, v, u, s)
                v2, u2, s2 = _leaf(V[sl]), _leaf(U[sl]), _leaf(torch.tensor(9.0, dtype=torch.float64))
                theirs = ClipLoss(**flags)(v2, u2, s2)
                g_theirs = _grads(theirs, v2, u2, s2)
                assert loss_rel(ours.detach(), theirs.detach()) <= 1e-12, (backend, flags)
                for a, b in zip(g_ours, g_theirs):
                    assert rel(a, b) <= 1e-10, (backend, flags)
    dist.destroy_process_group()


def test_two_process_gloo_modes():
    import himo_fast
    # triton: its Triton kernels (HiDe and the fused dual InfoNCE) through the interpreter
    # here, so the gathered, rectangular recipe goes through the fused op too.
    backends = [b for b in ("reference", "cpu", "triton") if b in himo_fast.available_backends("cpu")]
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), backends), nprocs=WORLD, join=True)


def _misconfigured_worker(rank, init_file, case, results):
    """One rank of a misconfigured run: reports the error it raised (or 'ok')."""
    import datetime
    import himo_fast
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    b = B if (case != "uneven" or rank == 0) else B // 2
    v = torch.nn.functional.normalize(torch.randn(b, D, dtype=torch.float64), dim=-1)
    u = torch.nn.functional.normalize(torch.randn(b, D, dtype=torch.float64), dim=-1)
    tau = 0.9 if (case != "tau" or rank == 0) else 0.8
    try:
        himo_fast.MoLo(tau=tau, local_loss=True, rank=rank, world_size=WORLD)(v, u, 9.0)
        results.put((rank, "ok"))
    except ValueError as exc:
        results.put((rank, str(exc)))
    dist.destroy_process_group()


def _run_ranks(target, *args, nprocs=WORLD, timeout=120):
    """Run ``target(rank, init_file, *args, results)`` in nprocs processes; never hangs."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=target, args=(r, os.path.join(tmp, "init"), *args, results))
                 for r in range(nprocs)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.terminate()
        assert not alive, f"{len(alive)} rank(s) hung"
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return dict(results.get(timeout=5) for _ in range(nprocs))


@pytest.mark.parametrize("case,needle", [("uneven", "batch sizes differ across ranks: [6, 3]"),
                                         ("tau", "configurations differ")])
def test_misconfigured_ranks_raise_on_every_rank(case, needle):
    out = _run_ranks(_misconfigured_worker, case)
    assert all(needle in msg for msg in out.values()), out


def _single_rank_worker(rank, init_file, results):
    import himo_fast
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=0, world_size=1)
    v = torch.nn.functional.normalize(torch.randn(4, D, dtype=torch.float64), dim=-1)
    try:
        himo_fast.MoLo(world_size=2, gather_with_grad=True)(v, v.clone(), 9.0)
        results.put((rank, "ok"))
    except ValueError as exc:
        results.put((rank, str(exc)))
    dist.destroy_process_group()


def test_world_size_disagreeing_with_the_group_raises():
    out = _run_ranks(_single_rank_worker, nprocs=1)
    assert "disagree with the process group (rank 0 of 1)" in out[0], out


def test_world_size_without_a_process_group_raises():
    import himo_fast
    v = torch.nn.functional.normalize(torch.randn(4, D, dtype=torch.float64), dim=-1)
    with pytest.raises(ValueError, match="no torch.distributed process group"):
        himo_fast.MoLo(world_size=2)(v, v.clone(), 9.0)
