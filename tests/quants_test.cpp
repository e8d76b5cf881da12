#define BOOST_TEST_MODULE quants_test
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "kernels/ops.hpp"
#include "kernels/quants.hpp"

// The block types of kernels/quants.hpp. The reference decoder below is written from the format's
// definition (docs/engine.md, "Weight types") with another structure than quants.cpp: it finds
// each element's bits by computing their bit position in the block, one element at a time.

namespace {

using keel::dtype;

constexpr dtype all_types[] = {dtype::q4_0, dtype::q4_1, dtype::q5_0, dtype::q5_1, dtype::q8_0,
                               dtype::q2_k, dtype::q3_k, dtype::q4_k, dtype::q5_k, dtype::q6_k};

/// splitmix64: test data that does not depend on the standard library's distributions.
struct rng {
  uint64_t s;
  uint64_t next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double unit() { return static_cast<double>(next() >> 11) * 0x1.0p-53; }  // [0, 1)
  float gauss() {                                                          // Box-Muller
    const double u = 1.0 - unit(), v = unit();
    return static_cast<float>(std::sqrt(-2.0 * std::log(u)) * std::cos(6.283185307179586 * v));
  }
};

size_t block_bytes(dtype t) {
  return keel::layout_of(t)->block_bytes;
}
int block_elems(dtype t) {
  return static_cast<int>(keel::layout_of(t)->block_elems);
}

// ---- the reference decoder -----------------------------------------------------------------

/// `width` bits of the block starting at bit `pos` (bit 0 is the lowest bit of byte 0).
unsigned bits_at(const uint8_t* block, int pos, int width) {
  unsigned v = 0;
  for (int b = 0; b < width; ++b) v |= ((block[(pos + b) / 8] >> ((pos + b) % 8)) & 1u) << b;
  return v;
}

float f16_at(const uint8_t* block, int byte) {
  return keel::fp16_to_f32(static_cast<uint16_t>(bits_at(block, 8 * byte, 16)));
}

float fl(int v) {
  return static_cast<float>(v);
}

/// Element i of one block, each type's fields at their byte offsets in the block.
float reference_element(dtype t, const uint8_t* b, int i) {
  switch (t) {
    case dtype::q4_0: {  // d @0, qs[16] @2: nibble i % 16 of qs, the high one for i >= 16
      const int q = static_cast<int>(bits_at(b, 8 * (2 + i % 16) + 4 * (i / 16), 4));
      return fl(q - 8) * f16_at(b, 0);
    }
    case dtype::q4_1: {  // d @0, m @2, qs[16] @4
      const int q = static_cast<int>(bits_at(b, 8 * (4 + i % 16) + 4 * (i / 16), 4));
      return fl(q) * f16_at(b, 0) + f16_at(b, 2);
    }
    case dtype::q5_0: {  // d @0, qh[4] @2 (bit i: bit 4 of element i), qs[16] @6
      const int q = static_cast<int>(bits_at(b, 8 * (6 + i % 16) + 4 * (i / 16), 4) |
                                     bits_at(b, 8 * 2 + i, 1) << 4);
      return fl(q - 16) * f16_at(b, 0);
    }
    case dtype::q5_1: {  // d @0, m @2, qh[4] @4, qs[16] @8
      const int q = static_cast<int>(bits_at(b, 8 * (8 + i % 16) + 4 * (i / 16), 4) |
                                     bits_at(b, 8 * 4 + i, 1) << 4);
      return fl(q) * f16_at(b, 0) + f16_at(b, 2);
    }
    case dtype::q8_0: {  // d @0, qs[32] @2 (int8)
      const int q = static_cast<int8_t>(bits_at(b, 8 * (2 + i), 8));
      return fl(q) * f16_at(b, 0);
    }
    case dtype::q2_k: {  // scales[16] @0, qs[64] @16, d @80, dmin @82
      // Element i: bits 2 ((i % 128) / 32) of qs byte 32 (i / 128) + i % 32; group i / 16 has
      // scale (low nibble) and min (high nibble) in scales[i / 16].
      const int q = static_cast<int>(
          bits_at(b, 8 * (16 + 32 * (i / 128) + i % 32) + 2 * ((i % 128) / 32), 2));
      const int sc = static_cast<int>(bits_at(b, 8 * (i / 16), 4));
      const int mn = static_cast<int>(bits_at(b, 8 * (i / 16) + 4, 4));
      const float d = f16_at(b, 80) * fl(sc), m = f16_at(b, 82) * fl(mn);
      return d * fl(q) - m;
    }
    case dtype::q3_k: {  // hmask[32] @0, qs[64] @32, scales[12] @96, d @108
      const int low = static_cast<int>(
          bits_at(b, 8 * (32 + 32 * (i / 128) + i % 32) + 2 * ((i % 128) / 32), 2));
      const int high = static_cast<int>(bits_at(b, 8 * (i % 32) + i / 32, 1));
      // Group g's 6-bit scale: low four bits in nibble g / 8 of byte 96 + g % 8, high two bits
      // at bits 2 (g / 4) of byte 104 + g % 4.
      const int g = i / 16;
      const int sc = static_cast<int>(bits_at(b, 8 * (96 + g % 8) + 4 * (g / 8), 4) |
                                      bits_at(b, 8 * (104 + g % 4) + 2 * (g / 4), 2) << 4);
      const float d = f16_at(b, 108) * fl(sc - 32);
      return d * fl((low | high << 2) - 4);
    }
    case dtype::q4_k:
    case dtype::q5_k: {  // d @0, dmin @2, scales[12] @4, (q5_k: qh[32] @16), qs[128] @16 or 48
      const bool five = t == dtype::q5_k;
      const int qs = five ? 48 : 16;
      int q =
          static_cast<int>(bits_at(b, 8 * (qs + 32 * (i / 64) + i % 32) + 4 * ((i % 64) / 32), 4));
      if (five) q |= static_cast<int>(bits_at(b, 8 * (16 + i % 32) + i / 32, 1)) << 4;
      // Group g (of 32): g < 4: scale = low 6 bits of byte 4 + g, min = low 6 bits of byte
      // 8 + g; g >= 4: scale = low nibble of byte 8 + g | (top 2 bits of byte g) << 4, min =
      // high nibble of byte 8 + g | (top 2 bits of byte 4 + g) << 4 (byte numbers in the block).
      const int g = i / 32;
      int sc, mn;
      if (g < 4) {
        sc = static_cast<int>(bits_at(b, 8 * (4 + g), 6));
        mn = static_cast<int>(bits_at(b, 8 * (8 + g), 6));
      } else {
        sc = static_cast<int>(bits_at(b, 8 * (8 + g), 4) | bits_at(b, 8 * g + 6, 2) << 4);
        mn = static_cast<int>(bits_at(b, 8 * (8 + g) + 4, 4) | bits_at(b, 8 * (4 + g) + 6, 2) << 4);
      }
      const float d = f16_at(b, 0) * fl(sc), m = f16_at(b, 2) * fl(mn);
      return d * fl(q) - m;
    }
    case dtype::q6_k: {  // ql[128] @0, qh[64] @128, scales[16] @192 (int8), d @208
      // Element i = 128 h + 32 k + l: low four bits in nibble k / 2 of ql byte
      // 64 h + 32 (k % 2) + l, high two bits at bits 2 k of qh byte 32 h + l.
      const int h = i / 128, k = (i % 128) / 32, l = i % 32;
      const int q = static_cast<int>(bits_at(b, 8 * (64 * h + 32 * (k % 2) + l) + 4 * (k / 2), 4) |
                                     bits_at(b, 8 * (128 + 32 * h + l) + 2 * k, 2) << 4);
      const int sc = static_cast<int8_t>(bits_at(b, 8 * (192 + i / 16), 8));
      return f16_at(b, 208) * fl(sc) * fl(q - 32);
    }
    default:
      BOOST_FAIL("no reference for " << t);
      return 0.0f;
  }
}

/// A row of random blocks: random bytes, with each F16 scale a random finite value of either
/// sign between 2^-12 and 2^2.
std::vector<uint8_t> random_blocks(dtype t, int blocks, rng& r) {
  std::vector<uint8_t> row(block_bytes(t) * blocks);
  for (auto& byte : row) byte = static_cast<uint8_t>(r.next());
  for (int k = 0; k < blocks; ++k) {
    for (int off : f16_fields(t)) {
      const float v =
          std::ldexp(static_cast<float>(1.0 + r.unit()), static_cast<int>(r.next() % 14) - 12);
      const uint16_t h = keel::f32_to_fp16(r.next() & 1 ? -v : v);
      std::memcpy(row.data() + k * block_bytes(t) + off, &h, 2);
    }
  }
  return row;
}

// ---- round trips ---------------------------------------------------------------------------

std::vector<float> dequantize(dtype t, const std::vector<uint8_t>& q, int n) {
  std::vector<float> y(n);
  keel::dequantize_blocks(t, reinterpret_cast<const char*>(q.data()), n, y.data());
  return y;
}

std::vector<uint8_t> quantize(dtype t, const std::vector<float>& x,
                              const float* importance = nullptr) {
  std::vector<uint8_t> q(keel::bytes_of(*keel::layout_of(t), x.size()));
  keel::quantize_blocks(t, x.data(), static_cast<int64_t>(x.size()), q.data(), importance);
  return q;
}

constexpr int row_len = 4096;

/// A row of N(0, 0.02^2) values; with `outliers`, one value in 64 (at random places) is 20 times
/// larger, as in real weight matrices with a few large channels.
std::vector<float> weight_row(rng& r, bool outliers) {
  std::vector<float> x(row_len);
  for (auto& v : x) v = 0.02f * r.gauss();
  if (outliers)
    for (int k = 0; k < row_len / 64; ++k) x[r.next() % row_len] *= 20.0f;
  return x;
}

double rms(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
  return std::sqrt(s / a.size());
}

/// RMS error over RMS of the data, over `rows` rows of 4096.
double relative_error(dtype t, bool outliers, int rows) {
  rng r{outliers ? 11u : 7u};
  const std::vector<float> zero(row_len, 0.0f);
  double err = 0.0, data = 0.0;
  for (int k = 0; k < rows; ++k) {
    const auto x = weight_row(r, outliers);
    const auto y = dequantize(t, quantize(t, x), row_len);
    err += std::pow(rms(x, y), 2);
    data += std::pow(rms(x, zero), 2);
  }
  return std::sqrt(err / data);
}

struct bound {
  dtype t;
  double gaussian;  // relative RMS error bounds; see docs/engine.md, "Weight types"
  double outliers;
};

// Measured (32 rows of 4096) Gaussian / with outliers: q4_0 0.0816 / 0.0794, q4_1 0.0702 /
// 0.0545, q5_0 0.0404 / 0.0489, q5_1 0.0338 / 0.0295, q8_0 0.00536 / 0.0109, q2_k 0.268 /
// 0.116, q3_k 0.145 / 0.0834, q4_k 0.0707 / 0.0558, q5_k 0.0347 / 0.0306, q6_k 0.0173 / 0.0195.
// The bounds leave about 5% of margin.
constexpr bound bounds[] = {
    {dtype::q4_0, 0.086, 0.084},   {dtype::q4_1, 0.074, 0.058},   {dtype::q5_0, 0.043, 0.052},
    {dtype::q5_1, 0.036, 0.031},   {dtype::q8_0, 0.0057, 0.0115}, {dtype::q2_k, 0.282, 0.122},
    {dtype::q3_k, 0.153, 0.088},   {dtype::q4_k, 0.075, 0.059},   {dtype::q5_k, 0.037, 0.032},
    {dtype::q6_k, 0.0182, 0.0205},
};

}  // namespace

