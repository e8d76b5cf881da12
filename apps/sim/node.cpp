// keel-sim: the simulated node (apps/sim/detail.hpp).

#include <algorithm>
#include <iostream>

#include "apps/sim/detail.hpp"

namespace keel::sim::detail {

// ---- node ------------------------------------------------------------------------------------

int64_t node::now() {
  return offset_ + static_cast<int64_t>(static_cast<double>(w_.real()) * rate_);
}

void node::start(const ownership::config& cfg) {
  up_ = true;
  ++incarnation_;
  volatile_ = durable_;  // what was not synced is gone
  sink_.clear();
  opener_.clear();
  submit_.clear();
  streaming_.clear();
  engine_ = std::make_unique<ownership>(cfg, *this);
  engine_->recover(durable_, damaged_);
  damaged_ = false;
  paused_until = 0;
  auto inc = incarnation_;
  // The host's loops: the protocol's tick every 25 ms and a decode step every 20 ms (local).
  w_.at(w_.real() + static_cast<int64_t>(index_) * ms, [this, inc] {
    if (!up_ || incarnation_ != inc) return;
    tick();
    generate();
  });
}

size_t node::damage_store(uint64_t seed) {
  size_t lost = 0;
  for (auto i = durable_.begin(); i != durable_.end();) {
    seed = seed * 6364136223846793005ull + 1442695040888963407ull;
    if ((seed >> 63) != 0) {
      i = durable_.erase(i);
      ++lost;
    } else {
      ++i;
    }
  }
  // The store's salvage marks the node amnesiac in the same rebuild (a keel-node refuses to
  // start when it cannot: node.cpp), so no later start forgets it.
  stored_session mark;
  mark.promised = {1, ownership::amnesia_key};
  durable_[ownership::amnesia_key] = mark;
  volatile_ = durable_;
  damaged_ = true;
  return lost;
}

void node::crash() {
  up_ = false;
  ++incarnation_;
  engine_.reset();
  volatile_ = durable_;
}

void node::tick() {
  auto inc = incarnation_;
  if (w_.real() < paused_until) {
    w_.at(paused_until, [this, inc] {
      if (up_ && incarnation_ == inc) tick();
    });
    return;
  }
  engine_->tick();
  w_.at(w_.real() + static_cast<int64_t>(25.0 * ms / rate_), [this, inc] {
    if (up_ && incarnation_ == inc) tick();
  });
}

void node::generate() {
  auto inc = incarnation_;
  auto again = [this, inc](int64_t t) {
    w_.at(t, [this, inc] {
      if (up_ && incarnation_ == inc) generate();
    });
  };
  if (w_.real() < paused_until) {
    again(paused_until);
    return;
  }
  std::vector<std::string> ids(streaming_.begin(), streaming_.end());
  for (auto& s : ids) {
    if (!engine_ || !engine_->may_serve(s)) continue;
    auto* d = engine_->data(s);
    if (d == nullptr || d->turns.empty() || d->turns.back().done) {
      streaming_.erase(s);
      continue;
    }
    size_t turn = d->turns.size() - 1;
    size_t index = d->turns.back().tokens.size();
    std::vector<std::string> users;
    for (auto& t : d->turns) users.push_back(t.user);
    auto c = engine_->copy(s);
    ballot b = c ? c->promised : ballot{};
    if (index < turn_length(s, turn)) {
      int32_t tok = token_of(s, users, turn, index);
      engine_->append_tokens(s, turn, index, {tok});
      w_.served(s, name_, b, "token");
      auto k = sink_.find(s);
      if (k != sink_.end()) {
        client_msg m{client_msg::token, s, turn, index, tok, {}, {}, {}};
        reply(k->second, std::move(m));
      }
    } else {
      engine_->finish_turn(s, turn);
      streaming_.erase(s);
    }
  }
  again(w_.real() + static_cast<int64_t>(20.0 * ms / rate_));
}

void node::send(const std::string& to, ownership_msg m) {
  w_.peer_send(name_, to, std::move(m));
}

bool node::store(const std::string& session, const stored_session& s, bool sync) {
  if (failing_writes > 0) {
    --failing_writes;
    w_.trace(name_ + ": disk write of " + session + " failed");
    return false;
  }
  volatile_[session] = s;
  if (sync) durable_ = volatile_;  // a synced write makes every earlier write durable too
  return true;
}

void node::acquired(const std::string& session) {
  w_.trace(name_ + ": owns " + session + " at " + to_string(engine_->copy(session)->promised));
  w_.took_over();
  auto* d = engine_->data(session);
  if (d && !d->turns.empty() && !d->turns.back().done) streaming_.insert(session);
  auto o = opener_.find(session);
  if (o != opener_.end()) {
    reply(o->second, client_msg{client_msg::opened, session, 0, 0, 0, {}, {}, {}});
    opener_.erase(o);
  }
}

void node::lost(const std::string& session) {
  w_.trace(name_ + ": lost " + session);
  streaming_.erase(session);
  auto k = sink_.find(session);
  if (k != sink_.end()) {
    reply(k->second, client_msg{client_msg::moved, session, 0, 0, 0, {}, {}, {}});
    sink_.erase(k);
  }
}

void node::durable(const std::string& session, uint64_t turn, bool finished) {
  auto c = engine_->copy(session);
  ballot b = c ? c->promised : ballot{};
  if (finished) {
    auto k = sink_.find(session);
    auto* d = engine_->data(session);
    if (k != sink_.end() && d && turn < d->turns.size()) {
      w_.served(session, name_, b, "done");
      reply(k->second, client_msg{client_msg::done, session, turn, d->turns[turn].tokens.size(), 0,
                                  {}, {}, {}});
    }
    return;
  }
  auto s = submit_.find({session, turn});
  if (s == submit_.end()) return;
  w_.served(session, name_, b, "ack");
  sink_[session] = s->second;
  reply(s->second, client_msg{client_msg::ack, session, turn, 0, 0, {}, {}, {}});
  submit_.erase(s);
  auto* d = engine_->data(session);
  if (d && turn + 1 == d->turns.size() && !d->turns.back().done) streaming_.insert(session);
}

void node::reply(const std::string& client, client_msg m) {
  w_.client_send(name_, client, std::move(m));
}

void node::stream_from(const std::string& session, uint64_t turn, size_t from) {
  auto* d = engine_->data(session);
  if (!d || turn >= d->turns.size()) return;
  auto c = engine_->copy(session);
  ballot b = c ? c->promised : ballot{};
  auto& t = d->turns[turn];
  for (size_t i = from; i < t.tokens.size(); ++i) {
    w_.served(session, name_, b, "token");
    reply(sink_[session], client_msg{client_msg::token, session, turn, i, t.tokens[i], {}, {}, {}});
  }
  if (t.done) {
    w_.served(session, name_, b, "done");
    reply(sink_[session], client_msg{client_msg::done, session, turn, t.tokens.size(), 0, {}, {}, {}});
  }
}

void node::on_peer(const std::string& from, const ownership_msg& m) {
  engine_->receive(from, m);
}

void node::on_client(const std::string& from, const client_msg& m) {
  auto refuse = [&](const std::string& why, std::string hint) {
    reply(from, client_msg{client_msg::refused, m.session, m.turn, 0, 0, why, std::move(hint), {}});
  };
  auto& e = *engine_;
  const auto& group = e.group(m.session);
  bool member = std::find(group.begin(), group.end(), name_) != group.end();
  auto hint = e.owner_hint(m.session);
  if (hint == name_) hint.clear();
  if (!member) {
    refuse("not in the group", group.front());
    return;
  }
  switch (m.kind) {
    case client_msg::open: {
      if (e.owns(m.session)) {
        if (e.may_serve(m.session)) {
          reply(from, client_msg{client_msg::opened, m.session, 0, 0, 0, {}, {}, {}});
          return;
        }
        refuse("no quorum", {});
        return;
      }
      if (!hint.empty()) {
        refuse("owned elsewhere", hint);
        return;
      }
      opener_[m.session] = from;
      e.open(m.session, "meta");
      return;
    }
    case client_msg::submit: {
      // Set first: a turn already durable is acknowledged from within submit_turn.
      submit_[{m.session, m.turn}] = from;
      auto r = e.submit_turn(m.session, m.turn, m.text);
      if (r == refusal::none) return;
      submit_.erase({m.session, m.turn});
      refuse(to_string(r), hint);
      return;
    }
    case client_msg::resume: {
      if (!e.owns(m.session)) {
        refuse("not owner", hint);
        return;
      }
      if (!e.may_serve(m.session)) {
        refuse("no quorum", {});
        return;
      }
      auto* d = e.data(m.session);
      if (m.turn >= d->turns.size()) {
        refuse("unknown turn", {});
        return;
      }
      sink_[m.session] = from;
      // Tokens the client holds past this copy (its checkpoint lags) are adopted when they are
      // what this node would generate; the model is deterministic, so they always are here.
      auto& t = d->turns[m.turn];
      if (m.turn + 1 == d->turns.size() && !t.done && m.held.size() > t.tokens.size()) {
        std::vector<std::string> users;
        for (auto& x : d->turns) users.push_back(x.user);
        std::vector<int32_t> extra;
        for (size_t i = t.tokens.size(); i < m.held.size(); ++i) {
          if (m.held[i] != token_of(m.session, users, m.turn, i)) break;
          extra.push_back(m.held[i]);
        }
        if (!extra.empty()) e.append_tokens(m.session, m.turn, t.tokens.size(), extra);
        d = e.data(m.session);
      }
      stream_from(m.session, m.turn, m.index);
      if (!d->turns[m.turn].done) streaming_.insert(m.session);
      return;
    }
    default:
      return;
  }
}

}  // namespace keel::sim::detail
