#pragma once

// The OpenAI-style endpoints of the HTTP port (actors/http_api.cpp routes to them):
// POST /v1/chat/completions and POST /v1/completions, served as a client of this node's own
// Gateway (a local capability: the same tenant checks, limits, forwarding and metrics as the
// Cap'n Proto port), streamed as server-sent events that a client resumes on any node with
// Last-Event-ID (docs/operations.md, "HTTP API"). Only actors/ includes it.

#include <string>

#include <kj/compat/http.h>

#include "actors/detail/gateway_impl.hpp"
#include "actors/openai.hpp"

namespace keel::detail {

/// The request headers the HTTP port reads, registered in its header table.
struct http_header_ids {
  kj::HttpHeaderId authorization;
  kj::HttpHeaderId last_event_id;
  kj::HttpHeaderId session;  // Keel-Session: the conversation a request continues
};

/// An error answer of the HTTP port: `status` with an OpenAI-style body
/// {"error": {"message", "type", "code"}}; `retry_after_s` > 0 adds Retry-After.
struct http_error {
  unsigned status = 400;
  std::string message;
  std::string code;
  unsigned retry_after_s = 0;
};

/// The status, code and Retry-After an error of the node's API gets over HTTP: badRequest 400,
/// unauthenticated 401, notFound 404, a tenant's limit 429, overloaded 503 (both with
/// Retry-After), disconnected 503, unimplemented 501, failed 500.
http_error http_error_of(const caf::error& err);

/// Sends `e` as the answer to a request.
kj::Promise<void> send_error(kj::HttpService::Response& response, const kj::HttpHeaderTable& table,
                             const http_error& e);

/// Serves one POST of `kind` whose whole body is `body`, as `key`'s tenant (null: the open
/// port). `g`, `table` and `response` must outlive the promise.
kj::Promise<void> serve_openai(gw& g, const kj::HttpHeaderTable& table, const http_header_ids& ids,
                               const api_key* key, openai::endpoint kind,
                               const kj::HttpHeaders& headers, std::string body,
                               kj::HttpService::Response& response);

}  // namespace keel::detail
