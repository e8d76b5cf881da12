#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "kernels/engine.hpp"
#include "kernels/kv_cache.hpp"
#include "kernels/sampler.hpp"

namespace keel {

/// One sequence to generate: prompt ids (BOS included when wanted), sampling, and a limit.
struct generation_request {
  std::vector<int32_t> prompt;
  sampling_params params;
  int32_t max_tokens = 32;
  uint64_t turn = 0;  // keys the sampler's draws with the token index
  bool stop_at_eos = true;  // stop after any end-of-generation token (vocab::eog), kept
};

/// Called for each generated token of request `seq`, in order.
using token_callback = std::function<void(size_t seq, int32_t token)>;

/// Generates for every request, running at most `max_batch` sequences per forward step (the
/// rest wait and join as others finish, as a continuous batcher does). Prompts are prefilled in
/// chunks of `prefill_chunk` tokens. Returns each request's generated ids. The result does not
/// depend on max_batch, prefill_chunk or the thread count. `overloaded` when the KV pool cannot
/// hold a sequence even alone; `bad_request` for a prompt that is empty or too long.
caf::expected<std::vector<std::vector<int32_t>>> generate(
    engine& eng, kv_pool& pool, const std::vector<generation_request>& reqs, int32_t max_batch,
    const token_callback& on_token = {}, int32_t prefill_chunk = 64);

/// A KV pool layout for `m`.
kv_layout kv_layout_for(const model& m, int32_t page_tokens = 16);

}  // namespace keel
