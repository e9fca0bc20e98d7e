// Input checks shared by the CPU and CUDA host code of the gated embedding ops.
//
// Users can call torch.ops.autoft_fast.* directly, bypassing the Python validation, so the
// kernels check their inputs too, with the messages of docs/op-contract.md: the exception type
// says what kind of mistake it is (IndexError / ValueError / TypeError) and the message names
// the argument and the bad value. Host-only (never included from device code).
#pragma once

#include "philox.h"

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <c10/util/Optional.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <vector>

namespace autoft {

// Sizes every kernel needs, read once the inputs are known to be consistent.
struct GatedSizes {
  int64_t N;  // lookups
  int64_t V;  // table rows
  int64_t D;  // embedding width
};

inline bool is_table_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

inline void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& indices,
                              c10::DeviceType expected) {
  TORCH_CHECK(t.device().type() == expected, name, " is on ", t.device(), " but this is the ",
              c10::DeviceTypeName(expected), " kernel; move every tensor to the same device");
  TORCH_CHECK(t.device() == indices.device(), name, " is on ", t.device(), " but indices is on ",
              indices.device(), "; every tensor must be on the same device");
}

inline void check_tau(double tau) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0.0,
                    "tau must be a positive finite temperature, got tau = ", tau);
  // The gates are computed in float32: tau must be a normal float32 number.
  TORCH_CHECK_VALUE(tau >= static_cast<double>(std::numeric_limits<float>::min()) &&
                        tau <= static_cast<double>(std::numeric_limits<float>::max()),
                    "tau = ", tau, " is outside float32's range, in which the gates are computed");
}

// An int8 frozen table stores D + 2 bytes per row: the D quantised values, then the row's
// float16 scale (autoft_fast/ops/quant.py).
constexpr int64_t kInt8ExtraBytes = 2;

// Whether a frozen table of dtype `frozen` may be paired with a tuned table of dtype `tuned`
// by a kernel that reads lower-precision frozen tables (ops/validate.py frozen_dtypes_for).
inline bool is_frozen_dtype_for(at::ScalarType frozen, at::ScalarType tuned) {
  return frozen == tuned || frozen == at::kChar ||
         (tuned == at::kFloat && (frozen == at::kBFloat16 || frozen == at::kHalf));
}

