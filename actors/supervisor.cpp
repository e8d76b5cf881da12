#include "actors/supervisor.hpp"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <deque>
#include <exception>
#include <iostream>
#include <unordered_set>
#include <utility>

#include <caf/actor_addr.hpp>
#include <caf/actor_cast.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/exit_reason.hpp>
#include <caf/response_promise.hpp>
#include <caf/sec.hpp>
#include <caf/system_messages.hpp>

#include "base/error.hpp"

namespace keel {

// -- enums and the log -------------------------------------------------------------------------

const char* to_string(restart_strategy x) {
  switch (x) {
    case restart_strategy::one_for_one:
      return "one_for_one";
    case restart_strategy::one_for_all:
      return "one_for_all";
    case restart_strategy::rest_for_one:
      return "rest_for_one";
    case restart_strategy::simple_one_for_one:
      return "simple_one_for_one";
  }
  return "?";
}

const char* to_string(restart_type x) {
  switch (x) {
    case restart_type::permanent:
      return "permanent";
    case restart_type::transient:
      return "transient";
    case restart_type::temporary:
      return "temporary";
  }
  return "?";
}

const char* to_string(supervision_event_kind x) {
  switch (x) {
    case supervision_event_kind::started:
      return "started";
    case supervision_event_kind::exited:
      return "exited";
    case supervision_event_kind::restarted:
      return "restarted";
    case supervision_event_kind::escalated:
      return "escalated";
    case supervision_event_kind::stopped:
      return "stopped";
    case supervision_event_kind::parked:
      return "parked";
  }
  return "?";
}

namespace {

/// One line to stderr in one write: lines from several threads never interleave.
void write_stderr(const std::string& line) {
  std::string out = line + "\n";
  size_t done = 0;
  while (done < out.size()) {
    auto n = ::write(2, out.data() + done, out.size() - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
}

}  // namespace

supervision_log::supervision_log(sink_fn sink) : sink_(std::move(sink)) {}

supervision_log::supervision_log(event_sink_fn sink) : event_sink_(std::move(sink)) {}

void supervision_log::record(supervision_event e) {
  std::string line = "supervisor: ";
  line += e.path;
  line += ' ';
  line += to_string(e.kind);
  if (!e.reason.empty()) {
    line += " (";
    line += e.reason;
    line += ')';
  }
  if (e.kind == supervision_event_kind::restarted || e.kind == supervision_event_kind::escalated) {
    line += ", restarts ";
    line += std::to_string(e.restarts);
  }
  // The sink runs under the lock so that lines come out in the order of events_.
  std::lock_guard<std::mutex> guard{mu_};
  if (event_sink_) event_sink_(&e, line);
  events_.push_back(std::move(e));
  if (sink_)
    sink_(line);
  else if (!event_sink_)
    write_stderr(line);
}

void supervision_log::report(const std::string& line) {
  std::lock_guard<std::mutex> guard{mu_};
  if (event_sink_)
    event_sink_(nullptr, line);
  else if (sink_)
    sink_(line);
  else
    write_stderr(line);
}

std::vector<supervision_event> supervision_log::events() const {
  std::lock_guard<std::mutex> guard{mu_};
  return events_;
}

int32_t supervision_log::restarts(const std::string& path) const {
  return count(supervision_event_kind::restarted, path);
}

int32_t supervision_log::count(supervision_event_kind kind, const std::string& path) const {
  std::lock_guard<std::mutex> guard{mu_};
  return static_cast<int32_t>(std::count_if(events_.begin(), events_.end(), [&](const auto& e) {
    return e.kind == kind && e.path == path;
  }));
}

std::map<std::string, uint64_t> supervision_log::restarts_by_path() const {
  std::lock_guard<std::mutex> guard{mu_};
  std::map<std::string, uint64_t> out;
  for (const auto& e : events_)
    if (e.kind == supervision_event_kind::restarted) ++out[e.path];
  return out;
}

// -- backoff -----------------------------------------------------------------------------------

namespace {

// splitmix64: tiny, portable and fully determined by its state (std's distributions are not
// specified bit-for-bit across standard libraries).
uint64_t next_random(uint64_t& state) {
  uint64_t z = (state += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

}  // namespace

caf::timespan backoff_delay(const backoff_policy& p, int32_t n, uint64_t& state) {
  if (p.initial.count() <= 0 || n < 1) return caf::timespan{0};
  const double cap = static_cast<double>(std::max(p.max.count(), int64_t{0}));
  const double multiplier = std::max(p.multiplier, 1.0);
  double base = static_cast<double>(p.initial.count()) * std::pow(multiplier, n - 1);
  base = std::min(base, cap);  // also guards against pow overflowing to inf
  const double unit = static_cast<double>(next_random(state) >> 11) * 0x1.0p-53;  // [0, 1)
  const double jitter = std::clamp(p.jitter, 0.0, 1.0);
  double d = base * (1.0 + jitter * (2.0 * unit - 1.0));
  d = std::clamp(d, 0.0, cap);
  return caf::timespan{static_cast<int64_t>(d)};
}

// -- the supervisor actor ----------------------------------------------------------------------

namespace {

/// "runtime_error: boom", "user_shutdown", "bad_model: ..." ("" for a normal exit).
std::string reason_text(const caf::error& err) {
  if (!err) return "";
  static const auto sec_category = caf::error{caf::sec::runtime_error}.category();
  static const auto exit_category = caf::make_error(caf::exit_reason::kill).category();
  std::string out;
  if (err.category() == sec_category)
    out = caf::to_string(static_cast<caf::sec>(err.code()));
  else if (err.category() == exit_category)
    out = caf::to_string(static_cast<caf::exit_reason>(err.code()));
  else
    return describe(err);
  const auto& ctx = err.context();
  if (ctx.match_elements<std::string>())
    out += ": " + ctx.get_as<std::string>(0);
  else if (!ctx.empty())
    out += ": " + caf::to_string(ctx);
  return out;
}

bool is_normal(const caf::error& reason) {
  // user_shutdown counts as normal for transient children, like OTP's `shutdown`.
  return !reason || reason == caf::exit_reason::normal || reason == caf::exit_reason::user_shutdown;
}

struct child {
  child_spec spec;
  std::string path;
  caf::message args;
  caf::actor handle;  // invalid while not running
  int32_t restarts = 0;
  std::string last_failure;
  int32_t consecutive = 0;  // restarts after failures since the child last ran for a period
  caf::actor_clock::time_point started_at;
  bool ever_started = false;
  std::string restart_reason;  // why the pending restart happens
  uint64_t backoff_token = 0;  // != 0 while a one_for_one restart waits for its backoff
  bool stopping = false;       // we sent it an exit: its exit is not a failure
  bool remove_on_stop = false;
  std::deque<caf::actor_clock::time_point> failures;  // within the period (parking)
};

enum class op_kind : uint8_t { start, stop, wait, call };

/// One step of the supervisor's sequential work queue: starts and stops run one at a time, in
/// order, and a stop waits for the child's exit (OTP's supervisors are synchronous in the same
/// way).
struct op {
  op_kind kind;
  std::string id;
  bool restart = false;  // start: record `restarted` (and count it) instead of `started`
  std::string reason;    // start: why it restarts
  bool remove = false;   // stop: remove the child (simple_one_for_one)
  caf::timespan delay{0};
  bool defer = false;  // wait: go through the mailbox even when delay is 0
  std::function<void(caf::expected<caf::actor>)> done;  // start: reports the result
  std::function<void()> fn;                             // call
};

op start_op(std::string id, bool restart = false, std::string reason = {}) {
  op o{};
  o.kind = op_kind::start;
  o.id = std::move(id);
  o.restart = restart;
  o.reason = std::move(reason);
  return o;
}

op stop_op(std::string id, bool remove = false) {
  op o{};
  o.kind = op_kind::stop;
  o.id = std::move(id);
  o.remove = remove;
  return o;
}

op wait_op(caf::timespan delay, bool defer) {
  op o{};
  o.kind = op_kind::wait;
  o.delay = delay;
  o.defer = defer;
  return o;
}

op call_op(std::function<void()> fn) {
  op o{};
  o.kind = op_kind::call;
  o.fn = std::move(fn);
  return o;
}

class supervisor_impl final : public supervisor_actor::base {
 public:
  supervisor_impl(caf::actor_config& cfg, std::string path, supervisor_flags flags,
                   std::vector<child_spec> specs, std::shared_ptr<supervision_log> log)
      : supervisor_actor::base(cfg),
        path_(std::move(path)),
        flags_(flags),
        log_(std::move(log)),
        rng_(flags.backoff.seed) {
    if (flags_.strategy == restart_strategy::simple_one_for_one) {
      if (!specs.empty()) template_ = std::move(specs.front());
    } else {
      for (auto& s : specs) {
        child c;
        c.path = path_ + "/" + s.id;
        c.spec = std::move(s);
        children_.push_back(std::move(c));
      }
    }
  }

  const char* name() const override { return "keel.supervisor"; }

  behavior_type make_behavior() override {
    // Children are monitored, not linked: a link is two-way, and CAF makes an exit message of
    // reason `kill` fatal to its receiver whatever its exit handler, so a child killed with
    // `kill` took its supervisor down with it (Erlang turns `kill` into `killed` for the same
    // reason). Downwards, this hook does what the link did: a supervisor that ends abnormally
    // (killed, or failed) sends its running children the same exit.
    attach_functor([live = live_, me = address()](const caf::error& reason) {
      if (!reason || reason == caf::exit_reason::normal) return;
      for (auto& a : *live)
        if (auto p = caf::actor_cast<caf::strong_actor_ptr>(a))
          p->enqueue(nullptr, caf::make_message_id(), caf::make_message(caf::exit_msg{me, reason}),
                     nullptr);
    });
    set_exit_handler([this](caf::exit_msg& m) { on_exit_msg(m); });
    set_down_handler([this](caf::down_msg& m) { on_down_msg(m); });
    for (auto& c : children_) ops_.push_back(start_op(c.spec.id));
    run_ops();
    return {
        [this](get_atom, const std::string& id) -> caf::actor {
          auto* c = find(id);
          return c != nullptr && !c->stopping ? c->handle : caf::actor{};
        },
        [this](start_atom, const std::string& id, caf::message& args) -> caf::result<caf::actor> {
          return on_start(id, args);
        },
        [this](restart_atom, const std::string& id) -> caf::result<bool> { return on_restart(id); },
        [this](stop_atom, const std::string& id) -> caf::result<bool> { return on_stop(id); },
        [this](list_atom) {
          std::vector<child_info> out;
          for (auto& c : children_)
            out.push_back(child_info{c.spec.id, c.path, c.stopping ? caf::actor{} : c.handle,
                                     c.restarts, c.last_failure, c.spec.kind});
          return out;
        },
        [this](subscribe_atom, supervision_observer_actor& observer) {
          if (!observer) return;
          monitor(observer);
          for (auto& c : children_)
            if (c.handle && !c.stopping) send(observer, started_atom::value, c.spec.id, c.handle);
          observers_.push_back(std::move(observer));
        },
        [this](backoff_atom, const std::string& id, uint64_t token) {
          auto* c = find(id);
          if (c == nullptr || c->backoff_token != token || shutting_down_) return;
          c->backoff_token = 0;
          ops_.push_back(start_op(id, true, c->restart_reason));
          run_ops();
        },
        [this](backoff_atom, uint64_t token) {
          if (token != wait_token_) return;
          wait_token_ = 0;
          run_ops();
        },
        [this](stop_timeout_atom, uint64_t token) {
          if (token != stop_token_ || waiting_stop_.empty()) return;
          if (auto* c = find(waiting_stop_); c != nullptr && c->handle)
            send_exit(c->handle, caf::exit_reason::kill);
        },
    };
  }

 private:
  // -- lookup --

  child* find(const std::string& id) {
    for (auto& c : children_)
      if (c.spec.id == id) return &c;
    return nullptr;
  }

  child* find(const caf::actor_addr& addr) {
    for (auto& c : children_)
      if (c.handle && c.handle.address() == addr) return &c;
    return nullptr;
  }

  void erase(const std::string& id) {
    children_.erase(std::remove_if(children_.begin(), children_.end(),
                                   [&](const child& c) { return c.spec.id == id; }),
                    children_.end());
  }

  void record(supervision_event_kind kind, const std::string& path, std::string reason,
              int32_t restarts) {
    if (log_)
      log_->record(supervision_event{kind, path, std::move(reason),
                                     std::chrono::system_clock::now(), restarts});
  }

  // -- the work queue --

  bool busy() const { return !waiting_stop_.empty() || wait_token_ != 0; }

  void run_ops() {
    if (in_run_ops_) return;  // the outer loop picks up what was queued
    in_run_ops_ = true;
    while (!busy() && !ops_.empty() && !quitting_) {
      auto o = std::move(ops_.front());
      ops_.pop_front();
      switch (o.kind) {
        case op_kind::start:
          do_start(o);
          break;
        case op_kind::stop:
          do_stop(o);
          break;
        case op_kind::wait:
          do_wait(o);
          break;
        case op_kind::call:
          o.fn();
          break;
      }
    }
    in_run_ops_ = false;
  }

  caf::expected<caf::actor> call_factory(child& c) {
    try {
      auto res = c.spec.start(system(), c.path, c.args);
      if (res && !*res)
        return make_error(errc::failed, c.path + ": child factory returned no actor");
      return res;
    } catch (const std::exception& e) {
      return make_error(errc::failed, c.path + ": child factory threw: " + e.what());
    } catch (...) {
      return make_error(errc::failed, c.path + ": child factory threw");
    }
  }

  void do_start(op& o) {
    auto* c = find(o.id);
    if (c == nullptr) {
      if (o.done) o.done(make_error(errc::not_found, path_ + "/" + o.id + ": no such child"));
      return;
    }
    if (c->handle) {  // already running (a manual restart raced with a failure)
      if (o.done) o.done(c->handle);
      return;
    }
    c->backoff_token = 0;
    auto res = call_factory(*c);
    if (!res) {
      auto text = reason_text(res.error());
      c->last_failure = text;
      record(supervision_event_kind::exited, c->path, text, c->restarts);
      if (o.done) {  // a dynamic start request: report the error, keep nothing (OTP's start_child)
        auto id = c->spec.id;
        erase(id);
        o.done(std::move(res.error()));
        return;
      }
      on_failure(o.id, res.error(), true);
      return;
    }
    caf::actor h = std::move(*res);
    c->handle = h;
    c->stopping = false;
    c->started_at = clock().now();
    c->ever_started = true;
    monitor(h);
    live_->insert(h.address());
    if (o.restart) {
      ++c->restarts;
      record(supervision_event_kind::restarted, c->path, o.reason, c->restarts);
    } else {
      record(supervision_event_kind::started, c->path, "", c->restarts);
    }
    for (auto& obs : observers_) send(obs, started_atom::value, c->spec.id, h);
    if (o.done) o.done(h);
  }

  void do_stop(op& o) {
    auto* c = find(o.id);
    if (c == nullptr) return;
    c->backoff_token = 0;
    if (!c->handle || c->stopping) {
      if (o.remove && !c->handle) erase(o.id);
      return;
    }
    c->stopping = true;
    c->remove_on_stop = o.remove;
    waiting_stop_ = o.id;
    if (c->spec.shutdown.brutal) {
      send_exit(c->handle, caf::exit_reason::kill);
      return;
    }
    send_exit(c->handle, caf::exit_reason::user_shutdown);
    if (c->spec.shutdown.timeout != shutdown_policy::infinite) {
      stop_token_ = ++next_token_;
      delayed_send(this, c->spec.shutdown.timeout, stop_timeout_atom::value, stop_token_);
    }
  }

  void do_wait(op& o) {
    if (o.delay.count() <= 0 && !o.defer) return;
    wait_token_ = ++next_token_;
    if (o.delay.count() <= 0)
      send(this, backoff_atom::value, wait_token_);
    else
      delayed_send(this, o.delay, backoff_atom::value, wait_token_);
  }

  /// Drops queued starts (and group waits) for the children in `ids`; cancels their backoffs.
  void cancel_starts(const std::vector<std::string>& ids) {
    auto affected = [&](const std::string& id) {
      return std::find(ids.begin(), ids.end(), id) != ids.end();
    };
    for (auto& id : ids)
      if (auto* c = find(id)) c->backoff_token = 0;
    ops_.erase(std::remove_if(ops_.begin(), ops_.end(),
                              [&](const op& o) {
                                return o.kind == op_kind::start && !o.done && affected(o.id);
                              }),
               ops_.end());
  }

  bool start_pending(const child& c) const {
    if (c.backoff_token != 0) return true;
    return std::any_of(ops_.begin(), ops_.end(),
                       [&](const op& o) { return o.kind == op_kind::start && o.id == c.spec.id; });
  }

  // -- exits --

  void on_exit_msg(caf::exit_msg& m) {
    if (is_normal(m.reason) && m.reason != caf::exit_reason::user_shutdown) return;
    // Our parent (or anyone holding our handle) asks us to stop.
    begin_shutdown(m.reason);
  }

  void on_down_msg(caf::down_msg& m) {
    auto* c = find(m.source);
    if (c == nullptr) {
      observers_.erase(std::remove_if(observers_.begin(), observers_.end(),
                                      [&](const supervision_observer_actor& x) { return x.address() == m.source; }),
                       observers_.end());
      return;
    }
    live_->erase(m.source);
    c->handle = caf::actor{};
    auto text = reason_text(m.reason);
    if (c->stopping) {
      c->stopping = false;
      record(supervision_event_kind::stopped, c->path, text, c->restarts);
      auto id = c->spec.id;
      if (c->remove_on_stop) erase(id);
      if (waiting_stop_ == id) {
        waiting_stop_.clear();
        stop_token_ = 0;
        run_ops();
      }
      return;
    }
    record(supervision_event_kind::exited, c->path, text, c->restarts);
    if (!is_normal(m.reason)) c->last_failure = text;
    on_failure(c->spec.id, m.reason, false);
  }

  /// Applies the restart policy after child `id` exited with `reason` (or failed to start).
  void on_failure(const std::string& id, const caf::error& reason, bool start_failed) {
    auto* c = find(id);
    if (c == nullptr) return;
    const auto type = c->spec.restart;
    const bool restart = type == restart_type::permanent ||
                         (type == restart_type::transient && (start_failed || !is_normal(reason)));
    const bool dynamic = flags_.strategy == restart_strategy::simple_one_for_one;
    if (!restart || shutting_down_) {
      if (dynamic) erase(id);
      return;
    }
    auto now = clock().now();
    // A dynamic child that keeps failing is parked, not restarted: it alone is the problem.
    if (dynamic && flags_.park_after > 0) {
      c->failures.push_back(now);
      while (!c->failures.empty() && now - c->failures.front() > flags_.period)
        c->failures.pop_front();
      if (static_cast<int32_t>(c->failures.size()) >= flags_.park_after) {
        auto why = std::to_string(c->failures.size()) + " failures within " +
                   std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(flags_.period).count()) +
                   " ms, the last: " + reason_text(reason);
        record(supervision_event_kind::parked, c->path, why, c->restarts);
        auto parked = id;
        std::erase_if(restart_times_, [&](const auto& r) { return r.second == parked; });
        erase(id);
        if (flags_.on_parked) flags_.on_parked(parked, why);
        return;
      }
    }
    // Intensity: more than `intensity` restarts within `period` escalate.
    restart_times_.emplace_back(now, id);
    while (!restart_times_.empty() && now - restart_times_.front().first > flags_.period)
      restart_times_.pop_front();
    if (static_cast<int64_t>(restart_times_.size()) > flags_.intensity) {
      record(supervision_event_kind::escalated, path_, reason_text(reason),
             static_cast<int32_t>(restart_times_.size()));
      begin_shutdown(reason);
      return;
    }
    // Backoff grows with consecutive failures; a child that ran for a period starts afresh.
    if (!start_failed && c->ever_started && now - c->started_at >= flags_.period)
      c->consecutive = 0;
    ++c->consecutive;
    auto delay = backoff_delay(flags_.backoff, c->consecutive, rng_);
    auto text = reason_text(reason);
    if (text.empty()) text = "normal";
    c->restart_reason = text;
    switch (flags_.strategy) {
      case restart_strategy::one_for_one:
      case restart_strategy::simple_one_for_one:
        if (delay.count() > 0 || start_failed) {
          c->backoff_token = ++next_token_;
          if (delay.count() > 0)
            delayed_send(this, delay, backoff_atom::value, id, c->backoff_token);
          else  // through the mailbox, so that a factory that always fails cannot spin here
            send(this, backoff_atom::value, id, c->backoff_token);
        } else {
          ops_.push_back(start_op(id, true, text));
        }
        break;
      case restart_strategy::one_for_all:
      case restart_strategy::rest_for_one: {
        size_t first = 0;
        if (flags_.strategy == restart_strategy::rest_for_one)
          while (children_[first].spec.id != id) ++first;
        group_restart(first, id, text, delay, start_failed);
        break;
      }
    }
    run_ops();
  }

  /// Stops children_[first..] except `failed` in reverse order, waits `delay`, then starts the
  /// failed child and the stopped ones in order (temporary ones are not started again).
  void group_restart(size_t first, const std::string& failed, const std::string& text,
                     caf::timespan delay, bool defer) {
    std::vector<std::string> ids;
    std::vector<std::string> to_start;
    for (size_t i = first; i < children_.size(); ++i) {
      auto& c = children_[i];
      ids.push_back(c.spec.id);
      if (c.spec.id == failed || (((c.handle && !c.stopping) || start_pending(c)) &&
                                  c.spec.restart != restart_type::temporary))
        to_start.push_back(c.spec.id);
    }
    cancel_starts(ids);
    for (auto i = ids.rbegin(); i != ids.rend(); ++i)
      if (*i != failed) ops_.push_back(stop_op(*i));
    ops_.push_back(wait_op(delay, defer));
    for (auto& id : to_start) {
      auto why = id == failed ? text : "sibling " + failed + ": " + text;
      ops_.push_back(start_op(id, true, std::move(why)));
    }
  }

  /// Stops every child in reverse start order, then quits with `reason`.
  void begin_shutdown(const caf::error& reason) {
    if (shutting_down_) return;
    shutting_down_ = true;
    for (auto& c : children_) c.backoff_token = 0;
    std::deque<op> kept;
    for (auto& o : ops_) {
      if (o.kind == op_kind::start && o.done)
        o.done(make_error(errc::failed, path_ + " is shutting down"));
      else if (o.kind == op_kind::call)
        kept.push_back(std::move(o));
    }
    ops_ = std::move(kept);
    wait_token_ = 0;
    for (auto i = children_.rbegin(); i != children_.rend(); ++i)
      ops_.push_back(stop_op(i->spec.id));
    ops_.push_back(call_op([this, reason] {
      quitting_ = true;
      quit(reason);
    }));
    run_ops();
  }

  // -- requests --

  caf::result<caf::actor> on_start(const std::string& id, caf::message& args) {
    if (flags_.strategy != restart_strategy::simple_one_for_one || !template_.start)
      return make_error(errc::bad_request, path_ + ": start needs a simple_one_for_one supervisor");
    if (find(id) != nullptr)
      return make_error(errc::bad_request, path_ + "/" + id + ": a child with this id exists");
    if (shutting_down_) return make_error(errc::failed, path_ + " is shutting down");
    child c;
    c.spec = template_;
    c.spec.id = id;
    c.path = path_ + "/" + id;
    c.args = std::move(args);
    children_.push_back(std::move(c));
    auto rp = make_response_promise<caf::actor>();
    auto o = start_op(id);
    o.done = [rp](caf::expected<caf::actor> x) mutable {
      if (x)
        rp.deliver(std::move(*x));
      else
        rp.deliver(std::move(x.error()));
    };
    ops_.push_back(std::move(o));
    run_ops();
    return rp;
  }

  caf::result<bool> on_restart(const std::string& id) {
    if (find(id) == nullptr || shutting_down_) return false;
    cancel_starts({id});
    auto rp = make_response_promise<bool>();
    ops_.push_back(stop_op(id));
    ops_.push_back(start_op(id, true, "manual restart"));
    ops_.push_back(call_op([rp]() mutable { rp.deliver(true); }));
    run_ops();
    return rp;
  }

  caf::result<bool> on_stop(const std::string& id) {
    if (find(id) == nullptr || shutting_down_) return false;
    cancel_starts({id});
    auto rp = make_response_promise<bool>();
    ops_.push_back(stop_op(id, flags_.strategy == restart_strategy::simple_one_for_one));
    ops_.push_back(call_op([rp]() mutable { rp.deliver(true); }));
    run_ops();
    return rp;
  }

  std::string path_;
  supervisor_flags flags_;
  std::shared_ptr<supervision_log> log_;
  child_spec template_;          // simple_one_for_one
  std::vector<child> children_;  // in start order
  std::vector<supervision_observer_actor> observers_;
  /// The children running now, for the termination hook (make_behavior).
  std::shared_ptr<std::unordered_set<caf::actor_addr>> live_ =
      std::make_shared<std::unordered_set<caf::actor_addr>>();
  // Restarts within the period, and whose (a parked child's no longer count).
  std::deque<std::pair<caf::actor_clock::time_point, std::string>> restart_times_;
  std::deque<op> ops_;
  std::string waiting_stop_;  // the child whose exit a stop op waits for
  uint64_t stop_token_ = 0;
  uint64_t wait_token_ = 0;  // != 0 while a wait op runs
  uint64_t next_token_ = 0;
  uint64_t rng_;
  bool in_run_ops_ = false;
  bool shutting_down_ = false;
  bool quitting_ = false;
};

}  // namespace

supervisor_actor spawn_supervisor(caf::actor_system& sys, std::string path,
                                  supervisor_flags flags, std::vector<child_spec> children,
                                  std::shared_ptr<supervision_log> log) {
  return sys.spawn<supervisor_impl>(std::move(path), flags, std::move(children), std::move(log));
}

child_spec supervisor_child(std::string id, supervisor_flags flags,
                            std::vector<child_spec> children,
                            std::shared_ptr<supervision_log> log) {
  child_spec spec;
  spec.id = std::move(id);
  spec.restart = restart_type::permanent;
  spec.shutdown.timeout = shutdown_policy::infinite;
  spec.kind = "supervisor";
  spec.start = [flags, children = std::move(children), log = std::move(log)](
                   caf::actor_system& sys, const std::string& path,
                   const caf::message&) -> caf::expected<caf::actor> {
    return caf::actor_cast<caf::actor>(spawn_supervisor(sys, path, flags, children, log));
  };
  return spec;
}

}  // namespace keel
