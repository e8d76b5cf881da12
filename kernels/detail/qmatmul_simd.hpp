#pragma once

// The integer kernel on 256-bit vectors, included by one translation unit per way of forming
// four-product sums: qmatmul_avx2.cpp (vpmaddubsw + vpmaddwd), qmatmul_avxvnni.cpp and
// qmatmul_avx512vnni.cpp (vpdpbusd). Before including, define KEEL_QDOT as 0, 1 or 2 for those
// three and open the namespace the functions go in. Every variant computes the exact integers of
// the canonical order and the same float steps, so all give the same bits as qdot() in
// kblock.cpp.

#include <immintrin.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "kernels/detail/qmatmul.hpp"

namespace {

using keel::dtype;
using keel::detail::kgroup;
using keel::detail::kprops;
using keel::detail::xgroup;

inline __m256i load256(const void* p) {
  return _mm256_load_si256(static_cast<const __m256i*>(p));
}

// acc + per int32 lane, the sum of the four products of its bytes (unsigned u times signed s).
// With vpmaddubsw a pair of products must fit in int16: true for every weight but q8_0's biased
// bytes, which take the SIGNED path: it recovers q - 128 and multiplies its magnitude by x with
// q's sign, so no offset is left to subtract.
template <bool SIGNED>
inline __m256i dot_add(__m256i acc, __m256i u, __m256i s) {
  if constexpr (SIGNED) {
    const __m256i q = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
    u = _mm256_sign_epi8(q, q);
    s = _mm256_sign_epi8(s, q);
  }
#if KEEL_QDOT == 0
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#elif KEEL_QDOT == 1
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_dpbusd_epi32(acc, u, s);
#endif
}

// How a type's integer factors look: all 1 (the 32-element types), one per block (q4_k, q5_k:
// sc0 == sc1), or one per half-block (q2_k, q3_k, q6_k). The integers are the same either way;
// the first two skip work that cannot change them. The last two are the K-quants, whose float
// step is per super-block (group).
enum scale_kind { sc_none, sc_block, sc_half };

// The exact integers of one group of eight blocks of one row against NB inputs: lane b of
// isum[i] is block b's I with input i, of msum[i] its M (MIN only). The weight bytes are loaded
// once for all NB inputs.
template <int OFF, bool MIN, int SC, int NB>
inline void group_ints(const kgroup& w, const xgroup* const* x, int64_t g, __m256i* isum,
                       __m256i* msum) {
#if KEEL_QDOT == 0
  constexpr bool signed_path = OFF == 7;
#else
  constexpr bool signed_path = false;
#endif
  constexpr bool halves = SC == sc_half;
  // Rows 0-3 of the transposed bytes are elements 0..15 of every block, rows 4-7 16..31.
  __m256i p0[NB], p1[NB];
  if constexpr (NB == 1) {
    // One input: four independent chains of dot products instead of one or two, so that
    // consecutive groups overlap less on the instruction's latency.
    const xgroup& xi = x[0][g];
    __m256i c[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) {
      c[k] =
          dot_add<signed_path>(_mm256_setzero_si256(), load256(w.q[2 * k]), load256(xi.q[2 * k]));
      c[k] = dot_add<signed_path>(c[k], load256(w.q[2 * k + 1]), load256(xi.q[2 * k + 1]));
    }
    p0[0] = _mm256_add_epi32(c[0], c[1]);
    p1[0] = _mm256_add_epi32(c[2], c[3]);
    if constexpr (!halves) p0[0] = _mm256_add_epi32(p0[0], p1[0]);
  } else {
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) p0[i] = p1[i] = _mm256_setzero_si256();
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256i w0 = load256(w.q[j]), w1 = load256(w.q[j + 4]);
#pragma GCC unroll 4
      for (int i = 0; i < NB; ++i) {
        const xgroup& xi = x[i][g];
        p0[i] = dot_add<signed_path>(p0[i], w0, load256(xi.q[j]));
        if constexpr (halves) {
          p1[i] = dot_add<signed_path>(p1[i], w1, load256(xi.q[j + 4]));
        } else {
          p0[i] = dot_add<signed_path>(p0[i], w1, load256(xi.q[j + 4]));
        }
      }
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) {
    const xgroup& xi = x[i][g];
    if constexpr (halves) {
      if constexpr (OFF >= 0 && !signed_path) {
        p0[i] = _mm256_sub_epi32(p0[i], _mm256_slli_epi32(load256(xi.s0), OFF));
        p1[i] = _mm256_sub_epi32(p1[i], _mm256_slli_epi32(load256(xi.s1), OFF));
      }
      isum[i] = _mm256_add_epi32(_mm256_mullo_epi32(load256(w.sc0), p0[i]),
                                 _mm256_mullo_epi32(load256(w.sc1), p1[i]));
    } else {
      if constexpr (OFF >= 0 && !signed_path)
        p0[i] = _mm256_sub_epi32(p0[i], _mm256_slli_epi32(load256(xi.sum), OFF));
      isum[i] = SC == sc_block ? _mm256_mullo_epi32(load256(w.sc0), p0[i]) : p0[i];
    }
    if constexpr (MIN) msum[i] = _mm256_madd_epi16(load256(w.mn), load256(xi.sp));
  }
}

// A group of a 32-element type against NB inputs, added to acc[i]: the float step of every
// block in its lane.
template <int OFF, bool MIN, int SC, int NB>
inline void group_dot(const kgroup& w, const xgroup* const* x, int64_t g, __m256* acc) {
  __m256i isum[NB], msum[NB];
  group_ints<OFF, MIN, SC, NB>(w, x, g, isum, msum);
  const __m256 s = _mm256_load_ps(w.s);
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) {
    const __m256 dx = _mm256_load_ps(x[i][g].d);
    acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(s, dx), _mm256_cvtepi32_ps(isum[i]), acc[i]);
    if constexpr (MIN) {
      const __m256 td = _mm256_mul_ps(_mm256_load_ps(w.t), dx);
      acc[i] = _mm256_fmadd_ps(td, _mm256_cvtepi32_ps(msum[i]), acc[i]);
    }
  }
}

inline float reduce16(__m256 lo, __m256 hi) {
  // acc[l] + acc[l + 8], then widths 4, 2, 1, as the scalar tree.
  const __m256 s8 = _mm256_add_ps(lo, hi);
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  const __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// Lane j of the result: the sum of the eight lanes of v_j, given h[k] = hadd(v_2k, v_2k+1).
inline __m256i hsum8_pairs(const __m256i* h) {
  // ab: the sums of lanes 0-3 of v_0 .. v_3 in its low half, of lanes 4-7 in its high half.
  const __m256i ab = _mm256_hadd_epi32(h[0], h[1]), cd = _mm256_hadd_epi32(h[2], h[3]);
  return _mm256_add_epi32(_mm256_permute2x128_si256(ab, cd, 0x20),
                          _mm256_permute2x128_si256(ab, cd, 0x31));
}

// Lane j of the result: the sum of the eight lanes of v[j].
inline __m256i hsum8(const __m256i* v) {
  const __m256i h[4] = {_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]),
                        _mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7])};
  return hsum8_pairs(h);
}

// The float steps of eight consecutive super-blocks g0 .. g0 + 7 (g0 a multiple of 8) of one
// row with one input, into `acc` (canonical lanes g0 % 16 .. + 7): I and M are their exact
// integers, sd and td the products s * dx and t * dx (0 for super-blocks past the row's end,
// whose I and M are 0 too, so that their lanes add nothing).
template <bool MIN>
inline __m256 super_steps(__m256 acc, __m256i i8, __m256i m8, __m256 sd, __m256 td) {
  acc = _mm256_fmadd_ps(sd, _mm256_cvtepi32_ps(i8), acc);
  if constexpr (MIN) acc = _mm256_fmadd_ps(td, _mm256_cvtepi32_ps(m8), acc);
  return acc;
}

// Super-blocks g0 .. g0 + n - 1 (n <= 8, g0 a multiple of 8) of one row (`w` its decoded
// groups from g0) against NB inputs, added to acc[i] (the half of input i's 16 lanes that holds
// lanes g0 % 16 ..): their integers, then one float step each. `s` and `t` are the row's scales
// and `dx[i]` input i's, per super-block from g0, eight of each (zero past n).
template <int OFF, bool MIN, int SC, int NB>
inline void supers8(const kgroup* w, const xgroup* const* x, int64_t g0, int n, const float* s,
                    const float* t, const float* const* dx, __m256* const* acc) {
  // Pairs of super-blocks go through one horizontal add as they come, to keep few vectors live.
  __m256i ih[NB][4], mh[NB][4];
  for (int jp = 0; jp < 4; ++jp) {
    __m256i i0[NB], m0[NB], i1[NB], m1[NB];
    for (int i = 0; i < NB; ++i) i0[i] = m0[i] = i1[i] = m1[i] = _mm256_setzero_si256();
    if (2 * jp < n) group_ints<OFF, MIN, SC, NB>(w[2 * jp], x, g0 + 2 * jp, i0, m0);
    if (2 * jp + 1 < n) group_ints<OFF, MIN, SC, NB>(w[2 * jp + 1], x, g0 + 2 * jp + 1, i1, m1);
    for (int i = 0; i < NB; ++i) {
      ih[i][jp] = _mm256_hadd_epi32(i0[i], i1[i]);
      if constexpr (MIN) mh[i][jp] = _mm256_hadd_epi32(m0[i], m1[i]);
    }
  }
  const __m256 sv = _mm256_loadu_ps(s);
  const __m256 tv = MIN ? _mm256_loadu_ps(t) : _mm256_setzero_ps();
  for (int i = 0; i < NB; ++i) {
    const __m256 d = _mm256_loadu_ps(dx[i]);
    *acc[i] = super_steps<MIN>(*acc[i], hsum8_pairs(ih[i]),
                               MIN ? hsum8_pairs(mh[i]) : _mm256_setzero_si256(),
                               _mm256_mul_ps(sv, d), _mm256_mul_ps(tv, d));
  }
}

