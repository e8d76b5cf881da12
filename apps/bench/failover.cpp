// keel-bench failover: a real 3-node cluster on loopback (keel-node processes, two regions). A
// client streams a long reply, the node serving it is killed with SIGKILL mid-reply, and the
// time from the kill to the client's next token is measured, kill after kill. Then the cost of
// checkpointing and replication: tokens/s of concurrent sessions on a node with --data and a
// peer, against the same node without either.

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <latch>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <thread>

#include "apps/bench/common.hpp"
#include "apps/bench/process.hpp"
#include "kernels/model.hpp"
#include "kernels/ops.hpp"
#include "wire/client.hpp"

namespace keel::bench {

namespace {

namespace fs = std::filesystem;

constexpr option failover_spec[] = {
    {"model", "FILE", "the nodes' model (required)"},
    {"kills", "N", "kills to measure (default 20; 0 skips the kills)"},
    {"tokens", "N", "most tokens of the reply streamed while its node is killed (default 400)"},
    {"recovery", "MODE",
     "takeover (default): the client knows all three nodes, and another node takes the session "
     "over; restart: the client knows the serving node only, and that node is restarted on its "
     "data directory right after the kill (recovery by restart, for comparison)"},
    {"threads", "N", "CPU threads of each node's one shard (default 1)"},
    {"heartbeat-interval", "MS", "the nodes' --heartbeat-interval (default 100)"},
    {"down-after", "MS", "the nodes' --down-after (default 500)"},
    {"sessions", "N", "concurrent sessions of the cost measurement (default 4)"},
    {"turns", "N", "turns of each session in the cost measurement (default 2)"},
    {"cost-tokens", "N", "most tokens per turn in the cost measurement (default 128)"},
    {"reps", "N",
     "runs of each configuration in the cost measurement, alternating (default 4; "
     "0 skips it)"},
    {"seed", "S", "seeds the kill points and the streamed reply's sampling (default 1)"},
    {"out", "FILE", "also write the report (Markdown) to FILE, e.g. bench/failover.md"},
};

constexpr auto join_timeout = std::chrono::seconds(15);
// How long a client keeps trying to resume: ten times the target, so a lost reply costs little.
constexpr auto resume_for = std::chrono::seconds(10);

std::string format(const char* f, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* f, ...) {
  va_list ap, again;
  va_start(ap, f);
  va_copy(again, ap);
  std::string out(static_cast<size_t>(std::max(0, std::vsnprintf(nullptr, 0, f, ap))), '\0');
  std::vsnprintf(out.data(), out.size() + 1, f, again);
  va_end(again);
  va_end(ap);
  return out;
}

double ms(clock_type::duration d) {
  return std::chrono::duration<double, std::milli>(d).count();
}

/// What the client of one kill round saw, shared by its thread and the main thread.
struct stream_log {
  struct failover {
    keel::wire::failover_event event;
    clock_type::time_point at;  // when on_failover ran
    size_t tokens_before = 0;   // tokens delivered before it
  };
  std::mutex mu;
  std::condition_variable cv;
  std::string endpoint;  // the node the session was opened on
  std::vector<int32_t> ids;
  std::vector<clock_type::time_point> times;  // each token's arrival
  std::vector<failover> failovers;
  bool ended = false;
  std::string error;  // why connecting, opening or generating failed
};

/// Connects to `endpoints`, opens a session and streams one reply into `log`. Runs on a thread
/// of its own: the client lives and dies there.
void stream_reply(const std::vector<std::string>& endpoints, uint64_t seed, uint32_t max_tokens,
                  stream_log& log) {
  keel::wire::client::options opts;
  opts.resume_for = resume_for;
  opts.on_failover = [&log](const keel::wire::failover_event& ev) {
    auto now = clock_type::now();
    std::lock_guard<std::mutex> guard(log.mu);
    log.failovers.push_back({ev, now, log.ids.size()});
  };
  auto finish = [&log](std::string error) {
    std::lock_guard<std::mutex> guard(log.mu);
    log.error = std::move(error);
    log.ended = true;
    log.cv.notify_all();
  };
  auto c = keel::wire::client::connect(endpoints, opts);
  if (!c) return finish(describe(c.error()));
  auto session = (*c)->open_session(bench_params(seed));
  if (!session) return finish(describe(session.error()));
  {
    std::lock_guard<std::mutex> guard(log.mu);
    log.endpoint = (*c)->endpoint();
  }
  auto g = (*c)->generate(*session, bench_prompts[0], max_tokens,
                          [&log](uint64_t, uint64_t, int32_t id, std::string_view) {
                            auto now = clock_type::now();
                            std::lock_guard<std::mutex> guard(log.mu);
                            log.ids.push_back(id);
                            log.times.push_back(now);
                            log.cv.notify_all();
                          });
  finish(g ? std::string() : describe(g.error()));
}

/// One kill and what the client saw of it.
struct kill_round {
  size_t node = 0;                      // the node killed
  std::string node_name;                // and its region, e.g. "c (r2)"
  size_t kill_after = 0;                // tokens the client had when the kill was sent
  bool resumed = false;                 // the reply finished after a failover
  std::string error;                    // why it did not
  double detect_ms = 0;                 // kill to the broken stream seen
  double failover_ms = 0;               // failover_event::duration
  std::optional<double> next_token_ms;  // kill to the first token of the resumed stream
  size_t in_flight = 0;                 // tokens read after the kill, before the failover
  std::string to_node;
  uint64_t from_index = 0;
  bool same_reply = false;
  std::optional<double> restart_ms;  // --recovery restart: kill to the node listening again
};

/// Runs `turns` turns on `n` sessions of the node at `endpoint`, each session a thread with its
/// own client (session i: seed i; turn k: prompt (i + k) mod 8). Tokens/s over the time from
/// the start (every session open) to the end of the last turn; every session's tokens go to
/// `transcripts`.
caf::expected<double> run_load(const std::string& endpoint, int32_t n, int32_t turns,
                               uint32_t max_tokens,
                               std::vector<std::vector<int32_t>>& transcripts) {
  std::vector<caf::error> failures(n);
  std::vector<clock_type::time_point> ends(n);
  transcripts.assign(n, {});
  std::latch ready(n), go(1);
  std::vector<std::thread> threads;
  for (int32_t i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      auto c = keel::wire::client::connect({endpoint});
      caf::expected<std::string> session = caf::error{};
      if (c) session = (*c)->open_session(bench_params(static_cast<uint64_t>(i)));
      ready.count_down();
      go.wait();
      if (!c) return void(failures[i] = std::move(c.error()));
      if (!session) return void(failures[i] = std::move(session.error()));
      for (int32_t k = 0; k < turns; ++k) {
        auto g = (*c)->generate(*session, bench_prompts[(i + k) % n_prompts], max_tokens);
        if (!g) return void(failures[i] = std::move(g.error()));
        transcripts[i].insert(transcripts[i].end(), g->generated.begin(), g->generated.end());
      }
      ends[i] = clock_type::now();
    });
  }
  ready.wait();
  auto start = clock_type::now();
  go.count_down();
  for (auto& t : threads) t.join();
  size_t tokens = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (failures[i]) return std::move(failures[i]);
    tokens += transcripts[i].size();
  }
  auto end = *std::max_element(ends.begin(), ends.end());
  return static_cast<double>(tokens) / std::chrono::duration<double>(end - start).count();
}

