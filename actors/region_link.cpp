#include "actors/region_link.hpp"

#include <atomic>
#include <functional>
#include <optional>
#include <thread>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/timer.h>
#include <caf/actor_cast.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/send.hpp>

#include "actors/fault.hpp"
#include "actors/protocols.hpp"
#include "base/error.hpp"
#include "wire/peer.capnp.h"

namespace keel {

const char* to_string(peer_status x) {
  switch (x) {
    case peer_status::up:
      return "up";
    case peer_status::suspect:
      return "suspect";
    case peer_status::down:
      return "down";
  }
  return "?";
}

const char* to_string(breaker_state x) {
  switch (x) {
    case breaker_state::closed:
      return "closed";
    case breaker_state::open:
      return "open";
    case breaker_state::half_open:
      return "half-open";
  }
  return "?";
}

void peer_table::put(const peer_info& p) {
  std::lock_guard<std::mutex> guard(mu_);
  peers_[p.address] = p;
}

std::vector<peer_info> peer_table::snapshot() const {
  std::lock_guard<std::mutex> guard(mu_);
  std::vector<peer_info> out;
  for (auto& [a, p] : peers_) out.push_back(p);
  return out;
}

namespace {

using clock = std::chrono::steady_clock;

uint64_t ns_since_epoch(clock::time_point t) {
  return static_cast<uint64_t>(
      std::chrono::duration_cast<std::chrono::nanoseconds>(t.time_since_epoch()).count());
}

int64_t ms(clock::duration d) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(d).count();
}

/// The KJ side of one link: its own thread and event loop. Everything but `start`/`stop` runs
/// on that thread.
class link_io : public kj::TaskSet::ErrorHandler {
 public:
  link_io(std::string address, link_config cfg, std::shared_ptr<peer_table> table,
          std::shared_ptr<supervision_log> log, caf::actor_addr owner)
      : cfg_(std::move(cfg)),
        table_(std::move(table)),
        log_(std::move(log)),
        owner_(std::move(owner)) {
    info_.address = std::move(address);
    rng_ = cfg_.reconnect.seed ^ std::hash<std::string>{}(info_.address + "/" + cfg_.self_name);
  }

  void start() {
    thread_ = spawn_thread(cfg_.spawn, "keel-link", [this] { run(); });
  }

  /// Any thread but the link's: stops the loop and joins.
  void stop() {
    {
      std::lock_guard<std::mutex> guard(mu_);
      stopping_ = true;
      if (stop_.get() != nullptr) stop_->fulfill();
    }
    if (thread_.joinable()) thread_.join();
  }

  void taskFailed(kj::Exception&& e) override {
    report("task failed: " + std::string(e.getDescription().cStr()));
  }

  /// Any thread: the link fails every heartbeat and reconnect for `d` from now (fault
  /// injection: cut_atom).
  void cut(std::chrono::milliseconds d) {
    cut_until_ns_.store(ns_since_epoch(clock::now() + d));
    report("cut for " + std::to_string(d.count()) + " ms (fault injection)");
  }

 private:
  struct connection {
    kj::Own<kj::AsyncIoStream> stream;
    capnp::TwoPartyClient client;
    wire::Peer::Client peer;
    explicit connection(kj::Own<kj::AsyncIoStream>&& s)
        : stream(kj::mv(s)), client(*stream), peer(client.bootstrap().castAs<wire::Peer>()) {}
  };

