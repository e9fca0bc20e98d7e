"""The bag op (multi-hot fields) on every backend that serves it, against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import autoft_fast
from autoft_fast.ops import quant, registry
from autoft_fast.ops.philox import philox_uniforms
from autoft_fast.ops.reference import reference_gated_embedding_bag

from op_helpers import TOLERANCES, case_generator

BAG_BACKENDS = [n for n in registry.bag_backends("cpu") if n != "reference"]


def make_bags(case, *, bags=7, rows=23, dim=3, table_dtype=torch.float32, index_dtype=torch.int64,
              weights=False, duplicates=False, empty=True, seed=99, tau=1.0, noise=True):
    gen = case_generator(*case)
    counts = torch.randint(0, 5, (bags,), generator=gen)
    if empty and bags > 1:
        counts[1] = 0
    offsets = torch.cat((torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0))).to(index_dtype)
    length = int(counts.sum())
    if duplicates:
        values = torch.full((length,), int(torch.randint(0, rows, (), generator=gen)), dtype=index_dtype)
    else:
        values = torch.randint(0, rows, (length,), generator=gen).to(index_dtype)
    frozen = torch.randn(rows, dim, generator=gen).to(table_dtype)
    tuned = (frozen.float() + 0.5 * torch.randn(rows, dim, generator=gen)).to(table_dtype)
    logits = torch.randn(bags, 2, generator=gen)
    # Keep every gate away from a tie, where float rounding may flip a hard gate.
    u = torch.from_numpy(philox_uniforms(seed, bags)).double() if noise else torch.full((bags,), 0.5).double()
    x = (logits[:, 1].double() - logits[:, 0].double() + torch.log(u + 1e-20) - torch.log(1 - u)) / tau
    logits[:, 1] = torch.where(x.abs() < 1e-3, logits[:, 1] + 0.01 * tau, logits[:, 1])
    w = torch.rand(length, generator=gen) + 0.5 if weights else None
    return dict(values=values, offsets=offsets, frozen=frozen, tuned=tuned, logits=logits, weights=w,
                grad_out=torch.randn(bags, dim, generator=gen), grad_gates=torch.randn(bags, 2, generator=gen),
                seed=seed)


def run_bag(backend, inp, *, mode, hard=True, noise=True, sparse=False, tau=1.0, float64=False):
    tuned = inp["tuned"].double() if float64 else inp["tuned"].clone()
    frozen = inp["frozen"].double() if float64 and inp["frozen"].dtype != torch.int8 else inp["frozen"]
    if float64 and inp["frozen"].dtype == torch.int8:
        frozen = quant.dequantize(inp["frozen"]).double()
    tuned.requires_grad_()
    logits = (inp["logits"].double() if float64 else inp["logits"].clone()).requires_grad_()
    w = inp["weights"]
    if w is not None and float64:
        w = w.double()
    out, gates = autoft_fast.gated_embedding_bag(
        inp["values"], inp["offsets"], frozen, tuned, logits, per_sample_weights=w, mode=mode,
        tau=tau, hard=hard, noise=noise, seed=inp["seed"], sparse=sparse, backend=backend)
    loss = (out.double() * inp["grad_out"].double()).sum() + (gates.double() * inp["grad_gates"].double()).sum()
    loss.backward()
    g_t = tuned.grad.to_dense() if tuned.grad.is_sparse else tuned.grad
    return out.double(), gates.double(), g_t.double(), logits.grad.double()


def assert_matches(got, want, table_dtype, sums=1):
    # ``sums``: how many float32 terms the largest gradient row adds (its rounding grows with it).
    rtol, atol = (t * max(1, sums // 50) for t in TOLERANCES[table_dtype])
    names = ("out", "gates", "grad_tuned", "grad_logits")
    for name, g, w in zip(names, got, want):
        tol = (1e-5, 1e-5) if name in ("gates", "grad_logits") and table_dtype == torch.float32 else (rtol, atol)
        if name == "grad_logits":
            tol = (max(tol[0], 1e-4), max(tol[1], 1e-4 if table_dtype == torch.float32 else 5e-2))
        torch.testing.assert_close(g, w, rtol=tol[0], atol=tol[1], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BAG_BACKENDS)
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("dim", [1, 3, 17])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("weights", [False, True])
def test_bag_matches_reference(backend, mode, dim, index_dtype, weights):
    inp = make_bags(("bag", backend, mode, dim, index_dtype, weights), dim=dim, index_dtype=index_dtype,
                    weights=weights)
    want = run_bag("reference", inp, mode=mode, float64=True)
    assert_matches(run_bag(backend, inp, mode=mode), want, torch.float32)


@pytest.mark.parametrize("backend", BAG_BACKENDS)
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hard,noise,sparse", [(True, True, False), (False, True, True),
                                               (True, False, True), (False, False, False)])
def test_bag_dtypes_and_modes(backend, table_dtype, hard, noise, sparse):
    inp = make_bags(("dtype", backend, table_dtype, hard, noise, sparse), bags=40, dim=17,
                    table_dtype=table_dtype, noise=noise)
    want = run_bag("reference", inp, mode="mean", hard=hard, noise=noise, sparse=sparse)
    assert_matches(run_bag(backend, inp, mode="mean", hard=hard, noise=noise, sparse=sparse), want,
                   table_dtype)


@pytest.mark.parametrize("backend", BAG_BACKENDS)
@pytest.mark.parametrize("sparse", [False, True])
def test_bag_all_duplicate_values_accumulate_exactly(backend, sparse):
    inp = make_bags(("dup", backend, sparse), bags=300, dim=5, duplicates=True)
    want = run_bag("reference", inp, mode="sum", hard=False, sparse=sparse, float64=True)
    got = run_bag(backend, inp, mode="sum", hard=False, sparse=sparse)
    assert_matches(got, want, torch.float32, sums=inp["values"].numel())
    assert int((got[2].abs().sum(1) > 0).sum()) == 1  # one row got every contribution


@pytest.mark.parametrize("backend", BAG_BACKENDS)
def test_bag_single_bag_and_no_bags(backend):
    inp = make_bags(("single", backend), bags=1, dim=4, empty=False)
    assert_matches(run_bag(backend, inp, mode="mean"), run_bag("reference", inp, mode="mean", float64=True),
                   torch.float32)
    f = torch.randn(5, 4)
    t = f.clone().requires_grad_()
    out, gates = autoft_fast.gated_embedding_bag(torch.zeros(0, dtype=torch.long), torch.zeros(1, dtype=torch.long),
                                                 f, t, torch.zeros(0, 2), backend=backend, seed=0)
    assert out.shape == (0, 4) and gates.shape == (0, 2)


@pytest.mark.parametrize("backend", BAG_BACKENDS + ["reference"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_empty_bags_give_zeros_and_no_tuned_gradient(backend, mode):
    f = torch.randn(6, 3)
    t = (f + 1).requires_grad_()
    logits = torch.tensor([[0.0, 5.0], [0.0, 5.0], [5.0, 0.0]], requires_grad=True)
    out, gates = autoft_fast.gated_embedding_bag(torch.tensor([2, 2]), torch.tensor([0, 0, 2, 2]), f, t, logits,
                                                 mode=mode, noise=False, backend=backend)
    assert bool(out[0].eq(0).all()) and bool(out[2].eq(0).all())
    scale = 1.0 if mode == "sum" else 0.5
    torch.testing.assert_close(out[1], 2 * scale * (f[2] + 1))
    out.sum().backward()
    torch.testing.assert_close(t.grad[2], torch.full((3,), 2 * scale))
    assert float(t.grad.abs().sum()) == pytest.approx(6 * scale)


@pytest.mark.parametrize("backend", BAG_BACKENDS)
def test_bag_int8_frozen_table_reads_the_dequantised_rows(backend):
    inp = make_bags(("int8", backend), bags=30, dim=16)
    inp["frozen"] = quant.quantize_int8(inp["frozen"])
    want = run_bag("reference", inp, mode="mean", float64=True)
    assert_matches(run_bag(backend, inp, mode="mean"), want, torch.float32)


def test_bag_noise_is_the_lookup_stream_indexed_by_bag():
    # A bag of one value with the lookup op's gate for lookup b: the same number.
    f, gen = torch.randn(50, 4), torch.Generator().manual_seed(3)
    t = f + torch.randn(50, 4, generator=gen)
    idx = torch.randint(0, 50, (64,), generator=gen)
    logits = torch.randn(64, 2, generator=gen)
    for backend in BAG_BACKENDS + ["reference"]:
        out, gates = autoft_fast.gated_embedding_bag(idx, torch.arange(65), f, t, logits, mode="sum", seed=11,
                                                     backend=backend)
        out1, gates1 = autoft_fast.gated_embedding(idx, f, t, logits, seed=11, backend="reference")
        torch.testing.assert_close(gates, gates1)
        torch.testing.assert_close(out, out1)


@pytest.mark.parametrize("backend", BAG_BACKENDS)
def test_bag_opcheck(backend):
    inp = make_bags(("opcheck", backend), bags=9, dim=5, weights=True)
    row = registry.REGISTRY[backend]
    fwd, bwd = row.bag_ops()
    tuned = inp["tuned"].clone().requires_grad_()
    logits = inp["logits"].clone().requires_grad_()
    for sparse in (False, True):
        args = (inp["values"], inp["offsets"], inp["weights"], inp["frozen"], tuned, logits,
                torch.tensor(5), None, 1.0, True, True, 1, sparse)
        torch.library.opcheck(fwd, args)
        bargs = (inp["grad_out"], inp["grad_gates"], inp["values"], inp["offsets"], inp["weights"],
                 inp["frozen"], inp["tuned"], inp["logits"], torch.tensor(5), None, 1.0, True, True, 1, sparse)
        torch.library.opcheck(bwd, bargs, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BAG_BACKENDS)
def test_bag_torch_compile(backend):
    inp = make_bags(("compile", backend), bags=12, dim=8)

    def f(values, offsets, frozen, tuned, logits):
        out, gates = autoft_fast.gated_embedding_bag(values, offsets, frozen, tuned, logits, mode="mean",
                                                     seed=4, backend=backend)
        return out.sum() + gates[:, 1].sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    t1, t2 = inp["tuned"].clone().requires_grad_(), inp["tuned"].clone().requires_grad_()
    l1, l2 = inp["logits"].clone().requires_grad_(), inp["logits"].clone().requires_grad_()
    a = f(inp["values"], inp["offsets"], inp["frozen"], t1, l1)
    b = compiled(inp["values"], inp["offsets"], inp["frozen"], t2, l2)
    torch.testing.assert_close(a, b)
    a.backward()
    b.backward()
    torch.testing.assert_close(t1.grad, t2.grad)
    torch.testing.assert_close(l1.grad, l2.grad)


@pytest.mark.parametrize("backend", BAG_BACKENDS + ["reference"])
@pytest.mark.parametrize("values,offsets,exc,words", [
    ([1, 2, 3], [0, 2, 1, 3], ValueError, "offsets must be non-decreasing, got offsets[1] = 2 > offsets[2] = 1"),
    ([1, 2, 3], [0, 1, 2], ValueError, "offsets[-1] = 2 must equal len(values) = 3"),
    ([1, 2, 3], [1, 2, 3], ValueError, "offsets[0] = 1 must be 0"),
    ([1, 9, 3], [0, 1, 3], IndexError, "values[1] = 9 is out of range for a table of 5 rows"),
    ([1, -1, 3], [0, 1, 3], IndexError, "values[1] = -1 is out of range"),
])
def test_bad_bags_raise_clear_errors(backend, values, offsets, exc, words):
    f = torch.randn(5, 3)
    bags = len(offsets) - 1
    with pytest.raises(exc) as info:
        autoft_fast.gated_embedding_bag(torch.tensor(values), torch.tensor(offsets), f, f.clone(),
                                        torch.zeros(bags, 2), backend=backend, seed=0)
    assert words in str(info.value)


def test_bad_bag_arguments_name_themselves():
    f = torch.randn(5, 3)
    v, o = torch.tensor([1, 2]), torch.tensor([0, 2])
    with pytest.raises(ValueError, match=r"mode = 'max' is not one of \['sum', 'mean'\]"):
        autoft_fast.gated_embedding_bag(v, o, f, f, torch.zeros(1, 2), mode="max")
    with pytest.raises(ValueError, match=r"logits must have shape \[B, 2\] = \(1, 2\) \(one gate "
                                         r"per bag; B \+ 1 = 2 offsets\), got \(2, 2\)"):
        autoft_fast.gated_embedding_bag(v, o, f, f, torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"uniforms must have shape \[B\] = \(1,\) \(one per bag"):
        autoft_fast.gated_embedding_bag(v, o, f, f, torch.zeros(1, 2), uniforms=torch.rand(2))
    with pytest.raises(TypeError, match="offsets must be int32 or int64, got torch.float32"):
        autoft_fast.gated_embedding_bag(v, o.float(), f, f, torch.zeros(1, 2))
    with pytest.raises(ValueError, match=r"per_sample_weights must have the shape of values \(2,\), got \(3,\)"):
        autoft_fast.gated_embedding_bag(v, o, f, f, torch.zeros(1, 2), per_sample_weights=torch.ones(3))
    with pytest.raises(ValueError, match="does not fuse an optimizer"):
        emb = autoft_fast.GatedEmbedding(5, 3, optimizer="sgd", lr=0.1)
        emb.bag(v, o, torch.zeros(1, 2))
    no_bags = registry.register(registry.Backend(name="no_bags_test", devices=("cpu",),
                                                 probe=lambda device: True,
                                                 forward=lambda: None, backward=lambda: None))
    try:
        with pytest.raises(ValueError, match="backend = 'no_bags_test' does not serve the bag op"):
            autoft_fast.gated_embedding_bag(v, o, f, f, torch.zeros(1, 2), backend=no_bags.name)
    finally:
        registry.unregister(no_bags.name)


@pytest.mark.parametrize("backend", BAG_BACKENDS)
def test_bag_kernel_checks_its_inputs_directly(backend):
    fwd, _ = registry.REGISTRY[backend].bag_ops()
    f = torch.randn(5, 3)
    with pytest.raises(IndexError, match=r"values\[2\] = 7 is out of range for a table of 5 rows"):
        fwd(torch.tensor([0, 1, 7]), torch.tensor([0, 3]), None, f, f, torch.zeros(1, 2),
            torch.tensor(0), None, 1.0, True, True, 0, False)
    with pytest.raises(ValueError, match="offsets must be non-decreasing"):
        fwd(torch.tensor([0, 1, 2]), torch.tensor([0, 2, 1, 3]), None, f, f, torch.zeros(3, 2),
            torch.tensor(0), None, 1.0, True, True, 0, False)


def test_gated_embedding_module_bag_matches_functional():
    emb = autoft_fast.GatedEmbedding(30, 6, frozen_dtype="bfloat16").eval()
    with torch.no_grad():
        emb.tuned_weight.add_(1.0)
    v, o = torch.tensor([1, 5, 5, 29]), torch.tensor([0, 2, 2, 4])
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])
    out, gates = emb.bag(v, o, logits, mode="sum")
    want, _ = reference_gated_embedding_bag(v, o, emb.frozen_weight, emb.tuned_weight.detach(), logits,
                                            mode="sum", noise=False)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(gates, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]))


@pytest.mark.parametrize("backend", BAG_BACKENDS + ["reference"])
def test_a_hard_bag_gate_reads_only_the_chosen_pool(backend):
    # As for lookups: with hard gates a NaN or inf in the pool not chosen cannot reach the
    # output (z0 * F + z1 * T would give 0 * NaN = NaN).
    frozen, tuned = torch.randn(4, 3), torch.randn(4, 3)
    frozen[1] = float("nan")  # in bag 0's frozen pool; bag 0 takes the tuned one
    tuned[2] = float("inf")   # in bag 1's tuned pool; bag 1 takes the frozen one
    values, offsets = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 2, 4])
    logits = torch.tensor([[-5.0, 5.0], [5.0, -5.0]])
    out, gates = autoft_fast.gated_embedding_bag(values, offsets, frozen, tuned, logits,
                                                 noise=False, mode="sum", backend=backend)
    assert gates.tolist() == [[0.0, 1.0], [1.0, 0.0]]
    assert torch.equal(out[0], tuned[0] + tuned[1])
    assert torch.equal(out[1], frozen[2] + frozen[3])
