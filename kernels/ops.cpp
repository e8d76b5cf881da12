// Scalar kernels, ISA dispatch and the non-matmul ops.
//
// The canonical order. Every dot product of a row with an F32 input x is computed as follows,
// by the scalar reference and by every SIMD path, so results are bit-identical across ISAs,
// batch sizes, row ranges and thread splits:
//
//  1. Sixteen partial sums acc[0..15] start at +0.
//  2. F32, F16, BF16 rows: for j = 0, 1, ..., cols - 1 in increasing order,
//       acc[j % 16] = fma(w[j], x[j], acc[j % 16])
//     with w[j] converted exactly to f32. This includes a tail of cols % 16 elements, which
//     simply fill lanes 0 .. cols % 16 - 1 once more; the other lanes are left untouched.
//  3. Q8_0 rows: for each block k (32 values q[0..31], scale d = fp16 -> f32) in increasing
//     order, with xk = x + 32 k, for l = 0..15:
//       p[l]   = fma(q[l + 16], xk[l + 16], q[l] * xk[l])     (the product q[l] * xk[l] rounded)
//       acc[l] = fma(d, p[l], acc[l])
//  4. Reduction: for width = 8, 4, 2, 1: for l < width: acc[l] = acc[l] + acc[l + width].
//     The result is acc[0].
//
// This file is compiled with -ffp-contract=off so that the compiler does not fuse the plain
// multiplies and additions above into fma (or the reverse); fused steps are explicit std::fma.

#include "kernels/ops.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>

#include "kernels/detail/ops_simd.hpp"
#include "kernels/thread_pool.hpp"

namespace keel {

namespace {

[[noreturn]] void die(const char* what, dtype t) {
  // A precondition violation: callers check dtype_supported() when loading a model.
  std::fprintf(stderr, "keel: %s: unsupported dtype %.*s\n", what,
               static_cast<int>(dtype_name(t).size()), dtype_name(t).data());
  std::abort();
}

cpu_isa detect() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") &&
                      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                      __builtin_cpu_supports("avx512dq");
  return avx512 ? cpu_isa::avx512 : avx2 ? cpu_isa::avx2 : cpu_isa::scalar;
}

std::atomic<cpu_isa>& active() {
  static std::atomic<cpu_isa> isa{detected_isa()};
  return isa;
}

float reduce16(float* acc) {
  for (int width = 8; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] = acc[l] + acc[l + width];
  return acc[0];
}

uint16_t load_u16(const char* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return h;
}

}  // namespace

namespace detail {

const float* fp16_table() {
  static const std::unique_ptr<float[]> table = [] {
    auto t = std::make_unique<float[]>(65536);
    for (uint32_t h = 0; h < 65536; ++h) t[h] = fp16_to_f32(static_cast<uint16_t>(h));
    return t;
  }();
  return table.get();
}

}  // namespace detail

matrix_view make_matrix(dtype type, const void* data, int64_t rows, int64_t cols) {
  matrix_view m;
  m.type = type;
  m.data = data;
  m.rows = rows;
  m.cols = cols;
  if (auto l = layout_of(type)) m.row_bytes = bytes_of(*l, static_cast<uint64_t>(cols));
  return m;
}

const char* to_string(cpu_isa x) {
  switch (x) {
    case cpu_isa::scalar:
      return "scalar";
    case cpu_isa::avx2:
      return "avx2";
    case cpu_isa::avx512:
      return "avx512";
  }
  return "unknown";
}

cpu_isa detected_isa() {
  static const cpu_isa isa = detect();
  return isa;
}

cpu_isa active_isa() {
  return active().load(std::memory_order_relaxed);
}

void use_isa(cpu_isa x) {
  active().store(std::min(x, detected_isa()), std::memory_order_relaxed);
}

