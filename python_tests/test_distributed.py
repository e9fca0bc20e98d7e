"""Data-parallel training with two gloo processes on the CPU equals one process on the same
global batches: weights after training (dense, sparse and fused tables), resume, the CLI's
test AUC, and files written by rank 0 only."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from autoft_fast.train import distributed

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_env(rank: int, size: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    return env


def _run_ranks(args: list[str], size: int = 2, timeout: float = 120) -> list:
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *args], env=_rank_env(r, size, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(size)]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append((p.returncode, out, err))
    return outs


@pytest.fixture(scope="module")
def two_rank_weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    results = _run_ranks([str(HERE / "dist_worker.py"), str(out)])
    for rc, _, err in results:
        assert rc == 0, err[-3000:]
    return out


@pytest.mark.parametrize("mode", [*dist_worker.MODES, "resume", "empty_shard"])
def test_two_ranks_equal_one_process(two_rank_weights, tmp_path, mode):
    torch.set_num_threads(1)
    one = dist_worker.train(mode, tmp_path)
    r0 = torch.load(two_rank_weights / f"{mode}-rank0.pt")
    r1 = torch.load(two_rank_weights / f"{mode}-rank1.pt")
    assert set(one) == set(r0) == set(r1)
    torch.manual_seed(0)
    init = dist_worker.TinyGated(norm=False,
                                 **dist_worker.MODES.get(mode, {})).state_dict()
    for k in ("head.weight", "policy.weight", "norm.running_mean"):
        if k not in init:
            continue
        assert not torch.allclose(one[k], init[k]), k  # training moved it: not vacuous
    assert not torch.equal(one["emb.tuned_weight"], one["emb.frozen_weight"])
    # Float rounding only (the ranks sum their shares in another order; Adam's step divides
    # by the root of tiny second moments, which magnifies it to ~1e-5 on a few weights).
    for k in one:
        assert torch.equal(r0[k], r1[k]), f"{mode}: {k} differs between the ranks"
        torch.testing.assert_close(r0[k].double(), one[k].double(), rtol=1e-4, atol=5e-5,
                                   msg=lambda m: f"{mode}: {k}: {m}")


def test_batch_norm_trains_when_a_last_batch_would_leave_a_rank_one_row(two_rank_weights):
    # Each rank normalises over its own shard, so only the ranks' agreement is checked here.
    r0 = torch.load(two_rank_weights / "batch_norm-rank0.pt")
    r1 = torch.load(two_rank_weights / "batch_norm-rank1.pt")
    assert set(r0) == set(r1) and "norm.running_mean" in r0
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    assert not torch.equal(r0["emb.tuned_weight"], r0["emb.frozen_weight"])


def test_checkpoints_written_by_rank0_with_every_rank_state(two_rank_weights):
    ck = torch.load(two_rank_weights / "resume-last.pt", weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng_ranks"]) == 2
    # Rank 1's torch generator runs its own stream (its Gumbel noise is its own).
    assert not torch.equal(ck["rng_ranks"][0]["torch"], ck["rng_ranks"][1]["torch"])
    with pytest.raises(ValueError, match=r"written by 2 process\(es\).*WORLD_SIZE = 1\), or delete it"):
        distributed.check_resume(ck, "resume-last.pt")


def test_sharded_batches_cover_each_global_batch_once():
    from autoft_fast.data import iterate_batches
    data = dist_worker.tiny_data()
    shards = []
    for r in range(3):
        it = distributed.ShardedBatches(iterate_batches, r, 3)
        batches = list(it(data, 32, True, torch.Generator().manual_seed(1)))
        shards.append(batches)
    whole = list(iterate_batches(data, 32, True, torch.Generator().manual_seed(1)))
    assert [len(b) for b in shards[0]] == [10, 10, 2]
    assert [len(b) for b in shards[2]] == [11, 11, 3]
    for step, batch in enumerate(whole):
        union = torch.cat([s[step].sparse for s in shards])
        assert torch.equal(union, batch.sparse)
    it = distributed.ShardedBatches(iterate_batches, 1, 3)
    assert sum(len(b) for b in it(data, 32, False, None)) == len(data)  # evaluation: all rows
    with pytest.raises(ValueError, match="rank = 3"):
        distributed.ShardedBatches(iterate_batches, 3, 3)


def test_world_from_environment(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.world() == distributed.World(1, 2, 0)
    assert not distributed.is_main_process() and distributed.is_distributed()
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match="RANK = 2 and WORLD_SIZE = 2"):
        distributed.world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK = 'x'"):
        distributed.world()


TINY = {
    "name": "tiny",
    "synthetic": {"seed": 5, "n_source_rows": 3000, "n_target_rows": 1500,
                  "fields": [{"name": "user_id", "cardinality": 60, "effect": "stable"},
                             {"name": "item_id", "cardinality": 40, "effect": "shifted"},
                             {"name": "device", "cardinality": 4}]},
    "model": {"name": "dnn", "embedding_dim": 4, "hidden_units": [8]},
    "pretrain": {"epochs": 1, "batch_size": 256},
    "finetune": {"epochs": 2, "batch_size": 256},
    "autoft": {"backend": "reference"},
    "seeds": [0],
}


def _files(run_dir: Path) -> set:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


def test_torchrun_cli_finetune_matches_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m autoft_fast.cli finetune` as a user runs it."""
    from autoft_fast.cli import main
    cfg = dict(TINY, cache_dir=str(tmp_path / "cache"))
    one_exp, two_exp = tmp_path / "one.yaml", tmp_path / "two.yaml"
    one_exp.write_text(yaml.safe_dump(dict(cfg, run_dir=str(tmp_path / "one"))))
    two_exp.write_text(yaml.safe_dump(dict(cfg, run_dir=str(tmp_path / "two"))))
    torch.set_num_threads(1)
    assert main(["finetune", "-c", str(one_exp), "-s", "finetune_all", "--no-progress"]) == 0
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "autoft_fast.cli",
         "finetune", "-c", str(two_exp), "-s", "finetune_all", "--no-progress"],
        env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # One summary on stdout (rank 0's), one run directory, the same files as one process.
    assert proc.stdout.count("test AUC") == 1, proc.stdout
    (one_dir,), (two_dir,) = list((tmp_path / "one").iterdir()), list((tmp_path / "two").iterdir())
    assert _files(two_dir) == _files(one_dir)
    log = (two_dir / "log.txt").read_text()
    assert log.count("data ready") == 1, log  # rank 0's lines only
    a = json.loads((one_dir / "run" / "result.json").read_text())
    b = json.loads((two_dir / "run" / "result.json").read_text())
    assert b["epochs_run"] == a["epochs_run"] == 2
    assert abs(a["auc"] - b["auc"]) < 1e-4, (a["auc"], b["auc"])
    assert abs(a["history"][-1]["train_loss"] - b["history"][-1]["train_loss"]) < 1e-4


