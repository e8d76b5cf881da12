#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/allowed_unsafe_message_type.hpp>
#include <caf/expected.hpp>
#include <caf/message.hpp>
#include <caf/replies_to.hpp>
#include <caf/timespan.hpp>
#include <caf/typed_actor.hpp>

#include "actors/atoms.hpp"

namespace keel {

/// When a child that exits is started again (OTP's restart types).
enum class restart_type : uint8_t {
  permanent,  // always
  transient,  // only after an abnormal exit
  temporary,  // never
};

/// Which children a failure restarts (OTP's strategies).
enum class restart_strategy : uint8_t {
  one_for_one,         // only the failed child
  one_for_all,         // all children: stop the rest in reverse order, start all in order
  rest_for_one,        // the failed child and those started after it
  simple_one_for_one,  // one_for_one over children added at run time from a single template spec
};

const char* to_string(restart_strategy x);
const char* to_string(restart_type x);

/// How a child is stopped.
struct shutdown_policy {
  bool brutal = false;  // kill at once
  /// Otherwise: exit(user_shutdown), wait up to this long for the child to exit, then kill.
  /// `infinite` waits for as long as the child takes (used for nested supervisors).
  caf::timespan timeout = std::chrono::seconds(5);

  static constexpr caf::timespan infinite = caf::timespan::max();
};

/// Starts a child. `path` is the child's full path ("node/engine/shard-0"); `args` are the
/// arguments given to a simple_one_for_one start request (empty for static children). Returns
/// the new actor, not yet linked or monitored (the supervisor does that), or an error, which the
/// supervisor treats as a failure of the child.
using child_factory = std::function<caf::expected<caf::actor>(
    caf::actor_system& sys, const std::string& path, const caf::message& args)>;

struct child_spec {
  std::string id;  // unique among the siblings; the last segment of the child's path
  child_factory start;
  restart_type restart = restart_type::permanent;
  shutdown_policy shutdown;
  /// What the child is, for the admin shell: "supervisor" for nested supervisors (they answer
  /// `list_atom`, so their children can be listed in turn); "" when the spec does not say.
  std::string kind;
};

/// Delay before a restart: initial * multiplier^(n-1) for the n-th consecutive restart of a
/// child, capped at max, with +-jitter (a fraction) drawn from a generator seeded with `seed`.
/// initial = 0 restarts at once.
struct backoff_policy {
  caf::timespan initial{0};
  caf::timespan max = std::chrono::seconds(1);
  double multiplier = 2.0;
  double jitter = 0.2;
  uint64_t seed = 0;
};

/// The delay before the n-th consecutive restart (n >= 1) under `p`: the capped exponential
/// times (1 + u * jitter) with u uniform in [-1, 1), clamped to [0, p.max]. `state` is the
/// generator's state: start it at `p.seed`; each call advances it, so a seed fixes the sequence.
/// Returns 0 when `p.initial` is 0.
caf::timespan backoff_delay(const backoff_policy& p, int32_t n, uint64_t& state);

struct supervisor_flags {
  restart_strategy strategy = restart_strategy::one_for_one;
  /// More than `intensity` restarts within `period` make the supervisor give up: it stops its
  /// children in reverse order and exits with the last failure's reason (escalation).
  int32_t intensity = 3;
  caf::timespan period = std::chrono::seconds(5);
  backoff_policy backoff;
  /// simple_one_for_one only: a child that failed `park_after` times within `period` is parked
  /// instead of restarted (removed, recorded as `parked`, and `on_parked` told), and its failures
  /// do not count toward `intensity`: one poison child (a session whose data crashes it) never
  /// takes its supervisor, and every other child, down. 0: off.
  int32_t park_after = 0;
  /// Called in the supervisor with the child's id and its last failure when it is parked.
  std::function<void(const std::string& id, const std::string& reason)> on_parked;
};

/// Flags with `strategy`, more than `intensity` restarts within `period` escalating, children
/// parked after `park_after` failures (0: never); the rest as by default.
inline supervisor_flags make_flags(restart_strategy strategy, int32_t intensity,
                                   caf::timespan period, int32_t park_after = 0) {
  supervisor_flags f;
  f.strategy = strategy;
  f.intensity = intensity;
  f.period = period;
  f.park_after = park_after;
  return f;
}

enum class supervision_event_kind : uint8_t {
  started,    // a child started (first time)
  exited,     // a child exited (normally or not)
  restarted,  // a child was started again after an exit
  escalated,  // the supervisor exceeded its intensity and exits to its parent
  stopped,    // a child was stopped on request or during shutdown
  parked,     // a child failed `park_after` times within `period` and is not restarted
};

const char* to_string(supervision_event_kind x);

struct supervision_event {
  supervision_event_kind kind;
  std::string path;    // the child's path, or the supervisor's own for `escalated`
  std::string reason;  // exit reason as text ("" for normal)
  std::chrono::system_clock::time_point when;
  int32_t restarts = 0;  // the child's restart count after this event
};

/// Thread-safe record of what the supervisors did: one log line per event to `sink` (stderr when
/// none is given) and counters by path, for the admin shell. Created by main() (or a test) and
/// shared by every supervisor of a node.
class supervision_log {
 public:
  using sink_fn = std::function<void(const std::string& line)>;
  /// A sink that keeps the structure (keel-node --log-format json): each event with its line,
  /// and each `report`ed line with a null event.
  using event_sink_fn = std::function<void(const supervision_event* e, const std::string& line)>;

