#pragma once

// What a node takes from its surroundings: built once in main() (keel-node) or by a test, and
// passed to node::start, which hands each piece to the parts that use it. Each member is a seam
// a test can swap (issue #10); an empty one is the real thing.

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include <caf/error.hpp>
#include <caf/expected.hpp>

#include "actors/ownership_host.hpp"
#include "actors/ownership_transport.hpp"
#include "base/threads.hpp"
#include "storage/session_store.hpp"

namespace keel {

struct node_env {
  /// The node's monotonic clock, ns: the ownership protocol's (its leases, its timeouts) and the
  /// lease board's, which the batcher asks before every step.
  ownership_clock clock;
  /// Fills `out` with `n` unpredictable bytes (session ids are 120 of them). An error fails
  /// what needed them (a new session) with it.
  std::function<caf::error(unsigned char* out, size_t n)> random;
  /// Opens the session store in `dir` (`node_config::data_dir`).
  std::function<caf::expected<std::unique_ptr<storage::session_store>>(
      const std::string& dir, const storage::store_options& opts)>
      open_store;
  /// The ownership protocol's transport to the node's peers (with peers only).
  std::function<std::shared_ptr<ownership_transport>(const peer_transport_config& cfg)> transport;
  /// Starts each thread of the node's own: the shards' compute threads, one per region link,
  /// the transport's. (CAF's scheduler and detached actors are the actor system's.)
  thread_spawner threads;

  /// The real ones: the steady clock, getrandom(2), RocksDB, Cap'n Proto over TCP (or TLS) with
  /// one thread, named std::threads.
  static node_env real();
  /// This environment with every empty member replaced by the real one.
  node_env completed() const;
};

}  // namespace keel
