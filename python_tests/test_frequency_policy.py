"""autoft.field_policy: frequency: field gates from the value's target frequency."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from autoft_fast.config import AutoFTConfig, ConfigError
from autoft_fast.models import build_transfer_model
from autoft_fast.models.frequency import FrequencyRule, count_rows
from autoft_fast.train.trainer import evaluate, predict

from test_policy_learning import _pretrained


class _Net:  # what FrequencyRule.tuned reads of a base model
    def __init__(self, singles, multihots, pad):
        self.single_fields, self.multihot_fields = singles, multihots
        self.multihot_pad = torch.tensor(pad)


class _Batch:
    def __init__(self, sparse, multihot):
        self.sparse, self.multihot = sparse, multihot
        self.label = torch.zeros(sparse.shape[0])


def test_rule_compares_counts_and_bags_by_their_mean_log_count():
    counts = torch.tensor([0.0, 5.0, 30.0, 31.0, 100.0, 0.0, 2.0, 200.0])  # row 5: the bag's pad
    rule = FrequencyRule(counts)
    net = _Net(["a", "b"], ["tags"], [5])
    batch = _Batch(torch.tensor([[1, 2], [3, 4], [0, 1]]),
                   torch.tensor([[[6, 7, 5]], [[6, 6, 5]], [[5, 5, 5]]]))
    # Row 2's bag is empty: no value to judge, left to the network (True) at every k.
    assert rule.tuned(batch, net).tolist() == [[True, True, True], [True, True, True],
                                               [False, True, True]]
    rule.set_threshold(30)
    # bag [2, 200]: mean log1p = (log 3 + log 201) / 2 = log(24.6) > log(31): False
    want_bag0 = (math.log1p(2) + math.log1p(200)) / 2 > math.log1p(30)
    assert rule.tuned(batch, net).tolist() == [[False, False, want_bag0],
                                               [True, True, False], [False, False, True]]
    for bad in (-1, float("inf"), float("nan"), True, "30"):
        with pytest.raises(ValueError, match="frequency threshold"):
            rule.set_threshold(bad)
    with pytest.raises(ValueError, match="1-D"):
        FrequencyRule(torch.zeros(2, 3))


def test_rule_never_answers_from_a_stale_table():
    # The rule keeps counts > threshold as a table between calls: every way the counts or the
    # threshold can change must reach it.
    net = _Net(["a"], [], [])
    batch = _Batch(torch.tensor([[0], [1], [2]]), None)
    rule = FrequencyRule(torch.tensor([1.0, 5.0, 50.0]))
    assert rule.tuned(batch, net)[:, 0].tolist() == [True, True, True]
    rule.set_threshold(5)
    assert rule.tuned(batch, net)[:, 0].tolist() == [False, False, True]
    other = FrequencyRule(torch.tensor([100.0, 0.0, 0.0]))
    other.set_threshold(0.5)
    rule.load_state_dict(other.state_dict())  # copies in place into both buffers
    assert rule.tuned(batch, net)[:, 0].tolist() == [True, False, False]
    with torch.no_grad():
        rule.counts[1] = 3.0  # the counts alone, in place
    assert rule.tuned(batch, net)[:, 0].tolist() == [True, True, False]
    with torch.no_grad():
        rule.threshold.fill_(50.0)  # the threshold alone, in place
    assert rule.tuned(batch, net)[:, 0].tolist() == [True, False, False]
    rule.threshold.fill_(2.0)
    rule.counts = torch.tensor([0.0, 0.0, 9.0])  # a buffer replaced by a new tensor
    assert rule.tuned(batch, net)[:, 0].tolist() == [False, False, True]
    fresh = FrequencyRule(torch.tensor([1.0, 5.0, 50.0]))
    assert fresh.tuned(batch, net)[:, 0].tolist() == [True, True, True]
    fresh.counts = torch.zeros(3)  # a new tensor, at the same in-place version as the old
    assert fresh.tuned(batch, net)[:, 0].tolist() == [False, False, False]
    twin = copy.deepcopy(rule)
    twin.set_threshold(10)
    assert twin.tuned(batch, net)[:, 0].tolist() == [False, False, False]
    assert rule.tuned(batch, net)[:, 0].tolist() == [False, False, True]
    for dtype in (torch.int32, torch.int64):
        assert rule.tuned(_Batch(batch.sparse.to(dtype), None), net)[:, 0].tolist() == \
            [False, False, True]


def test_field_gates_follow_the_rule_in_training_and_evaluation(tmp_path):
    cfg, bundle, _, fresh = _pretrained(tmp_path, autoft={
        "policy_objective": "train", "field_policy": "frequency", "policy_warmup": 0})
    train = bundle.splits["target_train"]
    counts = count_rows(train, bundle.feature_map.num_rows)
    m = build_transfer_model("autoft", fresh(), bundle.feature_map, cfg.model, cfg.autoft,
                             value_counts=(counts, counts))
    last = m.policy.out
    with torch.no_grad():  # the network sends every gate to the tuned row
        last.weight.zero_()
        last.bias.view(-1, 2)[:, 0] = -20.0
        last.bias.view(-1, 2)[:, 1] = 20.0
    batch = train.slice(0, 256)
    ns = len(m.net.single_fields)
    for k in (0.0, 3.0, 1e6):
        m.set_frequency_threshold(k)
        want = counts[batch.sparse] > k  # the rule holds rare values frozen, whatever the net
        for mode in (m.train, m.eval):
            mode()
            m(batch)
            got = m.last_gates["field"][:, :ns, 1] == 1.0
            assert torch.equal(got, want), (k, mode)
    with torch.no_grad():  # where the rule allows the tuned row, the network decides
        last.bias.view(-1, 2)[:, 0] = 20.0
        last.bias.view(-1, 2)[:, 1] = -20.0
    m.set_frequency_threshold(0.0)
    m.eval()
    m(batch)
    assert bool((m.last_gates["field"][..., 1] == 0.0).all())
    with torch.no_grad():  # fair coins: the layer gates are the network's noisy draws
        last.weight.zero_()
        last.bias.zero_()
        last.bias.view(-1, 2)[:, 1] = torch.linspace(-1.0, 1.0, last.bias.numel() // 2)
    # Nothing forced (k = 0, rows whose every value was seen; an empty bag counts as
    # unseen): the network's logits as they are; one lookup of a value never seen: that one
    # forced, the rest the same.
    with torch.no_grad():
        seen = batch.index(torch.nonzero(m.frequency_rule.tuned(batch, m.net).all(1))[:, 0])
        assert seen.label.shape[0] >= 4
        assert torch.equal(m._policy_logits(seen), m.policy(m._frozen_input(seen)))
        unseen = seen.slice(0, 4)
        unseen.sparse = unseen.sparse.clone()
        unseen.sparse[0, 0] = int(torch.nonzero(counts == 0)[0, 0])
        forced = m._policy_logits(unseen)
        want = m.policy(m._frozen_input(unseen))
        assert forced[0, 0].tolist() == [1.0e4, -1.0e4]  # the frozen row, by the margin
        mask = torch.ones_like(want, dtype=torch.bool)
        mask[0, 0] = False
        assert torch.equal(forced[mask], want[mask])
    m.train()
    m(batch)
    layers = m.last_gates["layer"][..., 1]
    assert 0 < layers.mean().item() < 1  # the layer gates are the network's, noisy draws
    blind = build_transfer_model("autoft_field", fresh(), bundle.feature_map, cfg.model,
                                 cfg.autoft)  # no counts: no value is known to be rare
    assert bool(blind.frequency_rule.tuned(batch, blind.net).all())  # the network decides
    with pytest.raises(ValueError, match="value counts"):
        blind.set_frequency_threshold(3)
    blind.set_frequency_threshold(0)
    plain = build_transfer_model("autoft", fresh(), bundle.feature_map, cfg.model,
                                 AutoFTConfig.from_dict({"field_policy": "network"}))
    with pytest.raises(ValueError, match="no frequency field policy"):
        plain.set_frequency_threshold(3)


def test_frequency_policy_refuses_the_heldout_objective_where_fields_are_gated():
    from autoft_fast.config import parse_config
    both = {"field_policy": "frequency", "policy_objective": "heldout"}
    for strategies in (["autoft"], ["finetune_all", "autoft_field"]):
        with pytest.raises(ConfigError, match="does not combine with policy_objective: "
                                              f"heldout in {strategies[-1]}"):
            parse_config({"synthetic": {}, "autoft": both, "strategies": strategies})
    # autoft_layer has no field policy: it may train its layer policy on a held-out slice.
    cfg = parse_config({"synthetic": {}, "autoft": both,
                        "strategies": ["finetune_all", "autoft_layer"]})
    assert cfg.autoft.policy_objective == "heldout"
    with pytest.raises(ConfigError, match="in autoft"):
        cfg.with_overrides(strategies=["autoft_layer", "autoft"])
    with pytest.raises(ConfigError, match="field_policy"):
        AutoFTConfig.from_dict({"field_policy": "rule"})


@pytest.mark.parametrize("favour", [None, 5.0])
def test_run_scans_thresholds_on_validation_and_keeps_the_better_model(tmp_path, monkeypatch,
                                                                      favour):
    from autoft_fast.train import runner
    from autoft_fast.train.predict import load_run
    from autoft_fast.train.runner import run_strategy
    cfg, bundle, state, fresh = _pretrained(tmp_path, autoft={
        "policy_objective": "train", "field_policy": "frequency", "policy_warmup": 0,
        "frequency_thresholds": [2.0, 5.0]})
    if favour is not None:  # the scan's score made to prefer one threshold: the retrain path
        real = runner._valid_auc

        def scored(model, *args):
            bonus = 0.5 if float(model.frequency_rule.threshold) == favour else 0.0
            return real(model, *args) * 0.1 + bonus
        monkeypatch.setattr(runner, "_valid_auc", scored)
    out = tmp_path / "freq"
    rec = run_strategy(cfg, bundle, state, "autoft_field", 0, out, keep_model=True)
    if favour is not None:
        assert max(rec["frequency_scan"], key=rec["frequency_scan"].get) == "5"
        assert rec["frequency_second_valid_best"] is not None
    scan = rec["frequency_scan"]
    assert list(scan) == ["0", "2", "5"] and all(0.0 <= v <= 1.0 for v in scan.values())
    best = max(scan, key=lambda k: (scan[k], -float(k)))
    if best == "0":
        assert not rec["frequency_retrained"] and rec["frequency_threshold"] == 0.0
    else:  # trained again under the rule; kept only if its validation AUC is higher by
        # DeLong's paired test (one-sided p below frequency_keep_p)
        level = cfg.autoft.frequency_keep_p / 2  # Bonferroni over the two thresholds
        assert rec["frequency_keep_level"] == pytest.approx(level)
        kept = (rec["frequency_second_valid_best"] > rec["frequency_first_valid_best"]
                and rec["frequency_keep_p_value"] < level)
        assert rec["frequency_retrained"] == kept
        assert rec["frequency_threshold"] == (float(best) if kept else 0.0)
        assert any(h.get("stage") == f"k={best}" for h in rec["history"])
    assert not (out / "last_frequency.pt").exists()
    # The saved model predicts with the rule it was kept with (counts and threshold).
    run = load_run(out)
    assert float(run.model.frequency_rule.threshold) == rec["frequency_threshold"]
    test = bundle.splits["target_test"]
    logits = predict(run.model, test, 4096)
    import numpy as np
    saved = np.load(out / "test_scores.npy")
    np.testing.assert_allclose(logits.numpy(), saved, rtol=0, atol=1e-5)
    assert evaluate(run.model, test)["auc"] == pytest.approx(rec["auc"], abs=1e-6)


@pytest.mark.parametrize("keep_p", [1.0, 1e-12])
def test_keep_p_decides_whether_the_rule_s_model_is_kept(tmp_path, monkeypatch, keep_p):
    from autoft_fast.train import runner
    cfg, bundle, state, _ = _pretrained(tmp_path, autoft={
        "policy_objective": "train", "field_policy": "frequency", "policy_warmup": 0,
        "frequency_thresholds": [5.0], "frequency_keep_p": keep_p})
    real = runner._valid_auc
    monkeypatch.setattr(runner, "_valid_auc", lambda model, *a: real(model, *a) * 0.1 + (
        0.5 if float(model.frequency_rule.threshold) == 5.0 else 0.0))
    rec = runner.run_strategy(cfg, bundle, state, "autoft_field", 1, tmp_path / "k")
    higher = rec["frequency_second_valid_best"] > rec["frequency_first_valid_best"]
    assert 0.0 <= rec["frequency_keep_p_value"] <= 1.0
    if keep_p == 1.0:  # kept whenever its validation AUC is higher
        assert rec["frequency_retrained"] == higher
    else:  # no validation split this small makes p that small: never kept
        assert not rec["frequency_retrained"] and rec["frequency_threshold"] == 0.0


def test_a_validation_split_too_small_to_test_keeps_the_first_model(tmp_path, monkeypatch, caplog):
    from autoft_fast.train import runner
    cfg, bundle, state, _ = _pretrained(tmp_path, autoft={
        "policy_objective": "train", "field_policy": "frequency", "policy_warmup": 0,
        "frequency_thresholds": [5.0], "frequency_keep_p": 1.0})
    real = runner._valid_auc
    monkeypatch.setattr(runner, "_valid_auc", lambda model, *a: real(model, *a) * 0.1 + (
        0.5 if float(model.frequency_rule.threshold) == 5.0 else 0.0))

    def refuse(*args, **kw):  # what DeLong's test says of a split with one click
        raise ValueError("labels must hold at least 2 positives and 2 negatives")
    monkeypatch.setattr(runner, "delong_test", refuse)
    rec = runner.run_strategy(cfg, bundle, state, "autoft_field", 1, tmp_path / "k")
    assert not rec["frequency_retrained"] and rec["frequency_threshold"] == 0.0
    assert rec["frequency_keep_p_value"] == 1.0
    assert "not kept" in caplog.text and "2 positives" in caplog.text


@pytest.mark.parametrize("significant", [True, False])
def test_crossfit_chooses_and_tests_k_on_held_out_training_rows(tmp_path, monkeypatch,
                                                                significant):
    # frequency_select: crossfit: two k = 0 models, each trained on half the target training
    # rows and scored on the other half; the scan and DeLong's test run on those held-out
    # rows (every training row once), never on the validation split.
    from autoft_fast.train import runner
    cfg, bundle, state, _ = _pretrained(tmp_path, autoft={
        "policy_objective": "train", "field_policy": "frequency", "policy_warmup": 0,
        "frequency_thresholds": [2.0, 5.0], "frequency_select": "crossfit"})
    n_train = len(bundle.splits["target_train"])
    seen = {"tested": [], "fits": []}

    def no_valid_scan(*args):
        raise AssertionError("crossfit must not score thresholds on the validation split")
    monkeypatch.setattr(runner, "_valid_auc", no_valid_scan)
    real_fit = runner.Trainer.fit

    def fit(self, train, valid, **kw):
        seen["fits"].append(len(train))
        return real_fit(self, train, valid, **kw)
    monkeypatch.setattr(runner.Trainer, "fit", fit)
    real_scores = runner._crossfit_scores

    def scores(*args, **kw):  # held-out scores that make k = 5 the best
        labels, by_k, epochs, seconds = real_scores(*args, **kw)
        assert len(labels) == n_train and set(by_k) == {0.0, 2.0, 5.0}
        by_k[5.0] = (labels * 2.0 - 1.0) * 10.0  # a perfect ranking
        return labels, by_k, epochs, seconds
    monkeypatch.setattr(runner, "_crossfit_scores", scores)

    def test(labels, a, b):
        seen["tested"].append(len(labels))
        return {"diff": 0.1, "p_value": 1e-6 if significant else 0.5}
    monkeypatch.setattr(runner, "delong_test", test)
    rec = runner.run_strategy(cfg, bundle, state, "autoft_field", 0, tmp_path / "cf")
    # The full run, then the two halves (each trained on the other half's rows).
    assert seen["fits"][:3] == [n_train, n_train - n_train // 2, n_train // 2]
    assert seen["tested"] == [n_train]
    assert rec["frequency_select"] == "crossfit" and rec["frequency_scan"]["5"] == 1.0
    assert rec["frequency_keep_level"] == pytest.approx(cfg.autoft.frequency_keep_p / 2)
    if significant:  # retrained on all training rows under k = 5 and kept without a
        # validation test
        assert seen["fits"][3:] == [n_train]
        assert rec["frequency_retrained"] and rec["frequency_threshold"] == 5.0
    else:
        assert len(seen["fits"]) == 3
        assert not rec["frequency_retrained"] and rec["frequency_threshold"] == 0.0
    assert not list((tmp_path / "cf").glob("last_crossfit*.pt"))
