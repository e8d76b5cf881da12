#include "actors/session.hpp"

#include <algorithm>
#include <optional>
#include <stdexcept>

#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include "actors/let_it_crash.hpp"
#include "actors/session_copy.hpp"
#include "kernels/chat_prompt.hpp"

namespace keel {

std::vector<int32_t> fed_tokens(const std::vector<turn_record>& turns, size_t upto, bool with_input,
                                const std::function<size_t(const std::vector<int32_t>&)>& fed_reply) {
  std::vector<int32_t> out;
  for (size_t k = 0; k <= upto && k < turns.size(); ++k) {
    if (k == upto && !with_input) break;
    const auto& t = turns[k];
    if (t.keep >= 0 && static_cast<size_t>(t.keep) < out.size())
      out.resize(static_cast<size_t>(t.keep));
    out.insert(out.end(), t.user.begin(), t.user.end());
    if (k == upto) break;
    auto n = std::min(fed_reply(t.generated), t.generated.size());
    out.insert(out.end(), t.generated.begin(), t.generated.begin() + static_cast<ptrdiff_t>(n));
  }
  return out;
}

namespace {

struct session_state {
  std::shared_ptr<node_context> ctx;
  std::shared_ptr<session_table> table;
  session_record rec;
  batcher_actor batcher;  // the one the running turn was submitted to
  int end_retries = 0;  // writes of the running turn's end refused by a full disk
  bool ending = false;  // with peers: the running turn's end is with the ownership host
  std::optional<uint64_t> accepting;  // with peers: the new turn the host is storing
  /// The answer to the client of the turn being stored (`accepting`): kept here, not only in the
  /// storing request's handlers, so that an actor that quits first (the session moved) still
  /// answers it (`disconnected`) instead of leaving the client to its timeout.
  std::optional<caf::typed_response_promise<uint64_t>> accept_rp;
  /// This session's slot in the table: each token is recorded there under its lock only.
  session_table::handle slot;
  /// With peers: the ownership host as last asked (at a turn's start and end), and how many
  /// tokens of turn `group_turn` went to the group as checkpoints.
  ownership_actor host;
  uint64_t group_turn = 0;
  size_t group_sent = 0;
  /// The session's chat template, parsed (of the text `template_text`) at its first chat turn.
  std::string template_text;
  std::optional<chat_template> tmpl;
  /// The guardrail's look at the running reply (`check_reply`): the turn, how many of its tokens
  /// the last check covered, whether one is out; and a turn it stops (its end comes as the
  /// batcher's, with this reason instead).
  uint64_t guard_turn = 0;
  size_t guard_checked = 0;
  bool guard_pending = false;
  struct stop {
    uint64_t turn = 0;
    finish_reason why = finish_reason::filtered;
    std::string detail;
    int64_t retry_after_ms = 0;
  };
  std::optional<stop> stopping;
  static inline const char* name = "session";
};

using self_ptr = session_actor::stateful_pointer<session_state>;

/// How often a session retries writing a turn's end that a full disk refused.
constexpr auto end_retry_interval = std::chrono::milliseconds(200);

seq_id seq_of(const session_record& r, uint64_t turn) {
  return (r.number << 24) | turn;
}

void check_fault(self_ptr self) {
  auto& st = self->state;
  if (st.ctx->faults->take_session_crash(st.rec.id))
    throw std::runtime_error("injected fault: session " + st.rec.id + " crashed");
}

/// How much of a reply the turns after it are fed: a chat turn's reply without its end token
/// (the next turn's rendering closes it), a text turn's all of it.
std::function<size_t(const std::vector<int32_t>&)> replies_fed(self_ptr self) {
  auto& st = self->state;
  const bool chat = !st.rec.turns.empty() && !st.rec.turns.front().messages.empty();
  return [chat, tok = st.ctx->tok](const std::vector<int32_t>& reply) {
    return chat ? chat_fed_reply(*tok, reply) : reply.size();
  };
}

turn_record* running_turn(session_state& st) {
  if (st.rec.turns.empty() || st.rec.turns.back().done) return nullptr;
  return &st.rec.turns.back();
}

/// Submits the running turn to the current batcher (first time, or again after the batcher or
/// this session restarted: generation continues after the tokens already delivered).
void submit(self_ptr self) {
  auto& st = self->state;
  auto* t = running_turn(st);
  if (t == nullptr) return;
  // A turn that already has all its tokens (a copy taken over between its last token and the
  // write of its end) ends here: the batcher checks the limit after each token it makes, so it
  // would make one more (chaos_test saw a 33rd token of a 32-token turn, which then changed
  // every later turn).
  if (!t->generated.empty() && st.ctx->tok->is_end_of_generation(t->generated.back())) {
    self->send(self, done_atom::value, seq_of(st.rec, t->turn), finish_reason::eos,
               std::string(), int64_t{0});
    return;
  }
  if (static_cast<int64_t>(t->generated.size()) >= t->max_tokens) {
    self->send(self, done_atom::value, seq_of(st.rec, t->turn), finish_reason::length,
               std::string(), int64_t{0});
    return;
  }
  auto b = st.ctx->batcher();
  if (!b) {
    self->delayed_send(self, std::chrono::milliseconds(10), submit_atom::value);
    return;
  }
  if (b != st.batcher) {
    st.batcher = b;
    self->monitor(b);
  }
  generation_job job;
  job.seq = seq_of(st.rec, t->turn);
  job.session = caf::actor_cast<sequence_sink_actor>(self);
  job.session_id = st.rec.id;
  job.tokens = fed_tokens(st.rec.turns, static_cast<size_t>(t - st.rec.turns.data()), true,
                          replies_fed(self));
  job.generated = t->generated;
  job.params = st.rec.params;
  job.priority = st.rec.priority;
  job.context_limit = st.rec.context_limit;
  job.max_tokens = t->max_tokens;
  job.turn = t->turn;
  self->send(b, submit_atom::value, std::move(job));
}

/// `resume_atom`: streams turn `turn` from `from_index` to `sink`. `held` are the turn's tokens
/// the client already holds, from index 0: those beyond what this session has (a new owner's
/// copy lags the old owner by up to `checkpoint_every` tokens) are adopted, not generated again.
void record_tokens(self_ptr self);

caf::result<bool> resume(self_ptr self, uint64_t turn, int64_t from_index, turn_sink_actor sink,
                         const std::vector<int32_t>& held) {
  check_fault(self);
  auto& st = self->state;
  if (st.ctx->may_serve_session && !st.ctx->may_serve_session(st.rec.id)) {
    // This node cannot prove it still holds the session: it streams nothing.
    return make_error(errc::disconnected, "session " + st.rec.id + ": node " + st.ctx->name +
                                              " has lost contact with the majority of the "
                                              "session's group; resume on another node");
  }
  if (turn >= st.rec.turns.size()) {
    return make_error(errc::not_found,
                      "session " + st.rec.id + " has no turn " + std::to_string(turn));
  }
  auto& t = st.rec.turns[turn];
  // Held tokens are the client's word: every one must be a token of the model (issue #11: a
  // held id outside the vocabulary reached the engine, which failed every step of the node).
  const auto vocab = st.ctx->llm->config().vocab_size;
  for (size_t k = 0; k < held.size(); ++k) {
    if (held[k] < 0 || held[k] >= vocab) {
      return make_error(errc::bad_request, "session " + st.rec.id + " turn " +
                                               std::to_string(turn) + ": held token " +
                                               std::to_string(k) + " is " +
                                               std::to_string(held[k]) +
                                               ", outside the vocabulary of " +
                                               std::to_string(vocab));
    }
  }
  // Where the session has the tokens, the client's must be the same (issue #11: a resume with
  // forged held tokens wrote them into another client's live reply).
  auto common = std::min(held.size(), t.generated.size());
  if (!std::equal(held.begin(), held.begin() + static_cast<ptrdiff_t>(common),
                  t.generated.begin())) {
    return make_error(errc::bad_request, "session " + st.rec.id + " turn " + std::to_string(turn) +
                                             ": the tokens held by the client differ from "
                                             "the session's");
  }
  if (held.size() > t.generated.size()) {
    // More than the session has: legitimate only when this node rebuilt the session from a
    // copy that lags the stream the client received (recovery, takeover), for the running
    // turn, and once. A session that generated every token itself has all a client can hold.
    if (!st.rec.from_copy || turn + 1 != st.rec.turns.size()) {
      return make_error(errc::bad_request,
                        "session " + st.rec.id + " turn " + std::to_string(turn) +
                            ": the client holds " + std::to_string(held.size()) +
                            " tokens, the session produced " + std::to_string(t.generated.size()));
    }
    // A turn that ended here before its client came back (shed by a full node after a
    // takeover, cancelled) adopts nothing: the client hears its end below, and the tokens it
    // holds beyond the copy are not part of the reply.
    auto limit = t.done ? size_t{0}
                        : std::min(held.size(), static_cast<size_t>(std::max(t.max_tokens, 0)));
    if (!t.done) st.rec.from_copy = false;
    if (limit > t.generated.size()) {
      t.generated.insert(t.generated.end(), held.begin() + static_cast<ptrdiff_t>(t.generated.size()),
                         held.begin() + static_cast<ptrdiff_t>(limit));
      record_tokens(self);
      submit(self);  // the batcher's copy continues after the adopted tokens
    }
  }
  for (auto k = std::max<int64_t>(from_index, 0); k < static_cast<int64_t>(t.generated.size());
       ++k)
    self->send(sink, token_atom::value, st.rec.id, t.turn, k, t.generated[k],
               st.ctx->tok->token_text(t.generated[k]));
  if (t.done) {
    self->send(sink, done_atom::value, st.rec.id, t.turn, t.reason, std::string{}, int64_t{0});
  } else {
    t.sink = std::move(sink);
    st.table->put(st.rec);
  }
  return true;
}

/// Records the running turn's new tokens in the session's slot (alone: and in its turn log
/// every `checkpoint_every`), and with peers sends them to the group every `checkpoint_every`
/// (one way; the turn's end carries them all). No lock other sessions share.
void record_tokens(self_ptr self) {
  auto& st = self->state;
  if (!st.slot) st.slot = st.table->handle_of(st.rec.id);
  if (st.slot)
    (void)st.table->put_tokens(st.slot, st.rec);
  else
    (void)st.table->put(st.rec, change::tokens);
  if (!st.ctx->ownership_host || st.rec.turns.empty()) return;
  auto& t = st.rec.turns.back();
  if (st.group_turn != t.turn || st.group_sent > t.generated.size()) {
    st.group_turn = t.turn;
    st.group_sent = 0;
  }
  auto every = static_cast<size_t>(std::max(st.table->checkpoint_every(), 1));
  if (t.generated.size() - st.group_sent < every || !st.host) return;
  std::vector<int32_t> tail(t.generated.begin() + static_cast<ptrdiff_t>(st.group_sent),
                            t.generated.end());
  self->send(st.host, own_tokens_atom::value, st.rec.id, t.turn,
             static_cast<uint64_t>(st.group_sent), std::move(tail));
  st.group_sent = t.generated.size();
  if (st.slot) st.table->sent_to_group(st.slot, t.turn, st.group_sent);
}

/// A new turn was stored (by the group, or the store writer): it runs, and the client hears
/// its number; unless another turn took its place meanwhile.
void turn_stored(self_ptr self, uint64_t turn) {
  auto& st = self->state;
  st.accepting.reset();
  if (!st.accept_rp) return;  // answered already (the actor is quitting)
  auto rp = std::move(*st.accept_rp);
  st.accept_rp.reset();
  auto* t = running_turn(st);
  if (t == nullptr || t->turn != turn) {
    rp.deliver(make_error(errc::disconnected, "session " + st.rec.id + ": turn " +
                                                  std::to_string(turn) +
                                                  " was superseded while it was stored; retry"));
    return;
  }
  submit(self);
  rp.deliver(turn);
}

/// The running turn's end was stored: the session records it and its client hears of it.
/// Also the memory put: a memory put of this actor's meanwhile (a resume's new sink) may have
/// put the running record back.
void turn_ended(self_ptr self, seq_id seq, finish_reason why, const std::string& detail,
                int64_t retry_after_ms) {
  auto& st = self->state;
  st.ending = false;
  auto* t = running_turn(st);
  if (t == nullptr || seq != seq_of(st.rec, t->turn)) return;
  t->done = true;
  t->reason = why;
  st.table->put(st.rec, change::memory);
  st.end_retries = 0;
  self->send(t->sink, done_atom::value, st.rec.id, t->turn, why, detail, retry_after_ms);
}

/// With peers: the new turn (the last of `st.rec`, in the table already) goes to the ownership
/// host; the client's answer comes when the host answers (a majority of the session's group
/// stored it: the turn runs) or refuses (the turn is undone). The actor handles other messages
/// meanwhile; a second turn is refused as "still running".
caf::result<uint64_t> accept_turn(self_ptr self) {
  auto& st = self->state;
  auto& t = st.rec.turns.back();
  const auto turn = t.turn;
  // In the table first: a restarted actor runs the turn the host may have stored.
  st.table->put(st.rec, change::memory);
  auto host = st.ctx->ownership_host();
  st.host = host;
  st.group_turn = turn;
  st.group_sent = 0;
  if (!host) {
    st.rec.turns.pop_back();
    st.table->put(st.rec, change::memory);
    return make_error(errc::disconnected,
                      "session " + st.rec.id + ": the ownership host is restarting; retry");
  }
  auto rp = self->make_response_promise<uint64_t>();
  st.accepting = turn;
  st.accept_rp = rp;
  self->request(host, st.ctx->ownership_wait, submit_atom::value, st.rec.id, turn,
                turn_input(t))
      .then([self, turn](bool) mutable { turn_stored(self, turn); },
          [self, turn](caf::error& e) mutable {
            auto& st = self->state;
            st.accepting.reset();
            if (code_of(e) == errc::stale_epoch && st.ctx->lost_session)
              st.ctx->lost_session(st.rec.id);
            auto* t = running_turn(st);
            if (t != nullptr && t->turn == turn && t->generated.empty()) {
              st.rec.turns.pop_back();
              st.table->put(st.rec, change::memory);
            }
            if (st.accept_rp) {
              st.accept_rp->deliver(
                  host_refusal(e, "session " + st.rec.id + " turn " + std::to_string(turn)));
              st.accept_rp.reset();
            }
          });
  return rp;
}

/// Alone with a store: the new turn (the last of `st.rec`) goes to the store writer, whose
/// synced write answers the client (the turn runs) or refuses it (the turn is undone). The
/// actor handles other messages meanwhile; a second turn is refused as "still running".
caf::result<uint64_t> store_turn(self_ptr self, const store_writer_actor& writer) {
  auto& st = self->state;
  const auto turn = st.rec.turns.back().turn;
  auto rp = self->make_response_promise<uint64_t>();
  st.accepting = turn;
  st.accept_rp = rp;
  self->request(writer, std::chrono::seconds(30), write_atom::value, st.rec,
                static_cast<uint8_t>(change::accept))
      .then([self, turn](bool) mutable { turn_stored(self, turn); },
          [self, turn](caf::error& e) mutable {
            auto& st = self->state;
            st.accepting.reset();
            if (!st.accept_rp) return;
            auto rp = std::move(*st.accept_rp);
            st.accept_rp.reset();
            auto* t = running_turn(st);
            // Not stored: the table has the session as before the turn.
            if (t != nullptr && t->turn == turn && t->generated.empty()) st.rec.turns.pop_back();
            if (code_of(e) == errc::stale_epoch) {
              rp.deliver(std::move(e));
              return;
            }
            rp.deliver(e.category() == caf::atom("system")
                           ? make_error(errc::disconnected,
                                        "session " + st.rec.id + ": the store did not answer (" +
                                            caf::to_string(e) + "); retry")
                           : std::move(e));
          });
  return rp;
}

/// Alone with a store: the running turn's end goes to the store writer (a synced write of the
/// record and the turn's last tokens); its client hears of it once it is written. A full disk
/// (`overloaded`) is retried; another failure crashes the session, whose restart resubmits the
/// turn, so the end is written again.
void store_end(self_ptr self, const store_writer_actor& writer, seq_id seq, finish_reason why,
               const std::string& detail, int64_t retry_after_ms) {
  auto& st = self->state;
  if (st.ending) return;
  auto ended = st.rec;
  ended.turns.back().done = true;
  ended.turns.back().reason = why;
  st.ending = true;
  self->request(writer, std::chrono::seconds(30), write_atom::value, std::move(ended),
                static_cast<uint8_t>(change::structure))
      .then(
          [self, seq, why, detail, retry_after_ms](bool) {
            turn_ended(self, seq, why, detail, retry_after_ms);
          },
          [self, seq, why, detail, retry_after_ms](caf::error& err) {
            auto& st = self->state;
            st.ending = false;
            auto* t = running_turn(st);
            if (t == nullptr) return;
            if (code_of(err) == errc::overloaded || err.category() == caf::atom("system")) {
              // A full disk (or a store writer restarting): the turn has happened and stays
              // running until its end is durable. Its client waits; reads go on.
              if (st.end_retries++ == 0)
                st.ctx->log->report("session " + st.rec.id + ": the end of turn " +
                                    std::to_string(t->turn) + " waits for the disk: " +
                                    describe(err));
              self->delayed_send(self, end_retry_interval, done_atom::value, seq, why, detail,
                                 retry_after_ms);
              return;
            }
            if (code_of(err) == errc::stale_epoch) {
              self->send(t->sink, moved_atom::value, st.rec.id, t->turn, describe(err));
              self->quit();
              return;
            }
            // Let it crash: the restarted session has the turn still running in the table and
            // resubmits it, so the end is written again.
            self->quit(make_error(errc::failed, "session " + st.rec.id +
                                                    ": cannot record the end of turn " +
                                                    std::to_string(t->turn) + ": " +
                                                    describe(err)));
          });
}

/// With peers: the running turn's end goes to the ownership host; its client hears of it once
/// a majority of the group stored it. Until then the turn counts as running (no new turn); a
/// refusal for want of a majority is retried, as a full disk is without peers.
void end_turn(self_ptr self, seq_id seq, finish_reason why, const std::string& detail,
              int64_t retry_after_ms) {
  auto& st = self->state;
  if (st.ending) return;  // the host has it; its answer decides
  auto host = st.ctx->ownership_host();
  st.host = host;
  auto* t = running_turn(st);
  auto ended = *t;
  ended.done = true;
  ended.reason = why;
  auto retry = [self, seq, why, detail, retry_after_ms](const caf::error& err) {
    auto& st = self->state;
    if (st.end_retries++ == 0)
      st.ctx->log->report("session " + st.rec.id + ": the end of turn " +
                          std::to_string(st.rec.turns.back().turn) +
                          " waits for a majority: " + describe(err));
    self->delayed_send(self, end_retry_interval, done_atom::value, seq, why, detail,
                       retry_after_ms);
  };
  if (!host) {
    retry(make_error(errc::disconnected, "the ownership host is restarting"));
    return;
  }
  st.ending = true;
  self->request(host, st.ctx->ownership_wait, finish_atom::value, st.rec.id, ended.turn,
                ended.generated, turn_end(ended))
      .then(
          [self, seq, why, detail, retry_after_ms](bool) {
            auto& st = self->state;
            // The group holds the whole turn now.
            if (auto* t = running_turn(st); t && st.slot)
              st.table->sent_to_group(st.slot, t->turn, t->generated.size());
            turn_ended(self, seq, why, detail, retry_after_ms);
          },
          [self, retry](caf::error& e) {
            auto& st = self->state;
            st.ending = false;
            auto* t = running_turn(st);
            if (t == nullptr) return;
            if (code_of(e) == errc::stale_epoch) {
              // Another node owns the session now and ends the turn there: so does this actor.
              if (st.ctx->lost_session) st.ctx->lost_session(st.rec.id);
              self->send(t->sink, moved_atom::value, st.rec.id, t->turn, describe(e));
              self->quit();
              return;
            }
            retry(host_refusal(e, "session " + st.rec.id));
          });
}

/// A turn sent with the number the client expects (`expect` >= 0; keel.capnp `Session.send`):
/// a number past the next one is refused; a number taken already, whose input `same` accepts,
/// is that turn sent again (its first answer was lost): it streams to `sink` from index 0, and
/// the result is its number. nullopt: a new turn.
caf::expected<std::optional<uint64_t>> sent_again(
    self_ptr self, int64_t expect, const std::function<bool(const turn_record&)>& same,
    turn_sink_actor& sink) {
  auto& st = self->state;
  if (expect < 0) return std::optional<uint64_t>{};
  const auto e = static_cast<uint64_t>(expect);
  const auto have = st.rec.turns.size();
  if (e > have)
    return make_error(errc::bad_request, "session " + st.rec.id + " has " +
                                             std::to_string(have) + " turn(s): turn " +
                                             std::to_string(e) + " cannot be the next one");
  if (e == have) return std::optional<uint64_t>{};
  if (!same(st.rec.turns[e]))
    return make_error(errc::bad_request,
                      "session " + st.rec.id + ": turn " + std::to_string(e) + " has another " +
                          (st.rec.turns[e].messages.empty() ? "text" : "input"));
  if (st.accepting && *st.accepting == e)
    return make_error(errc::disconnected, "session " + st.rec.id + ": turn " +
                                              std::to_string(e) +
                                              " is being stored; send it again");
  if (st.ctx->may_serve_session && !st.ctx->may_serve_session(st.rec.id))
    return make_error(errc::disconnected, "session " + st.rec.id + ": node " + st.ctx->name +
                                              " has lost contact with the majority of the "
                                              "session's group; resume on another node");
  (void)resume(self, e, 0, std::move(sink), {});
  return std::optional<uint64_t>{e};
}

/// Whether a new turn may start: none runs and `max_tokens` is at least 1.
caf::error may_start(self_ptr self, int32_t max_tokens) {
  auto& st = self->state;
  if (auto* t = running_turn(st)) {
    return make_error(errc::bad_request, "session " + st.rec.id + ": turn " +
                                             std::to_string(t->turn) + " is still running");
  }
  if (max_tokens < 1) {
    return make_error(errc::bad_request,
                      "max_tokens must be at least 1, got " + std::to_string(max_tokens));
  }
  return {};
}

/// Starts new turn `t` (numbered, with its input and sink): acknowledged (the reply) only
/// after the turn is in a synced write (alone) or stored by a majority of its group (with
/// peers; ARCHITECTURE.md, guarantee 1); otherwise refused and undone.
caf::result<uint64_t> start_turn(self_ptr self, turn_record t) {
  auto& st = self->state;
  auto turn = t.turn;
  // This turn's tokens come from this node only: none for `resume` to adopt.
  st.rec.from_copy = false;
  st.rec.turns.push_back(std::move(t));
  if (st.ctx->ownership_host) return accept_turn(self);
  if (auto writer = st.ctx->store_writer()) return store_turn(self, writer);
  if (auto err = st.table->put(st.rec, change::accept)) {
    st.rec.turns.pop_back();
    return err;
  }
  submit(self);
  return turn;
}

/// Stops the running turn for the guardrail: the batcher cancels it, and its end (whenever the
/// batcher sends it) is recorded with `why` instead; no token after this one is taken.
void stop_turn(self_ptr self, finish_reason why, std::string detail, int64_t retry_after_ms) {
  auto& st = self->state;
  auto* t = running_turn(st);
  if (t == nullptr) return;
  st.stopping = session_state::stop{t->turn, why, std::move(detail), retry_after_ms};
  st.ctx->log->report("session " + st.rec.id + ": turn " + std::to_string(t->turn) + " stopped: " +
                      st.stopping->detail);
  if (st.batcher)
    self->send(st.batcher, cancel_atom::value, seq_of(st.rec, t->turn));
  else  // no batcher to end it: end it here
    self->send(self, done_atom::value, seq_of(st.rec, t->turn), why, st.stopping->detail,
               retry_after_ms);
}

/// The guardrail's look at the running reply: every `output_every` tokens the reply so far
/// (its last 16 KiB) goes to the guardrail, one check at a time, while the stream goes on. A
/// denial stops the turn (`filtered`, naming the rule); a check that failed under fail-closed
/// stops it too (`overloaded`, retry later); under fail-open the reply goes on.
void check_reply(self_ptr self) {
  auto& st = self->state;
  const auto& g = st.ctx->guard;
  if (!g->enabled() || st.guard_pending) return;
  auto* t = running_turn(st);
  if (t == nullptr || (st.stopping && st.stopping->turn == t->turn)) return;
  if (st.guard_turn != t->turn) {
    st.guard_turn = t->turn;
    st.guard_checked = 0;
  }
  auto every = static_cast<size_t>(std::max(g->config().output_every, 1));
  if (t->generated.size() < st.guard_checked + every) return;
  st.guard_checked = t->generated.size();
  std::string text;
  for (auto id : t->generated) text += st.ctx->tok->token_text(id);
  constexpr size_t window = 16 * 1024;
  if (text.size() > window) text.erase(0, text.size() - window);
  st.guard_pending = true;
  auto turn = t->turn;
  auto log = st.ctx->log;
  guard_check(self, g, guard_stage::output, std::move(text),
              [log](const std::string& line) { log->report(line); },
              [self, turn](guard_outcome o, const std::string& rule) {
                auto& st = self->state;
                st.guard_pending = false;
                auto* t = running_turn(st);
                if (t == nullptr || t->turn != turn) return;
                if (o == guard_outcome::denied)
                  stop_turn(self, finish_reason::filtered,
                            "the guardrail stopped the reply (" + rule + ")", 0);
                else if (o == guard_outcome::failed_closed)
                  stop_turn(self, finish_reason::overloaded,
                            "the guardrail could not check the reply in time, and this node stops "
                            "what it cannot check; retry later",
                            1000);
                else
                  check_reply(self);  // tokens that came meanwhile
              });
}

bool is_chat(const session_record& r) {
  return !r.turns.empty() && !r.turns[0].messages.empty();
}

/// `send_atom`: starts a turn of `text` whose reply goes to `sink`. `expect` (>= 0): the number
/// the client expects it to get (keel.capnp `Session.send`): the same text under a number taken
/// already is that turn, sent again (its tokens stream to `sink` from index 0).
caf::result<uint64_t> send_turn(self_ptr self, const std::string& text, int32_t max_tokens,
                                turn_sink_actor sink, int64_t expect, bool special) {
  check_fault(self);
  auto& st = self->state;
  const auto& tok = *st.ctx->tok;
  const auto parse = special ? special_tokens::on : special_tokens::off;
  auto again = sent_again(
      self, expect,
      [&](const turn_record& t) {
        return t.messages.empty() &&
               t.user == tok.encode(text, t.turn == 0 && tok.vocabulary().add_bos, parse);
      },
      sink);
  if (!again) return std::move(again.error());
  if (*again) return **again;
  if (is_chat(st.rec))
    return make_error(errc::bad_request, "session " + st.rec.id +
                                             " is a chat session (its turns carry messages): "
                                             "send messages (Session.chat), not text");
  if (auto err = may_start(self, max_tokens)) return err;
  if (text.empty()) return make_error(errc::bad_request, "session " + st.rec.id + ": empty turn");
  turn_record t;
  t.turn = st.rec.turns.size();
  t.user = tok.encode(text, t.turn == 0 && tok.vocabulary().add_bos, parse);
  t.max_tokens = max_tokens;
  t.sink = std::move(sink);
  return start_turn(self, std::move(t));
}

/// The session's chat template, parsed once: the first turn's (the session's own), or for a
/// session's first turn (or a record that lost it) the node's.
caf::expected<const chat_template*> session_template(self_ptr self) {
  auto& st = self->state;
  const bool own = !st.rec.turns.empty() && !st.rec.turns[0].chat_template.empty();
  const auto& text = own ? st.rec.turns[0].chat_template : st.ctx->chat_template;
  if (!st.tmpl || st.template_text != text) {
    auto parsed = chat_template::parse(text);
    if (!parsed)
      return make_error(code_of(parsed.error()),
                        "session " + st.rec.id + ": " + message_of(parsed.error()));
    st.tmpl = std::move(*parsed);
    st.template_text = text;
  }
  return &*st.tmpl;
}

/// `chat_atom`: starts a chat turn sending `messages` (docs/actors.md, "Chat turns"): the
/// session's template renders the whole conversation, and the turn feeds what the rendering
/// adds after what the model was fed (kernels/chat_prompt.hpp `next_chat_turn`). A chat
/// session's turns are all chat turns. `expect` as for `send_turn` (the same messages).
caf::result<uint64_t> chat_turn(self_ptr self, std::vector<turn_message> messages,
                                int32_t max_tokens, turn_sink_actor sink, int64_t expect) {
  check_fault(self);
  auto& st = self->state;
  auto again = sent_again(
      self, expect, [&](const turn_record& t) { return t.messages == messages; }, sink);
  if (!again) return std::move(again.error());
  if (*again) return **again;
  if (messages.empty())
    return make_error(errc::bad_request,
                      "session " + st.rec.id + ": a chat turn needs at least one message");
  if (!st.rec.turns.empty() && !is_chat(st.rec))
    return make_error(errc::bad_request,
                      "session " + st.rec.id +
                          " has text turns (Session.send): a chat turn cannot follow them; open "
                          "a new session for a chat");
  if (auto err = may_start(self, max_tokens)) return err;
  auto tmpl = session_template(self);
  if (!tmpl) return std::move(tmpl.error());
  std::vector<chat_exchange> past;
  for (auto& t : st.rec.turns) past.push_back({t.messages, t.generated});
  auto fed = fed_tokens(st.rec.turns, st.rec.turns.size(), false, replies_fed(self));
  auto prompt = next_chat_turn(**tmpl, *st.ctx->tok, past, messages, fed);
  if (!prompt)
    return make_error(code_of(prompt.error()),
                      "session " + st.rec.id + ": " + message_of(prompt.error()));
  if (prompt->tokens.empty())
    return make_error(errc::bad_request, "session " + st.rec.id +
                                             ": the chat template renders the turn as nothing");
  const auto ctx_len =
      session_context(st.rec, static_cast<size_t>(st.ctx->llm->config().ctx_len));
  const size_t have = prompt->keep >= 0 ? static_cast<size_t>(prompt->keep) : fed.size();
  if (have + prompt->tokens.size() >= ctx_len)
    return make_error(errc::bad_request, "the prompt has " + std::to_string(prompt->tokens.size()) +
                                             " tokens and the conversation " +
                                             std::to_string(have) + "; the context length is " +
                                             std::to_string(ctx_len));
  turn_record t;
  t.turn = st.rec.turns.size();
  t.user = std::move(prompt->tokens);
  t.messages = std::move(messages);
  t.keep = prompt->keep;
  if (t.turn == 0) t.chat_template = st.template_text;
  t.max_tokens = max_tokens;
  t.sink = std::move(sink);
  return start_turn(self, std::move(t));
}

session_actor::behavior_type session(self_ptr self, std::shared_ptr<node_context> ctx,
                      std::shared_ptr<session_table> table, session_record initial) {
  exceptions_as_failures(self);
  auto& st = self->state;
  st.ctx = std::move(ctx);
  st.table = std::move(table);
  if (st.table->dropped(initial.id)) {
    // Moved to another node while this actor was being (re)started: nothing to serve here.
    self->quit();
    return session_actor::behavior_type::make_empty_behavior();
  }
  if (auto saved = st.table->get(initial.id)) {
    st.rec = std::move(*saved);  // a restart: continue where the crashed incarnation was
  } else {
    // The node wrote a new session's record (synced) before starting it; this keeps a session
    // started without the node (tests) in the table.
    st.rec = std::move(initial);
    st.table->put(st.rec);
  }
  st.slot = st.table->handle_of(st.rec.id);
  if (st.ctx->ownership_host) {
    st.host = st.ctx->ownership_host();
    // What this node holds of the running turn came from the group (or went there).
    if (!st.rec.turns.empty()) {
      st.group_turn = st.rec.turns.back().turn;
      st.group_sent = st.rec.turns.back().generated.size();
    }
  }
  // A turn that was running when the previous incarnation died: resubmitting replaces the
  // batcher's copy and continues after the tokens this session has recorded.
  submit(self);
  self->set_down_handler([self](caf::down_msg& m) {
    auto& st = self->state;
    if (m.source == st.batcher.address()) {
      st.batcher = batcher_actor{};
      self->delayed_send(self, std::chrono::milliseconds(10), submit_atom::value);
    }
  });
  return {
      [self](send_atom, const std::string& text, int32_t max_tokens,
             turn_sink_actor sink) -> caf::result<uint64_t> {
        return send_turn(self, text, max_tokens, std::move(sink), -1, false);
      },
      [self](send_atom, const std::string& text, int32_t max_tokens, turn_sink_actor sink,
             int64_t expect) -> caf::result<uint64_t> {
        return send_turn(self, text, max_tokens, std::move(sink), expect, false);
      },
      [self](send_atom, const std::string& text, int32_t max_tokens, turn_sink_actor sink,
             int64_t expect, bool special) -> caf::result<uint64_t> {
        return send_turn(self, text, max_tokens, std::move(sink), expect, special);
      },
      [self](chat_atom, const std::vector<turn_message>& messages, int32_t max_tokens,
             turn_sink_actor sink, int64_t expect) -> caf::result<uint64_t> {
        return chat_turn(self, messages, max_tokens, std::move(sink), expect);
      },
      [self](submit_atom) { submit(self); },

      [self](token_atom, seq_id seq, int64_t index, int32_t token) {
        check_fault(self);
        auto& st = self->state;
        auto* t = running_turn(st);
        if (t == nullptr || seq != seq_of(st.rec, t->turn)) return;
        if (st.stopping && st.stopping->turn == t->turn) return;  // the guardrail stopped it
        // Exactly once: an index already recorded is a repeat (after a resubmission or attach).
        if (index != static_cast<int64_t>(t->generated.size())) return;
        t->generated.push_back(token);
        record_tokens(self);
        self->send(t->sink, token_atom::value, st.rec.id, t->turn, index, token,
                   st.ctx->tok->token_text(token));
        check_reply(self);
      },
      [self](done_atom, seq_id seq, finish_reason why, std::string detail,
             int64_t retry_after_ms) {
        auto& st = self->state;
        auto* t = running_turn(st);
        if (t == nullptr || seq != seq_of(st.rec, t->turn)) return;
        if (st.stopping && st.stopping->turn == t->turn) {
          why = st.stopping->why;
          detail = st.stopping->detail;
          retry_after_ms = st.stopping->retry_after_ms;
        }
        if (st.ctx->ownership_host) {
          end_turn(self, seq, why, detail, retry_after_ms);
          return;
        }
        if (auto writer = st.ctx->store_writer()) {
          store_end(self, writer, seq, why, detail, retry_after_ms);
          return;
        }
        t->done = true;
        t->reason = why;
        if (auto err = st.table->put(st.rec, change::structure);
            err && (code_of(err) == errc::overloaded || code_of(err) == errc::disconnected)) {
          // A full disk, or (with the ownership protocol) no majority of the session's group
          // stored the end yet: the turn has happened and stays running until its end is
          // durable. Its client waits; new turns are refused meanwhile, reads go on.
          t->done = false;
          if (st.end_retries++ == 0)
            st.ctx->log->report("session " + st.rec.id + ": the end of turn " +
                                std::to_string(t->turn) +
                                (code_of(err) == errc::overloaded ? " waits for the disk: "
                                                                  : " waits for a majority: ") +
                                describe(err));
          self->delayed_send(self, end_retry_interval, done_atom::value, seq, why, detail,
                             retry_after_ms);
          return;
        } else if (err) {
          if (code_of(err) == errc::stale_epoch) {
            // Another node owns the session now and ends the turn there: so does this actor.
            self->send(t->sink, moved_atom::value, st.rec.id, t->turn, describe(err));
            self->quit();
            return;
          }
          // Let it crash: the restarted session has the turn still running in the table and
          // resubmits it, so the end is written again.
          throw std::runtime_error("session " + st.rec.id + ": cannot record the end of turn " +
                                   std::to_string(t->turn) + ": " + describe(err));
        }
        st.end_retries = 0;
        self->send(t->sink, done_atom::value, st.rec.id, t->turn, why, detail, retry_after_ms);
      },
      [self](cancel_atom) {
        auto& st = self->state;
        if (auto* t = running_turn(st); t && st.batcher)
          self->send(st.batcher, cancel_atom::value, seq_of(st.rec, t->turn));
      },
      [self](get_atom) { return self->state.rec; },
      [self](resume_atom, uint64_t turn, int64_t from_index,
             turn_sink_actor sink) -> caf::result<bool> {
        return resume(self, turn, from_index, std::move(sink), {});
      },
      [self](resume_atom, uint64_t turn, int64_t from_index, turn_sink_actor sink,
             const std::vector<int32_t>& held) -> caf::result<bool> {
        return resume(self, turn, from_index, std::move(sink), held);
      },
      [self](detach_atom) {
        // The session's lease ran out (batcher_config::quorum_grace): the client resumes at the
        // new owner. The turn stays: if no one takes the session over, a later resume here
        // attaches again.
        auto& st = self->state;
        if (auto* t = running_turn(st); t && t->sink) {
          self->send(t->sink, moved_atom::value, st.rec.id, t->turn,
                     "node " + st.ctx->name +
                         " has lost contact with the majority of the session's group; resume on "
                         "another node");
          t->sink = turn_sink_actor{};
        }
      },
      [self](moved_atom, const std::string& detail) {
        // Another node owns the session now (node::lose): the running turn's client reconnects
        // and resumes there. The table refuses this actor's writes from now on.
        auto& st = self->state;
        if (st.accept_rp) {  // a new turn being stored: its client hears now, not at its timeout
          st.accept_rp->deliver(make_error(errc::disconnected, detail));
          st.accept_rp.reset();
        }
        if (auto* t = running_turn(st)) {
          self->send(t->sink, moved_atom::value, st.rec.id, t->turn, detail);
          if (st.batcher) self->send(st.batcher, cancel_atom::value, seq_of(st.rec, t->turn));
        }
        self->quit();
      },
      [self](history_atom) {
        std::vector<std::vector<int32_t>> out;
        for (auto& t : self->state.rec.turns) out.push_back(t.generated);
        return out;
      },
  };
}

}  // namespace

session_actor spawn_session(caf::actor_system& sys, std::shared_ptr<node_context> ctx,
                            std::shared_ptr<session_table> table, session_record initial) {
  return sys.spawn(session, std::move(ctx), std::move(table), std::move(initial));
}

namespace {

struct store_writer_state {
  static inline const char* name = "store_writer";
};

store_writer_actor::behavior_type store_writer(
    store_writer_actor::stateful_pointer<store_writer_state> self,
                           std::shared_ptr<session_table> table) {
  exceptions_as_failures(self);
  return {
      [table](write_atom, const session_record& r, uint8_t c) -> caf::result<bool> {
        if (auto err = table->put(r, static_cast<change>(c))) return err;
        return true;
      },
  };
}

}  // namespace

child_spec store_writer_spec(std::shared_ptr<session_table> table) {
  child_spec c;
  c.id = "store";
  c.start = [table](caf::actor_system& sys, const std::string&,
                    const caf::message&) -> caf::expected<caf::actor> {
    return caf::actor_cast<caf::actor>(sys.spawn<caf::detached>(store_writer, table));
  };
  return c;
}

child_spec session_spec(std::shared_ptr<node_context> ctx, std::shared_ptr<session_table> table) {
  child_spec c;
  c.id = "session";
  c.restart = restart_type::transient;
  c.shutdown.timeout = std::chrono::seconds(1);
  c.start = [ctx, table](caf::actor_system& sys, const std::string&,
                         const caf::message& args) -> caf::expected<caf::actor> {
    if (args.size() != 1 || !args.match_element<session_record>(0))
      return make_error(errc::bad_request, "session_sup: start expects one session_record");
    return caf::actor_cast<caf::actor>(
        spawn_session(sys, ctx, table, args.get_as<session_record>(0)));
  };
  return c;
}

}  // namespace keel
