#pragma once

#include <atomic>
#include <limits>
#include <map>
#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <stop_token>
#include <string>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include "actors/batcher.hpp"
#include "actors/guardrail.hpp"
#include "actors/node_context.hpp"
#include "actors/node_env.hpp"
#include "actors/ownership.hpp"
#include "actors/partition.hpp"
#include "actors/region_link.hpp"
#include "actors/ownership_transport.hpp"
#include "actors/session.hpp"
#include "actors/supervisor.hpp"

namespace keel {

struct node_config {
  std::string name = "node";
  std::string model_path;
  std::string tokenizer_path;  // llama2.c models only
  /// The chat template (Jinja text) new chat sessions render with; empty: the model's own
  /// (`tokenizer.chat_template`), or Keel's default for a model without one. Each session keeps
  /// the one it started with.
  std::string chat_template;
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
  supervisor_flags links_flags =
      make_flags(restart_strategy::one_for_one, 10, std::chrono::seconds(10));
  /// The peers this node is cut from (the `partition` fault), shared with its peer endpoint;
  /// null: the node makes one of its own.
  std::shared_ptr<partition> cut;
  /// The simulated full disk under the session store (keel-shell `fault NODE disk-full`); null:
  /// the node makes one of its own.
  std::shared_ptr<storage::disk_fault> disk;
  /// With peers, every session is served under the ownership protocol (docs/actors.md,
  /// "Ownership protocol"): a fixed group of `group_size` members, ballots, majority writes and
  /// a lease per session. Each peer's region by name: a group takes one member per region first
  /// (so it outlives a region's loss); a peer not listed is in region "". Every node of a
  /// cluster must be given the same names, regions and group size, since each computes every
  /// session's group from them. Without peers the node runs alone (an explicit single-node mode:
  /// its store is the only copy).
  std::map<std::string, std::string> peer_regions;
  /// With peers: members per session group (the owner and its replicas; at most the cluster).
  /// 3: two replicas, so that a session outlives the loss of any one member.
  int32_t group_size = 3;
  /// With peers: a new session opens here while at least this share of the node's KV pages is
  /// free of running and waiting turns; beyond it, on a peer with more room (`choose_placement`,
  /// actors/load.hpp). 0.2: a node forwards new sessions once 80% of its KV budget is in use
  /// (`keel-node --spread-above 80`); 0: never.
  double keep_room = 0.2;
  /// Degrade before shedding: a new session of a priority below `degrade_below`, opened on a
  /// node with less room than `degrade_room` (after placement found no peer with more), gets a
  /// context of `degrade_context` tokens (0: a quarter of the model's) instead of the model's,
  /// so its turns reserve fewer KV pages. The default (the lowest int32): off.
  int32_t degrade_below = std::numeric_limits<int32_t>::min();
  double degrade_room = 0.2;
  int32_t degrade_context = 0;
  /// The model file's digest when known already (keel-node computes it before the node starts,
  /// to log it); empty: the node computes it (kernels/digest.hpp).
  std::string model_digest;
  /// The guardrail (actors/guardrail.hpp): prompts and replies checked by a supervised filter
  /// under a deadline and a failure policy. `guard.make` empty: none.
  guard_config guard;
};

/// A digest of `cfg`'s view of the cluster: every member's name and region (this node's and
/// its peers'), the group size and the protocol's timing; FNV-1a of their canonical text. Every
/// node of a cluster must have the same one (wire/peer.capnp NodeId.cluster). 0 without peers.
uint64_t cluster_digest(const node_config& cfg);

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
///   |- store      the session actors' synced writes (only alone with a data dir)
///   |- engine     one_for_all: shard-0 .. shard-{n-1}
///   |- batcher    permanent
///   |- sessions   simple_one_for_one: one transient session actor per conversation
///   |- links      one_for_one: one region link per peer (only with `node_config::peers`)
///   `- ownership  rest_for_one (only with peers):
///      |- failover  starts and stops the sessions the host acquires and loses, in order
///      `- host      the ownership protocol's host
///
/// The model is loaded once and shared; restarts map nothing again. Owned by main() or a test;
/// the destructor stops the tree in reverse order.
///
/// With `node_config::data_dir` the node owns a storage::session_store there. `start` recovers
/// every intact session from it (a running turn resumes where its log ends), reports each
/// corrupt record on the supervision log's sink and skips it, and continues session numbers
/// after the highest one stored. A damaged store is rebuilt by `session_store::open`; the node
/// logs each finding and each session in the damaged part.
///
/// With peers the sessions live in their groups under the ownership protocol, not in the
/// session records: the host recovers this node's protocol state from the store's `ownership`
/// column family and takes back each session it owned from the newest copy of a majority of its
/// group (which also restores what a damaged store lost).
class node {
 public:
  /// `env`: the clock, randomness, store, transport and threads the node uses (node_env.hpp;
  /// its empty members are the real ones).
  static caf::expected<std::unique_ptr<node>> start(caf::actor_system& sys, node_config cfg,
                                                    std::shared_ptr<supervision_log> log = {},
                                                    node_env env = {});
  ~node();
  node(const node&) = delete;
  node& operator=(const node&) = delete;

  supervisor_actor root() const { return root_; }
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
                                          const std::string& tenant = {},
                                          int32_t context_limit = 0);
  /// The context a new session of `priority` gets here now: 0 (the model's), or the degradation
  /// policy's shorter one when this node is under pressure (node_config::degrade_below).
  int32_t context_for_new_session(int32_t priority) const;
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
  session_actor session(const std::string& id);
  /// The current handle of a direct child of the root: "engine", "batcher" or "sessions".
  caf::actor child(const std::string& id);
  /// Every session's record (from the session table), ordered by id.
  std::vector<session_record> sessions() const;
  /// Each peer as its region link sees it (status, last round trip, failures), by address.
  std::vector<peer_info> peers() const { return peers_->snapshot(); }

