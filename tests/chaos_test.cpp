#define BOOST_TEST_MODULE chaos_test
#include <boost/test/unit_test.hpp>

// Chaos tests of cross-node failover: real keel-node processes on 127.0.0.1 (tests/cluster.hpp),
// killed with SIGKILL, stopped with SIGSTOP, or restarted on a corrupted store, while clients
// (wire/client.hpp, one thread and one client per conversation, connected to every node) hold
// conversations. Each case compares every conversation with the same conversation run on one
// fault-free keel-node without peers: the same prompt and generated ids for every turn, from
// generate() and from history() read back from the cluster, and no acknowledged turn lost.
//
// Sampling is keyed by (session seed, turn, index) and the kernels are deterministic, so a
// fault-free run is the exact expectation, whatever node computes which token.

#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "storage/session_store.hpp"
#include "actors/ownership_codec.hpp"
#include "tests/cluster.hpp"
#include "tests/test_support.hpp"
#include "wire/client.hpp"

namespace {

using namespace std::chrono_literals;
using keel::errc;
using keel::finish_reason;
using keel::test::cluster;
using keel::test::cluster_config;
using keel::wire::client;
using keel::wire::failover_event;
using keel::wire::turn_record;
using clock_type = std::chrono::steady_clock;

constexpr int heartbeat_ms = 100;
constexpr int down_after_ms = 500;

// -- the model ---------------------------------------------------------------------------------

/// The synthetic model every case uses, made once: the default synth size (about 1 ms per token
/// on one thread here), with a context long enough for case 3's long reply.
struct model_file {
  keel::test::temp_dir dir{"chaos_test-" + std::to_string(getpid())};  // runs may overlap
  std::string path = (dir.path / "model.gguf").string();

  model_file() {
    keel::synth_options o;
    o.ctx = 2048;
    keel::test::write_model(path, o);
  }
};

model_file& model() {
  static model_file m;
  return m;
}

/// The chaos tests' cluster: by default a and b in region r1, c in r2, each node's data
/// directory in a temporary directory of its own, each serving the admin API (for partitions);
/// started, and its region links given time to come up.
struct three_nodes {
  keel::test::temp_dir root;
  cluster cl;

  explicit three_nodes(const std::string& label, int down_after = down_after_ms,
                       std::vector<keel::test::node_spec> specs = two_regions())
      : root("chaos_test-" + label), cl(config(label, root.path, down_after), std::move(specs)) {
    cl.start_all();
    BOOST_TEST_MESSAGE("region links up: " << (cl.wait_all_links_up(5s) ? "yes" : "not seen"));
  }

  static cluster_config config(const std::string& label, const std::filesystem::path& root,
                               int down_after) {
    cluster_config cfg;
    cfg.model = model().path;
    cfg.root = root;
    cfg.heartbeat_ms = heartbeat_ms;
    cfg.down_after_ms = down_after;
    cfg.label = label;
    cfg.admin = true;
    return cfg;
  }
  static std::vector<keel::test::node_spec> two_regions() {
    return {{"a", "r1"}, {"b", "r1"}, {"c", "r2"}};
  }
  static std::vector<keel::test::node_spec> three_regions() {
    return {{"a", "r1"}, {"b", "r2"}, {"c", "r3"}};
  }
};

// -- conversations -----------------------------------------------------------------------------

/// What a conversation says: its sampling parameters and turns, and (under chaos) how long its
/// user thinks before each turn.
struct conversation {
  size_t index = 0;
  keel::sampling_params params;
  std::vector<std::string> texts;
  std::vector<uint32_t> max_tokens;
  std::vector<std::chrono::milliseconds> think;  // before each turn; empty for none
};

/// One turn as the client got it.
struct turn_outcome {
  uint64_t turn = 0;
  std::vector<int32_t> prompt;
  std::vector<int32_t> generated;
  finish_reason reason = finish_reason::length;
  bool adopted = false;  // the send failed unacknowledged, but the cluster had recorded the turn
};

/// What happened to one conversation. Written by its own thread only; read after the join.
struct conversation_run {
  std::string session;
  std::vector<turn_outcome> turns;
  std::string error;                  // why it stopped early; "" when it completed
  std::vector<std::string> problems;  // stream anomalies seen by the handlers
  std::vector<failover_event> failovers;
  std::vector<std::string> retries;  // unacknowledged sends retried, and why
};

/// What the main thread may watch of a running conversation.
struct live_state {
  std::atomic<bool> opened{false};
  std::atomic<bool> finished{false};
  std::atomic<int> turn{-1};           // the turn (index into the conversation) being sent
  std::atomic<bool> streaming{false};  // that turn was accepted and has not returned yet
  std::atomic<size_t> tokens{0};       // tokens received of that turn so far

  /// The endpoint the client streams from.
  std::string via() const {
    std::lock_guard<std::mutex> g(mu_);
    return via_;
  }
  void set_via(std::string endpoint) {
    std::lock_guard<std::mutex> g(mu_);
    via_ = std::move(endpoint);
  }

 private:
  mutable std::mutex mu_;
  std::string via_;
};

struct run_options {
  std::vector<std::string> endpoints;
  clock_type::time_point deadline;
  std::chrono::milliseconds connect_timeout{1000};
  bool think = false;
  /// Called on the conversation's thread before each turn, after the think time.
  std::function<void(size_t turn)> before_turn;
};

bool retryable(const caf::error& e) {
  auto c = keel::code_of(e);
  return c == errc::overloaded || c == errc::disconnected;
}

void sleep_until_or(clock_type::time_point t, clock_type::time_point deadline) {
  std::this_thread::sleep_until(std::min(t, deadline));
}

std::string duration_ms(clock_type::duration d) {
  return std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(d).count()) + " ms";
}

