// The GGUF block types: decoding with exactly the float operations of ggml's dequantize_row_*
// (so Keel's dequantised weights equal llama.cpp's bit for bit), and Keel's own encoders, which
// search each group's scale (and min) for the least weighted squared error. docs/engine.md,
// "Weight types", describes the layouts and the search. Compiled with -ffp-contract=off: every
// product and sum below is rounded on its own, as the decoders' definitions read.

#include "kernels/quants.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

namespace keel {

void q3_k_scales(const uint8_t* s, uint8_t out[16]) {
  // Scale j: low four bits in a nibble of bytes 0..7 (j < 8: low nibble of byte j, else high
  // nibble of byte j - 8); high two bits in bits 2 (j / 4) of byte 8 + j % 4.
  for (int j = 0; j < 16; ++j) {
    const int low = j < 8 ? s[j] & 15 : s[j - 8] >> 4;
    const int high = (s[8 + j % 4] >> (2 * (j / 4))) & 3;
    out[j] = static_cast<uint8_t>(low | (high << 4));
  }
}

namespace {

[[noreturn]] void die(const char* what, dtype t) {
  // A precondition violation: callers only pass the types listed in quants.hpp.
  std::fprintf(stderr, "keel: %s: unsupported dtype %.*s\n", what,
               static_cast<int>(dtype_name(t).size()), dtype_name(t).data());
  std::abort();
}

template <class Block>
Block load(const char* p) {
  Block b;
  std::memcpy(&b, p, sizeof b);
  return b;
}

uint32_t load_u32le(const uint8_t* p) {
  return static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
         static_cast<uint32_t>(p[2]) << 16 | static_cast<uint32_t>(p[3]) << 24;
}

float f(int v) {
  return static_cast<float>(v);
}

// ---- decoding: ggml's dequantize_row_* operation for operation ------------------------------

void decode(const block_q4_0& b, float* y) {
  const float d = fp16_to_f32(b.d);
  for (int j = 0; j < 16; ++j) {
    y[j] = f((b.qs[j] & 15) - 8) * d;
    y[j + 16] = f((b.qs[j] >> 4) - 8) * d;
  }
}

void decode(const block_q4_1& b, float* y) {
  const float d = fp16_to_f32(b.d);
  const float m = fp16_to_f32(b.m);
  for (int j = 0; j < 16; ++j) {
    y[j] = f(b.qs[j] & 15) * d + m;
    y[j + 16] = f(b.qs[j] >> 4) * d + m;
  }
}

void decode(const block_q5_0& b, float* y) {
  const float d = fp16_to_f32(b.d);
  const uint32_t qh = load_u32le(b.qh);
  for (int j = 0; j < 16; ++j) {
    const int hi0 = static_cast<int>((qh >> j) & 1) << 4;
    const int hi1 = static_cast<int>((qh >> (j + 16)) & 1) << 4;
    y[j] = f(((b.qs[j] & 15) | hi0) - 16) * d;
    y[j + 16] = f(((b.qs[j] >> 4) | hi1) - 16) * d;
  }
}

void decode(const block_q5_1& b, float* y) {
  const float d = fp16_to_f32(b.d);
  const float m = fp16_to_f32(b.m);
  const uint32_t qh = load_u32le(b.qh);
  for (int j = 0; j < 16; ++j) {
    const int hi0 = static_cast<int>((qh >> j) & 1) << 4;
    const int hi1 = static_cast<int>((qh >> (j + 16)) & 1) << 4;
    y[j] = f((b.qs[j] & 15) | hi0) * d + m;
    y[j + 16] = f((b.qs[j] >> 4) | hi1) * d + m;
  }
}

void decode(const block_q8_0& b, float* y) {
  const float d = fp16_to_f32(b.d);
  for (int j = 0; j < q8_0_block; ++j) y[j] = f(b.qs[j]) * d;
}

void decode(const block_q2_k& b, float* y) {
  const float d = fp16_to_f32(b.d);
  const float dmin = fp16_to_f32(b.dmin);
  int g = 0;
  for (int half = 0; half < 2; ++half) {
    const uint8_t* q = b.qs + 32 * half;
    for (int shift = 0; shift < 8; shift += 2) {
      for (int part = 0; part < 2; ++part, ++g) {
        const float dl = d * f(b.scales[g] & 15);
        const float ml = dmin * f(b.scales[g] >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * f((q[16 * part + l] >> shift) & 3) - ml;
      }
    }
  }
}

void decode(const block_q3_k& b, float* y) {
  const float d = fp16_to_f32(b.d);
  uint8_t sc[16];
  q3_k_scales(b.scales, sc);
  int g = 0;
  for (int half = 0; half < 2; ++half) {
    const uint8_t* q = b.qs + 32 * half;
    for (int j = 0; j < 4; ++j) {
      const int bit = 4 * half + j;  // of hmask, for the values of this pass
      for (int part = 0; part < 2; ++part, ++g) {
        const float dl = d * f(sc[g] - 32);
        for (int l = 16 * part; l < 16 * part + 16; ++l) {
          const int low = (q[l] >> (2 * j)) & 3;
          *y++ = dl * f(low - (((b.hmask[l] >> bit) & 1) ? 0 : 4));
        }
      }
    }
  }
}

// Q4_K and Q5_K (the fifth bits in `qh`, null for Q4_K), as ggml's dequantize_row_q4_K/q5_K.
void decode_k45(uint16_t d16, uint16_t dmin16, const uint8_t* scales, const uint8_t* qs,
                const uint8_t* qh, float* y) {
  const float d = fp16_to_f32(d16);
  const float dmin = fp16_to_f32(dmin16);
  auto high = [&](int l, int bit) { return qh && ((qh[l] >> bit) & 1) ? 16 : 0; };
  for (int c = 0; c < 4; ++c) {
    uint8_t sc, mn;
    k4_scale_min(scales, 2 * c, sc, mn);
    const float d1 = d * f(sc);
    const float m1 = dmin * f(mn);
    k4_scale_min(scales, 2 * c + 1, sc, mn);
    const float d2 = d * f(sc);
    const float m2 = dmin * f(mn);
    const uint8_t* q = qs + 32 * c;
    for (int l = 0; l < 32; ++l) *y++ = d1 * f((q[l] & 15) + high(l, 2 * c)) - m1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * f((q[l] >> 4) + high(l, 2 * c + 1)) - m2;
  }
}

void decode(const block_q4_k& b, float* y) {
  decode_k45(b.d, b.dmin, b.scales, b.qs, nullptr, y);
}

void decode(const block_q5_k& b, float* y) {
  decode_k45(b.d, b.dmin, b.scales, b.qs, b.qh, y);
}

void decode(const block_q6_k& b, float* y) {
  const float d = fp16_to_f32(b.d);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = b.ql + 64 * half;
    const uint8_t* qh = b.qh + 32 * half;
    const int8_t* sc = b.scales + 8 * half;
    float* out = y + 128 * half;
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 15) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      out[l] = d * f(sc[is]) * f(q1);
      out[l + 32] = d * f(sc[is + 2]) * f(q2);
      out[l + 64] = d * f(sc[is + 4]) * f(q3);
      out[l + 96] = d * f(sc[is + 6]) * f(q4);
    }
  }
}

