// keel::gpu::nccl_group (kernels/gpu.hpp): tensor-parallel all-reduce over NCCL. Compiled with or
// without NCCL; without it (KEEL_HAVE_NCCL undefined) every call reports
// status_nccl_unavailable.

#include <cuda_runtime.h>

#if KEEL_HAVE_NCCL
#include <nccl.h>
#endif

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "kernels/gpu.hpp"

namespace keel::gpu {

namespace {

constexpr const char* unavailable_text =
    "NCCL not available: keel_cuda was built without NCCL (nccl.h / libnccl not found)";

const char* nccl_result_name(int r) {
  switch (r) {
    case 1: return "ncclUnhandledCudaError";
    case 2: return "ncclSystemError";
    case 3: return "ncclInternalError";
    case 4: return "ncclInvalidArgument";
    case 5: return "ncclInvalidUsage";
    case 6: return "ncclRemoteError";
    case 7: return "ncclInProgress";
    default: return "ncclResult";
  }
}

}  // namespace

std::string nccl_status_string(int status) {
  if (status == status_aborted) return "aborted";
  if (status == status_nccl_unavailable) return unavailable_text;
  if (status < status_nccl_base) {
    const int r = status_nccl_base - status;
#if KEEL_HAVE_NCCL
    return std::string(nccl_result_name(r)) + ": " +
           ncclGetErrorString(static_cast<ncclResult_t>(r));
#else
    return std::string(nccl_result_name(r)) + " " + std::to_string(r);
#endif
  }
  return "unknown status " + std::to_string(status);
}

struct nccl_group::impl {
  std::vector<int> devices;
  std::atomic<bool> aborted{false};
#if KEEL_HAVE_NCCL
  std::vector<ncclComm_t> comms;     // comms[r] is null once rank r aborted it
  std::vector<cudaStream_t> streams;  // blocking streams, one per rank on its device
#endif
};

nccl_group::nccl_group() : impl_(std::make_unique<impl>()) {}

bool nccl_group::aborted() const noexcept {
  return impl_->aborted.load(std::memory_order_acquire);
}

void nccl_group::abort() noexcept {
  impl_->aborted.store(true, std::memory_order_release);
}

int nccl_group::size() const noexcept {
  return static_cast<int>(impl_->devices.size());
}

int nccl_group::device(int rank) const {
  return rank >= 0 && rank < size() ? impl_->devices[rank] : -1;
}

#if !KEEL_HAVE_NCCL

nccl_group::~nccl_group() = default;

bool nccl_group::available() noexcept {
  return false;
}

std::string nccl_group::version() {
  return unavailable_text;
}

int nccl_group::init(const std::vector<int>&, std::string* why) {
  if (why) *why = unavailable_text;
  return status_nccl_unavailable;
}

int nccl_group::all_reduce_sum(int, buffer&, int64_t) {
  return status_nccl_unavailable;
}

#else  // KEEL_HAVE_NCCL

namespace {

int nccl_status(ncclResult_t r) {
  return status_nccl_base - static_cast<int>(r);
}

// "what: ncclUnhandledCudaError: unhandled cuda error (...) / <NCCL's last error message>".
std::string nccl_why(const char* what, ncclResult_t r, ncclComm_t comm) {
  std::string s = std::string(what) + ": " + status_string(nccl_status(r));
  const char* last = ncclGetLastError(comm);
  if (last && *last) s += std::string(" / ") + last;
  return s;
}

// Polling with back-off: spin (a decode step's all-reduces complete within microseconds),
// then sleep so that a rank waiting long for its peers does not burn a core.
class backoff {
 public:
  void operator()() {
    if (++n_ < 2000) {
      std::this_thread::yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

 private:
  int n_ = 0;
};

// Aborts every communicator, destroys every stream (stream r on devices[r]) and restores the
// current device.
void close_all(std::vector<int>& devices, std::vector<ncclComm_t>& comms,
               std::vector<cudaStream_t>& streams) {
  int prev = -1;
  const bool have_prev = cudaGetDevice(&prev) == cudaSuccess;
  // ncclCommAbort, not ncclCommDestroy: destroy may wait for the peers to finalise.
  for (auto& c : comms) {
    if (c) ncclCommAbort(c);
    c = nullptr;
  }
  for (size_t r = 0; r < streams.size(); ++r) {
    if (!streams[r]) continue;
    if (r < devices.size()) cudaSetDevice(devices[r]);
    cudaStreamDestroy(streams[r]);
    streams[r] = nullptr;
  }
  if (have_prev) cudaSetDevice(prev);
  cudaGetLastError();  // nothing from the cleanup leaks to the caller's next call
  comms.clear();
  streams.clear();
}

}  // namespace

nccl_group::~nccl_group() {
  close_all(impl_->devices, impl_->comms, impl_->streams);
}

bool nccl_group::available() noexcept {
  return true;
}

std::string nccl_group::version() {
  int v = 0;
  if (ncclResult_t r = ncclGetVersion(&v); r != ncclSuccess) {
    return nccl_why("ncclGetVersion", r, nullptr);
  }
  // NCCL >= 2.9 encodes major * 10000 + minor * 100 + patch.
  return std::to_string(v / 10000) + "." + std::to_string(v % 10000 / 100) + "." +
         std::to_string(v % 100);
}

int nccl_group::init(const std::vector<int>& devices, std::string* why) {
  impl& g = *impl_;
  close_all(g.devices, g.comms, g.streams);
  g.devices.clear();
  g.aborted.store(false, std::memory_order_release);

  int prev = -1;
  bool have_prev = false;
  std::vector<int> devs = devices;
  auto fail = [&](int status, std::string reason) {
    close_all(devs, g.comms, g.streams);
    if (have_prev) cudaSetDevice(prev);
    cudaGetLastError();
    if (why) *why = std::move(reason);
    return status;
  };

  const int n = static_cast<int>(devs.size());
  if (n == 0) return fail(status_bad_argument, "nccl_group::init: no devices");
  int count = 0;
  // No driver: cudaErrorInsufficientDriver; stub libcuda: cudaErrorStubLibrary; no device:
  // cudaErrorNoDevice. NCCL would fail the same way, only later and with a vaguer message.
  if (cudaError_t e = cudaGetDeviceCount(&count); e != cudaSuccess) {
    return fail(e, "cudaGetDeviceCount: " + status_string(e));
  }
  for (int r = 0; r < n; ++r) {
    if (devs[r] < 0 || devs[r] >= count) {
      return fail(status_bad_argument, "nccl_group::init: device " + std::to_string(devs[r]) +
                                           " of rank " + std::to_string(r) + " not in [0, " +
                                           std::to_string(count) + ")");
    }
    for (int q = 0; q < r; ++q) {
      if (devs[q] == devs[r]) {
        return fail(status_bad_argument, "nccl_group::init: device " + std::to_string(devs[r]) +
                                             " given for ranks " + std::to_string(q) + " and " +
                                             std::to_string(r) + " (NCCL needs one per rank)");
      }
    }
  }
  have_prev = cudaGetDevice(&prev) == cudaSuccess;

  g.streams.assign(n, nullptr);
  for (int r = 0; r < n; ++r) {
    cudaError_t e = cudaSetDevice(devs[r]);
    // A blocking stream: ordered with the legacy default stream that the ops of gpu.hpp use.
    if (e == cudaSuccess) e = cudaStreamCreate(&g.streams[r]);
    if (e != cudaSuccess) {
      return fail(e, "device " + std::to_string(devs[r]) + ": " + status_string(e));
    }
  }

  ncclUniqueId id;
  if (ncclResult_t res = ncclGetUniqueId(&id); res != ncclSuccess) {
    return fail(nccl_status(res), nccl_why("ncclGetUniqueId", res, nullptr));
  }
  // What ncclCommInitAll does, with non-blocking communicators: all ranks in one group call.
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  g.comms.assign(n, nullptr);
  ncclResult_t res = ncclGroupStart();
  if (res != ncclSuccess) return fail(nccl_status(res), nccl_why("ncclGroupStart", res, nullptr));
  ncclResult_t init_res = ncclSuccess;
  for (int r = 0; r < n && (init_res == ncclSuccess || init_res == ncclInProgress); ++r) {
    if (cudaError_t e = cudaSetDevice(devs[r]); e != cudaSuccess) {
      ncclGroupEnd();
      return fail(e, "device " + std::to_string(devs[r]) + ": " + status_string(e));
    }
    init_res = ncclCommInitRankConfig(&g.comms[r], n, id, r, &config);
  }
  res = ncclGroupEnd();
  if (init_res != ncclSuccess && init_res != ncclInProgress) {
    return fail(nccl_status(init_res), nccl_why("ncclCommInitRankConfig", init_res, nullptr));
  }
  if (res != ncclSuccess && res != ncclInProgress) {
    return fail(nccl_status(res), nccl_why("ncclCommInitRankConfig", res, nullptr));
  }
  for (int r = 0; r < n; ++r) {
    if (!g.comms[r]) {
      return fail(nccl_status(ncclInternalError),
                  "ncclCommInitRankConfig: no communicator for rank " + std::to_string(r));
    }
    ncclResult_t st = ncclInProgress;
    for (backoff wait; st == ncclInProgress; wait()) {
      if (ncclResult_t q = ncclCommGetAsyncError(g.comms[r], &st); q != ncclSuccess) st = q;
    }
    if (st != ncclSuccess) {
      return fail(nccl_status(st),
                  nccl_why(("rank " + std::to_string(r) + " init").c_str(), st, g.comms[r]));
    }
  }
  if (have_prev) cudaSetDevice(prev);
  g.devices = std::move(devs);
  return status_ok;
}

int nccl_group::all_reduce_sum(int rank, buffer& data, int64_t n) {
  impl& g = *impl_;
  if (rank < 0 || rank >= size()) return status_bad_argument;
  // Every failure from here on aborts the group: the peers would wait for this rank forever.
  auto fail = [&](int status) {
    abort();
    if (ncclComm_t& c = g.comms[rank]) {
      ncclCommAbort(c);
      c = nullptr;
    }
    return status;
  };
  if (aborted()) return fail(status_aborted);
  if (n < 0 || static_cast<uint64_t>(n) > data.size() / sizeof(float)) {
    return fail(status_bad_argument);
  }
  if (n == 0) return status_ok;
  ncclComm_t comm = g.comms[rank];
  cudaStream_t stream = g.streams[rank];
  if (cudaError_t e = cudaSetDevice(g.devices[rank]); e != cudaSuccess) return fail(e);
  ncclResult_t res = ncclAllReduce(data.data(), data.data(), static_cast<size_t>(n), ncclFloat32,
                                   ncclSum, comm, stream);
  if (res != ncclSuccess && res != ncclInProgress) return fail(nccl_status(res));

  // Non-blocking communicator: first the enqueue completes (it may wait for connections to the
  // peers), then the kernel on the stream (it waits for the peers' data). Poll both, and abort.
  for (backoff wait;; wait()) {
    if (aborted()) {
      ncclCommAbort(comm);  // makes the kernel waiting for the peers exit
      g.comms[rank] = nullptr;
      // Let it drain so that the caller may free or reuse `data`; bounded, never a hang.
      for (int i = 0; i < 2000 && cudaStreamQuery(stream) == cudaErrorNotReady; ++i) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      cudaGetLastError();
      return status_aborted;
    }
    ncclResult_t st = ncclSuccess;
    if (ncclResult_t q = ncclCommGetAsyncError(comm, &st); q != ncclSuccess) st = q;
    if (st == ncclInProgress) continue;
    if (st != ncclSuccess) return fail(nccl_status(st));
    cudaError_t e = cudaStreamQuery(stream);
    if (e == cudaSuccess) return status_ok;
    if (e != cudaErrorNotReady) return fail(e);
  }
}

#endif  // KEEL_HAVE_NCCL

}  // namespace keel::gpu
