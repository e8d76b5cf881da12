#pragma once

// Messages between the actors of one node. They stay inside the process (the wire between
// nodes and clients is Cap'n Proto), so they are allowed as unsafe (non-serialisable) types.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>

#include "base/finish_reason.hpp"
#include "kernels/sampler.hpp"

namespace keel {

/// Identifies one turn of one session as a sequence in the batcher.
using seq_id = uint64_t;

/// One sequence's share of an engine step: run `tokens` after the `kv_length` tokens the shard
/// already holds for `seq` (kv_length 0: start from an empty cache, dropping what is there).
struct step_entry {
  seq_id seq = 0;
  int64_t kv_length = 0;
  std::vector<int32_t> tokens;
  bool want_logits = false;
};

/// One iteration of the batcher, sent to every shard of the engine group. Immutable once sent.
struct step_batch {
  uint64_t number = 0;
  std::vector<step_entry> entries;
  std::vector<seq_id> released;  // sequences whose KV pages the shards free first
  bool reset = false;            // free every sequence first (a new batcher's first step)
};

/// A shard's answer: rank 0 fills `logits` (vocab_size floats for each entry that wanted them,
/// in entry order); other ranks leave it empty.
struct step_result {
  uint64_t number = 0;
  int32_t rank = 0;
  std::vector<std::vector<float>> logits;
};

/// A turn to generate, from a session to the batcher. `tokens` is the whole conversation so far
/// (every turn, BOS first) plus `generated`, the tokens of this turn already delivered (non-empty
/// when a turn is resubmitted after a batcher restart). Generation continues at index
/// generated.size().
struct generation_job {
  seq_id seq = 0;
  caf::actor session;  // receives (token_atom, seq, index, token) and (done_atom, seq, reason)
  std::string session_id;  // whose lease gates its steps (node_context::may_serve_session)
  std::vector<int32_t> tokens;
  std::vector<int32_t> generated;
  sampling_params params;
  int32_t priority = 0;    // higher runs first, lower is shed first
  int32_t max_tokens = 0;  // of this turn, counting `generated`
  uint64_t turn = 0;
};

}  // namespace keel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::shared_ptr<const keel::step_batch>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::step_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::generation_job)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::finish_reason)
