#pragma once

#include <atomic>
#include <map>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include "actors/batcher.hpp"
#include "actors/node_context.hpp"
#include "actors/ownership.hpp"
#include "actors/partition.hpp"
#include "actors/region_link.hpp"
#include "actors/replicator.hpp"
#include "actors/serial_executor.hpp"
#include "actors/session.hpp"
#include "actors/supervisor.hpp"

namespace keel {

struct node_config {
  std::string name = "node";
  std::string model_path;
  std::string tokenizer_path;  // llama2.c models only
  int32_t shards = 1;
  int32_t threads_per_shard = 1;
  uint64_t kv_bytes = 256ull << 20;  // KV budget of the whole node, split across shards
  batcher_config batching;           // shards and kv_pages are filled in by the node
  supervisor_flags engine_flags =
      make_flags(restart_strategy::one_for_all, 10, std::chrono::seconds(10));
  supervisor_flags node_flags =
      make_flags(restart_strategy::one_for_one, 5, std::chrono::seconds(10));
  /// A session whose actor fails 5 times within 10 s is parked (issue #11: one poison session
  /// must not take the session supervisor, and every other session, down).
  supervisor_flags session_flags =
      make_flags(restart_strategy::simple_one_for_one, 20, std::chrono::seconds(10), 5);
  /// The session store's directory; empty: sessions live in memory only and die with the node.
  std::string data_dir;
  /// A running turn's generated tokens are appended to its turn log every this many tokens
  /// (buffered) and at the end of the turn (synced). 16: a buffered append costs about 5 us
  /// plus the rewrite of the turn's log (docs/storage.md), well under a decode step even at
  /// batch 1, and a restart regenerates at most 15 tokens per running turn.
  int32_t checkpoint_every = 16;
  /// Region links: HOST:PORT of each peer's peer endpoint (peer_server); one link each, under
  /// `links`. Empty: no links (and no `links` supervisor).
  std::vector<std::string> peers;
  /// The name of each of `peers`, in the same order (`--peers NAME=HOST:PORT`); empty, or an
  /// empty entry: not given. A named peer must answer heartbeats with its name, and under TLS
  /// its certificate must name it.
  std::vector<std::string> peer_names;
  /// TLS for every connection to a peer (wire/tls.hpp); null: plain TCP.
  std::shared_ptr<const wire::tls_config> tls;
  std::string region;        // this node's region, as its heartbeats report it
  std::string peer_address;  // HOST:PORT of this node's own peer endpoint, likewise
  std::chrono::milliseconds heartbeat_interval{100};
  std::chrono::milliseconds down_after{500};
  /// Replicas per session (with a data dir and peers): placed by rendezvous hashing over the
  /// live peers, at least one in another region when one is live (replicator.hpp).
  int32_t replicas = 1;
  supervisor_flags links_flags =
      make_flags(restart_strategy::one_for_one, 10, std::chrono::seconds(10));
  /// The peers this node is cut from (the `partition` fault), shared with its peer endpoint;
  /// null: the node makes one of its own.
  std::shared_ptr<partition> cut;
  /// The simulated full disk under the session store (keel-shell `fault NODE disk-full`); null:
  /// the node makes one of its own.
  std::shared_ptr<storage::disk_fault> disk;
  /// Who may serve a session, and how a takeover happens (docs/actors.md, "Failover" and
  /// "Ownership protocol"). false: the interim rules (replicas placed among the live peers,
  /// takeover by the holder of the newest copy that sees a majority, a node-wide lease).
  /// true: the ownership protocol (actors/ownership.hpp) hosted by the node: fixed replica
  /// groups, ballots, majority writes and a lease per session. Needs every peer's name.
  bool ownership_protocol = false;
  /// With the protocol: each peer's region by name (groups take one member per region first);
  /// a peer not listed is in region "".
  std::map<std::string, std::string> peer_regions;
  /// With the protocol: members per session group (owner and replicas), at most the cluster.
  int32_t group_size = 3;
};

/// Where a session is served: its owner's name and client address (empty: on this node).
struct owner_endpoint {
  std::string node;
  std::string client_address;
};

/// Settings for the actor system of a process that runs a node: CAF 0.17's idle scheduler
/// workers poll their queues for tens of milliseconds before sleeping, which on a small machine
/// takes CPU from the shard workers' compute threads (measured: 18-34% of decode throughput on
/// 2 cores, bench/batch.md). Idle workers sleep at once instead; messages still wake them.
void tune_actor_system(caf::actor_system_config& cfg);

/// One node's supervision tree in this process:
///
///   node          one_for_one
///   |- engine     one_for_all: shard-0 .. shard-{n-1}
///   |- batcher    permanent
///   |- sessions   simple_one_for_one: one transient session actor per conversation
///   `- links      one_for_one: one region link per peer (only with `node_config::peers`)
///
/// The model is loaded once and shared; restarts map nothing again. Owned by main() or a test;
/// the destructor stops the tree in reverse order.
///
/// With `node_config::data_dir` the node owns a storage::session_store there. `start` recovers
/// every intact session from it (a running turn resumes where its log ends), reports each
/// corrupt record on the supervision log's sink and skips it, and continues session numbers
/// after the highest one stored. A damaged store is rebuilt by `session_store::open`; the node
/// logs each finding and each session in the damaged part, and with peers restores from their
/// replicas every session of its own that it lacks or holds behind (`reconcile`).
class node {
 public:
  static caf::expected<std::unique_ptr<node>> start(caf::actor_system& sys, node_config cfg,
                                                    std::shared_ptr<supervision_log> log = {});
  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  caf::actor root() const { return root_; }
  /// Why the node cannot serve: its root supervisor gave up (escalated past its intensity), so
  /// it has no sessions, batcher or engine; "" while it can. Its heartbeats say so, and its peers
  /// treat it as down (issue #11: such a node answered "up" and held its sessions hostage).
  std::string not_ready() const;
  const std::shared_ptr<node_context>& context() const { return ctx_; }
  fault_injector& faults() { return *ctx_->faults; }
  supervision_log& log() { return *ctx_->log; }
  const node_config& config() const { return cfg_; }

