"""GatedEmbedding: construction, modes, state_dict, optimizers in both gradient modes."""

import pytest
import torch

import autoft_fast
from autoft_fast import GatedEmbedding


def test_from_pretrained_copies_and_never_aliases():
    pre = torch.nn.Embedding(30, 6)
    emb = GatedEmbedding.from_pretrained(pre)
    assert torch.equal(emb.frozen_weight, pre.weight) and torch.equal(emb.tuned_weight, pre.weight)
    assert isinstance(emb.tuned_weight, torch.nn.Parameter)
    assert "frozen_weight" in dict(emb.named_buffers())
    assert [n for n, _ in emb.named_parameters()] == ["tuned_weight"]
    with torch.no_grad():
        emb.tuned_weight.add_(1.0)
    assert torch.equal(emb.frozen_weight, pre.weight)
    assert pre.weight.data_ptr() not in (emb.frozen_weight.data_ptr(), emb.tuned_weight.data_ptr())


def test_eval_is_deterministic_argmax_train_samples():
    emb = GatedEmbedding.from_pretrained(torch.randn(20, 4))
    idx = torch.randint(0, 20, (64, 3))
    logits = torch.randn(64, 3, 2)
    emb.eval()
    _, g1 = emb(idx, logits)
    _, g2 = emb(idx, logits)
    assert torch.equal(g1, g2)
    assert torch.equal(g1[..., 1], (logits[..., 1] > logits[..., 0]).float())
    emb.train()
    _, g3 = emb(idx, logits, tau=5.0)
    _, g4 = emb(idx, logits, tau=5.0)
    assert not torch.equal(g3, g4)  # fresh noise each call
    emb.eval()
    _, g5 = emb(idx, logits, tau=5.0, noise=True, seed=9)  # sampling at evaluation on request
    _, g6 = emb(idx, logits, tau=5.0, noise=True, seed=9)
    assert torch.equal(g5, g6) and not torch.equal(g5, g1)


def test_state_dict_round_trip():
    a = GatedEmbedding.from_pretrained(torch.randn(12, 5), sparse=True)
    with torch.no_grad():
        a.tuned_weight.mul_(2)
    b = GatedEmbedding(12, 5, sparse=True)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.frozen_weight, b.frozen_weight) and torch.equal(a.tuned_weight, b.tuned_weight)
    assert set(a.state_dict()) == {"frozen_weight", "tuned_weight"}


def test_repr_names_the_essentials():
    r = repr(GatedEmbedding(100, 8, sparse=True, backend="reference"))
    assert "100, 8" in r and "sparse=True" in r and "'reference'" in r


@pytest.mark.parametrize("backend", autoft_fast.available_backends("cpu"))
@pytest.mark.parametrize("opt_name", ["SGD", "SparseAdam", "Adagrad"])
def test_sparse_mode_trains_with_sparse_optimizers(backend, opt_name):
    torch.manual_seed(0)
    emb = GatedEmbedding.from_pretrained(torch.randn(40, 4), sparse=True, backend=backend)
    opt = getattr(torch.optim, opt_name)(emb.parameters(), lr=0.1)
    idx = torch.tensor([[1, 2], [3, 3]])
    logits = torch.tensor([[[0.0, 9.0], [9.0, 0.0]], [[0.0, 9.0], [0.0, 9.0]]])
    before = emb.tuned_weight.detach().clone()
    frozen_before = emb.frozen_weight.clone()
    out, gates = emb(idx, logits, noise=False)
    out.pow(2).sum().backward()
    assert emb.tuned_weight.grad.is_sparse
    opt.step()
    changed = (emb.tuned_weight.detach() != before).any(1)
    # Rows 1 and 3 chose the tuned path; row 2 chose the frozen one; the rest were not looked up.
    assert changed.tolist() == [i in (1, 3) for i in range(40)]
    assert torch.equal(emb.frozen_weight, frozen_before)


