#include "actors/replicator.hpp"
#include "actors/rendezvous.hpp"

#include <algorithm>

#include <kj/async-io.h>
#include <kj/time.h>

#include "base/error.hpp"
#include "storage/session_store.hpp"
#include "wire/peer.capnp.h"
#include "wire/rpc_client.hpp"

namespace keel {

namespace {

void set_logs(capnp::List<wire::TurnLog>::Builder out,
              const std::map<uint64_t, std::vector<int32_t>>& logs) {
  unsigned i = 0;
  for (auto& [turn, tokens] : logs) {
    auto l = out[i++];
    l.setTurn(turn);
    auto tl = l.initTokens(static_cast<unsigned>(tokens.size()));
    for (unsigned k = 0; k < tokens.size(); ++k) tl.set(k, tokens[k]);
  }
}

void set_from(wire::NodeId::Builder from, const replicator_config& c) {
  from.setName(c.self_name);
  from.setRegion(c.self_region);
  from.setAddress(c.self_address);
}

caf::error peer_error(wire::PeerError::Reader e) {
  if (e.getCode() == 0) return {};
  return make_error(static_cast<errc>(e.getCode()), e.getMessage().cStr());
}

}  // namespace

/// The replicator thread's connections, one per peer address.
struct replicator::rpc {
  struct peer_connection {
    std::unique_ptr<wire::rpc_client> client;
    wire::Peer::Client main = nullptr;
  };
  explicit rpc(std::shared_ptr<const wire::tls_config> t, std::chrono::milliseconds timeout)
      : tls(std::move(t)), connect_timeout(timeout) {}

  std::shared_ptr<const wire::tls_config> tls;
  std::chrono::milliseconds connect_timeout;
  std::map<std::string, peer_connection> clients;
  wire::rpc_client* any = nullptr;  // for the wait scope and timer, once one exists

  /// The peer's capability, on a connection made once per address (under TLS the peer's
  /// certificate must name `p.name`, which its heartbeats answered with): asking a connection
  /// whose stream broke for its bootstrap again makes Cap'n Proto 0.9 throw from a destructor
  /// while unwinding (std::terminate), so a connection's capability is taken once, when it is
  /// made, and a broken connection is dropped (`drop`), never asked again.
  wire::Peer::Client peer(const peer_info& p) {
    auto& c = clients[p.address];
    if (!c.client) {
      c.client = std::make_unique<wire::rpc_client>(p.address, tls, p.name, connect_timeout);
      c.main = c.client->getMain<wire::Peer>();
    }
    any = c.client.get();
    return c.main;
  }

  /// Waits for `p` up to `limit` on this thread's event loop.
  template <class T>
  T wait(kj::Promise<T> p, std::chrono::milliseconds limit) {
    // From the real clock: the timer's own `now()` stands still while this thread waits for
    // work outside the event loop, so a delay from it would end at once after an idle spell.
    auto deadline = kj::systemPreciseMonotonicClock().now() + limit.count() * kj::MILLISECONDS;
    return any->getIoProvider()
        .getTimer()
        .timeoutAt(deadline, kj::mv(p))
        .wait(any->getWaitScope());
  }

