#include "actors/peer_server.hpp"

#include <algorithm>
#include <chrono>
#include <future>
#include <mutex>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include "base/error.hpp"
#include "storage/session_store.hpp"
#include "wire/checkpoint.hpp"
#include "wire/peer.capnp.h"

namespace keel {

std::string replica_key(const std::string& session) {
  return std::string(replica_prefix) + session;
}

/// The store `replicate` writes to; the mutex is held across each write and each attach.
struct peer_server::replica_store {
  std::mutex mu;
  storage::session_store* store = nullptr;
  std::function<void(const std::string&, uint64_t)> on_lost;
  std::function<caf::expected<uint64_t>(const std::string&, const std::string&)> on_handoff;
  std::function<void(const std::string&, std::string)> on_ownership;
  std::string client_address;
  bool draining = false;
  std::function<std::string()> not_ready;
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
  peer_impl(const peer_server_config& cfg, std::string address, peer_server::replica_store& rs,
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
    {
      std::lock_guard<std::mutex> guard(rs_.mu);
      me.setClientAddress(rs_.client_address);
      me.setDraining(rs_.draining);
      if (rs_.not_ready) me.setNotReady(rs_.not_ready());
    }
    res.setSentNs(ctx.getParams().getSentNs());
    res.setReceivedNs(steady_ns());
    return kj::READY_NOW;
  }

