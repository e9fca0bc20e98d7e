// CPU implementations of autoft_fast::gated_embedding_bag_fwd / gated_embedding_bag_bwd: the
// gated op over bags of values (multi-hot fields), docs/op-contract.md "Bags".
//
// Bag b is values[offsets[b]:offsets[b + 1]]. Both passes run in parallel over bags, pooling
// the bag's frozen and tuned rows in float32 registers (no [L, D] gather buffer). The backward
// recomputes the pooled vectors (nothing but the inputs is saved) for the logit gradient, and
// sums the tuned-row gradient exactly: the (row, position) pairs of the values whose bag gave
// the tuned row a nonzero weight are sorted, and each row's segment is summed in float32 and
// cast once, so repeated values within and among bags accumulate in one fixed order.
#include "gated_embedding_cpu.h"

#include "../gated_common.h"

#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace autoft {
namespace {


template <typename frozen_t>
constexpr bool kBagQuantised = std::is_same_v<frozen_t, int8_t>;

// One frozen row as the kernels read it: a pointer and the row's int8 scale (1 for floats).
template <typename frozen_t>
struct FrozenRow {
  const frozen_t* p;
  float scale;
  float operator[](int64_t d) const {
    if constexpr (kBagQuantised<frozen_t>) {
      return static_cast<float>(p[d]) * scale;
    } else {
      return static_cast<float>(p[d]);
    }
  }
};

template <typename frozen_t>
inline FrozenRow<frozen_t> frozen_row(const frozen_t* table, int64_t row, int64_t D) {
  if constexpr (kBagQuantised<frozen_t>) {
    const frozen_t* p = table + row * (D + kInt8ExtraBytes);
    c10::Half h;
    std::memcpy(&h, p + D, sizeof(h));
    return {p, static_cast<float>(h)};
  } else {
    return {table + row * D, 1.0f};
  }
}

// The bag's gate: the contract's formulas with the bag as the lookup.
struct BagGate {
  float y0, y1, z0, z1;
};

inline BagGate bag_gate(const NoiseSource& src, const float* logits, int64_t b, float tau, bool hard) {
  float l = 0.0f;
  if (src.noise) {
    float u;
    if (src.uniforms != nullptr) {
      u = src.uniforms[b];
    } else {
      const Philox4 r = philox4x32_10(src.seed, static_cast<uint64_t>(b) >> 2);
      u = philox_uniform(r.w[b & 3]);
    }
    l = std::log(u + 1e-20f) - std::log(1.0f - u);
  }
  const float x = (logits[2 * b + 1] - logits[2 * b] + l) / tau;
  const float y1 = 1.0f / (1.0f + std::exp(-x));
  const float y0 = 1.0f / (1.0f + std::exp(x));
  if (hard) {
    const float pick = x > 0.0f ? 1.0f : 0.0f;  // a tie and NaN choose the frozen row
    return {y0, y1, 1.0f - pick, pick};
  }
  return {y0, y1, y0, y1};
}

// The pooling weight of value i of a bag of `count` values.
inline float value_weight(const float* weights, int64_t i, int64_t mode, int64_t count) {
  const float w = weights != nullptr ? weights[i] : 1.0f;
  return mode == kModeMean ? w / static_cast<float>(count) : w;
}

// Pooled frozen and tuned vectors of bag [o0, o1) into pf, pt (float32, D each).
template <typename scalar_t, typename frozen_t, typename index_t>
inline void pool_bag(const index_t* values, const float* weights, int64_t o0, int64_t o1,
                     int64_t mode, const frozen_t* frozen, const scalar_t* tuned, int64_t D,
                     float* pf, float* pt) {
  std::fill(pf, pf + D, 0.0f);
  std::fill(pt, pt + D, 0.0f);
  for (int64_t i = o0; i < o1; ++i) {
    const int64_t v = static_cast<int64_t>(values[i]);
    const float w = value_weight(weights, i, mode, o1 - o0);
    const FrozenRow<frozen_t> f = frozen_row(frozen, v, D);
    const scalar_t* t = tuned + v * D;
    for (int64_t d = 0; d < D; ++d) {
      pf[d] += w * f[d];
      pt[d] += w * static_cast<float>(t[d]);
    }
  }
}

template <typename scalar_t, typename F>
void dispatch_bag_frozen(at::ScalarType frozen, F&& f) {
  if (frozen == at::kChar) {
    f(int8_t{});
  } else if (frozen == at::kBFloat16) {
    f(c10::BFloat16{});
  } else if (frozen == at::kHalf) {
    f(c10::Half{});
  } else {
    f(scalar_t{});
  }
}

// prepare_bag_inputs (gated_common.h), then the data checks: offsets start at 0, never decrease
// and end at len(values); every value is a row of the table.
BagInputs check_bag(const at::Tensor& values, const at::Tensor& offsets,
                    const std::optional<at::Tensor>& weights, const at::Tensor& frozen_weight,
                    const at::Tensor& tuned_weight, const at::Tensor& logits, const at::Tensor& seed,
                    const std::optional<at::Tensor>& uniforms, double tau, bool noise, int64_t mode) {
  BagInputs in = prepare_bag_inputs(values, offsets, weights, frozen_weight, tuned_weight, logits,
                                    seed, uniforms, tau, noise, mode, c10::DeviceType::CPU,
                                    /*low_precision_frozen=*/true);
  const int64_t B = in.s.N;
  const int64_t* op = in.offsets.const_data_ptr<int64_t>();
  TORCH_CHECK_VALUE(op[0] == 0, "offsets[0] = ", op[0], " must be 0 (bag 0 starts at the first value)");
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(op[b] <= op[b + 1], "offsets must be non-decreasing, got offsets[", b, "] = ",
                      op[b], " > offsets[", b + 1, "] = ", op[b + 1]);
  }
  TORCH_CHECK_VALUE(op[B] == in.L, "offsets[-1] = ", op[B], " must equal len(values) = ", in.L);
  dispatch_index(in.values.scalar_type(), [&](auto tag) {
    using index_t = decltype(tag);
    const index_t* vp = in.values.const_data_ptr<index_t>();
    for (int64_t i = 0; i < in.L; ++i) {
      const int64_t v = static_cast<int64_t>(vp[i]);
      TORCH_CHECK_INDEX(v >= 0 && v < in.s.V, "values[", i, "] = ", v,
                        " is out of range for a table of ", in.s.V, " rows");
    }
  });
  return in;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> gated_embedding_bag_fwd_cpu(
    const at::Tensor& values, const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
    const at::Tensor& frozen_weight, const at::Tensor& tuned_weight, const at::Tensor& logits,
    const at::Tensor& seed, const std::optional<at::Tensor>& uniforms, double tau, bool hard, bool noise,
    int64_t mode, bool sparse) {
  (void)sparse;  // only tells the autograd formula which gradient layout to ask for
  BagInputs in = check_bag(values, offsets, per_sample_weights, frozen_weight, tuned_weight, logits,
                           seed, uniforms, tau, noise, mode);
  const int64_t B = in.s.N, D = in.s.D;
  at::Tensor out = at::empty({B, D}, in.tuned.options());
  at::Tensor gates = at::empty({B, 2}, in.logits.options());
  const int64_t* op = in.offsets.const_data_ptr<int64_t>();
  const float* wp = in.weights.defined() ? in.weights.const_data_ptr<float>() : nullptr;
  const float* lp = in.logits.const_data_ptr<float>();
  float* gp = gates.mutable_data_ptr<float>();
  dispatch_index(in.values.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const index_t* vp = in.values.const_data_ptr<index_t>();
    dispatch_table(in.tuned.scalar_type(), [&](auto table_tag) {
      using scalar_t = decltype(table_tag);
      dispatch_bag_frozen<scalar_t>(in.frozen.scalar_type(), [&](auto frozen_tag) {
        using frozen_t = decltype(frozen_tag);
        const frozen_t* fp = in.frozen.const_data_ptr<frozen_t>();
        const scalar_t* tp = in.tuned.const_data_ptr<scalar_t>();
        scalar_t* outp = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
          std::vector<float> pf(D), pt(D);
          for (int64_t b = b0; b < b1; ++b) {
            const BagGate g = bag_gate(in.src, lp, b, static_cast<float>(tau), hard);
            pool_bag(vp, wp, op[b], op[b + 1], mode, fp, tp, D, pf.data(), pt.data());
            if (hard) {
              // The chosen pool itself (z is one-hot): a NaN or inf in the other pool cannot
              // reach the output, as for lookups (0 * inf would be NaN).
              const float* chosen = g.z1 != 0.0f ? pt.data() : pf.data();
              for (int64_t d = 0; d < D; ++d) {
                outp[b * D + d] = static_cast<scalar_t>(chosen[d]);
              }
            } else {
              for (int64_t d = 0; d < D; ++d) {
                outp[b * D + d] = static_cast<scalar_t>(g.z0 * pf[d] + g.z1 * pt[d]);
              }
            }
            gp[2 * b] = g.z0;
            gp[2 * b + 1] = g.z1;
          }
        });
      });
    });
  });
  return {out, gates};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_embedding_bag_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates, const at::Tensor& values,
    const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
    const at::Tensor& frozen_weight, const at::Tensor& tuned_weight, const at::Tensor& logits,
    const at::Tensor& seed, const std::optional<at::Tensor>& uniforms, double tau, bool hard, bool noise,
    int64_t mode, bool sparse) {
  BagInputs in = check_bag(values, offsets, per_sample_weights, frozen_weight, tuned_weight, logits,
                           seed, uniforms, tau, noise, mode);
  const int64_t B = in.s.N, D = in.s.D, V = in.s.V, L = in.L;
  check_grad_inputs(grad_out, grad_gates, in.values.new_empty({B}), in.tuned, in.s, c10::DeviceType::CPU);
  const at::Tensor g32 = grad_out.to(at::kFloat).contiguous();
  at::Tensor gg;
  if (grad_gates.has_value()) {
    gg = grad_gates->contiguous();
  }
  at::Tensor grad_logits = at::empty({B, 2}, in.logits.options());
  std::vector<float> z1(B);
  const int64_t* op = in.offsets.const_data_ptr<int64_t>();
  const float* wp = in.weights.defined() ? in.weights.const_data_ptr<float>() : nullptr;
  const float* lp = in.logits.const_data_ptr<float>();
  const float* gop = g32.const_data_ptr<float>();
  const float* ggp = gg.defined() ? gg.const_data_ptr<float>() : nullptr;
  float* glp = grad_logits.mutable_data_ptr<float>();
  at::Tensor grad_tuned, grad_rows;
  dispatch_index(in.values.scalar_type(), [&](auto index_tag) {
    using index_t = decltype(index_tag);
    const index_t* vp = in.values.const_data_ptr<index_t>();
    dispatch_table(in.tuned.scalar_type(), [&](auto table_tag) {
      using scalar_t = decltype(table_tag);
      dispatch_bag_frozen<scalar_t>(in.frozen.scalar_type(), [&](auto frozen_tag) {
        using frozen_t = decltype(frozen_tag);
        const frozen_t* fp = in.frozen.const_data_ptr<frozen_t>();
        const scalar_t* tp = in.tuned.const_data_ptr<scalar_t>();
        // Pass 1, per bag: the gate, the two dot products, the logit gradient.
        at::parallel_for(0, B, 64, [&](int64_t b0, int64_t b1) {
          std::vector<float> pf(D), pt(D);
          for (int64_t b = b0; b < b1; ++b) {
            const BagGate g = bag_gate(in.src, lp, b, static_cast<float>(tau), hard);
            pool_bag(vp, wp, op[b], op[b + 1], mode, fp, tp, D, pf.data(), pt.data());
            float a0 = 0.0f, a1 = 0.0f;
            for (int64_t d = 0; d < D; ++d) {
              a0 += gop[b * D + d] * pf[d];
              a1 += gop[b * D + d] * pt[d];
            }
            if (ggp != nullptr) {
              a0 += ggp[2 * b];
              a1 += ggp[2 * b + 1];
            }
            const float s = g.y0 * g.y1 * (a1 - a0) / static_cast<float>(tau);
            glp[2 * b] = -s;
            glp[2 * b + 1] = s;
            z1[b] = g.z1;
          }
        });
        // Pass 2: the values whose bag gave the tuned row a weight, sorted by (row, position).
        std::vector<std::pair<int64_t, int64_t>> keys;
        std::vector<int64_t> bag_of(L);
        keys.reserve(L);
        for (int64_t b = 0; b < B; ++b) {
          for (int64_t i = op[b]; i < op[b + 1]; ++i) {
            bag_of[i] = b;
            if (z1[b] != 0.0f) {
              keys.emplace_back(static_cast<int64_t>(vp[i]), i);
            }
          }
        }
        std::sort(keys.begin(), keys.end());
        std::vector<int64_t> starts;
        for (int64_t k = 0; k < static_cast<int64_t>(keys.size()); ++k) {
          if (k == 0 || keys[k].first != keys[k - 1].first) {
            starts.push_back(k);
          }
        }
        const int64_t U = static_cast<int64_t>(starts.size());
        starts.push_back(static_cast<int64_t>(keys.size()));
        scalar_t* dst;
        int64_t* rows_p = nullptr;
        if (sparse) {
          grad_tuned = at::empty({U, D}, in.tuned.options());
          grad_rows = at::empty({U}, in.values.options().dtype(at::kLong));
          rows_p = grad_rows.mutable_data_ptr<int64_t>();
        } else {
          grad_tuned = at::zeros({V, D}, in.tuned.options());
          grad_rows = at::empty({0}, in.values.options().dtype(at::kLong));
        }
        dst = grad_tuned.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, U, 16, [&](int64_t u0, int64_t u1) {
          std::vector<float> acc(D);
          for (int64_t u = u0; u < u1; ++u) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            const int64_t row = keys[starts[u]].first;
            for (int64_t k = starts[u]; k < starts[u + 1]; ++k) {
              const int64_t i = keys[k].second, b = bag_of[i];
              const float c = z1[b] * value_weight(wp, i, mode, op[b + 1] - op[b]);
              for (int64_t d = 0; d < D; ++d) {
                acc[d] += c * gop[b * D + d];
              }
            }
            scalar_t* o = sparse ? dst + u * D : dst + row * D;
            for (int64_t d = 0; d < D; ++d) {
              o[d] = static_cast<scalar_t>(acc[d]);
            }
            if (sparse) {
              rows_p[u] = row;
            }
          }
        });
      });
    });
  });
  return {grad_tuned, grad_logits, grad_rows};
}

}  // namespace autoft

TORCH_LIBRARY_IMPL(autoft_fast, CPU, m) {
  m.impl("gated_embedding_bag_fwd", &autoft::gated_embedding_bag_fwd_cpu);
  m.impl("gated_embedding_bag_bwd", &autoft::gated_embedding_bag_bwd_cpu);
}
