#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <caf/expected.hpp>

#include "actors/load.hpp"
#include "actors/partition.hpp"
#include "wire/server_thread.hpp"

namespace keel {

struct peer_server_config {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  // 0: an ephemeral port (see peer_server::port)
  std::string name;   // this node's NodeId, as heartbeats report it
  std::string region;
  /// Failed connections and calls (one line each); empty: silent. Called on the server's thread.
  std::function<void(const std::string&)> log;
  /// The `partition` fault: every call from a peer cut from this node fails with
  /// `disconnected`. May be null.
  std::shared_ptr<const partition> cut;
  /// TLS (wire/tls.hpp): when set, a caller must present a certificate signed by the cluster's
  /// CA, and every call's `from` must be one of `peers` and named by that certificate; other
  /// calls fail (and are logged) without touching anything. Null: plain TCP, every caller
  /// trusted (the node then listens on loopback only, apps/keel_node.cpp).
  std::shared_ptr<const wire::tls_config> tls;
  /// This node's cluster digest (node::cluster_digest), sent in heartbeat answers; an
  /// `ownership` message whose sender's differs is dropped (and logged, once a minute per
  /// sender). 0: not checked.
  uint64_t cluster = 0;
  /// The digest of this node's model file, sent in heartbeat answers ("" when not known).
  std::string model_digest;
  /// The names of the configured peers (`--peers NAME=HOST:PORT`), the only callers served
  /// under TLS.
  std::vector<std::string> peers;
  /// Bounds one incoming message: 16 MiB (an ownership message with a session's whole copy is
  /// its turns' inputs and token ids, well under it), nesting 16.
  capnp::ReaderOptions reader{2 * 1024 * 1024, 16};
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

  /// Called (on the server's thread) with each `ownership` message from an authenticated peer
  /// `from` (its encoded bytes, not yet decoded): it must only queue (the node sends it to its
  /// ownership host), and must not call this server. Empty: the messages are dropped. Replacing
  /// it waits for a call in progress, so the old one runs no more once this returns (found by
  /// ASan: a test's node was destroyed while its callback ran).
  void on_ownership(std::function<void(const std::string& from, std::string message)> f);
  /// Whether the node drains, as heartbeats report it.
  void set_draining(bool draining);
  /// Asked at each heartbeat: why the node cannot serve ("" when it can), as heartbeats report
  /// it (peers then treat it as down). Called on the server's thread; empty: always ready.
  void set_readiness(std::function<std::string()> not_ready);
  /// Asked at each heartbeat: the node's load, as heartbeats report it (node_metrics::load).
  /// Called on the server's thread; empty: no load is reported.
  void set_load(std::function<node_load()> load);
  /// The node's client Gateway address, as heartbeats report it (set once the gateway is up).
  void set_client_address(const std::string& address);

  /// The `Peer` capability the server hands one connection whose other end is `caller` (what
  /// the accept loop serves each connection; tests/fuzz/peer_fuzz.cpp serves it over an
  /// in-memory stream). It belongs to the calling thread's KJ event loop and is used on that
  /// thread only; it shares the server's configuration and state, so the server must outlive it.
  capnp::Capability::Client bootstrap(kj::Own<kj::PeerIdentity> caller);

  /// Closes the listener and every connection and joins the thread. Also done by the destructor.
  void stop();

  struct node_state;  // detail: shared with the server's thread

 private:
  peer_server() = default;

  peer_server_config cfg_;
  uint16_t port_ = 0;
  std::unique_ptr<wire::server_thread> server_;
  std::unique_ptr<node_state> state_;
};

}  // namespace keel
