#pragma once

// ISA-specific inner kernels behind kernels/ops.cpp's dispatch. Each namespace is compiled in its
// own translation unit (ops_avx2.cpp, ops_avx512.cpp) and may only be called on a CPU that has
// that instruction set. All implement the canonical order documented in ops.cpp exactly.

#include <cstddef>
#include <cstdint>

#include "kernels/ops.hpp"

namespace keel::detail {

namespace avx2 {
/// keel::matmul for f32, f16 and bf16 weights (block types go to the integer kernels).
void matmul(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
            int64_t r0, int64_t r1);
float dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float* y, float a, const float* x, int64_t n);
/// Wrapping sum of the 64-bit words at `p` (64-byte aligned; `bytes` a multiple of 64).
uint64_t stream_sum(const void* p, size_t bytes);
/// Runs `iters` rounds of independent fused multiply-adds; returns the multiply-adds done.
int64_t fma_burst(int64_t iters);
}  // namespace avx2

namespace avx512 {
void matmul(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
            int64_t r0, int64_t r1);
float dot_f32(const float* a, const float* b, int64_t n);
void axpy_f32(float* y, float a, const float* x, int64_t n);
uint64_t stream_sum(const void* p, size_t bytes);
int64_t fma_burst(int64_t iters);
}  // namespace avx512

}  // namespace keel::detail