// The forward inputs (also the saved inputs of the backward). Returns the sizes.
// `low_precision_frozen`: the kernel also reads frozen tables of lower precision than the tuned
// one (bfloat16 / float16 / int8 row-quantised); otherwise both tables share one dtype.
inline GatedSizes check_gated_inputs(const at::Tensor& indices, const at::Tensor& frozen_weight,
                                     const at::Tensor& tuned_weight, const at::Tensor& logits,
                                     const std::optional<at::Tensor>& uniforms, double tau,
                                     c10::DeviceType expected, bool low_precision_frozen = false) {
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   "indices must be int32 or int64, got dtype ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1, "indices must be 1-D (N lookups) for the kernel op, got shape ",
                    indices.sizes());
  if (low_precision_frozen) {
    TORCH_CHECK_TYPE(is_table_dtype(frozen_weight.scalar_type()) || frozen_weight.scalar_type() == at::kChar,
                     "frozen_weight must be float32, bfloat16, float16 or int8, got dtype ",
                     frozen_weight.scalar_type());
  } else {
    TORCH_CHECK_TYPE(is_table_dtype(frozen_weight.scalar_type()),
                     "frozen_weight must be float32, bfloat16 or float16, got dtype ",
                     frozen_weight.scalar_type());
  }
  TORCH_CHECK_TYPE(is_table_dtype(tuned_weight.scalar_type()),
                   "tuned_weight must be float32, bfloat16 or float16, got dtype ",
                   tuned_weight.scalar_type());
  if (low_precision_frozen) {
    TORCH_CHECK_TYPE(is_frozen_dtype_for(frozen_weight.scalar_type(), tuned_weight.scalar_type()),
                     "frozen_weight must have the dtype of tuned_weight (", tuned_weight.scalar_type(),
                     ") or a lower precision (int8; bfloat16 or float16 under a float32 "
                     "tuned_weight), got dtype ", frozen_weight.scalar_type());
  } else {
    TORCH_CHECK_TYPE(tuned_weight.scalar_type() == frozen_weight.scalar_type(),
                     "tuned_weight must have the dtype of frozen_weight (", frozen_weight.scalar_type(),
                     "), got dtype ", tuned_weight.scalar_type(),
                     " (this kernel reads no lower-precision frozen table)");
  }
  TORCH_CHECK_VALUE(frozen_weight.dim() == 2, "frozen_weight must be a 2-D [V, D] table, got shape ",
                    frozen_weight.sizes());
  TORCH_CHECK_VALUE(tuned_weight.dim() == 2, "tuned_weight must be a 2-D [V, D] table, got shape ",
                    tuned_weight.sizes());
  const int64_t extra = frozen_weight.scalar_type() == at::kChar ? kInt8ExtraBytes : 0;
  TORCH_CHECK_VALUE(tuned_weight.size(0) == frozen_weight.size(0) &&
                        tuned_weight.size(1) + extra == frozen_weight.size(1),
                    "tuned_weight has shape ", tuned_weight.sizes(), " but frozen_weight has shape ",
                    frozen_weight.sizes(), "; the two tables must have the same [V, D] shape",
                    extra ? " (an int8 frozen table stores [V, D + 2]: D values, then the row's float16 scale)" : "");
  const int64_t N = indices.size(0);
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat, "logits must be float32, got dtype ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(logits.dim() == 2 && logits.size(0) == N && logits.size(1) == 2,
                    "logits must have shape [", N, ", 2] (indices.shape + (2,)), got shape ",
                    logits.sizes());
  if (uniforms.has_value()) {
    TORCH_CHECK_TYPE(uniforms->scalar_type() == at::kFloat, "uniforms must be float32, got dtype ",
                     uniforms->scalar_type());
    TORCH_CHECK_VALUE(uniforms->dim() == 1 && uniforms->size(0) == N, "uniforms must have shape [",
                      N, "] (indices.shape), got shape ", uniforms->sizes());
  }
  check_tau(tau);
  check_same_device(indices, "indices", indices, expected);
  check_same_device(frozen_weight, "frozen_weight", indices, expected);
  check_same_device(tuned_weight, "tuned_weight", indices, expected);
  check_same_device(logits, "logits", indices, expected);
  if (uniforms.has_value()) {
    check_same_device(*uniforms, "uniforms", indices, expected);
  }
  return GatedSizes{N, tuned_weight.size(0), tuned_weight.size(1)};
}

// The extra inputs of the backward.
inline void check_grad_inputs(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
                              const at::Tensor& indices, const at::Tensor& tuned_weight,
                              const GatedSizes& s, c10::DeviceType expected) {
  TORCH_CHECK_TYPE(grad_out.scalar_type() == tuned_weight.scalar_type() ||
                       grad_out.scalar_type() == at::kFloat,
                   "grad_out must have the dtype of tuned_weight (", tuned_weight.scalar_type(),
                   ") or float32, got dtype ", grad_out.scalar_type());
  TORCH_CHECK_VALUE(grad_out.dim() == 2 && grad_out.size(0) == s.N && grad_out.size(1) == s.D,
                    "grad_out must have shape [", s.N, ", ", s.D, "], got shape ", grad_out.sizes());
  check_same_device(grad_out, "grad_out", indices, expected);
  if (grad_gates.has_value()) {
    TORCH_CHECK_TYPE(grad_gates->scalar_type() == at::kFloat, "grad_gates must be float32, got dtype ",
                     grad_gates->scalar_type());
    TORCH_CHECK_VALUE(grad_gates->dim() == 2 && grad_gates->size(0) == s.N && grad_gates->size(1) == 2,
                      "grad_gates must have shape [", s.N, ", 2], got shape ", grad_gates->sizes());
    check_same_device(*grad_gates, "grad_gates", indices, expected);
  }
}

