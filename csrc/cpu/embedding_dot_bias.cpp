// The CPU kernels of embedding_dot_bias_forward and embedding_dot_bias_backward: the contract of
// csrc/embedding_dot_bias_op.cpp (argument checks shared through embedding_dot_bias_checks.h) on
// CPU tensors. fp32 accumulation for fp32/bf16/fp16 tables, fp64 for fp64; any strides.
//
// Bad indices. Every index is checked where it is read: a sample whose user or item lies outside
// its table reads nothing, scores NaN and contributes no gradient (its sparse values are 0). The
// forward records what it saw in ``index_errors`` (layout in fastcore5.h) as the CUDA kernel
// does, in the same pass over the batch: no separate min/max over the indices.
//
// Forward: one at::parallel_for over the batch; per sample the two rows are gathered (the
// gathers are the cost), dotted with at::vec::Vectorized, the two biases added; the optional
// sigmoid range is applied to a vector of samples at once. fp32/fp64 tables with contiguous rows
// of up to 8 vectors and indices of one type run two passes over each thread's samples (dots
// only, then biases and y_range: forward_two_passes); the rest one pass with software prefetch
// (forward_blocks). Both give the same bits. Nothing of shape (B, D) is stored.
//
// Backward, with coef[b] = grad_out[b] * d out[b] / d res[b] (res recomputed from the tables
// when there is a y_range; the autograd (csrc/embedding_dot_bias_autograd.cpp) passes no y_range
// for fp32/fp64, having formed coef from the saved output, so there this kernel reads grad_out as
// coef and recomputes nothing):
//   grad_U[r] = sum_{b: u_b = r} coef[b] * V[i_b]      grad_ub[r] = sum_{b: u_b = r} coef[b]
// and the same for the items. Sparse gradients: one pass over the batch forms coef and writes
// nn.Embedding(sparse=True)'s per-sample values. Dense gradients: a stable counting sort,
// parallel over fixed chunks of the batch, groups the samples by blocks of rows of each table
// (batch order within a block); then each table is one at::parallel_for over its blocks. A thread
// adds a block's samples, in batch order, into a zeroed buffer of the block's rows (sums in the
// accumulation type, L2-sized) and moves it to the gradient in one sequential write (non-temporal stores
// where it can): rows no sample touched come out as zeros, so the gradient is written once with
// the zero-fill fused, there is no scatter into the table, and no two threads write the same row.
// The items' pass goes first and forms coef (with a y_range it reads both rows of a sample; the
// items' own rows are the denser, nearly sequential ones); the users' pass reads coef. Every sum
// is taken in an order fixed by the batch alone: the results are bitwise identical for any
// thread count and any run, with or without torch.use_deterministic_algorithms (the
// ``deterministic`` argument changes nothing here).
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
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../checks.h"
#include "../embedding_dot_bias_checks.h"

