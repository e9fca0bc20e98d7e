"""Builds autoft_fast and its compiled kernels, autoft_fast._C.

Build against the torch that is already installed (an isolated build would fetch another one)::

    pip install --no-build-isolation -e .      # or: pip install --no-build-isolation .

The CUDA kernels are compiled in when a CUDA toolkit is found (CUDA_HOME or nvcc on PATH) and
the installed torch is a CUDA build; whether a GPU is present does not matter.
AUTOFT_FAST_CUDA=0 builds the CPU kernels only; AUTOFT_FAST_CUDA=1 insists on CUDA and fails
clearly if it cannot be built. TORCH_CUDA_ARCH_LIST picks the GPU architectures (default
"8.0;9.0+PTX": PTX for newer GPUs). The source list is csrc/sources.txt, shared with CMakeLists.txt.
"""

import glob
import os

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_sources(path=os.path.join(ROOT, "csrc", "sources.txt")):
    """Section name -> sorted source paths (relative to the repository root) of csrc/sources.txt."""
    sections, current = {}, None
    with open(path) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], [])
                continue
            if current is None:
                raise ValueError(f"{path}: source line {line!r} comes before any [section]")
            matches = sorted(glob.glob(os.path.join(ROOT, line)))
            current.extend(os.path.relpath(m, ROOT) for m in matches)
    return sections


def use_cuda(cuda_sources):
    """Whether to build the CUDA kernels (see the module docstring)."""
    switch = os.environ.get("AUTOFT_FAST_CUDA", "").strip()
    if switch not in ("", "0", "1"):
        raise ValueError(f"AUTOFT_FAST_CUDA must be 0 or 1, got {switch!r}")
    if switch == "0":
        return False
    missing = []
    if torch.version.cuda is None:
        missing.append(f"the installed torch {torch.__version__} is a CPU-only build")
    elif CUDA_HOME is None:  # torch looks for a toolkit only when it is a CUDA build itself
        missing.append("no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)")
    if not cuda_sources:
        missing.append("csrc/sources.txt lists no CUDA sources that exist")
    if switch == "1" and missing:
        raise RuntimeError("AUTOFT_FAST_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(missing))
    if missing:
        print("autoft_fast: building the CPU kernels only (" + "; ".join(missing) + ")")
    return not missing


def extensions():
    sources = read_sources()
    cpu_sources = sources.get("cpu", []) + sources.get("python", [])
    cuda_sources = sources.get("cuda", [])
    cxx_flags = ["-O3", "-fopenmp"]  # OpenMP: at::parallel_for is header code compiled here
    if use_cuda(cuda_sources):
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        return [
            CUDAExtension(
                "autoft_fast._C",
                cpu_sources + cuda_sources,
                include_dirs=[os.path.join(ROOT, "csrc")],
                define_macros=[("AUTOFT_WITH_CUDA", None)],
                extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
                extra_link_args=["-fopenmp"],
            )
        ]
    return [
        CppExtension(
            "autoft_fast._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    ]


setup(
    packages=find_packages(include=["autoft_fast", "autoft_fast.*"]) + ["autoft_fast.kernels"],
    # The Triton kernels live in the top-level kernels/ folder and ship as autoft_fast.kernels.
    package_dir={"autoft_fast.kernels": "kernels"},
    # Data files that a non-editable install must carry (the CLI's example configs).
    package_data={"autoft_fast": ["configs/*.yaml", "configs/datasets/*.yaml"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
)
