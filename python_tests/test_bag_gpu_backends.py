"""The bag op's GPU backends (Triton and CUDA) against the float64 reference.

test_op_bags.py runs the shared bag suite on every backend that serves bags here (Triton under
TRITON_INTERPRET=1 on CPU tensors); this file adds what that suite does not reach: bags longer
than a block walks at once, many blocks, rows wider than one chunk, frozen tables in a lower
precision than the tuned one, float32 incoming gradients with 16-bit tables, given uniforms,
the coalesced sparse layout, deterministic dense gradients; the CUDA bag kernels on the CPU
through the launch-grid emulation (csrc/cuda/emulation/emulate_bag_kernels.cpp); and, on a GPU,
both backends on CUDA tensors.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import autoft_fast
from autoft_fast.ops import _extension, quant, registry
from autoft_fast.ops.philox import philox_uniforms
from autoft_fast.ops.reference import reference_gated_embedding_bag

from op_helpers import TOLERANCES, build_emulation, case_generator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_TRITON = "triton" in registry.bag_backends("cpu")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton (interpreter) not usable here")
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
GPU_BAG_BACKENDS = ["cuda", "triton"]


def bags(key, *, count, rows, dim, max_len, table_dtype=torch.float32, frozen_dtype=None,
         index_dtype=torch.int64, weights=False, duplicates=False, seed=7, tau=1.0, noise=True,
         uniforms=False):
    """Random bags (bag 1 empty) with every gate kept away from a tie."""
    gen = case_generator(*key)
    lengths = torch.randint(0, max_len + 1, (count,), generator=gen)
    if count > 1:
        lengths[1] = 0
    offsets = torch.cat((torch.zeros(1, dtype=torch.long), torch.cumsum(lengths, 0)))
    total = int(lengths.sum())
    if duplicates:
        values = torch.full((total,), int(torch.randint(0, rows, (), generator=gen)))
    else:
        values = torch.randint(0, rows, (total,), generator=gen)
    frozen32 = torch.randn(rows, dim, generator=gen)
    tuned = (frozen32 + 0.5 * torch.randn(rows, dim, generator=gen)).to(table_dtype)
    frozen_dtype = frozen_dtype or table_dtype
    frozen = quant.quantize_int8(frozen32) if frozen_dtype == torch.int8 else frozen32.to(frozen_dtype)
    logits = torch.randn(count, 2, generator=gen)
    u = torch.rand(count, generator=gen) if uniforms else None
    if noise:
        uu = u.double() if uniforms else torch.from_numpy(philox_uniforms(seed, count)).double()
        l = torch.log(uu + 1e-20) - torch.log(1 - uu)
    else:
        l = torch.zeros(count, dtype=torch.float64)
    x = (logits[:, 1].double() - logits[:, 0].double() + l) / tau
    logits[:, 1] = torch.where(x.abs() < 1e-3, logits[:, 1] + 0.01 * tau, logits[:, 1])
    return dict(values=values.to(index_dtype), offsets=offsets.to(index_dtype), frozen=frozen,
                tuned=tuned, logits=logits,
                weights=torch.rand(total, generator=gen) + 0.5 if weights else None,
                uniforms=u, grad_out=torch.randn(count, dim, generator=gen).to(table_dtype),
                grad_gates=torch.randn(count, 2, generator=gen), seed=seed)


def run_bag(backend, inp, *, mode, hard=True, noise=True, sparse=False, tau=1.0, device="cpu",
            float64=False):
    """out, gates, dense tuned gradient, logit gradient (float64, on the CPU), and the raw
    tuned gradient."""
    dev = lambda t: None if t is None else t.to(device)  # noqa: E731
    frozen, tuned, logits, w = inp["frozen"], inp["tuned"], inp["logits"], inp["weights"]
    if float64:
        frozen = (quant.dequantize(frozen) if frozen.dtype == torch.int8 else frozen).double()
        tuned, logits = tuned.double(), logits.double()
        w = None if w is None else w.double()
    tuned = dev(tuned).clone().requires_grad_()
    logits = dev(logits).clone().requires_grad_()
    out, gates = autoft_fast.gated_embedding_bag(
        dev(inp["values"]), dev(inp["offsets"]), dev(frozen), tuned, logits, per_sample_weights=dev(w),
        mode=mode, tau=tau, hard=hard, noise=noise, seed=inp["seed"],
        uniforms=dev(inp["uniforms"]) if noise else None, sparse=sparse, backend=backend)
    loss = (out.double() * dev(inp["grad_out"]).double()).sum() \
        + (gates.double() * dev(inp["grad_gates"]).double()).sum()
    loss.backward()
    raw = tuned.grad
    g_t = raw.to_dense() if raw.is_sparse else raw
    return [t.detach().double().cpu() for t in (out, gates, g_t, logits.grad)] + [raw]


def assert_matches(got, want, table_dtype, *, sums=1):
    """Gates and logit gradients to float32 rounding; out and the tuned gradient to the table
    dtype's tolerance, loosened with the number of float32 terms the largest row sums."""
    rtol, atol = (t * max(1, sums // 50) for t in TOLERANCES[table_dtype])
    for name, g, w in zip(("out", "gates", "grad_tuned", "grad_logits"), got, want):
        if name == "gates":
            tol = (1e-5, 1e-6)
        elif name == "grad_logits":
            tol = (1e-4, 1e-4 if table_dtype == torch.float32 else 5e-2)
        else:
            tol = (rtol, atol * max(1.0, float(w.abs().max())) if w.numel() else atol)
        torch.testing.assert_close(g, w, rtol=tol[0], atol=tol[1], msg=lambda m: f"{name}: {m}")


# --------------------------------------------------------------------------------------------
# Triton (interpreter on the CPU; compiled on a GPU)
# --------------------------------------------------------------------------------------------


@needs_triton
@pytest.mark.parametrize("dim,max_len,count", [
    (16, 40, 37),    # bags longer than anything the shared suite draws
    (300, 6, 9),     # a row of two BLOCK_D chunks (256 + 44)
    (5, 3, 700),     # several programs of bags
], ids=["long-bags", "wide-rows", "many-blocks"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
@pytest.mark.parametrize("hard,sparse", [(True, False), (False, True)], ids=["hard-dense", "soft-sparse"])
def test_triton_bag_shapes_match_reference(dim, max_len, count, mode, hard, sparse):
    inp = bags(("triton-shape", dim, max_len, count, mode, hard, sparse), count=count, rows=29,
               dim=dim, max_len=max_len, weights=True, tau=0.7)
    want = run_bag("reference", inp, mode=mode, hard=hard, sparse=sparse, tau=0.7, float64=True)
    got = run_bag("triton", inp, mode=mode, hard=hard, sparse=sparse, tau=0.7)
    assert_matches(got[:4], want[:4], torch.float32, sums=max_len)


@needs_triton
@pytest.mark.parametrize("table_dtype,frozen_dtype", [
    (torch.float32, torch.bfloat16), (torch.float32, torch.float16), (torch.bfloat16, torch.int8),
    (torch.float16, torch.float16)], ids=["f32-bf16", "f32-f16", "bf16-int8", "f16-f16"])
@pytest.mark.parametrize("hard", [True, False], ids=["hard", "soft"])
def test_triton_bag_low_precision_frozen_tables(table_dtype, frozen_dtype, hard):
    inp = bags(("triton-lp", table_dtype, frozen_dtype, hard), count=33, rows=17, dim=24, max_len=5,
               table_dtype=table_dtype, frozen_dtype=frozen_dtype, index_dtype=torch.int32)
    # The oracle reads the float32 table the low-precision one stands for.
    want = run_bag("reference", inp, mode="mean", hard=hard, float64=True)
    got = run_bag("triton", inp, mode="mean", hard=hard)
    assert_matches(got[:4], want[:4], table_dtype)


@needs_triton
def test_triton_bag_uniforms_and_no_noise():
    inp = bags(("triton-u",), count=50, rows=11, dim=8, max_len=4, uniforms=True)
    for noise in (True, False):
        want = run_bag("reference", inp, mode="sum", noise=noise, float64=True)
        assert_matches(run_bag("triton", inp, mode="sum", noise=noise)[:4], want[:4], torch.float32)


@needs_triton
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_bag_sparse_gradient_is_coalesced_and_summed_in_float32(table_dtype):
    # 2000 values of one row: a 16-bit running sum would stall far from the float32 sum.
    inp = bags(("triton-coalesce", table_dtype), count=400, rows=9, dim=4, max_len=10,
               table_dtype=table_dtype, duplicates=True)
    got = run_bag("triton", inp, mode="sum", hard=False, sparse=True)
    raw = got[4]
    assert raw.is_sparse and raw.is_coalesced() and raw._indices().shape[1] == 1
    want = run_bag("reference", inp, mode="sum", hard=False, float64=True)
    exact = want[2].to(table_dtype).double()  # the float64 sum, rounded once
    torch.testing.assert_close(got[2], exact, rtol=2 * TOLERANCES[table_dtype][0], atol=1e-3)


@needs_triton
def test_triton_bag_deterministic_dense_gradient_is_bitwise_reproducible():
    inp = bags(("triton-det",), count=300, rows=5, dim=8, max_len=8)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run_bag("triton", inp, mode="mean", hard=False)
        again = run_bag("triton", inp, mode="mean", hard=False)
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(first[2], again[2])
    want = run_bag("reference", inp, mode="mean", hard=False, float64=True)
    assert_matches(first[:4], want[:4], torch.float32, sums=300)


@needs_triton
@pytest.mark.parametrize("table_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_triton_bag_kernel_takes_float32_grad_out_with_16bit_tables(table_dtype):
    inp = bags(("triton-g32", table_dtype), count=20, rows=7, dim=16, max_len=4, table_dtype=table_dtype)
    _, bwd = registry.REGISTRY["triton"].bag_ops()
    args = (inp["values"], inp["offsets"], None, inp["frozen"], inp["tuned"], inp["logits"],
            torch.tensor(inp["seed"]), None, 1.0, True, True, 1, False)
    g16 = bwd(inp["grad_out"], inp["grad_gates"], *args)
    g32 = bwd(inp["grad_out"].float(), inp["grad_gates"], *args)
    # The same values reach the kernel (16-bit grad_out is exact in float32).
    assert torch.equal(g16[0], g32[0]) and torch.equal(g16[1], g32[1])


# --------------------------------------------------------------------------------------------
# The CUDA bag kernels on the CPU, through the launch-grid emulation
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bag_emulator(tmp_path_factory):
    return build_emulation("emulate_bag_kernels", tmp_path_factory.mktemp("bag_emulation"))


SEED = 987654321012


def run_emulated(exe, out_dir, *, B, V, D, dtype, idx64, vec1, hard, noise, grad, mean, weights,
                 max_len, duplicates, tau=0.8, grad_gates=True):
    args = [B, V, D, dtype, int(idx64), int(vec1), int(hard), noise, grad, int(mean), int(weights),
            max_len, int(duplicates), SEED, tau, int(grad_gates), out_dir]
    subprocess.run([str(exe), *map(str, args)], check=True, timeout=120)

    def load(name, shape, dt=np.float32):
        return torch.from_numpy(np.fromfile(out_dir / name, dtype=dt).reshape(shape))

    offsets = load("offsets.bin", (B + 1,), np.int64)
    L = int(offsets[-1])
    inp = dict(values=load("values.bin", (L,), np.int64), offsets=offsets,
               weights=load("weights.bin", (L,)), frozen=load("frozen.bin", (V, D)),
               tuned=load("tuned.bin", (V, D)), logits=load("logits.bin", (B, 2)),
               uniforms=load("uniforms.bin", (B,)), grad_out=load("go.bin", (B, D)),
               grad_gates=load("gg.bin", (B, 2)))
    got = dict(out=load("out.bin", (B, D)), gates=load("gates.bin", (B, 2)),
               grad_logits=load("glog.bin", (B, 2)))
    if grad == 1:  # sparse: one row per value, summed here in float64
        got["grad_tuned"] = torch.zeros(V, D, dtype=torch.float64).index_add_(
            0, inp["values"], load("gtuned.bin", (L, D)).double())
    else:
        got["grad_tuned"] = load("gtuned.bin", (V, D))
    return inp, got


EMULATED = [
    # D, dtype, vec1, hard, noise, grad, mean, weights, max_len, duplicates: lanes per bag 1..32,
    # 16-byte and element loads, several passes over a row, every gradient mode, both noise
    # sources, both poolings, weights, long bags, one row taking every value.
    (4, 0, False, True, 1, 0, True, False, 5, False),
    (16, 0, False, False, 2, 1, False, True, 9, False),
    (8, 1, False, True, 1, 2, True, True, 4, False),
    (6, 1, True, False, 1, 0, False, False, 3, True),
    (128, 0, False, False, 1, 2, True, False, 30, False),
    (304, 2, False, True, 1, 1, False, True, 3, False),
    (3, 0, True, False, 0, 2, False, True, 6, True),
    (64, 1, False, False, 2, 0, True, True, 2, False),
]


@pytest.mark.parametrize("dim,dtype,vec1,hard,noise,grad,mean,weights,max_len,duplicates", EMULATED,
                         ids=[f"D{c[0]}-{['f32', 'bf16', 'f16'][c[1]]}-{'elem' if c[2] else 'vec'}-"
                              f"{'hard' if c[3] else 'soft'}-{['atomic', 'sparse', 'det'][c[5]]}-"
                              f"{'mean' if c[6] else 'sum'}{'-dup' if c[9] else ''}"
                              for c in EMULATED])
def test_emulated_cuda_bag_kernels_match_reference(bag_emulator, tmp_path, dim, dtype, vec1, hard,
                                                   noise, grad, mean, weights, max_len, duplicates):
    bags_n, rows, tau = 150, 13, 0.8
    inp, got = run_emulated(bag_emulator, tmp_path, B=bags_n, V=rows, D=dim, dtype=dtype,
                            idx64=dim % 2 == 0, vec1=vec1, hard=hard, noise=noise, grad=grad,
                            mean=mean, weights=weights, max_len=max_len, duplicates=duplicates, tau=tau)
    table_dtype = [torch.float32, torch.bfloat16, torch.float16][dtype]
    tuned = inp["tuned"].double().requires_grad_()
    logits = inp["logits"].double().requires_grad_()
    out, gates = reference_gated_embedding_bag(
        inp["values"], inp["offsets"], inp["frozen"].double(), tuned, logits,
        per_sample_weights=inp["weights"].double() if weights else None,
        mode="mean" if mean else "sum", tau=tau, hard=hard, noise=noise != 0, seed=SEED,
        uniforms=inp["uniforms"] if noise == 2 else None)
    ((out * inp["grad_out"].double()).sum() + (gates * inp["grad_gates"].double()).sum()).backward()
    tol = TOLERANCES[table_dtype][0]
    sums = max(1, int(torch.bincount(inp["values"], minlength=rows).max()))
    torch.testing.assert_close(got["gates"].double(), gates.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["out"].double(), out.detach().to(table_dtype).double(),
                               rtol=tol, atol=tol * max(1.0, float(out.detach().abs().max())))
    scale = max(1.0, float(tuned.grad.abs().max()))
    torch.testing.assert_close(got["grad_tuned"].double(), tuned.grad, rtol=tol * max(1, sums // 50),
                               atol=4 * tol * scale * max(1, sums // 50))
    torch.testing.assert_close(got["grad_logits"].double(), logits.grad, rtol=1e-4,
                               atol=1e-3 * max(1.0, float(logits.grad.abs().max())))
    # Empty bag 1 pools to zeros; with one hot row every other row gets no gradient.
    assert got["out"][1].abs().max() == 0
    if duplicates:
        assert int((got["grad_tuned"].abs().sum(1) > 0).sum()) <= 1


def test_emulated_cuda_bag_deterministic_mode_is_the_atomic_sum(bag_emulator, tmp_path):
    """The sorted segment sums and the atomics give the same sums (to float32 rounding)."""
    res = []
    for grad in (0, 2):
        d = tmp_path / str(grad)
        d.mkdir()
        res.append(run_emulated(bag_emulator, d, B=200, V=3, D=8, dtype=0, idx64=True, vec1=False,
                                hard=False, noise=1, grad=grad, mean=False, weights=True,
                                max_len=6, duplicates=False)[1]["grad_tuned"])
    torch.testing.assert_close(res[0], res[1], rtol=1e-5, atol=1e-4)
    assert res[0].abs().sum() > 0


# --------------------------------------------------------------------------------------------
# On a GPU: both backends on CUDA tensors
# --------------------------------------------------------------------------------------------


def _gpu_backend(name):
    if not torch.cuda.is_available():
        pytest.skip("needs a GPU")
    if name == "cuda" and not _extension.has_kernel("CUDA"):
        pytest.skip("the extension was built without its CUDA kernels")
    if name not in registry.bag_backends("cuda"):
        pytest.skip(f"backend {name!r} does not serve bags on this GPU machine")


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BAG_BACKENDS)
@pytest.mark.parametrize("dim,table_dtype", [(16, torch.float32), (8, torch.bfloat16),
                                             (6, torch.bfloat16), (130, torch.float16)], ids=str)
@pytest.mark.parametrize("hard,sparse", [(True, False), (False, True)], ids=["hard-dense", "soft-sparse"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_gpu_bag_backends_match_reference(backend, dim, table_dtype, hard, sparse, mode):
    _gpu_backend(backend)
    inp = bags(("gpu", backend, dim, table_dtype, hard, sparse, mode), count=300, rows=50, dim=dim,
               max_len=12, table_dtype=table_dtype, weights=True, index_dtype=torch.int32)
    want = run_bag("reference", inp, mode=mode, hard=hard, sparse=sparse, float64=True)
    got = run_bag(backend, inp, mode=mode, hard=hard, sparse=sparse, device="cuda")
    assert_matches(got[:4], want[:4], table_dtype, sums=12)


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BAG_BACKENDS)
def test_gpu_bag_bad_values_raise_and_keep_the_context_usable(backend):
    _gpu_backend(backend)
    f = torch.randn(5, 3, device="cuda")
    with pytest.raises(IndexError, match=r"values\[1\] = 9 is out of range for a table of 5 rows"):
        autoft_fast.gated_embedding_bag(torch.tensor([1, 9, 3], device="cuda"),
                                        torch.tensor([0, 1, 3], device="cuda"), f, f.clone(),
                                        torch.zeros(2, 2, device="cuda"), backend=backend, seed=0)
    with pytest.raises(ValueError, match=r"offsets must be non-decreasing, got offsets\[1\] = 2"):
        autoft_fast.gated_embedding_bag(torch.tensor([1, 2, 3], device="cuda"),
                                        torch.tensor([0, 2, 1, 3], device="cuda"), f, f.clone(),
                                        torch.zeros(3, 2, device="cuda"), backend=backend, seed=0)
    out, _ = autoft_fast.gated_embedding_bag(torch.tensor([1, 2], device="cuda"),
                                             torch.tensor([0, 2], device="cuda"), f, f.clone(),
                                             torch.zeros(1, 2, device="cuda"), backend=backend, seed=0)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()


@needs_gpu
@pytest.mark.parametrize("backend", GPU_BAG_BACKENDS)
def test_gpu_bag_deterministic_dense_gradient_is_bitwise_reproducible(backend):
    _gpu_backend(backend)
    inp = bags(("gpu-det", backend), count=20000, rows=3, dim=32, max_len=6)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first = run_bag(backend, inp, mode="sum", hard=False, device="cuda")
        again = run_bag(backend, inp, mode="sum", hard=False, device="cuda")
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(first[2], again[2])
    atomic = run_bag(backend, inp, mode="sum", hard=False, device="cuda")
    scale = float(atomic[2].abs().max())
    torch.testing.assert_close(first[2], atomic[2], rtol=1e-3, atol=1e-3 * scale)


# --------------------------------------------------------------------------------------------
# The Triton bag kernels compiled for a GPU (no GPU needed: Triton compiles for a named target)
# --------------------------------------------------------------------------------------------

_COMPILE_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from autoft_fast.kernels import gated_bag as gb

def signature(fwd, table, frozen, index):
    common = {"frozen_ptr": frozen, "tuned_ptr": table, "logits_ptr": "*fp32", "seed_ptr": "*fp32",
              "seed_val": "i64", "uniforms_ptr": "*fp32"}
    bags = {"values_ptr": index, "offsets_ptr": index, "weights_ptr": "*fp32"}
    if fwd:
        return {**bags, **common, "out_ptr": table, "gates_ptr": "*fp32", "B": "i32", "D": "i32",
                "FS": "i32", "tau": "fp32"}
    return {"grad_out_ptr": "*fp32", "grad_gates_ptr": "*fp32", **bags, **common,
            "accum_ptr": "*fp32", "grad_logits_ptr": "*fp32", "B": "i32", "D": "i32", "FS": "i32",
            "tau": "fp32"}

target = GPUTarget("cuda", int(sys.argv[1]), 32)
for fwd, table, frozen, index, flags in [
        (True, "*fp32", "*fp32", "*i64", dict(HARD=True, QUANT=False, HAS_WEIGHTS=True, MEAN=True)),
        (True, "*bf16", "*i8", "*i32", dict(HARD=False, QUANT=True, HAS_WEIGHTS=False, MEAN=False)),
        (False, "*fp32", "*bf16", "*i64", dict(HARD=True, QUANT=False, HAS_WEIGHTS=True, MEAN=True,
                                              HAS_GRAD_GATES=True, PER_VALUE=False)),
        (False, "*fp16", "*fp16", "*i32", dict(HARD=False, QUANT=False, HAS_WEIGHTS=False, MEAN=False,
                                              HAS_GRAD_GATES=False, PER_VALUE=True))]:
    const = dict(NOISE=True, USE_UNIFORMS=False, SEED_FROM_PTR=False, BLOCK_B=64, BLOCK_D=64, **flags)
    sig = signature(fwd, table, frozen, index)
    sig.update({k: "constexpr" for k in const})
    kernel = gb._bag_fwd_kernel if fwd else gb._bag_bwd_kernel
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=target)
    assert compiled.asm["cubin"], kernel.__name__
    print("compiled", kernel.__name__, table, frozen, index)
'''


@pytest.mark.parametrize("arch", [90])
def test_triton_bag_kernels_compile_for_a_gpu(tmp_path, arch):
    """The interpreter does not type-check as the compiler does: compile to a cubin for sm_90."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, str(arch)], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.count("compiled _bag_") == 4
