// Fused CUDA kernels of the gated embedding op (docs/op-contract.md, docs/internals.md).
//
// Layout of the work. A block of 256 threads owns 64 consecutive lookups and runs in two
// stages. Stage 1: sixteen threads each draw one Philox call, which serves four lookups (the
// contract's stream is built so), and form those lookups' gates into shared memory, writing the
// gates output coalesced. Stage 2: the block splits into groups of G lanes (G a power of two,
// G * VEC >= D up to a warp), one group per lookup, and each lane moves VEC consecutive elements
// with 16-byte loads when the rows allow it, so a row is read by contiguous lanes in as few
// transactions as it spans. A hard gate reads only the chosen row.
//
// Accumulating repeated indices in the dense backward (documented choice):
// - default: float32 atomicAdd into a zeroed [V, D] float32 table (the output itself for
//   float32 tables, cast once at the end for 16-bit ones). Fast, but the summation order of a
//   row hit by several lookups depends on scheduling, so the last bits can differ run to run.
// - deterministic (torch.use_deterministic_algorithms(True)): the backward pass writes the
//   per-lookup gate z1 instead, the indices are sorted by a stable sort (lookup order kept
//   within a row), and one group of lanes sums each row's segment in that order with no
//   atomics. Gradients are then bit-identical from run to run. A row that takes most of the
//   batch is summed by one group, so this mode trades speed on hot rows for reproducibility.
// The sparse backward writes one [D] value per lookup and never accumulates.
//
// Index range: checked on the host before any launch (one min/max reduction and one sync) and
// reported as the contract's IndexError; the kernels never assert on the device, which would
// poison the CUDA context.
//
// Includes stay lean: ATen/cuda/CUDAContext.h would pull cuBLAS / cuSPARSE headers.
#include "../gated_common.h"
#include "../philox.h"

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
#include <optional>
#include <tuple>

namespace autoft {
namespace {

constexpr int kThreads = 256;
constexpr int kLookupsPerBlock = 64;  // a multiple of 4: no Philox call straddles two blocks
constexpr int kGateThreads = kLookupsPerBlock / 4;

enum class GradMode : int { kAtomic = 0, kSparse = 1, kDeterministic = 2 };

// sigmoid(x), sigmoid(-x) and their product from one exp(-|x|): the product is formed
// directly, never as y * (1 - y), so it keeps its relative precision for a nearly certain gate.
// A NaN x gives NaN in all three (x >= 0 is false), and a hard gate then picks the frozen row.
struct SoftGate {
  float y0;
  float y1;
  float y0y1;
};

__device__ __forceinline__ SoftGate soft_gate(float x) {
  const float e = expf(-fabsf(x));
  const float r = 1.0f / (1.0f + e);
  const bool positive = x >= 0.0f;
  SoftGate s;
  s.y0 = positive ? e * r : r;
  s.y1 = positive ? r : e * r;
  s.y0y1 = e * r * r;
  return s;
}

struct NoiseArgs {
  bool noise;
  uint64_t seed;
  const float* uniforms;  // overrides the seed when not null
};

// Logistic noise of lookups n0 .. n0 + 3 (n0 % 4 == 0); entries past N are left 0.
__device__ __forceinline__ void group_noise(const NoiseArgs& src, int64_t n0, int64_t N,
                                            float l[4]) {
  l[0] = l[1] = l[2] = l[3] = 0.0f;
  if (!src.noise) {
    return;
  }
  if (src.uniforms != nullptr) {
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (n0 + k < N) {
        l[k] = logistic_noise(src.uniforms[n0 + k]);
      }
    }
  } else {
    const Philox4 r = philox4x32_10(src.seed, static_cast<uint64_t>(n0) >> 2);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      l[k] = logistic_noise(philox_uniform(r.w[k]));
    }
  }
}

