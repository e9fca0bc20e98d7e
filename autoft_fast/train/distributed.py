"""Multi-process data-parallel training with torch.distributed (torchrun).

Under ``torchrun --nproc_per_node N -m autoft_fast.cli finetune ...`` (or ``compare``) the
environment variables RANK / WORLD_SIZE / LOCAL_RANK are set; with WORLD_SIZE > 1 the
runner and the trainer use this module, and nothing else changes for a single process.

- Process group: started on first use, ``gloo`` when the run's device is the CPU, ``nccl``
  when it is CUDA (each rank then on ``cuda:LOCAL_RANK``).
- Batches (:class:`ShardedBatches`): ``batch_size`` stays the *global* batch. Every rank
  draws the same shuffled order (one shuffler, seeded alike) and takes rows
  ``[n * r // N, n * (r + 1) // N)`` of each global batch of n rows, so the ranks' shards of
  a step are disjoint and together exactly the one-process batch. A batch size that N does
  not divide is allowed: gradients are weighted by each rank's share of the rows, so an
  uneven split (the last batch, say) still gives the one-process gradient.
- Gradients (:class:`GradientSync`), after each backward and before each optimizer step:
  dense gradients (and batch-norm running statistics) are summed in one all-reduce of the
  share-weighted tensors; sparse COO gradients (``sparse=True`` tables) are all-gathered as
  (rows, values) and summed into one coalesced gradient (no [V, D] tensor is exchanged);
  tables with a fused optimizer (``autoft.embedding_optimizer: fused_*``), whose update
  happens inside the op's backward, have that update deferred
  (``ops.fused_optim.updates_redirected``): the touched rows and row-gradient sums of every
  rank are all-gathered, summed, and the update is applied once, identically on every rank.
  A table called several times in one step gets one combined update per step here.
- Random numbers: the shuffler and the model's initialisation are the same on every rank;
  torch's global generator (Gumbel noise seeds, dropout) gets a rank-specific seed, so the
  ranks' noise is independent, as that of different rows of one process is. Runs without
  noise (finetune_all, freeze_*, l2sp) therefore match one process to float rounding; runs
  with sampled gates match it in distribution, not bit for bit.
- Evaluation is replicated (every rank holds the same weights and evaluates the whole
  split); rank 0's validation metrics are broadcast, so the best-epoch and early-stopping
  decisions are rank 0's on every rank.
- Files: only rank 0 writes checkpoints, logs, reports and the run directory, whose path it
  broadcasts. A checkpoint holds every rank's random state and the number of processes;
  ``--resume`` needs the same number.
- Ranks other than 0 print nothing to stdout (their warnings and errors still reach stderr).

Example::

    $ torchrun --nproc_per_node 2 -m autoft_fast.cli finetune --config my.yaml \\
          --strategy finetune_all
"""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..modules import fused_tables
from ..ops.fused_optim import add_l2sp, combine_rows, updates_redirected

__all__ = ["world", "is_distributed", "is_main_process", "context", "main_first",
           "main_then_broadcast", "broadcast_object", "barrier", "ShardedBatches",
           "GradientSync", "DataParallel", "rank_seed", "check_resume", "gather_objects"]

# Large odd step between the ranks' global seeds (a 63-bit seed stays in range modulo 2**63).
_RANK_SEED_STEP = 0x9E3779B97F4A7C15


@dataclass(frozen=True)
class World:
    """This process's place: ``rank`` of ``size`` processes, ``local_rank`` on its host."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name} = {raw!r} is not an integer") from None


def world() -> World:
    """RANK / WORLD_SIZE / LOCAL_RANK as torchrun sets them (one process when absent).

    Example:
        >>> world().size   # 1 outside torchrun
        1
    """
    w = World(_env_int("RANK", 0), _env_int("WORLD_SIZE", 1), _env_int("LOCAL_RANK", 0))
    if w.size < 1 or not 0 <= w.rank < w.size:
        raise ValueError(f"RANK = {w.rank} and WORLD_SIZE = {w.size}: RANK must be in "
                         "[0, WORLD_SIZE)")
    return w


def is_distributed() -> bool:
    """True under torchrun with more than one process.

    Example:
        >>> is_distributed()
        False
    """
    return world().size > 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one that writes files.

    Example:
        >>> is_main_process()
        True
    """
    return world().rank == 0


class _Context:
    """The started process group and where its collectives run."""

    def __init__(self, w: World, device: torch.device):
        self.world = w
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        if self.backend == "nccl":
            torch.cuda.set_device(w.local_rank)
            self.device = torch.device("cuda", w.local_rank)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(self.backend, rank=w.rank, world_size=w.size)
        if w.rank != 0:
            # One copy of every table and summary on the terminal: rank 0's.
            sys.stdout = open(os.devnull, "w")

    @property
    def rank(self) -> int:
        return self.world.rank

    @property
    def size(self) -> int:
        return self.world.size


