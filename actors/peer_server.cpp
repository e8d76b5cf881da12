#include "actors/peer_server.hpp"

#include <algorithm>
#include <chrono>
#include <future>
#include <map>
#include <mutex>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include "base/error.hpp"
#include "wire/peer.capnp.h"

namespace keel {

/// What the server's thread reads of the node, set from other threads.
struct peer_server::node_state {
  std::mutex mu;
  std::function<void(const std::string&, std::string)> on_ownership;
  /// Held while `on_ownership` runs, and by `peer_server::on_ownership` while it replaces it:
  /// so the callback is never running once replaced (its node may be gone next).
  std::mutex calling;
  /// When a differing cluster digest was last logged, by sender.
  std::map<std::string, std::chrono::steady_clock::time_point> mismatch_logged;
  std::string client_address;
  bool draining = false;
  std::function<std::string()> not_ready;
  std::function<node_load()> load;
};

namespace {

uint64_t steady_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

class peer_impl final : public wire::Peer::Server {
 public:
  /// `caller`: who is at the other end of this connection (a kj::TlsPeerIdentity under TLS).
  peer_impl(const peer_server_config& cfg, std::string address, peer_server::node_state& rs,
            kj::Own<kj::PeerIdentity> caller)
      : cfg_(cfg), address_(std::move(address)), rs_(rs), caller_(kj::mv(caller)) {}

  /// Whether a call naming `from` is refused: from a stranger under TLS (issue #11: anyone who
  /// reached the port could read, overwrite and take over sessions), or from a peer this node
  /// is cut from (the `partition` fault, failing as a broken connection would). `refuse()` then
  /// makes the failure.
  bool cut_off(capnp::Text::Reader from) {
    std::string name = from.cStr();
    stranger_ = false;
    if (cfg_.tls) {
      bool configured = std::find(cfg_.peers.begin(), cfg_.peers.end(), name) != cfg_.peers.end();
      if (!configured || !wire::certified_as(*caller_, name)) {
        if (cfg_.log)
          cfg_.log(
              "peer server: refused a call from '" + name + "' (" + caller_->toString().cStr() +
              "): " + (configured ? "its certificate does not name it" : "not a configured peer"));
        stranger_ = true;
        return true;
      }
    }
    return cfg_.cut && cfg_.cut->blocked(name);
  }
  kj::Promise<void> refuse() const {
    if (stranger_)
      return KJ_EXCEPTION(FAILED, "permission denied: the caller is not an authenticated peer");
    return KJ_EXCEPTION(DISCONNECTED, "partitioned (fault injection)");
  }

  kj::Promise<void> heartbeat(HeartbeatContext ctx) override {
    if (cut_off(ctx.getParams().getFrom().getName())) return refuse();
    auto res = ctx.getResults();
    auto me = res.initNode();
    me.setName(cfg_.name);
    me.setRegion(cfg_.region);
    me.setAddress(address_);
    me.setCluster(cfg_.cluster);
    me.setModelDigest(cfg_.model_digest);
    {
      std::lock_guard<std::mutex> guard(rs_.mu);
      me.setClientAddress(rs_.client_address);
      me.setDraining(rs_.draining);
      if (rs_.not_ready) me.setNotReady(rs_.not_ready());
      if (rs_.load) {
        auto l = rs_.load();
        auto out = me.initLoad();
        auto u = [](int32_t x) { return static_cast<uint32_t>(std::max(x, 0)); };
        out.setWaiting(u(l.waiting));
        out.setRunning(u(l.running));
        out.setKvPagesFree(u(l.kv_free));
        out.setKvPagesCapacity(u(l.kv_capacity));
        out.setKvPagesWanted(u(l.kv_wanted));
        out.setTokensPerSecond(l.tokens_per_s);
      }
    }
    res.setSentNs(ctx.getParams().getSentNs());
    res.setReceivedNs(steady_ns());
    return kj::READY_NOW;
  }