// VEC consecutive elements <-> floats, in 16-byte transactions when VEC fills them (the host
// picks VEC > 1 only for 16-byte aligned rows), element by element otherwise.
template <typename T, int VEC>
__device__ __forceinline__ void load_floats(const T* p, float (&v)[VEC]) {
  constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
  if constexpr (VEC >= kPer16 && VEC % kPer16 == 0) {
#pragma unroll
    for (int c = 0; c < VEC / kPer16; ++c) {
      const uint4 raw = *reinterpret_cast<const uint4*>(p + c * kPer16);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer16; ++i) {
        v[c * kPer16 + i] = static_cast<float>(e[i]);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      v[i] = static_cast<float>(p[i]);
    }
  }
}

template <typename T, int VEC>
__device__ __forceinline__ void store_floats(T* p, const float (&v)[VEC]) {
  constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
  if constexpr (VEC >= kPer16 && VEC % kPer16 == 0) {
#pragma unroll
    for (int c = 0; c < VEC / kPer16; ++c) {
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPer16; ++i) {
        e[i] = static_cast<T>(v[c * kPer16 + i]);
      }
      *reinterpret_cast<uint4*>(p + c * kPer16) = raw;
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      p[i] = static_cast<T>(v[i]);
    }
  }
}

// Sum over the G lanes of a group (G divides 32 and groups are lane-aligned, so xor offsets
// below G stay inside the group). Every lane of the warp must call it.
__device__ __forceinline__ float group_sum(float v, int G) {
  for (int off = G >> 1; off > 0; off >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, off);
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const index_t* __restrict__ indices, const scalar_t* __restrict__ frozen,
                   const scalar_t* __restrict__ tuned, const float* __restrict__ logits,
                   NoiseArgs src, float tau, bool hard, int64_t N, int64_t D, int G,
                   scalar_t* __restrict__ out, float* __restrict__ gates) {
  __shared__ float s_z0[kLookupsPerBlock];
  __shared__ float s_z1[kLookupsPerBlock];
  __shared__ int64_t s_row[kLookupsPerBlock];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kLookupsPerBlock;

  if (threadIdx.x < kGateThreads) {
    const int64_t n0 = base + 4 * threadIdx.x;
    float l[4];
    group_noise(src, n0, N, l);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t n = n0 + k;
      const int j = 4 * threadIdx.x + k;
      if (n < N) {
        const SoftGate s = soft_gate((logits[2 * n + 1] - logits[2 * n] + l[k]) / tau);
        float z0 = s.y0;
        float z1 = s.y1;
        if (hard) {
          z1 = s.y1 > 0.5f ? 1.0f : 0.0f;
          z0 = 1.0f - z1;
        }
        gates[2 * n] = z0;
        gates[2 * n + 1] = z1;
        s_z0[j] = z0;
        s_z1[j] = z1;
        s_row[j] = static_cast<int64_t>(indices[n]);
      }
    }
  }
  __syncthreads();

  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int groups = kThreads / G;
  for (int j = group; j < kLookupsPerBlock; j += groups) {
    const int64_t n = base + j;
    if (n >= N) {
      break;
    }
    const int64_t row = s_row[j];
    scalar_t* o = out + n * D;
    if (hard) {
      // Only the chosen row is read: the hard forward is a pure gather.
      const scalar_t* src_row = (s_z1[j] > 0.5f ? tuned : frozen) + row * D;
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
        float v[VEC];
        load_floats<scalar_t, VEC>(src_row + c, v);
        store_floats<scalar_t, VEC>(o + c, v);
      }
    } else {
      const float z0 = s_z0[j];
      const float z1 = s_z1[j];
      const scalar_t* f_row = frozen + row * D;
      const scalar_t* t_row = tuned + row * D;
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
        float f[VEC];
        float t[VEC];
        load_floats<scalar_t, VEC>(f_row + c, f);
        load_floats<scalar_t, VEC>(t_row + c, t);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          f[i] = z0 * f[i] + z1 * t[i];
        }
        store_floats<scalar_t, VEC>(o + c, f);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------

