"""Plain tables trained by the fused optimizer: equal to the plain optimizer on the same gradient.

``fused_optim.fused_lookup`` (the plain lookups of one table, updated in the backward) is checked
against ``nn.Embedding`` + SGD / SparseAdam / row-wise Adagrad written out, on fresh random
inputs with repeated indices and both index dtypes; then every strategy that trains a plain
table (finetune_all, freeze_dnn, l2sp, target_only, autoft_layer, and autoft's gated first-order
weights) is checked against the same model trained densely, the lazy L2-SP term, the Trainer's
``embedding_optimizer`` switch and an exact resume.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import autoft_fast
from autoft_fast.models import build_transfer_model
from autoft_fast.modules import EmbeddingTable, attach_fused_optimizers, fused_tables
from autoft_fast.ops.fused_optim import (RULES, FusedOptimizer, Lookup, fused_lookup,
                                         fused_updates_paused, plain_lookup)
from autoft_fast.train import TrainConfig, Trainer, TrainingInterrupted

from test_models import model_cfg, pretrained_model, tiny_batch, tiny_feature_map

LR = 0.05


def _plain_step(kind, param, state, grad, touched):
    """One step of the plain optimizer on ``param`` from the dense ``grad`` of the touched rows."""
    if kind == "sgd":
        param.grad = grad.clone()
        torch.optim.SGD([param], lr=LR, foreach=False).step()
    elif kind == "adam":
        if "opt" not in state:
            state["opt"] = torch.optim.SparseAdam([param], lr=LR)
        param.grad = torch.sparse_coo_tensor(touched[None], grad[touched], grad.shape)
        state["opt"].step()
    else:  # row-wise Adagrad written out; only the touched rows move
        acc = state.setdefault("acc", torch.zeros(param.shape[0]))
        with torch.no_grad():
            acc[touched] += (grad[touched] ** 2).mean(dim=1)
            param[touched] -= LR * grad[touched] / (acc[touched].sqrt() + 1e-10).unsqueeze(1)
    param.grad = None


def _random_lookups(gen, v, index_dtype, duplicates):
    high = 4 if duplicates else v
    single = torch.randint(0, high, (6, 3), generator=gen).to(index_dtype)
    bag = torch.randint(0, high, (6, 2, 4), generator=gen).to(index_dtype)
    bag_w = torch.rand(6, 2, 4, generator=gen)
    bag_w[bag_w < 0.3] = 0.0  # PAD slots: weight 0, their rows are not touched
    scale = (torch.rand(6, 3, generator=gen) > 0.4).float() * torch.rand(6, 3, generator=gen)
    return single, bag, bag_w, scale


@pytest.mark.parametrize("kind", sorted(RULES))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dim,duplicates", [(1, True), (3, True), (16, False)])
def test_fused_lookup_equals_plain_optimizer(kind, index_dtype, dim, duplicates):
    gen = torch.Generator().manual_seed(hash((kind, str(index_dtype), dim, duplicates)) % 2**31)
    v = 20
    start = torch.randn(v, dim, generator=gen)
    fused_w = torch.nn.Parameter(start.clone())
    plain_w = torch.nn.Parameter(start.clone())
    opt = FusedOptimizer(kind, lr=LR)
    state, plain_state = opt.new_state(fused_w), {}
    for _ in range(3):  # the lazy state carries over
        single, bag, bag_w, scale = _random_lookups(gen, v, index_dtype, duplicates)
        scale_f = scale.clone().requires_grad_()
        scale_p = scale.clone().requires_grad_()
        lookups = [Lookup(single), Lookup(bag, bag_w, pooled=True), Lookup(single, scale_f)]
        outs = fused_lookup(fused_w, lookups, opt, state)
        plain = [plain_lookup(plain_w, Lookup(single)),
                 plain_lookup(plain_w, Lookup(bag, bag_w, pooled=True)),
                 plain_lookup(plain_w, Lookup(single, scale_p))]
        for got, lk in zip(outs, lookups):  # the forward is the plain calls' values
            assert torch.equal(got, plain_lookup(fused_w.detach(), lk))
        for got, want in zip(outs, plain):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        g_out = [torch.randn(o.shape, generator=gen) for o in outs]
        sum((o * g).sum() for o, g in zip(outs, g_out)).backward()
        sum((o * g).sum() for o, g in zip(plain, g_out)).backward()
        touched = torch.unique(torch.cat([single.reshape(-1), bag[bag_w != 0],
                                          single[scale != 0]]).long())
        torch.testing.assert_close(scale_f.grad, scale_p.grad, rtol=1e-5, atol=1e-6)
        _plain_step(kind, plain_w, plain_state, plain_w.grad, touched)
        assert fused_w.grad is None
        torch.testing.assert_close(fused_w.detach(), plain_w.detach(), rtol=1e-5, atol=1e-6)
    assert int(state["step"]) == 3
    if kind == "adam":
        torch.testing.assert_close(state["exp_avg_sq"],
                                   plain_state["opt"].state[plain_w]["exp_avg_sq"],
                                   rtol=1e-5, atol=1e-8)


def test_fused_lookup_on_single_lookups_is_sparse_adam_on_nn_embedding():
    gen = torch.Generator().manual_seed(5)
    emb = torch.nn.Embedding(30, 8, sparse=True)
    table = EmbeddingTable(30, 8)
    with torch.no_grad():
        table.weight.copy_(emb.weight)
    table.use_fused_optimizer("adam", lr=1e-2)
    sparse_adam = torch.optim.SparseAdam(emb.parameters(), lr=1e-2)
    for _ in range(4):
        ids = torch.randint(0, 10, (64, 3), generator=gen)  # many repeats
        g = torch.randn(64, 3, 8, generator=gen)
        (table.lookup([Lookup(ids)])[0] * g).sum().backward()
        sparse_adam.zero_grad()
        (emb(ids) * g).sum().backward()
        sparse_adam.step()
        torch.testing.assert_close(table.weight.detach(), emb.weight.detach(), rtol=1e-5,
                                   atol=1e-6)
    assert int(table.optimizer_step) == 4 and table.weight.grad is None


def test_fused_lookup_paused_and_lazy_l2sp():
    w = torch.nn.Parameter(torch.ones(6, 2))
    anchor = torch.zeros(6, 2)
    opt = FusedOptimizer("sgd", lr=0.5)
    state = opt.new_state(w)
    with fused_updates_paused():
        fused_lookup(w, [Lookup(torch.tensor([1]))], opt, state)[0].sum().backward()
    assert torch.equal(w.detach(), torch.ones(6, 2))
    out = fused_lookup(w, [Lookup(torch.tensor([1, 1, 3]))], opt, state, l2sp=(anchor, 0.2))[0]
    out.sum().backward()
    # row 1: g = 2 (two lookups) + 0.2 * (1 - 0); row 3: g = 1 + 0.2; the rest are not pulled
    assert w[1].tolist() == pytest.approx([1 - 0.5 * 2.2] * 2)
    assert w[3].tolist() == pytest.approx([1 - 0.5 * 1.2] * 2)
    assert torch.equal(w.detach()[[0, 2, 4, 5]], torch.ones(4, 2))


@pytest.mark.parametrize("kind", ["adam", "rowwise_adagrad"])
@pytest.mark.parametrize("l2sp", [False, True])
def test_calls_of_one_plain_table_in_one_backward_are_one_step(kind, l2sp):
    # Two fused_lookup calls of one table in one backward: one optimizer step on their
    # combined rows (a stateful rule would otherwise step twice), equal to one call with both
    # lookups; a weighted lookup's weight gradient reads the rows of the step's forward.
    gen = torch.Generator().manual_seed(3)
    start = torch.randn(8, 3, generator=gen)
    anchor = (torch.zeros(8, 3), 0.3) if l2sp else None
    ids_a, ids_b = torch.tensor([1, 1, 4]), torch.tensor([[4, 7], [1, 0]])
    weights = torch.rand(2, 2, generator=gen)
    coef_a, coef_b = torch.randn(3, 3, generator=gen), torch.randn(2, 3, generator=gen)
    opt = FusedOptimizer(kind, lr=0.1)
    split, joint = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    s_split, s_joint = opt.new_state(split), opt.new_state(joint)
    for _ in range(2):
        wb_s, wb_j = weights.clone().requires_grad_(), weights.clone().requires_grad_()
        (a,) = fused_lookup(split, [Lookup(ids_a)], opt, s_split, l2sp=anchor)
        (b,) = fused_lookup(split, [Lookup(ids_b, wb_s, pooled=True)], opt, s_split, l2sp=anchor)
        ((a * coef_a).sum() + (b * coef_b).sum()).backward()
        a, b = fused_lookup(joint, [Lookup(ids_a), Lookup(ids_b, wb_j, pooled=True)], opt,
                            s_joint, l2sp=anchor)
        ((a * coef_a).sum() + (b * coef_b).sum()).backward()
        torch.testing.assert_close(split.detach(), joint.detach())
        torch.testing.assert_close(wb_s.grad, wb_j.grad)
        for name in s_joint:
            torch.testing.assert_close(s_split[name], s_joint[name], msg=name)
    assert int(s_split["step"]) == 2
    assert not torch.equal(split.detach(), start)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_accumulated_micro_batches_are_one_step_on_the_summed_gradient(kind):
    # Gradient accumulation: two micro-batches' backwards inside fused_updates_accumulated
    # give what one backward of both takes (one step on the summed gradient), for a gated
    # table (its logit gradients read the block's starting rows) and for a plain one.
    from autoft_fast.ops.fused_optim import fused_updates_accumulated
    gen = torch.Generator().manual_seed(8)
    pre = torch.randn(6, 3, generator=gen)
    idx, logits = torch.tensor([0, 2, 2, 5, 1]), torch.randn(5, 2, generator=gen)
    coef = torch.randn(5, 3, generator=gen)

    def gated():
        return autoft_fast.GatedEmbedding.from_pretrained(pre, optimizer=kind, lr=0.1)

    acc, one = gated(), gated()
    plain_acc, plain_one = torch.nn.Parameter(pre.clone()), torch.nn.Parameter(pre.clone())
    opt = FusedOptimizer(kind, lr=0.1)
    s_acc, s_one = opt.new_state(plain_acc), opt.new_state(plain_one)
    grads = []
    with fused_updates_accumulated():
        for part in (slice(0, 2), slice(2, 5)):
            lg = logits[part].clone().requires_grad_()
            out, _ = acc(idx[part], lg, hard=False, noise=False)
            (p_out,) = fused_lookup(plain_acc, [Lookup(idx[part])], opt, s_acc)
            ((out * coef[part]).sum() + (p_out * coef[part]).sum()).backward()
            grads.append(lg.grad)
        assert torch.equal(acc.tuned_weight.detach(), pre)  # nothing applied inside
        assert torch.equal(plain_acc.detach(), pre)
    lg = logits.clone().requires_grad_()
    out, _ = one(idx, lg, hard=False, noise=False)
    (p_out,) = fused_lookup(plain_one, [Lookup(idx)], opt, s_one)
    ((out * coef).sum() + (p_out * coef).sum()).backward()
    torch.testing.assert_close(torch.cat(grads), lg.grad)
    torch.testing.assert_close(acc.tuned_weight.detach(), one.tuned_weight.detach())
    torch.testing.assert_close(plain_acc.detach(), plain_one.detach())
    assert int(acc.optimizer_step) == int(s_acc["step"]) == 1
    assert not torch.equal(plain_acc.detach(), pre)


def test_accumulation_adds_l2sp_per_backward_and_an_exception_applies_nothing():
    from autoft_fast.ops.fused_optim import fused_updates_accumulated
    w = torch.nn.Parameter(torch.ones(4, 2))
    anchor = torch.zeros(4, 2)
    opt = FusedOptimizer("sgd", lr=0.5)
    state = opt.new_state(w)
    with pytest.raises(KeyError):
        with fused_updates_accumulated():
            fused_lookup(w, [Lookup(torch.tensor([1]))], opt, state)[0].sum().backward()
            raise KeyError("a failed micro-batch")
    assert torch.equal(w.detach(), torch.ones(4, 2))
    with fused_updates_accumulated():
        for _ in range(2):
            out = fused_lookup(w, [Lookup(torch.tensor([1, 3]))], opt, state,
                               l2sp=(anchor, 0.2))[0]
            out.sum().backward()
    # rows 1 and 3: g = 2 x (1 + 0.2 * (1 - 0)) over the two backwards; the rest unmoved
    assert w[1].tolist() == pytest.approx([1 - 0.5 * 2.4] * 2)
    assert w[3].tolist() == pytest.approx([1 - 0.5 * 2.4] * 2)
    assert torch.equal(w.detach()[[0, 2]], torch.ones(2, 2))


def test_fused_lookup_rejects_bad_input():
    w = torch.nn.Parameter(torch.zeros(4, 2))
    opt = FusedOptimizer("sgd", lr=0.1)
    with pytest.raises(ValueError, match="int32 or int64"):
        fused_lookup(w, [Lookup(torch.tensor([1.0]))], opt, opt.new_state(w))
    with pytest.raises(ValueError, match="weights of shape"):
        fused_lookup(w, [Lookup(torch.tensor([1, 2]), torch.ones(3))], opt, opt.new_state(w))
    with pytest.raises(TypeError, match="optimizer must be a FusedOptimizer"):
        fused_lookup(w, [Lookup(torch.tensor([1]))], "sgd", {})
    with pytest.raises(ValueError, match="anchor of shape"):
        EmbeddingTable(4, 2).set_l2sp(torch.zeros(3, 2), 0.1)
    for bad, pos in (([1, 4], 1), ([[0, -1]], 1)):  # named, and before any update
        with pytest.raises(IndexError, match=rf"indices\[{pos}\] = -?\d+ is out of range"):
            fused_lookup(w, [Lookup(torch.tensor(bad))], opt, opt.new_state(w))


# ----- the strategies ----------------------------------------------------------------------
PLAIN_STRATEGIES = ["finetune_all", "freeze_dnn", "l2sp", "target_only", "autoft_layer"]


@pytest.fixture(scope="module")
def fmap():
    return tiny_feature_map()


@pytest.fixture(scope="module")
def data(fmap):
    return tiny_batch(fmap)


def _pair(strategy, fmap, data, name="deepfm", **acfg):
    pre = pretrained_model(name, fmap, data)
    models = []
    for _ in range(2):
        torch.manual_seed(4)  # target_only's fresh model, the policy's initialisation
        models.append(build_transfer_model(strategy, pre, fmap, model_cfg(name),
                                           {"l2sp_alpha": 0.3, **acfg}))
    return models


def _tables(model):
    """The feature-indexed tables a fused optimizer trains, by name: (module, trained weight)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (EmbeddingTable,)) and m.weight.requires_grad:
            out[name] = m.weight
        elif hasattr(m, "tuned_weight") and m.tuned_weight.requires_grad:
            out[name] = m.tuned_weight
    return out


