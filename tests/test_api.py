"""The public contract (SPEC 2 and 4): arguments, dispatch, the open_clip drop-in."""
import pytest
import torch
from open_clip.loss import ClipLoss

import himo_fast
from himo_fast import backends
from conftest import loss_rel, pairs, rel


def _call(**kw):
    v, u = pairs(4, 8, torch.float32, requires_grad=False)
    args = dict(image_features=v, text_features=u, logit_scale=torch.tensor(10.0))
    args.update(kw)
    return himo_fast.MoLo()(**args)


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(tau=0.0), ValueError, "tau"), (dict(tau=1.5), ValueError, "tau"),
    (dict(tau="0.9"), TypeError, "tau"), (dict(tau=float("nan")), ValueError, "tau"),
    (dict(lam=-0.1), ValueError, "lam"), (dict(label_smoothing=1.0), ValueError, "label_smoothing"),
    (dict(label_smoothing=-0.1), ValueError, "label_smoothing"),
    (dict(rank=2, world_size=2), ValueError, "rank"), (dict(world_size=0), ValueError, "world_size"),
    (dict(rank=1.0, world_size=2), TypeError, "rank"), (dict(pca_scope="batch"), ValueError, "pca_scope"),
    (dict(backend="fastest"), ValueError, "backend"), (dict(backend=3), TypeError, "backend"),
    (dict(local_loss="yes"), TypeError, "local_loss"),
])
def test_bad_constructor_arguments(kwargs, exc, needle):
    with pytest.raises(exc, match=needle) as info:
        himo_fast.MoLo(**kwargs)
    value = list(kwargs.values())[0]
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize("kwargs,exc,needle", [
    (dict(image_features=torch.randn(4, 8, 1)), ValueError, "image_features"),
    (dict(image_features=torch.randn(5, 8)), ValueError, "text_features shape"),
    (dict(text_features=torch.randn(4, 8, dtype=torch.float64)), TypeError, "dtype"),
    (dict(image_features=torch.randint(0, 3, (4, 8))), TypeError, "image_features"),
    (dict(image_features=[[0.0] * 8] * 4), TypeError, "image_features"),
    (dict(logit_scale=torch.ones(2)), ValueError, "logit_scale"),
    (dict(logit_scale="10"), TypeError, "logit_scale"),
    (dict(logit_scale=True), TypeError, "logit_scale"),
    (dict(logit_scale=torch.tensor(10)), TypeError, "logit_scale"),
    (dict(logit_bias=torch.zeros(3)), ValueError, "logit_bias"),
    (dict(image_features=torch.randn(0, 8), text_features=torch.randn(0, 8)), ValueError, "non-empty"),
])
def test_bad_call_arguments(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        _call(**kwargs)


def test_hide_bad_arguments():
    with pytest.raises(ValueError, match="tau"):
        himo_fast.hide(torch.randn(4, 8), tau=0.0)
    with pytest.raises(ValueError, match="text_features"):
        himo_fast.hide(torch.randn(8))
    with pytest.raises(ValueError, match="backend"):
        himo_fast.hide(torch.randn(4, 8), backend="nope")


def test_available_backends_and_selection(monkeypatch):
    cpu = himo_fast.available_backends("cpu")
    assert cpu[0] == "reference" or "reference" in cpu
    on_cuda = himo_fast.available_backends(torch.device("cuda"))
    if torch.cuda.is_available():
        assert "reference" in on_cuda
    else:  # only what can run there: nothing, without a GPU
        assert on_cuda == []
        with pytest.raises(ValueError, match="no CUDA device"):
            backends.select("reference", "cuda")
    assert "cuda" not in cpu
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.select("auto", "cpu").name == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "nonsense")
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.select("auto", "cpu")
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends.select("auto", "cpu").name == ("cpu" if "cpu" in cpu else "reference")
    with pytest.raises(ValueError, match="cannot run on cpu"):
        backends.select("cuda", "cpu")


def test_compiled_backend_is_built_here():
    # CI builds the extension; a silent fallback to the reference would hide a broken build.
    assert "cpu" in himo_fast.available_backends("cpu"), himo_fast._extension.unavailable_reason()


def test_output_dict_and_scalar_agree():
    v, u = pairs(16, 24, torch.float64, requires_grad=False)
    s = torch.tensor([12.0], dtype=torch.float64)
    loss = himo_fast.MoLo(lam=0.5)
    d = loss(v, u, s, output_dict=True)
    assert set(d) == {"contrastive_loss", "component_loss"}
    assert loss_rel(sum(d.values()), loss(v, u, s)) <= 1e-12
    half = himo_fast.MoLo(lam=0.25)(v, u, s, output_dict=True)["component_loss"]
    assert loss_rel(2 * half, d["component_loss"]) <= 1e-12


