"""The experiment runner: data -> one pre-trained base model -> every (seed, strategy) fine-tune
-> test metrics, policy statistics and throughput, written under one run directory."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from .._io import remove_stale_temps, strict_json, write_text_atomic
from ..config import ConfigError, DataConfig, DataError, config_hash, read_data_yaml
from ..config.strategies import STRATEGY_TABLE
from ..config.sections import tau_at
from ..data import generate_synthetic, prepare_data
from ..data import iterate_batches
from ..models import build_base_model, build_transfer_model
from ..models.frequency import count_rows
from . import distributed
from .holdout import split_holdout
from .metrics import compute_metrics
from .checkpoint import CheckpointError, load_checkpoint, save_atomic, seed_everything
from .progress import LOGGER_NAME
from .report import (aggregate, markdown_summary, markdown_table, plot_auc, plot_policy,
                     plot_policy_by_frequency, plot_policy_epochs, policy_table,
                     summary_across_targets, tuned_fraction_by_frequency, write_policy_csv,
                     write_results_csv, write_runs_csv, write_summary_csv)
from .predict import save_model
from .stats import delong_test
from .trainer import Trainer, predict

__all__ = ["make_run_dir", "generate_data", "load_data", "pretrain", "pretrained_path",
           "run_strategy", "compare", "write_outputs", "write_json", "RunDirError"]

log = logging.getLogger(LOGGER_NAME)


class RunDirError(OSError):
    """The run directory cannot be made or written; the message names it and what to do."""


@distributed.main_then_broadcast  # torchrun: rank 0 makes it, every rank gets its path
def make_run_dir(cfg, command: str) -> Path:
    """A fresh directory run_dir/<name>-<command>-<UTC timestamp>/ (suffixed -1, -2, ...
    if taken; just <name>-<timestamp> when the name is the command, as for the demo).

    The name is claimed by mkdir itself (no exists() check first), so runs started in the
    same second each get their own directory. A run_dir that cannot be written raises
    RunDirError naming it.

    Example:
        >>> make_run_dir(cfg, "compare")   # doctest: +SKIP
        PosixPath('runs/demo-compare-20260101-120000')
    """
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    prefix = cfg.name if cfg.name == command else f"{cfg.name}-{command}"
    root = Path(cfg.run_dir)
    base = root / f"{prefix}-{stamp}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for i in range(10_000):
            path = base if i == 0 else base.with_name(f"{base.name}-{i}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue
    except OSError as e:
        raise RunDirError(f"cannot create a run directory under {str(root)!r} "
                          f"({e.strerror or e}); choose a writable folder with --run-dir") from None
    raise RunDirError(f"no free run directory name {base.name}-N under {str(root)!r}")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    return str(o)


def data_fingerprint(bundle) -> str:
    """SHA-256 of what a run's checkpoints depend on in the prepared data: every field's
    vocabulary (the id each value got), each split's row count, labels and domains."""
    h = hashlib.sha256()
    for name in sorted(bundle.vocabularies):
        h.update(f"\x01{name}\x02".encode())
        h.update("\x00".join(map(str, bundle.vocabularies[name])).encode("utf-8", "surrogatepass"))
    for name in sorted(bundle.splits):
        d = bundle.splits[name]
        h.update(f"\x03{name}:{len(d)}".encode())
        h.update(d.label.numpy().tobytes())
        h.update(d.domain.numpy().tobytes())
    return h.hexdigest()


def check_run_data(out: Path, bundle, resume: bool) -> None:
    """Record the data a run trains on (``out``/data.json), and refuse to resume a run whose
    data changed since it started: its checkpoints' embedding rows belong to the old ids."""
    path = Path(out) / "data.json"
    fp = data_fingerprint(bundle)
    if resume and path.is_file():
        try:
            recorded = json.loads(path.read_text()).get("fingerprint")
        except (OSError, ValueError):
            recorded = None
        if recorded is not None and recorded != fp:
            raise DataError(f"--resume: the data differ from those the run in {out} started with "
                            f"(a data file changed since: other values, labels or row counts), so "
                            f"its checkpoints do not fit them; start a new run, or restore the "
                            f"files")
        if recorded == fp:
            return
    write_json({"fingerprint": fp,
                "rows": {k: len(v) for k, v in bundle.splits.items()}}, path)


# The numbers of a run record that are NaN when undefined (written as null, read back as
# NaN): top-level keys, and the keys of its nested metric tables.
_RECORD_FLOATS = ("auc", "logloss", "train_samples_per_s", "train_seconds", "wall_seconds",
                  "valid_best")
_HISTORY_FLOATS = ("train_loss", "valid_auc", "valid_logloss", "samples_per_s")


def _nan_for_none(d: dict, keys=None) -> None:
    for k, v in d.items():
        if v is None and (keys is None or k in keys):
            d[k] = float("nan")


def _policy_from_json(stats) -> None:
    for kind in ("field", "layer"):  # a field whose every bag was empty has no fraction: NaN
        if isinstance(stats, dict) and isinstance(stats.get(kind), dict):
            _nan_for_none(stats[kind])


def _record_from_json(rec: dict) -> dict:
    """A result.json record as the run made it: its undefined numbers NaN again (legitimate
    Nones, such as best_epoch of a run that did not train, stay None)."""
    _nan_for_none(rec, _RECORD_FLOATS)
    for m in (rec.get("per_domain") or {}).values():
        if isinstance(m, dict):
            _nan_for_none(m, ("auc", "logloss"))
    _policy_from_json(rec.get("policy_stats"))
    for h in rec.get("history") or []:
        if isinstance(h, dict):
            _nan_for_none(h, _HISTORY_FLOATS)
            _policy_from_json(h.get("policy"))
    for row in rec.get("policy_by_frequency") or []:
        if isinstance(row, dict):
            _nan_for_none(row, ("tuned_fraction",))
    return rec


def checkpoint_settings(cfg) -> str:
    """Hash of what a fine-tuning checkpoint's weights depend on: the config's training
    sections but the settings a resume may change (trainer.RESUMABLE_CHANGES); a checkpoint
    written under another hash is refused on resume."""
    from .trainer import RESUMABLE_CHANGES
    d = cfg.training_dict()
    d["finetune"] = {k: v for k, v in d["finetune"].items() if k not in RESUMABLE_CHANGES}
    return config_hash(d)


def _write_runs_so_far(rows: list, path: Path) -> None:
    """runs.csv while a comparison runs: these rows, then the rows the file already holds
    for other (strategy, seed, target) runs, so that a resume killed early never leaves a
    shorter file than the one it found (the finished comparison writes the whole table)."""
    import csv

    def key(r) -> tuple:
        return str(r.get("strategy")), str(r.get("seed")), str(r.get("target") or "")
    mine = {key(r) for r in rows}
    kept = []
    if path.is_file():
        try:
            with open(path, newline="", encoding="utf-8") as f:
                kept = [r for r in csv.DictReader(f) if key(r) not in mine]
        except (OSError, csv.Error, UnicodeDecodeError):
            kept = []  # a damaged file is rewritten from what this start knows
    write_runs_csv(list(rows) + kept, path)


