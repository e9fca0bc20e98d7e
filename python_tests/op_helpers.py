"""Inputs and the float64 oracle shared by the op tests."""

from __future__ import annotations

import hashlib

import torch

from autoft_fast.ops.philox import philox_uniforms
from autoft_fast.ops.reference import reference_gated_embedding

# Per table dtype: (rtol, atol) of out and of grad_tuned; logit gradients in float32 always.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def case_generator(*key) -> torch.Generator:
    """A generator seeded from the test case, so each case draws its own fresh inputs."""
    digest = hashlib.sha256(repr(key).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def make_inputs(shape, num_rows, dim, *, table_dtype=torch.float32, index_dtype=torch.int64,
                tau=1.0, noise=True, use_uniforms=False, seed=1234, gen=None, duplicates=False):
    """Random op inputs whose gates are never within 1e-3 of a tie (float rounding could
    flip a hard gate there, which the contract allows), so results compare exactly."""
    gen = gen or torch.Generator().manual_seed(0)
    n = 1
    for s in shape:
        n *= s
    if duplicates:
        indices = torch.full(shape, int(torch.randint(0, num_rows, (), generator=gen)), dtype=index_dtype)
    else:
        indices = torch.randint(0, num_rows, shape, generator=gen).to(index_dtype)
    frozen = torch.randn(num_rows, dim, generator=gen).to(table_dtype)
    tuned = (frozen.float() + 0.5 * torch.randn(num_rows, dim, generator=gen)).to(table_dtype)
    logits = torch.randn(*shape, 2, generator=gen)
    uniforms = torch.rand(shape, generator=gen) if use_uniforms else None
    if noise:
        u = uniforms if use_uniforms else torch.from_numpy(philox_uniforms(seed, n)).reshape(shape)
        l = torch.log(u.double() + 1e-20) - torch.log(1 - u.double())
    else:
        l = torch.zeros(shape, dtype=torch.float64)
    x = (logits[..., 1].double() - logits[..., 0].double() + l) / tau
    near = x.abs() < 1e-3
    logits[..., 1] = torch.where(near, logits[..., 1] + 0.01 * tau, logits[..., 1])
    grad_out = torch.randn(*shape, dim, generator=gen).to(table_dtype)
    grad_gates = torch.randn(*shape, 2, generator=gen)
    return dict(indices=indices, frozen=frozen, tuned=tuned, logits=logits, uniforms=uniforms,
                grad_out=grad_out, grad_gates=grad_gates, seed=seed)


def run(fn_backend, inp, *, tau=1.0, hard=True, noise=True, sparse=False, device="cpu",
        with_gate_grad=True, float64=False):
    """Forward and backward through ``gated_embedding``; returns values and dense gradients."""
    import autoft_fast

    def prep(t, dtype=None):
        if t is None:
            return None
        t = t.to(device)
        return t.to(dtype) if dtype is not None else t

    tdt = torch.float64 if float64 else None
    frozen = prep(inp["frozen"], tdt)
    tuned = prep(inp["tuned"], tdt).clone().requires_grad_()
    logits = prep(inp["logits"], tdt).clone().requires_grad_()
    out, gates = autoft_fast.gated_embedding(
        prep(inp["indices"]), frozen, tuned, logits, tau=tau, hard=hard, noise=noise,
        seed=inp["seed"], uniforms=prep(inp["uniforms"]), sparse=sparse, backend=fn_backend)
    loss = (out.to(torch.float64) * prep(inp["grad_out"]).to(torch.float64)).sum()
    if with_gate_grad:
        loss = loss + (gates.to(torch.float64) * prep(inp["grad_gates"]).to(torch.float64)).sum()
    loss.backward()
    grad_tuned = tuned.grad
    if grad_tuned is not None and grad_tuned.is_sparse:
        # Sum the per-lookup values in float64: to_dense() in bf16 would itself round.
        grad_tuned = grad_tuned.double().to_dense().to(tuned.dtype)
    return dict(out=out.detach().cpu(), gates=gates.detach().cpu(),
                grad_tuned=None if grad_tuned is None else grad_tuned.cpu(),
                grad_logits=logits.grad.cpu(), sparse_grad=tuned.grad)


def oracle(inp, **kw):
    """The reference backend in float64 on the same inputs (tables upcast exactly)."""
    return run("reference", inp, float64=True, **kw)


def assert_matches(got, want, table_dtype, *, dim, repeats: int = 1):
    """``got`` against the float64 oracle ``want``. ``repeats``: the most lookups of one row; a
    float32 row sum of k terms carries a rounding error growing like sqrt(k) (a random walk of
    k roundings), so the gradient tolerance grows so too."""
    rtol, atol = TOLERANCES[table_dtype]
    torch.testing.assert_close(got["gates"].double(), want["gates"].double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["out"].double(), want["out"].double().to(table_dtype).double(),
                               rtol=rtol, atol=atol)
    gt = got["grad_tuned"].double()
    wt = want["grad_tuned"].to(table_dtype).double()
    torch.testing.assert_close(gt, wt, rtol=rtol, atol=atol * 4 * max(1.0, repeats / 256) ** 0.5)
    # Dot products over D rows in float32: error grows with D and the magnitude of a.
    gl = want["grad_logits"]
    scale = max(1.0, float(gl.abs().max())) if gl.numel() else 1.0
    torch.testing.assert_close(got["grad_logits"].double(), want["grad_logits"].double(),
                               rtol=1e-4, atol=2e-5 * scale * max(1.0, dim ** 0.5))


__all__ = ["TOLERANCES", "case_generator", "make_inputs", "run", "oracle", "assert_matches",
           "reference_gated_embedding"]


def build_emulation(source: str, out_dir):
    """Build the CUDA-kernel launch-grid emulation ``csrc/cuda/emulation/<source>.cpp`` with the
    host compiler into ``out_dir``; skips the calling test where no compiler can (it needs
    C++20 <barrier> and std::atomic_ref). Returns the executable's path."""
    import os
    import shutil
    import subprocess
    from pathlib import Path

    import pytest
    from torch.utils.cpp_extension import include_paths

    root = Path(__file__).resolve().parents[1]
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler to build the CUDA-kernel emulation")
    probe = subprocess.run([cxx, "-std=c++20", "-x", "c++", "-fsyntax-only", "-"],
                           input="#include <barrier>\n#include <atomic>\nfloat f; "
                                 "std::atomic_ref<float> r(f);\n",
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"{cxx} lacks C++20 <barrier> / std::atomic_ref (GCC >= 11, Clang >= 15)")
    exe = Path(out_dir) / source
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", f"-I{root}/csrc/cuda", f"-I{root}/csrc",
           *[f"-isystem{p}" for p in include_paths()],
           f"{root}/csrc/cuda/emulation/{source}.cpp", "-o", str(exe)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return exe


def copied(module, how: str):
    """A copy of ``module`` by ``how``: "deepcopy", or "torch.save" then torch.load."""
    import copy
    import io
    if how == "deepcopy":
        return copy.deepcopy(module)
    buf = io.BytesIO()
    torch.save(module, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)
