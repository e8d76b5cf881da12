#define BOOST_TEST_MODULE supervisor_test
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/after.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scheduler/test_coordinator.hpp>
#include <caf/scoped_actor.hpp>
#include <caf/send.hpp>

#include "actors/supervisor.hpp"
#include "base/error.hpp"

using namespace std::chrono_literals;
using namespace keel;

namespace {

// Test-only messages for the children.
using fail_atom = caf::atom_constant<caf::atom("t_fail")>;
using throw_atom = caf::atom_constant<caf::atom("t_throw")>;
using finish_atom = caf::atom_constant<caf::atom("t_finish")>;

/// "normal", "user_shutdown", "kill", "runtime_error", ...
std::string short_reason(const caf::error& e) {
  if (!e) return "normal";
  if (e.category() == errc_category) return to_string(code_of(e));
  auto s = caf::to_string(e);  // "exit_reason(kill)", "system_error(runtime_error, (\"x\"))"
  auto open = s.find('(');
  auto end = s.find_first_of(",)", open);
  return s.substr(open + 1, end - open - 1);
}

/// What the children and observers did, in order. Thread-safe (the last test is threaded).
struct tracker {
  std::mutex mu;
  std::vector<std::string> events;
  std::map<std::string, int> generations;
  std::map<std::string, caf::actor> noted;  // the last handle an observer was told about

  void add(std::string s) {
    std::lock_guard<std::mutex> guard{mu};
    events.push_back(std::move(s));
  }
  int next_generation(const std::string& id) {
    std::lock_guard<std::mutex> guard{mu};
    return ++generations[id];
  }
  /// The events so far; clears them.
  std::vector<std::string> take() {
    std::lock_guard<std::mutex> guard{mu};
    return std::exchange(events, {});
  }
};

using strings = std::vector<std::string>;

/// "a | b | c": compared as one string so that a failure shows both sequences.
std::string join(const strings& xs) {
  std::string out;
  for (auto& x : xs) out += (out.empty() ? "" : " | ") + x;
  return out;
}

caf::behavior test_child(caf::event_based_actor* self, std::shared_ptr<tracker> t, std::string id,
                         bool ignore_shutdown) {
  self->attach_functor(
      [t, id](const caf::error& reason) { t->add("exit " + id + " " + short_reason(reason)); });
  if (ignore_shutdown) self->set_exit_handler([](caf::exit_msg&) {});  // kill stays fatal
  return {
      [=](fail_atom, const std::string& why) {
        self->quit(caf::make_error(caf::sec::runtime_error, why));
      },
      [=](throw_atom) { throw std::runtime_error("thrown by " + id); },
      [=](finish_atom) { self->quit(); },
  };
}

struct child_opts {
  restart_type restart = restart_type::permanent;
  bool ignore_shutdown = false;
  bool brutal = false;
  caf::timespan timeout = 5s;
  int failed_starts = 0;  // the first n starts return an error
  bool detached = false;
};

/// A child spec whose children record "start <id> <generation>[ arg=<n>]" and "exit <id> <why>".
/// The id comes from the path, so the same spec works as a simple_one_for_one template.
child_spec make_child(std::shared_ptr<tracker> t, std::string id, child_opts o = {}) {
  child_spec s;
  s.id = std::move(id);
  s.restart = o.restart;
  s.shutdown.brutal = o.brutal;
  s.shutdown.timeout = o.timeout;
  s.start = [t, o](caf::actor_system& sys, const std::string& path,
                   const caf::message& args) -> caf::expected<caf::actor> {
    auto id = path.substr(path.rfind('/') + 1);
    int gen = t->next_generation(id);
    if (gen <= o.failed_starts) {
      t->add("refuse " + id + " " + std::to_string(gen));
      return make_error(errc::failed, path + ": start refused");
    }
    auto line = "start " + id + " " + std::to_string(gen);
    if (args.match_elements<int>()) line += " arg=" + std::to_string(args.get_as<int>(0));
    t->add(line);
    if (o.detached) return sys.spawn<caf::detached>(test_child, t, id, o.ignore_shutdown);
    return sys.spawn(test_child, t, id, o.ignore_shutdown);
  };
  return s;
}

caf::behavior observer(caf::event_based_actor*, std::shared_ptr<tracker> t) {
  return {
      [=](started_atom, const std::string& id, const caf::actor& h) {
        t->add("note " + id);
        std::lock_guard<std::mutex> guard{t->mu};
        t->noted[id] = h;
      },
  };
}

/// Records "down <name> <reason>" when `target` exits, then quits.
caf::behavior watcher(caf::event_based_actor* self, std::shared_ptr<tracker> t, caf::actor target,
                      std::string name) {
  self->monitor(target);
  self->set_down_handler([=](caf::down_msg& m) {
    t->add("down " + name + " " + short_reason(m.reason));
    self->quit();
  });
  return {[](int) {}};
}

supervisor_flags flags_of(restart_strategy s, int32_t intensity = 3, caf::timespan period = 5s) {
  supervisor_flags f;
  f.strategy = s;
  f.intensity = intensity;
  f.period = period;
  return f;
}

caf::actor_system_config& testing_config(caf::actor_system_config& cfg) {
  cfg.set("scheduler.policy", caf::atom("testing"));
  return cfg;
}

/// An actor system on CAF's test coordinator: nothing runs until the test runs the scheduler,
/// and time moves only by advance_time.
struct fixture {
  caf::actor_system_config cfg;
  caf::actor_system sys;
  caf::scheduler::test_coordinator& sched;
  caf::scoped_actor self;
  std::shared_ptr<tracker> t = std::make_shared<tracker>();
  strings lines;  // the log's lines
  std::shared_ptr<supervision_log> log =
      std::make_shared<supervision_log>([this](const std::string& l) { lines.push_back(l); });
  std::vector<caf::actor> to_stop;

