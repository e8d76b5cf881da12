#pragma once

// The block-quantised weight types of GGUF, laid out byte for byte as the format defines them
// (ggml's ggml-common.h), and their conversions to and from F32. docs/engine.md, "Weight types",
// describes each layout. A row of `cols` elements is cols / block_elems blocks in order.
//
// Every type is also described, for the integer kernels, as a run of 32-element "kernel blocks"
// (a K-quant super-block of 256 is eight of them): see `kblock` below.

#include <cstddef>
#include <cstdint>
#include <span>

#include "kernels/dtype.hpp"

namespace keel {

inline constexpr int qk_k = 256;  // elements per K-quant super-block

struct block_q4_0 {  // value i: d * (q_i - 8); q_i is nibble i % 16 of qs, low for i < 16
  uint16_t d;
  uint8_t qs[16];
};
struct block_q4_1 {  // value i: d * q_i + m
  uint16_t d;
  uint16_t m;
  uint8_t qs[16];
};
struct block_q5_0 {  // value i: d * (q_i - 16); bit 4 of q_i is bit i of qh (little-endian)
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct block_q5_1 {  // value i: d * q_i + m
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[16];
};
struct block_q2_k {  // sixteen groups of 16: d * (scales[g] & 15) * q - dmin * (scales[g] >> 4)
  uint8_t scales[16];
  uint8_t qs[64];
  uint16_t d;
  uint16_t dmin;
};
struct block_q3_k {  // sixteen groups of 16: d * (scale_g - 32) * (q - 4), q in 0..7
  uint8_t hmask[32];
  uint8_t qs[64];
  uint8_t scales[12];  // sixteen 6-bit scales
  uint16_t d;
};
struct block_q4_k {  // eight groups of 32: d * scale_g * q - dmin * min_g (6-bit scale and min)
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
struct block_q5_k {  // as q4_k with a fifth bit per value in qh
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
struct block_q6_k {  // sixteen groups of 16: d * scales[g] * (q - 32), q in 0..63
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};

static_assert(sizeof(block_q4_0) == 18 && sizeof(block_q4_1) == 20);
static_assert(sizeof(block_q5_0) == 22 && sizeof(block_q5_1) == 24);
static_assert(sizeof(block_q2_k) == 84 && sizeof(block_q3_k) == 110);
static_assert(sizeof(block_q4_k) == 144 && sizeof(block_q5_k) == 176);
static_assert(sizeof(block_q6_k) == 210);
static_assert(offsetof(block_q2_k, d) == 80 && offsetof(block_q3_k, d) == 108);
static_assert(offsetof(block_q6_k, d) == 208 && offsetof(block_q4_1, m) == 2);

/// Byte offsets, within one block of type `t`, of its F16 fields (d, and m or dmin); empty for
/// a type that is not a block type.
inline std::span<const size_t> f16_fields(dtype t) {
  static constexpr size_t at0[] = {0}, at0_2[] = {0, 2}, q2k[] = {80, 82}, q3k[] = {108},
                          q6k[] = {208};
  switch (t) {
    case dtype::q4_0:
    case dtype::q5_0:
    case dtype::q8_0:
      return at0;
    case dtype::q4_1:
    case dtype::q5_1:
    case dtype::q4_k:
    case dtype::q5_k:
      return at0_2;
    case dtype::q2_k:
      return q2k;
    case dtype::q3_k:
      return q3k;
    case dtype::q6_k:
      return q6k;
    default:
      return {};
  }
}

/// The 6-bit scale and min of group `g` (0..7) of a Q4_K/Q5_K super-block's 12 scale bytes.
inline void k4_scale_min(const uint8_t* s, int g, uint8_t& scale, uint8_t& min) {
  if (g < 4) {
    scale = s[g] & 63;
    min = s[g + 4] & 63;
  } else {
    scale = static_cast<uint8_t>((s[g + 4] & 0xf) | ((s[g - 4] >> 6) << 4));
    min = static_cast<uint8_t>((s[g + 4] >> 4) | ((s[g] >> 6) << 4));
  }
}

/// The sixteen 6-bit Q3_K scales (0..63, before the -32) from its 12 scale bytes.
void q3_k_scales(const uint8_t* s, uint8_t out[16]);

/// One 32-element kernel block of a weight row in integer form: element i (0..31) is
///   s * sc[i / 16] * (q[i] - offset)  +  t * mn[i / 16]
/// with q an unsigned integer weight, offset a power of two fixed by the type (kblock_offset),
/// sc and mn integer factors, s and t floats (t = 0 and mn = 0 for types without a min). The
/// integer kernels (ops.cpp, "canonical order") compute per block, against an input block
/// quantised to xq with scale dx,
///   I = sc[0] * sum(i < 16: (q[i] - offset) * xq[i]) + sc[1] * sum(i >= 16: ...)
///   M = mn[0] * sum(i < 16: xq[i]) + mn[1] * sum(i >= 16: xq[i])
/// exactly in integers (summed over the eight blocks of a K-quant super-block, which share s, t
/// and dx), then add (s * dx) * I and (t * dx) * M to a float partial sum.
struct kblock {
  uint8_t q[32];
  int32_t sc[2];
  int32_t mn[2];
  float s;
  float t;
};

/// The offset of kblock::q for type `t`: 8 (q4_0), 16 (q5_0), 4 (q3_k), 32 (q6_k), 128 (q8_0),
/// 0 for the types with a min.
int kblock_offset(dtype t);

/// Whether the type has a min term (t, mn above): q4_1, q5_1, q2_k, q4_k, q5_k.
bool has_min(dtype t);

/// Decodes kernel block `k` (0 .. cols / 32 - 1) of a row of type `t` (any block type Keel
/// computes with, q8_0 included).
void decode_kblock(dtype t, const char* row, int64_t k, kblock& out);

/// Dequantises `n` elements (a multiple of the type's block size) of a row of a block type.
void dequantize_blocks(dtype t, const char* row, int64_t n, float* out);

/// Quantises `n` F32 values (a multiple of the block size) into blocks of type `t`. `importance`
/// (may be null) weights each element's squared error when searching scales.
void quantize_blocks(dtype t, const float* x, int64_t n, void* out,
                     const float* importance = nullptr);

}  // namespace keel