  void drop(const std::string& address) {
    auto i = clients.find(address);
    if (i == clients.end()) return;
    if (any == i->second.client.get()) any = nullptr;
    // Tearing down a broken connection can throw (a last message on a shut-down stream): it
    // changes nothing for the rest.
    try {
      clients.erase(i);
    } catch (...) {
    }
  }
};

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

void replicator::post(std::function<void()> task) {
  {
    std::lock_guard<std::mutex> guard(mu_);
    if (stopping_) return;
    queue_.push_back(std::move(task));
  }
  cv_.notify_one();
}

std::future<caf::error> replicator::enqueue(replica_update u) {
  std::future<caf::error> out;
  std::shared_ptr<std::promise<caf::error>> answer;
  if (u.acknowledged) {
    answer = std::make_shared<std::promise<caf::error>>();
    out = answer->get_future();
  }
  {
    std::lock_guard<std::mutex> guard(mu_);
    if (stopping_) {
      if (answer) answer->set_value(make_error(errc::disconnected, "replication stopped"));
      return out;
    }
    queue_.push_back([this, u = std::move(u), answer] {
      auto err = replicate(u);
      bool stale = err && code_of(err) == errc::stale_epoch;
      if (answer) answer->set_value(stale || u.strict ? err : caf::error{});
      if (stale && cfg_.on_stale) cfg_.on_stale(u.session, u.epoch);
    });
  }
  cv_.notify_one();
  return out;
}

std::vector<session_copy> replicator::locate(const std::vector<std::string>& sessions,
                                             std::vector<std::string>* missing) {
  return ask(sessions, {}, missing);
}

std::vector<session_copy> replicator::owned_by(const std::string& owner,
                                               std::vector<std::string>* missing) {
  return ask({}, owner, missing);
}

std::vector<session_copy> replicator::ask(const std::vector<std::string>& sessions,
                                          const std::string& owner,
                                          std::vector<std::string>* missing) {
  using answer = std::pair<std::vector<session_copy>, std::vector<std::string>>;
  auto p = std::make_shared<std::promise<answer>>();
  auto f = p->get_future();
  post([this, sessions, owner, p] {
    answer a;
    a.first = locate_now(sessions, owner, &a.second);
    p->set_value(std::move(a));
  });
  if (f.wait_for(cfg_.call_timeout * 4) != std::future_status::ready) {
    if (missing) missing->push_back("(the replicator did not answer)");
    return {};
  }
  auto a = f.get();
  if (missing) *missing = std::move(a.second);
  return std::move(a.first);
}

caf::expected<fetched_session> replicator::fetch(const std::string& session) {
  auto p = std::make_shared<std::promise<caf::expected<fetched_session>>>();
  auto f = p->get_future();
  post([this, session, p] { p->set_value(fetch_now(session)); });
  if (f.wait_for(cfg_.call_timeout * 4) != std::future_status::ready)
    return make_error(errc::disconnected, "fetch of session " + session + ": no answer");
  return f.get();
}

uint64_t replicator::sent() const {
  std::lock_guard<std::mutex> guard(mu_);
  return sent_;
}

uint64_t replicator::failed() const {
  std::lock_guard<std::mutex> guard(mu_);
  return failed_;
}

void replicator::report(bool ok, const std::string& why) {
  std::lock_guard<std::mutex> guard(mu_);
  (ok ? sent_ : failed_)++;
  if (!ok && cfg_.log) cfg_.log("replicator: " + why);
}

std::vector<peer_info> replicator::placement(const std::string& session,
                                             const std::string& self_region, int32_t replicas,
                                             std::vector<peer_info> live) {
  // A draining peer is only a last resort.
  std::vector<peer_info> draining;
  for (auto i = live.begin(); i != live.end();) {
    if (i->draining) {
      draining.push_back(*i);
      i = live.erase(i);
    } else {
      ++i;
    }
  }
  auto by_weight = [&](const peer_info& a, const peer_info& b) {
    auto wa = rendezvous_weight(session, a.name), wb = rendezvous_weight(session, b.name);
    return wa != wb ? wa > wb : a.name < b.name;
  };
  if (!draining.empty()) {
    auto out = placement(session, self_region, replicas, std::move(live));
    std::sort(draining.begin(), draining.end(), by_weight);
    out.insert(out.end(), draining.begin(), draining.end());
    return out;
  }
  std::sort(live.begin(), live.end(), by_weight);
  auto r = static_cast<size_t>(std::max(replicas, 0));
  if (r == 0 || live.empty()) return live;
  r = std::min(r, live.size());
  auto other = [&](const peer_info& p) { return p.region != self_region; };
  if (std::none_of(live.begin(), live.begin() + static_cast<ptrdiff_t>(r), other)) {
    auto far = std::find_if(live.begin() + static_cast<ptrdiff_t>(r), live.end(), other);
    if (far != live.end()) std::rotate(live.begin() + static_cast<ptrdiff_t>(r - 1), far, far + 1);
  }
  return live;
}

std::vector<peer_info> replicator::live_peers() {
  std::vector<peer_info> out;
  for (auto& p : peers_->snapshot())
    if (p.accepts_work() && !p.name.empty() && p.name != cfg_.self_name &&
        !(cfg_.cut && cfg_.cut->blocked(p.name)))
      out.push_back(p);
  return out;
}

caf::error replicator::replicate(const replica_update& u) {
  // A majority of the session's group (this node and R replicas) must store a new session or
  // turn before it is acknowledged: this node's synced write and `needed` replicas.
  const size_t group = static_cast<size_t>(std::max(cfg_.replicas, 1)) + 1;
  const size_t needed = group / 2 + 1 - 1;
  auto live = live_peers();
  if (live.empty()) {
    // Never acknowledged alone: a node cut off from its peers is a minority (single-node mode
    // is a node without peers, which replicates nothing).
    if (u.strict) {
      report(false, "session " + u.session + ": no live peer to store it; refused");
      return make_error(errc::disconnected, "session " + u.session +
                                                ": no peer can store the write (this node is cut "
                                                "off from the cluster); retry on another node");
    }
    if (u.acknowledged) report(false, "session " + u.session + ": no live peer; kept on this node only");
    return {};
  }
  auto order = placement(u.session, cfg_.self_region, cfg_.replicas, std::move(live));
  size_t wanted = u.fence_all ? order.size() : std::min<size_t>(cfg_.replicas, order.size());
  size_t stored = 0;
  size_t incapable = 0;  // peers that keep no replicas at all
  caf::error stale;
  for (auto& target : order) {
    if (stored >= wanted) break;
    auto& seen = seeded_[target.address];
    if (seen.status_changes != target.status_changes) {
      seen.status_changes = target.status_changes;
      seen.sessions.clear();
    }
    bool full = u.fence_all || seen.sessions.count(u.session) == 0;
    if (!full && u.record.empty() && u.tokens.empty()) {
      ++stored;  // nothing new for a replica that has it all
      continue;
    }
    caf::error err;
    for (int attempt = 0; attempt < 2; ++attempt) {
      if (full) {
        // The whole session as this node's store has it now (maybe newer than `u`).
        if (!cfg_.store->get_session(u.session)) return {};  // dropped meanwhile: nothing to copy
        err = send_full(u.session, target);
      } else {
        err = send_delta(u, target);
      }
      // A replica without the earlier updates (a gap, no record): send it everything.
      auto code = err ? code_of(err) : errc::none;
      if (!full && (code == errc::bad_request || code == errc::not_found)) {
        full = true;
        continue;
      }
      break;
    }
    if (!err) {
      seen.sessions.insert(u.session);
      ++stored;
      report(true, {});
      continue;
    }
    seen.sessions.erase(u.session);
    report(false, "session " + u.session + " to " + target.name + " (" + target.address +
                      "): " + describe(err));
    if (code_of(err) == errc::stale_epoch) stale = err;
    if (code_of(err) == errc::unimplemented) ++incapable;  // a peer without a data dir
  }
  if (stale) return stale;
  if (stored < needed && u.strict && incapable < order.size()) {
    return make_error(errc::disconnected,
                      "session " + u.session + ": " + std::to_string(stored) + " replica(s) of " +
                          std::to_string(needed) + " needed for a majority stored the write (" +
                          std::to_string(order.size()) + " live peer(s) tried); retry");
  }
  if (stored == 0 && u.acknowledged)
    report(false, "session " + u.session + ": no replica stored it; kept on this node only");
  return {};
}

caf::error replicator::send_delta(const replica_update& u, const peer_info& target) {
  try {
    auto req = rpc_->peer(target).replicateRequest();
    set_from(req.initFrom(), cfg_);
    req.setSession(u.session);
    req.setEpoch(u.epoch);
    req.setRecord(
        kj::arrayPtr(reinterpret_cast<const capnp::byte*>(u.record.data()), u.record.size()));
    req.setTurn(u.turn);
    req.setFromIndex(u.from_index);
    auto tl = req.initTokens(static_cast<unsigned>(u.tokens.size()));
    for (unsigned i = 0; i < u.tokens.size(); ++i) tl.set(i, u.tokens[i]);
    return peer_error(rpc_->wait(req.send(), cfg_.call_timeout).getError());
  } catch (const kj::Exception& e) {
    rpc_->drop(target.address);
    return make_error(errc::disconnected, target.name + ": " + e.getDescription().cStr());
  }
}

caf::error replicator::send_full(const std::string& session, const peer_info& target) {
  try {
    auto entry = cfg_.store->get_session(session);
    if (!entry) return entry.error();
    auto logs = cfg_.store->read_turns(session);
    if (!logs) return logs.error();
    auto req = rpc_->peer(target).replicateRequest();
    set_from(req.initFrom(), cfg_);
    req.setSession(session);
    req.setEpoch(entry->epoch);
    req.setRecord(kj::arrayPtr(reinterpret_cast<const capnp::byte*>(entry->payload.data()),
                               entry->payload.size()));
    set_logs(req.initLogs(static_cast<unsigned>(logs->size())), *logs);
    return peer_error(rpc_->wait(req.send(), cfg_.call_timeout).getError());
  } catch (const kj::Exception& e) {
    rpc_->drop(target.address);
    return make_error(errc::disconnected, target.name + ": " + e.getDescription().cStr());
  }
}

caf::expected<uint64_t> replicator::handoff(const std::string& session, const peer_info& target) {
  auto p = std::make_shared<std::promise<caf::expected<uint64_t>>>();
  auto f = p->get_future();
  post([this, session, target, p] {
    if (cfg_.cut && cfg_.cut->blocked(target.name)) {
      p->set_value(make_error(errc::disconnected, target.name + ": partitioned (fault injection)"));
      return;
    }
    if (auto err = send_full(session, target)) {
      p->set_value(std::move(err));
      return;
    }
    try {
      auto req = rpc_->peer(target).handoffRequest();
      set_from(req.initFrom(), cfg_);
      req.setSession(session);
      auto res = rpc_->wait(req.send(), cfg_.call_timeout * 4);
      if (auto err = peer_error(res.getError()))
        p->set_value(std::move(err));
      else
        p->set_value(res.getEpoch());
    } catch (const kj::Exception& e) {
      rpc_->drop(target.address);
      p->set_value(make_error(errc::disconnected, target.name + ": " + e.getDescription().cStr()));
    }
  });
  if (f.wait_for(cfg_.call_timeout * 8) != std::future_status::ready)
    return make_error(errc::disconnected, "handoff of session " + session + ": no answer");
  return f.get();
}

std::vector<session_copy> replicator::locate_now(const std::vector<std::string>& sessions,
                                                 const std::string& owner,
                                                 std::vector<std::string>* missing) {
  std::vector<session_copy> out;
  if (sessions.empty() && owner.empty()) return out;
  for (auto& p : live_peers()) {
    try {
      auto collect = [&](capnp::List<wire::SessionCopy>::Reader copies) {
        for (auto c : copies) {
          if (c.getRole() == wire::SessionCopy::Role::NONE) continue;
          session_copy x;
          x.session = c.getSession().cStr();
          x.node = p.name;
          x.client_address = p.client_address;
          x.owner = c.getRole() == wire::SessionCopy::Role::OWNER;
          x.epoch = c.getEpoch();
          x.record_owner = c.getOwner().cStr();
          x.turns = c.getTurns();
          x.tokens = c.getTokens();
          x.last_done = c.getLastDone();
          out.push_back(std::move(x));
        }
      };
      if (!owner.empty()) {
        auto req = rpc_->peer(p).ownedRequest();
        set_from(req.initFrom(), cfg_);
        req.setOwner(owner);
        collect(rpc_->wait(req.send(), cfg_.call_timeout).getCopies());
      } else {
        auto req = rpc_->peer(p).locateRequest();
        set_from(req.initFrom(), cfg_);
        auto ids = req.initSessions(static_cast<unsigned>(sessions.size()));
        for (unsigned i = 0; i < sessions.size(); ++i) ids.set(i, sessions[i]);
        collect(rpc_->wait(req.send(), cfg_.call_timeout).getCopies());
      }
    } catch (const kj::Exception& e) {
      rpc_->drop(p.address);
      report(false, std::string(owner.empty() ? "locate" : "owned") + " at " + p.name + " (" +
                        p.address + "): " + e.getDescription().cStr());
      if (missing) missing->push_back(p.name);
    }
  }
  return out;
}

caf::expected<fetched_session> replicator::fetch_now(const std::string& session) {
  caf::expected<fetched_session> best =
      make_error(errc::not_found, "no live peer has a copy of session " + session);
  for (auto& p : live_peers()) {
    try {
      auto req = rpc_->peer(p).fetchRequest();
      set_from(req.initFrom(), cfg_);
      req.setSession(session);
      auto res = rpc_->wait(req.send(), cfg_.call_timeout);
      if (peer_error(res.getError())) continue;
      if (best && best->epoch >= res.getEpoch()) continue;
      fetched_session f;
      f.node = p.name;
      f.epoch = res.getEpoch();
      auto rec = res.getRecord();
      f.record.assign(reinterpret_cast<const char*>(rec.begin()), rec.size());
      for (auto l : res.getLogs()) {
        auto& out = f.logs[l.getTurn()];
        for (auto t : l.getTokens()) out.push_back(t);
      }
      best = std::move(f);
    } catch (const kj::Exception& e) {
      rpc_->drop(p.address);
      report(false, "fetch at " + p.name + " (" + p.address + "): " + e.getDescription().cStr());
    }
  }
  return best;
}

void replicator::run() {
  rpc state(cfg_.tls, cfg_.call_timeout);
  rpc_ = &state;
  for (;;) {
    std::function<void()> task;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stopping_ || !queue_.empty(); });
      if (stopping_) break;
      task = std::move(queue_.front());
      queue_.pop_front();
    }
    // A task's own failures are values; anything thrown past it (KJ's teardown of a broken
    // connection) must not end the node.
    try {
      task();
    } catch (const kj::Exception& e) {
      report(false, std::string("task failed: ") + e.getDescription().cStr());
    } catch (const std::exception& e) {
      report(false, std::string("task failed: ") + e.what());
    }
  }
  // Answer whatever still waits, so that no writer blocks on a stopped replicator.
  std::lock_guard<std::mutex> guard(mu_);
  queue_.clear();
  rpc_ = nullptr;
}

}  // namespace keel
