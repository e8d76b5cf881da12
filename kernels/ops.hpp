#pragma once

#include <cstddef>
#include <cstdint>
#include <span>

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

/// How the integer kernels of block-quantised weights form sums of byte products: 16-bit pairs
/// then 32-bit sums (AVX2 vpmaddubsw), or vpdpbusd (AVX-VNNI, AVX-512 VNNI). All give the same
/// bits (the sums are exact); `active_qdot` follows `active_isa` and the best this CPU has,
/// unless `use_vnni(false)` rules VNNI out (for tests and benchmarks).
enum class qdot_isa { scalar, avx2, avx_vnni, avx512_vnni };
const char* to_string(qdot_isa x);
qdot_isa active_qdot();
void use_vnni(bool allowed);

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

/// One matrix of a matmul of several: y[b * ldy + r] = row r of `w` . input row b.
struct matmul_part {
  matrix_view w;
  float* y = nullptr;
  int64_t ldy = 0;
};

/// matmul of every part against the same inputs (nb rows of at least `cols` values, ldx apart;
/// every part's w.cols equals `cols`), in one parallel loop of `pool` in which each thread takes
/// its share of every part's rows. The inputs are rounded once for all block-quantised parts that
/// round them alike (by 32 or by 256 elements). Same results as one call per part. Not re-entrant
/// (see thread_pool).
void matmul(thread_pool& pool, std::span<const matmul_part> parts, const float* x, int64_t ldx,
            int64_t cols, int64_t nb);

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

/// Which values of a head rotate together, as llama.cpp's rope types: `normal` (llama) pairs
/// (2i, 2i+1); `neox` (qwen2) pairs (i, i + head_dim/2).
enum class rope_type { normal, neox };

/// Rotary embedding with ggml's float semantics, in place, for each of `n_heads` heads of
/// `head_dim` values: pair i rotates by pos * theta^(-2i/head_dim) / freq_factors[i] (the angle
/// built by repeated multiplication in float, as ggml's rope cache). `freq_factors` (Llama 3.1's
/// rope_freqs, head_dim/2 values) may be null, meaning all ones.
void rope(float* x, int n_heads, int head_dim, int64_t pos, float theta,
          rope_type type = rope_type::normal, const float* freq_factors = nullptr);

/// Bytes per second of a streaming read (a sum) over a `bytes`-long buffer by all of `pool`'s
/// threads: the best of several passes. Allocates and touches the buffer first; takes a while
/// for large buffers. For the decode roofline.
double measure_memory_bandwidth(thread_pool& pool, size_t bytes);

/// The machine's peak multiply-adds per second on all of `pool`'s threads, measured with the
/// active kernels' widest instructions: F32 fused multiply-adds (`integer` false) or the byte
/// dot products of the integer kernels (true; VNNI counts four per lane). The best of several
/// short runs; for the prefill fraction of the engine benchmark.
double measure_peak_macs(thread_pool& pool, bool integer);

namespace reference {

/// Plain scalar versions with the same canonical order, for tests.
float dot_row(const matrix_view& w, int64_t r, const float* x);
float dot_f32(const float* a, const float* b, int64_t n);

}  // namespace reference

}  // namespace keel