def _touched(model, data, name):
    net = model.net
    mh = data.multihot[data.multihot != net.multihot_pad.view(1, -1, 1)]
    ids = torch.cat([data.sparse.reshape(-1), mh.reshape(-1)])
    if name == "field_linear":  # follows its field's gate: only the tuned-gated lookups
        tuned = model.last_gates["field"][..., 1] != 0
        ns = len(net.single_fields)
        single = data.sparse[tuned[:, :ns]]
        bags = data.multihot[tuned[:, ns:]]
        bags = bags[bags != net.multihot_pad[0]]
        ids = torch.cat([single.reshape(-1), bags.reshape(-1)])
    return torch.unique(ids.long())


@pytest.mark.parametrize("kind", ["sgd", "adam"])
@pytest.mark.parametrize("strategy", PLAIN_STRATEGIES + ["autoft"])
def test_strategy_step_with_fused_tables_equals_plain_optimizer(strategy, kind, fmap, data):
    dense, fused = _pair(strategy, fmap, data)
    names = set(_tables(dense))
    if strategy != "autoft":
        tables = attach_fused_optimizers(fused, f"fused_{kind}", lr=LR)
        assert len(tables) == len(names) > 0
    else:  # the gated field table has its op's own fused tests; here: the first-order table
        fused.field_linear.use_fused_optimizer(kind, lr=LR)
        names = {"field_linear"}
    plain_state = {n: {} for n in names}
    fused.train(), dense.train()
    for step in range(2):
        seed = 10 + step
        torch.manual_seed(seed)
        loss_f = F.binary_cross_entropy_with_logits(fused(data), data.label) + fused.penalty()
        torch.manual_seed(seed)
        loss_d = F.binary_cross_entropy_with_logits(dense(data), data.label) + dense.penalty()
        loss_f.backward()
        loss_d.backward()
        d_tables, f_tables = _tables(dense), _tables(fused)
        for n in names:
            grad = d_tables[n].grad
            touched = _touched(dense, data, n)
            if strategy == "l2sp":  # lazy L2-SP: only the touched rows feel the penalty
                anchor = dense.frozen_net.get_submodule(n.split(".", 1)[1]).weight
                keep = torch.zeros(grad.shape[0], dtype=torch.bool)
                keep[touched] = True
                grad = grad - torch.where(keep[:, None], 0.0,
                                          0.3 * (d_tables[n] - anchor).detach())
            _plain_step(kind, d_tables[n], plain_state[n], grad, touched)
            assert f_tables[n].grad is None
            torch.testing.assert_close(f_tables[n].detach(), d_tables[n].detach(), rtol=1e-5,
                                       atol=1e-6, msg=f"{n} after step {step}")
        # every other parameter gets the same gradient as before (its optimizer is unchanged)
        d_params = dict(dense.named_parameters())
        for pn, p in fused.named_parameters():
            if p.grad is not None and not pn.endswith("tuned_weight"):
                torch.testing.assert_close(p.grad, d_params[pn].grad, rtol=1e-5, atol=1e-6,
                                           msg=pn)
        for m in (fused, dense):
            for p in m.parameters():
                p.grad = None


