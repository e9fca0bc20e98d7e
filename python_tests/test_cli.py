"""The autoft-fast CLI end to end on a tiny config, in-process via main([...])."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

from autoft_fast.cli import build_parser, main

TINY_SYNTHETIC = {
    "seed": 5, "n_source_rows": 3000, "n_target_rows": 1500,
    "fields": [
        {"name": "user_id", "cardinality": 60, "effect": "stable", "frequency": "shifted"},
        {"name": "item_id", "cardinality": 40, "effect": "shifted"},
        {"name": "device", "cardinality": 4},
        {"name": "price", "kind": "numeric", "frequency": "shifted"},
        {"name": "tags", "kind": "multihot", "cardinality": 20, "max_len": 3},
    ],
}


def tiny_experiment(tmp_path: Path, data, **over) -> Path:
    cfg = {
        "name": "tiny",
        "model": {"name": "dnn", "embedding_dim": 4, "hidden_units": [8]},
        "pretrain": {"epochs": 1, "batch_size": 256},
        "finetune": {"epochs": 1, "batch_size": 256},
        "autoft": {"backend": "reference"},
        "strategies": ["finetune_all", "autoft"],
        "seeds": [0],
        "run_dir": str(tmp_path / "runs"),
        **over,
    }
    cfg.update(data)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def last_line_run_dir(out: str) -> Path:
    last = out.strip().splitlines()[-1]
    assert last.startswith("run directory: "), last
    return Path(last[len("run directory: "):])


def table_rows(out: str) -> list[list[str]]:
    """Body rows of the first markdown table in `out` (the strategy table)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| strategy |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| "):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_generate_then_compare_end_to_end(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["generate", "--config", str(exp), "--out", str(tmp_path / "data")]) == 0
    dataset = tmp_path / "data" / "dataset.yaml"
    assert dataset.is_file()
    capsys.readouterr()

    exp = tiny_experiment(tmp_path, {"data": str(dataset)})
    rc = main(["compare", "--config", str(exp), "--seeds", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["finetune_all", "autoft"]
    assert rows[0][3] == "+0.00%"  # the baseline's gain over itself
    for r in rows:
        auc_mean, auc_std = (float(x) for x in r[1].split(" ± "))
        assert 0.0 <= auc_mean <= 1.0 and auc_std >= 0.0

    run_dir = last_line_run_dir(out)
    assert run_dir.parent == tmp_path / "runs"
    for name in ("results.csv", "runs.csv", "results.md", "auc.png", "policy_fields.png",
                 "policy_layers.png", "log.txt", "pretrain.json", "config.yaml", "run.json"):
        assert (run_dir / name).is_file(), name
    with open(run_dir / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert sorted((r["strategy"], r["seed"]) for r in runs) == [
        ("autoft", "0"), ("autoft", "1"), ("finetune_all", "0"), ("finetune_all", "1")]
    with open(run_dir / "results.csv") as f:
        results = list(csv.DictReader(f))
    assert [r["strategy"] for r in results] == ["finetune_all", "autoft"]
    assert float(results[1]["auc_mean"]) == pytest.approx(float(rows[1][1].split(" ± ")[0]),
                                                          abs=1e-4)
    assert "| field user_id |" in out and "| layer mlp_0 |" in out  # the policy table
    with open(run_dir / "policy.csv") as f:
        policy = list(csv.DictReader(f))
    assert {(r["kind"], r["name"]) for r in policy} >= {("field", "tags"), ("layer", "output")}
    assert all(0.0 <= float(r["autoft"]) <= 1.0 for r in policy)
    rec = json.loads((run_dir / "runs" / "autoft-seed0" / "result.json").read_text())
    assert set(rec["policy_stats"]["field"]) == {"user_id", "item_id", "device", "price", "tags"}
    assert "pretrain" in (run_dir / "log.txt").read_text()

    # A second comparison reuses the cached pre-trained model.
    assert main(["compare", "--config", str(exp), "--strategies", "source_only",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert [r[0] for r in table_rows(out)] == ["source_only"]
    assert json.loads((last_line_run_dir(out) / "pretrain.json").read_text())["reused"] is True

    # finetune keeps the model; --resume of a finished run reads its result back.
    assert main(["finetune", "--config", str(exp), "--strategy", "autoft", "--seed", "1",
                 "--no-progress"]) == 0
    out1 = capsys.readouterr().out
    fdir = last_line_run_dir(out1)
    assert (fdir / "run" / "model.pt").is_file()
    assert main(["finetune", "--config", str(exp), "--strategy", "autoft", "--seed", "1",
                 "--resume", "--no-progress"]) == 0
    out2 = capsys.readouterr().out
    assert last_line_run_dir(out2) == fdir
    assert out1.splitlines()[0] == out2.splitlines()[0]  # same test AUC line


@pytest.mark.parametrize("over, needle", [
    ({"optimiser": "adam"}, "unknown key 'optimiser' in experiment config"),
    ({"finetune": {"epochs": 1, "lrate": 0.1}}, "unknown key 'lrate' in finetune config; did you mean 'lr'?"),
    ({"strategies": ["autoft", "spottune"]}, "unknown strategy 'spottune'"),
    ({"seeds": [0, 0]}, "seeds must not repeat"),
    ({"model": {"name": "xgboost"}}, "model.name"),
    ({"autoft": {"tau": -1}}, "autoft.tau"),
])
def test_bad_config_is_one_line_exit_2(tmp_path, capsys, over, needle):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC}, **over)
    rc = main(["compare", "--config", str(exp), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_missing_config_and_bad_strategy_flag(tmp_path, capsys):
    assert main(["pretrain", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["finetune", "--config", str(exp), "--strategy", "all_of_them"]) == 2
    assert "unknown strategy 'all_of_them'" in capsys.readouterr().err
    assert main(["finetune", "--config", str(exp), "--strategy", "autoft", "--resume"]) == 2
    assert "no earlier finetune run" in capsys.readouterr().err
    assert main(["compare", "--config", str(exp), "--backend", "gpu"]) == 2
    assert "autoft.backend" in capsys.readouterr().err


def test_every_command_has_help_with_an_example(capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == {"demo", "generate", "pretrain", "finetune", "compare", "predict",
                                "bench"}
    for name, p in sub.choices.items():
        assert "example:" in (p.epilog or ""), name
        assert "autoft-fast " + name in p.epilog, name
    with pytest.raises(SystemExit) as e:
        main(["compare", "--help"])
    assert e.value.code == 0
    assert "--seeds" in capsys.readouterr().out


def test_embedded_demo_config_is_valid():
    from autoft_fast.config import load_config
    from autoft_fast.models import STRATEGIES
    cfg = load_config(None)
    assert cfg.strategies == list(STRATEGIES) and len(cfg.seeds) >= 2
    assert cfg.synthetic is not None and cfg.synthetic.n_target_rows > 0


def test_compare_killed_mid_run_then_resumed_matches_uninterrupted(tmp_path, capsys, monkeypatch):
    import autoft_fast.train.runner as runner
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC},
                          finetune={"epochs": 2, "batch_size": 256, "patience": 5},
                          strategies=["finetune_all", "autoft"])
    assert main(["compare", "--config", str(exp), "--no-progress"]) == 0
    straight = last_line_run_dir(capsys.readouterr().out)

    class Killed(runner.Trainer):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            if self.desc.startswith("autoft"):
                def kill(epoch, _):
                    if epoch == 1:
                        raise KeyboardInterrupt
                self.on_epoch_end = kill

    monkeypatch.setattr(runner, "Trainer", Killed)
    assert main(["compare", "--config", str(exp), "--no-progress"]) == 130
    assert "--resume" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["compare", "--config", str(exp), "--resume", "--no-progress"]) == 0
    resumed = last_line_run_dir(capsys.readouterr().out)
    assert resumed != straight and resumed.parent == straight.parent

    def records(d):
        with open(d / "runs.csv") as f:
            return [(r["strategy"], r["seed"], r["auc"], r["logloss"], r["best_epoch"])
                    for r in csv.DictReader(f)]
    assert records(resumed) == records(straight)
    assert "resumed from" in (resumed / "log.txt").read_text()
    # run.json keeps the start and lists the resume; config.yaml is the latest start's.
    meta = json.loads((resumed / "run.json").read_text())
    assert meta["argv"][-1] == "--no-progress" and "--resume" not in meta["argv"]
    assert meta["resumed"][0]["argv"] == ["compare", "--config", str(exp), "--resume",
                                          "--no-progress"]
    assert main(["compare", "--config", str(exp), "--resume", str(resumed), "--seeds", "2",
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert yaml.safe_load((resumed / "config.yaml").read_text())["seeds"] == [0, 1]
    assert len(json.loads((resumed / "run.json").read_text())["resumed"]) == 2

    # Resuming with changed training settings is refused in one line.
    exp2 = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC},
                           finetune={"epochs": 3, "batch_size": 256, "patience": 5},
                           strategies=["finetune_all", "autoft"])
    assert main(["compare", "--config", str(exp2), "--resume", str(resumed)]) == 2
    err = capsys.readouterr().err
    assert "changed since that run started: finetune.epochs 2 -> 3 (the data files" in err
    assert main(["compare", "--config", str(exp2), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "no earlier compare run of 'tiny' under" in err and "has this config; the newest" in err
    assert "differs: finetune.epochs 2 -> 3" in err and "run without --resume" in err


def test_device_option_is_checked(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["compare", "--config", str(exp), "--device", "tpu"]) == 2
    assert "--device = 'tpu'" in capsys.readouterr().err
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC}, device="cuda:x")
    assert main(["compare", "--config", str(exp)]) == 2
    assert "device = 'cuda:x' is not a device" in capsys.readouterr().err


def test_counts_in_the_closing_lines_agree_in_number():
    from autoft_fast.cli import _count
    assert _count(1, "seed") == "1 seed" and _count(2, "seed") == "2 seeds"
    assert _count(1, "strategy", "strategies") == "1 strategy"
    assert _count(9, "strategy", "strategies") == "9 strategies"
    assert _count(1_000, "row") == "1,000 rows" and _count(1, "row") == "1 row"


def test_run_files_are_standard_json_and_a_resume_reads_their_undefined_numbers_back(tmp_path, capsys):
    # source_only trains nothing: its samples/s is undefined (NaN), written as null.
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC}, strategies=["source_only"])
    assert main(["compare", "--config", str(exp), "--no-progress"]) == 0
    run_dir = last_line_run_dir(capsys.readouterr().out)

    def refuse(name):
        raise ValueError(f"non-standard JSON number {name}")
    files = sorted(run_dir.rglob("*.json"))
    assert any(p.name == "result.json" for p in files)
    for p in files:
        json.loads(p.read_text(), parse_constant=refuse)  # no NaN or Infinity anywhere
    rec = json.loads(next(p for p in files if p.name == "result.json").read_text())
    assert rec["train_samples_per_s"] is None
    assert main(["compare", "--config", str(exp), "--resume", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    with open(run_dir / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == ["source_only"] and rows[0]["auc"] == str(rec["auc"])
    assert "source_only" in out


def test_a_run_record_round_trips_through_standard_json(tmp_path):
    import math
    from autoft_fast.train.runner import _record_from_json, write_json
    nan = float("nan")
    rec = {"strategy": "autoft", "seed": 0, "best_epoch": None, "auc": nan, "logloss": 0.5,
           "train_samples_per_s": nan, "valid_best": nan,
           "per_domain": {"t": {"auc": nan, "logloss": nan, "n": 3}},
           "policy_stats": {"field": {"tags": nan, "user": 0.5}, "layer": {"mlp_0": 1.0}},
           "history": [{"epoch": 1, "valid_auc": nan, "tau": None, "samples_per_s": nan,
                        "policy": {"field": {"tags": nan}, "layer": {}}}],
           "policy_by_frequency": [{"field": "tags", "bucket": "1", "tuned_fraction": nan}]}
    path = write_json(rec, tmp_path / "result.json")
    text = path.read_text()
    assert "NaN" not in text and json.loads(text)["auc"] is None
    back = _record_from_json(json.loads(text))

    def same(a, b):
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, list):
            return len(a) == len(b) and all(map(same, a, b))
        if isinstance(a, float) and math.isnan(a):
            return isinstance(b, float) and math.isnan(b)
        return a == b and type(a) is type(b)
    assert same(rec, back)  # NaN where it was NaN, None (best_epoch, tau) where it was None


def test_a_run_with_backend_auto_resumes_from_its_own_config_yaml(tmp_path, capsys):
    # config.yaml records 'auto' resolved (cpu here); the resume hashed the unresolved 'auto'
    # and refused the run's own file.
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC}, autoft={"backend": "auto"},
                          strategies=["finetune_all", "autoft"])
    assert main(["compare", "--config", str(exp), "--no-progress"]) == 0
    run_dir = last_line_run_dir(capsys.readouterr().out)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["autoft"]["backend"] != "auto"
    before = (run_dir / "runs.csv").read_text()
    assert main(["compare", "--config", str(run_dir / "config.yaml"), "--resume", str(run_dir),
                 "--no-progress"]) == 0, capsys.readouterr().err
    assert last_line_run_dir(capsys.readouterr().out) == run_dir
    assert (run_dir / "runs.csv").read_text() == before  # every run reused, none trained again


def test_runs_csv_written_during_a_resume_keeps_the_rows_it_found(tmp_path):
    # A resume killed early rewrote runs.csv from the runs it had re-read so far.
    from autoft_fast.train.runner import _write_runs_so_far
    from autoft_fast.train.report import write_runs_csv
    path = tmp_path / "runs.csv"
    write_runs_csv([{"strategy": s, "seed": k, "auc": 0.6} for s in ("finetune_all", "autoft")
                    for k in (0, 1)], path)
    _write_runs_so_far([{"strategy": "finetune_all", "seed": 0, "auc": 0.7},
                        {"strategy": "finetune_all", "seed": 2, "auc": 0.8}], path)
    with open(path) as f:
        got = [(r["strategy"], r["seed"], r["auc"]) for r in csv.DictReader(f)]
    assert got == [("finetune_all", "0", "0.7"), ("finetune_all", "2", "0.8"),
                   ("finetune_all", "1", "0.6"), ("autoft", "0", "0.6"), ("autoft", "1", "0.6")]


def test_resuming_with_keep_models_names_the_runs_finished_without_one(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC}, strategies=["finetune_all"])
    assert main(["compare", "--config", str(exp), "--no-progress"]) == 0
    run_dir = last_line_run_dir(capsys.readouterr().out)
    assert main(["compare", "--config", str(exp), "--resume", str(run_dir), "--keep-models",
                 "--no-progress"]) == 0
    said = capsys.readouterr()
    text = said.out + said.err + (run_dir / "log.txt").read_text()
    assert "finetune_all: finished without --keep-models" in text
    assert "finetune_all-seed0" in text and "result.json" in text


def test_resume_of_a_named_run_without_config_uses_the_runs_own_config(tmp_path, capsys,
                                                                       monkeypatch):
    # Relative run_dir and cache_dir, resumed from another working directory without --config:
    # the run's config.yaml (absolute paths) is the config, so the cached pre-trained model is
    # found and nothing is compared against the embedded demo config.
    first, other = tmp_path / "a", tmp_path / "b"
    first.mkdir(), other.mkdir()
    exp = tiny_experiment(first, {"synthetic": TINY_SYNTHETIC}, run_dir="runs",
                          cache_dir="mycache")
    monkeypatch.chdir(first)
    assert main(["compare", "--config", str(exp), "--no-progress"]) == 0
    run_dir = (first / last_line_run_dir(capsys.readouterr().out)).resolve()
    before = {(r["strategy"], r["auc"]) for r in csv.DictReader(open(run_dir / "runs.csv"))}
    import shutil
    shutil.rmtree(run_dir / "runs" / "autoft-seed0")
    monkeypatch.chdir(other)
    assert main(["compare", "--resume", str(run_dir), "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert last_line_run_dir(capsys.readouterr().out) == run_dir
    after = {(r["strategy"], r["auc"]) for r in csv.DictReader(open(run_dir / "runs.csv"))}
    assert after == before  # autoft trained again to the same result, finetune_all reused
    assert json.loads((run_dir / "pretrain.json").read_text())["reused"] is True
    assert not (other / "mycache").exists() and not (other / "runs").exists()


def test_finetune_resume_of_a_named_run_keeps_its_seed(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--seed", "1",
                 "--no-progress"]) == 0
    out1 = capsys.readouterr().out
    run_dir = last_line_run_dir(out1)
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--resume",
                 str(run_dir), "--no-progress"]) == 0, capsys.readouterr().err
    out2 = capsys.readouterr().out
    assert out2.splitlines()[0] == out1.splitlines()[0]  # "finetune_all (seed 1): ..."
    # Another seed named on the command line is still refused.
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--seed", "0",
                 "--resume", str(run_dir)]) == 2
    assert "ran seed 1, not 0" in capsys.readouterr().err