def write_json(obj, path: Path) -> Path:
    """Write `obj` as indented, standard JSON atomically (autoft_fast._io); Paths and
    tensors are written as strings and lists, NaN and infinities as null.

    Example:
        >>> write_json({"auc": 0.71}, run_dir / "result.json")   # doctest: +SKIP
    """
    if not distributed.is_main_process():  # torchrun: only rank 0 writes files
        return Path(path)
    obj = json.loads(json.dumps(obj, default=_json_default))  # Paths, tensors -> JSON types
    return write_text_atomic(json.dumps(strict_json(obj), indent=2, allow_nan=False), path)


# -- data --------------------------------------------------------------------------------

@distributed.main_then_broadcast  # torchrun: rank 0 writes the data
def generate_data(cfg, out_dir: Path | None = None) -> Path:
    """Write the `synthetic:` data set and return the dataset YAML path. Without `out_dir`
    it goes to <cache_dir>/synthetic-<hash of the synthetic section>/ and is reused when
    already there (the generator is deterministic in its config).

    Example:
        >>> generate_data(load_config(None), Path("data/demo"))
        PosixPath('data/demo/dataset.yaml')
    """
    scfg = cfg.synthetic
    if scfg is None:
        raise ConfigError("the config has no synthetic: section to generate data from")
    cached = out_dir is None
    if cached:
        out_dir = Path(cfg.cache_dir) / f"synthetic-{config_hash(scfg.to_dict())}"
        marker = out_dir / "generated.json"
        if marker.is_file():
            path = Path(json.loads(marker.read_text())["dataset_yaml"])
            if path.is_file():
                log.info("synthetic data: reusing %s", out_dir)
                return path
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = Path(generate_synthetic(scfg, out_dir))
    log.info("synthetic data: generated into %s in %.1f s", out_dir, time.perf_counter() - t0)
    if cached:
        write_json({"dataset_yaml": str(path.resolve())}, out_dir / "generated.json")
    return path


def target_folder(target: str) -> str:
    """The folder of a target's outputs under a comparison's run folder: the domain value with
    path separators (and NUL) replaced by '_', so that it names one folder inside the run
    folder ('.' and '..' get a '_' in front).

    Example:
        >>> target_folder("news/sport"), target_folder("..")
        ('news_sport', '_..')
    """
    import re
    name = re.sub(r"[/\\\x00]", "_", str(target))
    return "_" + name if name in ("", ".", "..") else name


def retarget(data_cfg, target: str | None):
    """``data_cfg`` with ``target`` as its target domain and every other domain it names
    (its sources, its own target) plus the experiment's other ``targets`` as the source.

    Example:
        >>> retarget(data_cfg, "tgt_b").domain.target
        'tgt_b'
    """
    if target is None:
        return data_cfg
    return dataclasses.replace(data_cfg, domain=dataclasses.replace(
        data_cfg.domain, target=target,
        source=tuple(d for d in (*data_cfg.domain.source, data_cfg.domain.target)
                     if d != target)))


@distributed.main_first  # torchrun: rank 0 fills the data cache, the others then read it
def load_data(cfg, target: str | None = None):
    """The DataBundle of the experiment: the `data:` section if given, else the generated
    synthetic data (generated first if needed). With `target`, that domain is the target
    and the experiment's other `targets` join the source domains (see `retarget`).

    Example:
        >>> bundle = load_data(load_config("exp.yaml"))
        >>> len(bundle.splits["target_train"])
        18000
    """
    if cfg.data is not None:
        data_cfg = cfg.data
    else:
        path = generate_data(cfg)
        data_cfg = DataConfig.from_dict(read_data_yaml(path), path.parent)
        truth = path.parent / "ground_truth.json"
        if truth.is_file():  # the ceiling any model can reach: helps read the table
            doms = json.loads(truth.read_text()).get("domains", {})
            for name, d in doms.items():
                if "oracle_auc" in d:
                    log.info("synthetic ground truth, domain %s: oracle AUC %.4f, LogLoss %.4f",
                             name, d["oracle_auc"], d.get("oracle_logloss", float("nan")))
    if target is not None:
        data_cfg = retarget(data_cfg, target)
        others = [t for t in (cfg.targets or []) if t not in (target, *data_cfg.domain.source)]
        if others:
            data_cfg = dataclasses.replace(data_cfg, domain=dataclasses.replace(
                data_cfg.domain, source=(*data_cfg.domain.source, *others)))
    t0 = time.perf_counter()
    bundle = prepare_data(data_cfg)
    check_label_classes(bundle, data_cfg)
    bundle.data_config = data_cfg  # a saved model keeps the column roles (train/predict.py)
    sizes = ", ".join(f"{k} {len(v):,}" for k, v in bundle.splits.items())
    log.info("data ready in %.1f s: %s; %d fields, %d embedding rows", time.perf_counter() - t0,
             sizes, len(bundle.feature_map.fields), bundle.feature_map.num_rows)
    return bundle


def check_label_classes(bundle, data_cfg) -> None:
    """Every split holds both labels, or a DataError naming the split: its AUC (early
    stopping, model selection, the reported metric) is undefined otherwise. The target's
    test split holds at least two of each (the report's paired tests need them)."""
    for name, split in bundle.splits.items():
        n = len(split)
        positives = int(split.label.sum().item()) if n else 0
        if n and positives in (0, n):
            if name.startswith("source"):
                whose = f"the source domains {list(data_cfg.domain.source)}"
            else:
                whose = f"target domain '{data_cfg.domain.target}'"
            raise DataError(
                f"split '{name}' of {whose} holds only label {int(positives == n)} "
                f"({n:,} row{'s' if n != 1 else ''}): "
                f"its AUC is undefined; check the label column '{data_cfg.label}', or give the "
                "split more rows (data.split fractions, or more data)")
        if name == "target_test" and n and min(positives, n - positives) < 2:
            # The report's paired tests (DeLong's variance of the AUC) need two of each.
            raise DataError(
                f"split '{name}' of target domain '{data_cfg.domain.target}' holds "
                f"{positives} row{'s' if positives != 1 else ''} of label 1 and "
                f"{n - positives} of label 0: an AUC from fewer than 2 of each says next to "
                "nothing, and compare's paired significance tests (DeLong) cannot be "
                "computed; give the split more rows (data.split fractions, or more data)")