/// Holds one conversation through `opts.endpoints` (a client of its own, on this thread). A turn
/// whose send fails with `overloaded` or `disconnected` before the node accepted it is sent
/// again on a new connection; but when the failure was a broken connection, the node may have
/// recorded the turn before it died, so the history is read first and a turn found there is
/// waited for and adopted instead of sent twice. A turn once accepted must complete (resumed by
/// the client across failovers); anything else ends the conversation with `error`.
void converse(const conversation& c, const run_options& opts, live_state& live,
              conversation_run& out) {
  client::options co;
  co.connect_timeout = opts.connect_timeout;
  co.call_timeout = 15s;
  co.resume_for = 20s;
  co.on_failover = [&out, &live](const failover_event& e) {
    out.failovers.push_back(e);
    live.set_via(e.to);
  };
  std::unique_ptr<client> cl;
  auto past_deadline = [&] { return clock_type::now() >= opts.deadline; };

  auto connect = [&]() -> bool {
    std::string last;
    while (!past_deadline()) {
      auto r = client::connect(opts.endpoints, co);
      if (r) {
        cl = std::move(*r);
        return true;
      }
      last = keel::describe(r.error());
      std::this_thread::sleep_for(100ms);
    }
    out.error = "could not connect before the deadline: " + last;
    return false;
  };

  /// The session's history, retried (with a new connection after a broken one) until an
  /// answer or the deadline.
  auto read_history = [&]() -> caf::expected<std::vector<turn_record>> {
    caf::error last;
    auto until = std::min(opts.deadline, clock_type::now() + 15s);
    while (clock_type::now() < until) {
      if (!cl && !connect()) break;
      auto h = cl->history(out.session);
      if (h) return h;
      last = h.error();
      if (keel::code_of(last) == errc::disconnected) cl.reset();
      std::this_thread::sleep_for(100ms);
    }
    return last ? last : keel::make_error(errc::failed, "deadline passed");
  };

  struct finish_guard {
    live_state& l;
    ~finish_guard() {
      l.streaming = false;
      l.finished = true;
    }
  } guard{live};

  // Open the session. A lost answer may leave an unused session behind: harmless.
  while (true) {
    if (!cl && !connect()) return;
    auto s = cl->open_session(c.params);
    if (s) {
      out.session = *s;
      break;
    }
    if (!retryable(s.error()) || past_deadline()) {
      out.error = "open_session: " + keel::describe(s.error());
      return;
    }
    out.retries.push_back("open_session: " + keel::describe(s.error()));
    cl.reset();
    std::this_thread::sleep_for(200ms);
  }
  live.opened = true;

  for (size_t t = 0; t < c.texts.size(); ++t) {
    // Think times count from the previous turn's end (the first from the session's opening).
    if (opts.think && t < c.think.size())
      sleep_until_or(clock_type::now() + c.think[t], opts.deadline);
    if (opts.before_turn) opts.before_turn(t);
    live.tokens = 0;
    live.turn = static_cast<int>(t);
    while (true) {
      if (!cl && !connect()) return;
      bool accepted = false;
      uint64_t accepted_turn = 0;
      std::vector<int32_t> streamed;
      auto on_accept = [&](uint64_t turn, const std::vector<int32_t>&) {
        accepted = true;
        accepted_turn = turn;
        live.set_via(cl->endpoint());
        live.tokens = 0;
        live.streaming = true;
      };
      auto on_token = [&](uint64_t turn, uint64_t index, int32_t id, std::string_view) {
        if (!accepted || turn != accepted_turn)
          out.problems.push_back("turn " + std::to_string(t) + ": token of turn " +
                                 std::to_string(turn) + " before or outside the accepted turn");
        if (index != streamed.size())
          out.problems.push_back("turn " + std::to_string(t) + ": token index " +
                                 std::to_string(index) + " where " +
                                 std::to_string(streamed.size()) + " was next");
        streamed.push_back(id);
        ++live.tokens;
      };
      auto g = cl->generate(out.session, c.texts[t], c.max_tokens[t], on_token, on_accept);
      live.streaming = false;
      if (g) {
        if (g->generated != streamed)
          out.problems.push_back("turn " + std::to_string(t) +
                                 ": generate() returned other ids than on_token saw");
        if (g->turn != accepted_turn)
          out.problems.push_back("turn " + std::to_string(t) + ": generate() returned turn " +
                                 std::to_string(g->turn) + ", accepted as turn " +
                                 std::to_string(accepted_turn));
        out.turns.push_back({g->turn, g->prompt, g->generated, g->reason, false});
        break;
      }
      auto why = keel::describe(g.error());
      if (accepted) {
        out.error = "turn " + std::to_string(t) + " (turn " + std::to_string(accepted_turn) +
                    ") was accepted, then failed after " + std::to_string(streamed.size()) +
                    " tokens: " + why;
        return;
      }
      if (!retryable(g.error()) || past_deadline()) {
        out.error = "turn " + std::to_string(t) + " was refused: " + why;
        return;
      }
      out.retries.push_back("turn " + std::to_string(t) + ": " + why);
      auto pause = keel::wire::retry_after_ms(g.error());
      std::this_thread::sleep_for(
          std::chrono::milliseconds(std::clamp<uint32_t>(pause, 100, 1000)));
      cl.reset();
      if (keel::code_of(g.error()) != errc::disconnected) continue;  // overloaded: not recorded
      auto h = read_history();
      if (!h) {
        out.error = "turn " + std::to_string(t) +
                    ": history after a failed send: " + keel::describe(h.error());
        return;
      }
      if (h->size() == out.turns.size()) continue;  // not recorded: send it again
      if (h->size() != out.turns.size() + 1) {
        out.error = "turn " + std::to_string(t) + ": after a failed send the history has " +
                    std::to_string(h->size()) + " turns, expected " +
                    std::to_string(out.turns.size()) + " or one more";
        return;
      }
      // Recorded before the connection broke: wait for it to end, then take it.
      auto until = std::min(opts.deadline, clock_type::now() + 15s);
      while (!h->back().done && clock_type::now() < until) {
        std::this_thread::sleep_for(100ms);
        auto again = read_history();
        if (again && again->size() == h->size()) h = std::move(again);
      }
      if (!h->back().done) {
        out.error = "turn " + std::to_string(t) + ": recorded but never finished";
        return;
      }
      auto& r = h->back();
      out.turns.push_back({r.turn, r.prompt, r.generated, r.reason, true});
      out.retries.back() += " (the cluster had recorded it: adopted, not sent again)";
      break;
    }
  }
}

/// How `run_all` runs its conversations.
struct run_settings {
  bool think = false;              // sleep each conversation's think times
  std::chrono::seconds limit{60};  // no retry or reconnect starts after this
  std::chrono::milliseconds connect_timeout{1000};
};

/// Runs every conversation at once, one thread each; conversation i uses `endpoints(i)`. While
/// they run, `meanwhile` runs on the calling thread. Joins them all before returning.
void run_all(const std::vector<conversation>& convs,
             const std::function<std::vector<std::string>(size_t)>& endpoints,
             const run_settings& settings, std::vector<conversation_run>& runs,
             std::vector<std::unique_ptr<live_state>>& live,
             const std::function<void()>& meanwhile = {},
             const std::function<void(size_t conv, size_t turn)>& before_turn = {}) {
  runs.assign(convs.size(), {});
  live.clear();
  for (size_t i = 0; i < convs.size(); ++i) live.push_back(std::make_unique<live_state>());
  auto deadline = clock_type::now() + settings.limit;
  {
    std::vector<std::jthread> threads;
    for (size_t i = 0; i < convs.size(); ++i) {
      run_options o;
      o.endpoints = endpoints(i);
      o.deadline = deadline;
      o.think = settings.think;
      o.connect_timeout = settings.connect_timeout;
      if (before_turn) o.before_turn = [&before_turn, i](size_t t) { before_turn(i, t); };
      threads.emplace_back([&, i, o = std::move(o)] { converse(convs[i], o, *live[i], runs[i]); });
    }
    if (meanwhile) meanwhile();
  }  // joined here: every client bounds its calls (call_timeout, resume_for, the deadline)
}

// -- comparisons -------------------------------------------------------------------------------

