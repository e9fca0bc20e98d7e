"""autoft(model): the drop-in AutoFT wrapper around a user's own pre-trained CTR model."""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import io
import threading
import types
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
    with pytest.raises(NotImplementedError, match="emb: nn.Embedding max_norm = 1.0"):
        autoft(nn.ModuleDict({"emb": nn.Embedding(4, 2, max_norm=1.0)}), strategy="autoft_field")
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
