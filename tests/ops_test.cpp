#define BOOST_TEST_MODULE ops_test
#include <boost/test/unit_test.hpp>

#include <immintrin.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "kernels/dtype.hpp"
#include "kernels/ops.hpp"
#include "kernels/quants.hpp"
#include "kernels/thread_pool.hpp"

using namespace keel;

namespace {

std::vector<cpu_isa> supported_isas() {
  std::vector<cpu_isa> out;
  for (cpu_isa i : {cpu_isa::scalar, cpu_isa::avx2, cpu_isa::avx512})
    if (i <= detected_isa()) out.push_back(i);
  return out;
}

/// Restores the detected ISA when a test that switches ISAs ends.
struct isa_guard {
  ~isa_guard() { use_isa(detected_isa()); }
};

uint32_t bits(float f) {
  return std::bit_cast<uint32_t>(f);
}

__attribute__((target("f16c"))) float hw_fp16_to_f32(uint16_t h) {
  return _cvtsh_ss(h);
}
__attribute__((target("f16c"))) uint16_t hw_f32_to_fp16(float f) {
  return static_cast<uint16_t>(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT));
}

bool has_f16c() {
  return __builtin_cpu_supports("f16c");
}

/// Values spread over many binades, both signs, so that a different summation order changes
/// the rounded result.
std::vector<float> random_floats(size_t n, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_int_distribution<int> ex(-8, 8);
  std::vector<float> v(n);
  for (auto& x : v) x = std::ldexp(nd(rng), ex(rng));
  return v;
}

constexpr dtype block_types[] = {dtype::q4_0, dtype::q4_1, dtype::q5_0, dtype::q5_1,
                                 dtype::q8_0, dtype::q2_k, dtype::q3_k, dtype::q4_k,
                                 dtype::q5_k, dtype::q6_k};

/// A rows x cols matrix of `type` with random contents, as raw bytes. Block types get random
/// bytes everywhere (every quant, scale and min pattern, q8_0's -128 included) and F16 scales
/// of either sign between 1e-4 and 0.5 in magnitude.
std::vector<char> random_matrix(dtype type, int64_t rows, int64_t cols, std::mt19937& rng) {
  const size_t row_bytes = bytes_of(*layout_of(type), static_cast<uint64_t>(cols));
  std::vector<char> out(row_bytes * static_cast<size_t>(rows));
  if (is_block_quantized(type)) {
    std::uniform_int_distribution<int> byte(0, 255);
    std::uniform_real_distribution<float> d(1e-4f, 0.5f);
    for (auto& c : out) c = static_cast<char>(byte(rng));
    const size_t block = layout_of(type)->block_bytes;
    for (size_t k = 0; k < out.size() / block; ++k)
      for (size_t off : f16_fields(type)) {
        const uint16_t h = f32_to_fp16(byte(rng) < 128 ? d(rng) : -d(rng));
        std::memcpy(out.data() + k * block + off, &h, 2);
      }
    return out;
  }
  for (int64_t r = 0; r < rows; ++r) {
    auto v = random_floats(static_cast<size_t>(cols), rng);
    quantize_row(type, v.data(), cols, out.data() + r * row_bytes);
  }
  return out;
}

/// Restores VNNI when a test that rules it out ends.
struct vnni_guard {
  ~vnni_guard() { use_vnni(true); }
};

}  // namespace

BOOST_AUTO_TEST_SUITE(dtypes)