def _data_fingerprint(bundle) -> str:
    """Hash of the feature map and the source rows: a pre-trained model is reused only for
    exactly the data it was trained on."""
    h = hashlib.sha256()
    h.update(json.dumps(bundle.feature_map.to_dict(), sort_keys=True, default=str).encode())
    for name in ("source_train", "source_valid"):
        for t in bundle.splits[name].to_dict().values():
            if t is not None:
                h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _domain_names(bundle):
    return list(bundle.feature_map.domain_values)


# -- pre-training ----------------------------------------------------------------------------

def pretrain(cfg, bundle, *, resume: bool = True, force: bool = False,
             progress: bool | None = None) -> tuple[dict, dict]:
    """Pre-train the base model on source_train (early stopping on source_valid), once per
    (data, model config, pretrain config, seed): the result is cached under
    <cache_dir>/pretrained/ and reused. Returns (state_dict, info).

    Example:
        >>> state, info = pretrain(cfg, bundle)
        >>> info["valid_auc"], info["path"]
    """
    model_cfg = cfg.model.to_dict()
    path = pretrained_path(cfg, bundle)
    key = path.stem[len(model_cfg["name"]) + 1:]
    out_dir = path.parent
    if not force and distributed.broadcast_object(path.is_file()):  # rank 0's view
        cached = load_pretrained(path)
        if cached is not None:
            log.info("pretrain: reusing %s (source valid AUC %.4f)", path,
                     cached["info"]["valid_auc"])
            return cached["model"], dict(cached["info"], path=str(path), reused=True)
    seed_everything(cfg.pretrain.seed)
    model = build_base_model(bundle.feature_map, cfg.model)
    last = out_dir / f"{path.stem}-last.pt"
    # Temp files of checkpoint writes that a kill interrupted (a live writer's is seconds old).
    remove_stale_temps(out_dir, last.name, older_than=600)
    remove_stale_temps(out_dir, path.name, older_than=600)
    if resume and not force and last.is_file():
        try:
            load_checkpoint(last)
        except CheckpointError:  # the cache's own checkpoint: nothing of the user's is lost
            msg = f"pretrain: {str(last)!r} is damaged; deleted it, training from the start"
            log.warning(msg)
            last.unlink(missing_ok=True)
    trainer = Trainer(model, cfg.pretrain, checkpoint_path=last,
                      seed=cfg.pretrain.seed, domain_names=_domain_names(bundle),
                      desc="pretrain", progress=progress, device=cfg.torch_device())
    t0 = time.perf_counter()
    fit = trainer.fit(bundle.splits["source_train"], bundle.splits["source_valid"],
                      resume=resume and not force)
    valid = trainer.evaluate(bundle.splits["source_valid"])
    info = {"valid_auc": valid["auc"], "valid_logloss": valid["logloss"],
            "valid_per_domain": valid["per_domain"],
            "best_epoch": fit.best_epoch, "epochs_run": fit.epochs_run,
            "train_samples_per_s": fit.samples_per_s, "wall_seconds": time.perf_counter() - t0,
            "history": fit.history, "model": model_cfg, "key": key}
    for dom, m in valid["per_domain"].items():
        log.info("pretrain: source valid %s: AUC %s LogLoss %.4f (%d rows)", dom,
                 "undefined (its rows hold one label)" if math.isnan(m["auc"])
                 else f"{m['auc']:.4f}", m["logloss"], m["n"])
    if distributed.is_main_process():  # torchrun: only rank 0 writes files
        save_atomic({"model": {k: v.cpu() for k, v in model.state_dict().items()},
                     "info": info}, path)
        (out_dir / f"{path.stem}-last.pt").unlink(missing_ok=True)
    distributed.barrier()
    log.info("pretrain: %s, %d epochs, source valid AUC %.4f LogLoss %.4f, %.0f samples/s, "
             "%.1f s -> %s", model_cfg["name"], fit.epochs_run, valid["auc"], valid["logloss"],
             fit.samples_per_s, info["wall_seconds"], path)
    return model.state_dict(), dict(info, path=str(path), reused=False)


def pretrained_path(cfg, bundle) -> Path:
    """Where `pretrain` caches the base model of (data, model config, pretrain config):
    <cache_dir>/pretrained/<model>-<key>.pt.

    Example:
        >>> pretrained_path(cfg, bundle).is_file()     # True: `pretrain` would reuse it
    """
    model_cfg = cfg.model.used_dict()  # a DCN-only key does not re-train a DNN
    key = config_hash({"data": _data_fingerprint(bundle), "model": model_cfg,
                       "pretrain": cfg.pretrain.to_dict()})
    return Path(cfg.cache_dir) / "pretrained" / f"{model_cfg['name']}-{key}.pt"


def load_pretrained(path: Path) -> dict | None:
    """The cached pre-trained checkpoint at `path`, or None when there is none; a damaged
    one (truncated, garbage, missing keys) is deleted with a warning, so it is trained again.

    Example:
        >>> load_pretrained(pretrained_path(cfg, bundle))["info"]["valid_auc"]
    """
    if not Path(path).is_file():
        return None
    try:
        ck = load_checkpoint(path)
        if not isinstance(ck.get("model"), dict):
            raise KeyError("model")
        float(ck["info"]["valid_auc"])  # a checkpoint of something else fails here
        return ck
    except (CheckpointError, KeyError, TypeError, ValueError) as e:
        msg = (f"the cached pre-trained model {str(path)!r} is damaged ({type(e).__name__}); "
               "deleted it, pre-training again")
        log.warning(msg)
        Path(path).unlink(missing_ok=True)
        return None


# -- one strategy ----------------------------------------------------------------------------

def _tau_schedule(cfg):
    acfg = cfg.autoft
    epochs = cfg.finetune.base_epochs
    # progress runs 0 -> 1 over the configured epochs, so an early-stopped run has seen the
    # same temperatures as the first epochs of a full one.
    return lambda epoch: tau_at(acfg, epoch / (epochs - 1) if epochs > 1 else 0.0)


def _fixed_tau(model):
    """The refit's and the retrain's schedule: the temperature the stage-one best was
    validated at, held (annealing again from ``tau`` would make soft gates a near 50/50 blend
    in the first epochs, a function the fixed policy never chose; hard gates do not depend
    on it)."""
    tau = float(model.tau)
    return lambda epoch: tau


def _refit(cfg, model, fit, bundle, seed, out_dir, domains, strategy, *, resume, progress,
           device) -> dict:
    """autoft.policy_refit: the policy frozen, the model trained on on all target training
    rows from the stage-one best, kept only where validation improves."""
    for p in model.policy.parameters():
        p.requires_grad_(False)
    trainer = Trainer(model, cfg.finetune, settings=checkpoint_settings(cfg),
                      checkpoint_path=out_dir / "last_refit.pt",
                      seed=seed + 1, tau_schedule=_fixed_tau(model), domain_names=domains,
                      desc=f"{strategy} seed {seed} refit", progress=progress, device=device,
                      start_best=fit.best_metric)
    again = trainer.fit(bundle.splits["target_train"], bundle.splits["target_valid"],
                        resume=resume)
    (out_dir / "last_refit.pt").unlink(missing_ok=True)
    history = fit.history + [dict(h, stage="refit") for h in again.history]
    return {"refit_best_epoch": again.best_epoch, "epochs_run": fit.epochs_run + again.epochs_run,
            "best_at_cap": fit.best_at_cap or again.best_at_cap, "history": history,
            "valid_best": again.best_metric,
            "train_seconds": fit.train_seconds + again.train_seconds}


