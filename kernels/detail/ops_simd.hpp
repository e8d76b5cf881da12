#pragma once

// ISA-specific inner kernels behind kernels/ops.cpp's dispatch. Each namespace is compiled in its
// own translation unit (ops_avx2.cpp, ops_avx512.cpp) and may only be called on a CPU that has
// that instruction set. All implement the canonical order documented in ops.cpp exactly.

#include <cstddef>
#include <cstdint>

#include "kernels/ops.hpp"

namespace keel::detail {

/// fp16_to_f32 of every half, by bit pattern: a Q8_0 scale becomes one broadcast load instead of
/// three shuffle/convert micro-ops, which matters at one input. Built on first use; thread-safe.
const float* fp16_table();

namespace avx2 {
/// keel::matmul for f32, f16, bf16 and q8_0 weights.
void matmul(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
            int64_t r0, int64_t r1);
float dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float* y, float a, const float* x, int64_t n);
/// Wrapping sum of the 64-bit words at `p` (64-byte aligned; `bytes` a multiple of 64).
uint64_t stream_sum(const void* p, size_t bytes);
}  // namespace avx2

namespace avx512 {
void matmul(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
            int64_t r0, int64_t r1);
float dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float* y, float a, const float* x, int64_t n);
uint64_t stream_sum(const void* p, size_t bytes);
}  // namespace avx512

}  // namespace keel::detail
