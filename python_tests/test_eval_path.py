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


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_a_fused_call_where_no_backward_can_run_is_the_plain_evaluation(backend, mode):
    # inference_mode refused the reference's fused step ("Inference tensors cannot be saved
    # for backward"); no_grad and inference_mode both give the plain call's output and
    # leave the table and the optimizer state alone.
    from autoft_fast.ops import fused_optim
    inp = make_inputs((17, 3), 40, 5, noise=False,
                      gen=case_generator("eval-fused", backend, torch.int64))
    tuned = torch.nn.Parameter(inp["tuned"].clone())
    opt = fused_optim.FusedOptimizer("adam", lr=0.1)
    state = opt.new_state(tuned)
    before = {k: v.clone() for k, v in state.items()}
    want, want_gates = autoft_fast.gated_embedding(
        inp["indices"], inp["frozen"], tuned.detach(), inp["logits"], noise=False,
        backend="reference")
    with mode():
        (out, gates), saved = _count_saved(lambda: autoft_fast.gated_embedding(
            inp["indices"], inp["frozen"], tuned, inp["logits"], noise=False, backend=backend,
            optimizer=opt, optimizer_state=state))
    assert saved == 0 and torch.equal(out, want) and torch.equal(gates, want_gates)
    assert torch.equal(tuned.detach(), inp["tuned"])
    assert all(torch.equal(state[k], before[k]) for k in state)
    with mode(), pytest.raises(TypeError, match="optimizer must be a FusedOptimizer"):
        autoft_fast.gated_embedding(inp["indices"], inp["frozen"], tuned, inp["logits"],
                                    backend=backend, optimizer="adam")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gated_embedding_module_with_a_fused_optimizer_evaluates_under_inference_mode(backend):
    e = autoft_fast.GatedEmbedding(30, 4, optimizer="adam", lr=0.1, backend=backend).eval()
    idx = torch.randint(0, 30, (8, 3), generator=torch.Generator().manual_seed(0))
    logits = torch.randn(8, 3, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = e(idx, logits)[0]
    with torch.inference_mode():
        got = e(idx, logits)[0]
    assert torch.equal(got, want)
