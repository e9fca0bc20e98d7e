"""autoft(model): the drop-in AutoFT wrapper around a user's own pre-trained CTR model."""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import io
import threading
import types
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from autoft_fast.dropin import STRATEGIES, AutoFTModel, autoft

ROOT = Path(__file__).resolve().parents[1]
VOCAB = {"user": 40, "item": 60, "site": 7}


def _load_example():
    spec = importlib.util.spec_from_file_location("deepfm_plain", ROOT / "examples" / "deepfm_plain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


def _pretrained(seed=0):
    torch.manual_seed(seed)
    model = example.DeepFM(VOCAB)
    example.finetune_plain(model, example.synthetic_batches(VOCAB, 5, 32, 0.0, seed=seed), lr=1e-2)
    return model.eval()


def _batches(n=3, seed=5):
    return example.synthetic_batches(VOCAB, n, 32, 1.0, seed=seed)


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _train(net, batches, policy_lr=1e-2):
    groups = net.parameter_groups()
    opt = torch.optim.Adam([{"params": groups["model"]}, {"params": groups["policy"], "lr": policy_lr}], lr=1e-2)
    net.train()
    for x, y in batches:
        loss = F.binary_cross_entropy_with_logits(net(x), y) + net.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


class SharedTableModel(nn.Module):
    """One shared table for all fields, a multi-hot bag, an MLP: another common layout."""

    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(50, 4, padding_idx=0)
        self.bag = nn.EmbeddingBag(30, 4, mode="mean")
        self.mlp = nn.Sequential(nn.Linear(3 * 4 + 4, 8), nn.ReLU(), nn.Dropout(0.2), nn.Linear(8, 1))

    def forward(self, x, tags, offsets):
        e = self.table(x).flatten(1)
        return self.mlp(torch.cat([e, self.bag(tags, offsets)], dim=1)).squeeze(1)


def _shared_inputs(batch=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 50, (batch, 3), generator=g)
    lengths = torch.randint(1, 4, (batch,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
    tags = torch.randint(0, 30, (int(lengths.sum()),), generator=g)
    return x, tags, offsets


# -- exactness at the start ----------------------------------------------------------------

@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("force", ["frozen", "tuned"])
def test_forced_gates_reproduce_the_pretrained_model(strategy, force):
    base = _pretrained()
    x, _ = _batches(1)[0]
    want = base(x)
    net = autoft(base, strategy=strategy).eval()
    net.force_gates(force)
    with torch.no_grad():
        got = net(x)
    assert torch.equal(got, want.detach())
    net.train()  # Gumbel noise cannot move a forced gate; dropout-free model, so still equal
    with torch.no_grad():
        assert torch.allclose(net(x), want, atol=1e-6, rtol=0)


def test_untrained_policy_in_eval_picks_frozen_and_matches():
    base = _pretrained()
    x, _ = _batches(1)[0]
    net = autoft(base).eval()
    assert torch.equal(net(x).detach(), base(x).detach())
    assert set(net.tuned_fraction().values()) == {0.0}
    assert net.gate_names == ["embedding.user", "embedding.item", "embedding.site", "first_order.user",
                              "first_order.item", "first_order.site", "mlp.0", "mlp.2", "mlp.4"]


def test_wrapping_copies_the_model_and_leaves_it_unchanged():
    base = _pretrained()
    before = _snapshot(base)
    _train(autoft(base, strategy="finetune_all"), _batches())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


# -- what each strategy trains --------------------------------------------------------------

def _changed(before, after, keys):
    return {k: not torch.equal(before[k], after[k]) for k in keys}


@pytest.mark.parametrize("strategy", ["autoft", "autoft_field", "autoft_layer"])
def test_autoft_strategies_never_change_frozen_copies(strategy):
    net = autoft(_pretrained(), strategy=strategy)
    before = _snapshot(net)
    _train(net, _batches())
    after = net.state_dict()
    frozen = [k for k in before if "frozen" in k]
    assert frozen
    assert not any(_changed(before, after, frozen).values())
    tuned = [k for k in before if "tuned" in k and "first_order" not in k]
    assert any(_changed(before, after, tuned).values())
    assert any(_changed(before, after, [k for k in before if k.startswith("policy.")]).values())


def test_freeze_dnn_leaves_listed_layers_and_trains_embeddings():
    base = _pretrained()
    net = autoft(base, strategy="freeze_dnn", layers=["mlp.0", "mlp.2"])
    before = _snapshot(net)
    _train(net, _batches())
    after = net.state_dict()
    listed = [k for k in before if k.startswith(("model.mlp.0.", "model.mlp.2."))]
    assert listed and not any(_changed(before, after, listed).values())
    assert _changed(before, after, ["model.mlp.4.weight", "model.embedding.user.weight"]) == {
        "model.mlp.4.weight": True, "model.embedding.user.weight": True}


def test_freeze_embedding_trains_only_the_rest():
    net = autoft(_pretrained(), strategy="freeze_embedding")
    before = _snapshot(net)
    _train(net, _batches())
    after = net.state_dict()
    tables = [k for k in before if "embedding." in k or "first_order." in k]
    assert not any(_changed(before, after, tables).values())
    assert _changed(before, after, ["model.mlp.0.weight"])["model.mlp.0.weight"]


def test_finetune_all_changes_embeddings_and_layers():
    net = autoft(_pretrained(), strategy="finetune_all")
    before = _snapshot(net)
    _train(net, _batches())
    changed = _changed(before, net.state_dict(), ["model.embedding.item.weight", "model.mlp.0.weight"])
    assert all(changed.values())
    assert net.policy is None and net.parameter_groups()["policy"] == []


def test_l2sp_penalty_grows_with_distance_and_has_gradient():
    net = autoft(_pretrained(), strategy="l2sp", l2sp_weight=0.5)
    assert float(net.penalty().detach()) == 0.0
    with torch.no_grad():
        net.model.mlp[0].weight.add_(1.0)
    expected = 0.5 * net.model.mlp[0].weight.numel()
    assert float(net.penalty().detach()) == pytest.approx(expected, rel=1e-5)
    net.penalty().backward()
    assert torch.allclose(net.model.mlp[0].weight.grad, torch.full_like(net.model.mlp[0].weight, 1.0))
    assert float(autoft(_pretrained(), strategy="autoft").penalty()) == 0.0


# -- policy, eval, state -----------------------------------------------------------------------

def test_policy_gets_gradients_from_field_and_layer_gates():
    net = autoft(_pretrained(), strategy="autoft").train()
    torch.manual_seed(3)
    with torch.no_grad():  # before any step the two copies are equal, so the gates cannot matter
        for name, p in net.model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, y = _batches(1)[0]
    F.binary_cross_entropy_with_logits(net(x), y).backward()
    grad = net.policy.out.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    per_gate = grad.view(len(net.gate_names), 2, -1).abs().sum(dim=(1, 2))
    assert (per_gate[: 3] > 0).all() and (per_gate[-3:] > 0).all()  # fields and layers


def test_eval_is_deterministic_after_training():
    net = _train(autoft(_pretrained(), strategy="autoft"), _batches(4), policy_lr=0.5).eval()
    x, _ = _batches(1, seed=9)[0]
    with torch.no_grad():
        a, b = net(x), net(x)
    assert torch.equal(a, b)
    net.train()
    torch.manual_seed(0)
    fractions = [net(x) is not None and net.tuned_fraction()["embedding.user"] for _ in range(4)]
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_state_dict_round_trip_gives_identical_predictions():
    base = _pretrained()
    net = _train(autoft(base, strategy="autoft"), _batches(), policy_lr=0.5).eval()
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    fresh = autoft(base, strategy="autoft").eval()
    fresh.load_state_dict(torch.load(buffer))
    x, _ = _batches(1, seed=11)[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
        assert not torch.equal(fresh(x), base(x))


# -- other model layouts -------------------------------------------------------------------------

def test_shared_table_and_embedding_bag_model():
    base = SharedTableModel().eval()
    x, tags, offsets = _shared_inputs()
    want = base(x, tags, offsets)
    net = autoft(base, strategy="autoft", layers=["mlp"]).eval()
    assert net.gate_names == ["table", "bag", "mlp"]
    net.force_gates("frozen")
    assert torch.equal(net(x, tags, offsets).detach(), want.detach())
    net.force_gates("tuned")
    assert torch.equal(net(x, tags, offsets).detach(), want.detach())
    net.force_gates(None)
    before = _snapshot(net)
    net.train()
    opt = torch.optim.Adam(net.parameter_groups()["model"] + net.parameter_groups()["policy"], lr=1e-2)
    for seed in range(3):
        x, tags, offsets = _shared_inputs(seed=seed)
        net.force_gates("tuned" if seed < 2 else None)
        loss = net(x, tags, offsets).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = net.state_dict()
    assert torch.equal(before["model.bag.frozen_weight"], after["model.bag.frozen_weight"])
    assert not torch.equal(before["model.bag.tuned_weight"], after["model.bag.tuned_weight"])
    assert torch.equal(before["model.mlp.frozen.0.weight"], after["model.mlp.frozen.0.weight"])
    # padding row of the shared table keeps the original module's rule: never trained
    tuned = after["model.table.table.tuned_weight"]
    assert torch.equal(tuned[0], before["model.table.table.tuned_weight"][0])


def test_embedding_bag_per_sample_weights_and_mode_are_honoured():
    class BagModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.bag = nn.EmbeddingBag(20, 3, mode="sum")

        def forward(self, idx, offsets, weights):
            return self.bag(idx, offsets, per_sample_weights=weights).sum(1)

    base = BagModel()
    idx, offsets = torch.tensor([1, 2, 3, 4, 5]), torch.tensor([0, 2])
    w = torch.tensor([0.5, 2.0, 1.0, -1.0, 3.0])
    net = autoft(base, strategy="autoft_field").eval()
    assert torch.equal(net(idx, offsets, w).detach(), base(idx, offsets, w).detach())


# -- the example: at most 5 changed lines ----------------------------------------------------------

def _body(fn):
    lines = inspect.getsource(fn).splitlines()
    doc_end = [i for i, line in enumerate(lines) if line.strip() == '"""'][0]
    return lines[doc_end + 1:]


def test_example_deepfm_needs_at_most_five_changed_lines():
    plain, auto = _body(example.finetune_plain), _body(example.finetune_autoft)
    changed = [d for d in difflib.ndiff(plain, auto) if d[:1] in "+-"]
    assert 0 < len([d for d in changed if d.startswith("+")]) <= 5, changed
    model = example.finetune_autoft(_pretrained(), _batches())
    assert isinstance(model, AutoFTModel) and model.strategy == "autoft"


# -- bad input -------------------------------------------------------------------------------------

def test_model_without_embeddings_is_rejected():
    with pytest.raises(ValueError, match="model Sequential has no nn.Embedding or nn.EmbeddingBag"):
        autoft(nn.Sequential(nn.Linear(3, 1)))


def test_unknown_layer_name_is_rejected_with_the_choices():
    with pytest.raises(ValueError, match=r"layers: 'mlp\.9' is not a submodule.*'mlp\.0'"):
        autoft(_pretrained(), layers=["mlp.9"])
    with pytest.raises(ValueError, match="'embedding.user' is or holds an embedding"):
        autoft(_pretrained(), layers=["embedding.user"])
    with pytest.raises(ValueError, match=r"'mlp\.0' lies inside 'mlp'"):
        autoft(_pretrained(), layers=["mlp", "mlp.0"])
    with pytest.raises(TypeError, match="layers must be a list"):
        autoft(_pretrained(), layers="mlp")


def test_unknown_strategy_and_bad_options_are_rejected():
    with pytest.raises(ValueError, match=r"strategy = 'freeze_all' is not one of \['finetune_all'"):
        autoft(_pretrained(), strategy="freeze_all")
    with pytest.raises(ValueError, match="tau = -1"):
        autoft(_pretrained(), tau=-1)
    with pytest.raises(TypeError, match="model must be an nn.Module, got dict"):
        autoft({"a": 1})
    with pytest.raises(NotImplementedError, match="emb: Embedding max_norm = 1.0"):
        autoft(nn.ModuleDict({"emb": nn.Embedding(4, 2, max_norm=1.0)}), strategy="autoft_field")
    with pytest.raises(NotImplementedError, match="emb: EmbeddingBag max_norm = 1.0"):
        autoft(nn.ModuleDict({"emb": nn.EmbeddingBag(4, 2, max_norm=1.0)}), strategy="autoft_field")
    for hidden in [(0,), (-3,), (8.5,), 64]:
        with pytest.raises((ValueError, TypeError), match="policy_hidden"):
            autoft(_pretrained(), policy_hidden=hidden)
    with pytest.raises(ValueError, match="force_gates: choice = 'both'"):
        autoft(_pretrained()).force_gates("both")


def test_inconsistent_batch_axes_are_reported():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Embedding(5, 2), nn.Embedding(5, 2)

        def forward(self, x):
            return self.a(x).sum() + self.b(x[:1]).sum()

    with pytest.raises(ValueError, match="b sees a batch of 1 instances but a saw 3"):
        autoft(Odd(), strategy="autoft_field")(torch.tensor([1, 2, 3]))


# -- DeepCTR-Torch, when it is installed --------------------------------------------------------------

def test_deepctr_torch_deepfm_wraps_and_matches(monkeypatch, capsys):
    requests = pytest.importorskip("requests")
    # deepctr_torch's import starts a thread that asks PyPI for its latest version; a reply
    # that is not "ok" makes that check return silently without the network
    monkeypatch.setattr(requests, "get", lambda *a, **k: types.SimpleNamespace(status_code=0))
    deepctr = pytest.importorskip("deepctr_torch")
    from deepctr_torch.inputs import SparseFeat, get_feature_names
    from deepctr_torch.models import DeepFM

    feats = [SparseFeat(name, vocabulary_size=v, embedding_dim=4) for name, v in VOCAB.items()]
    base = DeepFM(feats, feats, dnn_hidden_units=(8,), device="cpu").eval()
    x = torch.stack([torch.randint(0, v, (16,)) for v in VOCAB.values()], dim=1).float()
    want = base(x)
    net = autoft(base, strategy="autoft").eval()
    assert torch.equal(net(x).detach(), want.detach())
    assert len(get_feature_names(feats)) == 3 and deepctr.__version__
    for thread in threading.enumerate():
        if thread is not threading.main_thread():
            thread.join(timeout=5)
    assert "check the latest version" not in capsys.readouterr().out


class _PaddedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.ModuleDict({"user": nn.Embedding(10, 4, padding_idx=0),
                                  "item": nn.Embedding(12, 4)})
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        e = torch.cat([self.emb["user"](x[:, 0]), self.emb["item"](x[:, 1])], dim=1)
        return self.out(e).squeeze(1)


def _padding_row_grad(net):
    net.train()
    net.zero_grad()
    net.force_gates("tuned")  # every lookup reads the tuned row, the padding row's too
    x = torch.tensor([[0, 1], [0, 2], [3, 4]])
    net(x).sum().backward()
    grad = net.model.emb["user"].table.tuned_weight.grad
    return grad.to_dense()[0].abs().max().item() if grad.is_sparse else grad[0].abs().max().item()


def _replaced_parameters(net, how):
    """The wrapper after a transform that puts new Parameter objects in it."""
    if how == "to_empty+load":
        state = net.state_dict()
        net.to("meta").to_empty(device="cpu")
        net.load_state_dict(state)
    elif how == "assign":
        net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    return net


@pytest.mark.parametrize("how", ["deepcopy", "torch.save", "to_empty+load", "assign"])
def test_the_padding_row_stays_untrained_in_a_copy_of_the_wrapper(how):
    # The rule is applied in the forward (it was a hook on the Parameter object, which
    # to_empty and load_state_dict(assign=True) replace without it).
    from op_helpers import copied
    net = autoft(_PaddedModel(), strategy="autoft_field")
    other = (copied(net, how) if how in ("deepcopy", "torch.save")
             else _replaced_parameters(autoft(_PaddedModel(), strategy="autoft_field"), how))
    assert _padding_row_grad(net) == 0.0
    assert _padding_row_grad(other) == 0.0
    # The non-padding rows do get a gradient, so the check can fail.
    grad = other.model.emb["user"].table.tuned_weight.grad
    assert grad[3].abs().max() > 0


def test_an_empty_batch_gives_an_empty_output_in_every_strategy():
    base = _PaddedModel()
    x = torch.zeros(0, 2, dtype=torch.long)
    for strategy in STRATEGIES:
        net = autoft(base, strategy=strategy).train()
        out = net(x)
        assert out.shape == (0,), strategy


def test_an_embedding_subclass_with_its_own_forward_is_refused():
    class Scaled(nn.Embedding):
        def forward(self, input):
            return super().forward(input) * 2.0

    class Plain(nn.Embedding):  # no forward of its own: gated as an nn.Embedding
        pass

    model = nn.Sequential(Scaled(10, 4))
    with pytest.raises(TypeError, match="0: Scaled is a subclass of nn.Embedding with its own forward"):
        autoft(model, strategy="autoft_field")
    net = autoft(nn.Sequential(Plain(10, 4)), strategy="autoft_field")
    assert net.gate_names == ["0"]


class _Listed(nn.Module):
    def __init__(self):
        super().__init__()
        self.user, self.item = nn.Embedding(10, 4), nn.Embedding(12, 4)
        self.fields = [self.user, self.item]  # a plain list: not replaced
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.cat([m(x[:, i]) for i, m in enumerate(self.fields)], 1))


def test_an_embedding_also_held_in_a_plain_list_is_an_error_when_called():
    import io
    net = autoft(_Listed(), strategy="autoft_field")
    with pytest.raises(RuntimeError, match="user: the model called its original Embedding.*ModuleList"):
        net(torch.tensor([[1, 2]]))
    # The list (and the hook on its modules) pickles: saving the wrapped model works, and the
    # loaded copy still names the problem (the hook was once a closure, which cannot pickle).
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    with pytest.raises(RuntimeError, match="user: the model called its original Embedding"):
        loaded(torch.tensor([[1, 2]]))


def test_a_table_the_user_froze_stays_frozen_and_ungated():
    base = _PaddedModel()
    base.emb["item"].weight.requires_grad_(False)
    for strategy in ("autoft_field", "autoft"):
        net = autoft(base, strategy=strategy)
        assert "emb.item" not in net.gate_names and "emb.user" in net.gate_names
        before = _snapshot(net)
        _train(net, [(torch.tensor([[1, 2], [3, 4], [5, 6]]), torch.tensor([1.0, 0.0, 1.0]))] * 3)
        after = net.state_dict()
        item = [k for k in before if k.startswith("model.emb.item")]
        user = [k for k in before if k.startswith("model.emb.user") and "tuned" in k]
        assert item and all(torch.equal(before[k], after[k]) for k in item)
        assert any(not torch.equal(before[k], after[k]) for k in user)


def test_tied_tables_share_their_gated_tables():
    base = _PaddedModel()
    base.emb["item"] = nn.Embedding(10, 4)
    base.emb["item"].weight = base.emb["user"].weight  # tied by one Parameter
    net = autoft(base, strategy="autoft_field")
    assert net.model.emb["user"].table is net.model.emb["item"].table
    assert net.gate_names == ["emb.user", "emb.item"]  # one gate each
    _train(net, [(torch.tensor([[1, 2], [3, 4]]), torch.tensor([1.0, 0.0]))] * 2)
    assert net.model.emb["user"].table is net.model.emb["item"].table

    class TiedOutput(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.dec = nn.Linear(4, 10, bias=False)
            self.dec.weight = self.emb.weight

        def forward(self, x):
            return self.dec(self.emb(x)).sum(1)

    with pytest.raises(ValueError, match=r"dec\.weight is the weight of embedding module emb"):
        autoft(TiedOutput(), strategy="autoft_field")
    assert autoft(TiedOutput(), strategy="finetune_all")(torch.tensor([1, 2])).shape == (2,)


class _TiedBags(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.EmbeddingBag(20, 4, mode="sum")
        self.b = nn.EmbeddingBag(20, 4, mode="sum")
        self.b.weight = self.a.weight
        self.out = nn.Linear(8, 1)

    def forward(self, x):
        return self.out(torch.cat([self.a(x[:, :2]), self.b(x[:, 2:])], 1)).squeeze(1)


def test_tied_bags_stay_tied_through_conversion_copy_and_loading():
    # Two nn.EmbeddingBag modules tied by one weight share one frozen table: after .double()
    # / .float(), a deepcopy, or a pickle round trip the second slot reads the table the first
    # holds, and a loaded state reaches both (the second slot once kept the old table).
    import copy
    import io

    torch.manual_seed(0)
    base, x = _TiedBags(), torch.randint(0, 20, (5, 4))
    state = autoft(base, strategy="autoft_field").state_dict()
    state = {k: (v + 1 if "frozen_weight" in k else v) for k, v in state.items()}
    expected = autoft(base, strategy="autoft_field")
    expected.load_state_dict(state)
    converted = autoft(base, strategy="autoft_field").double()
    assert converted.model.b.frozen_weight.dtype == torch.float64
    converted = converted.float()
    converted.load_state_dict(state)
    buf = io.BytesIO()
    torch.save(converted, buf)
    buf.seek(0)
    for net in (converted, copy.deepcopy(converted), torch.load(buf, weights_only=False)):
        assert net.model.b.frozen_weight is net.model.a.frozen_weight
        assert net.model.b.tuned_weight is net.model.a.tuned_weight
        for m in (net, expected):
            m.eval()
            m.force_gates("frozen")
        with torch.no_grad():
            torch.testing.assert_close(net(x), expected(x))


def test_a_forward_that_changes_its_inputs_is_reported():
    class Mutating(_PaddedModel):
        def forward(self, x):
            x += 1
            return super().forward(x)

    class Popping(_PaddedModel):
        def forward(self, batch):
            return super().forward(torch.stack([batch.pop("user"), batch.pop("item")], 1))

    with pytest.raises(RuntimeError, match="argument 0 was modified in place"):
        autoft(Mutating(), strategy="autoft_field")(torch.tensor([[1, 2]]))
    with pytest.raises(RuntimeError, match="argument 0 changed its keys"):
        autoft(Popping(), strategy="autoft")({"user": torch.tensor([1]), "item": torch.tensor([2])})


def test_slots_keep_the_attributes_of_the_modules_they_replace():
    base = SharedTableModel()
    net = autoft(base, strategy="autoft")
    table, bag = net.model.table, net.model.bag
    for slot, original in ((table, base.table), (bag, base.bag)):
        for attr in ("num_embeddings", "embedding_dim", "padding_idx", "sparse", "max_norm",
                     "scale_grad_by_freq"):
            assert getattr(slot, attr) == getattr(original, attr), attr
    assert bag.mode == "mean" and bag.include_last_offset is False
    for slot, original in ((table, base.table), (bag, base.bag)):  # the two tables, as documented
        assert torch.equal(slot.frozen_weight, original.weight)
        assert torch.equal(slot.tuned_weight, original.weight)
        assert slot.tuned_weight.requires_grad and not slot.frozen_weight.requires_grad


def test_a_layer_without_forward_is_refused_at_wrap_time():
    class Cross(_PaddedModel):
        def __init__(self):
            super().__init__()
            self.cross_w = nn.ParameterList([nn.Parameter(torch.randn(8, 8))])

    with pytest.raises(ValueError, match="layers: 'cross_w' is a ParameterList, which is not called"):
        autoft(Cross(), strategy="autoft", layers=["cross_w"])


def test_l2sp_keeps_a_sparse_tables_gradient_sparse():
    base = _PaddedModel()
    for name in ("user", "item"):
        old = base.emb[name]
        base.emb[name] = nn.Embedding(old.num_embeddings, 4, padding_idx=old.padding_idx, sparse=True)
    net = autoft(base, strategy="l2sp", l2sp_weight=1.0)
    table = net.model.emb["user"].weight
    with torch.no_grad():
        table.add_(1.0)  # away from the source, so the penalty has a gradient
    x = torch.tensor([[0, 1], [3, 2]])
    loss = net(x).sum() + net.penalty()
    loss.backward()
    grad = table.grad
    assert grad.is_sparse
    dense = grad.coalesce().to_dense()
    # The looked-up non-padding row 3 gets the penalty's gradient 2 * (w - w_source) = 2 on top
    # of the loss's; an unused row gets nothing, the padding row nothing.
    assert dense[5].abs().max() == 0 and dense[0].abs().max() == 0
    only_loss = torch.autograd.grad(net(x).sum(), table)[0].coalesce().to_dense()
    assert torch.allclose(dense[3] - only_loss[3], torch.full((4,), 2.0))
    opt = torch.optim.SparseAdam([table], lr=1e-2)
    opt.step()  # SparseAdam accepts it


def test_fused_optimizers_on_a_dropin_model_train_the_tuned_tables_and_refuse_padding():
    # attach_fused_optimizers on a wrapped model: a "tune" slot's rows update themselves as a
    # "gate" slot's do (no .grad for the user's optimizer to miss), and a table whose module
    # had a padding_idx is refused instead of moving its padding row.
    from autoft_fast.dropin import GatedEmbeddingSlot
    from autoft_fast.modules import attach_fused_optimizers
    x, y = next(iter(_batches()))
    for strategy, role in (("autoft_layer", "tune"), ("autoft", "gate")):
        net = autoft(_pretrained(), strategy=strategy)
        slots = [m for m in net.modules() if isinstance(m, GatedEmbeddingSlot)]
        assert slots and {m.role for m in slots} == {role}
        assert len(attach_fused_optimizers(net, "fused_sgd", lr=0.5)) == len(slots)
        before = [m.tuned_weight.detach().clone() for m in slots]
        net.train()
        F.binary_cross_entropy_with_logits(net(x), y).backward()
        for m, b in zip(slots, before):
            assert m.tuned_weight.grad is None
            assert not torch.equal(m.tuned_weight.detach(), b), (strategy, m.name)

    padded = autoft(nn.Sequential(nn.Embedding(10, 4), nn.Embedding(10, 4, padding_idx=0)),
                    strategy="autoft_field")
    # Refused when attached (it was accepted and listed as fused, refused at the next
    # forward), and before any table of the model changed.
    with pytest.raises(ValueError, match="1: padding_idx = 0 with a fused optimizer"):
        attach_fused_optimizers(padded, "fused_sgd", lr=0.5)
    assert all(m.table.fused_optimizer is None for m in padded.modules()
               if isinstance(m, GatedEmbeddingSlot))
    slot = next(m for m in padded.modules() if isinstance(m, GatedEmbeddingSlot)
                and m.padding_idx == 0)
    with pytest.raises(ValueError, match="padding_idx = 0 with a fused optimizer"):
        slot.table.use_fused_optimizer("sgd", lr=0.5)


def test_a_batch_where_a_field_has_no_lookups_leaves_the_policy_finite():
    # A multi-hot field padded to the batch's longest list is [B, 0] when every list is
    # empty: its policy input was the mean over 0 rows (NaN), and NaN policy weights after one
    # step sent every gate to the frozen row for good.
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.user, self.tags, self.out = nn.Embedding(10, 4), nn.Embedding(10, 4), nn.Linear(8, 1)

        def forward(self, user, tags):
            return self.out(torch.cat([self.user(user), self.tags(tags).sum(1)], 1)).squeeze(1)

    torch.manual_seed(0)
    net = autoft(M(), strategy="autoft")
    opt = torch.optim.Adam([p for g in net.parameter_groups().values() for p in g], lr=0.01)
    user, y = torch.tensor([1, 2, 3, 4]), torch.rand(4)
    for tags in (torch.zeros(4, 0, dtype=torch.long), torch.tensor([[1, 2]] * 4)):
        opt.zero_grad()
        torch.nn.functional.mse_loss(net(user, tags), y).backward()
        opt.step()
        assert all(torch.isfinite(p).all() for p in net.policy.parameters())
    logits = net._policy_logits((user, torch.tensor([[1, 2]] * 4)), {})
    assert torch.isfinite(logits).all()
    with torch.no_grad():  # a NaN logit is forced too (it stayed NaN, and the gate frozen)
        next(net.policy.parameters()).fill_(float("nan"))
    net.force_gates("tuned")
    net.eval()
    net(user, torch.tensor([[1, 2]] * 4))
    assert set(net.tuned_fraction().values()) == {1.0}


@pytest.mark.parametrize("strategy", ["autoft_field", "autoft"])
def test_the_padding_row_gets_no_gradient_through_torch_func(strategy):
    from torch.func import functional_call, grad
    torch.manual_seed(0)
    base = _PaddedModel()
    net = autoft(base, strategy=strategy)
    net.force_gates("tuned")
    x = torch.tensor([[0, 1], [0, 2], [3, 4]])
    params = {k: v for k, v in net.named_parameters() if v.requires_grad}
    name = next(k for k in params if k.startswith("model.emb.user") and "tuned" in k)
    grads = grad(lambda p: functional_call(net, p, (x,)).sum())(params)
    g = grads[name].to_dense() if grads[name].is_sparse else grads[name]
    assert g[0].abs().max() == 0 and g[3].abs().max() > 0


def test_inputs_made_under_inference_mode_are_accepted():
    # Inference tensors have no version counter, which the input check read (RuntimeError).
    torch.manual_seed(0)
    base = _PaddedModel()
    net = autoft(base, strategy="autoft")
    net.force_gates("tuned")
    net.eval()
    with torch.inference_mode():
        x = torch.tensor([[0, 1], [5, 2], [3, 4]]).long()
        inside = net(x)
        assert torch.allclose(inside, base(x))
    with torch.no_grad():
        assert torch.equal(net(x), inside)


def test_setting_tau_changes_the_temperature_the_gates_use():
    # `net.tau = ...` (an annealing schedule) was stored beside the copy the gates read.
    def policy_grad(net):
        torch.manual_seed(3)
        net.train()
        net.zero_grad()
        net(torch.tensor([[1, 1], [5, 2], [3, 4]])).sum().backward()
        return torch.cat([p.grad.reshape(-1) for p in net.policy.parameters()]).norm().item()

    def made(tau):
        torch.manual_seed(0)
        net = autoft(_PaddedModel(), strategy="autoft", tau=tau)
        with torch.no_grad():  # tuned != frozen, or no gate has a gradient
            for p in net.parameter_groups()["model"]:
                p.add_(torch.randn_like(p) * 0.3)
        return net

    net = made(5.0)
    at5 = policy_grad(net)
    net.tau = 0.5
    assert net.tau == 0.5 and "tau=0.5" in repr(net)
    fresh = made(0.5)
    assert policy_grad(net) == pytest.approx(policy_grad(fresh)) and policy_grad(net) != pytest.approx(at5)
    with pytest.raises(ValueError, match="tau"):
        net.tau = 0.0


@pytest.mark.parametrize("strategy", ["autoft_field", "autoft_layer", "autoft"])
def test_forced_tuned_gates_draw_no_noise_so_dropout_masks_match_the_original(strategy):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.user, self.tags = nn.Embedding(10, 4), nn.EmbeddingBag(10, 4, mode="mean")
            self.drop, self.mlp, self.out = nn.Dropout(0.5), nn.Linear(8, 8), nn.Linear(8, 1)

        def forward(self, user, tags):
            e = self.drop(torch.cat([self.user(user), self.tags(tags)], 1))
            return self.out(self.drop(torch.relu(self.mlp(e)))).squeeze(1)

    torch.manual_seed(0)
    base = M()
    net = autoft(base, strategy=strategy, layers=["mlp"] if strategy != "autoft_field" else None)
    net.force_gates("tuned")
    user, tags = torch.tensor([1, 2, 3, 4]), torch.tensor([[1, 2], [3, 3], [4, 5], [6, 7]])
    torch.manual_seed(7)
    want = base(user, tags)
    after_base = torch.rand(1)
    torch.manual_seed(7)
    got = net(user, tags)
    assert torch.equal(torch.rand(1), after_base)  # the same draws, no more
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_attaching_fused_optimizers_warns_about_the_plain_tables_it_leaves_alone():
    from autoft_fast.modules import attach_fused_optimizers
    plain = autoft(_PaddedModel(), strategy="finetune_all")  # keeps the user's modules
    with pytest.warns(UserWarning, match=r"2 nn.Embedding / nn.EmbeddingBag module\(s\) "
                                         r"\('model.emb.user', 'model.emb.item'\) get no fused"):
        assert attach_fused_optimizers(plain, "fused_adam", lr=1e-3) == []
    base = _PaddedModel()
    base.emb["user"] = nn.Embedding(10, 4)  # no padding row: both tables can be fused
    gated = autoft(base, strategy="autoft_field")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(attach_fused_optimizers(gated, "fused_sgd", lr=1e-3)) == 2


def test_user_hooks_on_replaced_modules_are_warned_about():
    base = _PaddedModel()
    seen = []
    base.emb["user"].register_forward_hook(lambda m, i, o: seen.append("emb"))
    base.out.register_forward_hook(lambda m, i, o: seen.append("out"))
    with pytest.warns(UserWarning) as caught:
        autoft(base, strategy="autoft")
    text = "\n".join(str(w.message) for w in caught)
    assert "module 'emb.user' has 1 hook(s)" in text and "its replacement runs none" in text
    assert "module 'out' has 1 hook(s)" in text and "up to three times" in text
    with warnings.catch_warnings():  # the strategies that keep the user's modules: no warning
        warnings.simplefilter("error")
        net = autoft(base, strategy="finetune_all")
    net(torch.tensor([[1, 2]]))
    assert seen == ["emb", "out"]


def test_unfreezing_everything_leaves_the_frozen_copies_frozen():
    # requires_grad_(True), or Lightning's unfreeze() loop over parameters(), made the frozen
    # layer copies trainable: an optimizer over parameters() moved them, and forcing every
    # gate frozen no longer gave the pre-trained model.
    base = SharedTableModel().eval()
    x, tags, offsets = _shared_inputs()
    want = base(x, tags, offsets).detach()
    net = autoft(base, strategy="autoft", layers=["mlp"])
    before = {n for n, _ in net.named_parameters()}
    net.requires_grad_(False)
    net.requires_grad_(True)
    for p in net.parameters():
        p.requires_grad = True
    assert not any(".frozen." in n for n, _ in net.named_parameters())
    assert {n for n, _ in net.named_parameters()} == before
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    net.train()
    for seed in range(3):
        xs, ts, os_ = _shared_inputs(seed=seed)
        loss = net(xs, ts, os_).pow(2).mean() + net.penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval().force_gates("frozen")
    with torch.no_grad():
        assert torch.equal(net(x, tags, offsets), want)
    # The frozen copies are saved under the same keys as before.
    assert any(".frozen." in k for k in net.state_dict())
