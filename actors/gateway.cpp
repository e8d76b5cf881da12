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
#include <variant>

#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <capnp/rpc.h>
#include <kj/async-io.h>
#include <kj/timer.h>
#include <caf/event_based_actor.hpp>
#include <caf/send.hpp>

#include "actors/atoms.hpp"
#include "wire/bridge.hpp"
#include "wire/convert.hpp"
#include "wire/keel.capnp.h"
#include "wire/key_gate.hpp"

namespace keel {

namespace {

/// One event of a turn's stream, from the relay actor (CAF) to the pump (KJ).
struct stream_event {
  bool done = false;
  uint64_t turn = 0;
  int64_t index = 0;
  int32_t token = 0;
  std::string piece;
  finish_reason reason = finish_reason::length;
  std::string detail;
  int64_t retry_after_ms = 0;
  bool moved = false;  // the session moved to another node: the client reconnects and resumes
};

using event_channel = wire::stream_channel<stream_event>;

/// The CAF end of a stream: the sink a session sends one turn's events to (see session.hpp).
/// It quits after `done`, when the KJ side cancels the channel or cuts the stream off (exit).
caf::behavior relay(caf::event_based_actor* self, std::shared_ptr<event_channel> ch) {
  return {
      [self, ch](token_atom, const std::string&, uint64_t turn, int64_t index, int32_t token,
                 const std::string& piece) {
        stream_event e;
        e.turn = turn;
        e.index = index;
        e.token = token;
        e.piece = piece;
        if (!ch->push(std::move(e))) self->quit();
      },
      [self, ch](done_atom, const std::string&, uint64_t turn, finish_reason why,
                 const std::string& detail, int64_t retry_after_ms) {
        stream_event e;
        e.done = true;
        e.turn = turn;
        e.reason = why;
        e.detail = detail;
        e.retry_after_ms = retry_after_ms;
        ch->push(std::move(e));
        ch->close();
        self->quit();
      },
      [self, ch](moved_atom, const std::string&, uint64_t turn, const std::string& detail) {
        stream_event e;
        e.done = true;
        e.moved = true;
        e.turn = turn;
        e.reason = finish_reason::failed;
        e.detail = detail;
        ch->push(std::move(e));
        ch->close();
        self->quit();
      },
  };
}

/// Retry-after hint for `overloaded` errors that carry none of their own.
constexpr uint32_t default_retry_after_ms = 100;

void set_error(const caf::error& err, wire::Error::Builder out) {
  // A request to an actor that timed out means the node is too busy to answer in time.
  if (err.category() == caf::atom("system") &&
      err.code() == static_cast<uint8_t>(caf::sec::request_timeout)) {
    wire::to_wire(make_error(errc::overloaded, "the node did not answer in time"), out,
                  default_retry_after_ms);
    return;
  }
  wire::to_wire(err, out, default_retry_after_ms);
}

template <class T>
void list_of(const std::vector<T>& xs, typename capnp::List<T>::Builder out) {
  for (size_t i = 0; i < xs.size(); ++i) out.set(static_cast<unsigned>(i), xs[i]);
}

void fill_info(const session_record& r, wire::SessionInfo::Builder out) {
  uint64_t tokens = 0;
  for (auto& t : r.turns) tokens += t.user.size() + t.generated.size();
  out.setId(r.id);
  out.setTurns(static_cast<uint32_t>(r.turns.size()));
  out.setTokens(tokens);
  out.setPriority(r.priority);
  out.setRunning(!r.turns.empty() && !r.turns.back().done);
  out.setOwner(r.owner);
}

/// What `send` learns from the session: the new turn and its tokens.
struct sent_turn {
  uint64_t turn = 0;
  std::vector<int32_t> prompt;
};

}  // namespace

/// The gateway's state on its KJ thread. Everything here is used on that thread only, except
/// what is handed to CAF (channels, actor handles, copies of values).
struct gateway::impl : kj::TaskSet::ErrorHandler {
  /// One turn's stream to one client's TokenSink.
  struct stream {
    uint64_t id = 0;
    std::string session;
    std::optional<uint64_t> turn;  // known once the session accepted send or resume
    std::shared_ptr<event_channel> ch;
    caf::actor relay;
    wire::TokenSink::Client sink;
    const api_key* key = nullptr;  // the tenant charged for its tokens (null: the open port)
    int64_t next_index = 0;  // the first index the client has not been sent
    bool quiet = false;      // cut without telling the client (its call failed instead)
    kj::Own<kj::PromiseFulfiller<void>> cut;