template <typename scalar_t, typename index_t, typename grad_t, int VEC, GradMode MODE>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const grad_t* __restrict__ grad_out, const float* __restrict__ grad_gates,
                    const index_t* __restrict__ indices, const scalar_t* __restrict__ frozen,
                    const scalar_t* __restrict__ tuned, const float* __restrict__ logits,
                    NoiseArgs src, float tau, bool hard, int64_t N, int64_t D, int G,
                    float* __restrict__ dense_grad,     // kAtomic: [V, D] float32, zeroed
                    scalar_t* __restrict__ sparse_grad,  // kSparse: [N, D]
                    float* __restrict__ z1_out,          // kDeterministic: [N]
                    float* __restrict__ grad_logits) {
  __shared__ float s_z1[kLookupsPerBlock];
  __shared__ float s_y0y1[kLookupsPerBlock];
  __shared__ float s_gate_term[kLookupsPerBlock];  // the grad_gates part of d logit1
  __shared__ int64_t s_row[kLookupsPerBlock];
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kLookupsPerBlock;

  if (threadIdx.x < kGateThreads) {
    const int64_t n0 = base + 4 * threadIdx.x;
    float l[4];
    group_noise(src, n0, N, l);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t n = n0 + k;
      const int j = 4 * threadIdx.x + k;
      if (n < N) {
        const SoftGate s = soft_gate((logits[2 * n + 1] - logits[2 * n] + l[k]) / tau);
        const float z1 = hard ? (s.y1 > 0.5f ? 1.0f : 0.0f) : s.y1;
        s_z1[j] = z1;
        s_y0y1[j] = s.y0y1;
        s_gate_term[j] =
            grad_gates != nullptr ? s.y0y1 * (grad_gates[2 * n + 1] - grad_gates[2 * n]) / tau : 0.0f;
        s_row[j] = static_cast<int64_t>(indices[n]);
        if constexpr (MODE == GradMode::kDeterministic) {
          z1_out[n] = z1;
        }
      }
    }
  }
  __syncthreads();

  const int group = threadIdx.x / G;
  const int lane = threadIdx.x % G;
  const int groups = kThreads / G;
  // Every group runs the same number of iterations (powers of two), so the shuffles below see
  // whole warps; lookups past N contribute zeros instead of leaving the loop.
  for (int j = group; j < kLookupsPerBlock; j += groups) {
    const int64_t n = base + j;
    const bool valid = n < N;
    float a0 = 0.0f;
    float a1 = 0.0f;
    if (valid) {
      const int64_t row = s_row[j];
      const float z1 = s_z1[j];
      const scalar_t* f_row = frozen + row * D;
      const scalar_t* t_row = tuned + row * D;
      const grad_t* g_row = grad_out + n * D;
      for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
        float g[VEC];
        float f[VEC];
        float t[VEC];
        load_floats<grad_t, VEC>(g_row + c, g);
        load_floats<scalar_t, VEC>(f_row + c, f);
        load_floats<scalar_t, VEC>(t_row + c, t);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          a0 += g[i] * f[i];
          a1 += g[i] * t[i];
          g[i] *= z1;
        }
        if constexpr (MODE == GradMode::kSparse) {
          store_floats<scalar_t, VEC>(sparse_grad + n * D + c, g);
        } else if constexpr (MODE == GradMode::kAtomic) {
          if (z1 != 0.0f) {  // a hard gate that chose the frozen row adds nothing
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              atomicAdd(dense_grad + row * D + c + i, g[i]);
            }
          }
        }
      }
    }
    a0 = group_sum(a0, G);
    a1 = group_sum(a1, G);
    if (valid && lane == 0) {
      const float d1 = s_y0y1[j] * (a1 - a0) / tau + s_gate_term[j];
      grad_logits[2 * n] = -d1;
      grad_logits[2 * n + 1] = d1;
    }
  }
}

