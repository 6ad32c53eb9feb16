// The CPU kernels of embedding_dot_bias_forward and embedding_dot_bias_backward: the contract of
// csrc/embedding_dot_bias_op.cpp (argument checks shared through embedding_dot_bias_checks.h) on
// CPU tensors. fp32 accumulation for fp32/bf16/fp16 tables, fp64 for fp64; any strides.
//
// Bad indices. Every index is checked where it is read: a sample whose user or item lies outside
// its table reads nothing, scores NaN and contributes no gradient (its sparse values are 0). The
// forward records what it saw in ``index_errors`` (layout in fastcore5.h) as the CUDA kernel
// does, in the same pass over the batch: no separate min/max over the indices.
//
// Forward: one at::parallel_for over the batch; per sample the two rows are gathered (prefetched
// a few samples ahead: the gathers are the cost), dotted with at::vec::Vectorized, the two biases
// added; the optional sigmoid range is applied to a vector of samples at once. Nothing of shape
// (B, D) is stored.
//
// Backward, with coef[b] = grad_out[b] * d out[b] / d res[b] (res recomputed from the tables
// when there is a y_range, so the forward saves nothing):
//   grad_U[r] = sum_{b: u_b = r} coef[b] * V[i_b]      grad_ub[r] = sum_{b: u_b = r} coef[b]
// and the same for the items. One pass over the batch forms coef (and, for sparse gradients,
// writes nn.Embedding(sparse=True)'s per-sample values, which ends the backward). Each dense
// table gradient is then one at::parallel_for over the table's rows: a thread takes a range of
// rows, picks the samples that fall in it (in batch order) and groups them by row with a stable
// counting sort, then writes every row of its range exactly once: zeros for a row no sample
// touched (runs of them in one memset), otherwise the row's sum, its samples added in batch
// order. So the gradient is written once (the zero-fill is fused with the writes, no scatter),
// no two threads write the same row, and every sum is taken in an order fixed by the batch
// alone: the results are bitwise identical for any thread count and any run, with or without
// torch.use_deterministic_algorithms (the ``deterministic`` argument changes nothing here).
// bf16/fp16 gradients are rounded once, from the fp32 sum.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "../checks.h"
#include "../embedding_dot_bias_checks.h"

namespace fastcore5 {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

constexpr int64_t kSampleGrain = 512;  // samples: smaller batches run on one thread
constexpr int64_t kRowGrain = 1024;    // gradient rows per thread at least
constexpr int64_t kPrefetchAhead = 8;  // samples between a row's prefetch and its use
constexpr int64_t kCacheLine = 64;
constexpr int64_t kBlockRows = 2048;  // rows per block of the backward's sort: an L1-sized histogram

// A sample of the backward's row pass: its row (relative to the thread's first row), its index
// in the batch and its partner row.
struct Entry {
  int64_t row, sample, partner;
};

void exclusive_prefix_sum(std::vector<int64_t>& counts) {
  int64_t total = 0;
  for (int64_t& count : counts) {
    const int64_t here = count;
    count = total;
    total += here;
  }
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Vec::size() elements from ``src`` as acc_t lanes. The hot loops run whole vectors and finish a
// row's last D % Vec::size() columns in scalar code: a partial at::vec load or store goes through
// a memcpy, which cost more than the few scalar columns.
template <typename scalar_t, typename Vec = at::vec::Vectorized<acc_type<scalar_t>>>
inline Vec load_lanes(const scalar_t* src) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    return Vec::loadu(src);
  } else {
    Vec lanes;
    at::vec::load_to_float(src, lanes);
    return lanes;
  }
}

// ``lanes`` rounded to scalar_t, stored at ``dst`` (Vec::size() elements).
template <typename scalar_t, typename Vec = at::vec::Vectorized<acc_type<scalar_t>>>
inline void store_lanes(scalar_t* dst, const Vec& lanes) {
  if constexpr (std::is_same_v<scalar_t, acc_type<scalar_t>>) {
    lanes.store(dst);
  } else {
    at::vec::convert_from_float<scalar_t>(lanes, lanes).store(dst, Vec::size());
  }
}

