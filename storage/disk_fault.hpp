#pragma once

// The simulated full disk (keel-shell `fault NODE disk-full`, docs/shell.md): a seam under the
// session store's RocksDB, so that tests reach the disk-full path without root or a small file
// system.

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>

namespace rocksdb {
class Env;
}

namespace keel::storage {

/// While `full()`, every write to a file of a store opened with this fault fails as on a full
/// file system (RocksDB `IOStatus::NoSpace`, ENOSPC). Off by default; checking costs one relaxed
/// atomic load. Thread-safe. Shared by the node (which owns it), its store and the admin API.
class disk_fault {
 public:
  /// The disk is full for `d` from now; zero or less: until `clear`.
  void fill(std::chrono::milliseconds d);
  void clear() { until_ns_.store(0, std::memory_order_relaxed); }
  bool full() const;

 private:
  std::atomic<int64_t> until_ns_{0};  // steady clock; 0: off; INT64_MAX: until cleared
};

/// A RocksDB environment whose file writes fail while `fault` is full (the default one's
/// otherwise). The environment holds `fault`.
std::unique_ptr<rocksdb::Env> faulty_env(std::shared_ptr<const disk_fault> fault);

}  // namespace keel::storage