std::string load_average() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a.empty() ? "unknown" : a + " " + b + " " + c;
}

double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  auto n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

/// The p50, p99 and max of `v` (ms) as three Markdown table cells.
std::string spread(const std::vector<double>& v) {
  if (v.empty()) return "- | - | -";
  return format("%.0f ms | %.0f ms | %.0f ms", percentile(v, 0.5), percentile(v, 0.99),
                *std::max_element(v.begin(), v.end()));
}

/// Removes its directory, with everything in it, when it goes.
struct temp_dir {
  fs::path path;
  ~temp_dir() {
    std::error_code ec;
    if (!path.empty()) fs::remove_all(path, ec);
  }
};

/// The options of one run, checked.
struct settings {
  bool restart_mode = false;
  int64_t kills = 0, max_tokens = 0, sessions = 0, turns = 0, cost_tokens = 0, reps = 0, seed = 0;
};

/// Where the nodes run: their flags, the group that ends them, the directory of their data, and
/// the ports picked for them (clients a b c, then peers a b c).
struct environment {
  node_flags flags;
  process_group& group;
  fs::path tmp;
  std::vector<uint16_t> ports;
  std::string addr(size_t k) const { return "127.0.0.1:" + std::to_string(ports[k]); }
};

/// What the kills measured.
struct kill_figures {
  std::vector<kill_round> rounds;
  std::vector<int32_t> reference;  // the fault-free reply
  double reference_ms_per_token = 0;
  size_t no_failover = 0;  // rounds whose reply ended before the kill took effect
  int64_t lo = 0, hi = 0;  // the range of kill points
  std::string commands, end, stopped_early;
  std::string failure;               // what stopped the kills, when something did
  std::vector<std::string> crashes;  // nodes that ended on their own, restarted
};

