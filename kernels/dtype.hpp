#pragma once

#include <cstdint>
#include <cstring>
#include <optional>
#include <ostream>
#include <string_view>

namespace keel {

/// Tensor element types, numbered as in GGUF (ggml's `ggml_type`). Keel computes with F32, F16,
/// BF16 and the block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K (quants.hpp); the others
/// are known by name only so that errors can name them.
enum class dtype : uint32_t {
  f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q5_0 = 6,
  q5_1 = 7,
  q8_0 = 8,
  q8_1 = 9,
  q2_k = 10,
  q3_k = 11,
  q4_k = 12,
  q5_k = 13,
  q6_k = 14,
  q8_k = 15,
  i8 = 24,
  i16 = 25,
  i32 = 26,
  i64 = 27,
  f64 = 28,
  bf16 = 30,
};

/// Elements per Q8_0 block.
inline constexpr int q8_0_block = 32;

/// One Q8_0 block: 32 signed bytes and an F16 scale; value i is `d * qs[i]`.
struct block_q8_0 {
  uint16_t d;
  int8_t qs[q8_0_block];
};
static_assert(sizeof(block_q8_0) == 34);

/// "f32", "q8_0", ...; "type#N" for numbers GGUF does not define.
std::string_view dtype_name(dtype t);

inline std::ostream& operator<<(std::ostream& out, dtype t) {
  return out << dtype_name(t);
}

/// Parses "f32", "f16", "bf16", "q8_0".
std::optional<dtype> parse_dtype(std::string_view s);

/// Whether Keel's kernels compute with this type.
bool dtype_supported(dtype t);

/// Whether `t` is one of the block-quantised types the integer kernels compute with (Q4_0,
/// Q4_1, Q5_0, Q5_1, Q8_0, Q2_K ... Q6_K).
bool is_block_quantized(dtype t);

/// Elements per block and bytes per block, or nullopt for a type Keel cannot size.
struct dtype_layout {
  uint32_t block_elems;
  uint32_t block_bytes;
};
std::optional<dtype_layout> layout_of(dtype t);

/// Bytes of `n` elements of type `t` (n must be a multiple of the block size).
inline uint64_t bytes_of(dtype_layout l, uint64_t n) {
  return n / l.block_elems * l.block_bytes;
}

/// Exact, as F16C's `vcvtph2ps` (a signalling NaN comes out quiet).
inline float fp16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 127 - 15 + 1;
      while ((mant & 0x400u) == 0) {
        mant <<= 1;
        --exp;
      }
      mant &= 0x3ffu;
      bits = sign | (exp << 23) | (mant << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (mant << 13) | (mant != 0 ? 0x400000u : 0);  // quiet NaN, as F16C
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// Round to nearest even, as F16C's `vcvtps2ph` with mode 0 (bit-exact, NaN payloads included).
inline uint16_t f32_to_fp16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t abs = x & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs & 0x7fffffu) >> 13));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // inf, or overflow to it
  if (abs < 0x38800000u) {                                               // subnormal or zero in f16
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);
    uint32_t e = abs >> 23;
    uint32_t m = (abs & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - e;  // f16 subnormals count units of 2^-24
    uint32_t r = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (r & 1u))) ++r;
    return static_cast<uint16_t>(sign | r);
  }
  uint32_t r = abs - 0x38000000u;  // rebias exponent 127 -> 15
  uint32_t half = r >> 13;
  uint32_t rem = r & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;
  return static_cast<uint16_t>(sign | half);
}

inline float bf16_to_f32(uint16_t h) {
  uint32_t bits = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

/// Round to nearest even; NaN stays NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((x >> 16) | 0x40u);
  uint32_t lsb = (x >> 16) & 1u;
  x += 0x7fffu + lsb;
  return static_cast<uint16_t>(x >> 16);
}

}  // namespace keel
