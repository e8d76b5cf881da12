#pragma once

// How the ownership protocol's messages travel between keel-nodes: one `Peer.ownership` call
// per message (wire/peer.capnp), from a thread of the node's own.

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include <kj/async.h>

#include "actors/partition.hpp"
#include "base/threads.hpp"
#include "wire/tls.hpp"

namespace keel {

/// Where the protocol's messages go (the seam keel-sim and tests replace): to a member by name.
class ownership_transport {
 public:
  virtual ~ownership_transport() = default;
  /// Queues `message` (an encoded ownership_msg) for the member `to`. Never blocks. May drop
  /// it: the protocol sends again whatever it still needs.
  virtual void send(const std::string& to, std::string message) = 0;
};

struct peer_transport_config {
  /// This node, as `from` of every call.
  std::string self_name;
  std::string self_region;
  std::string self_address;
  uint64_t cluster = 0;  // this node's cluster digest (node::cluster_digest), sent with every call
  /// Each member's peer endpoint, HOST:PORT, by name (under TLS its certificate must name it).
  std::map<std::string, std::string> addresses;
  std::shared_ptr<const wire::tls_config> tls;
  /// The `partition` fault: nothing goes to a cut member. May be null.
  std::shared_ptr<const partition> cut;
  /// Failures (one line per connection that fails, not per message). May be empty.
  std::function<void(const std::string&)> log;
  /// Calls unanswered at once per member; more are dropped (a slow or stopped member must not
  /// make this node queue without bound).
  size_t max_in_flight = 64;
  /// Messages waiting for the thread; more are dropped.
  size_t max_queued = 8192;
  /// A call unanswered for this long fails, and its connection is made again.
  std::chrono::milliseconds call_timeout{1000};
  /// After a connection failed, no new one to that member before this long.
  std::chrono::milliseconds reconnect_after{100};
  /// Starts the transport's thread (the node's environment; empty: the default spawner).
  thread_spawner spawn;
};

/// The keel-node's transport: one thread with a KJ event loop and one Cap'n Proto connection
/// per member, made when the first message goes there and made again after a failure. Messages
/// to one member go out in the order they were queued; nothing waits for an answer but the
/// bookkeeping of calls in flight. Thread-safe; the destructor drops what is queued and joins.
class peer_transport final : public ownership_transport {
 public:
  explicit peer_transport(peer_transport_config cfg);
  ~peer_transport() noexcept override;
  peer_transport(const peer_transport&) = delete;
  peer_transport& operator=(const peer_transport&) = delete;

  void send(const std::string& to, std::string message) override;

  struct counters {
    uint64_t sent = 0;       // calls made
    uint64_t delivered = 0;  // calls answered
    uint64_t dropped = 0;    // not sent: queue or in-flight limit, cut, unknown member
    uint64_t failed = 0;     // calls that failed or timed out
  };
  counters stats() const;

 private:
  struct state;  // the thread's connections (ownership_transport.cpp)
  void run();

  peer_transport_config cfg_;
  mutable std::mutex mu_;
  std::deque<std::pair<std::string, std::string>> queue_;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> bell_;
  bool stopping_ = false;
  counters counters_;
  std::thread thread_;  // last: started once the rest is ready
};

}  // namespace keel
