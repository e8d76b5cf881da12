#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/expected.hpp>

#include "actors/node.hpp"
#include "wire/server_thread.hpp"

namespace keel {

struct admin_config {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  // 0: an ephemeral port (see admin::port)
  /// The key `AdminGate.login` asks for. Empty: the admin interface is disabled and refuses
  /// every login, saying so.
  std::string key;
  std::string client_address;  // the gateway's HOST:PORT, as `report` gives it
  /// How long `kill` waits to see the supervisor react (a restart or an escalation) before it
  /// answers; the kill itself is not undone when nothing is seen.
  std::chrono::milliseconds reaction_wait{2000};
  /// Timeout of each request to the node's actors. A manual restart waits for the child to stop,
  /// and a shard worker first finishes its step (up to its shutdown timeout, 10 s).
  std::chrono::milliseconds call_timeout{15000};
  /// Refused logins and failed calls (one line each); empty: silent. Called on the admin's
  /// threads.
  std::function<void(const std::string&)> log;
  /// TLS (wire/tls.hpp): when set, the port speaks only TLS with this node's certificate.
  std::shared_ptr<const wire::tls_config> tls;
};

/// The node's admin endpoint, what keel-shell speaks to: serves `AdminGate` and `Admin`
/// (wire/keel.capnp) on a listening port of its own, apart from the gateway (clients) and the
/// peer endpoint (nodes), so that it can be firewalled on its own. `Admin` is handed out only
/// for the configured key (compared in constant time); without one every login is refused.
///
/// What it offers: the live supervision tree (walked with the supervisors' `list_atom`, with the
/// supervision log's times), the node's figures and its peers' status, the sessions, killing
/// or restarting any actor of the tree but the root, and the fault injections of
/// `fault_injector` (plus cutting a region link, `cut_atom`, and partitioning the node from
/// peers, `node::cut`), and draining the node (`node::drain`).
///
/// Threads: one runs the KJ event loop (connections, and a once-a-second sample of the
/// batcher's token count for tokens/s); the calls, which wait for actors, run one at a time on a
/// `wire::blocking_worker` thread, so neither a CAF worker nor the KJ loop ever blocks. (A
/// drain holds that thread until its sessions have new owners: other admin calls wait behind
/// it.)
///
/// `node` must outlive the admin. Start and stop from any thread but the admin's own.
class admin {
 public:
  static caf::expected<std::unique_ptr<admin>> start(caf::actor_system& sys, node& n,
                                                     admin_config cfg);
  ~admin();
  admin(const admin&) = delete;
  admin& operator=(const admin&) = delete;

  /// The bound port (the ephemeral one when the configuration asked for 0).
  uint16_t port() const { return port_; }
  /// "HOST:PORT" with the bound port.
  std::string address() const;

  /// Closes the listener and every connection and joins the threads. Also done by the
  /// destructor.
  void stop();

  struct impl;  // the state of the admin's threads (admin.cpp)

 private:
  admin() = default;

  admin_config cfg_;
  uint16_t port_ = 0;
  std::unique_ptr<wire::server_thread> server_;
};

}  // namespace keel