def _retrain(cfg, model, fit, pretrained, bundle, seed, out_dir, domains, strategy,
             value_counts, *, resume, progress, device):
    """autoft.policy_refit: retrain. The policy found by the alternating (search) stage is
    fixed; a model built afresh from the pre-trained one is trained on all target training
    rows under its noise-free choices, early-stopped on validation like every strategy.
    Returns (the retrained model, the run-record fields)."""
    again = build_transfer_model(strategy, pretrained, bundle.feature_map, cfg.model, cfg.autoft,
                                 value_counts=value_counts)
    again.policy.load_state_dict(model.policy.state_dict())
    again.fix_policy()
    again.to(device)
    trainer = Trainer(again, cfg.finetune, settings=checkpoint_settings(cfg),
                      checkpoint_path=out_dir / "last_retrain.pt",
                      seed=seed + 1, tau_schedule=_fixed_tau(model), domain_names=domains,
                      desc=f"{strategy} seed {seed} retrain", progress=progress, device=device)
    second = trainer.fit(bundle.splits["target_train"], bundle.splits["target_valid"],
                         resume=resume)
    (out_dir / "last_retrain.pt").unlink(missing_ok=True)
    history = fit.history + [dict(h, stage="retrain") for h in second.history]
    return again, {
        "search_best_epoch": fit.best_epoch, "search_valid_best": fit.best_metric,
        "best_epoch": second.best_epoch, "epoch_cap": second.epoch_cap,
        "epochs_run": fit.epochs_run + second.epochs_run,
        "best_at_cap": fit.best_at_cap or second.best_at_cap, "history": history,
        "valid_best": second.best_metric,
        "train_seconds": fit.train_seconds + second.train_seconds}


def _valid_auc(model, valid, batch_size, device) -> float:
    return float(compute_metrics(valid.label, predict(model, valid, batch_size,
                                                      device=device))["auc"])


def _one_sided_p(test) -> float:
    """DeLong's one-sided p-value that the first scores' AUC is the higher (1: no evidence)."""
    if test is None:
        return 1.0
    return test["p_value"] / 2 if test["diff"] > 0 else 1.0 - test["p_value"] / 2


