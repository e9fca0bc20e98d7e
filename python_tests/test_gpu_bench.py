"""benchmarks/gpu_check.sh and benchmarks/gpu_bench.py work where they can: their GPU part runs on
a GPU machine only, so here the shell script must parse and skip cleanly, and the benchmark must
plan, parse its shapes and run its code paths (lookups and bags) on tiny CPU shapes."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gpu_bench  # noqa: E402


def test_shapes_parse_and_bad_ones_name_themselves():
    assert gpu_bench.parse_bag_shape("4096:4:16:1000:20") == (4096, 4, 16, 1000, 20)
    with pytest.raises(argparse.ArgumentTypeError, match="bag shape '1:2:3' is not B:F:D:V:LEN"):
        gpu_bench.parse_bag_shape("1:2:3")
    with pytest.raises(argparse.ArgumentTypeError, match="is not B:F:D:V:LEN"):
        gpu_bench.parse_bag_shape("1:2:3:4:0")


def test_dry_run_plans_the_bag_shapes(capsys):
    assert gpu_bench.main(["--dry-run", "--bag-shapes", "8:2:4:100:3"]) == 0
    out = capsys.readouterr().out
    assert "plan: bags B=8 F=2 D=4 V=100 LEN=3: 16 bags" in out


def test_cpu_smoke_runs_the_lookup_and_bag_parts(capsys):
    rc = gpu_bench.main(["--device", "cpu", "--backends", "cpu", "--shapes", "16:2:8:100",
                         "--bag-shapes", "16:2:8:100:3", "--no-compile", "--target-s", "0.001",
                         "--copy-mb", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "FAIL" not in out and out.count("PASS cpu") == 8  # 4 lookup and 4 bag checks
    assert "## bags: B=16, F=2 (32 bags" in out
    for provider in ("eager embedding_bag (dense)", "cpu (sparse)", "reference (dense)"):
        assert f"| {provider} |" in out


def test_random_bags_have_consistent_offsets():
    values, offsets = gpu_bench.random_bags(50, 7, 4, "cpu", torch.Generator().manual_seed(0))
    assert offsets[0] == 0 and offsets[-1] == values.shape[0]
    assert bool((offsets[1:] >= offsets[:-1]).all()) and int(values.max()) < 7


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_parses_and_skips_cleanly_without_a_gpu():
    script = os.path.join(ROOT, "benchmarks", "gpu_check.sh")
    subprocess.run(["bash", "-n", script], check=True)
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run its GPU part")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    res = subprocess.run(["bash", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no GPU here: the build, the benchmark and the GPU tests are skipped" in res.stdout
    assert "plan: bags B=" in res.stdout


def test_gpu_check_scripts_python_snippets_run_here():
    # The script's inline Python (environment report, extension report) runs on a GPU
    # machine only after the build; an import it names wrongly would fail only there.
    import re
    text = open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")).read()
    snippets = re.findall(r"<<'EOF'[^\n]*\n(.*?)\nEOF\n", text, flags=re.S)
    assert len(snippets) >= 2
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for code in snippets:
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, timeout=120)
        assert res.returncode == 0, code + "\n" + res.stdout + res.stderr