// Row `w` against NB inputs: y[i * ldy] = the dot product with input i.
template <int OFF, bool MIN, int SC, int NB>
void row_dot(const kgroup* w, const xgroup* const* x, int64_t groups, float* y, int64_t ldy) {
  __m256 lo[NB], hi[NB];
  for (int i = 0; i < NB; ++i) lo[i] = hi[i] = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 2 <= groups; g += 2) {
    group_dot<OFF, MIN, SC, NB>(w[g], x, g, lo);
    group_dot<OFF, MIN, SC, NB>(w[g + 1], x, g + 1, hi);
  }
  if (g < groups) group_dot<OFF, MIN, SC, NB>(w[g], x, g, lo);
  for (int i = 0; i < NB; ++i) y[i * ldy] = reduce16(lo[i], hi[i]);
}

// Decoders of whole groups for the common types, into the same kgroup bytes as
// keel::detail::decode_row (which the others use). A K-quant super-block is one group.

inline void store256(void* p, __m256i v) {
  _mm256_store_si256(static_cast<__m256i*>(p), v);
}

// out[j], lane b: the 32-bit element j of v[b] (an 8 x 8 transpose of 32-bit elements).
inline void transpose8(const __m256i* v, __m256i* out) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    out[j] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x20);
    out[j + 4] = _mm256_permute2x128_si256(u[j], u[j + 4], 0x31);
  }
}

// Stores eight blocks (v[b] = block b's 32 bytes) transposed in units of four bytes: row j of
// `q` gets the j-th four bytes of each block.
inline void store_transposed(const __m256i* v, uint8_t (*q)[32]) {
  __m256i t[8], u[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm256_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm256_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm256_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm256_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    store256(q[j], _mm256_permute2x128_si256(u[j], u[j + 4], 0x20));
    store256(q[j + 4], _mm256_permute2x128_si256(u[j], u[j + 4], 0x31));
  }
}

inline float half(uint16_t h) {
  return _cvtsh_ss(h);
}

inline void fill_floats(float* p, float v) {
  _mm256_store_ps(p, _mm256_set1_ps(v));
}

// The eight 6-bit scales and mins of a Q4_K/Q5_K super-block (keel::k4_scale_min, four at a
// time in 32-bit words) as bytes 0-7 of `sc` and `mn`.
inline void k4_bytes(const uint8_t* s, __m128i& sc, __m128i& mn) {
  uint32_t a[3];
  std::memcpy(a, s, 12);
  const uint32_t sc_lo = a[0] & 0x3f3f3f3fu;
  const uint32_t mn_lo = a[1] & 0x3f3f3f3fu;
  const uint32_t sc_hi = (a[2] & 0x0f0f0f0fu) | (((a[0] >> 6) & 0x03030303u) << 4);
  const uint32_t mn_hi = ((a[2] >> 4) & 0x0f0f0f0fu) | (((a[1] >> 6) & 0x03030303u) << 4);
  sc = _mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), 0, 0);
  mn = _mm_setr_epi32(static_cast<int>(mn_lo), static_cast<int>(mn_hi), 0, 0);
}

// The same into sc0, sc1 and the min pairs of a decoded group.
inline void k4_scales(const uint8_t* s, kgroup& g) {
  __m128i sc, mn;
  k4_bytes(s, sc, mn);
  const __m256i sc32 = _mm256_cvtepu8_epi32(sc);
  store256(g.sc0, sc32);
  store256(g.sc1, sc32);
  store256(g.mn, _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn, mn)));
}

void decode_q4_k(const keel::block_q4_k& x, kgroup& g) {
  const __m256i low4 = _mm256_set1_epi8(15);
  __m256i q[8];
  for (int p = 0; p < 4; ++p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qs + 32 * p));
    q[2 * p] = _mm256_and_si256(v, low4);
    q[2 * p + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
  }
  store_transposed(q, g.q);
  k4_scales(x.scales, g);
  fill_floats(g.s, half(x.d));
  fill_floats(g.t, -half(x.dmin));
}

void decode_q5_k(const keel::block_q5_k& x, kgroup& g) {
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i bit4 = _mm256_set1_epi8(16);
  const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qh));
  __m256i q[8];
  for (int p = 0; p < 4; ++p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qs + 32 * p));
    // Bit b of qh, moved to bit 4: shift left by 4 - b or right by b - 4 (16-bit lanes; the
    // mask drops what crossed from the neighbouring byte).
    const int b0 = 2 * p, b1 = 2 * p + 1;
    const __m256i h0 = b0 <= 4 ? _mm256_slli_epi16(qh, 4 - b0) : _mm256_srli_epi16(qh, b0 - 4);
    const __m256i h1 = b1 <= 4 ? _mm256_slli_epi16(qh, 4 - b1) : _mm256_srli_epi16(qh, b1 - 4);
    q[b0] = _mm256_or_si256(_mm256_and_si256(v, low4), _mm256_and_si256(h0, bit4));
    q[b1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 4), low4),
                            _mm256_and_si256(h1, bit4));
  }
  store_transposed(q, g.q);
  k4_scales(x.scales, g);
  fill_floats(g.s, half(x.d));
  fill_floats(g.t, -half(x.dmin));
}

void decode_q6_k(const keel::block_q6_k& x, kgroup& g) {
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i two = _mm256_set1_epi8(3);
  __m256i q[8];
  for (int h = 0; h < 2; ++h) {
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.ql + 64 * h));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.ql + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qh + 32 * h));
    const __m256i lows[4] = {_mm256_and_si256(l0, low4), _mm256_and_si256(l1, low4),
                             _mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                             _mm256_and_si256(_mm256_srli_epi16(l1, 4), low4)};
    const __m256i highs[4] = {
        _mm256_slli_epi16(_mm256_and_si256(qh, two), 4),
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2), two), 4),
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 4), two), 4),
        _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 6), two), 4)};
    for (int j = 0; j < 4; ++j) q[4 * h + j] = _mm256_or_si256(lows[j], highs[j]);
  }
  store_transposed(q, g.q);
  store256(g.sc0, _mm256_cvtepi8_epi32(_mm_setr_epi8(
                      x.scales[0], x.scales[2], x.scales[4], x.scales[6], x.scales[8], x.scales[10],
                      x.scales[12], x.scales[14], 0, 0, 0, 0, 0, 0, 0, 0)));
  store256(g.sc1, _mm256_cvtepi8_epi32(_mm_setr_epi8(
                      x.scales[1], x.scales[3], x.scales[5], x.scales[7], x.scales[9], x.scales[11],
                      x.scales[13], x.scales[15], 0, 0, 0, 0, 0, 0, 0, 0)));
  store256(g.mn, _mm256_setzero_si256());
  fill_floats(g.s, half(x.d));
  store256(g.t, _mm256_setzero_si256());
}

// The 32 bytes 0x10 or 0 by bit i of the little-endian word at `qh` (a q5_0/q5_1 fifth bit).
inline __m256i fifth_bits(const uint8_t* qh) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  const __m256i spread =
      _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(h)),
                          _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                           2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3));
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
  return _mm256_and_si256(set, _mm256_set1_epi8(16));
}

// The 32 nibbles of 16 bytes: low nibbles first (elements 0..15), then high ones.
inline __m256i nibbles(const uint8_t* qs) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(15));
}

// Blocks [k0, k0 + n) (n <= 8) of a row of a 32-element type into one group; unused blocks
// are zero.
template <dtype T>
void decode_small(const char* row, int64_t k0, int n, kgroup& g) {
  using block = std::conditional_t<
      T == dtype::q8_0, keel::block_q8_0,
      std::conditional_t<T == dtype::q4_0, keel::block_q4_0,
                         std::conditional_t<T == dtype::q4_1, keel::block_q4_1,
                                            std::conditional_t<T == dtype::q5_0, keel::block_q5_0,
                                                               keel::block_q5_1>>>>;
  constexpr bool has_m = T == dtype::q4_1 || T == dtype::q5_1;
  alignas(32) float s[8] = {}, t[8] = {};
  __m256i q[8];
  for (int b = 0; b < 8; ++b) {
    if (b >= n) {
      q[b] = _mm256_setzero_si256();
      continue;
    }
    const block& x = reinterpret_cast<const block*>(row)[k0 + b];
    if constexpr (T == dtype::q8_0) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qs));
      q[b] = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));
    } else if constexpr (T == dtype::q4_0 || T == dtype::q4_1) {
      q[b] = nibbles(x.qs);
    } else {
      q[b] = _mm256_or_si256(nibbles(x.qs), fifth_bits(x.qh));
    }
    s[b] = half(x.d);
    if constexpr (has_m) t[b] = half(x.m);
  }
  store_transposed(q, g.q);
  const __m256i used =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const __m256i ones = _mm256_and_si256(_mm256_set1_epi32(1), used);
  store256(g.sc0, ones);
  store256(g.sc1, ones);
  // mn pairs (1, 1) as 16-bit halves of each used lane.
  store256(g.mn,
           has_m ? _mm256_and_si256(_mm256_set1_epi32(0x00010001), used) : _mm256_setzero_si256());
  _mm256_store_ps(g.s, _mm256_load_ps(s));
  _mm256_store_ps(g.t, _mm256_load_ps(t));
}