template <class Block>
void decode_row(const char* row, int64_t n, int block_elems, float* out) {
  for (int64_t k = 0; k < n / block_elems; ++k)
    decode(load<Block>(row + k * static_cast<int64_t>(sizeof(Block))), out + k * block_elems);
}

// ---- encoding ------------------------------------------------------------------------------

/// The nearest integer to `v` (ties to even, as ggml's nearest_int), clamped to [lo, hi].
inline int round_clamp(float v, int lo, int hi) {
  if (!(v > static_cast<float>(lo))) return lo;  // NaN too
  if (!(v < static_cast<float>(hi))) return hi;
  // Adding 1.5 * 2^23 leaves the rounded integer in the low mantissa bits (|v| < 2^22 here).
  const float t = v + 12582912.0f;
  int32_t bits;
  std::memcpy(&bits, &t, 4);
  return (bits & 0x007fffff) - 0x00400000;
}

/// F16 of a scale, clamped to the largest finite F16 so that no scale encodes as infinity.
uint16_t encode_scale(float s) {
  constexpr float f16_max = 65504.0f;
  return f32_to_fp16(std::clamp(s, -f16_max, f16_max));
}

/// A fitted group whose largest magnitude is below this (in units of its block's largest
/// magnitude) is stored as zero: no F16 scale could represent it anyway.
constexpr float negligible = 1e-20f;

/// One quantisation block (32 or 256 values) made safe to fit. Non-finite inputs read as 0. The
/// fits work on `xn`, the values times a power of two that puts the largest magnitude in [1, 2):
/// exact, so no sum below overflows or underflows whatever the inputs' range; `unit` converts a
/// fitted scale back. `w` weights each element's squared error: sqrt(sigma2 + xn^2) (sigma2 the
/// block's mean square), times the element's importance when one is given.
struct prepared {
  int n = 0;
  bool zero = true;
  float unit = 1.0f;
  float x[qk_k];
  float xn[qk_k];
  float w[qk_k];
};

void prepare(const float* x, const float* importance, int n, prepared& p) {
  p.n = n;
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) {
    p.x[i] = std::isfinite(x[i]) ? x[i] : 0.0f;
    amax = std::max(amax, std::fabs(p.x[i]));
  }
  p.zero = amax == 0.0f;
  if (p.zero) return;
  const int e = std::ilogb(amax);
  p.unit = std::ldexp(1.0f, e);
  double sum2 = 0.0;
  for (int i = 0; i < n; ++i) {
    p.xn[i] = std::ldexp(p.x[i], -e);
    sum2 += static_cast<double>(p.xn[i]) * p.xn[i];
  }
  const float sigma2 = static_cast<float>(sum2 / n);
  float imax = 0.0f;
  if (importance) {
    for (int i = 0; i < n; ++i)
      if (std::isfinite(importance[i])) imax = std::max(imax, importance[i]);
  }
  for (int i = 0; i < n; ++i) {
    float w = std::sqrt(sigma2 + p.xn[i] * p.xn[i]);
    if (imax > 0.0f) {
      // An element of no importance still counts a little, so that a group of them still fits.
      const float imp = importance[i];
      w *= (std::isfinite(imp) && imp > 0.0f ? imp / imax : 0.0f) + 1e-6f;
    }
    p.w[i] = w;
  }
}