BOOST_AUTO_TEST_CASE(dequantize_matches_an_independent_reference_bit_for_bit) {
  rng r{1};
  for (dtype t : all_types) {
    BOOST_TEST_CONTEXT(t) {
      for (int trial = 0; trial < 50; ++trial) {
        const int blocks = 1 + static_cast<int>(r.next() % 8);
        const auto row = random_blocks(t, blocks, r);
        const int n = blocks * block_elems(t);
        const auto got = dequantize(t, row, n);
        int mismatches = 0;
        for (int i = 0; i < n; ++i) {
          const uint8_t* block = row.data() + (i / block_elems(t)) * block_bytes(t);
          const float want = reference_element(t, block, i % block_elems(t));
          if (std::memcmp(&want, &got[i], 4) != 0 && mismatches++ < 3)
            BOOST_ERROR("element " << i << ": got " << got[i] << ", want " << want);
        }
        BOOST_TEST(mismatches == 0);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(q3_k_scales_unpacks_sixteen_six_bit_values) {
  // Pack 0, 5, 10, ... (mod 64) by the layout: low nibbles in bytes 0..7 (two per byte), high
  // bit pairs in bytes 8..11.
  uint8_t packed[12] = {};
  uint8_t want[16];
  for (int j = 0; j < 16; ++j) {
    want[j] = static_cast<uint8_t>((5 * j + 3) % 64);
    packed[j % 8] |= static_cast<uint8_t>((want[j] & 15) << (4 * (j / 8)));
    packed[8 + j % 4] |= static_cast<uint8_t>((want[j] >> 4) << (2 * (j / 4)));
  }
  uint8_t got[16];
  keel::q3_k_scales(packed, got);
  for (int j = 0; j < 16; ++j) BOOST_TEST(int(got[j]) == int(want[j]), "scale " << j);
}

BOOST_AUTO_TEST_CASE(round_trip_error_is_within_the_stated_bound) {
  for (const auto& b : bounds) {
    BOOST_TEST_CONTEXT(b.t) {
      const double g = relative_error(b.t, false, 32), o = relative_error(b.t, true, 32);
      BOOST_TEST_MESSAGE(b.t << ": relative RMS error " << g << " (Gaussian), " << o
                             << " (with outliers)");
      BOOST_TEST(g < b.gaussian);
      BOOST_TEST(o < b.outliers);
    }
  }
}

BOOST_AUTO_TEST_CASE(more_bits_give_less_error) {
  for (bool outliers : {false, true}) {
    BOOST_TEST_CONTEXT((outliers ? "with outliers" : "Gaussian")) {
      auto e = [&](dtype t) { return relative_error(t, outliers, 8); };
      BOOST_TEST(e(dtype::q8_0) < e(dtype::q6_k));
      BOOST_TEST(e(dtype::q6_k) < e(dtype::q5_k));
      BOOST_TEST(e(dtype::q5_k) < e(dtype::q4_k));
      BOOST_TEST(e(dtype::q4_k) < e(dtype::q3_k));
      BOOST_TEST(e(dtype::q3_k) < e(dtype::q2_k));
      BOOST_TEST(e(dtype::q5_0) < e(dtype::q4_0));
      BOOST_TEST(e(dtype::q5_1) < e(dtype::q4_1));
    }
  }
}

BOOST_AUTO_TEST_CASE(q8_0_is_ggml_reference_rounding_and_keel_s_quantize_row) {
  // ggml's quantize_row_q8_0_ref: d = amax / 127, q = round(x * (1 / d)), d stored as F16.
  rng r{3};
  const auto x = weight_row(r, true);
  const auto got = quantize(dtype::q8_0, x);
  for (int k = 0; k < row_len / 32; ++k) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[32 * k + j]));
    const float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    keel::block_q8_0 want;
    want.d = keel::f32_to_fp16(d);
    for (int j = 0; j < 32; ++j) want.qs[j] = static_cast<int8_t>(std::round(x[32 * k + j] * id));
    BOOST_TEST(std::memcmp(&want, got.data() + 34 * k, 34) == 0, "block " << k);
  }
  std::vector<uint8_t> ops(got.size());
  keel::quantize_row(dtype::q8_0, x.data(), row_len, ops.data());
  BOOST_TEST((ops == got));
}

BOOST_AUTO_TEST_CASE(an_all_zero_row_quantizes_to_zeros) {
  const std::vector<float> x(512, 0.0f);
  for (dtype t : all_types) {
    BOOST_TEST_CONTEXT(t) {
      const auto y = dequantize(t, quantize(t, x), 512);
      for (float v : y) BOOST_TEST(v == 0.0f);
    }
  }
}

BOOST_AUTO_TEST_CASE(non_finite_inputs_read_as_zero_and_scales_stay_finite) {
  // quantize_blocks reads NaN and infinities as 0 (keel-model quantize refuses such tensors
  // before it gets here), and clamps every scale to the largest finite F16, so that no decoded
  // value is ever NaN or infinite, even from values beyond F16's range.
  rng r{5};
  auto x = weight_row(r, false);
  x.resize(1024);
  auto zeroed = x;
  const int bad[] = {3, 300, 301, 777};
  const float bad_values[] = {
      std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
      -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::signaling_NaN()};
  for (int k = 0; k < 4; ++k) {
    x[bad[k]] = bad_values[k];
    zeroed[bad[k]] = 0.0f;
  }
  std::vector<float> huge(1024);
  for (size_t i = 0; i < huge.size(); ++i)
    huge[i] = (i % 3 == 0 ? -3e38f : 1e30f) * (1.0f + 0.001f * i);
  for (dtype t : all_types) {
    BOOST_TEST_CONTEXT(t) {
      BOOST_TEST((quantize(t, x) == quantize(t, zeroed)));
      for (float v : dequantize(t, quantize(t, huge), 1024)) BOOST_TEST(std::isfinite(v));
    }
  }
}

BOOST_AUTO_TEST_CASE(importance_moves_error_to_the_unimportant_elements) {
  rng r{9};
  const auto x = weight_row(r, false);
  std::vector<float> importance(row_len);
  for (int i = 0; i < row_len; ++i) importance[i] = i % 4 == 0 ? 16.0f : 1.0f;
  for (dtype t : {dtype::q4_0, dtype::q4_1, dtype::q2_k, dtype::q3_k, dtype::q4_k, dtype::q6_k}) {
    BOOST_TEST_CONTEXT(t) {
      auto important_error = [&](const float* imp) {
        const auto y = dequantize(t, quantize(t, x, imp), row_len);
        double s = 0.0;
        for (int i = 0; i < row_len; i += 4) s += (double(x[i]) - y[i]) * (double(x[i]) - y[i]);
        return s;
      };
      BOOST_TEST(important_error(importance.data()) < 0.9 * important_error(nullptr));
    }
  }
}

BOOST_AUTO_TEST_CASE(requantizing_a_dequantised_row_gives_the_same_values) {
  // The encoders find a dequantised row's own scales again: quantize(dequantize(q)) decodes to
  // the same values (not always the same bytes: a scale's sign, and codes that change no value,
  // may differ). This holds for every Gaussian row here but one 256-value span of q5_k, and for
  // the rows with outliers in q8_0, q4_0 and q5_0. With outliers, a group left with two distinct
  // values (or whose lowest level is not 0, or whose super-block's largest code moved) fits
  // exactly with other scales than the stored ones, and the encoder may find those: then the
  // values move, by at most `max_change` of the first round trip's RMS error, in at most
  // `max_moved` of the 512 spans. Measured with outliers (spans, change): q6_k 2, 0.073; q4_1 2,
  // 0.002; q5_1 1, 0.045; q3_k 2, 0.071; q4_k 4, 0.133; q5_k 4, 0.166 (Gaussian 1, 0.071);
  // q2_k 219, 0.33 (two-bit groups with an outlier are often left with two values).
  struct expectation {
    dtype t;
    int max_moved_gaussian, max_moved_outliers;  // of 512 spans of 256 values
    double max_change;
  };
  const expectation expected[] = {
      {dtype::q8_0, 0, 0, 0.0},   {dtype::q4_0, 0, 0, 0.0},  {dtype::q5_0, 0, 0, 0.0},
      {dtype::q6_k, 0, 4, 0.1},   {dtype::q4_1, 0, 4, 0.05}, {dtype::q5_1, 0, 4, 0.1},
      {dtype::q3_k, 0, 4, 0.1},   {dtype::q4_k, 0, 8, 0.2},  {dtype::q5_k, 2, 8, 0.25},
      {dtype::q2_k, 0, 256, 0.4},
  };
  for (const auto& e : expected) {
    for (bool outliers : {false, true}) {
      BOOST_TEST_CONTEXT(e.t << (outliers ? " with outliers" : " Gaussian")) {
        rng r{outliers ? 21u : 17u};
        int moved = 0;
        double worst = 0.0;
        for (int row = 0; row < 32; ++row) {
          const auto x = weight_row(r, outliers);
          const auto y = dequantize(e.t, quantize(e.t, x), row_len);
          const auto z = dequantize(e.t, quantize(e.t, y), row_len);
          for (int s = 0; s < row_len; s += 256)
            moved += !std::equal(y.begin() + s, y.begin() + s + 256, z.begin() + s);
          worst = std::max(worst, rms(y, z) / rms(x, y));
        }
        BOOST_TEST_MESSAGE(e.t << ": " << moved << " of 512 spans moved, change " << worst);
        BOOST_TEST(moved <= (outliers ? e.max_moved_outliers : e.max_moved_gaussian));
        BOOST_TEST(worst <= e.max_change);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(quantize_is_deterministic_and_row_independent) {
  // A row quantizes to the same bytes alone or as part of a longer call: blocks are independent.
  rng r{13};
  const auto a = weight_row(r, true), b = weight_row(r, false);
  std::vector<float> ab(a);
  ab.insert(ab.end(), b.begin(), b.end());
  for (dtype t : all_types) {
    BOOST_TEST_CONTEXT(t) {
      auto qa = quantize(t, a), qb = quantize(t, b);
      qa.insert(qa.end(), qb.begin(), qb.end());
      BOOST_TEST((quantize(t, ab) == qa));
    }
  }
}
