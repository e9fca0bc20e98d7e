// CUDA implementations of autoft_fast::gated_embedding_bag_fwd / gated_embedding_bag_bwd: the
// gated op over bags of values (multi-hot fields), docs/op-contract.md "Bags". The kernels and
// the layout of the work are in gated_bag_kernels.cuh.
//
// Tuned-table gradient, as the lookup backward (gated_embedding_cuda.cu) accumulates it:
// - dense, default: float32 atomicAdd into a zeroed [V, D] float32 table (cast once at the end
//   for 16-bit tables); a row hit several times is summed in scheduling order;
// - dense under torch.use_deterministic_algorithms(True): one float32 row per value, the values
//   sorted by a stable sort, each table row's segment summed in value order by one group of
//   lanes (segment_sum_kernel; a hot row in pieces, as the lookup backward sums one):
//   bit-identical from run to run;
// - sparse: one row per value in the table dtype, grad_rows the values as int64 (uncoalesced
//   COO, the registry's cuda row says coalesced=False).
//
// Data checks: one small summary of the offsets and values (first and last offset, the
// smallest step, the smallest and largest value) is copied to the host before any launch; only
// a bad batch pays for locating the first offending position. The messages are the CPU
// kernel's (csrc/cpu/gated_bag_cpu.cpp) and the Python checks' (ops/validate.py check_bag_data).
#include "../gated_common.h"
#include "gated_bag_kernels.cuh"
#include "launch_shape.h"
#include "segment_pieces.cuh"

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

