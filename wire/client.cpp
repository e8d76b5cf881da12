#include "wire/client.hpp"

#include <sys/stat.h>

#include <kj/async-io.h>
#include <kj/async.h>
#include <kj/exception.h>
#include <kj/time.h>

#include <cstdlib>
#include <exception>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <thread>

#include "wire/convert.hpp"
#include "wire/keel.capnp.h"
#include "wire/rpc_client.hpp"

namespace keel::wire {

namespace {

void list_into(const std::vector<int32_t>& xs, capnp::List<int32_t>::Builder out) {
  for (unsigned i = 0; i < xs.size(); ++i) out.set(i, xs[i]);
}

template <class T>
std::vector<T> to_vector(typename capnp::List<T>::Reader xs) {
  std::vector<T> out;
  out.reserve(xs.size());
  for (auto x : xs) out.push_back(x);
  return out;
}

/// What one TokenSink has received. Shared by the sink (owned by the RPC system, which may keep
/// it after generate() returns) and the generate() call; `close()` cuts the callbacks off.
struct stream_state {
  const token_handler* on_token = nullptr;  // null once closed
  bool accepted = false;
  uint64_t turn = 0;
  // The next index expected per turn: an index below it was already delivered (a resumed stream
  // may repeat it) and is dropped; one above it is a gap.
  std::map<uint64_t, uint64_t> next_index;
  struct held {
    uint64_t turn, index;
    int32_t id;
    std::string piece;
  };
  std::vector<held> before_accept;  // tokens that overtook the reply to send()
  std::vector<int32_t> generated;
  caf::error error;
  bool done = false;
  uint64_t done_turn = 0;
  finish_reason reason = finish_reason::length;
  caf::error done_error;
  std::chrono::steady_clock::time_point last_event = std::chrono::steady_clock::now();
  kj::Own<kj::PromiseFulfiller<void>> finished;  // fulfilled on done() or a protocol error

  void finish() {
    if (finished.get() != nullptr && finished->isWaiting()) finished->fulfill();
  }

  void fail(caf::error err) {
    if (!error) error = std::move(err);
    finish();
  }

  void deliver(uint64_t t, uint64_t index, int32_t id, std::string_view piece) {
    if (t != turn) {
      fail(make_error(errc::failed, "token for turn " + std::to_string(t) +
                                        " arrived on the stream of turn " + std::to_string(turn)));
      return;
    }
    generated.push_back(id);
    if (on_token != nullptr && *on_token) (*on_token)(t, index, id, piece);
  }

  /// Accepts one event; false when the stream is broken.
  void token(uint64_t t, uint64_t index, int32_t id, std::string_view piece) {
    last_event = std::chrono::steady_clock::now();
    if (error || on_token == nullptr) return;
    auto& next = next_index[t];
    if (index < next) return;  // already held
    if (index > next) {
      fail(make_error(errc::failed, "turn " + std::to_string(t) + ": token index " +
                                        std::to_string(index) + " arrived, expected " +
                                        std::to_string(next)));
      return;
    }
    ++next;
    if (!accepted)
      before_accept.push_back({t, index, id, std::string(piece)});
    else
      deliver(t, index, id, piece);
  }

  void accept(uint64_t t) {
    accepted = true;
    turn = t;
    auto held_tokens = std::move(before_accept);
    for (auto& h : held_tokens) {
      if (error) break;
      deliver(h.turn, h.index, h.id, h.piece);
    }
    if (done && !error && done_turn != turn)
      fail(make_error(errc::failed, "done for turn " + std::to_string(done_turn) +
                                        " arrived on the stream of turn " + std::to_string(turn)));
  }

  void close() {
    on_token = nullptr;
    finished = nullptr;
  }
};

class sink_impl final : public TokenSink::Server {
 public:
  explicit sink_impl(std::shared_ptr<stream_state> st) : st_(std::move(st)) {}

