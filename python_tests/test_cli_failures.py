"""The command line never loses a user's work or hides a failure: one case per probe."""
from __future__ import annotations

import errno
import json
import io
import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from autoft_fast.cli import default_threads, main
from test_cli import TINY_SYNTHETIC, last_line_run_dir, tiny_experiment


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("autoft-fast: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def test_generate_refuses_to_overwrite_without_force(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    out = tmp_path / "data"
    assert main(["generate", "--config", str(exp), "--out", str(out)]) == 0
    (out / "synthetic.csv").write_text("my,own\n1,2\n")
    capsys.readouterr()
    assert main(["generate", "--config", str(exp), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "synthetic.csv" in line and "--force" in line
    assert (out / "synthetic.csv").read_text() == "my,own\n1,2\n"
    assert main(["generate", "--config", str(exp), "--out", str(out), "--force"]) == 0
    assert (out / "synthetic.csv").read_text() != "my,own\n1,2\n"


def test_dense_column_with_a_huge_value_keeps_its_spread(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    out = tmp_path / "data"
    assert main(["generate", "--config", str(exp), "--out", str(out)]) == 0
    frame = pd.read_csv(out / "synthetic.csv", dtype=str)
    frame.loc[3, "price"] = "1e200"
    frame.to_csv(out / "synthetic.csv", index=False)
    doc = yaml.safe_load((out / "dataset.yaml").read_text())
    doc["data"]["numeric"] = [{"name": "price", "mode": "dense"}]
    (out / "dataset.yaml").write_text(yaml.safe_dump(doc))
    exp = tiny_experiment(tmp_path, {"data": str(out / "dataset.yaml")})
    assert main(["finetune", "--config", str(exp), "--strategy", "target_only",
                 "--no-progress"]) == 0
    from autoft_fast.config import load_config
    from autoft_fast.train.runner import load_data
    dense = load_data(load_config(exp)).splits["source_train"].dense
    assert torch.isfinite(dense).all() and dense[:, 0].std() > 0


@pytest.fixture()
def finetuned(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC},
                          finetune={"epochs": 2, "batch_size": 256})
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all",
                 "--no-progress"]) == 0
    run_dir = last_line_run_dir(capsys.readouterr().out)
    return exp, run_dir


def test_damaged_checkpoint_is_one_line_and_logged(finetuned, capsys):
    exp, run_dir = finetuned
    (run_dir / "run" / "result.json").unlink()  # as if killed before the end
    (run_dir / "run" / "last.pt").write_bytes(b"\x00garbage")
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--resume",
                 str(run_dir), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "last.pt" in line and "could not be read" in line and "delete it" in line
    # the failed run's log has the error
    assert "could not be read" in (run_dir / "log.txt").read_text()


def test_damaged_pretrained_cache_is_rebuilt_with_a_warning(finetuned, capsys):
    exp, run_dir = finetuned
    cached = list((run_dir.parent / "cache" / "pretrained").glob("*.pt"))
    assert len(cached) == 1
    cached[0].write_bytes(cached[0].read_bytes()[:100])  # truncated
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all",
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "is damaged" in captured.err and "pre-training again" in captured.err
    from autoft_fast.train.checkpoint import load_checkpoint
    assert "valid_auc" in load_checkpoint(cached[0])["info"]  # rebuilt
    new_run = last_line_run_dir(captured.out)
    assert "is damaged" in (new_run / "log.txt").read_text()


def test_stale_checkpoint_temp_files_are_removed(finetuned, capsys):
    exp, run_dir = finetuned
    (run_dir / "run" / "result.json").unlink()
    stale = run_dir / "run" / ".last.pt.abc123.tmp"
    stale.write_bytes(b"")
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--resume",
                 str(run_dir), "--no-progress"]) == 0
    assert not stale.exists()


def _read_only_below(monkeypatch, root: Path) -> None:
    """Path.mkdir below ``root`` fails as on a read-only disk (the tests run as any user)."""
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if str(self).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)


def test_read_only_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    _read_only_below(monkeypatch, tmp_path / "runs")
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all",
                 "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "Read-only file system" in line and "--run-dir" in line


