// GCC 12 reports kj::ExceptionOr<caf::expected<T>> as maybe uninitialised where it inlines a
// cross-thread fulfilment (a false positive about kj::Maybe's storage; see gateway.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "actors/detail/http_openai.hpp"
#include "actors/http_api.hpp"

#include <chrono>
#include <filesystem>
#include <random>

#include <nlohmann/json.hpp>

#include "wire/client.hpp"
#include "wire/convert.hpp"

namespace keel::detail {

namespace {

using json = nlohmann::json;
using clock = std::chrono::steady_clock;

/// How long a stream that broke (its owner died, the session moved) is tried again before the
/// client is told; as long as `keel generate` tries (wire/client.hpp, resume_for).
constexpr auto resume_for = std::chrono::seconds(30);
/// A session a Last-Event-ID names and no node knows: asked again this long (a takeover may not
/// have registered it yet), then 404.
constexpr auto unknown_for = std::chrono::seconds(3);

std::string dump(const json& j) {
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

json error_json(const http_error& e) {
  const char* type = e.status == 401   ? "authentication_error"
                     : e.status == 429 ? "rate_limit_error"
                     : e.status >= 500 ? "server_error"
                                       : "invalid_request_error";
  return {{"error", {{"message", e.message}, {"type", type}, {"code", e.code}}}};
}

const char* status_text(unsigned status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 401:
      return "Unauthorized";
    case 404:
      return "Not Found";
    case 429:
      return "Too Many Requests";
    case 501:
      return "Not Implemented";
    case 503:
      return "Service Unavailable";
    default:
      return "Internal Server Error";
  }
}

/// How a turn ended, as OpenAI names it.
const char* finish_name(finish_reason r, bool stopped) {
  if (stopped) return "stop";
  switch (r) {
    case finish_reason::eos:
      return "stop";
    case finish_reason::length:
    case finish_reason::context:
      return "length";
    case finish_reason::cancelled:
      return "cancelled";
    case finish_reason::filtered:
      return "content_filter";  // OpenAI's name: the reply stopped by moderation
    default:
      return "error";
  }
}

/// One turn served to one HTTP request: the attempts that stream it (the first, then a resume
/// after each break), the text given out so far, and the response it is written to. Shared by
/// the request's promise and the sinks of its attempts (a sink can outlive the request: the
/// gateway drops it when it notices), so everything here checks `closed_` before it touches
/// the response.
class turn_run final : public kj::Refcounted {
 public:
  struct outcome {
    enum class how { done, broken, stopped, gone } how = how::done;
    finish_reason reason = finish_reason::length;
    caf::error err;
  };

  turn_run(gw& g, const kj::HttpHeaderTable& table, const api_key* key, openai::request req,
           std::string model, kj::HttpService::Response& response)
      : g_(g),
        table_(table),
        key_(key),
        req_(std::move(req)),
        model_(std::move(model)),
        response_(response),
        text_(req_.stop),
        created_(std::chrono::duration_cast<std::chrono::seconds>(
                     std::chrono::system_clock::now().time_since_epoch())
                     .count()) {
    auto pf = kj::newPromiseAndFulfiller<void>();
    opened_ = kj::mv(pf.fulfiller);
    writes_ = pf.promise
                  .then([this]() -> kj::Promise<void> {
                    if (closed_ || !out_ || head_.empty()) return kj::READY_NOW;
                    return out_->write(head_.data(), head_.size());
                  })
                  .fork();
  }

