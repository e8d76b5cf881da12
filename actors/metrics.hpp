#pragma once

// What a node counts for its operators (GET /metrics, docs/operations.md "Metrics"): plain
// atomics that the gateway, the batcher and the ownership code bump on their own threads, and
// that the HTTP endpoint reads without a lock or a message.

#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "actors/load.hpp"

namespace keel {

/// How a client's turn request ended, as the gateway saw it (`keel_requests_total{outcome}`).
enum class request_outcome : uint8_t {
  eos,           // the model ended the reply
  length,        // max_tokens reached
  context,       // the context is full
  cancelled,     // Session.cancel
  overloaded,    // refused or shed with `overloaded` (admission, limits, a full disk)
  failed,        // the turn failed (a bug or a bad model state)
  filtered,      // the guardrail refused the prompt or stopped the reply
  moved,         // the session moved to another node mid-turn (the client resumes there)
  cut_off,       // the client did not drain its stream, or went away (the turn goes on)
  bad_request,   // refused before it started: bad input, unknown session, no key
  disconnected,  // refused before it started: no majority of its group, timeout
  count_,        // the number of outcomes (not one)
};

/// The label value of `x` ("eos", "cut_off", ...).
std::string_view to_label(request_outcome x);

/// A histogram with fixed bucket bounds in seconds, as Prometheus's: each observation counts in
/// the first bucket whose bound it does not exceed (and in +Inf). Lock-free; observations from
/// several threads may be seen half-counted by a concurrent reader (each bucket and the sum are
/// exact eventually), which the exposition format tolerates.
class latency_histogram {
 public:
  static constexpr std::array<double, 12> bounds = {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                                    0.1,   0.25,   0.5,   1.0,  2.5,   10.0};

  void observe(std::chrono::nanoseconds d) {
    auto s = std::chrono::duration<double>(d).count();
    size_t i = 0;
    while (i < bounds.size() && s > bounds[i]) ++i;
    buckets_[i].fetch_add(1, std::memory_order_relaxed);  // i == bounds.size(): only +Inf
    sum_ns_.fetch_add(static_cast<uint64_t>(d.count() < 0 ? 0 : d.count()),
                      std::memory_order_relaxed);
  }
  /// Observations in bucket `i` alone (not cumulative); `i == bounds.size()`: above every bound.
  uint64_t bucket(size_t i) const { return buckets_[i].load(std::memory_order_relaxed); }
  double sum_seconds() const { return static_cast<double>(sum_ns_.load()) / 1e9; }

 private:
  std::array<std::atomic<uint64_t>, bounds.size() + 1> buckets_{};
  std::atomic<uint64_t> sum_ns_{0};
};

/// One node's counters. Shared (node_context::metrics) by everything that counts; lives as long
/// as the node. Every member is safe to touch from any thread.
struct node_metrics {
  std::array<std::atomic<uint64_t>, static_cast<size_t>(request_outcome::count_)> requests{};
  /// Prompt tokens of the turns the gateway started (send and chat).
  std::atomic<uint64_t> prompt_tokens{0};
  /// Tokens the batcher generated (every session, whichever client asked).
  std::atomic<uint64_t> generated_tokens{0};
  /// Sessions this node started serving from its group's copy: a takeover from another node, or
  /// its own taken back after a restart.
  std::atomic<uint64_t> takeovers{0};
  /// New sessions opened with a shorter context under load (the degradation policy).
  std::atomic<uint64_t> sessions_degraded{0};
  /// Sessions whose copy this node keeps for their owner (with peers).
  std::atomic<uint64_t> sessions_replicated{0};
  /// From a turn's request reaching the gateway to its first token leaving it.
  latency_histogram time_to_first_token;
  /// Between two tokens of a new turn's stream leaving the gateway.
  latency_histogram inter_token;
  /// From a new turn or a turn's end submitted to the session's group to a majority's
  /// acknowledgement (nodes with peers).
  latency_histogram acknowledgement;
  /// The batcher's load, published by it after every change (heartbeats, placement, takeovers).
  load_gauge load;

  void count(request_outcome x) {
    requests[static_cast<size_t>(x)].fetch_add(1, std::memory_order_relaxed);
  }
};

}  // namespace keel