  fixture()
      : sys(testing_config(cfg)),
        sched(dynamic_cast<caf::scheduler::test_coordinator&>(sys.scheduler())),
        self(sys, true) {}

  ~fixture() {
    for (auto& a : to_stop) caf::anon_send_exit(a, caf::exit_reason::user_shutdown);
    for (int i = 0; i < 100; ++i) {  // ~actor_system waits for every actor
      sched.run();
      if (!sched.has_pending_timeout()) break;
      sched.trigger_timeouts();
    }
    sched.run();
  }

  supervisor_actor spawn_sup(supervisor_flags flags, std::vector<child_spec> children,
                             std::string path = "node") {
    auto sup = spawn_supervisor(sys, std::move(path), flags, std::move(children), log);
    to_stop.push_back(caf::actor_cast<caf::actor>(sup));
    sched.run();
    return sup;
  }

  template <class Handle>
  void watch(const Handle& target, std::string name) {
    // Held, because CAF destroys an actor that nobody references once it is idle.
    to_stop.push_back(
        sys.spawn(watcher, t, caf::actor_cast<caf::actor>(target), std::move(name)));
    sched.run();
  }

  caf::actor spawn_observer() {
    auto obs = sys.spawn(observer, t);
    to_stop.push_back(obs);
    return obs;
  }

  /// Sends a request, runs the scheduler, returns the reply (or the error in `err`).
  template <class T, class Handle, class... Ts>
  T try_ask(caf::error& err, const Handle& dest, Ts&&... xs) {
    auto h = self->request(dest, caf::infinite, std::forward<Ts>(xs)...);
    sched.run();
    T result{};
    bool replied = false;
    caf::blocking_actor::accept_one_cond rc;
    self->varargs_receive(
        rc, h.id(),
        [&](T& x) {
          result = std::move(x);
          replied = true;
        },
        [&](caf::error& e) {
          err = std::move(e);
          replied = true;
        },
        caf::after(std::chrono::seconds(1)) >> [] {});
    BOOST_REQUIRE_MESSAGE(replied, "no reply");
    return result;
  }

  template <class T, class Handle, class... Ts>
  T ask(const Handle& dest, Ts&&... xs) {
    caf::error err;
    auto result = try_ask<T>(err, dest, std::forward<Ts>(xs)...);
    BOOST_REQUIRE_MESSAGE(!err, "request failed: " << caf::to_string(err));
    return result;
  }

  caf::actor get(const supervisor_actor& sup, const std::string& id) {
    return ask<caf::actor>(sup, get_atom::value, id);
  }

  std::vector<child_info> list(const supervisor_actor& sup) {
    return ask<std::vector<child_info>>(sup, list_atom::value);
  }

  void fail(const supervisor_actor& sup, const std::string& id, const std::string& why = "boom") {
    auto child = get(sup, id);
    BOOST_REQUIRE_MESSAGE(child, id << " is not running");
    caf::anon_send(child, fail_atom::value, why);
    sched.run();
  }

  template <class Handle>
  void shutdown(const Handle& sup) {
    caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
    sched.run();
  }