  /// A new turn: on `session` (a conversation kept on the server) or on a new session.
  kj::Promise<void> start(std::optional<std::string> session) {
    auto gate = gateway_client(g_, key_);
    kj::Promise<wire::Session::Client> sess = nullptr;
    if (session) {
      session_ = *session;
      auto r = gate.getSessionRequest();
      r.setId(*session);
      sess = r.send().then([this](capnp::Response<wire::Gateway::GetSessionResults> a) {
        if (auto err = wire::from_wire(a.getError())) throw_refusal(err);
        return a.getSession();
      });
    } else {
      auto r = gate.openSessionRequest();
      auto params = req_.sampling;
      if (!req_.seed_given) {  // drawn once, kept with the session: a takeover samples the same
        std::random_device rd;
        params.seed = (uint64_t{rd()} << 32) | rd();
      }
      wire::to_wire(params, r.initParams());
      r.setPriority(req_.priority);
      sess = r.send().then([this](capnp::Response<wire::Gateway::OpenSessionResults> a) {
        if (auto err = wire::from_wire(a.getError())) throw_refusal(err);
        session_ = a.getId();
        return a.getSession();
      });
    }
    auto self = kj::addRef(*this);
    return sess
        .then([this](wire::Session::Client s) {
          sess_ = s;
          auto sink = new_attempt();
          auto max = static_cast<uint32_t>(req_.max_tokens.value_or(max_context()));
          if (req_.kind == openai::endpoint::chat) {
            auto r = s.chatRequest();
            auto list = r.initMessages(static_cast<unsigned>(req_.messages.size()));
            for (size_t i = 0; i < req_.messages.size(); ++i) {
              list[static_cast<unsigned>(i)].setRole(req_.messages[i].role);
              list[static_cast<unsigned>(i)].setContent(req_.messages[i].content);
            }
            r.setMaxTokens(max);
            r.setSink(kj::mv(sink));
            return r.send().then([this](capnp::Response<wire::Session::ChatResults> a) {
              return accepted(a.getError(), a.getTurn(), a.getPrompt().size());
            });
          }
          auto r = s.sendRequest();
          r.setText(req_.prompt);
          r.setMaxTokens(max);
          r.setSink(kj::mv(sink));
          return r.send().then([this](capnp::Response<wire::Session::SendResults> a) {
            return accepted(a.getError(), a.getTurn(), a.getPrompt().size());
          });
        })
        .then([this]() { return begin(true); }, [this](kj::Exception&& e) { return refused(e); })
        .attach(kj::mv(self), guard());
  }

  /// A client that reconnects with Last-Event-ID `from`: the turn it names, from its token on.
  kj::Promise<void> resume_from(const openai::event_id& from) {
    session_ = from.session;
    turn_ = from.turn;
    committed_ = from.tokens;
    received_ = committed_;
    auto self = kj::addRef(*this);
    auto since = clock::now();
    return retry_resume(since)
        .then([this]() { return begin(false); }, [this](kj::Exception&& e) { return refused(e); })
        .attach(kj::mv(self), guard());
  }

  // -- what the sinks call -------------------------------------------------------------------

  kj::Promise<void> on_token(uint64_t attempt, uint64_t index, int32_t id, std::string_view piece) {
    if (attempt != attempt_ || attempt_over_) return kj::READY_NOW;
    if (index < received_) return kj::READY_NOW;  // had already (a resume starts earlier)
    if (index > received_) {  // a bug somewhere: resuming would only meet it again
      end_attempt({outcome::how::done, finish_reason::failed,
                   make_error(errc::failed, "token " + std::to_string(index) + " came before " +
                                                std::to_string(received_))});
      return kj::READY_NOW;
    }
    last_event_ = clock::now();
    ids_.push_back(id);
    ++received_;
    unsent_ += text_.add(piece);
    if (text_.stopped()) {
      auto p = commit();
      cancel_turn();
      end_attempt({outcome::how::stopped, finish_reason::eos, {}});
      return p;
    }
    if (text_.settled()) return commit();
    return kj::READY_NOW;
  }

  void on_done(uint64_t attempt, finish_reason reason, caf::error err) {
    if (attempt != attempt_ || attempt_over_) return;
    last_event_ = clock::now();
    if (err && code_of(err) == errc::disconnected) {  // moved to another node: not the turn's end
      end_attempt({outcome::how::broken, reason, std::move(err)});
      return;
    }
    unsent_ += text_.finish();
    commit();
    end_attempt({outcome::how::done, reason, std::move(err)});
  }

