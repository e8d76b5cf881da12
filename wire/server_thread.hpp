#pragma once

// A listening Cap'n Proto server on a thread of its own, with its own KJ event loop: what the
// gateway, the peer endpoint and the admin endpoint each are.

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <caf/expected.hpp>
#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include "wire/frame_watch.hpp"
#include "wire/tls.hpp"

namespace keel::wire {

class server_thread {
 public:
  /// Runs on the new thread once HOST:PORT is bound: sets the server up and returns the promise
  /// that serves (accept loops and the like), with everything it uses attached to it. The
  /// promise is destroyed on that thread at `stop`, which ends every connection.
  using serve_fn = std::function<kj::Promise<void>(
      kj::AsyncIoContext& io, kj::Own<kj::ConnectionReceiver> listener, uint16_t port)>;
  using log_fn = std::function<void(const std::string&)>;

  server_thread() = default;
  ~server_thread() { stop(); }
  server_thread(const server_thread&) = delete;
  server_thread& operator=(const server_thread&) = delete;

  /// Binds HOST:PORT (port 0: an ephemeral one) and starts serving; returns the bound port, or
  /// the error, "NAME: cannot listen on HOST:PORT: why". `log` (may be empty) hears why the
  /// server stopped early, if it does. Once per object.
  caf::expected<uint16_t> start(const std::string& name, const std::string& host, uint16_t port,
                                serve_fn serve, log_fn log);

  /// Ends the serving promise and joins the thread. From any thread but the server's own.
  void stop();

 private:
  std::mutex mu_;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> stop_;
  std::thread thread_;
};

/// One accepted connection: a two-party RPC system serving `bootstrap` on it, its stream
/// followed by a `frame_watch`. `timer` must outlive it.
struct rpc_connection {
  kj::Own<frame_watch> io;
  capnp::TwoPartyVatNetwork network;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpc;

  rpc_connection(kj::Own<kj::AsyncIoStream>&& s, kj::Timer& timer,
                 capnp::Capability::Client bootstrap, capnp::ReaderOptions opts = {})
      : io(kj::heap<frame_watch>(kj::mv(s), timer)),
        network(*io, capnp::rpc::twoparty::Side::SERVER, opts),
        rpc(capnp::makeRpcServer(network, kj::mv(bootstrap))) {}
};

/// What one listening port lets its callers hold (issue #11: idle connections, and answers
/// piled up for a client that never reads them, each took a node's memory without bound).
struct port_limits {
  /// Connections open at once, TLS handshakes under way included; past it a new one is closed
  /// at once (and logged, at most once a second).
  size_t connections = 1024;
  /// Connections open at once from one remote address (the IP, whatever the port).
  size_t per_address = 256;
  /// Bytes of answers queued for a connection that does not read them; past it the connection
  /// is closed (checked every 100 ms).
  size_t max_unread = 16u << 20;
  /// SO_SNDBUF of each accepted socket (before any TLS); 0: the system's.
  int send_buffer = 0;
  /// How long a message may stay begun and unfinished (a truncated frame) before the connection
  /// is closed. A connection idle between messages is not affected.
  kj::Duration frame_timeout = 30 * kj::SECONDS;
};

/// What a server does with a connection once it is accepted (and, with TLS, its handshake is
/// done): the stream and who is at the other end (a `kj::TlsPeerIdentity` under TLS).
using on_connection = std::function<void(kj::AuthenticatedStream&&)>;

/// Accepts connections on `listener` for as long as the promise lives, handing each to
/// `on_accept`. A failed accept (out of file descriptors, a connection reset before it was
/// accepted) never ends the loop: it is reported to `log` (when set) once per run of failures,
/// and accepting resumes after a pause of 10 ms doubling to 1 s, so the port comes back by itself
/// once descriptors are free again. `listener`, `timer` and `on_accept` must outlive the promise.
kj::Promise<void> accept_retrying(kj::ConnectionReceiver& listener, kj::Timer& timer,
                                  on_connection on_accept, server_thread::log_fn log,
                                  const std::string& name);

/// As `accept_retrying`; with `tls`, each accepted connection first runs its TLS handshake, on its
/// own in `tasks` (a client that never finishes it is dropped after `handshake_timeout` and holds
/// up nobody), and reaches `on_ready` only once it succeeded. Failed handshakes are logged at
/// most once a second, with their count. `tls`, `timer` and `tasks` must outlive the promise.
kj::Promise<void> accept_secured(kj::ConnectionReceiver& listener, kj::Timer& timer,
                                 kj::TlsContext* tls, kj::TaskSet& tasks, on_connection on_ready,
                                 server_thread::log_fn log, const std::string& name,
                                 port_limits limits = {});

/// Resolves when `c` disconnects; fails once more than `limits.max_unread` bytes of its outgoing
/// messages are queued, or once a message has been begun and not finished for
/// `limits.frame_timeout`, so that the task holding `c` ends and closes it. `c` and `timer` must
/// outlive the promise.
kj::Promise<void> until_gone(rpc_connection& c, kj::Timer& timer, const port_limits& limits);

/// Serves every connection `accept_secured` hands over with the capability `bootstrap` makes for
/// it (from who is at the other end), each kept in `tasks` until it disconnects. `reader` bounds
/// what one message may hold (a message over its traversal limit ends the connection; Cap'n
/// Proto's default is 64 MiB, which a hostile caller can make a node hold per connection).
kj::Promise<void> accept_forever(
    kj::ConnectionReceiver& listener, kj::Timer& timer, kj::TlsContext* tls,
    std::function<capnp::Capability::Client(kj::Own<kj::PeerIdentity>)> bootstrap,
    kj::TaskSet& tasks, server_thread::log_fn log, const std::string& name,
    capnp::ReaderOptions reader, port_limits limits = {});

}  // namespace keel::wire
