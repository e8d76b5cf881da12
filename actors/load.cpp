#include "actors/load.hpp"

#include <cstdio>

namespace keel {

std::string node_load::describe() const {
  char rate[32];
  std::snprintf(rate, sizeof rate, "%.1f", tokens_per_s);
  return std::to_string(waiting) + " waiting, " + std::to_string(running) + " running, KV " +
         std::to_string(kv_free) + "/" + std::to_string(kv_capacity) + " free (" +
         std::to_string(kv_wanted) + " wanted), " + rate + " tokens/s";
}

void load_gauge::publish(const node_load& l) {
  waiting_.store(l.waiting, std::memory_order_relaxed);
  running_.store(l.running, std::memory_order_relaxed);
  kv_free_.store(l.kv_free, std::memory_order_relaxed);
  kv_capacity_.store(l.kv_capacity, std::memory_order_relaxed);
  kv_wanted_.store(l.kv_wanted, std::memory_order_relaxed);
  tokens_per_s_.store(l.tokens_per_s, std::memory_order_relaxed);
  auto used = l.kv_capacity - l.kv_free;
  auto peak = peak_used_.load(std::memory_order_relaxed);
  while (used > peak && !peak_used_.compare_exchange_weak(peak, used, std::memory_order_relaxed)) {
  }
}

node_load load_gauge::read() const {
  node_load l;
  l.waiting = waiting_.load(std::memory_order_relaxed);
  l.running = running_.load(std::memory_order_relaxed);
  l.kv_free = kv_free_.load(std::memory_order_relaxed);
  l.kv_capacity = kv_capacity_.load(std::memory_order_relaxed);
  l.kv_wanted = kv_wanted_.load(std::memory_order_relaxed);
  l.tokens_per_s = tokens_per_s_.load(std::memory_order_relaxed);
  return l;
}

float token_rate::add(int64_t n, std::chrono::steady_clock::time_point now) {
  if (started_ == std::chrono::steady_clock::time_point{}) started_ = now;
  count_ += n;
  auto elapsed = now - started_;
  if (elapsed >= window_) {
    rate_ = static_cast<float>(static_cast<double>(count_) /
                               std::chrono::duration<double>(elapsed).count());
    count_ = 0;
    started_ = now;
  }
  return rate_;
}

std::optional<size_t> choose_placement(const node_load& self,
                                       const std::vector<placement_candidate>& peers,
                                       double keep_room, double margin, uint64_t random) {
  auto mine = self.room();
  if (mine >= keep_room) return std::nullopt;
  double total = 0;
  for (auto& p : peers)
    if (p.load.room() > mine + margin) total += p.load.room();
  if (total <= 0) return std::nullopt;
  // A point in [0, total): the candidate whose share of the total holds it.
  double point = static_cast<double>(random >> 11) / static_cast<double>(uint64_t{1} << 53) * total;
  std::optional<size_t> last;
  for (size_t i = 0; i < peers.size(); ++i) {
    auto r = peers[i].load.room();
    if (r <= mine + margin) continue;
    last = i;
    if (point < r) return i;
    point -= r;
  }
  return last;  // rounding at the very end of the range
}

}  // namespace keel