/// The step of the lattice that the values x[0..n) lie on (a dequantised group's values are
/// integer multiples of its scale, plus its offset), or 0 when they do not. The step is the
/// greatest common divisor of the gaps between the sorted distinct values, by Euclid's algorithm
/// with remainders below 1e-5 of `range` taken as 0 (the values carry float rounding); it is
/// refused when below 1/64 of the range (no type has more than 64 levels).
float lattice_step(int n, const float* x, float range) {
  float v[qk_k];
  std::copy(x, x + n, v);
  std::sort(v, v + n);
  const float tol = range * 1e-5f;
  float step = 0.0f;
  for (int i = 1; i < n; ++i) {
    float a = v[i] - v[i - 1];
    if (!(a > tol)) continue;
    float b = step;
    while (b > tol) {  // gcd(a, b) with a symmetric remainder
      float r = std::fmod(a, b);
      if (r > 0.5f * b) r = b - r;
      a = b;
      b = r;
    }
    step = a;
    if (step < range / 64.0f) return 0.0f;
  }
  return step;
}

/// The order in which the fits try t = nmax - 1 + k / 10 for k in 0..19: nmax first, then
/// nmax - 1, then the rest. Only the order of candidates with equal error matters: a group with a
/// single non-zero value fits exactly with any t, and a dequantised one most often had its
/// largest value at level nmax.
constexpr int tenths_order[20] = {10, 0,  1,  2,  3,  4,  5,  6,  7,  8,
                                  9,  11, 12, 13, 14, 15, 16, 17, 18, 19};

/// Keeps the best of a fit's candidates. A candidate replaces the best only when its error is
/// lower by more than rounding noise (1e-12 of sum w x^2), so that among fits that are all exact
/// (a dequantised group) the first one tried stays.
struct best_fit {
  double tol;
  double err = std::numeric_limits<double>::infinity();
  bool improves(double e) const { return e < err - tol; }
};

/// Fits x[i] ~ s * l[i] with integer l[i] in [-nmax, nmax - 1], minimising sum w (s l - x)^2,
/// and returns s (0 for a negligible group). Candidate levels round x / s for s putting the
/// largest-magnitude element at -t: for t = nmax - 1 .. nmax + 0.9 in tenths (tenths_order),
/// then for t = that element's lattice position (from lattice_step, when at most nmax). Each
/// candidate gets the least-squares s for its levels; the best is refined by alternating
/// rounding (levels from s) and least squares (s from the levels) while the error falls.
float fit_symmetric(int n, const float* x, const float* w, int nmax) {
  float amax = 0.0f, vmax = 0.0f;
  double sxx = 0.0;
  for (int i = 0; i < n; ++i) {
    sxx += static_cast<double>(w[i]) * x[i] * x[i];
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      vmax = x[i];
    }
  }
  if (amax < negligible) return 0.0f;
  best_fit best{1e-12 * sxx};
  float best_s = 0.0f;
  int l[qk_k];
  auto consider = [&]() {
    double sxl = 0.0, sll = 0.0;
    for (int i = 0; i < n; ++i) {
      sxl += static_cast<double>(w[i]) * x[i] * l[i];
      sll += static_cast<double>(w[i]) * l[i] * l[i];
    }
    if (sll <= 0.0) return false;
    const double s = static_cast<float>(sxl / sll);
    const double err = sxx - 2.0 * s * sxl + s * s * sll;
    if (!best.improves(err)) return false;
    best.err = err;
    best_s = static_cast<float>(s);
    return true;
  };
  auto try_inverse_scale = [&](float iscale) {
    for (int i = 0; i < n; ++i) l[i] = round_clamp(iscale * x[i], -nmax, nmax - 1);
    consider();
  };
  for (int k : tenths_order) try_inverse_scale(-(static_cast<float>(nmax - 1) + 0.1f * k) / vmax);
  const float step = lattice_step(n, x, amax);
  if (step > 0.0f) {
    const float t = std::nearbyint(amax / step);
    if (t >= 1.0f && t <= static_cast<float>(nmax)) try_inverse_scale(-t / vmax);
  }
  for (int iter = 0; iter < 4 && best_s != 0.0f; ++iter) {
    const float inv = 1.0f / best_s;
    for (int i = 0; i < n; ++i) l[i] = round_clamp(x[i] * inv, -nmax, nmax - 1);
    if (!consider()) break;
  }
  return best_s;
}