def test_keep_models_given_on_a_resume_is_recorded_for_later_resumes(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC}, strategies=["finetune_all"])
    assert main(["compare", "--config", str(exp), "--no-progress"]) == 0
    run_dir = last_line_run_dir(capsys.readouterr().out)
    assert not json.loads((run_dir / "run.json").read_text()).get("keep_models")
    assert main(["compare", "--config", str(exp), "--resume", str(run_dir), "--keep-models",
                 "--no-progress"]) == 0
    assert json.loads((run_dir / "run.json").read_text())["keep_models"] is True


@pytest.mark.parametrize("cache_dir", ["mycache", None])
def test_resume_from_another_directory_finds_the_runs_own_cache(tmp_path, capsys, monkeypatch,
                                                               cache_dir):
    # With --config and relative paths, this start's cache_dir (mycache, or runs/cache when
    # cache_dir is unset) names a folder under the new working directory that does not exist:
    # the run's own cache is used, not filled afresh with a second pre-trained model.
    first, other = tmp_path / "a", tmp_path / "b"
    first.mkdir(), other.mkdir()
    over = {"run_dir": "runs"} | ({"cache_dir": cache_dir} if cache_dir else {})
    exp = tiny_experiment(first, {"synthetic": TINY_SYNTHETIC}, strategies=["finetune_all"],
                          **over)
    monkeypatch.chdir(first)
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all",
                 "--no-progress"]) == 0
    run_dir = (first / last_line_run_dir(capsys.readouterr().out)).resolve()
    monkeypatch.chdir(other)
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--resume",
                 str(run_dir), "--no-progress"]) == 0, capsys.readouterr().err
    assert json.loads((run_dir / "pretrain.json").read_text())["reused"] is True
    assert not (other / (cache_dir or "runs")).exists()
    assert "using the run's own cache" in (run_dir / "log.txt").read_text()