  void on_sink_dropped(uint64_t attempt) {
    if (attempt != attempt_ || attempt_over_) return;
    end_attempt({outcome::how::broken, finish_reason::failed,
                 make_error(errc::disconnected, "the stream of turn " + std::to_string(turn_) +
                                                    " broke")});
  }

 private:
  class sink;

  /// Ends the response's use when the request's promise goes (done or cancelled).
  struct close_guard {
    kj::Own<turn_run> t;
    ~close_guard() {
      if (t) t->close();
    }
  };
  kj::Own<close_guard> guard() {
    auto g = kj::heap<close_guard>();
    g->t = kj::addRef(*this);
    return g;
  }

  void close() {
    closed_ = true;
    if (opened_->isWaiting()) opened_->fulfill();
    writes_ = kj::Promise<void>(kj::READY_NOW).fork();  // a write still pending is cancelled
    out_ = nullptr;
    end_attempt({outcome::how::gone, finish_reason::cancelled, {}});
  }

  /// Leaves the promise chain with `err` kept as the reason (`reason_of` takes it).
  [[noreturn]] void throw_refusal(caf::error err) {
    refusal_ = std::move(err);
    kj::throwFatalException(KJ_EXCEPTION(FAILED, "refused"));
  }

  /// Why the chain failed: the refusal kept, or the exception as the wire classifies it.
  caf::error reason_of(const kj::Exception& e) {
    if (refusal_) return std::exchange(refusal_, caf::error{});
    return wire::from_kj(e, "session " + session_);
  }

  /// The answer to a request refused before its stream began: its status.
  kj::Promise<void> refused(const kj::Exception& e) {
    auto err = reason_of(e);
    if (closed_) return kj::READY_NOW;
    return send_error(response_, table_, http_error_of(err));
  }

  int64_t max_context() const { return g_.nd.context()->llm->config().ctx_len; }

  /// A sink for a new attempt; the tokens of any earlier one are ignored from now on.
  wire::TokenSink::Client new_attempt();

  /// The first answer to send or chat: accepted, or refused with `error`.
  void accepted(wire::Error::Reader error, uint64_t turn, size_t prompt) {
    if (auto err = wire::from_wire(error)) throw_refusal(err);
    turn_ = turn;
    prompt_tokens_ = prompt;
  }

  /// getSession + resume of `turn_` from `committed_`, asked again while the session is between
  /// owners (disconnected, overloaded, or unknown for a moment) until the deadline; then the
  /// last refusal (`reason_of`).
  kj::Promise<void> retry_resume(clock::time_point since,
                                 std::chrono::milliseconds pause = std::chrono::milliseconds(25)) {
    return resume_once().then(
        [](bool) -> kj::Promise<void> { return kj::READY_NOW; },
        [this, since, pause](kj::Exception&& e) -> kj::Promise<void> {
          if (closed_) return kj::READY_NOW;
          auto err = reason_of(e);
          auto code = code_of(err);
          auto waited = clock::now() - since;
          bool again = code == errc::disconnected || code == errc::overloaded ||
                       (code == errc::not_found && waited < unknown_for);
          if (!again || waited + pause >= resume_for) throw_refusal(std::move(err));
          auto next = std::min(pause * 2, std::chrono::milliseconds(200));
          return g_.timer.afterDelay(pause.count() * kj::MILLISECONDS)
              .then([this, since, next] { return retry_resume(since, next); });
        });
  }

