"""Preprocessing throughput and peak memory at two file sizes.

Builds a CSV of ``--rows`` rows and one of twice as many by repeating the body of the demo's
synthetic CSV (``autoft-fast generate``), then runs ``prepare_data`` on each in a child
process of its own, so that each peak RSS (``ru_maxrss``) is that run's alone. Prints, per
file, the rows, the seconds, file rows per second and the peak RSS, then the 2x / 1x peak RSS
ratio (the target is below 1.2) and the encoded output's size. The CPU seconds (user + system)
of each run are printed too: on a busy machine they change less than the wall time.

``--pythonpath DIR`` runs the children against another checkout's ``autoft_fast`` (e.g. an
older commit unpacked with ``git archive``) and ``--repeat`` alternates the two, so that a
before / after comparison on a shared machine is measured in one interleaved run.

Example::

    OMP_NUM_THREADS=1 python benchmarks/bench_prep.py --rows 6000000 --work /tmp/prepbench
    OMP_NUM_THREADS=1 python benchmarks/bench_prep.py --rows 6000000 --pythonpath /tmp/old --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
import autoft_fast
from autoft_fast.data import load_data_config, prepare_data
cfg = load_data_config(Path(sys.argv[1]))
t0 = time.perf_counter()
r0 = resource.getrusage(resource.RUSAGE_SELF)
bundle = prepare_data(cfg, cache_dir=Path(sys.argv[2]))
seconds = time.perf_counter() - t0
r1 = resource.getrusage(resource.RUSAGE_SELF)
cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
rows = sum(int(t.label.shape[0]) for t in bundle.splits.values())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "rows_kept": rows,
                  "rows_read": bundle.stats["rows_read"], "peak_rss": peak,
                  "package": str(Path(autoft_fast.__file__).resolve().parent)}))
"""


def build_files(work: Path, rows: int) -> dict[str, Path]:
    """The demo CSV (generated once) and its body repeated to ``rows`` and ``2 * rows`` rows,
    each with a ``dataset.yaml`` beside it; existing files of the right size are reused."""
    demo = work / "demo"
    if not (demo / "synthetic.csv").is_file():
        subprocess.run([sys.executable, "-m", "autoft_fast.cli", "generate", "--out", str(demo)],
                       check=True, cwd=REPO)
    lines = (demo / "synthetic.csv").read_bytes().splitlines(keepends=True)
    header, body = lines[0], b"".join(lines[1:])
    body_rows = len(lines) - 1
    out = {}
    for tag, n in (("1x", rows), ("2x", 2 * rows)):
        folder = work / f"rows{n}"
        csv = folder / "synthetic.csv"
        folder.mkdir(parents=True, exist_ok=True)
        copies, rest = divmod(n, body_rows)
        if not csv.is_file() or csv.stat().st_size != len(header) + copies * len(body) + len(b"".join(lines[1:1 + rest])):
            with open(csv, "wb") as f:
                f.write(header)
                for _ in range(copies):
                    f.write(body)
                f.write(b"".join(lines[1:1 + rest]))
        shutil.copy(demo / "dataset.yaml", folder / "dataset.yaml")
        out[tag] = folder / "dataset.yaml"
    return out


def measure(yaml_path: Path, pythonpath: str | None) -> dict:
    """One ``prepare_data`` run in a fresh child process (no cache hit: a new cache folder)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(REPO), env.get("PYTHONPATH")) if p)
    cache = Path(tempfile.mkdtemp(prefix="bench-prep-", dir=yaml_path.parent))
    try:
        res = subprocess.run([sys.executable, "-c", CHILD, str(yaml_path), str(cache)],
                             env=env, check=True, capture_output=True, text=True)
        out = json.loads(res.stdout.strip().splitlines()[-1])
        if pythonpath is not None and Path(out["package"]) != Path(pythonpath).resolve() / "autoft_fast":
            raise SystemExit(f"bench_prep.py: --pythonpath {pythonpath!r}: the child imported "
                             f"autoft_fast from {out['package']}, not from that folder")
        out["output_bytes"] = sum(p.stat().st_size for p in cache.rglob("*.npy"))
        return out
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="example:\n  OMP_NUM_THREADS=1 python benchmarks/bench_prep.py "
                                        "--rows 6000000 --work /tmp/prepbench")
    ap.add_argument("--rows", type=int, default=6_000_000, help="rows of the 1x file (default 6M)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "autoft-bench-prep",
                    help="folder for the generated CSVs (kept for reruns)")
    ap.add_argument("--pythonpath", default=None,
                    help="another checkout's package folder to compare against (run interleaved)")
    ap.add_argument("--repeat", type=int, default=1, help="measurements per file and version")
    args = ap.parse_args(argv)
    if args.rows < 1:
        ap.error(f"--rows must be positive, got {args.rows}")
    if args.repeat < 1:
        ap.error(f"--repeat must be at least 1, got {args.repeat}")
    if args.pythonpath is not None:
        other = Path(args.pythonpath).resolve()
        if not (other / "autoft_fast" / "__init__.py").is_file():
            ap.error(f"--pythonpath {args.pythonpath!r} holds no autoft_fast package (give the "
                     "folder that contains autoft_fast/, e.g. an unpacked checkout)")
        if other == REPO:
            ap.error(f"--pythonpath {args.pythonpath!r} is this checkout: it would be compared "
                     "with itself")
    files = build_files(args.work, args.rows)
    versions = [("this", None)] + ([("other", args.pythonpath)] if args.pythonpath else [])
    best: dict = {}
    print(f"{'version':8} {'file':4} {'rows read':>11} {'seconds':>8} {'rows/s':>9} {'CPU s':>7} "
          f"{'peak RSS':>9} {'output':>8}")
    for _ in range(args.repeat):
        for tag, yaml_path in files.items():
            for name, pp in versions:
                m = measure(yaml_path, pp)
                rate = m["rows_read"] / m["seconds"]
                print(f"{name:8} {tag:4} {m['rows_read']:>11,} {m['seconds']:>8.1f} {rate / 1e3:>8.0f}k "
                      f"{m['cpu_seconds']:>7.1f} "
                      f"{m['peak_rss'] / 2**30:>7.2f}GB {m['output_bytes'] / 2**30:>6.2f}GB", flush=True)
                key = (name, tag)
                if key not in best or m["seconds"] < best[key]["seconds"]:
                    best[key] = m
    for name, _ in versions:
        r1, r2 = best[(name, "1x")], best[(name, "2x")]
        print(f"{name}: best rows/s 1x {r1['rows_read'] / r1['seconds'] / 1e3:.0f}k, "
              f"2x {r2['rows_read'] / r2['seconds'] / 1e3:.0f}k; peak RSS 2x / 1x = "
              f"{r2['peak_rss'] / r1['peak_rss']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