void decode_q2_k(const keel::block_q2_k& x, kgroup& g) {
  const __m256i two = _mm256_set1_epi8(3);
  __m256i q[8];
  for (int h = 0; h < 2; ++h) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qs + 32 * h));
    q[4 * h] = _mm256_and_si256(v, two);
    q[4 * h + 1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), two);
    q[4 * h + 2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), two);
    q[4 * h + 3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), two);
  }
  store_transposed(q, g.q);
  // Group scales: low nibbles of bytes 2b and 2b + 1; mins: their high nibbles, as the 16-bit
  // pairs the min term's vpmaddwd takes.
  const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x.scales));
  const __m128i low = _mm_and_si128(sc, _mm_set1_epi8(15));
  const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  store256(g.sc0, _mm256_cvtepu8_epi32(_mm_shuffle_epi8(low, even)));
  store256(g.sc1, _mm256_cvtepu8_epi32(_mm_shuffle_epi8(low, odd)));
  store256(g.mn, _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sc, 4), _mm_set1_epi8(15))));
  fill_floats(g.s, half(x.d));
  fill_floats(g.t, -half(x.dmin));
}

void decode_q3_k(const keel::block_q3_k& x, kgroup& g) {
  const __m256i two = _mm256_set1_epi8(3);
  const __m256i four = _mm256_set1_epi8(4);
  const __m256i hm = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.hmask));
  __m256i q[8];
  for (int h = 0; h < 2; ++h) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x.qs + 32 * h));
    for (int j = 0; j < 4; ++j) {
      const int b = 4 * h + j;
      // Bit b of hmask to bit 2 (16-bit shifts; the mask keeps the byte's own bit).
      const __m256i hb = b <= 2 ? _mm256_slli_epi16(hm, 2 - b) : _mm256_srli_epi16(hm, b - 2);
      q[b] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(v, 2 * j), two),
                             _mm256_and_si256(hb, four));
    }
  }
  store_transposed(q, g.q);
  alignas(16) uint8_t sc[16];
  keel::q3_k_scales(x.scales, sc);
  const __m128i v =
      _mm_sub_epi8(_mm_load_si128(reinterpret_cast<const __m128i*>(sc)), _mm_set1_epi8(32));
  const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  store256(g.sc0, _mm256_cvtepi8_epi32(_mm_shuffle_epi8(v, even)));
  store256(g.sc1, _mm256_cvtepi8_epi32(_mm_shuffle_epi8(v, odd)));
  store256(g.mn, _mm256_setzero_si256());
  fill_floats(g.s, half(x.d));
  store256(g.t, _mm256_setzero_si256());
}

template <dtype T>
void decode_blocks(const char* row, int64_t blocks, kgroup* out) {
  for (int64_t g = 0; 8 * g < blocks; ++g)
    decode_small<T>(row, 8 * g, static_cast<int>(std::min<int64_t>(8, blocks - 8 * g)), out[g]);
}

void decode(const keel::matrix_view& w, int64_t r, kgroup* out) {
  const char* row = static_cast<const char*>(w.data) + r * static_cast<int64_t>(w.row_bytes);
  const int64_t groups = keel::detail::groups_of(w.cols);
  const int64_t blocks = w.cols / 32;
  switch (w.type) {
    case dtype::q4_k:
      for (int64_t g = 0; g < groups; ++g)
        decode_q4_k(reinterpret_cast<const keel::block_q4_k*>(row)[g], out[g]);
      return;
    case dtype::q5_k:
      for (int64_t g = 0; g < groups; ++g)
        decode_q5_k(reinterpret_cast<const keel::block_q5_k*>(row)[g], out[g]);
      return;
    case dtype::q6_k:
      for (int64_t g = 0; g < groups; ++g)
        decode_q6_k(reinterpret_cast<const keel::block_q6_k*>(row)[g], out[g]);
      return;
    case dtype::q2_k:
      for (int64_t g = 0; g < groups; ++g)
        decode_q2_k(reinterpret_cast<const keel::block_q2_k*>(row)[g], out[g]);
      return;
    case dtype::q3_k:
      for (int64_t g = 0; g < groups; ++g)
        decode_q3_k(reinterpret_cast<const keel::block_q3_k*>(row)[g], out[g]);
      return;
    case dtype::q8_0:
      return decode_blocks<dtype::q8_0>(row, blocks, out);
    case dtype::q4_0:
      return decode_blocks<dtype::q4_0>(row, blocks, out);
    case dtype::q4_1:
      return decode_blocks<dtype::q4_1>(row, blocks, out);
    case dtype::q5_0:
      return decode_blocks<dtype::q5_0>(row, blocks, out);
    case dtype::q5_1:
      return decode_blocks<dtype::q5_1>(row, blocks, out);
    default:
      keel::detail::decode_row(w, r, out);
      return;
  }
}

// Q2_K and Q3_K with one to three inputs (with any number on 256-bit vectors): rows decoded
// four at a time; then, for each run of eight super-blocks, every input (four at a time) meets
// every row of the tile, so that the inputs' run stays in L1, and the eight block lanes of each
// super-block are summed horizontally. Each output still adds its super-blocks in increasing
// order.
struct alignas(32) lanes16 {
  __m256 h[2];  // canonical lanes 0-7 and 8-15
};

template <class T>
T* thread_buffer(size_t n) {
  thread_local std::vector<T> buf;
  if (buf.size() < n) buf.resize(n);
  return buf.data();
}

template <int OFF, bool MIN, int SC>
void rows_by_tile(const keel::matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  constexpr int tile_rows = 4;
  const int64_t groups = keel::detail::groups_of(w.cols);
  const int64_t padded = (groups + 7) / 8 * 8;  // scales per row or input, zero past `groups`
  kgroup* tile = keel::detail::weight_scratch(groups * tile_rows);
  float* scales = thread_buffer<float>(static_cast<size_t>(padded * (2 * tile_rows + nb)));
  float* st = scales + padded * tile_rows;  // the tile's t, after its s
  float* xd = scales + 2 * padded * tile_rows;
  std::fill(scales, scales + padded * (2 * tile_rows + nb), 0.0f);
  for (int64_t b = 0; b < nb; ++b)
    for (int64_t g = 0; g < groups; ++g) xd[b * padded + g] = x[b * groups + g].d[0];
  lanes16* acc = thread_buffer<lanes16>(static_cast<size_t>(tile_rows * nb));
  for (int64_t r = r0; r < r1; r += tile_rows) {
    const int rows = static_cast<int>(std::min<int64_t>(tile_rows, r1 - r));
    for (int i = 0; i < rows; ++i) {
      kgroup* row = tile + i * groups;
      decode(w, r + i, row);
      for (int64_t g = 0; g < groups; ++g) {
        scales[i * padded + g] = row[g].s[0];
        st[i * padded + g] = row[g].t[0];
      }
    }
    for (int64_t k = 0; k < rows * nb; ++k) acc[k].h[0] = acc[k].h[1] = _mm256_setzero_ps();
    for (int64_t g0 = 0; g0 < groups; g0 += 8) {
      const int n = static_cast<int>(std::min<int64_t>(8, groups - g0));
      const int half = static_cast<int>((g0 / 8) % 2);
      int64_t b = 0;
      for (; b + 4 <= nb; b += 4) {
        const xgroup* xs[4] = {x + b * groups, x + (b + 1) * groups, x + (b + 2) * groups,
                               x + (b + 3) * groups};
        const float* ds[4] = {xd + b * padded + g0, xd + (b + 1) * padded + g0,
                              xd + (b + 2) * padded + g0, xd + (b + 3) * padded + g0};
        for (int i = 0; i < rows; ++i) {
          __m256* as[4] = {&acc[i * nb + b].h[half], &acc[i * nb + b + 1].h[half],
                           &acc[i * nb + b + 2].h[half], &acc[i * nb + b + 3].h[half]};
          supers8<OFF, MIN, SC, 4>(tile + i * groups + g0, xs, g0, n, scales + i * padded + g0,
                                   st + i * padded + g0, ds, as);
        }
      }
      for (; b < nb; ++b) {
        const xgroup* xs[1] = {x + b * groups};
        const float* ds[1] = {xd + b * padded + g0};
        for (int i = 0; i < rows; ++i) {
          __m256* as[1] = {&acc[i * nb + b].h[half]};
          supers8<OFF, MIN, SC, 1>(tile + i * groups + g0, xs, g0, n, scales + i * padded + g0,
                                   st + i * padded + g0, ds, as);
        }
      }
    }
    for (int i = 0; i < rows; ++i)
      for (int64_t b = 0; b < nb; ++b)
        y[b * ldy + r + i] = reduce16(acc[i * nb + b].h[0], acc[i * nb + b].h[1]);
  }
}

// One row at a time: decoded into L1 and used at once by every input (four at a time).
template <int OFF, bool MIN, int SC>
void rows_by_group(const keel::matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy,
                   int64_t r0, int64_t r1) {
  const int64_t groups = keel::detail::groups_of(w.cols);
  kgroup* row = keel::detail::weight_scratch(groups);
  for (int64_t r = r0; r < r1; ++r) {
    decode(w, r, row);
    // Inputs four at a time (one decoded row, four quantised inputs, in L1).
    int64_t b = 0;
    for (; b + 4 <= nb; b += 4) {
      const xgroup* xs[4] = {x + b * groups, x + (b + 1) * groups, x + (b + 2) * groups,
                             x + (b + 3) * groups};
      row_dot<OFF, MIN, SC, 4>(row, xs, groups, y + b * ldy + r, ldy);
    }
    for (; b < nb; ++b) {
      const xgroup* xs[1] = {x + b * groups};
      row_dot<OFF, MIN, SC, 1>(row, xs, groups, y + b * ldy + r, ldy);
    }
  }
}
// Fewer than four inputs, Q4_K, Q5_K and Q6_K: each super-block is decoded in registers and
// multiplied at once, in the format's own order (block b = elements 32b .. 32b + 31), against the
// input un-transposed into that order. Per block, vpmaddubsw forms 16-bit pair sums (at most
// 2 * 63 * 127 < 2^15) and a 16-bit multiply-add by the block's or half-block's scale adds them
// into 32-bit lanes (exact), so that the lanes of the super-block total its I.
struct alignas(32) xnat {
  int8_t q[256];
  int16_t s16[16];  // sum of each half-block
  int16_t s8[8];    // sum of each block
  float d;
};