_BROADCAST_WORKER = """
import os, sys, torch
import torch.distributed as dist
from autoft_fast.train import distributed
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(100 + rank)  # each rank's own initialisation, as after an earlier fit
model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
model.register_buffer("flags", torch.rand(5) > 0.5)
model.register_buffer("low", torch.randn(2, 3).to(torch.bfloat16))
distributed.DataParallel.create(model, torch.device("cpu"))
torch.save(model.state_dict(), os.path.join(sys.argv[1], f"rank{rank}.pt"))
dist.destroy_process_group()
"""


def test_data_parallel_starts_every_rank_from_rank0s_weights(tmp_path):
    # A model built after an earlier fit (the frequency rule's retrain, the cross-fit halves)
    # was initialised from each rank's own stream; the ranks then trained different models.
    script = tmp_path / "worker.py"
    script.write_text(_BROADCAST_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.manual_seed(100)  # rank 0's own initialisation is what both hold
    assert torch.equal(a["0.weight"], torch.nn.Linear(3, 4).weight.detach())


def test_torchrun_frequency_rule_with_sampled_evaluation_gates_finishes(tmp_path):
    # Each rank scored the thresholds on its own gate noise and could pick another one: one
    # rank retrained (collectives) while the other did not, and the job hung.
    cfg = dict(TINY, cache_dir=str(tmp_path / "cache"), run_dir=str(tmp_path / "runs"),
               model={"name": "dnn", "embedding_dim": 4, "hidden_units": [16]},
               pretrain={"epochs": 3, "batch_size": 256, "lr": 0.01, "seed": 0},
               finetune={"epochs": 3, "patience": 3, "batch_size": 256, "lr": 0.005},
               autoft={"backend": "reference", "field_policy": "frequency",
                       "frequency_thresholds": [1, 2, 3], "frequency_keep_p": 1.0,
                       "eval_gates": "sample"})
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    for seed in ("0", "2"):
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m",
             "autoft_fast.cli", "finetune", "-c", str(exp), "-s", "autoft", "--seed", seed,
             "--threads", "1", "--no-progress"],
            env=env, capture_output=True, text=True, timeout=150)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("test AUC") == 1


def test_predict_under_torchrun_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    # Every rank scored the whole file; rank 1 then failed on "--out exists".
    from autoft_fast.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert main(["predict", "--run", str(tmp_path), "--data", str(tmp_path / "x.csv"),
                 "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert "predict runs in one process" in err and "Traceback" not in err


def test_a_user_error_in_a_rank0_step_is_one_line_on_every_rank(tmp_path):
    # A bad --run-dir (here a file) failed on rank 0 inside a rank-0-only step, and every
    # rank printed a RuntimeError traceback instead of the usual one-line error.
    (tmp_path / "taken").write_text("a file, not a folder")
    exp = tmp_path / "exp.yaml"
    exp.write_text(yaml.safe_dump(dict(TINY, cache_dir=str(tmp_path / "cache"))))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m",
         "autoft_fast.cli", "finetune", "-c", str(exp), "-s", "finetune_all",
         "--run-dir", str(tmp_path / "taken"), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if "autoft-fast: error:" in ln]
    # Each rank that gets to print says the one line (torchrun may stop the other rank
    # first, once one has exited).
    assert lines and all("cannot create a run directory" in ln for ln in lines), \
        proc.stderr[-3000:]
    # torchrun's own launcher reports the failed children with its traceback; none of ours.
    assert "rank 0 failed" not in proc.stderr
    assert not any('File "' in ln and "autoft_fast" in ln for ln in proc.stderr.splitlines())