def _crossfit_scores(cfg, pretrained, bundle, seed, out_dir, domains, strategy, value_counts,
                     ks, *, progress, device):
    """frequency_select: crossfit. The target training rows split in two seeded halves; per
    half a k = 0 model trained from the pre-trained start on the other half (its own value
    counts; early stopping on the validation split, as every run), then scored on this half
    with the rule at each k. Returns (labels [n], {k: logits [n]}, epochs, seconds)."""
    train = bundle.splits["target_train"]
    valid = bundle.splits["target_valid"]
    batch = cfg.finetune.eval_batch_size
    num_rows = bundle.feature_map.num_rows
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 7919))
    halves = (perm[: len(train) // 2].sort().values, perm[len(train) // 2:].sort().values)
    labels, scores, epochs, seconds = [], {k: [] for k in ks}, 0, 0.0
    for j in (0, 1):
        fit_rows, held = train.index(halves[1 - j]), train.index(halves[j])
        counts = (value_counts[0], count_rows(fit_rows, num_rows))
        half = build_transfer_model(strategy, pretrained, bundle.feature_map, cfg.model,
                                    cfg.autoft, value_counts=counts)
        half.set_frequency_threshold(0.0)
        half.to(device)
        ckpt = out_dir / f"last_crossfit{j}.pt"
        trainer = Trainer(half, cfg.finetune, settings=checkpoint_settings(cfg),
                          checkpoint_path=ckpt, seed=seed + 2 + j,
                          tau_schedule=_tau_schedule(cfg), policy_lr=cfg.autoft.policy_lr,
                          policy_weight_decay=cfg.autoft.policy_weight_decay,
                          domain_names=domains, desc=f"{strategy} seed {seed} half {j}",
                          progress=progress, device=device,
                          policy_warmup=cfg.autoft.policy_warmup,
                          policy_warmup_gates=cfg.autoft.policy_warmup_gates)
        got = trainer.fit(fit_rows, valid)
        ckpt.unlink(missing_ok=True)
        epochs, seconds = epochs + got.epochs_run, seconds + got.train_seconds
        for k in ks:
            half.set_frequency_threshold(k)
            scores[k].append(predict(half, held, batch, device=device).numpy())
        labels.append(held.label.numpy())
    return (np.concatenate(labels), {k: np.concatenate(v) for k, v in scores.items()}, epochs,
            seconds)


def _frequency_stage(cfg, model, fit, pretrained, bundle, seed, out_dir, domains, strategy,
                     value_counts, *, resume, progress, device):
    """autoft.field_policy: frequency. ``model`` was trained with threshold 0 (only values the
    target never saw are held frozen; the network gates the rest). Each threshold of frequency_thresholds is scored on the
    validation split with that model (the rule applied to its weights); the best, if above
    0's score, is trained again from the pre-trained start under the rule and kept only when
    its validation AUC beats the first model's by DeLong's paired test at one-sided p below
    frequency_keep_p / len(frequency_thresholds) (Bonferroni: k was the best of that many on
    the same rows; on a small validation split a difference of a few thousandths is noise,
    and the rule's model must not be picked on noise). Returns (the kept model,
    record fields)."""
    valid = bundle.splits["target_valid"]
    batch = cfg.finetune.eval_batch_size
    ks = [0.0] + [float(k) for k in cfg.autoft.frequency_thresholds]
    # The threshold is the best of len(frequency_thresholds) on the same rows: Bonferroni.
    level = cfg.autoft.frequency_keep_p / max(1, len(cfg.autoft.frequency_thresholds))
    crossfit = cfg.autoft.frequency_select == "crossfit"
    extra_epochs, extra_seconds = 0, 0.0
    if crossfit:
        labels, held_scores, extra_epochs, extra_seconds = _crossfit_scores(
            cfg, pretrained, bundle, seed, out_dir, domains, strategy, value_counts, ks,
            progress=progress, device=device)
        scan = {k: float(compute_metrics(torch.from_numpy(labels),
                                         torch.from_numpy(held_scores[k]))["auc"]) for k in ks}
    else:
        scan = {}
        for k in ks:
            model.set_frequency_threshold(k)
            scan[k] = _valid_auc(model, valid, batch, device)
    best_k = max(scan, key=lambda k: (scan[k], -k))  # ties: the smaller threshold
    # torchrun: rank 0's choice for every rank (with eval_gates: sample each rank scores on
    # its own noise, and ranks taking different paths would hang in the collectives).
    best_k = distributed.broadcast_object(best_k)
    model.set_frequency_threshold(0.0)
    fields = {"frequency_scan": {f"{k:g}": v for k, v in scan.items()},
              "frequency_select": cfg.autoft.frequency_select,
              "frequency_threshold": 0.0, "frequency_retrained": False}
    if crossfit:
        fields.update(epochs_run=fit.epochs_run + extra_epochs,
                      train_seconds=fit.train_seconds + extra_seconds)
        if best_k != 0.0:
            try:
                test = delong_test(labels, held_scores[best_k], held_scores[0.0])
            except ValueError as e:  # too few clicks (or non-clicks) to test
                log.warning("[seed %d] %s: the frequency rule is not used: %s", seed, strategy, e)
                test = None
            fields.update(frequency_keep_p_value=_one_sided_p(test), frequency_keep_level=level)
            if not distributed.broadcast_object(
                    test is not None and test["diff"] > 0 and _one_sided_p(test) < level):
                best_k = 0.0
    if best_k == 0.0:
        return model, fields
    again = build_transfer_model(strategy, pretrained, bundle.feature_map, cfg.model, cfg.autoft,
                                 value_counts=value_counts)
    again.set_frequency_threshold(best_k)
    again.to(device)
    trainer = Trainer(again, cfg.finetune, settings=checkpoint_settings(cfg),
                      checkpoint_path=out_dir / "last_frequency.pt",
                      seed=seed + 1, tau_schedule=_tau_schedule(cfg),
                      policy_lr=cfg.autoft.policy_lr,
                      policy_weight_decay=cfg.autoft.policy_weight_decay, domain_names=domains,
                      desc=f"{strategy} seed {seed} k={best_k:g}", progress=progress,
                      device=device, policy_warmup=cfg.autoft.policy_warmup,
                      policy_warmup_gates=cfg.autoft.policy_warmup_gates)
    second = trainer.fit(bundle.splits["target_train"], valid, resume=resume)
    (out_dir / "last_frequency.pt").unlink(missing_ok=True)
    fields.update(frequency_first_valid_best=fit.best_metric,
                  frequency_second_valid_best=second.best_metric,
                  epochs_run=fit.epochs_run + extra_epochs + second.epochs_run,
                  train_seconds=fit.train_seconds + extra_seconds + second.train_seconds,
                  history=fit.history + [dict(h, stage=f"k={best_k:g}") for h in second.history])
    if crossfit:  # chosen and tested on the held-out training rows: kept
        fields.update(frequency_threshold=best_k, frequency_retrained=True,
                      best_epoch=second.best_epoch, valid_best=second.best_metric,
                      best_at_cap=second.best_at_cap, epoch_cap=second.epoch_cap)
        return again, fields
    first_scores = predict(model, valid, batch, device=device).numpy()
    second_scores = predict(again, valid, batch, device=device).numpy()
    try:
        test = delong_test(valid.label.numpy(), second_scores, first_scores)
    except ValueError as e:  # too few clicks (or non-clicks) on the validation rows to test
        log.warning("[seed %d] %s: the frequency rule's model is not kept: %s", seed, strategy, e)
        test = None
    p_one = _one_sided_p(test)
    fields["frequency_keep_p_value"] = float(p_one)
    fields["frequency_keep_level"] = level
    if distributed.broadcast_object(test is not None and test["diff"] > 0 and p_one < level):
        fields.update(frequency_threshold=best_k, frequency_retrained=True,
                      best_epoch=second.best_epoch, valid_best=second.best_metric,
                      best_at_cap=second.best_at_cap, epoch_cap=second.epoch_cap)
        return again, fields
    return model, fields


@distributed.main_then_broadcast  # torchrun: only rank 0 writes files
def _write_grid(out: Path, grid: list[dict]) -> None:
    import csv
    keys = sorted({k for r in grid for k in r}, key=lambda k: (k not in (
        "strategy", "setting", "valid_auc", "valid_logloss", "valid_runs", "test_auc",
        "test_runs", "picked"), k))
    tmp = out / ".grid.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(grid)
    tmp.replace(out / "grid.csv")
    write_json({r["strategy"]: r["setting"] for r in grid if r["picked"]}, out / "picks.json")


@torch.no_grad()
def _policy_by_frequency(model, test, train, cfg, device) -> list[dict]:
    """The field policy's test choices split by how often each instance's value occurs in
    the target training rows the model was fitted to (single-valued fields)."""
    names = list(model.net.single_fields)
    if not names:
        return []
    was = model.training
    model.eval()
    chosen = []
    try:
        for b in iterate_batches(test, cfg.finetune.eval_batch_size, False):
            b = b if device.type == "cpu" else b.to(device)
            model(b)
            chosen.append(model.last_gates["field"][:, :len(names), 1].float().cpu())
    finally:
        model.train(was)
    tuned = torch.cat(chosen).numpy() if chosen else np.zeros((0, len(names)))
    return tuned_fraction_by_frequency(
        {n: test.sparse[:, i].numpy() for i, n in enumerate(names)},
        {n: tuned[:, i] for i, n in enumerate(names)},
        {n: train.sparse[:, i].numpy() for i, n in enumerate(names)})


def policy_inputs(cfg, bundle, strategy: str, seed: int):
    """What a strategy's policy trains on, as ``autoft:`` says: (the model's training rows,
    the fixed held-out slice of the policy or None, the rotating held-out fraction or None,
    the value counts (source, model's training rows) or None). The same for every run
    and for `autoft-fast bench train`.

    Example:
        >>> train, policy_data, rotating, counts = policy_inputs(cfg, bundle, "autoft", 0)
    """
    row, acfg = STRATEGY_TABLE[strategy], cfg.autoft
    train = bundle.splits["target_train"]
    policy_data = rotating = value_counts = None
    if row.has_policy and acfg.policy_objective == "heldout":
        if acfg.policy_holdout_mode == "rotating":
            rotating = acfg.policy_holdout  # a fresh slice each epoch (Trainer)
        else:
            # The policy's rows are never used for model weights (see train/holdout.py).
            train, policy_data = split_holdout(train, acfg.policy_holdout, seed)
    frequency = row.field_policy and acfg.field_policy == "frequency"
    if frequency and acfg.policy_objective == "heldout":  # a config built past parse_config
        from ..config.experiment import check_field_policy
        check_field_policy(acfg, [strategy])
    if row.has_policy and ("freq" in acfg.policy_input or frequency):
        num_rows = bundle.feature_map.num_rows
        value_counts = (count_rows(bundle.splits["source_train"], num_rows),
                        count_rows(train, num_rows))
    return train, policy_data, rotating, value_counts


def run_strategy(cfg, bundle, pretrained_state: dict | None, strategy: str, seed: int,
                 out_dir: Path, *, resume: bool = False, keep_model: bool = False,
                 progress: bool | None = None) -> dict:
    """Fine-tune one strategy with one seed on target_train (early stopping on
    target_valid), evaluate on target_test, and return the run record (also written to
    out_dir/result.json). source_only only evaluates; target_only starts from scratch.

    With `resume`, a finished run (result.json present) is read back and an interrupted one
    continues from out_dir/last.pt.

    Example:
        >>> rec = run_strategy(cfg, bundle, state, "autoft", 0, Path("runs/x/autoft-seed0"))
        >>> rec["auc"], rec["policy_stats"]["field"]
    """
    row = STRATEGY_TABLE[strategy]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out_dir, "last.pt")  # left by a kill during a checkpoint write
    remove_stale_temps(out_dir, "result.json")  # ... or during the result's write
    result_path = out_dir / "result.json"
    # What this run's result depends on (the setting of a --tune grid included): a finished
    # run of other settings in this folder is refused on resume, never reused.
    settings = config_hash(cfg.training_dict())
    if resume and result_path.is_file():
        try:
            rec = json.loads(result_path.read_text())
            if not isinstance(rec, dict) or "auc" not in rec:
                raise ValueError("not a run record")
            rec = _record_from_json(rec)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"--resume: the finished {strategy} run (seed {seed}) in {out_dir} has a "
                f"damaged {result_path.name} ({getattr(e, 'strerror', None) or e}); delete "
                f"{str(result_path)!r} to run it again") from None
        if rec.get("training_config_hash", settings) != settings:
            raise ValueError(
                f"--resume: {out_dir} holds a finished {strategy} run (seed {seed}) of other "
                "settings than this config gives it (the config's data, model, pretrain, "
                "finetune, autoft or search section changed): start a new run folder")
        # Where the scores are now (the folder may have moved, or the path been relative):
        # always this folder's own file, never one the record names elsewhere (a copied
        # folder would report the original's scores).
        if rec.get("test_scores_path") is not None:
            if not (out_dir / "test_scores.npy").is_file():
                raise ValueError(
                    f"--resume: the finished {strategy} run (seed {seed}) in {out_dir} lacks "
                    f"its test_scores.npy, which the report's paired tests read; delete "
                    f"{str(result_path)!r} to run it again")
            rec["test_scores_path"] = str(out_dir / "test_scores.npy")
        log.info("[seed %d] %s: already done (AUC %.4f)", seed, strategy, rec["auc"])
        if distributed.is_main_process():  # a kill between the result's write and this
            (out_dir / "last.pt").unlink(missing_ok=True)
        if keep_model and not (out_dir / "model.pt").is_file():
            # Finished before --keep-models was given: its weights are gone.
            log.warning("[seed %d] %s: finished without --keep-models, so %s has no model for "
                        "predict; delete %s to train it again with one", seed, strategy,
                        out_dir, result_path)
        return rec
    t0 = time.perf_counter()
    seed_everything(seed)
    pretrained = None
    if row.needs_pretrained:
        if pretrained_state is None:
            raise ValueError(f"strategy {strategy!r} needs a pre-trained model")
        pretrained = build_base_model(bundle.feature_map, cfg.model)
        pretrained.load_state_dict(pretrained_state)
    acfg = cfg.autoft
    train, policy_data, rotating, value_counts = policy_inputs(cfg, bundle, strategy, seed)
    frequency = row.field_policy and acfg.field_policy == "frequency"
    model = build_transfer_model(strategy, pretrained, bundle.feature_map, cfg.model, acfg,
                                 value_counts=value_counts)
    device = cfg.torch_device()
    model.to(device)
    domains = _domain_names(bundle)
    prior_wall = 0.0
    rec = {"strategy": strategy, "seed": seed, "best_epoch": None, "epochs_run": 0,
           "train_samples_per_s": float("nan"), "train_seconds": 0.0, "history": [],
           "training_config_hash": settings}
    if row.trains:
        trainer = Trainer(model, cfg.finetune, settings=checkpoint_settings(cfg),
                          checkpoint_path=out_dir / "last.pt", seed=seed,
                          tau_schedule=_tau_schedule(cfg),
                          policy_lr=cfg.autoft.policy_lr,
                          policy_weight_decay=cfg.autoft.policy_weight_decay,
                          domain_names=domains, desc=f"{strategy} seed {seed}",
                          progress=progress, device=device, policy_data=policy_data,
                          policy_warmup=acfg.policy_warmup,
                          policy_warmup_gates=acfg.policy_warmup_gates,
                          policy_rotating=rotating)
        fit_start = time.perf_counter()
        fit = trainer.fit(train, bundle.splits["target_valid"], resume=resume)
        # A resumed fit: the wall time of its earlier start(s), kept in the checkpoint.
        prior_wall = max(0.0, fit.wall_seconds - (time.perf_counter() - fit_start))
        rec.update(best_epoch=fit.best_epoch, epochs_run=fit.epochs_run,
                   best_at_cap=fit.best_at_cap, epoch_cap=fit.epoch_cap,
                   train_samples_per_s=fit.samples_per_s, train_seconds=fit.train_seconds,
                   history=fit.history, valid_best=fit.best_metric)
        if policy_data is not None and acfg.policy_refit == "continue":
            rec.update(_refit(cfg, model, fit, bundle, seed, out_dir, domains, strategy,
                              resume=resume, progress=progress, device=device))
        elif policy_data is not None and acfg.policy_refit == "retrain":
            model, stage = _retrain(cfg, model, fit, pretrained, bundle, seed, out_dir, domains,
                                    strategy, value_counts, resume=resume, progress=progress,
                                    device=device)
            rec.update(stage)
            train = bundle.splits["target_train"]  # the rows the returned model was fitted to
        if frequency:
            model, stage = _frequency_stage(cfg, model, fit, pretrained, bundle, seed, out_dir,
                                            domains, strategy, value_counts, resume=resume,
                                            progress=progress, device=device)
            rec.update(stage)
    # The cap of the fit whose best epoch is reported (finetune.epochs, or more by cap_steps).
    rec["epoch_cap"] = rec.get("epoch_cap") or cfg.finetune.base_epochs
    rec["target"] = bundle.feature_map.domain_values[-1]
    if hasattr(model, "reset_policy_stats"):
        model.reset_policy_stats()
    test_data = bundle.splits["target_test"]
    logits = predict(model, test_data, cfg.finetune.eval_batch_size, device=device)
    test = compute_metrics(test_data.label, logits, getattr(test_data, "domain", None), domains)
    stats = model.policy_stats() if hasattr(model, "policy_stats") else {}
    # The test logits, for the paired significance tests of the report.
    main = distributed.is_main_process()  # torchrun: only rank 0 writes files
    if main:
        np.save(out_dir / "test_scores.npy", logits.numpy().astype(np.float64))
    rec.update(auc=test["auc"], logloss=test["logloss"], per_domain=test["per_domain"],
               policy_stats=stats, wall_seconds=time.perf_counter() - t0 + prior_wall,
               test_scores_path=str(out_dir / "test_scores.npy"))
    if getattr(model, "field_gate_names", None):
        rec["policy_by_frequency"] = _policy_by_frequency(model, test_data, train, cfg, device)
    if keep_model and main:  # model.pt and model.json: what `autoft-fast predict` loads
        save_model(out_dir, model, cfg, bundle, strategy, seed)
    write_json(rec, result_path)
    if main:
        (out_dir / "last.pt").unlink(missing_ok=True)
    distributed.barrier()
    log.info("[seed %d] %-16s AUC %.4f  LogLoss %.4f  %s samples/s  %.1f s", seed, strategy,
             rec["auc"], rec["logloss"],
             "n/a" if math.isnan(rec["train_samples_per_s"])
             else f"{rec['train_samples_per_s']:,.0f}", rec["wall_seconds"])
    return rec


