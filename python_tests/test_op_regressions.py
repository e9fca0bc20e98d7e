"""Inputs that once gave a wrong answer or a crash: each case pins the contract's behaviour."""

import pytest
import torch

import autoft_fast
from conftest import KERNEL_BACKENDS

ALL = [("reference", "cpu")] + KERNEL_BACKENDS


@pytest.mark.parametrize("backend,device", ALL, ids=lambda p: str(p))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sparse", [False, True])
def test_repeated_row_gradient_sums_in_float32(backend, device, dtype, sparse):
    # 4096 unit gradients on one row: a 16-bit running sum stalls at 256 (bf16) / 2048 (f16).
    n = 4096
    frozen = torch.zeros(5, 3, dtype=dtype, device=device)
    tuned = frozen.clone().requires_grad_()
    idx = torch.full((n,), 2, device=device)
    logits = torch.tensor([0.0, 1.0], device=device).repeat(n, 1)  # every gate picks tuned
    out, _ = autoft_fast.gated_embedding(idx, frozen, tuned, logits, noise=False, sparse=sparse,
                                         backend=backend)
    out.sum().backward()
    grad = tuned.grad
    if sparse:
        grad = grad.coalesce().to_dense()  # what an optimizer does, in the table dtype
    assert grad.dtype == dtype
    assert grad[2].float().tolist() == [float(n)] * 3
    assert grad[[0, 1, 3, 4]].float().abs().sum().item() == 0


@pytest.mark.skipif("triton" not in autoft_fast.available_backends("cpu"),
                    reason="the Triton interpreter is not usable here")
@pytest.mark.parametrize("bad", [12, 13, -1, 10**9])
def test_triton_compiled_keeps_index_range_check(bad):
    f = torch.randn(12, 4)
    t = f.clone().requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fwd(idx, logits):
        return autoft_fast.gated_embedding(idx, f, t, logits, backend="triton", noise=False)[0]

    idx = torch.tensor([0, 3, bad, 1])
    with pytest.raises(IndexError, match=rf"indices\[2\] = {bad} is out of range for a table of 12 rows"):
        fwd(idx, torch.zeros(4, 2))


def _second_order(backend, device):
    f = torch.randn(6, 3, dtype=torch.float32, device=device)
    t = (f + 0.3).requires_grad_()
    logits = torch.randn(5, 2, device=device, requires_grad=True)
    idx = torch.tensor([0, 2, 2, 5, 1], device=device)
    out, gates = autoft_fast.gated_embedding(idx, f, t, logits, hard=False, noise=False,
                                             backend=backend)
    (g,) = torch.autograd.grad((out ** 2).sum() + gates[:, 1].sum(), logits, create_graph=True)
    return g, logits


def test_reference_double_backward_is_right():
    def fn(logits):
        f = torch.linspace(-1, 1, 18, dtype=torch.float64).reshape(6, 3)
        out, gates = autoft_fast.gated_embedding(torch.tensor([0, 2, 2, 5, 1]), f, f.flip(0),
                                                 logits, hard=False, noise=False,
                                                 backend="reference")
        return (out ** 2).sum() + gates[:, 1].sum()

    logits = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(fn, (logits,))


@pytest.mark.parametrize("backend,device", KERNEL_BACKENDS or [pytest.param(
    None, None, marks=pytest.mark.skip(reason="no kernel backend here"))], ids=lambda p: str(p))
def test_kernel_double_backward_raises_one_clear_error(backend, device):
    g, logits = _second_order(backend, device)
    with pytest.raises(RuntimeError, match=rf"backend {backend!r} has no double backward"):
        torch.autograd.grad(g.sum(), logits)


@pytest.mark.skipif("cpu" not in autoft_fast.available_backends("cpu"), reason="no cpu kernels")
def test_compiled_sparse_backward_when_the_batch_size_changes():
    frozen = torch.randn(50, 8)
    weight = torch.nn.Parameter(frozen + 0.1)

    def step(idx, logits, w):
        out, gates = autoft_fast.gated_embedding(idx, frozen, w, logits, uniforms=None,
                                                 noise=False, sparse=True, backend="cpu")
        return (out * out).sum() + gates[..., 1].sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for batch in (64, 37):
        idx = torch.randint(0, 50, (batch,))
        logits = torch.randn(batch, 2)
        w_ref = torch.nn.Parameter(weight.detach().clone())
        lg_ref = logits.clone().requires_grad_()
        lg = logits.clone().requires_grad_()
        out_ref, gates_ref = autoft_fast.gated_embedding(idx, frozen, w_ref, lg_ref, noise=False,
                                                         sparse=True, backend="reference")
        want = (out_ref * out_ref).sum() + gates_ref[..., 1].sum()
        want.backward()
        weight.grad = None
        got = compiled(idx, lg, weight)
        got.backward()
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(weight.grad.to_dense(), w_ref.grad.to_dense())
        torch.testing.assert_close(lg.grad, lg_ref.grad)