def test_freeze_embedding_and_source_only_attach_nothing(fmap, data):
    for strategy in ("freeze_embedding", "source_only"):
        model, _ = _pair(strategy, fmap, data)
        assert attach_fused_optimizers(model, "fused_adam", lr=LR) == []


def test_dense_keeps_nn_embedding_behaviour(fmap, data):
    model, _ = _pair("finetune_all", fmap, data)
    assert attach_fused_optimizers(model, "dense", lr=LR) == []
    assert isinstance(model.net.embedding, torch.nn.Embedding)
    assert sorted(model.net.embedding.state_dict()) == ["weight"]
    F.binary_cross_entropy_with_logits(model(data), data.label).backward()
    assert model.net.embedding.weight.grad is not None


# ----- the trainer -------------------------------------------------------------------------
def _fit(strategy, fmap, data, valid, tmp, *, kill=None, resume=False, optimizer="fused_adam"):
    pre = pretrained_model("deepfm", fmap, data)
    torch.manual_seed(2)
    model = build_transfer_model(strategy, pre, fmap, model_cfg("deepfm"),
                                 {"embedding_optimizer": optimizer})
    tr = Trainer(model, TrainConfig(epochs=3, batch_size=32, lr=1e-2, patience=5),
                 checkpoint_path=tmp / "last.pt", seed=3, progress=False, on_epoch_end=kill)
    return model, tr, tr.fit(data, valid, resume=resume)