/// Fits x[i] ~ s * l[i] + b with integer l[i] in [0, nmax] and s >= 0, minimising
/// sum w (s l + b - x)^2. `nonpositive_offset` requires b <= 0 (K-quants store -b as an unsigned
/// min). Candidate levels map [lo, hi] (lo the minimum, raised to 0 when b must be <= 0; hi the
/// maximum) onto [0, t]: for t = nmax - 1 .. nmax + 0.9 in tenths (tenths_order), then for t =
/// the lattice span (from lattice_step, when at most nmax). Each gets the least-squares (s, b)
/// for its levels; the best is refined as in fit_symmetric.
void fit_with_offset(int n, const float* x, const float* w, int nmax, bool nonpositive_offset,
                     float& s_out, float& b_out) {
  float lo = x[0], hi = x[0];
  double sw = 0.0, sx = 0.0, sxx = 0.0;
  for (int i = 0; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
    sw += w[i];
    sx += static_cast<double>(w[i]) * x[i];
    sxx += static_cast<double>(w[i]) * x[i] * x[i];
  }
  if (nonpositive_offset) lo = std::min(lo, 0.0f);
  s_out = 0.0f;
  b_out = lo;
  if (hi - lo < negligible) return;
  best_fit best{1e-12 * sxx};
  int l[qk_k];
  auto consider = [&]() {
    double sl = 0, sll = 0, sxl = 0;
    for (int i = 0; i < n; ++i) {
      const double wi = w[i];
      sl += wi * l[i];
      sll += wi * l[i] * l[i];
      sxl += wi * x[i] * l[i];
    }
    const double det = sw * sll - sl * sl;
    bool ok = det > 0.0;  // not when every level is the same
    double s = 0.0, b = 0.0;
    if (ok) {
      s = (sw * sxl - sx * sl) / det;
      b = (sll * sx - sl * sxl) / det;
    }
    if (nonpositive_offset && (!ok || b > 0.0) && sll > 0.0) {
      b = 0.0;
      s = sxl / sll;
      ok = true;
    }
    if (!ok || !(s > 0.0)) return false;
    s = static_cast<float>(s);
    b = static_cast<float>(b);
    const double err =
        sxx - 2.0 * s * sxl - 2.0 * b * sx + s * s * sll + 2.0 * s * b * sl + b * b * sw;
    if (!best.improves(err)) return false;
    best.err = err;
    s_out = static_cast<float>(s);
    b_out = static_cast<float>(b);
    return true;
  };
  auto try_inverse_scale = [&](float iscale) {
    for (int i = 0; i < n; ++i) l[i] = round_clamp(iscale * (x[i] - lo), 0, nmax);
    consider();
  };
  const float range = hi - lo;
  for (int k : tenths_order) try_inverse_scale((static_cast<float>(nmax - 1) + 0.1f * k) / range);
  const float step = lattice_step(n, x, range);
  if (step > 0.0f) {
    const float t = std::nearbyint(range / step);
    if (t >= 1.0f && t <= static_cast<float>(nmax)) try_inverse_scale(t / range);
  }
  for (int iter = 0; iter < 4 && s_out > 0.0f; ++iter) {
    const float inv = 1.0f / s_out;
    const float b = b_out;
    for (int i = 0; i < n; ++i) l[i] = round_clamp((x[i] - b) * inv, 0, nmax);
    if (!consider()) break;
  }
}

// -- K-quant super-blocks with a min (q2_k, q4_k, q5_k) --

/// The codes of a super-block of `groups` groups of `gs` values with levels 0..nmax, each group
/// `d * sc[g] * q - dmin * mn[g]` with sc, mn in 0..code_max.
struct kmin_codes {
  uint16_t d = 0, dmin = 0;
  int sc[16] = {}, mn[16] = {};
  uint8_t q[qk_k] = {};
};

/// The weighted squared error of group `g` decoded with codes (sc, mn) as ggml decodes it, each
/// value at its best level; fills the levels when `q` is given.
double kmin_group_error(const prepared& p, int g, int gs, int nmax, float d, float dmin, int sc,
                        int mn, uint8_t* q) {
  const float d1 = d * f(sc);
  const float m1 = dmin * f(mn);
  const float inv = d1 > 0.0f ? 1.0f / d1 : 0.0f;
  double err = 0.0;
  for (int i = g * gs; i < (g + 1) * gs; ++i) {
    const int l = round_clamp((p.x[i] + m1) * inv, 0, nmax);
    if (q) q[i] = static_cast<uint8_t>(l);
    const double e = static_cast<double>(d1 * f(l) - m1) - p.x[i];
    err += p.w[i] * e * e;
  }
  return err;
}

/// Codes for every group given the super-block scales. Each group's scale and min are rounded
/// to codes, and with `search` each code is then tried one step either way on the decoded
/// values (rounding the two separately is not the best pair). The min is also tried one to three
/// level steps larger (the levels as many higher: the same values when the lowest level was not
/// 0, but other codes), so that a group whose lowest level is not 0 is found again exactly. The
/// largest rounded code is never lowered: the block's largest code then tells the super-block
/// scale it was chosen for (see encode_kmin). Returns the block's weighted squared error.
double kmin_codes_for(const prepared& p, int groups, int gs, int nmax, int code_max, const float* s,
                      const float* m, float d, float dmin, bool search, int* sc_out, int* mn_out) {
  int sc0[16], mn0[16];
  int top_sc = 0, top_mn = 0;
  for (int g = 0; g < groups; ++g) {
    sc0[g] = d > 0.0f ? round_clamp(s[g] / d, 0, code_max) : 0;
    mn0[g] = dmin > 0.0f ? round_clamp(m[g] / dmin, 0, code_max) : 0;
    top_sc = std::max(top_sc, sc0[g]);
    top_mn = std::max(top_mn, mn0[g]);
  }
  double total = 0.0;
  for (int g = 0; g < groups; ++g) {
    int best_sc = sc0[g], best_mn = mn0[g];
    double best = kmin_group_error(p, g, gs, nmax, d, dmin, sc0[g], mn0[g], nullptr);
    auto consider = [&](int sc, int mn) {
      if (sc < 0 || sc > code_max || mn < 0 || mn > code_max) return;
      const double err = kmin_group_error(p, g, gs, nmax, d, dmin, sc, mn, nullptr);
      if (err < best) {
        best = err;
        best_sc = sc;
        best_mn = mn;
      }
    };
    if (search) {
      for (int a = sc0[g] == top_sc ? 0 : -1; a <= 1; ++a)
        for (int b = mn0[g] == top_mn ? 0 : -1; b <= 1; ++b)
          if (a != 0 || b != 0) consider(sc0[g] + a, mn0[g] + b);
    }
    if (dmin > 0.0f) {
      const float step = d * f(sc0[g]);
      for (int k = 1; k <= 3; ++k)
        consider(sc0[g], round_clamp((m[g] + step * f(k)) / dmin, 0, code_max));
    }
    sc_out[g] = best_sc;
    mn_out[g] = best_mn;
    total += best;
  }
  return total;
}

