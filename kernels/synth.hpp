#pragma once

#include <cstdint>
#include <string>

#include "kernels/dtype.hpp"
#include "base/error.hpp"
#include "kernels/gguf.hpp"
#include "kernels/tokenizer.hpp"

namespace keel {

/// Shape and contents of a synthesized Llama-family model (seeded random weights).
struct synth_options {
  std::string arch = "llama";  // "llama", or "qwen2": qwen2.* keys, Q/K/V biases, NEOX rope
  int32_t dim = 256;
  int32_t layers = 4;
  int32_t heads = 8;
  int32_t kv_heads = 4;
  int32_t ffn = 768;
  int32_t ctx = 1024;
  uint64_t seed = 1;
  dtype type = dtype::f32;   // f32, f16, bf16 or q8_0 for the matrices; norms stay F32
  bool tied_output = false;  // omit output.weight and reuse token_embd.weight
  bool qkv_bias = false;     // llama: also write attn_q/k/v.bias (qwen2 always has them)
  bool rope_freqs = false;   // write rope_freqs.weight: seeded random divisors in [1, 8)
};

/// `bad_request` naming the option and its value when the shape is impossible (e.g. a Q8_0 row
/// length that is not a multiple of 32, heads not dividing dim) or the architecture unknown.
caf::error validate(const synth_options& o);

/// Builds the GGUF image of a Llama-family model with `v` as its vocabulary. The same options and
/// vocabulary always give the same bytes.
caf::expected<gguf_writer> synthesize(const synth_options& o, const vocab& v);

/// Adds `v` as GGUF tokenizer metadata (tokenizer.ggml.*).
void add_vocab_metadata(gguf_writer& w, const vocab& v);

}  // namespace keel
