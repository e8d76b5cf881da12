#include "kernels/collective.hpp"

#include <algorithm>
#include <cstring>
#include <string>
#include <thread>

namespace keel {

namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

}  // namespace

collective::collective(int32_t size) : size_(std::max<int32_t>(size, 1)) {
  for (auto& s : slots_) s.resize(static_cast<size_t>(size_));
  for (auto& c : counts_) c.assign(static_cast<size_t>(size_), 0);
  rounds_.assign(static_cast<size_t>(size_), 0);
}

void collective::abort() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    aborted_.store(true, std::memory_order_release);
  }
  cv_.notify_all();
}

caf::error collective::aborted_error() const {
  return make_error(errc::disconnected,
                    "collective of " + std::to_string(size_) + " ranks was aborted");
}

bool collective::arrive_and_wait() {
  if (aborted()) return false;
  // Read before arriving: the generation cannot move until this rank has arrived.
  const uint64_t g = generation_.load(std::memory_order_acquire);
  if (arrived_.fetch_add(1, std::memory_order_acq_rel) == size_ - 1) {
    arrived_.store(0, std::memory_order_relaxed);
    {
      // Under the mutex, so that a rank between its predicate check and its sleep cannot miss
      // the wake-up.
      std::lock_guard<std::mutex> lk(mu_);
      generation_.store(g + 1, std::memory_order_release);
    }
    cv_.notify_all();
    return true;
  }
  // Spin first: the other ranks usually arrive within microseconds. Yield now and then: when
  // the cores are shared (more ranks than cores, or other work), the ranks still to arrive get
  // one; sched_yield returns at once when nothing else is runnable.
  for (int i = 0; i < 4096; ++i) {
    if (generation_.load(std::memory_order_acquire) != g) return true;
    if (aborted()) return false;
    if ((i & 63) == 63)
      std::this_thread::yield();
    else
      cpu_relax();
  }
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return generation_.load(std::memory_order_acquire) != g || aborted(); });
  // A round that completed counts even when an abort followed it.
  return generation_.load(std::memory_order_acquire) != g;
}

caf::error collective::all_reduce(int32_t rank, float* data, int64_t n) {
  if (rank < 0 || rank >= size_) {
    return make_error(errc::bad_request, "all_reduce: rank " + std::to_string(rank) +
                                             " is outside a collective of " +
                                             std::to_string(size_) + " ranks");
  }
  if (n < 0 || (n > 0 && data == nullptr)) {
    return make_error(errc::bad_request, "all_reduce: rank " + std::to_string(rank) + " passed " +
                                             std::to_string(n) + " values" +
                                             (data == nullptr ? " and no buffer" : ""));
  }
  if (aborted()) return aborted_error();
  if (size_ == 1) return caf::none;

  // Every rank copies its values into its staging slot; after the first barrier, rank r sums one
  // chunk of every slot (in rank order) into slot 0; after the second, all copy slot 0 out.
  // Ranks touch only the collective's buffers, so an aborted rank may free its data at once.
  const int p = static_cast<int>(rounds_[rank]++ & 1);
  auto& mine = slots_[p][rank];
  if (static_cast<int64_t>(mine.size()) < n) mine.resize(static_cast<size_t>(n));
  if (n > 0) std::memcpy(mine.data(), data, static_cast<size_t>(n) * sizeof(float));
  counts_[p][rank] = n;
  if (!arrive_and_wait()) return aborted_error();

  for (int32_t j = 0; j < size_; ++j) {
    if (counts_[p][j] != n) {
      // Every rank sees the same counts, so every rank fails this round and skips the second
      // barrier alike.
      return make_error(errc::failed, "all_reduce: rank " + std::to_string(j) + " passed " +
                                          std::to_string(counts_[p][j]) + " values, rank " +
                                          std::to_string(rank) + " passed " + std::to_string(n));
    }
  }
  // Chunks of whole cache lines (16 floats), so no two ranks write the same line.
  const int64_t per = ((n + size_ - 1) / size_ + 15) / 16 * 16;
  const int64_t b = std::min<int64_t>(n, rank * per), e = std::min<int64_t>(n, b + per);
  float* out = slots_[p][0].data();
  for (int32_t j = 1; j < size_; ++j) {
    const float* in = slots_[p][j].data();
    for (int64_t i = b; i < e; ++i) out[i] += in[i];
  }
  if (!arrive_and_wait()) return aborted_error();
  if (n > 0) std::memcpy(data, out, static_cast<size_t>(n) * sizeof(float));
  return caf::none;
}

}  // namespace keel
