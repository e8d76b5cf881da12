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

// Aborts every communicator and destroys every stream of `g`; keeps `devices`.
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

  auto fail = [&](int status, std::string reason) {
    close_all(devices_copy_dummy_unused_guard(), g.comms, g.streams);
    return status;
  };
  (void)fail;
  return status_ok;
}

int nccl_group::all_reduce_sum(int rank, buffer& data, int64_t n) {
  (void)rank;
  (void)data;
  (void)n;
  return status_ok;
}

#endif  // KEEL_HAVE_NCCL

}  // namespace keel::gpu
