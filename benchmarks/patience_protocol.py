"""The protocol that picks the defaults of ``finetune.patience_steps`` and ``cap_steps``, on
validation AUC only.

Early stopping counts its patience in epochs (``finetune.patience``, 3) and its cap in epochs
(``finetune.epochs``, 50). A small target's epoch is a few optimizer steps (2,000 training rows
at the default batch of 1,024: two steps), so three epochs without a better validation score
can end fine-tuning within its first plateau, after a dozen steps, and 50 epochs are 100 steps.
``patience_steps`` adds a second condition to stopping (that many steps without improvement
too); ``cap_steps`` raises the epoch cap to allow at least that many steps. A candidate is a
pair ``patience_steps/cap_steps``.

For each synthetic setting (target sizes from 2,000 to 15,000 training rows; generator seed
and shift strength differ) the base model is pre-trained once; then every strategy that
trains is fine-tuned with each candidate value for every seed, with the library's defaults
otherwise. The table reports, per setting and candidate, the mean best validation AUC over
strategies and seeds, the mean epochs run, and how many runs had their best epoch at the cap.

Rule (written before the run): more patience or a higher cap never lowers a run's best
validation AUC (training is deterministic, so a longer run repeats the shorter one's epochs and
adds more), so the rule bounds the cost instead: the candidates are listed in increasing order
of both values, and the default is the first whose mean best validation AUC over all settings
is within 0.0005 of the last (largest) candidate's. Test AUC is
printed in a separate column only so that the record shows it (it also shows whether the
extra epochs that validation picks carry over); it plays no part in the choice.

Usage:
    python benchmarks/patience_protocol.py [--seeds 3] [--candidates 0/0,50/500,...]
        [--strategies finetune_all,...] [--out runs/patience] [--threads 1] [--tiny]

``--tiny`` shrinks the data and the epochs to check that the script runs (its numbers decide
nothing).

Example:
    python benchmarks/patience_protocol.py --seeds 3 --threads 1
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autoft_fast.config import parse_config
from autoft_fast.train.runner import load_data, pretrain, run_strategy

# Target sizes the real-data tasks have (1,000 to 4,000 training rows) and larger; 20 % of
# each target is its validation split, 30 % its test split.
SETTINGS = [
    {"seed": 11, "shift_corr": 0.6, "n_target_rows": 4000, "target_valid": 0.2},
    {"seed": 7, "shift_corr": 0.0, "n_target_rows": 8000, "target_valid": 0.2},
    {"seed": 3, "n_target_rows": 15000, "target_valid": 0.2},
    {"seed": 2024, "target_valid": 0.2},
]
STRATEGIES = ("target_only", "finetune_all", "freeze_dnn", "l2sp", "autoft")
CANDIDATES = ((0, 0), (50, 500), (100, 1000), (200, 2000))
MARGIN = 0.0005
TINY = {"n_source_rows": 3000, "n_target_rows": 1500}


def pick(means: dict) -> tuple:
    """The rule: the first candidate (in the given increasing order) within MARGIN of the
    last candidate's mean.

    Example::

        >>> pick({(0, 0): 0.600, (100, 1000): 0.6080, (200, 2000): 0.6083})
        (100, 1000)
    """
    top = means[list(means)[-1]]
    return next(c for c, m in means.items() if m >= top - MARGIN)


def parse_candidates(text: str) -> list:
    """``"0/0,100/1000"`` -> [(0, 0), (100, 1000)], checked to increase in both values.

    Example::

        >>> parse_candidates("0/0,50/500")
        [(0, 0), (50, 500)]
    """
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        a, sep, b = part.partition("/")
        if not sep or not a.strip().isdigit() or not b.strip().isdigit():
            raise ValueError(f"candidate {part!r} is not patience_steps/cap_steps (two integers "
                             ">= 0, e.g. 100/1000)")
        out.append((int(a), int(b)))
    if not out:
        raise ValueError("no candidate given")
    if any(x[0] > y[0] or x[1] > y[1] or x == y for x, y in zip(out, out[1:])):
        raise ValueError(f"candidates {text!r} must increase (neither value falling) in order")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--candidates", default=",".join(f"{a}/{b}" for a, b in CANDIDATES),
                    help="patience_steps/cap_steps pairs in increasing order")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--tiny", action="store_true", help="a smoke run: tiny data, 3 epochs")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    try:
        cands = parse_candidates(args.candidates)
    except ValueError as e:
        ap.error(f"--candidates: {e}")
    strategies = [s for s in args.strategies.split(",") if s]
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad or not strategies:
        ap.error(f"--strategies: {bad or 'none given'} (known: {', '.join(STRATEGIES)})")
    if args.seeds < 1 or args.threads < 1:
        ap.error("--seeds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="autoft-patience-"))
    rows = []
    t0 = time.perf_counter()
    for si, syn in enumerate(SETTINGS):
        syn = {**syn, **TINY} if args.tiny else dict(syn)
        raw = {"name": f"patience{si}", "synthetic": syn, "model": {"name": "deepfm"},
               "run_dir": str(out), "cache_dir": str(out / "cache"), "device": "cpu"}
        if args.tiny:
            raw["pretrain"], raw["finetune"] = {"epochs": 1}, {"epochs": 3}
        cfg = parse_config(raw, out)
        bundle = load_data(cfg)
        state, _ = pretrain(cfg, bundle, progress=False)
        n_train = len(bundle.splits["target_train"])
        for c in cands:
            ft = dataclasses.replace(cfg.finetune, patience_steps=c[0], cap_steps=c[1])
            ccfg = dataclasses.replace(cfg, finetune=ft)
            recs = [run_strategy(ccfg, bundle, state, s, seed,
                                 out / f"s{si}" / f"p{c[0]}-c{c[1]}-{s}-{seed}", progress=False)
                    for s in strategies for seed in range(args.seeds)]
            row = {"setting": si, "train_rows": n_train, "candidate": f"{c[0]}/{c[1]}",
                   "valid": float(np.mean([r["valid_best"] for r in recs])),
                   "test": float(np.mean([r["auc"] for r in recs])),
                   "epochs": float(np.mean([r["epochs_run"] for r in recs])),
                   "at_cap": sum(bool(r.get("best_at_cap")) for r in recs), "runs": len(recs),
                   "seconds": float(np.mean([r["train_seconds"] for r in recs])),
                   "per_strategy": {s: float(np.mean([r["valid_best"] for r in recs
                                                      if r["strategy"] == s]))
                                    for s in strategies}}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nsettings {SETTINGS}, strategies {strategies}, {args.seeds} seeds, "
          f"{time.perf_counter() - t0:.0f} s\n")
    print("| setting (training rows) | patience_steps/cap_steps | valid AUC | epochs run | "
          "best at cap | "
          "train s per run | test AUC (not used) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setting']} ({r['train_rows']:,}) | {r['candidate']} | {r['valid']:.4f} | "
              f"{r['epochs']:.1f} | {r['at_cap']}/{r['runs']} | {r['seconds']:.1f} | "
              f"{r['test']:.4f} |")
    def mean(key, c):
        return float(np.mean([r[key] for r in rows if r["candidate"] == f"{c[0]}/{c[1]}"]))

    means = {c: mean("valid", c) for c in cands}
    print("\n| patience_steps/cap_steps | mean valid AUC over settings | mean epochs run | "
          "mean test AUC (not used) |")
    print("| --- | --- | --- | --- |")
    for c in cands:
        print(f"| {c[0]}/{c[1]} | {means[c]:.4f} | {mean('epochs', c):.1f} | "
              f"{mean('test', c):.4f} |")
    c = pick(means)
    print(f"\nchosen by the rule (the first within {MARGIN} of the last candidate's): "
          f"patience_steps {c[0]}, cap_steps {c[1]}")


if __name__ == "__main__":
    main()