// The fused optimizer's arguments of a kernel that updates rows in place (ops/interface.py
// _UPDATE_ARGS), checked alike by every backend: `weight` [V, D] contiguous, the rule's state
// tensors (rowwise_adagrad: state_a [V]; adam: state_a, state_b [V, D]) contiguous float32 on
// `expected`, the rule's index and the step count after this step.
inline void check_row_update(const at::Tensor& weight, const char* weight_name,
                             const at::Tensor& state_a, const at::Tensor& state_b, int64_t rule,
                             int64_t step, c10::DeviceType expected) {
  TORCH_CHECK_VALUE(rule >= 0 && rule <= 2, "rule must be 0 (sgd), 1 (rowwise_adagrad) or 2 (adam), got rule = ", rule);
  TORCH_CHECK_VALUE(weight.is_contiguous(), weight_name, " must be contiguous (its rows are updated in place)");
  TORCH_CHECK_VALUE(step >= 1, "step must be >= 1 (the step count after this step), got step = ", step);
  const int64_t V = weight.dim() == 2 ? weight.size(0) : 0;
  const int64_t D = weight.dim() == 2 ? weight.size(1) : 0;
  auto check_state = [&](const at::Tensor& t, const char* name, std::vector<int64_t> shape) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, name, " must be float32, got dtype ", t.scalar_type());
    TORCH_CHECK_VALUE(t.is_contiguous() && t.sizes() == at::IntArrayRef(shape), name,
                      " must be a contiguous float32 tensor of shape ", at::IntArrayRef(shape),
                      ", got shape ", t.sizes());
    // The device itself, not only its type: a state on another GPU than the table would
    // be read through the wrong device's pointer.
    TORCH_CHECK(t.device().type() == expected && t.device() == weight.device(), name,
                " must be on the device of ", weight_name, " (", weight.device(), "), got ",
                t.device());
  };
  if (rule == 1) {
    check_state(state_a, "state_a", {V});
  } else if (rule == 2) {
    check_state(state_a, "state_a", {V, D});
    check_state(state_b, "state_b", {V, D});
  }
}

// The inputs of a rows_update kernel (one float32 gradient row per lookup): returns
// {N, V, D} after checking indices [N] (int32 / int64), values [N, D] float32 and weight
// [V, D] of a table dtype, all on `expected`.
inline GatedSizes check_rows_update_inputs(const at::Tensor& indices, const at::Tensor& values,
                                           const at::Tensor& weight, c10::DeviceType expected) {
  TORCH_CHECK_VALUE(weight.dim() == 2, "weight must be [V, D], got shape ", weight.sizes());
  TORCH_CHECK_TYPE(is_table_dtype(weight.scalar_type()),
                   "weight must be float32, bfloat16 or float16, got dtype ", weight.scalar_type());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt || indices.scalar_type() == at::kLong,
                   "indices must be int32 or int64, got dtype ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 1, "indices must be 1-D, got shape ", indices.sizes());
  const GatedSizes s{indices.size(0), weight.size(0), weight.size(1)};
  TORCH_CHECK_TYPE(values.scalar_type() == at::kFloat, "values must be float32, got dtype ",
                   values.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 2 && values.size(0) == s.N && values.size(1) == s.D,
                    "values must be [N, D] = [", s.N, ", ", s.D,
                    "] (one gradient row per index), got shape ", values.sizes());
  check_same_device(weight, "weight", weight, expected);
  check_same_device(indices, "indices", weight, expected);
  check_same_device(values, "values", weight, expected);
  return s;
}

// The rule's float32 hyperparameters as the kernels use them: Adam's bias corrections folded
// into one step size, -lr sqrt(1 - beta2^step) / (1 - beta1^step), formed in double.
struct RuleHyper {
  float lr, eps, one_minus_beta1, one_minus_beta2, neg_step_size;
};

inline RuleHyper rule_hyper(double lr, double eps, double beta1, double beta2, int64_t step) {
  RuleHyper h;
  h.lr = static_cast<float>(lr);
  h.eps = static_cast<float>(eps);
  h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  h.neg_step_size = static_cast<float>(-(lr * std::sqrt(bc2) / bc1));
  return h;
}

// The 63-bit seed travels as a 0-dim int64 CPU tensor (so that torch.compile can trace it);
// read it only when the kernel actually draws noise.
inline uint64_t read_seed(const at::Tensor& seed) {
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, "seed must be an int64 tensor, got dtype ",
                   seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1, "seed must hold one value, got shape ", seed.sizes());
  TORCH_CHECK(seed.device().is_cpu(), "seed must be a CPU tensor, got a tensor on ", seed.device());
  const int64_t value = seed.item<int64_t>();
  TORCH_CHECK_VALUE(value >= 0, "seed must be a non-negative 63-bit integer, got seed = ", value);
  return static_cast<uint64_t>(value);
}

