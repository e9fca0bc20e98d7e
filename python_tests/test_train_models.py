"""The trainer on the real AutoFT models: resume equivalence with Gumbel noise, the tau
schedule, and one strategy run end to end, on a hand-built tiny feature map."""
from __future__ import annotations

import json

import pytest
import torch

from autoft_fast.data import DataBundle, FeatureMap, FieldInfo, TensorData
from autoft_fast.models import build_base_model, build_transfer_model
from autoft_fast.train import TrainConfig, Trainer, TrainingInterrupted, load_checkpoint

VOCAB = [7, 5, 9]


def tiny_feature_map():
    fields, off = [], 0
    for i, v in enumerate(VOCAB):
        fields.append(FieldInfo(f"f{i}", "categorical", v, off))
        off += v
    return FeatureMap(fields=fields, single_fields=[f.name for f in fields], multihot_fields=[],
                      multihot_max_len=0, dense_fields=[], domain_values=["src", "tgt"])


def tiny_data(fm, n, seed, domain):
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(1, f.vocab_size - 1, (n,), generator=g) + f.offset for f in fm.fields]
    sparse = torch.stack(cols, 1)
    score = (sparse[:, 0] % 3).float() - (sparse[:, 1] % 2).float() * (1 if domain == 0 else -1)
    label = (torch.rand(n, generator=g) < torch.sigmoid(score)).float()
    return TensorData(sparse, None, None, label, torch.full((n,), domain, dtype=torch.long))


MODEL = {"name": "dnn", "embedding_dim": 4, "hidden_units": [8]}


def pretrained(fm):
    torch.manual_seed(0)
    base = build_base_model(fm, MODEL)
    Trainer(base, TrainConfig(epochs=2, batch_size=64, lr=1e-2), progress=False).fit(
        tiny_data(fm, 600, 1, 0), tiny_data(fm, 200, 2, 0))
    return base


@pytest.fixture(scope="module")
def setup():
    fm = tiny_feature_map()
    return fm, pretrained(fm)


AUTOFT = {"backend": "reference", "tau": 4.0, "anneal": "linear", "tau_min": 1.0,
          "field_policy": "network"}


def _autoft_model(fm, base, seed):
    torch.manual_seed(seed)
    return build_transfer_model("autoft", base, fm, MODEL, AUTOFT)


def _trainer(model, path, **kw):
    from autoft_fast.models import tau_at
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2, patience=5)
    return Trainer(model, cfg, checkpoint_path=path, seed=3, progress=False,
                   tau_schedule=lambda e: tau_at(AUTOFT, e / (cfg.epochs - 1)),
                   policy_lr=5e-3, **kw)


def test_autoft_resume_after_kill_is_bit_identical(setup, tmp_path):
    fm, base = setup
    train, valid = tiny_data(fm, 300, 5, 1), tiny_data(fm, 100, 6, 1)

    straight = _autoft_model(fm, base, 0)
    r1 = _trainer(straight, tmp_path / "a.pt").fit(train, valid)

    def kill(epoch, _):
        if epoch == 1:
            raise TrainingInterrupted("kill")

    killed = _autoft_model(fm, base, 0)
    with pytest.raises(TrainingInterrupted):
        _trainer(killed, tmp_path / "b.pt", on_epoch_end=kill).fit(train, valid)
    assert load_checkpoint(tmp_path / "b.pt")["epoch"] == 1

    torch.manual_seed(99)  # a new process: other initial policy weights, other RNG position
    resumed = _autoft_model(fm, base, 99)
    r2 = _trainer(resumed, tmp_path / "b.pt").fit(train, valid, resume=True)

    assert [h["tau"] for h in r1.history] == [4.0, 1.0]
    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2.history]
    s1, s2 = straight.state_dict(), resumed.state_dict()
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    # The fine-tuned embedding moved away from the pre-trained one; the frozen one did not.
    emb = straight.field_embedding
    assert not torch.equal(emb.tuned_weight, emb.frozen_weight)
    assert torch.equal(emb.frozen_weight, base.embedding.weight)


