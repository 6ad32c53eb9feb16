// The CPU kernel of sgd_sparse_step: torch.optim.SGD's update of params whose gradient is a sparse
// COO tensor with one sparse dimension (nn.Embedding(sparse=True), embedding_dot_bias(sparse=True)),
// given as its uncoalesced indices (nnz,) and values (nnz, *param.shape[1:]), row by row, without
// forming a dense gradient. fastcore5/ops/sgd_sparse.py calls it; bench/NOTES.md ("A sparse
// gradient with a row-wise SGD step") has the design and its measurements.
//
// torch.optim.SGD's semantics, which this matches (checked on torch 2.13): the gradient's
// duplicates add up (coalescing); without momentum only the rows the gradient holds move. With
// momentum torch keeps a *sparse* buffer: the first step's buffer is the gradient (rows it holds),
// each later step scales every stored row (buf.mul_(momentum)) and adds (1 - dampening)*grad, and
// the param moves by the whole buffer, so a row with no gradient this step keeps moving by its
// decaying buffer. Here the buffer is dense (0 where torch stores nothing, which moves nothing):
// every row is stepped, rows the gradient holds by the dense kernel's formula (sgd_update.h,
// apply), the others by apply_absent. Decoupled weight decay scales every row; L2 weight decay is
// refused (torch refuses it too: add(sparse, dense)).
//
// Determinism: each param's indices are grouped by row, batch order kept within a row (a counting
// sort, or a sort by (row, position) when the table is much larger than the batch), on the calling
// thread; then at::parallel_for hands each thread whole rows, and a row's duplicates are summed in
// batch order in the accumulation type (fp32, fp64 for fp64) before one update. The result is
// bitwise identical for any thread count and any run. Torch's coalesce may add the duplicates in
// another order, so against torch the values agree within rounding (exactly in fp64 in the tests'
// small integers, to a few ulps otherwise).
//
// Bad input: every index is checked against the param's rows while grouping, for all params of
// the call, before anything is written (IndexError naming indices[i]). A raised found_inf or
// skip_flag (the GradScaler's overflow, an EmbeddingDotBias bad-index flag) returns first,
// writing nothing and checking no index: a batch with a bad index leaves one in its gradient.
// With a grad_scale the row sums are divided by it; the sparse values are not written back.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../sgd_checks.h"
#include "sgd_update.h"

namespace fastcore5 {
namespace cpu_sgd {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

constexpr const char* kOp = "fastcore5_native::sgd_sparse_step";
// Elements per thread at least (at::internal::GRAIN_SIZE's 32k, as torch's CPU loops): below it a
// fork and join costs more than the rows.
constexpr int64_t kGrainElements = 32768;
// A counting sort costs a pass over the table's rows; past this many rows per index a sort by
// (row, position), O(nnz log nnz), is the cheaper grouping.
constexpr int64_t kCountingSortRowsPerIndex = 16;
constexpr int64_t kPrefetchGroupsAhead = 4;  // held rows between a prefetch of their rows and their update

// One param's gradient grouped by row: rows[k] is the k-th distinct row (ascending) and its
// entries are order[begin[k] .. begin[k + 1]), positions into the values in batch order.
struct RowGroups {
  std::vector<int64_t> rows, begin, order;
};

std::string indexed(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

[[noreturn]] void fail_bad_index(size_t param, int64_t position, int64_t index, int64_t rows) {
  fail(ArgError::kIndex, kOp, ": ", indexed("indices", param), " holds ", index, " at position ", position,
       ", outside the ", rows, " rows of ", indexed("params", param));
}

RowGroups group_by_row(const int64_t* index, int64_t nnz, int64_t rows, size_t param) {
  RowGroups g;
  g.order.resize(nnz);
  if (rows <= kCountingSortRowsPerIndex * nnz) {
    std::vector<int64_t> start(rows + 1, 0);
    for (const auto k : c10::irange(nnz)) {
      const int64_t r = index[k];
      if (r < 0 || r >= rows) fail_bad_index(param, k, r, rows);
      ++start[r + 1];
    }
    for (const auto r : c10::irange(rows)) {
      if (start[r + 1] != 0) {
        g.rows.push_back(r);
        g.begin.push_back(start[r]);
      }
      start[r + 1] += start[r];
    }
    for (const auto k : c10::irange(nnz)) g.order[start[index[k]]++] = k;  // ascending k: batch order
  } else {
    std::vector<std::pair<int64_t, int64_t>> keyed(nnz);
    for (const auto k : c10::irange(nnz)) {
      const int64_t r = index[k];
      if (r < 0 || r >= rows) fail_bad_index(param, k, r, rows);
      keyed[k] = {r, k};
    }
    std::sort(keyed.begin(), keyed.end());
    for (const auto k : c10::irange(nnz)) {
      if (k == 0 || keyed[k].first != keyed[k - 1].first) {
        g.rows.push_back(keyed[k].first);
        g.begin.push_back(k);
      }
      g.order[k] = keyed[k].second;
    }
  }
  g.begin.push_back(nnz);
  return g;
}

// Up to AccVec::size() elements of a row as a vector of the accumulation type, and back.
template <typename scalar_t>
struct RowIO {
  using acc_t = at::opmath_type<scalar_t>;
  using AccVec = at::vec::Vectorized<acc_t>;

  static AccVec load(const scalar_t* ptr, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return count == AccVec::size() ? AccVec::loadu(ptr) : AccVec::loadu(ptr, count);
    } else {
      return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::Vectorized<scalar_t>::loadu(ptr, count)));
    }
  }