    explicit stream(wire::TokenSink::Client s) : sink(kj::mv(s)) {}
  };

  /// A connection to another node's Gateway, for forwarding (one per address, reused).
  struct upstream {
    kj::Own<kj::AsyncIoStream> io;
    capnp::TwoPartyClient rpc;
    wire::Gateway::Client gateway;

    explicit upstream(kj::Own<kj::AsyncIoStream>&& s)
        : io(kj::mv(s)), rpc(*io), gateway(rpc.bootstrap().castAs<wire::Gateway>()) {}
  };

  impl(caf::actor_system& s, node& n, const gateway_config& c, kj::Timer& t, kj::Network& net)
      : sys(s), nd(n), cfg(c), timer(t), network(net), blocking(64) {
    auto ctx_len = static_cast<size_t>(nd.context()->llm->config().ctx_len);
    buffer = cfg.stream_buffer > 0 ? cfg.stream_buffer : ctx_len + 2;
    reader_options.traversalLimitInWords = cfg.traversal_limit_words;
    reader_options.nestingLimit = cfg.nesting_limit;
  }

  ~impl() { shutdown(); }

  // -- forwarding ---------------------------------------------------------------------------

  /// The key of `upstreams`: one connection per node and tenant.
  static std::string upstream_name(const std::string& address, const api_key* key) {
    return key ? address + " as " + key->tenant : address;
  }