void encode_kmin(const prepared& p, int groups, int gs, int nmax, int code_max, kmin_codes& c) {
  if (p.zero) return;
  float s[16], m[16];
  float max_s = 0.0f, max_m = 0.0f;
  for (int g = 0; g < groups; ++g) {
    float b;
    fit_with_offset(gs, p.xn + g * gs, p.w + g * gs, nmax, true, s[g], b);
    s[g] *= p.unit;
    m[g] = -b * p.unit;
    max_s = std::max(max_s, s[g]);
    max_m = std::max(max_m, m[g]);
  }
  // The largest scale gets code code_max or code_max - 1, and so does the largest min: the best
  // of the four without the one-step search, then searched. With the largest codes never
  // lowered, a block that is already a dequantised one has its largest codes in that range, and
  // its scales are found again exactly.
  double best = std::numeric_limits<double>::infinity();
  float best_d = 0.0f, best_dmin = 0.0f;
  int sc[16], mn[16];
  for (int ks = 0; ks < 2; ++ks) {
    for (int km = 0; km < (max_m > 0.0f ? 2 : 1); ++km) {
      const uint16_t dh = encode_scale(max_s / static_cast<float>(code_max - ks));
      const uint16_t mh = encode_scale(max_m / static_cast<float>(code_max - km));
      const float d = fp16_to_f32(dh), dmin = fp16_to_f32(mh);
      const double err =
          kmin_codes_for(p, groups, gs, nmax, code_max, s, m, d, dmin, false, sc, mn);
      if (err < best) {
        best = err;
        c.d = dh;
        c.dmin = mh;
        best_d = d;
        best_dmin = dmin;
      }
    }
  }
  kmin_codes_for(p, groups, gs, nmax, code_max, s, m, best_d, best_dmin, true, c.sc, c.mn);
  const float d = fp16_to_f32(c.d), dmin = fp16_to_f32(c.dmin);
  for (int g = 0; g < groups; ++g) kmin_group_error(p, g, gs, nmax, d, dmin, c.sc[g], c.mn[g], c.q);
}

// -- K-quant super-blocks with signed scales (q3_k, q6_k) --

/// Sixteen groups of 16 signed levels in [-nmax, nmax - 1], group g decoded `(d * sc[g]) * l`
/// with sc in [code_lo, code_hi].
struct ksym_codes {
  uint16_t d = 0;
  int sc[16] = {};
  int8_t l[qk_k] = {};
};

double ksym_group_error(const prepared& p, int g, int nmax, float d, int sc, int8_t* l) {
  const float dl = d * f(sc);
  const float inv = dl != 0.0f ? 1.0f / dl : 0.0f;
  double err = 0.0;
  for (int i = 16 * g; i < 16 * g + 16; ++i) {
    const int v = round_clamp(p.x[i] * inv, -nmax, nmax - 1);
    if (l) l[i] = static_cast<int8_t>(v);
    const double e = static_cast<double>(dl * f(v)) - p.x[i];
    err += p.w[i] * e * e;
  }
  return err;
}

/// Codes for every group given the super-block scale: each rounded, and the negated scale (with
/// negated levels: the same values when no level is -nmax) rounded too, and with `search` each
/// then tried one step either way, except that the largest-magnitude rounded code never moves
/// towards 0 (as in kmin_codes_for). Returns the block's weighted squared error.
double ksym_codes_for(const prepared& p, int nmax, int code_lo, int code_hi, const float* s,
                      float d, bool search, int* sc_out) {
  int sc0[16];
  int top = 0;
  for (int g = 0; g < 16; ++g) {
    sc0[g] = d != 0.0f ? round_clamp(s[g] / d, code_lo, code_hi) : 0;
    top = std::max(top, -sc0[g]);
  }
  double total = 0.0;
  for (int g = 0; g < 16; ++g) {
    const bool is_top = -sc0[g] == top;
    const int neg = d != 0.0f ? round_clamp(-s[g] / d, code_lo, code_hi) : 0;
    int best_sc = sc0[g];
    double best = ksym_group_error(p, g, nmax, d, sc0[g], nullptr);
    auto consider = [&](int sc) {
      if (sc < code_lo || sc > code_hi || sc == sc0[g] || (is_top && sc > sc0[g])) return;
      const double err = ksym_group_error(p, g, nmax, d, sc, nullptr);
      if (err < best) {
        best = err;
        best_sc = sc;
      }
    };
    consider(neg);
    if (search) {
      for (int k = -1; k <= 1; ++k) consider(sc0[g] + k);
      for (int k = -1; k <= 1; ++k) consider(neg + k);
    }
    sc_out[g] = best_sc;
    total += best;
  }
  return total;
}

