"""Frozen tables in lower precision (bfloat16 / float16, int8 row-quantised).

The contract: a backend fed a low-precision frozen table gives the out, gates and gradients the
reference gives on the float32 table ``dequantize`` returns. The int8 quantiser keeps its
documented error bound, and its table takes at most 0.3x the bytes of the float32 one.
"""

from __future__ import annotations

import copy

import pytest
import torch

import autoft_fast
from autoft_fast.ops import quant, registry
from autoft_fast.ops.fused_optim import FusedOptimizer

from op_helpers import case_generator, make_inputs, run

LOW_PRECISION = {
    "int8": quant.quantize_int8,
    "bfloat16": lambda w: w.to(torch.bfloat16),
    "float16": lambda w: w.to(torch.float16),
}
LOW_BACKENDS = [n for n in registry.low_precision_backends("cpu") if n != "reference"]
OTHER_BACKENDS = [n for n in autoft_fast.available_backends("cpu")
                  if not registry.REGISTRY[n].low_precision_frozen]


# ---------------------------------------------------------------------------------------------
# The quantiser
# ---------------------------------------------------------------------------------------------

def _bound(w):
    """The module docstring's per-row bound: max |w| / 254 * (1 + 2**-10) + 2**-25."""
    return w.double().abs().amax(dim=1, keepdim=True) / 254 * (1 + 2**-10) + 2**-25


@pytest.mark.parametrize("dim", [1, 3, 16, 17, 64])
def test_int8_error_bound(dim):
    g = case_generator("bound", dim)
    # Rows of very different magnitudes, tiny ones (float16 subnormal scales) and zero rows.
    mags = torch.logspace(-6, 5, 200, dtype=torch.float64).reshape(-1, 1)
    w = (torch.randn(200, dim, generator=g, dtype=torch.float64) * mags).float()
    w[7] = 0.0
    w[8, 0] = -w[8].abs().max() * 3  # a negative extreme
    packed = quant.quantize_int8(w)
    assert packed.dtype == torch.int8 and tuple(packed.shape) == (200, dim + 2)
    err = (quant.dequantize(packed).double() - w.double()).abs()
    assert bool((err <= _bound(w)).all()), float((err - _bound(w)).max())
    # The tighter bound in terms of the stored scale: half a quantisation step.
    scale = quant.int8_scales(packed).double().reshape(-1, 1)
    assert bool((err <= scale / 2 * (1 + 1e-9)).all())
    q = packed[:, :dim]
    assert int(q.min()) >= -127 and int(q.max()) <= 127
    assert bool((quant.dequantize(packed)[7] == 0).all())
    # The row's extreme is hit within half a step: the scale is not wasted.
    assert bool((q.abs().amax(dim=1)[w.abs().amax(dim=1) > 1e-3] >= 126).all())


def test_int8_bound_is_reached_for_random_rows_but_not_exceeded():
    w = torch.randn(2000, 16, generator=case_generator("tight"))
    err = (quant.dequantize(quant.quantize_int8(w)) - w).abs()
    ratio = (err.double() / _bound(w)).max()
    assert 0.9 < float(ratio) <= 1.0  # the bound is not loose


def test_low_precision_float_error():
    w = torch.randn(500, 9, generator=case_generator("floats"))
    for name, rel in (("bfloat16", 2**-8), ("float16", 2**-11)):
        f = quant.dequantize(quant.to_frozen_dtype(w, name))
        assert bool(((f - w).abs() <= rel * w.abs() + 1e-7).all()), name


def test_int8_memory_ratio_at_d16():
    # Bytes per row do not depend on V; at V = 1e7 the tables are these numbers times 1e7.
    v, d = 1000, 16
    w = torch.randn(v, d)
    packed = quant.quantize_int8(w)
    ratio = packed.nbytes / w.nbytes
    assert packed.nbytes == v * (d + 2) and ratio == 18 / 64
    assert ratio <= 0.3
    emb = autoft_fast.GatedEmbedding.from_pretrained(w, frozen_dtype="int8")
    assert emb.frozen_weight.nbytes / emb.tuned_weight.nbytes == ratio


def test_quantiser_bad_input():
    with pytest.raises(ValueError, match="weight row 2 has a non-finite value"):
        w = torch.zeros(4, 3)
        w[2, 1] = float("nan")
        quant.quantize_int8(w)
    with pytest.raises(ValueError, match="weight row 1 has max |w| = .* too large"):
        quant.quantize_int8(torch.tensor([[1.0], [1e7]]))
    with pytest.raises(ValueError, match="2-D .* floating-point"):
        quant.quantize_int8(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="frozen_dtype = 'int4' is not one of"):
        quant.to_frozen_dtype(torch.zeros(2, 2), "int4")


