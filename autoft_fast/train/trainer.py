"""The training loop: Adam(W) with separate model / policy optimizers, early stopping on a
validation metric with best-weights restore, atomic per-epoch checkpoints and exact resume."""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..config.sections import TrainConfig
from ..modules import attach_fused_optimizers
from ..ops.fused_optim import fused_updates_paused
from . import distributed
from .checkpoint import (capture_rng_state, load_checkpoint, restore_rng_state, save_atomic,
                         seed_everything)
from .metrics import compute_metrics, is_better
from .progress import LOGGER_NAME, ProgressBar

__all__ = ["TrainConfig", "Trainer", "FitResult", "predict", "evaluate", "TrainingInterrupted"]


class TrainingInterrupted(RuntimeError):
    """Raised by a test hook to simulate a kill right after an epoch checkpoint."""


@dataclass
class FitResult:
    """What `Trainer.fit` reports: per-epoch history, the best epoch and its metric, and
    training throughput (samples/s over the training steps only, evaluation excluded)."""
    history: list = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    epochs_run: int = 0
    train_samples: int = 0
    train_seconds: float = 0.0
    wall_seconds: float = 0.0
    stopped_early: bool = False
    best_at_cap: bool = False
    epoch_cap: int | None = None  # the cap in epochs (TrainConfig.epoch_cap)

    @property
    def samples_per_s(self) -> float:
        return self.train_samples / self.train_seconds if self.train_seconds > 0 else float("nan")


def _default_iterate(data, batch_size: int, shuffle: bool,
                     generator: torch.Generator | None, min_last: int = 1) -> Iterator:
    from autoft_fast.data import iterate_batches  # data sits below train; import when used
    return iterate_batches(data, batch_size, shuffle, generator, min_last=min_last)