void encode_ksym(const prepared& p, int nmax, int code_lo, int code_hi, ksym_codes& c) {
  if (p.zero) return;
  float s[16];
  float max_scale = 0.0f;
  for (int g = 0; g < 16; ++g) {
    s[g] = fit_symmetric(16, p.xn + 16 * g, p.w + 16 * g, nmax) * p.unit;
    if (std::fabs(s[g]) > std::fabs(max_scale)) max_scale = s[g];
  }
  if (max_scale == 0.0f) return;
  // The group with the largest scale gets code code_lo (-32, -128: the side with one more step)
  // or one step less, as in encode_kmin; the super-block scale is tried with both signs (a group's
  // fitted scale has either sign: its levels may be negated).
  double best = std::numeric_limits<double>::infinity();
  int sc[16];
  for (int k = 0; k < 2; ++k) {
    for (float sign : {1.0f, -1.0f}) {
      const uint16_t dh = encode_scale(sign * max_scale / static_cast<float>(code_lo + k));
      const double err = ksym_codes_for(p, nmax, code_lo, code_hi, s, fp16_to_f32(dh), false, sc);
      if (err < best) {
        best = err;
        c.d = dh;
      }
    }
  }
  const float d = fp16_to_f32(c.d);
  ksym_codes_for(p, nmax, code_lo, code_hi, s, d, true, c.sc);
  for (int g = 0; g < 16; ++g) ksym_group_error(p, g, nmax, d, c.sc[g], c.l);
}

// -- the encoders of each type --

void encode(const float* x, const float* imp, block_q8_0& b) {
  // As ggml's quantize_row_q8_0_ref (and Keel's ops.cpp before it): d = amax / 127,
  // q = round(x / d) with 1 / d taken before rounding d to F16.
  float amax = 0.0f;
  float v[q8_0_block];
  for (int j = 0; j < q8_0_block; ++j) {
    v[j] = std::isfinite(x[j]) ? x[j] : 0.0f;
    amax = std::max(amax, std::fabs(v[j]));
  }
  (void)imp;
  const float d = amax / 127.0f;
  float id = d != 0.0f ? 1.0f / d : 0.0f;
  if (!std::isfinite(id)) id = 0.0f;
  b.d = encode_scale(d);
  for (int j = 0; j < q8_0_block; ++j) {
    const float r = std::round(v[j] * id);
    b.qs[j] = static_cast<int8_t>(std::clamp(r, -127.0f, 127.0f));
  }
}

/// Levels of a 32-value block with a symmetric scale: q in [0, 2 nmax), value d * (q - nmax).
uint16_t encode_symmetric32(const float* x, const float* imp, int nmax, uint8_t q[32]) {
  prepared p;
  prepare(x, imp, 32, p);
  if (p.zero) {
    std::fill(q, q + 32, static_cast<uint8_t>(nmax));
    return 0;
  }
  const uint16_t dh = encode_scale(fit_symmetric(32, p.xn, p.w, nmax) * p.unit);
  const float d = fp16_to_f32(dh);
  for (int i = 0; i < 32; ++i)
    q[i] = static_cast<uint8_t>((d != 0.0f ? round_clamp(p.x[i] / d, -nmax, nmax - 1) : 0) + nmax);
  return dh;
}

/// Levels of a 32-value block with a scale and an offset: q in [0, nmax], value d * q + m.
void encode_offset32(const float* x, const float* imp, int nmax, uint16_t& dh, uint16_t& mh,
                     uint8_t q[32]) {
  prepared p;
  prepare(x, imp, 32, p);
  dh = mh = 0;
  std::fill(q, q + 32, uint8_t{0});
  if (p.zero) return;
  float s, b;
  fit_with_offset(32, p.xn, p.w, nmax, false, s, b);
  dh = encode_scale(s * p.unit);
  mh = encode_scale(b * p.unit);
  const float d = fp16_to_f32(dh), m = fp16_to_f32(mh);
  for (int i = 0; i < 32; ++i)
    q[i] = static_cast<uint8_t>(d > 0.0f ? round_clamp((p.x[i] - m) / d, 0, nmax) : 0);
}

void encode(const float* x, const float* imp, block_q4_0& b) {
  uint8_t q[32];
  b.d = encode_symmetric32(x, imp, 8, q);
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
}

void encode(const float* x, const float* imp, block_q5_0& b) {
  uint8_t q[32];
  b.d = encode_symmetric32(x, imp, 16, q);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    b.qs[j] = static_cast<uint8_t>((q[j] & 15) | ((q[j + 16] & 15) << 4));
    qh |= static_cast<uint32_t>(q[j] >> 4) << j;
    qh |= static_cast<uint32_t>(q[j + 16] >> 4) << (j + 16);
  }
  for (int k = 0; k < 4; ++k) b.qh[k] = static_cast<uint8_t>(qh >> (8 * k));
}