  /// Opens a conversation of `tenant` ("" without API keys) and returns its id:
  /// "s-<24 base32 characters>@NAME", 120 bits from getrandom(), so ids are unguessable; an id
  /// this node holds, held or stored is never given again (even when its store lost sessions).
  /// With a data dir, the session record is in a synced write (and with peers, on a replica)
  /// before the id is returned.
  caf::expected<std::string> open_session(const sampling_params& params, int32_t priority = 0,
                                          const std::string& tenant = {});
  /// The tenant of session `id` when this node holds it (nullopt otherwise).
  std::optional<std::string> tenant_of(const std::string& id) const {
    return sessions_->tenant_of(id);
  }
  /// How many sessions of `tenant` this node holds.
  size_t sessions_of(const std::string& tenant) const { return sessions_->count_of(tenant); }
  /// The answer for a session id no node holds: also the answer another tenant gets for a
  /// session it does not own, so that the two cannot be told apart.
  caf::error unknown_session(const std::string& id) const;
  /// The session's current actor (invalid when unknown or between restarts).
  caf::actor session(const std::string& id);
  /// The current handle of a direct child of the root: "engine", "batcher" or "sessions".
  caf::actor child(const std::string& id);
  /// Every session's record (from the session table), ordered by id.
  std::vector<session_record> sessions() const;
  /// Each peer as its region link sees it (status, last round trip, failures), by address.
  std::vector<peer_info> peers() const { return peers_->snapshot(); }

  /// The batcher's figures.
  caf::expected<batcher_stats> stats();

  /// Where a session this node does not hold is served: the client address of the live node
  /// that owns it. `disconnected` while only replicas are found (its owner is down and a
  /// replica is taking it over: retry), `not_found` when no live node has a copy. Blocks for a
  /// round of `locate` calls; not on a CAF or KJ thread.
  caf::expected<owner_endpoint> owner_address(const std::string& id);
  /// Another node owns `id` at `epoch`: stop serving it and forget the local copy (called when
  /// a replica or a peer's `replicate` shows a newer epoch). Queued on the failover executor;
  /// returns at once.
  void lose(const std::string& id, uint64_t epoch);
  /// One session moved by `drain`.
  struct drained_session {
    std::string id;
    std::string to;      // the node that took it ("" when it stayed)
    uint64_t epoch = 0;  // the new owner's epoch
    std::string error;   // why it stayed, "" when it moved
  };
  /// Drains the node: refuses new sessions from now on (`overloaded`, "draining"), then hands
  /// every session over to its first replica among the live peers (a clean handoff: this node
  /// stops writing it, sends a full copy, and the peer takes the lease with epoch + 1; a running
  /// turn continues there and its client resumes). Returns what happened to each session; the
  /// node is empty (safe to stop) when every one moved. `unimplemented` without a data dir and
  /// peers. Blocks; not on a CAF or KJ thread.
  caf::expected<std::vector<drained_session>> drain();
  bool draining() const { return draining_.load(); }
  /// Called once when `drain` starts (keel-node tells its peers through its heartbeats).
  void on_draining(std::function<void()> f) { on_draining_ = std::move(f); }
  /// `Peer.handoff` from `from`: takes over `id` from the full copy just received.
  caf::expected<uint64_t> accept_handoff(const std::string& id, const std::string& from);

  /// The replicas `id`'s writes go to now: the first R live peers in placement order (empty
  /// without replication or live peers).
  std::vector<std::string> replicas_of(const std::string& id) const;
  /// Whether this node held `id` and another node took it over.
  bool moved(const std::string& id) const { return sessions_->dropped(id); }
  /// Why session `id` is parked (its actor failed again and again); nullopt when it is not.
  std::optional<std::string> parked(const std::string& id) const { return sessions_->parked(id); }

