// GCC 12 reports kj::ExceptionOr<caf::expected<T>> as maybe uninitialised where it inlines a
// cross-thread fulfilment (a false positive about kj::Maybe's storage).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "actors/gateway.hpp"

#include <sys/socket.h>

#include <algorithm>
#include <future>
#include <map>
#include <optional>
#include <stdexcept>
#include <variant>

#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.h>
#include <kj/async-io.h>
#include <kj/timer.h>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>

#include "actors/atoms.hpp"
#include "actors/detail/gateway_impl.hpp"
#include "actors/http_api.hpp"
#include "wire/bridge.hpp"
#include "wire/convert.hpp"
#include "wire/keel.capnp.h"
#include "wire/key_gate.hpp"

namespace keel {

// -- connections --------------------------------------------------------------------------

kj::Promise<void> gateway::impl::accept_loop(kj::ConnectionReceiver& listener,
                                             capnp::Capability::Client main) {
  // Capability clients copy only from non-const references: std::function holds a pointer.
  auto cap = std::make_shared<capnp::Capability::Client>(kj::mv(main));
  auto limits = cfg.limits;
  limits.send_buffer = cfg.socket_send_buffer;
  return wire::accept_secured(
      listener, timer, tls.get(), tasks,
      [this, cap](kj::AuthenticatedStream&& a) {
        auto c = kj::heap<wire::rpc_connection>(kj::mv(a.stream), timer, *cap, reader_options);
        auto gone = wire::until_gone(*c, timer, cfg.limits);
        tasks.add(gone.attach(kj::mv(c)));
      },
      [this](const std::string& line) { log(line); }, "gateway", limits);
}

// -- the node -----------------------------------------------------------------------------

kj::Promise<caf::expected<session_actor>> gateway::impl::find_session(const std::string& id) {
  auto root = nd.root();
  auto timeout = cfg.call_timeout;
  return wire::in_caf<caf::expected<session_actor>>(
             sys,
             [root, id, timeout](caf::event_based_actor* self,
                                 wire::kj_reply<caf::expected<session_actor>> reply) {
               self->request(root, timeout, get_atom::value, std::string("sessions"))
                   .then(
                       [self, id, timeout, reply](caf::actor sup) {
                         if (!sup) {
                           reply(
                               make_error(errc::disconnected, "the session supervisor is down"));
                           return;
                         }
                         self->request(caf::actor_cast<supervisor_actor>(sup), timeout,
                                       get_atom::value, id)
                             .then([reply](caf::actor s) {
                                     reply(caf::actor_cast<session_actor>(std::move(s)));
                                   },
                                   [reply](caf::error& e) { reply(std::move(e)); });
                       },
                       [reply](caf::error& e) { reply(std::move(e)); });
             })
      .then([this, id](caf::expected<session_actor> a) -> caf::expected<session_actor> {
        if (!a || *a) return a;
        if (nd.moved(id))
          return make_error(errc::disconnected, "session " + id + " moved to another node; reconnect");
        if (auto why = nd.parked(id))
          return make_error(errc::failed, "session " + id + " is parked: " + *why);
        for (auto& r : nd.sessions())
          if (r.id == id) return make_error(errc::overloaded, "session " + id + " is restarting");
        return make_error(errc::not_found, "no session " + id);
      });
}

kj::Promise<caf::expected<session_record>> gateway::impl::get_record(const session_actor& session) {
  return wire::ask<session_record>(sys, session, cfg.call_timeout, get_atom::value);
}

namespace {

/// The client port's Gateway: the bootstrap (`locked` with API keys: only `login` answers), or
/// one tenant's (`key`; null on the open port, which serves the tenant "").
class gateway_server final : public wire::Gateway::Server {
 public:
  gateway_server(gw& g, const api_key* key, bool locked) : g_(g), key_(key), locked_(locked) {}

  kj::Promise<void> info(InfoContext ctx) override {
    if (locked_) return unauthenticated(ctx.getResults().initError());
    auto out = ctx.getResults().initInfo();
    const auto& ncfg = g_.nd.config();
    const auto& m = *g_.nd.context()->llm;
    out.setName(ncfg.name);
    out.setRegion(g_.cfg.region);
    out.setModel(m.path());
    out.setVocabSize(static_cast<uint32_t>(m.config().vocab_size));
    out.setContextLength(static_cast<uint32_t>(m.config().ctx_len));
    out.setShards(static_cast<uint32_t>(ncfg.shards));
    ctx.getResults().initError().setKind(wire::Error::Kind::NONE);
    return kj::READY_NOW;
  }