// Deterministic dense gradient: sorted_rows / order come from a stable sort of the indices, so
// each row's lookups are contiguous and in lookup order. The group that finds the start of a
// segment sums it, alone and in order, and writes the row.
template <typename grad_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const int64_t* __restrict__ sorted_rows, const int64_t* __restrict__ order,
                       const float* __restrict__ z1, const grad_t* __restrict__ grad_out,
                       int64_t N, int64_t D, int G, float* __restrict__ dense_grad) {
  const int groups_per_block = kThreads / G;
  const int64_t p = static_cast<int64_t>(blockIdx.x) * groups_per_block + threadIdx.x / G;
  const int lane = threadIdx.x % G;
  if (p >= N) {
    return;
  }
  const int64_t row = sorted_rows[p];
  if (p > 0 && sorted_rows[p - 1] == row) {
    return;
  }
  for (int64_t c = static_cast<int64_t>(lane) * VEC; c < D; c += static_cast<int64_t>(G) * VEC) {
    float acc[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      acc[i] = 0.0f;
    }
    for (int64_t q = p; q < N && sorted_rows[q] == row; ++q) {
      const int64_t n = order[q];
      const float w = z1[n];
      if (w != 0.0f) {
        float g[VEC];
        load_floats<grad_t, VEC>(grad_out + n * D + c, g);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          acc[i] += w * g[i];
        }
      }
    }
    store_floats<float, VEC>(dense_grad + row * D + c, acc);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------

template <typename F>
void dispatch_table(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "unsupported table dtype ", t);
  }
}

template <typename F>
void dispatch_index(at::ScalarType t, F&& f) {
  if (t == at::kLong) {
    f(int64_t{});
  } else {
    f(int32_t{});
  }
}

// Elements per lane: 16 bytes of the table dtype when every row pointer stays 16-byte aligned.
int pick_vec(at::ScalarType table, int64_t D, std::initializer_list<const void*> ptrs) {
  const int v = 16 / static_cast<int>(c10::elementSize(table));
  if (D % v != 0) {
    return 1;
  }
  for (const void* p : ptrs) {
    if (p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 != 0) {
      return 1;
    }
  }
  return v;
}

// Lanes per lookup: enough to cover a row in one pass, up to a warp.
int pick_group(int64_t D, int vec) {
  const int64_t chunks = (D + vec - 1) / vec;
  int g = 1;
  while (g < 32 && g < chunks) {
    g <<= 1;
  }
  return g;
}

