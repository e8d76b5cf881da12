#include "actors/ownership_host.hpp"

#include <algorithm>
#include <climits>
#include <optional>
#include <set>
#include <tuple>

#include "actors/ownership_codec.hpp"
#include "base/error.hpp"

namespace keel {

ownership_clock steady_ownership_clock() {
  return [] {
    return static_cast<int64_t>(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                    std::chrono::steady_clock::now().time_since_epoch())
                                    .count());
  };
}

bool lease_board::may_serve(const std::string& session) const {
  auto now = clock_();
  std::lock_guard<std::mutex> guard(mu_);
  auto i = until_.find(session);
  return i != until_.end() && now < i->second;
}

int64_t lease_board::until(const std::string& session) const {
  std::lock_guard<std::mutex> guard(mu_);
  auto i = until_.find(session);
  return i == until_.end() ? INT64_MIN : i->second;
}

void lease_board::set(const std::string& session, int64_t until) {
  std::lock_guard<std::mutex> guard(mu_);
  if (until == INT64_MIN)
    until_.erase(session);
  else
    until_[session] = until;
}

std::vector<std::string> lease_board::sessions() const {
  std::lock_guard<std::mutex> guard(mu_);
  std::vector<std::string> out;
  for (auto& [s, u] : until_) out.push_back(s);
  return out;
}

namespace {

template <class T>
struct waiter {
  caf::typed_response_promise<T> promise;
  int64_t deadline = 0;
  int64_t asked = 0;  // by the host's clock
};

struct host_state;

/// What the protocol asks of the node, answered from the host's configuration.
class host_env final : public ownership_env {
 public:
  explicit host_env(host_state& st) : st_(st) {}
  int64_t now() override;
  void send(const std::string& to, ownership_msg m) override;
  bool store(const std::string& session, const stored_session& s, bool sync) override;
  void acquired(const std::string& session) override;
  void lost(const std::string& session) override;
  void durable(const std::string& session, uint64_t turn, bool finished) override;
  double room(const std::string& node) override;
  bool may_own(const std::string& session, const session_data& data) override;

 private:
  host_state& st_;
};

struct host_state {
  ownership_host_config cfg;
  std::unique_ptr<host_env> env;
  std::unique_ptr<ownership> engine;
  std::map<std::string, std::vector<waiter<session_data>>> opens;
  // (session, turn, finished) -> requests waiting for that durable event
  std::map<std::tuple<std::string, uint64_t, bool>, std::vector<waiter<bool>>> acks;
  std::optional<int64_t> last_bad_log;
  uint64_t bad_messages = 0;

  int64_t deadline() const {
    return cfg.clock() + std::chrono::duration_cast<std::chrono::nanoseconds>(cfg.ack_timeout).count();
  }

  template <class T>
  waiter<T> wait_for(caf::typed_response_promise<T> rp) const {
    auto now = cfg.clock();
    return {std::move(rp), now + std::chrono::duration_cast<std::chrono::nanoseconds>(cfg.ack_timeout).count(), now};
  }

  void log(const std::string& line) const {
    if (cfg.log) cfg.log(line);
  }

