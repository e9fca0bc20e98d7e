"""The compiled extension: it is built, its kernels are registered, and its Philox stream is the
contract's (checked against the algorithm written out below in plain Python integers).

These tests fail, rather than skip, when ``autoft_fast._C`` is missing: the rest of the suite
skips the compiled backends then, and this file is what says the build is broken.
"""

import math

import pytest
import torch

import autoft_fast
from autoft_fast.ops import _extension

OPS = ("autoft_fast::gated_embedding_fwd", "autoft_fast::gated_embedding_bwd")
M32 = 0xFFFFFFFF


def philox4x32_10(counter, key):
    """Philox4x32-10 in Python integers: counter (4 words), key (2 words) -> 4 words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0 = 0xD2511F53 * c0
        p2 = 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p2 >> 32) ^ c1 ^ k0, p2 & M32, (p0 >> 32) ^ c3 ^ k1, p0 & M32
        k0, k1 = (k0 + 0x9E3779B9) & M32, (k1 + 0xBB67AE85) & M32
    return c0, c1, c2, c3


def contract_uniforms(seed, n):
    """U[0:n] of docs/op-contract.md: word n % 4 of the call with counter n // 4."""
    out = []
    for i in range(n):
        call = i // 4
        word = philox4x32_10((call & M32, call >> 32, 0, 0), (seed & M32, seed >> 32))[i % 4]
        x = word - (1 << 32) if word >= (1 << 31) else word  # reinterpret as int32
        if x < 0:
            x = -x - 1
        # float32(x) * float32(4.6566127342e-10), rounded to float32 as the kernels do.
        out.append(torch.tensor(float(x), dtype=torch.float32) * torch.tensor(4.6566127342e-10))
    return torch.stack(out) if out else torch.zeros(0)


def test_python_philox_matches_published_known_answers():
    # Random123's known-answer vectors: the Python integers above are the published generator.
    assert philox4x32_10((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    assert philox4x32_10((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
                         (0xA4093822, 0x299F31D0)) == (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)


def test_extension_is_built():
    assert _extension._C is not None, (
        f"autoft_fast._C did not import ({_extension.EXTENSION_ERROR}); build it with "
        "`pip install --no-build-isolation -e .`")
    assert "cpu" in autoft_fast.available_backends("cpu")


@pytest.mark.parametrize("op", OPS)
def test_cpu_kernels_registered(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CPU")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU on this machine")
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels_registered_when_a_gpu_is_present(op):
    # A CUDA machine that builds without the CUDA kernels must fail here, not fall back quietly.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")


def test_triton_kernels_ship_inside_the_package():
    import autoft_fast.kernels as kernels

    assert kernels.__name__ == "autoft_fast.kernels"


def _uniforms_through_cpu_kernel(seed, n):
    """Recover U from the forward: with logits 0, tau 1 and a soft gate, y1 = sigmoid(l) = U."""
    indices = torch.zeros(n, dtype=torch.int64)
    table = torch.zeros(1, 1)
    logits = torch.zeros(n, 2)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    _, gates = torch.ops.autoft_fast.gated_embedding_fwd(
        indices, table, table, logits, seed_t, None, 1.0, False, True, False)
    return gates[:, 1]


@pytest.mark.parametrize("seed", [0, 1, 2**32 - 1, 2**32, 2**62 + 987654321, 2**63 - 1])
def test_cpu_kernel_philox_stream(seed):
    n = 4 * 37 + 3  # a partial Philox group at the end
    got = _uniforms_through_cpu_kernel(seed, n)
    want = contract_uniforms(seed, n)
    # sigmoid(log(U) - log(1 - U)) returns U up to a few float32 roundings.
    torch.testing.assert_close(got, want, rtol=2e-6, atol=1e-7)
    # The stream is a real one: values differ from lookup to lookup and from seed to seed.
    assert got.unique().numel() == n
    assert not torch.equal(got, _uniforms_through_cpu_kernel(seed ^ 1, n))


def test_cpu_kernel_noise_is_regenerated_in_backward():
    # Same seed in forward and backward: the logit gradient uses the forward's gate, y0*y1 term.
    n = 10
    seed = 2**40 + 5
    indices = torch.zeros(n, dtype=torch.int64)
    table = torch.ones(1, 1)
    logits = torch.zeros(n, 2)
    seed_t = torch.tensor(seed, dtype=torch.int64)
    grad_gates = torch.zeros(n, 2)
    grad_gates[:, 1] = 1.0
    _, grad_logits, _ = torch.ops.autoft_fast.gated_embedding_bwd(
        torch.zeros(n, 1), grad_gates, indices, table, table, logits, seed_t, None, 1.0, False,
        True, True)
    u = contract_uniforms(seed, n).double()
    torch.testing.assert_close(grad_logits[:, 1].double(), u * (1 - u), rtol=1e-5, atol=1e-7)


def test_cpu_kernel_checks_its_inputs():
    # Users may call torch.ops.autoft_fast.* directly: the kernel itself names bad inputs.
    op = torch.ops.autoft_fast.gated_embedding_fwd
    table = torch.zeros(1000, 4)
    seed = torch.tensor(1, dtype=torch.int64)
    indices = torch.tensor([3, 999, 1000, 5, -1])
    logits = torch.zeros(5, 2)
    with pytest.raises(IndexError, match=r"indices\[2\] = 1000 is out of range for a table of 1000 rows"):
        op(indices, table, table, logits, seed, None, 1.0, True, True, False)
    good = torch.tensor([3, 999, 0, 5, 1])
    for tau in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="tau"):
            op(good, table, table, logits, seed, None, tau, True, True, False)
    with pytest.raises(TypeError, match="frozen_weight.*Double"):
        op(good, table.double(), table.double(), logits, seed, None, 1.0, True, True, False)
    with pytest.raises(TypeError, match="indices"):
        op(good.float(), table, table, logits, seed, None, 1.0, True, True, False)
    with pytest.raises(ValueError, match=r"logits must have shape \[5, 2\]"):
        op(good, table, table, torch.zeros(5, 3), seed, None, 1.0, True, True, False)
    with pytest.raises(ValueError, match="tuned_weight has shape"):
        op(good, table, torch.zeros(1000, 5), logits, seed, None, 1.0, True, True, False)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_cpu_kernel_reports_the_first_bad_index_across_threads(index_dtype):
    # Bad positions in different parallel chunks: the message names the smallest, every time.
    n = 200_000
    indices = torch.randint(0, 50, (n,), dtype=index_dtype)
    # With two threads, the second chunk meets its bad index (140000) first: the first chunk's
    # (60000) must still win.
    indices[140_000] = -3
    indices[60_000] = 50
    table = torch.zeros(50, 2)
    seed = torch.tensor(9, dtype=torch.int64)
    logits = torch.zeros(n, 2)
    with pytest.raises(IndexError, match=r"indices\[60000\] = 50 is out of range for a table of 50 rows"):
        torch.ops.autoft_fast.gated_embedding_fwd(indices, table, table, logits, seed, None, 1.0,
                                                  True, True, False)
    with pytest.raises(IndexError, match=r"indices\[60000\] = 50 is out"):
        torch.ops.autoft_fast.gated_embedding_bwd(torch.zeros(n, 2), None, indices, table, table,
                                                  logits, seed, None, 1.0, True, True, False)
