#pragma once

// The gateway's HTTP port (keel-node --http-listen): kj-http on the gateway's KJ thread.
//
//   GET /health     200 "ok" while the process serves at all
//   GET /ready      200 "ready", or 503 with the first reason it is not (readiness_problem)
//   GET /metrics    Prometheus text exposition 0.0.4 (docs/operations.md, "Metrics")
//   GET /v1/models  {"object":"list","data":[{"id":...,"object":"model","owned_by":"keel"}]}
//
// Anything else: 404, 405 (with Allow) or 413, each with an OpenAI-style error body
// {"error":{"message","type","code"}}. Only actors/gateway.cpp includes this.

#include <string>

#include <kj/async-io.h>

#include "actors/detail/gateway_impl.hpp"

namespace keel {

/// Why node `n` should not get traffic now, "" when it should: its root supervisor gave up, it
/// drains, its engine or batcher is between restarts, or (with peers) fewer peer links are up
/// than a session's group needs for a majority with this node (group_size / 2). The last is
/// necessary for acknowledging writes, not sufficient: a group whose members are other peers
/// than the live ones still cannot. Reads the node's tables only (mutexes, no actor).
std::string readiness_problem(node& n);

/// The model's id on the HTTP port (GET /v1/models, a request's `model`): its file's name.
std::string served_model(node& n);

/// The metrics of `n` in Prometheus's text format; `stats` are the batcher's figures (null while
/// it restarts: queue and KV gauges are left out).
std::string render_metrics(node& n, const batcher_stats* stats);

/// Serves HTTP on `listener` for as long as the promise lives, through `g`'s accept loop (its
/// TLS, and `limits` on connections). `g` and `cfg` must outlive the promise.
kj::Promise<void> serve_http(gateway::impl& g, const http_config& cfg,
                             kj::Own<kj::ConnectionReceiver> listener, wire::port_limits limits);

}  // namespace keel
