#include "actors/replicator.hpp"

#include <map>

#include <capnp/ez-rpc.h>
#include <kj/async-io.h>

#include "wire/peer.capnp.h"

namespace keel {

replicator::replicator(replicator_config cfg, std::shared_ptr<peer_table> peers)
    : cfg_(std::move(cfg)), peers_(std::move(peers)) {
  thread_ = std::thread([this] { run(); });
}

replicator::~replicator() {
  {
    std::lock_guard<std::mutex> guard(mu_);
    stopping_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

void replicator::enqueue(replica_update u) {
  {
    std::lock_guard<std::mutex> guard(mu_);
    if (stopping_) return;
    queue_.push_back(std::move(u));
  }
  cv_.notify_one();
}

uint64_t replicator::sent() const {
  std::lock_guard<std::mutex> guard(mu_);
  return sent_;
}

uint64_t replicator::failed() const {
  std::lock_guard<std::mutex> guard(mu_);
  return failed_;
}

void replicator::run() {
  // One client per peer address, created on this thread (EzRpcClient sets up this thread's KJ
  // event loop with the first one; all of them share it).
  std::map<std::string, std::unique_ptr<capnp::EzRpcClient>> clients;
  auto report = [this](bool ok, const std::string& why) {
    std::lock_guard<std::mutex> guard(mu_);
    (ok ? sent_ : failed_)++;
    if (!ok && cfg_.log) cfg_.log("replicator: " + why);
  };
  for (;;) {
    replica_update u;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) return;
      u = std::move(queue_.front());
      queue_.pop_front();
    }
    std::string target;
    for (auto& p : peers_->snapshot())
      if (p.accepts_work()) {
        target = p.address;
        break;
      }
    if (target.empty()) {
      report(false, "session " + u.session + ": no peer accepts work, update dropped");
      continue;
    }
    try {
      auto& c = clients[target];
      if (!c) c = std::make_unique<capnp::EzRpcClient>(target);
      auto req = c->getMain<wire::Peer>().replicateRequest();
      auto from = req.initFrom();
      from.setName(cfg_.self_name);
      from.setRegion(cfg_.self_region);
      from.setAddress(cfg_.self_address);
      req.setSession(u.session);
      req.setEpoch(u.epoch);
      req.setRecord(
          kj::arrayPtr(reinterpret_cast<const capnp::byte*>(u.record.data()), u.record.size()));
      req.setTurn(u.turn);
      req.setFromIndex(u.from_index);
      auto tl = req.initTokens(static_cast<unsigned>(u.tokens.size()));
      for (unsigned i = 0; i < u.tokens.size(); ++i) tl.set(i, u.tokens[i]);
      // Bounded, so that a hung replica delays the queue (and the node's stop) by at most this.
      kj::Promise<capnp::Response<wire::Peer::ReplicateResults>> call = req.send();
      auto res = c->getIoProvider()
                     .getTimer()
                     .timeoutAfter(cfg_.call_timeout.count() * kj::MILLISECONDS, kj::mv(call))
                     .wait(c->getWaitScope());
      auto e = res.getError();
      if (e.getCode() != 0)
        report(false, "session " + u.session + " to " + target + ": " + e.getMessage().cStr());
      else
        report(true, {});
    } catch (const kj::Exception& e) {
      clients.erase(target);  // reconnect on the next update
      report(false, "session " + u.session + " to " + target + ": " + e.getDescription().cStr());
    }
  }
}

}  // namespace keel