  kj::Promise<bool> resume_once() {
    text_ = openai::text_stream(req_.stop);
    unsent_.clear();
    received_ = committed_;
    if (ids_.size() > committed_) ids_.resize(committed_);
    auto gate = gateway_client(g_, key_);
    auto r = gate.getSessionRequest();
    r.setId(session_);
    return r.send()
        .then([this](capnp::Response<wire::Gateway::GetSessionResults> a) {
          if (auto err = wire::from_wire(a.getError())) throw_refusal(err);
          sess_ = a.getSession();
          auto h = sess_.historyRequest().send();
          return h.then([this](capnp::Response<wire::Session::HistoryResults> hist) {
            if (auto err = wire::from_wire(hist.getError())) throw_refusal(err);
            auto turns = hist.getTurns();
            if (turn_ >= turns.size()) {
              throw_refusal(make_error(errc::not_found, "session " + session_ + " has no turn " +
                                                            std::to_string(turn_)));
            }
            auto t = turns[static_cast<unsigned>(turn_)];
            prompt_tokens_ = t.getPrompt().size();
            auto r = sess_.resumeRequest();
            r.setTurn(turn_);
            r.setFromIndex(committed_);
            // What this stream received: a new owner whose copy lags adopts it (keel.capnp).
            // A client's Last-Event-ID names a count only: the owner generates what it lacks.
            if (ids_.size() == committed_ && committed_ > 0) {
              auto held = r.initHeld(static_cast<unsigned>(ids_.size()));
              for (size_t i = 0; i < ids_.size(); ++i) held.set(static_cast<unsigned>(i), ids_[i]);
            }
            r.setSink(new_attempt());
            return r.send();
          });
        })
        .then([this](capnp::Response<wire::Session::ResumeResults> a) {
          if (auto err = wire::from_wire(a.getError())) throw_refusal(err);
          return true;
        });
  }

  /// The turn was accepted: the answer's head goes out (streams), then the attempts run until
  /// the turn ends or cannot be resumed.
  kj::Promise<void> begin(bool fresh) {
    if (closed_) return kj::READY_NOW;
    if (req_.stream) {
      kj::HttpHeaders headers(table_);
      headers.set(kj::HttpHeaderId::CONTENT_TYPE, "text/event-stream");
      headers.add("Cache-Control", "no-store");
      headers.add("Keel-Session", session_);
      out_ = response_.send(200, "OK", headers);
      if (fresh && req_.kind == openai::endpoint::chat)  // the role comes first, as OpenAI's
        head_ = event(json{{"role", "assistant"}, {"content", ""}}, nullptr, 0);
      opened_->fulfill();
    }
    return wait_attempt();
  }

  /// Ends the current attempt as broken when its session stops answering: after `quiet` without
  /// an event, `info` is asked (a turn waiting for admission is silent but its session answers);
  /// no answer within `quiet` either (the owner hangs, or its connection does without closing)
  /// breaks the attempt, which the caller then resumes. Never resolves otherwise.
  kj::Promise<void> watch(uint64_t attempt) {
    auto quiet = g_.cfg.call_timeout;
    auto since = clock::now() - last_event_;
    if (since < quiet) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(quiet - since).count() + 1;
      return g_.timer.afterDelay(left * kj::MILLISECONDS).then([this, attempt] {
        return watch(attempt);
      });
    }
    auto asked = sess_.infoRequest().send().then([](auto&&) { return true; },
                                                 [](kj::Exception&&) { return false; });
    auto timed = g_.timer.afterDelay(quiet.count() * kj::MILLISECONDS).then([] { return false; });
    return asked.exclusiveJoin(kj::mv(timed)).then([this, attempt](bool answered) -> kj::Promise<void> {
      if (attempt != attempt_ || attempt_over_) return kj::NEVER_DONE;
      if (!answered) {
        end_attempt({outcome::how::broken, finish_reason::failed,
                     make_error(errc::disconnected, "session " + session_ + " did not answer")});
        return kj::NEVER_DONE;
      }
      last_event_ = clock::now();
      return watch(attempt);
    });
  }

  kj::Promise<void> wait_attempt() {
    last_event_ = clock::now();
    auto watched = watch(attempt_).then([]() -> outcome { return {}; });
    return attempt_end_.addBranch().exclusiveJoin(kj::mv(watched)).then([this](outcome o) -> kj::Promise<void> {
      if (closed_ || o.how == outcome::how::gone) return kj::READY_NOW;
      if (o.how != outcome::how::broken) return finish(o);
      // Broken: once what was written has gone out (a client too slow to take it is gone),
      // the turn goes on from its owner, wherever that is now.
      auto since = clock::now();
      auto drained = writes_.addBranch().then([] { return true; }, [](kj::Exception&&) {
        return false;
      }).exclusiveJoin(
          g_.timer.afterDelay(g_.stall()).then([] { return false; }));
      return drained.then([this, since, o](bool ok) -> kj::Promise<void> {
        if (!ok || closed_) return kj::READY_NOW;
        return retry_resume(since)
            .then([this] { return wait_attempt(); },
                  [this, o](kj::Exception&& e) -> kj::Promise<void> {
                    outcome failed = o;
                    failed.how = outcome::how::done;
                    failed.reason = finish_reason::failed;
                    failed.err = make_error(errc::disconnected,
                                            "turn " + std::to_string(turn_) + " of session " +
                                                session_ + " broke and could not resume: " +
                                                e.getDescription().cStr());
                    return finish(failed);
                  });
      });
    });
  }