// dst[0:D] = scale * src[0:D] (rounded to scalar_t), or zeros when src is null.
template <typename scalar_t>
void write_scaled(scalar_t* dst, const scalar_t* src, acc_type<scalar_t> scale, int64_t D) {
  using Vec = at::vec::Vectorized<acc_type<scalar_t>>;
  if (src == nullptr) {
    std::memset(dst, 0, D * sizeof(scalar_t));
    return;
  }
  int64_t d = 0;
  for (; d + Vec::size() <= D; d += Vec::size()) store_lanes(dst + d, Vec(scale) * load_lanes(src + d));
  for (; d < D; ++d) dst[d] = static_cast<scalar_t>(scale * static_cast<acc_type<scalar_t>>(src[d]));
}

// An index tensor (int32 or int64, any stride) read as int64.
struct Indices {
  const void* data;
  int64_t stride;
  bool is_long;

  explicit Indices(const Tensor& t) : data(t.data_ptr()), stride(t.stride(0)), is_long(t.scalar_type() == at::kLong) {}

  int64_t operator[](int64_t b) const {
    return is_long ? static_cast<const int64_t*>(data)[b * stride] : static_cast<const int32_t*>(data)[b * stride];
  }
};

// An (n, D) table at any strides, or a bias table (one element per row at stride(0)).
template <typename scalar_t>
struct Table {
  const scalar_t* data = nullptr;
  int64_t rows = 0, row_stride = 0, col_stride = 1;

  Table() = default;
  explicit Table(const Tensor& t)
      : data(t.const_data_ptr<scalar_t>()), rows(t.size(0)), row_stride(t.stride(0)),
        col_stride(t.dim() == 2 ? t.stride(1) : 1) {}

  bool contains(int64_t r) const { return 0 <= r && r < rows; }

  // Row r as D contiguous elements: in place when its columns are contiguous, else copied into
  // ``scratch`` (D elements).
  const scalar_t* row(int64_t r, int64_t D, scalar_t* scratch) const {
    const scalar_t* start = data + r * row_stride;
    if (col_stride == 1) return start;
    for (int64_t d = 0; d < D; ++d) scratch[d] = start[d * col_stride];
    return scratch;
  }

  acc_type<scalar_t> bias(int64_t r) const { return static_cast<acc_type<scalar_t>>(data[r * row_stride]); }

  void prefetch_row(int64_t r, int64_t D) const {
    if (data == nullptr || col_stride != 1) return;
    const char* start = reinterpret_cast<const char*>(data + r * row_stride);
    for (int64_t offset = 0; offset < D * static_cast<int64_t>(sizeof(scalar_t)); offset += kCacheLine) {
      __builtin_prefetch(start + offset);
    }
  }
};

template <typename scalar_t>
acc_type<scalar_t> dot(const scalar_t* a, const scalar_t* b, int64_t D) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  Vec sum(0);
  int64_t d = 0;
  for (; d + Vec::size() <= D; d += Vec::size()) sum = at::vec::fmadd(load_lanes(a + d), load_lanes(b + d), sum);
  acc_t total = at::vec::vec_reduce_all([](Vec& x, Vec& y) { return x + y; }, sum);
  for (; d < D; ++d) total += static_cast<acc_t>(a[d]) * static_cast<acc_t>(b[d]);
  return total;
}

// dot() for rows of kVectors whole vectors plus ``tail`` (< one vector) elements, fp32/fp64 rows
// read in place: straight-line code (the tail a masked load). The forward is bound by how many
// samples' row loads the core keeps in flight, and a loop with a scalar tail per sample made its
// window hold half as many samples as torch.compile's unrolled loop (perf: 84% of the time on
// the row loads, 2x compile's time at ML-25M).
template <int kVectors, typename acc_t>
acc_t dot_unrolled(const acc_t* a, const acc_t* b, int64_t tail) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec sum = Vec::loadu(a) * Vec::loadu(b);
  for (int k = 1; k < kVectors; ++k) sum = at::vec::fmadd(Vec::loadu(a + k * Vec::size()), Vec::loadu(b + k * Vec::size()), sum);
  if (tail > 0) sum = at::vec::fmadd(Vec::loadu(a + kVectors * Vec::size(), tail), Vec::loadu(b + kVectors * Vec::size(), tail), sum);
  return at::vec::vec_reduce_all([](Vec& x, Vec& y) { return x + y; }, sum);
}

