#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/dtype.hpp"

namespace keel {

class thread_pool;

/// A read-only weight matrix of `rows` rows by `cols` columns; each row is contiguous and
/// `row_bytes` long (GGUF's dims[0] is `cols`). Does not own `data`.
struct matrix_view {
  dtype type = dtype::f32;
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  size_t row_bytes = 0;
};

/// Makes a view; `cols` must be a multiple of the type's block size.
matrix_view make_matrix(dtype type, const void* data, int64_t rows, int64_t cols);

/// Instruction sets the CPU kernels are built for. All give bit-identical results: every dot
/// product accumulates in the same canonical order (16 lane partials, fused multiply-add, then a
/// fixed pairwise reduction; spelled out at the top of ops.cpp), so the ISA only changes speed.
enum class cpu_isa { scalar, avx2, avx512 };

const char* to_string(cpu_isa x);

/// The best ISA this CPU supports (detected once).
cpu_isa detected_isa();

/// The ISA in use; starts as `detected_isa()`. `use_isa` picks a lower one (for tests and
/// benchmarks); asking for one the CPU lacks falls back to the best supported.
cpu_isa active_isa();
void use_isa(cpu_isa x);

/// y[b * ldy + r] = row r of `w` . x[b * ldx ...] for b in [0, nb) and r in [r0, r1).
/// `x` is F32 with at least `w.cols` values per row. Each weight row is read once for all nb
/// inputs. The value of every output depends only on its weight row and its input row: it is
/// bit-identical for any nb, r0, r1, thread split or ISA.
void matmul(const matrix_view& w, const float* x, int64_t ldx, int64_t nb, float* y, int64_t ldy,
            int64_t r0, int64_t r1);

/// matmul over all rows of `w`, split across `pool` in contiguous row ranges; same results as
/// the single-threaded call. Not re-entrant (see thread_pool).
void matmul(thread_pool& pool, const matrix_view& w, const float* x, int64_t ldx, int64_t nb,
            float* y, int64_t ldy);

/// Dequantises row `r` of `w` into `out` (w.cols floats).
void dequantize_row(const matrix_view& w, int64_t r, float* out);

/// Encodes `n` floats (n a multiple of the block size) of F32 into `type`'s bytes at `out`.
void quantize_row(dtype type, const float* x, int64_t n, void* out);

/// Canonical-order F32 dot product (used by attention).
float dot_f32(const float* a, const float* b, int64_t n);

/// y[i] += a * x[i].
void axpy_f32(float* y, float a, const float* x, int64_t n);

/// out = x / rms(x) * weight, with rms over n values plus eps. `out` may alias `x`.
void rmsnorm(float* out, const float* x, const float* weight, int64_t n, float eps);

/// In-place softmax over n values (subtracts the max first).
void softmax(float* x, int64_t n);

/// gate[i] = silu(gate[i]) * up[i].
void silu_mul(float* gate, const float* up, int64_t n);

/// Rotary embedding as llama.cpp applies it to GGUF llama models (rope type "normal"): for each
/// of `n_heads` heads of `head_dim` values, pairs (2i, 2i+1) rotate by pos * theta^(-2i/head_dim).
void rope(float* x, int n_heads, int head_dim, int64_t pos, float theta);

/// Bytes per second of a streaming read (a sum) over a `bytes`-long buffer by all of `pool`'s
/// threads: the best of several passes. Allocates and touches the buffer first; takes a while
/// for large buffers. For the decode roofline.
double measure_memory_bandwidth(thread_pool& pool, size_t bytes);

namespace reference {

/// Plain scalar versions with the same canonical order, for tests.
float dot_row(const matrix_view& w, int64_t r, const float* x);
float dot_f32(const float* a, const float* b, int64_t n);

}  // namespace reference

}  // namespace keel
