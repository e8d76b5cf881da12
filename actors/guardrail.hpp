#pragma once

// The guardrail (issue #14, "Guardrails that cannot take the service down"): an optional
// moderation stage on prompts and on generated text, run as a supervised actor with a bulkhead of
// its own (its own thread, a bounded number of pending checks), a deadline per check, and a
// per-deployment policy when it is slow, busy or down: fail open (the turn goes on; the event is
// logged and counted) or fail closed (the turn is refused with a classified error).
// docs/actors.md, "Guardrails".

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <regex>
#include <string>
#include <string_view>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_addr.hpp>
#include <caf/actor_cast.hpp>
#include <caf/expected.hpp>
#include <caf/typed_actor.hpp>

#include "actors/atoms.hpp"
#include "actors/supervisor.hpp"
#include "base/error.hpp"

namespace keel {

/// What a check looks at: a turn's input (a `send`'s text, a chat turn's messages) or the reply
/// generated so far.
enum class guard_stage : uint8_t { prompt, output };

/// A filter's answer. `rule`: what matched, for the log and the client ("rule 3" of a rules
/// file); empty when allowed.
struct guard_verdict {
  bool allowed = true;
  std::string rule;
};

/// A moderation filter. The rule-based one below ships; a model-based one implements the same
/// interface. `check` runs on the guardrail actor's own thread and may block: the callers'
/// deadline, not the filter, bounds how long a turn waits. An exception fails the actor, whose
/// supervisor restarts it (with backoff).
class guard_filter {
 public:
  virtual ~guard_filter() = default;
  virtual guard_verdict check(guard_stage stage, std::string_view text) = 0;
};

/// Patterns from a file, one per line, matched case-insensitively:
///   `word or phrase`          the text contains it (ASCII case folded)
///   `re: REGEX`               an ECMAScript regular expression matches part of the text
///   `prompt: ...`, `output: ...`  the rule applies to that stage only (before `re:`)
/// Blank lines and lines starting with `#` are ignored. A rule's name is its line ("rule 3").
class rule_filter final : public guard_filter {
 public:
  /// `bad_request` naming the file, the line and why (an empty pattern, a regex that does not
  /// compile), or the file that cannot be read.
  static caf::expected<std::unique_ptr<rule_filter>> load(const std::string& path);
  static caf::expected<std::unique_ptr<rule_filter>> parse(const std::string& text,
                                                           const std::string& origin);
  guard_verdict check(guard_stage stage, std::string_view text) override;
  size_t size() const { return rules_.size(); }

 private:
  struct rule {
    int line = 0;
    bool prompt = true, output = true;
    std::string needle;           // lower case; empty for a regex
    std::optional<std::regex> re;
  };
  std::vector<rule> rules_;
};

enum class guard_failure : uint8_t {
  open,    // a check that cannot be had in time lets the turn go on (logged, counted)
  closed,  // ... refuses the turn (`overloaded`, with a retry-after) or stops its reply
};

struct guard_config {
  /// Makes the filter, at each (re)start of the guardrail actor; empty: no guardrail.
  std::function<caf::expected<std::unique_ptr<guard_filter>>()> make;
  /// How long a turn waits for a check.
  std::chrono::milliseconds deadline{250};
  guard_failure on_failure = guard_failure::open;
  /// Checks that may wait for the guardrail at once (its bulkhead); beyond, a check counts as
  /// failed at once (the policy decides), so a stalled filter never piles up work.
  int32_t max_pending = 64;
  /// The reply is checked every this many tokens (and the last part at the turn's end).
  int32_t output_every = 16;
  /// Where the filter came from, for the log ("rules.txt (12 rules)").
  std::string origin;
};

/// The guardrail actor: `(check_atom, guard_stage, std::string) -> guard_verdict`.
using guard_actor = caf::typed_actor<
    caf::replies_to<check_atom, guard_stage, std::string>::with<guard_verdict>>;

/// How a check ended, as the caller acts on it.
enum class guard_outcome : uint8_t {
  allowed,
  denied,       // the filter matched a rule
  failed_open,  // no answer in time (slow, busy, down): the policy lets the turn go on
  failed_closed,  // the same, and the policy refuses the turn
};

/// The node's guardrail as callers see it: its configuration, the current actor (set by its
/// supervisor at each start), the bulkhead's count and the counters for GET /metrics.
/// Thread-safe.
class guardrail {
 public:
  explicit guardrail(guard_config cfg) : cfg_(std::move(cfg)) {}
  const guard_config& config() const { return cfg_; }
  bool enabled() const { return static_cast<bool>(cfg_.make); }