// Calls run(std::integral_constant<int, K>{}) for the K in 1..kMaxVectors equal to ``vectors``;
// false if there is none.
constexpr int kMaxVectors = 8;
template <typename Run, int... K>
bool with_vector_count(int64_t vectors, Run&& run, std::integer_sequence<int, K...>) {
  return ((vectors == K + 1 ? (run(std::integral_constant<int, K + 1>{}), true) : false) || ...);
}

// The four tables of one call and what is done with the score.
template <typename scalar_t>
struct Model {
  using acc_t = acc_type<scalar_t>;
  Table<scalar_t> users_table, items_table, users_bias, items_bias;
  int64_t D;
  bool has_range;
  acc_t lo, hi;

  acc_t score(int64_t u, int64_t i, scalar_t* scratch) const {
    return dot(users_table.row(u, D, scratch), items_table.row(i, D, scratch + D), D) + users_bias.bias(u) +
           items_bias.bias(i);
  }

  static acc_t sigmoid(acc_t res) { return acc_t(1) / (acc_t(1) + std::exp(-res)); }

  // grad * d out / d res at the score res (y_range only).
  acc_t coefficient_from_score(acc_t grad, acc_t res) const {
    const acc_t squashed = sigmoid(res);
    return grad * (hi - lo) * (squashed * (acc_t(1) - squashed));
  }

  // grad * d out / d res, with res recomputed when there is a y_range.
  acc_t coefficient(acc_t grad, int64_t u, int64_t i, scalar_t* scratch) const {
    return has_range ? coefficient_from_score(grad, score(u, i, scratch)) : grad;
  }

  void prefetch_sample(int64_t u, int64_t i) const {
    if (users_table.contains(u)) users_table.prefetch_row(u, D);
    if (items_table.contains(i)) items_table.prefetch_row(i, D);
  }
};

// One table's bad indices seen by one thread: the section of the index-error flag it adds to.
struct BadIndices {
  int64_t count = 0, most_negative = 0, largest = 0;

  void add(int64_t index) {
    ++count;
    if (index < 0) {
      most_negative = std::min(most_negative, index);
    } else {
      largest = std::max(largest, index);
    }
  }

  // Adds this record to the flag section at ``slots`` (count, most negative, largest, rows).
  void merge_into(int64_t* slots, int64_t rows) const {
    if (count == 0) return;
    slots[0] += count;
    slots[1] = std::min(slots[1], most_negative);
    slots[2] = std::max(slots[2], largest);
    slots[3] = std::max(slots[3], rows);
  }
};

void record_bad_indices(const Tensor& index_errors, const BadIndices& users, int64_t n_users,
                        const BadIndices& items, int64_t n_items) {
  // Taken only by a thread that saw a bad index; the flag may be shared by concurrent calls.
  static std::mutex flag_mutex;
  const std::lock_guard<std::mutex> lock(flag_mutex);
  int64_t* flag = index_errors.data_ptr<int64_t>();
  flag[0] += users.count + items.count;
  users.merge_into(flag + 1, n_users);
  items.merge_into(flag + 5, n_items);
}

// The sigmoid range of a score, lane-wise: sigmoid(res) * (hi - lo) + lo.
template <typename scalar_t, typename Vec = at::vec::Vectorized<acc_type<scalar_t>>>
inline Vec squash(const Model<scalar_t>& model, const Vec& res) {
  const Vec one(1);
  return one / (one + res.neg().exp()) * Vec(model.hi - model.lo) + Vec(model.lo);
}