// The noise source of a call: the seed is read only when the kernel draws noise, and
// `uniforms_c` keeps a contiguous copy of the uniforms alive for as long as the kernel runs.
inline NoiseSource make_noise_source(const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
                                     bool noise, at::Tensor& uniforms_c) {
  NoiseSource src{noise, 0, nullptr};
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

[[noreturn]] inline void throw_index_out_of_range(int64_t position, int64_t value, int64_t V) {
  TORCH_CHECK_INDEX(false, "indices[", position, "] = ", value,
                    " is out of range for a table of ", V, " rows");
  // TORCH_CHECK_INDEX(false, ...) always throws; this keeps [[noreturn]] honest for the compiler.
  throw std::logic_error("unreachable");
}

// Calls f with a value of the table's C++ type (float, c10::BFloat16 or c10::Half); the
// dtype list was checked before. Shared by the CPU and CUDA host code.
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

// Calls f with a value of the index type (int64_t or int32_t; checked before).
template <typename F>
void dispatch_index(at::ScalarType t, F&& f) {
  if (t == at::kLong) {
    f(int64_t{});
  } else {
    f(int32_t{});
  }
}


// The bag op's inputs as its CPU and CUDA kernels read them, after the argument checks they
// share: dtypes and shapes of values, offsets and per_sample_weights, the mode (0 sum, 1 mean:
// interface.BAG_MODES), and the gated op's checks with the B bags as its lookups; the tensors
// made contiguous, the offsets int64, the noise source read. The data checks (offsets in order,
// values in range) follow in each kernel, where its device can run them.
constexpr int64_t kModeMean = 1;  // interface.BAG_MODES = ("sum", "mean")

struct BagInputs {
  at::Tensor values, offsets, weights, frozen, tuned, logits, uniforms_c;
  NoiseSource src;
  GatedSizes s;  // N = B (bags)
  int64_t L;
};

inline BagInputs prepare_bag_inputs(const at::Tensor& values, const at::Tensor& offsets,
                                    const std::optional<at::Tensor>& weights,
                                    const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
                                    const at::Tensor& logits, const at::Tensor& seed,
                                    const std::optional<at::Tensor>& uniforms, double tau,
                                    bool noise, int64_t mode, c10::DeviceType expected,
                                    bool low_precision_frozen) {
  TORCH_CHECK_TYPE(values.scalar_type() == at::kLong || values.scalar_type() == at::kInt,
                   "values must be int32 or int64, got dtype ", values.scalar_type());
  TORCH_CHECK_TYPE(offsets.scalar_type() == at::kLong || offsets.scalar_type() == at::kInt,
                   "offsets must be int32 or int64, got dtype ", offsets.scalar_type());
  TORCH_CHECK_VALUE(values.dim() == 1, "values must be 1-D, got shape ", values.sizes());
  TORCH_CHECK_VALUE(offsets.dim() == 1 && offsets.size(0) >= 1,
                    "offsets must be 1-D with B + 1 entries, got shape ", offsets.sizes());
  TORCH_CHECK_VALUE(mode == 0 || mode == kModeMean, "mode must be 0 (sum) or 1 (mean), got mode = ",
                    mode);
  const int64_t B = offsets.size(0) - 1;
  BagInputs in;
  in.s = check_gated_inputs(values.new_empty({B}), frozen_weight, tuned_weight, logits, uniforms,
                            tau, expected, low_precision_frozen);
  check_same_device(values, "values", offsets, expected);
  check_same_device(offsets, "offsets", values, expected);
  in.L = values.size(0);
  if (weights.has_value()) {
    TORCH_CHECK_TYPE(weights->scalar_type() == at::kFloat,
                     "per_sample_weights must be float32, got dtype ", weights->scalar_type());
    TORCH_CHECK_VALUE(weights->dim() == 1 && weights->size(0) == in.L,
                      "per_sample_weights must have the shape of values [", in.L,
                      "], got shape ", weights->sizes());
    check_same_device(*weights, "per_sample_weights", values, expected);
    in.weights = weights->contiguous();
  }
  in.values = values.contiguous();
  in.offsets = offsets.to(at::kLong).contiguous();
  in.frozen = frozen_weight.contiguous();
  in.tuned = tuned_weight.contiguous();
  in.logits = logits.contiguous();
  in.src = make_noise_source(seed, uniforms, noise, in.uniforms_c);
  return in;
}

}  // namespace autoft