std::string ids(const std::vector<int32_t>& v, size_t from, size_t n) {
  std::ostringstream o;
  for (size_t i = from; i < v.size() && i < from + n; ++i) o << (i > from ? " " : "") << v[i];
  return o.str();
}

/// "" when equal; otherwise the lengths and the first difference.
std::string difference(const std::vector<int32_t>& got, const std::vector<int32_t>& want) {
  if (got == want) return {};
  size_t i = 0;
  while (i < got.size() && i < want.size() && got[i] == want[i]) ++i;
  std::ostringstream o;
  o << got.size() << " ids where " << want.size() << " were expected, first difference at index "
    << i << ": got [" << ids(got, i, 8) << "], expected [" << ids(want, i, 8) << "]";
  return o.str();
}

/// "" when `got` has exactly the turns of `want`: turn numbers, prompt ids, generated ids and
/// finish reasons.
std::string compare_turns(const std::vector<turn_outcome>& got,
                          const std::vector<turn_outcome>& want) {
  std::ostringstream o;
  if (got.size() != want.size())
    o << got.size() << " turns where " << want.size() << " were expected; ";
  for (size_t t = 0; t < got.size() && t < want.size(); ++t) {
    if (got[t].turn != want[t].turn)
      o << "turn " << t << " is numbered " << got[t].turn << ", expected " << want[t].turn << "; ";
    if (auto d = difference(got[t].prompt, want[t].prompt); !d.empty())
      o << "turn " << t << " prompt: " << d << "; ";
    if (auto d = difference(got[t].generated, want[t].generated); !d.empty())
      o << "turn " << t << " reply: " << d << "; ";
    if (got[t].reason != want[t].reason)
      o << "turn " << t << " ended by " << got[t].reason << ", expected " << want[t].reason << "; ";
  }
  return o.str();
}

/// The same for a history read back from a node: every turn must also be done.
std::string compare_history(const std::vector<turn_record>& h,
                            const std::vector<turn_outcome>& want) {
  std::vector<turn_outcome> got;
  std::string open;
  for (auto& r : h) {
    got.push_back({r.turn, r.prompt, r.generated, r.reason, false});
    if (!r.done) open += "turn " + std::to_string(r.turn) + " is not done; ";
  }
  return open + compare_turns(got, want);
}

/// A summary of a run for failure messages.
std::string summary(const conversation_run& r) {
  std::ostringstream o;
  o << "session " << (r.session.empty() ? "(none)" : r.session) << ", " << r.turns.size()
    << " turns";
  if (!r.error.empty()) o << ", error: " << r.error;
  for (auto& p : r.problems) o << "; problem: " << p;
  for (auto& x : r.retries) o << "; retried: " << x;
  for (auto& f : r.failovers)
    o << "; failover of turn " << f.turn << " at index " << f.from_index << " from " << f.from
      << " to " << f.to << " (" << f.to_node << ") in " << f.duration.count() << " ms";
  return o.str();
}

/// The history of `session` read through a client connected only to `address`. Errors are
/// retried until `patience` runs out (a restarted node may still be reconciling); the first
/// answer is returned as it is, since a wrong answer is a finding, not a transient.
caf::expected<std::vector<turn_record>> history_at(const std::string& address,
                                                   const std::string& session,
                                                   std::chrono::milliseconds patience) {
  auto until = clock_type::now() + patience;
  client::options co;
  co.connect_timeout = 1000ms;
  co.call_timeout = 5000ms;
  caf::error last;
  while (true) {
    auto c = client::connect({address}, co);
    if (c) {
      auto h = (*c)->history(session);
      if (h) return h;
      last = h.error();
    } else {
      last = c.error();
    }
    if (clock_type::now() >= until) return last;
    std::this_thread::sleep_for(200ms);
  }
}

/// Checks that every live node of `cl` answers history() of every conversation with its
/// fault-free transcript. A node's errors are retried while `patience` (for all its reads
/// together) lasts; after that each read gets one try. Nodes that crashed are left to
/// `check_no_crash`.
void check_history_everywhere(cluster& cl, const std::vector<conversation_run>& runs,
                              const std::vector<conversation_run>& reference,
                              std::chrono::milliseconds patience = 10s) {
  for (size_t n = 0; n < cl.size(); ++n) {
    if (!cl.alive(n)) continue;
    auto until = clock_type::now() + patience;
    for (size_t i = 0; i < runs.size(); ++i) {
      if (runs[i].session.empty()) continue;
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(until - clock_type::now());
      auto h = history_at(cl.address(n), runs[i].session, std::max(left, 0ms));
      BOOST_TEST_CONTEXT("history of conversation " << i << " (" << runs[i].session
                                                    << ") read from node " << cl.name(n)) {
        BOOST_TEST(static_cast<bool>(h), keel::test::why(h));
        if (h) {
          auto d = compare_history(*h, reference[i].turns);
          BOOST_TEST(d.empty(), d);
        }
      }
    }
  }
}

/// Checks that no node of `cl` ended on its own (a crash, an abort, an exit).
void check_no_crash(cluster& cl) {
  auto exits = cl.unexpected_exits();
  BOOST_TEST(exits.empty(), "nodes ended without being asked: " << exits);
}

/// Checks that each run completed, saw a clean stream, and equals its reference.
void check_transcripts(const std::vector<conversation_run>& runs,
                       const std::vector<conversation_run>& reference) {
  for (size_t i = 0; i < runs.size(); ++i) {
    BOOST_TEST_CONTEXT("conversation " << i << ": " << summary(runs[i])) {
      BOOST_TEST(runs[i].error.empty());
      BOOST_TEST(runs[i].problems.empty());
      auto d = compare_turns(runs[i].turns, reference[i].turns);
      BOOST_TEST(d.empty(), d);
    }
  }
}

/// The fault-free transcripts: the same conversations, all at once, on one keel-node without
/// peers, no think times.
std::vector<conversation_run> fault_free(const std::vector<conversation>& convs,
                                         const std::string& label) {
  keel::test::temp_dir root{"chaos_test-" + std::to_string(getpid()) + "-" + label + "-ref"};
  cluster_config cfg;
  cfg.model = model().path;
  cfg.root = root.path;
  cfg.label = label + "-reference";
  std::vector<conversation_run> runs;
  {
    cluster ref(cfg, {{"ref", ""}});
    ref.start_all();
    std::vector<std::unique_ptr<live_state>> live;
    auto t0 = clock_type::now();
    run_all(
        convs, [&](size_t) { return ref.endpoints(); }, {}, runs, live);
    BOOST_TEST_MESSAGE("fault-free run of " << convs.size() << " conversation(s): "
                                            << duration_ms(clock_type::now() - t0));
    for (size_t i = 0; i < runs.size(); ++i) {
      BOOST_REQUIRE_MESSAGE(
          runs[i].error.empty() && runs[i].problems.empty() && runs[i].retries.empty(),
          "the fault-free run of conversation " << i << " failed: " << summary(runs[i]));
      BOOST_REQUIRE_EQUAL(runs[i].turns.size(), convs[i].texts.size());
      auto h = history_at(ref.address(0), runs[i].session, 2s);
      BOOST_REQUIRE_MESSAGE(h, "fault-free history: " << keel::test::why(h));
      auto d = compare_history(*h, runs[i].turns);
      BOOST_REQUIRE_MESSAGE(d.empty(),
                            "the fault-free node's history differs from its replies: " << d);
    }
  }
  return runs;
}

