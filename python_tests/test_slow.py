"""Long cases, not run by default nor by CI (pyproject's addopts deselects `slow`).

Run them with: pytest -m slow python_tests
"""

import csv
from pathlib import Path

import pytest
import torch

import autoft_fast
from autoft_fast.cli import main
from op_helpers import assert_matches, make_inputs, oracle, run

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_cpu_backend_at_the_benchmark_shape(sparse):
    """The benchmark's own size: B=4096 x F=24 lookups into a 1M-row table, D=16."""
    if "cpu" not in autoft_fast.available_backends("cpu"):
        pytest.fail("the cpu backend is not built")
    gen = torch.Generator().manual_seed(11)
    inp = make_inputs((4096, 24), 1_000_000, 16, gen=gen, seed=77)
    got = run("cpu", inp, sparse=sparse)
    want = oracle(inp, sparse=sparse)
    assert_matches(got, want, torch.float32, dim=16)


def test_the_demo_end_to_end(tmp_path):
    """The README's main job, in process: all nine strategies over two seeds."""
    assert main(["demo", "--run-dir", str(tmp_path), "--no-progress"]) == 0
    run_dir = next(Path(tmp_path).glob("demo-*"))
    with open(run_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    from autoft_fast.models import STRATEGIES
    assert [r["strategy"] for r in rows] == list(STRATEGIES)
    for name in ("auc.png", "policy_fields.png", "policy_layers.png", "results.md"):
        assert (run_dir / name).stat().st_size > 0
