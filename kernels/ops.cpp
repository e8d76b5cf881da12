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
//  3. Block-quantised rows (Q4_0 ... Q8_0, Q2_K ... Q6_K): integer kernels. A unit is one block
//     of the type: 32 elements (Q4_0 ... Q8_0) or a super-block of 256 (the K-quants). The input
//     is first quantised per unit: amax = max |x|, dx = amax / 127, xq = nearest-even(x * (1/dx))
//     (all 0 when amax = 0), with the sums S0, S1 of xq over each half of each 32-element block.
//     Each weight block of 32 is decoded into kblock form (quants.hpp: unsigned q, offset,
//     integer factors sc[2] and mn[2], floats s and t; the blocks of a super-block share s and t).
//     Then, for units u = 0, 1, ... in increasing order, lane = u % 16:
//       per block of the unit:
//         P0 = sum(i < 16: q[i] * xq[i]) - offset * S0,  P1 likewise over i >= 16   (exact)
//       I = sum over the unit's blocks of sc[0] * P0 + sc[1] * P1                     (exact)
//       M = sum over the unit's blocks of mn[0] * S0 + mn[1] * S1                     (exact)
//       acc[lane] = fma(s * dx, float(I), acc[lane])            (s * dx rounded first)
//       acc[lane] = fma(t * dx, float(M), acc[lane])            (types with a min only)
//     The integer sums may be formed in any order and any width (they are exact), which is what
//     lets AVX2 pairs, VNNI quads and the scalar loop agree bit for bit. They fit in int32: per
//     super-block |I| <= 256 * max|q - offset| * 127 * max|sc|, the largest being Q6_K's
//     256 * 32 * 127 * 128 < 2^28 (Q5_K: 256 * 31 * 127 * 63 < 2^26), and |M| <= 256 * 127 * 63.
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
#include <vector>

#include "kernels/detail/ops_simd.hpp"
#include "kernels/detail/qmatmul.hpp"
#include "kernels/quants.hpp"
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

std::atomic<bool> vnni_allowed{true};

bool has_avx_vnni() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avxvnni");
  }();
  return yes;
}

bool has_avx512_vnni() {
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni");
  }();
  return yes;
}

// Rows [r0, r1) of a block-quantised `w` against inputs already quantised into groups.
void qmatmul(const matrix_view& w, const detail::xgroup* x, int64_t nb, float* y, int64_t ldy,
             int64_t r0, int64_t r1) {
  switch (active_qdot()) {
    case qdot_isa::avx512_vnni:
      return detail::avx512vnni::qmatmul(w, x, nb, y, ldy, r0, r1);
    case qdot_isa::avx_vnni:
      return detail::avxvnni::qmatmul(w, x, nb, y, ldy, r0, r1);
    case qdot_isa::avx2:
      return detail::avx2::qmatmul(w, x, nb, y, ldy, r0, r1);
    case qdot_isa::scalar:
      break;
  }
  detail::qmatmul_scalar(w, x, nb, y, ldy, r0, r1);
}

// The nb input rows quantised for `w` into the calling thread's scratch slot `slot` (by all of
// `pool`'s threads when given: a prefill chunk has many rows), for every row range to share.
const detail::xgroup* quantize_inputs(const matrix_view& w, const float* x, int64_t ldx, int64_t nb,
                                      thread_pool* pool = nullptr, int slot = 0) {
  const int64_t groups = detail::groups_of(w.cols);
  detail::xgroup* q = detail::input_scratch(groups * nb, slot);
  const int span = detail::input_span(w.type);
  auto* round = detail::quantize_input;
  switch (active_qdot()) {
    case qdot_isa::avx512_vnni:
      round = detail::avx512vnni::quantize_input;
      break;
    case qdot_isa::avx_vnni:
      round = detail::avxvnni::quantize_input;
      break;
    case qdot_isa::avx2:
      round = detail::avx2::quantize_input;
      break;
    case qdot_isa::scalar:
      break;
  }
  auto rows = [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) round(x + b * ldx, w.cols, span, q + b * groups);
  };
  if (pool)
    pool->parallel_for(nb, [&](int64_t b0, int64_t b1) { rows(b0, b1); });
  else
    rows(0, nb);
  return q;
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

const char* to_string(qdot_isa x) {
  switch (x) {
    case qdot_isa::scalar:
      return "scalar";
    case qdot_isa::avx2:
      return "avx2";
    case qdot_isa::avx_vnni:
      return "avx-vnni";
    case qdot_isa::avx512_vnni:
      return "avx512-vnni";
  }
  return "unknown";
}

qdot_isa active_qdot() {
  const cpu_isa isa = active_isa();
  if (isa == cpu_isa::scalar) return qdot_isa::scalar;
  if (vnni_allowed.load(std::memory_order_relaxed)) {
    if (isa == cpu_isa::avx512 && has_avx512_vnni()) return qdot_isa::avx512_vnni;
    if (has_avx_vnni()) return qdot_isa::avx_vnni;
  }
  return qdot_isa::avx2;
}

void use_vnni(bool allowed) {
  vnni_allowed.store(allowed, std::memory_order_relaxed);
}