namespace fastcore5 {
namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

constexpr int64_t kSampleGrain = 512;  // samples: smaller batches run on one thread
constexpr int64_t kPrefetchAhead = 8;  // samples between a row's prefetch and its use
constexpr int64_t kCacheLine = 64;
// The backward's blocks of gradient rows: at most kBlockBytes of fp32 sums (L2-resident), at
// least kMinBlockRows rows, and about kBlocksPerThread blocks per thread on small tables.
constexpr int64_t kBlockBytes = 256 * 1024;
constexpr int64_t kMinBlockRows = 16;
constexpr int64_t kBlocksPerThread = 4;
// Elements of work (samples' and rows' values) below which a block pass runs on the calling
// thread: waking a second thread costs more than it saves (the host benchmark's 32-sample batch
// took 7x eager's time with every pass forked).
constexpr int64_t kSerialWork = 64 * 1024;

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
// the row loads, 2x compile's time at ML-25M). The tail's masked loads run even when ``tail`` is
// 0 (they then load nothing and add zeros): with an ``if (tail > 0)`` around them the ML-25M
// forward's first pass took 1.24-1.29x as long (standalone copies, interleaved, 2026-12-04).
template <int kVectors, typename acc_t>
acc_t dot_unrolled(const acc_t* a, const acc_t* b, int64_t tail) {
  using Vec = at::vec::Vectorized<acc_t>;
  Vec sum = Vec::loadu(a) * Vec::loadu(b);
  for (int k = 1; k < kVectors; ++k) sum = at::vec::fmadd(Vec::loadu(a + k * Vec::size()), Vec::loadu(b + k * Vec::size()), sum);
  sum = at::vec::fmadd(Vec::loadu(a + kVectors * Vec::size(), tail), Vec::loadu(b + kVectors * Vec::size(), tail), sum);
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

// The forward of fp32/fp64 tables with contiguous rows of kVectors whole vectors plus a tail and
// indices of one type, in two passes over each thread's samples, as torch.compile's generated loop
// does: the first only gathers and dots the two rows (out[b] = the dot, NaN for a bad sample), the
// second adds the biases and applies the y_range to a vector of samples at a time. The first
// pass's loop body is short (two index loads, one bounds test, the row loads and FMAs), so the
// core keeps more samples' row loads in flight than in one pass that also loads biases and fills
// a lane buffer per sample. The sum is (dot + user bias) + item bias as in forward_blocks: the
// same bits as the one-pass loop.
template <int kVectors, typename scalar_t, typename index_t>
void forward_two_passes(const Model<scalar_t>& model, const index_t* users, int64_t user_stride, const index_t* items,
                        int64_t item_stride, int64_t B, scalar_t* out, const Tensor& index_errors) {
  using Vec = at::vec::Vectorized<scalar_t>;
  constexpr int64_t kLanes = Vec::size();
  const bool record = index_errors.defined();
  const int64_t tail = model.D % kLanes;
  at::parallel_for(0, B, kSampleGrain, [&](int64_t begin, int64_t end) {
    // Everything the loops read, copied to locals: read through the lambda's captured references,
    // each value was loaded again in every iteration of the first pass (when it also recorded
    // bad indices, whose stores to a local record the compiler let alias them).
    const Table<scalar_t> users_table = model.users_table, items_table = model.items_table;
    const Table<scalar_t> users_bias = model.users_bias, items_bias = model.items_bias;
    const index_t* const user_ids = users;
    const index_t* const item_ids = items;
    const int64_t user_step = user_stride, item_step = item_stride;
    scalar_t* const scores_out = out;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t u = user_ids[b * user_step], i = item_ids[b * item_step];
      scores_out[b] = C10_LIKELY(users_table.contains(u) && items_table.contains(i))
                          ? dot_unrolled<kVectors>(users_table.data + u * users_table.row_stride,
                                                   items_table.data + i * items_table.row_stride, tail)
                          : std::numeric_limits<scalar_t>::quiet_NaN();
    }
    // The bad indices are recorded here, not in the first pass: its loop keeps fewer values live.
    BadIndices bad_users, bad_items;
    __at_align__ scalar_t scores[kLanes] = {};
    for (int64_t block = begin; block < end; block += kLanes) {
      const int64_t lanes = std::min(kLanes, end - block);
      for (int64_t lane = 0; lane < lanes; ++lane) {
        const int64_t b = block + lane, u = user_ids[b * user_step], i = item_ids[b * item_step];
        const bool user_ok = users_table.contains(u), item_ok = items_table.contains(i);
        if (C10_LIKELY(user_ok && item_ok)) {
          scores[lane] = scores_out[b] + users_bias.bias(u) + items_bias.bias(i);
        } else {
          if (!user_ok) bad_users.add(u);
          if (!item_ok) bad_items.add(i);
          scores[lane] = scores_out[b];
        }
      }
      if (model.has_range) squash(model, Vec::loadu(scores)).store(scores);
      for (int64_t lane = 0; lane < lanes; ++lane) scores_out[block + lane] = scores[lane];
    }
    if (record && (bad_users.count > 0 || bad_items.count > 0)) {
      record_bad_indices(index_errors, bad_users, users_table.rows, bad_items, items_table.rows);
    }
  });
}

// fp32/fp64 tables with contiguous rows of at most kMaxVectors vectors take the unrolled dot
// without software prefetch (with it, ML-25M measured 10% slower: the straight-line loop keeps
// enough rows in flight by itself), in two passes when both index tensors have one type (one
// instantiation per index type; mixed types, rare, take the one-pass loop); the rest take the
// general dot and the prefetch.
template <typename scalar_t>
void forward_kernel(const Model<scalar_t>& model, const Indices& users, const Indices& items, int64_t B,
                    scalar_t* out, const Tensor& index_errors) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t kLanes = at::vec::Vectorized<acc_t>::size();
  const bool contiguous_rows = model.users_table.col_stride == 1 && model.items_table.col_stride == 1;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    const int64_t tail = model.D % kLanes;
    if (contiguous_rows && users.is_long == items.is_long) {
      const auto two_passes = [&](auto vectors) {
        constexpr int kVectors = decltype(vectors)::value;
        if (users.is_long) {
          forward_two_passes<kVectors>(model, static_cast<const int64_t*>(users.data), users.stride,
                                       static_cast<const int64_t*>(items.data), items.stride, B, out, index_errors);
        } else {
          forward_two_passes<kVectors>(model, static_cast<const int32_t*>(users.data), users.stride,
                                       static_cast<const int32_t*>(items.data), items.stride, B, out, index_errors);
        }
      };
      if (with_vector_count(model.D / kLanes, two_passes, std::make_integer_sequence<int, kMaxVectors>{})) return;
    }
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

// The samples of a batch grouped by blocks of rows of one table: entries[block_ends[k - 1] ..
// block_ends[k]) are the samples whose key (their row of this table) lies in block k (rows
// k * block_rows .. (k + 1) * block_rows - 1), in batch order. Samples with a bad user or item
// are left out. index_t is int32 when every row and sample number fits (12-byte entries).
template <typename index_t>
struct Buckets {
  struct Entry {
    index_t key, partner, sample;
  };
  int64_t rows = 0, block_shift = 0, blocks = 0;
  std::unique_ptr<Entry[]> entries;
  std::vector<int64_t> block_ends;

