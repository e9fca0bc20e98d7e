"""The pipeline's building blocks on their own: the background reader (``prefetched``), the
split codes (one byte per row) against the row lists they replaced, the split writer's
in-order and out-of-order writes, and a cached chunked read equal to an uncached one."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from autoft_fast.data import SPLIT_NAMES, DataConfig, DataError, prepare_data
from autoft_fast.data.pipeline import _permutation, _split_codes
from autoft_fast.data.reading import prefetched
from autoft_fast.data.store import SplitWriter

from test_data import base_dict, make_frame, write


# ---------------------------------------------------------------------------- prefetched
def test_prefetched_yields_every_item_in_order_and_runs_ahead_at_most_depth():
    made = []

    def produce():
        for i in range(50):
            made.append(i)
            yield i

    got = []
    for item in prefetched(produce(), depth=2):
        # the producer may hold one item in hand besides the `depth` queued ones
        assert len(made) <= item + 1 + 2 + 1, (item, len(made))
        got.append(item)
    assert got == list(range(50))


def test_prefetched_raises_the_producers_error_after_the_items_before_it():
    def produce():
        yield 1
        yield 2
        raise DataError("bad block in data.csv")

    got = []
    with pytest.raises(DataError, match="bad block in data.csv"):
        for item in prefetched(produce()):
            got.append(item)
    assert got == [1, 2]


def test_prefetched_stops_and_closes_the_producer_when_the_consumer_stops():
    closed = threading.Event()

    def produce():
        try:
            for i in range(10**9):
                yield i
        finally:
            closed.set()

    gen = prefetched(produce())
    assert next(gen) == 0 and next(gen) == 1
    gen.close()
    assert closed.wait(5.0), "the producer was not closed"
    assert not any(t.name == "autoft-prefetch" and t.is_alive() for t in threading.enumerate())


def test_prefetched_producer_stops_when_the_consumer_raises():
    closed = threading.Event()

    def produce():
        try:
            yield from range(10**9)
        finally:
            closed.set()

    with pytest.raises(RuntimeError, match="consumer failed"):
        for item in prefetched(produce()):
            if item == 3:
                raise RuntimeError("consumer failed")
    assert closed.wait(5.0)


# ---------------------------------------------------------------------------- split codes
def _cfg(tmp_path, split):
    write(tmp_path, make_frame(seed=1), "data.csv")
    return DataConfig.from_dict(base_dict(files=["data.csv"], split=split), tmp_path)


def _rows_by_list(cfg, n_src, n_tgt, times):
    """The splits as the row lists the pipeline made before (sorted row numbers per split
    for a random split, time order for the target of a time split)."""
    src, tgt = np.arange(n_src), np.arange(n_tgt)
    ss, ts = cfg.source_split, cfg.target_split
    perm = np.random.default_rng(ss.seed).permutation(n_src)
    n_valid = int(round(ss.valid * n_src))
    rows = {"source_train": np.sort(src[perm[n_valid:]]), "source_valid": np.sort(src[perm[:n_valid]])}
    n_test, n_valid = int(round(ts.test * n_tgt)), int(round(ts.valid * n_tgt))
    n_train = n_tgt - n_test - n_valid
    if ts.method == "random":
        perm = np.random.default_rng(ts.seed).permutation(n_tgt)
        rows["target_train"] = np.sort(tgt[perm[n_test + n_valid:]])
        rows["target_valid"] = np.sort(tgt[perm[n_test: n_test + n_valid]])
        rows["target_test"] = np.sort(tgt[perm[:n_test]])
    else:
        ordered = tgt[np.argsort(times, kind="stable")]
        rows["target_train"] = ordered[:n_train]
        rows["target_valid"] = ordered[n_train: n_train + n_valid]
        rows["target_test"] = ordered[n_train + n_valid:]
    return rows


@pytest.mark.parametrize("method", ["random", "time"])
@pytest.mark.parametrize("n_src,n_tgt", [(1000, 101), (37, 9), (5003, 2000)])
def test_split_codes_are_the_row_lists(tmp_path, method, n_src, n_tgt):
    target = {"method": method, "valid": 0.2, "test": 0.3, "seed": 7}
    if method == "time":
        target["time_column"] = "ts"
    cfg = _cfg(tmp_path, {"target": target, "source": {"valid": 0.1, "seed": 3}})
    times = np.random.default_rng(0).integers(0, 20, n_tgt).astype(np.float64) if method == "time" else None
    src_code, tgt_code, tgt_pos, sizes = _split_codes(cfg, n_src, n_tgt, times)
    want = _rows_by_list(cfg, n_src, n_tgt, times)
    assert src_code.dtype == tgt_code.dtype == np.int8
    for name in SPLIT_NAMES:
        k = SPLIT_NAMES.index(name)
        assert sizes[name] == len(want[name]), name
        codes = src_code if name.startswith("source") else tgt_code
        got_rows = np.flatnonzero(codes == k)
        if name.startswith("target") and method == "time":
            # place i of the split holds the row whose tgt_pos is i
            order = np.empty(len(got_rows), dtype=np.int64)
            order[tgt_pos[got_rows]] = got_rows
            got_rows = order
        assert np.array_equal(got_rows, want[name]), name
    assert (tgt_pos is None) == (method == "random")


def test_split_codes_name_an_empty_split(tmp_path):
    cfg = _cfg(tmp_path, {"target": {"method": "random", "valid": 0.2, "test": 0.3, "seed": 1},
                          "source": {"valid": 0.1, "seed": 1}})
    with pytest.raises(DataError, match="split 'source_valid' is empty.*data.split.source.valid = 0.1"):
        _split_codes(cfg, 4, 100, None)


def test_int32_permutation_gives_the_same_codes_as_int64():
    for n in (0, 1, 999):
        assert np.array_equal(_permutation(5, n, np.int32), np.random.default_rng(5).permutation(n))


# ---------------------------------------------------------------------------- split writer
@pytest.mark.parametrize("order", ["sorted", "shuffled", "gaps"])
def test_split_writer_puts_every_row_at_its_place(tmp_path, order):
    n = 40
    want = np.arange(n * 3, dtype=np.int32).reshape(n, 3) * 7
    w = SplitWriter(tmp_path / "s", {"sparse": ((n, 3), np.int32)})
    rng = np.random.default_rng(0)
    pos = np.arange(n)
    if order == "shuffled":
        pos = rng.permutation(n)
    blocks = np.array_split(pos, 5) if order != "gaps" else [pos[::2], pos[1::2]]
    for b in blocks:
        w.write("sparse", b, want[b])
    w.close()
    got = np.load(tmp_path / "s" / "sparse.npy")
    assert np.array_equal(got, want)


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("method", ["random", "time"])
def test_chunked_cached_build_equals_a_single_chunk(tmp_path, method):
    frame = make_frame(seed=6)
    write(tmp_path, frame, "data.csv")
    target = {"method": method, "valid": 0.2, "test": 0.3, "seed": 2}
    if method == "time":
        target["time_column"] = "ts"
    cfg = DataConfig.from_dict(base_dict(files=["data.csv"], split={
        "target": target, "source": {"valid": 0.1, "seed": 2}}), tmp_path)
    one = prepare_data(cfg, tmp_path / "c1", chunk_rows=10**6)
    many = prepare_data(cfg, tmp_path / "c2", chunk_rows=13)
    for name in SPLIT_NAMES:
        a, b = one.splits[name], many.splits[name]
        for t in ("sparse", "multihot", "dense", "label", "domain"):
            x, y = getattr(a, t), getattr(b, t)
            assert (x is None) == (y is None), (name, t)
            if x is not None:
                assert x.shape == y.shape and bool((x == y).all()), (name, t)


@pytest.mark.parametrize("stage", ["scan", "encode"])
def test_no_reader_thread_outlives_a_failed_build(tmp_path, monkeypatch, stage):
    from autoft_fast.data import pipeline

    write(tmp_path, make_frame(seed=8), "data.csv")
    cfg = DataConfig.from_dict(base_dict(), tmp_path)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # a failure inside the chunk loop of the scan (spilling) or of the encode pass (writing)
    monkeypatch.setattr(pipeline._Spill if stage == "scan" else SplitWriter, "write", fail)
    with pytest.raises(OSError, match="disk full") as excinfo:
        prepare_data(cfg, chunk_rows=50)
    assert excinfo.traceback  # the traceback (and the frames it holds) is still alive here
    alive = [t for t in threading.enumerate() if t.name == "autoft-prefetch" and t.is_alive()]
    assert not alive, alive
