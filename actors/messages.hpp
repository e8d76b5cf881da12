#pragma once

// Messages between the actors of one node. They stay inside the process (the wire between
// nodes and clients is Cap'n Proto), so they are allowed as unsafe (non-serialisable) types.

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "actors/atoms.hpp"
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

/// What the batcher sends a running turn's session (the session actor implements it):
/// - `(token_atom, seq, index, token)` for each token, index counting from the turn's start;
/// - `(done_atom, seq, reason, detail, retry_after_ms)` when the turn ends;
/// - `(detach_atom)`: the session's lease has been missing for a while: its client should
///   resume on the new owner (batcher_config::quorum_grace).
using sequence_sink_actor = caf::typed_actor<
    caf::reacts_to<token_atom, seq_id, int64_t, int32_t>,
    caf::reacts_to<done_atom, seq_id, finish_reason, std::string, int64_t>,
    caf::reacts_to<detach_atom>>;

/// What a session sends the sink of a turn's stream (a gateway stream's relay, a test):
/// - `(token_atom, session, turn, index, token, piece)` once per index, in order;
/// - `(done_atom, session, turn, reason, detail, retry_after_ms)` at the end;
/// - `(moved_atom, session, turn, detail)`: this node no longer serves the session; the client
///   resumes on another node.
using turn_sink_actor = caf::typed_actor<
    caf::reacts_to<token_atom, std::string, uint64_t, int64_t, int32_t, std::string>,
    caf::reacts_to<done_atom, std::string, uint64_t, finish_reason, std::string, int64_t>,
    caf::reacts_to<moved_atom, std::string, uint64_t, std::string>>;

/// A turn to generate, from a session to the batcher. `tokens` is the whole conversation so far
/// (every turn, BOS first) plus `generated`, the tokens of this turn already delivered (non-empty
/// when a turn is resubmitted after a batcher restart). Generation continues at index
/// generated.size().
struct generation_job {
  seq_id seq = 0;
  sequence_sink_actor session;  // receives the turn's tokens and its end
  std::string session_id;  // whose lease gates its steps (node_context::may_serve_session)
  std::vector<int32_t> tokens;
  std::vector<int32_t> generated;
  sampling_params params;
  int32_t priority = 0;    // higher runs first, lower is shed first
  int32_t max_tokens = 0;  // of this turn, counting `generated`
  uint64_t turn = 0;
  int32_t context_limit = 0;  // the session's own context length (0: the model's)
};

/// A shard worker (shard_worker.hpp):
/// `(step_atom, std::shared_ptr<const step_batch>) -> step_result`.
using shard_actor = caf::typed_actor<
    caf::replies_to<step_atom, std::shared_ptr<const step_batch>>::with<step_result>>;

}  // namespace keel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::shared_ptr<const keel::step_batch>)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::step_result)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::generation_job)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::finish_reason)