  kj::Promise<void> ownership(OwnershipContext ctx) override {
    auto p = ctx.getParams();
    if (cut_off(p.getFrom().getName())) return refuse();
    std::function<void(const std::string&, std::string)> f;
    {
      std::lock_guard<std::mutex> guard(rs_.mu);
      if (cfg_.cluster != 0 && p.getFrom().getCluster() != cfg_.cluster) {
        // Another view of the cluster: its groups and leases are not this node's.
        std::string from = p.getFrom().getName().cStr();
        auto now = std::chrono::steady_clock::now();
        auto& last = rs_.mismatch_logged[from];
        if (cfg_.log && (last == std::chrono::steady_clock::time_point{} ||
                         now - last >= std::chrono::minutes(1))) {
          last = now;
          cfg_.log("peer server: dropped ownership messages from '" + from +
                   "': its cluster configuration differs from this node's (every node needs "
                   "the same --peers names, --peer-regions, --replicas, --heartbeat-interval and "
                   "--down-after)");
        }
        return kj::READY_NOW;
      }
    }
    auto bytes = p.getMessage();
    std::lock_guard<std::mutex> calling(rs_.calling);
    {
      std::lock_guard<std::mutex> guard(rs_.mu);
      f = rs_.on_ownership;
    }
    if (f)
      f(p.getFrom().getName().cStr(),
        std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size()));
    return kj::READY_NOW;
  }

 private:
  const peer_server_config& cfg_;  // owned by the peer_server, which outlives the thread
  std::string address_;
  peer_server::node_state& rs_;  // owned by the peer_server, likewise
  kj::Own<kj::PeerIdentity> caller_;
  bool stranger_ = false;  // the last refused call came from a stranger
};

struct serving : kj::TaskSet::ErrorHandler {
  const peer_server_config& cfg;
  kj::Own<kj::TlsContext> tls;  // before `tasks`: connections end before their context
  kj::TaskSet tasks{*this};

  explicit serving(const peer_server_config& c) : cfg(c) {}

  void taskFailed(kj::Exception&& e) override {
    if (cfg.log) cfg.log("peer server: " + std::string(e.getDescription().cStr()));
  }
};

}  // namespace

caf::expected<std::unique_ptr<peer_server>> peer_server::start(peer_server_config cfg) {
  std::unique_ptr<peer_server> s(new peer_server());
  s->cfg_ = std::move(cfg);
  s->state_ = std::make_unique<node_state>();
  s->server_ = std::make_unique<wire::server_thread>();
  auto serve = [sp = s.get()](kj::AsyncIoContext& io, kj::Own<kj::ConnectionReceiver> listener,
                              uint16_t port) {
    auto state = kj::heap<serving>(sp->cfg_);
    // Peers present certificates too: the handshake fails for one that has none from the CA.
    if (sp->cfg_.tls) state->tls = sp->cfg_.tls->context(true);
    auto address = sp->cfg_.host + ":" + std::to_string(port);
    auto accepting = wire::accept_forever(
        *listener, io.provider->getTimer(), state->tls.get(),
        [sp, address](kj::Own<kj::PeerIdentity> caller) -> capnp::Capability::Client {
          return kj::heap<peer_impl>(sp->cfg_, address, *sp->state_, kj::mv(caller));
        },
        state->tasks, sp->cfg_.log, "peer server", sp->cfg_.reader);
    return accepting.attach(kj::mv(listener), kj::mv(state));
  };
  auto port =
      s->server_->start("peer server", s->cfg_.host, s->cfg_.port, std::move(serve), s->cfg_.log);
  if (!port) return std::move(port.error());
  s->port_ = *port;
  return s;
}

std::string peer_server::address() const {
  return cfg_.host + ":" + std::to_string(port_);
}

capnp::Capability::Client peer_server::bootstrap(kj::Own<kj::PeerIdentity> caller) {
  return kj::heap<peer_impl>(cfg_, address(), *state_, kj::mv(caller));
}

void peer_server::on_ownership(std::function<void(const std::string&, std::string)> f) {
  std::lock_guard<std::mutex> calling(state_->calling);  // waits for a call in progress
  std::lock_guard<std::mutex> guard(state_->mu);
  state_->on_ownership = std::move(f);
}

void peer_server::set_draining(bool draining) {
  std::lock_guard<std::mutex> guard(state_->mu);
  state_->draining = draining;
}

void peer_server::set_readiness(std::function<std::string()> not_ready) {
  std::lock_guard<std::mutex> guard(state_->mu);
  state_->not_ready = std::move(not_ready);
}

void peer_server::set_load(std::function<node_load()> load) {
  std::lock_guard<std::mutex> guard(state_->mu);
  state_->load = std::move(load);
}

void peer_server::set_client_address(const std::string& address) {
  std::lock_guard<std::mutex> guard(state_->mu);
  state_->client_address = address;
}

void peer_server::stop() {
  if (server_) server_->stop();
}

peer_server::~peer_server() {
  stop();
}

}  // namespace keel