// An input's groups (super-blocks) in the format's order (the transposition is its own inverse).
void natural_inputs(const xgroup* x, int64_t groups, xnat* out) {
  for (int64_t g = 0; g < groups; ++g) {
    __m256i v[8];
    for (int j = 0; j < 8; ++j) v[j] = load256(x[g].q[j]);
    uint8_t(*q)[32] = reinterpret_cast<uint8_t(*)[32]>(out[g].q);
    store_transposed(v, q);
    std::memcpy(out[g].s16, x[g].sp, sizeof out[g].s16);
    for (int b = 0; b < 8; ++b) out[g].s8[b] = static_cast<int16_t>(x[g].sum[b]);
    out[g].d = x[g].d[0];
  }
}

// acc + per 32-bit lane, the two products of the 16-bit pairs of a and s.
inline __m256i madd_add(__m256i acc, __m256i a, __m256i s) {
#if KEEL_QDOT == 0
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a, s));
#elif KEEL_QDOT == 1
  return _mm256_dpwssd_avx_epi32(acc, a, s);
#else
  return _mm256_dpwssd_epi32(acc, a, s);
#endif
}

inline __m256i pairs(__m256i q, const int8_t* x) {
  return _mm256_maddubs_epi16(q, load256(x));
}

// The eight 6-bit scales of a Q4_K/Q5_K super-block as 16-bit values, in both 128-bit halves
// (for an in-lane byte shuffle per block), and its eight mins as 16-bit values.
inline void k4_scales16(const uint8_t* s, __m256i& scales, __m128i& mins) {
  __m128i sc, mn;
  k4_bytes(s, sc, mn);
  scales = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sc));
  mins = _mm_cvtepu8_epi16(mn);
}

// The byte shuffle that spreads 16-bit element e of each 128-bit half over that half.
inline __m256i spread16(int e) {
  return _mm256_set1_epi16(static_cast<int16_t>(0x0100 * (2 * e + 1) + 2 * e));
}

// Q4_K and Q5_K (FIVE): lanes of isum total I, of msum M.
template <bool FIVE>
inline void super_q45(const uint8_t* base, const xnat& x, __m256i& isum, __m256i& msum) {
  const uint8_t* scales = base + 4;
  const uint8_t* qh = base + 16;
  const uint8_t* qs = base + (FIVE ? 48 : 16);
  __m256i sc;
  __m128i mins;
  k4_scales16(scales, sc, mins);
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i bit4 = _mm256_set1_epi8(16);
  __m256i h = FIVE ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh)) : low4;
  __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * p));
    __m256i q0 = _mm256_and_si256(v, low4);
    __m256i q1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
    if constexpr (FIVE) {
      // Bits 2p and 2p + 1 of qh to bit 4 (the mask drops what crossed from the next byte).
      q0 = _mm256_or_si256(q0, _mm256_and_si256(_mm256_slli_epi16(h, 4), bit4));
      q1 = _mm256_or_si256(q1, _mm256_and_si256(_mm256_slli_epi16(h, 3), bit4));
      h = _mm256_srli_epi16(h, 2);
    }
    acc[0] = madd_add(acc[0], pairs(q0, x.q + 64 * p), _mm256_shuffle_epi8(sc, spread16(2 * p)));
    acc[1] = madd_add(acc[1], pairs(q1, x.q + 64 * p + 32),
                      _mm256_shuffle_epi8(sc, spread16(2 * p + 1)));
  }
  isum = _mm256_add_epi32(acc[0], acc[1]);
  msum = _mm256_zextsi128_si256(
      _mm_madd_epi16(mins, _mm_load_si128(reinterpret_cast<const __m128i*>(x.s8))));
}

// Q6_K: q in 0..63 with offset 32 and signed 8-bit scales per half-block:
// I = sum sc_j P_j - 32 sum sc_j S_j.
inline void super_q6(const keel::block_q6_k& b, const xnat& x, __m256i& isum, __m256i& msum) {
  const __m256i low4 = _mm256_set1_epi8(15);
  const __m256i hi2 = _mm256_set1_epi8(0x30);
  // The sixteen scales as 16-bit values: even half-blocks in the low 128 bits, odd in the high,
  // so that one in-lane byte shuffle gives block b's [sc_2b x 8 | sc_2b+1 x 8].
  const __m256i sc16 =
      _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b.scales)));
  const __m256i eo = _mm256_permute4x64_epi64(
      _mm256_shuffle_epi8(
          sc16, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5,
                                 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15)),
      0xd8);
  __m256i acc[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
#pragma GCC unroll 2
  for (int h = 0; h < 2; ++h) {
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ql + 64 * h));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.ql + 64 * h + 32));
    const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b.qh + 32 * h));
    const __m256i q[4] = {_mm256_or_si256(_mm256_and_si256(l0, low4),
                                          _mm256_and_si256(_mm256_slli_epi16(qh, 4), hi2)),
                          _mm256_or_si256(_mm256_and_si256(l1, low4),
                                          _mm256_and_si256(_mm256_slli_epi16(qh, 2), hi2)),
                          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                                          _mm256_and_si256(qh, hi2)),
                          _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                          _mm256_and_si256(_mm256_srli_epi16(qh, 2), hi2))};
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const int k = 4 * h + j;
      acc[j % 2] =
          madd_add(acc[j % 2], pairs(q[j], x.q + 32 * k), _mm256_shuffle_epi8(eo, spread16(k)));
    }
  }
  const __m256i off = _mm256_slli_epi32(
      _mm256_madd_epi16(sc16, _mm256_load_si256(reinterpret_cast<const __m256i*>(x.s16))), 5);
  isum = _mm256_sub_epi32(_mm256_add_epi32(acc[0], acc[1]), off);
  msum = _mm256_setzero_si256();
}

// One row of a Q4_K, Q5_K or Q6_K matrix against one input in natural order.
template <dtype T>
float row_dot_nat(const char* row, const xnat* x, int64_t groups) {
  constexpr bool min = T != dtype::q6_k;
  using block =
      std::conditional_t<T == dtype::q4_k, keel::block_q4_k,
                         std::conditional_t<T == dtype::q5_k, keel::block_q5_k, keel::block_q6_k>>;
  const block* w = reinterpret_cast<const block*>(row);
  __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
  for (int64_t g0 = 0; g0 < groups; g0 += 8) {
    const int n = static_cast<int>(std::min<int64_t>(8, groups - g0));
    __m256i iv[8], mv[8];
    alignas(32) float s[8] = {}, t[8] = {}, dx[8] = {};
    for (int j = 0; j < 8; ++j) {
      if (j >= n) {
        iv[j] = mv[j] = _mm256_setzero_si256();
        continue;
      }
      const block& b = w[g0 + j];
      if constexpr (T == dtype::q6_k) {
        super_q6(b, x[g0 + j], iv[j], mv[j]);
      } else {
        super_q45<T == dtype::q5_k>(reinterpret_cast<const uint8_t*>(&b), x[g0 + j], iv[j], mv[j]);
        t[j] = -half(b.dmin);
      }
      s[j] = half(b.d);
      dx[j] = x[g0 + j].d;
    }
    const __m256 d = _mm256_load_ps(dx);
    acc[(g0 / 8) % 2] =
        super_steps<min>(acc[(g0 / 8) % 2], hsum8(iv), min ? hsum8(mv) : _mm256_setzero_si256(),
                         _mm256_mul_ps(_mm256_load_ps(s), d), _mm256_mul_ps(_mm256_load_ps(t), d));
  }
  return reduce16(acc[0], acc[1]);
}

template <dtype T>
void rows_fused(const keel::matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy,
                int64_t r0, int64_t r1) {
  const int64_t groups = keel::detail::groups_of(w.cols);
  xnat* xn = thread_buffer<xnat>(static_cast<size_t>(groups * nb));
  for (int64_t b = 0; b < nb; ++b) natural_inputs(x + b * groups, groups, xn + b * groups);
  for (int64_t r = r0; r < r1; ++r) {
    const char* row = static_cast<const char*>(w.data) + r * static_cast<int64_t>(w.row_bytes);
    for (int64_t b = 0; b < nb; ++b) y[b * ldy + r] = row_dot_nat<T>(row, xn + b * groups, groups);
  }
}

#if KEEL_QDOT == 2
// AVX-512: one 512-bit vector covers two groups, g (lanes 0-7) and g + 1 (lanes 8-15), which
// are exactly the canonical lanes k % 16 of blocks 8g .. 8g + 15 (g even). The inputs are first
// copied into pairs of groups laid out that way (once per call, for all rows); the weights are
// paired as they are loaded.
struct alignas(64) xpair {
  int8_t q[8][64];
  int32_t s0[16], s1[16], sum[16];
  int16_t sp[16][2];
  float d[16];
};