# ---------------------------------------------------------------------------------------------
# Every backend against the reference on the dequantised table
# ---------------------------------------------------------------------------------------------

def _with_frozen(inp, frozen):
    out = dict(inp)
    out["frozen"] = frozen
    return out


def _assert_same(got, want):
    # The kernels read exactly the dequantised values, so only float32 summation order differs.
    torch.testing.assert_close(got["gates"], want["gates"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got["out"], want["out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["grad_tuned"], want["grad_tuned"], rtol=1e-5, atol=2e-5)
    scale = max(1.0, float(want["grad_logits"].abs().max()))
    torch.testing.assert_close(got["grad_logits"], want["grad_logits"], rtol=1e-4, atol=2e-5 * scale)


@pytest.mark.parametrize("backend", LOW_BACKENDS + ["reference"])
@pytest.mark.parametrize("frozen_dtype", list(LOW_PRECISION))
@pytest.mark.parametrize("dim", [1, 3, 16, 17])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("duplicates", [False, True])
def test_backend_equals_reference_on_dequantised_table(backend, frozen_dtype, dim, index_dtype,
                                                       duplicates):
    gen = case_generator("lowp", backend, frozen_dtype, dim, index_dtype, duplicates)
    inp = make_inputs((37, 3), 23, dim, index_dtype=index_dtype, gen=gen, duplicates=duplicates)
    low = LOW_PRECISION[frozen_dtype](inp["frozen"])
    deq = quant.dequantize(low)
    assert not torch.equal(deq, inp["frozen"])  # the test does exercise a lossy table
    for hard in (True, False):
        for sparse in (False, True):
            kw = dict(hard=hard, sparse=sparse, tau=0.7)
            got = run(backend, _with_frozen(inp, low), **kw)
            want = run("reference", _with_frozen(inp, deq), **kw)
            _assert_same(got, want)


@pytest.mark.parametrize("backend", LOW_BACKENDS + ["reference"])
@pytest.mark.parametrize("tuned_dtype", [torch.bfloat16, torch.float16])
def test_int8_frozen_under_a_16_bit_tuned_table(backend, tuned_dtype):
    inp = make_inputs((64,), 19, 5, gen=case_generator("int8-16", backend, tuned_dtype))
    low = quant.quantize_int8(inp["frozen"])
    inp = dict(inp, tuned=inp["tuned"].to(tuned_dtype), grad_out=inp["grad_out"].to(tuned_dtype))
    got = run(backend, _with_frozen(inp, low), hard=False)
    # The oracle: the dequantised frozen table, the tuned one upcast exactly, all in float64.
    want = run("reference", _with_frozen(inp, quant.dequantize(low)), hard=False, float64=True)
    assert got["out"].dtype == tuned_dtype
    torch.testing.assert_close(got["out"].double(), want["out"].to(tuned_dtype).double(),
                               rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(got["grad_logits"].double(), want["grad_logits"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got["grad_tuned"].double(), want["grad_tuned"].to(tuned_dtype).double(),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("backend", LOW_BACKENDS + ["reference"])
def test_eval_path_reads_the_dequantised_row(backend):
    inp = make_inputs((50, 2), 31, 7, noise=False, gen=case_generator("eval-lowp", backend))
    low = quant.quantize_int8(inp["frozen"])
    with torch.no_grad():
        out, gates = autoft_fast.gated_embedding(inp["indices"], low, inp["tuned"], inp["logits"],
                                                 noise=False, backend=backend)
    want, want_gates = autoft_fast.gated_embedding(inp["indices"], quant.dequantize(low), inp["tuned"],
                                                   inp["logits"], noise=False, backend="reference")
    assert torch.equal(gates, want_gates)
    assert torch.equal(out, want)  # hard gates copy the chosen row exactly


@pytest.mark.parametrize("backend", LOW_BACKENDS + ["reference"])
@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_fused_optimizer_with_an_int8_frozen_table(backend, kind):
    inp = make_inputs((40,), 12, 6, gen=case_generator("fused-lowp", backend, kind))
    low = quant.quantize_int8(inp["frozen"])
    results = []
    for b, frozen in ((backend, low), ("reference", quant.dequantize(low))):
        opt = FusedOptimizer(kind, lr=0.05)
        w = inp["tuned"].clone().requires_grad_()
        state = opt.new_state(w)
        logits = inp["logits"].clone().requires_grad_()
        out, _ = autoft_fast.gated_embedding(inp["indices"], frozen, w, logits, seed=inp["seed"],
                                             optimizer=opt, optimizer_state=state, backend=b)
        (out * inp["grad_out"]).sum().backward()
        results.append((w.detach().clone(), logits.grad))
    assert not torch.equal(results[0][0], inp["tuned"])
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_int8_table_of_the_wrong_width():
    inp = make_inputs((8,), 10, 4)
    low = quant.quantize_int8(torch.randn(10, 5))
    # A plain cast to int8 has the tuned table's shape, and reads as rows of D - 2.
    cast = torch.randint(-5, 5, (10, 4), dtype=torch.int8)
    for backend in LOW_BACKENDS + ["reference"]:
        with pytest.raises(ValueError, match=r"holds rows of D = 5 .*int8 table stores \[V, D \+ 2\]"):
            autoft_fast.gated_embedding(inp["indices"], low, inp["tuned"], inp["logits"], backend=backend)
        with pytest.raises(ValueError, match=r"shape \(10, 4\), which holds rows of D = 2.*"
                                             r"quantize_int8 rather than casting"):
            autoft_fast.gated_embedding(inp["indices"], cast, inp["tuned"], inp["logits"], backend=backend)


def test_low_precision_pairs_that_are_refused():
    inp = make_inputs((8,), 10, 4)
    bf16 = inp["tuned"].to(torch.bfloat16)
    with pytest.raises(TypeError, match="frozen_weight must be one of bfloat16, int8"):
        autoft_fast.gated_embedding(inp["indices"], inp["frozen"].half(), bf16, inp["logits"])
    with pytest.raises(TypeError, match="frozen_weight must be one of"):
        autoft_fast.gated_embedding(inp["indices"], inp["frozen"].to(torch.uint8), inp["tuned"],
                                    inp["logits"])


@pytest.fixture
def backend_without_low_precision():
    """A backend row that does not read low-precision frozen tables (running the plain-PyTorch
    path: a row sharing a kernel op would take over that op's autograd mapping)."""
    fake = registry.register(registry.Backend(
        name="same_dtype_only", devices=("cpu",), probe=lambda device: True))
    yield fake.name
    registry.unregister(fake.name)


def test_backend_without_low_precision_names_the_dtypes(backend_without_low_precision):
    backend = backend_without_low_precision
    inp = make_inputs((8,), 10, 4)
    low = quant.quantize_int8(inp["frozen"])
    with pytest.raises(TypeError, match=rf"backend '{backend}' does not read a frozen_weight of "
                                        r"dtype int8 with a tuned_weight of dtype float32; "
                                        r"backends that do: \['cpu'"):
        autoft_fast.gated_embedding(inp["indices"], low, inp["tuned"], inp["logits"], backend=backend)
    # The same tables of one dtype are served.
    out, _ = autoft_fast.gated_embedding(inp["indices"], inp["frozen"], inp["tuned"], inp["logits"],
                                         backend=backend)
    assert out.shape == (8, 4)


@pytest.mark.parametrize("backend", OTHER_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(
    reason="every backend available here reads low-precision frozen tables"))])
def test_available_backend_without_low_precision_refuses(backend):
    inp = make_inputs((8,), 10, 4)
    low = quant.quantize_int8(inp["frozen"])
    with pytest.raises(TypeError, match=rf"backend '{backend}' does not read a frozen_weight"):
        autoft_fast.gated_embedding(inp["indices"], low, inp["tuned"], inp["logits"], backend=backend)


def test_triton_host_code_refuses_what_its_caller_does_not_allow():
    from autoft_fast.ops import validate

    inp = make_inputs((8,), 10, 4)
    low = quant.quantize_int8(inp["frozen"])
    with pytest.raises(TypeError, match="backend 'x' does not read a frozen_weight of dtype int8"):
        validate.check_kernel_inputs(inp["indices"], low, inp["tuned"], inp["logits"],
                                     torch.tensor(0), None, 1.0, backend="x")


def test_auto_picks_a_backend_that_reads_the_table():
    assert registry.resolve("auto", torch.device("cpu"), True).low_precision_frozen


def test_cpu_kernel_refuses_bad_frozen_dtypes_itself():
    if "cpu" not in LOW_BACKENDS:
        pytest.skip("the C++ extension is not built")
    op = torch.ops.autoft_fast.gated_embedding_fwd
    idx, logits, seed = torch.tensor([1, 2]), torch.zeros(2, 2), torch.tensor(0)
    tuned = torch.zeros(4, 3, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="frozen_weight must have the dtype of tuned_weight"):
        op(idx, torch.zeros(4, 3, dtype=torch.float16), tuned, logits, seed, None, 1.0, True, True, False)
    with pytest.raises(ValueError, match=r"int8 frozen table stores \[V, D \+ 2\]"):
        op(idx, torch.zeros(4, 3, dtype=torch.int8), torch.zeros(4, 3), logits, seed, None, 1.0,
           True, True, False)


# ---------------------------------------------------------------------------------------------
# The module and the models
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frozen_dtype", list(LOW_PRECISION))
def test_module_from_pretrained_and_state_dict(frozen_dtype):
    w = torch.randn(30, 5, generator=case_generator("module", frozen_dtype))
    emb = autoft_fast.GatedEmbedding.from_pretrained(w, frozen_dtype=frozen_dtype)
    assert emb.tuned_weight.dtype == torch.float32 and torch.equal(emb.tuned_weight.detach(), w)
    assert emb.embedding_dim == 5 and emb.num_embeddings == 30
    assert torch.equal(emb.frozen_dense_weight(), quant.dequantize(LOW_PRECISION[frozen_dtype](w)))
    idx = torch.tensor([[0, 29], [4, 4]])
    assert torch.equal(emb.frozen_rows(idx), emb.frozen_dense_weight()[idx])
    assert f"frozen_dtype={emb.frozen_weight.dtype}" in repr(emb)
    w[0] += 1  # the caller's tensor is not aliased
    assert not torch.equal(emb.tuned_weight.detach()[0], w[0])
    # The state_dict round trip into a module built with the same frozen_dtype.
    other = autoft_fast.GatedEmbedding(30, 5, frozen_dtype=frozen_dtype)
    other.load_state_dict(emb.state_dict())
    assert torch.equal(other.frozen_weight, emb.frozen_weight)
    # Forced to the frozen channel, the module outputs the dequantised rows.
    out, _ = emb.eval()(idx, torch.tensor([[[9.0, -9.0]] * 2] * 2))
    assert torch.equal(out, emb.frozen_dense_weight()[idx])


def test_module_bad_frozen_dtype():
    with pytest.raises(ValueError, match="frozen_dtype = 'float8' is not one of"):
        autoft_fast.GatedEmbedding.from_pretrained(torch.zeros(3, 2), frozen_dtype="float8")
    with pytest.raises(ValueError, match=r"frozen_dtype = 'float32' is not a precision the op "
                                         r"reads under a torch.bfloat16 tuned table; choose one "
                                         r"of \['bfloat16', 'int8'\]"):
        autoft_fast.GatedEmbedding.from_pretrained(torch.zeros(3, 2, dtype=torch.bfloat16),
                                                   frozen_dtype="float32")
    emb = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(3, 2, dtype=torch.bfloat16),
                                                     frozen_dtype="int8")
    assert emb.frozen_weight.dtype == torch.int8 and emb.tuned_weight.dtype == torch.bfloat16


def test_config_key():
    from autoft_fast.config import ConfigError
    from autoft_fast.models import AutoFTConfig

    assert AutoFTConfig().frozen_dtype == "float32"
    assert AutoFTConfig.from_dict({"frozen_dtype": "int8"}).frozen_dtype == "int8"
    with pytest.raises(ConfigError, match="frozen_dtype"):
        AutoFTConfig.from_dict({"frozen_dtype": "int4"})


@pytest.mark.parametrize("frozen_dtype", ["int8", "bfloat16"])
def test_transfer_model_forced_frozen_is_the_pretrained_model_on_the_stored_table(frozen_dtype):
    from test_models import model_cfg, pretrained_model, tiny_batch, tiny_feature_map, train_steps

    from autoft_fast.models import build_transfer_model

    fmap = tiny_feature_map()
    data = tiny_batch(fmap)
    pre = pretrained_model("deepfm", fmap, data)
    backend = LOW_BACKENDS[0] if LOW_BACKENDS else "reference"
    model = build_transfer_model("autoft", pre, fmap, model_cfg("deepfm"),
                                 {"backend": backend, "frozen_dtype": frozen_dtype,
                                  "field_policy": "network"})
    assert model.field_embedding.frozen_weight.dtype == quant.FROZEN_DTYPES[frozen_dtype]
    # The pre-trained model with its table replaced by the values the frozen copy stores.
    expected_model = copy.deepcopy(pre)
    with torch.no_grad():
        expected_model.embedding.weight.copy_(
            quant.dequantize(quant.to_frozen_dtype(pre.embedding.weight, frozen_dtype)))
    expected = expected_model(data)
    assert not torch.equal(expected, pre(data))
    # An untrained policy's zero logits tie, and a tie picks the frozen path.
    torch.testing.assert_close(model.eval()(data), expected, rtol=1e-6, atol=1e-6)
    losses = train_steps(model, data, steps=4)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("strategy", ["autoft", "autoft_field"])
@pytest.mark.parametrize("frozen_dtype", ["int8", "bfloat16"])
def test_low_precision_frozen_table_is_never_dequantised_whole(strategy, frozen_dtype,
                                                              monkeypatch):
    # The policy input and the multi-hot frozen rows read only the rows looked up: a [V, D]
    # dequantised copy per forward would cost the bytes int8 saves (and its time) at large V.
    from autoft_fast.models import build_transfer_model
    from autoft_fast.ops import quant
    from test_models import model_cfg, pretrained_model, tiny_batch, tiny_feature_map
    fmap = tiny_feature_map()
    data = tiny_batch(fmap, n=64, seed=5)
    pre = pretrained_model("deepfm", fmap, data)
    torch.manual_seed(0)
    model = build_transfer_model(strategy, pre, fmap, model_cfg("deepfm"),
                                 {"frozen_dtype": frozen_dtype, "backend": "reference"})
    emb = model.field_embedding
    expected = model.net.field_vectors(data, emb.frozen_dense_weight())  # whole-table copy
    calls = []
    real = quant.dequantize
    monkeypatch.setattr(quant, "dequantize",
                        lambda w, *a, **k: calls.append(w.data_ptr()) or real(w, *a, **k))
    assert torch.equal(model.net.field_vectors(data, emb.frozen_table()), expected)
    model.train()(data).sum().backward()
    model.eval()(data)
    assert emb.frozen_weight.data_ptr() not in calls  # gathered rows only, never the table


def test_int8_quantisation_in_row_blocks_names_the_right_row_and_matches_one_block(monkeypatch):
    from autoft_fast.ops import quant
    w = torch.randn(1000, 5, generator=torch.Generator().manual_seed(3)) * 3
    whole = quant.quantize_int8(w)
    monkeypatch.setattr(quant, "_QUANT_BLOCK", 64)  # many blocks, a ragged last one
    assert torch.equal(quant.quantize_int8(w), whole)
    w[777, 2] = float("nan")
    with pytest.raises(ValueError, match="weight row 777 "):
        quant.quantize_int8(w)


@pytest.mark.parametrize("backend", LOW_BACKENDS + ["reference"])
@pytest.mark.parametrize("rows", [0, 1, 2])
def test_int8_rows_of_odd_width_read_one_row_or_none(backend, rows):
    # One row (or none) of an int8 table with odd D sits at an odd byte offset: its float16
    # scale must still be read (the evaluation path gathers exactly the frozen picks).
    table = torch.randn(5, 3)
    packed = quant.quantize_int8(table)
    idx = torch.arange(rows)
    assert torch.equal(quant.dequantize(packed[idx]), quant.dequantize(packed)[idx])
    emb = autoft_fast.GatedEmbedding.from_pretrained(table, frozen_dtype="int8", backend=backend)
    assert torch.equal(emb.frozen_rows(torch.tensor([4])), quant.dequantize(packed)[4:5])
    # One lookup chooses the frozen row, the other the tuned one.
    logits = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    with torch.no_grad():
        out, _ = emb(torch.tensor([0, 1]), logits, noise=False)
    assert torch.equal(out[0], quant.dequantize(packed)[0]) and torch.equal(out[1], table[1])


def test_a_chosen_frozen_precision_survives_module_casts():
    emb = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(8, 4), frozen_dtype="bfloat16")
    before = emb.frozen_weight.clone()
    for cast in (lambda m: m.float(), lambda m: m.to(torch.float32), lambda m: m.to("cpu")):
        cast(emb)
        assert emb.frozen_weight.dtype == torch.bfloat16 and torch.equal(emb.frozen_weight, before)
        assert emb.tuned_weight.dtype == torch.float32
    emb.bfloat16()  # a bfloat16 tuned table: the frozen copy is bfloat16 anyway
    assert emb.frozen_weight.dtype == torch.bfloat16 == emb.tuned_weight.dtype
    # A frozen copy of the tuned dtype follows the casts as any buffer does.
    plain = autoft_fast.GatedEmbedding(8, 4).bfloat16()
    assert plain.frozen_weight.dtype == torch.bfloat16
    int8 = autoft_fast.GatedEmbedding.from_pretrained(torch.randn(8, 4), frozen_dtype="int8")
    assert int8.half().frozen_weight.dtype == torch.int8
