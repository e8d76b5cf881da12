// The ops of kernels/gpu.hpp. All arithmetic is F32 with fused multiply-adds; nothing is built
// with fast-math, so expf, sqrtf, powf and sincosf are the accurate versions.

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>

#include "kernels/gpu.hpp"

namespace keel::gpu {
namespace {

constexpr int warp_size = 32;
constexpr unsigned full_mask = 0xffffffffu;

// matmul: one warp per weight row, four rows per block; each warp reads its row once for up to
// `Batch` inputs (one blockIdx.y per group of `Batch` inputs).
constexpr int matmul_rows_per_block = 4;
constexpr int matmul_threads = matmul_rows_per_block * warp_size;
constexpr int max_grid_y = 65535;

// Row-wise ops (rmsnorm, softmax): one block per row.
constexpr int row_threads = 256;

// Element-wise ops: grid-stride loops over at most this many blocks.
constexpr int elem_threads = 256;
constexpr int64_t max_elem_blocks = 1 << 16;

constexpr int q8_0_bytes = 34;

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = warp_size / 2; o > 0; o >>= 1) v += __shfl_xor_sync(full_mask, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = warp_size / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(full_mask, v, o));
  return v;
}

// Sum (or max) over the block, returned to every thread. `scratch` holds one value per warp; the
// leading barrier lets callers reuse it for consecutive reductions.
template <bool Max>
__device__ float block_reduce(float v, float* scratch) {
  const int lane = threadIdx.x % warp_size;
  const int w = threadIdx.x / warp_size;
  const int warps = blockDim.x / warp_size;
  v = Max ? warp_max(v) : warp_sum(v);
  __syncthreads();
  if (lane == 0) scratch[w] = v;
  __syncthreads();
  float r = lane < warps ? scratch[lane] : (Max ? -INFINITY : 0.0f);
  return Max ? warp_max(r) : warp_sum(r);
}

// Decodes weights K*c .. K*c+K-1 of one row (chunk c) into F32.
template <dtype T, int K>
struct decoder;

template <>
struct decoder<dtype::f32, 4> {
  __device__ static void run(const uint8_t* row, int64_t c, float* w) {
    const float4 v = __ldg(reinterpret_cast<const float4*>(row) + c);
    w[0] = v.x;
    w[1] = v.y;
    w[2] = v.z;
    w[3] = v.w;
  }
};

template <>
struct decoder<dtype::f32, 1> {
  __device__ static void run(const uint8_t* row, int64_t c, float* w) {
    w[0] = __ldg(reinterpret_cast<const float*>(row) + c);
  }
};

__device__ __forceinline__ float f16_bits_to_f32(unsigned short h) {
  return __half2float(__ushort_as_half(h));
}

__device__ __forceinline__ float bf16_bits_to_f32(unsigned short h) {
  return __uint_as_float(static_cast<unsigned>(h) << 16);
}

template <>
struct decoder<dtype::f16, 8> {
  __device__ static void run(const uint8_t* row, int64_t c, float* w) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + c);
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // little-endian: the lower half is the earlier element
      w[2 * i] = f16_bits_to_f32(static_cast<unsigned short>(u[i] & 0xffffu));
      w[2 * i + 1] = f16_bits_to_f32(static_cast<unsigned short>(u[i] >> 16));
    }
  }
};

template <>
struct decoder<dtype::f16, 1> {
  __device__ static void run(const uint8_t* row, int64_t c, float* w) {
    w[0] = f16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short*>(row) + c));
  }
};

template <>
struct decoder<dtype::bf16, 8> {
  __device__ static void run(const uint8_t* row, int64_t c, float* w) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(row) + c);
    const unsigned u[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      w[2 * i] = __uint_as_float(u[i] << 16);
      w[2 * i + 1] = __uint_as_float(u[i] & 0xffff0000u);
    }
  }
};

template <>
struct decoder<dtype::bf16, 1> {
  __device__ static void run(const uint8_t* row, int64_t c, float* w) {
    w[0] = bf16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short*>(row) + c));
  }
};