namespace reference {

float dot_row(const matrix_view& w, int64_t r, const float* x) {
  if (is_block_quantized(w.type)) {
    const int64_t groups = detail::groups_of(w.cols);
    std::vector<detail::xgroup> xq(static_cast<size_t>(groups));
    std::vector<detail::kgroup> wq(static_cast<size_t>(groups));
    detail::quantize_input(x, w.cols, detail::input_span(w.type), xq.data());
    detail::decode_row(w, r, wq.data());
    return detail::qdot(wq.data(), xq.data(), groups, detail::props_of(w.type));
  }
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
  if (is_block_quantized(w.type))
    return qmatmul(w, quantize_inputs(w, x, ldx, nb), nb, y, ldy, r0, r1);
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
  const matmul_part part{w, y, ldy};
  matmul(pool, std::span(&part, 1), x, ldx, w.cols, nb);
}

void matmul(thread_pool& pool, std::span<const matmul_part> parts, const float* x, int64_t ldx,
            int64_t cols, int64_t nb) {
  // The inputs rounded by 32 and by 256 elements (input_span), each at most once.
  const detail::xgroup* rounded[2] = {nullptr, nullptr};
  std::vector<const detail::xgroup*> q(parts.size(), nullptr);
  for (size_t k = 0; k < parts.size(); ++k) {
    const matrix_view& w = parts[k].w;
    if (!dtype_supported(w.type)) die("matmul", w.type);
    if (w.cols != cols) {
      std::fprintf(stderr, "keel: matmul: a part has %lld columns, expected %lld\n",
                   static_cast<long long>(w.cols), static_cast<long long>(cols));
      std::abort();
    }
    if (!is_block_quantized(w.type)) continue;
    const int slot = detail::input_span(w.type) == qk_k ? 1 : 0;
    if (!rounded[slot]) rounded[slot] = quantize_inputs(w, x, ldx, nb, &pool, slot);
    q[k] = rounded[slot];
  }
  // Every thread takes its share of every part (rather than a share of the parts' rows laid end
  // to end), so that parts of unequal cost per row (Q4_K and Q6_K in one Q4_K_M layer) stay
  // balanced; shares are whole multiples of 16 rows, which keep the parts on the kernels' row
  // tiles and threads off each other's cache lines of y for nb = 1.
  const int64_t members = pool.size();
  pool.parallel_for(members, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m)
      for (size_t k = 0; k < parts.size(); ++k) {
        const matmul_part& p = parts[k];
        const int64_t grains = (p.w.rows + 15) / 16;
        const int64_t a = std::min(p.w.rows, grains * m / members * 16);
        const int64_t b = std::min(p.w.rows, grains * (m + 1) / members * 16);
        if (a >= b) continue;
        if (q[k])
          qmatmul(p.w, q[k], nb, p.y, p.ldy, a, b);
        else
          matmul(p.w, x, ldx, nb, p.y, p.ldy, a, b);
      }
  });
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
    default:
      if (!is_block_quantized(w.type)) die("dequantize_row", w.type);
      return dequantize_blocks(w.type, row, w.cols, out);
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
    default:
      if (!is_block_quantized(type)) die("quantize_row", type);
      return quantize_blocks(type, x, n, out);
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

void rope(float* x, int n_heads, int head_dim, int64_t pos, float theta, rope_type type,
          const float* freq_factors) {
  // As ggml_rope_cache_init and rotate_pairs: theta_i = pos * theta_scale^i, accumulated by
  // multiplication in float, divided by the pair's frequency factor (freq_scale and mscale are
  // 1 here, so ggml's multiplications by them are exact).
  const float theta_scale = std::pow(theta, -2.0f / static_cast<float>(head_dim));
  const int half = head_dim / 2;
  const int first = type == rope_type::neox ? 1 : 2;      // pair i starts at i * first
  const int offset = type == rope_type::neox ? half : 1;  // and its partner is `offset` later
  float angle = static_cast<float>(pos);
  for (int i = 0; i < half; ++i) {
    const float a = freq_factors != nullptr ? angle / freq_factors[i] : angle;
    const float c = std::cos(a);
    const float s = std::sin(a);
    for (int h = 0; h < n_heads; ++h) {
      float* p = x + static_cast<int64_t>(h) * head_dim + i * first;
      const float x0 = p[0];
      const float x1 = p[offset];
      p[0] = x0 * c - x1 * s;
      p[offset] = x0 * s + x1 * c;
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

double measure_peak_macs(thread_pool& pool, bool integer) {
  const cpu_isa isa = active_isa();
  const qdot_isa q = active_qdot();
  auto burst = [&](int64_t iters) -> int64_t {
    if (integer) {
      switch (q) {
        case qdot_isa::avx512_vnni:
          return detail::avx512vnni::macs_burst(iters);
        case qdot_isa::avx_vnni:
          return detail::avxvnni::macs_burst(iters);
        case qdot_isa::avx2:
          return detail::avx2::macs_burst(iters);
        case qdot_isa::scalar:
          break;
      }
    } else if (isa == cpu_isa::avx512) {
      return detail::avx512::fma_burst(iters);
    } else if (isa == cpu_isa::avx2) {
      return detail::avx2::fma_burst(iters);
    }
    // Scalar: one multiply-add per step, eight chains.
    volatile float a[8] = {};
    for (int64_t i = 0; i < iters; ++i)
      for (auto& v : a) v = std::fma(v, 0.999f, 1e-3f);
    return iters * 8;
  };
  double best = 0;
  for (int pass = 0; pass < 5; ++pass) {
    std::atomic<int64_t> macs{0};
    const auto t0 = std::chrono::steady_clock::now();
    pool.parallel_for(pool.size(), [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) macs.fetch_add(burst(2'000'000), std::memory_order_relaxed);
    });
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    if (secs > 0) best = std::max(best, static_cast<double>(macs.load()) / secs);
  }
  return best;
}

}  // namespace keel
