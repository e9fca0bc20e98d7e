// Fused CUDA kernels of the gated embedding op (docs/op-contract.md, docs/internals.md).
//
// Layout of the work (kernels in gated_embedding_kernels.cuh). A block of 256 threads owns 64
// consecutive lookups and runs in two stages. Stage 1: sixteen threads each draw one Philox
// call, which serves four lookups (the contract's stream is built so), and form those lookups'
// gates into shared memory, writing the gates output coalesced. Stage 2: the block splits into
// groups of G lanes (G a power of two, G * VEC >= D up to a warp); each lane moves VEC
// consecutive elements of a row with 16-byte loads when the rows allow it, so a row is read by
// contiguous lanes in as few transactions as it spans. For wide rows (G >= 16) a group keeps
// four lookups' loads in flight before it uses any (more bytes in flight per register than more
// threads would give). A hard gate reads only the chosen row and copies it bit for bit.
//
// Accumulating repeated indices in the dense backward (documented choice):
// - default: float32 atomicAdd into a zeroed [V, D] float32 table (the output itself for
//   float32 tables, cast once at the end for 16-bit ones). Fast, but the summation order of a
//   row hit by several lookups depends on scheduling, so the last bits can differ run to run.
// - deterministic (torch.use_deterministic_algorithms(True)): the backward pass writes the
//   per-lookup gate z1 instead, the indices are sorted by a stable sort (lookup order kept
//   within a row), and one group of lanes sums each row's segment in that order with no
//   atomics. Gradients are then bit-identical from run to run. A row whose lookups cross a
//   window of 128 sorted positions (a hot row) is summed in pieces, one per window, whose sums
//   its group then adds in order (segment_pieces_kernel), so no group walks a whole hot row.
// The sparse backward writes one [D] value per lookup and never accumulates; its third output,
// grad_rows, is the indices as int64 (uncoalesced COO rows, as nn.Embedding(sparse=True)).
//
// Index range: checked on the host before any launch (one min/max reduction and one sync) and
// reported as the contract's IndexError; the kernels never assert on the device, which would
// poison the CUDA context.
//
// Includes stay lean: ATen/cuda/CUDAContext.h would pull cuBLAS / cuSPARSE headers.
#include "../gated_common.h"
#include "launch_shape.h"
#include "gated_embedding_kernels.cuh"
#include "segment_pieces.cuh"

#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

