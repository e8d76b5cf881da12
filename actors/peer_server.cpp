#include "actors/peer_server.hpp"

#include <chrono>
#include <future>
#include <mutex>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include "base/error.hpp"
#include "storage/session_store.hpp"
#include "wire/peer.capnp.h"

namespace keel {

std::string replica_key(const std::string& from_node, const std::string& session) {
  return std::string(replica_prefix) + (from_node.empty() ? "unknown" : from_node) + "/" + session;
}

/// The store `replicate` writes to; the mutex is held across each write and each attach.
struct peer_server::replica_store {
  std::mutex mu;
  storage::session_store* store = nullptr;
};

namespace {

uint64_t steady_ns() {
  return static_cast<uint64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                   std::chrono::steady_clock::now().time_since_epoch())
                                   .count());
}

class peer_impl final : public wire::Peer::Server {
 public:
  peer_impl(const peer_server_config& cfg, std::string address, peer_server::replica_store& rs)
      : cfg_(cfg), address_(std::move(address)), rs_(rs) {}

  kj::Promise<void> heartbeat(HeartbeatContext ctx) override {
    auto res = ctx.getResults();
    auto me = res.initNode();
    me.setName(cfg_.name);
    me.setRegion(cfg_.region);
    me.setAddress(address_);
    res.setSentNs(ctx.getParams().getSentNs());
    res.setReceivedNs(steady_ns());
    return kj::READY_NOW;
  }

  // Runs the store write on the server's thread: a synced write takes about 0.1 ms, and
  // replicas arrive at most once per structural change or `checkpoint_every` tokens.
  kj::Promise<void> replicate(ReplicateContext ctx) override {
    auto p = ctx.getParams();
    auto out = ctx.getResults().initError();
    auto err = store(p);
    if (err) {
      out.setCode(static_cast<uint8_t>(code_of(err)));
      out.setMessage(message_of(err));
      if (cfg_.log)
        cfg_.log("peer server: replicate from " + std::string(p.getFrom().getName().cStr()) +
                 " refused: " + message_of(err));
    }
    return kj::READY_NOW;
  }

 private:
  caf::error store(wire::Peer::ReplicateParams::Reader p) {
    std::lock_guard<std::mutex> guard(rs_.mu);
    if (rs_.store == nullptr)
      return make_error(errc::unimplemented, "replicate: node " + cfg_.name + " has no data dir");
    std::string id = replica_key(p.getFrom().getName().cStr(), p.getSession().cStr());
    auto epoch = p.getEpoch();
    auto rec = p.getRecord();
    auto tl = p.getTokens();
    std::vector<int32_t> tokens;
    tokens.reserve(tl.size());
    for (auto t : tl) tokens.push_back(t);
    storage::write_batch b;
    if (rec.size() > 0)
      b.put_session(id, epoch, std::string(reinterpret_cast<const char*>(rec.begin()), rec.size()));
    if (!tokens.empty())
      b.append_turn_tokens(id, epoch, p.getTurn(), p.getFromIndex(), std::move(tokens));
    return rs_.store->write(b, storage::durability::sync);
  }

  const peer_server_config& cfg_;  // owned by the peer_server, which outlives the thread
  std::string address_;
  peer_server::replica_store& rs_;  // owned by the peer_server, likewise
};

struct connection {
  kj::Own<kj::AsyncIoStream> io;
  capnp::TwoPartyVatNetwork network;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpc;

  connection(kj::Own<kj::AsyncIoStream>&& s, capnp::Capability::Client bootstrap)
      : io(kj::mv(s)),
        network(*io, capnp::rpc::twoparty::Side::SERVER),
        rpc(capnp::makeRpcServer(network, kj::mv(bootstrap))) {}
};

struct serving : kj::TaskSet::ErrorHandler {
  const peer_server_config& cfg;
  kj::TaskSet tasks{*this};

  explicit serving(const peer_server_config& c) : cfg(c) {}

  void taskFailed(kj::Exception&& e) override {
    if (cfg.log) cfg.log("peer server: " + std::string(e.getDescription().cStr()));
  }

  kj::Promise<void> accept_loop(kj::ConnectionReceiver& listener, capnp::Capability::Client main) {
    return listener.accept().then(
        [this, &listener, main](kj::Own<kj::AsyncIoStream>&& s) mutable -> kj::Promise<void> {
          auto c = kj::heap<connection>(kj::mv(s), main);
          auto gone = c->network.onDisconnect();
          tasks.add(gone.attach(kj::mv(c)));
          return accept_loop(listener, kj::mv(main));
        });
  }
};

}  // namespace

struct peer_server::stopper {
  std::mutex mu;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> fulfiller;
};

caf::expected<std::unique_ptr<peer_server>> peer_server::start(peer_server_config cfg) {
  std::unique_ptr<peer_server> s(new peer_server());
  s->cfg_ = std::move(cfg);
  s->stop_ = std::make_unique<stopper>();
  s->store_ = std::make_unique<replica_store>();
  std::promise<caf::expected<uint16_t>> bound;
  auto ready = bound.get_future();
  s->thread_ = std::thread([sp = s.get(), &bound] {
    bool reported = false;
    try {
      auto io = kj::setupAsyncIo();
      auto addr =
          io.provider->getNetwork().parseAddress(sp->cfg_.host, sp->cfg_.port).wait(io.waitScope);
      auto listener = addr->listen();
      auto port = static_cast<uint16_t>(listener->getPort());
      auto stop = kj::newPromiseAndCrossThreadFulfiller<void>();
      {
        std::lock_guard<std::mutex> guard(sp->stop_->mu);
        sp->stop_->fulfiller = kj::mv(stop.fulfiller);
      }
      serving state(sp->cfg_);
      capnp::Capability::Client main =
          kj::heap<peer_impl>(sp->cfg_, sp->cfg_.host + ":" + std::to_string(port), *sp->store_);
      auto accepting =
          state.accept_loop(*listener, main).eagerlyEvaluate([&state](kj::Exception&& e) {
            state.taskFailed(kj::mv(e));
          });
      bound.set_value(port);
      reported = true;
      stop.promise.wait(io.waitScope);
    } catch (const kj::Exception& e) {
      auto what = std::string(e.getDescription().cStr());
      if (!reported)
        bound.set_value(make_error(errc::failed, what));
      else if (sp->cfg_.log)
        sp->cfg_.log("peer server: stopped: " + what);
    } catch (const std::exception& e) {
      if (!reported)
        bound.set_value(make_error(errc::failed, e.what()));
      else if (sp->cfg_.log)
        sp->cfg_.log(std::string("peer server: stopped: ") + e.what());
    }
  });
  auto port = ready.get();
  if (!port) {
    s->thread_.join();
    return make_error(code_of(port.error()), "peer server: cannot listen on " + s->cfg_.host + ":" +
                                                 std::to_string(s->cfg_.port) + ": " +
                                                 message_of(port.error()));
  }
  s->port_ = *port;
  return s;
}

std::string peer_server::address() const {
  return cfg_.host + ":" + std::to_string(port_);
}

void peer_server::attach_store(storage::session_store* store) {
  std::lock_guard<std::mutex> guard(store_->mu);
  store_->store = store;
}

void peer_server::stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> guard(stop_->mu);
    if (stop_->fulfiller.get() != nullptr) stop_->fulfiller->fulfill();
  }
  thread_.join();
}

peer_server::~peer_server() {
  stop();
}

}  // namespace keel