  bool has_line(const std::string& l) const {
    return std::find(lines.begin(), lines.end(), l) != lines.end();
  }
};

std::vector<child_spec> abc(const std::shared_ptr<tracker>& t, int n = 3) {
  std::vector<child_spec> out;
  for (int i = 0; i < n; ++i)
    out.push_back(make_child(t, std::string(1, static_cast<char>('a' + i))));
  return out;
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(supervisor, fixture)

// -- start and stop order ----------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(starts_children_in_order_and_stops_them_in_reverse) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t));
  BOOST_TEST(join(t->take()) == join({"start a 1", "start b 1", "start c 1"}));
  watch(sup, "node");
  shutdown(sup);
  BOOST_TEST(join(t->take()) == join({"exit c user_shutdown", "exit b user_shutdown",
                                      "exit a user_shutdown", "down node user_shutdown"}));
  BOOST_TEST(log->count(supervision_event_kind::started, "node/a") == 1);
  BOOST_TEST(log->count(supervision_event_kind::stopped, "node/c") == 1);
  BOOST_TEST(has_line("supervisor: node/b started"));
  BOOST_TEST(has_line("supervisor: node/b stopped (user_shutdown)"));
}

BOOST_AUTO_TEST_CASE(a_child_killed_with_kill_is_restarted_and_its_supervisor_lives_on) {
  // CAF makes an exit message of reason `kill` fatal to whoever receives it, links included:
  // with children linked, a child killed so took its supervisor (and the supervisor's own
  // parent, and so on) down with it. Children are monitored instead.
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t));
  watch(sup, "node");
  auto b = get(sup, "b");
  t->take();
  caf::anon_send_exit(b, caf::exit_reason::kill);
  sched.run();
  BOOST_TEST(join(t->take()) == join({"exit b kill", "start b 2"}));
  auto b2 = get(sup, "b");
  BOOST_TEST((b2 && b2 != b));
  BOOST_TEST(log->restarts("node/b") == 1);
}

BOOST_AUTO_TEST_CASE(a_supervisor_that_is_killed_takes_its_children_down) {
  // What the link did downwards, the supervisor's termination hook does.
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t, 2));
  t->take();
  caf::anon_send_exit(sup, caf::exit_reason::kill);
  sched.run();
  auto events = t->take();
  std::sort(events.begin(), events.end());
  BOOST_TEST(join(events) == join({"exit a kill", "exit b kill"}));
}

// -- strategies --------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(one_for_one_restarts_only_the_failed_child) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t));
  auto a = get(sup, "a");
  auto b = get(sup, "b");
  t->take();
  fail(sup, "b");
  BOOST_TEST(join(t->take()) == join({"exit b runtime_error", "start b 2"}));
  BOOST_TEST((get(sup, "a") == a));
  auto b2 = get(sup, "b");
  BOOST_TEST((b2 && b2 != b));
  BOOST_TEST(log->restarts("node/b") == 1);
  BOOST_TEST(log->restarts("node/a") == 0);
  BOOST_TEST(has_line("supervisor: node/b exited (runtime_error: boom)"));
  BOOST_TEST(has_line("supervisor: node/b restarted (runtime_error: boom), restarts 1"));
}

BOOST_AUTO_TEST_CASE(one_for_all_stops_the_rest_in_reverse_and_starts_all_in_order) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_all), abc(t));
  t->take();
  fail(sup, "b");
  BOOST_TEST(join(t->take()) ==
             join({"exit b runtime_error", "exit c user_shutdown", "exit a user_shutdown",
                   "start a 2", "start b 2", "start c 2"}));
  BOOST_TEST(log->restarts("node/a") == 1);
  BOOST_TEST(log->restarts("node/b") == 1);
  BOOST_TEST(log->count(supervision_event_kind::stopped, "node/a") == 1);
  BOOST_TEST(has_line("supervisor: node/a restarted (sibling b: runtime_error: boom), restarts 1"));
  for (auto& c : list(sup)) BOOST_TEST(static_cast<bool>(c.handle));
}

BOOST_AUTO_TEST_CASE(rest_for_one_restarts_the_failed_child_and_those_started_after_it) {
  auto sup = spawn_sup(flags_of(restart_strategy::rest_for_one), abc(t, 4));
  auto a = get(sup, "a");
  t->take();
  fail(sup, "b");
  BOOST_TEST(join(t->take()) ==
             join({"exit b runtime_error", "exit d user_shutdown", "exit c user_shutdown",
                   "start b 2", "start c 2", "start d 2"}));
  BOOST_TEST((get(sup, "a") == a));
  BOOST_TEST(log->restarts("node/a") == 0);
}

BOOST_AUTO_TEST_CASE(one_for_all_does_not_restart_a_child_stopped_on_request_or_a_temporary_one) {
  std::vector<child_spec> cs{make_child(t, "a"), make_child(t, "b"),
                             make_child(t, "c", {restart_type::temporary}), make_child(t, "d")};
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_all), std::move(cs));
  BOOST_TEST(ask<bool>(sup, stop_atom::value, std::string("b")));
  t->take();
  BOOST_TEST(!get(sup, "b"));
  fail(sup, "a");
  BOOST_TEST(join(t->take()) == join({"exit a runtime_error", "exit d user_shutdown",
                                      "exit c user_shutdown", "start a 2", "start d 2"}));
  BOOST_TEST(!get(sup, "b"));
  BOOST_TEST(!get(sup, "c"));
}