template <typename F>
void dispatch_vec(int vec, F&& f) {
  switch (vec) {
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    default:
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

NoiseArgs make_noise(const at::Tensor& seed, const std::optional<at::Tensor>& uniforms, bool noise,
                     at::Tensor& uniforms_c) {
  NoiseArgs src{noise, 0, nullptr};
  if (noise) {
    if (uniforms.has_value()) {
      uniforms_c = uniforms->contiguous();
      src.uniforms = uniforms_c.const_data_ptr<float>();
    } else {
      src.seed = read_seed(seed);
    }
  }
  return src;
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
  const NoiseArgs src = make_noise(seed, uniforms, noise, uniforms_c);

  at::Tensor out = at::empty({s.N, s.D}, tuned.options());
  at::Tensor gates = at::empty({s.N, 2}, lg.options());
  if (s.N == 0) {
    return {out, gates};
  }
  const int vec = pick_vec(tuned.scalar_type(), s.D,
                           {frozen.const_data_ptr(), tuned.const_data_ptr(), out.const_data_ptr()});
  const int G = pick_group(s.D, vec);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_index(idx.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    dispatch_table(tuned.scalar_type(), [&](auto table_tag) {
      using scalar_t = decltype(table_tag);
      dispatch_vec(vec, [&](auto vec_tag) {
        constexpr int VEC = decltype(vec_tag)::value;
        if constexpr (VEC == 1 || VEC * sizeof(scalar_t) == 16) {
          forward_kernel<scalar_t, index_t, VEC><<<blocks_for(s.N), kThreads, 0, stream>>>(
              idx.const_data_ptr<index_t>(), frozen.const_data_ptr<scalar_t>(),
              tuned.const_data_ptr<scalar_t>(), lg.const_data_ptr<float>(), src,
              static_cast<float>(tau), hard, s.N, s.D, G, out.mutable_data_ptr<scalar_t>(),
              gates.mutable_data_ptr<float>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
      });
    });
  });
  return {out, gates};
}

std::tuple<at::Tensor, at::Tensor> gated_embedding_bwd_cuda(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& indices, const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, bool sparse) {
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
  const NoiseArgs src = make_noise(seed, uniforms, noise, uniforms_c);

  const bool deterministic = !sparse && at::globalContext().deterministicAlgorithms();
  const GradMode mode =
      sparse ? GradMode::kSparse : (deterministic ? GradMode::kDeterministic : GradMode::kAtomic);
  at::Tensor grad_logits = at::empty({s.N, 2}, lg.options());
  at::Tensor sparse_grad;
  at::Tensor dense_grad;
  if (sparse) {
    sparse_grad = at::empty({s.N, s.D}, tuned.options());
  } else {
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
    dispatch_index(idx.scalar_type(), [&](auto index_tag) {
      using index_t = decltype(index_tag);
      dispatch_table(tuned.scalar_type(), [&](auto table_tag) {
        using scalar_t = decltype(table_tag);
        dispatch_vec(vec, [&](auto vec_tag) {
          constexpr int VEC = decltype(vec_tag)::value;
          if constexpr (VEC == 1 || VEC * sizeof(scalar_t) == 16) {
            auto launch = [&](auto grad_tag) {
              using grad_t = decltype(grad_tag);
              auto run = [&](auto mode_tag) {
                constexpr GradMode M = decltype(mode_tag)::value;
                backward_kernel<scalar_t, index_t, grad_t, VEC, M>
                    <<<blocks_for(s.N), kThreads, 0, stream>>>(
                        go.const_data_ptr<grad_t>(), ggp, idx.const_data_ptr<index_t>(),
                        frozen.const_data_ptr<scalar_t>(), tuned.const_data_ptr<scalar_t>(),
                        lg.const_data_ptr<float>(), src, static_cast<float>(tau), hard, s.N, s.D, G,
                        M == GradMode::kAtomic ? dense_grad.mutable_data_ptr<float>() : nullptr,
                        M == GradMode::kSparse ? sparse_grad.mutable_data_ptr<scalar_t>() : nullptr,
                        M == GradMode::kDeterministic ? z1.mutable_data_ptr<float>() : nullptr,
                        grad_logits.mutable_data_ptr<float>());
                C10_CUDA_KERNEL_LAUNCH_CHECK();
              };
              switch (mode) {
                case GradMode::kSparse:
                  run(std::integral_constant<GradMode, GradMode::kSparse>{});
                  break;
                case GradMode::kDeterministic:
                  run(std::integral_constant<GradMode, GradMode::kDeterministic>{});
                  break;
                default:
                  run(std::integral_constant<GradMode, GradMode::kAtomic>{});
              }
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
                segment_sum_kernel<grad_t, VEC><<<blocks, kThreads, 0, stream>>>(
                    rows.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
                    z1.const_data_ptr<float>(), go.const_data_ptr<grad_t>(), s.N, s.D, G,
                    dense_grad.mutable_data_ptr<float>());
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
    });
  }
  at::Tensor grad_tuned;
  if (sparse) {
    grad_tuned = sparse_grad;
  } else {
    grad_tuned = tuned.scalar_type() == at::kFloat ? dense_grad : dense_grad.to(tuned.scalar_type());
  }
  return {grad_tuned, grad_logits};
}

}  // namespace autoft

TORCH_LIBRARY_IMPL(autoft_fast, CUDA, m) {
  m.impl("gated_embedding_fwd", &autoft::gated_embedding_fwd_cuda);
  m.impl("gated_embedding_bwd", &autoft::gated_embedding_bwd_cuda);
}