@pytest.mark.parametrize("backend", autoft_fast.available_backends("cpu"))
def test_dense_and_sparse_modes_give_the_same_sgd_step(backend):
    torch.manual_seed(1)
    w = torch.randn(25, 3)
    idx = torch.randint(0, 25, (50,))
    logits = torch.randn(50, 2)
    results = []
    for sparse in (False, True):
        emb = GatedEmbedding.from_pretrained(w, sparse=sparse, backend=backend)
        opt = torch.optim.SGD(emb.parameters(), lr=0.5)
        out, _ = emb(idx, logits, seed=4)
        out.sum().backward()
        opt.step()
        results.append(emb.tuned_weight.detach())
    torch.testing.assert_close(results[0], results[1])


def test_bad_construction():
    with pytest.raises(ValueError, match="num_embeddings = 0"):
        GatedEmbedding(0, 4)
    with pytest.raises(ValueError, match="backend = 'gpu'"):
        GatedEmbedding(3, 4, backend="gpu")
    with pytest.raises(ValueError, match="2-D"):
        GatedEmbedding.from_pretrained(torch.zeros(3))


def test_cpu_sparse_gradient_reaches_the_optimizer_coalesced():
    if "cpu" not in autoft_fast.available_backends("cpu"):
        pytest.fail("the cpu backend is not built")
    emb = GatedEmbedding.from_pretrained(torch.randn(50, 4), sparse=True, backend="cpu")
    idx = torch.randint(0, 50, (40,))
    out, _ = emb(idx, torch.randn(40, 2), seed=1)
    out.sum().backward()
    g = emb.tuned_weight.grad
    assert g.is_sparse and g.is_coalesced()
    rows = g._indices()[0]
    assert torch.equal(rows, torch.unique(rows))
    # A second backward accumulates an unsorted concatenation: no longer marked coalesced.
    out, _ = emb(idx, torch.randn(40, 2), seed=2)
    out.sum().backward()
    g2 = emb.tuned_weight.grad
    assert not g2.is_coalesced() or torch.equal(g2._indices()[0], torch.unique(g2._indices()[0]))
    torch.testing.assert_close(g2.to_dense(), g2.coalesce().to_dense())


def test_bad_module_arguments_are_named():
    from autoft_fast import GatedEmbedding
    for args, kw, message in (((10.5, 4), {}, "num_embeddings must be an int, got 10.5"),
                              (("10", 4), {}, "num_embeddings must be an int, got '10'"),
                              ((10, 4), {"sparse": "False"}, "sparse must be True or False"),
                              ((10, 4), {"dtype": torch.int64}, "dtype must be a floating")):
        with pytest.raises(TypeError, match=message):
            GatedEmbedding(*args, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_logits_are_taken_as_float32(dtype):
    # A policy under torch.autocast gives 16-bit logits: the module upcasts them (exactly),
    # for lookups and bags, and their gradient comes back in their own dtype.
    emb = GatedEmbedding.from_pretrained(torch.randn(20, 4)).train()
    with torch.no_grad():
        emb.tuned_weight.add_(torch.randn(20, 4))
    idx = torch.randint(0, 20, (16, 3))
    low = torch.randn(16, 3, 2).to(dtype).requires_grad_()
    out, gates = emb(idx, low, seed=5)
    ref, ref_gates = emb(idx, low.detach().float(), seed=5)
    assert torch.equal(out, ref) and torch.equal(gates, ref_gates)
    out.sum().backward()
    assert low.grad is not None and low.grad.dtype == dtype and low.grad.abs().sum() > 0
    bag_logits = torch.randn(2, 2).to(dtype)
    values, offsets = torch.tensor([1, 2, 2]), torch.tensor([0, 1, 3])
    got, _ = emb.bag(values, offsets, bag_logits, seed=5)
    want, _ = emb.bag(values, offsets, bag_logits.float(), seed=5)
    assert torch.equal(got, want)
