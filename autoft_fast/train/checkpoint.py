"""Checkpoints that a kill can never leave half-written, and the RNG state that makes a
resumed run continue exactly where the killed one stopped."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from .._io import save_atomic  # noqa: F401  (re-exported: checkpoints are written with it)

__all__ = ["save_atomic", "load_checkpoint", "CheckpointError", "capture_rng_state", "restore_rng_state",
           "seed_everything"]


def seed_everything(seed: int, shuffler: torch.Generator | None = None) -> None:
    """Seed torch, numpy and Python's `random` (and `shuffler`, a batch-order generator)
    with `seed`: the one seeding step of a fresh training run and of the runner.

    Example:
        >>> seed_everything(0); a = torch.rand(1); seed_everything(0)
        >>> bool(torch.equal(a, torch.rand(1)))
        True
    """
    seed = int(seed)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if shuffler is not None:
        shuffler.manual_seed(seed)


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read (truncated, garbage, foreign); ``path`` names it."""

    def __init__(self, path: Path, cause: BaseException):
        self.path = Path(path)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"checkpoint {str(path)!r} could not be read (damaged or not a "
                         f"checkpoint); delete it to start that run from its beginning "
                         f"[{first[:200]}]")


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by `save_atomic` onto the CPU.

    Only tensors and plain Python containers are accepted (torch's weights_only loader), so
    loading a checkpoint never runs arbitrary pickled code. A file that cannot be read
    raises CheckpointError (a RuntimeError) naming it and what to do.

    Example:
        >>> load_checkpoint("/tmp/ckpt.pt")["epoch"]
        3
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign or damaged file: say which one
        raise CheckpointError(path, e) from e


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every random state a training run consumes: torch's default CPU generator (dropout,
    Gumbel seeds), CUDA's when present, Python's and numpy's global ones, and any named
    torch.Generator (the batch shuffler)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                  "cached_gaussian": float(np_state[4])},
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict, generators: dict[str, torch.Generator] | None = None) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    for k, g in (generators or {}).items():
        if k in state["generators"]:
            g.set_state(state["generators"][k])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