/// What the cost measurement measured.
struct cost_figures {
  std::vector<double> off_tps, on_tps;
  std::string off_command, on_commands;
  bool same_tokens = true;
  std::string failure;  // what stopped the runs, when something did
};

void say(const std::string& s) {
  std::cerr << "keel-bench: " << s << "\n";
}

/// Fills in what the client saw of the kill at `killed_at` into `k` (its node and kill_after
/// already set).
void analyse(const stream_log& log, clock_type::time_point killed_at,
             const std::vector<int32_t>& reference, kill_round& k) {
  if (!log.error.empty()) {
    k.error = log.error;
    return;
  }
  const auto& f = log.failovers.front();
  k.resumed = true;
  k.detect_ms = ms(f.at - f.event.duration - killed_at);
  k.failover_ms = static_cast<double>(f.event.duration.count());
  if (log.times.size() > f.tokens_before)
    k.next_token_ms = ms(log.times[f.tokens_before] - killed_at);
  k.in_flight = f.tokens_before - std::min(f.tokens_before, k.kill_after);
  k.to_node = f.event.to_node;
  k.from_index = f.event.from_index;
  k.same_reply = log.ids == reference;
}

/// Restarts every node of `cl` that ended on its own, noting it in `out.crashes`.
caf::error restart_crashed(cluster& cl, const std::string& when, kill_figures& out) {
  for (auto& [i, how] : cl.take_ended()) {
    say("node " + cl.at(i).name + " ended on its own " + when + ": " +
        how.substr(0, how.find('\n')));
    out.crashes.push_back("node " + cl.at(i).name + ", " + when + ": " + how);
    auto before = cl.ups_to(i);
    if (auto err = cl.start(i)) return err;
    if (auto err = cl.wait_joined(i, before, join_timeout)) return err;
  }
  return {};
}

