"""The reference backend against the contract's formulas written out in the test."""

import pytest
import torch

import autoft_fast
from autoft_fast.ops.philox import philox_uniforms
from op_helpers import case_generator, make_inputs


@pytest.mark.parametrize("hard", [True, False])
@pytest.mark.parametrize("noise", [True, False])
def test_reference_equals_contract_formulas(hard, noise):
    gen = case_generator("ref-formula", hard, noise)
    tau = 0.6
    inp = make_inputs((40,), 12, 5, tau=tau, noise=noise, gen=gen, seed=31337)
    f, t0 = inp["frozen"].double(), inp["tuned"].double()
    t = t0.clone().requires_grad_()
    logits = inp["logits"].double().requires_grad_()
    out, gates = autoft_fast.gated_embedding(inp["indices"], f, t, logits, tau=tau, hard=hard,
                                             noise=noise, seed=31337, backend="reference")
    g, h = inp["grad_out"].double(), inp["grad_gates"].double()
    ((out * g).sum() + (gates * h).sum()).backward()

    idx = inp["indices"]
    u = torch.from_numpy(philox_uniforms(31337, 40)).double()
    l = torch.log(u + 1e-20) - torch.log(1 - u) if noise else torch.zeros(40, dtype=torch.float64)
    x = (logits.detach()[:, 1] - logits.detach()[:, 0] + l) / tau
    y1, y0 = torch.sigmoid(x), torch.sigmoid(-x)
    z1 = (y1 > 0.5).double() if hard else y1
    z0 = 1 - z1 if hard else y0
    torch.testing.assert_close(gates, torch.stack((z0, z1), -1))
    torch.testing.assert_close(out, z0[:, None] * f[idx] + z1[:, None] * t0[idx])
    want_tuned = torch.zeros_like(t0).index_add_(0, idx, z1[:, None] * g)
    torch.testing.assert_close(t.grad, want_tuned)
    a = torch.stack(((g * f[idx]).sum(1), (g * t0[idx]).sum(1)), -1) + h
    s = y0 * y1 * (a[:, 1] - a[:, 0]) / tau
    torch.testing.assert_close(logits.grad, torch.stack((-s, s), -1))


def test_gradcheck_float64_soft_gates():
    gen = case_generator("gradcheck")
    idx = torch.randint(0, 6, (4, 3), generator=gen)
    idx[0, :] = 2  # repeated rows
    f = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    t = torch.randn(6, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(4, 3, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    u = torch.rand(4, 3, generator=gen)

    def fn(t, logits):
        out, gates = autoft_fast.gated_embedding(idx, f, t, logits, tau=0.8, hard=False,
                                                 uniforms=u, backend="reference")
        return out, gates

    assert torch.autograd.gradcheck(fn, (t, logits))
    assert torch.autograd.gradgradcheck is not None


def test_straight_through_hard_gradient_is_soft_jacobian():
    """With hard gates the logit gradient is still the soft one (straight-through)."""
    gen = case_generator("st")
    inp = make_inputs((30,), 9, 4, gen=gen, use_uniforms=True)
    res = {}
    for hard in (True, False):
        t = inp["tuned"].clone().requires_grad_()
        lg = inp["logits"].clone().requires_grad_()
        _, gates = autoft_fast.gated_embedding(inp["indices"], inp["frozen"], t, lg, hard=hard,
                                               uniforms=inp["uniforms"], backend="reference")
        (gates * inp["grad_gates"]).sum().backward()
        res[hard] = lg.grad
    torch.testing.assert_close(res[True], res[False])


def test_gumbel_gates_matches_op_gates():
    gen = case_generator("gumbel")
    logits = torch.randn(7, 5, 2, generator=gen)
    z = autoft_fast.gumbel_gates(logits, tau=2.0, seed=11)
    f = torch.zeros(3, 1)
    _, gates = autoft_fast.gated_embedding(torch.zeros(7, 5, dtype=torch.long), f, f.clone(),
                                           logits, tau=2.0, seed=11, backend="reference")
    assert torch.equal(z, gates)
    with pytest.raises(ValueError, match="last axis of size 2"):
        autoft_fast.gumbel_gates(torch.zeros(3, 3))
