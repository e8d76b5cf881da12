#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/expected.hpp>

#include "actors/node.hpp"
#include "actors/tenants.hpp"
#include "wire/server_thread.hpp"

namespace keel {

/// The gateway's HTTP listener (keel-node --http-listen; actors/http_api.hpp): health and
/// readiness probes, Prometheus metrics and the OpenAI-style model list, served by kj-http on
/// the gateway's own KJ thread.
struct http_config {
  std::string host = "127.0.0.1";
  uint16_t port = 0;  // 0: an ephemeral port (see gateway::http_port)
  /// A request whose body is longer gets 413: room for a turn's 1 MiB of text (max_text_bytes)
  /// written as JSON.
  size_t max_body_bytes = 4 << 20;
  /// From the head's end to the body's end; a slower body ends its connection.
  kj::Duration body_timeout = 30 * kj::SECONDS;
  /// From a connection's opening (or a request's first byte) to its whole header; a client
  /// slower than this is disconnected (kj-http's own bound: 128 KiB of header).
  kj::Duration header_timeout = 10 * kj::SECONDS;
  /// How long a kept-alive connection may stay idle between requests before it is closed.
  kj::Duration idle_timeout = 5 * kj::SECONDS;
};

struct gateway_config {
  std::string host = "127.0.0.1";
  uint16_t port = 0;   // 0: an ephemeral port (see gateway::port)
  std::string region;  // reported in NodeInfo
  /// A stream whose client does not drain it (the next token cannot be sent: Cap'n Proto's
  /// flow-control window is full) for this long is cut off: its sink is dropped, its turn keeps
  /// generating and keeps every token for `resume`.
  std::chrono::milliseconds stall_timeout{10000};
  /// Tokens buffered per stream between the session actor and the KJ thread; a client that
  /// falls this far behind is cut off too. 0: the model's context length (so that a `resume`
  /// replaying a whole turn always fits).
  size_t stream_buffer = 0;
  /// SO_SNDBUF of each accepted connection. Cap'n Proto's stream window is the socket's send
  /// buffer, so this bounds the bytes of tokens in flight to one client (and the time until a
  /// client that stops reading is noticed). 0: the kernel's autotuning (windows of megabytes).
  int socket_send_buffer = 32 << 10;
  /// The longest `text` a `send` accepts, in bytes; longer ones get `badRequest`.
  size_t max_text_bytes = 1 << 20;
  /// Cap'n Proto ReaderOptions of incoming messages: words traversed per message (bounds the
  /// size of one request) and pointer nesting depth (keel.capnp nests three deep).
  uint64_t traversal_limit_words = 1 << 19;  // 4 MiB
  int nesting_limit = 16;
  /// Connections at once (all, and per remote address) and answers left unread, past which a
  /// connection is closed (wire/server_thread.hpp).
  wire::port_limits limits;
  /// Timeout of each request the gateway makes to the node's actors.
  std::chrono::milliseconds call_timeout{10000};
  /// The API keys (keel-node --keys). Null: the port serves anyone as one tenant ("") and
  /// `login` is not needed. Otherwise every bootstrap call but `login` is refused with
  /// `unauthenticated`, and a key's Gateway sees and opens only its tenant's sessions, within
  /// its limits (docs/operations.md, "Security model").
  std::shared_ptr<const key_table> keys;
  /// Where the gateway reports connections refused, streams cut off and calls that failed with an
  /// exception (one line each, no newline); empty: silent. Called on the gateway's thread.
  std::function<void(const std::string&)> log;
  /// TLS (wire/tls.hpp): when set, the port speaks only TLS with this node's certificate, and
  /// requests forwarded to another node go over TLS to a gateway whose certificate names it.
  std::shared_ptr<const wire::tls_config> tls;
  /// The HTTP listener (with TLS above: HTTPS), on the same thread and with the same `limits`
  /// on connections (counted apart from the Cap'n Proto port's); none: no HTTP port.
  std::optional<http_config> http;
};

/// The Cap'n Proto server of one node: serves `Gateway` (wire/keel.capnp) on HOST:PORT for the
/// node's sessions. It runs its own thread with a KJ event loop; it reaches the actors by
/// messages and gets their answers through cross-thread fulfillers (wire/bridge.hpp), so
/// neither side ever blocks the other.
///
/// Every stream of tokens to a client has its own bounded buffer and Cap'n Proto's `-> stream`
/// flow control, so a slow client slows only itself; one that stops reading is cut off after
/// `stall_timeout`. A client that disconnects, sends a malformed message, or makes a call fail
/// loses its own connection or call only: the node and its turns go on. Errors cross the wire
/// classified (`Error.kind`).
///
/// `node` must outlive the gateway. Start and stop from any thread but the gateway's own.
class gateway {
 public:
  static caf::expected<std::unique_ptr<gateway>> start(caf::actor_system& sys, node& n,
                                                       gateway_config cfg);
  ~gateway();
  gateway(const gateway&) = delete;
  gateway& operator=(const gateway&) = delete;

  /// The bound port (the ephemeral one when the configuration asked for 0).
  uint16_t port() const { return port_; }
  /// "HOST:PORT" with the bound port.
  std::string address() const;
  /// The HTTP listener's bound port (0 without `gateway_config::http`), and "HOST:PORT".
  uint16_t http_port() const { return http_port_; }
  std::string http_address() const;
  const gateway_config& config() const { return cfg_; }

  /// Stops serving: closes the listener and every connection, cuts every stream off (turns go
  /// on), and joins the thread. Also done by the destructor.
  void stop();

  struct impl;  // the state of the KJ thread (actors/detail/gateway_impl.hpp)

 private:
  gateway() = default;

  gateway_config cfg_;
  uint16_t port_ = 0;
  uint16_t http_port_ = 0;  // written on the server's thread before `start` returns
  std::unique_ptr<wire::server_thread> server_;
};

}  // namespace keel
