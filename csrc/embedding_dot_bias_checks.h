// The argument checks of embedding_dot_bias_forward and embedding_dot_bias_backward, one set for
// the CUDA kernels (csrc/embedding_dot_bias_op.cpp) and the CPU kernels
// (csrc/cpu/embedding_dot_bias.cpp): the same errors, each naming the argument, on either device.
// Indices are never range-checked here (that would read them on the host, a sync on a GPU): the
// kernels check every index they read.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "checks.h"
#include "fastcore5.h"

namespace fastcore5 {

namespace edb_detail {

inline void check_table(const char* op, c10::DeviceType device_type, const char* name, const at::Tensor& t,
                        const char* ref_name, const at::Tensor& ref) {
  check_device_type(op, name, t, device_type);
  check_floating(op, name, t);
  check_dim(op, name, t, 2);
  check_like(op, name, t, ref_name, ref);
}

inline void check_bias(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                       const at::Tensor& ref, int64_t rows) {
  check_like(op, name, t, ref_name, ref);
  if (!(t.dim() == 1 || (t.dim() == 2 && t.size(1) == 1))) {
    fail(ArgError::kValue, op, ": ", name, " must have shape (n,) or (n, 1), got ", t.sizes());
  }
  if (t.size(0) != rows) fail(ArgError::kValue, op, ": ", name, " has ", t.size(0), " rows but its embedding table has ", rows);
}

}  // namespace edb_detail

// The optional y_range of both ops, as the kernels take it.
struct YRange {
  bool given;
  double lo, hi;
};

inline YRange check_y_range(const char* op, const std::optional<double>& y_lo, const std::optional<double>& y_hi) {
  if (y_lo.has_value() != y_hi.has_value()) fail(ArgError::kValue, op, ": y_lo and y_hi must both be given or both be None");
  return {y_lo.has_value(), y_lo.value_or(0.0), y_hi.value_or(0.0)};
}

inline YRange check_forward_arguments(const char* op, c10::DeviceType device_type, const at::Tensor& users,
                                      const at::Tensor& items, const at::Tensor& u_weight, const at::Tensor& i_weight,
                                      const at::Tensor& u_bias, const at::Tensor& i_bias,
                                      const std::optional<double>& y_lo, const std::optional<double>& y_hi,
                                      const std::optional<at::Tensor>& index_errors) {
  check_index(op, "users", users, device_type);
  check_index(op, "items", items, device_type);
  if (users.size(0) != items.size(0)) {
    fail(ArgError::kValue, op, ": users has ", users.size(0), " entries but items has ", items.size(0));
  }
  edb_detail::check_table(op, device_type, "u_weight", u_weight, "u_weight", u_weight);
  edb_detail::check_table(op, device_type, "i_weight", i_weight, "u_weight", u_weight);
  if (users.device() != u_weight.device() || items.device() != u_weight.device()) {
    fail(ArgError::kRuntime, op, ": users and items must be on the tables' device ", u_weight.device());
  }
  if (u_weight.size(1) != i_weight.size(1)) {
    fail(ArgError::kValue, op, ": u_weight has ", u_weight.size(1), " factors but i_weight has ", i_weight.size(1));
  }
  edb_detail::check_bias(op, "u_bias", u_bias, "u_weight", u_weight, u_weight.size(0));
  edb_detail::check_bias(op, "i_bias", i_bias, "u_weight", u_weight, i_weight.size(0));
  const YRange range = check_y_range(op, y_lo, y_hi);
  if (index_errors.has_value()) {
    const at::Tensor& errors = *index_errors;
    if (errors.scalar_type() != at::kLong) {
      fail(ArgError::kType, op, ": index_errors has dtype ", errors.scalar_type(), "; expected int64");
    }
    if (errors.device() != u_weight.device()) {
      fail(ArgError::kRuntime, op, ": index_errors is on ", errors.device(), " but the tables are on ", u_weight.device());
    }
    if (errors.dim() != 1 || errors.size(0) != kIndexErrorSlots || !errors.is_contiguous()) {
      fail(ArgError::kValue, op, ": index_errors must be a contiguous (", int64_t{kIndexErrorSlots},
           ",) tensor, got shape ", errors.sizes(), " and strides ", errors.strides());
    }
  }
  return range;
}

// What the backward's checks establish: the y_range, the batch and the factor count.
struct BackwardShape {
  YRange range;
  int64_t batch, factors;
};

inline BackwardShape check_backward_arguments(
    const char* op, c10::DeviceType device_type, const at::Tensor& grad_out, const at::Tensor& users,
    const at::Tensor& items, const std::optional<at::Tensor>& u_weight, const std::optional<at::Tensor>& i_weight,
    const std::optional<at::Tensor>& u_bias, const std::optional<at::Tensor>& i_bias, int64_t num_users,
    int64_t num_items, const std::optional<double>& y_lo, const std::optional<double>& y_hi, bool need_u_weight,
    bool need_i_weight) {
  check_device_type(op, "grad_out", grad_out, device_type);
  check_floating(op, "grad_out", grad_out);
  check_dim(op, "grad_out", grad_out, 1);
  check_index(op, "users", users, device_type);
  check_index(op, "items", items, device_type);
  const int64_t B = users.size(0);
  if (items.size(0) != B || grad_out.size(0) != B) {
    fail(ArgError::kValue, op, ": users, items and grad_out must have one entry per sample, got ", B, ", ",
         items.size(0), " and ", grad_out.size(0));
  }
  if (users.device() != grad_out.device() || items.device() != grad_out.device()) {
    fail(ArgError::kRuntime, op, ": users and items must be on grad_out's device ", grad_out.device());
  }
  if (num_users < 0 || num_items < 0) {
    fail(ArgError::kValue, op, ": num_users and num_items must be >= 0, got ", num_users, " and ", num_items);
  }
  const YRange range = check_y_range(op, y_lo, y_hi);
  if (need_u_weight && !i_weight.has_value()) fail(ArgError::kValue, op, ": i_weight is needed for the gradient of u_weight");
  if (need_i_weight && !u_weight.has_value()) fail(ArgError::kValue, op, ": u_weight is needed for the gradient of i_weight");
  if (range.given && !(u_weight.has_value() && i_weight.has_value() && u_bias.has_value() && i_bias.has_value())) {
    fail(ArgError::kValue, op, ": with a y_range all four tables are needed to recompute the score");
  }
  if (u_weight.has_value()) {
    edb_detail::check_table(op, device_type, "u_weight", *u_weight, "grad_out", grad_out);
    if (u_weight->size(0) != num_users) {
      fail(ArgError::kValue, op, ": u_weight has ", u_weight->size(0), " rows but num_users is ", num_users);
    }
  }
  if (i_weight.has_value()) {
    edb_detail::check_table(op, device_type, "i_weight", *i_weight, "grad_out", grad_out);
    if (i_weight->size(0) != num_items) {
      fail(ArgError::kValue, op, ": i_weight has ", i_weight->size(0), " rows but num_items is ", num_items);
    }
  }
  if (u_weight.has_value() && i_weight.has_value() && u_weight->size(1) != i_weight->size(1)) {
    fail(ArgError::kValue, op, ": u_weight has ", u_weight->size(1), " factors but i_weight has ", i_weight->size(1));
  }
  if (u_bias.has_value()) edb_detail::check_bias(op, "u_bias", *u_bias, "grad_out", grad_out, num_users);
  if (i_bias.has_value()) edb_detail::check_bias(op, "i_bias", *i_bias, "grad_out", grad_out, num_items);
  const int64_t D = u_weight.has_value() ? u_weight->size(1) : i_weight.has_value() ? i_weight->size(1) : 0;
  return {range, B, D};
}

}  // namespace fastcore5
