"""CUDA-backend details the shared backend suite does not reach.

On a GPU: deterministic dense gradients, an out-of-range index that leaves the CUDA context
usable, the vector-load and fallback paths of the row loads, float32 grad_out with 16-bit
tables. Everywhere (no GPU needed): the CUDA kernels themselves, run on the CPU by
csrc/cuda/emulation/emulate_kernels.cpp, against the reference.
"""

import os
import subprocess

import numpy as np
import pytest
import torch

import autoft_fast
from autoft_fast.ops import _extension
from autoft_fast.ops.reference import reference_gated_embedding

from op_helpers import build_emulation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_gpu = pytest.mark.skipif(
    not (torch.cuda.is_available() and _extension.has_kernel("CUDA")),
    reason="needs a GPU and the extension built with its CUDA kernels")

fwd = torch.ops.autoft_fast.gated_embedding_fwd
bwd = torch.ops.autoft_fast.gated_embedding_bwd


def inputs(n, rows, dim, dtype=torch.float32, seed=0, duplicates=False):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, rows, (n,), generator=gen)
    if duplicates:
        idx = idx % 3
    frozen = torch.randn(rows, dim, generator=gen).to(dtype)
    tuned = torch.randn(rows, dim, generator=gen).to(dtype)
    logits = torch.randn(n, 2, generator=gen)
    grad_out = torch.randn(n, dim, generator=gen)
    grad_gates = torch.randn(n, 2, generator=gen)
    return idx, frozen, tuned, logits, grad_out, grad_gates


def reference(idx, frozen, tuned, logits, grad_out, grad_gates, *, seed, tau, hard):
    tuned64 = tuned.double().requires_grad_()
    logits64 = logits.double().requires_grad_()
    out, gates = reference_gated_embedding(idx, frozen.double(), tuned64, logits64, tau=tau,
                                           hard=hard, noise=True, seed=seed)
    ((out * grad_out.double()).sum() + (gates * grad_gates.double()).sum()).backward()
    return out.detach(), gates.detach(), tuned64.grad, logits64.grad


def run_cuda(idx, frozen, tuned, logits, grad_out, grad_gates, *, seed, tau, hard, sparse,
             grad_dtype=None):
    c = lambda t: t.cuda()  # noqa: E731
    s = torch.tensor(seed)
    out, gates = fwd(c(idx), c(frozen), c(tuned), c(logits), s, None, tau, hard, True, sparse)
    g = grad_out.to(grad_dtype or tuned.dtype)
    grad_tuned, grad_logits, grad_rows = bwd(c(g), c(grad_gates), c(idx), c(frozen), c(tuned),
                                             c(logits), s, None, tau, hard, True, sparse)
    assert grad_rows.dtype == torch.int64 and grad_rows.device.type == "cuda"
    if sparse:
        # Uncoalesced: one row per lookup, the indices themselves.
        assert torch.equal(grad_rows.cpu(), idx.long())
        grad_tuned = torch.sparse_coo_tensor(grad_rows[None].cpu(), grad_tuned.double().cpu(),
                                             tuned.shape).to_dense()
    else:
        assert grad_rows.shape == (0,)
    return out.cpu(), gates.cpu(), grad_tuned.cpu(), grad_logits.cpu()


TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@needs_gpu
@pytest.mark.parametrize("dim,dtype", [
    (4, torch.float32),      # one lane, one 16-byte load per row
    (8, torch.bfloat16),     # one lane, eight bf16 in one load
    (6, torch.bfloat16),     # D not a multiple of the vector: element loads
    (128, torch.float32),    # a full warp per lookup
    (1000, torch.float16),   # several passes of a warp over the row
], ids=lambda v: str(v))
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_row_load_paths_match_reference(dim, dtype, sparse):
    data = inputs(203, 17, dim, dtype, seed=dim)
    for hard in (True, False):
        got = run_cuda(*data, seed=2**33 + dim, tau=0.8, hard=hard, sparse=sparse)
        want = reference(*data, seed=2**33 + dim, tau=0.8, hard=hard)
        tol = TOL[dtype]
        torch.testing.assert_close(got[1].double(), want[1], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got[0].double(), want[0].to(dtype).double(), rtol=tol, atol=tol)
        torch.testing.assert_close(got[2].double(), want[2].to(dtype).double(), rtol=tol,
                                   atol=4 * tol * max(1.0, float(want[2].abs().max())))
        torch.testing.assert_close(got[3].double(), want[3], rtol=1e-4, atol=1e-3)


