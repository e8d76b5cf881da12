#pragma once

// The integer kernels for block-quantised weights (see "canonical order" in ops.cpp).
//
// An input row is quantised once per matmul call into groups of eight 32-element blocks
// (`xgroup`); each weight row is decoded, a few rows at a time, into groups of eight kernel
// blocks (`kgroup`, see kblock in quants.hpp) laid out for 8-lane SIMD. The dot product of a
// decoded row and a quantised input is then the same sequence of exact integer sums and float
// steps on every ISA. Rows are padded to a whole number of groups with zero blocks, which add +0
// to their lanes and so change nothing.
//
// Both kinds of group hold their 8 x 32 bytes transposed in units of four: `q[j][4 b + e]` is
// element 4 j + e of block b. So one 32-byte row q[j] holds a four-byte piece of each block, a
// four-way byte dot product (vpdpbusd, or vpmaddubsw + vpmaddwd) of w.q[j] and x.q[j] adds to
// lane b of an accumulator the piece of block b, and the half-block sums of all eight blocks come
// out in the lanes without any horizontal adds.

#include <cstdint>

#include "kernels/ops.hpp"
#include "kernels/quants.hpp"

namespace keel::detail {

struct alignas(32) xgroup {
  int8_t q[8][32];   // the input, rounded to integers (transposed, above)
  int32_t s0[8];     // sum of block b's elements 0..15
  int32_t s1[8];     // sum of its elements 16..31
  int32_t sum[8];    // s0 + s1
  int16_t sp[8][2];  // the same two sums as 16-bit pairs (for the min term's madd)
  float d[8];        // scale: x ~ d * q
  int16_t bp[4][2];  // sum[2c], sum[2c + 1] as 16-bit pairs (a min per block: half the madds)

  /// Block b's sums (of its elements 0..15 and 16..31) and scale, in every form above.
  void set_block(int b, int32_t lo, int32_t hi, float scale) {
    s0[b] = lo;
    s1[b] = hi;
    sum[b] = lo + hi;
    sp[b][0] = static_cast<int16_t>(lo);
    sp[b][1] = static_cast<int16_t>(hi);
    bp[b / 2][b % 2] = static_cast<int16_t>(lo + hi);
    d[b] = scale;
  }
};

struct alignas(32) kgroup {
  uint8_t q[8][32];  // kblock::q of each block (transposed, above)
  int32_t sc0[8];
  int32_t sc1[8];
  int16_t mn[8][2];
  float s[8];
  float t[8];
};

/// Element i of block b in a group's transposed bytes.
template <class T>
T& element(T (&q)[8][32], int b, int i) {
  return q[i / 4][4 * b + i % 4];
}
template <class T>
const T& element(const T (&q)[8][32], int b, int i) {
  return q[i / 4][4 * b + i % 4];
}

/// What a type's kernel needs besides the decoded groups.
struct kprops {
  int off_shift = -1;  // log2 of kblock_offset, or -1 for none
  bool min = false;
  bool super = false;  // a K-quant: one float step per group (super-block), not per block
};
kprops props_of(dtype t);

/// Groups per row of `cols` elements.
inline int64_t groups_of(int64_t cols) {
  return (cols / 32 + 7) / 8;
}

/// Elements that share one input scale for weights of type `t`: its block size (32, or 256
/// for the K-quants).
int input_span(dtype t);

/// Quantises `cols` floats (a multiple of `span`, 32 or 256) into groups_of(cols) groups: per
/// span, amax = max |x|, d = amax / 127, q = nearest-even(x * (1 / d)) (0 when amax = 0); every
/// block of the span gets the same d.
void quantize_input(const float* x, int64_t cols, int span, xgroup* out);

/// Decodes row `r` of `w` into groups_of(w.cols) groups (scalar, any block type).
void decode_row(const matrix_view& w, int64_t r, kgroup* out);

/// The canonical dot product of one decoded row with one quantised input, in scalar code.
float qdot(const kgroup* w, const xgroup* x, int64_t groups, kprops p);

/// Per-thread scratch of at least `n` groups, reused across calls on the same thread. Inputs
/// have two slots (0 and 1), for the two ways of rounding one input (spans of 32 and 256).
xgroup* input_scratch(int64_t n, int slot = 0);
kgroup* weight_scratch(int64_t n);

/// y[b * ldy + r] for rows [r0, r1) and inputs [0, nb) of already quantised inputs (`x` holds
/// nb rows of groups_of(w.cols) groups). Scalar.
void qmatmul_scalar(const matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy,
                    int64_t r0, int64_t r1);

namespace avx2 {
void qmatmul(const matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy, int64_t r0,
             int64_t r1);
/// quantize_input, the same bytes, on 256-bit vectors.
void quantize_input(const float* x, int64_t cols, int span, xgroup* out);
/// Runs `iters` rounds of independent byte dot products; returns the multiply-adds done.
int64_t macs_burst(int64_t iters);
}  // namespace avx2
namespace avxvnni {
void qmatmul(const matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy, int64_t r0,
             int64_t r1);
/// quantize_input, the same bytes, on 256-bit vectors.
void quantize_input(const float* x, int64_t cols, int span, xgroup* out);
/// Runs `iters` rounds of independent byte dot products; returns the multiply-adds done.
int64_t macs_burst(int64_t iters);
}  // namespace avxvnni
namespace avx512vnni {
void qmatmul(const matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy, int64_t r0,
             int64_t r1);
/// quantize_input, the same bytes, on 256-bit vectors.
void quantize_input(const float* x, int64_t cols, int span, xgroup* out);
/// Runs `iters` rounds of independent byte dot products; returns the multiply-adds done.
int64_t macs_burst(int64_t iters);
}  // namespace avx512vnni

}  // namespace keel::detail
