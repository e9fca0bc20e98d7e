"""Triton-backend details the shared backend suite does not reach.

Runs on a GPU, or on the CPU under TRITON_INTERPRET=1 (conftest sets it when CUDA is absent).
"""

import os

import pytest
import torch

import autoft_fast
from autoft_fast.ops import _extension
from autoft_fast.ops.reference import reference_gated_embedding

kernels = _extension.load_triton()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    kernels is None or not kernels.is_available(DEVICE),
    reason=f"Triton backend not usable on {DEVICE} here ({_extension.TRITON_ERROR})")


def inputs(n, rows, dim, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (n,), generator=gen)
    frozen = torch.randn(rows, dim, generator=gen).to(dtype)
    tuned = torch.randn(rows, dim, generator=gen).to(dtype)
    logits = torch.randn(n, 2, generator=gen)
    grad_out = torch.randn(n, dim, generator=gen).to(dtype)
    grad_gates = torch.randn(n, 2, generator=gen)
    return [t.to(DEVICE) for t in (idx, frozen, tuned, logits, grad_out, grad_gates)]


def reference(idx, frozen, tuned, logits, grad_out, grad_gates, *, seed, tau, hard):
    """float64 oracle: out, gates, dense grad_tuned, grad_logits."""
    tuned64 = tuned.double().cpu().requires_grad_()
    logits64 = logits.double().cpu().requires_grad_()
    out, gates = reference_gated_embedding(idx.cpu(), frozen.double().cpu(), tuned64, logits64,
                                           tau=tau, hard=hard, noise=True, seed=seed)
    ((out * grad_out.double().cpu()).sum() + (gates * grad_gates.double().cpu()).sum()).backward()
    return out.detach(), gates.detach(), tuned64.grad, logits64.grad