# -- the comparison ----------------------------------------------------------------------------

@distributed.main_then_broadcast  # torchrun: rank 0 writes, every rank gets the tables
def write_outputs(run_dir: Path, runs: list[dict], order: list[str], *, labels=None,
                  title: str | None = None) -> tuple[str, list[dict]]:
    """results.csv, runs.csv, results.md and the PNG plots under `run_dir`; returns the
    markdown table and the summary rows. `labels` (the target's test labels) turns on the
    paired significance columns (the runs' saved test scores against finetune_all's).

    Example:
        >>> table, rows = write_outputs(run_dir, runs, cfg.strategies, labels=test_labels)
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = aggregate(runs, order, labels=labels)
    table = markdown_table(rows)
    write_runs_csv(runs, run_dir / "runs.csv")
    write_results_csv(rows, run_dir / "results.csv")
    # The policy files of an earlier start of this folder (a resume may run other
    # strategies): removed, and written again where these runs have a policy.
    for name in ("policy.csv", "policy_fields.png", "policy_layers.png", "policy_epochs.png",
                 "policy_by_frequency.png"):
        (run_dir / name).unlink(missing_ok=True)
    write_policy_csv(runs, run_dir / "policy.csv")
    policy = policy_table(runs)
    if policy:  # the policies' behaviour goes with the results (mean over seeds, test rows)
        table = f"{table}\n\n{policy}"
    (run_dir / "results.md").write_text(table + "\n", encoding="utf-8")
    plot_auc(rows, run_dir / "auc.png", title=title)
    plot_policy(runs, "field", run_dir / "policy_fields.png")
    plot_policy(runs, "layer", run_dir / "policy_layers.png")
    # Per-instance behaviour of the first run that has a field policy: its tuned fraction per
    # field over the epochs (validation rows) and by the value's frequency in the target.
    gated = next((r for r in runs if r.get("policy_by_frequency")), None)
    if gated is not None:
        # A frequency-rule model that was trained and then not kept is left out: the plot
        # shows the stages of the model the run reports.
        dropped = gated.get("frequency_retrained") is False
        epochs = [{"epoch": h["epoch"], **h["policy"],
                   **({"stage": h["stage"]} if h.get("stage") else {})}
                  for h in gated.get("history", [])
                  if h.get("policy") and h["policy"].get("field")
                  and not (dropped and str(h.get("stage", "")).startswith("k="))]
        if epochs:
            plot_policy_epochs(epochs, run_dir / "policy_epochs.png",
                               title=f"Tuned-path fraction per field over the epochs "
                                     f"({gated['strategy']}, seed {gated['seed']})")
        plot_policy_by_frequency(gated["policy_by_frequency"],
                                 run_dir / "policy_by_frequency.png",
                                 title=f"Tuned-path fraction by the value's count in the target "
                                       f"training rows ({gated['strategy']}, seed "
                                       f"{gated['seed']}, test rows)")
    return table, rows


def search_grid(cfg, strategy: str) -> list[dict]:
    """The settings ``compare --tune`` tries for ``strategy`` (from the ``search:`` section):
    a list of ``{"finetune": {...}, "autoft": {...}}`` overrides, one per combination.

    Example:
        >>> len(search_grid(cfg, "l2sp"))     # 3 learning rates x 3 alphas
        9
    """
    row = STRATEGY_TABLE[strategy]
    if not row.trains:
        return [{"finetune": {}, "autoft": {}}]
    grid = [{"finetune": {"lr": lr}, "autoft": {}} for lr in cfg.search.lr]
    extra = []
    if row.l2sp:
        extra = [{"l2sp_alpha": a} for a in cfg.search.l2sp_alpha]
    elif row.has_policy:
        extra = [{"policy_lr": p, "tuned_budget": None if b >= 1.0 else b}
                 for p in cfg.search.policy_lr for b in cfg.search.tuned_budget]
    if extra:
        grid = [{"finetune": g["finetune"], "autoft": e} for g in grid for e in extra]
    return grid


def _with_setting(cfg, setting: dict):
    from ..config import AutoFTConfig, TrainConfig
    return dataclasses.replace(
        cfg, finetune=TrainConfig.from_dict({**cfg.finetune.to_dict(), **setting["finetune"]},
                                            "finetune"),
        autoft=AutoFTConfig.from_dict({**cfg.autoft.to_dict(), **setting["autoft"]}))


def _setting_name(setting: dict) -> str:
    parts = [f"{k}={v}" for sec in ("finetune", "autoft") for k, v in setting[sec].items()]
    return ",".join(parts) or "default"


def _setting_folder(setting: dict) -> str:
    """A folder name for a grid setting: its name with every character outside
    [A-Za-z0-9._=,+-] replaced by '_' (the values are numbers, None or names)."""
    import re
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", _setting_name(setting))


def tune_strategy(cfg, bundle, state, strategy: str, out: Path, *, resume: bool = False,
                  progress: bool | None = None,
                  keep_models: bool = False) -> tuple[list[dict], list[dict]]:
    """Run ``strategy`` for every setting of its search grid and every seed; pick the setting
    with the best mean validation score of ``finetune.monitor`` (AUC, highest; or LogLoss,
    lowest: the metric early stopping used). Returns (the picked setting's run records, one
    row per setting with its validation and test means).

    Example:
        >>> picked, grid = tune_strategy(cfg, bundle, state, "l2sp", run_dir / "search")
    """
    rows, by_setting = [], []
    monitor = cfg.finetune.monitor
    column = f"valid_{monitor}"
    for setting in search_grid(cfg, strategy):
        c = _with_setting(cfg, setting)
        # Folders named by the setting, not its place in the grid: a resume with a grid
        # extended or reordered reuses exactly the runs of the same setting.
        recs = [run_strategy(c, bundle, state, strategy, seed,
                             out / strategy / f"{_setting_folder(setting)}-seed{seed}",
                             resume=resume,
                             progress=progress, keep_model=keep_models) for seed in cfg.seeds]
        valid = [r.get("valid_best") for r in recs]
        valid = [v for v in valid if v is not None and not math.isnan(v)]
        test = [r["auc"] for r in recs if r.get("auc") is not None and not math.isnan(r["auc"])]
        # The means are over the seeds that ended with a score (as results.csv's); the
        # counts say how many, and a setting that lost a seed ranks below every one that
        # kept all (averaged on its survivors, a half-diverged setting could win).
        rows.append({"strategy": strategy, "setting": _setting_name(setting),
                     column: float(np.mean(valid)) if valid else float("nan"),
                     "valid_runs": len(valid),
                     "test_auc": float(np.mean(test)) if test else float("nan"),
                     "test_runs": len(test), "picked": False,
                     **{f"{sec}.{k}": v for sec in ("finetune", "autoft")
                        for k, v in setting[sec].items()}})
        by_setting.append(recs)
    complete = [r["valid_runs"] == len(cfg.seeds) for r in rows]
    scores = [r[column] if ok or not any(complete) else float("nan")
              for r, ok in zip(rows, complete)]
    if any(complete) and not all(complete):
        log.warning("tune: %s: %s lost a seed (no finite validation score: diverged?) and "
                    "were not picked", strategy,
                    ", ".join(r["setting"] for r, ok in zip(rows, complete) if not ok))
    pick = np.nanargmax if monitor == "auc" else np.nanargmin
    best = int(pick(scores)) if not all(math.isnan(x) for x in scores) else 0
    rows[best]["picked"] = True
    picked = [dict(r, setting=rows[best]["setting"]) for r in by_setting[best]]
    if not STRATEGY_TABLE[strategy].trains:
        log.info("tune: %s trains nothing: no setting to pick", strategy)
    else:
        log.info("tune: %s picked %s (valid %s %.4f)", strategy, rows[best]["setting"],
                 "AUC" if monitor == "auc" else "LogLoss", rows[best][column])
    return picked, rows


def compare(cfg, run_dir: Path, *, resume: bool = False, tune: bool = False,
            progress: bool | None = None,
            keep_models: bool = False) -> tuple[str, list[dict], list[dict]]:
    """Pre-train once per target, then run every configured strategy for every seed and
    write the outputs. With several `targets`, each target's outputs go to
    run_dir/<target>/ and run_dir holds the summary across targets (summary.md/.csv). With
    `tune`, every strategy is run over its `search:` grid and the table shows the setting
    picked on the validation score of `finetune.monitor` (AUC by default; grid.csv and
    picks.json beside the table).
    Returns (markdown table, summary rows, per-seed run records). With `keep_models`, every
    run folder keeps its model for `autoft-fast predict` (model.pt, model.json).

    Example:
        >>> table, rows, runs = compare(load_config("exp.yaml"), make_run_dir(cfg, "compare"))
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    targets = cfg.target_domains()
    many = len(targets) > 1
    folders = {t: target_folder(t) for t in targets}
    if many and len(set(folders.values())) != len(targets):
        raise ConfigError(f"targets {targets} give the same folder name "
                          f"{sorted(folders.values())} (a path separator becomes '_')")
    if not tune and cfg.search != type(cfg.search)():
        log.warning("the search: section is used by compare --tune only; this comparison "
                    "runs every strategy with its configured settings")
    runs, tables, texts, labels_of = [], {}, [], {}
    bundles = {}
    trained = 0
    if many:
        # Every target's data first: a bad target fails now, not after hours of training.
        for target in targets:
            try:
                bundles[target] = load_data(cfg, target)
            except DataError as exc:
                others = [t for t in targets if t != target]
                raise DataError(f"targets: with '{target}' as the target (the other targets, "
                                f"{others}, join the source domains): {exc}") from None
            (run_dir / folders[target]).mkdir(parents=True, exist_ok=True)
            check_run_data(run_dir / folders[target], bundles[target], resume)
    for target in targets:
        out = run_dir / folders[target] if many else run_dir
        bundle = bundles.pop(target) if many else load_data(cfg, target)
        if not many:
            check_run_data(out, bundle, resume)
        name = bundle.feature_map.domain_values[-1]
        state = None
        if any(STRATEGY_TABLE[s].needs_pretrained for s in cfg.strategies):
            state, info = pretrain(cfg, bundle, progress=progress)
            out.mkdir(parents=True, exist_ok=True)
            write_json(info, out / "pretrain.json")
        these, grid = [], []
        for strategy in cfg.strategies:
            if tune:
                picked, rows_ = tune_strategy(cfg, bundle, state, strategy, out / "search",
                                              resume=resume, progress=progress,
                                              keep_models=keep_models)
                these += picked
                grid += rows_
                trained += len(rows_) * len(cfg.seeds)
                _write_grid(out, grid)
            else:
                for seed in cfg.seeds:
                    these.append(run_strategy(cfg, bundle, state, strategy, seed,
                                              out / "runs" / f"{strategy}-seed{seed}",
                                              resume=resume, progress=progress,
                                              keep_model=keep_models))
            if distributed.is_main_process():  # torchrun: only rank 0 writes files
                _write_runs_so_far(runs + these, run_dir / "runs.csv")  # survives a kill
        runs += these
        labels = bundle.splits["target_test"].label.numpy()
        labels_of[name] = labels
        table, rows = write_outputs(out, these, cfg.strategies, labels=labels,
                                    title=f"target {name}" if many else None)
        tables[name] = rows
        texts.append(f"### target {name}\n\n{table}" if many else table)
    if many:
        summary = summary_across_targets(tables)
        text = markdown_summary(summary)
        full = "\n\n".join(texts + [f"### across {len(targets)} targets\n\n{text}"])
        if distributed.is_main_process():  # torchrun: only rank 0 writes files
            write_summary_csv(summary, run_dir / "summary.csv")
            write_runs_csv(runs, run_dir / "runs.csv")
            (run_dir / "summary.md").write_text(full + "\n", encoding="utf-8")
        table, rows = full, summary
    else:
        table, rows = texts[0], tables[next(iter(tables))]
    log.info("compare: %d runs%s in %.1f s", len(runs),
             f" reported ({trained} over the search grids)" if tune else "",
             time.perf_counter() - t0)
    return table, rows, runs