// -- restart types -----------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(transient_child_restarts_only_after_an_abnormal_exit) {
  std::vector<child_spec> cs{make_child(t, "a", {restart_type::transient}),
                             make_child(t, "b", {restart_type::transient})};
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), std::move(cs));
  t->take();
  caf::anon_send(get(sup, "a"), finish_atom::value);
  sched.run();
  BOOST_TEST(join(t->take()) == join({"exit a normal"}));
  BOOST_TEST(!get(sup, "a"));
  BOOST_TEST(log->count(supervision_event_kind::exited, "node/a") == 1);
  BOOST_TEST(has_line("supervisor: node/a exited"));
  fail(sup, "b");
  BOOST_TEST(join(t->take()) == join({"exit b runtime_error", "start b 2"}));
  auto l = list(sup);
  BOOST_REQUIRE_EQUAL(l.size(), 2u);
  BOOST_TEST(!l[0].handle);
  BOOST_TEST(l[0].last_failure == "");
}

BOOST_AUTO_TEST_CASE(permanent_child_restarts_after_a_normal_exit) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t, 1));
  t->take();
  caf::anon_send(get(sup, "a"), finish_atom::value);
  sched.run();
  BOOST_TEST(join(t->take()) == join({"exit a normal", "start a 2"}));
  BOOST_TEST(has_line("supervisor: node/a restarted (normal), restarts 1"));
}

BOOST_AUTO_TEST_CASE(temporary_child_is_never_restarted) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one),
                       {make_child(t, "a", {restart_type::temporary})});
  t->take();
  fail(sup, "a");
  BOOST_TEST(join(t->take()) == join({"exit a runtime_error"}));
  BOOST_TEST(!get(sup, "a"));
  BOOST_TEST(log->count(supervision_event_kind::exited, "node/a") == 1);
  BOOST_TEST(log->restarts("node/a") == 0);
  auto l = list(sup);
  BOOST_REQUIRE_EQUAL(l.size(), 1u);
  BOOST_TEST(l[0].last_failure == "runtime_error: boom");
}

// -- intensity and escalation ------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(more_failures_than_intensity_within_the_period_escalate) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one, 2, 5s), abc(t, 2));
  watch(sup, "node");
  t->take();
  fail(sup, "a", "one");
  sched.advance_time(1s);
  fail(sup, "a", "two");
  BOOST_TEST(join(t->take()) ==
             join({"exit a runtime_error", "start a 2", "exit a runtime_error", "start a 3"}));
  sched.advance_time(1s);
  fail(sup, "a", "three");  // the third restart within 5 s: more than 2
  BOOST_TEST(join(t->take()) ==
             join({"exit a runtime_error", "exit b user_shutdown", "down node runtime_error"}));
  BOOST_TEST(log->count(supervision_event_kind::escalated, "node") == 1);
  BOOST_TEST(log->restarts("node/a") == 2);
  BOOST_TEST(has_line("supervisor: node escalated (runtime_error: three), restarts 3"));
}

BOOST_AUTO_TEST_CASE(failures_spread_beyond_the_period_do_not_escalate) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one, 2, 5s), abc(t, 1));
  for (int i = 0; i < 6; ++i) {
    fail(sup, "a");
    sched.advance_time(3s);  // at most two failures in any 5 s window
  }
  BOOST_TEST(log->restarts("node/a") == 6);
  BOOST_TEST(log->count(supervision_event_kind::escalated, "node") == 0);
  BOOST_TEST(static_cast<bool>(get(sup, "a")));
}

BOOST_AUTO_TEST_CASE(nested_supervisor_escalation_restarts_it_under_a_one_for_one_parent) {
  auto engine = supervisor_child("engine", flags_of(restart_strategy::one_for_all, 1, 5s),
                                 {make_child(t, "shard-0"), make_child(t, "shard-1")}, log);
  auto node = spawn_sup(flags_of(restart_strategy::one_for_one),
                        {make_child(t, "store"), std::move(engine)});
  auto store = get(node, "store");
  auto eng1 = caf::actor_cast<supervisor_actor>(get(node, "engine"));
  BOOST_TEST(join(t->take()) == join({"start store 1", "start shard-0 1", "start shard-1 1"}));
  fail(eng1, "shard-0");
  BOOST_TEST(join(t->take()) == join({"exit shard-0 runtime_error", "exit shard-1 user_shutdown",
                                      "start shard-0 2", "start shard-1 2"}));
  fail(eng1, "shard-0");  // a second restart within 5 s: more than 1, the engine gives up
  BOOST_TEST(join(t->take()) == join({"exit shard-0 runtime_error", "exit shard-1 user_shutdown",
                                      "start shard-0 3", "start shard-1 3"}));
  BOOST_TEST(log->count(supervision_event_kind::escalated, "node/engine") == 1);
  BOOST_TEST(log->count(supervision_event_kind::exited, "node/engine") == 1);
  BOOST_TEST(log->restarts("node/engine") == 1);
  BOOST_TEST(log->restarts("node/engine/shard-0") == 1);  // the escalation restarted nothing
  BOOST_TEST(
      has_line("supervisor: node/engine/shard-0 restarted (runtime_error: boom), restarts 1"));
  BOOST_TEST(has_line("supervisor: node/engine restarted (runtime_error: boom), restarts 1"));
  auto eng2 = caf::actor_cast<supervisor_actor>(get(node, "engine"));
  BOOST_TEST((eng2 && eng2 != eng1));
  BOOST_TEST((get(node, "store") == store));
  // The new engine runs its own children; shutting the node down stops them first.
  BOOST_TEST(static_cast<bool>(get(eng2, "shard-1")));
  shutdown(node);
  BOOST_TEST(join(t->take()) == join({"exit shard-1 user_shutdown", "exit shard-0 user_shutdown",
                                      "exit store user_shutdown"}));
}