  guard_actor current() const {
    std::lock_guard<std::mutex> g(mu_);
    return caf::actor_cast<guard_actor>(actor_);
  }
  void set_current(const caf::actor& a) {
    std::lock_guard<std::mutex> g(mu_);
    actor_ = a.address();
  }

  /// A check is about to be sent: false when `max_pending` wait already (the caller then
  /// fails the check without sending it).
  bool enter();
  /// The actor handled one check (or started afresh: `reset`).
  void leave() { pending_.fetch_sub(1, std::memory_order_relaxed); }
  void reset() { pending_.store(0, std::memory_order_relaxed); }

  /// Counts `o` and returns it; failures are also logged (at most once a second).
  guard_outcome count(guard_outcome o, guard_stage stage, const std::string& why,
                      const std::function<void(const std::string&)>& log);
  /// What failed checks become under the policy.
  guard_outcome failure() const {
    return cfg_.on_failure == guard_failure::open ? guard_outcome::failed_open
                                                  : guard_outcome::failed_closed;
  }
  uint64_t counted(guard_outcome o) const {
    return counts_[static_cast<size_t>(o)].load(std::memory_order_relaxed);
  }

 private:
  guard_config cfg_;
  mutable std::mutex mu_;
  caf::actor_addr actor_;
  std::atomic<int32_t> pending_{0};
  std::atomic<uint64_t> counts_[4] = {};
  std::atomic<int64_t> last_logged_ns_{0};
};

/// The `guard` child: the guardrail actor, detached (its own thread: the bulkhead), which makes
/// its filter when it starts (a filter that cannot be made fails the start, and the supervisor
/// retries with backoff).
child_spec guard_spec(std::shared_ptr<guardrail> g);

/// Supervisor flags for the guardrail's own supervisor: restarts back off from 100 ms to 5 s,
/// and a crash-looping filter (at most one restart in 5 s) never exhausts them, so it never
/// escalates to the node.
supervisor_flags guard_flags();

/// Asks the guardrail about `text` from actor `self`, within the deadline, and calls `done`
/// with the outcome on `self` (no guardrail: `allowed` at once). `log` gets failures.
template <class Self, class Done>
void guard_check(Self* self, const std::shared_ptr<guardrail>& g, guard_stage stage,
                 std::string text, std::function<void(const std::string&)> log, Done done) {
  if (!g || !g->enabled()) {
    done(guard_outcome::allowed, std::string());
    return;
  }
  auto a = g->current();
  if (!a) {
    done(g->count(g->failure(), stage, "the guardrail is down (restarting)", log),
         std::string());
    return;
  }
  if (!g->enter()) {
    done(g->count(g->failure(), stage,
                  "the guardrail is busy (" + std::to_string(g->config().max_pending) +
                      " checks wait)",
                  log),
         std::string());
    return;
  }
  self->request(a, g->config().deadline, check_atom::value, stage, std::move(text))
      .then(
          [g, stage, log, done](guard_verdict& v) {
            auto o = v.allowed ? guard_outcome::allowed : guard_outcome::denied;
            done(g->count(o, stage, std::string(), log), v.rule);
          },
          [g, stage, log, done](caf::error& e) {
            done(g->count(g->failure(), stage, "the guardrail did not answer: " + describe(e), log),
                 std::string());
          });
}

}  // namespace keel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::guard_stage)
CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::guard_verdict)