@pytest.mark.parametrize("backend,device", ALL, ids=lambda p: str(p))
def test_hard_gate_near_tie_at_small_tau(backend, device):
    # d = 3e-8: exp(-d) rounds to 1, yet d / tau = 3e-5 is far from a tie.
    d = torch.tensor([3e-8, -3e-8, 5e-8, 0.0, 1e-7])
    logits = torch.stack((torch.zeros(5), d), dim=-1).to(device)
    f = torch.zeros(4, 2, device=device)
    t = torch.ones(4, 2, device=device)
    idx = torch.tensor([0, 1, 2, 3, 1], device=device)
    _, gates = autoft_fast.gated_embedding(idx, f, t, logits, tau=1e-3, noise=False, backend=backend)
    assert gates[:, 1].cpu().tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


@pytest.mark.parametrize("backend,device", ALL, ids=lambda p: str(p))
def test_non_contiguous_tuned_table_sparse(backend, device):
    base = torch.randn(4, 10, device=device)
    frozen = base.t().contiguous()
    tuned_param = torch.nn.Parameter(torch.randn(4, 10, device=device))
    tuned = tuned_param.t()  # [10, 4], non-contiguous, a view of a leaf
    idx = torch.tensor([1, 7, 7, 0], device=device)
    logits = torch.tensor([[0.0, 1.0]] * 4, device=device)
    out, _ = autoft_fast.gated_embedding(idx, frozen, tuned, logits, noise=False, sparse=True,
                                         backend=backend)
    out.sum().backward()
    want = torch.zeros(10, 4)
    want[[1, 0]] = 1.0
    want[7] = 2.0
    grad = tuned_param.grad
    grad = grad.to_dense() if grad.is_sparse else grad
    torch.testing.assert_close(grad.t().cpu(), want)


def test_reference_on_meta_tensors():
    f = torch.empty(10, 4, device="meta")
    out, gates = autoft_fast.gated_embedding(torch.zeros(3, 5, dtype=torch.long, device="meta"), f,
                                             f, torch.empty(3, 5, 2, device="meta"),
                                             backend="reference")
    assert out.shape == (3, 5, 4) and out.device.type == "meta"
    assert gates.shape == (3, 5, 2)


@pytest.mark.parametrize("name,value", [("tau", "5"), ("tau", True), ("hard", "False"),
                                        ("noise", "yes"), ("sparse", 1.0)])
def test_option_types(name, value):
    f = torch.randn(4, 2)
    with pytest.raises(TypeError, match=rf"^{name} must be"):
        autoft_fast.gated_embedding(torch.tensor([1]), f, f.clone(), torch.zeros(1, 2),
                                    **{name: value})


def test_reference_compiles_with_seeded_noise():
    f = torch.randn(20, 4)
    t = (f + 1).requires_grad_()

    def fwd(idx, logits, seed):
        out, gates = autoft_fast.gated_embedding(idx, f, t, logits, seed=seed, backend="reference")
        return out, gates

    compiled = torch.compile(fwd, fullgraph=True, backend="aot_eager")
    idx = torch.randint(0, 20, (3, 7))
    logits = torch.randn(3, 7, 2)
    for seed in (5, 2**40 + 3):
        want = fwd(idx, logits, seed)
        got = compiled(idx, logits, seed)
        torch.testing.assert_close(got, want)
    torch.manual_seed(11)
    compiled_unseeded = torch.compile(lambda i, l: fwd(i, l, None), fullgraph=True, backend="aot_eager")
    g = compiled_unseeded(idx, logits)[1]
    assert set(g.sum(-1).flatten().tolist()) == {1.0}


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_compiled_reference_refuses_an_out_of_range_index_with_the_contracts_error(index_dtype):
    # Under compilation the wrapper's Python check is skipped; the graph keeps the
    # checked_indices / checked_bag_values ops instead, so the error still names the position.
    f = torch.randn(10, 4)
    t = f.clone().requires_grad_()
    logits = torch.randn(2, 2, 2)
    train = torch.compile(lambda i: autoft_fast.gated_embedding(
        i, f, t, logits, seed=0, backend="reference")[0], fullgraph=True, backend="aot_eager")

    def ev(i):
        with torch.no_grad():
            return autoft_fast.gated_embedding(i, f, t, logits, noise=False, backend="reference")[0]

    ev_c = torch.compile(ev, fullgraph=True, backend="aot_eager")
    offsets = torch.tensor([0, 2, 3])
    bag = torch.compile(lambda v: autoft_fast.gated_embedding_bag(
        v, offsets, f, t, logits[0], seed=0, backend="reference")[0], fullgraph=True,
        backend="aot_eager")
    good = torch.tensor([[1, 2], [3, 9]], dtype=index_dtype)
    bad = torch.tensor([[1, 12], [3, 4]], dtype=index_dtype)
    torch.testing.assert_close(train(good), autoft_fast.gated_embedding(
        good, f, t, logits, seed=0, backend="reference")[0])
    torch.testing.assert_close(ev_c(good), ev(good))
    for fn in (train, ev_c):
        with pytest.raises(IndexError, match=r"indices\[1\] = 12 is out of range for a table of 10 rows"):
            fn(bad)
    assert bag(torch.tensor([1, 2, 9], dtype=index_dtype)).shape == (2, 4)
    with pytest.raises(IndexError, match=r"values\[2\] = -1 is out of range"):
        bag(torch.tensor([1, 2, -1], dtype=index_dtype))


