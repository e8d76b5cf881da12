#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/error.hpp"
#include "kernels/gguf.hpp"
#include "kernels/mapped_file.hpp"
#include "kernels/ops.hpp"
#include "kernels/tokenizer.hpp"

namespace keel {

/// Hyper-parameters of a Llama-family decoder (docs/engine.md, "Model families").
struct llama_config {
  std::string arch = "llama";  // general.architecture: "llama" or "qwen2"
  int32_t dim = 0;             // embedding width
  int32_t n_layers = 0;
  int32_t n_heads = 0;     // query heads
  int32_t n_kv_heads = 0;  // key/value heads (grouped-query attention when < n_heads)
  int32_t head_dim = 0;
  int32_t ffn_dim = 0;
  int32_t vocab_size = 0;
  int32_t ctx_len = 0;  // trained context length: the longest sequence accepted
  float rms_eps = 1e-5f;
  float rope_theta = 10000.0f;
  rope_type rope = rope_type::normal;  // llama: normal; qwen2: neox
  bool tied_output = false;            // the output head is the token embedding

  int32_t q_dim() const { return n_heads * head_dim; }
  int32_t kv_dim() const { return n_kv_heads * head_dim; }
};

/// Weights of one decoder block. Norm weights and biases are always F32 (converted at load when
/// stored otherwise); matrices point into the model's mapping.
struct llama_layer {
  std::vector<float> attn_norm;
  matrix_view wq, wk, wv, wo;
  // Added after the Q/K/V products; empty when the file has none (qwen2 always has all three).
  std::vector<float> bq, bk, bv;
  std::vector<float> ffn_norm;
  matrix_view w_gate, w_up, w_down;
};

/// A loaded model: configuration, weights mapped from the file (zero-copy) and the vocabulary.
/// Immutable after loading, so any number of threads may read it.
class model {
 public:
  /// Loads a GGUF file (`general.architecture` llama or qwen2; any other is `bad_model` naming
  /// it), or a llama2.c checkpoint (`.bin`) when the file is not GGUF; llama2.c needs its
  /// `tokenizer.bin` (default: beside the model). A GGUF tensor the model does not use, or a
  /// feature it does not implement (RoPE scaling, experts), is `bad_model` naming it.
  static caf::expected<std::unique_ptr<model>> load(const std::string& path,
                                                    const std::string& llama2c_tokenizer = "");

  const llama_config& config() const { return config_; }
  const std::vector<llama_layer>& layers() const { return layers_; }
  const matrix_view& token_embedding() const { return token_embd_; }
  const matrix_view& output() const { return output_; }
  const std::vector<float>& output_norm() const { return output_norm_; }
  /// RoPE frequency divisors (rope_freqs.weight, head_dim/2 values; Llama 3.1 and later), or
  /// empty when the file has none.
  const std::vector<float>& rope_freqs() const { return rope_freqs_; }
  const keel::vocab& vocabulary() const { return vocab_; }
  const std::string& path() const { return path_; }
  /// "gguf v3" or "llama2.c".
  const std::string& format() const { return format_; }
  /// The weight type of the attention and feed-forward matrices (of layer 0).
  dtype weight_type() const;
  /// Bytes of weights one decode step reads (every matrix once; the embedding row is ignored).
  uint64_t weight_bytes_per_token() const;

 private:
  model() = default;
  static caf::expected<std::unique_ptr<model>> load_gguf(gguf_file file);
  static caf::expected<std::unique_ptr<model>> load_llama2c(const std::string& path,
                                                            const std::string& tokenizer);

  std::string path_;
  std::string format_;
  llama_config config_;
  std::vector<llama_layer> layers_;
  matrix_view token_embd_;
  matrix_view output_;
  std::vector<float> output_norm_;
  std::vector<float> rope_freqs_;
  keel::vocab vocab_;
  std::optional<gguf_file> gguf_;  // owns the mapping of a GGUF model
  mapped_file raw_;                // owns the mapping of a llama2.c model
};

/// GGUF metadata keys of a decoder that Keel reads, each under its architecture's prefix (as
/// llama.cpp's llm_kv): one table for the loader and the writers.
enum class llm_kv {
  context_length,
  embedding_length,
  block_count,
  feed_forward_length,
  head_count,
  head_count_kv,
  key_length,
  rms_epsilon,
  rope_freq_base,
  rope_dimension_count,
  rope_scaling_type,
  rope_scaling_factor,
  rope_scale_linear,  // the old name of rope_scaling_factor
  expert_count,
};

/// GGUF metadata and tensor names of a llama-family model, for writers (`keel-model synth`).
namespace llama_names {
std::string layer_tensor(int32_t layer, const char* suffix);  // "blk.3.attn_q.weight"
std::string key(std::string_view arch, llm_kv k);             // "qwen2.attention.head_count"
}  // namespace llama_names

}  // namespace keel