@needs_gpu
def test_misaligned_tables_fall_back_to_element_loads():
    """A table view 4 bytes off a 16-byte boundary must not take the vector path."""
    idx, frozen, tuned, logits, grad_out, grad_gates = inputs(64, 10, 8, seed=7)
    store = torch.randn(10 * 8 + 1, device="cuda")
    frozen = store[1:].view(10, 8)  # contiguous, data_ptr % 16 == 4
    assert frozen.is_contiguous() and frozen.data_ptr() % 16 != 0
    got = run_cuda(idx, frozen, tuned, logits, grad_out, grad_gates, seed=3, tau=1.0, hard=False,
                   sparse=False)
    want = reference(idx, frozen.cpu(), tuned, logits, grad_out, grad_gates, seed=3, tau=1.0,
                     hard=False)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_float32_grad_out_with_16bit_tables(dtype):
    data = inputs(150, 20, 16, dtype, seed=8)
    got = run_cuda(*data, seed=5, tau=0.5, hard=True, sparse=False, grad_dtype=torch.float32)
    want = reference(*data, seed=5, tau=0.5, hard=True)
    tol = TOL[dtype]
    torch.testing.assert_close(got[2].double(), want[2].to(dtype).double(), rtol=tol,
                               atol=4 * tol * max(1.0, float(want[2].abs().max())))
    torch.testing.assert_close(got[3].double(), want[3], rtol=1e-4, atol=1e-3)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_deterministic_mode_gives_bitwise_identical_gradients(dtype):
    """torch.use_deterministic_algorithms(True): sorted segment sums instead of atomics."""
    idx, frozen, tuned, logits, grad_out, _ = inputs(60000, 50, 32, dtype, seed=9, duplicates=True)
    args = [t.cuda() for t in (grad_out.to(dtype), idx, frozen, tuned, logits)]
    call = lambda: bwd(args[0], None, *args[1:], torch.tensor(4), None, 1.0, False, True, False)  # noqa: E731
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = call()[0]
        again = [call()[0] for _ in range(3)]
    finally:
        torch.use_deterministic_algorithms(prev)
    for g in again:
        assert torch.equal(first, g)
    atomic = call()[0]
    scale = float(atomic.float().abs().max())
    # The two summation orders round differently; bf16 tables then differ by up to an ulp.
    rtol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(first.float(), atomic.float(), rtol=rtol, atol=rtol * scale)
    assert first[3:].abs().max() == 0  # only rows 0..2 are hit


@needs_gpu
def test_out_of_range_index_raises_and_keeps_the_context_usable():
    idx, frozen, tuned, logits, _, _ = inputs(5000, 100, 16, seed=10)
    for bad in (100, -1):
        idx_bad = idx.clone()
        idx_bad[4321] = bad
        with pytest.raises(IndexError,
                           match=rf"indices\[4321\] = {bad} is out of range for a table of 100 rows"):
            autoft_fast.gated_embedding(idx_bad.cuda(), frozen.cuda(), tuned.cuda(), logits.cuda(),
                                        seed=1, backend="cuda")
    out, _ = autoft_fast.gated_embedding(idx.cuda(), frozen.cuda(), tuned.cuda(), logits.cuda(),
                                         seed=1, backend="cuda")
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


# --------------------------------------------------------------------------------------------
# The CUDA kernels on the CPU, through the launch-grid emulation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return build_emulation("emulate_kernels", tmp_path_factory.mktemp("emulation"))