xpair* pair_scratch(int64_t n) {
  thread_local std::unique_ptr<xpair[]> buf;
  thread_local int64_t cap = 0;
  if (n > cap) {
    buf = std::make_unique<xpair[]>(static_cast<size_t>(n));
    cap = n;
  }
  return buf.get();
}

// Pairs of groups of `x` (groups of them; an odd last one is paired with zeros).
void pair_inputs(const xgroup* x, int64_t groups, xpair* out) {
  for (int64_t p = 0; 2 * p < groups; ++p) {
    xpair& o = out[p];
    std::memset(static_cast<void*>(&o), 0, sizeof o);
    for (int h = 0; h < 2 && 2 * p + h < groups; ++h) {
      const xgroup& g = x[2 * p + h];
      for (int j = 0; j < 8; ++j) std::memcpy(o.q[j] + 32 * h, g.q[j], 32);
      std::memcpy(o.s0 + 8 * h, g.s0, 32);
      std::memcpy(o.s1 + 8 * h, g.s1, 32);
      std::memcpy(o.sum + 8 * h, g.sum, 32);
      std::memcpy(o.sp + 8 * h, g.sp, 32);
      std::memcpy(o.d + 8 * h, g.d, 32);
    }
  }
}

inline __m512i pair_load(const void* a, const void* b) {
  return _mm512_inserti64x4(_mm512_castsi256_si512(load256(a)), load256(b), 1);
}
inline __m512 pair_load_ps(const float* a, const float* b) {
  return _mm512_castsi512_ps(pair_load(a, b));
}
inline __m512i load512(const void* p) {
  return _mm512_load_si512(p);
}

// Groups g and g + 1 of one row (w0, w1) against NB inputs' pairs, added to acc[i].
template <int OFF, bool MIN, int SC, int NB>
inline void pair_dot(const kgroup& w0, const kgroup& w1, const xpair* const* x, int64_t p,
                     __m512* acc) {
  constexpr bool halves = SC == sc_half;
  __m512i p0[NB], p1[NB];
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) p0[i] = p1[i] = _mm512_setzero_si512();
#pragma GCC unroll 4
  for (int j = 0; j < 4; ++j) {
    const __m512i a = pair_load(w0.q[j], w1.q[j]), c = pair_load(w0.q[j + 4], w1.q[j + 4]);
#pragma GCC unroll 4
    for (int i = 0; i < NB; ++i) {
      const xpair& xi = x[i][p];
      p0[i] = _mm512_dpbusd_epi32(p0[i], a, load512(xi.q[j]));
      if constexpr (halves) {
        p1[i] = _mm512_dpbusd_epi32(p1[i], c, load512(xi.q[j + 4]));
      } else {
        p0[i] = _mm512_dpbusd_epi32(p0[i], c, load512(xi.q[j + 4]));
      }
    }
  }
  const __m512 s = pair_load_ps(w0.s, w1.s);
  const __m512i sc0 = pair_load(w0.sc0, w1.sc0);
  const __m512i sc1 = halves ? pair_load(w0.sc1, w1.sc1) : sc0;
  const __m512i mn = MIN ? pair_load(w0.mn, w1.mn) : _mm512_setzero_si512();
  const __m512 t = MIN ? pair_load_ps(w0.t, w1.t) : _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int i = 0; i < NB; ++i) {
    const xpair& xi = x[i][p];
    __m512i isum;
    if constexpr (halves) {
      if constexpr (OFF >= 0) {
        p0[i] = _mm512_sub_epi32(p0[i], _mm512_slli_epi32(load512(xi.s0), OFF));
        p1[i] = _mm512_sub_epi32(p1[i], _mm512_slli_epi32(load512(xi.s1), OFF));
      }
      isum = _mm512_add_epi32(_mm512_mullo_epi32(sc0, p0[i]), _mm512_mullo_epi32(sc1, p1[i]));
    } else {
      if constexpr (OFF >= 0)
        p0[i] = _mm512_sub_epi32(p0[i], _mm512_slli_epi32(load512(xi.sum), OFF));
      isum = SC == sc_block ? _mm512_mullo_epi32(sc0, p0[i]) : p0[i];
    }
    const __m512 dx = _mm512_load_ps(xi.d);
    acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(s, dx), _mm512_cvtepi32_ps(isum), acc[i]);
    if constexpr (MIN) {
      const __m512i msum = _mm512_madd_epi16(mn, load512(xi.sp));
      acc[i] = _mm512_fmadd_ps(_mm512_mul_ps(t, dx), _mm512_cvtepi32_ps(msum), acc[i]);
    }
  }
}

// Rows are decoded kTile at a time; then for each pair of groups, every row of the tile meets
// every input (four at a time), so a pair's weights and inputs are loaded from L1 while the
// partial sums wait in a small buffer. Each output still sums its pairs in increasing order.
constexpr int kTile = 8;

template <int NB>
void zero(__m512* a) {
  for (int i = 0; i < NB; ++i) a[i] = _mm512_setzero_ps();
}

template <int OFF, bool MIN, int SC>
void rows_by_pair(const keel::matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy,
                  int64_t r0, int64_t r1) {
  const int64_t groups = keel::detail::groups_of(w.cols);
  const int64_t pairs = (groups + 1) / 2;
  xpair* xp = pair_scratch(pairs * nb);
  for (int64_t b = 0; b < nb; ++b) pair_inputs(x + b * groups, groups, xp + b * pairs);
  const int64_t stride = 2 * pairs;  // kgroups per decoded row
  const int tile_rows = kTile;
  kgroup* tile = keel::detail::weight_scratch(stride * tile_rows);
  // Partial sums of the tile's outputs, 16 floats each (a vector of __m512 would drop its
  // alignment attribute).
  struct alignas(64) lanes16 {
    float v[16];
  };
  thread_local std::vector<lanes16> acc_buf;
  acc_buf.resize(static_cast<size_t>(tile_rows * nb));
  __m512* acc = reinterpret_cast<__m512*>(acc_buf.data());
  std::vector<const xpair*> xs(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) xs[b] = xp + b * pairs;
  for (int64_t r = r0; r < r1; r += tile_rows) {
    const int n = static_cast<int>(std::min<int64_t>(tile_rows, r1 - r));
    for (int i = 0; i < n; ++i) {
      kgroup* row = tile + i * stride;
      decode(w, r + i, row);
      // An odd last group is paired with zero weights: its lanes add 0 * 0.
      if (groups % 2) std::memset(static_cast<void*>(row + groups), 0, sizeof(kgroup));
    }
    for (int64_t k = 0; k < n * nb; ++k) acc[k] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; ++p) {
      for (int i = 0; i < n; ++i) {
        const kgroup* row = tile + i * stride;
        __m512* a = acc + i * nb;
        int64_t b = 0;
        for (; b + 4 <= nb; b += 4)
          pair_dot<OFF, MIN, SC, 4>(row[2 * p], row[2 * p + 1], xs.data() + b, p, a + b);
        for (; b < nb; ++b)
          pair_dot<OFF, MIN, SC, 1>(row[2 * p], row[2 * p + 1], xs.data() + b, p, a + b);
      }
    }
    for (int i = 0; i < n; ++i)
      for (int64_t b = 0; b < nb; ++b) {
        const __m512 v = acc[i * nb + b];
        y[b * ldy + r + i] =
            reduce16(_mm512_castps512_ps256(v),
                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
      }
  }
}

#endif

// K-quants with four or more inputs: kRows rows at a time (sixteen on AVX-512, eight on 256-bit
// vectors), row r in 32-bit lane r. One super-block of the rows is decoded and transposed into a
// `ktile` (kRows * 256 bytes of weights in L1), then every input meets it: each four input bytes
// are broadcast to all lanes and one four-way byte dot product adds their products with the
// rows' four bytes, so every lane holds one output's sums and no horizontal add is needed. The
// scales are applied per block (or half-block) for all rows at once, and the float steps run on
// the rows' canonical lanes at once. The weights are decoded once for all inputs.
#if KEEL_QDOT == 2
using vint = __m512i;
using vfloat = __m512;
inline vint vload(const void* p) {
  return _mm512_load_si512(p);
}
inline void vstore(void* p, vint v) {
  _mm512_store_si512(p, v);
}
inline vint vzero() {
  return _mm512_setzero_si512();
}
inline vint vset8(int v) {
  return _mm512_set1_epi8(static_cast<char>(v));
}
inline vint vset32(int v) {
  return _mm512_set1_epi32(v);
}
inline vint vand(vint a, vint b) {
  return _mm512_and_si512(a, b);
}
inline vint vor(vint a, vint b) {
  return _mm512_or_si512(a, b);
}
inline vint vsrl16(vint a, int n) {
  return _mm512_srli_epi16(a, n);
}
inline vint vsll16(vint a, int n) {
  return _mm512_slli_epi16(a, n);
}
inline vint vsrl32(vint a, int n) {
  return _mm512_srli_epi32(a, n);
}
inline vint vsll32(vint a, int n) {
  return _mm512_slli_epi32(a, n);
}
inline vint vsra32(vint a, int n) {
  return _mm512_srai_epi32(a, n);
}
inline vint vadd32(vint a, vint b) {
  return _mm512_add_epi32(a, b);
}
inline vint vsub32(vint a, vint b) {
  return _mm512_sub_epi32(a, b);
}
inline vint vmullo32(vint a, vint b) {
  return _mm512_mullo_epi32(a, b);
}
inline vint vdot(vint acc, vint u, vint s) {
  return _mm512_dpbusd_epi32(acc, u, s);
}
inline vint vmadd_add(vint acc, vint a, vint b) {
  return _mm512_dpwssd_epi32(acc, a, b);
}
inline vint vbcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}
inline vfloat vloadf(const float* p) {
  return _mm512_load_ps(p);
}
inline void vstoref(float* p, vfloat v) {
  _mm512_store_ps(p, v);
}
inline vfloat vsetf(float v) {
  return _mm512_set1_ps(v);
}
inline vfloat vmulf(vfloat a, vfloat b) {
  return _mm512_mul_ps(a, b);
}
inline vfloat vaddf(vfloat a, vfloat b) {
  return _mm512_add_ps(a, b);
}
inline vfloat vfmaf(vfloat a, vfloat b, vfloat c) {
  return _mm512_fmadd_ps(a, b, c);
}
inline vfloat vcvtf(vint a) {
  return _mm512_cvtepi32_ps(a);
}