// Q8_0: chunk c is the quarter c % 4 of block c / 4. Blocks are 34 bytes, so only 2-byte loads
// are aligned; the four lanes sharing a block read its scale once from L1.
template <>
struct decoder<dtype::q8_0, 8> {
  __device__ static void run(const uint8_t* row, int64_t c, float* w) {
    const uint8_t* blk = row + (c >> 2) * q8_0_bytes;
    const float d = f16_bits_to_f32(__ldg(reinterpret_cast<const unsigned short*>(blk)));
    const auto* qs = reinterpret_cast<const unsigned short*>(blk + 2 + (c & 3) * 8);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const unsigned short u = __ldg(qs + i);
      w[2 * i] = d * static_cast<float>(static_cast<int8_t>(u & 0xffu));
      w[2 * i + 1] = d * static_cast<float>(static_cast<int8_t>(u >> 8));
    }
  }
};

template <int K>
__device__ __forceinline__ void load_x(const float* x, int64_t c, float* v) {
  if constexpr (K == 1) {
    v[0] = __ldg(x + c);
  } else {
#pragma unroll
    for (int i = 0; i < K; i += 4) {
      const float4 t = __ldg(reinterpret_cast<const float4*>(x + c * K + i));
      v[i] = t.x;
      v[i + 1] = t.y;
      v[i + 2] = t.z;
      v[i + 3] = t.w;
    }
  }
}

template <dtype T, int K, int Batch>
__global__ void __launch_bounds__(matmul_threads)
    matmul_kernel(const uint8_t* __restrict__ w, size_t row_bytes, int64_t rows, int64_t cols,
                  const float* __restrict__ x, int64_t nb, float* __restrict__ y) {
  const int64_t r = int64_t(blockIdx.x) * matmul_rows_per_block + threadIdx.x / warp_size;
  const int lane = threadIdx.x % warp_size;
  if (r >= rows) return;  // the whole warp leaves together
  const int64_t b0 = int64_t(blockIdx.y) * Batch;
  const int nbt = static_cast<int>(min(int64_t(Batch), nb - b0));
  const uint8_t* row = w + r * row_bytes;
  const int64_t chunks = cols / K;

  float acc[Batch];
#pragma unroll
  for (int b = 0; b < Batch; ++b) acc[b] = 0.0f;

#pragma unroll 2
  for (int64_t c = lane; c < chunks; c += warp_size) {
    float wv[K];
    decoder<T, K>::run(row, c, wv);
#pragma unroll
    for (int b = 0; b < Batch; ++b) {
      if (b < nbt) {
        float xv[K];
        load_x<K>(x + (b0 + b) * cols, c, xv);
#pragma unroll
        for (int i = 0; i < K; ++i) acc[b] = fmaf(wv[i], xv[i], acc[b]);
      }
    }
  }
#pragma unroll
  for (int b = 0; b < Batch; ++b) {
    if (b < nbt) {  // uniform across the warp, so the shuffles see every lane
      const float s = warp_sum(acc[b]);
      if (lane == 0) y[(b0 + b) * rows + r] = s;
    }
  }
}