def run_emulated(exe, tmp_path, *, N, V, D, dtype, idx64, grad_f32, vec1, hard, noise, mode,
                 seed=123456789012, tau=0.8, grad_gates=True):
    args = [N, V, D, dtype, int(idx64), int(grad_f32), int(vec1), int(hard), noise, mode, seed, tau,
            int(grad_gates), tmp_path]
    subprocess.run([str(exe), *map(str, args)], check=True, timeout=120)

    def load(name, shape, dt=np.float32):
        return torch.from_numpy(np.fromfile(tmp_path / name, dtype=dt).reshape(shape))

    inp = dict(idx=load("idx.bin", (N,), np.int64), frozen=load("frozen.bin", (V, D)),
               tuned=load("tuned.bin", (V, D)), logits=load("logits.bin", (N, 2)),
               uniforms=load("uniforms.bin", (N,)), grad_out=load("go.bin", (N, D)),
               grad_gates=load("gg.bin", (N, 2)))
    got = dict(out=load("out.bin", (N, D)), gates=load("gates.bin", (N, 2)),
               grad_logits=load("glog.bin", (N, 2)))
    if mode == 1:  # sparse: per-lookup rows, summed here in float64
        got["grad_tuned"] = torch.zeros(V, D, dtype=torch.float64).index_add_(
            0, inp["idx"], load("gtuned.bin", (N, D)).double())
    else:
        got["grad_tuned"] = load("gtuned.bin", (V, D))
    return inp, got


EMULATED = [
    # D, dtype, vec1, hard, noise, mode: lanes per lookup 1..32, 16-byte and element loads,
    # several passes over a row, every gradient mode, both noise sources.
    (4, 0, False, True, 1, 0),
    (16, 0, False, False, 2, 1),
    (8, 1, False, True, 1, 2),
    (6, 1, True, False, 1, 3),
    (128, 0, False, False, 1, 0),
    (304, 2, False, True, 1, 1),
    (3, 0, True, False, 0, 2),
    (64, 1, False, False, 2, 3),
]


@pytest.mark.parametrize("dim,dtype,vec1,hard,noise,mode", EMULATED,
                         ids=[f"D{c[0]}-{['f32', 'bf16', 'f16'][c[1]]}-{'elem' if c[2] else 'vec'}-"
                              f"{'hard' if c[3] else 'soft'}-{['atomic', 'sparse', 'det', 'det_hot'][c[5]]}"
                              for c in EMULATED])
def test_emulated_cuda_kernels_match_reference(emulator, tmp_path, dim, dtype, vec1, hard, noise,
                                               mode):
    check_emulated_backward(emulator, tmp_path, 133, dim, dtype, vec1, hard, noise, mode)


# Long segments (gated_embedding_kernels.cuh kSegmentWindow = 128 sorted lookups): hot rows
# whose segments span several windows, one of them starting on a window boundary, summed from
# their pieces; and random rows, some of whose segments cross a boundary.
@pytest.mark.parametrize("dim,dtype,vec1,hard,noise,mode,n", [
    (8, 0, False, True, 1, 3, 700), (6, 1, True, False, 2, 3, 517), (40, 0, False, False, 1, 2, 600),
], ids=["D8-f32-hot-hard", "D6-bf16-hot-soft", "D40-f32-random"])
def test_emulated_long_segments_match_reference(emulator, tmp_path, dim, dtype, vec1, hard, noise,
                                                mode, n):
    check_emulated_backward(emulator, tmp_path, n, dim, dtype, vec1, hard, noise, mode)


def check_emulated_backward(emulator, tmp_path, n, dim, dtype, vec1, hard, noise, mode):
    rows, tau = 11, 0.8
    grad_f32 = dim in (64, 304)
    inp, got = run_emulated(emulator, tmp_path, N=n, V=rows, D=dim, dtype=dtype, idx64=dim % 2,
                            grad_f32=grad_f32, vec1=vec1, hard=hard, noise=noise, mode=mode, tau=tau)
    table_dtype = [torch.float32, torch.bfloat16, torch.float16][dtype]
    tuned = inp["tuned"].double().requires_grad_()
    logits = inp["logits"].double().requires_grad_()
    out, gates = reference_gated_embedding(
        inp["idx"], inp["frozen"].double(), tuned, logits, tau=tau, hard=hard, noise=noise != 0,
        seed=123456789012, uniforms=inp["uniforms"] if noise == 2 else None)
    ((out * inp["grad_out"].double()).sum() + (gates * inp["grad_gates"].double()).sum()).backward()
    tol = TOL[table_dtype]
    torch.testing.assert_close(got["gates"].double(), gates.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["out"].double(), out.detach().to(table_dtype).double(),
                               rtol=tol, atol=tol)
    torch.testing.assert_close(got["grad_tuned"].double(), tuned.grad, rtol=tol,
                               atol=4 * tol * max(1.0, float(tuned.grad.abs().max())))
    torch.testing.assert_close(got["grad_logits"].double(), logits.grad, rtol=1e-4, atol=1e-3)
    if mode == 3:
        assert got["grad_tuned"][3:].abs().max() == 0  # the three hot rows only


