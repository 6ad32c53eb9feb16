// Where the native kernels' outputs come from: new_output, and the cache of large CPU output
// buffers behind it, which also serves the CPU kernels' scratch (new_cpu_scratch).
//
// Why a cache. A training step's dense embedding gradients are tens of MB (45 MB at ML-25M) and
// are freed at the next zero_grad. glibc hands memory that large back to the kernel (munmap, or
// trimming the heap top), and the next step's gradients fault their pages in again: on the
// 2-core development VM about 1.2 us per 4 KiB page, up to 12 ms a step, on a step whose kernels
// take 5 ms (bench/NOTES.md, "glibc's heap trim"). So the CPU kernels' outputs of at least
// kMinCachedBytes come from CachedCpuAllocator: a freed buffer goes back to the cache instead of
// to malloc, and the next request of the same byte size takes it, its pages still mapped. This
// is CUDA's caching allocator in miniature, with a bound: buffers are kept while the cache holds
// at most its limit (FASTCORE5_CPU_CACHE_MB, default kDefaultLimitMiB; 0 turns the cache off),
// and a buffer that would overflow it is freed. fastcore5.cpu_cache (the Python functions
// below) reads the counts, sets the limit and empties the cache.
//
// Only buffers of one exact size are reused: the outputs that cost the faults (gradients of
// whole tables, (batch, features) activations) repeat their sizes step after step. Buffers
// come from c10::alloc_cpu (64-byte aligned, torch's THP_MEM_ALLOC_ENABLE honoured); they are not
// reported to torch's memory profiler. The cache itself is never destroyed, so a tensor that
// outlives the interpreter's teardown still has somewhere to go.
#include <Python.h>

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "checks.h"
#include "python_functions.h"

namespace fastcore5 {
namespace {

constexpr size_t kMinCachedBytes = size_t{1} << 20;  // below this malloc reuses memory by itself
constexpr size_t kDefaultLimitMiB = 256;

size_t limit_from_environment() {
  const char* value = std::getenv("FASTCORE5_CPU_CACHE_MB");
  if (value == nullptr || *value == '\0') return kDefaultLimitMiB << 20;
  char* end = nullptr;
  const unsigned long long mib = std::strtoull(value, &end, 10);
  if (*end != '\0' || value[0] == '-') {
    TORCH_WARN("fastcore5: FASTCORE5_CPU_CACHE_MB=", value, " is not a whole number of MiB; using ",
               kDefaultLimitMiB);
    return kDefaultLimitMiB << 20;
  }
  return static_cast<size_t>(mib) << 20;
}

class CachedCpuAllocator final : public c10::Allocator {
 public:
  struct Counts {
    size_t held_bytes, limit_bytes, hits, misses;
  };

  c10::DataPtr allocate(size_t bytes) override {
    // A cached tensor resized below the threshold (or to nothing) gets ordinary memory.
    if (bytes < kMinCachedBytes) return c10::GetCPUAllocator()->allocate(bytes);
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      const auto found = free_.find(bytes);
      if (found != free_.end() && !found->second.empty()) {
        data = found->second.back();
        found->second.pop_back();
        held_bytes_ -= bytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    return {data, new Buffer{data, bytes}, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  Counts counts() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {held_bytes_, limit_bytes_, hits_, misses_};
  }

  void set_limit(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      limit_bytes_ = bytes;
    }
    free_down_to(bytes);
  }

  void empty() { free_down_to(0); }

 private:
  struct Buffer {
    void* data;
    size_t bytes;
  };

  static void release(void* context);

  // Frees cached buffers until the cache holds at most ``keep_bytes``.
  void free_down_to(size_t keep_bytes) {
    std::vector<void*> freed;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto& [size, buffers] : free_) {
        while (held_bytes_ > keep_bytes && !buffers.empty()) {
          freed.push_back(buffers.back());
          buffers.pop_back();
          held_bytes_ -= size;
        }
      }
    }
    for (void* data : freed) c10::free_cpu(data);
  }

  void take_back(const Buffer& buffer) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (held_bytes_ + buffer.bytes <= limit_bytes_) {
        free_[buffer.bytes].push_back(buffer.data);
        held_bytes_ += buffer.bytes;
        return;
      }
    }
    c10::free_cpu(buffer.data);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;  // by byte size
  size_t held_bytes_ = 0, limit_bytes_ = limit_from_environment(), hits_ = 0, misses_ = 0;
};

CachedCpuAllocator& output_cache() {
  static auto* cache = new CachedCpuAllocator();  // never destroyed: see the header
  return *cache;
}

void CachedCpuAllocator::release(void* context) {
  const auto* buffer = static_cast<Buffer*>(context);
  output_cache().take_back(*buffer);
  delete buffer;
}

// FASTCORE5_POISON=1 (set by the test suite) fills every uninitialised output with NaN before a
// kernel runs, as the Triton launchers do, so an element a kernel forgets to write fails a test.
bool poisoning() {
  static const bool poison = [] {
    const char* value = std::getenv("FASTCORE5_POISON");
    return value != nullptr && std::strcmp(value, "1") == 0;
  }();
  return poison;
}

// ---- fastcore5._C functions behind fastcore5.cpu_cache ----

PyObject* cpu_cache_counts(PyObject*, PyObject*) {
  const auto counts = output_cache().counts();
  return Py_BuildValue("{s:K,s:K,s:K,s:K}", "held_bytes", static_cast<unsigned long long>(counts.held_bytes),
                       "limit_bytes", static_cast<unsigned long long>(counts.limit_bytes), "hits",
                       static_cast<unsigned long long>(counts.hits), "misses",
                       static_cast<unsigned long long>(counts.misses));
}

PyObject* cpu_cache_set_limit(PyObject*, PyObject* bytes) {
  const unsigned long long value = PyLong_AsUnsignedLongLong(bytes);
  if (value == static_cast<unsigned long long>(-1) && PyErr_Occurred()) return nullptr;
  output_cache().set_limit(static_cast<size_t>(value));
  Py_RETURN_NONE;
}

PyObject* cpu_cache_empty(PyObject*, PyObject*) {
  output_cache().empty();
  Py_RETURN_NONE;
}

const bool registered =
    add_python_function({"cpu_cache_counts", cpu_cache_counts, METH_NOARGS, "the CPU output cache's counts"}) &&
    add_python_function({"cpu_cache_set_limit", cpu_cache_set_limit, METH_O, "set the CPU output cache's limit"}) &&
    add_python_function({"cpu_cache_empty", cpu_cache_empty, METH_NOARGS, "free the CPU output cache's buffers"});

}  // namespace

namespace {

// An uninitialised tensor; on CPU, from the cache when it is large enough to be kept.
at::Tensor new_tensor(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const size_t bytes = static_cast<size_t>(c10::multiply_integers(sizes)) * options.dtype().itemsize();
  if (options.device().is_cpu() && bytes >= kMinCachedBytes) {
    return at::detail::empty_generic(sizes, &output_cache(), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                     options.dtype().toScalarType(), std::nullopt);
  }
  return at::empty(sizes, options);
}

}  // namespace

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = new_tensor(sizes, options);
  if (poisoning()) out.fill_(std::numeric_limits<double>::quiet_NaN());
  return out;
}

at::Tensor new_cpu_scratch(int64_t bytes) { return new_tensor({bytes}, at::TensorOptions(at::kByte)); }

}  // namespace fastcore5
