"""Policy-learning options of the autoft: section: held-out policy steps, warm-up, the tuned
budget, value-frequency policy inputs, and the comparison over several targets."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from autoft_fast.config import AutoFTConfig, ConfigError, DataError, parse_config
from autoft_fast.models.frequency import ValueFrequencies, count_rows
from autoft_fast.train.holdout import split_holdout
from autoft_fast.train.trainer import Trainer
from autoft_fast.config import TrainConfig

from test_train import Toy, ToyModel, toy_data, toy_iterate


class Recorder(ToyModel):
    """A toy model with a policy group that records which rows each forward saw."""

    def __init__(self):
        super().__init__()
        self.policy = torch.nn.Linear(8, 1)
        self.seen: list[tuple[bool, torch.Tensor]] = []

    def parameter_groups(self):
        return {"model": list(self.net.parameters()), "policy": list(self.policy.parameters())}

    def forward(self, b):
        if self.training:
            self.seen.append(b.x[:, 0].clone())
        return super().forward(b) + self.policy(b.x).squeeze(-1)


def _trainer(model, **kw):
    cfg = TrainConfig(epochs=kw.pop("epochs", 2), batch_size=50, lr=1e-2, patience=5)
    return Trainer(model, cfg, iterate=toy_iterate, progress=False, seed=0, **kw)


def test_heldout_policy_steps_only_on_policy_rows_and_model_never_sees_them():
    data = toy_data(600)
    fit, hold = Toy(data.x[:400], data.label[:400], data.domain[:400]), \
        Toy(data.x[400:], data.label[400:], data.domain[400:])
    model = Recorder()
    seen_by_opt = {"model": [], "policy": []}
    tr = _trainer(model, policy_data=hold)
    for name, opt in tr.optimizers.items():
        orig = opt.step

        def step(*a, _orig=orig, _name=name, **k):
            seen_by_opt[_name].append(model.seen[-1])
            return _orig(*a, **k)
        opt.step = step
    tr.fit(fit, toy_data(100, seed=1))
    fit_keys = set(fit.x[:, 0].tolist())
    hold_keys = set(hold.x[:, 0].tolist())
    model_rows = set(torch.cat(seen_by_opt["model"]).tolist())
    policy_rows = set(torch.cat(seen_by_opt["policy"]).tolist())
    assert model_rows <= fit_keys and not model_rows & hold_keys
    assert policy_rows <= hold_keys and not policy_rows & fit_keys
    # one policy step per model step
    assert len(seen_by_opt["policy"]) == len(seen_by_opt["model"]) == 2 * 8


def test_warmup_leaves_the_policy_untouched_and_is_never_the_best_epoch():
    model = Recorder()
    before = [p.detach().clone() for p in model.policy.parameters()]
    after_warmup = []

    def record(epoch, entry):
        if epoch == 2:
            after_warmup.extend(p.detach().clone() for p in model.policy.parameters())

    tr = _trainer(model, epochs=3, policy_warmup=2, on_epoch_end=record)
    res = tr.fit(toy_data(300), toy_data(100, seed=1))
    for a, b in zip(before, after_warmup):
        assert torch.equal(a, b)
    assert res.best_epoch == 3 and [bool(h.get("warmup")) for h in res.history] == [True, True, False]
    # A warm-up as long as the training would leave no epoch to pick: refused.
    with pytest.raises(ValueError, match="policy_warmup = 2 is not below epochs = 2"):
        _trainer(Recorder(), epochs=2, policy_warmup=2)
    model2 = Recorder()
    res2 = _trainer(model2, epochs=3, policy_warmup=1).fit(toy_data(300), toy_data(100, seed=1))
    assert res2.best_epoch in (2, 3) and res2.history[0]["warmup"]
    assert not torch.equal(before[0], model2.policy.weight)


def test_trainer_rejects_bad_warmup():
    with pytest.raises(ValueError, match="policy_warmup = -1"):
        _trainer(Recorder(), policy_warmup=-1)
    with pytest.raises(ValueError, match="policy_warmup_gates = 'half'"):
        _trainer(Recorder(), policy_warmup_gates="half")


def test_best_epoch_at_cap_is_flagged(caplog):
    res = _trainer(ToyModel(), epochs=1).fit(toy_data(300), toy_data(100, seed=1))
    assert res.best_epoch == 1 and res.best_at_cap
    assert "last allowed one" in caplog.text
    # With epochs given, cap_steps raises nothing: the advice names epochs alone.
    assert "raise epochs\n" in caplog.text + "\n" and "cap_steps" not in caplog.text


def test_split_holdout_is_seeded_disjoint_and_complete():
    from autoft_fast.data.tensors import TensorData
    n = 101
    d = TensorData(torch.arange(n).view(-1, 1), None, None, torch.zeros(n), torch.zeros(n, dtype=torch.long))
    fit, hold = split_holdout(d, 0.2, seed=3)
    assert len(hold) == 20 and len(fit) == 81
    assert sorted(fit.sparse[:, 0].tolist() + hold.sparse[:, 0].tolist()) == list(range(n))
    fit2, hold2 = split_holdout(d, 0.2, seed=3)
    assert torch.equal(hold.sparse, hold2.sparse)
    assert not torch.equal(split_holdout(d, 0.2, seed=4)[1].sparse, hold.sparse)
    with pytest.raises(ValueError, match="policy_holdout = 1.5"):
        split_holdout(d, 1.5, seed=0)


def test_value_frequencies_are_scaled_log_counts_per_field():
    from autoft_fast.data.tensors import TensorData

    class Net:
        single_fields = ["a", "b"]
        multihot_fields: list = []
        num_fields = 2
    ids = torch.tensor([[0, 3], [0, 4], [1, 3]])
    d = TensorData(ids, None, None, torch.zeros(3), torch.zeros(3, dtype=torch.long))
    src = count_rows(d, 6)
    assert src.tolist() == [2, 1, 0, 2, 1, 0]
    tgt = torch.tensor([0., 0, 0, 0, 9, 0])
    vf = ValueFrequencies(src, tgt)
    x = vf(d, Net())
    assert x.shape == (3, 4)
    import math
    # source features of field a, b then target features of field a, b
    assert x[0, 0].item() == pytest.approx(math.log1p(2) / math.log1p(2))
    assert x[1, 1].item() == pytest.approx(math.log1p(1) / math.log1p(2))
    assert x[1, 3].item() == pytest.approx(1.0) and x[0, 3].item() == 0.0


def test_autoft_keys_are_declared_and_checked():
    cfg = AutoFTConfig.from_dict({"policy_objective": "heldout", "policy_holdout": 0.3,
                                  "policy_input": "frozen+freq", "tuned_budget": 0.4,
                                  "policy_warmup": 2, "field_policy": "network"})
    assert cfg.policy_objective == "heldout" and cfg.tuned_budget == 0.4
    with pytest.raises(ConfigError, match="policy_objective"):
        AutoFTConfig.from_dict({"policy_objective": "valid"})
    with pytest.raises(ConfigError, match="policy_holdout"):
        AutoFTConfig.from_dict({"policy_holdout": 1.0})
    with pytest.raises(ConfigError, match="tuned_budget"):
        AutoFTConfig.from_dict({"tuned_budget": 1.5})


TINY = {"n_source_rows": 3000, "n_target_rows": 600, "extra_targets": ["tgt_b"]}


def _exp(tmp_path, **over):
    raw = {"synthetic": TINY, "model": {"name": "deepfm", "hidden_units": [8], "embedding_dim": 4},
           "pretrain": {"epochs": 1}, "finetune": {"epochs": 2, "batch_size": 128},
           "strategies": ["finetune_all", "autoft"], "seeds": [0, 1],
           "run_dir": str(tmp_path / "runs"), "device": "cpu",
           "autoft": {"policy_objective": "heldout", "policy_input": "frozen+freq",
                      "tuned_budget": 0.5, "policy_warmup": 1}}
    raw.update(over)
    # These tests are about the policy network's field gates, unless a test says otherwise.
    raw["autoft"] = {"field_policy": "network", **raw["autoft"]}
    return parse_config(raw, tmp_path)


def test_budget_penalises_only_the_excess_tuned_fraction(tmp_path):
    from autoft_fast.train.runner import load_data, pretrain, run_strategy
    cfg = _exp(tmp_path)
    bundle = load_data(cfg)
    state, _ = pretrain(cfg, bundle, progress=False)
    from autoft_fast.models import build_base_model, build_transfer_model
    pre = build_base_model(bundle.feature_map, cfg.model)
    pre.load_state_dict(state)
    counts = (count_rows(bundle.splits["source_train"], bundle.feature_map.num_rows),) * 2
    m = build_transfer_model("autoft", pre, bundle.feature_map, cfg.model, cfg.autoft,
                             value_counts=counts)
    batch = bundle.splits["target_train"].slice(0, 64)
    m.force_gates("tuned")
    m(batch)
    assert m.penalty().item() == pytest.approx(0.5)  # weight 1 * (1.0 - 0.5)
    m.force_gates("frozen")
    m(batch)
    assert m.penalty().item() == 0.0
    with pytest.raises(ValueError, match="needs the value counts"):
        build_transfer_model("autoft", pre, bundle.feature_map, cfg.model, cfg.autoft)
    rec = run_strategy(cfg, bundle, state, "autoft", 0, tmp_path / "one")
    assert rec["epoch_cap"] == 2 and "best_at_cap" in rec
    assert Path(rec["test_scores_path"]).is_file()
    assert rec["policy_by_frequency"] and all(0.0 <= r["tuned_fraction"] <= 1.0
                                              for r in rec["policy_by_frequency"])
    assert any("policy" in h for h in rec["history"])
    # With epochs unset, finetune.cap_steps raises the recorded cap: 51 epochs' steps.
    import dataclasses
    steps = -(-len(bundle.splits["target_train"]) // cfg.finetune.batch_size)
    raised = dataclasses.replace(cfg, finetune=dataclasses.replace(
        cfg.finetune, epochs=None, cap_steps=51 * steps, patience=1))
    rec = run_strategy(raised, bundle, state, "finetune_all", 0, tmp_path / "raised")
    assert rec["epoch_cap"] == 51 and rec["epochs_run"] <= 51


def test_compare_over_two_targets_writes_each_table_and_a_summary(tmp_path):
    from autoft_fast.train.runner import compare
    cfg = _exp(tmp_path, targets=["tgt", "tgt_b"])
    run_dir = tmp_path / "out"
    table, rows, runs = compare(cfg, run_dir, progress=False)
    assert {r["target"] for r in runs} == {"tgt", "tgt_b"} and len(runs) == 8
    for t in ("tgt", "tgt_b"):
        assert (run_dir / t / "results.md").is_file() and (run_dir / t / "auc.png").is_file()
    assert (run_dir / "summary.md").is_file() and (run_dir / "summary.csv").is_file()
    assert "across 2 targets" in table and {r["strategy"] for r in rows} == {"finetune_all", "autoft"}
    # each target's model was pre-trained on the other target plus the sources
    info = json.loads((run_dir / "tgt" / "pretrain.json").read_text())
    assert info["valid_auc"] == info["valid_auc"]


def test_target_folders_stay_inside_the_run_folder(tmp_path, caplog):
    from autoft_fast.train.runner import compare, target_folder
    assert target_folder("news/sport") == "news_sport" and target_folder("..") == "_.."
    assert target_folder("tgt a") == "tgt a" and target_folder("zielé") == "zielé"
    cfg = _exp(tmp_path, targets=["a/b", "a_b"])
    with pytest.raises(ConfigError, match="give the same folder name"):
        compare(cfg, tmp_path / "out", progress=False)
    # A search: section without --tune: said, not silently ignored (the run itself is
    # stopped here by an unknown target before anything trains).
    cfg = _exp(tmp_path, targets=["tgt", "nope"], search={"lr": [1e-3]})
    with pytest.raises(DataError, match="'nope'"):
        compare(cfg, tmp_path / "out2", progress=False)
    assert "the search: section is used by compare --tune only" in caplog.text


def test_targets_key_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="targets lists a domain twice"):
        _exp(tmp_path, targets=["a", "a"])
    cfg = _exp(tmp_path).with_overrides(targets="tgt,tgt_b")
    assert cfg.target_domains() == ["tgt", "tgt_b"]
    assert _exp(tmp_path).with_overrides(targets=" tgt , tgt_b,").target_domains() == [
        "tgt", "tgt_b"]


def test_search_grid_and_tune_pick_on_validation(tmp_path, caplog):
    from autoft_fast.train.runner import compare, search_grid
    cfg = _exp(tmp_path, search={"lr": [1e-3, 3e-3], "l2sp_alpha": [0.01], "policy_lr": [0.01],
                                 "tuned_budget": [1.0, 0.5]},
               strategies=["source_only", "l2sp", "autoft"], seeds=[0])
    assert len(search_grid(cfg, "l2sp")) == 2 and len(search_grid(cfg, "autoft")) == 4
    assert search_grid(cfg, "source_only") == [{"finetune": {}, "autoft": {}}]
    assert {g["autoft"]["tuned_budget"] for g in search_grid(cfg, "autoft")} == {None, 0.5}
    run_dir = tmp_path / "tuned"
    with caplog.at_level(logging.INFO, logger="autoft_fast"):
        table, rows, runs = compare(cfg, run_dir, tune=True, progress=False)
    tune_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("tune: ")]
    assert "tune: source_only trains nothing: no setting to pick" in tune_lines
    assert any(m.startswith("tune: l2sp picked ") and "valid AUC 0." in m for m in tune_lines)
    import csv
    grid = list(csv.DictReader(open(run_dir / "grid.csv")))
    assert len(grid) == 1 + 2 + 4
    picks = json.loads((run_dir / "picks.json").read_text())
    for strategy in ("l2sp", "autoft"):
        mine = [g for g in grid if g["strategy"] == strategy]
        best = max(mine, key=lambda g: float(g["valid_auc"]))
        assert best["picked"] == "True" and picks[strategy] == best["setting"]
        assert {r["setting"] for r in runs if r["strategy"] == strategy} == {best["setting"]}


def test_tune_resume_reuses_runs_by_their_setting_not_their_place_in_the_grid(tmp_path):
    import csv
    import dataclasses
    from autoft_fast.config import SearchConfig
    from autoft_fast.train.runner import compare
    cfg = _exp(tmp_path, search={"lr": [3e-3, 3e-2]}, strategies=["finetune_all"], seeds=[0])
    run_dir = tmp_path / "tuned"
    compare(cfg, run_dir, tune=True, progress=False)
    first = {g["setting"]: g for g in csv.DictReader(open(run_dir / "grid.csv"))}
    # The grid grows at the front: the old settings' runs are read back, the new one trains.
    wider = dataclasses.replace(cfg, search=SearchConfig.from_dict({"lr": [3e-4, 3e-3, 3e-2]}))
    compare(wider, run_dir, tune=True, resume=True, progress=False)
    again = {g["setting"]: g for g in csv.DictReader(open(run_dir / "grid.csv"))}
    assert set(again) == {"lr=0.0003", "lr=0.003", "lr=0.03"}
    for name, row in first.items():
        assert again[name]["test_auc"] == row["test_auc"], name
    picks = json.loads((run_dir / "picks.json").read_text())
    assert [r["setting"] for r in csv.DictReader(open(run_dir / "runs.csv"))] == [
        picks["finetune_all"]]
    assert again["lr=0.0003"]["test_auc"] != first["lr=0.003"]["test_auc"]
    # A finished run of other settings in a run's folder is refused, not reused.
    folder = run_dir / "search" / "finetune_all" / "lr=0.003-seed0"
    rec = json.loads((folder / "result.json").read_text())
    (folder / "result.json").write_text(json.dumps(dict(rec, training_config_hash="0" * 16)))
    with pytest.raises(ValueError, match="holds a finished finetune_all run .* of other settings"):
        compare(wider, run_dir, tune=True, resume=True, progress=False)


def test_start_best_keeps_the_given_weights_unless_beaten():
    model = ToyModel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = _trainer(model, epochs=2, start_best=1.0).fit(toy_data(300), toy_data(100, seed=1))
    assert res.best_epoch == 0 and res.best_metric == 1.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    res = _trainer(ToyModel(), epochs=2, start_best=0.0).fit(toy_data(300), toy_data(100, seed=1))
    assert res.best_epoch in (1, 2)


def test_refit_trains_the_model_on_all_rows_with_the_policy_frozen(tmp_path):
    from autoft_fast.train.runner import load_data, pretrain, run_strategy
    cfg = _exp(tmp_path, autoft={"policy_objective": "heldout", "policy_refit": "continue",
                                 "policy_warmup": 0})
    bundle = load_data(cfg)
    state, _ = pretrain(cfg, bundle, progress=False)
    rec = run_strategy(cfg, bundle, state, "autoft", 0, tmp_path / "refit", keep_model=True)
    stages = [h.get("stage") for h in rec["history"]]
    assert "refit" in stages and stages[0] is None
    assert rec["refit_best_epoch"] is not None and rec["valid_best"] >= max(
        h["valid_auc"] for h in rec["history"] if h.get("stage") is None and not h.get("warmup"))


def test_policy_refit_reads_the_older_booleans_and_refuses_other_values():
    heldout = {"policy_objective": "heldout", "field_policy": "network"}
    assert AutoFTConfig.from_dict({**heldout, "policy_refit": True}).policy_refit == "continue"
    assert AutoFTConfig.from_dict({"policy_refit": False}).policy_refit == "none"
    assert AutoFTConfig.from_dict({**heldout, "policy_refit": "retrain"}).policy_refit == "retrain"
    with pytest.raises(ConfigError, match="policy_refit"):
        AutoFTConfig.from_dict({**heldout, "policy_refit": "again"})
    # A refit follows training on a fixed held-out slice; without one it would do nothing.
    with pytest.raises(ConfigError, match="policy_refit = 'retrain' follows training on a fixed"):
        AutoFTConfig.from_dict({"policy_refit": "retrain"})
    with pytest.raises(ConfigError, match="needs policy_objective: heldout with policy_holdout_mode"):
        AutoFTConfig.from_dict({**heldout, "policy_refit": "continue",
                                "policy_holdout_mode": "rotating"})


def test_frequency_thresholds_are_distinct_and_above_zero():
    assert AutoFTConfig.from_dict({"frequency_thresholds": [5, 50]}).frequency_thresholds == [5, 50]
    with pytest.raises(ConfigError, match="lists a threshold twice"):
        AutoFTConfig.from_dict({"frequency_thresholds": [30, 30]})
    with pytest.raises(ConfigError, match="k = 0 is always tried"):
        AutoFTConfig.from_dict({"frequency_thresholds": [0, 30]})


def test_a_warmup_as_long_as_the_training_is_a_config_error():
    from autoft_fast.config import parse_config
    raw = {"synthetic": {}, "autoft": {"policy_warmup": 3}, "finetune": {"epochs": 3}}
    with pytest.raises(ConfigError, match="autoft.policy_warmup = 3 is not below finetune.epochs = 3"):
        parse_config(raw)
    cfg = parse_config({**raw, "strategies": ["finetune_all", "l2sp"]})  # no policy: no matter
    with pytest.raises(ConfigError, match="policy_warmup = 3"):
        cfg.with_overrides(strategies=["autoft"])


def _pretrained(tmp_path, **over):
    from autoft_fast.models import build_base_model
    from autoft_fast.train.runner import load_data, pretrain
    cfg = _exp(tmp_path, **over)
    bundle = load_data(cfg)
    state, _ = pretrain(cfg, bundle, progress=False)

    def fresh():
        pre = build_base_model(bundle.feature_map, cfg.model)
        pre.load_state_dict(state)
        return pre
    return cfg, bundle, state, fresh


def test_fixed_policy_gates_are_noise_free_in_training_and_the_policy_does_not_train(tmp_path):
    from autoft_fast.models import build_transfer_model
    cfg, bundle, _, fresh = _pretrained(tmp_path, autoft={"policy_warmup": 0})
    m = build_transfer_model("autoft", fresh(), bundle.feature_map, cfg.model, cfg.autoft)
    with torch.no_grad():  # a policy with a clear opinion, so no gate sits on a tie
        for p in m.policy.parameters():
            p.normal_(0.0, 0.5)
    batch = bundle.splits["target_train"].slice(0, 64)
    m.train()
    m(batch)
    noisy = m.last_gates["field"].clone()
    m(batch)
    assert not torch.equal(noisy, m.last_gates["field"])  # training draws Gumbel noise
    m.fix_policy()
    assert m.training and not m.policy.training
    assert m.parameter_groups()["policy"] == []
    m(batch)
    first = m.last_gates["field"].clone()
    m(batch)
    assert torch.equal(first, m.last_gates["field"])
    m.eval()
    m(batch)
    assert torch.equal(first, m.last_gates["field"])  # the choices evaluation makes
    with pytest.raises(ValueError, match="no policy"):
        build_transfer_model("finetune_all", fresh(), bundle.feature_map, cfg.model,
                             cfg.autoft).fix_policy()


def test_a_fixed_all_tuned_policy_trains_exactly_what_finetune_all_trains(tmp_path):
    from autoft_fast.models import build_transfer_model
    from autoft_fast.train.trainer import evaluate
    cfg, bundle, _, fresh = _pretrained(tmp_path, autoft={"policy_warmup": 0})
    train, valid = bundle.splits["target_train"], bundle.splits["target_valid"]
    plain = build_transfer_model("finetune_all", fresh(), bundle.feature_map, cfg.model,
                                 cfg.autoft)
    gated = build_transfer_model("autoft_field", fresh(), bundle.feature_map, cfg.model,
                                 cfg.autoft)
    last = [mod for mod in gated.policy.modules() if isinstance(mod, torch.nn.Linear)][-1]
    with torch.no_grad():  # every field gate: tuned by a wide margin
        last.weight.zero_()
        last.bias.view(-1, 2)[:, 0] = -20.0
        last.bias.view(-1, 2)[:, 1] = 20.0
    gated.fix_policy()
    results = []
    for m in (plain, gated):
        torch.manual_seed(0)
        fit = Trainer(m, cfg.finetune, seed=0, progress=False).fit(train, valid)
        results.append((fit.best_epoch, evaluate(m, bundle.splits["target_test"])["auc"]))
    assert results[0][0] == results[1][0]
    assert results[0][1] == pytest.approx(results[1][1], abs=1e-6)


def test_retrain_trains_a_fresh_model_on_all_rows_under_the_searched_policy(tmp_path):
    from autoft_fast.train.runner import run_strategy
    cfg, bundle, state, _ = _pretrained(tmp_path, autoft={
        "policy_objective": "heldout", "policy_refit": "retrain", "policy_warmup": 0,
        "policy_input": "frozen+freq"})
    rec = run_strategy(cfg, bundle, state, "autoft", 0, tmp_path / "retrain", keep_model=True)
    stages = [h.get("stage") for h in rec["history"]]
    k = stages.count(None)
    assert k >= 1 and stages == [None] * k + ["retrain"] * (len(stages) - k) and k < len(stages)
    assert rec["best_epoch"] is not None and rec["search_best_epoch"] is not None
    assert rec["valid_best"] == max(h["valid_auc"] for h in rec["history"]
                                    if h.get("stage") == "retrain")
    assert not (tmp_path / "retrain" / "last_retrain.pt").exists()
    assert (tmp_path / "retrain" / "model.pt").is_file()


def test_retrain_keeps_the_searched_policy_and_trains_the_model_from_the_pretrained_start(
        tmp_path):
    from autoft_fast.models import build_transfer_model
    from autoft_fast.train.runner import _domain_names, _retrain
    from autoft_fast.train.trainer import FitResult
    cfg, bundle, state, fresh = _pretrained(tmp_path, autoft={
        "policy_objective": "heldout", "policy_refit": "retrain", "policy_warmup": 0})
    searched = build_transfer_model("autoft", fresh(), bundle.feature_map, cfg.model, cfg.autoft)
    with torch.no_grad():
        for p in searched.policy.parameters():
            p.normal_(0.0, 0.5)
        # ... but with the tuned path on (a policy choosing frozen everywhere would leave the
        # retrained model nothing to train)
        searched.policy.out.bias.view(-1, 2)[:, 1] += 10.0
        for p in searched.net.parameters():  # the search stage's model: not the start
            p.add_(1.0)
    fit = FitResult(best_epoch=1, best_metric=0.5, epochs_run=1, history=[{"epoch": 1}],
                    train_seconds=0.0)
    model, rec = _retrain(cfg, searched, fit, fresh(), bundle, 0, tmp_path,
                          _domain_names(bundle), "autoft",
                          None, resume=False, progress=False, device=torch.device("cpu"))
    for k, v in searched.policy.state_dict().items():
        assert torch.equal(model.policy.state_dict()[k], v)
    assert all(not p.requires_grad for p in model.policy.parameters())
    start = fresh().state_dict()
    moved = [k for k, v in model.net.state_dict().items() if not torch.equal(v, start[k])]
    assert moved  # it trained ...
    assert max((model.net.state_dict()[k] - start[k]).abs().max().item() for k in moved) < 1.0
    # ... from the pre-trained start, not from the search stage's weights (+1 everywhere)
    assert rec["search_best_epoch"] == 1 and rec["history"][0] == {"epoch": 1}


def test_models_doc_holds_the_autoft_table_made_from_the_declarations():
    from autoft_fast.config.schema import markdown_table
    text = (Path(__file__).resolve().parents[1] / "docs" / "models.md").read_text()
    assert markdown_table(AutoFTConfig) in text, (
        "docs/models.md's autoft: table is stale; regenerate it with "
        "python -c 'from autoft_fast.config import AutoFTConfig; from autoft_fast.config.schema "
        "import markdown_table; print(markdown_table(AutoFTConfig))'")


def test_rotating_holdout_gives_the_policy_a_fresh_slice_each_epoch():
    data = toy_data(500)
    model = Recorder()
    seen = {"model": [], "policy": []}
    tr = _trainer(model, epochs=3, policy_rotating=0.2)
    for name, opt in tr.optimizers.items():
        orig = opt.step

        def step(*a, _orig=orig, _name=name, **k):
            seen[_name].append(model.seen[-1])
            return _orig(*a, **k)
        opt.step = step
    tr.fit(data, toy_data(100, seed=1))
    per_epoch = len(seen["model"]) // 3
    keys = set(data.x[:, 0].tolist())
    model_epochs = [set(torch.cat(seen["model"][e * per_epoch:(e + 1) * per_epoch]).tolist())
                    for e in range(3)]
    policy_epochs = [set(torch.cat(seen["policy"][e * per_epoch:(e + 1) * per_epoch]).tolist())
                     for e in range(3)]
    for m, p in zip(model_epochs, policy_epochs):
        assert len(m) == 400 and not m & p and p <= keys
    # over the epochs the model sees nearly every row (a row is held out of all three epochs
    # with probability 0.2 ** 3), unlike a fixed slice, which it never sees
    assert len(set().union(*model_epochs)) >= 0.97 * len(keys)
    assert policy_epochs[0] != policy_epochs[1]
    with pytest.raises(ValueError, match="policy_rotating = 1.5"):
        _trainer(Recorder(), policy_rotating=1.5)


@pytest.mark.parametrize("prior", [0.5, 0.9])
def test_policy_init_tuned_sets_the_untrained_gates_and_keeps_the_pretrained_predictions(
        tmp_path, prior):
    from autoft_fast.models import build_transfer_model
    from autoft_fast.train.trainer import evaluate
    cfg, bundle, _, fresh = _pretrained(tmp_path, autoft={"policy_init_tuned": prior})
    m = build_transfer_model("autoft", fresh(), bundle.feature_map, cfg.model, cfg.autoft)
    batch = bundle.splits["target_train"].slice(0, 512)
    m.train()
    torch.manual_seed(0)
    m(batch)
    # last_gates hold (z0, z1) per gate; z1 = 1 is the tuned path.
    gates = torch.cat([m.last_gates["field"][..., 1].reshape(-1),
                       m.last_gates["layer"][..., 1].reshape(-1)])
    # Bernoulli(prior) draws: the share of tuned choices within 4 standard errors.
    se = (prior * (1 - prior) / gates.numel()) ** 0.5
    assert abs(gates.mean().item() - prior) < 4 * se
    m.eval()
    m(batch)
    assert bool((m.last_gates["field"][..., 1] == (1.0 if prior > 0.5 else 0.0)).all())
    # Whichever path the argmax takes, the untrained model is the pre-trained one.
    got = evaluate(m, bundle.splits["target_valid"])
    want = evaluate(build_transfer_model("source_only", fresh(), bundle.feature_map, cfg.model,
                                         cfg.autoft), bundle.splits["target_valid"])
    assert got["auc"] == pytest.approx(want["auc"], abs=1e-6)


def test_policy_init_tuned_refuses_a_certain_prior():
    from autoft_fast.models import PolicyNetwork
    for bad in (0.0, 1.0):
        with pytest.raises(ConfigError, match="policy_init_tuned"):
            AutoFTConfig.from_dict({"policy_init_tuned": bad})
        with pytest.raises(ValueError, match="init_tuned"):
            PolicyNetwork(4, [8], 3, init_tuned=bad)


def test_a_resumed_run_counts_the_wall_time_of_its_first_start(tmp_path, monkeypatch):
    # The checkpoint carries the fit's wall time over a resume (Trainer); the run's record
    # adds it to this start's, so the table's time per run is the whole run's.
    from autoft_fast.train import runner
    cfg = _exp(tmp_path, strategies=["finetune_all"], seeds=[0])
    bundle = runner.load_data(cfg)
    state, _ = runner.pretrain(cfg, bundle, progress=False)

    class Resumed(runner.Trainer):
        def fit(self, *a, **k):
            res = super().fit(*a, **k)
            res.wall_seconds += 100.0  # as if 100 s had passed before a kill
            return res

    monkeypatch.setattr(runner, "Trainer", Resumed)
    rec = runner.run_strategy(cfg, bundle, state, "finetune_all", 0, tmp_path / "run")
    assert 100.0 <= rec["wall_seconds"] < 100.0 + 60.0


def test_an_interrupted_run_resumed_under_another_autoft_section_is_refused(tmp_path, monkeypatch):
    # The checkpoint records what its weights depend on beyond the finetune section; only a
    # finished run's result.json was checked, so a run could switch configs halfway.
    import dataclasses
    from autoft_fast.train import runner
    cfg = _exp(tmp_path, strategies=["autoft"], seeds=[0],
               finetune={"epochs": 3, "batch_size": 128, "patience": 5})
    bundle = runner.load_data(cfg)
    state, _ = runner.pretrain(cfg, bundle, progress=False)

    class Killed(runner.Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)

            def kill(epoch, _):
                if epoch == 1:
                    raise KeyboardInterrupt
            self.on_epoch_end = kill

    monkeypatch.setattr(runner, "Trainer", Killed)
    with pytest.raises(KeyboardInterrupt):
        runner.run_strategy(cfg, bundle, state, "autoft", 0, tmp_path / "run")
    monkeypatch.undo()
    assert (tmp_path / "run" / "last.pt").is_file()
    other = dataclasses.replace(cfg, autoft=dataclasses.replace(cfg.autoft, tau=0.2))
    with pytest.raises(ValueError, match="was written under other settings .*autoft"):
        runner.run_strategy(other, bundle, state, "autoft", 0, tmp_path / "run", resume=True)
    longer = dataclasses.replace(cfg, finetune=dataclasses.replace(cfg.finetune, epochs=4))
    rec = runner.run_strategy(longer, bundle, state, "autoft", 0, tmp_path / "run", resume=True)
    assert rec["epochs_run"] >= 2  # more epochs may be given to a resumed run


def test_the_held_out_slice_leaves_no_trace_in_batchnorm_statistics(tmp_path):
    # policy_objective heldout: the policy's train-mode forward on held-out rows moved the
    # tuned BatchNorm layers' running statistics, which evaluation uses.
    from autoft_fast.models import build_base_model, build_transfer_model
    from autoft_fast.train import TrainConfig, Trainer
    from autoft_fast.train import runner
    cfg = _exp(tmp_path)
    bundle = runner.load_data(cfg)
    train, valid = bundle.splits["source_train"], bundle.splits["source_valid"]
    fit_rows = train.slice(600, 1600)
    mc = {"name": "dnn", "embedding_dim": 4, "hidden_units": [8], "batch_norm": True}
    torch.manual_seed(0)
    pre = build_base_model(bundle.feature_map, mc)
    states = []
    for hold in (train.slice(0, 300), train.slice(300, 600)):  # two different slices
        torch.manual_seed(0)
        m = build_transfer_model("autoft", pre, bundle.feature_map, mc,
                                 {"policy_hidden_units": [4], "policy_init_tuned": 0.9})
        Trainer(m, TrainConfig(epochs=2, batch_size=128), policy_lr=0.0, policy_data=hold,
                seed=0, progress=False).fit(fit_rows, valid)
        states.append(m.state_dict())
    a, b = states
    assert any("running_mean" in k for k in a)
    differ = [k for k in a if a[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert differ == []  # the policy did not move (lr 0), so nothing else may differ


def test_kept_start_weights_keep_the_temperature_they_came_with(tmp_path):
    # A refit that never beats stage one keeps stage one's weights (best_epoch 0); the model
    # was then left at the refit's last temperature, one those weights were never validated at.
    from autoft_fast.models import build_base_model, build_transfer_model
    from autoft_fast.train import TrainConfig, Trainer
    from autoft_fast.train import runner
    cfg = _exp(tmp_path)
    bundle = runner.load_data(cfg)
    train, valid = bundle.splits["source_train"], bundle.splits["source_valid"]
    mc = {"name": "dnn", "embedding_dim": 4, "hidden_units": [8]}
    torch.manual_seed(0)
    pre = build_base_model(bundle.feature_map, mc)
    m = build_transfer_model("autoft", pre, bundle.feature_map, mc, {"tau": 5.0})
    res = Trainer(m, TrainConfig(epochs=2, batch_size=256), tau_schedule=lambda e: 0.1 * (e + 1),
                  start_best=1.0, progress=False).fit(train.slice(0, 1000), valid)
    assert res.best_epoch == 0 and float(m.tau) == 5.0
    m2 = build_transfer_model("autoft", pre, bundle.feature_map, mc, {"tau": 5.0})
    res = Trainer(m2, TrainConfig(epochs=2, batch_size=256, patience=5),
                  tau_schedule=lambda e: 0.1 * (e + 1), progress=False).fit(train.slice(0, 1000), valid)
    assert float(m2.tau) == pytest.approx(0.1 * res.best_epoch)  # the best epoch's temperature


@pytest.mark.parametrize("how", ["fixed", "rotating"])
def test_a_held_out_slice_too_small_for_batchnorm_is_named(tmp_path, how):
    from autoft_fast.models import build_base_model, build_transfer_model
    from autoft_fast.train import TrainConfig, Trainer
    from autoft_fast.train import runner
    bundle = runner.load_data(_exp(tmp_path))
    train, valid = bundle.splits["source_train"], bundle.splits["source_valid"]
    mc = {"name": "dnn", "embedding_dim": 4, "hidden_units": [8], "batch_norm": True}
    pre = build_base_model(bundle.feature_map, mc)
    m = build_transfer_model("autoft", pre, bundle.feature_map, mc, {})
    extra = ({"policy_data": train.slice(60, 61)} if how == "fixed"
             else {"policy_rotating": 0.01})
    with pytest.raises(ValueError, match=r"held-out slice for the policy's steps has 1 row\(s\), "
                                         r"and BatchNorm .*raise autoft.policy_holdout"):
        Trainer(m, TrainConfig(epochs=1, batch_size=32), progress=False,
                **extra).fit(train.slice(0, 60), valid)


@pytest.mark.parametrize("refit", ["continue", "retrain"])
def test_refit_and_retrain_hold_the_temperature_the_search_best_was_validated_at(tmp_path,
                                                                                 refit):
    # Both restarted the annealed schedule at tau: with soft gates the refit's first epoch
    # computed a near 50/50 blend, not the function the stage-one best scored.
    from autoft_fast.train.runner import run_strategy
    cfg, bundle, state, _ = _pretrained(tmp_path, autoft={
        "policy_objective": "heldout", "policy_refit": refit, "policy_warmup": 0,
        "anneal": "exp", "tau": 5.0, "tau_min": 0.5, "hard": False})
    rec = run_strategy(cfg, bundle, state, "autoft", 0, tmp_path / refit)
    search = [h for h in rec["history"] if h.get("stage") is None]
    stage = "refit" if refit == "continue" else "retrain"
    after = [h["tau"] for h in rec["history"] if h.get("stage") == stage]
    best = rec["search_best_epoch"] if refit == "retrain" else max(
        search, key=lambda h: h["valid_auc"])["epoch"]
    want = next(h["tau"] for h in search if h["epoch"] == best)
    assert len({h["tau"] for h in search}) > 1  # the search annealed
    assert after and all(t == pytest.approx(want) for t in after)


def test_a_fixed_policy_trains_under_its_noise_free_choices_even_when_evaluation_samples():
    from autoft_fast.models import build_transfer_model
    from test_models import model_cfg, pretrained_model, tiny_batch, tiny_feature_map
    fmap = tiny_feature_map()
    data = tiny_batch(fmap)
    model = build_transfer_model("autoft", pretrained_model("deepfm", fmap, data), fmap,
                                 model_cfg("deepfm"), {"eval_gates": "sample"})
    model.fix_policy()
    model.train()
    gates = []
    for seed in range(2):
        torch.manual_seed(seed)
        model(data)
        gates.append(model.last_gates["field"].clone())
    assert torch.equal(gates[0], gates[1])
    model.eval()  # evaluation still samples, as eval_gates says
    draws = []
    for seed in range(2):
        torch.manual_seed(seed)
        with torch.no_grad():
            model(data)
        draws.append(model.last_gates["field"].clone())
    assert not torch.equal(draws[0], draws[1])