_CONTEXT: list = []
# Inside main_first each rank runs the function alone: no collective may start there.
_SOLO: list = []


def context(device: str | torch.device | None = None) -> _Context | None:
    """The process group of this torchrun job, started on first call; None in one process.

    ``device`` (the run's device) chooses the backend at the first call: gloo for the CPU,
    nccl for CUDA.

    Example:
        >>> context("cpu") is None   # outside torchrun
        True
    """
    w = world()
    if w.size == 1 or _SOLO:
        return None
    if not _CONTEXT:
        dev = torch.device(device) if device is not None else torch.device("cpu")
        _CONTEXT.append(_Context(w, dev))
    return _CONTEXT[0]


def _cfg_device(args):
    cfg = args[0] if args else None
    return cfg.torch_device() if hasattr(cfg, "torch_device") else None


def barrier() -> None:
    """Wait for every rank (nothing in one process).

    Example:
        >>> barrier()
    """
    ctx = context()
    if ctx is not None:
        dist.barrier()


def broadcast_object(obj, device=None):
    """Rank 0's ``obj`` (picklable) on every rank; ``obj`` itself in one process.

    Example:
        >>> broadcast_object({"auc": 0.7})
        {'auc': 0.7}
    """
    ctx = context(device)
    if ctx is None:
        return obj
    box = [obj if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=0, device=ctx.device)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's ``obj`` in rank order (``[obj]`` in one process).

    Example:
        >>> gather_objects(3)
        [3]
    """
    ctx = context()
    if ctx is None:
        return [obj]
    out = [None] * ctx.size
    dist.all_gather_object(out, obj)
    return out


def main_first(fn):
    """Decorator: rank 0 runs ``fn`` first, then (after a barrier) the other ranks do.

    For steps that fill an on-disk cache (prepared data): the others then find it filled.
    Inside, each rank runs as if alone (the helpers of this module start no collective).
    The device of a config passed as first argument chooses the process group's backend.

    Example:
        >>> @main_first
        ... def load(cfg): ...
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = context(_cfg_device(args))
        if ctx is None:
            return fn(*args, **kwargs)

        def alone():
            _SOLO.append(True)
            try:
                return fn(*args, **kwargs)
            finally:
                _SOLO.pop()
        result = alone() if ctx.rank == 0 else None
        dist.barrier()
        return result if ctx.rank == 0 else alone()
    return wrapper