  /// Publishes every session's lease, and fails the requests past their deadline.
  void settle() {
    auto& board = *cfg.leases;
    auto owned = engine->owned_sessions();
    auto listed = board.sessions();
    owned.insert(owned.end(), listed.begin(), listed.end());
    std::sort(owned.begin(), owned.end());
    owned.erase(std::unique(owned.begin(), owned.end()), owned.end());
    for (auto& s : owned) board.set(s, engine->serve_until(s));
    if (cfg.copies) cfg.copies(engine->copies_for_others());
    auto now = cfg.clock();
    // A new session or turn the group did not store in time: this node gives the session up
    // (below), so that what the node serves never differs from what the group holds. The engine
    // keeps an appended turn and goes on writing it, and the host's node has undone it: were the
    // session kept here, the turn would surface later (or block the next one). Its group's next
    // owner starts from the majority's copy, which decides whether the turn exists.
    std::set<std::string> give_up;
    for (auto i = opens.begin(); i != opens.end();) {
      if (expire(i->second, now, "session " + i->first + ": no majority of its group granted it"))
        give_up.insert(i->first);
      i = i->second.empty() ? opens.erase(i) : std::next(i);
    }
    for (auto i = acks.begin(); i != acks.end();) {
      auto& [s, turn, finished] = i->first;
      if (expire(i->second, now,
                 "session " + s + ": " + (finished ? "the end of turn " : "turn ") +
                     std::to_string(turn) + " was not stored by a majority of its group within " +
                     std::to_string(cfg.ack_timeout.count()) + " ms") &&
          !finished)
        give_up.insert(s);
      i = i->second.empty() ? acks.erase(i) : std::next(i);
    }
    for (auto& s : give_up) {
      if (!engine->owns(s)) continue;
      log("session " + s + ": its group did not store a new session or turn in time; this node " +
          "gives it up to the group's next owner");
      engine->resign(s);
      board.set(s, INT64_MIN);
      fail_waiting(s, make_error(errc::disconnected,
                                 "session " + s + ": given up to its group's next owner; retry"));
      if (cfg.lost) cfg.lost(s);
    }
  }

  /// Fails the waiters past their deadline; whether any was.
  template <class T>
  static bool expire(std::vector<waiter<T>>& ws, int64_t now, const std::string& why) {
    bool any = false;
    for (auto w = ws.begin(); w != ws.end();) {
      if (now >= w->deadline) {
        w->promise.deliver(make_error(errc::disconnected, why + "; send it again"));
        w = ws.erase(w);
        any = true;
      } else {
        ++w;
      }
    }
    return any;
  }

  /// The error for a refused request on `session`.
  caf::error refused(refusal r, const std::string& session) {
    std::string group;
    for (auto& m : engine->group(session)) group += (group.empty() ? "" : ", ") + m;
    switch (r) {
      case refusal::not_owner: {
        auto owner = engine->owner_hint(session);
        // Another node owns it: `stale_epoch`, so that the node stops serving it here (a host
        // restarted alone took nothing back from that node, and no `lost` came).
        if (!owner.empty() && owner != cfg.protocol.self)
          return make_error(errc::stale_epoch, "session " + session +
                                                   ": this node does not own it (" + owner +
                                                   " does)");
        return make_error(errc::disconnected, "session " + session + ": this node does not own it");
      }
      case refusal::no_quorum:
        return make_error(errc::disconnected, "session " + session +
                                                  ": no majority of its group (" + group +
                                                  ") answers this node now");
      case refusal::busy:
        return make_error(errc::bad_request, "session " + session + ": a turn is still running");
      case refusal::bad_turn:
        return make_error(errc::bad_request,
                          "session " + session +
                              ": the turn does not follow the session's turns, or another "
                              "input was stored under its number");
      case refusal::not_in_group:
        return make_error(errc::bad_request, "session " + session + ": this node (" +
                                                 cfg.protocol.self +
                                                 ") is not in its group (" + group + ")");
      case refusal::none:
        break;
    }
    return {};
  }

  /// Fails every request waiting on `session` (an open, a turn, a turn's end) with `err`.
  void fail_waiting(const std::string& session, const caf::error& err) {
    if (auto i = opens.find(session); i != opens.end()) {
      for (auto& w : i->second) w.promise.deliver(err);
      opens.erase(i);
    }
    for (auto i = acks.begin(); i != acks.end();) {
      if (std::get<0>(i->first) != session) {
        ++i;
        continue;
      }
      for (auto& w : i->second) w.promise.deliver(err);
      i = acks.erase(i);
    }
  }

  bool member(const std::string& name) const {
    for (auto& m : cfg.protocol.members)
      if (m.name == name) return true;
    return false;
  }