void encode(const float* x, const float* imp, block_q4_1& b) {
  uint8_t q[32];
  encode_offset32(x, imp, 15, b.d, b.m, q);
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(q[j] | (q[j + 16] << 4));
}

void encode(const float* x, const float* imp, block_q5_1& b) {
  uint8_t q[32];
  encode_offset32(x, imp, 31, b.d, b.m, q);
  uint32_t qh = 0;
  for (int j = 0; j < 16; ++j) {
    b.qs[j] = static_cast<uint8_t>((q[j] & 15) | ((q[j + 16] & 15) << 4));
    qh |= static_cast<uint32_t>(q[j] >> 4) << j;
    qh |= static_cast<uint32_t>(q[j + 16] >> 4) << (j + 16);
  }
  for (int k = 0; k < 4; ++k) b.qh[k] = static_cast<uint8_t>(qh >> (8 * k));
}

/// Packs 2-bit values (q2_k's levels, q3_k's low bits) as q2_k and q3_k lay them out: value i is
/// bits 2 ((i % 128) / 32) of byte 32 (i / 128) + i % 32.
void pack_2bit(const uint8_t* v, uint8_t qs[64]) {
  for (int half = 0; half < 2; ++half) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t* u = v + 128 * half + l;
      qs[32 * half + l] =
          static_cast<uint8_t>((u[0] & 3) | (u[32] & 3) << 2 | (u[64] & 3) << 4 | (u[96] & 3) << 6);
    }
  }
}

void encode(const float* x, const float* imp, block_q2_k& b) {
  prepared p;
  prepare(x, imp, qk_k, p);
  kmin_codes c;
  encode_kmin(p, 16, 16, 3, 15, c);
  b.d = c.d;
  b.dmin = c.dmin;
  for (int g = 0; g < 16; ++g) b.scales[g] = static_cast<uint8_t>(c.sc[g] | (c.mn[g] << 4));
  pack_2bit(c.q, b.qs);
}

void encode(const float* x, const float* imp, block_q3_k& b) {
  prepared p;
  prepare(x, imp, qk_k, p);
  ksym_codes c;
  encode_ksym(p, 4, -32, 31, c);
  b.d = c.d;
  std::memset(b.scales, 0, sizeof b.scales);
  for (int j = 0; j < 16; ++j) {
    const int u = c.sc[j] + 32;
    if (j < 8)
      b.scales[j] |= static_cast<uint8_t>(u & 15);
    else
      b.scales[j - 8] |= static_cast<uint8_t>((u & 15) << 4);
    b.scales[8 + j % 4] |= static_cast<uint8_t>((u >> 4) << (2 * (j / 4)));
  }
  uint8_t q[qk_k];
  for (int i = 0; i < qk_k; ++i) q[i] = static_cast<uint8_t>(c.l[i] + 4);
  pack_2bit(q, b.qs);
  std::memset(b.hmask, 0, sizeof b.hmask);
  for (int i = 0; i < qk_k; ++i) b.hmask[i % 32] |= static_cast<uint8_t>((q[i] >> 2) << (i / 32));
}

/// Packs the eight 6-bit scales and mins of q4_k and q5_k (the inverse of k4_scale_min).
void pack_k4_scales(const int* sc, const int* mn, uint8_t s[12]) {
  std::memset(s, 0, 12);
  for (int j = 0; j < 8; ++j) {
    if (j < 4) {
      s[j] |= static_cast<uint8_t>(sc[j]);
      s[j + 4] |= static_cast<uint8_t>(mn[j]);
    } else {
      s[j + 4] = static_cast<uint8_t>((sc[j] & 15) | ((mn[j] & 15) << 4));
      s[j - 4] |= static_cast<uint8_t>((sc[j] >> 4) << 6);
      s[j] |= static_cast<uint8_t>((mn[j] >> 4) << 6);
    }
  }
}

// The codes of a Q4_K (nmax 15) or Q5_K (31) super-block: eight groups of 32 with 6-bit scales
// and mins, which go into `d`, `dmin` and `scales` as both types lay them out.
template <class Block>
kmin_codes encode_k45(const float* x, const float* imp, int nmax, Block& b) {
  prepared p;
  prepare(x, imp, qk_k, p);
  kmin_codes c;
  encode_kmin(p, 8, 32, nmax, 63, c);
  b.d = c.d;
  b.dmin = c.dmin;
  pack_k4_scales(c.sc, c.mn, b.scales);
  return c;
}

void encode(const float* x, const float* imp, block_q4_k& b) {
  const kmin_codes c = encode_k45(x, imp, 15, b);
  for (int chunk = 0; chunk < 4; ++chunk)
    for (int l = 0; l < 32; ++l)
      b.qs[32 * chunk + l] =
          static_cast<uint8_t>(c.q[64 * chunk + l] | (c.q[64 * chunk + 32 + l] << 4));
}