namespace autoft {
namespace {

using namespace gated_cuda;


unsigned bag_blocks(int64_t B) {
  return static_cast<unsigned>((B + kLookupsPerBlock - 1) / kLookupsPerBlock);
}


// Offsets start at 0, never decrease and end at len(values); every value is a row of the table.
void check_bag_data(const at::Tensor& values, const at::Tensor& offsets, int64_t V) {
  const int64_t B = offsets.size(0) - 1;
  const int64_t L = values.size(0);
  const at::Tensor zero = at::zeros({}, offsets.options());
  const at::Tensor steps = offsets.slice(0, 1).sub(offsets.slice(0, 0, B));
  const at::Tensor step_min = B > 0 ? steps.min() : zero;
  at::Tensor vmin = zero, vmax = zero;
  if (L > 0) {
    auto [lo, hi] = at::aminmax(values);
    vmin = lo.to(at::kLong);
    vmax = hi.to(at::kLong);
  }
  const at::Tensor summary = at::stack({offsets[0], offsets[B], step_min, vmin, vmax}).to(at::kCPU);
  const int64_t* s = summary.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(s[0] == 0, "offsets[0] = ", s[0], " must be 0 (bag 0 starts at the first value)");
  if (s[2] < 0) {
    const at::Tensor bad = at::nonzero(steps.lt(0)).to(at::kCPU);
    const int64_t b = bad.const_data_ptr<int64_t>()[0];
    const at::Tensor pair = offsets.slice(0, b, b + 2).to(at::kCPU);
    const int64_t* p = pair.const_data_ptr<int64_t>();
    TORCH_CHECK_VALUE(false, "offsets must be non-decreasing, got offsets[", b, "] = ", p[0],
                      " > offsets[", b + 1, "] = ", p[1]);
  }
  TORCH_CHECK_VALUE(s[1] == L, "offsets[-1] = ", s[1], " must equal len(values) = ", L);
  if (L > 0 && (s[3] < 0 || s[4] >= V)) {
    const at::Tensor bad = at::nonzero(values.lt(0).logical_or(values.ge(V))).to(at::kCPU);
    const int64_t pos = bad.const_data_ptr<int64_t>()[0];
    const int64_t value = values[pos].to(at::kCPU).to(at::kLong).item<int64_t>();
    TORCH_CHECK_INDEX(false, "values[", pos, "] = ", value, " is out of range for a table of ", V,
                      " rows");
  }
}

// prepare_bag_inputs (gated_common.h), then the data checks on the device (check_bag_data).
BagInputs check_bag(const at::Tensor& values, const at::Tensor& offsets,
                    const std::optional<at::Tensor>& weights, const at::Tensor& frozen_weight,
                    const at::Tensor& tuned_weight, const at::Tensor& logits, const at::Tensor& seed,
                    const std::optional<at::Tensor>& uniforms, double tau, bool noise, int64_t mode) {
  BagInputs in = prepare_bag_inputs(values, offsets, weights, frozen_weight, tuned_weight, logits,
                                    seed, uniforms, tau, noise, mode, c10::DeviceType::CUDA,
                                    /*low_precision_frozen=*/false);
  check_bag_data(in.values, in.offsets, in.s.V);
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_embedding_bag_fwd_cuda(
    const at::Tensor& values, const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
    const at::Tensor& frozen_weight, const at::Tensor& tuned_weight, const at::Tensor& logits,
    const at::Tensor& seed, const std::optional<at::Tensor>& uniforms, double tau, bool hard, bool noise,
    int64_t mode, bool sparse) {
  (void)sparse;  // only tells the autograd formula which gradient layout to ask for
  BagInputs in = check_bag(values, offsets, per_sample_weights, frozen_weight, tuned_weight, logits,
                           seed, uniforms, tau, noise, mode);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t B = in.s.N, D = in.s.D;
  at::Tensor out = at::empty({B, D}, in.tuned.options());
  at::Tensor gates = at::empty({B, 2}, in.logits.options());
  if (B == 0) {
    return {out, gates};
  }
  const int vec = pick_vec(in.tuned.scalar_type(), D,
                          {in.frozen.const_data_ptr(), in.tuned.const_data_ptr(), out.const_data_ptr()});
  const int G = pick_group(D, vec);
  const bool idx64 = in.values.scalar_type() == at::kLong;
  const float* wp = in.weights.defined() ? in.weights.const_data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_table(in.tuned.scalar_type(), [&](auto table_tag) {
    using scalar_t = decltype(table_tag);
    dispatch_vec(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      if constexpr (VEC == 1 || VEC * sizeof(scalar_t) == 16) {
        bag_forward_kernel<scalar_t, VEC><<<bag_blocks(B), kThreads, 0, stream>>>(
            in.values.const_data_ptr(), idx64, in.offsets.const_data_ptr<int64_t>(), wp,
            mode == kModeMean, in.frozen.const_data_ptr<scalar_t>(), in.tuned.const_data_ptr<scalar_t>(),
            in.logits.const_data_ptr<float>(), in.src, static_cast<float>(tau), hard, B, D, G,
            out.mutable_data_ptr<scalar_t>(), gates.mutable_data_ptr<float>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
  return {out, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_embedding_bag_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates, const at::Tensor& values,
    const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
    const at::Tensor& frozen_weight, const at::Tensor& tuned_weight, const at::Tensor& logits,
    const at::Tensor& seed, const std::optional<at::Tensor>& uniforms, double tau, bool hard, bool noise,
    int64_t mode, bool sparse) {
  BagInputs in = check_bag(values, offsets, per_sample_weights, frozen_weight, tuned_weight, logits,
                           seed, uniforms, tau, noise, mode);
  const c10::cuda::CUDAGuard guard(values.device());
  const int64_t B = in.s.N, D = in.s.D, V = in.s.V, L = in.L;
  check_grad_inputs(grad_out, grad_gates, in.values.new_empty({B}), in.tuned, in.s, c10::DeviceType::CUDA);
  const at::Tensor g32 = grad_out.to(at::kFloat).contiguous();
  at::Tensor gg;
  if (grad_gates.has_value()) {
    gg = grad_gates->contiguous();
  }
  const bool deterministic = !sparse && at::globalContext().deterministicAlgorithms();
  const GradMode gmode =
      sparse ? GradMode::kSparse : (deterministic ? GradMode::kDeterministic : GradMode::kAtomic);
  at::Tensor grad_logits = at::empty({B, 2}, in.logits.options());
  at::Tensor dense_grad;   // kAtomic, kDeterministic: [V, D] float32
  at::Tensor value_grad;   // kSparse: [L, D] table dtype; kDeterministic: [L, D] float32
  if (sparse) {
    value_grad = at::empty({L, D}, in.tuned.options());
  } else {
    dense_grad = at::zeros({V, D}, in.tuned.options().dtype(at::kFloat));
    if (deterministic) {
      value_grad = at::empty({L, D}, in.tuned.options().dtype(at::kFloat));
    }
  }
  if (B > 0) {
    const int vec = pick_vec(in.tuned.scalar_type(), D,
                            {in.frozen.const_data_ptr(), in.tuned.const_data_ptr(), g32.const_data_ptr(),
                             value_grad.defined() ? value_grad.const_data_ptr() : nullptr});
    const int G = pick_group(D, vec);
    const bool idx64 = in.values.scalar_type() == at::kLong;
    const float* wp = in.weights.defined() ? in.weights.const_data_ptr<float>() : nullptr;
    const float* ggp = gg.defined() ? gg.const_data_ptr<float>() : nullptr;
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    dispatch_table(in.tuned.scalar_type(), [&](auto table_tag) {
      using scalar_t = decltype(table_tag);
      dispatch_vec(vec, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        if constexpr (VEC == 1 || VEC * sizeof(scalar_t) == 16) {
          auto run = [&](auto mode_tag, auto value_tag) {
            constexpr GradMode M = decltype(mode_tag)::value;
            using value_t = decltype(value_tag);
            bag_backward_kernel<scalar_t, value_t, VEC, M><<<bag_blocks(B), kThreads, 0, stream>>>(
                g32.const_data_ptr<float>(), ggp, in.values.const_data_ptr(), idx64,
                in.offsets.const_data_ptr<int64_t>(), wp, mode == kModeMean,
                in.frozen.const_data_ptr<scalar_t>(), in.tuned.const_data_ptr<scalar_t>(),
                in.logits.const_data_ptr<float>(), in.src, static_cast<float>(tau), hard, B, D, G,
                M == GradMode::kAtomic ? dense_grad.mutable_data_ptr<float>() : nullptr,
                M == GradMode::kAtomic ? nullptr : value_grad.mutable_data_ptr<value_t>(),
                grad_logits.mutable_data_ptr<float>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          };
          switch (gmode) {
            case GradMode::kSparse:
              run(std::integral_constant<GradMode, GradMode::kSparse>{}, scalar_t{});
              break;
            case GradMode::kDeterministic:
              run(std::integral_constant<GradMode, GradMode::kDeterministic>{}, float{});
              break;
            default:
              run(std::integral_constant<GradMode, GradMode::kAtomic>{}, float{});
          }
          if (gmode == GradMode::kDeterministic && L > 0) {
            // Stable sort of the values: each table row's values contiguous, in value order;
            // every value row already carries its weight, so the segment sum weighs them by 1.
            const auto sorted = at::sort(in.values.to(at::kLong), std::optional<bool>(true),
                                         /*dim=*/0, /*descending=*/false);
            const at::Tensor& rows = std::get<0>(sorted);
            const at::Tensor& order = std::get<1>(sorted);
            const at::Tensor ones = at::ones({L}, in.logits.options());
            const int groups_per_block = kThreads / G;
            const unsigned blocks = static_cast<unsigned>((L + groups_per_block - 1) / groups_per_block);
            const SegmentPieces pieces = sum_segment_pieces<float, VEC>(
                rows, order, ones.const_data_ptr<float>(), value_grad.const_data_ptr<float>(), L,
                D, G, /*skip_zero=*/true, stream);
            segment_sum_kernel<float, VEC><<<blocks, kThreads, 0, stream>>>(
                rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
                ones.const_data_ptr<float>(), value_grad.const_data_ptr<float>(), L, D, G,
                pieces.sum_ptr(), pieces.touched_ptr(), dense_grad.mutable_data_ptr<float>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          }
        }
      });
    });
  }
  at::Tensor grad_tuned;
  at::Tensor grad_rows;
  if (sparse) {
    // Uncoalesced COO rows, one per value. Always a copy: an op output must not alias an input.
    grad_tuned = value_grad;
    grad_rows = in.values.to(at::kLong, /*non_blocking=*/false, /*copy=*/true);
  } else {
    grad_tuned = in.tuned.scalar_type() == at::kFloat ? dense_grad : dense_grad.to(in.tuned.scalar_type());
    grad_rows = at::empty({0}, in.values.options().dtype(at::kLong));
  }
  return {grad_tuned, grad_logits, grad_rows};
}

}  // namespace autoft

TORCH_LIBRARY_IMPL(autoft_fast, CUDA, m) {
  m.impl("gated_embedding_bag_fwd", &autoft::gated_embedding_bag_fwd_cuda);
  m.impl("gated_embedding_bag_bwd", &autoft::gated_embedding_bag_bwd_cuda);
}
