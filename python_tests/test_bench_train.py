"""benchmarks/bench_train.py in reduced form: every row and every ratio is printed.

No timing is asserted (the figures depend on the machine); the test checks that the script's
main runs each strategy's library step and the plain baseline and prints the table it promises.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_field_sizes_are_a_long_tail_summing_to_v(bench):
    sizes = bench.field_sizes(100_000)
    assert len(sizes) == 26 and sum(sizes) == 100_000
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 10 * sizes[-1]
    fmap = bench.feature_map(5_000)
    assert fmap.num_rows == 5_000 and len(fmap.single_fields) == 26
    (batch,) = bench.batches(fmap, 512, 1)
    for j, f in enumerate(fmap.fields):
        col = batch.sparse[:, j]
        assert bool(((col > f.offset) & (col < f.offset + f.vocab_size)).all()), f.name
    first = batch.sparse[:, 0] - fmap.fields[0].offset
    assert (first < 10).float().mean() > 0.2  # Zipf-like: the head ids are frequent
    with pytest.raises(ValueError, match="--vs value 50 is too small"):
        bench.field_sizes(50)


def test_main_prints_every_row_and_ratio(bench, capsys):
    vs = ["2000", "3000"]
    assert bench.main(["--vs", *vs, "--steps", "2", "--warmup", "1", "--rounds", "1",
                       "--pretouch-gb", "0", "--batch-size", "128", "--pool", "2"]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^\| ([\d,]+) \| (\w+) \| ([\d.]+) \| ([\d,]+) \| ([\d,]+) \|$", out, re.M)
    seen = {(v, name) for v, name, *_ in rows}
    expected = {(v, s) for v in ("2,000", "3,000") for s in bench.STRATEGIES + (bench.PLAIN,)}
    expected.add(("3,000", bench.INT8))  # the int8 frozen table at the largest V only
    assert seen == expected, sorted(seen ^ expected)
    assert all(float(ms) > 0 and int(rss.replace(",", "")) > 0 for *_, ms, _, rss in rows)
    ratios = dict(re.findall(r"^\| (.+?) \| ([\d.]+|n/a) \|$", out, re.M))
    labels = [s.format(vmax="3,000", vmin="2,000", vsmall="2,000") for s in bench.RATIO_LABELS]
    for label in labels:
        assert label in ratios and ratios[label] != "n/a", (label, ratios)
    # The int8 frozen table (18 bytes a row at D = 16) against float32 (64 bytes).
    assert float(ratios[labels[3]]) == pytest.approx(18 / 64, abs=1e-3)
    assert "frozen table at V=3,000: float32 192,000 bytes" in out


def test_bad_v_is_refused_with_the_value(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--vs", "abc"])
    assert "--vs value 'abc' is not a number" in capsys.readouterr().err


def test_ratios_add_the_target_v_when_it_was_measured(bench):
    def rows(autoft_s, plain_s):
        return {"autoft": {"ms": 1e3 / autoft_s, "samples_s": autoft_s, "frozen_bytes": 64},
                bench.PLAIN: {"ms": 1e3 / plain_s, "samples_s": plain_s, "frozen_bytes": 0},
                "finetune_all": {"ms": 1.0, "samples_s": 1e3, "frozen_bytes": 0}}
    results = {10**5: rows(100.0, 100.0), bench.TARGET_V: rows(300.0, 200.0),
               10**7: rows(400.0, 100.0)}
    got = dict(bench.ratios(results))
    assert got["autoft samples/s / plain samples/s at V=1e7"] == pytest.approx(4.0)
    assert got["autoft samples/s / plain samples/s at V=4,000,000"] == pytest.approx(1.5)
    assert "autoft samples/s / plain samples/s at V=4,000,000" not in dict(
        bench.ratios({10**5: rows(1.0, 1.0), 10**7: rows(2.0, 1.0)}))
    # One V measures no growth: n/a, not a ratio of a row to itself.
    one = dict(bench.ratios({10**5: rows(100.0, 100.0)}))
    assert one["autoft step at V=1e5 / at V=1e5"] is None
    assert one["autoft step / finetune_all step at V=1e5"] == pytest.approx(10.0)