namespace reference {

float dot_row(const matrix_view& w, int64_t r, const float* x) {
  const char* row = static_cast<const char*>(w.data) + r * static_cast<int64_t>(w.row_bytes);
  float acc[16] = {};
  switch (w.type) {
    case dtype::f32: {
      const float* f = reinterpret_cast<const float*>(row);
      for (int64_t j = 0; j < w.cols; ++j) acc[j % 16] = std::fma(f[j], x[j], acc[j % 16]);
      break;
    }
    case dtype::f16:
      for (int64_t j = 0; j < w.cols; ++j)
        acc[j % 16] = std::fma(fp16_to_f32(load_u16(row + 2 * j)), x[j], acc[j % 16]);
      break;
    case dtype::bf16:
      for (int64_t j = 0; j < w.cols; ++j)
        acc[j % 16] = std::fma(bf16_to_f32(load_u16(row + 2 * j)), x[j], acc[j % 16]);
      break;
    case dtype::q8_0: {
      const block_q8_0* blocks = reinterpret_cast<const block_q8_0*>(row);
      for (int64_t k = 0; k < w.cols / q8_0_block; ++k) {
        const block_q8_0& b = blocks[k];
        const float d = fp16_to_f32(b.d);
        const float* xk = x + k * q8_0_block;
        for (int l = 0; l < 16; ++l) {
          const float lo = static_cast<float>(b.qs[l]) * xk[l];
          const float p = std::fma(static_cast<float>(b.qs[l + 16]), xk[l + 16], lo);
          acc[l] = std::fma(d, p, acc[l]);
        }
      }
      break;
    }
    default:
      die("dot_row", w.type);
  }
  return reduce16(acc);
}

float dot_f32(const float* a, const float* b, int64_t n) {
  float acc[16] = {};
  for (int64_t j = 0; j < n; ++j) acc[j % 16] = std::fma(a[j], b[j], acc[j % 16]);
  return reduce16(acc);
}

}  // namespace reference

void matmul(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
            int64_t r0, int64_t r1) {
  if (!dtype_supported(w.type)) die("matmul", w.type);
  switch (active_isa()) {
    case cpu_isa::avx512:
      return detail::avx512::matmul(w, x, ldx, nb, y, ldy, r0, r1);
    case cpu_isa::avx2:
      return detail::avx2::matmul(w, x, ldx, nb, y, ldy, r0, r1);
    case cpu_isa::scalar:
      break;
  }
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t b = 0; b < nb; ++b) y[b * ldy + r] = reference::dot_row(w, r, x + b * ldx);
}

void matmul(thread_pool& pool, const matrix_view& w, const float* x, int64_t ldx, int64_t nb,
            float* y, int64_t ldy) {
  // Multiples of 16 rows keep every part on the kernels' 4-row tiles.
  pool.parallel_for(
      w.rows, [&](int64_t r0, int64_t r1) { matmul(w, x, ldx, nb, y, ldy, r0, r1); }, 16);
}

void dequantize_row(const matrix_view& w, int64_t r, float* out) {
  const char* row = static_cast<const char*>(w.data) + r * static_cast<int64_t>(w.row_bytes);
  switch (w.type) {
    case dtype::f32:
      std::memcpy(out, row, static_cast<size_t>(w.cols) * 4);
      return;
    case dtype::f16:
      for (int64_t j = 0; j < w.cols; ++j) out[j] = fp16_to_f32(load_u16(row + 2 * j));
      return;
    case dtype::bf16:
      for (int64_t j = 0; j < w.cols; ++j) out[j] = bf16_to_f32(load_u16(row + 2 * j));
      return;
    case dtype::q8_0: {
      const block_q8_0* blocks = reinterpret_cast<const block_q8_0*>(row);
      for (int64_t k = 0; k < w.cols / q8_0_block; ++k) {
        const float d = fp16_to_f32(blocks[k].d);
        for (int l = 0; l < q8_0_block; ++l)
          out[k * q8_0_block + l] = d * static_cast<float>(blocks[k].qs[l]);
      }
      return;
    }
    default:
      die("dequantize_row", w.type);
  }
}

void quantize_row(dtype type, const float* x, int64_t n, void* out) {
  switch (type) {
    case dtype::f32:
      std::memcpy(out, x, static_cast<size_t>(n) * 4);
      return;
    case dtype::f16:
    case dtype::bf16: {
      char* o = static_cast<char*>(out);
      for (int64_t j = 0; j < n; ++j) {
        const uint16_t h = type == dtype::f16 ? f32_to_fp16(x[j]) : f32_to_bf16(x[j]);
        std::memcpy(o + 2 * j, &h, 2);
      }
      return;
    }
    case dtype::q8_0: {
      // As ggml's quantize_row_q8_0_ref: d = amax / 127, q = roundf(x * (1 / d)).
      block_q8_0* blocks = static_cast<block_q8_0*>(out);
      for (int64_t k = 0; k < n / q8_0_block; ++k) {
        const float* xk = x + k * q8_0_block;
        float amax = 0.0f;
        for (int l = 0; l < q8_0_block; ++l) amax = std::max(amax, std::fabs(xk[l]));
        const float d = amax / 127.0f;
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        blocks[k].d = f32_to_fp16(d);
        for (int l = 0; l < q8_0_block; ++l)
          blocks[k].qs[l] = static_cast<int8_t>(std::round(xk[l] * id));
      }
      return;
    }
    default:
      die("quantize_row", type);
  }
}