// -- shutdown ----------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(shutdown_kills_a_child_that_ignores_user_shutdown_after_the_timeout) {
  std::vector<child_spec> cs{make_child(t, "a"),
                             make_child(t, "b", {.ignore_shutdown = true, .timeout = 2s})};
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), std::move(cs));
  watch(sup, "node");
  t->take();
  shutdown(sup);
  BOOST_TEST(t->take().empty());  // b ignores the request; a waits for b (reverse order)
  sched.advance_time(1999ms);
  sched.run();
  BOOST_TEST(t->take().empty());
  sched.advance_time(1ms);
  sched.run();
  BOOST_TEST(join(t->take()) ==
             join({"exit b kill", "exit a user_shutdown", "down node user_shutdown"}));
  BOOST_TEST(has_line("supervisor: node/b stopped (kill)"));
  BOOST_TEST(log->restarts("node/b") == 0);
}

BOOST_AUTO_TEST_CASE(brutal_shutdown_kills_at_once) {
  std::vector<child_spec> cs{make_child(t, "a"),
                             make_child(t, "b", {.ignore_shutdown = true, .brutal = true})};
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), std::move(cs));
  t->take();
  shutdown(sup);
  BOOST_TEST(join(t->take()) == join({"exit b kill", "exit a user_shutdown"}));
}

// -- backoff -----------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(backoff_delays_restarts_growing_to_the_cap) {
  auto f = flags_of(restart_strategy::one_for_one, 100, 60s);
  f.backoff = backoff_policy{100ms, 1s, 2.0, 0.0, 1};
  auto sup = spawn_sup(f, abc(t, 1));
  t->take();
  const std::vector<caf::timespan> expected{100ms, 200ms, 400ms, 800ms, 1s, 1s};
  for (auto d : expected) {
    fail(sup, "a");
    BOOST_TEST(!get(sup, "a"));  // waiting for its backoff: not running
    auto l = list(sup);
    BOOST_TEST(!l[0].handle);
    sched.advance_time(d - 1ms);
    sched.run();
    BOOST_TEST(!get(sup, "a"));
    sched.advance_time(1ms);
    sched.run();
    BOOST_TEST_MESSAGE("delay " << d.count());
    BOOST_TEST(static_cast<bool>(get(sup, "a")));
  }
  BOOST_TEST(log->restarts("node/a") == 6);
}

BOOST_AUTO_TEST_CASE(backoff_starts_afresh_after_the_child_ran_for_a_period) {
  auto f = flags_of(restart_strategy::one_for_one, 100, 5s);
  f.backoff = backoff_policy{100ms, 1s, 2.0, 0.0, 1};
  auto sup = spawn_sup(f, abc(t, 1));
  fail(sup, "a");
  sched.advance_time(100ms);
  fail(sup, "a");  // second in a row: 200 ms
  sched.advance_time(199ms);
  BOOST_TEST(!get(sup, "a"));
  sched.advance_time(1ms);
  BOOST_TEST(static_cast<bool>(get(sup, "a")));
  sched.advance_time(5s);  // ran for a whole period
  fail(sup, "a");
  sched.advance_time(100ms);
  BOOST_TEST(static_cast<bool>(get(sup, "a")));
}

BOOST_AUTO_TEST_CASE(backoff_delay_is_capped_jittered_within_bounds_and_deterministic) {
  backoff_policy p{10ms, 500ms, 3.0, 0.25, 42};
  uint64_t s1 = p.seed;
  uint64_t s2 = p.seed;
  uint64_t other = 43;
  bool differs = false;
  for (int n = 1; n <= 12; ++n) {
    auto d1 = backoff_delay(p, n, s1);
    auto d2 = backoff_delay(p, n, s2);
    BOOST_TEST(d1.count() == d2.count());
    differs = differs || backoff_delay(p, n, other) != d1;
    double base = std::min(10e6 * std::pow(3.0, n - 1), 500e6);
    BOOST_TEST(static_cast<double>(d1.count()) >= base * 0.75 - 1);
    BOOST_TEST(static_cast<double>(d1.count()) <= std::min(base * 1.25, 500e6) + 1);
  }
  BOOST_TEST(differs);
  uint64_t s = 0;
  BOOST_TEST(backoff_delay(backoff_policy{}, 3, s).count() == 0);  // initial 0: at once
}

