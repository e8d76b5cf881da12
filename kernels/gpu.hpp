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
#include <memory>
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
/// `nccl_group` only: the group was aborted (before or during the call).
inline constexpr int status_aborted = -2;
/// `nccl_group` only: keel_cuda was built without NCCL (nccl.h / libnccl not found).
inline constexpr int status_nccl_unavailable = -3;
/// `nccl_group` only: an NCCL error `r` (an `ncclResult_t`) is `status_nccl_base - r`.
inline constexpr int status_nccl_base = -1000;

/// "ok", "bad_argument", "cudaErrorMemoryAllocation: out of memory", "aborted",
/// "NCCL not available: ...", or "ncclUnhandledCudaError: unhandled cuda error ...".
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

/// Tensor parallelism across the GPUs of one process: one NCCL communicator per device, rank r
/// driving device `devices[r]` from its own thread (one shard worker per device). The GPU twin of
/// keel::collective (kernels/collective.hpp), with status ints instead of caf::error.
///
/// `init` creates all communicators at once from one thread (ncclGetUniqueId, then
/// ncclCommInitRankConfig per rank inside one ncclGroupStart/End, which is what ncclCommInitAll
/// does), so that a failing device fails the whole group in one place before any shard worker
/// starts. The communicators are non-blocking (ncclConfig_t::blocking = 0): no NCCL call ever
/// blocks a rank's thread; `all_reduce_sum` polls for completion and for `abort`.
///
/// Summation order: NCCL does not sum in rank order, so results are not bit-identical to the
/// CPU collective (they agree up to float rounding). With the Ring and Tree algorithms every rank
/// gets the same bits (the reduced value is broadcast), and a given layout is reproducible run
/// to run as long as the NCCL version, the GPUs and their topology, the rank count, the message
/// size and the NCCL tuning stay the same. To keep the order fixed when NCCL's tuner would pick
/// differently, set before `init` (in the environment of the process):
///   NCCL_ALGO=Ring NCCL_PROTO=Simple NCCL_MIN_NCHANNELS=k NCCL_MAX_NCHANNELS=k
/// (NVLS/CollNet reduce in the switch or network and are not guaranteed to be reproducible).
///
/// Threading: `init`, the destructor and move run with no rank inside a call. Each rank calls
/// `all_reduce_sum` only from its own thread, one call per rank per round, with the same `n` on
/// every rank (NCCL cannot detect a mismatch: it hangs until `abort` or corrupts the result).
/// `abort` is thread-safe and idempotent. Nothing throws.
class nccl_group {
 public:
  nccl_group();
  ~nccl_group();  // ncclCommAbort on every communicator still open (never blocks on peers)
  nccl_group(const nccl_group&) = delete;  // shared by the ranks' threads: not movable either
  nccl_group& operator=(const nccl_group&) = delete;

  /// True when keel_cuda was built with NCCL; otherwise `init` returns
  /// `status_nccl_unavailable`.
  static bool available() noexcept;
  /// "2.28.9", or the reason NCCL is not usable ("NCCL not available: ...").
  static std::string version();

  /// Creates one communicator per entry of `devices` (distinct CUDA device indices; rank r is
  /// devices[r]) and one CUDA stream per rank, replacing what the group held (and clearing an
  /// abort). On failure the group stays empty and `*why` (if not null) says what failed, e.g.
  /// "cudaGetDeviceCount: cudaErrorInsufficientDriver: ..." on a host without a driver.
  /// Restores the calling thread's current device.
  int init(const std::vector<int>& devices, std::string* why = nullptr);

  int size() const noexcept;      ///< ranks (0 when empty)
  int device(int rank) const;     ///< device of `rank`, -1 when out of range

  /// Sums data[0..n) (F32, from the start of `data`, in place) over all ranks. Called from rank
  /// `rank`'s thread; makes devices[rank] current, queues the all-reduce on the rank's stream
  /// (a blocking stream, so it is ordered after the work this thread queued on the legacy
  /// default stream, and later default-stream work waits for it) and returns when it is done.
  /// `status_aborted` when the group is aborted before or while waiting (the data is then
  /// undefined), an NCCL or CUDA error, or `status_bad_argument` (rank out of range, n < 0,
  /// `data` too small, empty group). n == 0 returns at once. Any failure of a call with a valid
  /// rank also aborts the group: the other ranks would otherwise wait for this one forever.
  int all_reduce_sum(int rank, buffer& data, int64_t n);

  /// Wakes every rank waiting in `all_reduce_sum` with `status_aborted`; later calls fail at
  /// once. Only sets a flag: each waiting rank then calls ncclCommAbort on its own communicator
  /// (stopping its kernel that waits for the missing peers), because NCCL communicators must not
  /// be used from two threads at once. The others are aborted by the destructor.
  void abort() noexcept;
  bool aborted() const noexcept;

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

}  // namespace keel::gpu