# The fused optimizer's update (segment_update_kernel), emulated: the backward of the
# deterministic mode, then each row's sorted segment summed and applied by the rule.
EMULATED_UPDATE = [
    # D, dtype, vec1, hard, noise, rule
    (4, 0, False, True, 1, "sgd"),
    (16, 0, False, False, 2, "adam"),
    (8, 1, False, True, 1, "rowwise_adagrad"),
    (6, 0, True, True, 1, "adam"),
    (64, 2, False, False, 1, "rowwise_adagrad"),
    (40, 0, False, True, 0, "adam"),
]


@pytest.mark.parametrize("dim,dtype,vec1,hard,noise,kind", EMULATED_UPDATE,
                         ids=[f"D{c[0]}-{['f32', 'bf16', 'f16'][c[1]]}-{'elem' if c[2] else 'vec'}-"
                              f"{'hard' if c[3] else 'soft'}-{c[5]}" for c in EMULATED_UPDATE])
def test_emulated_cuda_fused_update_matches_the_rule_on_the_reference_gradient(
        emulator, tmp_path, dim, dtype, vec1, hard, noise, kind):
    # More rows than lookups: some rows are never looked up, and under hard gates some are
    # looked up only by lookups that chose the frozen row; both must stay as they were.
    check_emulated_update(emulator, tmp_path, 133, dim, dtype, vec1, hard, noise, kind, hot=False)


@pytest.mark.parametrize("dim,dtype,vec1,hard,noise,kind", [
    (8, 0, False, True, 1, "rowwise_adagrad"), (16, 1, False, False, 2, "adam"),
    (6, 0, True, True, 1, "sgd"),
], ids=["D8-f32-hard-rowwise_adagrad", "D16-bf16-soft-adam", "D6-f32-elem-hard-sgd"])
def test_emulated_cuda_fused_update_of_hot_rows(emulator, tmp_path, dim, dtype, vec1, hard, noise,
                                                kind):
    # 700 lookups on three rows: segments of several windows, updated from their piece sums.
    check_emulated_update(emulator, tmp_path, 700, dim, dtype, vec1, hard, noise, kind, hot=True)


