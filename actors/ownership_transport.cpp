#include "actors/ownership_transport.hpp"

#include <kj/async-io.h>
#include <kj/time.h>

#include "wire/peer.capnp.h"
#include "wire/rpc_client.hpp"

namespace keel {

namespace {

struct log_errors final : kj::TaskSet::ErrorHandler {
  void taskFailed(kj::Exception&&) override {}  // every task handles its own failure
};

}  // namespace

/// The transport thread's connections. Used on that thread only.
struct peer_transport::state {
  struct connection {
    std::unique_ptr<wire::rpc_client> client;
    wire::Peer::Client peer = nullptr;
    size_t in_flight = 0;
    bool broken = false;
    kj::TimePoint failed_at = kj::origin<kj::TimePoint>();
    bool have_failed = false;
  };

  peer_transport& owner;
  wire::rpc_client::thread_loop loop;
  // Declared before `tasks`: a task refers to its connection, so tasks end first.
  std::map<std::string, connection> connections;
  log_errors errors;
  std::unique_ptr<kj::TaskSet> tasks = std::make_unique<kj::TaskSet>(errors);

  explicit state(peer_transport& o) : owner(o) {}

  /// Cancels every call, then closes every connection (on this thread, the loop still alive).
  void shutdown() {
    tasks.reset();
    for (auto& [to, c] : connections) {
      try {
        c.peer = nullptr;
        c.client.reset();
      } catch (...) {
        // A broken connection's teardown may throw; the others still close.
      }
    }
    connections.clear();
  }

  kj::TimePoint now() { return kj::systemPreciseMonotonicClock().now(); }

  void count(uint64_t counters::*field) {
    std::lock_guard<std::mutex> guard(owner.mu_);
    ++(owner.counters_.*field);
  }

  void dispatch(const std::string& to, std::string message) {
    auto& cfg = owner.cfg_;
    auto a = cfg.addresses.find(to);
    if (a == cfg.addresses.end() || (cfg.cut && cfg.cut->blocked(to))) return count(&counters::dropped);
    auto& c = connections[to];
    if (c.broken) {
      // A broken connection is never asked again (Cap'n Proto 0.9 throws from a destructor when
      // a broken connection's bootstrap is asked again); it goes once its calls
      // ended, and a new one is made after `reconnect_after`.
      if (c.in_flight > 0) return count(&counters::dropped);
      if (now() < c.failed_at + cfg.reconnect_after.count() * kj::MILLISECONDS)
        return count(&counters::dropped);
      try {
        c.peer = nullptr;
        c.client.reset();
      } catch (...) {
        // Tearing down a broken connection can throw; it changes nothing for the next.
      }
      c.broken = false;
    }
    if (c.in_flight >= cfg.max_in_flight) return count(&counters::dropped);
    if (!c.client) {
      c.client = std::make_unique<wire::rpc_client>(a->second, cfg.tls, to, cfg.call_timeout);
      c.peer = c.client->getMain<wire::Peer>();
    }
    auto req = c.peer.ownershipRequest();
    auto from = req.initFrom();
    from.setName(cfg.self_name);
    from.setRegion(cfg.self_region);
    from.setAddress(cfg.self_address);
    from.setCluster(cfg.cluster);
    req.setMessage(kj::arrayPtr(reinterpret_cast<const kj::byte*>(message.data()), message.size()));
    ++c.in_flight;
    count(&counters::sent);
    auto deadline = now() + cfg.call_timeout.count() * kj::MILLISECONDS;
    auto call = loop.io().getTimer().timeoutAt(deadline, req.send().ignoreResult());
    tasks->add(call.then(
        [this, to] {
          auto& c = connections[to];
          --c.in_flight;
          c.have_failed = false;
          count(&counters::delivered);
        },
        [this, to](kj::Exception&& e) {
          auto& c = connections[to];
          --c.in_flight;
          count(&counters::failed);
          if (owner.cfg_.log && !c.have_failed)
            owner.cfg_.log("ownership transport: calls to " + to + " fail: " +
                           e.getDescription().cStr());
          c.have_failed = true;
          c.broken = true;
          c.failed_at = now();
        }));
  }
};

peer_transport::peer_transport(peer_transport_config cfg) : cfg_(std::move(cfg)) {
  thread_ = spawn_thread(cfg_.spawn, "keel-transport", [this] { run(); });
}

peer_transport::~peer_transport() noexcept {
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> bell;
  {
    std::lock_guard<std::mutex> guard(mu_);
    stopping_ = true;
    queue_.clear();
    bell = kj::mv(bell_);
  }
  if (bell.get() != nullptr) bell->fulfill();
  thread_.join();
}

void peer_transport::send(const std::string& to, std::string message) {
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> bell;
  {
    std::lock_guard<std::mutex> guard(mu_);
    if (stopping_) return;
    if (queue_.size() >= cfg_.max_queued) {
      ++counters_.dropped;
      return;
    }
    queue_.emplace_back(to, std::move(message));
    bell = kj::mv(bell_);
  }
  if (bell.get() != nullptr) bell->fulfill();
}

peer_transport::counters peer_transport::stats() const {
  std::lock_guard<std::mutex> guard(mu_);
  return counters_;
}

void peer_transport::run() {
  state st(*this);
  auto& ws = st.loop.wait_scope();
  for (;;) {
    std::deque<std::pair<std::string, std::string>> batch;
    kj::Promise<void> bell = nullptr;
    {
      std::lock_guard<std::mutex> guard(mu_);
      if (stopping_) break;
      if (queue_.empty()) {
        auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
        bell_ = kj::mv(paf.fulfiller);
        bell = kj::mv(paf.promise);
      } else {
        batch.swap(queue_);
      }
    }
    if (batch.empty()) {
      bell.wait(ws);  // runs the loop (calls in flight) until a message or the stop
      continue;
    }
    for (auto& [to, message] : batch) st.dispatch(to, std::move(message));
    ws.poll();  // writes what was just sent, even when the queue never runs dry
  }
  st.shutdown();
  {
    std::lock_guard<std::mutex> guard(mu_);
    bell_ = nullptr;
  }
}

}  // namespace keel
