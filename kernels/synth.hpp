#pragma once

#include <cstdint>
#include <string>

#include "kernels/dtype.hpp"
#include "base/error.hpp"
#include "kernels/gguf.hpp"
#include "kernels/tokenizer.hpp"

namespace keel {

/// Shape and contents of a synthesized Llama model (seeded random weights).
struct synth_options {
  int32_t dim = 256;
  int32_t layers = 4;
  int32_t heads = 8;
  int32_t kv_heads = 4;
  int32_t ffn = 768;
  int32_t ctx = 1024;
  uint64_t seed = 1;
  dtype type = dtype::f32;   // f32, f16, bf16 or q8_0 for the matrices; norms stay F32
  bool tied_output = false;  // omit output.weight and reuse token_embd.weight
};

/// `bad_request` naming the option and its value when the shape is impossible (e.g. a Q8_0 row
/// length that is not a multiple of 32, heads not dividing dim).
caf::error validate(const synth_options& o);

/// Builds the GGUF image of a Llama model with `v` as its vocabulary. The same options and
/// vocabulary always give the same bytes.
caf::expected<gguf_writer> synthesize(const synth_options& o, const vocab& v);

/// Adds `v` as GGUF tokenizer metadata (tokenizer.ggml.*).
void add_vocab_metadata(gguf_writer& w, const vocab& v);

}  // namespace keel