def main_then_broadcast(fn):
    """Decorator: only rank 0 runs ``fn``; every rank returns rank 0's (picklable) result.

    For steps that create files (the run directory, generated data, reports).

    Example:
        >>> @main_then_broadcast
        ... def make_dir(cfg, command): ...
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        ctx = context(_cfg_device(args))
        if ctx is None:
            return fn(*args, **kwargs)
        result, error, raised = None, None, None
        if ctx.rank == 0:
            try:
                result = fn(*args, **kwargs)
            except Exception as e:  # every rank fails alike instead of waiting forever
                raised = e
                # A user's error (bad input, a disk refusing a write) stays one: the CLI
                # prints it as its one line, on every rank.
                user = isinstance(e, (ValueError, OSError)) or type(e).__name__ == "_UserError"
                error = (type(e).__name__, str(e), user)
        result, error = broadcast_object((result, error))
        if error is not None:
            if error[2]:
                if raised is not None:
                    raise raised
                raise ValueError(error[1])
            raise RuntimeError(f"rank 0 failed in {fn.__name__}: {error[0]}: {error[1]}")
        return result
    return wrapper


def rank_seed(seed: int, rank: int) -> int:
    """The global-generator seed of ``rank`` in a run seeded ``seed`` (rank 0 keeps ``seed``).

    Example:
        >>> rank_seed(7, 0)
        7
    """
    return (int(seed) + rank * _RANK_SEED_STEP) % 2**63


class ShardedBatches:
    """An ``iterate(data, batch_size, shuffle, generator)`` that gives each rank its shard.

    Shuffled (training) calls yield rows ``[n * r // N, n * (r + 1) // N)`` of each global
    batch of n rows that ``iterate`` yields (the same on every rank: same generator state);
    ``weight`` is then this rank's share of the last batch's rows (its gradient weight).
    Unshuffled (evaluation) calls yield every row, as ``iterate`` does.

    Example:
        >>> it = ShardedBatches(iterate_batches, rank=1, size=2)
        >>> [len(b) for b in it(train, 512, True, torch.Generator().manual_seed(0))][:2]
        [256, 256]
    """

    def __init__(self, iterate, rank: int, size: int):
        if size < 1 or not 0 <= rank < size:
            raise ValueError(f"rank = {rank} must be in [0, size = {size})")
        self.iterate, self.rank, self.size = iterate, rank, size
        self.weight = 1.0

    def __call__(self, data, batch_size: int, shuffle: bool, generator):
        if not shuffle:
            yield from self.iterate(data, batch_size, shuffle, generator)
            return
        for batch in self.iterate(data, batch_size, shuffle, generator):
            n = len(batch)
            lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
            self.weight = (hi - lo) / n if n else 0.0
            yield batch.slice(lo, hi)


def _batch_norm_stats(model: nn.Module) -> list[torch.Tensor]:
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats \
                and m.running_mean is not None:
            out += [m.running_mean, m.running_var]
    return out


class GradientSync:
    """Combines the ranks' gradients of one model so that every rank takes the step that one
    process would take on the union of the ranks' batches.

    Use :meth:`backward` in place of ``loss.backward()`` and call :meth:`sync` with the
    parameters about to be stepped before the optimizers step. ``weight`` is this rank's
    share of the step's rows (:attr:`ShardedBatches.weight`).

    Example:
        >>> gs = GradientSync(model)
        >>> with gs.backward_context():
        ...     loss.backward()
        >>> gs.sync(list(model.parameters()), weight=0.5)
        >>> opt.step()
    """

    def __init__(self, model: nn.Module):
        self.ctx = context(next((t.device for t in model.parameters()), None))
        self.model = model
        # Fused tables in module order (the same on every rank): the exchange order.
        self.fused = fused_tables(model)
        self._pending: dict[int, list] = {}

    @property
    def size(self) -> int:
        return 1 if self.ctx is None else self.ctx.size

    def _defer(self, optimizer, weight, rows, grad, state) -> None:
        # The op hands over a detached alias of the table: its memory names the table.
        self._pending.setdefault(weight.data_ptr(), []).append(
            (optimizer, weight, rows, grad, state))

    @contextlib.contextmanager
    def backward_context(self):
        """Inside: the fused tables' updates wait for :meth:`sync` instead of being applied."""
        with updates_redirected(self._defer):
            yield

    # -- collectives --------------------------------------------------------------------
    def _all_gather_rows(self, rows: torch.Tensor, values: torch.Tensor, dim: int):
        """(rows, values) of every rank concatenated, from per-rank parts of unequal sizes."""
        dev = self.ctx.device
        n = torch.tensor([rows.numel()], dtype=torch.int64, device=dev)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(sizes, n)
        sizes = [int(s) for s in sizes]
        cap = max(sizes)
        if cap == 0:
            return rows.new_zeros(0, dtype=torch.int64), values.new_zeros((0, dim))
        pr = torch.zeros(cap, dtype=torch.int64, device=dev)
        pv = torch.zeros(cap, dim, dtype=torch.float32, device=dev)
        pr[:rows.numel()] = rows.to(dev, torch.int64)
        pv[:rows.numel()] = values.to(dev, torch.float32)
        all_r = [torch.empty_like(pr) for _ in range(self.size)]
        all_v = [torch.empty_like(pv) for _ in range(self.size)]
        dist.all_gather(all_r, pr)
        dist.all_gather(all_v, pv)
        return (torch.cat([r[:s] for r, s in zip(all_r, sizes)]),
                torch.cat([v[:s] for v, s in zip(all_v, sizes)]))

    def sync(self, params: list[torch.Tensor], weight: float) -> None:
        """Replace each rank's gradients of ``params`` by the share-weighted sum over ranks,
        average the batch-norm statistics the same way, and apply the deferred fused
        updates with the rows of every rank. Every rank must call it, in the same order."""
        pending, self._pending = self._pending, {}
        if self.ctx is None:
            for ups in pending.values():
                for opt, w, rows, grad, state in ups:
                    opt.apply_now(w, rows, grad, state)
            return
        dev = self.ctx.device
        # 0 = no gradient, 1 = dense, 2 = sparse; a parameter with a gradient on any rank
        # gets one on every rank (zeros where it had none), so the optimizers agree.
        kinds = torch.tensor([0 if p.grad is None else (2 if p.grad.is_sparse else 1)
                              for p in params] +
                             [1 if m.fused_weight.data_ptr() in pending else 0 for m in self.fused],
                             dtype=torch.int64, device=dev)
        dist.all_reduce(kinds, op=dist.ReduceOp.MAX)
        kinds = kinds.tolist()
        p_kinds, f_kinds = kinds[:len(params)], kinds[len(params):]

        dense = [p for p, k in zip(params, p_kinds) if k == 1]
        stats = _batch_norm_stats(self.model)
        parts = []
        for p in dense:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            parts.append(g.detach().to(dev, torch.float32).reshape(-1) * weight)
        parts += [s.detach().to(dev, torch.float32).reshape(-1) * weight for s in stats]
        if parts:
            flat = torch.cat(parts)
            dist.all_reduce(flat)
            offset = 0
            for p in dense:
                n = p.numel()
                g = flat[offset:offset + n].view(p.shape).to(p.device, p.dtype)
                offset += n
                p.grad = g
            for s in stats:
                n = s.numel()
                s.copy_(flat[offset:offset + n].view(s.shape))
                offset += n

        for p, k in zip(params, p_kinds):
            if k != 2:
                continue
            dim = p.shape[1]
            if p.grad is not None:
                g = p.grad.coalesce()
                rows, values = g.indices()[0], g.values().float() * weight
            else:
                rows = torch.zeros(0, dtype=torch.int64)
                values = torch.zeros(0, dim)
            rows, values = self._all_gather_rows(rows, values, dim)
            rows, values = combine_rows(rows, values, deterministic=True)
            grad = torch.sparse_coo_tensor(rows.unsqueeze(0).to(p.device),
                                           values.to(p.device, p.dtype), p.shape)
            p.grad = grad._coalesced_(True)  # combine_rows gives sorted unique rows

        for m, k in zip(self.fused, f_kinds):
            if not k:
                continue
            dim = m.fused_weight.shape[1]
            ups = pending.get(m.fused_weight.data_ptr(), [])
            if ups:
                rows = torch.cat([u[2].to(torch.int64) for u in ups])
                values = torch.cat([u[3].float() for u in ups]) * weight
            else:
                rows, values = torch.zeros(0, dtype=torch.int64), torch.zeros(0, dim)
            rows, values = self._all_gather_rows(rows, values, dim)
            rows, values = combine_rows(rows, values, deterministic=True)
            values = add_l2sp(m.fused_weight, rows, values, m.active_l2sp())
            with torch.no_grad():
                m.fused_optimizer.apply_now(m.fused_weight.detach(),
                                            rows.to(m.fused_weight.device),
                                            values.to(m.fused_weight.device),
                                            m.optimizer_state())


def broadcast_module(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers into every rank's ``model``, in place (any
    dtype: those gloo does not carry go as their bytes)."""
    plain = (torch.float32, torch.float64, torch.int32, torch.int64)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            if t.numel() == 0:
                continue
            flat = t.detach().contiguous().reshape(-1)
            raw = flat if flat.dtype in plain else flat.view(torch.uint8)
            dist.broadcast(raw, src=0)
            if flat.data_ptr() != t.data_ptr() or not t.is_contiguous():
                t.detach().copy_(flat.view(t.shape))


class DataParallel:
    """What the trainer needs to train one model on every rank of a torchrun job.

    Example:
        >>> dp = DataParallel.create(model, torch.device("cpu"))   # None in one process
    """

    def __init__(self, model: nn.Module, ctx: _Context):
        self.ctx = ctx
        self.sync = GradientSync(model)
        # Rank 0's weights on every rank: a model built after an earlier fit (the frequency
        # rule's retrain, the cross-fit halves) was initialised from each rank's own random
        # stream, and the ranks would train different models under one set of collectives.
        broadcast_module(model)

    @classmethod
    def create(cls, model: nn.Module, device: torch.device | None) -> "DataParallel | None":
        """A DataParallel for ``model`` under torchrun with several processes, else None."""
        ctx = context(device)
        return None if ctx is None else cls(model, ctx)

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def size(self) -> int:
        return self.ctx.size

    @staticmethod
    def device_for(device: torch.device | None) -> torch.device | None:
        """This rank's device: ``cuda:LOCAL_RANK`` when the run's device is CUDA."""
        if device is not None and device.type == "cuda":
            return torch.device("cuda", world().local_rank)
        return device

    def sum_numbers(self, *xs: float) -> list[float]:
        """The sums over ranks of the numbers ``xs`` (float64)."""
        t = torch.tensor(xs, dtype=torch.float64, device=self.ctx.device)
        dist.all_reduce(t)
        return t.tolist()

    def seed_rank(self, seed: int) -> None:
        """Give torch's global generator this rank's stream (see :func:`rank_seed`)."""
        torch.manual_seed(rank_seed(seed, self.rank))



def check_resume(ck: dict, path) -> None:
    """ValueError unless the checkpoint at ``path`` was written by as many processes as run now.

    Example:
        >>> check_resume({"world_size": 1}, "last.pt")   # one process, one-process checkpoint
    """
    n, now = int(ck.get("world_size", 1)), world().size
    if n != now:
        raise ValueError(f"checkpoint {str(path)!r} was written by {n} process(es); resume it "
                         f"with the same number (this run has WORLD_SIZE = {now}), or delete "
                         "it to start that training over (an interrupted pre-training leaves "
                         "its checkpoint in the cache, where every later run meets it)")
