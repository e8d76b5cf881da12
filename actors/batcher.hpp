#pragma once

#include <chrono>
#include <cstdint>
#include <memory>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>

#include "actors/messages.hpp"
#include "actors/node_context.hpp"
#include "actors/protocols.hpp"

namespace keel {

struct batcher_config {
  int32_t shards = 1;          // ranks of the engine group ("shard-0" ...)
  int32_t max_batch = 64;      // sequences in one step
  int32_t prefill_chunk = 64;  // prompt tokens of one sequence in one step
  int32_t max_queue = 256;     // waiting turns; beyond it the lowest priority is shed
  int32_t kv_pages = 0;        // KV pages of each shard (all shards have the same count)
  int32_t page_tokens = 16;
  /// When a step failed for a reason other than overload and the group has not restarted
  /// within this time, the batcher kills the shards so that engine_sup restarts them.
  std::chrono::milliseconds restart_grace{2000};
  /// Once a running turn's session has been without its lease (node_context::
  /// may_serve_session) this long, the session is told to end its client's stream
  /// (`detach_atom`), so that the client resumes at the new owner instead of waiting here. The
  /// node's heartbeat interval: the lease itself already tolerates a few lost heartbeats.
  std::chrono::milliseconds quorum_grace{100};
};

/// Continuous batching over the engine group. Each iteration runs one step for all admitted
/// sequences (a prefill chunk for new ones, one decode token for the others); sequences join
/// and leave between iterations.
///
/// Admission: a turn is admitted only when KV pages exist for its context plus its remaining
/// token budget, so admitted work never runs out of pages; waiting turns are ordered by priority
/// (then arrival); the queue is bounded and, when full, the lowest-priority waiting turn is shed
/// with `(done_atom, seq, finish_reason::overloaded, message, retry_after_ms)`.
///
/// Messages: `batcher_actor` (protocols.hpp). To sessions: `sequence_sink_actor`
/// (messages.hpp): each token, then the turn's end.
///
/// When a shard fails, its supervisor restarts the group; the batcher re-admits every running
/// sequence by prefilling it again from its tokens, and streams continue with the next index:
/// no token is lost, repeated or changed (sampling is keyed by (seed, turn, index)).
batcher_actor spawn_batcher(caf::actor_system& sys, std::shared_ptr<node_context> ctx,
                            batcher_config cfg);

}  // namespace keel
