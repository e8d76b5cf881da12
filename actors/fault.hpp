#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "actors/atoms.hpp"

namespace keel {

/// Run-time fault injection for one node: crash or stall a shard worker, fail its KV
/// allocations, crash a session actor. Armed through this C++ API (later from keel-shell and
/// keel-node flags); checked by product code with one call that costs one relaxed atomic load
/// while nothing is armed. Thread-safe. Owned by the node; actors hold a shared_ptr.
class fault_injector {
 public:
  /// What a shard worker does at a step.
  struct step_fault {
    bool crash = false;
    std::chrono::milliseconds stall{0};
  };

  /// The shard crashes at its (after_steps + 1)-th step from now.
  void crash_shard(int32_t rank, int32_t after_steps = 0);
  /// The shard sleeps `d` before its (after_steps + 1)-th step from now.
  void stall_shard(int32_t rank, std::chrono::milliseconds d, int32_t after_steps = 0);
  /// The shard's next `n` KV page allocations fail (`overloaded`).
  void fail_kv_allocations(int32_t rank, int32_t n);
  /// The session crashes when it next handles a message, and so `times` times in all.
  void crash_session(const std::string& session, int32_t times = 1);
  /// Disarms everything.
  void clear();

  // Checks, called by product code.
  step_fault on_shard_step(int32_t rank);
  int32_t take_kv_failures(int32_t rank);
  bool take_session_crash(const std::string& session);

  /// Faults fired so far (for tests and the admin shell).
  int64_t fired() const { return fired_.load(); }

 private:
  struct shard_plan {
    int32_t crash_in = -1;  // steps until the crash; -1 none
    int32_t stall_in = -1;
    std::chrono::milliseconds stall{0};
    int32_t kv_failures = 0;
  };
  void touch();

  std::atomic<bool> armed_{false};
  std::atomic<int64_t> fired_{0};
  std::mutex mu_;
  std::map<int32_t, shard_plan> shards_;
  std::map<std::string, int32_t> sessions_;  // crashes left, by session
};

}  // namespace keel