// out[k], lane r: 32-bit element k (k < 8) of the 32 bytes at rows[r] + at, r < 16.
inline void transpose_rows(const char* const* rows, size_t at, vint* out) {
  __m512i z[8], t[8], u[8];
  for (int r = 0; r < 8; ++r)
    z[r] = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + at))),
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r + 8] + at)), 1);
  // As transpose8, in both 256-bit halves at once (rows 0-7 low, 8-15 high).
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(z[2 * i], z[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(z[2 * i], z[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  const __m512i lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
  const __m512i hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  for (int j = 0; j < 4; ++j) {
    out[j] = _mm512_permutex2var_epi64(u[j], lo, u[j + 4]);
    out[j + 4] = _mm512_permutex2var_epi64(u[j], hi, u[j + 4]);
  }
}
#else
using vint = __m256i;
using vfloat = __m256;
inline vint vload(const void* p) {
  return _mm256_load_si256(static_cast<const __m256i*>(p));
}
inline void vstore(void* p, vint v) {
  _mm256_store_si256(static_cast<__m256i*>(p), v);
}
inline vint vzero() {
  return _mm256_setzero_si256();
}
inline vint vset8(int v) {
  return _mm256_set1_epi8(static_cast<char>(v));
}
inline vint vset32(int v) {
  return _mm256_set1_epi32(v);
}
inline vint vand(vint a, vint b) {
  return _mm256_and_si256(a, b);
}
inline vint vor(vint a, vint b) {
  return _mm256_or_si256(a, b);
}
inline vint vsrl16(vint a, int n) {
  return _mm256_srli_epi16(a, n);
}
inline vint vsll16(vint a, int n) {
  return _mm256_slli_epi16(a, n);
}
inline vint vsrl32(vint a, int n) {
  return _mm256_srli_epi32(a, n);
}
inline vint vsll32(vint a, int n) {
  return _mm256_slli_epi32(a, n);
}
inline vint vsra32(vint a, int n) {
  return _mm256_srai_epi32(a, n);
}
inline vint vadd32(vint a, vint b) {
  return _mm256_add_epi32(a, b);
}
inline vint vsub32(vint a, vint b) {
  return _mm256_sub_epi32(a, b);
}
inline vint vmullo32(vint a, vint b) {
  return _mm256_mullo_epi32(a, b);
}
inline vint vdot(vint acc, vint u, vint s) {
  return dot_add<false>(acc, u, s);
}
inline vint vmadd_add(vint acc, vint a, vint b) {
  return madd_add(acc, a, b);
}
inline vint vbcast32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}
inline vfloat vloadf(const float* p) {
  return _mm256_load_ps(p);
}
inline void vstoref(float* p, vfloat v) {
  _mm256_store_ps(p, v);
}
inline vfloat vsetf(float v) {
  return _mm256_set1_ps(v);
}
inline vfloat vmulf(vfloat a, vfloat b) {
  return _mm256_mul_ps(a, b);
}
inline vfloat vaddf(vfloat a, vfloat b) {
  return _mm256_add_ps(a, b);
}
inline vfloat vfmaf(vfloat a, vfloat b, vfloat c) {
  return _mm256_fmadd_ps(a, b, c);
}
inline vfloat vcvtf(vint a) {
  return _mm256_cvtepi32_ps(a);
}

// out[k], lane r: 32-bit element k (k < 8) of the 32 bytes at rows[r] + at, r < 8.
inline void transpose_rows(const char* const* rows, size_t at, vint* out) {
  __m256i z[8];
  for (int r = 0; r < 8; ++r)
    z[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + at));
  transpose8(z, out);
}
#endif

constexpr int kRows = sizeof(vint) / 4;

// On AVX2 the scales multiply 16-bit pair sums (vpmaddwd): a tile holds each as a 16-bit pair.
constexpr bool kPairScales = KEEL_QDOT == 0;

// Lanes of a and b as 16-bit pairs: a's low 16 bits, then b's.
inline vint pair16(vint a, vint b) {
  return vor(vand(a, vset32(0xffff)), vsll32(b, 16));
}

// A scale as a tile holds it.
inline vint scale_form(vint v) {
  return kPairScales ? pair16(v, v) : v;
}

struct alignas(64) ktile {
  int32_t q[8][8][kRows];  // [block][four bytes j][row]: elements 4j .. 4j + 3 of the block
  int32_t sc[16][kRows];   // [half-block][row]: the integer factor (scale_form)
  int32_t mn[8][kRows];    // [block][row]: the min factors of the two halves, as 16-bit pairs
                           // (Q4_K, Q5_K: [c < 4][row] the mins of blocks 2c and 2c + 1)
  int32_t so[8][kRows];    // [block][row]: the two halves' factors as 16-bit pairs (offset term)
  float s[kRows], t[kRows];
};

// Super-block g of a K-quant row, decoded into one group.
inline void decode_super(dtype t, const char* row, int64_t g, kgroup& out) {
  switch (t) {
    case dtype::q4_k:
      return decode_q4_k(reinterpret_cast<const keel::block_q4_k*>(row)[g], out);
    case dtype::q5_k:
      return decode_q5_k(reinterpret_cast<const keel::block_q5_k*>(row)[g], out);
    case dtype::q6_k:
      return decode_q6_k(reinterpret_cast<const keel::block_q6_k*>(row)[g], out);
    case dtype::q2_k:
      return decode_q2_k(reinterpret_cast<const keel::block_q2_k*>(row)[g], out);
    case dtype::q3_k:
      return decode_q3_k(reinterpret_cast<const keel::block_q3_k*>(row)[g], out);
    default:
      return;
  }
}

// The kRows decoded groups `kg` (one super-block of the rows) as a tile (Q2_K, Q3_K).
template <int OFF, bool MIN, int SC>
void make_tile(const kgroup* kg, ktile& k) {
  const char* rows[kRows];
  for (int r = 0; r < kRows; ++r) rows[r] = reinterpret_cast<const char*>(kg + r);
  vint v[8];
  for (int j = 0; j < 8; ++j) {
    transpose_rows(rows, offsetof(kgroup, q) + 32 * j, v);
    for (int b = 0; b < 8; ++b) vstore(k.q[b][j], v[b]);
  }
  vint sc0[8], sc1[8];
  transpose_rows(rows, offsetof(kgroup, sc0), sc0);
  if constexpr (SC == sc_half) transpose_rows(rows, offsetof(kgroup, sc1), sc1);
  for (int b = 0; b < 8; ++b) {
    const vint s1 = SC == sc_half ? sc1[b] : sc0[b];
    vstore(k.sc[2 * b], scale_form(sc0[b]));
    vstore(k.sc[2 * b + 1], scale_form(s1));
    if constexpr (OFF >= 0) vstore(k.so[b], pair16(sc0[b], s1));
  }
  if constexpr (MIN) {
    transpose_rows(rows, offsetof(kgroup, mn), v);
    for (int b = 0; b < 8; ++b) vstore(k.mn[b], v[b]);
  }
  for (int r = 0; r < kRows; ++r) {
    k.s[r] = kg[r].s[0];
    k.t[r] = kg[r].t[0];
  }
}

// Q4_K and Q5_K (FIVE) straight from the rows' super-blocks (rows[r] points at row r's): the raw
// bytes are transposed first, then decoded kRows rows at a time by the same byte operations as
// decode_q4_k / decode_q5_k (piece j of a 32-byte run holds elements 4j .. 4j + 3 of the blocks
// that run encodes).
template <bool FIVE>
void tile_q45(const char* const* rows, ktile& k) {
  vint h[8];
  transpose_rows(rows, 0, h);  // h[0]: d | dmin << 16; h[1..3]: the twelve scale bytes
  // k4_bytes, per lane.
  const vint m6 = vset32(0x3f3f3f3f), m4 = vset32(0x0f0f0f0f);
  const vint m2 = vset32(0x03030303), byte = vset32(0xff);
  const vint sc[2] = {vand(h[1], m6), vor(vand(h[3], m4), vsll32(vand(vsrl32(h[1], 6), m2), 4))};
  const vint mn[2] = {vand(h[2], m6),
                      vor(vand(vsrl32(h[3], 4), m4), vsll32(vand(vsrl32(h[2], 6), m2), 4))};
  for (int b = 0; b < 8; ++b)
    vstore(k.sc[2 * b], scale_form(vand(vsrl32(sc[b / 4], 8 * (b % 4)), byte)));
  // Mins of blocks 2c and 2c + 1: bytes 2c % 4 and the next, widened to 16 bits.
  const vint pair = vset32(0x00ff00ff);
  for (int c = 0; c < 4; ++c) {
    const vint v = c % 2 ? vsrl32(mn[c / 2], 16) : vand(mn[c / 2], vset32(0xffff));
    vstore(k.mn[c], vand(vor(v, vsll32(v, 8)), pair));
  }
#if KEEL_QDOT == 2
  _mm512_store_ps(k.s, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h[0])));
  _mm512_store_ps(
      k.t, _mm512_sub_ps(_mm512_setzero_ps(),
                         _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h[0], 16)))));