namespace autoft {
namespace {

using namespace gated_cuda;

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

// Lookups in flight per group: four when each group has at least four lookups of the block to
// walk (G >= 16, the wide rows where a lane would otherwise wait on one load at a time), else
// one. Either way every group runs the same number of iterations.
int pick_unroll(int G) {
  return kLookupsPerBlock / (kThreads / G) >= 4 ? 4 : 1;
}

template <typename F>
void dispatch_unroll(int unroll, F&& f) {
  if (unroll == 4) {
    f(std::integral_constant<int, 4>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// One min/max reduction and one device-to-host copy; only a bad batch pays for locating the
// first offending position.
void check_index_range(const at::Tensor& idx, int64_t V) {
  if (idx.numel() == 0) {
    return;
  }
  auto [lo, hi] = at::aminmax(idx);
  const at::Tensor both = at::stack({lo.to(at::kLong), hi.to(at::kLong)}).to(at::kCPU);
  const int64_t* b = both.const_data_ptr<int64_t>();
  if (b[0] >= 0 && b[1] < V) {
    return;
  }
  const at::Tensor bad = at::nonzero(idx.lt(0).logical_or(idx.ge(V))).to(at::kCPU);
  const int64_t pos = bad.const_data_ptr<int64_t>()[0];
  const int64_t value = idx[pos].to(at::kCPU).to(at::kLong).item<int64_t>();
  throw_index_out_of_range(pos, value, V);
}

unsigned blocks_for(int64_t N) {
  return static_cast<unsigned>((N + kLookupsPerBlock - 1) / kLookupsPerBlock);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_embedding_fwd_cuda(
    const at::Tensor& indices, const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, bool sparse) {
  // `sparse` only tells the autograd formula which gradient layout to ask the backward for.
  (void)sparse;
  const GatedSizes s = check_gated_inputs(indices, frozen_weight, tuned_weight, logits, uniforms,
                                          tau, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor idx = indices.contiguous();
  const at::Tensor frozen = frozen_weight.contiguous();
  const at::Tensor tuned = tuned_weight.contiguous();
  const at::Tensor lg = logits.contiguous();
  check_index_range(idx, s.V);
  at::Tensor uniforms_c;
  const NoiseSource src = make_noise_source(seed, uniforms, noise, uniforms_c);

  at::Tensor out = at::empty({s.N, s.D}, tuned.options());
  at::Tensor gates = at::empty({s.N, 2}, lg.options());
  if (s.N == 0) {
    return {out, gates};
  }
  const int vec = pick_vec(tuned.scalar_type(), s.D,
                           {frozen.const_data_ptr(), tuned.const_data_ptr(), out.const_data_ptr()});
  const int G = pick_group(s.D, vec);
  const bool idx64 = idx.scalar_type() == at::kLong;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_table(tuned.scalar_type(), [&](auto table_tag) {
    using scalar_t = decltype(table_tag);
    dispatch_vec(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      if constexpr (VEC == 1 || VEC * sizeof(scalar_t) == 16) {
        dispatch_unroll(pick_unroll(G), [&](auto unroll_tag) {
          constexpr int U = decltype(unroll_tag)::value;
          forward_kernel<scalar_t, VEC, U><<<blocks_for(s.N), kThreads, 0, stream>>>(
              idx.const_data_ptr(), idx64, frozen.const_data_ptr<scalar_t>(),
              tuned.const_data_ptr<scalar_t>(), lg.const_data_ptr<float>(), src,
              static_cast<float>(tau), hard, s.N, s.D, G, out.mutable_data_ptr<scalar_t>(),
              gates.mutable_data_ptr<float>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      }
    });
  });
  return {out, gates};
}

namespace {

// The backward; with `update` the deterministic mode's sorted segments update the touched tuned
// rows in place (segment_update_kernel) instead of summing into a dense gradient, and no
// gradient rows are returned.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& indices, const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, bool sparse, const RowRule* update) {
  const GatedSizes s = check_gated_inputs(indices, frozen_weight, tuned_weight, logits, uniforms,
                                          tau, c10::DeviceType::CUDA);
  check_grad_inputs(grad_out, grad_gates, indices, tuned_weight, s, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(indices.device());
  const at::Tensor idx = indices.contiguous();
  const at::Tensor frozen = frozen_weight.contiguous();
  const at::Tensor tuned = tuned_weight.contiguous();
  const at::Tensor lg = logits.contiguous();
  const at::Tensor go = grad_out.contiguous();
  const std::optional<at::Tensor> gg =
      grad_gates.has_value() ? std::optional<at::Tensor>(grad_gates->contiguous()) : std::nullopt;
  check_index_range(idx, s.V);
  at::Tensor uniforms_c;
  const NoiseSource src = make_noise_source(seed, uniforms, noise, uniforms_c);

  const bool deterministic =
      update != nullptr || (!sparse && at::globalContext().deterministicAlgorithms());
  const GradMode mode =
      sparse ? GradMode::kSparse : (deterministic ? GradMode::kDeterministic : GradMode::kAtomic);
  at::Tensor grad_logits = at::empty({s.N, 2}, lg.options());
  at::Tensor sparse_grad;
  at::Tensor dense_grad;
  if (sparse) {
    sparse_grad = at::empty({s.N, s.D}, tuned.options());
  } else if (update == nullptr) {
    dense_grad = at::zeros({s.V, s.D}, tuned.options().dtype(at::kFloat));
  }
  at::Tensor z1 = deterministic ? at::empty({s.N}, lg.options()) : at::Tensor();

  if (s.N > 0) {
    const int vec = pick_vec(tuned.scalar_type(), s.D,
                             {frozen.const_data_ptr(), tuned.const_data_ptr(), go.const_data_ptr(),
                              sparse ? sparse_grad.const_data_ptr() : nullptr});
    const int G = pick_group(s.D, vec);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const float* ggp = gg.has_value() ? gg->const_data_ptr<float>() : nullptr;
    const bool idx64 = idx.scalar_type() == at::kLong;
    dispatch_table(tuned.scalar_type(), [&](auto table_tag) {
      using scalar_t = decltype(table_tag);
      dispatch_vec(vec, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        if constexpr (VEC == 1 || VEC * sizeof(scalar_t) == 16) {
          auto launch = [&](auto grad_tag) {
            using grad_t = decltype(grad_tag);
            auto run = [&](auto mode_tag, auto unroll_tag) {
              constexpr GradMode M = decltype(mode_tag)::value;
              constexpr int U = decltype(unroll_tag)::value;
              backward_kernel<scalar_t, grad_t, VEC, U, M><<<blocks_for(s.N), kThreads, 0, stream>>>(
                  go.const_data_ptr<grad_t>(), ggp, idx.const_data_ptr(), idx64,
                  frozen.const_data_ptr<scalar_t>(), tuned.const_data_ptr<scalar_t>(),
                  lg.const_data_ptr<float>(), src, static_cast<float>(tau), hard, s.N, s.D, G,
                  M == GradMode::kAtomic ? dense_grad.mutable_data_ptr<float>() : nullptr,
                  M == GradMode::kSparse ? sparse_grad.mutable_data_ptr<scalar_t>() : nullptr,
                  M == GradMode::kDeterministic ? z1.mutable_data_ptr<float>() : nullptr,
                  grad_logits.mutable_data_ptr<float>());
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            };
            dispatch_unroll(pick_unroll(G), [&](auto unroll_tag) {
              switch (mode) {
                case GradMode::kSparse:
                  run(std::integral_constant<GradMode, GradMode::kSparse>{}, unroll_tag);
                  break;
                case GradMode::kDeterministic:
                  run(std::integral_constant<GradMode, GradMode::kDeterministic>{}, unroll_tag);
                  break;
                default:
                  run(std::integral_constant<GradMode, GradMode::kAtomic>{}, unroll_tag);
              }
            });
            if (mode == GradMode::kDeterministic) {
              // The optional<bool> must be spelled out: a plain `true` would pick the
              // (dim, descending) overload.
              const auto sorted = at::sort(idx.to(at::kLong), std::optional<bool>(true),
                                           /*dim=*/0, /*descending=*/false);
              const at::Tensor& rows = std::get<0>(sorted);
              const at::Tensor& order = std::get<1>(sorted);
              const int groups_per_block = kThreads / G;
              const unsigned blocks =
                  static_cast<unsigned>((s.N + groups_per_block - 1) / groups_per_block);
              // The dense sum skips a weight of 0; the update only for hard gates.
              const SegmentPieces pieces = sum_segment_pieces<grad_t, VEC>(
                  rows, order, z1.const_data_ptr<float>(), go.const_data_ptr<grad_t>(), s.N, s.D,
                  G, update == nullptr || hard, stream);
              if (update != nullptr) {
                // The logit gradients are made above, from the step's weights; then the rows.
                segment_update_kernel<scalar_t, grad_t, VEC><<<blocks, kThreads, 0, stream>>>(
                    rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
                    z1.const_data_ptr<float>(), go.const_data_ptr<grad_t>(), s.N, s.D, G, hard,
                    *update, pieces.sum_ptr(), pieces.touched_ptr(),
                    tuned.mutable_data_ptr<scalar_t>());
              } else {
                segment_sum_kernel<grad_t, VEC><<<blocks, kThreads, 0, stream>>>(
                    rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
                    z1.const_data_ptr<float>(), go.const_data_ptr<grad_t>(), s.N, s.D, G,
                    pieces.sum_ptr(), pieces.touched_ptr(), dense_grad.mutable_data_ptr<float>());
              }
              C10_CUDA_KERNEL_LAUNCH_CHECK();
            }
          };
          if (go.scalar_type() == at::kFloat) {
            launch(float{});
          } else {
            launch(scalar_t{});
          }
        }
      });
    });
  }
  at::Tensor grad_tuned;
  at::Tensor grad_rows;
  if (update != nullptr) {
    return {grad_tuned, grad_logits, grad_rows};
  }
  if (sparse) {
    // Uncoalesced COO rows, one per lookup (as nn.Embedding(sparse=True)). Always a copy: an op
    // output must not alias an input, which idx.to(kLong) would for int64 indices.
    grad_tuned = sparse_grad;
    grad_rows = idx.to(at::kLong, /*non_blocking=*/false, /*copy=*/true);
  } else {
    grad_tuned = tuned.scalar_type() == at::kFloat ? dense_grad : dense_grad.to(tuned.scalar_type());
    grad_rows = at::empty({0}, idx.options().dtype(at::kLong));
  }
  return {grad_tuned, grad_logits, grad_rows};
}

RowRule make_rule(const at::Tensor& weight, const char* weight_name, at::Tensor& state_a,
                  at::Tensor& state_b, int64_t rule, double lr, double eps, double beta1,
                  double beta2, int64_t step) {
  check_row_update(weight, weight_name, state_a, state_b, rule, step, c10::DeviceType::CUDA);
  const RuleHyper h = rule_hyper(lr, eps, beta1, beta2, step);
  RowRule u;
  u.rule = static_cast<int>(rule);
  u.lr = h.lr;
  u.eps = h.eps;
  u.one_minus_beta1 = h.one_minus_beta1;
  u.one_minus_beta2 = h.one_minus_beta2;
  u.neg_step_size = h.neg_step_size;
  u.state_a = rule >= 1 ? state_a.mutable_data_ptr<float>() : nullptr;
  u.state_b = rule == 2 ? state_b.mutable_data_ptr<float>() : nullptr;
  return u;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_embedding_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& indices, const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, bool sparse) {
  return backward_cuda(grad_out, grad_gates, indices, frozen_weight, tuned_weight, logits, seed,
                       uniforms, tau, hard, noise, sparse, nullptr);
}

// The backward with the fused optimizer's update of the touched tuned rows: the deterministic
// mode's sorted segments, each summed by one group in lookup order (a hot row from its pieces)
// and applied to its row, so a run is bit-identical to the next. Returns grad_logits.
at::Tensor gated_embedding_bwd_update_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& indices, const at::Tensor& frozen_weight, at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, at::Tensor& state_a, at::Tensor& state_b, int64_t rule,
    double lr, double eps, double beta1, double beta2, int64_t step) {
  // No device guard here: make_rule is host work, and backward_cuda checks the inputs'
  // devices before it sets one (a guard on a CPU `indices` would fail with an internal
  // assert instead of the contract's message).
  const RowRule u = make_rule(tuned_weight, "tuned_weight", state_a, state_b, rule, lr, eps,
                              beta1, beta2, step);
  return std::get<1>(backward_cuda(grad_out, grad_gates, indices, frozen_weight, tuned_weight,
                                   logits, seed, uniforms, tau, hard, noise, /*sparse=*/false, &u));
}

// The fused optimizer's update of a plain table's rows from one float32 gradient row per lookup
// (values[n] for row indices[n]): a stable sort, then segment_update_kernel with weight 1.
void rows_update_cuda(const at::Tensor& indices, const at::Tensor& values, at::Tensor& weight,
                      at::Tensor& state_a, at::Tensor& state_b, int64_t rule, double lr,
                      double eps, double beta1, double beta2, int64_t step) {
  const GatedSizes s = check_rows_update_inputs(indices, values, weight, c10::DeviceType::CUDA);
  const int64_t N = s.N;
  const int64_t V = s.V;
  const int64_t D = s.D;
  const c10::cuda::CUDAGuard guard(weight.device());
  const RowRule u = make_rule(weight, "weight", state_a, state_b, rule, lr, eps, beta1, beta2,
                              step);
  if (N == 0) {
    return;
  }
  const at::Tensor idx = indices.contiguous();
  check_index_range(idx, V);
  const at::Tensor vals = values.contiguous();
  const auto sorted = at::sort(idx.to(at::kLong), std::optional<bool>(true), /*dim=*/0,
                               /*descending=*/false);
  const at::Tensor& rows = std::get<0>(sorted);
  const at::Tensor& order = std::get<1>(sorted);
  const int vec = pick_vec(at::kFloat, D, {vals.const_data_ptr()});
  const int G = pick_group(D, vec);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int groups_per_block = kThreads / G;
  const unsigned blocks = static_cast<unsigned>((N + groups_per_block - 1) / groups_per_block);
  dispatch_table(weight.scalar_type(), [&](auto table_tag) {
    using scalar_t = decltype(table_tag);
    dispatch_vec(vec, [&](auto vec_tag) {
      constexpr int VEC = decltype(vec_tag)::value;
      if constexpr (VEC == 1 || VEC == 4) {
        const SegmentPieces pieces = sum_segment_pieces<float, VEC>(
            rows, order, nullptr, vals.const_data_ptr<float>(), N, D, G, /*skip_zero=*/false,
            stream);
        segment_update_kernel<scalar_t, float, VEC><<<blocks, kThreads, 0, stream>>>(
            rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(), nullptr,
            vals.const_data_ptr<float>(), N, D, G, /*hard=*/false, u, pieces.sum_ptr(),
            pieces.touched_ptr(), weight.mutable_data_ptr<scalar_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    });
  });
}

}  // namespace autoft

TORCH_LIBRARY_IMPL(autoft_fast, CUDA, m) {
  m.impl("gated_embedding_fwd", &autoft::gated_embedding_fwd_cuda);
  m.impl("gated_embedding_bwd", &autoft::gated_embedding_bwd_cuda);
  m.impl("gated_embedding_bwd_update", &autoft::gated_embedding_bwd_update_cuda);
  m.impl("rows_update", &autoft::rows_update_cuda);
}
