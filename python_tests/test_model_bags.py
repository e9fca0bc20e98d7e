"""Multi-hot fields of the field-gated strategies: the bag op and the eager pooling agree.

A TransferModel gates each (instance, multi-hot field) bag with the bag op
(``GatedEmbedding.bag``); a table with a fused optimizer sends the bags' values through the
gated op with the singles and pools them afterwards (its readable form: gates from
``gumbel_gates``, tuned rows from a plain fused lookup). Both paths must compute the same model: the pooling bit for bit (one definition,
``BaseCTRModel.pool_multihot``), the same gates from the same noise, and after training the
same weights up to float32 rounding of the policy's dot products (summed in another order).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from autoft_fast.models import FIELD_GATED, build_base_model, build_transfer_model
from autoft_fast.modules import attach_fused_optimizers

from test_models import BACKENDS, model_cfg, pretrained_model, tiny_batch, tiny_feature_map, train_steps


@pytest.fixture(scope="module")
def fmap():
    return tiny_feature_map()


@pytest.fixture(scope="module")
def data(fmap):
    return tiny_batch(fmap, n=128, seed=3)


def _pair(strategy, name, backend, pre, fmap, **autoft):
    """Two equal models of ``strategy``: one pools its bags in the op, one in eager PyTorch."""
    torch.manual_seed(21)
    via_op = build_transfer_model(strategy, pre, fmap, model_cfg(name),
                                  {"backend": backend, "tau": 1.0, "field_policy": "network",
                                   **autoft})
    eager = copy.deepcopy(via_op)
    eager._bags_in_op = lambda: False
    assert via_op._bags_in_op() and not eager._bags_in_op()
    return via_op, eager


def _count_bag_calls(model) -> list:
    calls = []
    emb = model.field_embedding
    original = emb.bag

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    emb.bag = counted
    return calls


def test_pool_multihot_is_the_bag_ops_mean(fmap, data):
    # The base model's pooling and the op's mean pooling are one computation: with every gate
    # on one table the op returns exactly the pooled rows, on both backends.
    torch.manual_seed(0)
    net = build_base_model(fmap, model_cfg("dnn", embedding_dim=16))
    with torch.no_grad():
        net.embedding.weight.normal_()
    w = net.embedding.weight.detach()
    ids = data.multihot
    values, offsets = net.multihot_bags(ids)
    pooled = net.pool_multihot(ids, w).reshape(-1, w.shape[1])
    empty = (offsets[1:] == offsets[:-1])
    assert bool(empty.any()) and bool((~empty).any())  # the batch has empty and full bags
    assert torch.equal(pooled[empty], torch.zeros(int(empty.sum()), w.shape[1]))
    from autoft_fast import gated_embedding_bag
    for backend in BACKENDS:
        for sign in (-1.0, 1.0):  # every gate frozen, then every gate tuned
            logits = torch.tensor([[-sign, sign]]).repeat(offsets.shape[0] - 1, 1) * 1e4
            out, _ = gated_embedding_bag(values, offsets, w, w.clone(), logits, mode="mean",
                                         noise=False, backend=backend)
            assert torch.equal(out, pooled), (backend, sign, (out - pooled).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["dnn", "deepfm"])
@pytest.mark.parametrize("strategy", FIELD_GATED)
def test_bag_op_and_eager_pooling_train_the_same_model(strategy, name, backend, fmap, data):
    pre = pretrained_model(name, fmap, data)
    via_op, eager = _pair(strategy, name, backend, pre, fmap)
    op_calls, eager_calls = _count_bag_calls(via_op), _count_bag_calls(eager)
    # A train-mode forward with the same seed: the same noise, gates and outputs, bit for bit.
    torch.manual_seed(5)
    out_op = via_op.train()(data)
    gates_op = via_op.last_gates["field"]
    torch.manual_seed(5)
    out_eager = eager.train()(data)
    assert op_calls and not eager_calls  # each model took its own path
    assert torch.equal(gates_op, eager.last_gates["field"])
    assert 0 < gates_op[:, -1, 1].mean().item() < 1  # the multi-hot gates use both tables
    assert torch.equal(out_op, out_eager)
    # The gradients of one step: the tuned table's bit for bit up to summation order.
    F.binary_cross_entropy_with_logits(out_op, data.label).backward()
    F.binary_cross_entropy_with_logits(out_eager, data.label).backward()
    g_op = via_op.field_embedding.tuned_weight.grad
    g_eager = eager.field_embedding.tuned_weight.grad
    assert g_op.abs().sum() > 0
    assert torch.allclose(g_op, g_eager, rtol=1e-6, atol=1e-7)
    via_op.zero_grad()
    eager.zero_grad()
    # A few training steps from the same seed land on the same weights and choices.
    torch.manual_seed(6)
    losses_op = train_steps(via_op, data, steps=6)
    torch.manual_seed(6)
    losses_eager = train_steps(eager, data, steps=6)
    assert losses_op[-1] < losses_op[0]
    assert losses_op == pytest.approx(losses_eager, rel=1e-5, abs=1e-6)
    moved = via_op.field_embedding.tuned_weight.detach() - via_op.field_embedding.frozen_weight
    assert moved.abs().sum() > 0  # the tuned table was trained
    for (k, a), (k2, b) in zip(via_op.state_dict().items(), eager.state_dict().items()):
        assert k == k2
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (k, (a - b).abs().max())
        else:
            assert torch.equal(a, b), k
    via_op.eval()
    eager.eval()
    assert torch.allclose(via_op(data), eager(data), rtol=1e-4, atol=1e-5)
    assert torch.equal(via_op.last_gates["field"], eager.last_gates["field"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_table_with_bags_takes_one_exact_step_and_leaves_no_gradient(backend, fmap, data):
    pre = pretrained_model("dnn", fmap, data)
    torch.manual_seed(21)
    plain = build_transfer_model("autoft", pre, fmap, model_cfg("dnn"), {"backend": backend})
    with torch.no_grad():  # a policy with opinions, so that both paths appear in the batch
        for p in plain.policy.parameters():
            p.normal_(0.0, 0.5)
        ns, nm = len(plain.net.single_fields), len(plain.net.multihot_fields)
        last = [m for m in plain.policy.modules() if isinstance(m, torch.nn.Linear)][-1]
        last.bias.view(-1, 2)[ns:ns + nm] = torch.tensor([-20.0, 20.0])  # bags: tuned
    plain.fix_policy()  # noise-free gates in training: the two models take the same choices
    fused = copy.deepcopy(plain)
    assert attach_fused_optimizers(fused, "fused_sgd", lr=0.1) == [fused.field_embedding]
    # Evaluation: the same model, bit for bit.
    assert torch.equal(plain.eval()(data), fused.eval()(data))
    before = fused.field_embedding.tuned_weight.detach().clone()
    F.binary_cross_entropy_with_logits(fused.train()(data), data.label).backward()
    F.binary_cross_entropy_with_logits(plain.train()(data), data.label).backward()
    emb = fused.field_embedding
    assert int(emb.optimizer_step) == 1 and emb.tuned_weight.grad is None
    # SGD on the plain model's gradient of the same step: the fused table's new rows.
    expected = before - 0.1 * plain.field_embedding.tuned_weight.grad.to_dense()
    assert torch.allclose(emb.tuned_weight.detach(), expected, rtol=1e-6, atol=1e-7)
    tags = fmap.field("tags")
    rows = slice(tags.offset, tags.offset + tags.vocab_size)
    assert not torch.equal(emb.tuned_weight.detach()[rows], before[rows])  # bags were stepped


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["dnn", "deepfm"])
@pytest.mark.parametrize("rule", ["fused_adam", "fused_sgd"])
def test_a_fused_table_with_bags_goes_through_the_op_as_the_readable_route_computes(
        rule, name, backend, fmap, data):
    # With a fused optimizer the singles and the bags' values take one call of the gated op
    # (so its backend's kernel runs and updates the table once); the readable route gates
    # with gumbel_gates and steps the tuned rows through a plain fused lookup. One step of
    # each from the same seed: the same gates, outputs, policy gradients and table update.
    # (Over several steps hard gates near a tie may flip on float rounding, so the
    # trajectories are not compared.)
    pre = pretrained_model(name, fmap, data)
    torch.manual_seed(21)
    via_op = build_transfer_model("autoft", pre, fmap, model_cfg(name),
                                  {"backend": backend, "tau": 1.0, "field_policy": "network"})
    with torch.no_grad():  # a policy with opinions: both paths appear in the batch
        for p in via_op.policy.parameters():
            p.normal_(0.0, 0.3)
        # A tuned table that differs from the frozen one: the gates' gradient is not zero.
        via_op.field_embedding.tuned_weight.add_(0.1 * torch.randn_like(via_op.field_embedding.tuned_weight))
    readable = copy.deepcopy(via_op)
    readable._fused_bags_in_op = lambda: False
    for m in (via_op, readable):
        assert m.field_embedding in attach_fused_optimizers(m, rule, lr=0.05)
    calls = []
    original = via_op.field_embedding.forward
    via_op.field_embedding.forward = lambda *a, **k: calls.append(1) or original(*a, **k)
    before = via_op.field_embedding.tuned_weight.detach().clone()
    outs = []
    for m in (via_op, readable):
        torch.manual_seed(5)
        out = m.train()(data)
        F.binary_cross_entropy_with_logits(out, data.label).backward()
        outs.append(out.detach())
    assert len(calls) == 1  # one op call for the singles and the bags
    gates = via_op.last_gates["field"]
    assert torch.equal(gates, readable.last_gates["field"])
    assert 0 < gates[:, -1, 1].mean().item() < 1 and 0 < gates[:, 0, 1].mean().item() < 1
    assert torch.allclose(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    for (k, a), (_, b) in zip(via_op.policy.named_parameters(), readable.policy.named_parameters()):
        assert a.grad.abs().sum() > 0, k
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6), (k, (a.grad - b.grad).abs().max())
    emb, other = via_op.field_embedding, readable.field_embedding
    assert int(emb.optimizer_step) == 1 and emb.tuned_weight.grad is None
    after = emb.tuned_weight.detach()
    assert not torch.equal(after, before)
    tags = fmap.field("tags")
    rows = slice(tags.offset, tags.offset + tags.vocab_size)
    assert not torch.equal(after[rows], before[rows])  # the bags' rows were stepped
    assert torch.allclose(after, other.tuned_weight.detach(), rtol=1e-6, atol=1e-6)
    # And it trains: a few steps lower the loss.
    losses = train_steps(via_op, data, steps=5)
    assert losses[-1] < losses[0] and int(emb.optimizer_step) == 6
