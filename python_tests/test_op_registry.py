"""The backend registry and the op's one interface: a new backend is one row, schemas never drift."""

import inspect

import pytest
import torch

import autoft_fast
from autoft_fast.ops import library, registry
from autoft_fast.ops.interface import BWD, FWD, BwdArgs, FwdArgs, schema
from autoft_fast.ops.reference import reference_gated_embedding
from op_helpers import make_inputs, run

# ---------------------------------------------------------------------------------------------
# A fake backend: kernel-level ops with the derived schemas, computed by the reference.
# ---------------------------------------------------------------------------------------------

_lib = torch.library.Library("autoft_fast_test", "DEF")
_lib.define(schema(FWD, "fake_fwd"))
_lib.define(schema(BWD, "fake_bwd"))


def _fake_forward(*args):
    a = FwdArgs(*args)
    with torch.no_grad():
        return reference_gated_embedding(a.indices, a.frozen_weight, a.tuned_weight, a.logits,
                                         tau=a.tau, hard=a.hard, noise=a.noise, seed=a.seed,
                                         uniforms=a.uniforms)


def _fake_backward(*args):
    a = BwdArgs(*args)
    with torch.enable_grad():
        tuned = a.tuned_weight.detach().requires_grad_()
        logits = a.logits.detach().requires_grad_()
        out, gates = reference_gated_embedding(a.indices, a.frozen_weight, tuned, logits,
                                               tau=a.tau, hard=a.hard, noise=a.noise,
                                               seed=a.seed, uniforms=a.uniforms)
        grad_gates = torch.zeros_like(gates) if a.grad_gates is None else a.grad_gates
        g_tuned, g_logits = torch.autograd.grad((out, gates), (tuned, logits),
                                                (a.grad_out.to(out.dtype), grad_gates))
    if a.sparse:
        rows = torch.unique(a.indices.long())
        return g_tuned[rows], g_logits, rows
    return g_tuned, g_logits, torch.empty(0, dtype=torch.int64)


_lib.impl("fake_fwd", _fake_forward, "CompositeExplicitAutograd")
_lib.impl("fake_bwd", _fake_backward, "CompositeExplicitAutograd")
torch.library.register_fake("autoft_fast_test::fake_fwd", library.fake_fwd, lib=_lib)
torch.library.register_fake("autoft_fast_test::fake_bwd", library.fake_bwd, lib=_lib)


@pytest.fixture
def fake_backend():
    row = registry.register(registry.Backend(
        name="fake", devices=("cpu",), probe=lambda device: True,
        forward=lambda: torch.ops.autoft_fast_test.fake_fwd,
        backward=lambda: torch.ops.autoft_fast_test.fake_bwd,
        coalesced=True, notes="the reference behind kernel-level ops (tests)"))
    yield row
    registry.unregister("fake")


@pytest.mark.parametrize("hard,sparse", [(True, False), (False, False), (True, True)])
def test_a_new_backend_is_one_registry_row(fake_backend, hard, sparse):
    assert "fake" in autoft_fast.available_backends("cpu")
    assert "fake" in autoft_fast.backend_names()
    inp = make_inputs((6, 5), 11, 4, use_uniforms=False)
    got = run("fake", inp, hard=hard, sparse=sparse)
    want = run("reference", inp, hard=hard, sparse=sparse)
    for key in ("out", "gates", "grad_tuned", "grad_logits"):
        torch.testing.assert_close(got[key], want[key])
    if sparse:  # the fake's rows: sorted unique
        rows = got["sparse_grad"]._indices()[0]
        assert got["sparse_grad"].is_sparse and torch.equal(rows, torch.unique(inp["indices"]))


def test_gated_embedding_module_runs_a_new_backend(fake_backend):
    emb = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(9, 3), backend="fake")
    idx = torch.tensor([[1, 8], [8, 0]])
    logits = torch.tensor([[[0.0, 2.0], [3.0, 0.0]], [[0.0, 1.0], [0.0, 0.5]]])
    out, gates = emb.eval()(idx, logits)
    torch.testing.assert_close(out, torch.where(gates[..., 1:] > 0, emb.tuned_weight[idx],
                                                emb.frozen_weight[idx]))
    out.sum().backward()
    # Row 8 is looked up twice, tuned once; rows 0 and 1 once each, tuned.
    assert emb.tuned_weight.grad[[0, 1, 8]].tolist() == [[1.0] * 3] * 3