#else
  for (int r = 0; r < kRows; ++r) {
    uint16_t d[2];
    std::memcpy(d, rows[r], 4);
    k.s[r] = half(d[0]);
    k.t[r] = -half(d[1]);
  }
#endif
  const vint low4 = vset8(15), bit4 = vset8(16);
  vint qh[8];
  if constexpr (FIVE) transpose_rows(rows, offsetof(keel::block_q5_k, qh), qh);
  constexpr size_t qs = FIVE ? offsetof(keel::block_q5_k, qs) : offsetof(keel::block_q4_k, qs);
  for (int p = 0; p < 4; ++p) {
    vint v[8];
    transpose_rows(rows, qs + 32 * p, v);
    for (int j = 0; j < 8; ++j) {
      vint q0 = vand(v[j], low4);
      vint q1 = vand(vsrl16(v[j], 4), low4);
      if constexpr (FIVE) {
        // Bits 2p and 2p + 1 of qh to bit 4, as decode_q5_k.
        const int b0 = 2 * p, b1 = 2 * p + 1;
        const vint h0 = b0 <= 4 ? vsll16(qh[j], 4 - b0) : vsrl16(qh[j], b0 - 4);
        const vint h1 = b1 <= 4 ? vsll16(qh[j], 4 - b1) : vsrl16(qh[j], b1 - 4);
        q0 = vor(q0, vand(h0, bit4));
        q1 = vor(q1, vand(h1, bit4));
      }
      vstore(k.q[2 * p][j], q0);
      vstore(k.q[2 * p + 1][j], q1);
    }
  }
}

// Q6_K straight from the rows' super-blocks, as tile_q45 (the byte operations of super_q6).
inline void tile_q6(const char* const* rows, ktile& k) {
  const vint low4 = vset8(15), hi2 = vset8(0x30);
  for (int h = 0; h < 2; ++h) {
    vint l0[8], l1[8], qh[8];
    transpose_rows(rows, 64 * h, l0);
    transpose_rows(rows, 64 * h + 32, l1);
    transpose_rows(rows, offsetof(keel::block_q6_k, qh) + 32 * h, qh);
    for (int j = 0; j < 8; ++j) {
      vstore(k.q[4 * h][j], vor(vand(l0[j], low4), vand(vsll16(qh[j], 4), hi2)));
      vstore(k.q[4 * h + 1][j], vor(vand(l1[j], low4), vand(vsll16(qh[j], 2), hi2)));
      vstore(k.q[4 * h + 2][j], vor(vand(vsrl16(l0[j], 4), low4), vand(qh[j], hi2)));
      vstore(k.q[4 * h + 3][j], vor(vand(vsrl16(l1[j], 4), low4), vand(vsrl16(qh[j], 2), hi2)));
    }
  }
  // The sixteen signed scales are bytes 16..31 of the 32 at offset 176 (so as not to read past
  // the block), i.e. pieces 4..7.
  static_assert(offsetof(keel::block_q6_k, scales) == 192);
  vint v[8];
  transpose_rows(rows, 176, v);
  vint sc[16];
  for (int i = 0; i < 16; ++i) sc[i] = vsra32(vsll32(v[4 + i / 4], 24 - 8 * (i % 4)), 24);
  for (int b = 0; b < 8; ++b) {
    vstore(k.sc[2 * b], scale_form(sc[2 * b]));
    vstore(k.sc[2 * b + 1], scale_form(sc[2 * b + 1]));
    vstore(k.so[b], pair16(sc[2 * b], sc[2 * b + 1]));
  }
  for (int r = 0; r < kRows; ++r) {
    k.s[r] = half(reinterpret_cast<const keel::block_q6_k*>(rows[r])->d);
    k.t[r] = 0.0f;
  }
}

// A tile's outputs' sixteen canonical lanes, each a vector over its rows.
struct alignas(64) tile_lanes {
  float v[16][kRows];  // [canonical lane][row]
};

// One tile (super-block g of the rows) against NB inputs (x[i] = input i's groups): the exact I
// and M of each row and input, then their float steps into acc[i] (the canonical lane g % 16 of
// the rows with input i). Each loaded weight vector serves NB inputs. BITS: the weights' width
// (their bytes are below 2^BITS).
template <int OFF, bool MIN, int SC, int BITS, int NB>
inline void tile_dot(const ktile& k, const xgroup* const* x, int64_t g, vfloat* const* acc) {
  vint isum[NB], p[NB];
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) isum[i] = vzero();
  // Half-blocks one at a time (a block's two halves share sc for Q4_K/Q5_K: whole blocks).
  constexpr int halves = SC == sc_half ? 2 : 1;
  constexpr int per = 8 / halves;  // four-byte pieces per scale
#if KEEL_QDOT == 0
  // vpmaddubsw's 16-bit pair sums (at most 2 * 63 * 127) of `chunk` pieces are added in 16 bits
  // while they cannot overflow, then vpmaddwd multiplies them by the scale into 32 bits: exact.
  constexpr int fit = 32767 / (2 * ((1 << BITS) - 1) * 127);
  constexpr int chunk = fit >= per ? per : fit >= 4 ? 4 : fit >= 2 ? 2 : 1;
  static_assert(per % chunk == 0);
#else
  constexpr int chunk = per;
#endif
  for (int h = 0; h < 8 * halves; ++h) {
    const int b = h / halves;
    const vint sc = vload(k.sc[halves == 2 ? h : 2 * b]);
    for (int j0 = (h % halves) * per; j0 < (h % halves + 1) * per; j0 += chunk) {
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i) p[i] = vzero();
#pragma GCC unroll 8
      for (int j = j0; j < j0 + chunk; ++j) {
        const vint w = vload(k.q[b][j]);
#pragma GCC unroll 8
        for (int i = 0; i < NB; ++i) {
#if KEEL_QDOT == 0
          p[i] = _mm256_add_epi16(p[i], _mm256_maddubs_epi16(w, vbcast32(x[i][g].q[j] + 4 * b)));
#else
          p[i] = vdot(p[i], w, vbcast32(x[i][g].q[j] + 4 * b));
#endif
        }
      }
#pragma GCC unroll 8
      for (int i = 0; i < NB; ++i) {
#if KEEL_QDOT == 0
        isum[i] = vmadd_add(isum[i], p[i], sc);
#else
        isum[i] = vadd32(isum[i], vmullo32(p[i], sc));
#endif
      }
    }
  }
  const vfloat s = vloadf(k.s);
  const vfloat t = vloadf(k.t);
#pragma GCC unroll 8
  for (int i = 0; i < NB; ++i) {
    const xgroup& xg = x[i][g];
    if constexpr (OFF >= 0) {
      // I -= offset * sum of sc * S over the half-blocks.
      vint off = vzero();
      for (int b = 0; b < 8; ++b) off = vmadd_add(off, vload(k.so[b]), vbcast32(xg.sp[b]));
      isum[i] = vsub32(isum[i], vsll32(off, OFF));
    }
    const vfloat dx = vsetf(xg.d[0]);
    vfloat a = vfmaf(vmulf(s, dx), vcvtf(isum[i]), *acc[i]);
    if constexpr (MIN) {
      vint m = vzero();
      if constexpr (SC == sc_block) {
        for (int c = 0; c < 4; ++c) m = vmadd_add(m, vload(k.mn[c]), vbcast32(xg.bp[c]));
      } else {
        for (int b = 0; b < 8; ++b) m = vmadd_add(m, vload(k.mn[b]), vbcast32(xg.sp[b]));
      }
      a = vfmaf(vmulf(t, dx), vcvtf(m), a);
    }
    *acc[i] = a;
  }
}

// A super-block of kRows rows (all zero past the range: those lanes are not stored) as a tile.
template <int OFF, bool MIN, int SC>
void load_tile(const keel::matrix_view& w, int64_t r, int n, int64_t g, kgroup* kg, ktile& k) {
  // Zero bytes for the rows past the range (at least a Q6_K block, the largest: 210).
  alignas(64) static const char zero_block[256] = {};
  const auto* data = static_cast<const char*>(w.data);
  const int64_t bytes = static_cast<int64_t>(keel::layout_of(w.type)->block_bytes);
  const char* rows[kRows];
  for (int i = 0; i < kRows; ++i)
    rows[i] = i < n ? data + (r + i) * static_cast<int64_t>(w.row_bytes) + g * bytes : zero_block;
  switch (w.type) {
    case dtype::q4_k:
      return tile_q45<false>(rows, k);
    case dtype::q5_k:
      return tile_q45<true>(rows, k);
    case dtype::q6_k:
      return tile_q6(rows, k);
    default:
      for (int i = 0; i < n; ++i) decode_super(w.type, rows[i] - g * bytes, g, kg[i]);
      return make_tile<OFF, MIN, SC>(kg, k);
  }
}

// Inputs [b, b + NB) against a tile, into their accumulators.
template <int OFF, bool MIN, int SC, int BITS, int NB>
inline void inputs_dot(const ktile& k, const xgroup* x, int64_t groups, int64_t b, int64_t g,
                       tile_lanes* acc) {
  const int lane = static_cast<int>(g % 16);
  const xgroup* xs[NB];
  vfloat* as[NB];
  for (int i = 0; i < NB; ++i) {
    xs[i] = x + (b + i) * groups;
    as[i] = reinterpret_cast<vfloat*>(acc[b + i].v[lane]);
  }
  tile_dot<OFF, MIN, SC, BITS, NB>(k, xs, g, as);
}