  /// The Gateway of node `node` at `address` (another keel-node's client endpoint; under TLS
  /// its certificate must name the node): `key`'s tenant's, logged in with the key (the nodes of
  /// a cluster share their keys file), so that the owner checks the tenant too; its bootstrap
  /// for the open port (`key` null).
  kj::Promise<wire::Gateway::Client> upstream_to(const std::string& address,
                                                 const std::string& node, const api_key* key) {
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

  /// Session `id`, which this node does not hold, from the node that owns it: its `Session`
  /// capability, passed on (Cap'n Proto proxies every call and stream through this node),
  /// asked for as `key`'s tenant.
  kj::Promise<caf::expected<wire::Session::Client>> forward(const std::string& id,
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

  void log(const std::string& line) {
    if (cfg.log) cfg.log(line);
  }

  // -- tenants ------------------------------------------------------------------------------

  /// Counts a request of `key`'s tenant (nothing on the open port): the refusal when it is
  /// over its requests per minute.
  caf::error admit(const api_key* key) { return key ? usage.request(*key) : caf::error{}; }

  /// Answers `err` (a tenant's limit) with its retry-after.
  kj::Promise<void> refuse(const caf::error& err, wire::Error::Builder out) {
    wire::to_wire(err, out, usage.retry_after_ms());
    return kj::READY_NOW;
  }

  void taskFailed(kj::Exception&& e) override {
    log("gateway: " + std::string(e.getDescription().cStr()));
  }

  // -- connections --------------------------------------------------------------------------

  kj::Promise<void> accept_loop(kj::ConnectionReceiver& listener, capnp::Capability::Client main) {
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

  // -- streams ------------------------------------------------------------------------------

  /// Makes a stream into `sink` and starts pumping it; the session is told of its relay by the
  /// caller. The stream lives until its turn is done, it is cut off, or the gateway stops.
  stream& open_stream(const std::string& session, wire::TokenSink::Client sink,
                      const api_key* key) {
    auto s = kj::heap<stream>(kj::mv(sink));
    s->key = key;
    s->id = ++next_stream;
    s->session = session;
    s->ch = std::make_shared<event_channel>(buffer);
    s->relay = sys.spawn(relay, s->ch);
    auto cut = kj::newPromiseAndFulfiller<void>();
    s->cut = kj::mv(cut.fulfiller);
    auto& ref = *s;
    auto id = s->id;
    streams.emplace(id, kj::mv(s));
    tasks.add(pump(ref)
                  .exclusiveJoin(kj::mv(cut.promise))
                  .then([this, id] { finish(id, nullptr); },
                        [this, id](kj::Exception&& e) { finish(id, &e); }));
    return ref;
  }

  /// The session accepted the stream for `turn`: an older stream of the same turn no longer
  /// receives anything (the session sends to one sink per turn), so it is cut off.
  void bind(uint64_t id, uint64_t turn) {
    auto i = streams.find(id);
    if (i == streams.end()) return;
    i->second->turn = turn;
    auto key = std::make_pair(i->second->session, turn);
    auto old = by_turn.find(key);
    if (old != by_turn.end() && old->second != id) {
      cut(old->second, kj::Exception(kj::Exception::Type::DISCONNECTED, __FILE__, __LINE__,
                                     kj::str("the turn is now streamed to another sink "
                                             "(resume)")));
    }
    by_turn[key] = id;
  }

  void cut(uint64_t id, kj::Exception&& why, bool quiet = false) {
    auto i = streams.find(id);
    if (i == streams.end()) return;
    i->second->quiet = quiet;
    i->second->cut->reject(kj::mv(why));
  }

  kj::Promise<void> pump(stream& s) {
    return s.ch->ready().then([this, &s]() -> kj::Promise<void> {
      auto b = s.ch->drain();
      if (b.overflowed) {
        return kj::Exception(
            kj::Exception::Type::OVERLOADED, __FILE__, __LINE__,
            kj::str("the client fell more than ", s.ch->capacity(), " tokens behind"));
      }
      kj::Promise<void> p = kj::READY_NOW;
      for (auto& e : b.events) {
        p = p.then([this, &s, e = std::move(e)]() mutable {
          return e.done ? send_done(s, e) : send_token(s, e);
        });
      }
      if (b.closed) return p;
      return p.then([this, &s] { return pump(s); });
    });
  }

  kj::Promise<void> send_token(stream& s, const stream_event& e) {
    auto req = s.sink.tokenRequest();
    auto ev = req.initEvent();
    ev.setTurn(e.turn);
    ev.setIndex(static_cast<uint64_t>(e.index));
    ev.setId(e.token);
    ev.setPiece(kj::arrayPtr(reinterpret_cast<const capnp::byte*>(e.piece.data()), e.piece.size()));
    s.next_index = e.index + 1;
    if (s.key) usage.charge(*s.key, 1);
    // A `-> stream` call resolves when the flow-control window has room: a client that does
    // not drain its stream holds this promise, and the deadline cuts it off.
    return within_stall_timeout(req.send(), "did not drain its stream");
  }

  kj::Promise<void> send_done(stream& s, const stream_event& e) {
    auto req = s.sink.doneRequest();
    req.setTurn(e.turn);
    req.setReason(wire::to_wire(e.reason));
    auto err = req.initError();
    if (e.moved) {
      wire::to_wire(make_error(errc::disconnected, e.detail), err);
      return within_stall_timeout(req.send().ignoreResult(), "did not take the end of its turn");
    }
    switch (e.reason) {
      case finish_reason::overloaded:
        wire::to_wire(make_error(errc::overloaded, e.detail), err,
                      static_cast<uint32_t>(std::max<int64_t>(e.retry_after_ms, 0)));
        break;
      case finish_reason::failed:
        wire::to_wire(make_error(errc::failed, e.detail.empty() ? "the turn failed" : e.detail),
                      err);
        break;
      default:
        err.setKind(wire::Error::Kind::NONE);
    }
    return within_stall_timeout(req.send().ignoreResult(), "did not take the end of its turn");
  }

  kj::Duration stall() const { return cfg.stall_timeout.count() * kj::MILLISECONDS; }

  /// `p`, or an OVERLOADED exception ("the client <what> for N ms") after the stall timeout.
  kj::Promise<void> within_stall_timeout(kj::Promise<void> p, const char* what) {
    auto ms = cfg.stall_timeout.count();
    return p.exclusiveJoin(timer.afterDelay(stall()).then([what, ms]() -> kj::Promise<void> {
      return kj::Exception(kj::Exception::Type::OVERLOADED, __FILE__, __LINE__,
                           kj::str("the client ", what, " for ", ms, " ms"));
    }));
  }

  /// The end of a stream: delivered (`err` null), cut off, or its client is gone. The turn is
  /// never cancelled here: it keeps generating and keeps its tokens for `resume`.
  void finish(uint64_t id, kj::Exception* err) {
    auto i = streams.find(id);
    if (i == streams.end()) return;
    auto s = kj::mv(i->second);
    streams.erase(i);
    if (s->turn) {
      auto key = std::make_pair(s->session, *s->turn);
      if (auto b = by_turn.find(key); b != by_turn.end() && b->second == id) by_turn.erase(b);
    }
    s->ch->cancel();
    caf::anon_send_exit(s->relay, caf::exit_reason::user_shutdown);
    if (err == nullptr || s->quiet) return;
    auto what = std::string(err->getDescription().cStr());
    auto turn = s->turn ? std::to_string(*s->turn) : std::string("?");
    if (err->getType() == kj::Exception::Type::DISCONNECTED && what.find("resume") == what.npos) {
      log("gateway: session " + s->session + " turn " + turn + ": client gone at index " +
          std::to_string(s->next_index) + " (the turn goes on): " + what);
      return;
    }
    auto msg = "session " + s->session + " turn " + turn + ": stream cut off at index " +
               std::to_string(s->next_index) + " (" + what +
               "); the turn goes on: resume from the first index not received";
    log("gateway: " + msg);
    if (!s->turn) return;
    // Best effort: a client that only reads slowly learns why its stream ended. One that stopped
    // reading gets it when it reads again, or never (the call is dropped after the timeout).
    auto req = s->sink.doneRequest();
    req.setTurn(*s->turn);
    req.setReason(wire::FinishReason::FAILED);
    wire::to_wire(make_error(errc::disconnected, msg), req.initError());
    tasks.add(
        timer.timeoutAfter(stall(), req.send().ignoreResult()).catch_([](kj::Exception&&) {}));
  }

  /// Cuts every stream off (their turns go on). KJ thread.
  void shutdown() {
    for (auto& [id, s] : streams) {
      s->ch->cancel();
      caf::anon_send_exit(s->relay, caf::exit_reason::user_shutdown);
    }
  }

  // -- the node -----------------------------------------------------------------------------

  /// The current actor of session `id`: `not_found` for an unknown id, `overloaded` while the
  /// session is being restarted.
  kj::Promise<caf::expected<caf::actor>> find_session(const std::string& id) {
    auto root = nd.root();
    auto timeout = cfg.call_timeout;
    return wire::in_caf<caf::expected<caf::actor>>(
               sys,
               [root, id, timeout](caf::event_based_actor* self,
                                   wire::kj_reply<caf::expected<caf::actor>> reply) {
                 self->request(root, timeout, get_atom::value, std::string("sessions"))
                     .then(
                         [self, id, timeout, reply](caf::actor sup) {
                           if (!sup) {
                             reply(
                                 make_error(errc::disconnected, "the session supervisor is down"));
                             return;
                           }
                           self->request(sup, timeout, get_atom::value, id)
                               .then([reply](caf::actor s) { reply(std::move(s)); },
                                     [reply](caf::error& e) { reply(std::move(e)); });
                         },
                         [reply](caf::error& e) { reply(std::move(e)); });
               })
        .then([this, id](caf::expected<caf::actor> a) -> caf::expected<caf::actor> {
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

  kj::Promise<caf::expected<session_record>> get_record(const caf::actor& session) {
    return wire::ask<session_record>(sys, session, cfg.call_timeout, get_atom::value);
  }

  caf::actor_system& sys;
  node& nd;
  const gateway_config& cfg;
  kj::Timer& timer;
  kj::Network& network;
  // Before every connection that may use it: destroyed after them.
  kj::Own<kj::TlsContext> tls = cfg.tls ? cfg.tls->context(false) : kj::Own<kj::TlsContext>();
  std::map<std::string, kj::Own<upstream>> upstreams;  // by address (and tenant)
  tenant_usage usage;                                  // each tenant's limits on this node
  wire::refusal_pacer refusals{timer};                 // wrong API keys
  wire::blocking_worker blocking;  // node::open_session blocks (scoped_actor)
  capnp::ReaderOptions reader_options;
  size_t buffer = 0;
  uint64_t next_stream = 0;
  std::map<uint64_t, kj::Own<stream>> streams;
  std::map<std::pair<std::string, uint64_t>, uint64_t> by_turn;
  kj::TaskSet tasks{*this};  // last: destroyed first, it references the rest
};

namespace {

using gw = gateway::impl;

/// One session, as seen by one client of its tenant (`key`, null on the open port: given only
/// after the tenant was checked). Holds the id only; every call finds the session's current
/// actor, so a capability survives the actor's restarts.
class session_server final : public wire::Session::Server {
 public:
  session_server(gw& g, std::string id, const api_key* key)
      : g_(g), id_(std::move(id)), key_(key) {}

  kj::Promise<void> info(InfoContext ctx) override {
    ctx.allowCancellation();
    return record().then([ctx](caf::expected<session_record> r) mutable {
      if (r)
        fill_info(*r, ctx.getResults().initInfo());
      else
        kj::throwFatalException(KJ_EXCEPTION(FAILED, wire_text(r.error())));
    });
  }

  // `send` and `resume` answer as soon as the session has accepted the stream, so they do not
  // allow cancellation: their continuation must always run to bind or drop the stream.
  kj::Promise<void> send(SendContext ctx) override {
    if (auto err = g_.admit(key_)) return g_.refuse(err, ctx.getResults().initError());
    if (key_)
      if (auto err = g_.usage.may_generate(*key_))
        return g_.refuse(err, ctx.getResults().initError());
    auto p = ctx.getParams();
    auto text = p.getText();
    if (text.size() > g_.cfg.max_text_bytes) {
      set_error(make_error(errc::bad_request, "text has " + std::to_string(text.size()) +
                                                  " bytes, the limit is " +
                                                  std::to_string(g_.cfg.max_text_bytes)),
                ctx.getResults().initError());
      return kj::READY_NOW;
    }
    if (p.getMaxTokens() > static_cast<uint32_t>(INT32_MAX)) {
      set_error(make_error(errc::bad_request, "maxTokens must be at most 2147483647, got " +
                                                  std::to_string(p.getMaxTokens())),
                ctx.getResults().initError());
      return kj::READY_NOW;
    }
    if (!p.hasSink()) {
      set_error(make_error(errc::bad_request, "send needs a sink"), ctx.getResults().initError());
      return kj::READY_NOW;
    }
    std::string txt(text.cStr(), text.size());
    auto max_tokens = static_cast<int32_t>(p.getMaxTokens());
    auto& s = g_.open_stream(id_, p.getSink(), key_);
    auto sid = s.id;
    auto relay_actor = s.relay;
    auto& sys = g_.sys;
    auto timeout = g_.cfg.call_timeout;
    auto tok = g_.nd.context()->tok;
    auto ctx_len = static_cast<size_t>(g_.nd.context()->llm->config().ctx_len);
    auto id = id_;
    return g_.find_session(id_)
        .then([&sys, timeout, tok, ctx_len, id, txt, max_tokens,
               relay_actor](caf::expected<caf::actor> a) -> kj::Promise<caf::expected<sent_turn>> {
          if (!a) return caf::expected<sent_turn>(std::move(a.error()));
          auto sess = *a;
          return wire::in_caf<caf::expected<sent_turn>>(
              sys,
              [=](caf::event_based_actor* self, wire::kj_reply<caf::expected<sent_turn>> reply) {
                // Check the length here: the batcher would refuse the turn only after `send`
                // answered, and the client could not tell its request was at fault.
                self->request(sess, timeout, get_atom::value)
                    .then(
                        [=](session_record& rec) {
                          size_t have = 0;
                          for (auto& t : rec.turns) have += t.user.size() + t.generated.size();
                          auto prompt =
                              tok->encode(txt, rec.turns.empty() && tok->vocabulary().add_bos);
                          if (have + prompt.size() >= ctx_len) {
                            reply(make_error(errc::bad_request,
                                             "the prompt has " + std::to_string(prompt.size()) +
                                                 " tokens and the conversation " +
                                                 std::to_string(have) + "; the context length is " +
                                                 std::to_string(ctx_len)));
                            return;
                          }
                          self->request(sess, timeout, send_atom::value, txt, max_tokens,
                                        relay_actor)
                              .then(
                                  [=](uint64_t turn) {
                                    // The prompt as the session recorded it.
                                    self->request(sess, timeout, get_atom::value)
                                        .then(
                                            [=](session_record& r2) {
                                              sent_turn out;
                                              out.turn = turn;
                                              if (turn < r2.turns.size())
                                                out.prompt = r2.turns[turn].user;
                                              reply(std::move(out));
                                            },
                                            [=](caf::error& e) { reply(std::move(e)); });
                                  },
                                  [=](caf::error& e) { reply(std::move(e)); });
                        },
                        [=](caf::error& e) { reply(std::move(e)); });
              });
        })
        .then([this, ctx, sid](caf::expected<sent_turn> r) mutable {
          auto res = ctx.getResults();
          if (!r) {
            g_.cut(sid, KJ_EXCEPTION(FAILED, "send failed"), true);
            set_error(r.error(), res.initError());
            return;
          }
          g_.bind(sid, r->turn);
          if (key_) g_.usage.charge(*key_, r->prompt.size());
          res.setTurn(r->turn);
          list_of<int32_t>(r->prompt, res.initPrompt(static_cast<unsigned>(r->prompt.size())));
          res.initError().setKind(wire::Error::Kind::NONE);
        });
  }

  kj::Promise<void> cancel(CancelContext ctx) override {
    ctx.allowCancellation();
    if (auto err = g_.admit(key_)) return g_.refuse(err, ctx.getResults().initError());
    auto turn = ctx.getParams().getTurn();
    return g_.find_session(id_).then(
        [this, ctx, turn](caf::expected<caf::actor> a) mutable -> kj::Promise<void> {
          if (!a) {
            set_error(a.error(), ctx.getResults().initError());
            return kj::READY_NOW;
          }
          auto sess = *a;
          return g_.get_record(sess).then(
              [this, ctx, turn, sess](caf::expected<session_record> r) mutable {
                auto err = ctx.getResults().initError();
                if (!r) return set_error(r.error(), err);
                if (turn >= r->turns.size()) {
                  return set_error(make_error(errc::not_found, "session " + id_ + " has no turn " +
                                                                   std::to_string(turn)),
                                   err);
                }
                // Cancelling a finished turn is no error: the client may race the end of its turn.
                if (!r->turns[turn].done) caf::anon_send(sess, cancel_atom::value);
                err.setKind(wire::Error::Kind::NONE);
              });
        });
  }

  kj::Promise<void> history(HistoryContext ctx) override {
    ctx.allowCancellation();
    if (auto err = g_.admit(key_)) return g_.refuse(err, ctx.getResults().initError());
    return record().then([ctx](caf::expected<session_record> r) mutable {
      auto res = ctx.getResults();
      if (!r) return set_error(r.error(), res.initError());
      auto turns = res.initTurns(static_cast<unsigned>(r->turns.size()));
      for (size_t i = 0; i < r->turns.size(); ++i) {
        auto& t = r->turns[i];
        auto out = turns[static_cast<unsigned>(i)];
        out.setTurn(t.turn);
        list_of<int32_t>(t.user, out.initPrompt(static_cast<unsigned>(t.user.size())));
        list_of<int32_t>(t.generated, out.initGenerated(static_cast<unsigned>(t.generated.size())));
        out.setDone(t.done);
        out.setReason(wire::to_wire(t.reason));
      }
      res.initError().setKind(wire::Error::Kind::NONE);
    });
  }

  kj::Promise<void> resume(ResumeContext ctx) override {
    if (auto err = g_.admit(key_)) return g_.refuse(err, ctx.getResults().initError());
    auto p = ctx.getParams();
    if (!p.hasSink()) {
      set_error(make_error(errc::bad_request, "resume needs a sink"), ctx.getResults().initError());
      return kj::READY_NOW;
    }
    auto turn = p.getTurn();
    auto from = static_cast<int64_t>(std::min<uint64_t>(p.getFromIndex(), INT64_MAX));
    std::vector<int32_t> held;
    for (auto t : p.getHeld()) held.push_back(t);
    auto& s = g_.open_stream(id_, p.getSink(), key_);
    s.next_index = from;
    auto sid = s.id;
    auto relay_actor = s.relay;
    return g_.find_session(id_)
        .then([this, turn, from, relay_actor,
               held](caf::expected<caf::actor> a) -> kj::Promise<caf::expected<bool>> {
          if (!a) return caf::expected<bool>(std::move(a.error()));
          return wire::ask<bool>(g_.sys, *a, g_.cfg.call_timeout, resume_atom::value, turn, from,
                                 relay_actor, held);
        })
        .then([this, ctx, sid, turn](caf::expected<bool> r) mutable {
          auto err = ctx.getResults().initError();
          if (!r) {
            g_.cut(sid, KJ_EXCEPTION(FAILED, "resume failed"), true);
            return set_error(r.error(), err);
          }
          g_.bind(sid, turn);
          err.setKind(wire::Error::Kind::NONE);
        });
  }

 private:
  static kj::String wire_text(const caf::error& e) { return kj::str(describe(e).c_str()); }

  kj::Promise<caf::expected<session_record>> record() {
    return g_.find_session(id_).then(
        [this](caf::expected<caf::actor> a) -> kj::Promise<caf::expected<session_record>> {
          if (!a) return caf::expected<session_record>(std::move(a.error()));
          return g_.get_record(*a);
        });
  }

  gw& g_;
  std::string id_;
  const api_key* key_;
};

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
          return nd.open_session(params, priority, key ? key->tenant : std::string());
        })
        .then([this, ctx](caf::expected<std::string> id) mutable {
          auto res = ctx.getResults();
          if (!id) return set_error(id.error(), res.initError());
          res.setId(*id);
          res.setSession(kj::heap<session_server>(g_, *id, key_));
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
        [this, ctx, id](caf::expected<caf::actor> a) mutable -> kj::Promise<void> {
          auto res = ctx.getResults();
          if (a) {
            res.setSession(kj::heap<session_server>(g_, id, key_));
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
    for (size_t i = 0; i < all.size(); ++i) fill_info(all[i], out[static_cast<unsigned>(i)]);
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

void gateway::stop() {
  if (server_) server_->stop();
}

gateway::~gateway() {
  stop();
}

}  // namespace keel
