#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with the machine's nvcc for sm_80 and sm_90 against the installed
# torch headers, so that CUDA code that does not compile fails CI on a machine without a GPU.
#
# Usage: .ci/check_cuda_compile.sh            (from anywhere; uses the active python's torch)
#   NVCC=/path/to/nvcc, CUDA_HOME and PYTHON override the tools; KEEP_BUILD=1 keeps the objects.
#
# Two gaps of this machine are bridged inside the check's own build folder only:
#   - the CPU torch wheel ships no c10/cuda/impl/cuda_cmake_macros.h (generated for CUDA
#     builds): a one-line stand-in is enough for the headers that include it;
#   - this CUDA toolkit has no cuBLAS / cuSPARSE headers, so the .cu files must not include
#     ATen/cuda/CUDAContext.h (a compile error here says so).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
NVCC="${NVCC:-$CUDA_HOME/bin/nvcc}"
if ! command -v "$NVCC" >/dev/null 2>&1; then
  if command -v nvcc >/dev/null 2>&1; then NVCC="$(command -v nvcc)"; else
    echo "check_cuda_compile: no nvcc found (set NVCC or CUDA_HOME)" >&2; exit 2; fi
fi

shopt -s nullglob
SOURCES=("$ROOT"/csrc/cuda/*.cu)
if [ "${#SOURCES[@]}" -eq 0 ]; then
  echo "check_cuda_compile: no csrc/cuda/*.cu files" >&2; exit 2
fi

BUILD="$(mktemp -d "${TMPDIR:-/tmp}/autoft_cuda_check.XXXXXX")"
if [ "${KEEP_BUILD:-0}" != "1" ]; then trap 'rm -rf "$BUILD"' EXIT; fi
mkdir -p "$BUILD/include/c10/cuda/impl"
echo "#pragma once" > "$BUILD/include/c10/cuda/impl/cuda_cmake_macros.h"

mapfile -t TORCH_INCLUDES < <("$PYTHON" -c '
import sysconfig
from torch.utils.cpp_extension import include_paths
for p in include_paths():
    print(p)
print(sysconfig.get_paths()["include"])
')
INCLUDE_FLAGS=(-I"$ROOT/csrc" -I"$BUILD/include")
for p in "${TORCH_INCLUDES[@]}"; do INCLUDE_FLAGS+=(-isystem "$p"); done
ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"

FLAGS=(-std=c++20 -O2 -c -Xcompiler -fPIC
       -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
       -DAUTOFT_WITH_CUDA -DTORCH_EXTENSION_NAME=_C -D_GLIBCXX_USE_CXX11_ABI="$ABI"
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       --expt-relaxed-constexpr --expt-extended-lambda)

echo "check_cuda_compile: $("$NVCC" --version | tail -n 2 | head -n 1); torch $("$PYTHON" -c 'import torch; print(torch.__version__)')"
failed=0
for src in "${SOURCES[@]}"; do
  rel="${src#"$ROOT"/}"
  obj="$BUILD/$(basename "${src%.cu}").o"
  start=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "${INCLUDE_FLAGS[@]}" "$src" -o "$obj"; then
    echo "ok    $rel ($((SECONDS - start)) s, sm_80 + sm_90)"
  else
    echo "FAIL  $rel" >&2
    failed=1
  fi
done
exit "$failed"
