"""Training throughput of one strategy under each gated-embedding backend
(`autoft-fast bench train`): the end-to-end number the op's speed is for."""
from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from ..config import load_config
from ..models import build_base_model, build_transfer_model
from .checkpoint import seed_everything
from .progress import LOGGER_NAME, setup_logging
from .runner import load_data, pretrain
from .trainer import Trainer

__all__ = ["main", "measure"]


def measure(cfg, bundle, state: dict, strategy: str, backend: str, seed: int = 0,
            epochs: int = 1) -> float:
    """Samples/s of `epochs` training epochs of `strategy` on target_train with `backend`
    (evaluation excluded), from the pre-trained `state`."""
    from .runner import policy_inputs
    seed_everything(seed)
    pre = build_base_model(bundle.feature_map, cfg.model)
    pre.load_state_dict(state)
    acfg = cfg.autoft.with_backend(backend)
    # The policy's inputs and held-out rows as a run of the strategy has them.
    train, policy_data, rotating, value_counts = policy_inputs(cfg, bundle, strategy, seed)
    model = build_transfer_model(strategy, pre, bundle.feature_map, cfg.model, acfg,
                                 value_counts=value_counts)
    # A training-speed run of one epoch or so: its best epoch is the last by design.
    quiet = logging.getLogger(LOGGER_NAME + ".bench")
    quiet.setLevel(logging.ERROR)
    fit = Trainer(model, cfg.finetune.with_epochs(epochs), seed=seed, progress=False,
                  device=cfg.torch_device(), policy_lr=acfg.policy_lr,
                  policy_weight_decay=acfg.policy_weight_decay, policy_data=policy_data,
                  policy_rotating=rotating, logger=quiet).fit(
        train, bundle.splits["target_valid"])
    return fit.samples_per_s


def main(argv=None) -> int:
    """Print a table of training samples/s per backend and the ratio to the first one.

    Example:
        autoft-fast bench train --backends reference cpu --reps 3
    """
    p = argparse.ArgumentParser(prog="autoft-fast bench train", description=main.__doc__)
    p.add_argument("--config", "-c", help="experiment YAML (default: the embedded demo)")
    p.add_argument("--strategy", default="autoft", help="the strategy trained (default: autoft)")
    p.add_argument("--backends", nargs="+", default=["reference", "cpu"],
                   help="the backends timed, the first the ratios' base (default: reference cpu)")
    p.add_argument("--reps", type=int, default=3,
                   help="runs per backend, interleaved; median (default: 3)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs per run (default: 1)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--run-dir", help="run_dir override (the data and model caches live there)")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (default: the config's)")
    args = p.parse_args(argv)
    from .progress import check_threads
    from ..config import STRATEGY_TABLE
    from ..ops.registry import available_backends
    for name in ("reps", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(check_threads(args.threads, "--threads"))
    if args.strategy in STRATEGY_TABLE and not STRATEGY_TABLE[args.strategy].trains:
        p.error(f"--strategy {args.strategy!r} trains nothing, so it has no training throughput")
    setup_logging(None)
    cfg = load_config(args.config).with_overrides(run_dir=args.run_dir, device=args.device,
                                                  strategies=[args.strategy])
    available = available_backends(cfg.torch_device())
    if len(set(args.backends)) != len(args.backends):
        p.error(f"--backends names a backend twice: {args.backends}")
    for b in args.backends:
        if b not in available:
            p.error(f"--backends: {b!r} is not available for {cfg.torch_device()} tensors; "
                    f"available: {', '.join(available)}")
    bundle = load_data(cfg)
    state, _ = pretrain(cfg, bundle, progress=False)
    rates: dict[str, list[float]] = {b: [] for b in args.backends}
    for rep in range(args.reps):
        for b in args.backends:
            t0 = time.perf_counter()
            rates[b].append(measure(cfg, bundle, state, args.strategy, b, epochs=args.epochs))
            print(f"  rep {rep + 1} {b}: {rates[b][-1]:,.0f} samples/s "
                  f"({time.perf_counter() - t0:.1f} s)", flush=True)
    base = statistics.median(rates[args.backends[0]])
    print(f"\n# training throughput, strategy {args.strategy}, {len(bundle.splits['target_train']):,} "
          f"target rows, batch {cfg.finetune.batch_size}, device {cfg.torch_device()}, "
          f"{torch.get_num_threads()} threads, median of {args.reps}\n")
    print(f"| backend | samples/s (median) | runs | vs {args.backends[0]} |")
    print("| --- | --- | --- | --- |")
    for b in args.backends:
        med = statistics.median(rates[b])
        runs = ", ".join(f"{r:,.0f}" for r in rates[b])
        print(f"| {b} | {med:,.0f} | {runs} | {med / base:.2f}x |")
    return 0
