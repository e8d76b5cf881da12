// keel-sim: runs whole clusters on simulated time and a simulated network, one seed at a time,
// and checks Keel's guarantees on each run's history (docs/sim.md).

#include <chrono>
#include <cstdio>
#include <iostream>
#include <span>
#include <sstream>

#include "apps/cli.hpp"
#include "apps/sim/sim.hpp"

namespace {

const keel::cli::option spec[] = {
    {"seed", "S", "run this one seed (prints its summary; replays a failure)"},
    {"seeds", "N", "run N seeds from --first on; stop at the first violation"},
    {"first", "S", "the first seed of --seeds (default 1)"},
    {"nodes", "K", "nodes per run, 3..7 (default: drawn from the seed)"},
    {"regions", "R", "regions per run, 2..3 (default: drawn from the seed)"},
    {"clients", "C", "clients (one session each) per run, 1..20 (default: drawn, 2..6)"},
    {"rule", "RULE",
     "majority (Keel's protocol, default) or view (the unsafe rule before issue #10: acknowledge "
     "on any one peer or alone, take over from this node's own view)"},
    {"scenario", "NAME",
     "a fixed schedule instead of drawn faults: partition-minority ({a, b} | {c} while a serves) "
     "or partition-isolated ({a} | {b, c})"},
    {"damage", nullptr,
     "also draw damaged disks: a crashed node restarts on a store that lost part of what it had "
     "synced, and knows it (docs/sim.md)"},
    {"trace", nullptr, "print every node and client event of the run to stderr"},
};

std::string replay(const keel::sim::options& o) {
  std::ostringstream out;
  out << "keel-sim --seed " << o.seed;
  if (o.nodes) out << " --nodes " << o.nodes;
  if (o.regions) out << " --regions " << o.regions;
  if (o.clients) out << " --clients " << o.clients;
  if (o.rule == keel::ownership_rule::view) out << " --rule view";
  if (!o.scenario.empty()) out << " --scenario " << o.scenario;
  if (o.damage) out << " --damage";
  return out.str() + " --trace";
}

void print_violation(const keel::sim::options& o, const keel::sim::result& r) {
  std::cout << "VIOLATION of \"" << r.guarantee << "\" in seed " << o.seed << " (" << r.nodes
            << " nodes, " << r.regions << " regions): " << r.detail << "\n"
            << "replay: " << replay(o) << "\n";
}

}  // namespace

int main(int argc, char** argv) {
  std::span<char*> args(argv + 1, static_cast<size_t>(argc - 1));
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-sim (--seed S | --seeds N [--first S]) [OPTIONS]",
        "Runs a whole Keel cluster (3 to 7 nodes in 2 or 3 regions, clients that open sessions, "
        "send turns and resume their streams) in one process on simulated time and a simulated "
        "network, with the product's ownership protocol on every node. Faults come from the "
        "seed: crashes and restarts (losing unsynced writes), pauses, partitions of any shape, "
        "one-way cuts, message loss, delay, duplication and reordering, failing disk writes, "
        "clock drift within the stated bound. A checker reads each run's history and fails on "
        "the first broken guarantee, printing the seed and the command that replays it. The "
        "same seed gives the same run, event for event. Exit status: 0 when every run kept "
        "every guarantee, 1 on a violation, 2 on bad arguments.",
        spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, spec);
  if (!opts) return keel::cli::fail("keel-sim", opts.error());
  keel::sim::options base;
  auto nodes = opts->get_int("nodes", 0, 3, 7);
  auto regions = opts->get_int("regions", 0, 2, 3);
  auto clients = opts->get_int("clients", 0, 1, 20);
  auto seeds = opts->get_int("seeds", 0, 1, 100'000'000);
  auto first = opts->get_int("first", 1, 0, INT64_MAX);
  auto seed = opts->get_int("seed", 0, 0, INT64_MAX);
  for (auto* x : {&nodes, &regions, &clients, &seeds, &first, &seed})
    if (!*x) return keel::cli::fail("keel-sim", x->error());
  auto rule = opts->get("rule", "majority");
  if (rule == "view") {
    base.rule = keel::ownership_rule::view;
  } else if (rule != "majority") {
    return keel::cli::fail("keel-sim", keel::make_error(keel::errc::bad_request,
                                                        "--rule " + rule + ": expected majority or view"));
  }
  base.scenario = opts->get("scenario");
  base.damage = opts->has("damage");
  if (!base.scenario.empty() && base.scenario != "partition-minority" &&
      base.scenario != "partition-isolated") {
    return keel::cli::fail(
        "keel-sim", keel::make_error(keel::errc::bad_request,
                                     "--scenario " + base.scenario +
                                         ": expected partition-minority or partition-isolated"));
  }
  base.nodes = static_cast<int>(*nodes);
  base.regions = static_cast<int>(*regions);
  base.clients = static_cast<int>(*clients);
  base.trace = opts->has("trace");
  if (opts->has("seed") == opts->has("seeds")) {
    return keel::cli::fail("keel-sim", keel::make_error(keel::errc::bad_request,
                                                        "give either --seed S or --seeds N"));
  }

  if (opts->has("seed")) {
    base.seed = static_cast<uint64_t>(*seed);
    auto r = keel::sim::run(base);
    std::cout << "seed " << base.seed << ": " << r.nodes << " nodes, " << r.regions << " regions, "
              << r.faults << " faults, " << r.turns_acknowledged << " turns acknowledged, "
              << r.tokens_checked << " tokens checked, " << r.takeovers
              << " acquisitions, " << r.messages << " messages, "
              << r.simulated_ns / 1'000'000 << " ms simulated, digest " << std::hex << r.digest
              << std::dec << "\n";
    if (!r.ok) {
      print_violation(base, r);
      return 1;
    }
    std::cout << "ok: every guarantee held\n";
    return 0;
  }

  auto start = std::chrono::steady_clock::now();
  uint64_t faults = 0, turns = 0, tokens = 0, acquisitions = 0;
  double simulated = 0;
  auto n = static_cast<uint64_t>(*seeds);
  for (uint64_t i = 0; i < n; ++i) {
    auto o = base;
    o.seed = static_cast<uint64_t>(*first) + i;
    auto r = keel::sim::run(o);
    faults += r.faults;
    turns += r.turns_acknowledged;
    tokens += r.tokens_checked;
    acquisitions += r.takeovers;
    simulated += static_cast<double>(r.simulated_ns) / 1e9;
    if (!r.ok) {
      print_violation(o, r);
      std::cout << i << " seeds passed before it\n";
      return 1;
    }
  }
  double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  char line[400];
  std::snprintf(line, sizeof line,
                "%llu seeds, %.2f simulated hours, %llu faults, %llu turns acknowledged, %llu "
                "tokens checked, %llu acquisitions, 0 violations (%.1f runs/s)",
                static_cast<unsigned long long>(n), simulated / 3600,
                static_cast<unsigned long long>(faults), static_cast<unsigned long long>(turns),
                static_cast<unsigned long long>(tokens),
                static_cast<unsigned long long>(acquisitions), static_cast<double>(n) / secs);
  std::cout << line << "\n";
  return 0;
}
