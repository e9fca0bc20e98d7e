"""The fused optimizer's row update inside a backend's backward kernel (the CPU C++ backward).

A backend row with ``fused_backward`` updates the touched tuned rows in the kernel, from each
row's float32 gradient sum as soon as it is made; these tests hold it to the torch-ops update
of ``FusedOptimizer.apply`` (the reference backend's path) and check that the Python update
never runs for it.
"""

from __future__ import annotations

import pytest
import torch

import autoft_fast
from autoft_fast.ops import fused_optim, quant, registry
from autoft_fast.ops.fused_optim import RULES, FusedOptimizer, fused_updates_paused

from op_helpers import case_generator, make_inputs

IN_KERNEL = [n for n in autoft_fast.available_backends("cpu")
             if registry.REGISTRY[n].fused_backward is not None
             and "cpu" in registry.REGISTRY[n].update_devices]
pytestmark = pytest.mark.skipif(not IN_KERNEL, reason="no backend here updates rows in its kernel")


def _steps(backend, kind, inp, *, steps, hard, frozen=None, monkeypatch=None):
    opt = FusedOptimizer(kind, lr=0.05)
    tuned = inp["tuned"].clone().requires_grad_()
    state = opt.new_state(tuned)
    grads = []
    for step in range(steps):
        logits = inp["logits"].clone().requires_grad_()
        out, gates = autoft_fast.gated_embedding(
            inp["indices"], inp["frozen"] if frozen is None else frozen, tuned, logits,
            seed=inp["seed"] + step, hard=hard, backend=backend, optimizer=opt,
            optimizer_state=state)
        ((out.double() * inp["grad_out"].double()).sum()
         + (gates.double() * inp["grad_gates"].double()).sum()).backward()
        grads.append(logits.grad)
    return tuned.detach(), state, grads


@pytest.mark.parametrize("backend", IN_KERNEL)
@pytest.mark.parametrize("kind", sorted(RULES))
@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("dim,duplicates", [(1, False), (4, True), (16, False), (17, False)])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_kernel_update_equals_the_torch_ops_update(backend, kind, hard, dim, duplicates,
                                                   index_dtype, monkeypatch):
    gen = case_generator("in-kernel", backend, kind, hard, dim, duplicates, index_dtype)
    inp = make_inputs((48, 3), 29, dim, gen=gen, duplicates=duplicates, index_dtype=index_dtype)
    want_w, want_state, want_g = _steps("reference", kind, inp, steps=3, hard=hard)

    def python_update_used(*args, **kwargs):
        raise AssertionError("the Python row update ran for a backend that updates in its kernel")

    monkeypatch.setattr(fused_optim.FusedOptimizer, "apply", python_update_used)
    got_w, got_state, got_g = _steps(backend, kind, inp, steps=3, hard=hard)
    assert not torch.equal(got_w, inp["tuned"])
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-6)
    for name in want_state:
        torch.testing.assert_close(got_state[name], want_state[name], rtol=1e-5, atol=1e-7)
    assert int(got_state["step"]) == 3
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    if hard:
        # Rows that no lookup chose tuned are not touched (lazy state).
        untouched = torch.ones(29, dtype=torch.bool)
        untouched[inp["indices"].reshape(-1).long()] = False
        assert torch.equal(got_w[untouched], inp["tuned"][untouched])


@pytest.mark.parametrize("backend", IN_KERNEL)
def test_kernel_update_with_an_int8_frozen_table(backend):
    inp = make_inputs((40,), 13, 6, gen=case_generator("in-kernel-int8", backend))
    low = quant.quantize_int8(inp["frozen"])
    got, _, _ = _steps(backend, "adam", inp, steps=2, hard=True, frozen=low)
    want, _, _ = _steps("reference", "adam", inp, steps=2, hard=True, frozen=quant.dequantize(low))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", IN_KERNEL)
def test_paused_kernel_backend_leaves_table_and_state_alone(backend):
    inp = make_inputs((8, 3), 20, 4, gen=case_generator("paused-kernel", backend))
    opt = FusedOptimizer("rowwise_adagrad", lr=0.1)
    tuned = inp["tuned"].clone().requires_grad_()
    state = opt.new_state(tuned)
    logits = inp["logits"].clone().requires_grad_()
    with fused_updates_paused():
        out, _ = autoft_fast.gated_embedding(inp["indices"], inp["frozen"], tuned, logits,
                                             seed=1, backend=backend, optimizer=opt,
                                             optimizer_state=state)
        (out * inp["grad_out"]).sum().backward()
    assert torch.equal(tuned.detach(), inp["tuned"])
    assert not state["sum"].any() and int(state["step"]) == 0
    assert logits.grad.abs().sum() > 0


