"""Sparse gradient mode never allocates a V x D buffer, in forward or backward."""

import pytest
import torch

import autoft_fast

BACKENDS = [b for b in autoft_fast.available_backends("cpu")]


def largest_allocation(fn) -> int:
    with torch.profiler.profile(profile_memory=True) as prof:
        fn()
    return max([e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0] + [0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_mode_allocates_no_table_sized_buffer(backend):
    rows, dim = 200_000, 16
    table_bytes = rows * dim * 4
    frozen = torch.randn(rows, dim)
    tuned = torch.nn.Parameter(frozen.clone())
    idx = torch.randint(0, rows, (16, 8))
    logits = torch.randn(16, 8, 2, requires_grad=True)

    def step(sparse):
        tuned.grad = None
        out, _ = autoft_fast.gated_embedding(idx, frozen, tuned, logits, sparse=sparse, backend=backend)
        out.sum().backward()

    assert largest_allocation(lambda: step(True)) < table_bytes // 100
    # The dense mode does allocate one: the check above can see such a buffer.
    assert largest_allocation(lambda: step(False)) >= table_bytes