@pytest.mark.parametrize("backend", himo_fast.available_backends("cpu"))
def test_global_branch_equals_clip_loss(backend):
    v, u = pairs(24, 40, torch.float64)
    s = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-3.0, dtype=torch.float64, requires_grad=True)
    ours = himo_fast.MoLo(label_smoothing=0.0, backend=backend)(v, u, s, b, output_dict=True)["contrastive_loss"]
    ours.backward()
    g_ours = [t.grad.clone() for t in (v, u, s)]
    for t in (v, u, s):
        t.grad = None
    theirs = ClipLoss()(v, u, s, b)
    theirs.backward()
    assert loss_rel(ours, theirs) <= 1e-12
    for a, c in zip(g_ours, (v.grad, u.grad, s.grad)):
        assert rel(a, c) <= 1e-10
    assert abs(b.grad.item()) <= 1e-12  # shift invariance: the bias gets an exactly-zero gradient


def test_hide_shape_dtype_and_backends_agree():
    _, u = pairs(20, 12, torch.float32, requires_grad=False)
    outs = [himo_fast.hide(u, 0.9, backend=b) for b in himo_fast.available_backends("cpu")]
    for out in outs:
        assert out.shape == u.shape and out.dtype == torch.float32
        assert rel(out, outs[0]) <= 1e-5
    assert himo_fast.hide(u.bfloat16()).dtype == torch.float32


@pytest.mark.parametrize("backend", himo_fast.available_backends("cpu"))
def test_autocast_region_does_not_lower_precision(backend):
    """open_clip calls the loss inside autocast: MoLo still computes in float32."""
    v, u = pairs(40, 24, torch.float32, seed=3)
    s = torch.tensor(20.0, requires_grad=True)
    loss = himo_fast.MoLo(backend=backend)
    plain = loss(v, u, s)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto = loss(v, u, s)
        hidden = himo_fast.hide(u, 0.9, backend=backend)
    assert auto.dtype == torch.float32 and hidden.dtype == torch.float32
    assert loss_rel(auto, plain) <= 1e-6
    assert rel(hidden, himo_fast.hide(u, 0.9, backend=backend)) <= 1e-6


def test_python_float_logit_scale_and_bias_like_clip_loss():
    v, u = pairs(8, 12, torch.float32, requires_grad=False)
    loss = himo_fast.MoLo(label_smoothing=0.0)
    as_tensor = loss(v, u, torch.tensor(10.0), torch.tensor(-2.0), output_dict=True)
    as_float = loss(v, u, 10.0, -2.0, output_dict=True)
    assert as_float == as_tensor
    clip = ClipLoss()(v, u, 10.0)
    assert loss_rel(as_float["contrastive_loss"], clip) <= 1e-6


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("backend", himo_fast.available_backends("cpu"))
def test_non_finite_logit_bias_makes_every_loss_nan(backend, bad):
    v, u = pairs(8, 12, torch.float32, requires_grad=False)
    out = himo_fast.MoLo(backend=backend)(v, u, 10.0, torch.tensor(bad), output_dict=True)
    assert all(torch.isnan(x) for x in out.values()), out


@pytest.mark.parametrize("backend", himo_fast.available_backends("cpu"))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_one_pair_loss_is_zero_never_negative(backend, eps):
    """One pair: the exact loss is 0. The reference gives 0, and so does the fused Triton
    op (its label logit is one dot product everywhere); the strip kernels round the label
    logit apart from the GEMM's, so they may give a few ulp(s) above, never below."""
    for seed in range(8):
        v, u = pairs(1, 768, torch.float32, seed=seed, requires_grad=False)
        out = himo_fast.MoLo(label_smoothing=eps, backend=backend)(v, u, 100.0, output_dict=True)
        values = [float(x) for x in out.values()]
        if backend in ("reference", "triton"):
            assert values == [0.0, 0.0], (seed, out)
        assert all(0.0 <= x <= 1e-3 for x in values), (seed, out)


def test_meta_tensors_propagate_shapes():
    """Meta tensors (FSDP / meta-init): forward and backward give shapes, no data."""
    assert himo_fast.available_backends("meta") == ["reference"]
    v, u = (torch.empty(6, 16, device="meta", requires_grad=True) for _ in range(2))
    s = torch.empty((), device="meta", requires_grad=True)
    out = himo_fast.MoLo()(v, u, s, output_dict=True)
    assert all(x.device.type == "meta" and x.shape == () for x in out.values())
    sum(out.values()).backward()
    assert v.grad.shape == v.shape and u.grad.shape == u.shape and s.grad.shape == ()
    assert himo_fast.hide(u).shape == u.shape
