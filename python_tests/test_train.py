"""Trainer, metrics and checkpoint tests on tiny toy problems (fast, CPU only)."""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from autoft_fast.train import (TrainConfig, Trainer, TrainingInterrupted, auc, compute_metrics,
                               load_checkpoint, logloss, save_atomic)
from autoft_fast.train import checkpoint as ckpt_mod


# ----------------------------------------------------------------------------- metrics

def brute_force_auc(y, s):
    pos = [si for yi, si in zip(y, s) if yi == 1]
    neg = [si for yi, si in zip(y, s) if yi == 0]
    total = 0.0
    for p, n in itertools.product(pos, neg):
        total += 1.0 if p > n else 0.5 if p == n else 0.0
    return total / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(8))
def test_auc_matches_pairwise_definition_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1  # both classes present
    # Few distinct score values, so ties between positives and negatives are common.
    s = rng.integers(0, int(rng.integers(1, 6)), n).astype(np.float64) * 0.25
    assert auc(y, s) == pytest.approx(brute_force_auc(y, s), abs=1e-12)
    s2 = rng.normal(size=n)
    assert auc(torch.tensor(y), torch.tensor(s2)) == pytest.approx(brute_force_auc(y, s2), abs=1e-12)


def test_auc_edge_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auc([0, 1], [0.5, 0.5]) == 0.5
    assert math.isnan(auc([1, 1], [0.1, 0.2]))
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same number"):
        auc([0, 1], [0.1])


def test_logloss_matches_direct_formula_and_is_stable():
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3, size=500)
    y = rng.integers(0, 2, 500)
    p = 1 / (1 + np.exp(-x))
    direct = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    assert logloss(y, x) == pytest.approx(direct, rel=1e-12)
    # A confident wrong logit costs ~|x|, not inf.
    assert logloss([1], [-800.0]) == pytest.approx(800.0)


def test_per_domain_metrics():
    y = np.array([0, 1, 1, 0, 1, 0])
    x = np.array([-1.0, 2.0, -0.5, 0.1, 0.3, 0.2])
    d = np.array([0, 0, 0, 1, 1, 1])
    m = compute_metrics(y, x, d, ["src", "tgt"])
    assert m["per_domain"]["src"]["auc"] == pytest.approx(brute_force_auc(y[:3], x[:3]))
    assert m["per_domain"]["tgt"]["logloss"] == pytest.approx(logloss(y[3:], x[3:]))
    assert m["per_domain"]["tgt"]["n"] == 3
    assert m["auc"] == pytest.approx(brute_force_auc(y, x))


# ----------------------------------------------------------------------------- toy trainer

@dataclass
class Toy:
    x: torch.Tensor
    label: torch.Tensor
    domain: torch.Tensor

    def __len__(self):
        return self.label.shape[0]

    def index(self, idx):
        return Toy(self.x[idx], self.label[idx], self.domain[idx])


def toy_iterate(data, batch_size, shuffle, generator):
    n = len(data)
    idx = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for i in range(0, n, batch_size):
        j = idx[i:i + batch_size]
        yield Toy(data.x[j], data.label[j], data.domain[j])


class ToyModel(torch.nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        # Dropout consumes the global RNG, so resume must restore it to be exact.
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, 16), torch.nn.ReLU(),
                                       torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))

    def forward(self, b):
        return self.net(b.x).squeeze(-1)


def toy_data(n=1200, dim=8, seed=0, flip=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w = torch.linspace(-2, 2, dim)
    y = (torch.rand(n, generator=g) < torch.sigmoid(x @ w)).float()
    if flip:
        y = 1 - y
    return Toy(x, y, torch.zeros(n, dtype=torch.long))


def make_trainer(model, tmp_path=None, **kw):
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 64, "lr": 5e-3, **kw.pop("cfg", {})})
    return Trainer(model, cfg, iterate=toy_iterate, progress=False,
                   checkpoint_path=(tmp_path / "last.pt") if tmp_path else None, **kw)