  // Blocks of a power of two rows whose fp32 gradient fits in kBlockBytes (the block's sums stay
  // in L2 while its samples are added), small enough to give every thread a few blocks.
  Buckets(int64_t table_rows, int64_t row_bytes, int64_t threads) : rows(table_rows) {
    const int64_t by_cache = std::max<int64_t>(1, kBlockBytes / std::max<int64_t>(row_bytes, 1));
    const int64_t by_threads = std::max<int64_t>(1, table_rows / (kBlocksPerThread * threads));
    const int64_t wanted = std::max<int64_t>(kMinBlockRows, std::min(by_cache, by_threads));
    while ((int64_t{2} << block_shift) <= wanted) ++block_shift;
    blocks = (table_rows + (int64_t{1} << block_shift) - 1) >> block_shift;
    block_ends.assign(blocks, 0);
  }

  int64_t block_rows() const { return int64_t{1} << block_shift; }
  int64_t block_of(int64_t key) const { return key >> block_shift; }
  int64_t block_begin(int64_t block) const { return block == 0 ? 0 : block_ends[block - 1]; }
};

// Groups the batch's valid samples by block for the users' and/or the items' table (a null
// ``Buckets`` is skipped): a stable counting sort, parallel over fixed chunks of the batch (a count
// per chunk and block, then each chunk places its samples after those of earlier chunks), so the
// entries come out in batch order within each block for any thread count.
template <typename index_t>
void bucket_samples(const Indices& users, const Indices& items, int64_t B, int64_t n_users, int64_t n_items,
                    Buckets<index_t>* by_user, Buckets<index_t>* by_item) {
  const int64_t user_blocks = by_user != nullptr ? by_user->blocks : 0;
  const int64_t item_blocks = by_item != nullptr ? by_item->blocks : 0;
  const int64_t width = user_blocks + item_blocks;
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B / kSampleGrain));
  // positions[chunk * width + block]: the chunk's count in the block, then where its next entry goes.
  std::vector<int64_t> positions(chunks * width, 0);
  const auto for_valid_samples = [&](int64_t chunk, const auto& visit) {
    for (int64_t b = B * chunk / chunks, end = B * (chunk + 1) / chunks; b < end; ++b) {
      const int64_t u = users[b], i = items[b];
      if (0 <= u && u < n_users && 0 <= i && i < n_items) visit(b, u, i);
    }
  };
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      int64_t* counts = positions.data() + chunk * width;
      for_valid_samples(chunk, [&](int64_t, int64_t u, int64_t i) {
        if (by_user != nullptr) ++counts[by_user->block_of(u)];
        if (by_item != nullptr) ++counts[user_blocks + by_item->block_of(i)];
      });
    }
  });
  const auto place = [&](Buckets<index_t>* buckets, int64_t column) {
    if (buckets == nullptr) return;
    int64_t total = 0;
    for (int64_t block = 0; block < buckets->blocks; ++block) {
      for (int64_t chunk = 0; chunk < chunks; ++chunk) {
        int64_t& slot = positions[chunk * width + column + block];
        const int64_t count = slot;
        slot = total;
        total += count;
      }
      buckets->block_ends[block] = total;
    }
    buckets->entries.reset(new typename Buckets<index_t>::Entry[total]);
  };
  place(by_user, 0);
  place(by_item, user_blocks);
  at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
      int64_t* next = positions.data() + chunk * width;
      for_valid_samples(chunk, [&](int64_t b, int64_t u, int64_t i) {
        const auto sample = static_cast<index_t>(b);
        if (by_user != nullptr) {
          by_user->entries[next[by_user->block_of(u)]++] = {static_cast<index_t>(u), static_cast<index_t>(i), sample};
        }
        if (by_item != nullptr) {
          by_item->entries[next[user_blocks + by_item->block_of(i)]++] = {static_cast<index_t>(i),
                                                                          static_cast<index_t>(u), sample};
        }
      });
    }
  });
}

