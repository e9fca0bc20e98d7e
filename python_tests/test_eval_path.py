"""The evaluation path: hard gates, no noise, no gradients: only the chosen row is read."""

from __future__ import annotations

import pytest
import torch

import autoft_fast

from op_helpers import case_generator, make_inputs

BACKENDS = autoft_fast.available_backends("cpu")


def _count_saved(fn):
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        result = fn()
    return result, len(packed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_eval_forward_equals_training_forward_and_saves_nothing(backend, index_dtype):
    inp = make_inputs((33, 4), 50, 9, noise=False, index_dtype=index_dtype,
                      gen=case_generator("eval", backend, index_dtype))
    tuned = inp["tuned"].clone().requires_grad_()
    logits = inp["logits"].clone().requires_grad_()
    want_out, want_gates = autoft_fast.gated_embedding(
        inp["indices"], inp["frozen"], tuned, logits, noise=False, backend="reference")
    with torch.no_grad():
        (out, gates), saved = _count_saved(lambda: autoft_fast.gated_embedding(
            inp["indices"], inp["frozen"], tuned, logits, noise=False, backend=backend))
    assert saved == 0 and out.grad_fn is None
    assert torch.equal(out, want_out.detach())
    assert torch.equal(gates, want_gates.detach())
    # With gradients wanted, the same call does save its inputs for the backward.
    _, saved_train = _count_saved(lambda: autoft_fast.gated_embedding(
        inp["indices"], inp["frozen"], tuned, logits, noise=False, backend=backend))
    assert saved_train > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_forward_reads_only_the_chosen_row(backend):
    # Rows the gate does not choose hold NaN: reading them would poison a mixed output.
    frozen = torch.full((6, 3), float("nan"))
    tuned = torch.arange(18.0).reshape(6, 3)
    frozen[0] = -1.0
    tuned[0] = float("nan")
    idx = torch.tensor([1, 2, 0, 5])
    logits = torch.tensor([[0.0, 1.0], [0.0, 2.0], [1.0, 0.0], [0.0, 3.0]])
    with torch.no_grad():
        out, gates = autoft_fast.gated_embedding(idx, frozen, tuned, logits, noise=False,
                                                 backend=backend)
    assert torch.equal(out[[0, 1, 3]], tuned[[1, 2, 5]])
    assert torch.equal(out[2], frozen[0])
    assert gates[:, 1].tolist() == [1.0, 1.0, 0.0, 1.0]


def test_module_eval_mode_under_no_grad_saves_nothing():
    emb = autoft_fast.GatedEmbedding(100, 8).eval()
    idx = torch.randint(0, 100, (16, 5))
    logits = torch.randn(16, 5, 2, requires_grad=True)
    with torch.no_grad():
        (out, _), saved = _count_saved(lambda: emb(idx, logits))
    assert saved == 0 and out.shape == (16, 5, 8)