void encode(const float* x, const float* imp, block_q5_k& b) {
  const kmin_codes c = encode_k45(x, imp, 31, b);
  std::memset(b.qh, 0, sizeof b.qh);
  for (int chunk = 0; chunk < 4; ++chunk) {
    for (int l = 0; l < 32; ++l) {
      const int lo = c.q[64 * chunk + l], hi = c.q[64 * chunk + 32 + l];
      b.qs[32 * chunk + l] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
      b.qh[l] |= static_cast<uint8_t>(((lo >> 4) << (2 * chunk)) | ((hi >> 4) << (2 * chunk + 1)));
    }
  }
}

void encode(const float* x, const float* imp, block_q6_k& b) {
  prepared p;
  prepare(x, imp, qk_k, p);
  ksym_codes c;
  encode_ksym(p, 32, -128, 127, c);
  b.d = c.d;
  for (int g = 0; g < 16; ++g) b.scales[g] = static_cast<int8_t>(c.sc[g]);
  for (int half = 0; half < 2; ++half) {
    uint8_t* ql = b.ql + 64 * half;
    uint8_t* qh = b.qh + 32 * half;
    const int8_t* l = c.l + 128 * half;
    for (int j = 0; j < 32; ++j) {
      const int q1 = l[j] + 32, q2 = l[j + 32] + 32, q3 = l[j + 64] + 32, q4 = l[j + 96] + 32;
      ql[j] = static_cast<uint8_t>((q1 & 15) | ((q3 & 15) << 4));
      ql[j + 32] = static_cast<uint8_t>((q2 & 15) | ((q4 & 15) << 4));
      qh[j] =
          static_cast<uint8_t>((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6));
    }
  }
}

template <class Block>
void encode_row(const float* x, int64_t n, int block_elems, const float* importance, void* out) {
  char* o = static_cast<char*>(out);
  for (int64_t k = 0; k < n / block_elems; ++k) {
    Block b;
    std::memset(&b, 0, sizeof b);
    encode(x + k * block_elems, importance ? importance + k * block_elems : nullptr, b);
    std::memcpy(o + k * static_cast<int64_t>(sizeof(Block)), &b, sizeof b);
  }
}

}  // namespace

void dequantize_blocks(dtype t, const char* row, int64_t n, float* out) {
  switch (t) {
    case dtype::f32:
      std::memcpy(out, row, static_cast<size_t>(n) * 4);
      return;
    case dtype::f16:
    case dtype::bf16:
      for (int64_t j = 0; j < n; ++j) {
        uint16_t h;
        std::memcpy(&h, row + 2 * j, 2);
        out[j] = t == dtype::f16 ? fp16_to_f32(h) : bf16_to_f32(h);
      }
      return;
    case dtype::q4_0:
      return decode_row<block_q4_0>(row, n, 32, out);
    case dtype::q4_1:
      return decode_row<block_q4_1>(row, n, 32, out);
    case dtype::q5_0:
      return decode_row<block_q5_0>(row, n, 32, out);
    case dtype::q5_1:
      return decode_row<block_q5_1>(row, n, 32, out);
    case dtype::q8_0:
      return decode_row<block_q8_0>(row, n, q8_0_block, out);
    case dtype::q2_k:
      return decode_row<block_q2_k>(row, n, qk_k, out);
    case dtype::q3_k:
      return decode_row<block_q3_k>(row, n, qk_k, out);
    case dtype::q4_k:
      return decode_row<block_q4_k>(row, n, qk_k, out);
    case dtype::q5_k:
      return decode_row<block_q5_k>(row, n, qk_k, out);
    case dtype::q6_k:
      return decode_row<block_q6_k>(row, n, qk_k, out);
    default:
      die("dequantize_blocks", t);
  }
}

void quantize_blocks(dtype t, const float* x, int64_t n, void* out, const float* importance) {
  switch (t) {
    case dtype::f32:
      std::memcpy(out, x, static_cast<size_t>(n) * 4);
      return;
    case dtype::f16:
    case dtype::bf16:
      for (int64_t j = 0; j < n; ++j) {
        const uint16_t h = t == dtype::f16 ? f32_to_fp16(x[j]) : f32_to_bf16(x[j]);
        std::memcpy(static_cast<char*>(out) + 2 * j, &h, 2);
      }
      return;
    case dtype::q4_0:
      return encode_row<block_q4_0>(x, n, 32, importance, out);
    case dtype::q4_1:
      return encode_row<block_q4_1>(x, n, 32, importance, out);
    case dtype::q5_0:
      return encode_row<block_q5_0>(x, n, 32, importance, out);
    case dtype::q5_1:
      return encode_row<block_q5_1>(x, n, 32, importance, out);
    case dtype::q8_0:
      return encode_row<block_q8_0>(x, n, q8_0_block, importance, out);
    case dtype::q2_k:
      return encode_row<block_q2_k>(x, n, qk_k, importance, out);
    case dtype::q3_k:
      return encode_row<block_q3_k>(x, n, qk_k, importance, out);
    case dtype::q4_k:
      return encode_row<block_q4_k>(x, n, qk_k, importance, out);
    case dtype::q5_k:
      return encode_row<block_q5_k>(x, n, qk_k, importance, out);
    case dtype::q6_k:
      return encode_row<block_q6_k>(x, n, qk_k, importance, out);
    default:
      die("quantize_blocks", t);
  }
}

}  // namespace keel