/// Part 1: three nodes in `cl` (empty); kill after kill of the node serving a streaming client.
/// Fills in `out` as it goes: an error leaves the rounds so far.
caf::error run_kills(const settings& set, environment& env, cluster& cl, kill_figures& out) {
  const char* names[] = {"a", "b", "c"};
  const char* regions[] = {"r1", "r1", "r2"};
  for (size_t i = 0; i < 3; ++i)
    cl.add(names[i], regions[i], env.addr(i), env.addr(3 + i), (env.tmp / names[i]).string());
  for (size_t i = 0; i < 3; ++i) {
    say("starting " + cl.command(i));
    if (auto err = cl.start(i)) return err;
    out.commands += "- `" + cl.command(i) + "`\n";
  }
  for (size_t i = 0; i < 3; ++i)
    if (auto err = cl.wait_joined(i, {}, join_timeout)) return err;
  const std::vector<std::string> all = {cl.at(0).listen, cl.at(1).listen, cl.at(2).listen};
  const auto max_tokens = static_cast<uint32_t>(set.max_tokens);
  const auto seed = static_cast<uint64_t>(set.seed);
  {
    say("a fault-free reply");
    stream_log log;
    std::thread([&] { stream_reply(all, seed, max_tokens, log); }).join();
    if (!log.error.empty())
      return keel::make_error(keel::errc::failed, "the fault-free reply: " + log.error);
    out.reference = log.ids;
    if (log.ids.size() > 1)
      out.reference_ms_per_token =
          ms(log.times.back() - log.times.front()) / static_cast<double>(log.ids.size() - 1);
  }
  out.lo = std::max<int64_t>(1, static_cast<int64_t>(out.reference.size()) / 10);
  out.hi = static_cast<int64_t>(out.reference.size()) / 2;
  if (out.hi < out.lo)
    return keel::make_error(keel::errc::failed,
                            "the fault-free reply has " + std::to_string(out.reference.size()) +
                                " tokens: too short to kill its node mid-reply (try another "
                                "--seed or a larger --tokens)");
  std::mt19937_64 rng(seed);
  int failed_in_a_row = 0;
  for (int64_t attempt = 0; static_cast<int64_t>(out.rounds.size()) < set.kills; ++attempt) {
    if (failed_in_a_row == 3 || attempt >= 2 * set.kills + 5) {
      out.stopped_early = "stopped after " + std::to_string(attempt) + " rounds, " +
                          std::to_string(failed_in_a_row) + " failed in a row";
      break;
    }
    // The kills go to a, b and c in turn: the client connects to the first that answers.
    std::vector<std::string> endpoints;
    for (size_t j = 0; j < (set.restart_mode ? 1u : 3u); ++j)
      endpoints.push_back(all[(static_cast<size_t>(attempt) + j) % 3]);
    auto kill_at = std::uniform_int_distribution<int64_t>(out.lo, out.hi)(rng);
    stream_log log;
    std::thread client([&] { stream_reply(endpoints, seed, max_tokens, log); });
    kill_round k;
    bool ended = false;
    {
      std::unique_lock<std::mutex> lock(log.mu);
      log.cv.wait(lock,
                  [&] { return log.ended || static_cast<int64_t>(log.ids.size()) >= kill_at; });
      ended = log.ended;
      k.node = cl.find(log.endpoint);
      k.kill_after = log.ids.size();
    }
    if (ended || k.node == cl.size()) {
      client.join();
      auto crashes = out.crashes.size();
      if (auto err = restart_crashed(cl, format("before kill %zu", out.rounds.size() + 1), out))
        return err;
      if (out.crashes.size() > crashes) continue;  // the reply failed on that
      if (!log.error.empty()) {
        auto first = cl.find(endpoints.front());
        return keel::make_error(keel::errc::failed,
                                "round " + std::to_string(out.rounds.size() + 1) +
                                    ": the reply failed before the kill: " + log.error +
                                    "; the stderr of node " + cl.at(first).name +
                                    " (the client's first endpoint):\n" + cl.log_tail(first));
      }
      if (!ended)
        return keel::make_error(keel::errc::failed,
                                "the session is on an unknown node: " + log.endpoint);
      ++out.no_failover;  // the reply ended before kill_at
      continue;
    }
    const auto number = out.rounds.size() + 1;
    k.node_name = cl.at(k.node).name + " (" + cl.at(k.node).region + ")";
    say(format("round %zu: killing node %s after %zu tokens", number, cl.at(k.node).name.c_str(),
               k.kill_after));
    auto killed_at = cl.kill(k.node);
    auto before = cl.ups_to(k.node);
    if (set.restart_mode) {
      if (auto err = cl.start(k.node)) return err;
      k.restart_ms = ms(clock_type::now() - killed_at);
    }
    client.join();
    const bool counted = !log.error.empty() || !log.failovers.empty();
    if (!counted) {
      ++out.no_failover;  // every token was out before the node died
    } else {
      analyse(log, killed_at, out.reference, k);
      failed_in_a_row = k.resumed ? 0 : failed_in_a_row + 1;
      if (k.resumed)
        say(format("round %zu: resumed on node %s, %.0f ms from the kill to the next token", number,
                   k.to_node.c_str(), k.next_token_ms.value_or(-1)));
      else
        say(format("round %zu: the reply did not resume: %s", number, k.error.c_str()));
    }
    const auto node = k.node;
    if (counted) out.rounds.push_back(std::move(k));
    if (auto err = restart_crashed(cl, format("during kill %zu", number), out)) return err;
    // The killed node comes back on its data directory before the next kill.
    if (!set.restart_mode)
      if (auto err = cl.start(node)) return err;
    if (auto err = cl.wait_joined(node, before, join_timeout)) return err;
  }
  return {};
}

