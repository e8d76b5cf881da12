#pragma once

// systemd's service notification protocol (sd_notify(3)), without libsystemd: one datagram of
// "KEY=VALUE" lines to the AF_UNIX socket named by $NOTIFY_SOCKET. The protocol is stable and
// tiny; a dependency less is worth more than the 60 lines (docs/operations.md, "systemd").
//
// Only keel-node uses it, from main(): it lives in apps/ beside the other process-level glue
// (signals, flags), not in actors/, whose code must not depend on how the process is run.

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>

#include "base/error.hpp"

namespace keel::sd {

/// The notification socket of a service manager. Thread-safe: `notify` may be called from any
/// thread (each call is one datagram).
class notifier {
 public:
  /// From $NOTIFY_SOCKET: nullopt when it is unset or empty (not run by systemd, or by a unit
  /// that is not Type=notify); `bad_request` naming the value when it is neither a path ("/...")
  /// nor an abstract socket name ("@...") or the socket cannot be made.
  static caf::expected<std::optional<notifier>> from_environment();
  /// For the socket `address` ("/run/systemd/notify" or "@name").
  static caf::expected<notifier> open(const std::string& address);

  notifier(notifier&&) noexcept;
  notifier& operator=(notifier&&) noexcept;
  ~notifier();

  /// Sends `state`, lines such as "READY=1\nSTATUS=serving" (no trailing newline needed).
  /// `disconnected` naming the socket when the datagram cannot be sent.
  caf::error notify(const std::string& state) const;

  const std::string& address() const { return address_; }

 private:
  notifier(int fd, std::string address) : fd_(fd), address_(std::move(address)) {}
  int fd_ = -1;
  std::string address_;
};

/// How often to send WATCHDOG=1: half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises.
/// nullopt when `usec` is unset or empty, or `pid` is set and is not `self` (the watchdog is
/// another process's). `bad_request` naming the variable and its value when one is malformed.
caf::expected<std::optional<std::chrono::microseconds>> watchdog_period(const char* usec,
                                                                        const char* pid,
                                                                        pid_t self);

/// Spawns an actor that sends WATCHDOG=1 through `n` every `period` while `not_ready()` returns
/// "" (the node is healthy), and STATUS= lines when that changes. Once the node is not ready the
/// pings stop, so that systemd restarts a node its supervisors gave up on; since the pings run
/// on the actor system, a wedged scheduler stops them too. End it with an exit message
/// (`caf::anon_send_exit`).
caf::actor spawn_watchdog(caf::actor_system& sys, std::shared_ptr<const notifier> n,
                          std::chrono::microseconds period, std::function<std::string()> not_ready);

}  // namespace keel::sd