def test_loss_goes_down_and_auc_beats_chance():
    torch.manual_seed(0)
    tr = make_trainer(ToyModel(), cfg={"epochs": 4, "patience": 4})
    res = tr.fit(toy_data(seed=1), toy_data(400, seed=2))
    losses = [h["train_loss"] for h in res.history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert res.best_metric > 0.8
    assert res.samples_per_s > 0 and res.train_samples == 4 * 1200


def test_early_stopping_restores_best_weights():
    # Validation labels are the opposite of training labels: validation AUC falls as the
    # model learns, so the best epoch is the first and training stops after `patience`.
    torch.manual_seed(0)
    snapshots = {}
    model = ToyModel()
    tr = make_trainer(model, cfg={"epochs": 10, "patience": 2, "patience_steps": 0},
                      on_epoch_end=lambda e, h: snapshots.__setitem__(
                          e, {k: v.clone() for k, v in model.state_dict().items()}))
    res = tr.fit(toy_data(seed=1), toy_data(400, seed=2, flip=True))
    assert res.stopped_early
    assert res.epochs_run == res.best_epoch + 2
    aucs = [h["valid_auc"] for h in res.history]
    assert res.best_metric == max(aucs)
    best = snapshots[res.best_epoch]
    last = snapshots[res.epochs_run]
    assert any(not torch.equal(best[k], last[k]) for k in best)
    for k, v in model.state_dict().items():
        assert torch.equal(v, best[k]), k


@pytest.mark.parametrize("patience_steps, extra", [(0, 2), (38, 2), (39, 3), (100, 6)])
def test_patience_steps_waits_for_that_many_steps_too(tmp_path, patience_steps, extra):
    # 1,200 rows at batch 64: 19 steps an epoch. Validation falls from the first epoch on, so
    # training stops once both 2 epochs and `patience_steps` steps have passed without a
    # better score: 2 epochs are 38 steps, 39 need a third, 100 need six.
    train, valid = toy_data(seed=1), toy_data(400, seed=2, flip=True)
    cfg = {"epochs": 20, "patience": 2, "patience_steps": patience_steps}
    torch.manual_seed(0)
    res = make_trainer(ToyModel(), cfg=cfg).fit(train, valid)
    assert res.stopped_early and res.best_epoch == 1
    assert res.epochs_run == res.best_epoch + extra

    # The count of steps without improvement survives a resume: a run killed after its
    # third epoch and resumed stops where the uncut run stopped.
    def kill(epoch, _):
        if epoch == 3:
            raise TrainingInterrupted("simulated kill")

    torch.manual_seed(0)
    with pytest.raises(TrainingInterrupted):
        make_trainer(ToyModel(), tmp_path, cfg=cfg, on_epoch_end=kill).fit(train, valid)
    again = make_trainer(ToyModel(), tmp_path, cfg=cfg).fit(train, valid, resume=True)
    assert again.epochs_run == res.epochs_run and again.best_metric == res.best_metric


def test_cap_steps_raises_the_default_epoch_cap_to_that_many_steps(tmp_path):
    # 19 steps an epoch: with epochs unset, the cap of 50 epochs raised to allow 988 steps is
    # 52 epochs; an explicit epochs is the cap as given.
    train, valid = toy_data(seed=1), toy_data(400, seed=2)
    cfg = {"epochs": None, "cap_steps": 19 * 52, "patience": 100, "batch_size": 64}
    tr = Trainer(ToyModel(), TrainConfig(**cfg), iterate=toy_iterate, progress=False,
                 checkpoint_path=tmp_path / "last.pt")
    torch.manual_seed(0)
    res = tr.fit(train, valid)
    assert res.epochs_run == 52 and res.epoch_cap == 52 and not res.stopped_early
    assert res.best_at_cap == (res.best_epoch == 52)
    # A finished run read back on resume reports the same cap.
    again = Trainer(ToyModel(), TrainConfig(**cfg), iterate=toy_iterate, progress=False,
                    checkpoint_path=tmp_path / "last.pt").fit(train, valid, resume=True)
    assert again.epoch_cap == 52 and again.epochs_run == 52
    # Below the default cap's own steps, or with epochs given, the cap stays as it is.
    assert TrainConfig(cap_steps=19 * 40).epoch_cap(19) == 50
    explicit = make_trainer(ToyModel(), cfg={"epochs": 2, "cap_steps": 10_000}).fit(train, valid)
    assert explicit.epochs_run == 2 and explicit.epoch_cap == 2
    # An exact number of epochs (TrainConfig.with_epochs) ignores cap_steps.
    assert TrainConfig(cap_steps=10_000).with_epochs(3).epoch_cap(1) == 3


def test_monitor_logloss_minimised():
    torch.manual_seed(0)
    tr = make_trainer(ToyModel(), cfg={"epochs": 3, "patience": 3, "monitor": "logloss"})
    res = tr.fit(toy_data(seed=1), toy_data(400, seed=2))
    assert res.best_metric == min(h["valid_logloss"] for h in res.history)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_after_kill_is_bit_identical(tmp_path):
    train, valid = toy_data(seed=1), toy_data(400, seed=2)
    cfg = {"epochs": 3, "patience": 5}

    torch.manual_seed(0)
    straight = ToyModel()
    r1 = make_trainer(straight, tmp_path / "a", cfg=cfg, seed=7).fit(train, valid)

    def kill(epoch, _):
        if epoch == 1:
            raise TrainingInterrupted("simulated kill")

    torch.manual_seed(0)
    killed = ToyModel()
    with pytest.raises(TrainingInterrupted):
        make_trainer(killed, tmp_path / "b", cfg=cfg, seed=7, on_epoch_end=kill).fit(train, valid)
    ck = load_checkpoint(tmp_path / "b" / "last.pt")
    assert ck["epoch"] == 1 and not ck["finished"]

    # A fresh process: different initial weights and a consumed global RNG; the checkpoint
    # must restore all of it.
    torch.manual_seed(123)
    torch.rand(10)
    resumed = ToyModel()
    r2 = make_trainer(resumed, tmp_path / "b", cfg=cfg, seed=7).fit(train, valid, resume=True)

    assert [h["train_loss"] for h in r1.history] == [h["train_loss"] for h in r2.history]
    assert r1.best_epoch == r2.best_epoch and r1.best_metric == r2.best_metric
    for k, v in straight.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # Continuing a finished run changes nothing.
    again = ToyModel()
    r3 = make_trainer(again, tmp_path / "b", cfg=cfg, seed=7).fit(train, valid, resume=True)
    assert r3.epochs_run == 3
    for k, v in straight.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def test_separate_policy_optimizer_and_lr():
    class WithPolicy(ToyModel):
        def __init__(self):
            super().__init__()
            self.policy = torch.nn.Linear(8, 2)

        def parameter_groups(self):
            return {"model": list(self.net.parameters()), "policy": list(self.policy.parameters())}

        def forward(self, b):
            return super().forward(b) + 0.0 * self.policy(b.x).sum(-1)

    tr = make_trainer(WithPolicy(), cfg={"lr": 1e-3}, policy_lr=3e-2, policy_weight_decay=0.5)
    assert set(tr.optimizers) == {"model", "policy"}
    assert tr.optimizers["policy"].param_groups[0]["lr"] == 3e-2
    assert tr.optimizers["policy"].param_groups[0]["weight_decay"] == 0.5
    assert tr.optimizers["model"].param_groups[0]["lr"] == 1e-3


def test_tau_schedule_applied_each_epoch():
    class Tau(ToyModel):
        tau = 1.0
        seen = []

        def set_tau(self, t):
            self.tau = t
            self.seen.append(t)

    m = Tau()
    res = make_trainer(m, cfg={"epochs": 3, "patience": 3},
                       tau_schedule=lambda e: 5.0 - e).fit(toy_data(200), toy_data(100, seed=3))
    assert m.seen[:3] == [5.0, 4.0, 3.0]
    # Afterwards the model keeps the temperature of the epoch whose weights were kept.
    assert m.tau == 5.0 - (res.best_epoch - 1)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="unknown key 'lrr' in finetune config; did you mean 'lr'"):
        TrainConfig.from_dict({"lrr": 1}, "finetune")
    with pytest.raises(ValueError, match="finetune.lr must be > 0"):
        TrainConfig.from_dict({"lr": 0}, "finetune")
    with pytest.raises(ValueError, match="pretrain.monitor"):
        TrainConfig.from_dict({"monitor": "acc"}, "pretrain")
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        TrainConfig.from_dict({"batch_size": 10.5})