def _has_batch_norm(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _to_device(batch, device: torch.device | None):
    # Data stays on the CPU (the shuffler is a CPU generator); each batch is copied over.
    if device is None or device.type == "cpu":
        return batch
    return batch.to(device, non_blocking=True)


@torch.no_grad()
def predict(model: torch.nn.Module, data, batch_size: int = 8192,
            iterate: Callable = _default_iterate,
            device: torch.device | None = None) -> torch.Tensor:
    """Logits of `model` for every row of `data` (TensorData), in eval mode, in row order,
    on the CPU; batches are moved to `device` (the model's device) when given.

    Example:
        >>> logits = predict(model, bundle.splits["target_test"])
    """
    was_training = model.training
    model.eval()
    try:
        outs = [model(_to_device(b, device)).detach().float().reshape(-1).cpu()
                for b in iterate(data, batch_size, False, None)]
    finally:
        model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def evaluate(model: torch.nn.Module, data, batch_size: int = 8192,
             domain_names=None, iterate: Callable = _default_iterate,
             device: torch.device | None = None) -> dict:
    """AUC / LogLoss of `model` on `data`, overall and per domain (see `compute_metrics`).

    Example:
        >>> evaluate(model, bundle.splits["target_test"])["auc"]
        0.7312...
    """
    logits = predict(model, data, batch_size, iterate, device)
    domains = getattr(data, "domain", None)
    return compute_metrics(data.label, logits, domains, domain_names)


def _trainable_groups(model: torch.nn.Module) -> dict[str, list]:
    """{'model': [...], 'policy': [...]} from a TransferModel, or every trainable parameter
    of a plain module under 'model'."""
    if hasattr(model, "parameter_groups"):
        groups = model.parameter_groups()
        unknown = set(groups) - {"model", "policy"}
        if unknown:
            raise ValueError(f"parameter_groups() returned unknown groups {sorted(unknown)}")
        return {k: [p for p in v if p.requires_grad] for k, v in groups.items()}
    return {"model": [p for p in model.parameters() if p.requires_grad]}


def _make_adam(opt_cls, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    # The fused kernel updates every tensor in one pass: on the demo model it halves the
    # optimizer's share of a step (0.8 -> 0.4 ms per step measured on one CPU thread).
    # It is deterministic, so resume stays bit-identical; fall back where unsupported.
    try:
        return opt_cls(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return opt_cls(params, lr=lr, weight_decay=weight_decay)


def _clone_state(model: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _running_stats_kept(model: torch.nn.Module):
    """Restore every BatchNorm running statistic (and batch count) of ``model`` on leaving:
    a train-mode forward over rows the model must not learn from (the held-out slice of
    ``policy_objective: heldout``) would otherwise move them."""
    kept = [(m, {k: b.clone() for k, b in m.named_buffers(recurse=False) if b is not None})
            for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._NormBase)]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, bufs in kept:
                for k, b in bufs.items():
                    getattr(m, k).copy_(b)


# Training settings a resumed run may change: epochs and patience may grow or shrink (a run
# can be extended), and the evaluation batch size changes no weight.
RESUMABLE_CHANGES = ("epochs", "cap_steps", "patience", "patience_steps", "eval_batch_size")


class Trainer:
    """Trains one model with early stopping and resumable checkpoints.

    - `checkpoint_path`: the epoch checkpoint (model, optimizers, RNG states, epoch, best
      metric and best weights), rewritten atomically after every epoch; `fit(resume=True)`
      continues from it and gives bit-identical results to a run that was never stopped.
    - `tau_schedule(epoch) -> tau` is applied with `model.set_tau` before every epoch.
    - The 'policy' parameter group (TransferModel.parameter_groups) gets its own optimizer
      with `policy_lr` / `policy_weight_decay` (None: the model group's values).
    - `seed` seeds torch, numpy and Python and the batch shuffler at the start of a fresh fit.
    - `policy_data`: rows for the policy's steps (``autoft.policy_objective: heldout``). The
      model's optimizers then step on `train` only, and after each of their steps the policy
      optimizer takes one step on the next batch of `policy_data` (cycled, reshuffled each
      pass), so the policy is judged on rows the tuned copy is not fitted to. Without it the
      policy steps on the training batches together with the model.
    - `policy_warmup`: the first N epochs leave the policy untouched (its gates keep the
      prior `policy_init_tuned`, fair coins by default) or, with `policy_warmup_gates="tuned"`, force
      every gate tuned; these epochs never become the best epoch nor count toward patience,
      since their validation score is not that of a policy that chooses.
    - `policy_rotating`: instead of a fixed `policy_data` slice, every epoch holds a fresh
      random fraction of `train` out of the model's steps and gives it to the policy's (so
      the model sees every row over the epochs, and the policy is judged on rows this
      epoch's steps did not fit).
    - Early stopping: after `cfg.patience` epochs and `cfg.patience_steps` optimizer steps
      without improvement; the cap is `cfg.epoch_cap(steps per epoch)` (`epochs`, or unset
      50 raised to allow `cap_steps` steps).
    - `start_best`: the validation score the given weights already have; the fit then
      keeps them (best_epoch 0) unless an epoch beats it (a continued fit).
    - The validation pass of every epoch also records the policy's tuned fractions
      (``history[i]["policy"]``), so the choices can be followed over the epochs.

    Example:
        >>> tr = Trainer(model, TrainConfig(epochs=3), checkpoint_path=run / "last.pt", seed=0)
        >>> res = tr.fit(bundle.splits["target_train"], bundle.splits["target_valid"])
        >>> res.best_metric, res.samples_per_s
    """

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, *,
                 checkpoint_path: str | Path | None = None, seed: int = 0,
                 tau_schedule: Callable[[int], float] | None = None,
                 policy_lr: float | None = None, policy_weight_decay: float | None = None,
                 domain_names=None, desc: str = "train",
                 logger: logging.Logger | None = None, progress: bool | None = None,
                 iterate: Callable = _default_iterate,
                 on_epoch_end: Callable[[int, dict], None] | None = None,
                 device: str | torch.device | None = None, policy_data=None,
                 policy_warmup: int = 0, policy_warmup_gates: str = "random",
                 start_best: float | None = None, policy_rotating: float | None = None,
                 settings: str | None = None):
        self.device = torch.device(device) if device is not None else None
        if (self.device is not None and self.device.type == "cuda"
                and not torch.cuda.is_available()):
            raise ValueError(f"Trainer: device {str(device)!r} was asked for but CUDA is not "
                             "available (this torch build or machine has no GPU); pass "
                             "device='cpu' or leave it unset")
        # torchrun with several processes: data-parallel (see train/distributed.py).
        if distributed.is_distributed():
            self.device = distributed.DataParallel.device_for(self.device)
        if self.device is not None:
            model.to(self.device)
        self.model = model
        self.cfg = cfg
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        # What the run's weights depend on beyond `cfg` (the runner's hash of the model,
        # pretrain, autoft and search sections): kept in the checkpoint, checked on resume.
        self.settings = settings
        self.seed = int(seed)
        self.tau_schedule = tau_schedule
        self.domain_names = domain_names
        self.desc = desc
        self.log = logger or logging.getLogger(LOGGER_NAME)
        self.progress = progress
        self.iterate = iterate
        self.on_epoch_end = on_epoch_end
        self.shuffler = torch.Generator()
        self.policy_data = policy_data
        self.policy_shuffler = torch.Generator()
        if isinstance(policy_warmup, bool) or not isinstance(policy_warmup, int) \
                or policy_warmup < 0:
            raise ValueError(f"policy_warmup = {policy_warmup!r} must be an integer >= 0")
        if policy_warmup_gates not in ("random", "tuned"):
            raise ValueError(f"policy_warmup_gates = {policy_warmup_gates!r} is not one of "
                             "'random', 'tuned'")
        self.policy_warmup = policy_warmup
        # A score the current weights already reached (a continued fit keeps them unless
        # it beats it; best_epoch 0 then means "as given").
        self.start_best = start_best
        if policy_rotating is not None and not 0.0 < float(policy_rotating) < 1.0:
            raise ValueError(f"policy_rotating = {policy_rotating!r} must be a fraction in (0, 1)")
        if policy_rotating is not None and policy_data is not None:
            raise ValueError("give policy_data (a fixed slice) or policy_rotating, not both")
        self.policy_rotating = policy_rotating
        self.policy_warmup_gates = policy_warmup_gates
        # Tables the backward updates itself (autoft.embedding_optimizer = fused_*): they never
        # get a .grad, so the optimizers below skip them.
        attach_fused_optimizers(model, getattr(model, "embedding_optimizer", "dense"), cfg.lr)
        groups = _trainable_groups(model)
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        opt_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.AdamW
        # Tables of modules built with sparse=True get COO gradients, which Adam(W) rejects:
        # they get SparseAdam (lazy Adam over the touched rows, no weight decay) instead.
        sparse_ids = {id(m.tuned_weight) for m in model.modules()
                      if getattr(m, "sparse", False) and hasattr(m, "tuned_weight")}
        for name, params in groups.items():
            if name == "policy":
                lr = policy_lr if policy_lr is not None else cfg.lr
                wd = policy_weight_decay if policy_weight_decay is not None else cfg.weight_decay
            else:
                lr, wd = cfg.lr, cfg.weight_decay
            dense = [p for p in params if id(p) not in sparse_ids]
            sparse = [p for p in params if id(p) in sparse_ids]
            if dense:
                self.optimizers[name] = _make_adam(opt_cls, dense, lr, wd)
            if sparse:
                self.optimizers[f"{name}_sparse"] = torch.optim.SparseAdam(sparse, lr=lr)
        if policy_warmup and policy_warmup >= cfg.base_epochs \
                and any(k.startswith("policy") for k in self.optimizers):
            raise ValueError(f"{desc}: policy_warmup = {policy_warmup} is not below epochs = "
                             f"{cfg.base_epochs}: every epoch would be a warm-up epoch, which is never "
                             f"the best one, and the policy would never choose")
        # -- data-parallel (torchrun): sharded batches, combined gradients, rank-0 files --
        self.dp = distributed.DataParallel.create(model, self.device)
        # BatchNorm cannot train on one row: every process gets at least 2 rows of a batch
        # (a short last batch of the epoch joins the one before it).
        self.min_rows = 0
        if _has_batch_norm(model):
            self.min_rows = 2 * (self.dp.size if self.dp is not None else 1)
            if iterate is _default_iterate:
                iterate = functools.partial(_default_iterate, min_last=self.min_rows)
                self.iterate = iterate
        if self.dp is not None:
            self.iterate = distributed.ShardedBatches(iterate, self.dp.rank, self.dp.size)
            if self.dp.rank != 0:
                self.progress = False

    # -- helpers ---------------------------------------------------------------------------
    def _loss(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(batch)
        bce = F.binary_cross_entropy_with_logits(logits.float().reshape(-1),
                                                 batch.label.float().reshape(-1))
        total = bce
        if hasattr(self.model, "penalty"):
            total = total + self.model.penalty()
        return bce, total

    def _step(self, batch, names: list[str]) -> torch.Tensor:
        """One optimisation step of the optimizers `names` on `batch`; returns the BCE."""
        if self.dp is None:
            bce, total = self._loss(batch)
            for o in self.optimizers.values():
                o.zero_grad(set_to_none=True)
            total.backward()
        else:  # data-parallel: combine every rank's gradients before the step
            for o in self.optimizers.values():
                o.zero_grad(set_to_none=True)
            bce = torch.zeros(())
            if len(batch):  # a rank whose shard is empty only joins the exchange
                bce, total = self._loss(batch)
                with self.dp.sync.backward_context():
                    total.backward()
            self.dp.sync.sync([p for n in names for g in self.optimizers[n].param_groups
                               for p in g["params"]], self.iterate.weight)
        for name in names:
            self.optimizers[name].step()
        return bce

    def _policy_batches(self, batch_size: int, data=None) -> Iterator:
        """Batches of `data` (default `policy_data`) without end: shuffled pass after pass."""
        data = self.policy_data if data is None else data
        while True:
            yield from self.iterate(data, batch_size, True, self.policy_shuffler)

    def _rotate(self, train):
        """(model rows, policy rows) of this epoch: a fresh random `policy_rotating` slice."""
        n = len(train)
        k = min(max(int(round(self.policy_rotating * n)), 1), n - 1)
        perm = torch.randperm(n, generator=self.policy_shuffler)
        return train.index(perm[k:]), train.index(perm[:k])

    def _save(self, state: dict) -> None:
        if self.checkpoint_path is None:
            return
        state = dict(state)
        state["model"] = self.model.state_dict()
        state["optimizers"] = {k: o.state_dict() for k, o in self.optimizers.items()}
        state["rng"] = capture_rng_state({"shuffler": self.shuffler,
                                          "policy_shuffler": self.policy_shuffler})
        state["train_config"] = self.cfg.to_dict()
        state["settings"] = self.settings
        if self.dp is not None:  # every rank's random state; only rank 0 writes
            state["rng_ranks"] = distributed.gather_objects(state["rng"])
            state["world_size"] = self.dp.size
            if self.dp.rank == 0:
                save_atomic(state, self.checkpoint_path)
            distributed.barrier()
            return
        save_atomic(state, self.checkpoint_path)

    def evaluate(self, data) -> dict:
        """Metrics of the current weights on `data` (see module function `evaluate`)."""
        return evaluate(self.model, data, self.cfg.eval_batch_size, self.domain_names,
                        self.iterate, self.device)

    # -- the loop --------------------------------------------------------------------------
    def fit(self, train, valid, resume: bool = False) -> FitResult:
        """Train on `train`, early-stop on `valid`, restore the best weights, return a
        FitResult. With `resume`, continue from `checkpoint_path` if it exists."""
        if not self.optimizers:
            raise ValueError(f"{self.desc}: the model has no trainable parameters to fit")
        wall0 = time.perf_counter()
        # The temperature the model arrives with: that of the weights start_best stands for
        # (a refit whose stage-one weights are kept is evaluated at stage one's temperature).
        tau0 = float(self.model.tau) if hasattr(self.model, "tau") else None
        cfg = self.cfg
        if len(train) == 0:
            raise ValueError(f"{self.desc}: the training split has no rows")
        if self.min_rows and len(train) < self.min_rows:
            procs = self.dp.size if self.dp is not None else 1
            raise ValueError(f"{self.desc}: the model has BatchNorm, which needs at least 2 rows "
                             f"per process in a training batch, but the training split has "
                             f"{len(train)} row(s) for {procs} process(es)")
        if cfg.batch_size < self.min_rows:
            raise ValueError(f"{self.desc}: batch_size = {cfg.batch_size} gives some process "
                             f"fewer than 2 rows of a batch, which BatchNorm cannot train on; "
                             f"give a batch_size of at least {self.min_rows}")
        res = FitResult()
        start_epoch, bad_epochs, best_state, finished = 0, 0, None, False
        bad_steps = 0  # optimizer steps since the last improvement (cfg.patience_steps)
        steps_per_epoch = 0  # known after the first epoch (cfg.cap_steps)
        prior_wall = 0.0
        if resume and self.checkpoint_path is not None and self.checkpoint_path.exists():
            ck = load_checkpoint(self.checkpoint_path)
            distributed.check_resume(ck, self.checkpoint_path)
            saved = ck.get("train_config")
            if saved is not None:
                now = self.cfg.to_dict()
                changed = sorted(k for k in set(saved) | set(now)
                                 if k not in RESUMABLE_CHANGES and saved.get(k) != now.get(k))
                if changed:
                    raise ValueError(
                        f"{self.desc}: the checkpoint {str(self.checkpoint_path)!r} was written "
                        f"with other training settings ({', '.join(f'{k} {saved.get(k)!r} -> {now.get(k)!r}' for k in changed)}); "
                        "resuming would not continue that run: start afresh (resume=False)")
            if (ck.get("settings") is not None and self.settings is not None
                    and ck["settings"] != self.settings):
                raise ValueError(
                    f"{self.desc}: the checkpoint {str(self.checkpoint_path)!r} was written "
                    "under other settings (the config's model, pretrain, autoft or search "
                    "section changed since), so resuming would train one run under two "
                    "configs: start afresh (a new run, or resume=False)")
            if self.dp is not None:
                ck["rng"] = ck["rng_ranks"][self.dp.rank]
            self.model.load_state_dict(ck["model"])
            for k, o in self.optimizers.items():
                o.load_state_dict(ck["optimizers"][k])
            restore_rng_state(ck["rng"], {"shuffler": self.shuffler,
                                          "policy_shuffler": self.policy_shuffler})
            start_epoch = int(ck["epoch"])
            bad_epochs = int(ck["bad_epochs"])
            bad_steps = int(ck.get("bad_steps", 0))
            steps_per_epoch = int(ck.get("steps_per_epoch", 0))
            best_state = ck["best_state"]
            finished = bool(ck["finished"])
            res.history = list(ck["history"])
            res.best_epoch = ck["best_epoch"]
            res.best_metric = ck["best_metric"]
            res.train_samples = int(ck["train_samples"])
            res.train_seconds = float(ck["train_seconds"])
            res.stopped_early = bool(ck.get("stopped_early", False))
            prior_wall = float(ck.get("wall_seconds", 0.0))
            self.log.info("%s: resumed from %s after epoch %d", self.desc,
                          self.checkpoint_path, start_epoch)
        else:
            seed_everything(self.seed, self.shuffler)
            self.policy_shuffler.manual_seed(self.seed + 1)
            if self.start_best is not None:
                res.best_metric, res.best_epoch = float(self.start_best), 0
                best_state = _clone_state(self.model)
            if self.dp is not None:
                self.dp.seed_rank(self.seed)

        model_opts = [k for k in self.optimizers if not k.startswith("policy")]
        policy_opts = [k for k in self.optimizers if k.startswith("policy")]
        rotating = self.policy_rotating is not None and bool(policy_opts)
        heldout = (self.policy_data is not None or rotating) and bool(policy_opts)
        if self.policy_data is not None and heldout and len(self.policy_data) == 0:
            raise ValueError(f"{self.desc}: policy_data has no rows")
        if heldout and self.min_rows:
            held = (len(self.policy_data) if self.policy_data is not None else
                    min(max(int(round(self.policy_rotating * len(train))), 1), len(train) - 1))
            if held < self.min_rows:
                raise ValueError(
                    f"{self.desc}: the held-out slice for the policy's steps has {held} "
                    f"row(s), and BatchNorm cannot train on fewer than {self.min_rows} a batch: "
                    "raise autoft.policy_holdout, or give the target more training rows")
        epoch = start_epoch
        cap = cfg.epoch_cap(steps_per_epoch)
        while not finished and epoch < cap:
            warming = epoch < self.policy_warmup and bool(policy_opts)
            forced = warming and self.policy_warmup_gates == "tuned"
            if forced:
                self.model.force_gates("tuned")
            # Each epoch's held-out batches come from a fresh cycle, so resume stays exact.
            epoch_train, epoch_policy = train, None
            if rotating:
                epoch_train, epoch_policy = self._rotate(train)
            policy_batches = (self._policy_batches(cfg.batch_size, epoch_policy)
                              if heldout else None)
            if self.tau_schedule is not None and hasattr(self.model, "set_tau"):
                self.model.set_tau(float(self.tau_schedule(epoch)))
            self.model.train()
            bar = ProgressBar(len(train), desc=f"{self.desc} epoch {epoch + 1}/{cap}",
                              enabled=self.progress)
            loss_sum, n_seen, n_steps = 0.0, 0, 0
            t0 = time.perf_counter()
            for batch in self.iterate(epoch_train, cfg.batch_size, True, self.shuffler):
                batch = _to_device(batch, self.device)
                if heldout or warming:
                    bce = self._step(batch, model_opts)
                else:
                    bce = self._step(batch, model_opts + policy_opts)
                if heldout and not warming:
                    # The policy's step trains the policy only: no fused table update, and
                    # the held-out rows leave no trace in BatchNorm's running statistics.
                    with fused_updates_paused(), _running_stats_kept(self.model):
                        self._step(_to_device(next(policy_batches), self.device), policy_opts)
                b = len(batch)
                n_steps += 1  # every rank takes the same number of steps (global batches)
                loss_sum += float(bce.detach()) * b
                n_seen += b
                bar.update(b, loss=loss_sum / n_seen)
            train_s = time.perf_counter() - t0
            if self.dp is not None:  # the epoch's rows and loss over every rank
                loss_sum, n_seen = self.dp.sum_numbers(loss_sum, n_seen)
                n_seen = int(n_seen)
            res.train_samples += n_seen
            res.train_seconds += train_s
            if forced:
                self.model.force_gates(None)
            if hasattr(self.model, "reset_policy_stats"):
                self.model.reset_policy_stats()
            metrics = self.evaluate(valid)
            if self.dp is not None:  # rank 0's numbers make every rank's decisions
                metrics = distributed.broadcast_object(metrics)
            score = metrics[cfg.monitor]
            bar.close(**{f"valid {cfg.monitor}": float(score)})
            if math.isnan(score):
                self.log.warning("%s epoch %d: validation %s is NaN (one class only, or NaN "
                                 "logits); it never counts as an improvement", self.desc,
                                 epoch + 1, cfg.monitor)
            entry = {"epoch": epoch + 1, "train_loss": loss_sum / max(n_seen, 1),
                     "valid_auc": metrics["auc"], "valid_logloss": metrics["logloss"],
                     "samples_per_s": n_seen / train_s if train_s > 0 else float("nan"),
                     "tau": float(self.model.tau) if hasattr(self.model, "tau") else None}
            if hasattr(self.model, "policy_stats"):
                entry["policy"] = self.model.policy_stats()
            if warming:
                entry["warmup"] = True
            res.history.append(entry)
            if warming:
                pass  # a warm-up epoch is neither best nor bad: the policy has not chosen yet
            elif is_better(cfg.monitor, score, res.best_metric, cfg.min_delta):
                res.best_metric, res.best_epoch = float(score), epoch + 1
                best_state = _clone_state(self.model)
                bad_epochs, bad_steps = 0, 0
            else:
                bad_epochs += 1
                bad_steps += n_steps
            self.log.debug("%s epoch %d: train loss %.5f, valid auc %.5f logloss %.5f, "
                           "%.0f samples/s%s", self.desc, epoch + 1, entry["train_loss"],
                           metrics["auc"], metrics["logloss"], entry["samples_per_s"],
                           " (best)" if res.best_epoch == epoch + 1 else "")
            epoch += 1
            steps_per_epoch = n_steps
            cap = cfg.epoch_cap(steps_per_epoch)
            if bad_epochs >= cfg.patience and bad_steps >= cfg.patience_steps \
                    and epoch < cap:
                res.stopped_early = True
                finished = True
            if epoch >= cap:
                finished = True
            self._save({"epoch": epoch, "bad_epochs": bad_epochs, "bad_steps": bad_steps,
                        "steps_per_epoch": steps_per_epoch,
                        "best_state": best_state,
                        "best_epoch": res.best_epoch, "best_metric": res.best_metric,
                        "history": res.history, "finished": finished,
                        "train_samples": res.train_samples, "train_seconds": res.train_seconds,
                        "stopped_early": res.stopped_early,
                        "wall_seconds": prior_wall + time.perf_counter() - wall0})
            if self.on_epoch_end is not None:
                self.on_epoch_end(epoch, entry)
        if best_state is not None:
            self.model.load_state_dict(best_state)
        if res.best_epoch == 0 and tau0 is not None and hasattr(self.model, "set_tau"):
            self.model.set_tau(tau0)  # the start weights were kept, with their temperature
        elif (self.tau_schedule is not None and hasattr(self.model, "set_tau")
                and (res.best_epoch or epoch)):
            # The temperature the kept weights were validated with (it matters when
            # evaluation samples its gates), also after resuming a finished run.
            self.model.set_tau(float(self.tau_schedule((res.best_epoch or epoch) - 1)))
        res.epochs_run = epoch
        res.epoch_cap = cap
        res.best_at_cap = res.best_epoch is not None and res.best_epoch >= cap
        if res.best_at_cap:
            self.log.warning("%s: the best validation epoch was the last allowed one (%d): "
                             "training stopped while still improving; raise epochs%s",
                             self.desc, cap,
                             # cap_steps raises the cap only where epochs is unset
                             " or cap_steps" if cfg.cap_steps and cfg.epochs is None else "")
        res.wall_seconds = prior_wall + time.perf_counter() - wall0
        if res.stopped_early:
            self.log.debug("%s: early stop after epoch %d, best epoch %s", self.desc, epoch,
                           res.best_epoch)
        return res