  explicit supervision_log(sink_fn sink = {});
  explicit supervision_log(event_sink_fn sink);

  void record(supervision_event e);

  /// Writes `line` to the sink (stderr when none) without recording an event: what the node
  /// found while recovering, e.g. a corrupt record it skipped.
  void report(const std::string& line);

  std::vector<supervision_event> events() const;
  /// How often the child at `path` was restarted.
  int32_t restarts(const std::string& path) const;
  /// How many events of `kind` were recorded for `path`.
  int32_t count(supervision_event_kind kind, const std::string& path) const;
  /// Restarts so far by child path, for every path restarted at least once.
  std::map<std::string, uint64_t> restarts_by_path() const;

 private:
  mutable std::mutex mu_;
  sink_fn sink_;
  event_sink_fn event_sink_;  // set instead of sink_
  std::vector<supervision_event> events_;
};

/// A child as reported by `list_atom`.
struct child_info {
  std::string id;
  std::string path;
  caf::actor handle;  // invalid while not running
  int32_t restarts = 0;
  std::string last_failure;  // "" when it never failed
  std::string kind;          // the spec's kind
};

/// What a supervisor tells its observers (`subscribe_atom`): `(started_atom, std::string id,
/// caf::actor child)` now for every running child and on every later start and restart.
using supervision_observer_actor =
    caf::typed_actor<caf::reacts_to<started_atom, std::string, caf::actor>>;

/// A supervisor's messages:
/// - `(get_atom, std::string id) -> caf::actor`: the child's current handle (invalid if not
///   running). Handles change on restart: hold the supervisor, or subscribe.
/// - `(start_atom, std::string id, caf::message args) -> caf::actor`: simple_one_for_one only:
///   starts a child from the template spec (children[0]) with `args`; `id` must be new.
/// - `(restart_atom, std::string id) -> bool`: stops the child and starts it again (a manual
///   restart: counted as a restart, not towards the intensity).
/// - `(stop_atom, std::string id) -> bool`: stops the child for good (a simple_one_for_one child
///   is removed).
/// - `(list_atom) -> std::vector<child_info>`.
/// - `(subscribe_atom, supervision_observer_actor observer)`.
/// - its own timers: `(backoff_atom, id, token)` (a delayed restart is due), `(backoff_atom,
///   token)` (a paused run of operations goes on), `(stop_timeout_atom, token)` (a child did not
///   stop in time).
/// - an exit message with reason `user_shutdown` (anon_send_exit) stops the children in reverse
///   start order, then the supervisor.
/// Children are of any type: the supervisor holds them as `caf::actor`.
using supervisor_actor = caf::typed_actor<
    caf::replies_to<get_atom, std::string>::with<caf::actor>,
    caf::replies_to<start_atom, std::string, caf::message>::with<caf::actor>,
    caf::replies_to<restart_atom, std::string>::with<bool>,
    caf::replies_to<stop_atom, std::string>::with<bool>,
    caf::replies_to<list_atom>::with<std::vector<child_info>>,
    caf::reacts_to<subscribe_atom, supervision_observer_actor>,
    caf::reacts_to<backoff_atom, std::string, uint64_t>,
    caf::reacts_to<backoff_atom, uint64_t>,
    caf::reacts_to<stop_timeout_atom, uint64_t>>;

/// Spawns a supervisor at `path` that starts `children` in order (see `supervisor_actor`).
/// A child's exit is recorded in `log` (may be null) with the child's path and reason.
supervisor_actor spawn_supervisor(caf::actor_system& sys, std::string path,
                                  supervisor_flags flags, std::vector<child_spec> children,
                                  std::shared_ptr<supervision_log> log);

/// A child spec that starts a nested supervisor (restart permanent, infinite shutdown timeout
/// so that its own children stop in order).
child_spec supervisor_child(std::string id, supervisor_flags flags,
                            std::vector<child_spec> children, std::shared_ptr<supervision_log> log);

}  // namespace keel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(std::vector<keel::child_info>)
