"""The protocol that picks the AutoFT policy-learning defaults, on validation metrics only.

For each synthetic setting (generator seed and shift strength differ), the base model is
pre-trained once; then the autoft strategy is fine-tuned with each candidate option set for
every seed, and finetune_all beside it for reference. The table reports, per setting and
candidate, the mean best validation AUC over seeds (what early stopping selected on), the gain
over finetune_all on validation, and how per-instance the learned field policy is on the
validation rows (the share of fields whose tuned fraction lies in [0.1, 0.9]).

Rule (written before the run): the default is the candidate with the highest validation AUC
averaged over all settings; a candidate within 0.0005 of the best that is simpler (fewer
options switched on) is preferred. Test metrics are printed in a separate column only so that
the record shows them; they play no part in the choice.

Scoring (``--score``). ``best-valid`` (the first eight runs): the score is the best validation
AUC, the very number early stopping and a candidate's own choices on the validation rows (the
frequency threshold and its keep test) selected, so such a candidate's score is optimistic by
construction. ``split-valid``: the validation split is cut in two halves at random (seeded per
setting); the runs see only the first (early stopping, every choice made on validation rows)
and the score is the AUC of the returned model on the second, which no run has seen. The test
split is then not read at all (no test column).

Usage:
    python benchmarks/policy_protocol.py [--seeds 3] [--out runs/protocol] [--settings 2]
        [--score split-valid]

Example:
    python benchmarks/policy_protocol.py --seeds 3 --settings 2 --threads 1
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from autoft_fast.config import AutoFTConfig, parse_config
from autoft_fast.train.runner import load_data, pretrain, run_strategy

# Settings of the generator: the demo's default world and two others with another seed and
# another shift strength of the shifted fields.
SETTINGS = [
    {"seed": 2024, "target_valid": 0.2},
    {"seed": 7, "shift_corr": 0.0, "target_valid": 0.2},
    {"seed": 11, "shift_corr": 0.6, "target_valid": 0.2},
    "demo",  # the demo's world (22 fields, 500k source rows), its first target
    # A small target (4,000 training rows), the size of the real-data transfer tasks
    # fine-tuning over-fits fastest on.
    {"seed": 3, "n_target_rows": 8000, "target_valid": 0.2},
]
# The validation split is 20 % of the target (6,000 rows): with 10 % of a 15,000-row target a
# first run of this protocol saw validation and test AUC move in opposite directions.

# Candidate option sets (names are for the table; complexity = options switched on).
CANDIDATES = {
    "train": {},
    "train+freq": {"policy_input": "frozen+freq"},
    # Warm-up with 50/50 gates trains the tuned copy under random mixing with the frozen one
    # (a regulariser in the spirit of Mixout, Lee et al. 2020) before the policy chooses.
    "train+warmup1": {"policy_warmup": 1},
    "train+warmup2": {"policy_warmup": 2},
    "train+warmup4": {"policy_warmup": 4},
    "heldout": {"policy_objective": "heldout"},
    "heldout+freq": {"policy_objective": "heldout", "policy_input": "frozen+freq"},
    "heldout+refit": {"policy_objective": "heldout", "policy_refit": "continue"},
    "heldout+freq+refit": {"policy_objective": "heldout", "policy_input": "frozen+freq",
                           "policy_refit": "continue"},
    # Search then retrain (DARTS): the policy found on the held-out slice is fixed and the
    # model is trained again from the pre-trained start on all target training rows.
    "heldout+retrain": {"policy_objective": "heldout", "policy_refit": "retrain"},
    "heldout+freq+retrain": {"policy_objective": "heldout", "policy_input": "frozen+freq",
                             "policy_refit": "retrain"},
    # A prior toward the tuned path: the model starts as finetune_all with a few frozen draws
    # (Mixout-like) and a gate turns frozen only where the training loss says so.
    "train+init0.8": {"policy_init_tuned": 0.8},
    "train+init0.95": {"policy_init_tuned": 0.95},
    # A budget makes the policy choose where the tuned path matters; the frequency input
    # tells it which values the target saw often.
    "train+freq+budget0.8": {"policy_input": "frozen+freq", "tuned_budget": 0.8},
    # The premise as a rule for the field gates: frozen where the value is rare in the target
    # training rows, the threshold chosen on validation; the layer gates as in "train".
    "frequency": {"field_policy": "frequency"},
    # The same rule with k chosen and tested on the target training rows, held out in turn
    # (two k = 0 models on half the rows each), instead of on the validation split.
    "frequency+crossfit": {"field_policy": "frequency", "frequency_select": "crossfit"},
    # The policy network's hidden layer (default 64 wide) narrower: its first layer, over every
    # field's frozen vector, is about a sixth of an autoft training step at V = 4M.
    "frequency+policy32": {"field_policy": "frequency", "policy_hidden_units": [32]},
    "frequency+policy16": {"field_policy": "frequency", "policy_hidden_units": [16]},
}
# The settings that switch nothing on; every candidate states them, so that the table does
# not depend on the defaults.
NEUTRAL = {"policy_warmup": 0, "policy_init_tuned": 0.5, "field_policy": "network",
           "frequency_select": "validation", "policy_hidden_units": [64]}
for _c in CANDIDATES.values():
    for _k, _v in NEUTRAL.items():
        _c.setdefault(_k, _v)


def setting_synthetic(setting) -> dict:
    """The synthetic: section of a setting ("demo": the demo's, with one target and the
    larger validation split of the others)."""
    if setting == "demo":
        from autoft_fast.config import load_config
        syn = load_config(None).synthetic.to_dict()
        return {**syn, "extra_targets": [], "target_valid": 0.2}
    return dict(setting)


def split_validation(bundle, setting: int):
    """A copy of ``bundle`` whose validation split is a random half of the original and whose
    ``target_test`` is the other half: the runs select on the first, the score is read on the
    second, and the real test split is not in the copy."""
    valid = bundle.splits["target_valid"]
    perm = torch.randperm(len(valid), generator=torch.Generator().manual_seed(1000 + setting))
    half = len(valid) // 2
    scored = copy.copy(bundle)
    scored.splits = {**bundle.splits, "target_valid": valid.index(perm[:half]),
                     "target_test": valid.index(perm[half:])}
    return scored


def per_instance_share(rec: dict) -> float:
    """Share of fields whose tuned fraction on the validation rows of the best epoch lies in
    [0.1, 0.9] (the history records the policy on every epoch's validation pass)."""
    best = rec.get("best_epoch")
    hist = [h for h in rec.get("history", []) if h.get("epoch") == best and h.get("policy")]
    hist = [h for h in hist if h.get("stage") == "retrain"] or hist  # the model returned
    if not hist:
        return float("nan")
    fr = list(hist[0]["policy"].get("field", {}).values())
    return float(np.mean([0.1 <= f <= 0.9 for f in fr])) if fr else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--settings", type=int, default=len(SETTINGS))
    ap.add_argument("--only", default=None,
                    help="comma-separated setting numbers to run instead (e.g. 3 = the demo's world)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="run directory (default: a temporary one)")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    ap.add_argument("--score", default="best-valid", choices=["best-valid", "split-valid"],
                    help="the score the rule compares (see the module docstring)")
    args = ap.parse_args()
    split = args.score == "split-valid"
    logging.basicConfig(level=logging.WARNING)
    names = [c for c in args.candidates.split(",") if c]
    unknown = [c for c in names if c not in CANDIDATES]
    if unknown or not names:
        ap.error(f"--candidates: unknown {unknown} (known: {', '.join(CANDIDATES)})" if unknown
                 else "--candidates names none")
    try:
        chosen = ([int(i) for i in args.only.split(",")] if args.only
                  else list(range(min(args.settings, len(SETTINGS)))))
    except ValueError:
        ap.error(f"--only must be comma-separated setting numbers, got {args.only!r}")
    bad = [i for i in chosen if not 0 <= i < len(SETTINGS)]
    if bad or args.seeds < 1 or args.threads < 1:
        ap.error(f"--only: settings {bad} do not exist (0..{len(SETTINGS) - 1})" if bad
                 else "--seeds and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="autoft-protocol-"))
    rows = []
    t0 = time.perf_counter()
    for si in chosen:
        syn = SETTINGS[si]
        raw = {"name": f"protocol{si}", "synthetic": setting_synthetic(syn),
               "model": {"name": "deepfm"},
               "run_dir": str(out), "cache_dir": str(out / "cache"), "device": "cpu"}
        cfg = parse_config(raw, out)
        bundle = load_data(cfg)
        state, _ = pretrain(cfg, bundle, progress=False)
        if split:
            bundle = split_validation(bundle, si)
        base = {}
        for seed in range(args.seeds):
            rec = run_strategy(cfg, bundle, state, "finetune_all", seed,
                               out / f"s{si}" / f"finetune_all-{seed}", progress=False)
            base[seed] = rec
        # With split-valid, "auc" is the AUC on the held-back validation half.
        score = "auc" if split else "valid_best"
        base_valid = np.mean([r[score] for r in base.values()])
        base_test = np.nan if split else np.mean([r["auc"] for r in base.values()])
        rows.append({"setting": si, "candidate": "finetune_all", "valid": base_valid,
                     "valid_gain": 0.0, "test": base_test, "per_instance": float("nan"),
                     "best_epochs": [r["best_epoch"] for r in base.values()]})
        for name in names:
            acfg = AutoFTConfig.from_dict({**cfg.autoft.to_dict(), **CANDIDATES[name]})
            c = dataclasses.replace(cfg, autoft=acfg)
            recs = [run_strategy(c, bundle, state, "autoft", seed,
                                 out / f"s{si}" / f"{name}-{seed}", progress=False)
                    for seed in range(args.seeds)]
            v = np.mean([r[score] for r in recs])
            rows.append({"setting": si, "candidate": name, "valid": v,
                         "valid_gain": v - base_valid,
                         "test": np.nan if split else np.mean([r["auc"] for r in recs]),
                         "per_instance": np.nanmean([per_instance_share(r) for r in recs]),
                         "best_epochs": [r["best_epoch"] for r in recs]})
            print(json.dumps({k: (float(x) if isinstance(x, (np.floating, float)) else x)
                              for k, x in rows[-1].items()}), flush=True)
    print(f"\nsettings {[SETTINGS[i] for i in chosen]}, {args.seeds} seeds, score "
          f"{args.score}, {time.perf_counter() - t0:.0f} s\n")
    print("| setting | candidate | valid AUC | valid gain vs finetune_all | per-instance fields "
          "(valid) | best epochs | test AUC (not used) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setting']} | {r['candidate']} | {r['valid']:.4f} | {r['valid_gain']:+.4f} | "
              f"{r['per_instance']:.2f} | {r['best_epochs']} | {r['test']:.4f} |")
    print("\n| candidate | mean valid AUC over settings | mean valid gain |")
    print("| --- | --- | --- |")
    means = {}
    for name in ["finetune_all"] + names:
        rs = [r for r in rows if r["candidate"] == name]
        means[name] = float(np.mean([r["valid"] for r in rs]))
        print(f"| {name} | {means[name]:.4f} | "
              f"{np.mean([r['valid_gain'] for r in rs]):+.4f} |")
    best = max(names, key=lambda n: means[n])
    simple = min((n for n in names if means[n] >= means[best] - 0.0005),
                 key=lambda n: (sum(1 for k, v in CANDIDATES[n].items()
                                    if NEUTRAL.get(k, object()) != v), -means[n]))
    print(f"\nbest by validation: {best}; chosen by the rule (within 0.0005, simplest): {simple}")


if __name__ == "__main__":
    main()