@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_embedding_wider_than_one_block(hard):
    """D = 300 > BLOCK_D = 256: the kernels walk D in chunks and carry the dot products."""
    idx, frozen, tuned, logits, grad_out, grad_gates = inputs(6, 5, 300, seed=1)
    seed = 2**40 + 17
    out, gates = torch.ops.autoft_fast.gated_embedding_fwd_triton(
        idx, frozen, tuned, logits, torch.tensor(seed), None, 0.9, hard, True, False)
    grad_tuned, grad_logits, grad_rows = torch.ops.autoft_fast.gated_embedding_bwd_triton(
        grad_out, grad_gates, idx, frozen, tuned, logits, torch.tensor(seed), None, 0.9, hard,
        True, False)
    want = reference(idx, frozen, tuned, logits, grad_out, grad_gates, seed=seed, tau=0.9, hard=hard)
    assert grad_rows.dtype == torch.int64 and grad_rows.shape == (0,)
    torch.testing.assert_close(out.double().cpu(), want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gates.double().cpu(), want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_tuned.double().cpu(), want[2], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_logits.double().cpu(), want[3], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_seed_read_on_device_matches_seed_by_value(sparse):
    """The traced path (seed loaded from a device copy) draws the same noise as eager."""
    from autoft_fast.kernels import gated_embedding as ge

    idx, frozen, tuned, logits, grad_out, grad_gates = inputs(37, 9, 8, seed=2)
    seed = torch.tensor(2**62 + 5)
    args = (idx, frozen, tuned, logits, seed, None, 0.5, True, True)
    by_value = ge._fwd_launch(*args, concrete=True)
    by_pointer = ge._fwd_launch(*args, concrete=False)
    for a, b in zip(by_value, by_pointer):
        assert torch.equal(a, b)
    bargs = (grad_out, grad_gates, idx, frozen, tuned, logits, seed, None, 0.5, True, True, sparse)
    grads = ge._bwd_launch(*bargs, concrete=True)
    for a, b in zip(grads, ge._bwd_launch(*bargs, concrete=False)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # grad_rows: the sorted unique indices as int64 (coalesced COO rows, each summed in
    # float32) in sparse mode, empty when dense.
    want_rows = (torch.unique(idx.long()) if sparse
                 else torch.empty(0, dtype=torch.int64, device=idx.device))
    assert len(grads) == 3 and torch.equal(grads[2], want_rows)


def test_kernel_op_checks_index_range_itself():
    """A direct torch.ops call (no Python validation in front) still raises the contract's error."""
    idx, frozen, tuned, logits, _, _ = inputs(8, 4, 4, seed=3)
    idx[5] = 4
    with pytest.raises(IndexError, match=r"indices\[5\] = 4 is out of range for a table of 4 rows"):
        torch.ops.autoft_fast.gated_embedding_fwd_triton(
            idx, frozen, tuned, logits, torch.tensor(1), None, 1.0, True, True, False)


def test_kernel_op_rejects_bad_tau_and_seed():
    idx, frozen, tuned, logits, _, _ = inputs(4, 4, 4, seed=4)
    with pytest.raises(ValueError, match="tau"):
        torch.ops.autoft_fast.gated_embedding_fwd_triton(
            idx, frozen, tuned, logits, torch.tensor(1), None, 0.0, True, True, False)
    with pytest.raises(ValueError, match="seed = -3"):
        torch.ops.autoft_fast.gated_embedding_fwd_triton(
            idx, frozen, tuned, logits, torch.tensor(-3), None, 1.0, True, True, False)


def test_is_available_reports_the_device_it_serves():
    assert kernels.is_available(DEVICE)
    assert kernels.is_available("cpu") == kernels.interpreting()
    assert not kernels.is_available("meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor codegen of Triton kernels needs a GPU")
def test_inductor_compiles_through_the_triton_op():
    """torch.compile (Inductor) sees the kernels inside the triton_op and gets eager's numbers."""
    idx, frozen, tuned, logits, grad_out, _ = inputs(1000, 100, 32, seed=5)
    tuned.requires_grad_()
    logits.requires_grad_()

    def step(idx, logits):
        out, gates = autoft_fast.gated_embedding(idx, frozen, tuned, logits, tau=0.7, seed=11,
                                                 backend="triton")
        return (out * grad_out).sum() + gates[:, 1].sum()

    eager = step(idx, logits)
    eager.backward()
    want = (tuned.grad.clone(), logits.grad.clone())
    tuned.grad = logits.grad = None
    got = torch.compile(step, fullgraph=True)(idx, logits)
    got.backward()
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(tuned.grad, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.grad, want[1], rtol=1e-5, atol=1e-5)


def test_deterministic_mode_gives_bitwise_identical_dense_gradients():
    """Under torch.use_deterministic_algorithms(True) the dense gradient avoids float atomics."""
    idx, frozen, tuned, logits, grad_out, _ = inputs(300, 40, 16, seed=6)
    idx = idx % 3  # a few hot rows: the case where atomics reorder sums
    call = lambda: torch.ops.autoft_fast.gated_embedding_bwd_triton(  # noqa: E731
        grad_out, None, idx, frozen, tuned, logits, torch.tensor(8), None, 1.0, False, True, False)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, again = call()[0], call()[0]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(first, again)
    assert first[3:].abs().max() == 0
    torch.testing.assert_close(first, call()[0], rtol=1e-5, atol=1e-5)


AOT_SCRIPT = r"""
import inspect, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from autoft_fast.kernels import gated_embedding as ge

assert not ge._interpreting()
target = GPUTarget("cuda", 90, 32)
aligned = [["tt.divisibility", 16]]


def compile_kernel(kernel, types, constexprs, num_warps=8):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: types.get(n, "constexpr") for n in names}
    attrs = {(i,): aligned for i, n in enumerate(names) if n.endswith("_ptr") or n == "D"}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": num_warps}).asm["ptx"]


# (tuned table, frozen table, hard, seed from a pointer); int8: row-quantised frozen table.
for table, frozen, hard, from_ptr in (("fp32", "fp32", True, False), ("bf16", "bf16", False, True),
                                      ("fp16", "fp16", True, False), ("fp32", "i8", True, False),
                                      ("fp32", "i8", False, True), ("fp32", "bf16", True, False)):
    t, f, quant = "*" + table, "*" + frozen, frozen == "i8"
    ptx = compile_kernel(ge._fwd_kernel, dict(
        idx_ptr="*i64", frozen_ptr=f, tuned_ptr=t, logits_ptr="*fp32", seed_ptr="*i64",
        seed_val="i64", uniforms_ptr="*fp32", out_ptr=t, gates_ptr="*fp32", N="i32", D="i32",
        FS="i32", tau="fp32"), dict(HARD=hard, NOISE=True, USE_UNIFORMS=False,
                                    SEED_FROM_PTR=from_ptr, QUANT=quant, BLOCK_N=64, BLOCK_D=64))
    assert "ld.global.v4" in ptx, "forward row loads are not 16-byte vector loads"
    for sparse in (False, True):
        ptx = compile_kernel(ge._bwd_kernel, dict(
            grad_out_ptr="*fp32", grad_gates_ptr="*fp32", idx_ptr="*i32", frozen_ptr=f,
            tuned_ptr=t, logits_ptr="*fp32", seed_ptr="*i64", seed_val="i64",
            uniforms_ptr="*fp32", grad_tuned_ptr=t if sparse else "*fp32",
            grad_logits_ptr="*fp32", N="i32", D="i32", FS="i32", tau="fp32"),
            dict(HARD=hard, NOISE=True, USE_UNIFORMS=False, SEED_FROM_PTR=from_ptr,
                 HAS_GRAD_GATES=True, SPARSE=sparse, QUANT=quant, BLOCK_N=64, BLOCK_D=64))
        assert ("red.global" in ptx or "atom.global" in ptx) == (not sparse)
# The backward that also stores each lookup's tuned weight (the fused optimizer's path).
compile_kernel(ge._bwd_kernel, dict(
    grad_out_ptr="*fp32", grad_gates_ptr="*fp32", idx_ptr="*i64", frozen_ptr="*fp32",
    tuned_ptr="*fp32", logits_ptr="*fp32", seed_ptr="*i64", seed_val="i64", uniforms_ptr="*fp32",
    grad_tuned_ptr="*fp32", grad_logits_ptr="*fp32", z1_ptr="*fp32", N="i32", D="i32", FS="i32",
    tau="fp32"), dict(HARD=True, NOISE=True, USE_UNIFORMS=False, SEED_FROM_PTR=False,
                      HAS_GRAD_GATES=False, SPARSE=True, QUANT=False, STORE_Z1=True,
                      BLOCK_N=64, BLOCK_D=16))
# The bag kernels at the block sizes and warp counts their launchers choose (at the lookup
# kernels' warp counts Triton 3.7's compiler failed on them for D = 32, 64, 128).
from autoft_fast.kernels import gated_bag as gb, rows_update as ru
for d, quant in ((16, False), (32, False), (64, True), (128, False)):
    block_b, block_d, warps = gb._bag_block_sizes(4096, d, True)
    f = "*i8" if quant else "*fp32"
    compile_kernel(gb._bag_fwd_kernel, dict(
        values_ptr="*i64", offsets_ptr="*i64", weights_ptr="*fp32", frozen_ptr=f,
        tuned_ptr="*fp32", logits_ptr="*fp32", seed_ptr="*i64", seed_val="i64",
        uniforms_ptr="*fp32", out_ptr="*fp32", gates_ptr="*fp32", B="i32", D="i32", FS="i32",
        tau="fp32"), dict(HARD=True, NOISE=True, USE_UNIFORMS=False, SEED_FROM_PTR=False,
                          QUANT=quant, HAS_WEIGHTS=quant, MEAN=not quant, BLOCK_B=block_b,
                          BLOCK_D=block_d), num_warps=warps)
    compile_kernel(gb._bag_bwd_kernel, dict(
        grad_out_ptr="*fp32", grad_gates_ptr="*fp32", values_ptr="*i64", offsets_ptr="*i64",
        weights_ptr="*fp32", frozen_ptr=f, tuned_ptr="*fp32", logits_ptr="*fp32",
        seed_ptr="*i64", seed_val="i64", uniforms_ptr="*fp32", accum_ptr="*fp32",
        grad_logits_ptr="*fp32", B="i32", D="i32", FS="i32", tau="fp32"),
        dict(HARD=not quant, NOISE=True, USE_UNIFORMS=False, SEED_FROM_PTR=False,
             HAS_GRAD_GATES=True, PER_VALUE=quant, QUANT=quant, HAS_WEIGHTS=False,
             MEAN=False, BLOCK_B=block_b, BLOCK_D=block_d), num_warps=warps)
# The fused optimizer's row update, every rule, float32 and bfloat16 tables, and the piece sums
# of its hot rows.
for weight, rule in (("*fp32", 0), ("*fp32", 1), ("*bf16", 2)):
    compile_kernel(ru._rows_update_kernel, dict(
        order_ptr="*i64", seg_ptr="*i64", rows_ptr="*i64", values_ptr="*fp32", part_ptr="*fp32",
        weight_ptr=weight, sa_ptr="*fp32", sb_ptr="*fp32", D="i32", lr="fp32", eps="fp32",
        omb1="fp32", omb2="fp32", neg_step="fp32"),
        dict(RULE=rule, BLOCK_D=16, WINDOW=ru.SEGMENT_WINDOW), num_warps=1)
for n in ("i32", "i64"):
    compile_kernel(ru._pieces_kernel, dict(
        order_ptr="*i64", inv_ptr="*i64", seg_ptr="*i64", values_ptr="*fp32", part_ptr="*fp32",
        N=n, D="i32"), dict(WINDOW=ru.SEGMENT_WINDOW, BLOCK_D=64), num_warps=1)
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter never runs Triton's compiler; this builds the kernels' PTX for sm_90."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


def test_every_launch_runs_on_its_tensors_device(monkeypatch):
    # Triton launches on the current CUDA device, not the tensors': each launch is wrapped
    # so that tensors on another GPU make their device current for it.
    import contextlib
    import importlib
    import inspect
    import types

    gated_embedding, gated_bag, rows_update = (
        importlib.import_module(f"{kernels.__name__}.{m}")
        for m in ("gated_embedding", "gated_bag", "rows_update"))
    for mod in (gated_embedding, gated_bag, rows_update):
        lines = inspect.getsource(mod).splitlines()
        launches = [i for i, line in enumerate(lines) if line.lstrip().startswith("kernel[(")]
        assert launches, mod.__name__
        for i in launches:
            assert "_launch_device(" in lines[i - 1], f"{mod.__name__}: {lines[i].strip()}"
    entered = []
    monkeypatch.setattr(torch.cuda, "device",
                        lambda d: entered.append(d) or contextlib.nullcontext())
    on_gpu1 = types.SimpleNamespace(device=torch.device("cuda", 1))
    with gated_embedding._launch_device(on_gpu1, True):
        pass
    assert entered == [torch.device("cuda", 1)]
    # CPU tensors (the interpreter) and traced launches (Inductor places them): untouched.
    with gated_embedding._launch_device(torch.zeros(1), True):
        pass
    with gated_embedding._launch_device(on_gpu1, False):
        pass
    assert entered == [torch.device("cuda", 1)]