  void run() {
    try {
      auto io = kj::setupAsyncIo();
      timer_ = &io.provider->getTimer();
      network_ = &io.provider->getNetwork();
      if (cfg_.tls) tls_ = cfg_.tls->context(false);
      auto stop = kj::newPromiseAndCrossThreadFulfiller<void>();
      {
        std::lock_guard<std::mutex> guard(mu_);
        if (stopping_) return;
        stop_ = kj::mv(stop.fulfiller);
      }
      tasks_ = kj::heap<kj::TaskSet>(*this);
      started_ = clock::now();
      table_->put(info_);
      auto loop = tick().eagerlyEvaluate([this](kj::Exception&& e) {
        report("stopped: " + std::string(e.getDescription().cStr()));
        caf::anon_send_exit(owner_, caf::exit_reason::unhandled_exception);
      });
      stop.promise.wait(io.waitScope);
      conn_ = nullptr;
      tasks_ = nullptr;
      tls_ = nullptr;
    } catch (const kj::Exception& e) {
      report("stopped: " + std::string(e.getDescription().cStr()));
      caf::anon_send_exit(owner_, caf::exit_reason::unhandled_exception);
    } catch (const std::exception& e) {
      report(std::string("stopped: ") + e.what());
      caf::anon_send_exit(owner_, caf::exit_reason::unhandled_exception);
    }
  }

  void report(const std::string& what) {
    if (log_) log_->report("link " + cfg_.self_name + " -> " + info_.address + ": " + what);
  }

  kj::Promise<void> tick() {
    auto period = std::max<int64_t>(5, cfg_.heartbeat_interval.count() / 4);
    return timer_->afterDelay(period * kj::MILLISECONDS).then([this] {
      step();
      return tick();
    });
  }

  void step() {
    auto now = clock::now();
    if (in_flight_ && now - sent_ >= cfg_.down_after) {
      fail("no answer to a heartbeat for " + std::to_string(ms(now - sent_)) + " ms");
    }
    if (connecting_ && now - connect_started_ >= cfg_.down_after) {
      fail("connecting took longer than " + std::to_string(cfg_.down_after.count()) + " ms");
    }
    if (info_.breaker == breaker_state::open && now - opened_at_ >= cfg_.breaker_open) {
      set_breaker(breaker_state::half_open,
                  "probing after " + std::to_string(cfg_.breaker_open.count()) + " ms");
    }
    if (cfg_.cut && cfg_.cut->blocked(info_.name)) {
      if (conn_.get() != nullptr || connecting_ || now >= next_attempt_)
        fail("partitioned from " + info_.name + " by fault injection");
      evaluate(now);
      return;
    }
    if (auto left = cut_left(now); left > 0) {
      // As a partition: the connection drops, and every attempt until the end fails.
      if (conn_.get() != nullptr || connecting_ || now >= next_attempt_)
        fail("cut by fault injection, " + std::to_string(left) + " ms left");
      evaluate(now);
      return;
    }
    if (conn_.get() == nullptr && !connecting_ && now >= next_attempt_) connect();
    if (conn_.get() != nullptr && !in_flight_ && now - sent_ >= cfg_.heartbeat_interval) send();
    evaluate(now);
  }

  int64_t cut_left(clock::time_point now) const {
    auto until = cut_until_ns_.load(std::memory_order_relaxed);
    auto at = ns_since_epoch(now);
    return until > at ? static_cast<int64_t>((until - at + 999999) / 1000000) : 0;
  }

  void evaluate(clock::time_point now) {
    auto since = now - (ever_ok_ ? last_ok_ : started_);
    auto status = peer_status::down;
    if (ever_ok_ && since < 2 * cfg_.heartbeat_interval)
      status = peer_status::up;
    else if (ever_ok_ && since < cfg_.down_after)
      status = peer_status::suspect;
    if (status != info_.status) {
      auto was = info_.status;
      info_.status = status;
      ++info_.status_changes;
      auto why =
          status == peer_status::up
              ? "heartbeat answered in " +
                    std::to_string(
                        std::chrono::duration_cast<std::chrono::microseconds>(info_.round_trip)
                            .count()) +
                    " us"
              : "no heartbeat answered for " + std::to_string(ms(since)) + " ms" +
                    (info_.last_failure.empty() ? "" : "; last failure: " + info_.last_failure);
      report(std::string(to_string(was)) + " -> " + to_string(status) + " (" + why + ")");
    }
    table_->put(info_);
  }