/// Part 2: the same load on a node without --data or peers, and on a node of a 2-node cluster
/// with both, in alternating runs. Fills in `out` as it goes: an error leaves the runs so far.
caf::error run_cost(const settings& set, environment& env, cost_figures& out) {
  for (int64_t rep = 0; rep < set.reps; ++rep) {
    std::vector<std::vector<int32_t>> first_tokens;
    for (int pass = 0; pass < 2; ++pass) {
      const bool on = (pass == 0) == (rep % 2 == 1);  // off first in even runs
      cluster cl(env.flags, env.group);
      if (on) {
        auto dir = env.tmp / ("cost-" + std::to_string(rep));
        cl.add("a", "r1", env.addr(0), env.addr(3), (dir / "a").string());
        cl.add("b", "r2", env.addr(1), env.addr(4), (dir / "b").string());
      } else {
        cl.add("solo", "", env.addr(0), "", "");
      }
      for (size_t i = 0; i < cl.size(); ++i)
        if (auto err = cl.start(i)) return err;
      for (size_t i = 0; on && i < cl.size(); ++i)
        if (auto err = cl.wait_joined(i, {}, join_timeout)) return err;
      if (on)
        out.on_commands = "`" + cl.command(0) + "` and `" + cl.command(1) + "`";
      else
        out.off_command = "`" + cl.command(0) + "`";
      say(format("cost, run %lld of %lld: checkpointing and replication %s",
                 static_cast<long long>(rep + 1), static_cast<long long>(set.reps),
                 on ? "on" : "off"));
      std::vector<std::vector<int32_t>> tokens;
      auto tps =
          run_load(cl.at(0).listen, static_cast<int32_t>(set.sessions),
                   static_cast<int32_t>(set.turns), static_cast<uint32_t>(set.cost_tokens), tokens);
      if (auto err = cl.check()) return err;
      if (!tps) return tps.error();
      (on ? out.on_tps : out.off_tps).push_back(*tps);
      if (pass == 0)
        first_tokens = std::move(tokens);
      else
        out.same_tokens = out.same_tokens && tokens == first_tokens;
      cl.stop();
    }
  }
  return {};
}

