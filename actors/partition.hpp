#pragma once

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace keel {

/// The peers this node neither calls nor answers for now: the `partition` fault (keel-shell
/// `fault NODE partition --from PEER,...`). While a peer is cut, this node's region link to it
/// fails every heartbeat (so no forwarding to it either), its ownership transport sends it no
/// protocol message, and its peer endpoint refuses every call from it
/// (`disconnected`), so the peer's link declares this node down too: the traffic between the
/// two is cut both ways, as by a firewall between them. Built once in main() and shared by the
/// peer endpoint and the node. Thread-safe; `blocked` costs one relaxed load while nothing is
/// cut.
class partition {
 public:
  using clock = std::chrono::steady_clock;

  /// Cuts `peers` (node names) for `d`, or until `heal` when `d` is zero.
  void cut(const std::vector<std::string>& peers, std::chrono::milliseconds d) {
    std::lock_guard<std::mutex> guard(mu_);
    auto until = d.count() > 0 ? clock::now() + d : clock::time_point::max();
    for (auto& p : peers) until_[p] = until;
    any_.store(!until_.empty(), std::memory_order_relaxed);
  }
  void heal() {
    std::lock_guard<std::mutex> guard(mu_);
    until_.clear();
    any_.store(false, std::memory_order_relaxed);
  }
  /// Whether traffic with the peer named `peer` is cut now.
  bool blocked(const std::string& peer) const {
    if (!any_.load(std::memory_order_relaxed) || peer.empty()) return false;
    std::lock_guard<std::mutex> guard(mu_);
    auto i = until_.find(peer);
    return i != until_.end() && clock::now() < i->second;
  }
  /// The peers cut now.
  std::vector<std::string> cut_now() const {
    std::lock_guard<std::mutex> guard(mu_);
    std::vector<std::string> out;
    auto now = clock::now();
    for (auto& [p, until] : until_)
      if (now < until) out.push_back(p);
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::map<std::string, clock::time_point> until_;
  std::atomic<bool> any_{false};
};

}  // namespace keel
