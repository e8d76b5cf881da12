// keel-bench failover: a real 3-node cluster on loopback (keel-node processes, two regions). A
// client streams a long reply, the node serving it is killed with SIGKILL mid-reply, and the
// time from the kill to the client's next token is measured, kill after kill. Then partition
// after partition: the serving node is cut off from the other two (keel-shell's partition fault)
// and the time from the cut to the next token from the majority side is measured. Then the cost
// of majority acknowledgements: tokens/s and turn acknowledgement latency of concurrent
// sessions on a node of a 3-node cluster with --data, against a node without peers or --data.

#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
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
    {"partitions", "N",
     "partitions of the serving node from the other two to measure (default 5; 0 skips them)"},
    {"tokens", "N",
     "most tokens of the reply streamed while its node is killed or cut off (default 400)"},
    {"recovery", "MODE",
     "takeover (default): the client knows all three nodes, and another node takes the session "
     "over; restart: the client knows the serving node only, and that node is restarted on its "
     "data directory right after the kill (recovery by restart, for comparison); partitions "
     "always use takeover"},
    {"threads", "N", "CPU threads of each node's one shard (default 1)"},
    {"heartbeat-interval", "MS", "the nodes' --heartbeat-interval (default 100)"},
    {"down-after", "MS", "the nodes' --down-after (default 500)"},
    {"sessions", "N", "concurrent sessions of the cost measurement (default 4)"},
    {"turns", "N", "turns of each session in the cost measurement (default 2)"},
    {"cost-tokens", "N", "most tokens per turn in the cost measurement (default 128)"},
    {"reps", "N",
     "runs of each configuration in the cost measurement, alternating (default 4; "
     "0 skips it)"},
    {"seed", "S",
     "seeds the kill and partition points and the streamed reply's sampling (default 1)"},
    {"out", "FILE", "also write the report (Markdown) to FILE, e.g. bench/failover.md"},
};

constexpr auto join_timeout = std::chrono::seconds(15);
// A partition round's cut: long enough for the majority to declare the node down (--down-after)
// and take its sessions over.
constexpr int64_t partition_ms = 3000;
constexpr auto shell_timeout = std::chrono::seconds(20);
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

/// What the client of one round saw, shared by its thread and the main thread.
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

/// One fault (a kill or a partition) and what the client saw of it.
struct fault_round {
  size_t node = 0;                       // the node killed or cut off
  std::string node_name;                 // and its region, e.g. "c (r2)"
  size_t fault_after = 0;                // tokens the client had when the fault was started
  size_t at_fault = 0;                   // tokens it had when the fault took effect
  std::optional<double> shell_ms;        // a partition: keel-shell's run, start to exit
  bool resumed = false;                  // the reply finished after a failover
  std::string error;                     // why it did not
  double detect_ms = 0;                  // fault to the broken stream seen
  double failover_ms = 0;                // failover_event::duration
  std::optional<double> next_token_ms;   // fault to the first token of the resumed stream
  std::optional<double> first_token_ms;  // the resumed stream accepted to that token
  size_t in_flight = 0;                  // tokens read after the fault, before the failover
  std::string to_node;
  bool moved = false;  // to_node is not the node of the fault
  uint64_t from_index = 0;
  bool same_reply = false;
  std::optional<double> restart_ms;  // --recovery restart: kill to the node listening again
};

/// What one run of the cost measurement's load measured.
struct load_figures {
  double tokens_per_s = 0;
  std::vector<double> ack_ms;  // every turn's acknowledgement latency
};

/// Runs `turns` turns on `n` sessions of the node at `endpoint`, each session a thread with its
/// own client (session i: seed i; turn k: prompt (i + k) mod 8). Tokens/s over the time from
/// the start (every session open) to the end of the last turn, and each turn's time from the
/// call of generate() (which sends it) to its on_accept (the node acknowledged it); every
/// session's tokens go to `transcripts`.
caf::expected<load_figures> run_load(const std::string& endpoint, int32_t n, int32_t turns,
                                     uint32_t max_tokens,
                                     std::vector<std::vector<int32_t>>& transcripts) {
  std::vector<caf::error> failures(n);
  std::vector<clock_type::time_point> ends(n);
  std::vector<std::vector<double>> acks(n);
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
        std::optional<clock_type::time_point> accepted;
        auto sent = clock_type::now();
        auto g = (*c)->generate(
            *session, bench_prompts[(i + k) % n_prompts], max_tokens, {},
            [&accepted](uint64_t, const std::vector<int32_t>&) { accepted = clock_type::now(); });
        if (!g) return void(failures[i] = std::move(g.error()));
        if (!accepted)
          return void(failures[i] = keel::make_error(
                          keel::errc::failed, "session " + *session + ": turn " +
                                                  std::to_string(g->turn) +
                                                  " ended without on_accept having been called"));
        acks[i].push_back(ms(*accepted - sent));
        transcripts[i].insert(transcripts[i].end(), g->generated.begin(), g->generated.end());
      }
      ends[i] = clock_type::now();
    });
  }
  ready.wait();
  auto start = clock_type::now();
  go.count_down();
  for (auto& t : threads) t.join();
  load_figures out;
  size_t tokens = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (failures[i]) return std::move(failures[i]);
    tokens += transcripts[i].size();
    out.ack_ms.insert(out.ack_ms.end(), acks[i].begin(), acks[i].end());
  }
  auto end = *std::max_element(ends.begin(), ends.end());
  out.tokens_per_s =
      static_cast<double>(tokens) / std::chrono::duration<double>(end - start).count();
  return out;
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

/// The p50, p99 and max of `v` (ms, with `digits` decimals) as three Markdown table cells.
std::string spread(const std::vector<double>& v, int digits = 0) {
  if (v.empty()) return "- | - | -";
  return format("%.*f ms | %.*f ms | %.*f ms", digits, percentile(v, 0.5), digits,
                percentile(v, 0.99), digits, *std::max_element(v.begin(), v.end()));
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
  int64_t kills = 0, partitions = 0, max_tokens = 0, sessions = 0, turns = 0, cost_tokens = 0,
          reps = 0, seed = 0;
};

/// Where the nodes run: their flags, the group that ends them, the directory of their data, and
/// the ports picked for them (clients a b c, then peers a b c, then admin a b c).
struct environment {
  node_flags flags;
  process_group& group;
  fs::path tmp;
  std::vector<uint16_t> ports;
  std::string addr(size_t k) const { return "127.0.0.1:" + std::to_string(ports[k]); }
};

/// Part 1's cluster: how it was started, its fault-free reply and the range of fault points.
struct cluster_figures {
  std::vector<int32_t> reference;  // the fault-free reply
  double reference_ms_per_token = 0;
  int64_t lo = 0, hi = 0;  // the range of fault points (tokens)
  std::string commands, end;
  std::string failure;               // why it could not be started
  std::vector<std::string> crashes;  // nodes that ended on their own, restarted
};

/// What the rounds of one kind of fault measured.
struct round_figures {
  std::vector<fault_round> rounds;
  size_t no_failover = 0;  // rounds whose reply ended before the fault took effect
  std::string stopped_early;
  std::string failure;  // what stopped the rounds, when something did
};

/// What the cost measurement measured.
struct cost_figures {
  std::vector<double> off_tps, on_tps;
  std::vector<std::vector<double>> off_ack, on_ack;  // per run, each turn's ack latency (ms)
  std::string off_command, on_commands;
  bool same_tokens = true;
  std::string failure;  // what stopped the runs, when something did
};

void say(const std::string& s) {
  std::cerr << "keel-bench: " << s << "\n";
}

/// Fills in what the client saw of the fault that took effect at `fault_at` into `k` (its node,
/// fault_after and at_fault already set).
void analyse(const stream_log& log, clock_type::time_point fault_at,
             const std::vector<int32_t>& reference, fault_round& k) {
  if (!log.error.empty()) {
    k.error = log.error;
    return;
  }
  const auto& f = log.failovers.front();
  k.resumed = true;
  k.detect_ms = ms(f.at - f.event.duration - fault_at);
  k.failover_ms = static_cast<double>(f.event.duration.count());
  if (log.times.size() > f.tokens_before) {
    k.next_token_ms = ms(log.times[f.tokens_before] - fault_at);
    k.first_token_ms = ms(log.times[f.tokens_before] - f.at);
  }
  k.in_flight = f.tokens_before - std::min(f.tokens_before, k.at_fault);
  k.to_node = f.event.to_node;
  k.from_index = f.event.from_index;
  k.same_reply = log.ids == reference;
}

/// Restarts every node of `cl` that ended on its own, noting it in `out.crashes`.
caf::error restart_crashed(cluster& cl, const std::string& when, cluster_figures& out) {
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

/// Part 1's cluster in `cl` (empty): a and b in r1, c in r2, each with a data directory in
/// env.tmp and, when `admin`, the admin API; started, its links up, and the fault-free reply.
caf::error start_cluster(const settings& set, environment& env, bool admin, cluster& cl,
                         cluster_figures& out) {
  const char* names[] = {"a", "b", "c"};
  const char* regions[] = {"r1", "r1", "r2"};
  for (size_t i = 0; i < 3; ++i)
    cl.add(names[i], regions[i], env.addr(i), env.addr(3 + i), (env.tmp / names[i]).string(),
           admin ? env.addr(6 + i) : std::string());
  for (size_t i = 0; i < 3; ++i) {
    say("starting " + cl.command(i));
    if (auto err = cl.start(i)) return err;
    out.commands += "- `" + cl.command(i) + "`\n";
  }
  for (size_t i = 0; i < 3; ++i)
    if (auto err = cl.wait_joined(i, {}, join_timeout)) return err;
  say("a fault-free reply");
  stream_log log;
  const std::vector<std::string> all = {cl.at(0).listen, cl.at(1).listen, cl.at(2).listen};
  std::thread([&] {
    stream_reply(all, static_cast<uint64_t>(set.seed), static_cast<uint32_t>(set.max_tokens), log);
  }).join();
  if (!log.error.empty())
    return keel::make_error(keel::errc::failed, "the fault-free reply: " + log.error);
  out.reference = log.ids;
  if (log.ids.size() > 1)
    out.reference_ms_per_token =
        ms(log.times.back() - log.times.front()) / static_cast<double>(log.ids.size() - 1);
  out.lo = std::max<int64_t>(1, static_cast<int64_t>(out.reference.size()) / 10);
  out.hi = static_cast<int64_t>(out.reference.size()) / 2;
  if (out.hi < out.lo)
    return keel::make_error(keel::errc::failed,
                            "the fault-free reply has " + std::to_string(out.reference.size()) +
                                " tokens: too short to fault its node mid-reply (try another "
                                "--seed or a larger --tokens)");
  return {};
}

/// One kind of fault, done round after round to the node serving a streaming client.
struct fault_kind {
  std::string noun;  // "kill", "partition"
  int64_t rounds = 0;
  bool all_endpoints = true;  // the client knows all three nodes (else the serving node only)
  uint64_t salt = 0;          // of the fault points' random stream
  /// Does the fault to node k.node while `log`'s client streams, and fills in its part of `k`
  /// (at_fault at least); the time the fault took effect.
  std::function<caf::expected<clock_type::time_point>(fault_round& k, stream_log& log)> inject;
  /// After the round (the reply ended, crashed nodes restarted): the cluster whole again.
  std::function<caf::error(const fault_round& k)> recover;
};

/// Rounds of `kind` on the running cluster `cl` of `part` until `kind.rounds` have been
/// measured, or too many failed. Fills in `out` as it goes: an error leaves the rounds so far.
caf::error run_rounds(const settings& set, cluster& cl, cluster_figures& part,
                      const fault_kind& kind, round_figures& out) {
  const std::vector<std::string> all = {cl.at(0).listen, cl.at(1).listen, cl.at(2).listen};
  const auto max_tokens = static_cast<uint32_t>(set.max_tokens);
  const auto seed = static_cast<uint64_t>(set.seed);
  std::mt19937_64 rng(seed ^ kind.salt);
  int failed_in_a_row = 0;
  for (int64_t attempt = 0; static_cast<int64_t>(out.rounds.size()) < kind.rounds; ++attempt) {
    if (failed_in_a_row == 3 || attempt >= 2 * kind.rounds + 5) {
      out.stopped_early = "stopped after " + std::to_string(attempt) + " rounds, " +
                          std::to_string(failed_in_a_row) + " failed in a row";
      break;
    }
    // The faults go to a, b and c in turn: the client connects to the first that answers.
    std::vector<std::string> endpoints;
    for (size_t j = 0; j < (kind.all_endpoints ? 3u : 1u); ++j)
      endpoints.push_back(all[(static_cast<size_t>(attempt) + j) % 3]);
    auto fault_at = std::uniform_int_distribution<int64_t>(part.lo, part.hi)(rng);
    stream_log log;
    std::thread client([&] { stream_reply(endpoints, seed, max_tokens, log); });
    fault_round k;
    bool ended = false;
    {
      std::unique_lock<std::mutex> lock(log.mu);
      log.cv.wait(lock,
                  [&] { return log.ended || static_cast<int64_t>(log.ids.size()) >= fault_at; });
      ended = log.ended;
      k.node = cl.find(log.endpoint);
      k.fault_after = log.ids.size();
    }
    const auto number = out.rounds.size() + 1;
    if (ended || k.node == cl.size()) {
      client.join();
      auto crashes = part.crashes.size();
      if (auto err = restart_crashed(cl, format("before %s %zu", kind.noun.c_str(), number), part))
        return err;
      if (part.crashes.size() > crashes) continue;  // the reply failed on that
      if (!log.error.empty()) {
        auto first = cl.find(endpoints.front());
        return keel::make_error(keel::errc::failed,
                                kind.noun + " " + std::to_string(number) +
                                    ": the reply failed before the " + kind.noun + ": " +
                                    log.error + "; the stderr of node " + cl.at(first).name +
                                    " (the client's first endpoint):\n" + cl.log_tail(first));
      }
      if (!ended)
        return keel::make_error(keel::errc::failed,
                                "the session is on an unknown node: " + log.endpoint);
      ++out.no_failover;  // the reply ended before fault_at
      continue;
    }
    k.node_name = cl.at(k.node).name + " (" + cl.at(k.node).region + ")";
    say(format("%s %zu: node %s after %zu tokens", kind.noun.c_str(), number,
               cl.at(k.node).name.c_str(), k.fault_after));
    auto took_effect = kind.inject(k, log);
    client.join();  // a fault not done leaves the reply to finish (or give up) on its own
    if (!took_effect)
      return keel::make_error(keel::errc::failed, kind.noun + " " + std::to_string(number) +
                                                      " of node " + cl.at(k.node).name + ": " +
                                                      describe(took_effect.error()));
    const bool counted = !log.error.empty() || !log.failovers.empty();
    if (!counted) {
      ++out.no_failover;  // every token was out before the fault took effect
    } else {
      analyse(log, *took_effect, part.reference, k);
      k.moved = k.to_node != cl.at(k.node).name;
      failed_in_a_row = k.resumed ? 0 : failed_in_a_row + 1;
      if (k.resumed)
        say(format("%s %zu: resumed on node %s, %.0f ms from the fault to the next token",
                   kind.noun.c_str(), number, k.to_node.c_str(), k.next_token_ms.value_or(-1)));
      else
        say(format("%s %zu: the reply did not resume: %s", kind.noun.c_str(), number,
                   k.error.c_str()));
    }
    if (counted) out.rounds.push_back(k);
    if (auto err = restart_crashed(cl, format("during %s %zu", kind.noun.c_str(), number), part))
      return err;
    if (auto err = kind.recover(k)) return err;
  }
  return {};
}

/// Part 1, kills: kill after kill (SIGKILL) of the node serving a streaming client.
caf::error run_kills(const settings& set, cluster& cl, cluster_figures& part, round_figures& out) {
  cluster::link_ups before;
  fault_kind kind;
  kind.noun = "kill";
  kind.rounds = set.kills;
  kind.all_endpoints = !set.restart_mode;
  kind.inject = [&](fault_round& k, stream_log&) -> caf::expected<clock_type::time_point> {
    k.at_fault = k.fault_after;
    auto killed_at = cl.kill(k.node);
    before = cl.ups_to(k.node);
    if (set.restart_mode) {
      if (auto err = cl.start(k.node)) return err;
      k.restart_ms = ms(clock_type::now() - killed_at);
    }
    return killed_at;
  };
  kind.recover = [&](const fault_round& k) -> caf::error {
    // The killed node comes back on its data directory before the next kill.
    if (!set.restart_mode)
      if (auto err = cl.start(k.node)) return err;
    return cl.wait_joined(k.node, before, join_timeout);
  };
  return run_rounds(set, cl, part, kind, out);
}

/// Part 1, partitions: the node serving a streaming client cut off from the other two for
/// partition_ms, through its admin endpoint (keel-shell's partition fault).
caf::error run_partitions(const settings& set, cluster& cl, cluster_figures& part,
                          round_figures& out) {
  cluster::link_counts before;
  clock_type::time_point healed_by;
  fault_kind kind;
  kind.noun = "partition";
  kind.rounds = set.partitions;
  kind.salt = 0x9e3779b97f4a7c15;
  kind.inject = [&](fault_round& k, stream_log& log) -> caf::expected<clock_type::time_point> {
    std::string from;
    for (size_t j = 0; j < cl.size(); ++j)
      if (j != k.node) from += (from.empty() ? "" : ",") + cl.at(j).name;
    before = cl.all_ups();
    auto run = cl.admin(k.node,
                        format("fault %s partition --from %s --ms %lld", cl.at(k.node).name.c_str(),
                               from.c_str(), static_cast<long long>(partition_ms)),
                        shell_timeout);
    if (!run) return run.error();
    {
      std::lock_guard<std::mutex> guard(log.mu);
      k.at_fault = log.ids.size();
    }
    k.shell_ms = ms(run->returned - run->started);
    // The node applied the partition before it answered keel-shell: it is over by then.
    healed_by = run->returned + std::chrono::milliseconds(partition_ms);
    return run->returned;
  };
  kind.recover = [&](const fault_round& k) -> caf::error {
    std::this_thread::sleep_until(healed_by);
    return cl.wait_relinked(k.node, before, join_timeout);
  };
  return run_rounds(set, cl, part, kind, out);
}

/// Part 2: the same load on a node without --data or peers, and on a node of a 3-node cluster
/// with both (three regions), in alternating runs. Fills in `out` as it goes: an error leaves
/// the runs so far.
caf::error run_cost(const settings& set, environment& env, cost_figures& out) {
  for (int64_t rep = 0; rep < set.reps; ++rep) {
    std::vector<std::vector<int32_t>> first_tokens;
    for (int pass = 0; pass < 2; ++pass) {
      const bool on = (pass == 0) == (rep % 2 == 1);  // off first in even runs
      cluster cl(env.flags, env.group);
      if (on) {
        auto dir = env.tmp / ("cost-" + std::to_string(rep));
        const char* names[] = {"a", "b", "c"};
        const char* regions[] = {"r1", "r2", "r3"};
        for (size_t i = 0; i < 3; ++i)
          cl.add(names[i], regions[i], env.addr(i), env.addr(3 + i), (dir / names[i]).string());
      } else {
        cl.add("solo", "", env.addr(0), "", "");
      }
      for (size_t i = 0; i < cl.size(); ++i)
        if (auto err = cl.start(i)) return err;
      for (size_t i = 0; on && i < cl.size(); ++i)
        if (auto err = cl.wait_joined(i, {}, join_timeout)) return err;
      if (on)
        out.on_commands =
            "`" + cl.command(0) + "`, `" + cl.command(1) + "` and `" + cl.command(2) + "`";
      else
        out.off_command = "`" + cl.command(0) + "`";
      say(format("cost, run %lld of %lld: majority acknowledgements %s",
                 static_cast<long long>(rep + 1), static_cast<long long>(set.reps),
                 on ? "on" : "off"));
      std::vector<std::vector<int32_t>> tokens;
      auto load =
          run_load(cl.at(0).listen, static_cast<int32_t>(set.sessions),
                   static_cast<int32_t>(set.turns), static_cast<uint32_t>(set.cost_tokens), tokens);
      if (auto err = cl.check()) return err;
      if (!load)
        return keel::make_error(
            keel::errc::failed,
            format("cost, run %lld (%s): ", static_cast<long long>(rep + 1), on ? "on" : "off") +
                describe(load.error()));
      (on ? out.on_tps : out.off_tps).push_back(load->tokens_per_s);
      (on ? out.on_ack : out.off_ack).push_back(std::move(load->ack_ms));
      if (pass == 0)
        first_tokens = std::move(tokens);
      else
        out.same_tokens = out.same_tokens && tokens == first_tokens;
      cl.stop();
    }
  }
  return {};
}

/// The columns of a round table as lists (for p50/p99/max), and counts of the replies.
struct round_stats {
  std::vector<double> next, first, detect, failover, restart, shell;
  size_t resumed = 0, same = 0, moved = 0;
};

round_stats stats_of(const round_figures& f) {
  round_stats st;
  for (const auto& k : f.rounds) {
    if (k.restart_ms) st.restart.push_back(*k.restart_ms);
    if (k.shell_ms) st.shell.push_back(*k.shell_ms);
    if (!k.resumed) continue;
    ++st.resumed;
    st.same += k.same_reply ? 1 : 0;
    st.moved += k.moved ? 1 : 0;
    if (k.next_token_ms) st.next.push_back(*k.next_token_ms);
    if (k.first_token_ms) st.first.push_back(*k.first_token_ms);
    st.detect.push_back(k.detect_ms);
    st.failover.push_back(k.failover_ms);
  }
  return st;
}

/// "Target p99 <what> under 1 s: ..." for the fault-to-next-token times of `f`; a lost reply
/// is a failover that never ends, so the target counts it.
std::string target_line(const std::string& what, const round_figures& f, const round_stats& st) {
  double p99 = percentile(st.next, 0.99);
  if (st.next.empty())
    return "Target p99 " + what + " under 1 s: **not measured (no reply resumed)**";
  if (st.next.size() < f.rounds.size())
    return format(
        "Target p99 %s under 1 s: **missed**: %zu of %zu rounds lost their reply (the "
        "resumed replies: p99 %.0f ms)",
        what.c_str(), f.rounds.size() - st.next.size(), f.rounds.size(), p99);
  return format("Target p99 %s under 1 s: %.0f ms, **%s**", what.c_str(), p99,
                p99 < 1000 ? "met" : "missed");
}

/// Why some rounds were not run: too many failed in a row, or a failure stopped them.
void report_failure(std::ostringstream& r, const round_figures& f) {
  if (!f.stopped_early.empty()) r << "; **" << f.stopped_early << "**";
  if (!f.failure.empty())
    r << "\n\n**The rounds stopped on a failure** after " << f.rounds.size()
      << " round(s):\n\n```\n"
      << f.failure << "\n```";
}

void report_cluster(std::ostringstream& r, const settings& set, const node_flags& flags,
                    const cluster_figures& cf) {
  r << "## The cluster\n\nThree keel-nodes, a and b in region r1 and c in r2, each with a data "
       "directory of its own in a temporary directory (removed at the end)";
  if (set.partitions > 0)
    r << ", each serving the admin API on a port of its own, its key in a config file of that "
         "directory (`admin-key = ...`, for keel-shell's partition fault)";
  r << ":\n\n" << cf.commands << "\n";
  r << "- The ownership protocol with the default --replicas (2): every session's group is the "
       "three nodes; a new session, a turn and a turn's end are acknowledged once two of them "
       "stored it synced; a lease per session (docs/actors.md, \"Ownership protocol\")\n";
  r << format(
      "- --heartbeat-interval %lld ms, --down-after %lld ms: a member suspects a silent owner "
      "after %lld ms, and an owner streams a session only while a majority of its group granted "
      "its lease within the last %lld ms (4/5 of --down-after)\n"
      "- Each round: a new session (temperature 0.8, top-k 40, seed %lld) streams the reply to "
      "\"%s\", at most %lld tokens, through a keel::wire::client on a thread of its own (the "
      "client's defaults but resume_for 10 s: probe every 100 ms, backoff from 25 ms). After a "
      "random number of tokens (uniform in [%lld, %lld], a tenth to a half of the fault-free "
      "reply, seeded), keel-bench's main thread faults the node serving the session (the "
      "client's endpoint()). The faults go to a, b and c in turn: the client's endpoints are "
      "rotated each round and it connects to the first\n"
      "- Detection: from the fault to the client seeing its stream broken (the failover "
      "callback's time minus failover_event::duration). Failover: failover_event::duration, "
      "from the break seen to the resumed stream accepted by the new node. Fault to next token: "
      "to the arrival at the client of the first token of the resumed stream (the first after "
      "its on_failover); \"resume accepted to next token\" is its part after the failover, "
      "the new owner's stream catching up: after a takeover it prefills the session's history "
      "before it decodes, and again when it adopts tokens the client holds beyond its copy. "
      "\"Same reply\": every token of the reply equals the fault-free reply's\n\n",
      static_cast<long long>(flags.heartbeat), static_cast<long long>(flags.down_after),
      static_cast<long long>(flags.down_after), static_cast<long long>(flags.down_after * 4 / 5),
      static_cast<long long>(set.seed), bench_prompts[0], static_cast<long long>(set.max_tokens),
      static_cast<long long>(cf.lo), static_cast<long long>(cf.hi));
  if (!cf.failure.empty())
    r << "**The cluster could not be started:**\n\n```\n" << cf.failure << "\n```\n\n";
}

void report_kills(std::ostringstream& r, const settings& set, const round_figures& kf) {
  auto st = stats_of(kf);
  r << "## Kills\n\n";
  if (set.restart_mode)
    r << "- **Recovery by restart** (`--recovery restart`): the client knows the serving node "
         "only, and keel-bench restarts that node on its data directory right after the kill; "
         "the time to the next token includes the node's restart (model load, store "
         "recovery)\n";
  else
    r << "- The client is connected with all three endpoints; another node takes the session "
         "over\n";
  r << "- The fault: SIGKILL to the serving node; the kill's time is the steady_clock time just "
       "before kill(2). Before the next round the killed node is restarted on its data "
       "directory, and keel-bench waits until every region link to and from it is up again\n";
  r << "- Tokens the node had sent before it died but the client read after the kill are not "
       "the next token; the column \"in flight\" counts them\n\n";
  r << "### Results\n\n";
  r << format(
      "- Kills: %zu; replies resumed: %zu; resumed replies equal to the fault-free reply: %zu "
      "of %zu; rounds run again because the reply ended before the kill took effect: %zu",
      kf.rounds.size(), st.resumed, st.same, st.resumed, kf.no_failover);
  report_failure(r, kf);
  r << "\n\n| measure | p50 | p99 | max |\n|---|---|---|---|\n";
  r << "| kill to next token (resumed replies) | " << spread(st.next) << " |\n";
  r << "| detection | " << spread(st.detect) << " |\n";
  r << "| failover (client) | " << spread(st.failover) << " |\n";
  r << "| resume accepted to next token | " << spread(st.first) << " |\n";
  if (!st.restart.empty()) r << "| restart (kill to listening) | " << spread(st.restart) << " |\n";
  r << "\n" << target_line("kill to next token", kf, st) << "\n\n";
  r << "### Kill rounds\n\n| round | killed | kill after token | detection | failover | kill to "
       "next token | in flight | resumed on | at index | same reply |\n"
       "|---|---|---|---|---|---|---|---|---|---|\n";
  for (size_t i = 0; i < kf.rounds.size(); ++i) {
    const auto& k = kf.rounds[i];
    if (!k.resumed) {
      r << format("| %zu | %s | %zu | not resumed: ", i + 1, k.node_name.c_str(), k.fault_after)
        << k.error << " |||||||\n";
      continue;
    }
    r << format("| %zu | %s | %zu | %.0f ms | %.0f ms | %s | %zu | %s | %llu | %s |\n", i + 1,
                k.node_name.c_str(), k.fault_after, k.detect_ms, k.failover_ms,
                k.next_token_ms ? format("%.0f ms", *k.next_token_ms).c_str() : "-", k.in_flight,
                k.to_node.c_str(), static_cast<unsigned long long>(k.from_index),
                k.same_reply ? "yes" : "no");
  }
  r << "\n";
}

void report_partitions(std::ostringstream& r, const node_flags& flags, const round_figures& pf) {
  auto st = stats_of(pf);
  const auto lease = flags.down_after * 4 / 5;
  r << "## Partitions\n\n";
  r << format(
      "- The fault: keel-bench runs `keel-shell --connect ADMIN --key-file FILE -c \"fault X "
      "partition --from Y,Z --ms %lld\"` against the admin endpoint of the serving node X: all "
      "peer traffic between X and the other two stops, both ways, for %lld ms, while the "
      "client's own connection to X stays up. The client is connected with all three "
      "endpoints. keel-bench records the steady_clock time just before it starts keel-shell "
      "and the time keel-shell has exited (column \"keel-shell\": the difference: its start, "
      "its connection and the admin call); the cut is the latter, as the node applies the "
      "partition before it answers\n"
      "- After the round keel-bench waits until the partition has ended and every region link "
      "between X and the other two, both ways, has gone up again (reconnect backoff up to "
      "about 2.4 s), then the next round starts\n"
      "- Cut to next token: from the cut (keel-shell exited) to the first token of the stream "
      "resumed on the majority side. \"After the cut\": tokens the client read after the cut "
      "and before its stream broke (X streams on while its lease holds)\n"
      "- What bounds it from below: X streams on until its lease runs out, at most %lld ms "
      "after the cut (less the age of its last answered heartbeat, up to --heartbeat-interval "
      "%lld ms), and ends its clients' streams with `disconnected` a heartbeat interval (%lld "
      "ms) later; meanwhile Y and Z declare X down %lld ms (--down-after) after the cut and take "
      "its sessions over, and a client that comes to them before that is told to retry. So the "
      "client sees its stream end about %lld-%lld ms after the cut and resumes on Y or Z once "
      "they have taken over; the new owner then prefills the history and the tokens the client "
      "holds beyond its copy\n\n",
      static_cast<long long>(partition_ms), static_cast<long long>(partition_ms),
      static_cast<long long>(lease), static_cast<long long>(flags.heartbeat),
      static_cast<long long>(flags.heartbeat), static_cast<long long>(flags.down_after),
      static_cast<long long>(lease), static_cast<long long>(lease + flags.heartbeat));
  r << "### Results\n\n";
  r << format(
      "- Partitions: %zu; replies resumed: %zu, on the majority side: %zu of %zu; resumed "
      "replies equal to the fault-free reply: %zu of %zu; rounds run again because the reply "
      "ended before the cut took effect: %zu",
      pf.rounds.size(), st.resumed, st.moved, st.resumed, st.same, st.resumed, pf.no_failover);
  report_failure(r, pf);
  r << "\n\n| measure | p50 | p99 | max |\n|---|---|---|---|\n";
  r << "| cut to next token (resumed replies) | " << spread(st.next) << " |\n";
  r << "| detection (cut to stream ended) | " << spread(st.detect) << " |\n";
  r << "| failover (client) | " << spread(st.failover) << " |\n";
  r << "| resume accepted to next token | " << spread(st.first) << " |\n";
  r << "| keel-shell (start to exit) | " << spread(st.shell) << " |\n";
  r << "\n" << target_line("cut to next token", pf, st);
  if (!st.next.empty() && percentile(st.next, 0.99) >= 1000)
    r << format(
        ". The cut-off node ends the streams only when its lease (%lld ms) and the grace after "
        "it (%lld ms) have run out: detection was %.0f ms at the median, the resume on the "
        "majority side %.0f ms, and its first token came %.0f ms after that",
        static_cast<long long>(lease), static_cast<long long>(flags.down_after), median(st.detect),
        median(st.failover), median(st.first));
  r << "\n\n### Partition rounds\n\n| round | cut off | after token | keel-shell | detection | "
       "failover | cut to next token | after the cut | resumed on | at index | same reply |\n"
       "|---|---|---|---|---|---|---|---|---|---|---|\n";
  for (size_t i = 0; i < pf.rounds.size(); ++i) {
    const auto& k = pf.rounds[i];
    const auto shell = k.shell_ms ? format("%.0f ms", *k.shell_ms) : std::string("-");
    if (!k.resumed) {
      r << format("| %zu | %s | %zu | %s | not resumed: ", i + 1, k.node_name.c_str(),
                  k.fault_after, shell.c_str())
        << k.error << " |||||||\n";
      continue;
    }
    r << format("| %zu | %s | %zu | %s | %.0f ms | %.0f ms | %s | %zu | %s%s | %llu | %s |\n",
                i + 1, k.node_name.c_str(), k.fault_after, shell.c_str(), k.detect_ms,
                k.failover_ms, k.next_token_ms ? format("%.0f ms", *k.next_token_ms).c_str() : "-",
                k.in_flight, k.to_node.c_str(), k.moved ? "" : " (**the cut-off node**)",
                static_cast<unsigned long long>(k.from_index), k.same_reply ? "yes" : "no");
  }
  r << "\n";
}

void report_cost(std::ostringstream& r, const settings& set, const cost_figures& cf) {
  r << "## The cost of majority acknowledgements\n\n";
  r << "- Off: " << cf.off_command << " (no --data, no peers: nothing is written or replicated)\n";
  r << "- On: " << cf.on_commands
    << ", a in r1, b in r2, c in r3, fresh data directories each run; the sessions run on a, "
       "whose group is all three nodes ("
    << "the ownership protocol's group of three"
    << "): a new session or turn is acknowledged once a majority of the group stored it (a's "
       "synced write to its RocksDB store and one other member's); tokens are checkpointed and "
       "replicated without waiting\n";
  r << format(
      "- Load: %lld sessions, each a thread with its own keel::wire::client, %lld turns of at "
      "most %lld tokens one after another (session i: temperature 0.8, top-k 40, seed i; turn "
      "k: prompt (i + k) mod 8 of the short benchmark prompts). Tokens/s: every generated token "
      "over the time from the start (all sessions open) to the end of the last turn. %lld "
      "run(s) of each configuration, alternating (off first in even runs), the nodes started "
      "afresh for each run; the three nodes of \"on\" share this machine's cores with the "
      "load\n",
      static_cast<long long>(set.sessions), static_cast<long long>(set.turns),
      static_cast<long long>(set.cost_tokens), static_cast<long long>(set.reps));
  r << "- Turn acknowledgement: from just before the client's generate() (which sends the turn) "
       "to its on_accept callback, i.e. the node's answer to Session.send: the turn tokenized "
       "and recorded (with \"on\", stored by a majority of its group), before any prefill. "
       "Every turn of every session of every run counts\n\n";
  if (!cf.failure.empty())
    r << "**The runs stopped on a failure:**\n\n```\n" << cf.failure << "\n```\n\n";
  r << "| run | off: tokens/s | on: tokens/s | cost | off: ack p50 | on: ack p50 |\n"
       "|---|---|---|---|---|---|\n";
  std::vector<double> paired, off_acks, on_acks;
  for (const auto& v : cf.off_ack) off_acks.insert(off_acks.end(), v.begin(), v.end());
  for (const auto& v : cf.on_ack) on_acks.insert(on_acks.end(), v.begin(), v.end());
  for (size_t i = 0; i < cf.off_tps.size() && i < cf.on_tps.size(); ++i) {
    paired.push_back(100.0 * (1.0 - cf.on_tps[i] / cf.off_tps[i]));
    r << format("| %zu | %.1f | %.1f | %.1f%% | %.2f ms | %.2f ms |\n", i + 1, cf.off_tps[i],
                cf.on_tps[i], paired.back(), percentile(cf.off_ack[i], 0.5),
                percentile(cf.on_ack[i], 0.5));
  }
  double off_m = median(cf.off_tps), on_m = median(cf.on_tps);
  double cost = off_m > 0 ? 100.0 * (1.0 - on_m / off_m) : 0.0;
  r << format("| median | %.1f | %.1f | %.1f%% | | |\n\n", off_m, on_m, cost);
  r << "| turn acknowledgement | turns | p50 | p99 | max |\n|---|---|---|---|---|\n";
  r << "| off | " << off_acks.size() << " | " << spread(off_acks, 2) << " |\n";
  r << "| on | " << on_acks.size() << " | " << spread(on_acks, 2) << " |\n\n";
  if (on_acks.size() < 100)
    r << "(p99 is the nearest rank: of fewer than 100 turns it is the largest.)\n\n";
  r << format(
      "Target cost under 5%%: %.1f%% (medians), **%s**; median of the paired runs %.1f%%. "
      "Acknowledgement latency, p50: %.2f ms off, %.2f ms on (%+.2f ms). The same tokens with "
      "and without: %s\n\n",
      cost, cost < 5.0 ? "met" : "missed", median(paired), percentile(off_acks, 0.5),
      percentile(on_acks, 0.5), percentile(on_acks, 0.5) - percentile(off_acks, 0.5),
      cf.same_tokens ? "yes" : "**no**");
}

/// The Markdown report.
std::string report(const settings& set, const node_flags& flags, const std::string& command,
                   const keel::model& model, const std::string& load_before,
                   const std::string& load_after, const cluster_figures& cl,
                   const round_figures& kf, const round_figures& pf, const cost_figures& cf) {
  std::ostringstream r;
  const auto& mc = model.config();
  r << "# Failover benchmark\n\nCommand: `" << command << "`\n\n## Machine\n\n";
  r << "- CPU: " << cpu_model() << ", " << std::thread::hardware_concurrency()
    << " hardware threads, kernels: " << keel::to_string(keel::active_isa()) << "\n";
  r << "- Memory: " << mem_total() << "\n";
  r << "- Load average (1, 5, 15 min) before the run: " << load_before
    << "; after it: " << load_after << " (other processes share the machine)\n";
  r << "- Network: loopback (127.0.0.1); every node, the clients and keel-bench share this "
       "machine\n\n## Model\n\n";
  r << format(
      "- %s (%s): dim %d, %d layers, %d heads (kv %d), ffn %d, vocab %d, ctx %d, "
      "weights %s, %.1f MB read per decoded token\n",
      model.path().c_str(), model.format().c_str(), mc.dim, mc.n_layers, mc.n_heads, mc.n_kv_heads,
      mc.ffn_dim, mc.vocab_size, mc.ctx_len,
      std::string(keel::dtype_name(model.weight_type())).c_str(),
      model.weight_bytes_per_token() / 1e6);
  if (!cl.reference.empty())
    r << format(
        "- The fault-free reply on the cluster: %zu tokens at %.2f ms per token (one "
        "session alone)\n",
        cl.reference.size(), cl.reference_ms_per_token);
  r << "\n";

  if (set.kills > 0 || set.partitions > 0) {
    report_cluster(r, set, flags, cl);
    if (set.kills > 0) report_kills(r, set, kf);
    if (set.partitions > 0) {
      if (!kf.failure.empty())
        r << "## Partitions\n\nNot run: the kills stopped on a failure (above).\n\n";
      else
        report_partitions(r, flags, pf);
    }
    if (!cl.crashes.empty()) {
      r << "## Nodes that ended on their own\n\nkeel-bench restarted each on its data "
           "directory and went on. How each ended, and the end of its stderr:\n\n";
      // The first few in full; the rest by their first line (they tend to repeat).
      for (size_t i = 0; i < cl.crashes.size(); ++i) {
        const auto& c = cl.crashes[i];
        if (i < 3)
          r << "```\n" << c << "\n```\n\n";
        else
          r << "- " << c.substr(0, c.find('\n')) << "\n";
      }
    } else {
      r << "No node ended on its own.\n";
    }
    r << "\nThe cluster at the end (SIGTERM): " << cl.end << "\n\n";
  }

  if (set.reps > 0) report_cost(r, set, cf);

  r << "## How to reproduce\n\n```\n";
  r << "build/apps/keel-model synth -o /tmp/failover.gguf --dim 512 --layers 6 --heads 8 "
       "--kv-heads 4 \\\n  --ffn 1536 --ctx 2048\n";
  r << "build/apps/keel-bench failover --model /tmp/failover.gguf"
    << " --out bench/failover-protocol.md"
    << "\n```\n\n";
  r << "keel-bench starts every keel-node itself (from its own directory, as keel-shell) on free "
       "ports of 127.0.0.1, with data directories and the admin key in a temporary directory, "
       "and ends them all on every path (SIGINT included). `--kills 0`, `--partitions 0` or "
       "`--reps 0` skips a part.\n";
  return r.str();
}

/// Writes `admin-key = KEY` to `config` and KEY to `key_file` (both owner-only), KEY random.
caf::error write_admin_key(const fs::path& config, const fs::path& key_file) {
  std::random_device rd;
  std::string key = "keel-bench-";
  for (int i = 0; i < 4; ++i) key += format("%08x", rd());
  for (const auto& [path, text] :
       {std::pair{config, "admin-key = " + key + "\n"}, std::pair{key_file, key + "\n"}}) {
    std::ofstream f(path);
    f << text;
    f.close();
    if (!f)
      return keel::make_error(keel::errc::failed, path.string() + ": cannot write the admin key");
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_read | fs::perms::owner_write, ec);
  }
  return {};
}

}  // namespace

int failover_command(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-bench failover --model FILE [--kills N] [--partitions N] "
        "[--recovery takeover|restart] [--out bench/failover.md]",
        "Starts a cluster of three keel-nodes on 127.0.0.1 (a and b in region r1, c in r2, each "
        "with --data in a temporary directory and, for the partitions, the admin API). Kill "
        "after kill, a client connected to all three streams a long reply and the node serving "
        "it is killed with SIGKILL after a random number of tokens; reports the time from the "
        "kill to the client's next token (target: p99 under 1 s), the client's detection and "
        "failover times, and whether each reply equals the fault-free one. The killed node is "
        "restarted on its data directory before the next kill. Then partition after partition: "
        "the serving node is cut off from the other two for 3 s (keel-shell, found beside "
        "keel-bench: fault NODE partition) and the time from the cut to the next token from the "
        "majority side is reported the same way; the links come up again before the next "
        "round. Then the cost of majority acknowledgements: tokens/s and turn acknowledgement "
        "latency (p50, p99) of concurrent sessions on a node of a 3-node cluster with --data "
        "(three regions), against a node without --data or peers (target: under 5%). Every "
        "keel-node is ended on every path, SIGINT included.",
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
  const auto bin = fs::read_symlink("/proc/self/exe").parent_path();
  flags.exe = (bin / "keel-node").string();
  flags.model = opts->get("model");
  struct int_option {
    const char* name;
    int64_t fallback, min, max;
    int64_t* into;
  };
  const int_option ints[] = {{"kills", 20, 0, 10000, &set.kills},
                             {"partitions", 5, 0, 10000, &set.partitions},
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
  // The majority must have declared the cut-off node down well within the partition.
  if (set.partitions > 0 && 2 * flags.down_after >= partition_ms)
    return fail(keel::make_error(
        keel::errc::bad_request,
        format("failover: --down-after %lld: the partitions (%lld ms) need it below %lld ms "
               "(or --partitions 0)",
               static_cast<long long>(flags.down_after), static_cast<long long>(partition_ms),
               static_cast<long long>(partition_ms / 2))));
  std::vector<fs::path> needed = {flags.exe};
  if (set.partitions > 0) needed.push_back(bin / "keel-shell");
  for (const auto& exe : needed)
    if (access(exe.c_str(), X_OK) != 0)
      return fail(keel::make_error(
          keel::errc::failed,
          "failover: " + exe.string() + ": " + std::strerror(errno) + " (keel-bench runs " +
              exe.filename().string() + " from its own directory; build it there" +
              (exe.filename() == "keel-shell" ? ", or give --partitions 0)" : ")")));
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
  if (set.partitions > 0) {
    flags.admin_config = (tmp.path / "admin.conf").string();
    flags.admin_key_file = (tmp.path / "admin.key").string();
    flags.shell = (bin / "keel-shell").string();
    if (auto err = write_admin_key(flags.admin_config, flags.admin_key_file)) return fail(err);
  }

  std::string load_before = load_average();
  auto loaded = keel::model::load(flags.model);
  if (!loaded) return fail(loaded.error());
  std::unique_ptr<keel::model> model = std::move(*loaded);
  auto ports = free_ports(9);
  if (!ports) return fail(ports.error());
  environment env{flags, group, tmp.path, *ports};
  cluster_figures part;
  round_figures kf, pf;
  if (set.kills > 0 || set.partitions > 0) {
    cluster cl(env.flags, env.group);
    if (auto err = start_cluster(set, env, set.partitions > 0, cl, part)) {
      part.failure = describe(err);
    } else {
      if (set.kills > 0)
        if (auto err = run_kills(set, cl, part, kf)) kf.failure = describe(err);
      if (set.partitions > 0 && kf.failure.empty())
        if (auto err = run_partitions(set, cl, part, pf)) pf.failure = describe(err);
    }
    part.end = cl.stop();
  }
  cost_figures cf;
  if (set.reps > 0)
    if (auto err = run_cost(set, env, cf)) cf.failure = describe(err);
  auto status =
      publish(report(set, flags, command, *model, load_before, load_average(), part, kf, pf, cf),
              opts->get("out"));
  for (const auto* failure : {&part.failure, &kf.failure, &pf.failure, &cf.failure})
    if (!failure->empty()) {
      say(*failure);
      status = 1;
    }
  return status;
}

}  // namespace keel::bench
