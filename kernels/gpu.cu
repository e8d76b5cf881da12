// Device discovery and memory for kernels/gpu.hpp; the ops are in gpu_kernels.cu.

#include <cuda_runtime.h>

#include <utility>

#include "kernels/gpu.hpp"

namespace keel::gpu {

// In gpu_collective.cu: the strings of status_aborted, status_nccl_unavailable and NCCL errors.
std::string nccl_status_string(int status);

std::string status_string(int status) {
  if (status == status_ok) return "ok";
  if (status == status_bad_argument) return "bad_argument";
  if (status < 0) return nccl_status_string(status);
  auto e = static_cast<cudaError_t>(status);
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

std::vector<device_info> probe(std::string* why) {
  std::vector<device_info> out;
  int n = 0;
  // No driver gives cudaErrorInsufficientDriver, the stub libcuda cudaErrorStubLibrary, a driver
  // without a device cudaErrorNoDevice: all mean "no GPU".
  if (cudaError_t e = cudaGetDeviceCount(&n); e != cudaSuccess) {
    if (why) *why = status_string(e);
    return out;
  }
  for (int i = 0; i < n; ++i) {
    cudaDeviceProp p{};
    if (cudaError_t e = cudaGetDeviceProperties(&p, i); e != cudaSuccess) {
      if (why) *why = "device " + std::to_string(i) + ": " + status_string(e);
      continue;
    }
    out.push_back(
        device_info{i, p.name, p.totalGlobalMem, p.major, p.minor, p.multiProcessorCount});
  }
  if (out.empty() && why && why->empty()) *why = "no CUDA device";
  return out;
}

int use_device(int index) {
  return cudaSetDevice(index);
}

int synchronize() {
  return cudaDeviceSynchronize();
}

buffer::~buffer() {
  reset();
}

buffer::buffer(buffer&& other) noexcept
    : ptr_(std::exchange(other.ptr_, nullptr)), size_(std::exchange(other.size_, 0)) {}

buffer& buffer::operator=(buffer&& other) noexcept {
  if (this != &other) {
    reset();
    ptr_ = std::exchange(other.ptr_, nullptr);
    size_ = std::exchange(other.size_, 0);
  }
  return *this;
}

int buffer::allocate(size_t bytes) {
  reset();
  if (bytes == 0) return status_ok;
  void* p = nullptr;
  if (cudaError_t e = cudaMalloc(&p, bytes); e != cudaSuccess) {
    cudaGetLastError();  // cudaMalloc's error is not sticky; do not let it leak to a later call
    return e;
  }
  ptr_ = p;
  size_ = bytes;
  return status_ok;
}

void buffer::reset() noexcept {
  if (ptr_) cudaFree(ptr_);
  ptr_ = nullptr;
  size_ = 0;
}

int buffer::upload(const void* src, size_t bytes, size_t offset) {
  if (offset > size_ || bytes > size_ - offset || (bytes && !src)) return status_bad_argument;
  if (bytes == 0) return status_ok;
  return cudaMemcpy(static_cast<char*>(ptr_) + offset, src, bytes, cudaMemcpyHostToDevice);
}

int buffer::download(void* dst, size_t bytes, size_t offset) const {
  if (offset > size_ || bytes > size_ - offset || (bytes && !dst)) return status_bad_argument;
  if (bytes == 0) return status_ok;
  return cudaMemcpy(dst, static_cast<const char*>(ptr_) + offset, bytes, cudaMemcpyDeviceToHost);
}

}  // namespace keel::gpu