def check_emulated_update(emulator, tmp_path, n, dim, dtype, vec1, hard, noise, kind, *, hot):
    from autoft_fast.ops.fused_optim import RULES, STEP, FusedOptimizer
    rows, tau = 150, 0.8
    rule = list(RULES).index(kind)
    inp, got = run_emulated(emulator, tmp_path, N=n, V=rows, D=dim, dtype=dtype, idx64=dim % 2,
                            grad_f32=dim == 64, vec1=vec1, hard=hard, noise=noise,
                            mode=(7 if hot else 4) + rule, tau=tau)
    table_dtype = [torch.float32, torch.bfloat16, torch.float16][dtype]

    def load(name, shape):
        return torch.from_numpy(np.fromfile(tmp_path / name, dtype=np.float32).reshape(shape))

    state_shape = (rows,) if kind == "rowwise_adagrad" else (rows, dim)
    tuned = inp["tuned"].double().requires_grad_()
    out, gates = reference_gated_embedding(
        inp["idx"], inp["frozen"].double(), tuned, inp["logits"].double(), tau=tau, hard=hard,
        noise=noise != 0, seed=123456789012, uniforms=inp["uniforms"] if noise == 2 else None)
    (out * inp["grad_out"].double()).sum().backward()
    # The rows the update touches: a hard gate's frozen choice adds nothing and touches nothing.
    used = inp["idx"][gates[:, 1] != 0] if hard else inp["idx"]
    touched = torch.unique(used)
    opt = FusedOptimizer(kind, lr=0.05)
    want_w = inp["tuned"].clone()
    state = {STEP: torch.tensor(2)}
    names = list(RULES[kind].state)
    for name, file in zip(names, ("state_a0.bin", "state_b0.bin")):
        state[name] = load(file, state_shape if name != "exp_avg_sq" else (rows, dim)).clone()
    opt.apply_now(want_w, touched, tuned.grad[touched].float(), state)
    new_w = load("tuned_new.bin", (rows, dim))
    tol = TOL[table_dtype]
    torch.testing.assert_close(new_w, want_w.to(table_dtype).float(), rtol=tol, atol=tol)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[touched] = False
    if hot:
        assert inp["idx"].max() == 2 and len(touched) == 3
    elif hard:  # rows looked up, but only by frozen choices
        assert (untouched & torch.isin(torch.arange(rows), inp["idx"])).any()
    assert torch.equal(new_w[untouched], inp["tuned"][untouched])  # lazy: bit for bit
    for name, file in zip(names, ("state_a.bin", "state_b.bin")):
        shape = state_shape if name != "exp_avg_sq" else (rows, dim)
        torch.testing.assert_close(load(file, shape), state[name], rtol=1e-4, atol=1e-5)
    assert not torch.equal(new_w, inp["tuned"])


@needs_gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("kind", ["sgd", "rowwise_adagrad", "adam"])
@pytest.mark.parametrize("hard", [True, False])
def test_fused_update_on_the_gpu_equals_the_cpu_kernel(backend, kind, hard):
    # The backward with the optimizer inside it, on CUDA tensors, against the C++ CPU kernel
    # over three steps (the state carries over), with a hot row and rows only the frozen side
    # reads; then the plain tables' rows_update of the same device.
    from autoft_fast.ops import registry
    from autoft_fast.ops.fused_optim import FusedOptimizer
    if backend not in autoft_fast.available_backends("cuda"):
        pytest.skip(f"{backend} is not available on this GPU machine")
    idx, frozen, tuned0, logits0, grad_out, _ = inputs(3000, 400, 24, seed=21)
    idx[::7] = 5  # a hot row
    results = {}
    for dev, be in (("cpu", "cpu"), ("cuda", backend)):
        opt = FusedOptimizer(kind, lr=0.05)
        tuned = torch.nn.Parameter(tuned0.clone().to(dev))
        state = opt.new_state(tuned)
        for step in range(3):
            logits = logits0.to(dev).requires_grad_()
            out, _ = autoft_fast.gated_embedding(idx.to(dev), frozen.to(dev), tuned, logits,
                                                 tau=0.8, hard=hard, seed=9 + step, backend=be,
                                                 optimizer=opt, optimizer_state=state)
            out.backward(grad_out.to(dev))
        results[dev] = (tuned.detach().cpu(), logits.grad.cpu(),
                        {k: v.cpu() for k, v in state.items()})
    (w_c, g_c, s_c), (w_g, g_g, s_g) = results["cpu"], results["cuda"]
    torch.testing.assert_close(w_g, w_c, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_g, g_c, rtol=1e-4, atol=1e-5)
    for name in s_c:
        torch.testing.assert_close(s_g[name], s_c[name], rtol=1e-5, atol=1e-6)
    op = registry.rows_update_op(torch.device("cuda"))
    assert op is not None
    opt = FusedOptimizer(kind, lr=0.05)
    values = torch.randn(3000, 24)
    w_cpu, w_gpu = tuned0.clone(), tuned0.clone().cuda()
    s_cpu, s_gpu = opt.new_state(w_cpu), opt.new_state(w_gpu)
    torch.ops.autoft_fast.rows_update(idx, values, w_cpu, *opt.kernel_args(w_cpu, s_cpu))
    op(idx.cuda(), values.cuda(), w_gpu, *opt.kernel_args(w_gpu, s_gpu))
    torch.testing.assert_close(w_gpu.cpu(), w_cpu, rtol=1e-5, atol=1e-6)