def test_read_only_cache_dir_names_the_file_and_the_settings(tmp_path, capsys, monkeypatch):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC},
                          cache_dir=str(tmp_path / "cache"))
    _read_only_below(monkeypatch, tmp_path / "cache")
    assert main(["compare", "--config", str(exp), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"cannot write '{tmp_path / 'cache'}" in line
    assert "read-only" in line and "cache_dir" in line and "[Errno" not in line


def test_resume_of_a_read_only_run_folder_says_to_copy_it(finetuned, capsys, monkeypatch):
    exp, run_dir = finetuned
    import autoft_fast.train.progress as progress
    real = progress.setup_logging

    def read_only(path, *a, **k):
        if path is not None and str(path).startswith(str(run_dir)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, *a, **k)

    monkeypatch.setattr(progress, "setup_logging", read_only)
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--resume",
                 str(run_dir), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "resumed run folder must be writable" in line and "--run-dir" not in line


def test_make_run_dir_is_atomic_under_a_race(tmp_path):
    from autoft_fast.config import load_config
    from autoft_fast.train.runner import make_run_dir
    cfg = load_config(tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC}))
    made, errors = [], []
    start = threading.Barrier(12)

    def one():
        start.wait()
        try:
            made.append(make_run_dir(cfg, "compare"))
        except Exception as e:  # pragma: no cover - the failure being tested
            errors.append(e)

    threads = [threading.Thread(target=one) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(made)) == 12 and all(p.is_dir() for p in made)


def test_failed_run_logs_its_error(tmp_path, capsys, monkeypatch):
    import autoft_fast.train.runner as runner
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})

    def broken(*a, **k):
        raise RuntimeError("the disk caught fire")

    monkeypatch.setattr(runner, "run_strategy", broken)
    with pytest.raises(RuntimeError):
        main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--no-progress"])
    log = next((tmp_path / "runs").glob("tiny-finetune-*")) / "log.txt"
    text = log.read_text()
    assert "the disk caught fire" in text and "Traceback" in text


def test_pretrain_cache_hit_makes_no_run_directory(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["pretrain", "--config", str(exp), "--no-progress"]) == 0
    first = capsys.readouterr().out
    runs = sorted((tmp_path / "runs").glob("tiny-pretrain-*"))
    assert len(runs) == 1 and last_line_run_dir(first) == runs[0]
    assert main(["pretrain", "--config", str(exp), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "already cached" in out and "no new run directory" in out
    assert sorted((tmp_path / "runs").glob("tiny-pretrain-*")) == runs


def test_backend_and_threads_are_printed_once(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["finetune", "--config", str(exp), "--strategy", "target_only",
                 "--no-progress", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("threads: 1 (--threads") == 1
    assert captured.err.count("backend: reference on cpu") == 1
    run_dir = last_line_run_dir(captured.out)
    assert "backend: reference on cpu" in (run_dir / "log.txt").read_text()


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 0.0, 0.0))
    assert default_threads() == (1, "4 cores, load average 2.6")
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert default_threads()[0] == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert default_threads()[0] == 1


def test_bench_help_works(capsys):
    assert main(["bench", "--help"]) == 0
    assert "bench ops --help" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_cpu_machine_is_rejected_before_data_loads(tmp_path, capsys, monkeypatch):
    import autoft_fast.train.runner as runner

    def no_data(*a, **k):  # pragma: no cover - reaching it is the failure
        raise AssertionError("data were loaded")

    monkeypatch.setattr(runner, "load_data", no_data)
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["finetune", "--config", str(exp), "--strategy", "autoft",
                 "--device", "cuda"]) == 2
    assert "CUDA is not available" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("tiny-*"))