  /// A message that decodes, from a member, whose ballots name their sender where they must.
  void receive(const std::string& from, const std::string& bytes) {
    std::string why;
    auto m = decode_ownership_msg(bytes);
    if (!m) {
      why = message_of(m.error());
    } else if (!member(from) || from == cfg.protocol.self) {
      why = "'" + from + "' is not another member of the cluster";
    } else if (auto* p = std::get_if<prepare_msg>(&*m); p && p->b.owner != from) {
      why = "a prepare for ballot " + to_string(p->b) + " sent by " + from;
    } else if (auto* w = std::get_if<write_msg>(&*m); w && w->b.owner != from) {
      why = "a write at ballot " + to_string(w->b) + " sent by " + from;
    }
    if (why.empty()) return engine->receive(from, *m);
    ++bad_messages;
    auto now = cfg.clock();
    if (!last_bad_log || now - *last_bad_log >= 1'000'000'000) {
      last_bad_log = now;
      log("ownership: dropped a message from " + from + ": " + why + " (" +
          std::to_string(bad_messages) + " dropped so far)");
    }
  }
};

int64_t host_env::now() {
  return st_.cfg.clock();
}

void host_env::send(const std::string& to, ownership_msg m) {
  st_.cfg.transport->send(to, encode(m));
}

bool host_env::store(const std::string& session, const stored_session& s, bool sync) {
  return st_.cfg.storage->put(session, s, sync);
}

void host_env::acquired(const std::string& session) {
  // The lease first: whoever hears of the acquisition (the node, the opener) may serve at once.
  st_.cfg.leases->set(session, st_.engine->serve_until(session));
  const session_data* d = st_.engine->data(session);
  session_data data = d ? *d : session_data{};
  const stored_session* copy = st_.engine->copy(session);
  if (st_.cfg.acquired) st_.cfg.acquired(session, data, copy ? copy->accepted.epoch : 0);
  auto i = st_.opens.find(session);
  if (i == st_.opens.end()) return;
  for (auto& w : i->second) w.promise.deliver(data);
  st_.opens.erase(i);
}

void host_env::lost(const std::string& session) {
  st_.cfg.leases->set(session, INT64_MIN);
  if (st_.cfg.lost) st_.cfg.lost(session);
  auto owner = st_.engine->owner_hint(session);
  st_.fail_waiting(session, make_error(errc::stale_epoch,
                                       "session " + session + ": taken over by " +
                                           (owner.empty() ? "another node" : owner)));
}

bool host_env::may_own(const std::string&, const session_data& data) {
  return st_.cfg.may_own ? st_.cfg.may_own(data) : true;
}

double host_env::room(const std::string& node) {
  return st_.cfg.room ? st_.cfg.room(node) : 1.0;
}

void host_env::durable(const std::string& session, uint64_t turn, bool finished) {
  auto i = st_.acks.find({session, turn, finished});
  if (i == st_.acks.end()) return;
  auto now = st_.cfg.clock();
  for (auto& w : i->second) {
    if (st_.cfg.acknowledged) st_.cfg.acknowledged(std::chrono::nanoseconds(now - w.asked));
    w.promise.deliver(true);
  }
  st_.acks.erase(i);
}

using host_pointer = ownership_actor::stateful_pointer<host_state>;

ownership_actor::behavior_type host_behavior(host_pointer self, ownership_host_config cfg) {
  auto& st = self->state;
  if (!cfg.clock) cfg.clock = steady_ownership_clock();
  st.cfg = std::move(cfg);
  st.env = std::make_unique<host_env>(st);
  st.engine = std::make_unique<ownership>(st.cfg.protocol, *st.env);
  st.engine->recover(st.cfg.storage->load(), st.cfg.forgets);
  st.settle();
  self->send(self, tick_atom::value);
  return {
      [self](peer_message_atom, const std::string& from, const std::string& bytes) {
        auto& st = self->state;
        st.receive(from, bytes);
        st.settle();
      },
      [self](open_atom, const std::string& session,
             const std::string& meta) -> caf::typed_response_promise<session_data> {
        auto& st = self->state;
        auto rp = self->make_response_promise<session_data>();
        auto r = st.engine->owns(session) || st.engine->reaches_majority(session)
                     ? st.engine->open(session, meta)
                     : refusal::no_quorum;
        if (r != refusal::none) {
          rp.deliver(st.refused(r, session));
        } else if (st.engine->may_serve(session)) {
          rp.deliver(*st.engine->data(session));
        } else {
          st.opens[session].push_back(st.wait_for(rp));
        }
        st.settle();
        return rp;
      },
      [self](submit_atom, const std::string& session, uint64_t turn,
             const std::string& user) -> caf::typed_response_promise<bool> {
        auto& st = self->state;
        auto rp = self->make_response_promise<bool>();
        // Registered first: the engine fires `durable` from inside submit_turn when it can.
        auto& ws = st.acks[{session, turn, false}];
        ws.push_back(st.wait_for(rp));
        auto r = st.engine->submit_turn(session, turn, user);
        if (r != refusal::none) {
          auto i = st.acks.find({session, turn, false});
          if (i != st.acks.end() && !i->second.empty()) {
            i->second.pop_back();
            if (i->second.empty()) st.acks.erase(i);
          }
          rp.deliver(st.refused(r, session));
        }
        st.settle();
        return rp;
      },
      [self](own_tokens_atom, const std::string& session, uint64_t turn, uint64_t from,
             const std::vector<int32_t>& tokens) {
        auto& st = self->state;
        st.engine->append_tokens(session, turn, from, tokens);
        st.settle();
      },
      [self](finish_atom, const std::string& session, uint64_t turn,
             const std::vector<int32_t>& tokens,
             const std::string& end) -> caf::typed_response_promise<bool> {
        auto& st = self->state;
        auto rp = self->make_response_promise<bool>();
        if (!st.engine->owns(session)) {
          rp.deliver(st.refused(refusal::not_owner, session));
          return rp;
        }
        st.acks[{session, turn, true}].push_back(st.wait_for(rp));
        st.engine->append_tokens(session, turn, 0, tokens);
        st.engine->finish_turn(session, turn, end);
        st.settle();
        return rp;
      },
      [self](describe_atom, const std::string& session) -> ownership_view {
        auto& st = self->state;
        ownership_view v;
        v.session = session;
        v.owned = st.engine->owns(session);
        v.serving = st.engine->may_serve(session);
        v.owner = st.engine->owner_hint(session);
        v.group = st.engine->group(session);
        if (auto* c = st.engine->copy(session)) {
          v.promised = c->promised;
          v.accepted = c->accepted;
          v.turns = c->data.turns.size();
        }
        return v;
      },
      [self](resign_atom, const std::string& session) -> bool {
        auto& st = self->state;
        bool owned = st.engine->owns(session);
        st.engine->resign(session);
        st.cfg.leases->set(session, INT64_MIN);
        // Nothing it waited for will be acknowledged here.
        st.fail_waiting(session, make_error(errc::stale_epoch,
                                            "session " + session +
                                                ": handed over (the node drains); resume on "
                                                "another node"));
        st.settle();
        return owned;
      },
      [self](tick_atom) {
        auto& st = self->state;
        st.engine->tick();
        st.settle();
        self->delayed_send(self, st.cfg.tick, tick_atom::value);
      },
  };
}

}  // namespace

caf::error host_refusal(const caf::error& e, const std::string& what) {
  if (e.category() == caf::atom("system"))
    return make_error(errc::disconnected, what + ": the ownership host did not answer (" +
                                              caf::to_string(e) + "); retry");
  if (code_of(e) == errc::stale_epoch)
    return make_error(errc::disconnected, message_of(e) + "; retry (any node forwards there)");
  return e;
}

ownership_actor spawn_ownership_host(caf::actor_system& sys, ownership_host_config cfg) {
  return sys.spawn<caf::detached>(host_behavior, std::move(cfg));
}

}  // namespace keel