  /// The text released since the last boundary goes out, named by the tokens it covers.
  kj::Promise<void> commit() {
    committed_ = received_;
    if (unsent_.empty()) return kj::READY_NOW;
    auto text = std::exchange(unsent_, {});
    if (!req_.stream) {
      whole_ += text;
      return kj::READY_NOW;
    }
    json delta = req_.kind == openai::endpoint::chat ? json{{"content", text}} : json(text);
    return write(event(delta, nullptr, committed_));
  }

  /// One SSE event of a chunk: with an id when `tokens` names a boundary.
  std::string event(const json& delta, const char* finish, std::optional<uint64_t> tokens) {
    json choice = {{"index", 0}, {"finish_reason", finish ? json(finish) : json(nullptr)}};
    if (req_.kind == openai::endpoint::chat) {
      choice["delta"] = delta;
    } else {
      choice["text"] = delta.is_string() ? delta : json("");
      choice["logprobs"] = nullptr;
    }
    json chunk = head(req_.kind == openai::endpoint::chat ? "chat.completion.chunk"
                                                           : "text_completion");
    chunk["choices"] = json::array({choice});
    if (req_.include_usage) chunk["usage"] = nullptr;
    std::string out;
    if (tokens) out += "id: " + openai::event_id{session_, turn_, *tokens}.str() + "\n";
    return out + "data: " + dump(chunk) + "\n\n";
  }

  json head(const char* object) const {
    auto prefix = req_.kind == openai::endpoint::chat ? "chatcmpl-" : "cmpl-";
    return {{"id", prefix + session_ + "-" + std::to_string(turn_)},
            {"object", object},
            {"created", created_},
            {"model", model_}};
  }

  json usage() const {
    return {{"prompt_tokens", prompt_tokens_},
            {"completion_tokens", received_},
            {"total_tokens", prompt_tokens_ + received_}};
  }

  kj::Promise<void> finish(const outcome& o) {
    bool stopped = o.how == outcome::how::stopped;
    caf::error err = o.err;
    if (!err && !stopped && (o.reason == finish_reason::overloaded || o.reason == finish_reason::failed))
      err = make_error(o.reason == finish_reason::overloaded ? errc::overloaded : errc::failed,
                       std::string("the turn ended: ") + to_string(o.reason));
    if (!req_.stream) {
      if (err) return send_error(response_, table_, http_error_of(err));
      json choice = {{"index", 0}, {"finish_reason", finish_name(o.reason, stopped)}};
      json body;
      if (req_.kind == openai::endpoint::chat) {
        body = head("chat.completion");
        choice["message"] = {{"role", "assistant"}, {"content", whole_}};
      } else {
        body = head("text_completion");
        choice["text"] = whole_;
        choice["logprobs"] = nullptr;
      }
      body["choices"] = json::array({choice});
      body["usage"] = usage();
      auto text = kj::heap<std::string>(dump(body) + "\n");
      kj::HttpHeaders headers(table_);
      headers.set(kj::HttpHeaderId::CONTENT_TYPE, "application/json");
      headers.add("Cache-Control", "no-store");
      headers.add("Keel-Session", session_);
      auto out = response_.send(200, "OK", headers, text->size());
      auto w = out->write(text->data(), text->size());
      return w.attach(kj::mv(out), kj::mv(text));
    }
    if (err) {
      auto e = http_error_of(err);
      write("data: " + dump(error_json(e)) + "\n\n");
    } else {
      json delta = req_.kind == openai::endpoint::chat ? json::object() : json("");
      write(event(delta, finish_name(o.reason, stopped), std::nullopt));
      if (req_.include_usage) {
        json chunk = head(req_.kind == openai::endpoint::chat ? "chat.completion.chunk"
                                                               : "text_completion");
        chunk["choices"] = json::array();
        chunk["usage"] = usage();
        write("data: " + dump(chunk) + "\n\n");
      }
      write("data: [DONE]\n\n");
    }
    return writes_.addBranch().then([this] { out_ = nullptr; }, [this](kj::Exception&&) {
      out_ = nullptr;
    });
  }