  kj::Promise<void> openSession(OpenSessionContext ctx) override {
    ctx.allowCancellation();
    if (locked_) return unauthenticated(ctx.getResults().initError());
    if (auto err = g_.admit(key_)) return g_.refuse(err, ctx.getResults().initError());
    auto p = ctx.getParams();
    auto params = wire::from_wire(p.getParams());
    // Capped, not refused: a client asks for the best it may have.
    auto priority = key_ ? std::min(p.getPriority(), key_->max_priority) : p.getPriority();
    if (auto err = validate(params)) {
      set_error(err, ctx.getResults().initError());
      return kj::READY_NOW;
    }
    if (!p.getHere()) {
      // Placement: a node whose KV budget is nearly taken opens the session on a peer with
      // more room (docs/actors.md, "Load across the cluster"); here again if that fails.
      if (auto peer = g_.nd.place_new_session()) {
        auto to = peer->name;
        return g_.open_on(*peer, params, priority, key_)
            .then([this, ctx, params, priority, to](
                      caf::expected<gw::placed> placed) mutable -> kj::Promise<void> {
              if (!placed) {
                g_.log("placement: opening a session on " + to +
                       " failed, opening it here: " + describe(placed.error()));
                return open_here(ctx, params, priority);
              }
              auto res = ctx.getResults();
              res.setId(placed->id);
              res.setSession(kj::mv(placed->session));
              res.initError().setKind(wire::Error::Kind::NONE);
              return kj::READY_NOW;
            });
      }
    }
    return open_here(ctx, params, priority);
  }

  kj::Promise<void> open_here(OpenSessionContext ctx, const sampling_params& params,
                              int32_t priority) {
    auto& nd = g_.nd;
    auto key = key_;
    // Counted and opened on the one worker thread, so that two opens cannot both pass the limit.
    return g_.blocking
        .run<std::string>([&nd, params, priority, key]() -> caf::expected<std::string> {
          if (key && nd.sessions_of(key->tenant) >= key->max_sessions) {
            return make_error(errc::overloaded,
                              "tenant " + key->tenant + ": over its limit sessions=" +
                                  std::to_string(key->max_sessions) + " on this node");
          }
          // Degrade before shedding: under pressure, a low priority gets a shorter context.
          return nd.open_session(params, priority, key ? key->tenant : std::string(),
                                 nd.context_for_new_session(priority));
        })
        .then([this, ctx](caf::expected<std::string> id) mutable {
          auto res = ctx.getResults();
          if (!id) return set_error(id.error(), res.initError());
          res.setId(*id);
          res.setSession(session_client(g_, *id, key_));
          res.initError().setKind(wire::Error::Kind::NONE);
        });
  }

  kj::Promise<void> getSession(GetSessionContext ctx) override {
    ctx.allowCancellation();
    if (locked_) return unauthenticated(ctx.getResults().initError());
    if (auto err = g_.admit(key_)) return g_.refuse(err, ctx.getResults().initError());
    auto text = ctx.getParams().getId();
    std::string id(text.cStr(), text.size());
    // Another tenant's session gets the answer of an id no node has.
    auto tenant = g_.nd.tenant_of(id);
    if (tenant && *tenant != tenant_name()) {
      set_error(g_.nd.unknown_session(id), ctx.getResults().initError());
      return kj::READY_NOW;
    }
    return g_.find_session(id).then(
        [this, ctx, id](caf::expected<session_actor> a) mutable -> kj::Promise<void> {
          auto res = ctx.getResults();
          if (a) {
            res.setSession(session_client(g_, id, key_));
            res.initError().setKind(wire::Error::Kind::NONE);
            return kj::READY_NOW;
          }
          if (code_of(a.error()) != errc::not_found && !g_.nd.moved(id)) {
            set_error(a.error(), res.initError());
            return kj::READY_NOW;
          }
          // Not here: any node accepts any session's requests and passes them on to its owner,
          // as this tenant, so that the owner checks the tenant too.
          return g_.forward(id, key_).then([ctx](caf::expected<wire::Session::Client> s) mutable {
            auto res = ctx.getResults();
            if (!s) return set_error(s.error(), res.initError());
            res.setSession(kj::mv(*s));
            res.initError().setKind(wire::Error::Kind::NONE);
          });
        });
  }

  kj::Promise<void> listSessions(ListSessionsContext ctx) override {
    if (locked_) return unauthenticated(ctx.getResults().initError());
    if (auto err = g_.admit(key_)) return g_.refuse(err, ctx.getResults().initError());
    auto all = g_.nd.sessions();  // reads the session table: a mutex, never an actor
    auto mine = tenant_name();
    all.erase(std::remove_if(all.begin(), all.end(),
                             [&](const session_record& r) { return r.tenant != mine; }),
              all.end());
    auto out = ctx.getResults().initSessions(static_cast<unsigned>(all.size()));
    auto ctx_len = static_cast<size_t>(g_.nd.context()->llm->config().ctx_len);
    for (size_t i = 0; i < all.size(); ++i)
      fill_info(all[i], ctx_len, out[static_cast<unsigned>(i)]);
    ctx.getResults().initError().setKind(wire::Error::Kind::NONE);
    return kj::READY_NOW;
  }