BOOST_AUTO_TEST_CASE(names_parse_and_layouts_match_ggml) {
  BOOST_TEST(dtype_name(dtype::q8_0) == "q8_0");
  BOOST_TEST(dtype_name(dtype::bf16) == "bf16");
  BOOST_TEST(dtype_name(static_cast<dtype>(99)) == "type#99");
  for (dtype t : {dtype::f32, dtype::f16, dtype::bf16}) {
    BOOST_TEST(dtype_supported(t));
    BOOST_TEST((parse_dtype(dtype_name(t)) == t));
  }
  for (dtype t : block_types) {
    BOOST_TEST(dtype_supported(t));
    BOOST_TEST(is_block_quantized(t));
  }
  BOOST_TEST(!parse_dtype("q9_9"));
  for (dtype t : {dtype::q8_1, dtype::q8_k, dtype::i8, dtype::f64}) {
    BOOST_TEST(!dtype_supported(t), dtype_name(t));
    BOOST_TEST(!is_block_quantized(t), dtype_name(t));
  }
  auto l = [](dtype t) { return std::pair{layout_of(t)->block_elems, layout_of(t)->block_bytes}; };
  BOOST_TEST((l(dtype::q8_0) == std::pair{32u, 34u}));
  BOOST_TEST((l(dtype::q4_0) == std::pair{32u, 18u}));
  BOOST_TEST((l(dtype::q4_k) == std::pair{256u, 144u}));
  BOOST_TEST((l(dtype::q6_k) == std::pair{256u, 210u}));
  BOOST_TEST((l(dtype::q8_k) == std::pair{256u, 292u}));
  BOOST_TEST((l(dtype::bf16) == std::pair{1u, 2u}));
  BOOST_TEST(!layout_of(static_cast<dtype>(99)));
  BOOST_TEST(bytes_of(*layout_of(dtype::q8_0), 4096) == 128u * 34u);
}

BOOST_AUTO_TEST_CASE(fp16_to_f32_matches_f16c_for_every_half_including_nan) {
  if (!has_f16c()) return;
  int mismatches = 0;
  for (uint32_t h = 0; h < 0x10000; ++h) {
    float sw = fp16_to_f32(static_cast<uint16_t>(h));
    float hw = hw_fp16_to_f32(static_cast<uint16_t>(h));
    if (bits(sw) != bits(hw)) ++mismatches;
  }
  BOOST_TEST(mismatches == 0);
}

BOOST_AUTO_TEST_CASE(f32_to_fp16_matches_f16c_including_ties_subnormals_inf_nan) {
  if (!has_f16c()) return;
  std::vector<float> v;
  // A stride through all f32 bit patterns.
  for (uint64_t b = 0; b < (1ull << 32); b += 4093)
    v.push_back(std::bit_cast<float>(static_cast<uint32_t>(b)));
  // Every half value, and the exact midpoints and their neighbours between adjacent halves
  // (ties to even in the normal and subnormal ranges, and the overflow threshold).
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    float a = fp16_to_f32(static_cast<uint16_t>(h));
    float b = fp16_to_f32(static_cast<uint16_t>(h + 1));
    float mid = a + (b - a) / 2;  // exact: halves have few mantissa bits
    for (float x : {a, mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e9f)}) {
      v.push_back(x);
      v.push_back(-x);
    }
  }
  for (uint32_t m = 1; m < 0x800000u; m += 97) {  // NaN payloads, signalling and quiet
    v.push_back(std::bit_cast<float>(0x7f800000u | m));
    v.push_back(std::bit_cast<float>(0xff800000u | m));
  }
  for (float x : {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e30f, 0x1p-25f, 0x1.8p-25f, 0x1p-26f,
                  0x1p-149f, std::numeric_limits<float>::infinity(),
                  -std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()})
    v.push_back(x);
  int mismatches = 0;
  for (float x : v) {
    uint16_t sw = f32_to_fp16(x), hw = hw_f32_to_fp16(x);
    if (sw != hw && ++mismatches < 5)
      BOOST_TEST_MESSAGE("f32 " << std::hex << bits(x) << " sw " << sw << " hw " << hw);
  }
  BOOST_TEST(v.size() > 1000000u);
  BOOST_TEST(mismatches == 0);
}

