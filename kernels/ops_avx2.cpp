// AVX2 inner kernels. The canonical order (see ops.cpp) maps onto two ymm registers per dot
// product: `lo` holds partial sums acc[0..7], `hi` holds acc[8..15].

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/detail/ops_simd.hpp"

namespace keel::detail::avx2 {
namespace {

struct acc16 {
  __m256 lo = _mm256_setzero_ps();
  __m256 hi = _mm256_setzero_ps();
};

// The fixed reduction tree: widths 8, 4, 2, 1, each acc[l] = acc[l] + acc[l + width].
inline float reduce(acc16 a) {
  __m256 s8 = _mm256_add_ps(a.lo, a.hi);
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

inline float reduce(float* a) {
  for (int width = 8; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) a[l] = a[l] + a[l + width];
  return a[0];
}

template <dtype T>
inline float w_at(const char* row, int64_t j) {
  if constexpr (T == dtype::f32) {
    return reinterpret_cast<const float*>(row)[j];
  } else {
    // Not dtype.hpp's inline converters: an out-of-line copy of those compiled here with AVX2
    // could be the one the linker keeps for the scalar translation units.
    uint16_t h;
    std::memcpy(&h, row + 2 * j, 2);
    if constexpr (T == dtype::f16) return _cvtsh_ss(h);
    uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
}

inline __m256 widen_bf16(const char* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Weight elements [j, j + 16) of a row, converted exactly to f32.
template <dtype T>
inline void load_w(const char* row, int64_t j, __m256& lo, __m256& hi) {
  if constexpr (T == dtype::f32) {
    lo = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + j);
    hi = _mm256_loadu_ps(reinterpret_cast<const float*>(row) + j + 8);
  } else if constexpr (T == dtype::f16) {
    lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * j)));
    hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * j + 16)));
  } else {
    lo = widen_bf16(row + 2 * j);
    hi = widen_bf16(row + 2 * j + 16);
  }
}

// Software prefetch of the weight rows that come next, spread evenly over a tile's iterations, so
// a matrix larger than the caches streams in while every input group computes (see ops_avx512).
struct prefetcher {
  const char* p = nullptr;  // next line to prefetch
  int64_t lines = 0;        // lines to issue over `iters` iterations
  int64_t iters = 1;
  int64_t credit = 0;

  prefetcher() = default;
  prefetcher(const char* begin, int64_t bytes, int64_t n_iters)
      : p(begin), lines((bytes + 63) / 64), iters(n_iters > 0 ? n_iters : 1) {}

  inline void step() {
    credit += lines;
    while (credit >= iters) {
      _mm_prefetch(p, _MM_HINT_T1);
      p += 64;
      credit -= iters;
    }
  }
};

// R rows starting at r times B inputs; every weight block is loaded once for the B inputs.
template <dtype T, int R, int B>
void tile(const matrix_view& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r,
          prefetcher pf = {}) {
  const int64_t rb = static_cast<int64_t>(w.row_bytes);
  const char* base = static_cast<const char*>(w.data) + r * rb;
  const int64_t n = w.cols;
  acc16 acc[R][B];
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    pf.step();
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      __m256 wlo, whi;
      load_w<T>(base + i * rb, j, wlo, whi);
#pragma GCC unroll 4
      for (int b = 0; b < B; ++b) {
        acc[i][b].lo = _mm256_fmadd_ps(wlo, _mm256_loadu_ps(x + b * ldx + j), acc[i][b].lo);
        acc[i][b].hi = _mm256_fmadd_ps(whi, _mm256_loadu_ps(x + b * ldx + j + 8), acc[i][b].hi);
      }
    }
  }
  if (j < n) {  // tail: element t still goes to lane t % 16, in increasing t
    for (int i = 0; i < R; ++i) {
      for (int b = 0; b < B; ++b) {
        alignas(32) float a[16];
        _mm256_store_ps(a, acc[i][b].lo);
        _mm256_store_ps(a + 8, acc[i][b].hi);
        for (int64_t t = j; t < n; ++t)
          a[t % 16] = std::fma(w_at<T>(base + i * rb, t), x[b * ldx + t], a[t % 16]);
        y[b * ldy + r + i] = reduce(a);
      }
    }
    return;
  }
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 4
    for (int b = 0; b < B; ++b) y[b * ldy + r + i] = reduce(acc[i][b]);
}

