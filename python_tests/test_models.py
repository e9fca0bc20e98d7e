"""Base CTR models and the nine transfer strategies on a tiny hand-built feature map.

Every case trains for a few optimizer steps on one small batch: enough to see the loss move,
the tuned parameters change and the frozen ones (parameters and buffers) stay bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import autoft_fast
from autoft_fast.data import FeatureMap, FieldInfo, TensorData
from autoft_fast.models import (STRATEGIES, AutoFTConfig, ModelConfig, build_base_model,
                                build_transfer_model, tau_at)

MODELS = ("dnn", "deepfm", "dcnv2")
BACKENDS = [b for b in ("reference", "cpu") if b in autoft_fast.available_backends("cpu")]


def tiny_feature_map() -> FeatureMap:
    fields = [FieldInfo("user", "categorical", 9, 0), FieldInfo("item", "categorical", 7, 9),
              FieldInfo("hour", "numeric_bucket", 5, 16), FieldInfo("tags", "multihot", 6, 21)]
    return FeatureMap(fields=fields, single_fields=["user", "item", "hour"],
                      multihot_fields=["tags"], multihot_max_len=3, dense_fields=["price"],
                      domain_values=["src", "tgt"])


def tiny_batch(fmap: FeatureMap, n: int = 96, seed: int = 0) -> TensorData:
    g = torch.Generator().manual_seed(seed)
    cols = [fmap.field(name) for name in fmap.single_fields]
    sparse = torch.stack([f.offset + torch.randint(0, f.vocab_size, (n,), generator=g)
                          for f in cols], dim=1)
    tags = fmap.field("tags")
    multihot = tags.offset + torch.randint(0, tags.vocab_size, (n, 1, fmap.multihot_max_len),
                                           generator=g)
    multihot[:4] = tags.pad_id  # a few empty bags
    dense = torch.randn(n, 1, generator=g)
    # A learnable rule: the label depends on the user's id parity and the dense value.
    label = (((sparse[:, 0] % 2) == 0) ^ (dense[:, 0] > 0.5)).float()
    return TensorData(sparse=sparse, multihot=multihot, dense=dense, label=label,
                      domain=torch.ones(n, dtype=torch.long))


def model_cfg(name: str, **kw) -> dict:
    return {"name": name, "embedding_dim": 4, "hidden_units": [8, 6], "cross_layers": 2,
            "embedding_init_std": 0.1, **kw}


def pretrained_model(name: str, fmap, data, steps: int = 5, **kw):
    torch.manual_seed(1)
    model = build_base_model(fmap, model_cfg(name, **kw))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(data), data.label).backward()
        opt.step()
    return model.eval()


def train_steps(model, data, steps: int = 8, lr: float = 2e-2) -> list[float]:
    groups = model.parameter_groups()
    opts = [torch.optim.Adam(ps, lr=lr) for ps in groups.values() if ps]
    losses = []
    model.train()
    for _ in range(steps):
        for opt in opts:
            opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(data), data.label) + model.penalty()
        losses.append(loss.item())
        if loss.requires_grad:
            loss.backward()
        for opt in opts:
            opt.step()
    return losses


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def fmap():
    return tiny_feature_map()


@pytest.fixture(scope="module")
def data(fmap):
    return tiny_batch(fmap)


@pytest.mark.parametrize("name", MODELS)
def test_base_model_trains_alone(name, fmap, data):
    torch.manual_seed(0)
    model = build_base_model(fmap, model_cfg(name))
    assert model(data).shape == (len(data),)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(data), data.label)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.02, losses


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_trains_tuned_keeps_frozen(name, strategy, fmap, data):
    pre = pretrained_model(name, fmap, data)
    pre_state = snapshot(pre)
    torch.manual_seed(2)
    model = build_transfer_model(strategy, None if strategy == "target_only" else pre, fmap,
                                 model_cfg(name), {"tau": 1.0, "field_policy": "network"})
    before = snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    groups = model.parameter_groups()
    assert {id(p) for ps in groups.values() for p in ps} == \
        {id(p) for p in model.parameters() if p.requires_grad}
    assert bool(groups["policy"]) == strategy.startswith("autoft")
    out_before = model.eval()(data).detach()

    losses = train_steps(model, data)
    after = snapshot(model)
    for key, value in before.items():
        if key in trainable:
            assert not torch.equal(value, after[key]), f"{strategy}: tuned {key} did not change"
        else:
            assert torch.equal(value, after[key]), f"{strategy}: frozen {key} changed"
    for key, value in pre_state.items():  # the pre-trained model is copied, never trained
        assert torch.equal(value, pre.state_dict()[key])

    if strategy == "source_only":
        assert not trainable
        assert torch.equal(model.eval()(data), out_before)
        assert torch.equal(out_before, pre(data))
    else:
        assert losses[-1] < losses[0], losses


def test_strategies_freeze_the_documented_parts(fmap, data):
    pre = pretrained_model("deepfm", fmap, data)
    def trainable(strategy, **acfg):
        m = build_transfer_model(strategy, pre, fmap, model_cfg("deepfm"), acfg)
        return {n for n, p in m.named_parameters() if p.requires_grad}
    emb = {"net.embedding.weight", "net.linear.weight"}
    assert trainable("freeze_dnn") == emb
    stack = trainable("freeze_embedding")
    assert stack and not stack & emb and all(n.startswith("net.layers.") for n in stack)
    assert "net.layers.output.linear.bias" in stack  # the output layer counts as the stack
    assert trainable("finetune_all") == emb | stack
    assert trainable("autoft_field") == {"field_embedding.tuned_weight",
                                        "field_linear.tuned_weight"} | stack | \
        {n for n in trainable("autoft") if n.startswith("policy.")}
    assert trainable("autoft_field", ungated="freeze") == \
        {"field_embedding.tuned_weight", "field_linear.tuned_weight"} | \
        {n for n in trainable("autoft") if n.startswith("policy.")}
    layer = trainable("autoft_layer")
    assert "net.embedding.weight" in layer
    assert "net.embedding.weight" not in trainable("autoft_layer", ungated="freeze")
    assert not any(n.startswith("frozen_net.") for n in layer)


@pytest.mark.parametrize("name", MODELS)
def test_frozen_parts_keep_batchnorm_stats_and_skip_dropout(name, fmap, data):
    pre = pretrained_model(name, fmap, data, batch_norm=True, dropout=0.3)
    cfg = model_cfg(name, batch_norm=True, dropout=0.3)
    for strategy in ("freeze_dnn", "autoft"):
        torch.manual_seed(3)
        model = build_transfer_model(strategy, pre, fmap, cfg, {})
        fixed = model.net.layers if strategy == "freeze_dnn" else model.frozen_net
        assert not fixed.training and model.training
        stats = snapshot(fixed)
        train_steps(model, data, steps=3)
        for key, value in fixed.state_dict().items():
            assert torch.equal(stats[key], value), f"{strategy}: {key} changed"
        if strategy == "autoft":  # the tuned copy's statistics do move
            assert not torch.equal(pre.layers["mlp_0"].block[1].running_mean,
                                   model.net.layers["mlp_0"].block[1].running_mean)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_policy_forced_to_frozen_is_the_pretrained_model(name, backend, fmap, data):
    pre = pretrained_model(name, fmap, data, batch_norm=True, dropout=0.2)
    expected = pre(data)
    torch.manual_seed(4)
    model = build_transfer_model("autoft", pre, fmap, model_cfg(name, batch_norm=True, dropout=0.2),
                                 {"backend": backend, "tau": 1.0, "field_policy": "network"})
    # An untrained policy outputs zero logits: the argmax tie goes to the frozen path.
    assert torch.equal(model.eval()(data), expected)
    train_steps(model, data, steps=5)
    model.eval()
    assert not torch.equal(model(data), expected)  # the tuned copies have moved
    # The policy itself, pushed to channel 0 with a margin no noise can overturn ...
    with torch.no_grad():
        model.policy.out.weight.zero_()
        model.policy.out.bias.copy_(torch.tensor([1e4, -1e4]).repeat(model.policy.num_gates))
    assert torch.equal(model(data), expected)
    model.train()  # ... also in train mode, with Gumbel noise on and dropout in the tuned copy
    assert torch.equal(model(data), expected)
    assert torch.equal(model.last_gates["field"][..., 0], torch.ones(len(data), 4))
    # ... and the test hook that overrides the policy.
    torch.manual_seed(5)
    model2 = build_transfer_model("autoft", pre, fmap, model_cfg(name, batch_norm=True, dropout=0.2),
                                  {"backend": backend, "field_policy": "network"})
    train_steps(model2, data, steps=3)
    model2.force_gates("frozen")
    assert torch.equal(model2.eval()(data), expected)
    model2.force_gates(None)


def test_l2sp_penalty_zero_at_init_then_grows(fmap, data):
    pre = pretrained_model("dcnv2", fmap, data)
    alpha = 0.05
    model = build_transfer_model("l2sp", pre, fmap, model_cfg("dcnv2"), {"l2sp_alpha": alpha})
    assert model.penalty().item() == 0.0
    opt = torch.optim.Adam(model.parameter_groups()["model"], lr=1e-2)
    values = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(model(data), data.label) + model.penalty()
        loss.backward()
        opt.step()
        values.append(model.penalty().item())
    assert all(b > a for a, b in zip(values, values[1:])) and values[0] > 0, values
    expected = sum(((p - pre.get_parameter(n)) ** 2).sum()
                   for n, p in model.net.named_parameters()) * alpha / 2
    assert torch.allclose(model.penalty(), expected)
    assert build_transfer_model("finetune_all", pre, fmap, model_cfg("dcnv2"), {}).penalty().item() == 0.0


def test_layer_gates_hard_one_hot_with_gradient_to_policy(fmap, data):
    pre = pretrained_model("dcnv2", fmap, data)
    torch.manual_seed(6)
    model = build_transfer_model("autoft_layer", pre, fmap, model_cfg("dcnv2"), {"tau": 2.0})
    # While both copies are equal the two paths give the same output and the policy gets no
    # gradient (a1 - a0 = 0); a few steps make the tuned copy differ.
    train_steps(model, data, steps=3)
    model.zero_grad()
    out = model.train()(data)
    gates = model.last_gates["layer"]
    assert gates.shape == (len(data), len(pre.layer_names), 2)
    assert model.last_gates["field"] is None
    assert bool(((gates == 0) | (gates == 1)).all()) and torch.equal(gates.sum(-1), torch.ones(gates.shape[:2]))
    assert 0 < gates[..., 1].mean().item() < 1  # zero logits + noise: both paths in use
    F.binary_cross_entropy_with_logits(out, data.label).backward()
    grad = model.policy.out.bias.grad.view(-1, 2)
    assert bool((grad.abs().sum(-1) > 0).all()), grad  # every layer's two logits
    assert torch.allclose(grad[:, 0], -grad[:, 1])
    # Both copies of a gated layer get gradients only through the instances routed to them.
    assert model.net.layers["cross_0"].linear.weight.grad.abs().sum() > 0
    assert model.frozen_net.layers["cross_0"].linear.weight.grad is None


def test_soft_gates_mix_both_paths(fmap, data):
    pre = pretrained_model("dnn", fmap, data)
    model = build_transfer_model("autoft", pre, fmap, model_cfg("dnn"), {"hard": False, "tau": 1.0,
                                                                  "field_policy": "network"})
    model.train()(data)
    for gates in model.last_gates.values():
        assert bool(((gates > 0) & (gates < 1)).all())
        assert torch.allclose(gates.sum(-1), torch.ones(gates.shape[:2]))


def test_eval_gates_argmax_is_deterministic_sample_is_not(fmap, data):
    pre = pretrained_model("dnn", fmap, data)
    argmax = build_transfer_model("autoft_field", pre, fmap, model_cfg("dnn"),
                                  {"field_policy": "network"}).eval()
    a = argmax(data)
    torch.manual_seed(123)
    assert torch.equal(argmax(data), a)
    sample = build_transfer_model("autoft_field", pre, fmap, model_cfg("dnn"),
                                  {"eval_gates": "sample", "field_policy": "network"}).eval()
    sample(data)
    g1 = sample.last_gates["field"].clone()
    sample(data)
    assert not torch.equal(g1, sample.last_gates["field"])


def test_policy_stats_count_eval_forwards_since_reset(fmap, data):
    pre = pretrained_model("deepfm", fmap, data)
    model = build_transfer_model("autoft", pre, fmap, model_cfg("deepfm"), {})
    assert model.policy_stats() == {"field": {}, "layer": {}}
    model.train()(data)  # training forwards are not counted
    assert model.policy_stats() == {"field": {}, "layer": {}}
    model.eval()
    model.force_gates("tuned")
    model(data)
    model.force_gates("frozen")
    model(data.index(torch.arange(32)))  # 96 tuned + 32 frozen choices per gate
    stats = model.policy_stats()
    assert list(stats["field"]) == ["user", "item", "hour", "tags"]
    assert list(stats["layer"]) == ["mlp_0", "mlp_1", "output"]
    tags = stats["field"].pop("tags")
    assert all(v == pytest.approx(96 / 128) for d in stats.values() for v in d.values())
    # An empty bag has no row to choose: not counted for its field.
    pad = model.net.multihot_pad.view(1, -1, 1)
    full = (data.multihot != pad).any(dim=2)[:, 0]
    assert not bool(full.all()), "the fixture should hold empty bags"
    assert tags == pytest.approx(full.sum().item() / (full.sum().item() + full[:32].sum().item()))
    model.reset_policy_stats()
    assert model.policy_stats() == {"field": {}, "layer": {}}
    model.force_gates(None)
    with torch.no_grad():
        model.policy.out.bias.normal_(0, 1)
        model.policy.out.weight.normal_(0, 1)
    model(data)
    gates = model.last_gates
    stats = model.policy_stats()
    picked = (gates["field"][..., 1] > 0.5).float()
    want = picked.mean(0)
    want[-1] = picked[full, -1].mean()
    assert list(stats["field"].values()) == pytest.approx(want.tolist())
    assert list(stats["layer"].values()) == pytest.approx((gates["layer"][..., 1] > 0.5).float().mean(0).tolist())
    plain = build_transfer_model("finetune_all", pre, fmap, model_cfg("deepfm"), {}).eval()
    plain(data)
    assert plain.policy_stats() == {"field": {}, "layer": {}}


def test_tuned_fraction_penalty_reaches_the_policy(fmap, data):
    pre = pretrained_model("dnn", fmap, data)
    model = build_transfer_model("autoft", pre, fmap, model_cfg("dnn"), {"tuned_penalty": 0.3})
    model.train()(data)
    g = model.last_gates
    tuned = torch.cat([g["field"][..., 1], g["layer"][..., 1]], dim=1)
    # The fraction of real choices: an empty multi-hot bag's gate chooses nothing.
    net = model.net
    ns, nm = len(net.single_fields), len(net.multihot_fields)
    real = torch.ones_like(tuned, dtype=torch.bool)
    real[:, ns:ns + nm] = (data.multihot != net.multihot_pad.view(1, -1, 1)).any(dim=2)
    assert not real.all()  # the case this checks: some bags are empty
    frac = tuned[real].mean()
    assert model.penalty().item() == pytest.approx(0.3 * frac.item())
    model.penalty().backward()
    assert model.policy.out.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_state_dict_round_trip(strategy, fmap, data):
    pre = pretrained_model("deepfm", fmap, data)
    torch.manual_seed(7)
    model = build_transfer_model(strategy, pre, fmap, model_cfg("deepfm"), {})
    train_steps(model, data, steps=3)
    state = model.state_dict()
    torch.manual_seed(8)
    fresh = build_transfer_model(strategy, pre, fmap, model_cfg("deepfm"), {})
    fresh.load_state_dict(state)
    assert torch.equal(fresh.eval()(data), model.eval()(data))


@pytest.mark.parametrize("strategy", ["autoft", "autoft_field", "autoft_layer"])
def test_a_gated_model_deep_copies_after_training_and_runs_under_autocast(strategy, fmap, data):
    pre = pretrained_model("deepfm", fmap, data)
    torch.manual_seed(7)
    model = build_transfer_model(strategy, pre, fmap, model_cfg("deepfm"), {})
    train_steps(model, data, steps=2)  # the tuned copy moves away from the frozen one
    F.binary_cross_entropy_with_logits(model(data), data.label).backward()
    # After a training forward (the usual `best = copy.deepcopy(model)` of early stopping):
    # the gates kept for inspection hold no autograd graph.
    twin = copy.deepcopy(model)
    assert torch.equal(twin.eval()(data), model.eval()(data))
    # Under bfloat16 autocast the policy's logits reach the gated ops as float32.
    model.train()
    model.policy.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(data)
    assert out.shape == (len(data),) and bool(torch.isfinite(out).all())
    F.binary_cross_entropy_with_logits(out.float(), data.label).backward()
    assert model.policy.out.bias.grad is not None and model.policy.out.bias.grad.abs().sum() > 0


def test_multihot_mean_pooling_skips_padding(fmap):
    model = build_base_model(fmap, model_cfg("dnn"))
    tags = fmap.field("tags")
    ids = torch.tensor([[[tags.pad_id, tags.offset + 2, tags.offset + 3]],
                        [[tags.pad_id] * 3],
                        [[tags.offset + 1, tags.offset + 1, tags.pad_id]]])
    w = model.embedding.weight
    pooled = model.pool_multihot(ids, w)
    assert torch.allclose(pooled[0, 0], (w[tags.offset + 2] + w[tags.offset + 3]) / 2)
    assert torch.equal(pooled[1, 0], torch.zeros(4))
    assert torch.allclose(pooled[2, 0], w[tags.offset + 1])


def test_deepfm_second_order_is_the_pairwise_sum(fmap, data):
    torch.manual_seed(0)
    model = build_base_model(fmap, model_cfg("deepfm"))
    fields = model.field_vectors(data, model.embedding.weight)
    zero = lambda name, x: torch.zeros(x.shape[0]) if name == "output" else x
    got = model.interact(fields, torch.zeros(len(data), 4, 1), data.dense, zero)
    pairs = sum((fields[:, i] * fields[:, j]).sum(-1) for i in range(4) for j in range(i + 1, 4))
    assert torch.allclose(got, pairs, atol=1e-6)


def test_dcnv2_structures(fmap, data):
    for structure in ("parallel", "stacked"):
        model = build_base_model(fmap, model_cfg("dcnv2", structure=structure))
        assert model.layer_names == ["cross_0", "cross_1", "mlp_0", "mlp_1", "output"]
        assert model(data).shape == (len(data),)
    cross_only = build_base_model(fmap, model_cfg("dcnv2", hidden_units=[]))
    assert cross_only.layer_names == ["cross_0", "cross_1", "output"]
    assert cross_only(data).shape == (len(data),)


def test_tau_schedule_and_set_tau(fmap, data):
    assert tau_at({}, 0.3) == 5.0  # SpotTune's fixed temperature is the default
    assert tau_at({"tau": 4.0, "tau_min": 1.0, "anneal": "linear"}, 0.5) == pytest.approx(2.5)
    assert tau_at({"tau": 4.0, "tau_min": 1.0, "anneal": "exp"}, 0.5) == pytest.approx(2.0)
    assert tau_at({"tau": 4.0, "tau_min": 1.0, "anneal": "exp"}, 7.0) == pytest.approx(1.0)
    pre = pretrained_model("dnn", fmap, data)
    model = build_transfer_model("autoft", pre, fmap, model_cfg("dnn"), {"tau": 3.0})
    assert model.tau == 3.0
    model.set_tau(0.7)
    assert model.tau == 0.7
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="tau"):
            model.set_tau(bad)


@pytest.mark.parametrize("section,bad,match", [
    ("model", {"name": "xgboost"}, "model.name"),
    ("model", {"embedding_dim": 0}, "model.embedding_dim"),
    ("model", {"hidden_units": [8, -1]}, "model.hidden_units"),
    ("model", {"dropout": 1.0}, "model.dropout"),
    ("model", {"embeding_dim": 8}, "unknown key"),
    ("autoft", {"tau": 0}, "autoft.tau"),
    ("autoft", {"anneal": "cosine"}, "autoft.anneal"),
    ("autoft", {"eval_gates": "mean"}, "autoft.eval_gates"),
    ("autoft", {"tuned_penalty": -0.1}, "autoft.tuned_penalty"),
    ("autoft", {"l2sp_alpha": "big"}, "autoft.l2sp_alpha"),
    ("autoft", {"backend": "tpu"}, "autoft.backend"),
    ("autoft", {"temperature": 1}, "unknown key"),
])
def test_bad_config_values_raise_naming_the_key(section, bad, match):
    cls = ModelConfig if section == "model" else AutoFTConfig
    with pytest.raises(ValueError, match=match):
        cls.from_dict(bad)


def test_bad_transfer_arguments(fmap, data):
    pre = pretrained_model("dnn", fmap, data)
    with pytest.raises(ValueError, match="strategy = 'spottune'"):
        build_transfer_model("spottune", pre, fmap, model_cfg("dnn"), {})
    with pytest.raises(ValueError, match="pretrained = None"):
        build_transfer_model("finetune_all", None, fmap, model_cfg("dnn"), {})
    with pytest.raises(ValueError, match="hidden_units"):
        build_transfer_model("finetune_all", pre, fmap, model_cfg("dnn", hidden_units=[4]), {})
    other = copy.deepcopy(fmap)
    other.fields[-1] = FieldInfo("tags", "multihot", 8, 21)
    with pytest.raises(ValueError, match="num_rows"):
        build_transfer_model("autoft", pre, other, model_cfg("dnn"), {})
    with pytest.raises(TypeError, match="BaseCTRModel"):
        build_transfer_model("autoft", torch.nn.Linear(2, 2), fmap, model_cfg("dnn"), {})
    model = build_transfer_model("autoft", pre, fmap, model_cfg("dnn"), {})
    with pytest.raises(ValueError, match="path = 'both'"):
        model.force_gates("both")


def test_config_round_trip():
    m = ModelConfig.from_dict({"name": "DCNv2", "hidden_units": 32})
    assert m.name == "dcnv2" and m.hidden_units == [32]
    assert ModelConfig.from_dict(m.to_dict()) == m
    a = AutoFTConfig.from_dict({"anneal": "exp", "policy_lr": 1e-3})
    assert AutoFTConfig.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_gradients_match_dense(backend, fmap, data):
    pre = pretrained_model("deepfm", fmap, data)
    grads = {}
    for sparse in (False, True):
        torch.manual_seed(9)
        model = build_transfer_model("autoft", pre, fmap, model_cfg("deepfm"),
                                     {"sparse": sparse, "backend": backend})
        with torch.no_grad():  # some gates tuned, some frozen, deterministic (eval mode)
            model.policy.out.bias.normal_(0, 1)
            model.field_embedding.tuned_weight.add_(0.1)
        F.binary_cross_entropy_with_logits(model.eval()(data), data.label).backward()
        grads[sparse] = [model.field_embedding.tuned_weight.grad, model.field_linear.tuned_weight.grad]
    for dense, coo in zip(grads[False], grads[True]):
        assert coo.is_sparse and not dense.is_sparse
        assert torch.allclose(coo.to_dense(), dense, atol=1e-6)


@pytest.mark.parametrize("strategy", ["finetune_all", "autoft"])
def test_empty_batch(strategy, fmap, data):
    pre = pretrained_model("dcnv2", fmap, data)
    model = build_transfer_model(strategy, pre, fmap, model_cfg("dcnv2"), {})
    out = model.eval()(data.index(torch.arange(0)))
    assert out.shape == (0,)


@pytest.mark.parametrize("strategy", ["autoft_layer", "autoft_field"])
def test_single_policy_with_frozen_ungated_part_forced_frozen_is_pretrained(strategy, fmap, data):
    pre = pretrained_model("deepfm", fmap, data)
    torch.manual_seed(10)
    model = build_transfer_model(strategy, pre, fmap, model_cfg("deepfm"), {"ungated": "freeze"})
    train_steps(model, data, steps=3)
    model.eval()
    model.force_gates("tuned")
    assert not torch.equal(model(data), pre(data))
    model.force_gates("frozen")
    assert torch.equal(model(data), pre(data))


@pytest.mark.parametrize("strategy", ["autoft_layer", "autoft_field"])
def test_policy_learns_to_route_each_instance_to_the_better_path(strategy, fmap, data):
    # Frozen path predicts 0, tuned path predicts 1; labels are 1 for even users only. The
    # only good policy sends even users to the tuned path and odd users to the frozen one,
    # which it can tell apart from the user's frozen embedding.
    torch.manual_seed(11)
    pre = build_base_model(fmap, model_cfg("dnn", hidden_units=[], embedding_init_std=1.0))
    with torch.no_grad():
        pre.layers["output"].linear.weight.zero_()
        pre.layers["output"].linear.bias.fill_(-3.0)
    model = build_transfer_model(strategy, pre, fmap, model_cfg("dnn", hidden_units=[]),
                                 {"tau": 1.0, "policy_hidden_units": [16],
                                  "field_policy": "network"})
    with torch.no_grad():
        if strategy == "autoft_layer":
            model.net.layers["output"].linear.bias.fill_(3.0)
        else:  # only the user field is gated towards +3 through the output weights
            w = model.net.layers["output"].linear.weight
            w[0, :4] = 1.0
            model.field_embedding.frozen_weight[:9] = -0.75  # frozen user rows: logit -3 - 3
            model.field_embedding.tuned_weight[:9] = 1.5      # tuned user rows:  logit -3 + 6
            # The policy must still tell the users apart: it reads the frozen rows, so keep
            # them distinct per user while their dot product with w stays -3.
            model.field_embedding.frozen_weight[:9, 0] += torch.linspace(-1, 1, 9)
            model.field_embedding.frozen_weight[:9, 1] -= torch.linspace(-1, 1, 9)
    even = (data.sparse[:, 0] % 2 == 0)
    labelled = TensorData(data.sparse, data.multihot, data.dense, even.float(), data.domain)
    opt = torch.optim.Adam(model.parameter_groups()["policy"], lr=0.05)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(labelled), labelled.label).backward()
        opt.step()
    model.eval()
    model(labelled)
    gates = model.last_gates["layer" if strategy == "autoft_layer" else "field"][:, 0, 1]
    assert gates[even].mean() > 0.9 and gates[~even].mean() < 0.1, (gates[even].mean(), gates[~even].mean())


def test_dense_only_feature_map(data):
    fmap = FeatureMap(fields=[], single_fields=[], multihot_fields=[], multihot_max_len=0,
                      dense_fields=["price"], domain_values=["src", "tgt"])
    batch = TensorData(sparse=torch.zeros(len(data), 0, dtype=torch.long), multihot=None,
                       dense=data.dense, label=data.label, domain=data.domain)
    pre = build_base_model(fmap, model_cfg("dcnv2"))
    assert pre(batch).shape == (len(data),)
    model = build_transfer_model("autoft_layer", pre, fmap, model_cfg("dcnv2"), {})
    assert model(batch).shape == (len(data),)
    with pytest.raises(ValueError, match="no.*fields|has none"):
        build_transfer_model("autoft_field", pre, fmap, model_cfg("dcnv2"), {})


@pytest.mark.parametrize("name", MODELS)
def test_skipping_the_unused_frozen_layers_backward_changes_no_gradient(name, fmap, data):
    pre = pretrained_model(name, fmap, data)
    torch.manual_seed(9)
    model = build_transfer_model("autoft_layer", pre, fmap, model_cfg(name),
                                 {"tau": 1.0, "field_policy": "network"})
    train_steps(model, data, steps=2)  # the two copies differ
    with torch.no_grad():  # every layer gate tuned for every instance, noise or not
        model.policy.out.weight.zero_()
        model.policy.out.bias.copy_(torch.tensor([-1e4, 1e4]).repeat(model.policy.num_gates))
    grads, backwards = [], []
    calls = []
    for layer in model.frozen_net.layers.values():
        layer.register_full_backward_hook(lambda *a: calls.append(1))
    model.train()
    for skip in (True, False):
        model.skip_unused_frozen_backward = skip
        model.zero_grad(set_to_none=True)
        calls.clear()
        torch.manual_seed(3)  # the same noise and dropout draws both times
        model(data).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
        backwards.append(len(calls))
    assert backwards[0] == 0 < backwards[1]  # the frozen layers' backward ran only without it
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n


def test_policy_stats_of_soft_gates_are_the_tuned_paths_mean_weight(fmap, data):
    # With hard: false a gate of 0.503 mixes the paths 50/50; it was counted as "tuned".
    pre = pretrained_model("dnn", fmap, data)
    model = build_transfer_model("autoft", pre, fmap, model_cfg("dnn"),
                                 {"hard": False, "field_policy": "network"}).eval()
    with torch.no_grad():
        model.policy.out.bias.normal_(0, 0.5)
        model.policy.out.weight.normal_(0, 0.5)
    model(data)
    gates = model.last_gates
    assert not torch.equal(gates["layer"][..., 1], gates["layer"][..., 1].round())  # soft
    stats = model.policy_stats()
    want = gates["layer"][..., 1].double().mean(dim=0)
    assert list(stats["layer"].values()) == pytest.approx(want.tolist(), rel=1e-9)
    single = len(model.net.single_fields)
    want_f = gates["field"][:, :single, 1].double().mean(dim=0)
    assert list(stats["field"].values())[:single] == pytest.approx(want_f.tolist(), rel=1e-9)


@pytest.mark.parametrize("strategy", ["freeze_dnn", "autoft_field"])
def test_a_strategy_with_nothing_to_train_on_dense_only_data_is_named(strategy):
    from autoft_fast.data.feature_map import FeatureMap
    fm = FeatureMap([], [], [], 0, ["d0", "d1"], ["a", "b"])
    mc = {"name": "dnn", "embedding_dim": 4, "hidden_units": [8]}
    pre = build_base_model(fm, mc)
    with pytest.raises(ValueError, match=f"strategy = '{strategy}' .*only dense fields"):
        build_transfer_model(strategy, pre, fm, mc, {})
    build_transfer_model("finetune_all", pre, fm, mc, {})  # its stack trains


@pytest.mark.parametrize("name", ["dnn", "deepfm"])
def test_dcn_only_keys_do_not_count_for_other_models(fmap, data, name):
    pre = pretrained_model(name, fmap, data)
    other = {**model_cfg(name), "cross_layers": 5, "structure": "stacked"}
    build_transfer_model("finetune_all", pre, fmap, other, {})  # was: "disagree on cross_layers"
    from autoft_fast.config import ModelConfig
    a, b = ModelConfig.from_dict(model_cfg(name)), ModelConfig.from_dict(other)
    assert a.used_dict() == b.used_dict() and a.to_dict() != b.to_dict()
    dcn = ModelConfig.from_dict({"name": "dcnv2", "cross_layers": 3})
    assert "cross_layers" in dcn.arch_keys() and dcn.used_dict()["cross_layers"] == 3
    with pytest.raises(ValueError, match="disagree on hidden_units"):
        build_transfer_model("finetune_all", pre, fmap, {**model_cfg(name), "hidden_units": [3]}, {})


@pytest.mark.parametrize("strategy", ["autoft", "l2sp", "autoft_layer"])
def test_unfreezing_a_transfer_model_leaves_its_frozen_copy_out(strategy):
    fmap = tiny_feature_map()
    data = tiny_batch(fmap)
    pre = pretrained_model("deepfm", fmap, data)
    model = build_transfer_model(strategy, pre, fmap, model_cfg("deepfm"), {"l2sp_alpha": 0.1})
    groups = {k: [id(p) for p in v] for k, v in model.parameter_groups().items()}
    model.requires_grad_(True)
    assert not any(n.startswith("frozen_net.") for n, _ in model.named_parameters())
    if model.frozen_net is not None:
        assert any(n.startswith("frozen_net.") for n in model.state_dict())
    model.requires_grad_(False)
    model.requires_grad_(True)
    after = {k: [id(p) for p in v] for k, v in model.parameter_groups().items()}
    assert set(after["model"]) >= set(groups["model"])
    frozen_ids = {id(b) for b in model.frozen_net.buffers()} if model.frozen_net else set()
    assert not frozen_ids & set(after["model"])
    # The dense L2-SP penalty reads the frozen copy: zero at the start.
    if strategy == "l2sp":
        model(data)
        assert float(model.penalty()) == 0.0
