#pragma once

// keel-sim: a whole cluster in one process, on simulated time and a simulated network, running
// the product's ownership protocol (actors/ownership.hpp) on every node; clients open sessions,
// send turns and resume their token streams; faults are drawn from the seed. A checker reads the
// whole history and names the first guarantee that broke (docs/sim.md).

#include <cstdint>
#include <string>

#include "actors/ownership.hpp"

namespace keel::sim {

struct options {
  uint64_t seed = 1;
  int nodes = 0;    // 0: drawn from the seed, 3..7
  int regions = 0;  // 0: drawn from the seed, 2..3
  int clients = 0;  // 0: drawn from the seed, 2..6
  ownership_rule rule = ownership_rule::majority;
  /// "" (faults drawn from the seed), or a fixed schedule: "partition-minority" (a, b in r1 and
  /// c in r2; {a, b} | {c} while a serves) or "partition-isolated" ({a} | {b, c}).
  std::string scenario;
  /// Also draw damaged disks: a node crashes and restarts on a store that lost part of what was
  /// synced (each session's state kept or lost whole, as after a cut WAL or a salvaged SST
  /// file), and knows its store was damaged. Off by default, so that the seeds' schedules
  /// without it stay as they were.
  bool damage = false;
  int64_t fault_ns = 12'000'000'000;   // faults happen in [0, fault_ns)
  int64_t settle_ns = 60'000'000'000;  // then everything heals; clients must finish by this
  bool trace = false;                  // every node and client event to stderr
};

struct result {
  bool ok = true;
  std::string guarantee;  // the broken guarantee's name ("" when ok)
  std::string detail;     // what the checker saw
  uint64_t faults = 0;
  uint64_t turns_acknowledged = 0;
  uint64_t tokens_checked = 0;
  uint64_t takeovers = 0;
  uint64_t messages = 0;
  int64_t simulated_ns = 0;
  int nodes = 0;
  int regions = 0;
  uint64_t digest = 0;  // a hash of every event in order: equal runs, equal digests
};

/// Runs one seed. Deterministic: the same options give the same result, digest included.
result run(const options& opt);

}  // namespace keel::sim