@pytest.mark.parametrize("backend,device", ALL, ids=lambda p: str(p))
def test_hard_choice_without_noise_is_the_rule_d_over_tau_in_float32(backend, device):
    # Logit differences near zero and tiny ones whose d / tau underflows to 0 (the frozen
    # row, a tie): the evaluation path's choice must be the contract's x = d / tau > 0.
    tiny = torch.finfo(torch.float32).tiny
    d = torch.tensor([0.0, -0.0, 1e-45, -1e-45, tiny, 2 * tiny, 1e-30, -1e-30, 6e-8, -6e-8,
                      1.0, -1.0, float("nan"), float("inf"), float("-inf")])
    for tau in (0.5, 1.0, 5.0, 1e30):
        n = d.numel()
        logits = torch.stack([torch.zeros(n), d], dim=1).to(device)
        frozen = torch.zeros(4, 2, device=device)
        tuned = torch.ones(4, 2, device=device, requires_grad=True)
        idx = torch.arange(n, device=device) % 4
        out, gates = autoft_fast.gated_embedding(idx, frozen, tuned, logits, tau=tau, hard=True,
                                                 noise=False, backend=backend)
        want = ((d / tau) > 0).float()
        assert gates[:, 1].cpu().tolist() == want.tolist(), (backend, tau)
        assert out[:, 0].detach().cpu().tolist() == want.tolist(), (backend, tau)


@pytest.mark.parametrize("backend,device", ALL, ids=lambda p: str(p))
@pytest.mark.parametrize("op", ["lookup", "bag"])
def test_soft_gate_channel_0_keeps_its_relative_precision(backend, device, op):
    # The contract: y0 = sigmoid(-x), not 1 - y1 (which is 0 from x ~ 17 on in float32; the
    # Triton forward did that, so a huge frozen row's share vanished from the output).
    xs = torch.tensor([5.0, 10.0, 15.0, 17.0, 20.0, -20.0], device=device)
    n = xs.numel()
    frozen = torch.full((n, 2), 1e12, device=device)
    tuned = torch.ones(n, 2, device=device)
    logits = torch.stack([torch.zeros_like(xs), xs], dim=1)
    idx = torch.arange(n, device=device)
    if op == "lookup":
        out, gates = autoft_fast.gated_embedding(idx, frozen, tuned, logits, hard=False,
                                                 noise=False, backend=backend)
    else:
        out, gates = autoft_fast.gated_embedding_bag(idx, torch.arange(n + 1, device=device),
                                                     frozen, tuned, logits, hard=False,
                                                     noise=False, backend=backend)
    want0 = torch.sigmoid(-xs.double())
    torch.testing.assert_close(gates[:, 0].double().cpu(), want0.cpu(), rtol=1e-5, atol=0)
    torch.testing.assert_close(out[:, 0].double().cpu(), (want0 * 1e12 + torch.sigmoid(xs.double())).cpu(),
                               rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend,device", ALL, ids=lambda p: str(p))
@pytest.mark.parametrize("op", ["lookup", "bag"])
def test_a_nan_int8_scale_of_a_frozen_row_not_chosen_stays_out(backend, device, op):
    from autoft_fast.ops import quant
    frozen = quant.quantize_int8(torch.randn(2, 4)).to(device)
    frozen[0, 4:6] = torch.tensor([0x00, 0x7e], dtype=torch.uint8).view(torch.int8).to(device)  # NaN
    tuned = torch.ones(2, 4, device=device)
    idx = torch.tensor([0], device=device)
    logits = torch.tensor([[0.0, 5.0]], device=device)  # the hard gate picks the tuned row
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            if op == "lookup":
                out, _ = autoft_fast.gated_embedding(idx, frozen, tuned, logits, noise=False,
                                                     backend=backend)
            else:
                out, _ = autoft_fast.gated_embedding_bag(idx, torch.tensor([0, 1], device=device),
                                                         frozen, tuned, logits, noise=False,
                                                         backend=backend)
        assert out.cpu().tolist() == [[1.0] * 4], (grad, out)


@pytest.mark.parametrize("backend,device", ALL, ids=lambda p: str(p))
@pytest.mark.parametrize("sparse", [False, True])
def test_a_zero_width_table_gives_empty_rows_and_gradients(backend, device, sparse):
    # D = 0: the reference's backward raised (reshape(-1, 0) is ambiguous); cpu worked.
    frozen = torch.zeros(3, 0, device=device)
    tuned = frozen.clone().requires_grad_()
    logits = torch.randn(2, 2, device=device, requires_grad=True)
    out, gates = autoft_fast.gated_embedding(torch.tensor([0, 2], device=device), frozen, tuned,
                                             logits, seed=1, sparse=sparse, backend=backend)
    assert out.shape == (2, 0)
    (out.sum() + gates[:, 1].sum()).backward()
    grad = tuned.grad.to_dense() if tuned.grad.is_sparse else tuned.grad
    assert grad.shape == (3, 0) and torch.isfinite(logits.grad).all()