// Rows kRows at a time; for each super-block, every input (several at a time) against the tile.
template <int OFF, bool MIN, int SC, int BITS>
void rows_by_ktile(const keel::matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy,
                   int64_t r0, int64_t r1) {
  // As many inputs at a time as the registers hold (16 vector registers below AVX-512).
  constexpr int most = KEEL_QDOT == 2 ? 8 : 4;
  const int64_t groups = keel::detail::groups_of(w.cols);
  kgroup* kg = keel::detail::weight_scratch(kRows);
  ktile* tile = thread_buffer<ktile>(1);
  tile_lanes* acc = thread_buffer<tile_lanes>(static_cast<size_t>(nb));
  for (int64_t r = r0; r < r1; r += kRows) {
    const int n = static_cast<int>(std::min<int64_t>(kRows, r1 - r));
    // Rows past the range stay zero groups: their lanes add 0 and are not stored.
    if (n < kRows) std::memset(static_cast<void*>(kg + n), 0, (kRows - n) * sizeof(kgroup));
    std::memset(static_cast<void*>(acc), 0, static_cast<size_t>(nb) * sizeof(tile_lanes));
    for (int64_t g = 0; g < groups; ++g) {
      load_tile<OFF, MIN, SC>(w, r, n, g, kg, *tile);
      int64_t b = 0;
      for (; b + most <= nb; b += most)
        inputs_dot<OFF, MIN, SC, BITS, most>(*tile, x, groups, b, g, acc);
      for (; b + 4 <= nb; b += 4) inputs_dot<OFF, MIN, SC, BITS, 4>(*tile, x, groups, b, g, acc);
      for (; b < nb; ++b) inputs_dot<OFF, MIN, SC, BITS, 1>(*tile, x, groups, b, g, acc);
    }
    for (int64_t b = 0; b < nb; ++b) {
      vfloat a[16];
      for (int l = 0; l < 16; ++l) a[l] = vloadf(acc[b].v[l]);
      for (int width = 8; width >= 1; width /= 2)
        for (int l = 0; l < width; ++l) a[l] = vaddf(a[l], a[l + width]);
      alignas(64) float out[kRows];
      vstoref(out, a[0]);
      std::memcpy(y + b * ldy + r, out, static_cast<size_t>(n) * sizeof(float));
    }
  }
}

// Fewer than four inputs for the K-quants (four or more go to rows_by_ktile, see qmatmul):
// rows_by_tile. The 32-element types on AVX-512: the groups one by one for few inputs (pairing
// them costs more than it saves when each weight meets fewer than four inputs), else pairs of
// groups and tiles of rows.
template <int OFF, bool MIN, int SC>
void rows(const keel::matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy,
          int64_t r0, int64_t r1) {
  if constexpr (SC != sc_none) return rows_by_tile<OFF, MIN, SC>(w, x, nb, y, ldy, r0, r1);
#if KEEL_QDOT == 2
  if (nb >= 4) return rows_by_pair<OFF, MIN, SC>(w, x, nb, y, ldy, r0, r1);
#endif
  rows_by_group<OFF, MIN, SC>(w, x, nb, y, ldy, r0, r1);
}

}  // namespace

void qmatmul(const keel::matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy,
             int64_t r0, int64_t r1) {
  if (nb < 4) {
    switch (w.type) {
      case dtype::q4_k:
        return rows_fused<dtype::q4_k>(w, x, nb, y, ldy, r0, r1);
      case dtype::q5_k:
        return rows_fused<dtype::q5_k>(w, x, nb, y, ldy, r0, r1);
      case dtype::q6_k:
        return rows_fused<dtype::q6_k>(w, x, nb, y, ldy, r0, r1);
      default:
        break;
    }
  } else {
    switch (w.type) {
      case dtype::q4_k:
        return rows_by_ktile<-1, true, sc_block, 4>(w, x, nb, y, ldy, r0, r1);
      case dtype::q5_k:
        return rows_by_ktile<-1, true, sc_block, 5>(w, x, nb, y, ldy, r0, r1);
#if KEEL_QDOT == 2
      // On 256-bit vectors, decoding Q2_K and Q3_K rows into groups and then into tiles of
      // eight costs more than the horizontal adds it saves: they keep rows_by_tile.
      case dtype::q2_k:
        return rows_by_ktile<-1, true, sc_half, 2>(w, x, nb, y, ldy, r0, r1);
      case dtype::q3_k:
        return rows_by_ktile<2, false, sc_half, 3>(w, x, nb, y, ldy, r0, r1);
#endif
      case dtype::q6_k:
        return rows_by_ktile<5, false, sc_half, 6>(w, x, nb, y, ldy, r0, r1);
      default:
        break;
    }
  }
  switch (w.type) {
    case dtype::q4_0:
      return rows<3, false, sc_none>(w, x, nb, y, ldy, r0, r1);
    case dtype::q5_0:
      return rows<4, false, sc_none>(w, x, nb, y, ldy, r0, r1);
    case dtype::q8_0:
      return rows<7, false, sc_none>(w, x, nb, y, ldy, r0, r1);
    case dtype::q4_1:
    case dtype::q5_1:
      return rows<-1, true, sc_none>(w, x, nb, y, ldy, r0, r1);
    case dtype::q4_k:
    case dtype::q5_k:
      return rows<-1, true, sc_block>(w, x, nb, y, ldy, r0, r1);
    case dtype::q2_k:
      return rows<-1, true, sc_half>(w, x, nb, y, ldy, r0, r1);
    case dtype::q3_k:
      return rows<2, false, sc_half>(w, x, nb, y, ldy, r0, r1);
    case dtype::q6_k:
      return rows<5, false, sc_half>(w, x, nb, y, ldy, r0, r1);
    default:
      return;  // ops.cpp checks the type before dispatching
  }
}

void quantize_input(const float* x, int64_t cols, int span, xgroup* out) {
  // keel::detail::quantize_input on 256-bit vectors: the same amax (a maximum, in any order), d,
  // 1 / d, products and rounding (the current direction, as nearbyint), so the same bytes.
  const int64_t blocks = cols / 32;
  const int64_t groups = keel::detail::groups_of(cols);
  std::memset(static_cast<void*>(out), 0, static_cast<size_t>(groups) * sizeof(xgroup));
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 lo = _mm256_set1_ps(-127.0f), hi = _mm256_set1_ps(127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  float d = 0.0f, id = 0.0f;
  for (int64_t g = 0; g < groups; ++g) {
    xgroup& o = out[g];
    __m256i q[8];
    for (int b = 0; b < 8; ++b) {
      const int64_t k = 8 * g + b;
      if (k >= blocks) {
        q[b] = _mm256_setzero_si256();
        continue;
      }
      const float* xk = x + 32 * k;
      if (k % (span / 32) == 0) {
        __m256 m = _mm256_setzero_ps();
        for (int i = 0; i < span; i += 8)
          m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(xk + i)), m);
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_movehdup_ps(h));
        const float amax = _mm_cvtss_f32(h);
        d = amax / 127.0f;
        id = amax != 0.0f ? 1.0f / d : 0.0f;
      }
      const __m256 vid = _mm256_set1_ps(id);
      __m256i v[4];
      for (int i = 0; i < 4; ++i) {
        const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xk + 8 * i), vid),
                                         _MM_FROUND_CUR_DIRECTION | _MM_FROUND_NO_EXC);
        v[i] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
      }
      // Sums of elements 0..15 and 16..31: lanes 0-3 and 4-7 after two pairwise adds.
      const __m256i h =
          _mm256_hadd_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3]));
      const __m256i h2 = _mm256_hadd_epi32(h, h);
      const int32_t s0 = _mm256_extract_epi32(h2, 0) + _mm256_extract_epi32(h2, 4);
      const int32_t s1 = _mm256_extract_epi32(h2, 1) + _mm256_extract_epi32(h2, 5);
      q[b] = _mm256_permutevar8x32_epi32(
          _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3])),
          order);
      o.set_block(b, s0, s1, d);
    }
    store_transposed(q, reinterpret_cast<uint8_t(*)[32]>(o.q));
  }
}

int64_t macs_burst(int64_t iters) {
  // Eight independent chains of the widest byte dot product this variant has, on constant
  // inputs: the peak rate of integer multiply-adds, for the benchmark's prefill fraction.
#if KEEL_QDOT == 2
  __m512i acc[8];
  for (auto& a : acc) a = _mm512_setzero_si512();
  const __m512i u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(-2);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 8
    for (auto& a : acc) a = _mm512_dpbusd_epi32(a, u, s);
  __m512i t = acc[0];
  for (int k = 1; k < 8; ++k) t = _mm512_add_epi32(t, acc[k]);
  alignas(64) int32_t l[16];
  _mm512_store_si512(l, t);
  volatile int sink = l[0];
  (void)sink;
  return iters * 8 * 64;
#else
  __m256i acc[8];
  for (auto& a : acc) a = _mm256_setzero_si256();
  const __m256i u = _mm256_set1_epi8(3), s = _mm256_set1_epi8(-2);
  for (int64_t i = 0; i < iters; ++i)
#pragma GCC unroll 8
    for (auto& a : acc) a = dot_add<false>(a, u, s);
  __m256i t = acc[0];
  for (int k = 1; k < 8; ++k) t = _mm256_add_epi32(t, acc[k]);
  alignas(32) int32_t l[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(l), t);
  volatile int sink = l[0];
  (void)sink;
  return iters * 8 * 32;
#endif
}
