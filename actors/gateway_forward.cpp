// GCC 12 reports kj::ExceptionOr<caf::expected<T>> as maybe uninitialised where it inlines a
// cross-thread fulfilment (a false positive about kj::Maybe's storage).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// Forwarding: the requests for a session this node does not hold go to its owner's Gateway.

#include <string>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include "actors/detail/gateway_impl.hpp"
#include "wire/bridge.hpp"
#include "wire/convert.hpp"
#include "wire/keel.capnp.h"

namespace keel {

std::string gateway::impl::upstream_name(const std::string& address, const api_key* key) {
  return key ? address + " as " + key->tenant : address;
}

kj::Promise<wire::Gateway::Client> gateway::impl::upstream_to(const std::string& address,
                                                              const std::string& node,
                                                              const api_key* key) {
  auto name = upstream_name(address, key);
  if (auto i = upstreams.find(name); i != upstreams.end()) return i->second->gateway;
  return wire::connect_to(network, timer, tls.get(), address, node, cfg.call_timeout)
      .then([this, name, key](kj::AuthenticatedStream s) {
        auto u = kj::heap<upstream>(kj::mv(s.stream));
        kj::Promise<wire::Gateway::Client> gw = u->gateway;
        if (key) {
          auto req = u->gateway.loginRequest();
          req.setKey(key->key);
          gw = req.send().then([](capnp::Response<wire::Gateway::LoginResults> r) {
            if (auto err = wire::from_wire(r.getError()))
              kj::throwFatalException(KJ_EXCEPTION(FAILED, "login", describe(err).c_str()));
            return r.getGateway();
          });
        }
        return gw.then([this, name, u = kj::mv(u)](wire::Gateway::Client g) mutable {
          u->gateway = g;
          tasks.add(u->rpc.onDisconnect().then([this, name] {
            // Later: the disconnect callback runs inside the connection being dropped.
            tasks.add(kj::evalLater([this, name] { upstreams.erase(name); }));
          }));
          upstreams[name] = kj::mv(u);
          return g;
        });
      });
}

kj::Promise<caf::expected<wire::Session::Client>> gateway::impl::forward(const std::string& id,
                                                                         const api_key* key) {
  auto& n = nd;
  return blocking.run<owner_endpoint>([&n, id] { return n.owner_address(id); })
      .then([this, id, key](caf::expected<owner_endpoint> owner)
                -> kj::Promise<caf::expected<wire::Session::Client>> {
        if (!owner) return caf::expected<wire::Session::Client>(std::move(owner.error()));
        if (owner->client_address.empty())  // taken over by this node meanwhile
          return caf::expected<wire::Session::Client>(make_error(errc::disconnected, "session " + id + " moved here; retry"));
        auto where = owner->client_address;
        auto name = upstream_name(where, key);
        return upstream_to(where, owner->node, key)
            .then([id](wire::Gateway::Client gw) {
              auto req = gw.getSessionRequest();
              req.setId(id);
              return req.send();
            })
            .then(
                [id](capnp::Response<wire::Gateway::GetSessionResults> r)
                    -> caf::expected<wire::Session::Client> {
                  if (auto err = wire::from_wire(r.getError())) return err;
                  return r.getSession();
                },
                [this, where, name,
                 id](kj::Exception&& e) -> caf::expected<wire::Session::Client> {
                  upstreams.erase(name);
                  return make_error(errc::disconnected,
                                    "session " + id + ": its owner at " + where +
                                        " did not answer: " + e.getDescription().cStr());
                });
      });
}

kj::Promise<caf::expected<gateway::impl::placed>> gateway::impl::open_on(
    const placement_candidate& peer, const sampling_params& params, int32_t priority,
    const api_key* key) {
  auto where = peer.client_address;
  auto name = upstream_name(where, key);
  return upstream_to(where, peer.name, key)
      .then([params, priority](wire::Gateway::Client gw) {
        auto req = gw.openSessionRequest();
        wire::to_wire(params, req.initParams());
        req.setPriority(priority);
        req.setHere(true);
        return req.send();
      })
      .then(
          [](capnp::Response<wire::Gateway::OpenSessionResults> r) -> caf::expected<placed> {
            if (auto err = wire::from_wire(r.getError())) return err;
            return placed{r.getId().cStr(), r.getSession()};
          },
          [this, where, name](kj::Exception&& e) -> caf::expected<placed> {
            upstreams.erase(name);
            return make_error(errc::disconnected,
                              "the node at " + where + " did not answer: " +
                                  e.getDescription().cStr());
          });
}

}  // namespace keel
