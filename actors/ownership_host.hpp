#pragma once

// The ownership protocol (actors/ownership.hpp) hosted in a keel-node: one actor owns the
// state machine and gives it the node's clock, store and transport; the node's session actors
// open sessions, submit turns and end them through it, and the batcher reads each session's
// lease from a board it publishes. docs/actors.md, "Ownership protocol".

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/typed_actor.hpp>

#include "actors/atoms.hpp"
#include "actors/ownership.hpp"
#include "actors/ownership_transport.hpp"

namespace keel {

/// The protocol's durable state of each session on this node (the seam: RocksDB in a keel-node,
/// memory in tests). Called from the host actor only.
class ownership_storage {
 public:
  virtual ~ownership_storage() = default;
  /// Stores `s`; `sync`: durably before returning. false: the disk failed, nothing stored.
  virtual bool put(const std::string& session, const stored_session& s, bool sync) = 0;
  /// What the store kept (at start), by session.
  virtual std::map<std::string, stored_session> load() = 0;
};

/// The monotonic clock of the node, ns (the seam tests replace).
using ownership_clock = std::function<int64_t()>;
ownership_clock steady_ownership_clock();

/// Until when this node may serve each session it owns (its clock), as the host last computed
/// it (`ownership::serve_until`). The batcher asks before every step, so no actor message is
/// on the token path. Thread-safe.
class lease_board {
 public:
  explicit lease_board(ownership_clock clock) : clock_(std::move(clock)) {}
  /// Whether this node holds `session`'s lease now.
  bool may_serve(const std::string& session) const;
  int64_t until(const std::string& session) const;
  /// INT64_MIN: not served here.
  void set(const std::string& session, int64_t until);
  std::vector<std::string> sessions() const;

 private:
  ownership_clock clock_;
  mutable std::mutex mu_;
  std::map<std::string, int64_t> until_;
};

using peer_message_atom = caf::atom_constant<caf::atom("k_ownmsg")>;
using finish_atom = caf::atom_constant<caf::atom("k_finish")>;
using own_tokens_atom = caf::atom_constant<caf::atom("k_owntok")>;
using describe_atom = caf::atom_constant<caf::atom("k_descr")>;
using resign_atom = caf::atom_constant<caf::atom("k_resign")>;

/// What the host says of one session (admin, forwarding).
struct ownership_view {
  std::string session;
  bool owned = false;        // owned here (serving, or taking over)
  bool serving = false;      // owned and the lease held now
  std::string owner;         // who owns it as far as this node knows ("" unknown)
  ballot promised;           // this node's promise
  ballot accepted;           // the ballot of this node's copy
  std::vector<std::string> group;
  size_t turns = 0;          // in this node's copy
};

/// The host's messages:
/// - `(peer_message_atom, from, bytes)`: one protocol message from the member `from` (still
///   encoded: the host decodes it and drops what does not decode, logging it).
/// - `(open_atom, session, meta) -> session_data`: opens (or adopts) `session`; answers once
///   this node owns it, with the data it serves from. Errors: `bad_request` when this node is
///   not in the session's group, `disconnected` when no majority granted it within the ack
///   timeout (retry), `stale_epoch` when another node took it meanwhile.
/// - `(submit_atom, session, turn, user) -> bool`: appends turn `turn` with the user's input
///   (idempotent for the same input); answers true once a majority of the group stored it,
///   synced. Errors: `disconnected` (not the owner, with the owner's name when known; no
///   majority reachable; not stored within the ack timeout: retry, maybe on the owner),
///   `overloaded` while a turn runs, `bad_request` for a turn number out of order or another
///   input under a stored number.
/// - `(own_tokens_atom, session, turn, from, tokens)`: the running turn's tokens from index
///   `from` (checkpointed every `checkpoint_every`, not waited for).
/// - `(finish_atom, session, turn, tokens, end) -> bool`: ends the running turn with all its
///   `tokens` (so that its end is whole whatever checkpoints were lost) and `end` (how it
///   ended, opaque); answers true once a majority stored the end. Idempotent.
/// - `(describe_atom, session) -> ownership_view`.
/// - `(resign_atom, session) -> bool`: gives the session up (`ownership::resign`: a drain);
///   false when this node did not own it. Its waiting requests fail with `stale_epoch`.
/// - `(tick_atom)`: the host's own timer.
using ownership_actor = caf::typed_actor<
    caf::reacts_to<peer_message_atom, std::string, std::string>,
    caf::replies_to<open_atom, std::string, std::string>::with<session_data>,
    caf::replies_to<submit_atom, std::string, uint64_t, std::string>::with<bool>,
    caf::reacts_to<own_tokens_atom, std::string, uint64_t, uint64_t, std::vector<int32_t>>,
    caf::replies_to<finish_atom, std::string, uint64_t, std::vector<int32_t>, std::string>::with<bool>,
    caf::replies_to<describe_atom, std::string>::with<ownership_view>,
    caf::replies_to<resign_atom, std::string>::with<bool>,
    caf::reacts_to<tick_atom>>;

struct ownership_host_config {
  ownership::config protocol;
  std::shared_ptr<ownership_transport> transport;
  std::shared_ptr<ownership_storage> storage;
  /// Whether `storage` forgets everything when the process ends (memory, no `--data`): every
  /// start is then an amnesiac member's (ownership::recover with `damaged`), which votes on a
  /// session only after reading it back from its group.
  bool forgets = false;
  /// Where the host publishes the leases (made with the same clock).
  std::shared_ptr<lease_board> leases;
  ownership_clock clock;  // empty: steady_ownership_clock()
  /// This node owns `session` now (an open, a takeover, a restart) at ballot epoch `epoch`,
  /// with `data`, the newest copy of a majority: serve it from there. Called on the host actor.
  std::function<void(const std::string& session, const session_data& data, uint64_t epoch)>
      acquired;
  /// Another node owns `session` now: stop serving it at once. Called on the host actor.
  std::function<void(const std::string& session)> lost;
  /// How often the protocol ticks (heartbeats go every `protocol.timing.heartbeat`).
  std::chrono::milliseconds tick{25};
  /// A request not answered by then fails with `disconnected` (it may still take effect: a
  /// turn sent again under its number is idempotent).
  std::chrono::milliseconds ack_timeout{2000};
  std::function<void(const std::string&)> log;
  /// A new turn or a turn's end was acknowledged by a majority this long after it was asked
  /// (GET /metrics); called on the host actor.
  std::function<void(std::chrono::nanoseconds)> acknowledged;
  /// The sessions this node keeps a copy of for other owners, after every change (GET /metrics);
  /// called on the host actor.
  std::function<void(size_t)> copies;
  /// The room of a member for new work (ownership_env::room), which orders takeovers; called on
  /// the host actor, so it must not block (the node reads its load and its peer table). Empty:
  /// every member the same (group order).
  std::function<double(const std::string& node)> room;
  /// Whether this node may own a session, from its newest copy here (ownership_env::may_own);
  /// called on the host actor. Empty: it may.
  std::function<bool(const session_data& data)> may_own;
};

/// Spawns the host, detached (its synced store writes block its own thread, no CAF worker's).
/// It recovers from `storage` first: a restarted node promises nothing for `hold()` and then
/// takes its own sessions back.
ownership_actor spawn_ownership_host(caf::actor_system& sys, ownership_host_config cfg);

/// What a failed request to the host means for its caller's client, about `what`: a host that
/// did not answer, or a session another node owns, is `disconnected` (retry: any node forwards
/// there); other refusals stand.
caf::error host_refusal(const caf::error& e, const std::string& what);

}  // namespace keel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::session_data)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::ownership_view)
