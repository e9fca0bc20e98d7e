"""Edges of the Python API a user meets: torch.compile as the first use of a backend, the
reference's seeded noise under inductor, a frozen tuned table with a fused optimizer, a
bag's per_sample_weights gradient, modules cast to 16 bits, tau at float32's limits and
NumPy scalars for the options."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import autoft_fast
from autoft_fast.ops import registry
from autoft_fast.ops.fused_optim import FusedOptimizer

KERNEL_BACKENDS = [b for b in ("cpu", "triton") if b in registry.available_backends("cpu")]
needs_cpu_kernel = pytest.mark.skipif("cpu" not in registry.available_backends("cpu"),
                                      reason="the C++ extension is not built")


@needs_cpu_kernel
@pytest.mark.parametrize("what", ["lookup", "bag"])
def test_compile_as_the_first_use_of_a_backend_in_a_process(what):
    # The backend's autograd formula is registered on its first use; that must not happen
    # inside the traced call (a fresh process, so no earlier call registered it).
    script = textwrap.dedent(f"""
        import torch, autoft_fast as af
        torch.set_num_threads(1)
        fr = torch.randn(20, 4); tu = fr.clone().requires_grad_()
        if {what!r} == "lookup":
            f = torch.compile(lambda i, l: af.gated_embedding(i, fr, tu, l, tau=2.0, seed=3,
                              backend="cpu")[0].sum(), fullgraph=True, backend="aot_eager")
            args = (torch.randint(0, 20, (5,)), torch.randn(5, 2))
            eager = lambda i, l: af.gated_embedding(i, fr, tu, l, tau=2.0, seed=3,
                                                    backend="cpu")[0].sum()
        else:
            f = torch.compile(lambda v, o, l: af.gated_embedding_bag(v, o, fr, tu, l, seed=3,
                              backend="cpu")[0].sum(), fullgraph=True, backend="aot_eager")
            args = (torch.tensor([1, 2, 2]), torch.tensor([0, 1, 3]), torch.randn(2, 2))
            eager = lambda v, o, l: af.gated_embedding_bag(v, o, fr, tu, l, seed=3,
                                                           backend="cpu")[0].sum()
        got = f(*args)
        got.backward()
        assert torch.equal(got.detach(), eager(*args).detach()), (got, eager(*args))
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