/// Whether `text` names `id` as a whole (not "s-1" inside "s-10").
bool names(const std::string& text, const std::string& id) {
  auto word = [](char ch) { return std::isalnum(static_cast<unsigned char>(ch)) != 0; };
  for (auto at = text.find(id); at != std::string::npos; at = text.find(id, at + 1)) {
    bool left = at == 0 || !word(text[at - 1]) || !word(id.front());
    bool right = at + id.size() == text.size() || !word(text[at + id.size()]) || !word(id.back());
    if (left && right) return true;
  }
  return false;
}

std::string lower(std::string s) {
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

/// The lines of `text` for which `pred` holds.
std::vector<std::string> lines_where(const std::string& text,
                                     const std::function<bool(const std::string&)>& pred) {
  std::vector<std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line))
    if (pred(line)) out.push_back(line);
  return out;
}

/// A store key that holds session `id`: the id itself, or a key ending in "/ID" (a replica kept
/// under a prefix).
bool key_of(const std::string& key, const std::string& id) {
  return key == id || (key.size() > id.size() + 1 && key.ends_with("/" + id));
}

/// The failovers of every run, for BOOST_TEST_MESSAGE.
std::string failover_report(const std::vector<conversation_run>& runs) {
  std::ostringstream o;
  size_t n = 0;
  int64_t worst = 0, total = 0;
  for (size_t i = 0; i < runs.size(); ++i)
    for (auto& f : runs[i].failovers) {
      ++n;
      total += f.duration.count();
      worst = std::max<int64_t>(worst, f.duration.count());
      o << "\n  conversation " << i << " (" << f.session << ") turn " << f.turn << ": from "
        << f.from << " to " << f.to << " (" << f.to_node << ") at index " << f.from_index << " in "
        << f.duration.count() << " ms";
    }
  std::ostringstream head;
  head << n << " client failovers";
  if (n > 0)
    head << ", mean " << total / static_cast<int64_t>(n) << " ms, worst " << worst << " ms";
  return head.str() + o.str();
}

const std::vector<std::string> phrases = {
    "Hello there",      "Tell me a story",
    "What is 2+2?",     "Why?",
    "And then what?",   "Go on",
    "Say it again",     "Once upon a time",
    "How does it end?", "Explain it simply",
    "Thanks!",          "What next?",
};

}  // namespace

// -----------------------------------------------------------------------------------------------

static void sigkill_schedule() {
  // Three nodes in two regions; 20 conversations, each with its own client connected to all
  // three (rotated, so each node starts a third of them); a seeded schedule kills one node at a
  // time with SIGKILL while turns stream, and restarts it on the same data and ports.
  constexpr uint32_t seed = 20261122;
  constexpr size_t conversations = 20, turns = 3, kills = 5;
  BOOST_TEST_MESSAGE("chaos seed " << seed);
  std::mt19937 rng(seed);
  auto uniform = [&rng](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };

  std::vector<conversation> convs;
  for (size_t i = 0; i < conversations; ++i) {
    conversation c;
    c.index = i;
    static const float temperatures[] = {0.7f, 0.9f, 1.0f, 1.2f};
    c.params.temperature = i % 3 == 0 ? 0.0f : temperatures[uniform(0, 3)];  // greedy and sampled
    c.params.seed = 1000 + i;
    if (i % 5 == 2) c.params.top_k = 40;
    for (size_t t = 0; t < turns; ++t) {
      c.texts.push_back(phrases[static_cast<size_t>(uniform(0, int(phrases.size()) - 1))]);
      c.max_tokens.push_back(static_cast<uint32_t>(uniform(24, 40)));
      // Spread the conversations over the schedule: the first turn starts at a random moment.
      c.think.push_back(std::chrono::milliseconds(t == 0 ? uniform(0, 10000) : uniform(200, 1800)));
    }
    convs.push_back(std::move(c));
  }
  struct kill_step {
    std::chrono::milliseconds before;  // after the previous node is back
    size_t victim;
    std::chrono::milliseconds down;  // before the restart
  };
  // Every node dies at least once (c alone holds region r2), then random ones.
  std::vector<size_t> victims = {0, 1, 2};
  std::shuffle(victims.begin(), victims.end(), rng);
  while (victims.size() < kills) victims.push_back(static_cast<size_t>(uniform(0, 2)));
  std::vector<kill_step> schedule;
  for (size_t k = 0; k < kills; ++k) {
    kill_step s;
    s.before = std::chrono::milliseconds(uniform(300, 1200));
    s.victim = victims[k];
    // Below and above down_after: a node back before it is declared down, and one taken over.
    s.down = std::chrono::milliseconds(uniform(150, 1500));
    schedule.push_back(s);
  }
  {
    std::ostringstream o;
    o << "schedule:";
    for (size_t k = 0; k < schedule.size(); ++k)
      o << "\n  kill " << k + 1 << ": node "
        << "abc"[schedule[k].victim] << ", " << schedule[k].before.count()
        << " ms after the cluster is whole again (then as soon as a turn streams through it, "
           "waiting at most 1.5 s), restarted "
        << schedule[k].down.count() << " ms later";
    for (auto& c : convs) {
      o << "\n  conversation " << c.index << ": temperature " << c.params.temperature << ", seed "
        << c.params.seed << (c.params.top_k ? ", top_k 40" : "") << ", first turn after "
        << c.think[0].count() << " ms";
      for (size_t t = 0; t < c.texts.size(); ++t)
        o << (t ? " | " : ": ") << '"' << c.texts[t] << "\" max " << c.max_tokens[t];
    }
    BOOST_TEST_MESSAGE(o.str());
  }

  auto reference = fault_free(convs, "kill");

  three_nodes net("kill", down_after_ms, three_nodes::two_regions());
  auto& cl = net.cl;

  std::vector<conversation_run> runs;
  std::vector<std::unique_ptr<live_state>> live;
  std::vector<std::string> timeline;
  auto t0 = clock_type::now();
  auto at = [&] { return duration_ms(clock_type::now() - t0); };
  // Turns streaming, in all and through node `n`.
  auto streaming = [&] {
    size_t n = 0;
    for (auto& l : live) n += l->streaming ? 1 : 0;
    return n;
  };
  auto streaming_via = [&](size_t node) {
    size_t n = 0;
    for (auto& l : live) n += l->streaming && l->via() == cl.address(node) ? 1 : 0;
    return n;
  };
  auto all_finished = [&] {
    return std::all_of(live.begin(), live.end(), [](auto& l) { return l->finished.load(); });
  };

  run_all(
      convs, [&](size_t i) { return cl.endpoints(i % 3); }, {.think = true, .limit = 50s}, runs,
      live,
      [&] {
        // The chaos schedule runs here, on the test's main thread (it starts the processes).
        auto opened_by = clock_type::now() + 10s;
        while (clock_type::now() < opened_by && !std::all_of(live.begin(), live.end(), [](auto& l) {
                 return l->opened || l->finished;
               }))
          std::this_thread::sleep_for(10ms);
        t0 = clock_type::now();
        for (auto& step : schedule) {
          if (auto exits = cl.unexpected_exits(); !exits.empty()) {
            timeline.push_back(at() + ": schedule abandoned: " + exits);
            break;
          }
          std::this_thread::sleep_for(step.before);
          // A random moment, but one that cuts a stream when there is one to cut.
          auto wait_stream = clock_type::now() + 1500ms;
          while (streaming_via(step.victim) == 0 && !all_finished() &&
                 clock_type::now() < wait_stream)
            std::this_thread::sleep_for(1ms);
          auto through = streaming_via(step.victim);
          auto active = streaming();
          cl.kill(step.victim);
          auto killed = clock_type::now();
          timeline.push_back(at() + ": SIGKILL " + cl.name(step.victim) + " (" +
                             std::to_string(active) + " turns streaming, " +
                             std::to_string(through) + " of them through it)");
          std::this_thread::sleep_until(killed + step.down);
          cl.start(step.victim);
          timeline.push_back(at() + ": " + cl.name(step.victim) + " listening again, " +
                             duration_ms(clock_type::now() - killed) + " after the kill");
          bool links = cl.wait_all_links_up(5s);
          timeline.push_back(at() + ": " + (links ? "all links up" : "links not all seen up"));
        }
        timeline.push_back(at() + ": schedule done");
      });
  timeline.push_back(at() + ": every conversation ended");
  {
    std::string t;
    for (auto& line : timeline) t += "\n  " + line;
    BOOST_TEST_MESSAGE("timeline:" << t);
  }
  BOOST_TEST_MESSAGE(failover_report(runs));

  check_no_crash(cl);
  check_transcripts(runs, reference);
  cl.wait_all_links_up(3s);
  check_history_everywhere(cl, runs, reference);
}

