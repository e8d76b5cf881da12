#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <vector>

#include "base/error.hpp"

namespace keel {

/// A shared-memory all-reduce among `size` ranks, each running on its own thread (a shard
/// worker). Reusable for any number of rounds; abortable so that a crashed rank never leaves the
/// others blocked. Every rank calls from its own thread; one call per rank per round. The
/// collective must outlive every call (a rank still inside a call after abort() only touches
/// the collective's own buffers, never another rank's data).
class collective {
 public:
  explicit collective(int32_t size);
  collective(const collective&) = delete;
  collective& operator=(const collective&) = delete;

  int32_t size() const { return size_; }

  /// Sums data[0..n) over all ranks in rank order ((rank0 + rank1) + rank2 ...), so every rank
  /// gets the same bits, and the result for a given layout is reproducible. Blocks until every
  /// rank has contributed to this round. `errc::disconnected` when the collective is aborted
  /// (before or while waiting). n must be the same on every rank in a round: a mismatch fails
  /// the round on every rank (`errc::failed`). A rank outside [0, size) is `bad_request`.
  caf::error all_reduce(int32_t rank, float* data, int64_t n);

  /// Wakes every waiting rank with an error; all later calls fail at once. Thread-safe,
  /// idempotent.
  void abort();
  bool aborted() const { return aborted_.load(std::memory_order_acquire); }

 private:
  // A reusable barrier: spins briefly (back-to-back rounds of a decode step arrive within
  // microseconds), then sleeps on cv_. False when aborted before or while waiting.
  bool arrive_and_wait();
  caf::error aborted_error() const;

  int32_t size_;
  // Two sets of per-rank staging buffers, alternating by round, so that a rank may stage its
  // next round while slower ranks still copy the previous result out.
  std::vector<std::vector<float>> slots_[2];
  std::vector<int64_t> counts_[2];  // n of each rank in the round
  std::vector<uint64_t> rounds_;    // rounds done by each rank; touched only by that rank
  std::atomic<int32_t> arrived_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<bool> aborted_{false};
  std::mutex mu_;
  std::condition_variable cv_;
};

}  // namespace keel