# ----------------------------------------------------------------------------- checkpoints

def test_atomic_save_survives_a_kill_mid_write(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_atomic({"epoch": 1, "w": torch.arange(5)}, path)

    def dying_save(obj, f, *a, **k):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed while writing

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_atomic({"epoch": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    ck = load_checkpoint(path)
    assert ck["epoch"] == 1 and torch.equal(ck["w"], torch.arange(5))
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temp file left behind


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="could not be read"):
        load_checkpoint(tmp_path / "bad.pt")


def test_progress_bar_quiet_unless_terminal():
    import io

    from autoft_fast.train import ProgressBar
    pipe = io.StringIO()  # isatty() is False, as for a pipe or a log file
    bar = ProgressBar(100, "epoch 1", stream=pipe)
    bar.update(100, loss=0.5)
    bar.close()
    assert pipe.getvalue() == ""
    term = io.StringIO()
    term.isatty = lambda: True
    bar = ProgressBar(100, "epoch 1", stream=term, min_interval=0)
    bar.update(100, loss=0.5)
    bar.close()
    assert "100/100" in term.getvalue() and "samples/s" in term.getvalue()
    assert "loss 0.5000" in term.getvalue()


def test_resume_refuses_other_training_settings_and_fit_refuses_an_empty_split(tmp_path):
    train, valid = toy_data(seed=1), toy_data(400, seed=2)

    def kill(epoch, _):
        raise TrainingInterrupted("simulated kill")

    with pytest.raises(TrainingInterrupted):
        make_trainer(ToyModel(), tmp_path, cfg={"lr": 1e-3}, on_epoch_end=kill).fit(train, valid)
    with pytest.raises(ValueError, match=r"other training settings \(lr 0.001 -> 0.5\)"):
        make_trainer(ToyModel(), tmp_path, cfg={"lr": 0.5}).fit(train, valid, resume=True)
    # More epochs (or another patience) continue the same run.
    res = make_trainer(ToyModel(), tmp_path, cfg={"lr": 1e-3, "epochs": 4}).fit(
        train, valid, resume=True)
    assert res.epochs_run == 4
    with pytest.raises(ValueError, match="the training split has no rows"):
        make_trainer(ToyModel()).fit(toy_data(0), valid)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_trainer_names_a_cuda_device_that_is_not_there():
    with pytest.raises(ValueError, match="device 'cuda:1' was asked for but CUDA is not available"):
        make_trainer(ToyModel(), device="cuda:1")


def test_logloss_of_infinite_logits_and_normal_tail_p_values():
    assert logloss([1], [math.inf]) == 0.0 and logloss([0], [-math.inf]) == 0.0
    assert logloss([1], [-math.inf]) == math.inf
    from autoft_fast.train.stats import normal_two_sided_p
    for z in (1.0, 5.0, 8.5, 12.0):  # erfc keeps the tail's relative precision
        ref = math.erfc(z / math.sqrt(2.0))
        assert normal_two_sided_p(z) == pytest.approx(ref, rel=1e-12) and normal_two_sided_p(z) > 0