BOOST_AUTO_TEST_CASE(conversations_survive_repeated_sigkill_of_random_nodes_with_restarts) {
  sigkill_schedule();
}

static void region_loss() {
  // Three regions, one node each (the layout that survives a region's loss: docs/operations.md).
  // a (r1) and b (r2) start every conversation. Region r1 dies with SIGKILL while every
  // conversation streams its second turn: the streams of a's conversations go on from b or c,
  // and both survivors serve every session's full history. (Losing the larger region of two
  // loses the majority: that case is refused, see the partition tests.)
  constexpr size_t conversations = 8;
  std::vector<conversation> convs;
  for (size_t i = 0; i < conversations; ++i) {
    conversation c;
    c.index = i;
    c.params.temperature = i % 4 == 3 ? 0.0f : 0.9f;
    c.params.seed = 2000 + i;
    c.texts = {phrases[i % phrases.size()], "Tell me more"};
    c.max_tokens = {24, 400};
    convs.push_back(std::move(c));
  }
  auto reference = fault_free(convs, "region");
  size_t long_ones = 0;
  for (auto& r : reference) long_ones += r.turns.at(1).generated.size() >= 150 ? 1 : 0;
  BOOST_REQUIRE_MESSAGE(long_ones >= conversations / 2,
                        "only " << long_ones << " second replies run long enough to be cut");

  three_nodes net("region", down_after_ms, three_nodes::three_regions());
  auto& cl = net.cl;

  // Every conversation starts its second turn together.
  std::atomic<size_t> at_gate{0};
  auto gate = [&](size_t, size_t turn) {
    if (turn != 1) return;
    ++at_gate;
    auto until = clock_type::now() + 15s;
    while (at_gate < conversations && clock_type::now() < until) std::this_thread::sleep_for(2ms);
  };
  std::vector<conversation_run> runs;
  std::vector<std::unique_ptr<live_state>> live;
  std::vector<size_t> tokens_at_kill(conversations, 0);
  std::vector<bool> mid_turn(conversations, false);
  std::vector<std::string> via_at_kill(conversations);
  clock_type::time_point killed;
  run_all(
      convs, [&](size_t i) { return cl.endpoints(i % 2); }, {.limit = 50s}, runs, live,
      [&] {
        // Until every conversation is 10 tokens into its second reply (or done with it).
        auto until = clock_type::now() + 20s;
        auto ready = [&] {
          for (auto& l : live) {
            bool second = l->turn == 1 && (l->streaming ? l->tokens >= 10 : l->tokens > 0);
            if (!l->finished && !second) return false;
          }
          return true;
        };
        while (!ready() && clock_type::now() < until) std::this_thread::sleep_for(1ms);
        // Seen before the kill, as in sigkill_schedule: kill() returns once the node is reaped,
        // and by then a client may have failed over and name its new node (the ASan build under
        // load: all four conversations of a were counted as not streaming from a).
        for (size_t i = 0; i < conversations; ++i) {
          via_at_kill[i] = live[i]->via();
          tokens_at_kill[i] = live[i]->tokens;
          mid_turn[i] = live[i]->turn == 1 && live[i]->streaming;
        }
        cl.kill({0});
        killed = clock_type::now();
      },
      gate);
  BOOST_TEST_MESSAGE("region r1 killed; the last conversation ended "
                     << duration_ms(clock_type::now() - killed) << " later");
  BOOST_TEST_MESSAGE(failover_report(runs));
  size_t cut = 0;
  for (size_t i = 0; i < conversations; ++i) {
    BOOST_TEST_MESSAGE("conversation " << i << ": " << tokens_at_kill[i] << " of "
                                       << reference[i].turns[1].generated.size()
                                       << " tokens of its second reply when r1 died"
                                       << (mid_turn[i] ? " (mid-stream)" : ""));
    if (!mid_turn[i] || via_at_kill[i] != cl.address(0)) continue;
    ++cut;
    // It was streaming from a: it can only have ended through a failover to b or c.
    BOOST_TEST(!runs[i].failovers.empty(),
               "conversation " << i << " was cut mid-stream but reports no failover: "
                               << summary(runs[i]));
    for (auto& f : runs[i].failovers) BOOST_TEST(f.to != cl.address(0), summary(runs[i]));
  }
  BOOST_TEST(cut >= 1u, "no conversation was mid-stream when the region died: nothing tested");
  check_no_crash(cl);
  check_transcripts(runs, reference);
  check_history_everywhere(cl, runs, reference);
}

BOOST_AUTO_TEST_CASE(conversations_continue_in_the_other_regions_when_a_whole_region_is_killed) {
  region_loss();
}