  /// Queues `bytes` behind every earlier write; fails (and ends the attempt) when the client
  /// is gone.
  kj::Promise<void> write(std::string bytes) {
    if (closed_) return kj::READY_NOW;
    auto owned = kj::heap<std::string>(std::move(bytes));
    auto s = owned.get();
    auto p = writes_.addBranch()
                 .then([this, s]() -> kj::Promise<void> {
                   if (closed_ || !out_) return kj::READY_NOW;
                   return out_->write(s->data(), s->size());
                 })
                 .catch_([this](kj::Exception&& e) -> kj::Promise<void> {
                   end_attempt({outcome::how::gone, finish_reason::cancelled, {}});
                   return kj::mv(e);
                 })
                 .attach(kj::mv(owned));
    writes_ = p.fork();
    return writes_.addBranch();
  }

  void end_attempt(outcome o) {
    if (attempt_over_) return;
    attempt_over_ = true;
    if (o.how == outcome::how::gone) closed_ = true;
    attempt_done_->fulfill(kj::mv(o));
  }

  /// Cancels the turn after a stop string (the session goes on; the reply's tokens past the
  /// stop stay in its history).
  void cancel_turn() {
    auto r = sess_.cancelRequest();
    r.setTurn(turn_);
    g_.tasks.add(r.send().ignoreResult().catch_([](kj::Exception&&) {}));
  }

  gw& g_;
  const kj::HttpHeaderTable& table_;
  const api_key* key_;
  openai::request req_;
  std::string model_;
  kj::HttpService::Response& response_;
  openai::text_stream text_;
  int64_t created_;

  std::string session_;
  wire::Session::Client sess_{nullptr};
  uint64_t turn_ = 0;
  uint64_t prompt_tokens_ = 0;
  uint64_t committed_ = 0;  // tokens whose text went out (a settled boundary)
  uint64_t received_ = 0;   // tokens of the current attempt, from 0
  std::vector<int32_t> ids_;
  std::string unsent_;      // text released since `committed_`
  std::string whole_;       // the text so far, without streaming

  uint64_t attempt_ = 0;
  bool attempt_over_ = true;
  clock::time_point last_event_ = clock::now();  // of the current attempt (watch)
  kj::Own<kj::PromiseFulfiller<outcome>> attempt_done_;
  kj::ForkedPromise<outcome> attempt_end_ = kj::Promise<outcome>(outcome{}).fork();

  kj::Own<kj::AsyncOutputStream> out_;
  std::string head_;  // the first event (the role), written once the head went out
  kj::Own<kj::PromiseFulfiller<void>> opened_;
  // Every write, in order: tokens that come before the answer's head wait for it.
  kj::ForkedPromise<void> writes_ = kj::Promise<void>(kj::READY_NOW).fork();
  caf::error refusal_;
  bool closed_ = false;
};

/// One attempt's sink: passes its events to the run, and says when it is dropped without the
/// turn's end (the connection to the owner broke, the stream was cut).
class turn_run::sink final : public wire::TokenSink::Server {
 public:
  sink(kj::Own<turn_run> run, uint64_t attempt) : run_(kj::mv(run)), attempt_(attempt) {}
  ~sink() { run_->on_sink_dropped(attempt_); }