def test_trainer_steps_keep_the_update_inside_the_kernel(fmap, data, tmp_path, monkeypatch):
    # One call per table per step: no step of the gated table or of the plain first-order
    # table may take the deferred path that combines several calls of one table (it leaves
    # the fused kernel for the sparse backward plus an update).
    from autoft_fast.ops import fused_optim

    def deferred(*_, **__):
        raise AssertionError("a training step deferred a fused update")

    monkeypatch.setattr(fused_optim, "defer_update", deferred)
    model, _, _ = _fit("autoft", fmap, data, tiny_batch(fmap, 64, seed=1), tmp_path)
    assert int(model.field_embedding.optimizer_step) > 0


@pytest.mark.parametrize("strategy", ["finetune_all", "l2sp"])
def test_trainer_trains_every_plain_table_fused_and_resume_is_exact(strategy, fmap, data,
                                                                    tmp_path):
    valid = tiny_batch(fmap, 64, seed=1)
    straight, _, res = _fit(strategy, fmap, data, valid, tmp_path / "a")
    tables = fused_tables(straight)
    assert {type(m).__name__ for m in tables} == {"EmbeddingTable"} and len(tables) == 2
    for m in tables:
        assert m.fused_optimizer.kind == "adam" and int(m.optimizer_step) > 0
        assert m.weight.grad is None
    assert "net.embedding.optimizer_exp_avg" in straight.state_dict()

    def kill(epoch, _):
        if epoch == 1:
            raise TrainingInterrupted("simulated kill")

    with pytest.raises(TrainingInterrupted):
        _fit(strategy, fmap, data, valid, tmp_path / "b", kill=kill)
    resumed, _, res_b = _fit(strategy, fmap, data, valid, tmp_path / "b", resume=True)
    assert res_b.best_metric == res.best_metric
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_fused_trained_weights_load_into_a_model_without_fused_optimizer(fmap, data, tmp_path):
    valid = tiny_batch(fmap, 64, seed=1)
    trained, _, _ = _fit("finetune_all", fmap, data, valid, tmp_path)
    fresh = build_transfer_model("finetune_all", pretrained_model("deepfm", fmap, data), fmap,
                                 model_cfg("deepfm"), {})
    fresh.load_state_dict(trained.state_dict())  # what `autoft-fast predict` does
    trained.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(valid), trained(valid))