  void set_breaker(breaker_state s, const std::string& why) {
    if (s == info_.breaker) return;
    report(std::string("breaker ") + to_string(info_.breaker) + " -> " + to_string(s) + " (" + why +
           ")");
    info_.breaker = s;
    if (s == breaker_state::open) {
      opened_at_ = clock::now();
      ++info_.breaker_opens;
    }
    table_->put(info_);
  }

  void connect() {
    connecting_ = true;
    connect_started_ = clock::now();
    auto gen = ++gen_;
    // The peer's certificate must name it; with no configured name, its host.
    auto name = cfg_.peer_name.empty() ? wire::host_of(info_.address) : cfg_.peer_name;
    tasks_->add(
        // `tick` gives up on an attempt after `down_after` too; this ends its promise.
        wire::connect_to(*network_, *timer_, tls_.get(), info_.address, name, cfg_.down_after)
            .then(
                [this, gen](kj::AuthenticatedStream s) {
                  if (gen != gen_) return;
                  connecting_ = false;
                  conn_ = kj::heap<connection>(kj::mv(s.stream));
                  send();
                },
                [this, gen](kj::Exception&& e) {
                  if (gen != gen_) return;
                  fail("cannot connect: " + std::string(e.getDescription().cStr()));
                }));
  }

  void send() {
    in_flight_ = true;
    sent_ = clock::now();
    auto gen = gen_;
    auto req = conn_->peer.heartbeatRequest();
    auto from = req.initFrom();
    from.setName(cfg_.self_name);
    from.setRegion(cfg_.self_region);
    from.setAddress(cfg_.self_address);
    from.setCluster(cfg_.cluster);
    req.setSentNs(ns_since_epoch(sent_));
    tasks_->add(req.send().then(
        [this, gen](capnp::Response<wire::Peer::HeartbeatResults>&& r) {
          if (gen != gen_) return;
          auto n = r.getNode();
          // An answer that does not count as one: the peer is alive but cannot serve (as good
          // as down: its sessions are taken over), or it is not the node configured here.
          if (n.hasNotReady() && n.getNotReady().size() > 0) {
            fail("not ready: " + std::string(n.getNotReady().cStr()));
            return;
          }
          if (!cfg_.peer_name.empty() && n.getName() != cfg_.peer_name.c_str()) {
            fail("answered as '" + std::string(n.getName().cStr()) + "', configured as '" +
                 cfg_.peer_name + "'");
            return;
          }
          // Another view of the cluster computes other groups and leases: the two cannot
          // share sessions safely (its ownership messages are dropped here too).
          if (cfg_.cluster != 0 && n.getCluster() != 0 && n.getCluster() != cfg_.cluster) {
            fail("its cluster configuration differs from this node's (every node needs the same "
                 "--peers names, --peer-regions, --replicas, --heartbeat-interval and "
                 "--down-after)");
            return;
          }
          auto now = clock::now();
          in_flight_ = false;
          last_ok_ = now;
          ever_ok_ = true;
          info_.round_trip = now - sent_;
          ++info_.heartbeats;
          info_.consecutive_failures = 0;
          info_.name = n.getName().cStr();
          info_.region = n.getRegion().cStr();
          info_.client_address = n.getClientAddress().cStr();
          info_.draining = n.getDraining();
          info_.model_digest = n.getModelDigest().cStr();
          if (n.hasLoad()) {
            auto l = n.getLoad();
            auto i = [](uint32_t x) { return static_cast<int32_t>(std::min<uint32_t>(x, 0x7fffffffu)); };
            info_.load.waiting = i(l.getWaiting());
            info_.load.running = i(l.getRunning());
            info_.load.kv_free = i(l.getKvPagesFree());
            info_.load.kv_capacity = i(l.getKvPagesCapacity());
            info_.load.kv_wanted = i(l.getKvPagesWanted());
            info_.load.tokens_per_s = l.getTokensPerSecond();
          } else {
            info_.load = node_load{};  // an older build: no load, so no room is assumed
          }
          if (info_.breaker != breaker_state::closed)
            set_breaker(breaker_state::closed, "answered");
          evaluate(now);
        },
        [this, gen](kj::Exception&& e) {
          if (gen != gen_) return;
          fail("heartbeat failed: " + std::string(e.getDescription().cStr()));
        }));
  }

