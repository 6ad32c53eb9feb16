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
// Work and determinism: on the calling thread, each param's entries are counted per block of
// 2^k rows (an L2-sized block of row sums) and copied, in one sequential pass over the values, into
// per-block buckets, batch order kept within each; then at::parallel_for hands each thread whole
// blocks: it sums each row's duplicates in batch order in the accumulation type (fp32, fp64 for
// fp64) and steps the block's rows in order. No value row or table row is read at random (the
// first version, a counting sort by row that then gathered the values, was latency-bound: NOTES).
// The result is bitwise identical for any thread count and any run. Torch's coalesce may add the
// duplicates in another order, so against torch the values agree within rounding. The buckets live
// in a scratch buffer (nnz x (8 + row bytes)) from the CPU outputs' cache (new_cpu_scratch), which
// keeps it between steps, so a step does not fault in fresh pages.
//
// Bad input: every index is checked against the param's rows while counting, for all params of
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
#include <c10/util/llvmMathExtras.h>
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
// A block of rows whose gradient sums (in the accumulation type) fill about this many bytes: the
// sums of one block stay in L2 while its entries are added.
constexpr int64_t kBlockBytes = 256 * 1024;

std::string indexed(const char* list, size_t i) { return std::string(list) + "[" + std::to_string(i) + "]"; }

[[noreturn]] void fail_bad_index(size_t param, int64_t position, int64_t index, int64_t rows) {
  fail(ArgError::kIndex, kOp, ": ", indexed("indices", param), " holds ", index, " at position ", position,
       ", outside the ", rows, " rows of ", indexed("params", param));
}

// One param: p and buf (nullptr without momentum) of rows x D elements, its gradient's nnz entries
// (index, values of nnz x D) and their grouping by block of 2^block_shift rows (a shift, not a
// division, per entry): block b holds begin[b + 1] - begin[b] entries.
template <typename scalar_t>
struct SparseParam {
  scalar_t* p;
  scalar_t* buf;
  const int64_t* index;
  const scalar_t* values;
  int64_t rows, D, nnz, block_shift, block_rows;
  std::vector<int64_t> begin;
};

// Counts the entries of each block, checking every index (before anything is written).
template <typename scalar_t>
void count_blocks(SparseParam<scalar_t>& sp, size_t param) {
  const int64_t blocks = (sp.rows + sp.block_rows - 1) / sp.block_rows;
  sp.begin.assign(blocks + 1, 0);
  for (const auto k : c10::irange(sp.nnz)) {
    const int64_t r = sp.index[k];
    if (r < 0 || r >= sp.rows) fail_bad_index(param, k, r, sp.rows);
    ++sp.begin[(r >> sp.block_shift) + 1];
  }
  for (const auto b : c10::irange(blocks)) sp.begin[b + 1] += sp.begin[b];
}

constexpr int64_t kPrefetchRowsAhead = 4;

