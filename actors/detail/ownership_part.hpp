#pragma once

// What a keel-node keeps of the ownership protocol (node_config::ownership_protocol): shared by
// node.cpp and node_ownership.cpp only.

#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>

#include "actors/node.hpp"
#include "actors/ownership_host.hpp"

namespace keel {

struct node::ownership_part {
  std::shared_ptr<lease_board> board;  // with the node's clock
  ownership::config protocol;
  std::shared_ptr<ownership_transport> transport;
  ownership_clock clock;  // the node's (node_env::clock)
  std::function<std::shared_ptr<ownership_transport>(const peer_transport_config&)> make_transport;
  thread_spawner spawn;
  std::shared_ptr<ownership_storage> storage;
  std::chrono::milliseconds ack_timeout{2000};
  std::mutex mu;
  ownership_actor host;  // under `mu`: invalid before the start and after the stop
  /// Sessions this node is opening: their `acquired` is the open's own.
  std::set<std::string> opening;
  /// Sessions a drain gave up that no other member was seen to own yet (a later drain asks
  /// again).
  std::set<std::string> given_up;

  ownership_actor current() {
    std::lock_guard<std::mutex> guard(mu);
    return host;
  }
};

/// The protocol's configuration from the node's, and the board the batcher reads; made before
/// the tree starts. Null with `err` set when the configuration does not allow the protocol.
std::shared_ptr<node::ownership_part> make_ownership_part(const node_config& cfg,
                                                          const node_env& env, caf::error& err);

}  // namespace keel