BOOST_AUTO_TEST_CASE(supervisor_uses_the_seeded_jittered_backoff) {
  auto f = flags_of(restart_strategy::one_for_one, 100, 60s);
  f.backoff = backoff_policy{100ms, 1s, 2.0, 0.5, 7};
  uint64_t state = f.backoff.seed;
  auto first = backoff_delay(f.backoff, 1, state);
  auto second = backoff_delay(f.backoff, 2, state);
  BOOST_TEST(first.count() != caf::timespan{100ms}.count());  // the jitter moved it
  auto sup = spawn_sup(f, abc(t, 1));
  for (auto d : {first, second}) {
    fail(sup, "a");
    sched.advance_time(d - caf::timespan{1});
    BOOST_TEST(!get(sup, "a"));
    sched.advance_time(caf::timespan{1});
    BOOST_TEST(static_cast<bool>(get(sup, "a")));
  }
}

BOOST_AUTO_TEST_CASE(one_for_all_backoff_waits_after_stopping_and_then_starts_all) {
  auto f = flags_of(restart_strategy::one_for_all, 10, 60s);
  f.backoff = backoff_policy{100ms, 1s, 2.0, 0.0, 1};
  auto sup = spawn_sup(f, abc(t, 2));
  t->take();
  fail(sup, "a");
  BOOST_TEST(join(t->take()) == join({"exit a runtime_error", "exit b user_shutdown"}));
  BOOST_TEST(!get(sup, "b"));
  sched.advance_time(100ms);
  sched.run();
  BOOST_TEST(join(t->take()) == join({"start a 2", "start b 2"}));
}

// -- simple_one_for_one ------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(simple_one_for_one_starts_stops_and_restarts_dynamic_children) {
  auto sup = spawn_sup(flags_of(restart_strategy::simple_one_for_one),
                       {make_child(t, "session", {restart_type::transient})}, "node/sessions");
  BOOST_TEST(t->take().empty());  // the template starts nothing
  auto s1 = ask<caf::actor>(sup, start_atom::value, std::string("s1"), caf::make_message(1));
  auto s2 = ask<caf::actor>(sup, start_atom::value, std::string("s2"), caf::make_message(2));
  BOOST_TEST((s1 && s2 && s1 != s2));
  BOOST_TEST((get(sup, "s2") == s2));
  BOOST_TEST(join(t->take()) == join({"start s1 1 arg=1", "start s2 1 arg=2"}));
  caf::error err;
  try_ask<caf::actor>(err, sup, start_atom::value, std::string("s1"), caf::make_message(3));
  BOOST_TEST(code_of(err) == errc::bad_request);
  // A failure restarts the child with the same arguments.
  fail(sup, "s1");
  BOOST_TEST(join(t->take()) == join({"exit s1 runtime_error", "start s1 2 arg=1"}));
  BOOST_TEST(log->restarts("node/sessions/s1") == 1);
  // A stop removes it.
  BOOST_TEST(ask<bool>(sup, stop_atom::value, std::string("s2")));
  BOOST_TEST(join(t->take()) == join({"exit s2 user_shutdown"}));
  // A transient child that ends normally is removed too.
  ask<caf::actor>(sup, start_atom::value, std::string("s3"), caf::make_message(3));
  ask<caf::actor>(sup, start_atom::value, std::string("s4"), caf::make_message(4));
  caf::anon_send(get(sup, "s3"), finish_atom::value);
  sched.run();
  auto l = list(sup);
  BOOST_REQUIRE_EQUAL(l.size(), 2u);
  BOOST_TEST(l[0].id == "s1");
  BOOST_TEST(l[0].path == "node/sessions/s1");
  BOOST_TEST(l[1].id == "s4");
  t->take();
  shutdown(sup);  // reverse start order
  BOOST_TEST(join(t->take()) == join({"exit s4 user_shutdown", "exit s1 user_shutdown"}));
}

