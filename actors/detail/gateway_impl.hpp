#pragma once

// The gateway's KJ-thread state and the helpers its files share (gateway.cpp: the client port's
// Gateway, connections, finding sessions; gateway_session.cpp: the Session server and the token
// streams; gateway_forward.cpp: forwarding to the owner node). Only actors/ includes it.

#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/timer.h>
#include <caf/actor.hpp>

#include "actors/gateway.hpp"
#include "actors/metrics.hpp"
#include "actors/session.hpp"
#include "wire/bridge.hpp"
#include "wire/convert.hpp"
#include "wire/keel.capnp.h"
#include "wire/key_gate.hpp"

namespace keel {

namespace detail {

/// One event of a turn's stream, from the relay actor (CAF) to the pump (KJ).
struct stream_event {
  bool done = false;
  uint64_t turn = 0;
  int64_t index = 0;
  int32_t token = 0;
  std::string piece;
  finish_reason reason = finish_reason::length;
  std::string detail;
  int64_t retry_after_ms = 0;
  bool moved = false;  // the session moved to another node: the client reconnects and resumes
};

using event_channel = wire::stream_channel<stream_event>;

/// Retry-after hint for `overloaded` errors that carry none of their own.
constexpr uint32_t default_retry_after_ms = 100;

inline void set_error(const caf::error& err, wire::Error::Builder out) {
  // A request to an actor that timed out means the node is too busy to answer in time.
  if (err.category() == caf::atom("system") &&
      err.code() == static_cast<uint8_t>(caf::sec::request_timeout)) {
    wire::to_wire(make_error(errc::overloaded, "the node did not answer in time"), out,
                  default_retry_after_ms);
    return;
  }
  wire::to_wire(err, out, default_retry_after_ms);
}

inline void fill_info(const session_record& r, size_t model_ctx, wire::SessionInfo::Builder out) {
  uint64_t tokens = 0;
  for (auto& t : r.turns) tokens += t.user.size() + t.generated.size();
  out.setId(r.id);
  out.setTurns(static_cast<uint32_t>(r.turns.size()));
  out.setTokens(tokens);
  out.setPriority(r.priority);
  out.setRunning(!r.turns.empty() && !r.turns.back().done);
  out.setOwner(r.owner);
  out.setModel(r.model);
  out.setModelDigest(r.model_digest);
  out.setContextLength(static_cast<uint32_t>(session_context(r, model_ctx)));
}

/// The outcome a turn request refused with `kind` counts as.
inline request_outcome outcome_of(wire::Error::Kind kind) {
  switch (kind) {
    case wire::Error::Kind::OVERLOADED:
      return request_outcome::overloaded;
    case wire::Error::Kind::DISCONNECTED:
      return request_outcome::disconnected;
    case wire::Error::Kind::FAILED:
      return request_outcome::failed;
    default:  // bad input, an unknown session, no key, unimplemented
      return request_outcome::bad_request;
  }
}

/// The outcome a turn that ended with `why` counts as.
inline request_outcome outcome_of(finish_reason why) {
  switch (why) {
    case finish_reason::eos:
      return request_outcome::eos;
    case finish_reason::length:
      return request_outcome::length;
    case finish_reason::context:
      return request_outcome::context;
    case finish_reason::cancelled:
      return request_outcome::cancelled;
    case finish_reason::overloaded:
      return request_outcome::overloaded;
    case finish_reason::failed:
      break;
    case finish_reason::filtered:
      return request_outcome::filtered;
  }
  return request_outcome::failed;
}

/// A Session capability for session `id` as seen by `key`'s tenant (gateway_session.cpp).
wire::Session::Client session_client(gateway::impl& g, std::string id, const api_key* key);

/// The Gateway of `key`'s tenant (null: the open port's one tenant), logged in already: what
/// the HTTP port serves through, a local capability on the gateway's thread (gateway.cpp).
wire::Gateway::Client gateway_client(gateway::impl& g, const api_key* key);

}  // namespace detail

using namespace detail;

// -- gateway::impl --------------------------------------------------------------------------

/// The gateway's state on its KJ thread. Everything here is used on that thread only, except
/// what is handed to CAF (channels, actor handles, copies of values).
struct gateway::impl : kj::TaskSet::ErrorHandler {
  /// One turn's stream to one client's TokenSink.
  struct stream {
    uint64_t id = 0;
    std::string session;
    std::optional<uint64_t> turn;  // known once the session accepted send or resume
    std::shared_ptr<event_channel> ch;
    turn_sink_actor relay;
    wire::TokenSink::Client sink;
    const api_key* key = nullptr;  // the tenant charged for its tokens (null: the open port)
    int64_t next_index = 0;  // the first index the client has not been sent
    bool quiet = false;      // cut without telling the client (its call failed instead)
    /// The stream of a new turn (send, chat), and when its request came: its outcome and its
    /// first token are counted (node_metrics). Not for `resume`: the turn was counted already.
    std::optional<std::chrono::steady_clock::time_point> requested;
    bool first_sent = false;  // its first token went out
    std::chrono::steady_clock::time_point last_sent;  // when its last token went out
    bool counted = false;     // its outcome was counted
    kj::Own<kj::PromiseFulfiller<void>> cut;

    explicit stream(wire::TokenSink::Client s) : sink(kj::mv(s)) {}
  };

  /// A connection to another node's Gateway, for forwarding (one per address, reused).
  struct upstream {
    kj::Own<kj::AsyncIoStream> io;
    capnp::TwoPartyClient rpc;
    wire::Gateway::Client gateway;

    explicit upstream(kj::Own<kj::AsyncIoStream>&& s)
        : io(kj::mv(s)), rpc(*io), gateway(rpc.bootstrap().castAs<wire::Gateway>()) {}
  };

