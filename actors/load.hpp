#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace keel {

/// One node's load as its batcher last published it: what heartbeats carry to the peers
/// (wire/peer.capnp NodeLoad) and what placement and takeovers read (docs/actors.md, "Load
/// across the cluster").
struct node_load {
  int32_t waiting = 0;       // turns waiting for admission
  int32_t running = 0;       // turns generating
  int32_t kv_free = 0;       // KV pages not reserved by a running turn
  int32_t kv_capacity = 0;   // KV pages of the node (0: not known)
  int32_t kv_wanted = 0;     // pages the waiting turns need to be admitted
  float tokens_per_s = 0;    // generated over the last second or so (0 when idle)

  /// The share of the node's KV pages that new work can have now: free pages not already
  /// wanted by a waiting turn, over the capacity, in [0, 1]. 0 when the capacity is not known.
  double room() const {
    if (kv_capacity <= 0) return 0;
    auto spare = std::max(0, kv_free - kv_wanted);
    return std::min(1.0, static_cast<double>(spare) / kv_capacity);
  }
  /// "12 waiting, 3 running, KV 40/512 free (30 wanted), 85.2 tokens/s".
  std::string describe() const;
};

/// Where the batcher publishes `node_load` and anyone reads it without asking an actor (the peer
/// endpoint answers heartbeats on its own thread). Every member is safe from any thread; a read
/// may mix two publications (each field is current on its own), which a load figure tolerates.
class load_gauge {
 public:
  void publish(const node_load& l);
  node_load read() const;
  /// The most KV pages ever reserved at once (used = capacity - free), since the node started.
  int32_t peak_used() const { return peak_used_.load(std::memory_order_relaxed); }

 private:
  std::atomic<int32_t> waiting_{0}, running_{0}, kv_free_{0}, kv_capacity_{0}, kv_wanted_{0};
  std::atomic<int32_t> peak_used_{0};
  std::atomic<float> tokens_per_s_{0};
};

/// Counts generated tokens into a rate over windows of about `window` (the batcher's, on its
/// own thread only).
class token_rate {
 public:
  explicit token_rate(std::chrono::milliseconds window = std::chrono::milliseconds(1000))
      : window_(window) {}
  /// `n` tokens generated at `now`; returns the rate of the last full window.
  float add(int64_t n, std::chrono::steady_clock::time_point now);
  /// No turn is running: the rate is 0 from now on.
  void idle() {
    count_ = 0;
    rate_ = 0;
    started_ = {};
  }
  float rate() const { return rate_; }

 private:
  std::chrono::milliseconds window_;
  std::chrono::steady_clock::time_point started_{};
  int64_t count_ = 0;
  float rate_ = 0;
};

/// A peer a new session could be opened on, as its last heartbeat answer described it.
struct placement_candidate {
  std::string name;
  std::string client_address;  // its Gateway, HOST:PORT
  node_load load;
};

/// Where a node that a client asked to open a session opens it: `nullopt` here, else the index
/// of the candidate (a peer that accepts work, with a fresh load) it forwards the open to.
///
/// Here while this node's room is at least `keep_room` (so a session's first turn needs no hop
/// while the node has room). Otherwise a peer whose room exceeds this node's by `margin`, chosen
/// at random weighted by room (`random` is a uniform 64-bit draw): between two heartbeats every
/// node sees the same loads, and a burst of opens spreads instead of piling onto the one peer
/// that looked emptiest. Here again when no peer has more room: the batcher's admission then
/// queues the work, and sheds the lowest priority when its queue is full.
std::optional<size_t> choose_placement(const node_load& self,
                                       const std::vector<placement_candidate>& peers,
                                       double keep_room, double margin, uint64_t random);

}  // namespace keel