  /// The session store (null without a data dir).
  storage::session_store* store() { return store_.get(); }
  /// The `partition` fault's state (keel-shell `fault NODE partition`).
  partition& cut() { return *cfg_.cut; }
  /// The `disk-full` fault's state (keel-shell `fault NODE disk-full`).
  storage::disk_fault& disk() { return *cfg_.disk; }
  /// The node's calls to its peers: replication of its session writes (with a data dir) and
  /// locating sessions (null without peers).
  const replicator* replication() const { return replicator_.get(); }

  /// With the ownership protocol: one of its messages from peer `from` (already authenticated
  /// by the peer endpoint), still encoded. Queues it for the node's ownership host and returns.
  void deliver_ownership(const std::string& from, std::string message);
  /// Whether the node runs the ownership protocol (node_config::ownership_protocol).
  bool runs_protocol() const { return own_ != nullptr; }

  /// Stops the tree (also done by the destructor) and closes the store.
  void stop();

  struct ownership_part;  // detail: the protocol's host and its plumbing (node_ownership.cpp)

 private:
  node(caf::actor_system& sys) : sys_(sys) {}
  /// Starts the session `r` (already in the table) under session_sup.
  caf::error start_session(const session_record& r);

  // Failover (actors/failover.cpp, docs/actors.md "Takeover").
  /// A restarted node's reconciliation with its peers: drops its copies of sessions that
  /// another node took over meanwhile, and restores from a replica every session of its own
  /// whose records are corrupt, missing from its store, or behind the replica's (a damaged
  /// store, `damaged` naming the sessions in the damaged part). Returns the sessions to start.
  std::vector<session_record> reconcile(std::vector<session_record> recovered,
                                        const std::vector<std::string>& corrupt,
                                        const std::set<std::string>& damaged);
  /// Replaces this node's copy of `id` with the newest copy among the live peers, when it is
  /// still this node's; logs why (`why`) and what happened. The restored record, or nullopt.
  std::optional<session_record> restore(const std::string& id, const std::string& why);
  /// Takes over the sessions whose owner is no longer live and of which this node holds the
  /// newest copy. On the failover executor.
  void take_over(int attempt = 0);
  /// Copies each of this node's sessions to its replicas among the live peers again (after a
  /// peer, maybe one of them, went down).
  void replicate_again();
  /// Drops this node's sessions that a live peer holds at a higher epoch (taken over while this
  /// node was cut off). On the failover executor.
  void drop_taken_over();
  /// Takes the lease of the replica `id` with `epoch` and starts it. On the failover executor.
  caf::error adopt(const std::string& id, uint64_t epoch, const std::string& from);
  void lose_now(const std::string& id, uint64_t epoch);
  /// One session of `drain`: its handoff to the first peer in placement order that takes it.
  /// On the failover executor.
  drained_session hand_over(const std::string& id);

  // The ownership protocol (node_ownership.cpp).
  /// The host as the root's child "ownership" (its store and transport made here): each start
  /// recovers from the store and takes this node's sessions back, each started as `acquired`
  /// says (a session still running here after a restart of the host alone goes on).
  child_spec ownership_spec();
  /// What the session table hands the protocol (session_table::on_change).
  caf::error protocol_change(const session_record& r, change c,
                             const std::optional<session_record>& previous);
  /// This node owns `id` now, with `data` at `epoch`: starts it (a takeover or a restart).
  void acquired(const std::string& id, const session_data& data, uint64_t epoch);
  /// Another node owns `id` now: stops it here.
  void lost(const std::string& id);
  caf::expected<owner_endpoint> protocol_owner(const std::string& id);
  /// `drain` under the protocol: gives every session up (the host resigns it, its actor ends
  /// its client's stream), then waits until another member of each group owns it.
  caf::expected<std::vector<drained_session>> protocol_drain();

  caf::actor_system& sys_;
  node_config cfg_;
  std::shared_ptr<ownership_part> own_;  // with node_config::ownership_protocol
  std::unique_ptr<storage::session_store> store_;  // null without a data dir
  std::shared_ptr<node_context> ctx_;
  std::shared_ptr<session_table> sessions_;
  std::shared_ptr<peer_table> peers_ = std::make_shared<peer_table>();
  std::unique_ptr<replicator> replicator_;  // with peers (replication only with a data dir)
  std::unique_ptr<serial_executor> failover_;  // with a replicator: takeovers, losses, handoffs
  caf::actor root_;
  /// Set when the root exits other than by `stop`; shared with the exit hook on the root.
  struct readiness {
    std::mutex mu;
    bool stopping = false;
    std::string down;  // why the root exited; "" while it runs
  };
  std::shared_ptr<readiness> readiness_ = std::make_shared<readiness>();
  std::atomic<uint64_t> next_session_{0};
  std::atomic<bool> draining_{false};
  std::function<void()> on_draining_;
};

}  // namespace keel
