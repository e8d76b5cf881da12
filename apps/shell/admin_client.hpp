#pragma once

// keel-shell's side of the admin API (wire/keel.capnp `AdminGate`, `Admin`): connections to
// several nodes from one thread, each logged in with the admin key, and the answers as plain
// C++ values. No CAF: every call runs a KJ event loop on the calling thread until its answer
// arrives or its timeout passes.

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <caf/expected.hpp>

namespace keel::wire {
class tls_config;
}

namespace keel::shell {

struct actor_row {
  std::string path;
  uint32_t depth = 0;
  std::string kind;
  std::string state;
  uint32_t restarts = 0;
  std::string last_failure;  // "" when it never failed
  uint64_t last_failure_age_ms = 0;
  int64_t last_failure_unix_ms = 0;  // 0 when it never failed
};

struct peer_row {
  std::string address, name, region, status, breaker;
  uint64_t round_trip_us = 0, failures = 0;
  std::string last_failure;
  std::string client_address;  // "" until the peer answered a heartbeat
  // Its load, from its last heartbeat answer.
  uint32_t kv_pages_free = 0, kv_pages_capacity = 0, waiting = 0;
  float room = 0;
  std::string model_digest;
};

struct node_report {
  std::string name, region, client_address, admin_address, peer_address, model;
  uint32_t shards = 0;
  uint64_t uptime_ms = 0;
  uint32_t sessions = 0, running_turns = 0, queue_length = 0;
  uint32_t kv_pages_used = 0, kv_pages_total = 0;
  double tokens_per_second = 0;
  uint64_t tokens = 0, steps = 0, group_failures = 0, preemptions = 0, shed = 0;
  double last_recovery_ms = 0;
  uint32_t restarts = 0;
  uint64_t faults_fired = 0, replicated = 0, replication_failures = 0;
  std::vector<peer_row> peers;
  bool draining = false;  // the node was drained: it opens no new sessions
  float room = 0;         // share of its KV pages free for new work
  std::string model_digest;
};

struct session_row {
  std::string id, owner;
  std::string tenant;  // "" without --keys
  std::string model, model_digest;  // "" when not pinned
  uint32_t context_limit = 0;       // 0: the model's
  std::vector<std::string> replicas;
  uint64_t epoch = 0;
  uint32_t turns = 0;
  uint64_t tokens = 0;
  bool running = false;
  int32_t priority = 0;
  bool durable = false;
  uint64_t checkpoint_turn = 0, checkpoint_tokens = 0;
  std::string parked;  // why it is parked; "" when it is not
};

/// What a drain did with one session.
struct drained_row {
  std::string id;
  std::string to;      // the node that took it over; "" when it stayed
  uint64_t epoch = 0;  // its epoch there
  std::string error;   // why it stayed; "" when it moved
};

struct drain_result {
  std::vector<drained_row> sessions;
  uint32_t remaining = 0;  // sessions the node still holds: 0 when it is safe to stop
};

struct fault_spec {
  enum class kind : uint8_t { crash, stall, kv_fail, cut, clear, partition, disk_full };
  kind what = kind::crash;
  uint32_t after_steps = 0;
  uint32_t duration_ms = 0;  // partition: 0 until cleared
  uint32_t count = 0;
  std::vector<std::string> peers;  // partition: the nodes to cut from, by name
};

/// One node the shell was given, by its admin address.
struct member {
  std::string address;      // HOST:PORT of its admin endpoint, as given to --connect
  std::string name;         // from its login answer; "" until it answered once
  bool up = false;          // connected and logged in
  std::string down_reason;  // why not, when not
};

/// The nodes of `--connect`, each with its own connection. A member whose connection fails is
/// marked down; `connect()` tries it again. Belongs to the thread that made it.
class cluster {
 public:
  struct options {
    std::chrono::milliseconds connect_timeout{1500};
    /// Per call; above the admin's own waits (a restart waits for a shard's step).
    std::chrono::milliseconds call_timeout{20000};
    /// For `drain`, which answers once every session was handed over (a few seconds each at
    /// worst).
    std::chrono::milliseconds drain_timeout{300000};
    /// TLS (wire/tls.hpp), for nodes started with --tls-cert: trust only this CA. Null: plain.
    std::shared_ptr<const wire::tls_config> tls;
    /// The name the nodes' certificates must carry; empty: each address's host.
    std::string tls_name;
  };

  cluster(std::vector<std::string> addresses, std::string key, options opts);
  ~cluster();
  cluster(const cluster&) = delete;
  cluster& operator=(const cluster&) = delete;

  /// Connects to and logs in at every member that is down. A node that cannot be reached stays
  /// down (no error); a node that refuses the key (or has no admin key) is an error naming it.
  caf::error connect();

  const std::vector<member>& members() const { return members_; }

  caf::expected<std::vector<actor_row>> tree(size_t m);
  caf::expected<node_report> report(size_t m);
  caf::expected<std::vector<session_row>> sessions(size_t m);
  caf::expected<std::string> kill(size_t m, const std::string& path);
  caf::expected<std::string> restart(size_t m, const std::string& path);
  caf::expected<std::string> fault(size_t m, const std::string& path, const fault_spec& f);
  caf::expected<drain_result> drain(size_t m);

  struct impl;

 private:
  std::vector<member> members_;
  std::unique_ptr<impl> impl_;
};

}  // namespace keel::shell