// Samples go in blocks of one vector's lanes: each sample's rows are gathered and dotted on its
// own, then the block's y_range is applied as one vector (a scalar expf and divide per sample cost
// more than the dot itself at ML-100k sizes: perf put 60% of the forward there). A thread's last
// block is padded and every lane goes through the same vector code, so a sample's output does not
// depend on where its thread's range begins: the same bits for any thread count. ``row_dot(u, i,
// scratch)`` is the dot of the two rows.
template <typename scalar_t, typename RowDot>
void forward_blocks(const Model<scalar_t>& model, const Indices& users, const Indices& items, int64_t B,
                    scalar_t* out, const Tensor& index_errors, bool prefetch, const RowDot& row_dot) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t kLanes = Vec::size();
  const bool record = index_errors.defined();
  const bool strided = model.users_table.col_stride != 1 || model.items_table.col_stride != 1;
  at::parallel_for(0, B, kSampleGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(strided ? 2 * model.D : 0);
    BadIndices bad_users, bad_items;
    __at_align__ acc_t scores[kLanes] = {};
    for (int64_t block = begin; block < end; block += kLanes) {
      const int64_t lanes = std::min(kLanes, end - block);
      for (int64_t lane = 0; lane < lanes; ++lane) {
        const int64_t b = block + lane;
        if (prefetch && b + kPrefetchAhead < end) model.prefetch_sample(users[b + kPrefetchAhead], items[b + kPrefetchAhead]);
        const int64_t u = users[b], i = items[b];
        const bool user_ok = model.users_table.contains(u), item_ok = model.items_table.contains(i);
        if (user_ok && item_ok) {
          scores[lane] = row_dot(u, i, scratch.data()) + model.users_bias.bias(u) + model.items_bias.bias(i);
        } else {
          if (!user_ok) bad_users.add(u);
          if (!item_ok) bad_items.add(i);
          scores[lane] = std::numeric_limits<acc_t>::quiet_NaN();
        }
      }
      if (model.has_range) squash(model, Vec::loadu(scores)).store(scores);
      for (int64_t lane = 0; lane < lanes; ++lane) out[block + lane] = static_cast<scalar_t>(scores[lane]);
    }
    if (record && (bad_users.count > 0 || bad_items.count > 0)) {
      record_bad_indices(index_errors, bad_users, model.users_table.rows, bad_items, model.items_table.rows);
    }
  });
}

// fp32/fp64 tables with contiguous rows of at most kMaxVectors vectors take the unrolled dot
// without software prefetch (with it, ML-25M measured 10% slower: the straight-line loop keeps
// enough rows in flight by itself); the rest take the general dot and the prefetch.
template <typename scalar_t>
void forward_kernel(const Model<scalar_t>& model, const Indices& users, const Indices& items, int64_t B,
                    scalar_t* out, const Tensor& index_errors) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kLanes = at::vec::Vectorized<acc_t>::size();
  const bool contiguous_rows = model.users_table.col_stride == 1 && model.items_table.col_stride == 1;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const int64_t tail = model.D % kLanes;
    const auto unrolled = [&](auto vectors) {
      forward_blocks(model, users, items, B, out, index_errors, false, [&](int64_t u, int64_t i, scalar_t*) {
        return dot_unrolled<decltype(vectors)::value>(model.users_table.data + u * model.users_table.row_stride,
                                                      model.items_table.data + i * model.items_table.row_stride, tail);
      });
    };
    if (contiguous_rows && with_vector_count(model.D / kLanes, unrolled, std::make_integer_sequence<int, kMaxVectors>{})) {
      return;
    }
  }
  forward_blocks(model, users, items, B, out, index_errors, true, [&](int64_t u, int64_t i, scalar_t* scratch) {
    return dot(model.users_table.row(u, model.D, scratch), model.items_table.row(i, model.D, scratch + model.D), model.D);
  });
}

// The sparse backward: nn.Embedding(sparse=True)'s per-sample COO values, written for each output
// that is given (contiguous (B, D) / (B,); zeros for a sample with a bad index).
template <typename scalar_t>
void per_sample_kernel(const Model<scalar_t>& model, const Tensor& grad_out, const Indices& users,
                       const Indices& items, int64_t B, scalar_t* values_uw, scalar_t* values_iw, scalar_t* values_ub,
                       scalar_t* values_ib) {
  using acc_t = acc_type<scalar_t>;
  const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
  const int64_t grad_stride = grad_out.stride(0), D = model.D;
  const bool reads_rows = model.has_range || values_uw != nullptr || values_iw != nullptr;
  const bool strided = model.users_table.col_stride != 1 || model.items_table.col_stride != 1;
  at::parallel_for(0, B, kSampleGrain, [&](int64_t begin, int64_t end) {
    std::vector<scalar_t> scratch(strided ? 4 * D : 0);
    for (int64_t b = begin; b < end; ++b) {
      if (reads_rows && b + kPrefetchAhead < end) {
        model.prefetch_sample(users[b + kPrefetchAhead], items[b + kPrefetchAhead]);
      }
      const int64_t u = users[b], i = items[b];
      const bool ok = model.users_table.contains(u) && model.items_table.contains(i);
      const acc_t c = ok ? model.coefficient(static_cast<acc_t>(grad[b * grad_stride]), u, i, scratch.data()) : acc_t(0);
      if (values_ub != nullptr) values_ub[b] = static_cast<scalar_t>(c);
      if (values_ib != nullptr) values_ib[b] = static_cast<scalar_t>(c);
      if (values_uw != nullptr) {
        write_scaled(values_uw + b * D, ok ? model.items_table.row(i, D, scratch.data() + 2 * D) : nullptr, c, D);
      }
      if (values_iw != nullptr) {
        write_scaled(values_iw + b * D, ok ? model.users_table.row(u, D, scratch.data() + 3 * D) : nullptr, c, D);
      }
    }
  });
}

