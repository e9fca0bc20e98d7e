"""benchmarks/policy_protocol.py: the split-valid scoring keeps the score's rows unseen."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from autoft_fast.data.tensors import DataBundle, TensorData


def _protocol():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "policy_protocol.py"
    spec = importlib.util.spec_from_file_location("policy_protocol", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(first: int, n: int) -> TensorData:
    ids = torch.arange(first, first + n, dtype=torch.int32).unsqueeze(1)
    return TensorData(ids, None, None, (torch.arange(n) % 2).float(), torch.zeros(n, dtype=torch.long))


def test_split_valid_scores_on_a_validation_half_no_run_sees():
    protocol = _protocol()
    splits = {"target_train": _rows(0, 10), "target_valid": _rows(100, 41),
              "target_test": _rows(500, 7)}
    bundle = DataBundle(feature_map=None, splits=splits, vocabularies={}, stats={})
    scored = protocol.split_validation(bundle, 3)
    seen = set(scored.splits["target_valid"].sparse.flatten().tolist())
    score = set(scored.splits["target_test"].sparse.flatten().tolist())
    assert len(seen) == 20 and len(score) == 21 and not seen & score
    assert seen | score == set(range(100, 141))  # the validation rows, and not the test's
    assert scored.splits["target_train"] is splits["target_train"]
    assert bundle.splits["target_test"] is splits["target_test"]  # the original is untouched
    again = protocol.split_validation(bundle, 3)
    assert torch.equal(again.splits["target_valid"].sparse, scored.splits["target_valid"].sparse)
