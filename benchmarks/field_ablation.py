"""How much a field-wise choice could gain at most: the per-field oracle of fine-tuning.

Fine-tunes ``finetune_all`` with early stopping (the library's trainer and defaults), then,
for each field in turn, puts that field's pre-trained rows back in place of the tuned ones (and
for the interaction stack, its pre-trained layers) and reports the change of validation AUC.
A positive change means the frozen copy is better for that field on rows the tuned copy was
not fitted to: the most any field gate (per field, not per instance) can win there. Summing
the positive changes bounds a per-field policy's gain to first order.

With ``--retrain app_id,publisher`` it instead checks such a choice the way a policy would
have to make it: ``autoft_field`` with a fixed policy (the named fields frozen, every other
field tuned) is fine-tuned from the pre-trained model on the target training rows, and its
validation and test AUC are printed per seed beside finetune_all's. With no field named, the
fixed all-tuned policy reproduces finetune_all exactly (a check of the comparison itself).

The data and the pre-trained model come from the config's cache and go to it, as `compare`
uses them: after `autoft-fast demo` in the same folder, the demo's are reused.

Usage:
    python benchmarks/field_ablation.py [--config exp.yaml] [--seeds 3] [--target tgt]
    python benchmarks/field_ablation.py --retrain app_id,publisher [--seeds 3]

Example:
    python benchmarks/field_ablation.py --seeds 2
"""
from __future__ import annotations

import argparse
import copy
import logging

import numpy as np
import torch

from autoft_fast.config import load_config
from autoft_fast.models import build_base_model, build_transfer_model
from autoft_fast.train.runner import load_data, pretrain
from autoft_fast.train.trainer import Trainer, evaluate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=None, help="experiment YAML (default: the demo)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--target", default=None, help="one of the config's targets")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--retrain", default=None, metavar="FIELDS",
                    help="comma-separated fields to fix to the frozen row and retrain with")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    if args.threads < 1:
        ap.error(f"--threads must be at least 1, got {args.threads}")
    # The config's own cache (data, pre-trained model): what `compare` on it made is reused.
    cfg = load_config(args.config)
    if args.target is not None and cfg.targets and args.target not in cfg.targets:
        ap.error(f"--target {args.target!r} is not one of the config's targets {list(cfg.targets)}")
    target = args.target or (cfg.targets[0] if cfg.targets else None)
    bundle = load_data(cfg, target)
    fmap, valid = bundle.feature_map, bundle.splits["target_valid"]
    if args.retrain is not None:  # before the minutes of pre-training
        unknown = sorted(set(f for f in args.retrain.split(",") if f) - {f.name for f in fmap.fields})
        if unknown:
            ap.error(f"--retrain: unknown field(s) {unknown}; the fields are "
                     f"{[f.name for f in fmap.fields]}")
    state, _ = pretrain(cfg, bundle, progress=False)
    pre = build_base_model(fmap, cfg.model)
    pre.load_state_dict(state)
    if args.retrain is not None:
        return retrain_check(cfg, bundle, state, [f for f in args.retrain.split(",") if f],
                             args.seeds)
    names = [f.name for f in fmap.fields] + ["interaction stack"]
    deltas = {n: [] for n in names}
    base_aucs = []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = build_transfer_model("finetune_all", pre, fmap, cfg.model, cfg.autoft)
        Trainer(model, cfg.finetune, seed=seed, progress=False).fit(
            bundle.splits["target_train"], valid)
        base = evaluate(model, valid)["auc"]
        base_aucs.append(base)
        for f in fmap.fields:
            m = copy.deepcopy(model)
            rows = slice(f.offset, f.offset + f.vocab_size)
            with torch.no_grad():
                m.net.embedding.weight[rows] = pre.embedding.weight[rows]
                if m.net.linear is not None:
                    m.net.linear.weight[rows] = pre.linear.weight[rows]
            deltas[f.name].append(evaluate(m, valid)["auc"] - base)
        m = copy.deepcopy(model)
        m.net.layers.load_state_dict(pre.layers.state_dict())
        deltas["interaction stack"].append(evaluate(m, valid)["auc"] - base)
    print(f"finetune_all validation AUC over {args.seeds} seeds: {np.mean(base_aucs):.4f}"
          f" (target {bundle.feature_map.domain_values[-1]})\n")
    print("| part put back to its pre-trained values | validation AUC change (mean) | per seed |")
    print("| --- | --- | --- |")
    for n in names:
        print(f"| {n} | {np.mean(deltas[n]):+.4f} | "
              f"{' '.join(f'{d:+.4f}' for d in deltas[n])} |")
    pos = sum(max(0.0, float(np.mean(deltas[n]))) for n in names[:-1])
    print(f"\nsum of the positive field changes (first-order bound of a per-field policy's "
          f"gain): {pos:+.4f}")


def fixed_policy_model(cfg, bundle, state, frozen: list[str]):
    """autoft_field whose fixed policy sends the `frozen` fields to the frozen row (every
    instance) and every other field to the tuned row."""
    pre = build_base_model(bundle.feature_map, cfg.model)
    pre.load_state_dict(state)
    model = build_transfer_model("autoft_field", pre, bundle.feature_map, cfg.model, cfg.autoft)
    unknown = sorted(set(frozen) - set(model.field_gate_names))
    if unknown:
        raise SystemExit(f"--retrain: unknown field(s) {unknown}; the fields are "
                         f"{model.field_gate_names}")
    last = [m for m in model.policy.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():  # constant logits far from a tie: no Gumbel sample overturns them
        last.weight.zero_()
        bias = last.bias.view(-1, 2)
        for i, name in enumerate(model.field_gate_names):
            bias[i] = torch.tensor([50.0, -50.0] if name in frozen else [-50.0, 50.0])
    model.fix_policy()
    return model


def retrain_check(cfg, bundle, state, frozen: list[str], seeds: int) -> None:
    """Validation and test AUC of finetune_all and of the fixed-policy retrain, per seed."""
    train, valid, test = (bundle.splits[k] for k in ("target_train", "target_valid",
                                                     "target_test"))
    print(f"| seed | finetune_all valid | frozen {','.join(frozen) or '(none)'} valid | "
          "finetune_all test | fixed-policy test |")
    print("| --- | --- | --- | --- | --- |")
    for seed in range(seeds):
        res = []
        for build in (lambda: build_transfer_model(
                "finetune_all", _pre(cfg, bundle, state), bundle.feature_map, cfg.model,
                cfg.autoft), lambda: fixed_policy_model(cfg, bundle, state, frozen)):
            torch.manual_seed(seed)
            model = build()
            fit = Trainer(model, cfg.finetune, seed=seed, progress=False).fit(train, valid)
            res.append((fit.best_metric, evaluate(model, test)["auc"]))
        print(f"| {seed} | {res[0][0]:.4f} | {res[1][0]:.4f} | {res[0][1]:.4f} | {res[1][1]:.4f} |")


def _pre(cfg, bundle, state):
    pre = build_base_model(bundle.feature_map, cfg.model)
    pre.load_state_dict(state)
    return pre


if __name__ == "__main__":
    main()