def test_protocol_rule_prefers_a_fused_optimizer_within_the_margin():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "embedding_optimizer_protocol.py"
    spec = importlib.util.spec_from_file_location("embedding_optimizer_protocol", path)
    protocol = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(protocol)
    assert protocol.pick({"dense": 0.7504, "fused_adam": 0.7500}) == "fused_adam"
    assert protocol.pick({"dense": 0.7510, "fused_adam": 0.7500}) == "dense"
    assert protocol.pick({"dense": 0.7504, "fused_adam": 0.7500,
                          "fused_rowwise_adagrad": 0.7502}) == "fused_rowwise_adagrad"


needs_cpu_kernel = pytest.mark.skipif(
    not __import__("autoft_fast.ops._extension", fromlist=["x"]).has_kernel("CPU"),
    reason="the compiled CPU extension is not built")


def _rows_update_ops() -> list:
    """The rows_update kernels that run here: the C++ one, and Triton's under its interpreter."""
    from autoft_fast import kernels
    ops = [pytest.param("rows_update", marks=needs_cpu_kernel)]
    if kernels.is_available("cpu"):
        ops.append("rows_update_triton")
    return ops


ROWS_UPDATE_OPS = _rows_update_ops()


@pytest.mark.parametrize("op_name", ROWS_UPDATE_OPS)
@pytest.mark.parametrize("kind", sorted(RULES))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [1, 3, 16])
def test_rows_update_kernel_equals_combine_rows_then_apply(op_name, kind, index_dtype, table_dtype,
                                                          dim):
    # The rows_update kernels that fused_lookup's backward calls (C++ on the CPU, Triton on
    # CUDA), against the Python combine_rows + apply_now they replace, over three steps (the
    # state carries over).
    from autoft_fast.ops.fused_optim import combine_rows
    rows_update = getattr(torch.ops.autoft_fast, op_name)
    gen = torch.Generator().manual_seed(hash((kind, dim)) % 1000)
    v = 37
    opt = FusedOptimizer(kind, lr=LR)
    w_py = torch.randn(v, dim, generator=gen).to(table_dtype)
    w_k = w_py.clone()
    s_py, s_k = opt.new_state(w_py), opt.new_state(w_k)
    for step in range(3):
        # Step 1: three hot rows whose 700 lookups span several of the GPU kernels' windows of
        # 128 sorted lookups (summed there in pieces); steps 0 and 2: some rows cross one.
        n = 700 if step == 1 else 200 + step
        rows = torch.randint(0, 3 if step == 1 else v, (n,), generator=gen)
        values = torch.randn(n, dim, generator=gen)
        u_rows, sums = combine_rows(rows, values, deterministic=True)
        opt.apply_now(w_py, u_rows, sums, s_py)
        rows_update(rows.to(index_dtype), values, w_k,
                                          *opt.kernel_args(w_k, s_k))
        # A hot row's float32 sum of ~230 gradients in another order (pieces) differs by ~1e-6,
        # and the state carries that on.
        rtol = 1e-5 if step >= 1 else 1e-6
        assert torch.allclose(w_k.float(), w_py.float(), rtol=rtol, atol=1e-6), step
        for name in s_py:
            assert torch.allclose(s_k[name].float(), s_py[name].float(), rtol=rtol, atol=1e-6)
    again = w_py.clone()
    state = opt.new_state(again)
    rows = torch.zeros(50, dtype=index_dtype)  # all duplicates, twice: bit-identical runs
    values = torch.randn(50, dim, generator=gen)
    other = again.clone()
    rows_update(rows, values, again, *opt.kernel_args(again, state))
    state2 = opt.new_state(other)
    rows_update(rows, values, other, *opt.kernel_args(other, state2))
    assert torch.equal(again, other)