  kj::Promise<void> token(TokenContext ctx) override {
    if (st_->on_token == nullptr)
      return KJ_EXCEPTION(DISCONNECTED, "keel client: nobody reads this stream any more");
    auto e = ctx.getParams().getEvent();
    auto piece = e.getPiece();
    st_->token(e.getTurn(), e.getIndex(), e.getId(),
               std::string_view(reinterpret_cast<const char*>(piece.begin()), piece.size()));
    return kj::READY_NOW;
  }

  kj::Promise<void> done(DoneContext ctx) override {
    auto p = ctx.getParams();
    st_->last_event = std::chrono::steady_clock::now();
    if (!st_->done) {
      st_->done = true;
      st_->done_turn = p.getTurn();
      st_->reason = from_wire(p.getReason());
      st_->done_error = from_wire(p.getError());
    }
    st_->finish();
    return kj::READY_NOW;
  }

 private:
  std::shared_ptr<stream_state> st_;
};

}  // namespace

uint32_t retry_after_ms(const caf::error& err) {
  if (code_of(err) != errc::overloaded) return 0;
  auto msg = message_of(err);
  auto at = msg.rfind(retry_after_prefix);
  if (at == std::string::npos) return 0;
  return static_cast<uint32_t>(
      std::strtoul(msg.c_str() + at + retry_after_prefix.size(), nullptr, 10));
}

caf::expected<std::vector<std::string>> parse_endpoints(const std::string& list) {
  std::vector<std::string> out;
  size_t start = 0;
  while (true) {
    auto comma = list.find(',', start);
    auto item = list.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    auto colon = item.rfind(':');
    if (item.empty() || colon == std::string::npos || colon == 0 || colon + 1 == item.size() ||
        item.find_first_not_of("0123456789", colon + 1) != std::string::npos)
      return make_error(errc::bad_request,
                        "--connect " + list + ": '" + item + "' is not HOST:PORT");
    out.push_back(item);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

caf::expected<std::string> key_from(const std::string& file) {
  if (file.empty()) {
    const char* env = std::getenv("KEEL_API_KEY");
    return std::string(env ? env : "");
  }
  struct stat st {};
  if (::stat(file.c_str(), &st) != 0)
    return make_error(errc::bad_request, "--key-file " + file + ": cannot read it");
  if ((st.st_mode & (S_IRWXG | S_IRWXO)) != 0)
    return make_error(errc::bad_request, "--key-file " + file +
                                             ": readable by its group or others; a key is a "
                                             "secret: chmod 600 " +
                                             file);
  std::ifstream in(file);
  std::string key;
  std::getline(in, key);
  while (!key.empty() && (key.back() == '\r' || key.back() == ' ')) key.pop_back();
  if (key.empty()) return make_error(errc::bad_request, "--key-file " + file + ": no key in it");
  return key;
}

struct client::impl {
  std::string endpoint;
  std::vector<std::string> endpoints;  // every address given to connect(), in order
  std::string node_name;               // of the node at `endpoint`, when known
  std::string serving_node;            // of the node serving the stream being resumed
  options opts;
  std::unique_ptr<rpc_client> rpc;
  Gateway::Client gateway = nullptr;
  std::map<std::string, Session::Client> sessions;  // capabilities of sessions used before

  std::mutex mu;  // guards the two below: request_cancel() comes from any thread
  bool streaming = false;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> cancel_bell;

  kj::WaitScope& ws() { return rpc->getWaitScope(); }

  /// `p`, failing with DISCONNECTED after the call timeout.
  template <class T>
  kj::Promise<T> bounded(kj::Promise<T> p, std::chrono::milliseconds limit, const char* what) {
    if (limit.count() <= 0) return p;
    // From the real clock: the timer's `now()` stands still while the caller's thread is away
    // from the event loop (between calls), so a delay from it would end early after a pause.
    auto timeout = rpc->getIoProvider().getTimer().atTime(
        kj::systemPreciseMonotonicClock().now() + limit.count() * kj::MILLISECONDS);
    std::string msg =
        std::string(what) + ": no answer within " + std::to_string(limit.count()) + " ms";
    return p.exclusiveJoin(
        timeout.then([msg]() -> kj::Promise<T> { return KJ_EXCEPTION(DISCONNECTED, msg); }));
  }

  template <class T>
  auto call(kj::Promise<T> p, const char* what) {
    return bounded(kj::mv(p), opts.call_timeout, what).wait(ws());
  }

  caf::error edge(const kj::Exception& e) { return from_kj(e, endpoint); }

  /// The Gateway to use on a new connection whose bootstrap is `boot`, once it answered
  /// `info`: the key's, after `login`, or the bootstrap without a key. The node's refusal as
  /// an error; KJ exceptions are thrown.
  caf::expected<Gateway::Client> logged_in(Gateway::Client boot, kj::WaitScope& ws,
                                           std::chrono::milliseconds limit) {
    auto gw = kj::mv(boot);
    if (!opts.api_key.empty()) {
      auto req = gw.loginRequest();
      req.setKey(opts.api_key);
      auto resp = bounded(req.send(), limit, "login").wait(ws);
      if (auto err = from_wire(resp.getError())) return err;
      gw = resp.getGateway();
    }
    auto resp = bounded(gw.infoRequest().send(), limit, "info").wait(ws);
    if (auto err = from_wire(resp.getError())) return err;
    node_name = resp.getInfo().getName().cStr();
    return gw;
  }

  /// Never resolves; fails with DISCONNECTED once an `info()` probe does: a dead connection
  /// noticed within about `probe_interval`. With `sess`, once no event came for
  /// `session_probe_after` (`last_event`), the session is asked too: a node that forwards the
  /// session (placement, or a failover to a node that is not the owner) answers for itself, but
  /// the session's `info` goes through to its owner, so a dead or hung owner behind a live
  /// forwarding node is noticed as well, not only after `call_timeout`.
  kj::Promise<void> probe(Session::Client* sess = nullptr,
                          const std::chrono::steady_clock::time_point* last_event = nullptr) {
    return rpc->getIoProvider()
        .getTimer()
        .afterDelay(std::max<int64_t>(opts.probe_interval.count(), 1) * kj::MILLISECONDS)
        .then([this, sess, last_event] {
          auto node = bounded(gateway.infoRequest().send(), opts.connect_timeout, "probe")
                          .ignoreResult();
          auto now = std::chrono::steady_clock::now();
          if (sess == nullptr || last_event == nullptr ||
              now - *last_event < session_probe_after ||
              now - session_probed < session_probe_every)
            return node;
          session_probed = now;
          return node.then([this, sess] {
            return bounded(sess->infoRequest().send(), opts.connect_timeout, "session probe")
                .ignoreResult();
          });
        })
        .then([this, sess, last_event] { return probe(sess, last_event); });
  }

  /// How long a stream may be silent before `probe` asks its session too, and how often it
  /// does then (the owner answers with the session's record: not at every probe).
  static constexpr auto session_probe_after = std::chrono::milliseconds(1000);
  static constexpr auto session_probe_every = std::chrono::milliseconds(500);
  std::chrono::steady_clock::time_point session_probed{};

  /// Replaces the connection by one to the first endpoint that answers, trying the list in
  /// rounds with backoff until `deadline`, each round starting after the current endpoint (which
  /// comes last: it just failed, or refused to serve, e.g. from the minority side of a
  /// partition). Capabilities of the old connection are dropped.
  caf::error reconnect(std::chrono::steady_clock::time_point deadline) {
    auto backoff = std::max(opts.resume_backoff, std::chrono::milliseconds(1));
    std::string why;
    size_t current = 0;
    for (size_t k = 0; k < endpoints.size(); ++k)
      if (endpoints[k] == endpoint) current = k;
    while (true) {
      for (size_t k = 1; k <= endpoints.size(); ++k) {
        const auto& ep = endpoints[(current + k) % endpoints.size()];
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
            deadline - std::chrono::steady_clock::now());
        if (left.count() <= 0) break;
        try {
          // The new client shares this thread's event loop with the old one, so the old one
          // can go once nothing of it is left.
          auto next =
              std::make_unique<rpc_client>(ep, opts.tls, opts.tls_name, opts.connect_timeout);
          auto gw = logged_in(next->getMain<Gateway>(), next->getWaitScope(),
                              std::min(opts.connect_timeout, left));
          if (!gw) {
            why = ep + ": " + describe(gw.error());
            continue;
          }
          sessions.clear();
          gateway = kj::mv(*gw);
          std::swap(rpc, next);
          try {
            next.reset();
          } catch (...) {
            // Tearing down the broken connection changes nothing for the new one.
          }
          endpoint = ep;
          return {};
        } catch (const kj::Exception& e) {
          why = ep + ": " + e.getDescription().cStr();
        } catch (const std::exception& e) {
          why = ep + ": " + e.what();
        }
      }
      if (std::chrono::steady_clock::now() + backoff >= deadline) break;
      std::this_thread::sleep_for(backoff);
      backoff = std::min(backoff * 2, std::chrono::milliseconds(500));
    }
    return make_error(errc::disconnected, "no keel-node answered within " +
                                              std::to_string(opts.resume_for.count()) +
                                              " ms (last: " + why + ")");
  }

  /// The capability of session `id` (held in `sessions`), or the node's error.
  caf::error session(const std::string& id, Session::Client*& out) {
    if (auto it = sessions.find(id); it != sessions.end()) {
      out = &it->second;
      return {};
    }
    auto req = gateway.getSessionRequest();
    req.setId(id);
    auto resp = call(req.send(), "getSession");
    if (auto err = from_wire(resp.getError())) return err;
    out = &sessions.emplace(id, resp.getSession()).first->second;
    return {};
  }
};

namespace {

/// While alive on a thread, KJ's log lines on that thread are dropped: this library reports
/// failures as values, so KJ's "error: disconnected ..." lines on stderr would only be noise.
/// Scoped to one call (ExceptionCallbacks must be destroyed in reverse order of creation).
class quiet_kj_logs final : public kj::ExceptionCallback {
 public:
  void logMessage(kj::LogSeverity, const char*, int, int, kj::String&&) override {}
};

/// Runs `f`, turning every exception into a classified error at this edge.
template <class T, class F>
caf::expected<T> at_edge(const std::string& where, F&& f) {
  quiet_kj_logs quiet;
  try {
    return f();
  } catch (const kj::Exception& e) {
    return from_kj(e, where);
  } catch (const std::exception& e) {
    return make_error(errc::failed, where + ": " + e.what());
  }
}

}  // namespace

client::client(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

client::~client() {
  if (!impl_) return;
  quiet_kj_logs quiet;
  try {
    impl_->sessions.clear();
    impl_->gateway = nullptr;
    impl_->rpc.reset();
  } catch (...) {
    // Tearing down a broken connection must not throw out of a destructor.
  }
}

caf::expected<std::unique_ptr<client>> client::connect(const std::vector<std::string>& endpoints) {
  return connect(endpoints, options{});
}

caf::expected<std::unique_ptr<client>> client::connect(const std::vector<std::string>& endpoints,
                                                       options opts) {
  if (endpoints.empty())
    return make_error(errc::bad_request, "connect: no keel-node address given");
  std::string tried, why;
  quiet_kj_logs quiet;
  for (const auto& ep : endpoints) {
    auto p = std::make_unique<impl>();
    p->endpoint = ep;
    p->endpoints = endpoints;
    p->opts = opts;
    try {
      p->rpc = std::make_unique<rpc_client>(ep, p->opts.tls, p->opts.tls_name,
                                            p->opts.connect_timeout);
      auto gw = p->logged_in(p->rpc->getMain<Gateway>(), p->ws(), opts.connect_timeout);
      // A node that refuses the key (or serves only with one) says so: no other will differ.
      if (!gw) return make_error(code_of(gw.error()), ep + ": " + message_of(gw.error()));
      p->gateway = kj::mv(*gw);
      return std::unique_ptr<client>(new client(std::move(p)));
    } catch (const kj::Exception& e) {
      why += (why.empty() ? "" : "; ") + ep + ": " + e.getDescription().cStr();
    } catch (const std::exception& e) {
      why += (why.empty() ? "" : "; ") + ep + ": " + e.what();
    }
    try {
      p.reset();
    } catch (...) {
    }
    tried += (tried.empty() ? "" : ", ") + ep;
  }
  return make_error(errc::disconnected, "no keel-node answered at " + tried + " (" + why + ")");
}

const std::string& client::endpoint() const {
  return impl_->endpoint;
}

caf::expected<node_info> client::info() {
  return at_edge<node_info>(impl_->endpoint, [&]() -> caf::expected<node_info> {
    auto resp = impl_->call(impl_->gateway.infoRequest().send(), "info");
    if (auto err = from_wire(resp.getError())) return caf::expected<node_info>(std::move(err));
    auto i = resp.getInfo();
    node_info out;
    out.name = i.getName().cStr();
    out.region = i.getRegion().cStr();
    out.model = i.getModel().cStr();
    out.vocab_size = i.getVocabSize();
    out.context_length = i.getContextLength();
    out.shards = i.getShards();
    return out;
  });
}

caf::expected<std::string> client::open_session(const sampling_params& params, int32_t priority) {
  return at_edge<std::string>(impl_->endpoint, [&]() -> caf::expected<std::string> {
    auto req = impl_->gateway.openSessionRequest();
    auto p = req.initParams();
    p.setTemperature(params.temperature);
    p.setTopK(params.top_k);
    p.setTopP(params.top_p);
    p.setMinP(params.min_p);
    p.setRepetitionPenalty(params.repetition_penalty);
    p.setRepetitionWindow(params.repetition_window);
    p.setSeed(params.seed);
    req.setPriority(priority);
    auto resp = impl_->call(req.send(), "openSession");
    if (auto err = from_wire(resp.getError())) return err;
    std::string id = resp.getId().cStr();
    impl_->sessions.emplace(id, resp.getSession());
    return id;
  });
}

caf::expected<generation> client::generate(const std::string& session, const std::string& text,
                                           uint32_t max_tokens, const token_handler& on_token,
                                           const accept_handler& on_accept,
                                           std::optional<uint64_t> turn, bool special) {
  return run_turn(session, turn_input{&text, nullptr, special}, max_tokens, on_token, on_accept,
                  turn);
}

caf::expected<generation> client::chat(const std::string& session,
                                       const std::vector<turn_message>& messages,
                                       uint32_t max_tokens, const token_handler& on_token,
                                       const accept_handler& on_accept,
                                       std::optional<uint64_t> turn) {
  return run_turn(session, turn_input{nullptr, &messages}, max_tokens, on_token, on_accept, turn);
}

caf::expected<generation> client::run_turn(const std::string& session, turn_input input,
                                           uint32_t max_tokens, const token_handler& on_token,
                                           const accept_handler& on_accept,
                                           std::optional<uint64_t> expect_turn) {
  auto& d = *impl_;
  auto st = std::make_shared<stream_state>();
  st->on_token = &on_token;
  // Whatever happens, the handlers are cut off before this frame ends: the sink may outlive it.
  struct closer {
    impl& d;
    std::shared_ptr<stream_state> st;
    ~closer() {
      st->close();
      std::lock_guard<std::mutex> g(d.mu);
      d.streaming = false;
      d.cancel_bell = nullptr;
    }
  } close_on_exit{d, st};
  auto bell = kj::newPromiseAndCrossThreadFulfiller<void>();
  {
    std::lock_guard<std::mutex> g(d.mu);
    d.streaming = true;
    d.cancel_bell = kj::mv(bell.fulfiller);
  }
  // Each attempt (send, then every resume) takes a branch: a cancel reaches whichever node
  // serves the turn.
  auto bell_rung = bell.promise.fork();
  bool cancel_wanted = false;
  bool accepted = false;
  generation out;

  // One stream: `send` (first) or `resume` (after a failover), waited on until done. True when
  // the turn ended; an error otherwise (`disconnected` when the connection broke).
  auto attempt = [&](bool resume, const std::function<void()>& on_resumed) {
    return at_edge<bool>(d.endpoint, [&]() -> caf::expected<bool> {
      Session::Client* sess = nullptr;
      if (auto err = d.session(session, sess)) return err;
      auto finished = kj::newPromiseAndFulfiller<void>();
      st->finished = kj::mv(finished.fulfiller);
      auto all_done = finished.promise.fork();
      std::optional<uint64_t> turn;
      if (accepted) turn = out.turn;
      auto send_cancel = [sess](uint64_t t) {
        auto req = sess->cancelRequest();
        req.setTurn(t);
        return req.send().ignoreResult();
      };
      auto cancel_task = bell_rung.addBranch()
                             .then([&]() -> kj::Promise<void> {
                               cancel_wanted = true;
                               if (turn) return send_cancel(*turn);
                               return kj::READY_NOW;
                             })
                             .eagerlyEvaluate([](kj::Exception&&) {
                               // A cancel that cannot reach the node changes nothing: the
                               // stream ends anyway (done or disconnect).
                             });
      if (!resume) {
        // `send` (text) and `chat` (messages) take the same fields besides the input.
        auto start = [&](auto req, const char* what) -> caf::error {
          req.setMaxTokens(max_tokens);
          if (expect_turn) {
            req.setTurn(*expect_turn);
            req.setTurnGiven(true);
          }
          req.setSink(kj::heap<sink_impl>(st));
          auto resp = d.call(req.send(), what);
          if (auto err = from_wire(resp.getError())) return err;
          out.turn = resp.getTurn();
          out.prompt = to_vector<int32_t>(resp.getPrompt());
          return {};
        };
        caf::error refused;
        if (input.messages) {
          auto req = sess->chatRequest();
          auto list = req.initMessages(static_cast<unsigned>(input.messages->size()));
          for (size_t i = 0; i < input.messages->size(); ++i) {
            auto m = list[static_cast<unsigned>(i)];
            m.setRole((*input.messages)[i].role);
            m.setContent((*input.messages)[i].content);
          }
          refused = start(kj::mv(req), "chat");
        } else {
          auto req = sess->sendRequest();
          req.setText(*input.text);
          req.setSpecial(input.special);
          refused = start(kj::mv(req), "send");
        }
        if (refused) return refused;
        turn = out.turn;
        accepted = true;
        if (on_accept) on_accept(out.turn, out.prompt);
        st->accept(out.turn);
      } else {
        // Which node serves the session now (this node when it owns it, the owner when this
        // node forwards), for the failover report only: a failure here changes nothing. Asked
        // before `resume`, so that no resumed token comes before the failover is reported.
        try {
          auto info = d.call(sess->infoRequest().send(), "info");
          std::string owner = info.getInfo().getOwner().cStr();
          if (!owner.empty()) d.serving_node = owner;
        } catch (const kj::Exception&) {
        }
        auto req = sess->resumeRequest();
        req.setTurn(out.turn);
        req.setFromIndex(st->next_index[out.turn]);
        req.setSink(kj::heap<sink_impl>(st));
        // What this client holds: a new owner whose copy lags adopts it (keel.capnp).
        list_into(st->generated, req.initHeld(static_cast<unsigned>(st->generated.size())));
        auto resp = d.call(req.send(), "resume");
        if (auto err = from_wire(resp.getError())) return err;
        st->last_event = std::chrono::steady_clock::now();
        if (on_resumed) on_resumed();
      }
      kj::Promise<void> late_cancel = kj::READY_NOW;
      if (cancel_wanted)
        late_cancel = send_cancel(out.turn).eagerlyEvaluate([](kj::Exception&&) {});
      auto alive = d.probe(sess, &st->last_event).fork();

      // Wait for done, a broken stream, a dead connection, or a silence longer than the call
      // timeout.
      while (!st->done && !st->error) {
        auto limit = d.opts.call_timeout;
        auto next = all_done.addBranch().exclusiveJoin(alive.addBranch());
        if (limit.count() <= 0) {
          next.wait(d.ws());
          continue;
        }
        auto idle = std::chrono::steady_clock::now() - st->last_event;
        if (idle >= limit)
          return make_error(errc::disconnected, d.endpoint + ": turn " + std::to_string(out.turn) +
                                                    ": no token for " +
                                                    std::to_string(limit.count()) + " ms");
        auto left = std::chrono::duration_cast<std::chrono::milliseconds>(limit - idle).count() + 1;
        next.exclusiveJoin(d.rpc->getIoProvider().getTimer().afterDelay(left * kj::MILLISECONDS))
            .wait(d.ws());
      }
      if (st->error) return st->error;
      if (st->done_error) return st->done_error;
      return true;
    });
  };

  auto r = attempt(false, {});
  // A send with its turn number that got no answer is sent again (the node takes the same text
  // under the same number as the same turn), within `resume_for`.
  if (!r && !accepted && expect_turn && !cancel_wanted && code_of(r.error()) == errc::disconnected &&
      d.opts.resume_for.count() > 0) {
    auto until = std::chrono::steady_clock::now() + d.opts.resume_for;
    auto wait = std::max(d.opts.resume_backoff, std::chrono::milliseconds(1));
    while (!r && !accepted && code_of(r.error()) == errc::disconnected &&
           std::chrono::steady_clock::now() + wait < until) {
      std::this_thread::sleep_for(wait);
      wait = std::min(wait * 2, std::chrono::milliseconds(200));
      if (d.reconnect(until)) break;
      st->done = false;
      st->error = caf::error{};
      st->done_error = caf::error{};
      r = attempt(false, {});
    }
  }
  std::optional<std::chrono::steady_clock::time_point> broke_at;  // of the stream being resumed
  std::string broke_from;
  auto pause = std::max(d.opts.resume_backoff, std::chrono::milliseconds(1));
  // After the turn was accepted, a stream that broke goes on somewhere: a node that is
  // restarting the session (`overloaded`) or has not seen it yet (`not_found`, a takeover under
  // way) is asked again, within `resume_for`.
  auto resumable = [&](const caf::error& e) {
    auto c = code_of(e);
    if (c == errc::disconnected) return true;
    if (st->done) return false;  // the turn itself ended so (shed, failed): nothing to resume
    return c == errc::overloaded || c == errc::not_found;
  };
  while (!r && accepted && !cancel_wanted && resumable(r.error()) &&
         d.opts.resume_for.count() > 0) {
    // A resume refused at once (the session's owner is down and a replica is taking it over)
    // is tried again after a pause, within the same `resume_for` as the first failure.
    if (broke_at) {
      if (std::chrono::steady_clock::now() + pause >= *broke_at + d.opts.resume_for) break;
      std::this_thread::sleep_for(pause);
      pause = std::min(pause * 2, std::chrono::milliseconds(100));
    }
    // A stream the node ended with `disconnected` (the session moved to another node) goes on
    // from the new owner: that end was not the turn's.
    if (st->done && st->done_error && code_of(st->done_error) == errc::disconnected) {
      st->done = false;
      st->done_error = caf::error{};
    }
    if (!broke_at) {
      broke_at = std::chrono::steady_clock::now();
      broke_from = d.endpoint;
    }
    failover_event ev;
    ev.session = session;
    ev.turn = out.turn;
    ev.from = broke_from;
    if (auto err = d.reconnect(*broke_at + d.opts.resume_for))
      return make_error(errc::disconnected, "turn " + std::to_string(out.turn) + " of " + session +
                                                " broke (" + describe(r.error()) +
                                                ") and could not resume: " + describe(err));
    ev.to = d.endpoint;
    d.serving_node = d.node_name;
    ev.from_index = st->next_index[out.turn];
    r = attempt(true, [&] {
      ev.duration = std::chrono::duration_cast<std::chrono::milliseconds>(
          std::chrono::steady_clock::now() - *broke_at);
      ev.to_node = d.serving_node;
      if (d.opts.on_failover) d.opts.on_failover(ev);
      broke_at.reset();
      pause = std::max(d.opts.resume_backoff, std::chrono::milliseconds(1));
    });
  }
  if (!r) return r.error();
  out.generated = std::move(st->generated);
  out.reason = st->reason;
  return out;
}

caf::error client::cancel(const std::string& session, uint64_t turn) {
  auto r = at_edge<bool>(impl_->endpoint, [&]() -> caf::expected<bool> {
    Session::Client* sess = nullptr;
    if (auto err = impl_->session(session, sess)) return err;
    auto req = sess->cancelRequest();
    req.setTurn(turn);
    auto resp = impl_->call(req.send(), "cancel");
    if (auto err = from_wire(resp.getError())) return err;
    return true;
  });
  return r ? caf::error{} : r.error();
}

void client::request_cancel() {
  std::lock_guard<std::mutex> g(impl_->mu);
  if (impl_->streaming && impl_->cancel_bell.get() != nullptr) {
    quiet_kj_logs quiet;
    try {
      impl_->cancel_bell->fulfill();
    } catch (...) {
      // The loop that would hear the bell is gone: there is nothing left to cancel.
    }
    impl_->cancel_bell = nullptr;
  }
}

caf::expected<std::vector<turn_record>> client::history(const std::string& session) {
  return at_edge<std::vector<turn_record>>(
      impl_->endpoint, [&]() -> caf::expected<std::vector<turn_record>> {
        Session::Client* sess = nullptr;
        if (auto err = impl_->session(session, sess)) return err;
        auto resp = impl_->call(sess->historyRequest().send(), "history");
        if (auto err = from_wire(resp.getError())) return err;
        std::vector<turn_record> out;
        for (auto t : resp.getTurns()) {
          turn_record r;
          r.turn = t.getTurn();
          r.prompt = to_vector<int32_t>(t.getPrompt());
          r.generated = to_vector<int32_t>(t.getGenerated());
          r.done = t.getDone();
          r.reason = from_wire(t.getReason());
          out.push_back(std::move(r));
        }
        return out;
      });
}

namespace {

session_info info_of(SessionInfo::Reader s) {
  session_info i;
  i.id = s.getId().cStr();
  i.turns = s.getTurns();
  i.tokens = s.getTokens();
  i.priority = s.getPriority();
  i.running = s.getRunning();
  i.owner = s.getOwner().cStr();
  i.model = s.getModel().cStr();
  i.model_digest = s.getModelDigest().cStr();
  i.context_length = s.getContextLength();
  return i;
}

}  // namespace

caf::expected<std::vector<session_info>> client::sessions() {
  return at_edge<std::vector<session_info>>(
      impl_->endpoint, [&]() -> caf::expected<std::vector<session_info>> {
        auto resp = impl_->call(impl_->gateway.listSessionsRequest().send(), "listSessions");
        if (auto err = from_wire(resp.getError())) return err;
        std::vector<session_info> out;
        for (auto s : resp.getSessions()) out.push_back(info_of(s));
        return out;
      });
}

caf::expected<session_info> client::session(const std::string& session) {
  return at_edge<session_info>(impl_->endpoint, [&]() -> caf::expected<session_info> {
    Session::Client* sess = nullptr;
    if (auto err = impl_->session(session, sess)) return err;
    auto resp = impl_->call(sess->infoRequest().send(), "info");
    return info_of(resp.getInfo());
  });
}

}  // namespace keel::wire