template <dtype T, int K, int Batch>
int launch_matmul(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, const float* x,
                  int64_t nb, float* y) {
  const int64_t blocks_x = (rows + matmul_rows_per_block - 1) / matmul_rows_per_block;
  const int64_t per_launch = int64_t(max_grid_y) * Batch;
  for (int64_t b = 0; b < nb; b += per_launch) {
    const int64_t n = std::min(per_launch, nb - b);
    const dim3 grid(static_cast<unsigned>(blocks_x),
                    static_cast<unsigned>((n + Batch - 1) / Batch));
    matmul_kernel<T, K, Batch>
        <<<grid, matmul_threads>>>(w, row_bytes, rows, cols, x + b * cols, n, y + b * rows);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return status_ok;
}

// Decode (nb == 1) gets a kernel without the batch loop's registers.
template <dtype T, int K>
int launch_matmul(const uint8_t* w, size_t row_bytes, int64_t rows, int64_t cols, const float* x,
                  int64_t nb, float* y) {
  return nb == 1 ? launch_matmul<T, K, 1>(w, row_bytes, rows, cols, x, nb, y)
                 : launch_matmul<T, K, 8>(w, row_bytes, rows, cols, x, nb, y);
}

// Whether `b` holds at least `count` values of `elem_bytes`, without overflowing.
bool holds(const buffer& b, int64_t count, size_t elem_bytes) {
  return count >= 0 && static_cast<uint64_t>(count) <= b.size() / elem_bytes;
}

bool holds(const buffer& b, int64_t n, int64_t nrows, size_t elem_bytes) {
  if (n < 0 || nrows < 0) return false;
  if (n != 0 && nrows > INT64_MAX / n) return false;
  return holds(b, n * nrows, elem_bytes);
}

__global__ void rmsnorm_kernel(float* out, const float* x, const float* __restrict__ weight,
                               int64_t n, float eps) {
  __shared__ float scratch[row_threads / warp_size];
  const float* xr = x + int64_t(blockIdx.x) * n;
  float* o = out + int64_t(blockIdx.x) * n;
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) s = fmaf(xr[i], xr[i], s);
  s = block_reduce<false>(s, scratch);
  const float scale = 1.0f / sqrtf(s / static_cast<float>(n) + eps);
  // Each thread rewrites only what it read, so `out` may be `x`.
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) o[i] = xr[i] * scale * weight[i];
}

__global__ void softmax_kernel(float* x, int64_t n) {
  __shared__ float scratch[row_threads / warp_size];
  float* xr = x + int64_t(blockIdx.x) * n;
  float m = -INFINITY;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, xr[i]);
  m = block_reduce<true>(m, scratch);
  float s = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float e = expf(xr[i] - m);
    xr[i] = e;
    s += e;
  }
  s = block_reduce<false>(s, scratch);
  const float inv = 1.0f / s;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) xr[i] *= inv;
}

