"""End-to-end training step at real table sizes: every strategy that trains an embedding
table (freeze_embedding trains none), with its default path.

26 single-valued fields whose vocabularies follow a long tail (field i holds about V / (i + 1)
rows, normalised so that the vocabularies sum to V rows) and whose ids are drawn Zipf-like
(density ~ 1 / rank), D = 16, DNN [64, 32], batch 4096. For each V and each strategy the
model is built by ``build_transfer_model`` with the ``autoft:`` defaults and its optimizers
by the ``Trainer`` (so the defaults are what users get), and one step is the trainer's own:
forward, BCE (+ penalty), backward, every optimizer's step. Beside them runs the "careful
plain PyTorch" baseline: nn.Embedding(sparse=True) + SparseAdam for the table, fused AdamW
for the same DNN. Printed per (V, strategy): ms/step, samples/s and peak RSS; then the ratios
that the scaling targets name. Strategies are interleaved within each V (``--rounds``
rounds, each builds every strategy afresh; the median round is reported), after warm-up
steps and a page pre-touch (freshly booted machines are slow on first touch of memory).

Run (full size; takes a while and about 10 GB at V = 1e7):
    python benchmarks/bench_train.py
Reduced form:
    python benchmarks/bench_train.py --vs 1e4 --steps 3
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from autoft_fast.config.sections import TrainConfig
from autoft_fast.data import FeatureMap, FieldInfo, TensorData
from autoft_fast.models import AutoFTConfig, ModelConfig, build_base_model, build_transfer_model
from autoft_fast.models.frequency import count_rows
from autoft_fast.ops import memory
from autoft_fast.train.trainer import Trainer

NUM_FIELDS = 26
STRATEGIES = ("finetune_all", "freeze_dnn", "l2sp", "target_only", "autoft_field",
              "autoft_layer", "autoft")
PLAIN = "plain_pytorch"
INT8 = "autoft_int8"  # autoft with autoft.frozen_dtype: int8, at the largest V only
MODEL = {"name": "dnn", "embedding_dim": 16, "hidden_units": [64, 32]}

TARGET_V = 4_000_000  # the V at which the speed target against plain PyTorch is stated

RATIO_LABELS = (
    "autoft samples/s / plain samples/s at V={vmax}",
    "autoft step at V={vmax} / at V={vmin}",
    "autoft step / finetune_all step at V={vsmall}",
    "int8 frozen table bytes / float32 bytes at V={vmax}",
)


# ----- data ----------------------------------------------------------------------------------
def field_sizes(v_rows: int, num_fields: int = NUM_FIELDS) -> list[int]:
    """Long-tail vocabulary sizes (field i ~ 1 / (i + 1)) that sum to exactly ``v_rows``.

    Example::

        >>> sum(field_sizes(100_000))
        100000
    """
    if v_rows < 4 * num_fields:
        raise ValueError(f"--vs value {v_rows} is too small: {num_fields} fields need at least "
                         f"{4 * num_fields} rows")
    share = [1.0 / (i + 1) for i in range(num_fields)]
    total = sum(share)
    sizes = [max(4, int(v_rows * s / total)) for s in share]
    sizes[0] += v_rows - sum(sizes)
    return sizes


def feature_map(v_rows: int) -> FeatureMap:
    """The benchmark's feature map: 26 categorical fields over one table of ``v_rows`` rows."""
    fields, offset = [], 0
    for i, n in enumerate(field_sizes(v_rows)):
        fields.append(FieldInfo(f"f{i}", "categorical", n, offset))
        offset += n
    return FeatureMap(fields=fields, single_fields=[f.name for f in fields], multihot_fields=[],
                      multihot_max_len=0, dense_fields=[], domain_values=["source", "target"])