  /// The connection (or the attempt) failed: drop it, count it, back off, maybe open the breaker.
  void fail(const std::string& why) {
    ++gen_;  // what the old connection still answers is ignored
    in_flight_ = false;
    connecting_ = false;
    if (conn_.get() != nullptr) {
      // Destroyed on a later turn: this may run inside one of its own continuations.
      tasks_->add(kj::evalLater([c = kj::mv(conn_)]() mutable { c = nullptr; }));
    }
    ++info_.failures;
    ++info_.consecutive_failures;
    info_.last_failure = why;
    auto delay = backoff_delay(cfg_.reconnect, info_.consecutive_failures, rng_);
    next_attempt_ = clock::now() + std::chrono::duration_cast<clock::duration>(delay);
    if (info_.breaker == breaker_state::half_open)
      set_breaker(breaker_state::open, why);
    else if (info_.breaker == breaker_state::closed &&
             info_.consecutive_failures >= cfg_.breaker_failures)
      set_breaker(breaker_state::open, std::to_string(info_.consecutive_failures) +
                                           " consecutive failures, the last: " + why);
    table_->put(info_);
  }

  const link_config cfg_;
  std::shared_ptr<peer_table> table_;
  std::shared_ptr<supervision_log> log_;
  caf::actor_addr owner_;
  peer_info info_;
  uint64_t rng_ = 0;

  std::thread thread_;
  std::mutex mu_;  // guards stop_ and stopping_
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> stop_;
  bool stopping_ = false;
  std::atomic<uint64_t> cut_until_ns_{0};  // steady clock; 0: not cut

  // The link's thread only.
  kj::Timer* timer_ = nullptr;
  kj::Network* network_ = nullptr;
  kj::Own<kj::TlsContext> tls_;  // before conn_: a connection ends before its context
  kj::Own<connection> conn_;
  uint64_t gen_ = 0;
  bool connecting_ = false;
  bool in_flight_ = false;
  bool ever_ok_ = false;
  clock::time_point started_, connect_started_, sent_, last_ok_, next_attempt_, opened_at_;
  kj::Own<kj::TaskSet> tasks_;  // last: destroyed first, its tasks reference the rest
};

link_actor::behavior_type link_behavior(link_actor::pointer self, std::string address,
                                        link_config cfg, std::shared_ptr<peer_table> table,
                                        std::shared_ptr<supervision_log> log) {
  auto io =
      std::make_shared<link_io>(address, std::move(cfg), table, std::move(log), self->address());
  io->start();
  // Joined when the actor exits (normally, killed, or restarted by its supervisor): the loop
  // stops within one turn of its event loop, so the join is short.
  self->attach_functor([io](const caf::error&) { io->stop(); });
  return {
      [io](cut_atom, int64_t ms) -> bool {
        io->cut(std::chrono::milliseconds(std::max<int64_t>(ms, 0)));
        return true;
      },
      [table, address](get_atom) -> std::string {
        for (auto& p : table->snapshot())
          if (p.address == address) return to_string(p.status);
        return "down";
      },
  };
}

}  // namespace

child_spec link_spec(std::string address, link_config cfg, std::shared_ptr<peer_table> table,
                     std::shared_ptr<supervision_log> log) {
  child_spec spec;
  spec.id = "peer-" + address;
  spec.kind = "region_link";
  spec.start = [address, cfg, table, log](caf::actor_system& sys, const std::string&,
                                          const caf::message&) -> caf::expected<caf::actor> {
    return caf::actor_cast<caf::actor>(sys.spawn(link_behavior, address, cfg, table, log));
  };
  return spec;
}

}  // namespace keel