  static void store(const AccVec& v, scalar_t* ptr, int64_t count) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      v.store(ptr, count);
    } else {
      at::vec::convert_from_float<scalar_t>(v, AccVec(0)).store(ptr, count);
    }
  }
};

// One param: p and buf (nullptr without momentum) of rows x D elements, values of nnz x D.
template <typename scalar_t>
struct SparseParam {
  scalar_t* p;
  scalar_t* buf;
  const scalar_t* values;
  int64_t rows, D;
  RowGroups groups;
};

// Row r's update, D elements in vectors; ``group`` is its entry in the RowGroups, or -1 when the
// gradient does not hold it.
template <typename scalar_t>
void step_row(const SparseParam<scalar_t>& sp, int64_t r, int64_t group, const Update<at::opmath_type<scalar_t>>& u) {
  using IO = RowIO<scalar_t>;
  using AccVec = typename IO::AccVec;
  scalar_t* p = sp.p + r * sp.D;
  scalar_t* buf = sp.buf == nullptr ? nullptr : sp.buf + r * sp.D;
  const bool read_buf = u.has_momentum && !u.first_step;
  for (int64_t d = 0; d < sp.D; d += AccVec::size()) {
    const int64_t count = std::min<int64_t>(AccVec::size(), sp.D - d);
    AccVec pv = IO::load(p + d, count);
    AccVec bv = read_buf ? IO::load(buf + d, count) : AccVec(0);
    if (group >= 0) {
      const int64_t* position = sp.groups.order.data() + sp.groups.begin[group];
      const int64_t* last = sp.groups.order.data() + sp.groups.begin[group + 1];
      AccVec gv = IO::load(sp.values + *position * sp.D + d, count);
      for (++position; position != last; ++position) gv = gv + IO::load(sp.values + *position * sp.D + d, count);
      u.apply(pv, gv, bv);
    } else {
      u.apply_absent(pv, bv);
    }
    IO::store(pv, p + d, count);
    if (u.has_momentum) IO::store(bv, buf + d, count);
  }
}

void prefetch_bytes(const void* start, int64_t bytes) {
  const char* first = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(first + offset);
}

// The value rows of held row ``k`` (scattered over the batch: the sort made their reads random)
// and, when ``with_param``, its param and buffer rows, asked for ahead of their use.
template <typename scalar_t>
void prefetch_group(const SparseParam<scalar_t>& sp, int64_t k, bool with_param) {
  const int64_t row_bytes = sp.D * static_cast<int64_t>(sizeof(scalar_t));
  const int64_t* order = sp.groups.order.data();
  for (int64_t j = sp.groups.begin[k]; j < sp.groups.begin[k + 1]; ++j) {
    prefetch_bytes(sp.values + order[j] * sp.D, row_bytes);
  }
  if (with_param) {
    const int64_t r = sp.groups.rows[k];
    prefetch_bytes(sp.p + r * sp.D, row_bytes);
    if (sp.buf != nullptr) prefetch_bytes(sp.buf + r * sp.D, row_bytes);
  }
}