@pytest.mark.parametrize("op_name", ROWS_UPDATE_OPS)
def test_rows_update_kernel_refuses_bad_input_before_touching_the_table(op_name):
    rows_update = getattr(torch.ops.autoft_fast, op_name)
    w = torch.zeros(5, 4)
    opt = FusedOptimizer("adam", lr=LR)
    state = opt.new_state(w)
    with pytest.raises(IndexError, match="out of range"):
        rows_update(torch.tensor([1, 7]), torch.ones(2, 4), w,
                                          *opt.kernel_args(w, state))
    assert torch.equal(w, torch.zeros(5, 4))
    with pytest.raises(ValueError, match="values must be"):
        rows_update(torch.tensor([1, 2]), torch.ones(3, 4), w,
                                          *opt.kernel_args(w, state))
    with pytest.raises(ValueError, match="state_a"):
        rows_update(torch.tensor([1]), torch.ones(1, 4), w,
                                          torch.zeros(3), torch.zeros(5, 4), 2, 0.1, 1e-8, 0.9,
                                          0.999, 1)


def test_set_fused_lr_follows_a_schedule_and_keeps_the_state():
    # A warm-up-then-decay schedule passed on with set_fused_lr: the fused lazy Adam equals
    # nn.Embedding(sparse=True) + SparseAdam whose param group follows the same values (an lr
    # of 0 moves the moments, not the rows); use_fused_optimizer again would reset the state.
    from autoft_fast.modules import set_fused_lr
    torch.manual_seed(0)
    init = torch.randn(40, 5)
    emb = autoft_fast.GatedEmbedding.from_pretrained(init, optimizer="adam", lr=1e-2)
    model = torch.nn.ModuleDict({"emb": emb, "head": torch.nn.Linear(5, 1)})
    plain = torch.nn.Embedding.from_pretrained(init.clone(), freeze=False, sparse=True)
    opt = torch.optim.SparseAdam([plain.weight], lr=1e-2)
    tuned = torch.tensor([[-30.0, 30.0]])  # every lookup takes the tuned row
    for step, lr in enumerate([0.0, 0.0, 1e-2, 5e-3, 2.5e-3]):
        assert set_fused_lr(model, lr) == 1
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, 40, (32, 3))
        w = torch.randn(32, 3, 5)
        out, _ = emb(idx, tuned.expand(32, 3, 2), noise=False)
        (out * w).sum().backward()
        opt.zero_grad()
        (plain(idx) * w).sum().backward()
        opt.step()
        assert int(emb.optimizer_step) == step + 1
        torch.testing.assert_close(emb.tuned_weight.detach(), plain.weight.detach(),
                                   atol=1e-6, rtol=1e-5)
        if step < 2:
            assert torch.equal(emb.tuned_weight.detach(), init)
    assert emb.fused_optimizer.lr == 2.5e-3
    with pytest.raises(ValueError, match="no fused optimizer"):
        autoft_fast.GatedEmbedding(4, 2).set_lr(0.1)
    with pytest.raises(ValueError, match="finite number >= 0"):
        emb.set_lr(-1.0)