float dot_f32(const float* a, const float* b, int64_t n) {
  switch (active_isa()) {
    case cpu_isa::avx512:
      return detail::avx512::dot_f32(a, b, n);
    case cpu_isa::avx2:
      return detail::avx2::dot_f32(a, b, n);
    case cpu_isa::scalar:
      break;
  }
  return reference::dot_f32(a, b, n);
}

void axpy_f32(float* y, float a, const float* x, int64_t n) {
  switch (active_isa()) {
    case cpu_isa::avx512:
      return detail::avx512::axpy_f32(y, a, x, n);
    case cpu_isa::avx2:
      return detail::avx2::axpy_f32(y, a, x, n);
    case cpu_isa::scalar:
      break;
  }
  for (int64_t i = 0; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

void rmsnorm(float* out, const float* x, const float* weight, int64_t n, float eps) {
  // As llama.cpp: scale = 1 / sqrt(mean(x^2) + eps), then (x * scale) * weight.
  const float mean = dot_f32(x, x, n) / static_cast<float>(n);
  const float scale = 1.0f / std::sqrt(mean + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = (x[i] * scale) * weight[i];
}

void softmax(float* x, int64_t n) {
  if (n <= 0) return;
  const float mx = *std::max_element(x, x + n);
  float acc[16] = {};
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] - mx);
    acc[i % 16] = acc[i % 16] + x[i];
  }
  const float inv = 1.0f / reduce16(acc);
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] * inv;
}

void silu_mul(float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) gate[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
}

void rope(float* x, int n_heads, int head_dim, int64_t pos, float theta) {
  // As ggml's rope cache: theta_i = pos * theta_scale^i, accumulated by multiplication in float.
  const float theta_scale = std::pow(theta, -2.0f / static_cast<float>(head_dim));
  float angle = static_cast<float>(pos);
  for (int i = 0; i < head_dim; i += 2) {
    const float c = std::cos(angle);
    const float s = std::sin(angle);
    for (int h = 0; h < n_heads; ++h) {
      float* p = x + static_cast<int64_t>(h) * head_dim + i;
      const float x0 = p[0];
      const float x1 = p[1];
      p[0] = x0 * c - x1 * s;
      p[1] = x0 * s + x1 * c;
    }
    angle *= theta_scale;
  }
}

double measure_memory_bandwidth(thread_pool& pool, size_t bytes) {
  const size_t lines = std::max<size_t>(bytes / 64, 1);
  bytes = lines * 64;
  std::unique_ptr<char[], void (*)(char*)> buf(
      static_cast<char*>(::operator new[](bytes, std::align_val_t{64})),
      [](char* p) { ::operator delete[](p, std::align_val_t{64}); });
  // First touch by the threads that read later, so pages sit near them.
  pool.parallel_for(
      static_cast<int64_t>(lines),
      [&](int64_t b, int64_t e) { std::memset(buf.get() + b * 64, 1, (e - b) * 64); }, 64);
  const cpu_isa isa = active_isa();
  std::atomic<uint64_t> sink{0};
  double best = 0.0;
  for (int pass = 0; pass < 5; ++pass) {
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(
        static_cast<int64_t>(lines),
        [&](int64_t b, int64_t e) {
          const char* p = buf.get() + b * 64;
          const size_t len = static_cast<size_t>(e - b) * 64;
          uint64_t s = 0;
          if (isa == cpu_isa::avx512) {
            s = detail::avx512::stream_sum(p, len);
          } else if (isa == cpu_isa::avx2) {
            s = detail::avx2::stream_sum(p, len);
          } else {
            const uint64_t* q = reinterpret_cast<const uint64_t*>(p);
            for (size_t i = 0; i < len / 8; ++i) s += q[i];
          }
          sink.fetch_add(s, std::memory_order_relaxed);
        },
        64);
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (secs > 0) best = std::max(best, static_cast<double>(bytes) / secs);
  }
  return best;
}

}  // namespace keel
