#include "kernels/thread_pool.hpp"

#include <algorithm>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define KEEL_CPU_RELAX() _mm_pause()
#else
#define KEEL_CPU_RELAX() ((void)0)
#endif

namespace keel {

namespace {

// Spin iterations before a worker (or the caller) sleeps on the condition variable: a few tens
// of microseconds (pause is 10 to 140 cycles), longer than the gap between a decode step's loops.
constexpr int spin_limit = 1 << 12;

// One spin step. Yielding now and then lets an oversubscribed pool (more threads than free
// cores) make progress instead of spinning away the time slices of the threads it waits for.
inline void spin_pause(int i) {
  if ((i & 63) == 63) {
    std::this_thread::yield();
  } else {
    KEEL_CPU_RELAX();
  }
}

}  // namespace

thread_pool::thread_pool(int threads, const thread_spawner& spawn, const std::string& name)
    : size_(std::max(threads, 1)) {
  threads_.reserve(static_cast<size_t>(size_ - 1));
  for (int i = 1; i < size_; ++i)
    threads_.push_back(spawn_thread(spawn, name + "-" + std::to_string(i), [this, i] { worker(i); }));
}

thread_pool::~thread_pool() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    stop_.store(true);
  }
  start_cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void thread_pool::part(int index, int64_t& begin, int64_t& end) const {
  // Whole grains are dealt out evenly; the last part also takes the partial grain at the end.
  const int64_t grains = (n_ + grain_ - 1) / grain_;
  begin = std::min(n_, grains * index / size_ * grain_);
  end = std::min(n_, grains * (index + 1) / size_ * grain_);
}

void thread_pool::run(int64_t n, int64_t grain, body fn, void* ctx) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  if (size_ == 1 || n <= grain) {
    fn(ctx, 0, n);
    return;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    n_ = n;
    grain_ = grain;
    fn_ = fn;
    ctx_ = ctx;
    pending_.store(size_ - 1, std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
  }
  start_cv_.notify_all();
  int64_t b, e;
  part(0, b, e);
  if (b < e) fn(ctx, b, e);
  for (int i = 0; i < spin_limit && pending_.load(std::memory_order_acquire) != 0; ++i)
    spin_pause(i);
  if (pending_.load(std::memory_order_acquire) != 0) {
    std::unique_lock<std::mutex> lk(mu_);
    done_cv_.wait(lk, [this] { return pending_.load(std::memory_order_acquire) == 0; });
  }
}

void thread_pool::worker(int index) {
  uint64_t seen = 0;
  for (;;) {
    for (int i = 0; i < spin_limit && generation_.load(std::memory_order_acquire) == seen &&
                    !stop_.load(std::memory_order_relaxed);
         ++i)
      spin_pause(i);
    if (generation_.load(std::memory_order_acquire) == seen) {
      std::unique_lock<std::mutex> lk(mu_);
      start_cv_.wait(lk, [&] { return stop_.load() || generation_.load() != seen; });
    }
    if (stop_.load()) return;
    // The caller waits for every worker before it starts the next loop, so the generation
    // cannot move on while this one runs.
    seen = generation_.load(std::memory_order_acquire);
    int64_t b, e;
    part(index, b, e);
    if (b < e) fn_(ctx_, b, e);
    if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      std::lock_guard<std::mutex> lk(mu_);  // so the caller cannot miss the notification
      done_cv_.notify_one();
    }
  }
}

}  // namespace keel