  kj::Promise<void> token(TokenContext ctx) override {
    auto e = ctx.getParams().getEvent();
    auto piece = e.getPiece();
    return run_->on_token(attempt_, e.getIndex(), e.getId(),
                          std::string_view(reinterpret_cast<const char*>(piece.begin()),
                                           piece.size()));
  }

  kj::Promise<void> done(DoneContext ctx) override {
    auto p = ctx.getParams();
    run_->on_done(attempt_, wire::from_wire(p.getReason()), wire::from_wire(p.getError()));
    return kj::READY_NOW;
  }

 private:
  kj::Own<turn_run> run_;
  uint64_t attempt_;
};

wire::TokenSink::Client turn_run::new_attempt() {
  ++attempt_;
  attempt_over_ = false;
  auto pf = kj::newPromiseAndFulfiller<outcome>();
  attempt_done_ = kj::mv(pf.fulfiller);
  attempt_end_ = pf.promise.fork();
  return kj::heap<sink>(kj::addRef(*this), attempt_);
}

}  // namespace

http_error http_error_of(const caf::error& err) {
  http_error e;
  e.message = message_of(err);
  switch (code_of(err)) {
    case errc::bad_request:
      e.status = 400;
      e.code = "bad_request";
      break;
    case errc::unauthenticated:
      e.status = 401;
      e.code = "invalid_api_key";
      break;
    case errc::not_found:
      e.status = 404;
      e.code = "not_found";
      break;
    case errc::overloaded: {
      // A tenant's own limit is the client's doing (429); the node's load is not (503).
      bool tenant = e.message.rfind("tenant ", 0) == 0;
      e.status = tenant ? 429 : 503;
      e.code = tenant ? "rate_limit_exceeded" : "overloaded";
      auto ms = wire::retry_after_ms(err);
      e.retry_after_s = std::max<unsigned>(1, (ms + 999) / 1000);
      break;
    }
    case errc::disconnected:
      e.status = 503;
      e.code = "unavailable";
      e.retry_after_s = 1;
      break;
    case errc::unimplemented:
      e.status = 501;
      e.code = "unimplemented";
      break;
    default:
      e.status = 500;
      e.code = "internal_error";
  }
  return e;
}

kj::Promise<void> send_error(kj::HttpService::Response& response, const kj::HttpHeaderTable& table,
                             const http_error& e) {
  kj::HttpHeaders headers(table);
  headers.set(kj::HttpHeaderId::CONTENT_TYPE, "application/json");
  headers.add("Cache-Control", "no-store");
  if (e.retry_after_s > 0) headers.add("Retry-After", kj::str(e.retry_after_s));
  auto body = kj::heap<std::string>(dump(error_json(e)) + "\n");
  auto out = response.send(e.status, status_text(e.status), headers, body->size());
  auto w = out->write(body->data(), body->size());
  return w.attach(kj::mv(out), kj::mv(body));
}

kj::Promise<void> serve_openai(gw& g, const kj::HttpHeaderTable& table, const http_header_ids& ids,
                               const api_key* key, openai::endpoint kind,
                               const kj::HttpHeaders& headers, std::string body,
                               kj::HttpService::Response& response) {
  auto req = openai::parse(kind, body);
  if (!req) return send_error(response, table, http_error_of(req.error()));
  auto model = served_model(g.nd);
  if (!req->model.empty() && req->model != model) {
    http_error e{404, "model '" + req->model + "' is not served here; this node serves '" + model +
                          "' (GET /v1/models)",
                 "model_not_found"};
    return send_error(response, table, e);
  }
  auto run = kj::refcounted<turn_run>(g, table, key, std::move(*req), model, response);
  KJ_IF_MAYBE (last, headers.get(ids.last_event_id)) {
    auto from = openai::event_id::parse(std::string_view(last->cStr(), last->size()));
    if (!from) return send_error(response, table, http_error_of(from.error()));
    return run->resume_from(*from).attach(kj::mv(run));
  }
  std::optional<std::string> session;
  KJ_IF_MAYBE (s, headers.get(ids.session)) session = std::string(s->cStr(), s->size());
  return run->start(session).attach(kj::mv(run));
}

}  // namespace keel::detail