/// The Markdown report.
std::string report(const settings& set, const node_flags& flags, const std::string& command,
                   const keel::model& model, const std::string& load_before, const kill_figures& kf,
                   const cost_figures& cf) {
  std::ostringstream r;
  const auto& mc = model.config();
  r << "# Failover benchmark\n\nCommand: `" << command << "`\n\n## Machine\n\n";
  r << "- CPU: " << cpu_model() << ", " << std::thread::hardware_concurrency()
    << " hardware threads, kernels: " << keel::to_string(keel::active_isa()) << "\n";
  r << "- Memory: " << mem_total() << "\n";
  r << "- Load average before the run (other processes share the machine): " << load_before << "\n";
  r << "- Network: loopback (127.0.0.1); every node, the clients and keel-bench share this "
       "machine\n\n## Model\n\n";
  r << format(
      "- %s (%s): dim %d, %d layers, %d heads (kv %d), ffn %d, vocab %d, ctx %d, "
      "weights %s, %.1f MB read per decoded token\n",
      model.path().c_str(), model.format().c_str(), mc.dim, mc.n_layers, mc.n_heads, mc.n_kv_heads,
      mc.ffn_dim, mc.vocab_size, mc.ctx_len,
      std::string(keel::dtype_name(model.weight_type())).c_str(),
      model.weight_bytes_per_token() / 1e6);
  if (!kf.reference.empty())
    r << format(
        "- The fault-free reply on the cluster: %zu tokens at %.2f ms per token (one "
        "session alone)\n",
        kf.reference.size(), kf.reference_ms_per_token);
  r << "\n";

  if (set.kills > 0) {
    std::vector<double> next, detect, failover, restart;
    size_t resumed = 0, same = 0;
    for (const auto& k : kf.rounds) {
      if (k.restart_ms) restart.push_back(*k.restart_ms);
      if (!k.resumed) continue;
      ++resumed;
      same += k.same_reply ? 1 : 0;
      if (k.next_token_ms) next.push_back(*k.next_token_ms);
      detect.push_back(k.detect_ms);
      failover.push_back(k.failover_ms);
    }
    r << "## Kills\n\nThree keel-nodes, a and b in region r1 and c in r2, each with a data "
         "directory of its own in a temporary directory (removed at the end):\n\n"
      << kf.commands << "\n";
    r << "- Each round: a new session (temperature 0.8, top-k 40, seed " << set.seed
      << ") streams the reply to \"" << bench_prompts[0] << "\", at most " << set.max_tokens
      << " tokens, through a keel::wire::client on a thread of its own. ";
    if (set.restart_mode)
      r << "**Recovery by restart** (`--recovery restart`): the client knows the serving node "
           "only, and keel-bench restarts that node on its data directory right after the kill; "
           "the time to the next token includes the node's restart (model load, store "
           "recovery)\n";
    else
      r << "The client is connected with all three endpoints, in an order rotated each round "
           "so that the kills go to a, b and c in turn; another node takes the session over\n";
    r << format(
        "- After a random number of tokens (uniform in [%lld, %lld], a tenth to a half "
        "of the fault-free reply, seeded), keel-bench's main thread sends SIGKILL to the "
        "node serving the session (the client's endpoint()). Before the next round the "
        "killed node is restarted on its data directory, and keel-bench waits until "
        "every region link to and from it is up again\n",
        static_cast<long long>(kf.lo), static_cast<long long>(kf.hi));
    r << "- Kill to next token: from the steady_clock time just before kill(2) to the arrival "
         "at the client of the first token of the resumed stream (the first after the client's "
         "on_failover). Tokens the node had sent before it died but the client read after the "
         "kill are not that token; the column \"in flight\" counts them\n";
    r << "- Detection: from the kill to the client seeing its stream broken (the failover "
         "callback's time minus failover_event::duration). Failover: failover_event::duration, "
         "from the break seen to the resumed stream accepted by the new node\n";
    r << format(
        "- Nodes: --heartbeat-interval %lld ms, --down-after %lld ms; the client's "
        "defaults but resume_for 10 s (probe every 100 ms, backoff from 25 ms)\n\n",
        static_cast<long long>(flags.heartbeat), static_cast<long long>(flags.down_after));
    r << "### Results\n\n";
    r << format(
        "- Kills: %zu; replies resumed: %zu; resumed replies equal to the fault-free "
        "reply: %zu of %zu; rounds run again because the reply ended before the kill "
        "took effect: %zu",
        kf.rounds.size(), resumed, same, resumed, kf.no_failover);
    if (!kf.stopped_early.empty()) r << "; **" << kf.stopped_early << "**";
    if (!kf.failure.empty())
      r << "\n\n**The kills stopped on a failure** after " << kf.rounds.size()
        << " round(s):\n\n```\n"
        << kf.failure << "\n```";
    r << "\n\n| measure | p50 | p99 | max |\n|---|---|---|---|\n";
    r << "| kill to next token (resumed replies) | " << spread(next) << " |\n";
    r << "| detection | " << spread(detect) << " |\n";
    r << "| failover (client) | " << spread(failover) << " |\n";
    if (!restart.empty()) r << "| restart (kill to listening) | " << spread(restart) << " |\n";
    // A lost reply is a failover that never ends: the target counts it.
    double p99 = percentile(next, 0.99);
    if (next.empty())
      r << "\nTarget p99 kill to next token under 1 s: **not measured (no reply resumed)**\n\n";
    else if (next.size() < kf.rounds.size())
      r << format(
          "\nTarget p99 kill to next token under 1 s: **missed**: %zu of %zu kills lost "
          "their reply (the resumed replies: p99 %.0f ms)\n\n",
          kf.rounds.size() - next.size(), kf.rounds.size(), p99);
    else
      r << format("\nTarget p99 kill to next token under 1 s: %.0f ms, **%s**\n\n", p99,
                  p99 < 1000 ? "met" : "missed");
    r << "### Rounds\n\n| round | killed | kill after token | detection | failover | kill to "
         "next token | in flight | resumed on | at index | same reply |\n"
         "|---|---|---|---|---|---|---|---|---|---|\n";
    for (size_t i = 0; i < kf.rounds.size(); ++i) {
      const auto& k = kf.rounds[i];
      if (!k.resumed) {
        r << format("| %zu | %s | %zu | not resumed: ", i + 1, k.node_name.c_str(), k.kill_after)
          << k.error << " |||||||\n";
        continue;
      }
      r << format("| %zu | %s | %zu | %.0f ms | %.0f ms | %s | %zu | %s | %llu | %s |\n", i + 1,
                  k.node_name.c_str(), k.kill_after, k.detect_ms, k.failover_ms,
                  k.next_token_ms ? format("%.0f ms", *k.next_token_ms).c_str() : "-", k.in_flight,
                  k.to_node.c_str(), static_cast<unsigned long long>(k.from_index),
                  k.same_reply ? "yes" : "no");
    }
    if (!kf.crashes.empty()) {
      r << "\n### Nodes that ended on their own\n\nkeel-bench restarted each on its data "
           "directory and went on. How each ended, and the end of its stderr:\n\n";
      // The first few in full; the rest by their first line (they tend to repeat).
      for (size_t i = 0; i < kf.crashes.size(); ++i) {
        const auto& c = kf.crashes[i];
        if (i < 3)
          r << "```\n" << c << "\n```\n\n";
        else
          r << "- " << c.substr(0, c.find('\n')) << "\n";
      }
    } else {
      r << "\nNo node ended on its own.\n";
    }
    r << "\nThe cluster at the end (SIGTERM): " << kf.end << "\n\n";
  }

  if (set.reps > 0) {
    r << "## The cost of checkpointing and replication\n\n";
    r << "- Off: " << cf.off_command << " (no --data, no peers)\n";
    r << "- On: " << cf.on_commands
      << ", fresh data directories each run; the sessions run on a, which checkpoints them in "
         "its RocksDB store and replicates them to b (region r2)\n";
    r << format(
        "- Load: %lld sessions, each a thread with its own keel::wire::client, %lld "
        "turns of at most %lld tokens one after another (session i: temperature 0.8, "
        "top-k 40, seed i; turn k: prompt (i + k) mod 8 of the short benchmark "
        "prompts). Tokens/s: every generated token over the time from the start (all "
        "sessions open) to the end of the last turn. %lld run(s) of each configuration, "
        "alternating (off first in even runs), the nodes started afresh for each run; "
        "both nodes of \"on\" share this machine's cores with the load\n\n",
        static_cast<long long>(set.sessions), static_cast<long long>(set.turns),
        static_cast<long long>(set.cost_tokens), static_cast<long long>(set.reps));
    if (!cf.failure.empty())
      r << "**The runs stopped on a failure:**\n\n```\n" << cf.failure << "\n```\n\n";
    r << "| run | off: tokens/s | on: tokens/s | cost |\n|---|---|---|---|\n";
    std::vector<double> paired;
    for (size_t i = 0; i < cf.off_tps.size() && i < cf.on_tps.size(); ++i) {
      paired.push_back(100.0 * (1.0 - cf.on_tps[i] / cf.off_tps[i]));
      r << format("| %zu | %.1f | %.1f | %.1f%% |\n", i + 1, cf.off_tps[i], cf.on_tps[i],
                  paired.back());
    }
    double off_m = median(cf.off_tps), on_m = median(cf.on_tps);
    double cost = off_m > 0 ? 100.0 * (1.0 - on_m / off_m) : 0.0;
    r << format("| median | %.1f | %.1f | %.1f%% |\n\n", off_m, on_m, cost);
    r << format(
        "Target cost under 5%%: %.1f%% (medians), **%s**; median of the paired runs "
        "%.1f%%. The same tokens with and without: %s\n\n",
        cost, cost < 5.0 ? "met" : "missed", median(paired), cf.same_tokens ? "yes" : "**no**");
  }

  r << "## How to reproduce\n\n```\n";
  r << "build/apps/keel-model synth -o /tmp/failover.gguf --dim 512 --layers 6 --heads 8 "
       "--kv-heads 4 \\\n  --ffn 1536 --ctx 2048\n";
  r << "build/apps/keel-bench failover --model /tmp/failover.gguf --out bench/failover.md\n```\n\n";
  r << "keel-bench starts every keel-node itself (from its own directory) on free ports of "
       "127.0.0.1, with data directories in a temporary directory, and ends them all on every "
       "path (SIGINT included). `--kills 0` or `--reps 0` skips a part.\n";
  return r.str();
}

}  // namespace

