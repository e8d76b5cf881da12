#pragma once

// TLS on Keel's three ports (client, peer, admin), through kj-tls and OpenSSL (issue #11).
//
// A cluster has one CA. Each node holds a certificate signed by it whose common name is the
// node's name (`--name`) and whose subjectAltName lists that name (DNS:NAME) and any host names
// clients reach the node by. On the peer port both
// sides present certificates: the caller checks that the callee's names the peer it meant to
// reach, and the callee checks that every call's `from` is a configured peer and is named by the
// caller's certificate. On the client and admin ports only the server presents one; clients
// check it against the name they were given (`--tls-name`, by default the endpoint's host).

#include <chrono>
#include <memory>
#include <string>

#include <caf/expected.hpp>
#include <kj/async-io.h>
#include <kj/compat/tls.h>

namespace keel::wire {

/// The PEM files a node or a client is given. `cert` and `key` go together (a server needs them;
/// a client presents them when the server asks); `ca` is the only certificate trusted.
struct tls_files {
  std::string cert;  // --tls-cert
  std::string key;   // --tls-key
  std::string ca;    // --tls-ca
};

/// TLS material read once (at start, from `main`) and checked; shared by every thread that makes
/// connections, each of which makes its own `context` for its own event loop. Immutable.
class tls_config {
 public:
  /// Reads and checks the files: a missing or unreadable file, a file with no certificate or no
  /// key, or a key that does not match the certificate is an error naming the flag and the path
  /// ("--tls-key /etc/keel/a.key: ..."). `ca` is required; `cert` and `key` go together.
  static caf::expected<std::shared_ptr<const tls_config>> load(const tls_files& files);

  /// Whether this side has a certificate of its own to present.
  bool has_keypair() const { return !cert_pem_.empty(); }
  const tls_files& files() const { return files_; }

  /// A TLS context for the calling thread's event loop, trusting only the CA. `verify_clients`:
  /// as a server, refuse a client that presents no certificate signed by the CA (the peer port).
  kj::Own<kj::TlsContext> context(bool verify_clients) const;

 private:
  tls_files files_;
  std::string cert_pem_, key_pem_, ca_pem_;
};

/// How long a connection may take to finish its TLS handshake before it is closed: a peer that
/// opens connections and never speaks holds nothing for longer.
inline constexpr std::chrono::milliseconds handshake_timeout{10000};

/// The server side of an accepted connection: with `tls`, the TLS handshake (failing after
/// `handshake_timeout`), its identity then being a `kj::TlsPeerIdentity`; without, `s` as it is.
/// `tls` and `timer` must outlive the promise.
kj::Promise<kj::AuthenticatedStream> secure_accepted(kj::TlsContext* tls, kj::Timer& timer,
                                                     kj::AuthenticatedStream s);

/// Connects to "HOST:PORT" on `network`; with `tls`, then runs the handshake as a client and
/// checks that the server's certificate names `server_name` (the HOST when empty). Fails within
/// `timeout`. `tls`, `network` and `timer` must outlive the promise.
kj::Promise<kj::AuthenticatedStream> connect_to(kj::Network& network, kj::Timer& timer,
                                                kj::TlsContext* tls, const std::string& address,
                                                const std::string& server_name,
                                                std::chrono::milliseconds timeout);

/// Whether `id`, the identity of a connection, is a TLS certificate (checked against the CA in
/// the handshake) whose common name is `name`.
bool certified_as(kj::PeerIdentity& id, const std::string& name);

/// The host of "HOST:PORT" (brackets of "[::1]:7000" removed).
std::string host_of(const std::string& address);

}  // namespace keel::wire