__global__ void silu_mul_kernel(float* gate, const float* __restrict__ up, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    gate[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

// One thread per rotated pair. The angle is built as ggml's rope cache (and keel::rope) builds
// it: pos * theta_scale^i by i float multiplications, so CPU and GPU angles are the same floats.
__global__ void rope_kernel(float* x, int64_t pairs, int n_heads, int head_dim, int64_t pos0,
                            float theta_scale) {
  const int half = head_dim / 2;
  for (int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; p < pairs;
       p += int64_t(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(p % half);
    const int64_t head = p / half;  // counted over all rows: the row is head / n_heads
    float angle = static_cast<float>(pos0 + head / n_heads);
    for (int k = 0; k < i; ++k) angle *= theta_scale;
    float s, c;
    sincosf(angle, &s, &c);
    auto* v = reinterpret_cast<float2*>(x + head * head_dim + 2 * i);
    const float2 a = *v;
    *v = make_float2(a.x * c - a.y * s, a.x * s + a.y * c);
  }
}

unsigned elem_blocks(int64_t n) {
  return static_cast<unsigned>(
      std::clamp<int64_t>((n + elem_threads - 1) / elem_threads, 1, max_elem_blocks));
}

int launched() {
  return cudaGetLastError();
}

}  // namespace

int matmul(dtype type, const buffer& w, int64_t rows, int64_t cols, const buffer& x, int64_t nb,
           buffer& y) {
  if (rows < 0 || cols < 0 || nb < 0) return status_bad_argument;
  size_t row_bytes = 0;
  switch (type) {
    case dtype::f32:
      row_bytes = size_t(cols) * 4;
      break;
    case dtype::f16:
    case dtype::bf16:
      row_bytes = size_t(cols) * 2;
      break;
    case dtype::q8_0:
      if (cols % q8_0_block != 0) return status_bad_argument;
      row_bytes = size_t(cols / q8_0_block) * q8_0_bytes;
      break;
    default:
      return status_bad_argument;
  }
  if (!holds(x, cols, nb, sizeof(float)) || !holds(y, rows, nb, sizeof(float))) {
    return status_bad_argument;
  }
  if (row_bytes != 0 && static_cast<uint64_t>(rows) > w.size() / row_bytes) {
    return status_bad_argument;
  }
  if (rows == 0 || nb == 0) return status_ok;
  if (static_cast<uint64_t>(rows) / matmul_rows_per_block >= 0x7fffffffu) {
    return status_bad_argument;  // more than grid.x allows
  }
  const auto* wp = static_cast<const uint8_t*>(w.data());
  const auto* xp = static_cast<const float*>(x.data());
  auto* yp = static_cast<float*>(y.data());
  // Vector loads need every row (of W and of x) to start 16-byte aligned; buffers are 256-aligned.
  switch (type) {
    case dtype::f32:
      return cols % 4 == 0 ? launch_matmul<dtype::f32, 4>(wp, row_bytes, rows, cols, xp, nb, yp)
                           : launch_matmul<dtype::f32, 1>(wp, row_bytes, rows, cols, xp, nb, yp);
    case dtype::f16:
      return cols % 8 == 0 ? launch_matmul<dtype::f16, 8>(wp, row_bytes, rows, cols, xp, nb, yp)
                           : launch_matmul<dtype::f16, 1>(wp, row_bytes, rows, cols, xp, nb, yp);
    case dtype::bf16:
      return cols % 8 == 0 ? launch_matmul<dtype::bf16, 8>(wp, row_bytes, rows, cols, xp, nb, yp)
                           : launch_matmul<dtype::bf16, 1>(wp, row_bytes, rows, cols, xp, nb, yp);
    default:
      return launch_matmul<dtype::q8_0, 8>(wp, row_bytes, rows, cols, xp, nb, yp);
  }
}

int rmsnorm(buffer& out, const buffer& x, const buffer& weight, int64_t n, int64_t nrows,
            float eps) {
  if (n <= 0 || nrows < 0 || nrows > 0x7fffffff || !holds(x, n, nrows, sizeof(float)) ||
      !holds(out, n, nrows, sizeof(float)) || !holds(weight, n, sizeof(float))) {
    return status_bad_argument;
  }
  if (nrows == 0) return status_ok;
  rmsnorm_kernel<<<static_cast<unsigned>(nrows), row_threads>>>(
      static_cast<float*>(out.data()), static_cast<const float*>(x.data()),
      static_cast<const float*>(weight.data()), n, eps);
  return launched();
}

int softmax(buffer& x, int64_t n, int64_t nrows) {
  if (n <= 0 || nrows < 0 || nrows > 0x7fffffff || !holds(x, n, nrows, sizeof(float))) {
    return status_bad_argument;
  }
  if (nrows == 0) return status_ok;
  softmax_kernel<<<static_cast<unsigned>(nrows), row_threads>>>(static_cast<float*>(x.data()), n);
  return launched();
}

int silu_mul(buffer& gate, const buffer& up, int64_t n) {
  if (!holds(gate, n, sizeof(float)) || !holds(up, n, sizeof(float))) return status_bad_argument;
  if (n == 0) return status_ok;
  silu_mul_kernel<<<elem_blocks(n), elem_threads>>>(static_cast<float*>(gate.data()),
                                                    static_cast<const float*>(up.data()), n);
  return launched();
}

int rope(buffer& x, int64_t nb, int n_heads, int head_dim, int64_t pos0, float theta) {
  if (nb < 0 || n_heads <= 0 || head_dim <= 0 || head_dim % 2 != 0 ||
      !holds(x, int64_t(n_heads) * head_dim, nb, sizeof(float))) {
    return status_bad_argument;
  }
  const int64_t pairs = nb * n_heads * (head_dim / 2);
  // On the host with std::pow, as keel::rope computes it.
  const float theta_scale = std::pow(theta, -2.0f / static_cast<float>(head_dim));
  if (pairs == 0) return status_ok;
  rope_kernel<<<elem_blocks(pairs), elem_threads>>>(static_cast<float*>(x.data()), pairs, n_heads,
                                                    head_dim, pos0, theta_scale);
  return launched();
}

}  // namespace keel::gpu
