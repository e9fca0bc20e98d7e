"""torch.func transforms (grad, functional_call) through the op and the library's models.

PyTorch's custom ops, the form the kernel backends take, do not support torch.func; the
reference's autograd functions do. Under a transform ``backend='auto'`` therefore runs the
reference, a kernel backend named by the caller is a ValueError that says why, and a fused
optimizer (an update inside the backward) is refused. Gradients from ``torch.func.grad`` are
checked against ``.backward()`` of the same call.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autoft_fast
from autoft_fast.models import build_transfer_model
from autoft_fast.ops.fused_optim import FusedOptimizer, Lookup, fused_lookup

from test_models import pretrained_model, tiny_batch, tiny_feature_map, model_cfg


def _inputs(seed, index_dtype, duplicates, shape=(5, 3), v=11, dim=6):
    g = torch.Generator().manual_seed(seed)
    frozen = torch.randn(v, dim, generator=g)
    tuned = frozen + 0.3 * torch.randn(v, dim, generator=g)
    idx = torch.randint(0, 2 if duplicates else v, shape, generator=g).to(index_dtype)
    logits = torch.randn(*shape, 2, generator=g)
    weight = torch.randn(*shape, dim, generator=g)
    return frozen, tuned, idx, logits, weight


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("duplicates", [False, True])
def test_func_grad_of_the_op_equals_backward(backend, index_dtype, hard, duplicates):
    frozen, tuned, idx, logits, w = _inputs(3 + duplicates, index_dtype, duplicates)

    def loss(t, lg, be):
        out, gates = autoft_fast.gated_embedding(idx, frozen, t, lg, tau=0.7, hard=hard,
                                                 seed=5, backend=be)
        return (out * w).sum() + (gates[..., 1] ** 2).sum()

    g_t, g_l = torch.func.grad(loss, argnums=(0, 1))(tuned, logits, backend)
    t, lg = tuned.clone().requires_grad_(), logits.clone().requires_grad_()
    # The kernels' own backward (the default CPU backend) is the other side of the check.
    loss(t, lg, "auto").backward()
    torch.testing.assert_close(g_t, t.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_l, lg.grad, rtol=1e-5, atol=1e-6)
    assert g_t.abs().sum() > 0 and g_l.abs().sum() > 0


def test_func_grad_of_the_bag_op_equals_backward():
    frozen, tuned, _, _, _ = _inputs(7, torch.int64, False)
    g = torch.Generator().manual_seed(8)
    values = torch.randint(0, 11, (9,), generator=g)
    offsets = torch.tensor([0, 3, 3, 7, 9])
    logits = torch.randn(4, 2, generator=g)
    w = torch.randn(4, 6, generator=g)

    def loss(t, lg):
        out, _ = autoft_fast.gated_embedding_bag(values, offsets, frozen, t, lg, mode="mean",
                                                 seed=1)
        return (out * w).sum()

    g_t, g_l = torch.func.grad(loss, argnums=(0, 1))(tuned, logits)
    t, lg = tuned.clone().requires_grad_(), logits.clone().requires_grad_()
    loss(t, lg).backward()
    torch.testing.assert_close(g_t, t.grad)
    torch.testing.assert_close(g_l, lg.grad)


def test_a_kernel_backend_named_under_a_transform_is_a_clear_error():
    frozen, tuned, idx, logits, _ = _inputs(0, torch.int64, False)

    def loss(t):
        return autoft_fast.gated_embedding(idx, frozen, t, logits, seed=0, backend="cpu")[0].sum()

    with pytest.raises(ValueError, match=r"backend 'cpu' cannot run under a torch\.func transform"):
        torch.func.grad(loss)(tuned)
    # Outside a transform the same call runs on the named backend.
    t = tuned.clone().requires_grad_()
    loss(t).backward()
    assert t.grad is not None


def test_a_fused_optimizer_under_a_transform_is_refused():
    frozen, tuned, idx, logits, _ = _inputs(1, torch.int64, False)
    opt = FusedOptimizer("sgd", lr=0.1)
    state = opt.new_state(tuned)

    def gated(t):
        return autoft_fast.gated_embedding(idx, frozen, t, logits, seed=0, optimizer=opt,
                                           optimizer_state=state)[0].sum()

    def plain(t):
        return fused_lookup(t, [Lookup(idx)], opt, state)[0].sum()

    before = tuned.clone()
    for fn, what in ((gated, "gated_embedding with optimizer="), (plain, "fused_lookup")):
        with pytest.raises(ValueError, match=rf"{what} updates the table inside the backward"):
            torch.func.grad(fn)(tuned)
    assert torch.equal(tuned, before)  # refused before anything was written


@pytest.mark.parametrize("strategy", ["autoft", "autoft_field", "finetune_all"])
def test_functional_call_grad_of_a_library_model_equals_backward(strategy):
    fmap = tiny_feature_map()
    data = tiny_batch(fmap, 48)
    torch.manual_seed(4)
    model = build_transfer_model(strategy, pretrained_model("deepfm", fmap, data), fmap,
                                 model_cfg("deepfm"))
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}

    def loss(p):
        torch.manual_seed(9)  # the same gate noise in both passes
        logit = torch.func.functional_call(model, p, (data,))
        return F.binary_cross_entropy_with_logits(logit, data.label)

    grads = torch.func.grad(loss)(params)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(9)
    F.binary_cross_entropy_with_logits(model(data), data.label).backward()
    checked = 0
    for k, p in model.named_parameters():
        if not p.requires_grad or p.grad is None:
            continue
        expect = p.grad.to_dense() if p.grad.is_sparse else p.grad
        torch.testing.assert_close(grads[k], expect, rtol=1e-4, atol=1e-6, msg=k)
        checked += 1
    assert checked >= 3
