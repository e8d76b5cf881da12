#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "base/threads.hpp"

namespace keel {

/// A fixed group of threads that runs one parallel loop at a time. The calling thread works as
/// member 0, so `thread_pool(1)` starts no thread. Not re-entrant: `parallel_for` must not be
/// called from inside a loop body or from two threads at once. Its threads are started with
/// `spawn` (the default spawner when empty), named `name`-1, `name`-2, ...
class thread_pool {
 public:
  explicit thread_pool(int threads, const thread_spawner& spawn = {},
                       const std::string& name = "keel-pool");
  ~thread_pool();
  thread_pool(const thread_pool&) = delete;
  thread_pool& operator=(const thread_pool&) = delete;

  int size() const { return size_; }

  /// Splits [0, n) into size() contiguous parts of near-equal length (rounded to `grain`) and
  /// runs fn(begin, end) on each non-empty part, part i on member i. Returns when all have
  /// finished. `fn` must not throw. Workers spin briefly before sleeping, so back-to-back loops
  /// (a decode step's matmuls) do not pay a wake-up each.
  template <class F>
  void parallel_for(int64_t n, F&& fn, int64_t grain = 1) {
    run(
        n, grain, [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); }, &fn);
  }

 private:
  using body = void (*)(void*, int64_t, int64_t);
  void run(int64_t n, int64_t grain, body fn, void* ctx);
  void worker(int index);
  void part(int index, int64_t& begin, int64_t& end) const;

  int size_;
  std::vector<std::thread> threads_;
  std::mutex mu_;
  std::condition_variable start_cv_;
  std::condition_variable done_cv_;
  // Published under mu_ (for sleepers) and read without it (for spinners).
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};
  int64_t n_ = 0;
  int64_t grain_ = 1;
  body fn_ = nullptr;
  void* ctx_ = nullptr;
};

}  // namespace keel