  impl(caf::actor_system& s, node& n, const gateway_config& c, kj::Timer& t, kj::Network& net)
      : sys(s), nd(n), cfg(c), timer(t), network(net), blocking(64) {
    auto ctx_len = static_cast<size_t>(nd.context()->llm->config().ctx_len);
    buffer = cfg.stream_buffer > 0 ? cfg.stream_buffer : ctx_len + 2;
    reader_options.traversalLimitInWords = cfg.traversal_limit_words;
    reader_options.nestingLimit = cfg.nesting_limit;
  }

  ~impl() { shutdown(); }

  // -- forwarding (gateway_forward.cpp) -------------------------------------------------------

  /// The key of `upstreams`: one connection per node and tenant.
  static std::string upstream_name(const std::string& address, const api_key* key);

  /// The Gateway of node `node` at `address` (another keel-node's client endpoint; under TLS
  /// its certificate must name the node): `key`'s tenant's, logged in with the key (the nodes of
  /// a cluster share their keys file), so that the owner checks the tenant too; its bootstrap
  /// for the open port (`key` null).
  kj::Promise<wire::Gateway::Client> upstream_to(const std::string& address,
                                                 const std::string& node, const api_key* key);

  /// Session `id`, which this node does not hold, from the node that owns it: its `Session`
  /// capability, passed on (Cap'n Proto proxies every call and stream through this node),
  /// asked for as `key`'s tenant.
  kj::Promise<caf::expected<wire::Session::Client>> forward(const std::string& id,
                                                            const api_key* key);

  /// A new session opened on another node (placement, node::place_new_session).
  struct placed {
    std::string id;
    wire::Session::Client session;
  };
  /// Opens a session on `peer` (asked to open it there, not to place it again) as `key`'s
  /// tenant, and passes its `Session` on. Any failure (the peer went down, refused, is over a
  /// limit) is an error: the caller opens the session here instead.
  kj::Promise<caf::expected<placed>> open_on(const placement_candidate& peer,
                                             const sampling_params& params, int32_t priority,
                                             const api_key* key);

  void log(const std::string& line) {
    if (cfg.log) cfg.log(line);
  }

  // -- tenants ------------------------------------------------------------------------------

  /// Counts a request of `key`'s tenant (nothing on the open port): the refusal when it is
  /// over its requests per minute.
  caf::error admit(const api_key* key) { return key ? usage.request(*key) : caf::error{}; }

  /// Answers `err` (a tenant's limit) with its retry-after.
  kj::Promise<void> refuse(const caf::error& err, wire::Error::Builder out) {
    wire::to_wire(err, out, usage.retry_after_ms());
    return kj::READY_NOW;
  }

  void taskFailed(kj::Exception&& e) override {
    log("gateway: " + std::string(e.getDescription().cStr()));
  }

  // -- connections (gateway.cpp) --------------------------------------------------------------

  kj::Promise<void> accept_loop(kj::ConnectionReceiver& listener, capnp::Capability::Client main);

  // -- streams (gateway_session.cpp) ----------------------------------------------------------

  /// Makes a stream into `sink` and starts pumping it; the session is told of its relay by the
  /// caller. The stream lives until its turn is done, it is cut off, or the gateway stops.
  stream& open_stream(const std::string& session, wire::TokenSink::Client sink,
                      const api_key* key);

  /// The session accepted the stream for `turn`: an older stream of the same turn no longer
  /// receives anything (the session sends to one sink per turn), so it is cut off.
  void bind(uint64_t id, uint64_t turn);

  void cut(uint64_t id, kj::Exception&& why, bool quiet = false);

  kj::Promise<void> pump(stream& s);

  kj::Promise<void> send_token(stream& s, const stream_event& e);

  kj::Promise<void> send_done(stream& s, const stream_event& e);

  kj::Duration stall() const { return cfg.stall_timeout.count() * kj::MILLISECONDS; }

  /// `p`, or an OVERLOADED exception ("the client <what> for N ms") after the stall timeout.
  kj::Promise<void> within_stall_timeout(kj::Promise<void> p, const char* what);

  /// The end of a stream: delivered (`err` null), cut off, or its client is gone. The turn is
  /// never cancelled here: it keeps generating and keeps its tokens for `resume`.
  void finish(uint64_t id, kj::Exception* err);

  /// Cuts every stream off (their turns go on). KJ thread.
  void shutdown();

  // -- the node (gateway.cpp) -----------------------------------------------------------------

  /// The current actor of session `id`: `not_found` for an unknown id, `overloaded` while the
  /// session is being restarted.
  kj::Promise<caf::expected<session_actor>> find_session(const std::string& id);

  kj::Promise<caf::expected<session_record>> get_record(const session_actor& session);

  caf::actor_system& sys;
  node& nd;
  const gateway_config& cfg;
  kj::Timer& timer;
  kj::Network& network;
  // Before every connection that may use it: destroyed after them.
  kj::Own<kj::TlsContext> tls = cfg.tls ? cfg.tls->context(false) : kj::Own<kj::TlsContext>();
  std::map<std::string, kj::Own<upstream>> upstreams;  // by address (and tenant)
  tenant_usage usage;                                  // each tenant's limits on this node
  wire::refusal_pacer refusals{timer};                 // wrong API keys
  wire::blocking_worker blocking;  // node::open_session blocks (scoped_actor)
  capnp::ReaderOptions reader_options;
  size_t buffer = 0;
  uint64_t next_stream = 0;
  std::map<uint64_t, kj::Own<stream>> streams;
  std::map<std::pair<std::string, uint64_t>, uint64_t> by_turn;
  kj::TaskSet tasks{*this};  // last: destroyed first, it references the rest
};

namespace detail {

using gw = gateway::impl;

}  // namespace detail

}  // namespace keel
