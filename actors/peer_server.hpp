#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <caf/expected.hpp>

namespace keel {

struct peer_server_config {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  // 0: an ephemeral port (see peer_server::port)
  std::string name;   // this node's NodeId, as heartbeats report it
  std::string region;
  /// Failed connections and calls (one line each); empty: silent. Called on the server's thread.
  std::function<void(const std::string&)> log;
};

/// The node's peer endpoint: serves `Peer` (wire/peer.capnp) on HOST:PORT, a listener of its
/// own next to the gateway's (so the client API and keel.capnp stay as they are, and the peer
/// port can be firewalled apart from the client one). It runs its own thread with a KJ event
/// loop. `heartbeat` is answered on that thread without touching an actor, so a node whose
/// actors are busy still answers; a node whose process is stopped or dead does not.
///
/// Start and stop from any thread but the server's own.
class peer_server {
 public:
  static caf::expected<std::unique_ptr<peer_server>> start(peer_server_config cfg);
  ~peer_server();
  peer_server(const peer_server&) = delete;
  peer_server& operator=(const peer_server&) = delete;

  uint16_t port() const { return port_; }
  /// "HOST:PORT" with the bound port.
  std::string address() const;

  /// Closes the listener and every connection and joins the thread. Also done by the destructor.
  void stop();

 private:
  peer_server() = default;

  peer_server_config cfg_;
  uint16_t port_ = 0;
  std::thread thread_;
  struct stopper;
  std::unique_ptr<stopper> stop_;
};

}  // namespace keel