int failover_command(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-bench failover --model FILE [--kills N] [--recovery takeover|restart] "
        "[--out bench/failover.md]",
        "Starts a cluster of three keel-nodes on 127.0.0.1 (a and b in region r1, c in r2, each "
        "with --data in a temporary directory). Kill after kill, a client connected to all three "
        "streams a long reply and the node serving it is killed with SIGKILL after a random "
        "number of tokens; reports the time from the kill to the client's next token (target: "
        "p99 under 1 s), the client's detection and failover times, and whether each reply "
        "equals the fault-free one. The killed node is restarted on its data directory before "
        "the next kill. Then the cost of checkpointing and replication: tokens/s of concurrent "
        "sessions on a node of a 2-node cluster with --data, against a node without --data or "
        "peers (target: under 5%). Every keel-node is ended on every path, SIGINT included.",
        failover_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, failover_spec);
  if (!opts) return fail(opts.error());
  if (!opts->has("model"))
    return fail(keel::make_error(keel::errc::bad_request, "failover: --model FILE is required"));
  const std::string recovery = opts->get("recovery", "takeover");
  if (recovery != "takeover" && recovery != "restart")
    return fail(keel::make_error(keel::errc::bad_request, "failover: --recovery " + recovery +
                                                              ": expected takeover or restart"));
  settings set;
  set.restart_mode = recovery == "restart";
  node_flags flags;
  flags.exe = (fs::read_symlink("/proc/self/exe").parent_path() / "keel-node").string();
  flags.model = opts->get("model");
  struct int_option {
    const char* name;
    int64_t fallback, min, max;
    int64_t* into;
  };
  const int_option ints[] = {{"kills", 20, 0, 10000, &set.kills},
                             {"tokens", 400, 2, 1 << 20, &set.max_tokens},
                             {"threads", 1, 1, 1024, &flags.threads},
                             {"heartbeat-interval", 100, 1, 60000, &flags.heartbeat},
                             {"down-after", 500, 2, 600000, &flags.down_after},
                             {"sessions", 4, 1, 1024, &set.sessions},
                             {"turns", 2, 1, 1000, &set.turns},
                             {"cost-tokens", 128, 1, 1 << 20, &set.cost_tokens},
                             {"reps", 4, 0, 100, &set.reps},
                             {"seed", 1, 0, INT64_MAX, &set.seed}};
  for (const auto& o : ints) {
    auto v = opts->get_int(o.name, o.fallback, o.min, o.max);
    if (!v) return fail(v.error());
    *o.into = *v;
  }
  std::string command = "keel-bench failover";
  for (auto* a : args) command += std::string(" ") + a;

  // The data directories go on every path: by `tmp` on return, by `group` on SIGINT.
  temp_dir tmp;
  {
    std::string pattern = (fs::temp_directory_path() / "keel-bench-failover.XXXXXX").string();
    if (!mkdtemp(pattern.data()))
      return fail(
          keel::make_error(keel::errc::failed, pattern + ": mkdtemp: " + std::strerror(errno)));
    tmp.path = pattern;
  }
  process_group group([dir = tmp.path] {
    std::error_code ec;
    fs::remove_all(dir, ec);
  });

  std::string load_before = load_average();
  auto loaded = keel::model::load(flags.model);
  if (!loaded) return fail(loaded.error());
  std::unique_ptr<keel::model> model = std::move(*loaded);
  auto ports = free_ports(6);
  if (!ports) return fail(ports.error());
  environment env{flags, group, tmp.path, *ports};
  kill_figures kf;
  if (set.kills > 0) {
    cluster cl(env.flags, env.group);
    if (auto err = run_kills(set, env, cl, kf)) kf.failure = describe(err);
    kf.end = cl.stop();
  }
  cost_figures cf;
  if (set.reps > 0)
    if (auto err = run_cost(set, env, cf)) cf.failure = describe(err);
  auto status = publish(report(set, flags, command, *model, load_before, kf, cf), opts->get("out"));
  if (!kf.failure.empty() || !cf.failure.empty()) {
    say(kf.failure.empty() ? cf.failure : kf.failure);
    return 1;
  }
  return status;
}

}  // namespace keel::bench
