#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "actors/load.hpp"
#include "actors/partition.hpp"
#include "actors/supervisor.hpp"
#include "base/threads.hpp"
#include "wire/tls.hpp"

namespace keel {

/// What a link believes of its peer (ARCHITECTURE.md, "Failover").
enum class peer_status : uint8_t {
  up,       // a heartbeat was answered within the last 2 intervals
  suspect,  // none for 2 intervals, not yet for `down_after`
  down,     // none for `down_after` (or never yet)
};

/// The circuit breaker of a link: whether work (replication, forwarding) may go to the peer.
/// Heartbeats are probes, not work: they go on in every state.
enum class breaker_state : uint8_t {
  closed,     // work may be sent
  open,       // `breaker_failures` consecutive failures: no work for `breaker_open`
  half_open,  // after `breaker_open`: the next heartbeat decides (answered: closed; else: open)
};

const char* to_string(peer_status x);
const char* to_string(breaker_state x);

struct link_config {
  /// This node, as its heartbeats name it (wire/peer.capnp NodeId).
  std::string self_name = "node";
  std::string self_region;
  std::string self_address;  // HOST:PORT of this node's own peer endpoint
  /// This node's cluster digest (node::cluster_digest): sent, and compared with the peer's.
  uint64_t cluster = 0;
  std::chrono::milliseconds heartbeat_interval{100};
  std::chrono::milliseconds down_after{500};
  /// Consecutive failures (a refused or timed out connect, a heartbeat not answered within
  /// `down_after`, a dropped connection) that open the breaker. 5 at the default backoff is about
  /// 1.5 s of a dead peer: longer than a restart of a process, shorter than a human notices.
  int32_t breaker_failures = 5;
  /// How long an open breaker refuses work before it lets one probe through (half-open).
  std::chrono::milliseconds breaker_open{2000};
  /// Delay before the n-th consecutive reconnect: 100 ms doubling to 2 s, +-20% jitter (the
  /// seed is mixed with the peer's address, so links do not reconnect in lockstep).
  backoff_policy reconnect{std::chrono::milliseconds(100), std::chrono::seconds(2), 2.0, 0.2, 0};
  /// The `partition` fault: while the peer (by the name it answered with) is cut, every
  /// heartbeat fails, as with `cut_atom`. May be null.
  std::shared_ptr<const partition> cut;
  /// Starts the link's thread (the node's environment; empty: the default spawner).
  thread_spawner spawn;
  /// The peer's name as configured (`--peers NAME=HOST:PORT`; "" when not given): its
  /// heartbeats must answer with it, and under TLS its certificate must name it.
  std::string peer_name;
  /// TLS (wire/tls.hpp): the link connects over TLS, presenting this node's certificate.
  std::shared_ptr<const wire::tls_config> tls;
};

/// One peer as its link sees it.
struct peer_info {
  std::string address;  // HOST:PORT of the peer's endpoint, as configured
  std::string name;     // from its last heartbeat answer ("" until one)
  std::string region;
  std::string client_address;  // of its client Gateway, from its last heartbeat answer
  bool draining = false;       // it drains (from its last heartbeat answer)
  node_load load;              // from its last heartbeat answer (all 0 until one)
  std::string model_digest;    // of its model file, from its last heartbeat answer
  peer_status status = peer_status::down;
  breaker_state breaker = breaker_state::closed;
  std::chrono::nanoseconds round_trip{0};  // of the last answered heartbeat
  uint64_t heartbeats = 0;                 // answered heartbeats
  uint64_t failures = 0;                   // failures in all
  int32_t consecutive_failures = 0;
  std::string last_failure;    // "" when none yet
  int32_t status_changes = 0;  // every change of `status`, each also on the log's sink
  int32_t breaker_opens = 0;

  /// Whether work may be sent to this peer now.
  bool accepts_work() const { return status == peer_status::up && breaker != breaker_state::open; }
};

/// Every link's view of its peer, written by the links' threads and read by anyone. Thread-safe.
class peer_table {
 public:
  /// Records `p` (what the link to it saw last). Peer status is for operators, forwarding and
  /// admission only: no ownership decision reads it (the protocol has its own messages).
  void put(const peer_info& p);
  std::vector<peer_info> snapshot() const;  // ordered by address

 private:
  mutable std::mutex mu_;
  std::map<std::string, peer_info> peers_;
};

/// The child spec of the link to the peer endpoint at `address` (HOST:PORT), id "peer-ADDRESS".
///
/// A link is an event-based actor that owns one thread with a KJ event loop (its I/O: connect,
/// heartbeat, timers), started with the actor and joined when it exits, so a restart by the
/// `links` supervisor starts the link from scratch. The thread never blocks a CAF worker and
/// reports to `table` (and status changes to `log`'s sink); an exception on it fails the actor,
/// and the supervisor restarts it. Messages: `(get_atom) -> std::string`: the status as text.
child_spec link_spec(std::string address, link_config cfg, std::shared_ptr<peer_table> table,
                     std::shared_ptr<supervision_log> log);

}  // namespace keel
