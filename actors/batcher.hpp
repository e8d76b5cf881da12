#pragma once

#include <chrono>
#include <cstdint>
#include <memory>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>

#include "actors/messages.hpp"
#include "actors/node_context.hpp"

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

/// Figures the batcher keeps (for the benchmark and, later, the admin shell).
struct batcher_stats {
  uint64_t steps = 0;
  uint64_t tokens = 0;          // generated tokens sent to sessions
  uint64_t group_failures = 0;  // steps that failed because a shard died
  uint64_t preemptions = 0;     // sequences sent back to the queue for lack of KV pages
  uint64_t shed = 0;            // turns refused with `overloaded`
  int32_t waiting = 0;
  int32_t running = 0;
  int32_t free_pages = 0;
  /// Milliseconds from each group failure to the next token sent, most recent last.
  std::vector<double> recovery_ms;
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
/// Messages:
/// - `(submit_atom, generation_job)`: queue a turn (a resubmitted seq replaces the old one).
/// - `(cancel_atom, seq_id)`: stop a turn; the session gets `done` with `cancelled`.
/// - `(attach_atom, seq_id, caf::actor session, int64_t have)`: a restarted session takes over
///   the turn; tokens from index `have` on are sent again.
/// - `(stats_atom) -> batcher_stats`.
/// To sessions: `(token_atom, seq_id, int64_t index, int32_t token)` for each token, then
/// `(done_atom, seq_id, finish_reason, std::string detail, int64_t retry_after_ms)`.
///
/// When a shard fails, its supervisor restarts the group; the batcher re-admits every running
/// sequence by prefilling it again from its tokens, and streams continue with the next index:
/// no token is lost, repeated or changed (sampling is keyed by (seed, turn, index)).
caf::actor spawn_batcher(caf::actor_system& sys, std::shared_ptr<node_context> ctx,
                         batcher_config cfg);

}  // namespace keel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::batcher_stats)
