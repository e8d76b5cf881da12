// AVX-512 inner kernels. The canonical order (see ops.cpp) maps onto one zmm register per dot
// product: lane l of the register is partial sum acc[l].

// GCC 12's AVX-512 headers self-initialise "undefined" registers (`__m512 __Y = __Y;`), which
// trips -Wuninitialized once inlined (GCC bug 105593, fixed in 12.3).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>

#include "kernels/detail/ops_simd.hpp"

namespace keel::detail::avx512 {
namespace {

// The fixed reduction tree: widths 8, 4, 2, 1, each acc[l] = acc[l] + acc[l + width].
inline float reduce(__m512 v) {
  __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// Weight elements [j, j + 16) of a row, converted exactly to f32; lanes outside `k` are zero.
template <dtype T>
inline __m512 load_w(const char* row, int64_t j, __mmask16 k) {
  if constexpr (T == dtype::f32) {
    return _mm512_maskz_loadu_ps(k, reinterpret_cast<const float*>(row) + j);
  } else {
    __m256i h = _mm256_maskz_loadu_epi16(k, reinterpret_cast<const uint16_t*>(row) + j);
    if constexpr (T == dtype::f16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

template <dtype T>
inline __m512 load_w(const char* row, int64_t j) {
  if constexpr (T == dtype::f32) {
    return _mm512_loadu_ps(reinterpret_cast<const float*>(row) + j);
  } else {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 2 * j));
    if constexpr (T == dtype::f16) {
      return _mm512_cvtph_ps(h);
    } else {
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
  }
}

// Software prefetch of the weight rows that come next, spread evenly over a tile's iterations:
// a weight matrix larger than the caches is streamed while the current rows are computed on,
// instead of only while the first input group passes over them. Prefetches never change results.
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
          prefetcher pf) {
  const char* base = static_cast<const char*>(w.data) + r * static_cast<int64_t>(w.row_bytes);
  const int64_t rb = static_cast<int64_t>(w.row_bytes);
  const int64_t n = w.cols;
  __m512 acc[R][B];
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) acc[i][b] = _mm512_setzero_ps();

  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    pf.step();
    __m512 xv[B];
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) xv[b] = _mm512_loadu_ps(x + b * ldx + j);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      __m512 wv = load_w<T>(base + i * rb, j);
#pragma GCC unroll 8
      for (int b = 0; b < B; ++b) acc[i][b] = _mm512_fmadd_ps(wv, xv[b], acc[i][b]);
    }
  }
  if (j < n) {  // tail: element j still goes to lane j % 16; other lanes keep their value
    const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1);
    for (int i = 0; i < R; ++i) {
      __m512 wv = load_w<T>(base + i * rb, j, k);
      for (int b = 0; b < B; ++b) {
        __m512 xv = _mm512_maskz_loadu_ps(k, x + b * ldx + j);
        acc[i][b] = _mm512_mask3_fmadd_ps(wv, xv, acc[i][b], k);
      }
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
    for (int b = 0; b < B; ++b) y[b * ldy + r + i] = reduce(acc[i][b]);
}

// Inputs in groups of 4 against R rows, so the rows stay in L1/L2 across the groups. Each
// group's tile prefetches its share of the `pf_bytes` bytes that follow the rows, so the next
// rows stream in while all the groups compute, not only while the first one does.
template <dtype T, int R>
void rows(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
          int64_t r, int64_t pf_bytes) {
  const char* next = static_cast<const char*>(w.data) + (r + R) * static_cast<int64_t>(w.row_bytes);
  const int64_t iters = w.cols / 16;
  const int64_t groups = (nb + 3) / 4;
  for (int64_t g = 0, b = 0; b < nb; ++g, b += 4) {
    const float* xb = x + b * ldx;
    float* yb = y + b * ldy;
    const int64_t lo = pf_bytes * g / groups, hi = pf_bytes * (g + 1) / groups;
    const prefetcher pf(next + lo, hi - lo, iters);
    switch (nb - b < 4 ? nb - b : 4) {
      case 1:
        tile<T, R, 1>(w, xb, ldx, yb, ldy, r, pf);
        break;
      case 2:
        tile<T, R, 2>(w, xb, ldx, yb, ldy, r, pf);
        break;
      case 3:
        tile<T, R, 3>(w, xb, ldx, yb, ldy, r, pf);
        break;
      default:
        tile<T, R, 4>(w, xb, ldx, yb, ldy, r, pf);
        break;
    }
  }
}

template <dtype T>
void matmul_t(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
              int64_t r0, int64_t r1) {
  const int64_t rb = static_cast<int64_t>(w.row_bytes);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4)
    rows<T, 4>(w, x, ldx, nb, y, ldy, r, (std::min<int64_t>(r + 8, r1) - (r + 4)) * rb);
  for (; r < r1; ++r) rows<T, 1>(w, x, ldx, nb, y, ldy, r, 0);
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
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
  if (j < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1);
    acc = _mm512_mask3_fmadd_ps(_mm512_maskz_loadu_ps(k, a + j), _mm512_maskz_loadu_ps(k, b + j),
                                acc, k);
  }
  return reduce(acc);
}

void axpy_f32(float* y, float a, const float* x, int64_t n) {
  const __m512 av = _mm512_set1_ps(a);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(y + i, _mm512_fmadd_ps(av, _mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
  if (i < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - i)) - 1);
    __m512 r =
        _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(k, x + i), _mm512_maskz_loadu_ps(k, y + i));
    _mm512_mask_storeu_ps(y + i, k, r);
  }
}

uint64_t stream_sum(const void* p, size_t bytes) {
  const __m512i* v = static_cast<const __m512i*>(p);
  const size_t n = bytes / 64;
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  size_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 = _mm512_add_epi64(s0, _mm512_load_si512(v + i));
    s1 = _mm512_add_epi64(s1, _mm512_load_si512(v + i + 1));
    s2 = _mm512_add_epi64(s2, _mm512_load_si512(v + i + 2));
    s3 = _mm512_add_epi64(s3, _mm512_load_si512(v + i + 3));
  }
  for (; i < n; ++i) s0 = _mm512_add_epi64(s0, _mm512_load_si512(v + i));
  s0 = _mm512_add_epi64(_mm512_add_epi64(s0, s1), _mm512_add_epi64(s2, s3));
  return static_cast<uint64_t>(_mm512_reduce_add_epi64(s0));
}

int64_t fma_burst(int64_t iters) {
  __m512 acc[8];
  for (auto& a : acc) a = _mm512_setzero_ps();
  const __m512 m = _mm512_set1_ps(0.999f), c = _mm512_set1_ps(1e-3f);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 8
    for (auto& a : acc) a = _mm512_fmadd_ps(a, m, c);
  __m512 t = acc[0];
  for (int k = 1; k < 8; ++k) t = _mm512_add_ps(t, acc[k]);
  alignas(64) float l[16];
  _mm512_store_ps(l, t);
  volatile float sink = l[0];
  (void)sink;
  return iters * 8 * 16;
}

}  // namespace keel::detail::avx512
