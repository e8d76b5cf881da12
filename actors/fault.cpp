#include "actors/fault.hpp"

#include <algorithm>

namespace keel {

void fault_injector::touch() {
  bool any = !sessions_.empty();
  for (auto& [rank, p] : shards_)
    any = any || p.crash_in >= 0 || p.stall_in >= 0 || p.kv_failures > 0;
  armed_.store(any, std::memory_order_relaxed);
}

void fault_injector::crash_shard(int32_t rank, int32_t after_steps) {
  std::lock_guard<std::mutex> guard(mu_);
  shards_[rank].crash_in = after_steps < 0 ? 0 : after_steps;
  touch();
}

void fault_injector::stall_shard(int32_t rank, std::chrono::milliseconds d, int32_t after_steps) {
  std::lock_guard<std::mutex> guard(mu_);
  auto& p = shards_[rank];
  p.stall_in = after_steps < 0 ? 0 : after_steps;
  p.stall = d;
  touch();
}

void fault_injector::fail_kv_allocations(int32_t rank, int32_t n) {
  std::lock_guard<std::mutex> guard(mu_);
  shards_[rank].kv_failures = n;
  touch();
}

void fault_injector::crash_session(const std::string& session, int32_t times) {
  std::lock_guard<std::mutex> guard(mu_);
  sessions_[session] = std::max(times, 1);
  touch();
}

void fault_injector::clear() {
  std::lock_guard<std::mutex> guard(mu_);
  shards_.clear();
  sessions_.clear();
  touch();
}

fault_injector::step_fault fault_injector::on_shard_step(int32_t rank) {
  if (!armed_.load(std::memory_order_relaxed)) return {};
  std::lock_guard<std::mutex> guard(mu_);
  auto i = shards_.find(rank);
  if (i == shards_.end()) return {};
  step_fault out;
  auto& p = i->second;
  if (p.stall_in == 0) {
    out.stall = p.stall;
    ++fired_;
  }
  if (p.stall_in >= 0) --p.stall_in;
  if (p.crash_in == 0) {
    out.crash = true;
    ++fired_;
  }
  if (p.crash_in >= 0) --p.crash_in;
  touch();
  return out;
}

int32_t fault_injector::take_kv_failures(int32_t rank) {
  if (!armed_.load(std::memory_order_relaxed)) return 0;
  std::lock_guard<std::mutex> guard(mu_);
  auto i = shards_.find(rank);
  if (i == shards_.end() || i->second.kv_failures == 0) return 0;
  int32_t n = i->second.kv_failures;
  i->second.kv_failures = 0;
  fired_ += n;
  touch();
  return n;
}

bool fault_injector::take_session_crash(const std::string& session) {
  if (!armed_.load(std::memory_order_relaxed)) return false;
  std::lock_guard<std::mutex> guard(mu_);
  auto i = sessions_.find(session);
  if (i == sessions_.end()) return false;
  if (--i->second <= 0) sessions_.erase(i);
  ++fired_;
  touch();
  return true;
}

}  // namespace keel
