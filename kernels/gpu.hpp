#pragma once

// The CUDA kernels behind a plain C++ API: no CUDA types, no CAF, so that g++ translation units
// (actors, the model loader) call it and nvcc compiles only kernels/*.cu. Built into `keel_cuda`
// only when nvcc is found (KEEL_HAVE_CUDA=1).
//
// Threading: every call works on the calling thread's current CUDA device (see `use_device`) and
// queues work on that device's legacy default stream, so calls from one thread run in order.
// CUDA calls block and bind a context to the thread: drive a device from one dedicated thread
// (a `caf::detached` actor). Nothing here throws.

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "kernels/dtype.hpp"

namespace keel::gpu {

/// Every call returns a status: `status_ok`, a positive `cudaError_t` value, or
/// `status_bad_argument` (sizes, types or buffers that break the call's contract: a bug in the
/// caller, never worth a retry). Errors of queued kernels surface at the next call that
/// synchronises (`synchronize`, `buffer::download`).
inline constexpr int status_ok = 0;
inline constexpr int status_bad_argument = -1;

/// "ok", "bad_argument", or "cudaErrorMemoryAllocation: out of memory".
std::string status_string(int status);

struct device_info {
  int index = 0;
  std::string name;        ///< "NVIDIA H100 80GB HBM3"
  size_t total_bytes = 0;  ///< global memory
  int sm_major = 0;        ///< compute capability, 9.0 for Hopper
  int sm_minor = 0;
  int multiprocessors = 0;
};

/// The usable CUDA devices. When there is none, returns an empty list and sets `*why` (if not
/// null) to the reason, e.g. "cudaErrorInsufficientDriver: CUDA driver version is insufficient
/// for CUDA runtime version" on a host without a driver. Never aborts.
std::vector<device_info> probe(std::string* why);

/// Makes device `index` current for the calling thread.
int use_device(int index);

/// Waits for all work queued on the current device; returns the first error it raised.
int synchronize();

/// Device memory on the device current at `allocate`; owns it (RAII), move-only. Use it only
/// from threads where that device is current. Not thread-safe.
class buffer {
 public:
  buffer() noexcept = default;
  ~buffer();
  buffer(buffer&& other) noexcept;
  buffer& operator=(buffer&& other) noexcept;
  buffer(const buffer&) = delete;
  buffer& operator=(const buffer&) = delete;

  /// Frees what it holds, then allocates `bytes` (uninitialised). On failure the buffer is empty.
  int allocate(size_t bytes);

  /// Frees the memory; the buffer becomes empty.
  void reset() noexcept;

  /// Copies `bytes` from host memory `src` to device offset `offset`. Returns when the copy is
  /// done (it waits for work queued before it). `status_bad_argument` if it does not fit.
  int upload(const void* src, size_t bytes, size_t offset = 0);

  /// Copies `bytes` from device offset `offset` to host memory `dst`, after all queued work.
  int download(void* dst, size_t bytes, size_t offset = 0) const;

  /// The device address, for kernels only; never dereference it on the host.
  void* data() noexcept { return ptr_; }
  const void* data() const noexcept { return ptr_; }
  size_t size() const noexcept { return size_; }
  bool empty() const noexcept { return size_ == 0; }

 private:
  void* ptr_ = nullptr;
  size_t size_ = 0;
};

// The ops below are the GPU twins of kernels/ops.hpp, with the same formulas; they read and write
// F32 values from the start of the buffers given, queue the work and return without waiting.
// Results agree with the CPU ops up to float rounding (summation order differs), not bitwise.

/// y[b * rows + r] = row r of W . x[b * cols ...] for r in [0, rows) and b in [0, nb).
/// `w` holds `rows` contiguous rows of `cols` values of `type` (F32, F16, BF16 or Q8_0, whose
/// rows are cols / 32 blocks of 34 bytes: F16 scale, 32 int8); for Q8_0 `cols` must be a multiple
/// of 32. `x` holds nb * cols F32 values, `y` room for nb * rows. `y` must not alias `w` or `x`.
int matmul(dtype type, const buffer& w, int64_t rows, int64_t cols, const buffer& x, int64_t nb,
           buffer& y);

/// For each of `nrows` rows of `n` values: out = x / sqrt(mean(x^2) + eps) * weight (weight has
/// n values). `out` may be the same buffer as `x`.
int rmsnorm(buffer& out, const buffer& x, const buffer& weight, int64_t n, int64_t nrows,
            float eps);

/// In-place softmax of each of `nrows` rows of `n` values (subtracting the row's max first).
int softmax(buffer& x, int64_t n, int64_t nrows);

/// gate[i] = silu(gate[i]) * up[i] for i in [0, n).
int silu_mul(buffer& gate, const buffer& up, int64_t n);

/// Rotary embedding, llama "normal" mode, in place: `x` holds `nb` rows of `n_heads` heads of
/// `head_dim` (even) values; row b is at position pos0 + b, and in each head the pair
/// (2i, 2i+1) rotates by (pos0 + b) * theta^(-2i/head_dim). The angle is computed as ggml's
/// rope cache and keel::rope compute it (pos times theta^(-2/head_dim), i times, in F32), so it is
/// the same float as on the CPU; only sin and cos may differ in the last bits.
int rope(buffer& x, int64_t nb, int n_heads, int head_dim, int64_t pos0, float theta);

}  // namespace keel::gpu
