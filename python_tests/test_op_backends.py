"""Every kernel backend against the float64 reference, on the contract of docs/op-contract.md."""

import numpy as np
import pytest
import torch

import autoft_fast
from autoft_fast.ops import registry
from op_helpers import assert_matches, case_generator, make_inputs, oracle, run

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
INDEX_DTYPES = [torch.int32, torch.int64]


def small(backend):
    # The Triton interpreter runs kernels in numpy one program at a time: keep it small.
    return backend == "triton"


@pytest.mark.parametrize("table_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("index_dtype", INDEX_DTYPES, ids=str)
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_matches_reference(backend_device, table_dtype, index_dtype, hard, sparse):
    backend, device = backend_device
    shape, dim = ((5, 7), 16) if small(backend) else ((37, 24), 60)
    gen = case_generator("matches", backend, table_dtype, index_dtype, hard, sparse)
    inp = make_inputs(shape, 50, dim, table_dtype=table_dtype, index_dtype=index_dtype,
                      tau=0.7, gen=gen, seed=int(torch.randint(0, 2**62, (), generator=gen)))
    got = run(backend, inp, tau=0.7, hard=hard, sparse=sparse, device=device)
    want = oracle(inp, tau=0.7, hard=hard, sparse=sparse)
    assert_matches(got, want, table_dtype, dim=dim)
    if hard:
        assert set(got["gates"].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("dim", [1, 3, 16, 60, 64, 257])
@pytest.mark.parametrize("n", [0, 1, 5, 130])
def test_odd_shapes(backend_device, dim, n):
    backend, device = backend_device
    if small(backend) and (dim > 64 or n > 5):
        dim, n = min(dim, 64), min(n, 5)
    gen = case_generator("odd", backend, dim, n)
    inp = make_inputs((n,), 11, dim, gen=gen, seed=987654321987)
    got = run(backend, inp, tau=1.3, device=device)
    want = oracle(inp, tau=1.3)
    assert got["out"].shape == (n, dim) and got["gates"].shape == (n, 2)
    assert_matches(got, want, torch.float32, dim=dim)
    if n == 0:
        assert not got["grad_tuned"].any() and got["grad_logits"].numel() == 0


@pytest.mark.parametrize("table_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_all_duplicate_indices(backend_device, table_dtype, sparse):
    """Every lookup hits one row: the tuned-row gradient must accumulate without races."""
    backend, device = backend_device
    n = 64 if small(backend) else 4000
    inp = make_inputs((n,), 30, 8, table_dtype=table_dtype, duplicates=True,
                      gen=case_generator("dup", backend, table_dtype, sparse))
    for hard in (True, False):
        got = run(backend, inp, hard=hard, sparse=sparse, device=device)
        want = oracle(inp, hard=hard, sparse=sparse)
        row = int(inp["indices"][0])
        assert got["grad_tuned"][torch.arange(30) != row].abs().max() == 0
        rtol, atol = {torch.float32: (1e-5, 1e-3), torch.float16: (2e-3, 0.1),
                      torch.bfloat16: (1.6e-2, 0.5)}[table_dtype]
        torch.testing.assert_close(got["grad_tuned"][row].double(),
                                   want["grad_tuned"][row].to(table_dtype).double(),
                                   rtol=rtol, atol=atol)
        torch.testing.assert_close(got["grad_logits"].double(), want["grad_logits"].double(),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("noise", [True, False], ids=["noise", "eval"])
def test_seed_stream_and_eval_mode(backend_device, noise):
    """In-kernel Philox noise equals the reference stream; without noise the gate is sign(d)."""
    backend, device = backend_device
    shape = (6, 5) if small(backend) else (300, 7)
    inp = make_inputs(shape, 40, 4, noise=noise, seed=2**62 + 12345,
                      gen=case_generator("seed", backend, noise))
    got = run(backend, inp, noise=noise, device=device)
    want = oracle(inp, noise=noise)
    assert_matches(got, want, torch.float32, dim=4)
    if not noise:
        d = inp["logits"][..., 1] - inp["logits"][..., 0]
        assert torch.equal(got["gates"][..., 1], (d > 0).float())


def test_uniforms_override_seed(backend_device):
    backend, device = backend_device
    inp = make_inputs((4, 9), 20, 5, use_uniforms=True, gen=case_generator("unif", backend))
    got = run(backend, inp, hard=False, device=device)
    want = oracle(inp, hard=False)
    assert_matches(got, want, torch.float32, dim=5)
    inp2 = dict(inp, seed=inp["seed"] + 1)  # the seed must not matter when uniforms are given
    assert torch.equal(run(backend, inp2, hard=False, device=device)["gates"], got["gates"])


def test_non_contiguous_inputs(backend_device):
    backend, device = backend_device
    gen = case_generator("noncontig", backend)
    inp = make_inputs((6, 4), 25, 12, gen=gen, use_uniforms=True)
    wide_f = torch.randn(25, 30, generator=gen)
    wide_t = torch.randn(25, 30, generator=gen)
    wide_f[:, 3:15] = inp["frozen"]
    wide_t[:, 3:15] = inp["tuned"]
    nc = dict(inp)
    nc["indices"] = inp["indices"].t().contiguous().t()
    nc["logits"] = inp["logits"].transpose(0, 1).contiguous().transpose(0, 1)
    nc["uniforms"] = inp["uniforms"].t().contiguous().t()
    nc["frozen"] = wide_f[:, 3:15]
    nc["tuned"] = wide_t[:, 3:15]
    assert not nc["indices"].is_contiguous() and not nc["frozen"].is_contiguous()
    got = run(backend, nc, hard=False, device=device)
    want = oracle(inp, hard=False)
    assert_matches(got, want, torch.float32, dim=12)


def test_sparse_gradient_equals_dense(backend_device):
    backend, device = backend_device
    inp = make_inputs((9, 6), 15, 7, gen=case_generator("sparse", backend))
    dense = run(backend, inp, sparse=False, device=device)
    sparse = run(backend, inp, sparse=True, device=device)
    g = sparse["sparse_grad"]
    assert g.is_sparse and g.shape == (15, 7)
    tuned_rows = inp["indices"].reshape(-1)[sparse["gates"].reshape(-1, 2)[:, 1] == 1]
    if registry.REGISTRY[backend].coalesced:  # sorted unique rows
        rows = g._indices()[0].cpu()
        assert torch.equal(rows, torch.unique(rows))
        assert set(tuned_rows.tolist()) <= set(rows.tolist()) <= set(inp["indices"].flatten().tolist())
        if backend == "cpu":  # only the rows some lookup tuned
            assert torch.equal(rows, torch.unique(tuned_rows))
    else:  # one value row per lookup, as nn.Embedding(sparse=True)
        assert g._nnz() == 54
    torch.testing.assert_close(sparse["grad_tuned"], dense["grad_tuned"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sparse["grad_logits"], dense["grad_logits"])


def test_nan_logits(backend_device):
    backend, device = backend_device
    inp = make_inputs((3, 4), 10, 5, gen=case_generator("nan", backend))
    inp["logits"][1, 2, 0] = float("nan")
    hard = run(backend, inp, hard=True, device=device, with_gate_grad=False)
    assert torch.equal(hard["gates"][1, 2], torch.tensor([1.0, 0.0]))  # NaN picks frozen
    assert torch.isnan(hard["grad_logits"][1, 2]).all()
    assert not torch.isnan(hard["grad_logits"][0]).any()
    soft = run(backend, inp, hard=False, device=device, with_gate_grad=False)
    assert torch.isnan(soft["gates"][1, 2]).all()


def test_nearly_certain_gate_gradient_does_not_vanish(backend_device):
    """y0*y1 computed as a product stays accurate where 1 - y would round to 0 in float32."""
    backend, device = backend_device
    inp = make_inputs((4,), 6, 3, noise=False, gen=case_generator("certain", backend))
    inp["logits"] = torch.tensor([[0.0, 30.0], [0.0, -30.0], [0.0, 20.0], [0.0, 1.0]])
    got = run(backend, inp, noise=False, device=device)
    want = oracle(inp, noise=False)
    assert (got["grad_logits"][:3].abs() > 0).all()
    torch.testing.assert_close(got["grad_logits"].double(), want["grad_logits"], rtol=1e-4, atol=0)


def test_backend_auto_picks_first_available():
    assert autoft_fast.available_backends("cpu")[-1] == "reference"
    f = torch.randn(10, 3)
    out, _ = autoft_fast.gated_embedding(torch.tensor([1, 2]), f, f.clone(), torch.zeros(2, 2),
                                         noise=False)
    torch.testing.assert_close(out, f[[1, 2]])  # a tie picks the frozen row


@pytest.mark.parametrize("backend", [b for b in autoft_fast.available_backends("cpu")])
def test_a_loss_on_the_gates_alone_gives_the_table_no_gradient(backend):
    # As autograd gives the reference: None, not a [V, D] table of zeros that an optimizer
    # with weight decay or momentum would still step on.
    tuned = torch.randn(6, 3, requires_grad=True)
    logits = torch.randn(4, 2, requires_grad=True)
    _, gates = autoft_fast.gated_embedding(torch.tensor([0, 1, 1, 5]), torch.randn(6, 3), tuned,
                                           logits, seed=3, backend=backend)
    (gates[:, 1] * torch.arange(4.0)).sum().backward()
    assert tuned.grad is None and logits.grad is not None
    tuned = torch.randn(6, 3, requires_grad=True)
    _, gates = autoft_fast.gated_embedding_bag(torch.tensor([0, 1, 5]), torch.tensor([0, 2, 3]),
                                               torch.randn(6, 3), tuned,
                                               torch.randn(2, 2, requires_grad=True),
                                               seed=3, backend=backend)
    gates.sum().backward()
    assert tuned.grad is None
    for flag in (np.True_, np.False_):  # a NumPy bool is a bool
        autoft_fast.gated_embedding(torch.tensor([1]), torch.randn(6, 3), torch.randn(6, 3),
                                    torch.randn(1, 2), hard=flag, noise=flag, backend=backend)
