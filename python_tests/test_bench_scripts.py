"""The benchmark scripts' option checks: a bad option is refused by name before any work
(no data generated, nothing pre-trained)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from test_cli import TINY_SYNTHETIC, tiny_experiment

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_bench_prep_refuses_a_zero_repeat_and_a_pythonpath_without_the_package(tmp_path, capsys):
    prep = _script("bench_prep")
    work = tmp_path / "work"
    err = _refused(prep.main, ["--work", str(work), "--repeat", "0"], capsys)
    assert "--repeat must be at least 1, got 0" in err
    err = _refused(prep.main, ["--work", str(work), "--pythonpath", str(tmp_path / "missing")], capsys)
    assert "holds no autoft_fast package" in err
    err = _refused(prep.main, ["--work", str(work), "--pythonpath", str(BENCH.parent)], capsys)
    assert "is this checkout: it would be compared with itself" in err
    assert not work.exists()  # refused before the CSVs are built


def test_field_ablation_names_an_unknown_field_before_pretraining(tmp_path, capsys, monkeypatch):
    abl = _script("field_ablation")
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    monkeypatch.setattr(abl, "pretrain", lambda *a, **k: pytest.fail("pre-trained first"))
    err = _refused(abl.main, ["--config", str(exp), "--retrain", "user_id,bogus"], capsys)
    assert "--retrain: unknown field(s) ['bogus']; the fields are" in err and "'user_id'" in err
    doc = yaml.safe_load(exp.read_text())
    doc["synthetic"]["extra_targets"] = ["tgt_b"]
    doc["targets"] = ["tgt", "tgt_b"]
    exp.write_text(yaml.safe_dump(doc))
    err = _refused(abl.main, ["--config", str(exp), "--target", "tgt_c"], capsys)
    assert "--target 'tgt_c' is not one of the config's targets ['tgt', 'tgt_b']" in err
    assert "--seeds must be at least 1" in _refused(abl.main, ["--seeds", "0"], capsys)