bool contains(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

/// A client of node `i` alone (no other endpoint, no resuming): what a minority answers.
std::unique_ptr<client> client_of(cluster& cl, size_t i) {
  client::options co;
  co.connect_timeout = 1000ms;
  co.call_timeout = 5000ms;
  co.resume_for = 0ms;
  auto c = client::connect({cl.address(i)}, co);
  BOOST_REQUIRE_MESSAGE(c, "cannot connect to " << cl.name(i) << ": " << keel::test::why(c));
  return std::move(*c);
}

/// Runs `fault NODE partition --from ...` through node `i`'s admin endpoint.
void partition(cluster& cl, size_t i, const std::string& from, int ms) {
  auto [st, out] = cl.shell(i, "fault " + cl.name(i) + " partition --from " + from + " --ms " +
                                   std::to_string(ms));
  BOOST_REQUIRE_MESSAGE(st == 0, "the partition fault failed: " << out);
  BOOST_TEST_MESSAGE(out);
}

/// A probe session opened through node `i` before a partition, with one finished turn.
std::string probe_session(cluster& cl, size_t i) {
  auto c = client_of(cl, i);
  keel::sampling_params p;
  p.seed = 77;
  auto s = c->open_session(p);
  BOOST_REQUIRE_MESSAGE(s, keel::test::why(s));
  auto g = c->generate(*s, "A probe before the partition", 8);
  BOOST_REQUIRE_MESSAGE(g, keel::test::why(g));
  return *s;
}

/// While node `i` is on the minority side: a new session and a new turn through it are refused
/// (a classified error), never acknowledged.
void expect_minority_refuses(cluster& cl, size_t i, const std::string& probe) {
  auto c = client_of(cl, i);
  keel::sampling_params p;
  p.seed = 78;
  auto s = c->open_session(p);
  BOOST_TEST(!s, "the minority node " << cl.name(i) << " opened session " << (s ? *s : ""));
  if (!s) BOOST_TEST_MESSAGE(cl.name(i) << " refused a new session: " << keel::describe(s.error()));
  auto g = c->generate(probe, "A turn sent to the minority", 8);
  BOOST_TEST(!g, "the minority node " << cl.name(i) << " acknowledged a turn of " << probe);
  if (!g) BOOST_TEST_MESSAGE(cl.name(i) << " refused a turn: " << keel::describe(g.error()));
}

static void minority_partition() {
  // Issue #10's first partition: {a, b} | {c} (c, alone in r2, holds replicas) while a and b
  // serve conversations. c is the minority: it takes nothing over and acknowledges nothing; a
  // and b go on serving; after the heal every node answers the same history, and every
  // acknowledged turn is in it.
  constexpr size_t conversations = 6;
  std::vector<conversation> convs;
  for (size_t i = 0; i < conversations; ++i) {
    conversation c;
    c.index = i;
    c.params.temperature = 0.8f;
    c.params.seed = 3000 + i;
    c.texts = {phrases[i % phrases.size()], "Go on", "And then?", "Finish the story"};
    c.max_tokens = {24, 48, 24, 48};
    c.think = {0ms, 400ms, 400ms, 400ms};
    convs.push_back(std::move(c));
  }
  auto reference = fault_free(convs, "minority");
  three_nodes net("minority", down_after_ms, three_nodes::two_regions());
  auto& cl = net.cl;
  auto probe = probe_session(cl, 2);  // owned by c, the side that will be the minority

  std::vector<conversation_run> runs;
  std::vector<std::unique_ptr<live_state>> live;
  std::vector<int> turn_at_cut(conversations), turn_at_heal(conversations);
  run_all(
      convs, [&](size_t i) { return cl.endpoints(i % 2); }, {.think = true, .limit = 60s}, runs,
      live, [&] {
        auto until = clock_type::now() + 20s;
        auto started = [&] {
          for (auto& l : live)
            if (!l->finished && l->turn < 1) return false;
          return true;
        };
        while (!started() && clock_type::now() < until) std::this_thread::sleep_for(5ms);
        partition(cl, 2, "a,b", 4000);
        auto cut = clock_type::now();
        for (size_t i = 0; i < conversations; ++i) turn_at_cut[i] = live[i]->turn;
        std::this_thread::sleep_for(1500ms);  // c has seen a and b down by now
        expect_minority_refuses(cl, 2, probe);
        std::this_thread::sleep_until(cut + 3900ms);
        for (size_t i = 0; i < conversations; ++i) turn_at_heal[i] = live[i]->turn;
      });
  BOOST_TEST_MESSAGE(failover_report(runs));
  int served = 0;
  for (size_t i = 0; i < conversations; ++i) served += turn_at_heal[i] - turn_at_cut[i];
  BOOST_TEST(served >= 1, "the majority side started no turn during the partition");
  BOOST_TEST_MESSAGE("turns started on the majority side during the partition: " << served);
  auto c_log = cl.log(2);
  BOOST_TEST(!contains(c_log, "took over session"), c_log);
  check_no_crash(cl);
  check_transcripts(runs, reference);
  check_history_everywhere(cl, runs, reference);
}

BOOST_AUTO_TEST_CASE(a_partitioned_minority_refuses_and_the_majority_serves_through_it) {
  minority_partition();
}

static void isolated_owner() {
  // Issue #10's second partition: {a} | {b, c} while a streams every conversation's long second
  // reply. a, alone, loses its lease: it stops streaming and acknowledges nothing; b and c (the
  // majority) take its sessions over; the clients resume there. After the heal a learns it lost
  // them, and every node answers the same history, equal to the fault-free run.
  constexpr size_t conversations = 4;
  std::vector<conversation> convs;
  for (size_t i = 0; i < conversations; ++i) {
    conversation c;
    c.index = i;
    c.params.temperature = i % 2 ? 0.0f : 0.9f;
    c.params.seed = 4000 + i;
    c.texts = {phrases[i % phrases.size()], "Tell me more"};
    // Long enough to outlast the lease (400 ms) at about a millisecond per token.
    c.max_tokens = {24, 1800};
    convs.push_back(std::move(c));
  }
  auto reference = fault_free(convs, "isolated");
  three_nodes net("isolated", down_after_ms, three_nodes::two_regions());
  auto& cl = net.cl;
  auto probe = probe_session(cl, 0);  // owned by a, the node that will be cut off

  std::vector<conversation_run> runs;
  std::vector<std::unique_ptr<live_state>> live;
  run_all(
      convs, [&](size_t) { return cl.endpoints(0); }, {.limit = 60s}, runs, live, [&] {
        auto until = clock_type::now() + 20s;
        auto streaming = [&] {
          for (auto& l : live)
            if (!l->finished && !(l->turn == 1 && l->streaming && l->tokens >= 10)) return false;
          return true;
        };
        while (!streaming() && clock_type::now() < until) std::this_thread::sleep_for(1ms);
        partition(cl, 0, "b,c", 3000);
        std::this_thread::sleep_for(1200ms);  // b and c have taken a's sessions over by now
        expect_minority_refuses(cl, 0, probe);
      });
  BOOST_TEST_MESSAGE(failover_report(runs));
  size_t moved = 0;
  for (size_t i = 0; i < conversations; ++i) {
    for (auto& f : runs[i].failovers) {
      // The client may reach the new owner through a (which forwards after the heal). a may
      // own a session again after the heal when the machine is so loaded
      // that its new owner's heartbeats stall past suspect_after (seen with a sanitizer build
      // beside the test): a stream that moves after the heal may go to a; safety is checked
      // below either way, and ownership_test checks deterministically that a returning owner
      // follows the new one.
      moved += f.to_node != cl.name(0) ? 1 : 0;
    }
  }
  BOOST_TEST(moved >= 1u, "no stream moved off the isolated node: nothing tested");
  // After the heal (and its links' reconnect backoff), a learns that the majority took its
  // sessions over and drops its copies; only then may every node be asked for the history.
  auto dropped = [&] {
    auto log = cl.log(0);
    for (auto& r : runs)
      if (!r.session.empty() && !contains(log, "session " + r.session + " was taken over"))
        return false;
    return contains(log, "session " + probe + " was taken over");
  };
  auto until = clock_type::now() + 20s;
  while (!dropped() && clock_type::now() < until) std::this_thread::sleep_for(50ms);
  BOOST_TEST(dropped(), "a did not learn that its sessions were taken over:\n" << cl.log(0));
  BOOST_TEST((contains(cl.log(1), "took over session") || contains(cl.log(2), "took over session")));
  check_no_crash(cl);
  check_transcripts(runs, reference);
  check_history_everywhere(cl, runs, reference);
}

BOOST_AUTO_TEST_CASE(an_isolated_owner_stops_and_the_majority_takes_its_sessions_over) {
  isolated_owner();
}

static void paused_owner() {
  // The node serving a long reply is stopped (SIGSTOP) for longer than down_after, so another
  // node takes the session over with a newer epoch; the client's reply completes from there.
  // Then the old owner continues (SIGCONT) believing it still owns the session: its late
  // writes must be refused (fencing), and every node must answer with the same history.

  // The synthetic model ends a reply at random: of a few candidates, take the one whose second
  // reply runs longest in the fault-free run.
  std::vector<conversation> candidates;
  for (uint64_t seed : {3001, 3002, 3003}) {
    conversation c;
    c.params.temperature = 0.9f;
    c.params.seed = seed;
    c.texts = {"Hello there", "Tell me everything"};
    c.max_tokens = {16, 1500};
    candidates.push_back(std::move(c));
  }
  auto references = fault_free(candidates, "pause");
  size_t pick = 0;
  for (size_t i = 1; i < references.size(); ++i)
    if (references[i].turns[1].generated.size() > references[pick].turns[1].generated.size())
      pick = i;
  auto c = candidates[pick];
  std::vector<conversation_run> reference = {references[pick]};
  auto long_reply = reference[0].turns[1].generated.size();
  BOOST_TEST_MESSAGE("seed " << c.params.seed << ": a second reply of " << long_reply << " tokens");
  BOOST_REQUIRE_MESSAGE(long_reply >= 600,
                        "the longest candidate reply has only " << long_reply << " tokens");

  three_nodes net("pause", down_after_ms, three_nodes::two_regions());
  auto& cl = net.cl;

  const size_t a = 0;
  std::vector<conversation_run> runs;
  std::vector<std::unique_ptr<live_state>> live;
  size_t at_stop = 0;
  std::vector<size_t> log_offsets(cl.size(), 0);
  bool stopped = false;
  clock_type::time_point paused_at, continued_at;
  run_all(
      // A short connect timeout: a stopped node still accepts connections (the kernel's
      // backlog) and would hold each reconnect round for the whole timeout.
      {c}, [&](size_t) { return cl.endpoints(a); }, {.limit = 45s, .connect_timeout = 400ms}, runs,
      live,
      [&] {
        auto until = clock_type::now() + 20s;
        while (!(live[0]->turn == 1 && live[0]->tokens >= 40) && !live[0]->finished &&
               clock_type::now() < until)
          std::this_thread::sleep_for(1ms);
        if (live[0]->finished) return;
        cl.pause(a);
        paused_at = clock_type::now();
        stopped = true;
        at_stop = live[0]->tokens;
        std::this_thread::sleep_for(std::chrono::milliseconds(down_after_ms + 1500));
        for (size_t n = 0; n < cl.size(); ++n) log_offsets[n] = cl.current_log(n).size();
        cl.resume(a);
        continued_at = clock_type::now();
      });
  BOOST_REQUIRE_MESSAGE(stopped,
                        "the reply ended before the node could be stopped: " << summary(runs[0]));
  BOOST_TEST_MESSAGE("a stopped after the client had " << at_stop << " of " << long_reply
                                                       << " tokens; stopped for "
                                                       << duration_ms(continued_at - paused_at));
  BOOST_TEST_MESSAGE(failover_report(runs));
  BOOST_TEST(at_stop < long_reply);
  BOOST_TEST(!runs[0].failovers.empty(), "no failover: " << summary(runs[0]));
  check_no_crash(cl);
  check_transcripts(runs, reference);

  // The old owner's late writes were refused: a member refuses its write for a higher ballot,
  // and the old owner says it lost the session.
  auto refused = [&](const std::string& line) {
    return lower(line).find("session " + runs[0].session + " was taken over") != std::string::npos;
  };
  auto late_logs = [&] {
    std::string all;
    for (size_t n = 0; n < cl.size(); ++n) {
      auto log = cl.current_log(n);
      all += "==== " + cl.name(n) + " after SIGCONT ====\n" +
             log.substr(std::min(log_offsets[n], log.size()));
    }
    return all;
  };
  auto until = clock_type::now() + 5s;
  while (lines_where(late_logs(), refused).empty() && clock_type::now() < until)
    std::this_thread::sleep_for(50ms);
  auto found = lines_where(late_logs(), refused);
  BOOST_TEST(!found.empty(),
             "no node logged a refused stale-epoch write after the old owner "
             "continued; their logs since then:\n"
                 << late_logs());
  for (auto& line : found) BOOST_TEST_MESSAGE("fenced: " << line);

  check_history_everywhere(cl, runs, reference);
}

BOOST_AUTO_TEST_CASE(a_paused_owner_is_taken_over_and_its_late_writes_are_refused) {
  paused_owner();
}

BOOST_AUTO_TEST_CASE(a_corrupt_session_record_is_recovered_from_a_replica_after_restart) {
  // A conversation's owner is stopped cleanly, its record of the session (the ownership
  // protocol's state) is corrupted on disk, and it is started again before the others would
  // suspect it (down_after is long here), so it comes back with a record it cannot read. It
  // must report the record by key, and the session goes on from its group's copies: every node
  // answers the full history, the next turn continues it exactly, and the owner's store no
  // longer holds a corrupt record.
  conversation c;
  c.params.temperature = 0.8f;
  c.params.seed = 4004;
  c.texts = {"Hello there", "And then what?", "How does it end?"};
  c.max_tokens = {30, 30, 30};
  auto reference = fault_free({c}, "corrupt");

  three_nodes net("corrupt", 5000);
  auto& cl = net.cl;
  const size_t a = 0;

  // The first two turns, on a.
  conversation first = c;
  first.texts.resize(2);
  first.max_tokens.resize(2);
  std::vector<conversation_run> runs;
  std::vector<std::unique_ptr<live_state>> live;
  run_all(
      {first}, [&](size_t) { return cl.endpoints(a); }, {.limit = 30s}, runs, live);
  BOOST_REQUIRE_MESSAGE(runs[0].error.empty(), summary(runs[0]));
  auto sid = runs[0].session;
  std::vector<conversation_run> two_turns = reference;
  two_turns[0].turns.resize(2);
  check_transcripts(runs, two_turns);
  check_history_everywhere(cl, runs, two_turns);

  std::this_thread::sleep_for(300ms);
  BOOST_TEST(cl.terminate(a) == 0, "a did not stop cleanly:\n" << cl.log(a));

  // Corrupt a's record of the session behind its back.
  std::string key;
  {
    auto store = keel::storage::session_store::open(cl.data_dir(a).string());
    BOOST_REQUIRE_MESSAGE(store, keel::test::why(store));
    auto scan = (*store)->scan_ownership();
    BOOST_REQUIRE_MESSAGE(scan, keel::test::why(scan));
    std::string listing;
    for (auto& [k, v] : scan->entries) {
      listing += " " + k;
      if (k == sid) key = k;
    }
    BOOST_REQUIRE_MESSAGE(!key.empty(), "a's store has no record under the session id "
                                            << sid << "; its keys:" << listing);
  }
  {
    rocksdb::DBOptions o;
    auto dir = cl.data_dir(a).string();
    std::vector<std::string> cf_names;
    auto st = rocksdb::DB::ListColumnFamilies(o, dir, &cf_names);
    BOOST_REQUIRE_MESSAGE(st.ok(), st.ToString());
    std::vector<rocksdb::ColumnFamilyDescriptor> descs;
    for (auto& n : cf_names) descs.emplace_back(n, rocksdb::ColumnFamilyOptions{});
    std::vector<rocksdb::ColumnFamilyHandle*> cfs;
    rocksdb::DB* db = nullptr;
    st = rocksdb::DB::Open(o, dir, descs, &cfs, &db);
    BOOST_REQUIRE_MESSAGE(st.ok(), st.ToString());
    rocksdb::ColumnFamilyHandle* sessions_cf = nullptr;
    for (auto* h : cfs)
      if (h->GetName() == "ownership") sessions_cf = h;
    std::string v;
    bool ok = sessions_cf != nullptr && db->Get({}, sessions_cf, key, &v).ok() && v.size() > 24;
    if (ok) {
      v[v.size() - 3] ^= 0x5A;  // a payload byte: the envelope's checksum no longer matches
      rocksdb::WriteOptions wo;
      wo.sync = true;
      ok = db->Put(wo, sessions_cf, key, v).ok();
    }
    for (auto* h : cfs) db->DestroyColumnFamilyHandle(h);
    db->Close();
    delete db;
    BOOST_REQUIRE_MESSAGE(ok, "could not rewrite the record " << key);
  }
  {
    auto store = keel::storage::session_store::open(cl.data_dir(a).string());
    BOOST_REQUIRE_MESSAGE(store, keel::test::why(store));
    auto scan = (*store)->scan_ownership();
    BOOST_REQUIRE_MESSAGE(scan, keel::test::why(scan));
    BOOST_REQUIRE(scan->entries.count(key) == 0u);
    bool reported = false;
    for (auto& bad : scan->corrupt) reported = reported || bad.key == key;
    BOOST_REQUIRE(reported);
  }
  BOOST_TEST_MESSAGE("corrupted a's record " << key);

  cl.start(a);
  auto reports = [&](const std::string& line) {
    auto l = lower(line);
    return names(line, sid) &&
           (l.find("corrupt") != std::string::npos || l.find("checksum") != std::string::npos);
  };
  cl.wait_links_up(a, 5s);
  auto reported = lines_where(cl.current_log(a), reports);
  BOOST_TEST(!reported.empty(), "a did not report the corrupt record of " << sid << ":\n"
                                                                          << cl.current_log(a));
  for (auto& line : reported) BOOST_TEST_MESSAGE("reported: " << line);
  check_history_everywhere(cl, runs, two_turns, 15s);

  // The third turn, through a again: it continues the recovered conversation exactly.
  {
    client::options co;
    co.connect_timeout = 1000ms;
    auto cli = client::connect(cl.endpoints(a), co);
    BOOST_REQUIRE_MESSAGE(cli, keel::test::why(cli));
    auto g = (*cli)->generate(sid, c.texts[2], c.max_tokens[2]);
    BOOST_REQUIRE_MESSAGE(g, "the turn after the recovery: " << keel::test::why(g));
    runs[0].turns.push_back({g->turn, g->prompt, g->generated, g->reason, false});
  }
  check_transcripts(runs, reference);
  check_history_everywhere(cl, runs, reference);

  // On disk, after a clean stop of every node: a holds no corrupt record of the session any
  // more (the group's later writes replaced it), and a majority of the stores hold all of its
  // turns intact.
  check_no_crash(cl);
  std::this_thread::sleep_for(1s);
  for (size_t n = cl.size(); n-- > 0;) BOOST_TEST(cl.terminate(n) == 0, cl.log(n));
  size_t intact = 0;
  std::string where;
  for (size_t n = 0; n < cl.size(); ++n) {
    auto store = keel::storage::session_store::open(cl.data_dir(n).string());
    BOOST_REQUIRE_MESSAGE(store, keel::test::why(store));
    auto scan = (*store)->scan_ownership();
    BOOST_REQUIRE_MESSAGE(scan, keel::test::why(scan));
    for (auto& bad : scan->corrupt)
      BOOST_TEST(!(key_of(bad.key, sid) || names(bad.key, sid) || bad.session == sid),
                 "node " << cl.name(n) << " still holds a corrupt record: " << bad.cf << " key "
                         << bad.key << ": " << bad.reason);
    auto entry = scan->entries.find(sid);
    if (entry == scan->entries.end()) continue;
    auto copy = keel::decode_stored_session(entry->second);
    BOOST_TEST(static_cast<bool>(copy), cl.name(n) << ": " << keel::test::why(copy));
    if (!copy) continue;
    auto& turns = copy->data.turns;
    bool all = turns.size() == reference[0].turns.size();
    for (size_t t = 0; all && t < turns.size(); ++t)
      all = turns[t].done && turns[t].tokens == reference[0].turns[t].generated;
    where += " " + cl.name(n) + (all ? " (complete)" : " (incomplete)");
    intact += all ? 1 : 0;
  }
  BOOST_TEST_MESSAGE("stores holding " << sid << ":" << where);
  BOOST_TEST(intact >= 2u, "the session is complete in " << intact << " store(s):" << where);
}
