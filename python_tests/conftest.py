"""Shared fixtures: which backends exist here, and inputs for the op tests."""

import os

import torch

# Triton decides between compiling and interpreting when a kernel is decorated, so the switch
# must be set before autoft_fast.kernels is imported: without a GPU, CI runs the Triton
# kernels on CPU tensors through the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import autoft_fast  # noqa: E402


def kernel_backends():
    """(backend, device) pairs of the registry's backends usable on this machine: the kernel
    backends on the CPU, and every backend on a GPU (the reference too: it is compared with
    its own float64 CPU run there)."""
    from autoft_fast.ops import registry

    pairs = [(name, "cpu") for name in autoft_fast.available_backends("cpu")
             if not registry.REGISTRY[name].is_reference]
    if torch.cuda.is_available():
        pairs += [(name, "cuda") for name in autoft_fast.available_backends("cuda")]
    return pairs


KERNEL_BACKENDS = kernel_backends()


def pytest_report_header(config):
    return f"autoft_fast kernel backends here: {KERNEL_BACKENDS or 'none (reference only)'}"


@pytest.fixture(params=KERNEL_BACKENDS or [pytest.param(None, marks=pytest.mark.skip(
    reason="no kernel backend built here (see test_build.py, which fails in CI if so)"))],
    ids=lambda p: f"{p[0]}-{p[1]}" if p else "none")
def backend_device(request):
    return request.param