template <typename scalar_t>
void step_param(const SparseParam<scalar_t>& sp, const Update<at::opmath_type<scalar_t>>& u) {
  const int64_t held = static_cast<int64_t>(sp.groups.rows.size());
  const int64_t D = std::max<int64_t>(sp.D, 1);
  const int64_t grain = std::max<int64_t>(1, kGrainElements / D);
  if (!u.has_momentum && !(u.has_weight_decay && u.decoupled)) {
    // Only the rows the gradient holds move.
    at::parallel_for(0, held, grain, [&](int64_t begin, int64_t end) {
      for (const auto k : c10::irange(begin, end)) {
        if (k + kPrefetchGroupsAhead < end) prefetch_group(sp, k + kPrefetchGroupsAhead, true);
        step_row(sp, sp.groups.rows[k], k, u);
      }
    });
    return;
  }
  // Every row moves: a thread takes a range of rows (read in order) and walks the held ones alongside.
  at::parallel_for(0, sp.rows, grain, [&](int64_t begin, int64_t end) {
    const auto& rows = sp.groups.rows;
    int64_t k = std::lower_bound(rows.begin(), rows.end(), begin) - rows.begin();
    for (const auto r : c10::irange(begin, end)) {
      const bool is_held = k < held && rows[k] == r;
      if (is_held) {
        if (k + kPrefetchGroupsAhead < held) prefetch_group(sp, k + kPrefetchGroupsAhead, false);
        step_row(sp, r, k, u);
        ++k;
      } else {
        step_row(sp, r, -1, u);
      }
    }
  });
}

void check_arguments(at::TensorList params, at::TensorList indices, at::TensorList values,
                     at::TensorList momentum_buffers, bool has_momentum, double weight_decay,
                     bool decoupled_weight_decay, const OptionalTensor& lr_tensor, const OptionalTensor& grad_scale,
                     const OptionalTensor& found_inf, const OptionalTensor& skip_flag) {
  const c10::DeviceType cpu = c10::DeviceType::CPU;
  if (indices.size() != params.size() || values.size() != params.size()) {
    fail(ArgError::kValue, kOp, ": got ", params.size(), " params but ", indices.size(), " indices and ",
         values.size(), " values");
  }
  if (has_momentum && momentum_buffers.size() != params.size()) {
    fail(ArgError::kValue, kOp, ": got ", params.size(), " params but ", momentum_buffers.size(), " momentum_buffers");
  }
  if (weight_decay != 0.0 && !decoupled_weight_decay) {
    fail(ArgError::kValue, kOp, ": weight_decay=", std::to_string(weight_decay),
         " (L2, added to the gradient) needs the dense param in a sparse gradient; torch.optim.SGD refuses this too. "
         "Use weight_decay=0 or decoupled_weight_decay=True");
  }
  const Tensor& first = params[0];
  check_device_type(kOp, "params[0]", first, cpu);
  check_floating(kOp, "params[0]", first);
  for (const auto i : c10::irange(params.size())) {
    const Tensor& p = params[i];
    const std::string p_name = indexed("params", i);
    check_device_type(kOp, p_name, p, cpu);
    check_like(kOp, p_name, p, "params[0]", first);
    if (p.dim() < 1 || !p.is_contiguous()) {
      fail(ArgError::kValue, kOp, ": ", p_name, " must be contiguous with at least one dimension, got shape ",
           p.sizes(), " and strides ", p.strides());
    }
    const std::string i_name = indexed("indices", i);
    check_device_type(kOp, i_name, indices[i], cpu);
    check_dim(kOp, i_name, indices[i], 1);
    if (indices[i].scalar_type() != at::kLong) {
      fail(ArgError::kType, kOp, ": ", i_name, " has dtype ", indices[i].scalar_type(), "; expected int64");
    }
    const std::string v_name = indexed("values", i);
    check_device_type(kOp, v_name, values[i], cpu);
    check_like(kOp, v_name, values[i], "params[0]", first);
    std::vector<int64_t> value_shape{indices[i].size(0)};
    value_shape.insert(value_shape.end(), p.sizes().begin() + 1, p.sizes().end());
    if (values[i].sizes() != at::IntArrayRef(value_shape)) {
      fail(ArgError::kValue, kOp, ": ", v_name, " must have shape ", at::IntArrayRef(value_shape),
           " (one row of ", p_name, " per index), got ", values[i].sizes());
    }
    if (has_momentum) {
      const Tensor& b = momentum_buffers[i];
      const std::string b_name = indexed("momentum_buffers", i);
      check_device_type(kOp, b_name, b, cpu);
      check_like(kOp, b_name, b, "params[0]", first);
      if (b.sizes() != p.sizes() || !b.is_contiguous()) {
        fail(ArgError::kValue, kOp, ": ", b_name, " must be contiguous with the shape of ", p_name, " ", p.sizes(),
             ", got shape ", b.sizes(), " and strides ", b.strides());
      }
    }
  }
  sgd_detail::check_scalar_tensor(kOp, "lr_tensor", lr_tensor, first);
  sgd_detail::check_scalar_tensor(kOp, "grad_scale", grad_scale, first);
  sgd_detail::check_scalar_tensor(kOp, "found_inf", found_inf, first);
  sgd_detail::check_skip_flag(kOp, skip_flag, first);
}

