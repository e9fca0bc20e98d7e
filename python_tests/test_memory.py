"""Large tables in memory advised for transparent huge pages (autoft_fast.ops.memory)."""

import sys

import pytest
import torch
from torch import nn

from autoft_fast.modules import EmbeddingTable, GatedEmbedding
from autoft_fast.ops import memory
from autoft_fast.ops.fused_optim import FusedOptimizer

LINUX = sys.platform.startswith("linux")
BIG = (memory.MIN_BYTES // 4 // 16 + 4096, 16)  # float32 rows just over the threshold


def advised(t: torch.Tensor) -> bool:
    """Whether the mapping that holds the middle of t's storage carries the huge-page advice."""
    mid = t.untyped_storage().data_ptr() + t.untyped_storage().nbytes() // 2
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0] if line.strip() else ""
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= mid < hi
            elif inside and line.startswith("VmFlags"):
                return "hg" in line.split()
    raise AssertionError("the tensor's address is in no mapping")


@pytest.mark.skipif(not LINUX, reason="huge-page advice is Linux-only")
def test_large_cpu_tables_are_advised_and_small_ones_are_plain():
    src = torch.randn(*BIG)
    assert not advised(src)
    big = memory.copy(src)
    assert torch.equal(big, src) and big.data_ptr() != src.data_ptr()
    assert advised(big)
    assert advised(memory.empty(BIG)) and memory.zeros(BIG).abs().sum().item() == 0
    small = memory.copy(torch.ones(3, 4))
    assert not memory.wanted(small) and small.tolist() == [[1.0] * 4] * 3


@pytest.mark.skipif(not LINUX, reason="huge-page advice is Linux-only")
def test_the_environment_switch_turns_the_advice_off(monkeypatch):
    monkeypatch.setenv("AUTOFT_FAST_HUGE_PAGES", "0")
    assert not memory.enabled()
    t = memory.copy(torch.randn(*BIG))
    assert not advised(t) and not memory.advise(t)


@pytest.mark.skipif(not LINUX, reason="huge-page advice is Linux-only")
def test_library_tables_and_optimizer_state_are_advised():
    table = EmbeddingTable(*BIG)
    table.use_fused_optimizer("adam", lr=1e-3)
    gated = GatedEmbedding(*BIG, optimizer="adam", lr=1e-3)
    for t in (table.weight, table.optimizer_exp_avg, table.optimizer_exp_avg_sq,
              gated.tuned_weight, gated.frozen_weight, gated.optimizer_exp_avg):
        assert advised(t)
    assert gated.frozen_weight.data_ptr() != gated.tuned_weight.data_ptr()
    assert torch.equal(gated.frozen_weight, gated.tuned_weight)


@pytest.mark.parametrize("rows", [50, BIG[0]])
def test_embedding_table_init_is_nn_embedding_s_draw_for_draw(rows):
    torch.manual_seed(3)
    want = nn.Embedding(rows, 16, padding_idx=2)
    torch.manual_seed(3)
    got = EmbeddingTable(rows, 16, padding_idx=2)
    assert torch.equal(want.weight, got.weight) and got.weight[2].abs().sum().item() == 0
    assert isinstance(got.weight, nn.Parameter) and got.weight.requires_grad
    w = torch.randn(rows, 16)  # a given weight is used as nn.Embedding uses it
    assert torch.equal(EmbeddingTable(rows, 16, _weight=w).weight, w)


def test_deepcopy_module_copies_without_aliasing_and_keeps_ties():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = EmbeddingTable(*BIG)
            self.b = nn.Linear(16, 2)
            self.b2 = self.b  # the same module twice
            self.register_buffer("big_buffer", torch.randn(*BIG))
            self.a.weight.requires_grad_(False)

    m = Tied()
    c = memory.deepcopy_module(m)
    for (name, p), (_, q) in zip(m.state_dict().items(), c.state_dict().items()):
        assert torch.equal(p, q) and p.data_ptr() != q.data_ptr(), name
    assert c.b is c.b2 and isinstance(c.a.weight, nn.Parameter)
    assert not c.a.weight.requires_grad
    if LINUX:
        assert advised(c.a.weight) and advised(c.big_buffer)
    with torch.no_grad():
        c.a.weight.add_(1.0)
    assert not torch.equal(m.a.weight, c.a.weight)


def test_fused_optimizer_state_starts_at_zero_in_advised_memory():
    state = FusedOptimizer("adam", lr=1e-3).new_state(torch.empty(*BIG))
    assert state["exp_avg"].abs().sum().item() == 0 and state["exp_avg_sq"].shape == BIG
    if LINUX:
        assert advised(state["exp_avg"])


def test_deepcopy_module_keeps_views_of_one_storage_shared():
    m = nn.Module()
    base = torch.randn(BIG[0] * 2, 16)
    m.register_buffer("a", base[: BIG[0]])
    m.register_buffer("b", base[BIG[0]:])
    c = memory.deepcopy_module(m)
    assert torch.equal(c.a, m.a) and torch.equal(c.b, m.b)
    assert c.a.untyped_storage().data_ptr() == c.b.untyped_storage().data_ptr()
    assert c.a.data_ptr() != m.a.data_ptr()