def batches(fmap: FeatureMap, batch_size: int, count: int, seed: int = 0) -> list[TensorData]:
    """``count`` batches of Zipf-like ids (local id ~ floor(n ** u), u uniform) and labels."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.int32 if fmap.num_rows < 2**31 else torch.int64
    out = []
    for _ in range(count):
        cols = []
        for f in fmap.fields:
            u = torch.rand(batch_size, generator=g, dtype=torch.float64)
            local = torch.floor(torch.pow(float(f.vocab_size - 1), u)).long().clamp_(1, f.vocab_size - 1)
            cols.append(f.offset + local)
        sparse = torch.stack(cols, dim=1).to(dtype)
        label = (torch.rand(batch_size, generator=g) < 0.3).float()
        out.append(TensorData(sparse=sparse, multihot=None, dense=None, label=label,
                              domain=torch.ones(batch_size, dtype=torch.long)))
    return out


# ----- memory --------------------------------------------------------------------------------
def pretouch(gb: float) -> None:
    """Allocate and fill ``gb`` GB once, so that timed code does not pay the first touch."""
    if gb <= 0:
        return
    block = torch.empty(int(gb * 2**30) // 4, dtype=torch.float32)
    block.fill_(1.0)
    del block
    gc.collect()


def _reset_peak_rss() -> bool:
    # Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS.
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (VmHWM), or since start (ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# ----- the models ----------------------------------------------------------------------------
class PlainDNN(nn.Module):
    """The careful plain-PyTorch model: sparse nn.Embedding and the same DNN [64, 32]."""

    def __init__(self, rows: int, dim: int, fields: int, hidden: list[int]):
        super().__init__()
        self.embedding = nn.Embedding(rows, dim, sparse=True)
        layers, width = [], fields * dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(self, sparse: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.embedding(sparse).flatten(1)).view(-1)


def plain_stepper(fmap: FeatureMap, lr: float):
    """A step function of the plain baseline: SparseAdam on the table, fused AdamW on the rest."""
    cfg = ModelConfig.from_dict(MODEL)
    model = PlainDNN(fmap.num_rows, cfg.embedding_dim, len(fmap.single_fields), list(cfg.hidden_units))
    table = torch.optim.SparseAdam([model.embedding.weight], lr=lr)
    rest = torch.optim.AdamW(list(model.mlp.parameters()), lr=lr, fused=True)

    def step(batch: TensorData) -> None:
        loss = F.binary_cross_entropy_with_logits(model(batch.sparse), batch.label)
        table.zero_grad(set_to_none=True)
        rest.zero_grad(set_to_none=True)
        loss.backward()
        table.step()
        rest.step()

    return model, step


def library_stepper(strategy: str, fmap: FeatureMap, pre, train_cfg: TrainConfig,
                    autoft: dict | None = None, counts=None):
    """A step function of ``strategy`` as users get it: the library's model and trainer step.
    ``counts``: the id counts of the training rows (the frequency field policy's input, as
    the runner passes them)."""
    acfg = AutoFTConfig.from_dict(autoft or {})
    model = build_transfer_model(strategy, pre, fmap, MODEL, acfg,
                                 value_counts=None if counts is None else (counts, counts))
    if model.frequency_rule is not None and counts is not None:
        model.set_frequency_threshold(acfg.frequency_thresholds[0])  # the rule in use
    trainer = Trainer(model, train_cfg, seed=0, progress=False, policy_lr=acfg.policy_lr,
                      policy_weight_decay=acfg.policy_weight_decay)
    model.train()
    names = list(trainer.optimizers)  # policy_objective "train": every optimizer each step

    def step(batch: TensorData) -> None:
        trainer._step(batch, names)

    return model, step


def frozen_table_bytes(model) -> int:
    """Bytes of the frozen embedding table of a field-gated model (0 without one)."""
    emb = getattr(model, "field_embedding", None)
    return 0 if emb is None else emb.frozen_weight.nbytes


# ----- measurement ---------------------------------------------------------------------------
def time_steps(step, data: list[TensorData], warmup: int, steps: int) -> float:
    """Seconds per step: mean of ``steps`` steps after ``warmup`` untimed ones."""
    for i in range(warmup):
        step(data[i % len(data)])
    t0 = time.perf_counter()
    for i in range(steps):
        step(data[(warmup + i) % len(data)])
    return (time.perf_counter() - t0) / max(1, steps)


def measure_v(v_rows: int, args, largest: bool) -> dict[str, dict]:
    """``{row name: {"ms", "samples_s", "rss", "frozen_bytes"}}`` for one V, strategies interleaved."""
    fmap = feature_map(v_rows)
    data = batches(fmap, args.batch_size, args.pool, seed=v_rows % (2**31))
    train_cfg = TrainConfig.from_dict({"batch_size": args.batch_size})
    torch.manual_seed(0)
    pre = build_base_model(fmap, MODEL)  # the "pre-trained" weights: timing needs no training
    counts = sum(count_rows(b, fmap.num_rows) for b in data)
    # The int8 row is autoft's with an int8 frozen table: only beside autoft's own row.
    names = list(args.strategies) + [PLAIN] + ([INT8] if largest and "autoft" in
                                                args.strategies else [])
    times: dict[str, list[float]] = {n: [] for n in names}
    rss: dict[str, int] = {n: 0 for n in names}
    frozen: dict[str, int] = {n: 0 for n in names}
    for _ in range(args.rounds):
        for name in names:
            gc.collect()
            _reset_peak_rss()
            torch.manual_seed(0)
            if name == PLAIN:
                model, step = plain_stepper(fmap, train_cfg.lr)
            elif name == INT8:
                model, step = library_stepper("autoft", fmap, pre, train_cfg, {"frozen_dtype": "int8"},
                                              counts)
            else:
                model, step = library_stepper(name, fmap, pre, train_cfg, counts=counts)
            times[name].append(time_steps(step, data, args.warmup, args.steps))
            rss[name] = max(rss[name], peak_rss_bytes())
            frozen[name] = frozen_table_bytes(model)
            del model, step
    rows = {}
    for name in names:
        sec = statistics.median(times[name])
        rows[name] = {"ms": sec * 1e3, "samples_s": args.batch_size / sec, "rss": rss[name],
                      "frozen_bytes": frozen[name]}
    return rows


def ratios(results: dict[int, dict[str, dict]]) -> list[tuple[str, float | None]]:
    """The ratios of the scaling targets from ``{V: rows}``; None where a row is missing."""
    vs = sorted(results)
    vmin, vmax = vs[0], vs[-1]
    vsmall = 100_000 if 100_000 in results else vmin
    top, low, small = results[vmax], results[vmin], results[vsmall]

    def get(rows, name, key):
        return rows[name][key] if name in rows else None

    def div(a, b):
        return None if a is None or b in (None, 0) else a / b

    labels = [s.format(vmax=_v(vmax), vmin=_v(vmin), vsmall=_v(vsmall)) for s in RATIO_LABELS]
    values = [div(get(top, "autoft", "samples_s"), get(top, PLAIN, "samples_s")),
              # one V: no growth to measure
              div(get(top, "autoft", "ms"), get(low, "autoft", "ms")) if vmax != vmin else None,
              div(get(small, "autoft", "ms"), get(small, "finetune_all", "ms")),
              div(get(top, INT8, "frozen_bytes"), get(top, "autoft", "frozen_bytes"))]
    if TARGET_V in results and TARGET_V != vmax:
        # The target names this V; the ratio at the largest V is printed above it.
        rows = results[TARGET_V]
        labels.append(RATIO_LABELS[0].format(vmax=_v(TARGET_V)))
        values.append(div(get(rows, "autoft", "samples_s"), get(rows, PLAIN, "samples_s")))
    return list(zip(labels, values))


def _v(v: int) -> str:
    exp = math.log10(v) if v > 0 else 0
    return f"1e{int(exp)}" if float(exp).is_integer() else f"{v:,}"


def _parse_v(text: str) -> int:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--vs value {text!r} is not a number (e.g. 1e6)")
    if not v.is_integer() or v < 4 * NUM_FIELDS:
        raise argparse.ArgumentTypeError(f"--vs value {text!r} must be a whole number of rows "
                                         f">= {4 * NUM_FIELDS}")
    return int(v)


def main(argv=None) -> int:
    """Print ms/step, samples/s and peak RSS per (V, strategy), then the target ratios.

    Example:
        python benchmarks/bench_train.py --vs 1e5 1e6 4e6 1e7 --steps 20
        python benchmarks/bench_train.py --vs 1e4 --steps 3          # reduced form
    """
    p = argparse.ArgumentParser(prog="bench_train.py", description=main.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vs", nargs="+", type=_parse_v, default=[10**5, 10**6, TARGET_V, 10**7],
                   help="table sizes V in rows (default 1e5 1e6 4e6 1e7)")
    p.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES,
                   help="library strategies to time (the plain baseline always runs)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per strategy and round")
    # 20 warm-up steps: the first steps of a fresh model pay one-off costs that a training
    # run amortises: page faults on the first touch of optimizer state (SparseAdam's dense
    # state faulted about 6,000 pages per step over its first 20 steps at V = 4M, 37-41 ms
    # against 31 ms after) and the allocator settling into its steady state.
    p.add_argument("--warmup", type=int, default=20, help="untimed steps before the timed ones")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is printed")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--pool", type=int, default=8, help="distinct batches cycled through")
    p.add_argument("--pretouch-gb", type=float, default=4.0,
                   help="GB allocated and filled before timing (0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "batch_size", "pool"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= 1")
    if args.warmup < 0:
        p.error(f"--warmup = {args.warmup} must be >= 0")
    if args.threads is not None:
        from autoft_fast.train.progress import check_threads
        try:
            torch.set_num_threads(check_threads(args.threads, "--threads"))
        except ValueError as e:
            p.error(str(e))
    pretouch(args.pretouch_gb)
    vs = sorted(set(args.vs))
    print(f"# training step, {NUM_FIELDS} fields, D={MODEL['embedding_dim']}, DNN "
          f"{MODEL['hidden_units']}, batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{args.steps} steps after {args.warmup} warm-up, median of {args.rounds} rounds; "
          f"the library's huge-page tables {'on' if memory.enabled() else 'off'}, "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} "
          f"(torch's own huge-page advice, which the plain baseline gets only from it)\n")
    print("| V | strategy | ms/step | samples/s | peak RSS (MB) |")
    print("| --- | --- | ---: | ---: | ---: |")
    results: dict[int, dict[str, dict]] = {}
    for v in vs:
        results[v] = measure_v(v, args, largest=v == vs[-1])
        for name, r in results[v].items():
            print(f"| {_v(v)} | {name} | {r['ms']:.1f} | {r['samples_s']:,.0f} | "
                  f"{r['rss'] / 2**20:,.0f} |", flush=True)
    top = results[vs[-1]]
    if INT8 in top and "autoft" in top:
        print(f"\nfrozen table at V={_v(vs[-1])}: float32 {top['autoft']['frozen_bytes']:,} bytes "
              f"(peak RSS {top['autoft']['rss'] / 2**20:,.0f} MB), int8 "
              f"{top[INT8]['frozen_bytes']:,} bytes (peak RSS {top[INT8]['rss'] / 2**20:,.0f} MB)")
    print("\n| ratio | value |")
    print("| --- | ---: |")
    for label, value in ratios(results):
        print(f"| {label} | {'n/a' if value is None else f'{value:.3f}'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