void prefetch_bytes(const void* start, int64_t bytes) {
  const char* first = static_cast<const char*>(start);
  for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(first + offset, 1);
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

// One row's update over D elements: by its summed gradient ``grad``, or as a row the gradient does
// not hold when ``grad`` is nullptr.
template <typename scalar_t>
void step_row(scalar_t* p, scalar_t* buf, const at::opmath_type<scalar_t>* grad, int64_t D,
              const Update<at::opmath_type<scalar_t>>& u) {
  using IO = RowIO<scalar_t>;
  using AccVec = typename IO::AccVec;
  const bool read_buf = u.has_momentum && !u.first_step;
  for (int64_t d = 0; d < D; d += AccVec::size()) {
    const int64_t count = std::min<int64_t>(AccVec::size(), D - d);
    AccVec pv = IO::load(p + d, count);
    AccVec bv = read_buf ? IO::load(buf + d, count) : AccVec(0);
    if (grad != nullptr) {
      AccVec gv = AccVec::loadu(grad + d, count);
      u.apply(pv, gv, bv);
    } else {
      u.apply_absent(pv, bv);
    }
    IO::store(pv, p + d, count);
    if (u.has_momentum) IO::store(bv, buf + d, count);
  }
}

// The step of one param. The entries are first copied, in one sequential pass over the values, into
// per-block buckets (batch order kept within each); then threads take whole blocks: a block's
// entries are summed per row in an L2-resident buffer (first value copied, the next ones added, in
// batch order) and the block's rows are stepped in order. Every read of the values and of the table
// is sequential or within L2; the only scattered accesses are the bucket writes, one stream per block.
template <typename scalar_t>
void step_param(const SparseParam<scalar_t>& sp, const Update<at::opmath_type<scalar_t>>& u) {
  using acc_t = at::opmath_type<scalar_t>;
  using AccVec = at::vec::Vectorized<acc_t>;
  const int64_t D = sp.D, blocks = static_cast<int64_t>(sp.begin.size()) - 1;
  const Tensor scratch = new_cpu_scratch(sp.nnz * static_cast<int64_t>(sizeof(int64_t) + D * sizeof(scalar_t)));
  auto* bucket_rows = static_cast<int64_t*>(scratch.mutable_data_ptr());
  auto* bucket_values = reinterpret_cast<scalar_t*>(bucket_rows + sp.nnz);
  {
    std::vector<int64_t> next(sp.begin.begin(), sp.begin.end() - 1);
    for (const auto k : c10::irange(sp.nnz)) {
      const int64_t r = sp.index[k], slot = next[r >> sp.block_shift]++;
      bucket_rows[slot] = r;
      std::copy_n(sp.values + k * D, D, bucket_values + slot * D);
    }
  }
  const bool every_row_moves = u.has_momentum || (u.has_weight_decay && u.decoupled);
  at::parallel_for(0, blocks, 1, [&](int64_t first_block, int64_t end_block) {
    std::vector<acc_t> sums(sp.block_rows * D);
    std::vector<uint8_t> held(sp.block_rows);
    for (const auto b : c10::irange(first_block, end_block)) {
      const int64_t r0 = b * sp.block_rows, block_rows = std::min(sp.block_rows, sp.rows - r0);
      if (!every_row_moves && sp.begin[b] == sp.begin[b + 1]) continue;
      std::fill_n(held.begin(), block_rows, uint8_t{0});
      for (int64_t s = sp.begin[b]; s < sp.begin[b + 1]; ++s) {
        const int64_t local = bucket_rows[s] - r0;
        acc_t* sum = sums.data() + local * D;
        const scalar_t* value = bucket_values + s * D;
        for (int64_t d = 0; d < D; d += AccVec::size()) {
          const int64_t count = std::min<int64_t>(AccVec::size(), D - d);
          AccVec v = RowIO<scalar_t>::load(value + d, count);
          if (held[local]) v = v + AccVec::loadu(sum + d, count);
          v.store(sum + d, count);
        }
        held[local] = 1;
      }
      // Without momentum only the held rows are read, with gaps the hardware prefetcher does not
      // follow: ask for each a few held rows ahead (rows of a cache line or more; smaller rows,
      // a bias table's, share lines and gain nothing from it).
      const bool prefetch = !every_row_moves && D * static_cast<int64_t>(sizeof(scalar_t)) >= 64;
      int64_t ahead = 0;
      auto prefetch_next_held = [&] {
        while (ahead < block_rows && !held[ahead]) ++ahead;
        if (ahead < block_rows) prefetch_bytes(sp.p + (r0 + ahead) * D, D * static_cast<int64_t>(sizeof(scalar_t)));
        ++ahead;
      };
      if (prefetch) {
        for (int64_t i = 0; i < kPrefetchRowsAhead; ++i) prefetch_next_held();
      }
      for (const auto local : c10::irange(block_rows)) {
        if (!held[local] && !every_row_moves) continue;
        if (prefetch) prefetch_next_held();
        const int64_t r = r0 + local;
        step_row(sp.p + r * D, sp.buf == nullptr ? nullptr : sp.buf + r * D,
                 held[local] ? sums.data() + local * D : nullptr, D, u);
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
    // Every param's indices are checked (while counted) before the first write.
    std::vector<Tensor> kept;  // contiguous copies of strided inputs, alive while stepping
    std::vector<SparseParam<scalar_t>> stepped(params.size());
    for (const auto i : c10::irange(params.size())) {
      const Tensor index = indices[i].contiguous(), value = values[i].contiguous();
      kept.push_back(index);
      kept.push_back(value);
      SparseParam<scalar_t>& sp = stepped[i];
      sp.p = params[i].data_ptr<scalar_t>();
      sp.buf = has_momentum ? momentum_buffers[i].data_ptr<scalar_t>() : nullptr;
      sp.index = index.const_data_ptr<int64_t>();
      sp.values = value.const_data_ptr<scalar_t>();
      sp.rows = params[i].size(0);
      sp.D = sp.rows == 0 ? 0 : params[i].numel() / sp.rows;
      sp.nnz = index.numel();
      const int64_t fitting_rows = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(1, sp.D * sizeof(acc_t)));
      sp.block_shift = 63 - c10::llvm::countLeadingZeros(static_cast<uint64_t>(fitting_rows));
      sp.block_rows = int64_t{1} << sp.block_shift;
      count_blocks(sp, i);
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
