"""torch.library integration: opcheck, torch.compile(fullgraph=True), and a shape fuzz."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoft_fast
from autoft_fast.ops import registry
from op_helpers import assert_matches, make_inputs, oracle, run


def fwd_op(backend):
    return registry.REGISTRY[backend].ops()[0]


@pytest.mark.parametrize("hard,sparse", [(True, False), (False, False), (True, True)])
def test_opcheck(backend_device, hard, sparse):
    backend, device = backend_device
    inp = make_inputs((7,), 9, 5, use_uniforms=False)
    seed = torch.tensor(42, dtype=torch.int64)
    args = (inp["indices"].to(device), inp["frozen"].to(device),
            inp["tuned"].to(device).requires_grad_(), inp["logits"].to(device).requires_grad_(),
            seed, None, 0.9, hard, True, sparse)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    if not sparse:  # the sparse COO gradient is eager-only
        tests += ("test_autograd_registration",)
    else:
        tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(fwd_op(backend), args, test_utils=tests)


def test_opcheck_backward_op(backend_device):
    backend, device = backend_device
    bwd = registry.REGISTRY[backend].ops()[1]
    inp = make_inputs((6,), 9, 3)
    for sparse in (False, True):
        args = (inp["grad_out"].to(device), inp["grad_gates"].to(device), inp["indices"].to(device),
                inp["frozen"].to(device), inp["tuned"].to(device), inp["logits"].to(device),
                torch.tensor(3, dtype=torch.int64), None, 1.0, True, True, sparse)
        torch.library.opcheck(bwd, args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(backend_device):
    backend, device = backend_device
    inp = make_inputs((5, 4), 12, 8, use_uniforms=True)
    frozen = inp["frozen"].to(device)
    weight = torch.nn.Parameter(inp["tuned"].to(device))

    def step(idx, logits, u):
        out, gates = autoft_fast.gated_embedding(idx, frozen, weight, logits, tau=0.5,
                                                 uniforms=u, backend=backend)
        return (out * out).sum() + gates[..., 1].sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    idx, u = inp["indices"].to(device), inp["uniforms"].to(device)
    lg_e = inp["logits"].to(device).requires_grad_()
    lg_c = inp["logits"].to(device).requires_grad_()
    eager = step(idx, lg_e, u)
    eager.backward()
    g_eager = weight.grad.clone()
    weight.grad = None
    got = compiled(idx, lg_c, u)
    got.backward()
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(weight.grad, g_eager)
    torch.testing.assert_close(lg_c.grad, lg_e.grad)


def test_torch_compile_seeded_noise_without_graph_break(backend_device):
    backend, device = backend_device
    f = torch.randn(20, 4, device=device)
    t = f.clone()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def fwd(idx, logits):
        return autoft_fast.gated_embedding(idx, f, t, logits, backend=backend)[1]

    idx = torch.randint(0, 20, (9,), device=device)
    torch.manual_seed(3)
    a = fwd(idx, torch.zeros(9, 2, device=device))
    assert set(a.sum(-1).tolist()) == {1.0}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n=st.integers(0, 3000), dim=st.sampled_from([1, 3, 16, 60, 64, 257]),
       rows=st.integers(1, 500), hard=st.booleans(), sparse=st.booleans(),
       int32=st.booleans(), tau=st.floats(0.05, 10.0), seed=st.integers(0, 2**63 - 1))
def test_fuzz_against_reference(backend_device, n, dim, rows, hard, sparse, int32, tau, seed):
    backend, device = backend_device
    if backend == "triton":  # interpreter: bound the work
        n, dim = min(n, 40), min(dim, 64)
    gen = torch.Generator().manual_seed(seed % 2**31)
    inp = make_inputs((n,), rows, dim, index_dtype=torch.int32 if int32 else torch.int64,
                      tau=tau, seed=seed, gen=gen)
    got = run(backend, inp, tau=tau, hard=hard, sparse=sparse, device=device)
    want = oracle(inp, tau=tau, hard=hard, sparse=sparse)
    repeats = int(torch.bincount(inp["indices"].reshape(-1).long()).max()) if n else 1
    assert_matches(got, want, torch.float32, dim=dim, repeats=repeats)