def test_calling_a_fused_table_is_its_fused_lookup():
    # table(idx) as nn.Embedding is called: with a fused optimizer the same update as
    # table.lookup([Lookup(idx)]), and no .grad; in eval / no_grad the plain forward.
    torch.manual_seed(0)
    idx = torch.randint(0, 12, (8, 3))
    w = torch.randn(8, 3, 4)
    a, b = EmbeddingTable(12, 4), EmbeddingTable(12, 4)
    b.load_state_dict(a.state_dict())
    for t in (a, b):
        t.use_fused_optimizer("adam", lr=0.1)
    (a(idx) * w).sum().backward()
    (b.lookup([Lookup(idx)])[0] * w).sum().backward()
    assert a.weight.grad is None and int(a.optimizer_step) == 1
    assert torch.equal(a.weight.detach(), b.weight.detach())
    with torch.no_grad():
        assert torch.equal(a(idx), F.embedding(idx, a.weight))
    padded = EmbeddingTable(12, 4, padding_idx=0)
    padded.use_fused_optimizer("sgd", lr=0.1)
    with pytest.raises(ValueError, match="padding_idx, max_norm and scale_grad_by_freq"):
        padded(idx)


def test_l2sp_anchor_follows_a_frozen_table_replaced_by_assign_load(fmap, data):
    # load_run builds the model from a placeholder pre-trained model, then loads the saved
    # weights; with assign=True the frozen table is a new Parameter, and the fused L2-SP
    # pull kept pointing at the placeholder's random rows.
    trained, _ = _pair("l2sp", fmap, data)
    with torch.no_grad():
        for p in trained.frozen_net.parameters():
            p.add_(1.0)  # saved weights unlike any fresh initialisation
    saved = trained.state_dict()
    models = {}
    for assign in (False, True):
        torch.manual_seed(11)
        placeholder = build_transfer_model("l2sp", pretrained_model("deepfm", fmap, data,
                                                                    steps=0),
                                           fmap, model_cfg("deepfm"), {"l2sp_alpha": 0.3})
        placeholder.load_state_dict(saved, assign=assign)
        attach_fused_optimizers(placeholder, "fused_adam", lr=0.05)
        models[assign] = placeholder
    for assign, m in models.items():
        anchor, alpha = m.net.embedding.active_l2sp()
        assert anchor is m.frozen_net.embedding.weight and alpha == 0.3, assign
        torch.testing.assert_close(anchor, saved["frozen_net.embedding.weight"])
    for m in models.values():
        m.train()
        for step in range(3):
            torch.manual_seed(step)
            loss = F.binary_cross_entropy_with_logits(m(data), data.label.float()) + m.penalty()
            loss.backward()
    assert torch.equal(models[False].net.embedding.weight, models[True].net.embedding.weight)


def test_attaching_after_a_load_that_dropped_fused_state_warns():
    # A strict load into a table without a fused optimizer drops the optimizer's state (so a
    # fused-trained model loads for prediction); attaching afterwards started Adam from step
    # 0 with nothing said, while attaching first resumes it.
    import warnings
    trained = autoft_fast.GatedEmbedding(12, 3, optimizer="adam", lr=0.1)
    idx = torch.tensor([[1, 2, 2]])
    for _ in range(3):
        trained(idx, torch.randn(1, 3, 2))[0].sum().backward()
    saved = trained.state_dict()
    assert int(saved["optimizer_step"].max()) == 3
    late = autoft_fast.GatedEmbedding(12, 3)
    late.load_state_dict(saved)  # strict, "All keys matched"
    with pytest.warns(UserWarning, match=r"\(step 3\), dropped .* before load_state_dict"):
        late.use_fused_optimizer("adam", lr=0.1)
    assert int(late.optimizer_state()["step"].max()) == 0
    first = autoft_fast.GatedEmbedding(12, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first.use_fused_optimizer("adam", lr=0.1)
        first.load_state_dict(saved)
    assert torch.equal(first.optimizer_state()["step"], saved["optimizer_step"])
