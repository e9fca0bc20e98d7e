// CPU implementations of autoft_fast::gated_embedding_fwd / gated_embedding_bwd (schemas in
// docs/internals.md). Declared here so the C++ tests and benchmarks can call them directly,
// without the Python-side schema registration.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace autoft {

std::tuple<at::Tensor, at::Tensor> gated_embedding_fwd_cpu(
    const at::Tensor& indices, const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise,
    bool sparse);

// Returns (grad_tuned, grad_logits, grad_rows); see docs/internals.md for the two modes.
std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_embedding_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& indices, const at::Tensor& frozen_weight, const at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, bool sparse);

// The backward with the fused optimizer's update of the touched tuned rows (in place, with the
// rule's state); returns grad_logits. See docs/internals.md.
at::Tensor gated_embedding_bwd_update_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates,
    const at::Tensor& indices, const at::Tensor& frozen_weight, at::Tensor& tuned_weight,
    const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& uniforms,
    double tau, bool hard, bool noise, at::Tensor& state_a, at::Tensor& state_b, int64_t rule,
    double lr, double eps, double beta1, double beta2, int64_t step);

// The bag op (multi-hot fields): bag b = values[offsets[b]:offsets[b + 1]], one gate per bag;
// mode 0 = sum, 1 = mean. The backward returns (grad_tuned, grad_logits, grad_rows) in the two
// layouts of gated_embedding_bwd_cpu. See docs/op-contract.md "Bags".
std::tuple<at::Tensor, at::Tensor> gated_embedding_bag_fwd_cpu(
    const at::Tensor& values, const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
    const at::Tensor& frozen_weight, const at::Tensor& tuned_weight, const at::Tensor& logits,
    const at::Tensor& seed, const std::optional<at::Tensor>& uniforms, double tau, bool hard, bool noise,
    int64_t mode, bool sparse);

std::tuple<at::Tensor, at::Tensor, at::Tensor> gated_embedding_bag_bwd_cpu(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_gates, const at::Tensor& values,
    const at::Tensor& offsets, const std::optional<at::Tensor>& per_sample_weights,
    const at::Tensor& frozen_weight, const at::Tensor& tuned_weight, const at::Tensor& logits,
    const at::Tensor& seed, const std::optional<at::Tensor>& uniforms, double tau, bool hard, bool noise,
    int64_t mode, bool sparse);

}  // namespace autoft