void sgd_sparse_step_cpu(at::TensorList params, at::TensorList indices, at::TensorList values,
                         at::TensorList momentum_buffers, const OptionalTensor& lr_tensor, double lr, double momentum,
                         double dampening, double weight_decay, bool nesterov, bool maximize,
                         bool decoupled_weight_decay, bool first_step, const OptionalTensor& grad_scale,
                         const OptionalTensor& found_inf, const OptionalTensor& skip_flag) {
  if (params.empty()) return;
  const bool has_momentum = momentum != 0.0;
  check_arguments(params, indices, values, momentum_buffers, has_momentum, weight_decay, decoupled_weight_decay,
                  lr_tensor, grad_scale, found_inf, skip_flag);
  if (found_inf.has_value() && read_scalar(*found_inf) != 0.0) return;
  if (skip_flag.has_value() && *skip_flag->const_data_ptr<int64_t>() != 0) return;
  const double lr_value = lr_tensor.has_value() ? read_scalar(*lr_tensor) : lr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_sparse_step", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    // Every param's indices are checked (while grouped) before the first write.
    std::vector<Tensor> kept;  // contiguous copies of strided inputs, alive while stepping
    std::vector<SparseParam<scalar_t>> stepped;
    stepped.reserve(params.size());
    for (const auto i : c10::irange(params.size())) {
      const Tensor index = indices[i].contiguous(), value = values[i].contiguous();
      kept.push_back(index);
      kept.push_back(value);
      const int64_t rows = params[i].size(0);
      const int64_t D = rows == 0 ? 0 : params[i].numel() / rows;
      stepped.push_back({params[i].data_ptr<scalar_t>(),
                         has_momentum ? momentum_buffers[i].data_ptr<scalar_t>() : nullptr,
                         value.const_data_ptr<scalar_t>(), rows, D,
                         group_by_row(index.const_data_ptr<int64_t>(), index.numel(), rows, i)});
    }
    const Update<acc_t> update = make_update<acc_t>(lr_value, momentum, dampening, weight_decay, nesterov, maximize,
                                                    decoupled_weight_decay, first_step, grad_scale);
    for (const auto& sp : stepped) {
      if (sp.D > 0) step_param(sp, update);
    }
  });
}

}  // namespace
}  // namespace cpu_sgd
}  // namespace fastcore5

TORCH_LIBRARY_IMPL(fastcore5_native, CPU, m) {
  m.impl("sgd_sparse_step", &fastcore5::cpu_sgd::sgd_sparse_step_cpu);
}