BOOST_AUTO_TEST_CASE(bf16_rounds_to_nearest_even) {
  BOOST_TEST(f32_to_bf16(std::bit_cast<float>(0x3f808000u)) == 0x3f80);  // tie, even below
  BOOST_TEST(f32_to_bf16(std::bit_cast<float>(0x3f818000u)) == 0x3f82);  // tie, even above
  BOOST_TEST(f32_to_bf16(std::bit_cast<float>(0x3f808001u)) == 0x3f81);
  BOOST_TEST(std::isnan(bf16_to_f32(f32_to_bf16(std::numeric_limits<float>::quiet_NaN()))));
  BOOST_TEST(bf16_to_f32(0x3f80) == 1.0f);
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(matmul_determinism)

BOOST_AUTO_TEST_CASE(every_isa_matches_reference_dot_row_bit_for_bit) {
  isa_guard guard;
  vnni_guard vguard;
  std::mt19937 rng(42);
  const int64_t rows = 37;
  int compared = 0;
  std::vector<dtype> types{dtype::f32, dtype::f16, dtype::bf16};
  types.insert(types.end(), std::begin(block_types), std::end(block_types));
  for (dtype type : types) {
    // 4096 is a model's width; 75 and 200 exercise the tail of the float types; 96 and 288
    // (3 and 9 blocks) and 768 (3 super-blocks) a last group of eight blocks only partly used.
    std::vector<int64_t> widths{256, 4096};
    if (!is_block_quantized(type)) widths.insert(widths.end(), {75, 200});
    if (layout_of(type)->block_elems == 32) widths.insert(widths.end(), {96, 288});
    if (layout_of(type)->block_elems == 256) widths.push_back(768);
    for (int64_t cols : widths) {
      auto data = random_matrix(type, rows, cols, rng);
      matrix_view w = make_matrix(type, data.data(), rows, cols);
      for (int64_t nb : {1, 3, 4, 7, 16, 21}) {
        const int64_t ldx = cols + 7, ldy = rows + 3;
        auto x = random_floats(static_cast<size_t>(ldx * nb), rng);
        std::vector<float> want(static_cast<size_t>(ldy * nb));
        for (int64_t b = 0; b < nb; ++b)
          for (int64_t r = 0; r < rows; ++r)
            want[b * ldy + r] = reference::dot_row(w, r, x.data() + b * ldx);
        for (cpu_isa isa : supported_isas()) {
          use_isa(isa);
          for (bool vnni : {true, false}) {
            use_vnni(vnni);
            if (!vnni && (!is_block_quantized(type) || active_qdot() == qdot_isa::scalar)) continue;
            std::uniform_int_distribution<int64_t> pick(0, rows);
            for (int trial = 0; trial < 4; ++trial) {
              int64_t r0 = trial == 0 ? 0 : pick(rng), r1 = trial == 0 ? rows : pick(rng);
              if (r0 > r1) std::swap(r0, r1);
              std::vector<float> y(want.size(), -7.0f);
              matmul(w, x.data(), ldx, nb, y.data(), ldy, r0, r1);
              int bad = 0;
              for (int64_t b = 0; b < nb; ++b)
                for (int64_t r = 0; r < ldy; ++r) {
                  float got = y[b * ldy + r];
                  float exp = (r >= r0 && r < r1) ? want[b * ldy + r] : -7.0f;
                  bad += bits(got) != bits(exp);
                  ++compared;
                }
              BOOST_TEST(bad == 0, dtype_name(type)
                                       << " cols " << cols << " nb " << nb << " isa "
                                       << to_string(isa) << " qdot " << to_string(active_qdot())
                                       << " rows [" << r0 << ", " << r1 << ")");
            }
          }
        }
      }
    }
  }
  BOOST_TEST(compared > 10000);
}

BOOST_AUTO_TEST_CASE(the_largest_weights_and_inputs_keep_every_isa_exact) {
  // Every quant at its largest value (all bytes 0xff) against inputs that round to +-127: the
  // widest products and pair sums, where a 16-bit sum (vpmaddubsw) would overflow if a kernel
  // added too many of them before widening.
  isa_guard guard;
  vnni_guard vguard;
  for (dtype type : block_types) {
    const int64_t rows = 19, cols = 512, nb = 9;  // a partial tile of 16 and of 8 rows
    const size_t row_bytes = bytes_of(*layout_of(type), static_cast<uint64_t>(cols));
    std::vector<char> data(row_bytes * rows, static_cast<char>(0xff));
    const size_t block = layout_of(type)->block_bytes;
    for (size_t k = 0; k < data.size() / block; ++k)
      for (size_t off : f16_fields(type)) {
        const uint16_t h = f32_to_fp16(0.01f);
        std::memcpy(data.data() + k * block + off, &h, 2);
      }
    matrix_view w = make_matrix(type, data.data(), rows, cols);
    std::vector<float> x(static_cast<size_t>(cols * nb));
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t i = 0; i < cols; ++i)
        x[b * cols + i] = b % 3 == 0 ? 1.0f : b % 3 == 1 ? -1.0f : (i / 32) % 2 ? 2.0f : -2.0f;
    std::vector<float> want(static_cast<size_t>(rows * nb));
    for (int64_t b = 0; b < nb; ++b)
      for (int64_t r = 0; r < rows; ++r)
        want[b * rows + r] = reference::dot_row(w, r, x.data() + b * cols);
    for (cpu_isa isa : supported_isas()) {
      use_isa(isa);
      for (bool vnni : {true, false}) {
        use_vnni(vnni);
        for (int64_t n : {int64_t{1}, int64_t{4}, nb}) {
          std::vector<float> y(want.size(), -7.0f);
          matmul(w, x.data(), cols, n, y.data(), rows, 0, rows);
          BOOST_TEST(std::memcmp(y.data(), want.data(), static_cast<size_t>(rows * n) * 4) == 0,
                     dtype_name(type) << " nb " << n << " qdot " << to_string(active_qdot()));
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(the_threaded_matmul_of_block_types_equals_the_single_range_one) {
  std::mt19937 rng(8);
  thread_pool pool(3);
  for (dtype type : block_types) {
    const int64_t rows = 70, cols = 512, nb = 5;
    auto data = random_matrix(type, rows, cols, rng);
    matrix_view w = make_matrix(type, data.data(), rows, cols);
    auto x = random_floats(static_cast<size_t>(cols * nb), rng);
    std::vector<float> one(rows * nb), many(rows * nb);
    matmul(w, x.data(), cols, nb, one.data(), rows, 0, rows);
    matmul(pool, w, x.data(), cols, nb, many.data(), rows);
    BOOST_TEST(std::memcmp(one.data(), many.data(), one.size() * 4) == 0, dtype_name(type));
  }
}

BOOST_AUTO_TEST_CASE(a_matmul_of_several_parts_equals_one_matmul_per_part) {
  // Parts of both input roundings (by 32 and by 256) and a float part, with row counts that do
  // not fall on the threads' grain of 16, against the same inputs.
  std::mt19937 rng(9);
  thread_pool pool(3);
  const int64_t cols = 512, nb = 5, ldx = cols + 3;
  const dtype types[] = {dtype::q4_k, dtype::q8_0, dtype::f16, dtype::q6_k, dtype::q4_0};
  const int64_t rows[] = {37, 50, 21, 16, 3};
  auto x = random_floats(static_cast<size_t>(ldx * nb), rng);
  std::vector<std::vector<char>> data;
  std::vector<std::vector<float>> one, many;
  std::vector<matmul_part> parts;
  for (int k = 0; k < 5; ++k) {
    data.push_back(random_matrix(types[k], rows[k], cols, rng));
    one.emplace_back(static_cast<size_t>((rows[k] + 1) * nb), -7.0f);
    many.emplace_back(static_cast<size_t>((rows[k] + 1) * nb), -7.0f);
  }
  for (int k = 0; k < 5; ++k) {
    const matrix_view w = make_matrix(types[k], data[k].data(), rows[k], cols);
    matmul(pool, w, x.data(), ldx, nb, one[k].data(), rows[k] + 1);
    parts.push_back({w, many[k].data(), rows[k] + 1});
  }
  matmul(pool, parts, x.data(), ldx, cols, nb);
  for (int k = 0; k < 5; ++k)
    BOOST_TEST(std::memcmp(one[k].data(), many[k].data(), one[k].size() * 4) == 0,
               dtype_name(types[k]));
}

BOOST_AUTO_TEST_CASE(reference_order_is_not_a_plain_sequential_sum) {
  // The determinism test above only has teeth if order matters for these inputs.
  std::mt19937 rng(7);
  int differ = 0;
  for (int t = 0; t < 50; ++t) {
    auto a = random_floats(4096, rng), b = random_floats(4096, rng);
    float seq = 0.0f;
    for (size_t j = 0; j < a.size(); ++j) seq = std::fma(a[j], b[j], seq);
    differ += bits(seq) != bits(reference::dot_f32(a.data(), b.data(), 4096));
  }
  BOOST_TEST(differ > 25);
}

BOOST_AUTO_TEST_CASE(reference_integer_kernel_follows_the_documented_order) {
  // ops.cpp's canonical order for block types, written out here from its comment, with the
  // weights taken through decode_kblock (whose decoding quants_test checks against the format).
  // A unit is one block of the type: 32 elements, or a K-quant's super-block of 256.
  std::mt19937 rng(3);
  for (dtype type : block_types) {
    const int64_t cols = 768;  // 24 blocks of 32 or 3 super-blocks: lanes used once or twice
    const int64_t unit = layout_of(type)->block_elems;
    auto data = random_matrix(type, 1, cols, rng);
    auto x = random_floats(cols, rng);
    const int off = kblock_offset(type);
    float acc[16] = {};
    for (int64_t u = 0; u < cols / unit; ++u) {
      const float* xu = x.data() + unit * u;
      float amax = 0;
      for (int64_t i = 0; i < unit; ++i) amax = std::max(amax, std::fabs(xu[i]));
      const float dx = amax / 127.0f;
      const float id = amax != 0 ? 1.0f / dx : 0.0f;
      int64_t isum = 0, msum = 0;
      float s = 0, t = 0;
      for (int64_t k = unit * u / 32; k < unit * (u + 1) / 32; ++k) {
        int xq[32];
        for (int i = 0; i < 32; ++i)
          xq[i] = static_cast<int>(std::nearbyint(x[32 * k + i] * id));
        kblock kb;
        decode_kblock(type, data.data(), k, kb);
        int64_t p[2] = {0, 0}, sx[2] = {0, 0};
        for (int i = 0; i < 32; ++i) {
          p[i / 16] += (kb.q[i] - off) * xq[i];
          sx[i / 16] += xq[i];
        }
        isum += kb.sc[0] * p[0] + kb.sc[1] * p[1];
        msum += kb.mn[0] * sx[0] + kb.mn[1] * sx[1];
        s = kb.s;  // the same for every block of a super-block
        t = kb.t;
      }
      BOOST_TEST(std::abs(isum) < (int64_t{1} << 31));
      volatile float sd = s * dx;  // rounded before the fma
      volatile float td = t * dx;
      float& lane = acc[u % 16];
      lane = std::fma(sd, static_cast<float>(isum), lane);
      if (has_min(type)) lane = std::fma(td, static_cast<float>(msum), lane);
    }
    for (int w = 8; w >= 1; w /= 2)
      for (int l = 0; l < w; ++l) acc[l] = acc[l] + acc[l + w];
    matrix_view m = make_matrix(type, data.data(), 1, cols);
    BOOST_TEST(bits(reference::dot_row(m, 0, x.data())) == bits(acc[0]), dtype_name(type));
  }
}

BOOST_AUTO_TEST_CASE(the_integer_kernel_is_close_to_the_dequantised_dot_product) {
  // Quantising the input per block of the type (32 or 256) costs at most half a step
  // (amax / 254 of that block) per value.
  std::mt19937 rng(4);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (dtype type : block_types) {
    const int64_t cols = 1024;
    auto data = random_matrix(type, 4, cols, rng);
    matrix_view m = make_matrix(type, data.data(), 4, cols);
    std::vector<float> x(cols), w(cols);
    for (auto& v : x) v = nd(rng);
    for (int64_t r = 0; r < 4; ++r) {
      dequantize_row(m, r, w.data());
      double exact = 0, bound = 0;
      const int64_t unit = layout_of(type)->block_elems;
      for (int64_t k = 0; k < cols / unit; ++k) {
        double amax = 0;
        for (int64_t i = 0; i < unit; ++i)
          amax = std::max(amax, std::fabs(double(x[unit * k + i])));
        for (int64_t i = 0; i < unit; ++i) {
          exact += double(w[unit * k + i]) * x[unit * k + i];
          bound += std::fabs(double(w[unit * k + i])) * (amax / 254.0 * 1.01 + 1e-6);
        }
      }
      const double got = reference::dot_row(m, r, x.data());
      BOOST_TEST(std::fabs(got - exact) <= bound, dtype_name(type) << " row " << r << ": " << got
                                                                   << " vs " << exact);
    }
  }
}

BOOST_AUTO_TEST_CASE(dot_f32_and_axpy_are_identical_across_isas_for_any_length) {
  isa_guard guard;
  std::mt19937 rng(11);
  auto a = random_floats(5000, rng), b = random_floats(5000, rng);
  for (int64_t n : {0, 1, 5, 15, 16, 17, 31, 32, 33, 64, 70, 128, 1000, 4101}) {
    float want = reference::dot_f32(a.data(), b.data(), n);
    std::vector<float> yw(b.begin(), b.begin() + n);
    for (int64_t i = 0; i < n; ++i) yw[i] = std::fma(0.37f, a[i], yw[i]);
    // A one-row F32 matrix is the same dot product.
    matrix_view m = make_matrix(dtype::f32, a.data(), 1, n);
    for (cpu_isa isa : supported_isas()) {
      use_isa(isa);
      BOOST_TEST(bits(dot_f32(a.data(), b.data(), n)) == bits(want),
                 "n " << n << " isa " << to_string(isa));
      float y = 0;
      if (n > 0) {
        matmul(m, b.data(), n, 1, &y, 1, 0, 1);
        BOOST_TEST(bits(y) == bits(want));
      }
      std::vector<float> yv(b.begin(), b.begin() + n);
      axpy_f32(yv.data(), 0.37f, a.data(), n);
      // n == 0: no memcmp, whose pointers must be valid even for no bytes (data() is null).
      BOOST_TEST((n == 0 || std::memcmp(yv.data(), yw.data(), yv.size() * 4) == 0));
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(quantization)

BOOST_AUTO_TEST_CASE(q8_0_quantizes_as_ggml_and_round_trips_within_half_a_step) {
  std::mt19937 rng(5);
  auto x = random_floats(128, rng);
  x[5] = 0.0f;
  std::fill(x.begin() + 96, x.end(), 0.0f);  // an all-zero block: d = 0, q = 0
  std::vector<block_q8_0> q(4);
  quantize_row(dtype::q8_0, x.data(), 128, q.data());
  std::vector<float> back(128);
  matrix_view m = make_matrix(dtype::q8_0, q.data(), 1, 128);
  dequantize_row(m, 0, back.data());
  for (int k = 0; k < 4; ++k) {
    float amax = 0;
    for (int l = 0; l < 32; ++l) amax = std::max(amax, std::fabs(x[32 * k + l]));
    float d = amax / 127.0f;
    BOOST_TEST(q[k].d == f32_to_fp16(d));
    for (int l = 0; l < 32; ++l) {
      float id = d != 0 ? 1.0f / d : 0.0f;
      BOOST_TEST(q[k].qs[l] == static_cast<int8_t>(std::round(x[32 * k + l] * id)));
      BOOST_TEST(back[32 * k + l] == fp16_to_f32(q[k].d) * q[k].qs[l]);
      BOOST_TEST(std::fabs(back[32 * k + l] - x[32 * k + l]) <= 0.51f * d + 1e-3f * amax);
    }
  }
  BOOST_TEST(q[3].d == 0);
}

BOOST_AUTO_TEST_CASE(f16_and_bf16_round_trip_through_the_dtype_converters) {
  std::mt19937 rng(9);
  auto x = random_floats(64, rng);
  for (dtype t : {dtype::f16, dtype::bf16, dtype::f32}) {
    std::vector<char> buf(bytes_of(*layout_of(t), 64));
    quantize_row(t, x.data(), 64, buf.data());
    std::vector<float> back(64);
    dequantize_row(make_matrix(t, buf.data(), 1, 64), 0, back.data());
    for (int i = 0; i < 64; ++i) {
      float want = t == dtype::f16    ? fp16_to_f32(f32_to_fp16(x[i]))
                   : t == dtype::bf16 ? bf16_to_f32(f32_to_bf16(x[i]))
                                      : x[i];
      BOOST_TEST(bits(back[i]) == bits(want));
    }
  }
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_AUTO_TEST_SUITE(elementwise)

BOOST_AUTO_TEST_CASE(rmsnorm_scales_to_unit_rms_times_weight) {
  std::mt19937 rng(1);
  auto x = random_floats(100, rng), w = random_floats(100, rng);
  std::vector<float> out(100);
  rmsnorm(out.data(), x.data(), w.data(), 100, 1e-5f);
  double ss = 0;
  for (float v : x) ss += double(v) * v;
  double scale = 1.0 / std::sqrt(ss / 100 + 1e-5);
  for (int i = 0; i < 100; ++i)
    BOOST_TEST(out[i] == x[i] * scale * w[i], boost::test_tools::tolerance(1e-5));
  rmsnorm(x.data(), x.data(), w.data(), 100, 1e-5f);  // in place
  BOOST_TEST(std::memcmp(x.data(), out.data(), 400) == 0);
}

BOOST_AUTO_TEST_CASE(softmax_sums_to_one_and_survives_large_inputs) {
  std::vector<float> x{1000.0f, 1001.0f, 999.0f, -std::numeric_limits<float>::infinity()};
  softmax(x.data(), 4);
  double e0 = std::exp(-1.0), e2 = std::exp(-2.0), s = e0 + 1 + e2;
  BOOST_TEST(x[0] == e0 / s, boost::test_tools::tolerance(1e-6));
  BOOST_TEST(x[1] == 1 / s, boost::test_tools::tolerance(1e-6));
  BOOST_TEST(x[3] == 0.0f);
}

BOOST_AUTO_TEST_CASE(silu_mul_gates_up) {
  std::vector<float> g{-2.0f, 0.0f, 3.0f}, u{1.0f, 5.0f, 2.0f};
  silu_mul(g.data(), u.data(), 3);
  BOOST_TEST(g[0] == -2.0 / (1 + std::exp(2.0)), boost::test_tools::tolerance(1e-6));
  BOOST_TEST(g[1] == 0.0f);
  BOOST_TEST(g[2] == 2 * 3.0 / (1 + std::exp(-3.0)), boost::test_tools::tolerance(1e-6));
}

BOOST_AUTO_TEST_CASE(rope_rotates_adjacent_pairs_by_pos_times_theta_power) {
  const int heads = 2, dim = 8;
  std::mt19937 rng(4);
  auto x = random_floats(heads * dim, rng);
  auto y = x;
  rope(y.data(), heads, dim, 0, 10000.0f);
  BOOST_TEST(std::memcmp(x.data(), y.data(), x.size() * 4) == 0);  // pos 0: identity
  y = x;
  rope(y.data(), heads, dim, 7, 10000.0f);
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < dim; i += 2) {
      double a = 7 * std::pow(10000.0, -double(i) / dim);
      double x0 = x[h * dim + i], x1 = x[h * dim + i + 1];
      BOOST_TEST(y[h * dim + i] == x0 * std::cos(a) - x1 * std::sin(a),
                 boost::test_tools::tolerance(1e-4));
      BOOST_TEST(y[h * dim + i + 1] == x0 * std::sin(a) + x1 * std::cos(a),
                 boost::test_tools::tolerance(1e-4));
    }
}

BOOST_AUTO_TEST_SUITE_END()