// Four rows against B inputs, with at most four dot products in flight (16 ymm registers). The
// tiles share out the prefetch of [pf, pf + pf_bytes).
template <dtype T, int B>
void rows4(const matrix_view& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t r,
           const char* pf, int64_t pf_bytes) {
  constexpr int R = B == 1 ? 4 : B == 2 ? 2 : 1;
  const int64_t iters = w.cols / 16;
  for (int i = 0; i < 4; i += R) {
    const int64_t lo = pf_bytes * i / 4, hi = pf_bytes * (i + R) / 4;
    tile<T, R, B>(w, x, ldx, y, ldy, r + i, prefetcher(pf + lo, hi - lo, iters));
  }
}

template <dtype T>
void matmul_t(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
              int64_t r0, int64_t r1) {
  // Rows outer, inputs inner, so four rows stay in L1/L2 while all inputs pass over them.
  // Each input group prefetches its share of the next four rows.
  const int64_t rb = static_cast<int64_t>(w.row_bytes);
  const int64_t groups = (nb + 3) / 4;
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const char* next = static_cast<const char*>(w.data) + (r + 4) * rb;
    const int64_t pf_bytes = (std::min<int64_t>(r + 8, r1) - (r + 4)) * rb;
    for (int64_t g = 0, b = 0; b < nb; ++g, b += 4) {
      const float* xb = x + b * ldx;
      float* yb = y + b * ldy;
      const int64_t lo = pf_bytes * g / groups, hi = pf_bytes * (g + 1) / groups;
      switch (nb - b < 4 ? nb - b : 4) {
        case 1:
          rows4<T, 1>(w, xb, ldx, yb, ldy, r, next + lo, hi - lo);
          break;
        case 2:
          rows4<T, 2>(w, xb, ldx, yb, ldy, r, next + lo, hi - lo);
          break;
        case 3:
          rows4<T, 3>(w, xb, ldx, yb, ldy, r, next + lo, hi - lo);
          break;
        default:
          rows4<T, 4>(w, xb, ldx, yb, ldy, r, next + lo, hi - lo);
          break;
      }
    }
  }
  for (; r < r1; ++r) {
    for (int64_t b = 0; b < nb; ++b) tile<T, 1, 1>(w, x + b * ldx, ldx, y + b * ldy, ldy, r);
  }
}

}  // namespace

void matmul(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
            int64_t r0, int64_t r1) {
  switch (w.type) {
    case dtype::f32:
      return matmul_t<dtype::f32>(w, x, ldx, nb, y, ldy, r0, r1);
    case dtype::f16:
      return matmul_t<dtype::f16>(w, x, ldx, nb, y, ldy, r0, r1);
    case dtype::bf16:
      return matmul_t<dtype::bf16>(w, x, ldx, nb, y, ldy, r0, r1);
    default:
      return;  // ops.cpp checks the type before dispatching
  }
}

float dot_f32(const float* a, const float* b, int64_t n) {
  acc16 acc;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    acc.lo = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc.lo);
    acc.hi = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc.hi);
  }
  if (j == n) return reduce(acc);
  alignas(32) float s[16];
  _mm256_store_ps(s, acc.lo);
  _mm256_store_ps(s + 8, acc.hi);
  for (; j < n; ++j) s[j % 16] = std::fma(a[j], b[j], s[j % 16]);
  return reduce(s);
}

void axpy_f32(float* y, float a, const float* x, int64_t n) {
  const __m256 av = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] = std::fma(a, x[i], y[i]);
}

uint64_t stream_sum(const void* p, size_t bytes) {
  const __m256i* v = static_cast<const __m256i*>(p);
  const size_t n = bytes / 32;
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 = _mm256_add_epi64(s0, _mm256_load_si256(v + i));
    s1 = _mm256_add_epi64(s1, _mm256_load_si256(v + i + 1));
    s2 = _mm256_add_epi64(s2, _mm256_load_si256(v + i + 2));
    s3 = _mm256_add_epi64(s3, _mm256_load_si256(v + i + 3));
  }
  for (; i < n; ++i) s0 = _mm256_add_epi64(s0, _mm256_load_si256(v + i));
  s0 = _mm256_add_epi64(_mm256_add_epi64(s0, s1), _mm256_add_epi64(s2, s3));
  alignas(32) uint64_t l[4];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), s0);
  return l[0] + l[1] + l[2] + l[3];
}

int64_t fma_burst(int64_t iters) {
  __m256 acc[8];
  for (auto& a : acc) a = _mm256_setzero_ps();
  const __m256 m = _mm256_set1_ps(0.999f), c = _mm256_set1_ps(1e-3f);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 8
    for (auto& a : acc) a = _mm256_fmadd_ps(a, m, c);
  __m256 t = acc[0];
  for (int k = 1; k < 8; ++k) t = _mm256_add_ps(t, acc[k]);
  volatile float sink = _mm256_cvtss_f32(t);
  (void)sink;
  return iters * 8 * 8;
}

}  // namespace keel::detail::avx2