BOOST_AUTO_TEST_CASE(a_dynamic_child_that_keeps_failing_is_parked_and_the_rest_go_on) {
  // Issue #11: one session whose data crashes it must not take its supervisor (and so every
  // other session) down. With park_after 3, its third failure within the period parks it; the
  // failures do not count toward the intensity of 2, which would have escalated.
  auto flags = flags_of(restart_strategy::simple_one_for_one, 2, 5s);
  flags.park_after = 3;
  std::vector<std::string> parked;
  flags.on_parked = [&parked](const std::string& id, const std::string& why) {
    parked.push_back(id + ": " + why);
  };
  auto sup = spawn_sup(flags, {make_child(t, "session", {restart_type::transient})},
                       "node/sessions");
  watch(sup, "sessions");
  ask<caf::actor>(sup, start_atom::value, std::string("poison"), caf::make_message(1));
  ask<caf::actor>(sup, start_atom::value, std::string("good"), caf::make_message(2));
  t->take();
  fail(sup, "poison", "one");
  sched.advance_time(1s);
  fail(sup, "poison", "two");
  BOOST_TEST(join(t->take()) == join({"exit poison runtime_error", "start poison 2 arg=1",
                                      "exit poison runtime_error", "start poison 3 arg=1"}));
  sched.advance_time(1s);
  fail(sup, "poison", "three");
  BOOST_TEST(join(t->take()) == join({"exit poison runtime_error"}));  // no restart, no escalation
  BOOST_REQUIRE_EQUAL(parked.size(), 1u);
  BOOST_TEST(parked[0] == "poison: 3 failures within 5000 ms, the last: runtime_error: three");
  BOOST_TEST(log->count(supervision_event_kind::parked, "node/sessions/poison") == 1);
  BOOST_TEST(log->count(supervision_event_kind::escalated, "node/sessions") == 0);
  BOOST_TEST(!get(sup, "poison"));
  BOOST_TEST(static_cast<bool>(get(sup, "good")));
  // The other child still fails and restarts as before.
  fail(sup, "good");
  BOOST_TEST(join(t->take()) == join({"exit good runtime_error", "start good 2 arg=2"}));
  // Failures spread beyond the period do not park.
  ask<caf::actor>(sup, start_atom::value, std::string("flaky"), caf::make_message(3));
  for (int i = 0; i < 4; ++i) {
    sched.advance_time(3s);
    fail(sup, "flaky");
  }
  BOOST_TEST(parked.size() == 1u);
  BOOST_TEST(static_cast<bool>(get(sup, "flaky")));
}

BOOST_AUTO_TEST_CASE(start_request_to_a_static_supervisor_is_refused) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t, 1));
  caf::error err;
  try_ask<caf::actor>(err, sup, start_atom::value, std::string("x"), caf::make_message());
  BOOST_TEST(code_of(err) == errc::bad_request);
}

BOOST_AUTO_TEST_CASE(failed_dynamic_start_is_reported_and_not_kept) {
  auto sup = spawn_sup(flags_of(restart_strategy::simple_one_for_one),
                       {make_child(t, "session", {.failed_starts = 1})});
  caf::error err;
  try_ask<caf::actor>(err, sup, start_atom::value, std::string("s1"), caf::make_message());
  BOOST_TEST(code_of(err) == errc::failed);
  BOOST_TEST(list(sup).empty());
}

// -- requests ----------------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(subscribers_hear_of_current_children_and_every_later_start) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t, 2));
  t->take();
  auto obs = spawn_observer();
  caf::anon_send(sup, subscribe_atom::value, caf::actor_cast<supervision_observer_actor>(obs));
  sched.run();
  BOOST_TEST(join(t->take()) == join({"note a", "note b"}));
  fail(sup, "b");
  BOOST_TEST(join(t->take()) == join({"exit b runtime_error", "start b 2", "note b"}));
  BOOST_TEST((t->noted["b"] == get(sup, "b")));
  BOOST_TEST(ask<bool>(sup, restart_atom::value, std::string("a")));
  BOOST_TEST(join(t->take()) == join({"exit a user_shutdown", "start a 2", "note a"}));
  BOOST_TEST((t->noted["a"] == get(sup, "a")));
}

BOOST_AUTO_TEST_CASE(list_reports_children_in_order_with_restarts_and_last_failure) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t));
  fail(sup, "b", "out of memory");
  auto l = list(sup);
  BOOST_REQUIRE_EQUAL(l.size(), 3u);
  BOOST_TEST(l[0].id == "a");
  BOOST_TEST(l[1].path == "node/b");
  BOOST_TEST(l[1].restarts == 1);
  BOOST_TEST(l[1].last_failure == "runtime_error: out of memory");
  BOOST_TEST(l[0].restarts == 0);
  BOOST_TEST(l[0].last_failure == "");
  BOOST_TEST((l[1].handle == get(sup, "b")));
}

BOOST_AUTO_TEST_CASE(get_returns_the_current_handle_and_invalid_for_unknown_ids) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t, 1));
  BOOST_TEST(static_cast<bool>(get(sup, "a")));
  BOOST_TEST(!get(sup, "nope"));
}

BOOST_AUTO_TEST_CASE(manual_restart_counts_as_a_restart_but_not_towards_intensity) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one, 0, 5s), abc(t, 2));
  t->take();
  BOOST_TEST(ask<bool>(sup, restart_atom::value, std::string("a")));
  BOOST_TEST(ask<bool>(sup, restart_atom::value, std::string("a")));
  BOOST_TEST(join(t->take()) ==
             join({"exit a user_shutdown", "start a 2", "exit a user_shutdown", "start a 3"}));
  BOOST_TEST(log->restarts("node/a") == 2);
  BOOST_TEST(has_line("supervisor: node/a restarted (manual restart), restarts 2"));
  BOOST_TEST(!ask<bool>(sup, restart_atom::value, std::string("nope")));
  BOOST_TEST(log->count(supervision_event_kind::escalated, "node") == 0);
  BOOST_TEST(static_cast<bool>(get(sup, "b")));
}