  kj::Promise<void> login(LoginContext ctx) override {
    auto res = ctx.getResults();
    if (!g_.cfg.keys) {  // the open port: everyone is its one tenant
      res.setGateway(kj::heap<gateway_server>(g_, nullptr, false));
      res.setTenant("");
      res.initError().setKind(wire::Error::Kind::NONE);
      return kj::READY_NOW;
    }
    const auto& name = g_.nd.config().name;
    if (g_.refusals.saturated()) {
      g_.log("gateway: refused a login: " + std::to_string(g_.refusals.waiting()) +
             " wrong API keys are waiting for their answer");
      wire::to_wire(make_error(errc::overloaded, "too many wrong API keys lately on keel-node " +
                                                     name + "; try again in a few seconds"),
                    res.initError(), 1000);
      return kj::READY_NOW;
    }
    auto given = ctx.getParams().getKey();
    const api_key* key = g_.cfg.keys->find(std::string_view(given.cStr(), given.size()));
    if (key == nullptr) {
      g_.log("gateway: refused a login with a wrong API key");
      return g_.refusals.delay().then([ctx]() mutable {
        wire::to_wire(make_error(errc::unauthenticated, "API key refused"),
                      ctx.getResults().initError());
      });
    }
    res.setGateway(kj::heap<gateway_server>(g_, key, false));
    res.setTenant(key->tenant);
    res.initError().setKind(wire::Error::Kind::NONE);
    return kj::READY_NOW;
  }

 private:
  std::string tenant_name() const { return key_ ? key_->tenant : std::string(); }

  kj::Promise<void> unauthenticated(wire::Error::Builder out) {
    wire::to_wire(make_error(errc::unauthenticated,
                             "keel-node " + g_.nd.config().name +
                                 " serves only clients that log in with an API key "
                                 "(Gateway.login; keel --key-file FILE or KEEL_API_KEY)"),
                  out);
    return kj::READY_NOW;
  }

  gw& g_;
  const api_key* key_;
  bool locked_;
};

}  // namespace

wire::Gateway::Client detail::gateway_client(gw& g, const api_key* key) {
  return kj::heap<gateway_server>(g, key, false);
}

caf::expected<std::unique_ptr<gateway>> gateway::start(caf::actor_system& sys, node& n,
                                                       gateway_config cfg) {
  if (cfg.max_text_bytes / 8 + 1024 > cfg.traversal_limit_words) {
    return make_error(errc::bad_request, "max_text_bytes " + std::to_string(cfg.max_text_bytes) +
                                             " does not fit the traversal limit of " +
                                             std::to_string(cfg.traversal_limit_words) + " words");
  }
  if (cfg.stall_timeout.count() <= 0) {
    return make_error(errc::bad_request, "stall_timeout must be positive, got " +
                                             std::to_string(cfg.stall_timeout.count()) + " ms");
  }
  std::unique_ptr<gateway> g(new gateway());
  g->cfg_ = std::move(cfg);
  g->server_ = std::make_unique<wire::server_thread>();
  auto serve = [&sys, &n, gp = g.get()](kj::AsyncIoContext& io,
                                        kj::Own<kj::ConnectionReceiver> listener, uint16_t) {
    auto state = kj::heap<gw>(sys, n, gp->cfg_, io.provider->getTimer(), io.provider->getNetwork());
    capnp::Capability::Client main =
        kj::heap<gateway_server>(*state, nullptr, gp->cfg_.keys != nullptr);
    auto accepting = state->accept_loop(*listener, kj::mv(main));
    if (const auto& http = gp->cfg_.http) {
      // On this thread before `start` returns: the HTTP port is bound, or the gateway fails.
      kj::Own<kj::ConnectionReceiver> http_listener;
      KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                     auto addr = io.provider->getNetwork().parseAddress(http->host, http->port);
                     http_listener = addr.wait(io.waitScope)->listen();
                   })) {
        throw std::runtime_error("--http-listen " + http->host + ":" +
                                 std::to_string(http->port) + ": " + e->getDescription().cStr());
      }
      gp->http_port_ = static_cast<uint16_t>(http_listener->getPort());
      auto limits = gp->cfg_.limits;
      limits.send_buffer = 0;
      accepting = accepting.exclusiveJoin(serve_http(*state, *http, kj::mv(http_listener), limits));
    }
    return accepting.attach(kj::mv(listener), kj::mv(state));
  };
  auto port = g->server_->start("gateway", g->cfg_.host, g->cfg_.port, std::move(serve), g->cfg_.log);
  if (!port) return std::move(port.error());
  g->port_ = *port;
  return g;
}

std::string gateway::address() const {
  return cfg_.host + ":" + std::to_string(port_);
}

std::string gateway::http_address() const {
  return cfg_.http ? cfg_.http->host + ":" + std::to_string(http_port_) : std::string();
}

void gateway::stop() {
  if (server_) server_->stop();
}

gateway::~gateway() {
  stop();
}

}  // namespace keel
