// Block-quantised weights in the integer kernels' form (kblock, kgroup), the quantised inputs
// (xgroup), and the scalar reference of the integer dot product. Compiled with
// -ffp-contract=off: the float steps of the canonical order are written out.

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "kernels/detail/qmatmul.hpp"

namespace keel {

namespace {

float f16(uint16_t h) {
  return fp16_to_f32(h);
}

template <class Block>
const Block& block_at(const char* row, int64_t i) {
  return reinterpret_cast<const Block*>(row)[i];
}

void nibbles(const uint8_t* qs, uint8_t* q) {
  for (int i = 0; i < 16; ++i) {
    q[i] = qs[i] & 15;
    q[i + 16] = qs[i] >> 4;
  }
}

void fifth_bits(const uint8_t* qh, uint8_t* q) {
  uint32_t h;
  std::memcpy(&h, qh, 4);
  for (int i = 0; i < 32; ++i) q[i] = static_cast<uint8_t>(q[i] | (((h >> i) & 1u) << 4));
}

void set(kblock& o, int32_t sc0, int32_t sc1, int32_t mn0, int32_t mn1, float s, float t) {
  o.sc[0] = sc0;
  o.sc[1] = sc1;
  o.mn[0] = mn0;
  o.mn[1] = mn1;
  o.s = s;
  o.t = t;
}

}  // namespace

bool has_min(dtype t) {
  return t == dtype::q4_1 || t == dtype::q5_1 || t == dtype::q2_k || t == dtype::q4_k ||
         t == dtype::q5_k;
}

int kblock_offset(dtype t) {
  switch (t) {
    case dtype::q4_0:
      return 8;
    case dtype::q5_0:
      return 16;
    case dtype::q3_k:
      return 4;
    case dtype::q6_k:
      return 32;
    case dtype::q8_0:
      return 128;
    default:
      return 0;
  }
}

void decode_kblock(dtype t, const char* row, int64_t k, kblock& o) {
  const int64_t sb = k / 8;  // super-block, for the K-quants
  const int b = static_cast<int>(k % 8);
  switch (t) {
    case dtype::q4_0: {
      const auto& x = block_at<block_q4_0>(row, k);
      nibbles(x.qs, o.q);
      return set(o, 1, 1, 0, 0, f16(x.d), 0.0f);
    }
    case dtype::q4_1: {
      const auto& x = block_at<block_q4_1>(row, k);
      nibbles(x.qs, o.q);
      return set(o, 1, 1, 1, 1, f16(x.d), f16(x.m));
    }
    case dtype::q5_0: {
      const auto& x = block_at<block_q5_0>(row, k);
      nibbles(x.qs, o.q);
      fifth_bits(x.qh, o.q);
      return set(o, 1, 1, 0, 0, f16(x.d), 0.0f);
    }
    case dtype::q5_1: {
      const auto& x = block_at<block_q5_1>(row, k);
      nibbles(x.qs, o.q);
      fifth_bits(x.qh, o.q);
      return set(o, 1, 1, 1, 1, f16(x.d), f16(x.m));
    }
    case dtype::q8_0: {
      const auto& x = block_at<block_q8_0>(row, k);
      for (int i = 0; i < 32; ++i) o.q[i] = static_cast<uint8_t>(x.qs[i] + 128);
      return set(o, 1, 1, 0, 0, f16(x.d), 0.0f);
    }
    case dtype::q2_k: {
      // Block b is half b / 4 (32 bytes of qs), bit pair b % 4; groups of 16: 2b and 2b + 1.
      const auto& x = block_at<block_q2_k>(row, sb);
      const uint8_t* qs = x.qs + 32 * (b / 4);
      const int shift = 2 * (b % 4);
      for (int i = 0; i < 32; ++i) o.q[i] = (qs[i] >> shift) & 3;
      const uint8_t s0 = x.scales[2 * b], s1 = x.scales[2 * b + 1];
      return set(o, s0 & 15, s1 & 15, s0 >> 4, s1 >> 4, f16(x.d), -f16(x.dmin));
    }
    case dtype::q3_k: {
      const auto& x = block_at<block_q3_k>(row, sb);
      const uint8_t* qs = x.qs + 32 * (b / 4);
      const int shift = 2 * (b % 4);
      for (int i = 0; i < 32; ++i)
        o.q[i] = static_cast<uint8_t>(((qs[i] >> shift) & 3) | (((x.hmask[i] >> b) & 1) << 2));
      uint8_t sc[16];
      q3_k_scales(x.scales, sc);
      return set(o, sc[2 * b] - 32, sc[2 * b + 1] - 32, 0, 0, f16(x.d), 0.0f);
    }
    case dtype::q4_k:
    case dtype::q5_k: {
      const bool five = t == dtype::q5_k;
      const uint8_t* base = five ? reinterpret_cast<const uint8_t*>(&block_at<block_q5_k>(row, sb))
                                 : reinterpret_cast<const uint8_t*>(&block_at<block_q4_k>(row, sb));
      uint16_t d, dmin;
      std::memcpy(&d, base, 2);
      std::memcpy(&dmin, base + 2, 2);
      const uint8_t* scales = base + 4;
      const uint8_t* qh = base + 16;
      const uint8_t* qs = base + (five ? 48 : 16) + 32 * (b / 2);
      const int shift = 4 * (b % 2);
      for (int i = 0; i < 32; ++i) {
        uint8_t v = (qs[i] >> shift) & 15;
        if (five) v = static_cast<uint8_t>(v | (((qh[i] >> b) & 1) << 4));
        o.q[i] = v;
      }
      uint8_t sc, mn;
      k4_scale_min(scales, b, sc, mn);
      return set(o, sc, sc, mn, mn, f16(d), -f16(dmin));
    }
    case dtype::q6_k: {
      // Block b is half h = b / 4, quarter j = b % 4: low bits from ql (+32 bytes for odd j,
      // high nibble for j >= 2), high bits from qh at 2 j; scales 8 h + 2 j and the next.
      const auto& x = block_at<block_q6_k>(row, sb);
      const int h = b / 4, j = b % 4;
      const uint8_t* ql = x.ql + 64 * h + 32 * (j & 1);
      const uint8_t* qh = x.qh + 32 * h;
      for (int i = 0; i < 32; ++i) {
        const int low = j < 2 ? (ql[i] & 15) : (ql[i] >> 4);
        const int high = (qh[i] >> (2 * j)) & 3;
        o.q[i] = static_cast<uint8_t>(low | (high << 4));
      }
      return set(o, x.scales[8 * h + 2 * j], x.scales[8 * h + 2 * j + 1], 0, 0, f16(x.d), 0.0f);
    }
    default:
      std::memset(&o, 0, sizeof o);
      return;
  }
}

namespace detail {

kprops props_of(dtype t) {
  kprops p;
  const int off = kblock_offset(t);
  if (off > 0) p.off_shift = __builtin_ctz(static_cast<unsigned>(off));
  p.min = has_min(t);
  p.super = input_span(t) == qk_k;
  return p;
}

int input_span(dtype t) {
  return static_cast<int>(layout_of(t)->block_elems);
}

void quantize_input(const float* x, int64_t cols, int span, xgroup* out) {
  const int64_t blocks = cols / 32;
  const int64_t groups = groups_of(cols);
  std::memset(static_cast<void*>(out), 0, static_cast<size_t>(groups) * sizeof(xgroup));
  float d = 0.0f, id = 0.0f;
  for (int64_t k = 0; k < blocks; ++k) {
    xgroup& g = out[k / 8];
    const int b = static_cast<int>(k % 8);
    const float* xk = x + 32 * k;
    if (k % (span / 32) == 0) {
      float amax = 0.0f;
      for (int i = 0; i < span; ++i) amax = std::max(amax, std::fabs(xk[i]));
      d = amax / 127.0f;
      id = amax != 0.0f ? 1.0f / d : 0.0f;
    }
    int32_t s0 = 0, s1 = 0;
    for (int i = 0; i < 32; ++i) {
      const float v = std::nearbyint(xk[i] * id);
      const int q = v > 127.0f ? 127 : v < -127.0f ? -127 : static_cast<int>(v);
      element(g.q, b, i) = static_cast<int8_t>(q);
      (i < 16 ? s0 : s1) += q;
    }
    g.set_block(b, s0, s1, d);
  }
}

void decode_row(const matrix_view& w, int64_t r, kgroup* out) {
  const char* row = static_cast<const char*>(w.data) + r * static_cast<int64_t>(w.row_bytes);
  const int64_t blocks = w.cols / 32;
  const int64_t groups = groups_of(w.cols);
  std::memset(static_cast<void*>(out), 0, static_cast<size_t>(groups) * sizeof(kgroup));
  kblock kb;
  for (int64_t k = 0; k < blocks; ++k) {
    decode_kblock(w.type, row, k, kb);
    kgroup& g = out[k / 8];
    const int b = static_cast<int>(k % 8);
    for (int i = 0; i < 32; ++i) element(g.q, b, i) = kb.q[i];
    g.sc0[b] = kb.sc[0];
    g.sc1[b] = kb.sc[1];
    g.mn[b][0] = static_cast<int16_t>(kb.mn[0]);
    g.mn[b][1] = static_cast<int16_t>(kb.mn[1]);
    g.s[b] = kb.s;
    g.t[b] = kb.t;
  }
}

namespace {

// The exact integers I (scaled products) and M (min term) of block b of a group.
void block_ints(const kgroup& wg, const xgroup& xg, int b, kprops p, int32_t& i_sum,
                int32_t& m_sum) {
  int32_t p0 = 0, p1 = 0;
  for (int i = 0; i < 16; ++i) p0 += element(wg.q, b, i) * element(xg.q, b, i);
  for (int i = 16; i < 32; ++i) p1 += element(wg.q, b, i) * element(xg.q, b, i);
  if (p.off_shift >= 0) {
    p0 -= xg.s0[b] * (1 << p.off_shift);
    p1 -= xg.s1[b] * (1 << p.off_shift);
  }
  i_sum = wg.sc0[b] * p0 + wg.sc1[b] * p1;
  m_sum = wg.mn[b][0] * xg.sp[b][0] + wg.mn[b][1] * xg.sp[b][1];
}

}  // namespace

float qdot(const kgroup* w, const xgroup* x, int64_t groups, kprops p) {
  float acc[16] = {};
  for (int64_t g = 0; g < groups; ++g) {
    const kgroup& wg = w[g];
    const xgroup& xg = x[g];
    if (p.super) {
      // A super-block: I and M summed over its eight blocks (at most 2^28 in magnitude, see
      // ops.cpp), then one float step with the super-block's s, t and dx.
      int32_t i_sum = 0, m_sum = 0;
      for (int b = 0; b < 8; ++b) {
        int32_t i_b, m_b;
        block_ints(wg, xg, b, p, i_b, m_b);
        i_sum += i_b;
        m_sum += m_b;
      }
      float& lane = acc[g % 16];
      const float sd = wg.s[0] * xg.d[0];
      lane = std::fma(sd, static_cast<float>(i_sum), lane);
      if (p.min) {
        const float td = wg.t[0] * xg.d[0];
        lane = std::fma(td, static_cast<float>(m_sum), lane);
      }
      continue;
    }
    for (int b = 0; b < 8; ++b) {
      float& lane = acc[(g % 2) * 8 + b];
      int32_t i_sum, m_sum;
      block_ints(wg, xg, b, p, i_sum, m_sum);
      const float sd = wg.s[b] * xg.d[b];
      lane = std::fma(sd, static_cast<float>(i_sum), lane);
      if (p.min) {
        const float td = wg.t[b] * xg.d[b];
        lane = std::fma(td, static_cast<float>(m_sum), lane);
      }
    }
  }
  for (int width = 8; width >= 1; width /= 2)
    for (int l = 0; l < width; ++l) acc[l] = acc[l] + acc[l + width];
  return acc[0];
}

namespace {

template <class T>
T* scratch(std::unique_ptr<T[]>& buf, int64_t& cap, int64_t n) {
  if (n > cap) {
    buf = std::make_unique<T[]>(static_cast<size_t>(n));
    cap = n;
  }
  return buf.get();
}

}  // namespace

xgroup* input_scratch(int64_t n, int slot) {
  thread_local std::unique_ptr<xgroup[]> buf[2];
  thread_local int64_t cap[2] = {};
  return scratch(buf[slot], cap[slot], n);
}

kgroup* weight_scratch(int64_t n) {
  thread_local std::unique_ptr<kgroup[]> buf;
  thread_local int64_t cap = 0;
  return scratch(buf, cap, n);
}

void qmatmul_scalar(const matrix_view& w, const xgroup* x, int64_t nb, float* y, int64_t ldy,
                    int64_t r0, int64_t r1) {
  const int64_t groups = groups_of(w.cols);
  const kprops p = props_of(w.type);
  kgroup* row = weight_scratch(groups);
  for (int64_t r = r0; r < r1; ++r) {
    decode_row(w, r, row);
    for (int64_t b = 0; b < nb; ++b) y[b * ldy + r] = qdot(row, x + b * groups, groups, p);
  }
}

}  // namespace detail

}  // namespace keel