def test_the_reference_with_seeded_noise_compiles_with_inductor():
    # The Philox rounds run as one opaque op in the graph: inductor fused their integer ops
    # into one expression and did not finish (minutes) before. In a child process with a
    # time limit, so that a return of that would fail here instead of hanging the suite.
    script = textwrap.dedent("""
        import torch, autoft_fast
        torch.set_num_threads(1)
        fr, tu = torch.randn(20, 4), torch.randn(20, 4)
        idx, lg = torch.randint(0, 20, (5, 3)), torch.randn(5, 3, 2)
        def gates(i, a, b, l):
            return autoft_fast.gated_embedding(i, a, b, l, tau=2.0, seed=3, backend="reference")[1]
        got = torch.compile(gates, fullgraph=True)(idx, fr, tu, lg)
        assert torch.equal(got, gates(idx, fr, tu, lg))
        z = torch.compile(lambda l: autoft_fast.gumbel_gates(l, tau=2.0, seed=3), fullgraph=True)(lg)
        assert torch.equal(z, autoft_fast.gumbel_gates(lg, tau=2.0, seed=3))
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=240)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_a_frozen_tuned_table_is_not_updated_by_the_fused_optimizer(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    fr = torch.randn(10, 3)
    tuned = fr.clone()  # requires no gradient: frozen
    opt = FusedOptimizer("adam", lr=1.0)
    state = opt.new_state(tuned)
    logits = torch.tensor([[0.0, 5.0], [0.0, 5.0]], requires_grad=True)
    out, _ = autoft_fast.gated_embedding(torch.tensor([1, 2]), fr, tuned, logits, noise=False,
                                         backend=backend, optimizer=opt, optimizer_state=state)
    out.sum().backward()
    assert torch.equal(tuned, fr) and int(state["step"]) == 0
    assert logits.grad is not None  # the logits still get theirs
    module = autoft_fast.GatedEmbedding(10, 3, optimizer="sgd", lr=1.0)
    module.tuned_weight.requires_grad_(False)
    before = module.tuned_weight.detach().clone()
    out, _ = module(torch.tensor([1, 2]), logits, noise=False)
    out.sum().backward()
    assert torch.equal(module.tuned_weight, before) and int(module.optimizer_step) == 0


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_a_bag_weight_that_wants_a_gradient_is_refused_where_none_is_given(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    fr = torch.randn(10, 4)
    tu = fr.clone().requires_grad_()
    values, offsets = torch.tensor([1, 2, 2]), torch.tensor([0, 1, 3])
    w = torch.rand(3, requires_grad=True)
    logits = torch.randn(2, 2)
    with pytest.raises(ValueError, match=f"backend '{backend}' gives per_sample_weights no "
                                         "gradient.*backend='reference'"):
        autoft_fast.gated_embedding_bag(values, offsets, fr, tu, logits, per_sample_weights=w,
                                        mode="sum", seed=1, backend=backend)
    # Detached weights, or no gradients at all, are served; the reference gives w its gradient.
    a = autoft_fast.gated_embedding_bag(values, offsets, fr, tu, logits, mode="sum", seed=1,
                                        per_sample_weights=w.detach(), backend=backend)[0]
    with torch.no_grad():
        autoft_fast.gated_embedding_bag(values, offsets, fr, tu, logits, mode="sum", seed=1,
                                        per_sample_weights=w, backend=backend)
    b = autoft_fast.gated_embedding_bag(values, offsets, fr, tu, logits, mode="sum", seed=1,
                                        per_sample_weights=w, backend="reference")[0]
    torch.testing.assert_close(a, b.detach())
    b.sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_modules_cast_to_16_bits_keep_working(dtype):
    from autoft_fast.dropin import autoft
    for kind, names in (("adam", ("exp_avg", "exp_avg_sq")), ("rowwise_adagrad", ("sum",))):
        emb = autoft_fast.GatedEmbedding(10, 4, optimizer=kind, lr=1e-2).to(dtype)
        assert emb.tuned_weight.dtype == dtype
        assert all(getattr(emb, f"optimizer_{n}").dtype == torch.float32 for n in names)
        assert emb.optimizer_step.dtype == torch.int64
        out, _ = emb(torch.tensor([1, 2]), torch.zeros(2, 2))
        assert out.dtype == dtype
    net = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 1))
    wrapped = autoft(net, strategy="autoft").to(dtype).eval()
    assert wrapped(torch.tensor([1, 2])).dtype == dtype


@pytest.mark.parametrize("tau", [1e-50, 1e-39, 1e39])
def test_tau_outside_float32_is_refused(tau):
    fr = torch.randn(10, 4)
    for backend in ["reference", *KERNEL_BACKENDS[:1]]:
        with pytest.raises(ValueError, match=r"outside float32's range"):
            autoft_fast.gated_embedding(torch.tensor([1]), fr, fr.clone(), torch.zeros(1, 2),
                                        tau=tau, backend=backend)
    if KERNEL_BACKENDS[:1] == ["cpu"]:  # the kernel checks it too when called directly
        with pytest.raises(ValueError, match=r"outside float32's range"):
            torch.ops.autoft_fast.gated_embedding_fwd(torch.tensor([1]), fr, fr.clone(),
                                                      torch.zeros(1, 2), torch.tensor(0), None,
                                                      tau, True, True, False)


def test_numpy_scalars_are_numbers_for_tau_and_seed():
    fr = torch.randn(10, 4)
    idx, lg = torch.tensor([1, 2, 3]), torch.randn(3, 2)
    a = autoft_fast.gated_embedding(idx, fr, fr.clone(), lg, tau=np.float32(2.0), seed=np.int64(5))
    b = autoft_fast.gated_embedding(idx, fr, fr.clone(), lg, tau=2.0, seed=5)
    assert torch.equal(a[1], b[1])
    with pytest.raises(TypeError, match="seed must be an integer"):
        autoft_fast.gated_embedding(idx, fr, fr.clone(), lg, seed=np.float64(5.0))


@pytest.mark.parametrize("backend", ["reference", *KERNEL_BACKENDS])
def test_a_non_finite_value_in_the_row_not_chosen_never_reaches_a_hard_output(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    fr = torch.randn(6, 3)
    tu = fr.clone() + 1
    tu[2] = float("nan")  # a tuned row the gate does not choose
    fr[4] = float("inf")  # a frozen row the gate does not choose
    tu = tu.requires_grad_()
    idx = torch.tensor([2, 4, 1])
    logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0], [-5.0, 5.0]], requires_grad=True)
    out, gates = autoft_fast.gated_embedding(idx, fr, tu, logits, noise=False, backend=backend)
    expected = torch.stack((fr[2], tu.detach()[4], tu.detach()[1]))
    assert torch.equal(out.detach(), expected) and torch.isfinite(out).all()
    out.sum().backward()
    g = tu.grad.to_dense() if tu.grad.is_sparse else tu.grad
    assert torch.equal(g[4], torch.ones(3)) and torch.equal(g[2], torch.zeros(3))
    if backend == "reference":  # the oracle's backward stays differentiable
        f2 = torch.randn(6, 3)  # finite: a logit gradient reads both rows
        logits2 = logits.detach().clone().requires_grad_()
        t2 = (f2 + 1).requires_grad_()
        o, _ = autoft_fast.gated_embedding(idx, f2, t2, logits2, noise=False, hard=True,
                                           backend="reference")
        (gl,) = torch.autograd.grad((o ** 2).sum(), logits2, create_graph=True)
        (gt,) = torch.autograd.grad(gl[..., 1].sum(), t2)
        assert torch.isfinite(gt).all() and gt.abs().sum() > 0


def test_a_float64_table_on_a_kernel_backend_points_to_the_reference():
    fr = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64 tables are served by backend='reference' only"):
        autoft_fast.gated_embedding(torch.tensor([1]), fr, fr.clone(),
                                    torch.zeros(1, 2, dtype=torch.float64), backend="cpu")
    out, _ = autoft_fast.gated_embedding(torch.tensor([1]), fr, fr.clone(),
                                         torch.zeros(1, 2, dtype=torch.float64),
                                         backend="reference", seed=0)
    assert out.dtype == torch.float64


def test_auto_runs_a_float64_module_on_the_reference():
    # module.double() (gradcheck, a float64 pipeline): `auto` picks the backend that serves
    # float64, for the lookup, the bag and the fused optimizer, with the reference's result.
    emb = autoft_fast.GatedEmbedding(10, 4).double()
    idx, logits = torch.tensor([1, 2, 2]), torch.randn(3, 2, dtype=torch.float64)
    out, _ = emb(idx, logits, seed=4)
    want, _ = autoft_fast.gated_embedding(
        idx, emb.frozen_weight, emb.tuned_weight, logits, seed=4, backend="reference")
    assert out.dtype == torch.float64 and torch.equal(out, want)
    bag, _ = emb.bag(idx, torch.tensor([0, 1, 3]), logits[:2], seed=4)
    assert bag.dtype == torch.float64
    emb.use_fused_optimizer("adam", lr=0.1)
    lg = logits.clone().requires_grad_()
    emb(idx, lg, noise=False)[0].sum().backward()
    assert int(emb.optimizer_step) == 1 and lg.grad.dtype == torch.float64


def test_optimizer_settings_without_an_optimizer_are_refused():
    with pytest.raises(ValueError, match="lr is given without optimizer"):
        autoft_fast.GatedEmbedding(10, 4, lr=0.1)
    fr = torch.randn(10, 4)
    state = FusedOptimizer("sgd", lr=0.1).new_state(fr)
    with pytest.raises(ValueError, match="optimizer_state is given without optimizer"):
        autoft_fast.gated_embedding(torch.tensor([1]), fr, fr.clone(), torch.zeros(1, 2),
                                    optimizer_state=state)


def test_gumbel_gates_takes_float32_uniforms_of_the_gates_shape():
    lg = torch.randn(4, 3, 2)
    u = torch.rand(4, 3)
    assert torch.equal(autoft_fast.gumbel_gates(lg, uniforms=u),
                       autoft_fast.gumbel_gates(lg, uniforms=u.clone()))
    with pytest.raises(TypeError, match="uniforms must be a float32 tensor, got torch.float64"):
        autoft_fast.gumbel_gates(lg, uniforms=u.double())
    with pytest.raises(TypeError, match="uniforms must be a float32 tensor, got list"):
        autoft_fast.gumbel_gates(lg, uniforms=u.tolist())
    with pytest.raises(ValueError, match=r"shape of logits without its last axis \(4, 3\)"):
        autoft_fast.gumbel_gates(lg, uniforms=u[:2])


@needs_cpu_kernel
@pytest.mark.parametrize("how", ["deepcopy", "torch.save"])
def test_a_copied_sparse_module_still_hands_over_a_coalesced_gradient(how):
    # The copy gets new Parameters; without the hook the optimizer would sort its rows again.
    from op_helpers import copied
    module = autoft_fast.GatedEmbedding(100, 8, sparse=True, backend="cpu")
    other = copied(module, how)
    assert other.tuned_weight is not module.tuned_weight
    idx = torch.randint(0, 100, (32, 3))
    out, _ = other(idx, torch.zeros(32, 3, 2))
    out.sum().backward()
    grad = other.tuned_weight.grad
    assert grad.is_sparse and grad.is_coalesced()


def test_a_fused_module_evaluates_bags_under_no_grad_and_refuses_them_where_it_trains():
    torch.manual_seed(0)
    emb = autoft_fast.GatedEmbedding(10, 4, optimizer="adam", lr=1e-2)
    values, offsets = torch.tensor([1, 2, 2, 7]), torch.tensor([0, 1, 3, 4])
    logits = torch.randn(3, 2)
    emb.eval()
    with torch.no_grad():  # no backward can run: nothing to fuse (it refused before)
        out, gates = emb.bag(values, offsets, logits, mode="mean")
    plain = autoft_fast.GatedEmbedding.from_pretrained(emb.frozen_weight.clone())
    with torch.no_grad():
        plain.tuned_weight.copy_(emb.tuned_weight)
        want, _ = plain.bag(values, offsets, logits, mode="mean", noise=False)
    assert torch.equal(out, want) and gates.shape == (3, 2)
    with pytest.raises(ValueError, match="does not fuse an optimizer"):
        emb.bag(values, offsets, logits)  # gradients on: its backward would need one
