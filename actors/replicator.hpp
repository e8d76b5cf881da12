#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "actors/region_link.hpp"

namespace keel {

/// One write of a session to copy to a replica (the arguments of wire/peer.capnp `replicate`).
struct replica_update {
  std::string session;
  uint64_t epoch = 0;
  std::string record;  // the stored checkpoint; empty when only tokens advance
  uint64_t turn = 0;
  uint64_t from_index = 0;
  std::vector<int32_t> tokens;
};

struct replicator_config {
  std::string self_name;
  std::string self_region;
  std::string self_address;
  /// A call unanswered for this long fails (and its connection is dropped).
  std::chrono::milliseconds call_timeout{2000};
  /// Failed sends (one line each); empty: silent. Called on the replicator's thread.
  std::function<void(const std::string&)> log;
};

/// Sends session writes to a replica, asynchronously: `enqueue` only queues, and one thread of
/// the replicator's own (with a KJ event loop and one Cap'n Proto connection per peer) sends
/// them in order. The replica is the first peer, by address, whose region link reports
/// `accepts_work()` (R = 1; placement by rendezvous hashing comes later). An update that finds
/// no such peer, or whose call fails or times out, is dropped and logged: replication is best
/// effort until acknowledgements wait for replicas (ARCHITECTURE.md guarantee 1 is not yet kept
/// across nodes).
///
/// Thread-safe. The destructor sends nothing more and joins the thread.
class replicator {
 public:
  replicator(replicator_config cfg, std::shared_ptr<peer_table> peers);
  ~replicator();
  replicator(const replicator&) = delete;
  replicator& operator=(const replicator&) = delete;

  void enqueue(replica_update u);

  /// Updates acknowledged by a replica, and refused or dropped ones.
  uint64_t sent() const;
  uint64_t failed() const;

 private:
  void run();

  replicator_config cfg_;
  std::shared_ptr<peer_table> peers_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<replica_update> queue_;
  bool stopping_ = false;
  uint64_t sent_ = 0;
  uint64_t failed_ = 0;
  std::thread thread_;  // last: started after the rest is ready
};

}  // namespace keel