def test_update_op_checks_its_arguments():
    op = torch.ops.autoft_fast.gated_embedding_bwd_update
    inp = make_inputs((6,), 10, 4)
    w = inp["tuned"].clone()
    args = (inp["grad_out"], None, inp["indices"], inp["frozen"], w, inp["logits"],
            torch.tensor(0), None, 1.0, True, True)
    empty = torch.empty(0)
    with pytest.raises(ValueError, match="rule must be 0 .* got rule = 7"):
        op(*args, empty, empty, 7, 0.1, 0.0, 0.9, 0.999, 1)
    with pytest.raises(ValueError, match=r"state_a must be a contiguous float32 tensor of shape \[10\]"):
        op(*args, torch.zeros(9), empty, 1, 0.1, 1e-10, 0.9, 0.999, 1)
    with pytest.raises(TypeError, match="state_b must be float32"):
        op(*args, torch.zeros(10, 4), torch.zeros(10, 4, dtype=torch.float64), 2, 0.1, 1e-8, 0.9,
           0.999, 1)
    with pytest.raises(ValueError, match="step must be >= 1"):
        op(*args, empty, empty, 0, 0.1, 0.0, 0.9, 0.999, 0)
    assert torch.equal(w, inp["tuned"])  # nothing was updated by the refused calls
    g = op(*args, empty, empty, 0, 0.1, 0.0, 0.9, 0.999, 1)
    assert tuple(g.shape) == (6, 2) and not torch.equal(w, inp["tuned"])


@pytest.mark.parametrize("kind", sorted(RULES))
def test_opcheck_update_op(kind):
    """The schema declares what the op mutates (tuned_weight, the state), and its fake agrees."""
    inp = make_inputs((12,), 9, 5, gen=case_generator("opcheck-update", kind))
    opt = FusedOptimizer(kind, lr=0.1)
    w = inp["tuned"].clone()
    state = opt.new_state(w)
    args = (inp["grad_out"], inp["grad_gates"], inp["indices"], inp["frozen"], w, inp["logits"],
            torch.tensor(3), None, 1.0, True, True, *opt.kernel_args(w, state))
    torch.library.opcheck(torch.ops.autoft_fast.gated_embedding_bwd_update, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", IN_KERNEL)
@pytest.mark.parametrize("hard", [True, False])
def test_a_redirect_gets_the_rows_instead_of_the_kernel_updating_them(backend, hard):
    # Data-parallel training redirects every fused update to combine the ranks' rows first: a
    # kernel that updated in place there would step each rank on its own rows only.
    from autoft_fast.ops.fused_optim import updates_redirected
    inp = make_inputs((40, 3), 17, 6, gen=case_generator("redirect", backend, hard),
                      duplicates=True)
    opt = FusedOptimizer("adam", lr=0.05)

    def step(tuned, state):
        logits = inp["logits"].clone().requires_grad_()
        out, gates = autoft_fast.gated_embedding(inp["indices"], inp["frozen"], tuned, logits,
                                                 seed=inp["seed"], hard=hard, backend=backend,
                                                 optimizer=opt, optimizer_state=state)
        (out.double() * inp["grad_out"].double()).sum().backward()
        return logits.grad

    direct = inp["tuned"].clone().requires_grad_()
    direct_state = opt.new_state(direct)
    g_direct = step(direct, direct_state)

    pending = []
    tuned = inp["tuned"].clone().requires_grad_()
    state = opt.new_state(tuned)
    with updates_redirected(lambda *update: pending.append(update)):
        g_redirected = step(tuned, state)
    assert torch.equal(tuned.detach(), inp["tuned"]) and len(pending) == 1
    torch.testing.assert_close(g_redirected, g_direct, rtol=1e-5, atol=1e-6)
    o, w, rows, grad, st = pending[0]
    o.apply_now(w, rows, grad, st)  # what the data-parallel sync does with one rank
    torch.testing.assert_close(tuned.detach(), direct.detach(), rtol=1e-5, atol=1e-6)
    for name in direct_state:
        torch.testing.assert_close(state[name], direct_state[name], rtol=1e-5, atol=1e-6)
