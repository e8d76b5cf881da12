#pragma once

// Every actor protocol of a node, as the typed interfaces the compiler checks (issue #10): a
// send or request that an actor does not understand, or a response handler of the wrong type,
// does not compile. The messages stay inside the process. Each interface is documented where
// its actor is spawned; docs/actors.md lists them with the tree.
//
//   supervisor_actor            supervisor.hpp   every supervisor of the tree
//   supervision_observer_actor  supervisor.hpp   what a supervisor tells its subscribers
//   shard_actor                 messages.hpp     a shard worker: one engine step
//   sequence_sink_actor         messages.hpp     what the batcher tells a running turn's session
//   turn_sink_actor             messages.hpp     what a session tells its client's stream
//   batcher_actor               here             continuous batching over the engine group
//   session_actor               here             one conversation
//   store_writer_actor          here             the synced writes of a node alone with a store
//   failover_actor              here             starts and stops the sessions the host gains/loses
//   link_actor                  here             a region link to one peer
//   ownership_actor             ownership_host.hpp  the ownership protocol's host

#include <cstdint>
#include <string>
#include <vector>

#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/replies_to.hpp>
#include <caf/typed_actor.hpp>

#include "actors/atoms.hpp"
#include "actors/messages.hpp"
#include "actors/ownership.hpp"
#include "actors/supervisor.hpp"
#include "base/turn_message.hpp"

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<keel::turn_message>)

namespace keel {

/// Figures the batcher keeps (for the benchmark and the admin shell).
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

/// The batcher (batcher.hpp): it observes the engine supervisor (`started_atom`: a shard
/// worker's new handle) and takes
/// - `(submit_atom, generation_job)`: queue a turn (a resubmitted seq replaces the old one);
/// - `(cancel_atom, seq_id)`: stop a turn; its session gets `done` with `cancelled`;
/// - `(stats_atom) -> batcher_stats`;
/// - its own timers: `(tick_atom)`, `(restart_atom, failure_epoch)`.
using batcher_actor = supervision_observer_actor::extend<
    caf::reacts_to<submit_atom, generation_job>, caf::reacts_to<cancel_atom, seq_id>,
    caf::replies_to<stats_atom>::with<batcher_stats>, caf::reacts_to<tick_atom>,
    caf::reacts_to<restart_atom, uint64_t>>;

struct session_record;  // session.hpp

/// A session actor (session.hpp): the batcher's `sequence_sink_actor`, and
/// - `(send_atom, text, max_tokens, turn_sink_actor sink[, int64_t expect[, bool special]])
///   -> uint64_t turn`;
/// - `(chat_atom, messages, max_tokens, turn_sink_actor sink, int64_t expect) -> uint64_t turn`:
///   a chat turn, rendered with the session's chat template;
/// - `(resume_atom, turn, from_index, turn_sink_actor sink[, std::vector<int32_t> held])
///   -> bool`;
/// - `(cancel_atom)`, `(get_atom) -> session_record`, `(history_atom) -> each turn's tokens`;
/// - `(detach_atom)`: its lease ran out: the running turn's client resumes elsewhere;
/// - `(moved_atom, detail)`: another node owns it now: it ends the stream and exits;
/// - its own timer: `(submit_atom)` (submit the running turn again).
using session_actor = sequence_sink_actor::extend<
    caf::replies_to<send_atom, std::string, int32_t, turn_sink_actor>::with<uint64_t>,
    caf::replies_to<send_atom, std::string, int32_t, turn_sink_actor, int64_t>::with<uint64_t>,
    caf::replies_to<send_atom, std::string, int32_t, turn_sink_actor, int64_t, bool>::with<uint64_t>,
    caf::replies_to<chat_atom, std::vector<turn_message>, int32_t, turn_sink_actor,
                    int64_t>::with<uint64_t>,
    caf::replies_to<resume_atom, uint64_t, int64_t, turn_sink_actor>::with<bool>,
    caf::replies_to<resume_atom, uint64_t, int64_t, turn_sink_actor,
                    std::vector<int32_t>>::with<bool>,
    caf::reacts_to<cancel_atom>, caf::replies_to<get_atom>::with<session_record>,
    caf::replies_to<history_atom>::with<std::vector<std::vector<int32_t>>>,
    caf::reacts_to<moved_atom, std::string>, caf::reacts_to<submit_atom>>;

/// The `store` child of a node alone with a store (session.hpp):
/// `(write_atom, session_record, uint8_t change) -> bool`.
using store_writer_actor =
    caf::typed_actor<caf::replies_to<write_atom, session_record, uint8_t>::with<bool>>;

/// The node's `failover` child (node.hpp): it starts and stops, in order, the sessions the
/// ownership host gains and loses (those waits are its own thread's, never the host's or a CAF
/// worker's):
/// - `(acquired_atom, id, session_data, epoch)`: this node owns `id` now: serve it from `data`;
/// - `(lost_atom, id, detail)`: another node owns `id` (or will, after a drain): stop it here,
///   its running turn's client told `detail`.
using failover_actor = caf::typed_actor<
    caf::reacts_to<acquired_atom, std::string, session_data, uint64_t>,
    caf::reacts_to<lost_atom, std::string, std::string>>;

/// A region link (region_link.hpp): `(cut_atom, int64_t ms) -> bool` (the `cut` fault: its
/// heartbeats fail for `ms`), `(get_atom) -> std::string` (the peer's status).
using link_actor = caf::typed_actor<caf::replies_to<cut_atom, int64_t>::with<bool>,
                                    caf::replies_to<get_atom>::with<std::string>>;

}  // namespace keel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::batcher_stats)
