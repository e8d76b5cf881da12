#pragma once

#include <cstdint>
#include <initializer_list>
#include <span>
#include <utility>
#include <vector>

#include "base/error.hpp"
#include "kernels/collective.hpp"
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

/// Which part of a tensor-parallel group an engine computes: shard `index` of `count`. Shard k
/// owns query heads [k*H/n, (k+1)*H/n), the matching KV heads and feed-forward columns
/// [k*F/n, (k+1)*F/n) (docs/engine.md, "Tensor parallelism").
struct shard_layout {
  int32_t index = 0;
  int32_t count = 1;
};

/// `bad_request` naming the model's dimensions and the shard count when `m` cannot be split that
/// way: heads, KV heads or feed-forward width not divisible by the count, or a column slice of a
/// block-quantised matrix (Q8_0: 32 values) that does not start and end on a block.
caf::error check_sharding(const model& m, shard_layout shard);

/// The KV pool layout of one shard of `m`: its KV heads only.
kv_layout kv_layout_for(const model& m, shard_layout shard, int32_t page_tokens = 16);

/// Runs a Llama-family decoder (llama, qwen2) on the CPU for a batch of sequences. Prefill chunks
/// and single decode tokens of different sequences mix freely in one step; every weight matrix is
/// read once per step for all tokens. A token's result depends only on its sequence (bit-identical
/// whatever else is in the batch and however many threads run). Holds scratch buffers, so one
/// engine serves one thread at a time. `m` and `pool` must outlive the engine.
class engine {
 public:
  engine(const model& m, thread_pool& pool);

  /// One shard of a tensor-parallel group. Every shard of the group runs its own engine on its
  /// own thread, with its own pool and KV pool (`kv_layout_for(m, shard)`), and calls forward
  /// with identical steps (same tokens, same order) on its own sequences; the shards sum their
  /// partial attention and feed-forward outputs through `coll` (rank = shard.index, size =
  /// shard.count; may be null for a single shard). Only shard 0 writes logits; the others
  /// ignore the `logits` pointers. An invalid layout (check_sharding) or collective makes every
  /// forward fail with that error. `coll` must outlive the engine.
  engine(const model& m, thread_pool& pool, shard_layout shard, collective* coll);

  const shard_layout& shard() const { return shard_; }

  const model& get_model() const { return model_; }

  /// KV pages for all steps are reserved first: on `overloaded` nothing has changed (in a group:
  /// on any shard, and then on none). A token id outside the vocabulary or a sequence past the
  /// context length is `bad_request`; a KV sequence whose pool has another layout than
  /// kv_layout_for(model, shard) is `bad_request`. In a group, the collective's error
  /// (`disconnected` once aborted) ends the step; the sequences keep their previous length.
  caf::error forward(std::span<const seq_step> steps);

 private:
  void matmul(const matrix_view& w, const float* x, int64_t nb, float* y);
  // Several matrices against the same nb inputs of w.cols values: one rounding, one parallel
  // loop. Each part's y has w.rows values per input.
  void matmul(std::initializer_list<std::pair<const matrix_view&, float*>> parts, const float* x,
              int64_t nb);
  void attention(int32_t layer, std::span<const seq_step> steps);
  caf::error validate(std::span<const seq_step> steps) const;
  // Sums `n` values over the group (nothing to do for one shard).
  caf::error reduce(float* data, int64_t n);

  // The rows (wq, wk, wv, w_gate, w_up) and columns (wo, w_down) of one layer that this shard
  // multiplies; the whole matrices for a single shard.
  struct layer_slice {
    matrix_view wq, wk, wv, wo, w_gate, w_up, w_down;
    const float *bq, *bk, *bv;  // this shard's part of the biases; null when the model has none
  };

  const model& model_;
  thread_pool& pool_;
  shard_layout shard_;
  collective* coll_ = nullptr;
  caf::error setup_error_;  // returned by every forward when the layout or collective is invalid
  std::vector<layer_slice> slices_;
  int32_t heads_ = 0, kv_heads_ = 0, ffn_ = 0;  // this shard's share
  // Scratch, per token: [T x width].
  std::vector<float> x_, xb_, q_, k_, v_, att_, gate_, up_, logits_in_, logits_out_;
  std::vector<int64_t> pos_;     // position of each token
  std::vector<int32_t> seq_of_;  // step index of each token
};

}  // namespace keel
