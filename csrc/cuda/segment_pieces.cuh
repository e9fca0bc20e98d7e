// Host side of the long segments' pieces (kSegmentWindow in gated_embedding_kernels.cuh),
// shared by the lookup and bag host code: the slots, and the launch that fills them before a
// segment kernel reads them.
#pragma once

#include "gated_embedding_kernels.cuh"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace autoft {

// The piece sums (float32 [slots, D]) and touched flags (int32 [slots]) of the long segments;
// undefined, and their pointers null, when the lookups fit one window (no segment crosses a
// window boundary, so no segment kernel reads a slot).
struct SegmentPieces {
  at::Tensor sum;
  at::Tensor touched;
  const float* sum_ptr() const { return sum.defined() ? sum.const_data_ptr<float>() : nullptr; }
  const int* touched_ptr() const {
    return touched.defined() ? touched.const_data_ptr<int>() : nullptr;
  }
};

// Sums the pieces of the long segments of the sorted lookups (rows, order: a stable sort) on
// `stream`; see segment_pieces_kernel for z1 and skip_zero.
template <typename grad_t, int VEC>
SegmentPieces sum_segment_pieces(const at::Tensor& rows, const at::Tensor& order, const float* z1,
                                 const grad_t* grad, int64_t N, int64_t D, int G, bool skip_zero,
                                 cudaStream_t stream) {
  SegmentPieces out;
  if (N <= gated_cuda::kSegmentWindow) {
    return out;
  }
  const int64_t slots = 2 * gated_cuda::segment_windows(N);
  out.sum = at::empty({slots, D}, rows.options().dtype(at::kFloat));
  out.touched = at::empty({slots}, rows.options().dtype(at::kInt));
  const int groups_per_block = gated_cuda::kThreads / G;
  const unsigned blocks = static_cast<unsigned>((slots + groups_per_block - 1) / groups_per_block);
  gated_cuda::segment_pieces_kernel<grad_t, VEC><<<blocks, gated_cuda::kThreads, 0, stream>>>(
      rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), z1, grad, N, D, G,
      skip_zero, out.sum.mutable_data_ptr<float>(), out.touched.mutable_data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace autoft