def test_run_strategy_records_metrics_and_policy_stats(setup, tmp_path):
    from autoft_fast.config import parse_config
    from autoft_fast.train.runner import run_strategy
    fm, base = setup
    bundle = DataBundle(fm, {"target_train": tiny_data(fm, 300, 5, 1),
                             "target_valid": tiny_data(fm, 100, 6, 1),
                             "target_test": tiny_data(fm, 150, 7, 1)}, {}, {})
    cfg = parse_config({"synthetic": {}, "model": MODEL, "autoft": AUTOFT,
                        "finetune": {"epochs": 2, "batch_size": 64},
                        "strategies": ["finetune_all", "autoft"], "run_dir": str(tmp_path)})
    rec = run_strategy(cfg, bundle, base.state_dict(), "autoft", 0, tmp_path / "r",
                       progress=False)
    assert 0.0 <= rec["auc"] <= 1.0 and rec["logloss"] > 0
    assert set(rec["policy_stats"]["field"]) == {"f0", "f1", "f2"}
    assert rec["policy_stats"]["layer"]
    assert all(0.0 <= v <= 1.0 for v in rec["policy_stats"]["field"].values())
    assert rec["train_samples_per_s"] > 0 and rec["epochs_run"] >= 1
    assert json.loads((tmp_path / "r" / "result.json").read_text())["auc"] == rec["auc"]
    assert not (tmp_path / "r" / "last.pt").exists()

    src = run_strategy(cfg, bundle, base.state_dict(), "source_only", 0, tmp_path / "s",
                       progress=False)
    assert src["epochs_run"] == 0 and src["policy_stats"] == {"field": {}, "layer": {}}


def test_sparse_tuned_table_gets_sparse_adam(setup):
    fm, base = setup
    torch.manual_seed(0)
    model = build_transfer_model("autoft", base, fm, MODEL, dict(AUTOFT, sparse=True))
    tr = Trainer(model, TrainConfig(epochs=1, batch_size=64), seed=0, progress=False)
    assert isinstance(tr.optimizers["model_sparse"], torch.optim.SparseAdam)
    before = model.field_embedding.tuned_weight.detach().clone()
    res = tr.fit(tiny_data(fm, 300, 5, 1), tiny_data(fm, 100, 6, 1))
    assert res.epochs_run == 1
    assert not torch.equal(before, model.field_embedding.tuned_weight)


def test_batch_norm_models_never_train_on_a_one_row_batch():
    # 129 rows in batches of 64 leave a last batch of one row, on which BatchNorm fails in
    # training; it joins the batch before it, so every row is still trained on.
    fm = tiny_feature_map()
    torch.manual_seed(0)
    model = build_base_model(fm, {**MODEL, "batch_norm": True})
    sizes = []
    model.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])) if m.training else None)
    res = Trainer(model, TrainConfig(epochs=1, batch_size=64, lr=1e-2), progress=False).fit(
        tiny_data(fm, 129, 1, 0), tiny_data(fm, 50, 2, 0))
    assert sizes == [64, 65] and res.train_samples == 129
    # A split or a batch size that cannot give two rows is a clear error.
    with pytest.raises(ValueError, match="BatchNorm, which needs at least 2 rows .* 1 row"):
        Trainer(model, TrainConfig(epochs=1, batch_size=64), progress=False).fit(
            tiny_data(fm, 1, 1, 0), tiny_data(fm, 50, 2, 0))
    with pytest.raises(ValueError, match="batch_size = 1 gives some process fewer than 2 rows"):
        Trainer(model, TrainConfig(epochs=1, batch_size=1), progress=False).fit(
            tiny_data(fm, 10, 1, 0), tiny_data(fm, 50, 2, 0))
    # Without BatchNorm nothing changes: the last batch keeps its one row.
    plain, sizes = build_base_model(fm, MODEL), []
    plain.register_forward_pre_hook(lambda m, args: sizes.append(len(args[0])) if m.training else None)
    Trainer(plain, TrainConfig(epochs=1, batch_size=64), progress=False).fit(
        tiny_data(fm, 129, 1, 0), tiny_data(fm, 50, 2, 0))
    assert sizes == [64, 64, 1]