// One table's dense gradients (grad_w (n, D) and grad_b (n,), contiguous; either may be null), n
// the rows of the table that ``keys`` index (the users' or the items'): row r gets the sum over the
// samples b with keys[b] == r, in batch order, of coef[b] * partner_table[partners[b]] (and of
// coef[b]); a row without samples gets zeros; samples with a bad key or partner are left out. See
// the file comment for why this is bitwise reproducible. With ``compute_coef`` the pass forms
// coef[b] itself (from grad_out and, with a y_range, the score: the own row is read once per
// row, the partner row is read anyway) and writes it to ``coef`` for the other table's pass;
// else it reads ``coef``.
template <typename scalar_t>
void row_sums_kernel(const Model<scalar_t>& model, bool keys_are_users, const Indices& keys, const Indices& partners,
                     int64_t B, const Tensor& grad_out, bool compute_coef, acc_type<scalar_t>* coef,
                     scalar_t* grad_w, scalar_t* grad_b) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const Table<scalar_t>& own_table = keys_are_users ? model.users_table : model.items_table;
  const Table<scalar_t>& partner_table = keys_are_users ? model.items_table : model.users_table;
  const int64_t n = own_table.rows, D = model.D;
  const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
  const int64_t grad_stride = grad_out.stride(0);
  const bool reads_partner_rows = grad_w != nullptr || (compute_coef && model.has_range);
  // Rows first .. first + range_rows - 1, their samples in ``order`` (by row, batch order within a
  // row), ends[k] the end of row first + k's samples in it: each row written once.
  const auto write_rows = [&](int64_t first, int64_t range_rows, const std::vector<int64_t>& ends,
                              const std::vector<Entry>& order) {
    const int64_t in_range = static_cast<int64_t>(order.size());
    // The row's running sum, padded to whole vectors (the padding lanes are never stored).
    const int64_t full = D - D % Vec::size();
    std::vector<acc_t> sum(grad_w != nullptr ? D : 0);
    std::vector<scalar_t> scratch(partner_table.col_stride != 1 || own_table.col_stride != 1 ? 2 * D : 0);
    int64_t k = 0;
    while (k < range_rows) {
      const int64_t begin = k == 0 ? 0 : ends[k - 1], end = ends[k];
      if (begin == end) {  // a run of rows no sample touched: zeros, in one go
        int64_t run_end = k + 1;
        while (run_end < range_rows && ends[run_end] == end) ++run_end;
        if (grad_w != nullptr) std::memset(grad_w + (first + k) * D, 0, (run_end - k) * D * sizeof(scalar_t));
        if (grad_b != nullptr) std::memset(grad_b + first + k, 0, (run_end - k) * sizeof(scalar_t));
        k = run_end;
        continue;
      }
      const int64_t r = first + k;
      const scalar_t* own_row = compute_coef && model.has_range ? own_table.row(r, D, scratch.data() + D) : nullptr;
      acc_t bias_sum = 0;
      std::fill(sum.begin(), sum.end(), acc_t(0));
      for (int64_t p = begin; p < end; ++p) {
        const int64_t b = order[p].sample, partner = order[p].partner;
        // Ahead in the whole block, not only this row: most rows hold one or two samples.
        if (reads_partner_rows && p + kPrefetchAhead < in_range) {
          partner_table.prefetch_row(order[p + kPrefetchAhead].partner, D);
        }
        const scalar_t* row = reads_partner_rows ? partner_table.row(partner, D, scratch.data()) : nullptr;
        acc_t c;
        if (compute_coef) {
          c = static_cast<acc_t>(grad[b * grad_stride]);
          if (model.has_range) {
            const acc_t bias = keys_are_users ? model.users_bias.bias(r) + model.items_bias.bias(partner)
                                              : model.users_bias.bias(partner) + model.items_bias.bias(r);
            c = model.coefficient_from_score(c, dot(own_row, row, D) + bias);
          }
          if (coef != nullptr) coef[b] = c;
        } else {
          c = coef[b];
        }
        bias_sum += c;
        if (grad_w == nullptr) continue;
        int64_t d = 0;
        for (; d < full; d += Vec::size()) {
          at::vec::fmadd(Vec(c), load_lanes(row + d), Vec::loadu(sum.data() + d)).store(sum.data() + d);
        }
        for (; d < D; ++d) sum[d] += c * static_cast<acc_t>(row[d]);
      }
      if (grad_b != nullptr) grad_b[r] = static_cast<scalar_t>(bias_sum);
      if (grad_w != nullptr) {
        scalar_t* out = grad_w + r * D;
        int64_t d = 0;
        for (; d < full; d += Vec::size()) store_lanes(out + d, Vec::loadu(sum.data() + d));
        for (; d < D; ++d) out[d] = static_cast<scalar_t>(sum[d]);
      }
      ++k;
    }
  };
  at::parallel_for(0, n, kRowGrain, [&](int64_t first, int64_t last) {
    // This range's samples grouped by row, keeping batch order within a row, by a two-level
    // stable counting sort: into blocks of kBlockRows rows, then each block by row. One
    // histogram over the whole range would be too large for the cache (162k rows: 1.3 MB),
    // and its random increments cost more than the rest of the pass.
    const int64_t range_rows = last - first;
    std::vector<Entry> entries;
    for (int64_t b = 0; b < B; ++b) {
      const int64_t k = keys[b] - first;
      if (0 <= k && k < range_rows) {
        const int64_t partner = partners[b];
        if (partner_table.contains(partner)) entries.push_back({k, b, partner});
      }
    }
    const int64_t blocks = (range_rows + kBlockRows - 1) / kBlockRows;
    std::vector<int64_t> block_ends(blocks, 0);
    for (const Entry& e : entries) ++block_ends[e.row / kBlockRows];
    exclusive_prefix_sum(block_ends);
    std::vector<Entry> by_block(entries.size());
    for (const Entry& e : entries) by_block[block_ends[e.row / kBlockRows]++] = e;
    std::vector<Entry> order;
    std::vector<int64_t> ends;
    for (int64_t block = 0; block < blocks; ++block) {
      const int64_t block_first = block * kBlockRows, block_rows = std::min(kBlockRows, range_rows - block_first);
      const int64_t begin = block == 0 ? 0 : block_ends[block - 1], end = block_ends[block];
      ends.assign(block_rows, 0);
      for (int64_t p = begin; p < end; ++p) ++ends[by_block[p].row - block_first];
      exclusive_prefix_sum(ends);
      order.resize(end - begin);
      for (int64_t p = begin; p < end; ++p) order[ends[by_block[p].row - block_first]++] = by_block[p];
      write_rows(first + block_first, block_rows, ends, order);
    }
  });
}

