#pragma once

// What the admin endpoint (admin.hpp) does to its node: the synchronous half, apart from the
// Cap'n Proto half. Only admin.cpp uses it.

#include <chrono>
#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/expected.hpp>

#include "actors/admin.hpp"
#include "actors/node.hpp"

namespace keel {

/// One actor of the tree, as `Admin.tree` reports it.
struct actor_row {
  std::string path;
  uint32_t depth = 0;
  std::string kind;
  std::string state;  // running, restarting, stopped
  int32_t restarts = 0;
  std::string last_failure;
  std::chrono::system_clock::time_point failed_at{};  // the epoch when it never failed
};

/// Where a path leads: the child and its supervisor (none for the root).
struct located {
  caf::actor parent;
  std::string parent_path;
  child_info child;
};

enum class fault_kind : uint8_t { crash, stall, kv_fail, cut, clear, partition, disk_full };

/// A fault to inject (wire/keel.capnp `Fault`).
struct fault_request {
  fault_kind kind = fault_kind::crash;
  uint32_t after_steps = 0, duration_ms = 0, count = 0;
  std::vector<std::string> peers;  // partition: the peers' node names
};

/// The longest partition (and link cut) `admin_ops::fault` accepts (24 h); 0 means until
/// `clear`.
inline constexpr uint32_t max_partition_ms = 86'400'000;
/// The other bounds of `admin_ops::fault`: a stall sleeps a worker's thread, which nothing can
/// interrupt, so it is short; step counts and failure counts stay far from int32 wrap-around.
inline constexpr uint32_t max_stall_ms = 60'000;
inline constexpr uint32_t max_fault_steps = 1'000'000'000;
inline constexpr uint32_t max_kv_failures = 1'000'000;

/// What `report` needs from the actors; the rest comes from the configuration.
struct figures {
  std::optional<batcher_stats> stats;  // none while the batcher restarts
  uint32_t sessions = 0, running = 0;
  int32_t restarts = 0;
  uint64_t faults_fired = 0, replicated = 0, replication_failures = 0;
  std::vector<peer_info> peers;
};

/// A session, with what its node's store holds of it.
struct session_row {
  session_record r;
  std::vector<std::string> replicas;  // where its writes go now (placement over live peers)
  bool durable = false;  // the node has a store
  uint64_t checkpoint_turn = 0, checkpoint_tokens = 0;
  std::string parked;  // why it is parked; "" when it is not
};

/// What `drain` did: each session's fate, and how many the node still holds afterwards.
struct drain_outcome {
  std::vector<node::drained_session> sessions;
  uint32_t remaining = 0;  // 0: the node is empty and safe to stop
};

/// The admin's calls on one node. They wait for actors (requests from a scoped actor, bounded by
/// `admin_config::call_timeout`), so the admin runs them on a thread of its own, one at a time:
/// not thread-safe. `node` and `cfg` must outlive the object.
class admin_ops {
 public:
  admin_ops(caf::actor_system& sys, node& n, const admin_config& cfg)
      : sys_(sys), node_(n), cfg_(cfg) {}

  /// The whole tree, depth first from the root, with the supervision log's failure times.
  caf::expected<std::vector<actor_row>> tree();
  caf::expected<figures> report();
  caf::expected<std::vector<session_row>> sessions();
  /// The actor at `path` exits with "killed by admin"; the answer says how its supervisor
  /// reacted within `admin_config::reaction_wait`.
  caf::expected<std::string> kill(const std::string& path);
  /// The supervisor of the actor at `path` restarts it (restart_atom).
  caf::expected<std::string> restart(const std::string& path);
  /// Arms `f` on the actor at `path` (see wire/keel.capnp `Fault` for which applies where).
  /// `clear` and `partition` apply to the node's root path only; `clear` also heals the
  /// node's partition. A partition names known peers other than the node itself, at most
  /// `max_partition_ms`; anything else is `bad_request`.
  caf::expected<std::string> fault(const std::string& path, const fault_request& f);
  /// `node::drain`, then how many sessions have no new owner yet. Takes until every session has
  /// a new owner, or a few detection times (node::drain).
  caf::expected<drain_outcome> drain();

 private:
  using event_index = std::map<std::string, const supervision_event*>;  // by path

  const std::string& name() const { return node_.config().name; }
  caf::error root_refused() const;
  /// The `partition` fault on this node (`f.kind` is partition; the path was the root).
  caf::expected<std::string> partition_from(const fault_request& f);
  /// The `disk-full` fault on this node (`f.kind` is disk_full; the path was the root).
  caf::expected<std::string> disk_full(const fault_request& f);
  caf::expected<std::vector<child_info>> list(const caf::actor& sup, const std::string& path);
  /// The child's kind, remembered by path.
  std::string kind_of(const std::string& path, const child_info& c);
  caf::error walk(const caf::actor& sup, const std::string& path, uint32_t depth,
                  const event_index& last, const event_index& failed, std::vector<actor_row>& out);
  /// The actor at `path` ("node/engine/shard-0"). `not_found` names what does exist.
  caf::expected<located> resolve(const std::string& path);

  caf::actor_system& sys_;
  node& node_;
  const admin_config& cfg_;
  std::map<std::string, std::string> kinds_;  // path -> the last kind seen there
};

}  // namespace keel