  /// The batcher's figures.
  caf::expected<batcher_stats> stats();
  /// The node's load as its batcher last published it (no message: a few atomics).
  node_load load() const { return ctx_->metrics->load.read(); }
  /// Where a new session should open (`choose_placement`): nullopt here, else a peer that
  /// accepts work and has more room (by its last heartbeat answer). Reads the peer table only.
  std::optional<placement_candidate> place_new_session();
  /// The room (node_load::room) of member `name`: this node's own, or a peer's by its last
  /// heartbeat answer; 0 for a peer whose link does not see it up. The ownership host orders
  /// takeovers by it.
  double room_of(const std::string& name) const;

  /// Where a session this node does not hold is served: the client address of the live node
  /// that owns it. `disconnected` while its group chooses an owner or its owner cannot be
  /// reached (retry), `not_found` when no node has it. Asks the ownership host; not on a CAF or
  /// KJ thread.
  caf::expected<owner_endpoint> owner_address(const std::string& id);
  /// One session moved by `drain`.
  struct drained_session {
    std::string id;
    std::string to;      // the node that took it ("" when it stayed)
    uint64_t epoch = 0;  // the new owner's epoch
    std::string error;   // why it stayed, "" when it moved
  };
  /// How long `drain` waits for new owners.
  struct drain_options {
    /// At most this long; zero: six times `down_after`, at least 5 s.
    std::chrono::milliseconds patience{0};
    /// Once requested, no longer (keel-node's second SIGTERM).
    std::stop_token stop;
    /// Not for a session whose other members the region links all see down (silent for
    /// `down_after`): from here none can take it over. keel-node's stop does not wait for a
    /// takeover that cannot happen (the last node of a cluster stopped); keel-shell's `drain`
    /// waits, since a majority cut off from this node may still take it over.
    bool skip_unreachable = false;
  };
  /// Drains the node: refuses new sessions from now on (`overloaded`, "draining"), gives every
  /// session up (its host resigns it and the session actor ends its client's stream, which
  /// resumes elsewhere), then waits until another member of each group owns it (`o`). Returns
  /// what happened to each session (why it stayed, when it did: it is given up all the same);
  /// the node is safe to stop when every one moved. `unimplemented` without peers. Blocks; not
  /// on a CAF or KJ thread.
  caf::expected<std::vector<drained_session>> drain(const drain_options& o);
  caf::expected<std::vector<drained_session>> drain() { return drain(drain_options{}); }
  bool draining() const { return draining_.load(); }
  /// Called once when `drain` starts (keel-node tells its peers through its heartbeats).
  void on_draining(std::function<void()> f) { on_draining_ = std::move(f); }
  /// With peers: the running (or last) turn of `id` and how many of its tokens went to the
  /// group as checkpoints (nullopt without peers, or before any did).
  std::optional<std::pair<uint64_t, size_t>> sent_to_group(const std::string& id) const;
  /// The other members of `id`'s group (empty without peers).
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
  /// The ownership protocol's messages to the peers: made and failed calls (zero without peers).
  peer_transport::counters replication() const;

  /// With peers: one of its messages from peer `from` (already authenticated
  /// by the peer endpoint), still encoded. Queues it for the node's ownership host and returns.
  void deliver_ownership(const std::string& from, std::string message);

  /// Stops the tree (also done by the destructor) and closes the store.
  void stop();

  struct ownership_part;  // detail: the protocol's host and its plumbing (node_ownership.cpp)

 private:
  node(caf::actor_system& sys) : sys_(sys) {}
  /// Starts the session `r` (already in the table) under session_sup.
  caf::error start_session(const session_record& r);

  // The ownership protocol (node_ownership.cpp).
  /// The root's child "ownership": a supervisor of the failover actor and the host (its store
  /// and transport made here). Each start of the host recovers from the store and takes this
  /// node's sessions back, each started as `acquired` says (a session still running here after
  /// a restart of the host alone goes on).
  child_spec ownership_spec();
  /// The failover actor (`failover_actor`): `serve_acquired` and `stop_lost` on its thread.
  child_spec failover_spec();
  /// What the session table hands the protocol (session_table::on_change).
  caf::error protocol_change(const session_record& r, change c,
                             const std::optional<session_record>& previous);
  /// This node owns `id` now, with `data` at `epoch`: tells the failover actor, which starts
  /// it (`serve_acquired`: a takeover or a restart). On the host's thread.
  void acquired(const std::string& id, const session_data& data, uint64_t epoch);
  void serve_acquired(const std::string& id, const session_data& data, uint64_t epoch);
  /// Another node owns `id` now: tells the failover actor, which stops it here (`stop_lost`,
  /// its running turn's client told `detail`). On the host's or a session actor's thread.
  void lost(const std::string& id);
  void stop_lost(const std::string& id, const std::string& detail);
  /// Why no other member of `id`'s group can take it over now as this node sees it: every one
  /// is down on its region link ("" when one may be up).
  std::string no_other_member_up(const std::string& id) const;

  caf::actor_system& sys_;
  node_config cfg_;
  node_env env_;  // completed: every member set
  std::shared_ptr<ownership_part> own_;  // with peers
  std::unique_ptr<storage::session_store> store_;  // null without a data dir
  std::shared_ptr<node_context> ctx_;
  std::shared_ptr<session_table> sessions_;
  std::shared_ptr<peer_table> peers_ = std::make_shared<peer_table>();
  supervisor_actor root_;
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
