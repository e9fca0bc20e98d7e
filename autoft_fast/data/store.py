"""The encoded splits on disk: one ``.npy`` file per split and tensor, memory-mapped when read.

Layout of a store folder::

    meta.json                   version, cache key, feature map, vocabularies, stats
    <split>/sparse.npy          [N, F_single] int32, or int64 for huge tables (``id_dtype``)
    <split>/multihot.npy        [N, F_multi, L] same id dtype (absent without multi-hot fields)
    <split>/dense.npy           [N, F_dense] float32 (absent without dense fields)
    <split>/label.npy           [N] float32
    <split>/domain.npy          [N] int64

Rows are written with ``os.pwrite`` at their place in the split, never through a writable
memory map, so the pages written do not count against the process's resident memory: peak
RSS stays that of one chunk however large the output grows. Reading maps the files
copy-on-write (``mmap_mode="c"``): pages are loaded on first touch, a tensor can be written
to in memory without changing the file, and torch does not warn about read-only arrays.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from .feature_map import FeatureMap
from .tensors import SPLIT_NAMES, DataBundle, TensorData

# Ids are stored as int32 whenever the table has fewer than 2^31 rows: half the files and the
# page cache of int64. Every reader of TensorData accepts both (F.embedding, F.embedding_bag,
# the gated op, the frequency features, indexing); False keeps int64 everywhere.
COMPACT_IDS = True


def id_dtype(num_rows: int) -> np.dtype:
    """The dtype of stored ids: int32 when ``COMPACT_IDS`` and the table fits, else int64."""
    return np.dtype(np.int32) if COMPACT_IDS and num_rows < 2**31 else np.dtype(np.int64)


class SplitWriter:
    """Preallocated ``.npy`` files of one split, filled row-block by row-block.

    Example::

        w = SplitWriter(Path("out/target_train"), {"label": ((n,), np.float32)})
        w.write("label", positions, values)     # values[i] goes to row positions[i]
        w.close()
    """

    def __init__(self, folder: Path, shapes: dict[str, tuple[tuple[int, ...], np.dtype]]) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, tuple[int, int, int]] = {}  # name -> (fd, data offset, row bytes)
        for name, (shape, dtype) in shapes.items():
            path = folder / f"{name}.npy"
            mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            del mm  # only the header and the file's size were needed
            dtype = np.dtype(dtype)
            row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            size = os.path.getsize(path)
            fd = os.open(path, os.O_WRONLY)
            self.files[name] = (fd, size - shape[0] * row_bytes, row_bytes)

    def write(self, name: str, positions: np.ndarray, values: np.ndarray) -> None:
        """Write ``values[i]`` as row ``positions[i]``; runs of consecutive positions are
        written with one system call each."""
        fd, start, row_bytes = self.files[name]
        if len(positions) == 0 or row_bytes == 0:  # nothing, or rows of no columns
            return
        pos = np.asarray(positions)
        steps = np.diff(pos)
        if not np.all(steps > 0):  # sorted positions (the usual case) need no reordering
            order = np.argsort(pos, kind="stable")
            pos, values = pos[order], values[order]
            steps = np.diff(pos)
        values = np.ascontiguousarray(values)
        cuts = np.flatnonzero(steps != 1) + 1
        for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(pos)]):
            os.pwrite(fd, memoryview(values[a:b]).cast("B"), start + int(pos[a]) * row_bytes)

    def close(self) -> None:
        for fd, _, _ in self.files.values():
            os.fsync(fd)
            os.close(fd)
        self.files = {}


def write_meta(folder: Path, meta: dict) -> None:
    """``meta.json``, written last so that a folder with it is complete."""
    with open(folder / "meta.json.tmp", "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(folder / "meta.json.tmp", folder / "meta.json")


def load_store(folder: Path, key: str | None, version: int) -> DataBundle:
    """The bundle of a store folder, its tensors memory-mapped. Raises ``ValueError`` when
    the folder is incomplete or was written for another key or pipeline version."""
    with open(folder / "meta.json") as f:
        meta = json.load(f)
    if meta.get("version") != version or (key is not None and meta.get("key") != key):
        raise ValueError("cache key or version mismatch")
    splits = {}
    for name in SPLIT_NAMES:
        d = folder / name
        tensors = {}
        for t in ("sparse", "multihot", "dense", "label", "domain"):
            path = d / f"{t}.npy"
            tensors[t] = torch.from_numpy(_load(path)) if path.is_file() else None
        if tensors["sparse"] is None or tensors["label"] is None or tensors["domain"] is None:
            raise ValueError(f"store split {name} is incomplete")
        splits[name] = TensorData(**tensors)
    return DataBundle(
        feature_map=FeatureMap.from_dict(meta["feature_map"]),
        splits=splits,
        vocabularies=meta["vocabularies"],
        stats=meta["stats"],
    )


def _load(path: Path) -> np.ndarray:
    arr = np.load(path, mmap_mode="c")
    if arr.size == 0:  # nothing to map (e.g. no single-valued fields): a plain empty array
        return np.zeros(arr.shape, dtype=arr.dtype)
    return arr