  // Runs the store write on the server's thread: a synced write takes about 0.1 ms, and
  // replicas arrive at most once per structural change or `checkpoint_every` tokens.
  kj::Promise<void> replicate(ReplicateContext ctx) override {
    auto p = ctx.getParams();
    if (cut_off(p.getFrom().getName())) return refuse();
    auto out = ctx.getResults().initError();
    std::string session = p.getSession().cStr();
    bool lost = false;
    auto err = store(p, lost);
    if (err) {
      out.setCode(static_cast<uint8_t>(code_of(err)));
      out.setMessage(message_of(err));
      if (cfg_.log && code_of(err) != errc::bad_request)
        cfg_.log("peer server: replicate from " + std::string(p.getFrom().getName().cStr()) +
                 " refused: " + message_of(err));
    }
    if (lost) {
      std::function<void(const std::string&, uint64_t)> f;
      {
        std::lock_guard<std::mutex> guard(rs_.mu);
        f = rs_.on_lost;
      }
      if (f) f(session, p.getEpoch());
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> ownership(OwnershipContext ctx) override {
    auto p = ctx.getParams();
    if (cut_off(p.getFrom().getName())) return refuse();
    std::function<void(const std::string&, std::string)> f;
    {
      std::lock_guard<std::mutex> guard(rs_.mu);
      f = rs_.on_ownership;
    }
    auto bytes = p.getMessage();
    if (f)
      f(p.getFrom().getName().cStr(),
        std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size()));
    return kj::READY_NOW;
  }

  kj::Promise<void> locate(LocateContext ctx) override {
    if (cut_off(ctx.getParams().getFrom().getName())) return refuse();
    auto ids = ctx.getParams().getSessions();
    auto out = ctx.getResults().initCopies(ids.size());
    std::lock_guard<std::mutex> guard(rs_.mu);
    for (unsigned i = 0; i < ids.size(); ++i) describe_copy(ids[i].cStr(), out[i]);
    return kj::READY_NOW;
  }

  kj::Promise<void> owned(OwnedContext ctx) override {
    if (cut_off(ctx.getParams().getFrom().getName())) return refuse();
    std::string owner = ctx.getParams().getOwner().cStr();
    // A node asks for its own sessions only (under TLS, the caller is who `from` names).
    if (owner != ctx.getParams().getFrom().getName().cStr())
      return KJ_EXCEPTION(FAILED, "permission denied: owned(" + owner + ") asked by another node");
    std::lock_guard<std::mutex> guard(rs_.mu);
    std::vector<std::string> ids;
    auto keys = rs_.store ? rs_.store->list_sessions()
                          : caf::expected<std::vector<std::string>>(std::vector<std::string>{});
    if (!keys) return KJ_EXCEPTION(FAILED, "owned: " + message_of(keys.error()));
    for (auto& key : *keys) {
      if (key.rfind(replica_prefix, 0) != 0) continue;
      auto entry = rs_.store->get_session(key);
      auto rec = entry ? wire::decode(entry->payload)
                       : caf::expected<wire::session_checkpoint>(entry.error());
      if (rec && rec->owner == owner) ids.push_back(key.substr(replica_prefix.size()));
    }
    auto out = ctx.getResults().initCopies(static_cast<unsigned>(ids.size()));
    for (unsigned i = 0; i < ids.size(); ++i) describe_copy(ids[i], out[i]);
    return kj::READY_NOW;
  }

  kj::Promise<void> handoff(HandoffContext ctx) override {
    auto p = ctx.getParams();
    if (cut_off(p.getFrom().getName())) return refuse();
    std::function<caf::expected<uint64_t>(const std::string&, const std::string&)> f;
    {
      std::lock_guard<std::mutex> guard(rs_.mu);
      f = rs_.on_handoff;
    }
    caf::expected<uint64_t> r =
        f ? f(p.getSession().cStr(), p.getFrom().getName().cStr())
          : caf::expected<uint64_t>(
                make_error(errc::unimplemented, "handoff: node " + cfg_.name + " takes none"));
    auto res = ctx.getResults();
    if (r) {
      res.setEpoch(*r);
    } else {
      auto out = res.initError();
      out.setCode(static_cast<uint8_t>(code_of(r.error())));
      out.setMessage(message_of(r.error()));
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> fetch(FetchContext ctx) override {
    if (cut_off(ctx.getParams().getFrom().getName())) return refuse();
    std::string id = ctx.getParams().getSession().cStr();
    auto res = ctx.getResults();
    std::lock_guard<std::mutex> guard(rs_.mu);
    auto fail = [&](const caf::error& e) {
      auto out = res.initError();
      out.setCode(static_cast<uint8_t>(code_of(e)));
      out.setMessage(message_of(e));
      return kj::READY_NOW;
    };
    if (rs_.store == nullptr)
      return fail(make_error(errc::unimplemented, "fetch: node " + cfg_.name + " has no data dir"));
    std::string key;
    auto own = newest_copy(id, key);
    if (!own) {
      return fail(
          make_error(errc::not_found, "node " + cfg_.name + " has no copy of session " + id));
    }
    auto logs = rs_.store->read_turns(key);
    if (!logs) return fail(logs.error());
    res.setEpoch(own->epoch);
    res.setRecord(kj::arrayPtr(reinterpret_cast<const capnp::byte*>(own->payload.data()),
                               own->payload.size()));
    auto out = res.initLogs(static_cast<unsigned>(logs->size()));
    unsigned i = 0;
    for (auto& [turn, tokens] : *logs) {
      auto l = out[i++];
      l.setTurn(turn);
      auto tl = l.initTokens(static_cast<unsigned>(tokens.size()));
      for (unsigned k = 0; k < tokens.size(); ++k) tl.set(k, tokens[k]);
    }
    return kj::READY_NOW;
  }

 private:
  /// Fills `c` with this node's newest copy of `id` (role `none` when it has none or cannot
  /// read it). Store mutex held.
  void describe_copy(const std::string& id, wire::SessionCopy::Builder c) {
    c.setSession(id);
    c.setRole(wire::SessionCopy::Role::NONE);
    if (rs_.store == nullptr) return;
    std::string key;
    auto own = newest_copy(id, key);
    if (!own) return;
    auto role = key == id ? wire::SessionCopy::Role::OWNER : wire::SessionCopy::Role::REPLICA;
    auto rec = wire::decode(own->payload);
    auto logs = rs_.store->read_turns(key);
    if (!rec || !logs) return;  // unreadable: as good as none (the node reports it itself)
    c.setRole(role);
    c.setEpoch(own->epoch);
    c.setOwner(rec->owner);
    c.setTurns(static_cast<uint32_t>(rec->turns.size()));
    uint64_t tokens = 0;
    for (auto& [turn, t] : *logs) tokens += t.size();
    c.setTokens(tokens);
    c.setLastDone(rec->turns.empty() || rec->turns.back().done);
  }

  /// The newer of this node's own copy of `id` and its replica of it (an own copy the node lost
  /// stays until it drops it), and its key; `not_found` when it has neither. Store mutex held.
  caf::expected<storage::session_entry> newest_copy(const std::string& id, std::string& key) {
    auto own = rs_.store->get_session(id);
    auto rep = rs_.store->get_session(replica_key(id));
    key = id;
    if (!own || (rep && rep->epoch > own->epoch)) {
      key = replica_key(id);
      return rep;
    }
    return own;
  }

  caf::error store(wire::Peer::ReplicateParams::Reader p, bool& lost) {
    std::lock_guard<std::mutex> guard(rs_.mu);
    if (rs_.store == nullptr)
      return make_error(errc::unimplemented, "replicate: node " + cfg_.name + " has no data dir");
    std::string session = p.getSession().cStr();
    auto epoch = p.getEpoch();
    // Whole logs come one per turn, in turn order (the replicator sends a store's map). Checked
    // before anything is built: a list of zero-sized TurnLogs costs its sender one tag word for
    // any number of elements (up to the traversal limit, 2M), and each element was a batch
    // operation: a 500-byte message held 300 MB for a million of them (found with
    // tests/fuzz/peer_fuzz.cpp).
    auto logs = p.getLogs();
    for (unsigned i = 1; i < logs.size(); ++i) {
      if (logs[i].getTurn() <= logs[i - 1].getTurn()) {
        return make_error(errc::bad_request,
                          "replicate: session " + session + ": turn log " + std::to_string(i) +
                              " is for turn " + std::to_string(logs[i].getTurn()) +
                              ", not after turn " + std::to_string(logs[i - 1].getTurn()));
      }
    }
    // A session this node owns: an epoch not above its own comes from a node that lost it
    // (fencing, ARCHITECTURE.md guarantee 3); a higher one means this node lost it.
    if (auto own = rs_.store->get_session(session)) {
      // Two nodes that took the session over at the same epoch (each missed the other): the
      // owner whose name sorts first keeps it, on both sides, so exactly one remains.
      std::string from = p.getFrom().getName().cStr();
      if (own->epoch > epoch || (own->epoch == epoch && !(from < cfg_.name))) {
        return make_error(errc::stale_epoch, "session " + session + ": write with epoch " +
                                                 std::to_string(epoch) + ", node " + cfg_.name +
                                                 " owns it at epoch " + std::to_string(own->epoch));
      }
      lost = true;
    }
    std::string id = replica_key(session);
    auto rec = p.getRecord();
    storage::write_batch b;
    if (rec.size() > 0)
      b.put_session(id, epoch, std::string(reinterpret_cast<const char*>(rec.begin()), rec.size()));
    for (auto l : logs) {
      std::vector<int32_t> tokens;
      for (auto t : l.getTokens()) tokens.push_back(t);
      b.append_turn_tokens(id, epoch, l.getTurn(), 0, std::move(tokens));
    }
    auto tl = p.getTokens();
    if (tl.size() > 0) {
      std::vector<int32_t> tokens;
      for (auto t : tl) tokens.push_back(t);
      b.append_turn_tokens(id, epoch, p.getTurn(), p.getFromIndex(), std::move(tokens));
    }
    auto err = rs_.store->write(b, storage::durability::sync);
    if (err) lost = false;
    return err;
  }

  const peer_server_config& cfg_;  // owned by the peer_server, which outlives the thread
  std::string address_;
  peer_server::replica_store& rs_;  // owned by the peer_server, likewise
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
  s->store_ = std::make_unique<replica_store>();
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
          return kj::heap<peer_impl>(sp->cfg_, address, *sp->store_, kj::mv(caller));
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
  return kj::heap<peer_impl>(cfg_, address(), *store_, kj::mv(caller));
}

void peer_server::attach_store(storage::session_store* store) {
  std::lock_guard<std::mutex> guard(store_->mu);
  store_->store = store;
}

void peer_server::on_lost(std::function<void(const std::string&, uint64_t)> f) {
  std::lock_guard<std::mutex> guard(store_->mu);
  store_->on_lost = std::move(f);
}

void peer_server::on_handoff(
    std::function<caf::expected<uint64_t>(const std::string&, const std::string&)> f) {
  std::lock_guard<std::mutex> guard(store_->mu);
  store_->on_handoff = std::move(f);
}

void peer_server::on_ownership(std::function<void(const std::string&, std::string)> f) {
  std::lock_guard<std::mutex> guard(store_->mu);
  store_->on_ownership = std::move(f);
}

void peer_server::set_draining(bool draining) {
  std::lock_guard<std::mutex> guard(store_->mu);
  store_->draining = draining;
}

void peer_server::set_readiness(std::function<std::string()> not_ready) {
  std::lock_guard<std::mutex> guard(store_->mu);
  store_->not_ready = std::move(not_ready);
}

void peer_server::set_client_address(const std::string& address) {
  std::lock_guard<std::mutex> guard(store_->mu);
  store_->client_address = address;
}

void peer_server::stop() {
  if (server_) server_->stop();
}

peer_server::~peer_server() {
  stop();
}

}  // namespace keel
