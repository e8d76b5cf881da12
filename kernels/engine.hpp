#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/error.hpp"
#include "kernels/kv_cache.hpp"
#include "kernels/model.hpp"
#include "kernels/thread_pool.hpp"

namespace keel {

/// One sequence's share of a batched forward step: `n_tokens` tokens at positions
/// kv->length() ... kv->length() + n_tokens - 1. When `logits` is set, it receives the
/// vocab_size logits after the last of these tokens.
struct seq_step {
  kv_sequence* kv = nullptr;
  const int32_t* tokens = nullptr;
  int32_t n_tokens = 0;
  float* logits = nullptr;
};

/// Runs the Llama decoder on the CPU for a batch of sequences. Prefill chunks and single decode
/// tokens of different sequences mix freely in one step; every weight matrix is read once per
/// step for all tokens. A token's result depends only on its sequence (bit-identical whatever
/// else is in the batch and however many threads run). Holds scratch buffers, so one engine
/// serves one thread at a time. `m` and `pool` must outlive the engine.
class engine {
 public:
  engine(const model& m, thread_pool& pool);

  const model& get_model() const { return model_; }

  /// KV pages for all steps are reserved first: on `overloaded` nothing has changed. A token id
  /// outside the vocabulary or a sequence past the context length is `bad_request`.
  caf::error forward(std::span<const seq_step> steps);

 private:
  void matmul(const matrix_view& w, const float* x, int64_t nb, float* y);
  void attention(int32_t layer, std::span<const seq_step> steps);

  const model& model_;
  thread_pool& pool_;
  // Scratch, per token: [T x width].
  std::vector<float> x_, xb_, q_, k_, v_, att_, gate_, up_, logits_in_, logits_out_;
  std::vector<int64_t> pos_;     // position of each token
  std::vector<int32_t> seq_of_;  // step index of each token
};

}  // namespace keel