def test_unregistered_backend_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"backend = 'fake' is not one of \('auto', "):
        autoft_fast.check_backend_name("fake")
    with pytest.raises(ValueError, match="backend = 'fake' is not one of"):
        autoft_fast.GatedEmbedding(4, 2, backend="fake")
    assert autoft_fast.check_backend_name("reference") == "reference"


def test_available_backends_follow_the_registry_order():
    for device in ("cpu", "meta"):
        found = autoft_fast.available_backends(device)
        order = list(registry.REGISTRY)
        assert found == sorted(found, key=order.index) and found[-1] == "reference"
    with pytest.raises(ValueError, match="reserved"):
        registry.register(registry.Backend(name="auto", devices=("cpu",), probe=lambda d: True))


def test_auto_resolution_is_cached():
    device = torch.device("cpu")
    first = registry.resolve("auto", device)
    assert registry.resolve("auto", device) is first
    assert first.name == autoft_fast.available_backends("cpu")[0]


# ---------------------------------------------------------------------------------------------
# The interface: every declared op has the schema derived from ops/interface.py
# ---------------------------------------------------------------------------------------------

def _declared(op_name):
    return str(getattr(torch.ops.autoft_fast, op_name).default._schema)


def test_library_schemas_are_derived_from_the_interface():
    assert _declared("gated_embedding_fwd") == "autoft_fast::" + schema(FWD)
    assert _declared("gated_embedding_bwd") == "autoft_fast::" + schema(BWD)


@pytest.mark.skipif("triton" not in autoft_fast.available_backends("cpu")
                    and not torch.cuda.is_available(), reason="Triton not usable here")
def test_triton_op_schemas_match_the_interface():
    registry.REGISTRY["triton"].ops()
    from autoft_fast.kernels import gated_embedding as ge

    for op, name in ((FWD, "gated_embedding_fwd_triton"), (BWD, "gated_embedding_bwd_triton")):
        assert _declared(name) == "autoft_fast::" + schema(op, name)
    if ge._interpreting():
        for op, name in ((FWD, "_gated_embedding_fwd_triton_interpreted"),
                         (BWD, "_gated_embedding_bwd_triton_interpreted")):
            assert _declared(name) == "autoft_fast::" + schema(op, name)


def test_public_function_takes_the_interface_options():
    params = inspect.signature(autoft_fast.gated_embedding).parameters
    kernel_only = {"seed"} | {"grad_out", "grad_gates"}
    for arg in FWD.args[4:]:
        assert arg.name in params or arg.name in kernel_only, arg.name
    assert set(FWD.names[:4]) <= set(params)


def test_rows_update_op_is_the_compiled_kernel_on_the_cpu_and_none_where_no_backend_serves():
    # fused_lookup's backward updates a plain table through this op when it exists for the
    # table's device, else through the torch-ops update.
    from autoft_fast.ops import _extension, registry
    cpu = registry.rows_update_op(torch.device("cpu"))
    if _extension.has_kernel("CPU"):
        assert cpu is torch.ops.autoft_fast.rows_update
    assert registry.rows_update_op(torch.device("meta")) is None


def test_every_compiled_or_triton_backend_updates_in_its_own_backward():
    # The fused optimizer runs inside the backward of each kernel backend, on its devices; the
    # reference alone takes the torch-ops update.
    from autoft_fast.ops import registry
    want = {"cpu": ("cpu",), "cuda": ("cuda",), "triton": ("cuda", "cpu")}
    for name, devices in want.items():
        row = registry.REGISTRY[name]
        assert row.fused_backward is not None and row.rows_update is not None, name
        assert row.update_devices == devices, name
    assert registry.REGISTRY["reference"].fused_backward is None