def test_duplicate_yaml_key_names_the_key(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    exp.write_text(exp.read_text() + "seeds: [3]\n")
    assert main(["compare", "--config", str(exp)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "key 'seeds' is given twice" in line
    data = tmp_path / "d.yaml"
    data.write_text("data:\n  label: y\n  label: z\n")
    from autoft_fast.config import DataError, read_data_yaml
    with pytest.raises(DataError, match="key 'label' is given twice"):
        read_data_yaml(data)


def test_config_directory_says_it_is_a_directory(tmp_path, capsys):
    assert main(["compare", "--config", str(tmp_path)]) == 2
    assert "is a directory" in _one_error_line(capsys.readouterr().err)


def test_header_only_file_message(tmp_path):
    from autoft_fast.data import DataConfig, DataError, prepare_data
    (tmp_path / "h.csv").write_text("d,y,a\n")
    cfg = DataConfig.from_dict({"files": ["h.csv"], "label": "y", "categorical": ["a"],
                                "domain": {"column": "d", "source": ["s"], "target": "t"},
                                "cache": False}, tmp_path)
    with pytest.raises(DataError, match="the files have no data rows$"):
        prepare_data(cfg)


def test_bad_row_number_counts_the_malformed_lines_before_it(tmp_path):
    from autoft_fast.data import DataConfig, DataError, prepare_data
    lines = ["d,y,a"] + [f"{'s' if i % 2 else 't'},{i % 2},v{i % 3}" for i in range(40)]
    lines[3] = "s,1,v1,EXTRA"  # file line 4: malformed (too many fields)
    lines[10] = "t,x,v1"       # file line 11 = data row 10 (1-based, the header not counted)
    (tmp_path / "b.csv").write_text("\n".join(lines) + "\n")
    cfg = DataConfig.from_dict({"files": ["b.csv"], "label": "y", "categorical": ["a"],
                                "domain": {"column": "d", "source": ["s"], "target": "t"},
                                "cache": False}, tmp_path)
    with pytest.raises(DataError, match=r"'x' in b.csv, data row 10\)"):
        prepare_data(cfg)


def test_parquet_list_column_outside_multihot_is_refused(tmp_path):
    from autoft_fast.data import DataConfig, DataError, prepare_data
    pd.DataFrame({"d": ["s", "t"] * 5, "y": [0, 1] * 5,
                  "a": [[1, 2]] * 10}).to_parquet(tmp_path / "l.parquet")
    cfg = DataConfig.from_dict({"files": ["l.parquet"], "label": "y", "categorical": ["a"],
                                "domain": {"column": "d", "source": ["s"], "target": "t"},
                                "cache": False}, tmp_path)
    with pytest.raises(DataError, match="Parquet list column"):
        prepare_data(cfg)


def test_progress_bar_redraws_without_stale_text_and_shows_the_metric():
    from autoft_fast.train import ProgressBar
    term = io.StringIO()
    term.isatty = lambda: True
    bar = ProgressBar(100, "epoch 1", stream=term, min_interval=0)
    bar.update(50, loss=0.5, note="a long note that makes the line wide")
    bar.update(50, loss=0.25, note="short")
    bar.close(**{"valid auc": 0.7312})
    text = term.getvalue()
    assert text.endswith("\n")
    draws = text.rstrip("\n").split("\r")[1:]
    for before, after in zip(draws, draws[1:]):
        assert len(after) >= len(before.rstrip())  # a shorter line is padded over the old
    assert "valid auc 0.7312" in draws[-1] and "100/100" in draws[-1]
    rate = bar.rate()
    time.sleep(0.05)
    assert bar.rate() == rate  # frozen at the last sample: evaluation does not lower it


def test_cli_sets_a_passive_openmp_wait_policy_before_torch_loads(tmp_path):
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    code = ("import sys; sys.argv[0] = 'autoft-fast'; import autoft_fast, os; "
            "print(os.environ.get('OMP_WAIT_POLICY'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=True).stdout
    assert out.strip() == "PASSIVE"
    # a library user's process is left alone
    out = subprocess.run([sys.executable, "-c", "import autoft_fast, os; "
                          "print(os.environ.get('OMP_WAIT_POLICY'))"], env=env,
                         capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    assert out.strip() == "None"
    # a user's own setting wins
    res = subprocess.run([sys.executable, "-m", "autoft_fast.cli", "predict", "--run",
                          str(tmp_path / "nowhere"), "--data", "x.csv", "--out", "y.csv"],
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, cwd=tmp_path)
    assert res.returncode == 2 and "OpenMP wait policy active" in res.stderr
    res = subprocess.run([sys.executable, "-m", "autoft_fast.cli", "predict", "--run",
                          str(tmp_path / "nowhere"), "--data", "x.csv", "--out", "y.csv"],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "OpenMP wait policy passive" in res.stderr
    assert "does not exist" in res.stderr.strip().splitlines()[-1]


def test_bench_ops_says_when_its_targets_do_not_apply(capsys):
    assert main(["bench", "ops", "--no-compile", "--batch", "8", "--fields", "2", "--reps", "1",
                 "--shapes", "4:50"]) == 0
    assert "no target lines: they are measured on the shape 16:1000000" in capsys.readouterr().out
    assert main(["bench", "ops", "--no-compile", "--batch", "8", "--fields", "2", "--reps", "1",
                 "--shapes", "16:1000000", "--backends", "cpu"]) == 0
    assert "the targets are stated for B=4096, F=24; this run used B=8, F=2" in \
        capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--reps", "0"], "--reps must be >= 1"),
    (["--batch", "-5"], "--batch must be >= 1"),
    (["--fields", "0"], "--fields must be >= 1"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
    (["--shapes", "0:1000"], "the dim D and the rows V must both be >= 1"),
    (["--shapes", "8:-5"], "the dim D and the rows V must both be >= 1"),
    (["--device", "tpu"], "--device 'tpu' is not a device"),
    (["--backends", "bogus"], "--backends: 'bogus' is not available for cpu tensors"),
])
def test_bench_ops_refuses_odd_values_by_name(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "ops", "--no-compile", "--batch", "8", "--shapes", "4:50", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--reps", "0"], "--reps must be >= 1"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--strategy", "source_only"], "'source_only' trains nothing"),
])
def test_bench_train_refuses_odd_values_by_name(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", *args])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_train_refuses_a_backend_not_available_here(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    with pytest.raises(SystemExit) as exc:
        main(["bench", "train", "-c", str(exp), "--backends", "reference", "cuda"])
    assert exc.value.code == 2
    assert "--backends: 'cuda' is not available for cpu tensors" in capsys.readouterr().err


def test_bench_train_times_the_strategy_as_its_runs_train_it(tmp_path, capsys, monkeypatch):
    # A config whose policy reads value counts, or trains on a held-out slice: bench train
    # builds the model and the trainer as a run does (it needed the counts, and ignored the
    # held-out slice), and its one-epoch runs do not warn about their best epoch.
    import autoft_fast.train.runner as runner
    seen = []
    real = runner.Trainer.fit

    def fit(self, train, valid, **kw):
        seen.append((len(train), self.policy_data is not None))
        return real(self, train, valid, **kw)

    monkeypatch.setattr(runner.Trainer, "fit", fit)
    for autoft, held in (({"policy_input": "frozen+freq"}, False),
                         ({"policy_objective": "heldout", "field_policy": "network"}, True)):
        exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC}, autoft=autoft)
        seen.clear()
        assert main(["bench", "train", "-c", str(exp), "--backends", "cpu", "--reps", "1"]) == 0
        out = capsys.readouterr()
        assert "samples/s" in out.out
        # (the tiny config's one pre-training epoch may warn; the timed epochs do not)
        assert all("pretrain" in ln for ln in out.err.splitlines() if "best validation" in ln)
        assert seen and all(h == held for _, h in seen)
    with pytest.raises(SystemExit):
        main(["bench", "train", "-c", str(exp), "--backends", "cpu", "cpu"])
    assert "--backends names a backend twice" in capsys.readouterr().err


def test_too_many_threads_and_an_allocation_failure_are_one_line(tmp_path, capsys, monkeypatch):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["finetune", "-c", str(exp), "-s", "finetune_all", "--threads", "100000",
                 "--no-progress"]) == 2
    assert "--threads = 100000 is more than 8 threads per core" in _one_error_line(
        capsys.readouterr().err)
    import autoft_fast.train.runner as runner

    def no_memory(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: "
                           "can't allocate memory: you tried to allocate 144400000000 bytes.")

    monkeypatch.setattr(runner, "run_strategy", no_memory)
    assert main(["finetune", "-c", str(exp), "-s", "finetune_all", "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith("autoft-fast: error: out of memory:") and "144400000000" in line


def test_pretrain_logs_what_came_before_its_run_folder_and_prefixes_warnings(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["pretrain", "-c", str(exp), "--no-progress"]) == 0
    cached = list((tmp_path / "runs" / "cache" / "pretrained").glob("*.pt"))
    cached[0].write_bytes(b"garbage")
    capsys.readouterr()
    assert main(["pretrain", "-c", str(exp), "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "autoft-fast: warning: the cached pre-trained model" in captured.err
    log = (last_line_run_dir(captured.out) / "log.txt").read_text()
    # The data were loaded and the cache found damaged before the run folder existed.
    assert "data ready" in log and "is damaged" in log
    # A cache hit makes no folder; its early lines do not end up in the next run's log.
    assert main(["pretrain", "-c", str(exp), "--no-progress"]) == 0
    assert main(["finetune", "-c", str(exp), "-s", "finetune_all", "--no-progress"]) == 0
    log = (last_line_run_dir(capsys.readouterr().out) / "log.txt").read_text()
    assert log.count("data ready") == 1


def _new_rows(run_dir, path, n):
    """The first n rows of the run's data file, written to path (rows to predict)."""
    from autoft_fast.train.predict import load_run
    pd.read_csv(load_run(run_dir).info["data"]["files"][0], dtype=str).head(n).to_csv(
        path, index=False)
    return path


def test_predict_removes_the_partial_output_of_a_killed_predict(finetuned, tmp_path):
    exp, run_dir = finetuned
    from autoft_fast.train.predict import load_run
    run = load_run(run_dir)
    data = _new_rows(run_dir, tmp_path / "new.csv", 20)
    out = tmp_path / "preds.csv"
    # A kill -9 during a write leaves the temporary file; one written just now may be a
    # live predict of the same --out, and is left alone.
    old, live = tmp_path / ".preds.csv.k1ll3d.tmp", tmp_path / ".preds.csv.l1ve.tmp"
    other = tmp_path / ".other.csv.k1ll3d.tmp"
    for p in (old, live, other):
        p.write_text("row_id,probability\n1,0.5\n")
    stamp = time.time() - 3600
    os.utime(old, (stamp, stamp))
    os.utime(other, (stamp, stamp))
    assert run.predict_file(data, out) == 20
    assert not old.exists() and live.exists() and other.exists()
    assert len(pd.read_csv(out)) == 20


def test_predict_on_an_interrupted_finetune_points_at_resume(finetuned, tmp_path, capsys):
    exp, run_dir = finetuned
    data = _new_rows(run_dir, tmp_path / "new.csv", 5)
    # As a kill during the fine-tuning leaves it: the epoch checkpoint, no model yet.
    for name in ("model.json", "model.pt", "result.json"):
        (run_dir / "run" / name).unlink()
    (run_dir / "run" / "last.pt").write_bytes(b"checkpoint")
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), "--data", str(data),
                 "--out", str(tmp_path / "p.csv")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "holds no saved model" in line and "interrupted" in line
    assert f"--resume {str(run_dir)!r}" in line
    # Named by its model folder (run/): --resume still gets the run folder.
    assert main(["predict", "--run", str(run_dir / "run"), "--data", str(data),
                 "--out", str(tmp_path / "p.csv")]) == 2
    assert f"--resume {str(run_dir)!r}" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "p.csv").exists()


def test_predict_into_a_directory_does_not_suggest_force(finetuned, tmp_path, capsys):
    exp, run_dir = finetuned
    data = _new_rows(run_dir, tmp_path / "new.csv", 20)
    folder = tmp_path / "out_folder"
    folder.mkdir()
    capsys.readouterr()
    for extra in ([], ["--force"]):
        assert main(["predict", "--run", str(run_dir), "--data", str(data),
                     "--out", str(folder), *extra]) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert "is a directory" in line and "--force" not in line
    assert folder.is_dir() and not list(folder.iterdir())


def test_damaged_result_json_on_resume_names_the_file(finetuned, capsys):
    exp, run_dir = finetuned
    result = run_dir / "run" / "result.json"
    result.write_text(result.read_text()[:100])  # truncated
    capsys.readouterr()
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--resume",
                 str(run_dir), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(result) in line and "damaged" in line and "delete" in line


def test_damaged_run_json_on_resume_names_the_file(finetuned, capsys):
    exp, run_dir = finetuned
    meta = run_dir / "run.json"
    meta.write_text(meta.read_text()[:40])  # truncated
    capsys.readouterr()
    args = ["finetune", "--config", str(exp), "--strategy", "finetune_all", "--no-progress"]
    assert main([*args, "--resume", str(run_dir)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(meta) in line and "could not be read" in line
    # "latest" does not pass over it in silence
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert "warning: --resume: skipped" in err and str(run_dir) in err
    assert "no earlier finetune run" in _one_error_line(err)


def test_damaged_test_scores_name_the_file(tmp_path):
    from autoft_fast.train.report import load_test_scores
    path = tmp_path / "test_scores.npy"
    np_bytes = io.BytesIO()
    np.save(np_bytes, np.arange(50, dtype=np.float64))
    path.write_bytes(np_bytes.getvalue()[:100])  # truncated
    with pytest.raises(ValueError, match="could not be read from .*test_scores.npy"):
        load_test_scores({"strategy": "autoft", "seed": 1, "test_scores_path": str(path)})


@pytest.mark.parametrize("command, hint", [("generate", False), ("predict", False),
                                           ("finetune", True)])
def test_interrupted_message_offers_resume_only_where_it_exists(command, hint, tmp_path,
                                                                capsys, monkeypatch):
    import autoft_fast.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, command, interrupted)
    argv = {"generate": ["generate", "--out", str(tmp_path / "d")],
            "predict": ["predict", "--run", str(tmp_path), "--data", "x.csv", "--out", "y.csv"],
            "finetune": ["finetune", "--strategy", "autoft"]}[command]
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "autoft-fast: interrupted" in err
    assert ("--resume" in err) == hint


def test_generate_into_a_read_only_folder_names_out(tmp_path, capsys, monkeypatch):
    import autoft_fast.train.runner as runner
    out = tmp_path / "ro"

    def read_only(cfg, out_dir):
        raise OSError(errno.EROFS, "Read-only file system", str(out_dir / "synthetic.csv.tmp"))

    monkeypatch.setattr(runner, "generate_data", read_only)
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    assert main(["generate", "--config", str(exp), "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"--out {str(out)!r} cannot be written (Read-only file system)" in line
    assert ".tmp" not in line


def test_a_source_domain_of_one_label_is_logged_as_undefined_not_nan(tmp_path, capsys):
    exp = tiny_experiment(tmp_path, {"synthetic": TINY_SYNTHETIC})
    out = tmp_path / "data"
    assert main(["generate", "--config", str(exp), "--out", str(out)]) == 0
    doc = yaml.safe_load((out / "dataset.yaml").read_text())
    domain, label = doc["data"]["domain"], doc["data"]["label"]
    frame = pd.read_csv(out / "synthetic.csv", dtype=str)
    first = domain["source"][0]
    frame.loc[frame[domain["column"]] == first, label] = "0"  # that domain never clicks
    frame.to_csv(out / "synthetic.csv", index=False)
    exp = tiny_experiment(tmp_path, {"data": str(out / "dataset.yaml")})
    capsys.readouterr()
    assert main(["pretrain", "--config", str(exp), "--no-progress"]) == 0
    run_dir = last_line_run_dir(capsys.readouterr().out)
    log_text = (run_dir / "log.txt").read_text()
    assert f"source valid {first}: AUC undefined (its rows hold one label)" in log_text
    assert "AUC nan" not in log_text
    info = json.loads((run_dir / "pretrain.json").read_text(), parse_constant=lambda c: 1 / 0)
    assert info["valid_per_domain"][first]["auc"] is None


def test_a_finished_run_without_its_test_scores_is_named_on_resume(finetuned, tmp_path, capsys):
    # The record's absolute test_scores_path was kept when the folder's own file was missing,
    # so a copied run folder reported the original folder's scores.
    import shutil
    exp, run_dir = finetuned
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    (copy / "run" / "test_scores.npy").unlink()
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--resume",
                 str(copy), "--no-progress"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "lacks its test_scores.npy" in line and "result.json" in line and "copy" in line


def test_a_resume_clears_what_a_kill_left_beside_a_finished_run(finetuned, capsys):
    exp, run_dir = finetuned
    run = run_dir / "run"
    (run / "last.pt").write_bytes(b"a checkpoint the kill kept")    # killed before its delete
    (run / ".result.json.abc123.tmp").write_text("{")               # killed inside the write
    assert main(["finetune", "--config", str(exp), "--strategy", "finetune_all", "--resume",
                 str(run_dir), "--no-progress"]) == 0
    assert not (run / "last.pt").exists() and not list(run.glob(".result.json.*.tmp"))
    assert (run / "result.json").is_file()


def test_generate_with_an_empty_out_is_refused(tmp_path, capsys, monkeypatch):
    # Path('') is '.': the data set went into the working directory.
    monkeypatch.chdir(tmp_path)
    assert main(["generate", "--out", ""]) == 2
    assert "--out is empty" in _one_error_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []
