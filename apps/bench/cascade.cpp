// keel-bench cascade (issue #14, "Numbers"): three keel-nodes on loopback, offered load stepped
// up to twice what their KV budgets hold, and one node SIGKILLed at the peak. Clients of three
// priorities (batch 0, standard 10, interactive 20) hold conversations closed-loop; the report
// gives, per priority, goodput, time to first token and turns shed, and per node the peak of KV
// pages in use against its budget; once without the degradation policy and once with it.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "apps/bench/common.hpp"
#include "apps/bench/process.hpp"
#include "wire/client.hpp"

namespace keel::bench {

namespace {

namespace fs = std::filesystem;

constexpr option cascade_spec[] = {
    {"model", "FILE", "the nodes' model (required)"},
    {"kv-bytes", "B", "each node's KV budget (default 8M)"},
    {"tokens", "N", "most tokens of each turn (default 96)"},
    {"steps", "N", "load steps up to twice the capacity (default 4)"},
    {"step-seconds", "S", "length of each step (default 6)"},
    {"policy", "WHICH", "off, on or both (default both): runs without and with --degrade-below 10"},
    {"threads", "N", "CPU threads of each node's one shard (default 1)"},
    {"out", "FILE", "also write the report (Markdown) to FILE, e.g. bench/cascade.md"},
};

using clock_type = std::chrono::steady_clock;

/// GET /metrics of the node at `address`: one unlabelled sample, or -1.
double metric(const std::string& address, const std::string& name) {
  auto colon = address.rfind(':');
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_port = htons(static_cast<uint16_t>(std::stoi(address.substr(colon + 1))));
  ::inet_pton(AF_INET, address.substr(0, colon).c_str(), &sa.sin_addr);
  std::string body;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0) {
    std::string req = "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n";
    (void)!::write(fd, req.data(), req.size());
    char buf[65536];
    ssize_t n;
    while ((n = ::read(fd, buf, sizeof buf)) > 0) body.append(buf, static_cast<size_t>(n));
  }
  ::close(fd);
  std::istringstream in(body);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(name + " ", 0) == 0) return std::stod(line.substr(name.size() + 1));
  return -1;
}

struct priority_figures {
  int64_t turns = 0, shed = 0, failed = 0, tokens = 0, degraded = 0, sessions = 0;
  std::vector<double> ttft_ms;
};

struct run_figures {
  std::map<int32_t, priority_figures> by_priority;
  std::vector<std::string> node_lines;  // per node: peak / capacity, takeovers, degraded
  double seconds = 0;
  int clients_peak = 0, capacity_turns = 0;
  std::string kill_note;
};

struct shared {
  std::mutex mu;
  run_figures* out = nullptr;
  std::atomic<bool> stop{false};
};

/// One client: conversations of 3 turns, one after another, until told to stop.
void client_loop(const std::vector<std::string>& endpoints, int32_t priority, uint64_t seed,
                 uint32_t max_tokens, shared& sh) {
  wire::client::options o;
  o.connect_timeout = std::chrono::seconds(2);
  o.call_timeout = std::chrono::seconds(60);
  o.resume_for = std::chrono::seconds(30);
  priority_figures mine;
  const char* prompts[] = {"Tell me a story", "And then?", "How does it end?"};
  while (!sh.stop) {
    auto c = wire::client::connect(endpoints, o);
    if (!c) {
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      continue;
    }
    auto s = (*c)->open_session(bench_params(seed++), priority);
    if (!s) {
      ++mine.failed;
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
      continue;
    }
    ++mine.sessions;
    if (auto info = (*c)->session(*s); info && info->context_length > 0) {
      auto node = (*c)->info();
      if (node && info->context_length < node->context_length) ++mine.degraded;
    }
    for (int t = 0; t < 3 && !sh.stop; ++t) {
      auto sent = clock_type::now();
      double first = -1;
      auto on_token = [&](uint64_t, uint64_t, int32_t, std::string_view) {
        if (first < 0)
          first = std::chrono::duration<double, std::milli>(clock_type::now() - sent).count();
      };
      std::string failovers;
      auto g = (*c)->generate(*s, prompts[t], max_tokens, on_token);
      if (std::getenv("KEEL_BENCH_VERBOSE") &&
          std::chrono::duration<double>(clock_type::now() - sent).count() > 10) {
        std::lock_guard<std::mutex> lock(sh.mu);
        std::cerr << "keel-bench: slow turn " << t << " of " << *s << " (priority " << priority
                  << ") via " << (*c)->endpoint() << ": first token after " << first
                  << " ms, ended after "
                  << std::chrono::duration<double, std::milli>(clock_type::now() - sent).count()
                  << " ms: " << (g ? std::string("done") : describe(g.error())) << "\n";
      }
      if (g) {
        ++mine.turns;
        mine.tokens += static_cast<int64_t>(g->generated.size());
        if (first >= 0) mine.ttft_ms.push_back(first);
        continue;
      }
      if (code_of(g.error()) == errc::overloaded) {
        ++mine.shed;
        std::this_thread::sleep_for(std::chrono::milliseconds(
            std::clamp<uint32_t>(wire::retry_after_ms(g.error()), 50, 1000)));
      } else {
        ++mine.failed;
      }
      break;  // a new conversation
    }
  }
  std::lock_guard<std::mutex> g(sh.mu);
  auto& f = sh.out->by_priority[priority];
  f.turns += mine.turns;
  f.shed += mine.shed;
  f.failed += mine.failed;
  f.tokens += mine.tokens;
  f.degraded += mine.degraded;
  f.sessions += mine.sessions;
  f.ttft_ms.insert(f.ttft_ms.end(), mine.ttft_ms.begin(), mine.ttft_ms.end());
}

caf::error run_once(process_group& group, const fs::path& tmp, const node_flags& base,
                    bool policy, int64_t steps, int64_t step_seconds, uint32_t max_tokens,
                    run_figures& out) {
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  auto ports = free_ports(9);
  if (!ports) return std::move(ports.error());
  auto addr = [&](int i) { return "127.0.0.1:" + std::to_string((*ports)[static_cast<size_t>(i)]); };
  std::vector<std::string> http;
  const char* names[] = {"a", "b", "c"};
  for (int i = 0; i < 3; ++i) http.push_back(addr(6 + i));
  // keel-node takes one --http-listen: each node is started from a cluster object whose extra
  // flags carry its own port (every object lists all three nodes, for --peers).
  std::vector<std::unique_ptr<cluster>> per_node;
  for (int i = 0; i < 3; ++i) {
    node_flags f = base;
    f.extra.insert(f.extra.end(), {"--http-listen", http[static_cast<size_t>(i)]});
    if (policy) f.extra.insert(f.extra.end(), {"--degrade-below", "10"});
    auto c = std::make_unique<cluster>(f, group);
    for (int k = 0; k < 3; ++k)
      c->add(names[k], std::string("r") + std::to_string(k + 1), addr(k), addr(3 + k),
             (tmp / names[k]).string());
    per_node.push_back(std::move(c));
  }
  for (int i = 0; i < 3; ++i) {
    std::cerr << "keel-bench: starting " << per_node[static_cast<size_t>(i)]->command(static_cast<size_t>(i)) << "\n";
    if (auto err = per_node[static_cast<size_t>(i)]->start(static_cast<size_t>(i))) return err;
  }
  for (int i = 0; i < 3; ++i)
    if (auto err = per_node[static_cast<size_t>(i)]->wait_joined(static_cast<size_t>(i), {},
                                                                 std::chrono::seconds(15)))
      return err;
  std::this_thread::sleep_for(std::chrono::seconds(1));  // every link up both ways
  // Capacity: turns that fit at once in the three budgets (a turn reserves its prompt plus
  // its token budget; later turns of a conversation reserve more).
  double pages = metric(http[0], "keel_kv_pages_capacity");
  if (pages <= 0) return make_error(errc::failed, "no keel_kv_pages_capacity from " + http[0]);
  int per_turn = static_cast<int>((max_tokens + 16 + 15) / 16) * 2;  // a middle turn, about
  out.capacity_turns = std::max(1, 3 * static_cast<int>(pages) / per_turn);
  shared sh;
  sh.out = &out;
  std::vector<std::thread> clients;
  auto started = clock_type::now();
  std::vector<std::string> all = {addr(0), addr(1), addr(2)};
  int next = 0;
  for (int64_t k = 1; k <= steps; ++k) {
    int target = static_cast<int>(2.0 * out.capacity_turns * static_cast<double>(k) / steps);
    std::cerr << "keel-bench: cascade " << (policy ? "with" : "without")
              << " the policy, step " << k << ": " << target << " clients\n";
    for (; next < target; ++next) {
      std::vector<std::string> eps;
      for (int r = 0; r < 3; ++r) eps.push_back(all[static_cast<size_t>((next + r) % 3)]);
      int32_t priority = (next % 3) * 10;
      clients.emplace_back(client_loop, eps, priority, static_cast<uint64_t>(1000 + next * 97),
                           max_tokens, std::ref(sh));
    }
    out.clients_peak = target;
    if (k == steps) {
      std::this_thread::sleep_for(std::chrono::seconds(step_seconds) / 2);
      per_node[0]->kill(0);
      out.kill_note = "a SIGKILLed " + std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                          clock_type::now() - started)
                                                          .count()) +
                      " ms into the run";
      std::cerr << "keel-bench: " << out.kill_note << "\n";
      std::this_thread::sleep_for(std::chrono::seconds(step_seconds) / 2);
    } else {
      std::this_thread::sleep_for(std::chrono::seconds(step_seconds));
    }
  }
  sh.stop = true;
  for (auto& t : clients) t.join();
  out.seconds = std::chrono::duration<double>(clock_type::now() - started).count();
  for (int i = 0; i < 3; ++i) {
    if (i == 0) {
      out.node_lines.push_back("| a | killed at the peak | - | - | - |");
      continue;
    }
    auto h = http[static_cast<size_t>(i)];
    auto peak = metric(h, "keel_kv_pages_peak");
    auto cap = metric(h, "keel_kv_pages_capacity");
    char line[256];
    std::snprintf(line, sizeof line, "| %s | %.0f / %.0f%s | %.0f | %.0f | %.0f |", names[i], peak,
                  cap, peak > cap ? " (past the budget!)" : "",
                  metric(h, "keel_takeovers_total"), metric(h, "keel_sessions_degraded_total"),
                  metric(h, "keel_queue_length"));
    out.node_lines.push_back(line);
  }
  for (int i = 1; i < 3; ++i) per_node[static_cast<size_t>(i)]->stop();
  fs::remove_all(tmp);
  return {};
}

std::string report_run(const run_figures& r, bool policy) {
  std::ostringstream o;
  char buf[512];
  o << "\n## " << (policy ? "With the degradation policy (`--degrade-below 10`)" : "Without the degradation policy")
    << "\n\nCapacity: about " << r.capacity_turns << " turns at once (three nodes); clients up to "
    << r.clients_peak << "; " << r.kill_note << "; " << std::fixed;
  o.precision(1);
  o << r.seconds << " s in all.\n\n";
  o << "| priority | sessions (degraded) | turns done | goodput tokens/s | TTFT p50 | TTFT p99 | turns shed | failed |\n";
  o << "|---|---|---|---|---|---|---|---|\n";
  for (auto& [p, f] : r.by_priority) {
    std::snprintf(buf, sizeof buf, "| %d | %lld (%lld) | %lld | %.1f | %.0f ms | %.0f ms | %lld | %lld |\n", p,
                  static_cast<long long>(f.sessions), static_cast<long long>(f.degraded),
                  static_cast<long long>(f.turns), static_cast<double>(f.tokens) / r.seconds,
                  percentile(f.ttft_ms, 0.5), percentile(f.ttft_ms, 0.99),
                  static_cast<long long>(f.shed), static_cast<long long>(f.failed));
    o << buf;
  }
  o << "\n| node | peak KV pages / budget | takeovers | sessions degraded | queue at the end |\n|---|---|---|---|---|\n";
  for (auto& l : r.node_lines) o << l << "\n";
  return o.str();
}

}  // namespace

int cascade_command(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-bench cascade --model FILE [--kv-bytes B] [--steps N] [--policy off|on|both] "
        "[--out bench/cascade.md]",
        "Starts three keel-nodes on 127.0.0.1 (three regions, each with --data in a temporary "
        "directory and its own HTTP port for /metrics). Clients of priorities 0, 10 and 20 in "
        "turn hold 3-turn conversations closed-loop, each client's endpoints starting at "
        "another node; their number steps up to twice the turns the three KV budgets hold at "
        "once, and node a is SIGKILLed half-way through the last step. Reports per priority "
        "the sessions (degraded), turns done, goodput, time to first token (p50, p99), turns "
        "shed and failed, and per surviving node the peak of KV pages in use against its "
        "budget (it must stay within), takeovers and degraded sessions; without the "
        "degradation policy and with it (--degrade-below 10).",
        cascade_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, cascade_spec);
  if (!opts) return fail(opts.error());
  if (!opts->has("model"))
    return fail(make_error(errc::bad_request, "cascade: --model FILE is required"));
  auto steps = opts->get_int("steps", 4, 1, 20);
  auto step_seconds = opts->get_int("step-seconds", 6, 1, 600);
  auto tokens = opts->get_int("tokens", 96, 1, 1 << 16);
  auto threads = opts->get_int("threads", 1, 1, 1024);
  for (auto* e : {&steps, &step_seconds, &tokens, &threads})
    if (!*e) return fail(e->error());
  auto which = opts->get("policy", "both");
  if (which != "off" && which != "on" && which != "both")
    return fail(make_error(errc::bad_request, "cascade: --policy " + which + ": expected off, on or both"));
  node_flags flags;
  flags.exe = (fs::read_symlink("/proc/self/exe").parent_path() / "keel-node").string();
  flags.model = opts->get("model");
  flags.threads = *threads;
  flags.extra = {"--kv-bytes", opts->get("kv-bytes", "8M"), "--max-queue", "8"};
  // Before any thread starts (process.hpp): SIGINT and SIGTERM end the nodes and clean up.
  auto tmp = fs::temp_directory_path() / ("keel-bench-cascade-" + std::to_string(::getpid()));
  process_group group([tmp] {
    std::error_code ec;
    fs::remove_all(tmp, ec);
  });
  std::ostringstream report;
  report << "# Cascade benchmark\n\nCommand: `keel-bench cascade";
  for (auto* a : args) report << " " << a;
  report << "`\n\n- Machine: " << cpu_model() << ", " << mem_total()
         << "\n- Nodes: three keel-nodes, `--kv-bytes " << opts->get("kv-bytes", "8M")
         << " --max-queue 8 --threads " << *threads << "`, model " << flags.model
         << "\n- Clients: priorities 0, 10, 20 in turn; 3-turn conversations of at most "
         << *tokens << " tokens per turn, closed-loop; a turn shed (`overloaded`) ends its "
            "conversation and the client starts another after the retry-after\n";
  for (bool policy : {false, true}) {
    if ((policy && which == "off") || (!policy && which == "on")) continue;
    run_figures r;
    if (auto err = run_once(group, tmp, flags, policy, *steps, *step_seconds,
                            static_cast<uint32_t>(*tokens), r))
      return fail(err);
    report << report_run(r, policy);
  }
  return publish(report.str(), opts->get("out", ""));
}

}  // namespace keel::bench