BOOST_AUTO_TEST_CASE(stop_request_stops_a_static_child_for_good) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one), abc(t, 2));
  t->take();
  BOOST_TEST(ask<bool>(sup, stop_atom::value, std::string("a")));
  BOOST_TEST(join(t->take()) == join({"exit a user_shutdown"}));
  BOOST_TEST(!get(sup, "a"));
  BOOST_TEST(list(sup).size() == 2u);
  BOOST_TEST(log->restarts("node/a") == 0);
  BOOST_TEST(!ask<bool>(sup, stop_atom::value, std::string("nope")));
}

// -- factory failures --------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(factory_error_counts_as_a_failure_and_is_retried) {
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_one),
                       {make_child(t, "a", {.failed_starts = 1}), make_child(t, "b")});
  BOOST_TEST(join(t->take()) == join({"refuse a 1", "start b 1", "start a 2"}));
  BOOST_TEST(static_cast<bool>(get(sup, "a")));
  BOOST_TEST(has_line("supervisor: node/a exited (failed: node/a: start refused)"));
  BOOST_TEST(log->restarts("node/a") == 1);
}

BOOST_AUTO_TEST_CASE(factory_that_always_fails_escalates) {
  auto sup =
      spawn_supervisor(sys, "node", flags_of(restart_strategy::one_for_one, 2, 5s),
                       {make_child(t, "b"), make_child(t, "a", {.failed_starts = 100})}, log);
  to_stop.push_back(caf::actor_cast<caf::actor>(sup));
  watch(sup, "node");
  sched.run();
  BOOST_TEST(join(t->take()) == join({"start b 1", "refuse a 1", "refuse a 2", "refuse a 3",
                                      "exit b user_shutdown", "down node failed"}));
  BOOST_TEST(log->count(supervision_event_kind::escalated, "node") == 1);
}

BOOST_AUTO_TEST_CASE(group_restart_handles_a_factory_failure_midway) {
  std::vector<child_spec> cs{make_child(t, "a"), make_child(t, "b", {.failed_starts = 2}),
                             make_child(t, "c")};
  // b's first two starts fail: each failure restarts the group (a stops; a, b, c start in
  // order), and c, whose start was still queued, starts only once.
  auto sup = spawn_sup(flags_of(restart_strategy::one_for_all, 5, 5s), std::move(cs));
  auto e = t->take();
  BOOST_TEST(join(e) ==
             join({"start a 1", "refuse b 1", "exit a user_shutdown", "start a 2", "refuse b 2",
                   "exit a user_shutdown", "start a 3", "start b 3", "start c 1"}));
  BOOST_TEST(list(sup).size() == 3u);
}

BOOST_AUTO_TEST_SUITE_END()

// -- the real scheduler ------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(exceptions_in_detached_children_are_failures_on_the_threaded_scheduler) {
  auto t = std::make_shared<tracker>();
  auto log = std::make_shared<supervision_log>([](const std::string&) {});
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  auto sup = spawn_supervisor(sys, "node", flags_of(restart_strategy::one_for_one),
                              {make_child(t, "a", {.detached = true})}, log);
  caf::scoped_actor self{sys};
  self->send(sup, subscribe_atom::value, caf::actor_cast<supervision_observer_actor>(self));
  auto next_start = [&]() {
    caf::actor out;
    self->receive([&](started_atom, const std::string&, const caf::actor& h) { out = h; },
                  caf::after(std::chrono::seconds(10)) >> [] {});
    return out;
  };
  auto first = next_start();
  BOOST_REQUIRE(first);
  self->send(first, throw_atom::value);
  auto second = next_start();
  BOOST_REQUIRE(second);
  BOOST_TEST((second != first));
  BOOST_TEST(log->restarts("node/a") == 1);
  auto events = log->events();
  auto exited = std::find_if(events.begin(), events.end(), [](const supervision_event& e) {
    return e.kind == supervision_event_kind::exited;
  });
  BOOST_REQUIRE(exited != events.end());
  BOOST_TEST(exited->reason == "runtime_error");
  self->monitor(sup);
  caf::anon_send_exit(sup, caf::exit_reason::user_shutdown);
  bool down = false;
  self->receive([&](caf::down_msg& m) { down = m.reason == caf::exit_reason::user_shutdown; },
                caf::after(std::chrono::seconds(10)) >> [] {});
  BOOST_TEST(down);
  BOOST_TEST(log->count(supervision_event_kind::stopped, "node/a") == 1);
}