// dst[0:count] = src[0:count] rounded to scalar_t, and src[0:count] = 0. fp32 destinations that
// are 64-byte aligned get non-temporal stores (AVX-512): the gradient is written once and not
// read back by this pass, so its lines go to memory without first being read into the cache.
template <typename scalar_t, typename acc_t>
void move_out(scalar_t* dst, acc_t* src, int64_t count) {
  using Vec = at::vec::Vectorized<acc_t>;
  int64_t k = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
    if (reinterpret_cast<uintptr_t>(dst) % 64 == 0) {
      const __m512 zero = _mm512_setzero_ps();
      for (; k + 16 <= count; k += 16) {
        _mm512_stream_ps(dst + k, _mm512_loadu_ps(src + k));
        _mm512_storeu_ps(src + k, zero);
      }
    }
  }
#endif
  for (; k + Vec::size() <= count; k += Vec::size()) {
    store_lanes(dst + k, Vec::loadu(src + k));
    Vec(acc_t(0)).store(src + k);
  }
  for (; k < count; ++k) {
    dst[k] = static_cast<scalar_t>(src[k]);
    src[k] = acc_t(0);
  }
}

// One table's dense gradients (grad_w (n, D) and grad_b (n,), contiguous; either may be null) from
// the samples bucketed by this table's rows: row r gets the sum over the samples b with key r, in
// batch order, of coef[b] * partner_table[partner_b] (and of coef[b]); a row without samples gets
// zeros. Threads take whole blocks; a block's sums are built in a zeroed L2-resident buffer (each
// row from 0, adding its samples in batch order: the same operations in the same order for any
// block size or thread count) and then moved to the gradient in one sequential write. With
// ``compute_coef`` the pass forms coef[b] itself (from grad_out and, with a y_range, the score
// from both rows) and writes it to ``coef`` for the other table's pass; else it reads ``coef``.
template <typename scalar_t, typename index_t>
void block_sums_kernel(const Model<scalar_t>& model, bool keys_are_users, const Buckets<index_t>& buckets,
                       const Tensor& grad_out, bool compute_coef, acc_type<scalar_t>* coef, scalar_t* grad_w,
                       scalar_t* grad_b) {
  using acc_t = acc_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  const Table<scalar_t>& own_table = keys_are_users ? model.users_table : model.items_table;
  const Table<scalar_t>& partner_table = keys_are_users ? model.items_table : model.users_table;
  const int64_t D = model.D, full = D - D % Vec::size();
  const scalar_t* grad = grad_out.const_data_ptr<scalar_t>();
  const int64_t grad_stride = grad_out.stride(0);
  const bool reads_own_rows = compute_coef && model.has_range;
  const bool reads_partner_rows = grad_w != nullptr || reads_own_rows;
  const bool strided = partner_table.col_stride != 1 || own_table.col_stride != 1;
  const auto* entries = buckets.entries.get();
  const int64_t samples = buckets.blocks > 0 ? buckets.block_ends.back() : 0;
  const int64_t grain = (samples + buckets.rows) * D < kSerialWork ? buckets.blocks : 1;
  at::parallel_for(0, buckets.blocks, grain, [&](int64_t block_begin, int64_t block_end) {
    const int64_t block_rows = buckets.block_rows();
    std::vector<acc_t> sums(grad_w != nullptr ? block_rows * D : 0, acc_t(0));
    std::vector<acc_t> bias_sums(grad_b != nullptr ? block_rows : 0, acc_t(0));
    std::vector<scalar_t> scratch(strided ? 2 * D : 0);
    const int64_t last_entry = buckets.block_ends[block_end - 1];
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t first = block * block_rows, rows = std::min(block_rows, buckets.rows - first);
      for (int64_t p = buckets.block_begin(block), end = buckets.block_ends[block]; p < end; ++p) {
        // The rows are gathered in batch order within the block: prefetched a few samples ahead,
        // across block boundaries.
        if (reads_partner_rows && p + kPrefetchAhead < last_entry) {
          const auto& ahead = entries[p + kPrefetchAhead];
          partner_table.prefetch_row(ahead.partner, D);
          if (reads_own_rows) own_table.prefetch_row(ahead.key, D);
        }
        const auto& entry = entries[p];
        const int64_t r = entry.key, partner = entry.partner, b = entry.sample;
        const scalar_t* row = reads_partner_rows ? partner_table.row(partner, D, scratch.data()) : nullptr;
        acc_t c;
        if (compute_coef) {
          c = static_cast<acc_t>(grad[b * grad_stride]);
          if (model.has_range) {
            const acc_t bias = keys_are_users ? model.users_bias.bias(r) + model.items_bias.bias(partner)
                                              : model.users_bias.bias(partner) + model.items_bias.bias(r);
            c = model.coefficient_from_score(c, dot(own_table.row(r, D, scratch.data() + D), row, D) + bias);
          }
          if (coef != nullptr) coef[b] = c;
        } else {
          c = coef[b];
        }
        if (grad_b != nullptr) bias_sums[r - first] += c;
        if (grad_w == nullptr) continue;
        acc_t* sum = sums.data() + (r - first) * D;
        int64_t d = 0;
        for (; d < full; d += Vec::size()) {
          at::vec::fmadd(Vec(c), load_lanes(row + d), Vec::loadu(sum + d)).store(sum + d);
        }
        for (; d < D; ++d) sum[d] += c * static_cast<acc_t>(row[d]);
      }
      if (grad_w != nullptr) move_out(grad_w + first * D, sums.data(), rows * D);
      if (grad_b != nullptr) move_out(grad_b + first, bias_sums.data(), rows);
    }
#if defined(__AVX512F__)
    _mm_sfence();  // the non-temporal stores are visible before the gradient is used
#endif
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
  constexpr const char* op = "fastcore5_native::embedding_dot_bias_forward";
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

// embedding_dot_bias below autograd (inference mode; its autograd kernel is
// csrc/embedding_dot_bias_autograd.cpp): the forward, ``sparse`` shaping only the gradients.
Tensor inference_cpu(const Tensor& users, const Tensor& items, const Tensor& u_weight, const Tensor& i_weight,
                     const Tensor& u_bias, const Tensor& i_bias, std::optional<double> y_lo,
                     std::optional<double> y_hi, bool /*sparse*/, const OptionalTensor& index_errors) {
  return forward_cpu(users, items, u_weight, i_weight, u_bias, i_bias, y_lo, y_hi, index_errors);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> backward_cpu(
    const Tensor& grad_out, const Tensor& users, const Tensor& items, const OptionalTensor& u_weight,
    const OptionalTensor& i_weight, const OptionalTensor& u_bias, const OptionalTensor& i_bias, int64_t num_users,
    int64_t num_items, std::optional<double> y_lo, std::optional<double> y_hi, bool need_u_weight,
    bool need_i_weight, bool need_u_bias, bool need_i_bias, bool /*deterministic: always*/, bool sparse) {
  constexpr const char* op = "fastcore5_native::embedding_dot_bias_backward";
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
    // The first table's pass forms coef; the second reads it. The items' pass goes first when
    // there is one: with a y_range it reads each sample's own row to form coef, and the items'
    // table is the smaller one.
    const bool users_pass = need_u_weight || need_u_bias, items_pass = need_i_weight || need_i_bias;
    std::unique_ptr<acc_t[]> coef(users_pass && items_pass ? new acc_t[B] : nullptr);
    const int64_t threads = at::get_num_threads(), row_bytes = D * static_cast<int64_t>(sizeof(acc_t));
    const auto run = [&](auto index_zero) {
      using index_t = decltype(index_zero);
      std::optional<Buckets<index_t>> by_user, by_item;
      if (users_pass) by_user.emplace(num_users, row_bytes, threads);
      if (items_pass) by_item.emplace(num_items, row_bytes, threads);
      bucket_samples(user_indices, item_indices, B, num_users, num_items, by_user ? &*by_user : nullptr,
                     by_item ? &*by_item : nullptr);
      if (items_pass) {
        block_sums_kernel(model, false, *by_item, grad_out, true, coef.get(), data(need_i_weight, iw),
                          data(need_i_bias, ib));
      }
      if (users_pass) {
        block_sums_kernel(model, true, *by_user, grad_out, !items_pass, coef.get(), data(need_u_weight, uw),
                          data(need_u_bias, ub));
      }
    };
    constexpr int64_t int32_limit = std::numeric_limits<int32_t>::max();
    if (std::max({B, num_users, num_items}) <= int32_limit) {
      run(int32_t{0});
    } else {
      run(int64_t{0});
    }
  });
  return {uw, iw, ub, ib};
}

}  // namespace
}  // namespace fastcore5

TORCH_LIBRARY_IMPL(fastcore5_native, CPU, m) {
  m.impl("embedding_dot_bias_forward", &fastcore5::forward_cpu);
  m.impl("embedding_dot_bias_backward", &fastcore5::backward_cpu);
  m.impl("embedding_dot_bias", &fastcore5::inference_cpu);
}
