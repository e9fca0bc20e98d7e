"""Every bad input of the contract raises the named exception, on every backend."""

import math

import pytest
import torch

import autoft_fast
from autoft_fast.ops import registry
from conftest import KERNEL_BACKENDS

BACKENDS = [("reference", "cpu")] + KERNEL_BACKENDS


def good(device="cpu", n=6, rows=10, dim=4):
    f = torch.randn(rows, dim, device=device)
    return dict(indices=torch.randint(0, rows, (n,), device=device), frozen_weight=f,
                tuned_weight=f.clone(), logits=torch.zeros(n, 2, device=device))


def call(backend, **kw):
    args = {k: kw.pop(k) for k in ("indices", "frozen_weight", "tuned_weight", "logits")}
    return autoft_fast.gated_embedding(**args, backend=backend, **kw)


@pytest.fixture(params=BACKENDS, ids=lambda p: f"{p[0]}-{p[1]}")
def bd(request):
    return request.param


def test_index_out_of_range(bd):
    backend, device = bd
    for bad_value in (10, -1, 1000007):
        kw = good(device)
        kw["indices"][3] = bad_value
        with pytest.raises(IndexError, match=rf"indices\[3\] = {bad_value} is out of range for a table of 10 rows"):
            call(backend, **kw)


def test_index_error_names_flat_position(bd):
    backend, device = bd
    kw = good(device)
    kw["indices"] = kw["indices"].reshape(2, 3)
    kw["logits"] = kw["logits"].reshape(2, 3, 2)
    kw["indices"][1, 1] = 99
    with pytest.raises(IndexError, match=r"indices\[4\] = 99"):
        call(backend, **kw)


@pytest.mark.parametrize("field,value,exc,words", [
    ("frozen_weight", torch.zeros(10, 5), ValueError, "same \\[V, D\\] shape"),
    ("tuned_weight", torch.zeros(10, 4, 1), ValueError, "tuned_weight must be a 2-D"),
    ("frozen_weight", torch.zeros(40), ValueError, "frozen_weight must be a 2-D"),
    ("logits", torch.zeros(6, 3), ValueError, "logits must have shape"),
    ("logits", torch.zeros(2, 3, 2), ValueError, "logits must have shape"),
    ("logits", torch.zeros(6, 2, dtype=torch.float16), TypeError, "logits must be"),
    ("indices", torch.zeros(6), TypeError, "indices must be int32 or int64"),
    ("indices", torch.zeros(6, dtype=torch.int16), TypeError, "indices must be int32 or int64"),
    ("frozen_weight", torch.zeros(10, 4, dtype=torch.int32), TypeError, "frozen_weight must be one of"),
    ("tuned_weight", torch.zeros(10, 4, dtype=torch.float16), TypeError, "same dtype"),
])
def test_bad_tensors(bd, field, value, exc, words):
    backend, device = bd
    kw = good(device)
    kw[field] = value.to(device)
    with pytest.raises(exc, match=words):
        call(backend, **kw)


@pytest.mark.parametrize("tau", [0, -1.0, math.inf, math.nan])
def test_bad_tau(bd, tau):
    backend, device = bd
    with pytest.raises(ValueError, match="tau"):
        call(backend, **good(device), tau=tau)


@pytest.mark.parametrize("seed,exc", [(-1, ValueError), (2**63, ValueError), (1.5, TypeError)])
def test_bad_seed(bd, seed, exc):
    backend, device = bd
    with pytest.raises(exc, match="seed"):
        call(backend, **good(device), seed=seed)


def test_bad_uniforms(bd):
    backend, device = bd
    with pytest.raises(ValueError, match="uniforms must have the shape"):
        call(backend, **good(device), uniforms=torch.rand(5, device=device))
    with pytest.raises(ValueError, match=r"uniforms\[2\] = 1.0 is outside \[0, 1\)"):
        u = torch.rand(6, device=device)
        u[2] = 1.0
        call(backend, **good(device), uniforms=u)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend = 'fast'"):
        call("fast", **good())


def test_backend_on_a_device_it_does_not_serve():
    with pytest.raises(ValueError, match="backend = 'cuda' is not available for tensors on cpu"):
        call("cuda", **good())


def test_mixed_devices():
    kw = good()
    kw["logits"] = kw["logits"].to("meta")
    with pytest.raises(ValueError, match="one device"):
        call("reference", **kw)


def test_kernel_ops_check_inputs_themselves(backend_device):
    """Direct callers of torch.ops.autoft_fast.* get the contract's errors, not a crash."""
    backend, device = backend_device
    op = registry.REGISTRY[backend].ops()[0]
    kw = good(device)
    seed = torch.zeros((), dtype=torch.int64)
    idx = kw["indices"].clone()
    idx[2] = 12
    with pytest.raises(IndexError, match=r"indices\[2\] = 12"):
        op(idx, kw["frozen_weight"], kw["tuned_weight"], kw["logits"], seed, None, 1.0, True, True, False)
    with pytest.raises(ValueError, match="tau"):
        op(kw["indices"], kw["frozen_weight"], kw["tuned_weight"], kw["logits"], seed, None, -1.0, True, True, False)


def test_empty_input(bd):
    backend, device = bd
    f = torch.randn(10, 4, device=device)
    t = f.clone().requires_grad_()
    lg = torch.zeros(0, 3, 2, device=device, requires_grad=True)
    out, gates = autoft_fast.gated_embedding(torch.zeros(0, 3, dtype=torch.long, device=device),
                                             f, t, lg, backend=backend)
    assert out.shape == (0, 3, 4) and gates.shape == (0, 3, 2)
    out.sum().backward()
    assert t.grad is not None and not t.grad.any()
