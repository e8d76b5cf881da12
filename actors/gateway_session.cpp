// GCC 12 reports kj::ExceptionOr<caf::expected<T>> as maybe uninitialised where it inlines a
// cross-thread fulfilment (a false positive about kj::Maybe's storage).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

// The Session server and the token streams it opens (a relay actor per stream, pumped to the
// client's TokenSink on the gateway's KJ thread).

#include <algorithm>
#include <string>
#include <vector>

#include <capnp/message.h>
#include <kj/async-io.h>
#include <kj/timer.h>
#include <caf/event_based_actor.hpp>
#include <caf/typed_event_based_actor.hpp>
#include <caf/send.hpp>

#include "actors/atoms.hpp"
#include "actors/detail/gateway_impl.hpp"
#include "wire/bridge.hpp"
#include "wire/convert.hpp"
#include "wire/keel.capnp.h"

namespace keel {

namespace {

/// The CAF end of a stream: the sink a session sends one turn's events to (see session.hpp).
/// It quits after `done`, when the KJ side cancels the channel or cuts the stream off (exit).
turn_sink_actor::behavior_type relay(turn_sink_actor::pointer self,
                                     std::shared_ptr<event_channel> ch) {
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

template <class T>
void list_of(const std::vector<T>& xs, typename capnp::List<T>::Builder out) {
  for (size_t i = 0; i < xs.size(); ++i) out.set(static_cast<unsigned>(i), xs[i]);
}

/// What `send` learns from the session: the new turn and its tokens.
struct sent_turn {
  uint64_t turn = 0;
  std::vector<int32_t> prompt;
};

}  // namespace

// -- streams ------------------------------------------------------------------------------

gateway::impl::stream& gateway::impl::open_stream(const std::string& session,
                                                  wire::TokenSink::Client sink,
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

void gateway::impl::bind(uint64_t id, uint64_t turn) {
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

void gateway::impl::cut(uint64_t id, kj::Exception&& why, bool quiet) {
  auto i = streams.find(id);
  if (i == streams.end()) return;
  i->second->quiet = quiet;
  i->second->cut->reject(kj::mv(why));
}

kj::Promise<void> gateway::impl::pump(stream& s) {
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

kj::Promise<void> gateway::impl::send_token(stream& s, const stream_event& e) {
  auto req = s.sink.tokenRequest();
  auto ev = req.initEvent();
  ev.setTurn(e.turn);
  ev.setIndex(static_cast<uint64_t>(e.index));
  ev.setId(e.token);
  ev.setPiece(kj::arrayPtr(reinterpret_cast<const capnp::byte*>(e.piece.data()), e.piece.size()));
  s.next_index = e.index + 1;
  if (s.key) usage.charge(*s.key, 1);
  if (s.requested) {
    auto now = std::chrono::steady_clock::now();
    auto& m = *nd.context()->metrics;
    if (!s.first_sent)
      m.time_to_first_token.observe(now - *s.requested);
    else
      m.inter_token.observe(now - s.last_sent);
    s.first_sent = true;
    s.last_sent = now;
  }
  // A `-> stream` call resolves when the flow-control window has room: a client that does
  // not drain its stream holds this promise, and the deadline cuts it off.
  return within_stall_timeout(req.send(), "did not drain its stream");
}

kj::Promise<void> gateway::impl::send_done(stream& s, const stream_event& e) {
  if (s.requested && !s.counted) {
    s.counted = true;
    nd.context()->metrics->count(e.moved ? request_outcome::moved : outcome_of(e.reason));
  }
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

kj::Promise<void> gateway::impl::within_stall_timeout(kj::Promise<void> p, const char* what) {
  auto ms = cfg.stall_timeout.count();
  return p.exclusiveJoin(timer.afterDelay(stall()).then([what, ms]() -> kj::Promise<void> {
    return kj::Exception(kj::Exception::Type::OVERLOADED, __FILE__, __LINE__,
                         kj::str("the client ", what, " for ", ms, " ms"));
  }));
}

void gateway::impl::finish(uint64_t id, kj::Exception* err) {
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
  if (s->requested && !s->counted) {
    s->counted = true;
    nd.context()->metrics->count(request_outcome::cut_off);
  }
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

void gateway::impl::shutdown() {
  for (auto& [id, s] : streams) {
    s->ch->cancel();
    caf::anon_send_exit(s->relay, caf::exit_reason::user_shutdown);
  }
}

// -- the Session server ---------------------------------------------------------------------

namespace {

/// One session, as seen by one client of its tenant (`key`, null on the open port: given only
/// after the tenant was checked). Holds the id only; every call finds the session's current
/// actor, so a capability survives the actor's restarts.
/// After a send or chat took turn `turn`: replies with it and its prompt as the session
/// recorded it (tokenized, or rendered from the messages and tokenized).
void reply_recorded(caf::event_based_actor* self, const session_actor& sess,
                    std::chrono::milliseconds timeout, uint64_t turn,
                    const wire::kj_reply<caf::expected<sent_turn>>& reply) {
  self->request(sess, timeout, get_atom::value)
      .then(
          [=](session_record& r) {
            sent_turn out;
            out.turn = turn;
            if (turn < r.turns.size()) out.prompt = r.turns[turn].user;
            reply(std::move(out));
          },
          [=](caf::error& e) { reply(std::move(e)); });
}

/// Checks a turn's input with the node's guardrail (from `self`, within its deadline), then
/// calls `go`; a refusal is `reply`'d: `bad_request` naming the rule it matched, or under
/// fail-closed `overloaded` when no check could be had in time.
void guarded(caf::event_based_actor* self, const std::shared_ptr<node_context>& ctx,
             std::string text, const wire::kj_reply<caf::expected<sent_turn>>& reply,
             std::function<void()> go) {
  auto log = ctx->log;
  guard_check(self, ctx->guard, guard_stage::prompt, std::move(text),
              [log](const std::string& line) { log->report(line); },
              [reply, go](guard_outcome o, const std::string& rule) {
                switch (o) {
                  case guard_outcome::allowed:
                  case guard_outcome::failed_open:
                    go();
                    return;
                  case guard_outcome::denied:
                    reply(make_error(errc::bad_request,
                                     "the prompt was refused by the guardrail (" + rule + ")"));
                    return;
                  case guard_outcome::failed_closed:
                    reply(make_error(errc::overloaded,
                                     "the guardrail could not check the prompt in time, and this "
                                     "node refuses what it cannot check; retry later"));
                    return;
                }
              });
}

class session_server final : public wire::Session::Server {
 public:
  session_server(gw& g, std::string id, const api_key* key)
      : g_(g), id_(std::move(id)), key_(key) {}

  kj::Promise<void> info(InfoContext ctx) override {
    ctx.allowCancellation();
    auto ctx_len = static_cast<size_t>(g_.nd.context()->llm->config().ctx_len);
    return record().then([ctx, ctx_len](caf::expected<session_record> r) mutable {
      if (r)
        fill_info(*r, ctx_len, ctx.getResults().initInfo());
      else
        kj::throwFatalException(KJ_EXCEPTION(FAILED, wire_text(r.error())));
    });
  }

  // `send` and `resume` answer as soon as the session has accepted the stream, so they do not
  // allow cancellation: their continuation must always run to bind or drop the stream.
  kj::Promise<void> send(SendContext ctx) override {
    auto asked = std::chrono::steady_clock::now();
    return counted(ctx, start_send(ctx, asked));
  }

  kj::Promise<void> chat(ChatContext ctx) override {
    auto asked = std::chrono::steady_clock::now();
    return counted(ctx, start_chat(ctx, asked));
  }

 private:
  /// Counts a turn request refused (an answer with an error, or an exception) and the prompt of
  /// one started; a started turn's outcome is counted when its stream ends (gateway::impl).
  template <class Context>
  kj::Promise<void> counted(Context ctx, kj::Promise<void> p) {
    auto& m = *g_.nd.context()->metrics;
    return p.then(
        [ctx, &m]() mutable {
          auto res = ctx.getResults();
          auto kind = res.getError().getKind();
          if (kind != wire::Error::Kind::NONE)
            m.count(outcome_of(kind));
          else
            m.prompt_tokens.fetch_add(res.getPrompt().size(), std::memory_order_relaxed);
        },
        [&m](kj::Exception&& e) {
          m.count(request_outcome::failed);
          kj::throwFatalException(kj::mv(e));
        });
  }

  kj::Promise<void> start_send(SendContext ctx, std::chrono::steady_clock::time_point asked) {
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
    if (p.getTurnGiven() && p.getTurn() > static_cast<uint64_t>(INT64_MAX)) {
      set_error(make_error(errc::bad_request, "turn must be at most 9223372036854775807, got " +
                                                  std::to_string(p.getTurn())),
                ctx.getResults().initError());
      return kj::READY_NOW;
    }
    // The turn number the client expects, -1: none (the next one, whatever it is).
    const int64_t expect = p.getTurnGiven() ? static_cast<int64_t>(p.getTurn()) : -1;
    std::string txt(text.cStr(), text.size());
    auto max_tokens = static_cast<int32_t>(p.getMaxTokens());
    const bool special = p.getSpecial();
    auto& s = g_.open_stream(id_, p.getSink(), key_);
    s.requested = asked;
    auto sid = s.id;
    auto relay_actor = s.relay;
    auto& sys = g_.sys;
    auto timeout = g_.cfg.call_timeout;
    auto tok = g_.nd.context()->tok;
    auto ctx_len = static_cast<size_t>(g_.nd.context()->llm->config().ctx_len);
    auto id = id_;
    auto node_ctx = g_.nd.context();
    return g_.find_session(id_)
        .then([&sys, timeout, tok, ctx_len, id, txt, max_tokens, expect, special, relay_actor,
               node_ctx](caf::expected<session_actor> a) -> kj::Promise<caf::expected<sent_turn>> {
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
                              tok->encode(txt, rec.turns.empty() && tok->vocabulary().add_bos,
                                          special ? special_tokens::on : special_tokens::off);
                          // A turn sent again (its number given and already taken) is in
                          // `have` already: the session checks it is the same one.
                          bool again = expect >= 0 && static_cast<uint64_t>(expect) < rec.turns.size();
                          auto limit = session_context(rec, ctx_len);
                          if (!again && have + prompt.size() >= limit) {
                            reply(make_error(errc::bad_request,
                                             "the prompt has " + std::to_string(prompt.size()) +
                                                 " tokens and the conversation " +
                                                 std::to_string(have) + "; the context length is " +
                                                 std::to_string(limit) +
                                                 (limit < ctx_len ? " (this session's, shortened "
                                                                    "under load)"
                                                                  : "")));
                            return;
                          }
                          guarded(self, node_ctx, txt, reply, [=] {
                            self->request(sess, timeout, send_atom::value, txt, max_tokens,
                                          relay_actor, expect, special)
                                .then(
                                    [=](uint64_t turn) {
                                      reply_recorded(self, sess, timeout, turn, reply);
                                    },
                                    [=](caf::error& e) { reply(std::move(e)); });
                          });
                        },
                        [=](caf::error& e) { reply(std::move(e)); });
              });
        })
        .then([this, ctx, sid](caf::expected<sent_turn> r) mutable {
          answer_turn(ctx.getResults(), sid, r, "send failed");
        });
  }

  kj::Promise<void> start_chat(ChatContext ctx, std::chrono::steady_clock::time_point asked) {
    if (auto err = g_.admit(key_)) return g_.refuse(err, ctx.getResults().initError());
    if (key_)
      if (auto err = g_.usage.may_generate(*key_))
        return g_.refuse(err, ctx.getResults().initError());
    auto p = ctx.getParams();
    auto refuse = [&](const std::string& why) {
      set_error(make_error(errc::bad_request, why), ctx.getResults().initError());
      return kj::READY_NOW;
    };
    std::vector<turn_message> messages;
    size_t bytes = 0;
    for (auto m : p.getMessages()) {
      messages.push_back({std::string(m.getRole().cStr(), m.getRole().size()),
                          std::string(m.getContent().cStr(), m.getContent().size())});
      bytes += m.getRole().size() + m.getContent().size();
    }
    if (bytes > g_.cfg.max_text_bytes)
      return refuse("the messages have " + std::to_string(bytes) + " bytes, the limit is " +
                    std::to_string(g_.cfg.max_text_bytes));
    if (p.getMaxTokens() > static_cast<uint32_t>(INT32_MAX))
      return refuse("maxTokens must be at most 2147483647, got " +
                    std::to_string(p.getMaxTokens()));
    if (!p.hasSink()) return refuse("chat needs a sink");
    if (p.getTurnGiven() && p.getTurn() > static_cast<uint64_t>(INT64_MAX))
      return refuse("turn must be at most 9223372036854775807, got " + std::to_string(p.getTurn()));
    // The turn number the client expects, -1: none (the next one, whatever it is).
    const int64_t expect = p.getTurnGiven() ? static_cast<int64_t>(p.getTurn()) : -1;
    auto max_tokens = static_cast<int32_t>(p.getMaxTokens());
    auto& s = g_.open_stream(id_, p.getSink(), key_);
    s.requested = asked;
    auto sid = s.id;
    auto relay_actor = s.relay;
    auto& sys = g_.sys;
    auto timeout = g_.cfg.call_timeout;
    // The session renders the turn and checks its length against the context; the guardrail
    // reads every message's content.
    std::string said;
    for (auto& m : messages) said += m.content + "\n";
    auto node_ctx = g_.nd.context();
    return g_.find_session(id_)
        .then([&sys, timeout, messages = std::move(messages), max_tokens, expect, relay_actor,
               node_ctx, said = std::move(said)](
                  caf::expected<session_actor> a) -> kj::Promise<caf::expected<sent_turn>> {
          if (!a) return caf::expected<sent_turn>(std::move(a.error()));
          auto sess = *a;
          return wire::in_caf<caf::expected<sent_turn>>(
              sys,
              [=](caf::event_based_actor* self, wire::kj_reply<caf::expected<sent_turn>> reply) {
                guarded(self, node_ctx, said, reply, [=] {
                  self->request(sess, timeout, chat_atom::value, messages, max_tokens,
                                relay_actor, expect)
                      .then(
                          [=](uint64_t turn) {
                            reply_recorded(self, sess, timeout, turn, reply);
                          },
                          [=](caf::error& e) { reply(std::move(e)); });
                });
              });
        })
        .then([this, ctx, sid](caf::expected<sent_turn> r) mutable {
          answer_turn(ctx.getResults(), sid, r, "chat failed");
        });
  }

 public:
  kj::Promise<void> cancel(CancelContext ctx) override {
    ctx.allowCancellation();
    if (auto err = g_.admit(key_)) return g_.refuse(err, ctx.getResults().initError());
    auto turn = ctx.getParams().getTurn();
    return g_.find_session(id_).then(
        [this, ctx, turn](caf::expected<session_actor> a) mutable -> kj::Promise<void> {
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
               held](caf::expected<session_actor> a) -> kj::Promise<caf::expected<bool>> {
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

  /// The answer to a send or chat: the turn and its prompt, or the error (which cuts the
  /// session's stream).
  template <class Results>
  void answer_turn(Results res, uint64_t sid, caf::expected<sent_turn>& r, const char* failed) {
    if (!r) {
      g_.cut(sid, kj::Exception(kj::Exception::Type::FAILED, __FILE__, __LINE__,
                                kj::heapString(failed)),
             true);
      set_error(r.error(), res.initError());
      return;
    }
    g_.bind(sid, r->turn);
    if (key_) g_.usage.charge(*key_, r->prompt.size());
    res.setTurn(r->turn);
    list_of<int32_t>(r->prompt, res.initPrompt(static_cast<unsigned>(r->prompt.size())));
    res.initError().setKind(wire::Error::Kind::NONE);
  }

 private:
  static kj::String wire_text(const caf::error& e) { return kj::str(describe(e).c_str()); }

  kj::Promise<caf::expected<session_record>> record() {
    return g_.find_session(id_).then(
        [this](caf::expected<session_actor> a) -> kj::Promise<caf::expected<session_record>> {
          if (!a) return caf::expected<session_record>(std::move(a.error()));
          return g_.get_record(*a);
        });
  }

  gw& g_;
  std::string id_;
  const api_key* key_;
};

}  // namespace

wire::Session::Client detail::session_client(gw& g, std::string id, const api_key* key) {
  return kj::heap<session_server>(g, std::move(id), key);
}

}  // namespace keel