template <typename scalar_t>
Model<scalar_t> make_model(const Tensor& u_weight, const Tensor& i_weight, const Tensor& u_bias,
                           const Tensor& i_bias, int64_t D, const YRange& range) {
  const auto table = [](const Tensor& t) { return t.defined() ? Table<scalar_t>(t) : Table<scalar_t>(); };
  using acc_t = acc_type<scalar_t>;
  return {table(u_weight), table(i_weight), table(u_bias), table(i_bias), D,
          range.given,    static_cast<acc_t>(range.lo), static_cast<acc_t>(range.hi)};
}

Tensor forward_cpu(const Tensor& users, const Tensor& items, const Tensor& u_weight, const Tensor& i_weight,
                   const Tensor& u_bias, const Tensor& i_bias, std::optional<double> y_lo, std::optional<double> y_hi,
                   const OptionalTensor& index_errors) {
  constexpr const char* op = "fastcore5_cuda::embedding_dot_bias_forward";
  const YRange range = check_forward_arguments(op, c10::DeviceType::CPU, users, items, u_weight, i_weight, u_bias,
                                               i_bias, y_lo, y_hi, index_errors);
  const int64_t B = users.size(0);
  Tensor out = new_output({B}, u_weight.options());
  if (B == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, u_weight.scalar_type(), "embedding_dot_bias_forward_cpu", [&] {
    const auto model = make_model<scalar_t>(u_weight, i_weight, u_bias, i_bias, u_weight.size(1), range);
    forward_kernel(model, Indices(users), Indices(items), B, out.mutable_data_ptr<scalar_t>(), or_undefined(index_errors));
  });
  return out;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& grad_out, const Tensor& users, const Tensor& items, const OptionalTensor& u_weight,
    const OptionalTensor& i_weight, const OptionalTensor& u_bias, const OptionalTensor& i_bias, int64_t num_users,
    int64_t num_items, std::optional<double> y_lo, std::optional<double> y_hi, bool need_u_weight,
    bool need_i_weight, bool need_u_bias, bool need_i_bias, bool /*deterministic: always*/, bool sparse) {
  constexpr const char* op = "fastcore5_cuda::embedding_dot_bias_backward";
  const BackwardShape shape = check_backward_arguments(op, c10::DeviceType::CPU, grad_out, users, items, u_weight,
                                                       i_weight, u_bias, i_bias, num_users, num_items, y_lo, y_hi,
                                                       need_u_weight, need_i_weight);
  const int64_t B = shape.batch, D = shape.factors;
  const auto options = grad_out.options();
  // Sparse: one value row per sample; dense: one gradient row per table row. An output not
  // asked for is an empty (0,) tensor.
  const auto output = [&](bool needed, int64_t table_rows, bool weight) {
    if (!needed) return at::empty({0}, options);
    const int64_t rows = sparse ? B : table_rows;
    return weight ? new_output({rows, D}, options) : new_output({rows}, options);
  };
  Tensor uw = output(need_u_weight, num_users, true), iw = output(need_i_weight, num_items, true);
  Tensor ub = output(need_u_bias, num_users, false), ib = output(need_i_bias, num_items, false);
  if (!(need_u_weight || need_i_weight || need_u_bias || need_i_bias)) return {uw, iw, ub, ib};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "embedding_dot_bias_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    // Rows of the tables that were not given are never read; their counts bound the indices.
    auto model = make_model<scalar_t>(or_undefined(u_weight), or_undefined(i_weight), or_undefined(u_bias),
                                      or_undefined(i_bias), D, shape.range);
    model.users_table.rows = num_users;
    model.items_table.rows = num_items;
    const auto data = [](bool needed, Tensor& t) { return needed ? t.mutable_data_ptr<scalar_t>() : nullptr; };
    const Indices user_indices(users), item_indices(items);
    if (sparse) {
      per_sample_kernel(model, grad_out, user_indices, item_indices, B, data(need_u_weight, uw),
                        data(need_i_weight, iw), data(need_u_bias, ub), data(need_i_bias, ib));
      return;
    }
    // The first table's pass forms coef; the second reads it.
    const bool users_pass = need_u_weight || need_u_bias, items_pass = need_i_weight || need_i_bias;
    std::unique_ptr<acc_t[]> coef(users_pass && items_pass ? new acc_t[B] : nullptr);
    if (users_pass) {
      row_sums_kernel(model, true, user_indices, item_indices, B, grad_out, true, coef.get(), data(need_u_weight, uw),
                      data(need_u_bias, ub));
    }
    if (items_pass) {
      row_sums_kernel(model, false, item_indices, user_indices, B, grad_out, !users_pass, coef.get(),
                      data(need_i_weight, iw), data(need_i_bias, ib));
    }
  });
  return {uw, iw, ub, ib};
}

}  // namespace
}  // namespace fastcore5

TORCH_LIBRARY_IMPL(fastcore5_cuda, CPU, m) {
  m.impl("embedding_dot_bias_forward", &fastcore5::forward_cpu);
  m.impl("embedding_dot_bias_backward", &fastcore5::backward_cpu);
}
