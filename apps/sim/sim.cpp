#include "apps/sim/sim.hpp"

#include <algorithm>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <queue>
#include <set>
#include <vector>

namespace keel::sim {

namespace {

constexpr int64_t ms = 1'000'000;

/// splitmix64: the run's only source of randomness.
class rng {
 public:
  explicit rng(uint64_t seed) : s_(seed) {}
  uint64_t next() {
    uint64_t z = (s_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  int64_t range(int64_t lo, int64_t hi) {  // [lo, hi]
    return lo + static_cast<int64_t>(next() % static_cast<uint64_t>(hi - lo + 1));
  }
  double unit() { return static_cast<double>(next() >> 11) / 9007199254740992.0; }
  bool chance(double p) { return unit() < p; }

 private:
  uint64_t s_;
};

uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

uint64_t hash_str(uint64_t h, const std::string& s) {
  for (unsigned char c : s) h = mix(h, c);
  return mix(h, s.size());
}

/// The model: a token is a function of the session, every user input up to its turn, and its
/// index. A node whose copy lacks a turn, or has another one, produces other tokens.
int32_t token_of(const std::string& session, const std::vector<std::string>& users, size_t turn,
                 size_t index) {
  uint64_t h = hash_str(7, session);
  for (size_t t = 0; t <= turn && t < users.size(); ++t) h = hash_str(h, users[t]);
  h = mix(h, turn);
  h = mix(h, index);
  return static_cast<int32_t>(h % 32000);
}

size_t turn_length(const std::string& session, size_t turn) {
  return 5 + static_cast<size_t>(mix(hash_str(11, session), turn) % 30);
}

std::string user_text(const std::string& session, size_t turn) {
  return session + "/turn-" + std::to_string(turn);
}

/// Between a client and a node (over the client API in a real cluster).
struct client_msg {
  enum kind_t : uint8_t { open, submit, resume, opened, ack, token, done, refused, moved } kind;
  std::string session;
  uint64_t turn = 0;
  uint64_t index = 0;
  int32_t tok = 0;
  std::string text;  // submit: the user's input; refused: the reason
  std::string hint;  // refused: a node to ask instead
  std::vector<int32_t> held;
};

class world;

/// One simulated keel-node: the ownership protocol plus a tiny host (the generation loop and
/// the client API), a store with synced and buffered writes, and a drifting clock.
class node final : public ownership_env {
 public:
  node(world& w, int index, std::string name, std::string region, double rate, int64_t offset)
      : w_(w), index_(index), name_(std::move(name)), region_(std::move(region)), rate_(rate),
        offset_(offset) {}

  void start(const ownership::config& cfg);
  void crash();
  void on_peer(const std::string& from, const ownership_msg& m);
  void on_client(const std::string& from, const client_msg& m);
  void tick();
  void generate();

  // ownership_env
  int64_t now() override;
  void send(const std::string& to, ownership_msg m) override;
  bool store(const std::string& session, const stored_session& s, bool sync) override;
  void acquired(const std::string& session) override;
  void lost(const std::string& session) override;
  void durable(const std::string& session, uint64_t turn, bool finished) override;

  const std::string& name() const { return name_; }
  const std::string& region() const { return region_; }
  bool up() const { return up_; }
  uint64_t incarnation() const { return incarnation_; }
  ownership* engine() { return engine_.get(); }
  const std::map<std::string, stored_session>& durable_store() const { return durable_; }
  int failing_writes = 0;  // the next N store writes fail (a failing disk)
  int64_t paused_until = 0;

 private:
  void reply(const std::string& client, client_msg m);
  void stream_from(const std::string& session, uint64_t turn, size_t from);

  world& w_;
  int index_;
  std::string name_, region_;
  double rate_;
  int64_t offset_;
  bool up_ = false;
  uint64_t incarnation_ = 0;
  std::unique_ptr<ownership> engine_;
  std::map<std::string, stored_session> durable_, volatile_;
  // Host state, lost on a crash.
  std::map<std::string, std::string> sink_;                         // session -> client
  std::map<std::string, std::string> opener_;                       // session -> client
  std::map<std::pair<std::string, uint64_t>, std::string> submit_;  // (session, turn) -> client
  std::set<std::string> streaming_;  // sessions whose running turn may generate
};

class client {
 public:
  client(world& w, std::string name, std::string session, size_t turns, int first)
      : w_(w), name_(std::move(name)), session_(std::move(session)), turns_(turns),
        target_(first) {}
  void start();
  void on_msg(const std::string& from, const client_msg& m);
  void tick();
  bool finished() const { return phase_ == phase::finished; }
  const std::string& session() const { return session_; }
  const std::string& name() const { return name_; }
  /// Acknowledged turns: turn -> user input.
  const std::map<uint64_t, std::string>& acknowledged() const { return acked_; }
  size_t turn() const { return turn_; }

 private:
  enum class phase { opening, sending, streaming, finished };
  void request();
  void next_target(const std::string& hint);

  world& w_;
  std::string name_, session_;
  size_t turns_;
  int target_;
  phase phase_ = phase::opening;
  size_t turn_ = 0;
  std::vector<std::string> users_;
  std::vector<int32_t> got_;  // the running turn's tokens received in order
  int64_t last_progress_ = 0;
  int64_t next_try_ = 0;
  bool rotate_ = true;  // an unanswered request: the next try goes to another node
  std::map<uint64_t, std::string> acked_;
};

class world {
 public:
  explicit world(const options& opt);
  result run();

  // Used by nodes and clients.
  int64_t real() const { return now_; }
  void at(int64_t t, std::function<void()> f) {
    queue_.push(event{std::max(t, now_), seq_++, std::move(f)});
  }
  void peer_send(const std::string& from, const std::string& to, ownership_msg m);
  void client_send(const std::string& from, const std::string& to, client_msg m);
  node* find(const std::string& name);
  int node_count() const { return static_cast<int>(nodes_.size()); }
  node& node_at(int i) { return *nodes_[static_cast<size_t>(i)]; }
  rng& random() { return rng_; }
  void trace(const std::string& what);
  void note(uint64_t v) { digest_ = mix(digest_, v); }
  const options& opt() const { return opt_; }
  ownership::config config_for(const std::string& name) const;

  // The checker's inputs.
  void served(const std::string& session, const std::string& node, const ballot& b,
              const char* what);
  void violation(const std::string& guarantee, const std::string& detail);
  void checked_token() { ++res_.tokens_checked; }
  void acknowledged_turn() { ++res_.turns_acknowledged; }
  void took_over() { ++res_.takeovers; }
  bool failed() const { return !res_.ok; }

 private:
  struct event {
    int64_t t;
    uint64_t seq;
    std::function<void()> f;
    bool operator>(const event& o) const { return t != o.t ? t > o.t : seq > o.seq; }
  };
  void schedule_faults();
  void scenario_faults();
  void heal_all();
  bool blocked(const std::string& from, const std::string& to) const;
  void final_check();

  options opt_;
  rng rng_;
  int64_t now_ = 0;
  uint64_t seq_ = 0;
  std::priority_queue<event, std::vector<event>, std::greater<event>> queue_;
  std::vector<std::unique_ptr<node>> nodes_;
  std::vector<std::unique_ptr<client>> clients_;
  std::vector<cluster_member> members_;
  // Network faults.
  std::set<std::pair<std::string, std::string>> cut_;  // directed pairs that drop everything
  double loss_ = 0, duplicate_ = 0;
  int64_t delay_max_ = 2 * ms;
  // History.
  std::map<std::string, std::pair<ballot, std::string>> last_served_;  // session -> (ballot, node)
  result res_;
  uint64_t digest_ = 0;
};

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
  engine_->recover(durable_);
  paused_until = 0;
  auto inc = incarnation_;
  // The host's loops: the protocol's tick every 25 ms and a decode step every 20 ms (local).
  w_.at(w_.real() + static_cast<int64_t>(index_) * ms, [this, inc] {
    if (!up_ || incarnation_ != inc) return;
    tick();
    generate();
  });
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

// ---- client ----------------------------------------------------------------------------------

void client::start() {
  for (size_t t = 0; t < turns_; ++t) users_.push_back(user_text(session_, t));
  last_progress_ = w_.real();
  request();
  w_.at(w_.real() + 50 * ms, [this] { tick(); });
}

void client::next_target(const std::string& hint) {
  if (!hint.empty()) {
    for (int i = 0; i < w_.node_count(); ++i)
      if (w_.node_at(i).name() == hint) {
        target_ = i;
        return;
      }
  }
  target_ = (target_ + 1) % w_.node_count();
}

void client::request() {
  auto to = w_.node_at(target_).name();
  next_try_ = w_.real() + 400 * ms;
  rotate_ = true;
  w_.trace(name_ + ": request " + std::to_string(static_cast<int>(phase_)) + " turn " +
           std::to_string(turn_) + " to " + to);
  switch (phase_) {
    case phase::opening:
      w_.client_send(name_, to, client_msg{client_msg::open, session_, 0, 0, 0, {}, {}, {}});
      break;
    case phase::sending:
      w_.client_send(name_, to,
                     client_msg{client_msg::submit, session_, turn_, 0, 0, users_[turn_], {}, {}});
      break;
    case phase::streaming:
      w_.client_send(name_, to,
                     client_msg{client_msg::resume, session_, turn_, got_.size(), 0, {}, {}, got_});
      break;
    case phase::finished:
      break;
  }
}

void client::tick() {
  if (phase_ == phase::finished) return;
  // No answer, or a stream that stopped: try the next node (the same request: idempotent).
  bool stalled = phase_ != phase::streaming || w_.real() - last_progress_ >= 600 * ms;
  if (w_.real() >= next_try_ && stalled) {
    if (rotate_) next_target({});
    request();
  }
  w_.at(w_.real() + 50 * ms, [this] { tick(); });
}

void client::on_msg(const std::string& from, const client_msg& m) {
  if (m.session != session_ || phase_ == phase::finished) return;
  switch (m.kind) {
    case client_msg::opened:
      if (phase_ != phase::opening) return;
      w_.trace(name_ + ": opened " + session_ + " at " + from);
      phase_ = phase::sending;
      last_progress_ = w_.real();
      request();
      return;
    case client_msg::ack:
      if (phase_ != phase::sending || m.turn != turn_) return;
      acked_[turn_] = users_[turn_];
      w_.acknowledged_turn();
      w_.trace(name_ + ": turn " + std::to_string(turn_) + " of " + session_ + " acknowledged by " +
               from);
      phase_ = phase::streaming;
      got_.clear();
      last_progress_ = w_.real();
      return;
    case client_msg::token: {
      if (m.turn != turn_ || (phase_ != phase::streaming && phase_ != phase::sending)) return;
      // Exactly once: every token received, a repeat included, must be the fault-free one.
      auto want = token_of(session_, users_, turn_, m.index);
      w_.checked_token();
      if (m.tok != want) {
        w_.violation("exactly-once stream",
                     name_ + " got token " + std::to_string(m.tok) + " at " + session_ + " turn " +
                         std::to_string(turn_) + " index " + std::to_string(m.index) + " from " +
                         from + "; the fault-free run has " + std::to_string(want));
        return;
      }
      if (phase_ == phase::sending) {
        // The ack was lost but the turn runs: it was acknowledged by the stream itself.
        return;
      }
      if (m.index == got_.size()) {
        got_.push_back(m.tok);
        last_progress_ = w_.real();
      }
      return;
    }
    case client_msg::done:
      if (phase_ != phase::streaming || m.turn != turn_) return;
      if (m.index != turn_length(session_, turn_)) {
        w_.violation("exactly-once stream", name_ + ": " + session_ + " turn " +
                                                std::to_string(turn_) + " ended after " +
                                                std::to_string(m.index) + " tokens; the fault-free run has " +
                                                std::to_string(turn_length(session_, turn_)));
        return;
      }
      if (got_.size() < m.index) {
        // Tokens lost on the way: ask for the rest.
        request();
        return;
      }
      last_progress_ = w_.real();
      ++turn_;
      got_.clear();
      if (turn_ == turns_) {
        phase_ = phase::finished;
        w_.trace(name_ + ": finished " + session_);
        return;
      }
      phase_ = phase::sending;
      request();
      return;
    case client_msg::refused:
      w_.trace(name_ + ": refused by " + from + ": " + m.text + (m.hint.empty() ? "" : ", try " + m.hint));
      next_target(m.hint);
      rotate_ = false;
      next_try_ = w_.real() + 60 * ms;
      last_progress_ = std::min(last_progress_, w_.real() - 600 * ms);
      return;
    case client_msg::moved:
      next_target({});
      rotate_ = false;
      next_try_ = w_.real() + 20 * ms;
      last_progress_ = std::min(last_progress_, w_.real() - 600 * ms);
      return;
    default:
      return;
  }
}

// ---- world -----------------------------------------------------------------------------------

world::world(const options& opt) : opt_(opt), rng_(opt.seed * 0x2545F4914F6CDD1Dull + 1) {
  bool scripted = !opt.scenario.empty();
  int n = scripted ? 3 : (opt.nodes > 0 ? opt.nodes : static_cast<int>(rng_.range(3, 7)));
  int r = scripted ? 2 : (opt.regions > 0 ? opt.regions : static_cast<int>(rng_.range(2, 3)));
  res_.nodes = n;
  res_.regions = r;
  ownership_timing t;
  for (int i = 0; i < n; ++i) {
    std::string name(1, static_cast<char>('a' + i));
    // Scenarios: a and b in r1, c in r2 (the cluster of scripts/main.sh).
    std::string region = "r" + std::to_string(scripted ? (i < 2 ? 1 : 2) : i % r + 1);
    double rate = 1.0 + (rng_.unit() * 2 - 1) * t.drift;  // within the stated drift bound
    int64_t offset = rng_.range(0, 1'000'000) * ms;
    members_.push_back({name, region});
    nodes_.push_back(std::make_unique<node>(*this, i, name, region, rate, offset));
  }
  int c = scripted ? 1 : (opt.clients > 0 ? opt.clients : static_cast<int>(rng_.range(2, 6)));
  for (int i = 0; i < c; ++i) {
    auto session = "s-" + std::to_string(i + 1) + "@" + std::to_string(opt.seed);
    size_t turns = scripted ? 12 : static_cast<size_t>(rng_.range(2, 5));
    int first = scripted ? 0 : static_cast<int>(rng_.range(0, n - 1));
    clients_.push_back(std::make_unique<client>(*this, "client-" + std::to_string(i + 1), session,
                                                turns, first));
  }
}

ownership::config world::config_for(const std::string& name) const {
  ownership::config cfg;
  cfg.self = name;
  cfg.members = members_;
  cfg.group_size = 3;
  cfg.rule = opt_.rule;
  return cfg;
}

node* world::find(const std::string& name) {
  for (auto& n : nodes_)
    if (n->name() == name) return n.get();
  return nullptr;
}

void world::trace(const std::string& what) {
  note(hash_str(0, what));
  if (opt_.trace) std::cerr << "[" << now_ / ms << " ms] " << what << "\n";
}

bool world::blocked(const std::string& from, const std::string& to) const {
  return cut_.count({from, to}) > 0;
}

void world::peer_send(const std::string& from, const std::string& to, ownership_msg m) {
  ++res_.messages;
  if (blocked(from, to) || rng_.chance(loss_)) return;
  int copies = rng_.chance(duplicate_) ? 2 : 1;
  for (int k = 0; k < copies; ++k) {
    auto delay = rng_.range(100'000, delay_max_);  // random delays also reorder
    auto* n = find(to);
    auto inc = n->incarnation();
    at(now_ + delay, [this, n, inc, from, m] {
      if (!n->up() || n->incarnation() != inc) return;  // lost with the process
      auto deliver = [this, n, inc, from, m] {
        if (n->up() && n->incarnation() == inc) n->on_peer(from, m);
      };
      if (now_ < n->paused_until)
        at(n->paused_until, deliver);  // a paused process reads its socket when it wakes
      else
        deliver();
    });
  }
}

void world::client_send(const std::string& from, const std::string& to, client_msg m) {
  ++res_.messages;
  auto delay = rng_.range(100'000, 2 * ms);
  if (auto* n = find(to)) {
    auto inc = n->incarnation();
    at(now_ + delay, [this, n, inc, from, m] {
      if (!n->up() || n->incarnation() != inc) return;
      auto deliver = [n, inc, from, m] {
        if (n->up() && n->incarnation() == inc) n->on_client(from, m);
      };
      if (now_ < n->paused_until)
        at(n->paused_until, deliver);
      else
        deliver();
    });
    return;
  }
  for (auto& c : clients_)
    if (c->name() == to) {
      auto* cl = c.get();
      at(now_ + delay, [cl, from, m] { cl->on_msg(from, m); });
    }
}

void world::served(const std::string& session, const std::string& node, const ballot& b,
                   const char* what) {
  note(hash_str(hash_str(b.epoch, node), session));
  auto& last = last_served_[session];
  if (b < last.first) {
    violation("one owner at a time",
              node + " served " + session + " (" + what + ") at ballot " + to_string(b) + " after " +
                  last.second + " had served it at " + to_string(last.first));
    return;
  }
  last = {b, node};
}

void world::violation(const std::string& guarantee, const std::string& detail) {
  if (!res_.ok) return;
  res_.ok = false;
  res_.guarantee = guarantee;
  res_.detail = detail + " (at " + std::to_string(now_ / ms) + " ms)";
  trace("VIOLATION " + guarantee + ": " + detail);
}

void world::heal_all() {
  cut_.clear();
  loss_ = duplicate_ = 0;
  delay_max_ = 2 * ms;
  for (auto& n : nodes_) {
    n->failing_writes = 0;  // a pause runs out by itself (at most 4 s)
    if (!n->up()) n->start(config_for(n->name()));
  }
  trace("healed: every node up, no partition, no loss");
}

void world::schedule_faults() {
  int64_t t = rng_.range(300, 1200) * ms;
  while (t < opt_.fault_ns) {
    ++res_.faults;
    auto n = static_cast<int>(rng_.range(0, node_count() - 1));
    auto& victim = node_at(n);
    auto kind = rng_.range(0, 6);
    auto length = rng_.range(200, 4000) * ms;
    switch (kind) {
      case 0:  // kill -9, restart later
        at(t, [this, &victim] {
          if (!victim.up()) return;
          trace(victim.name() + ": crashed");
          victim.crash();
        });
        at(t + length, [this, &victim] {
          if (victim.up()) return;
          trace(victim.name() + ": restarted");
          victim.start(config_for(victim.name()));
        });
        break;
      case 1:  // SIGSTOP for a while
        at(t, [this, &victim, length] {
          trace(victim.name() + ": paused for " + std::to_string(length / ms) + " ms");
          victim.paused_until = std::max(victim.paused_until, now_ + length);
        });
        break;
      case 2: {  // a partition into two sides (any shape)
        std::vector<int> side;
        for (int i = 0; i < node_count(); ++i) side.push_back(static_cast<int>(rng_.range(0, 1)));
        at(t, [this, side] {
          std::string a, b;
          for (int i = 0; i < node_count(); ++i)
            for (int j = 0; j < node_count(); ++j)
              if (side[static_cast<size_t>(i)] != side[static_cast<size_t>(j)])
                cut_.insert({node_at(i).name(), node_at(j).name()});
          for (int i = 0; i < node_count(); ++i)
            (side[static_cast<size_t>(i)] ? a : b) += node_at(i).name();
          trace("partition {" + a + "} | {" + b + "}");
        });
        at(t + length, [this] {
          cut_.clear();
          trace("partition healed");
        });
        break;
      }
      case 3: {  // one-way cuts
        std::vector<std::pair<std::string, std::string>> pairs;
        for (int k = 0; k < 2; ++k) {
          auto i = static_cast<int>(rng_.range(0, node_count() - 1));
          auto j = static_cast<int>(rng_.range(0, node_count() - 1));
          if (i != j) pairs.emplace_back(node_at(i).name(), node_at(j).name());
        }
        at(t, [this, pairs] {
          for (auto& p : pairs) {
            cut_.insert(p);
            trace("one-way cut " + p.first + " -> " + p.second);
          }
        });
        at(t + length, [this, pairs] {
          for (auto& p : pairs) cut_.erase(p);
        });
        break;
      }
      case 4: {  // lossy, duplicating, slow network
        double loss = rng_.unit() * 0.3, dup = rng_.unit() * 0.1;
        int64_t delay = rng_.range(5, 150) * ms;
        at(t, [this, loss, dup, delay] {
          loss_ = loss;
          duplicate_ = dup;
          delay_max_ = delay;
          trace("network: loss " + std::to_string(loss) + ", duplicates " + std::to_string(dup) +
                ", delay up to " + std::to_string(delay / ms) + " ms");
        });
        at(t + length, [this] {
          loss_ = duplicate_ = 0;
          delay_max_ = 2 * ms;
        });
        break;
      }
      case 5: {  // a failing disk: the next writes fail
        int writes = static_cast<int>(rng_.range(1, 20));
        at(t, [this, &victim, writes] {
          trace(victim.name() + ": the next " + std::to_string(writes) + " disk writes fail");
          victim.failing_writes += writes;
        });
        break;
      }
      default: {  // crash of two nodes at once (a region, often)
        auto m = static_cast<int>(rng_.range(0, node_count() - 1));
        at(t, [this, n, m] {
          for (int i : {n, m})
            if (node_at(i).up()) {
              trace(node_at(i).name() + ": crashed");
              node_at(i).crash();
            }
        });
        at(t + length, [this, n, m] {
          for (int i : {n, m})
            if (!node_at(i).up()) {
              trace(node_at(i).name() + ": restarted");
              node_at(i).start(config_for(node_at(i).name()));
            }
        });
        break;
      }
    }
    t += rng_.range(200, 1500) * ms;
  }
}

void world::scenario_faults() {
  // Issue #10's reproduction: a serves s-1 (its group is a, b, c); the peer traffic between
  // one side and the other is dropped both ways for 6 s, then heals.
  std::set<std::string> one = opt_.scenario == "partition-isolated" ? std::set<std::string>{"a"}
                                                                    : std::set<std::string>{"a", "b"};
  res_.faults = 1;
  at(1500 * ms, [this, one] {
    for (auto& x : nodes_)
      for (auto& y : nodes_)
        if (one.count(x->name()) != one.count(y->name())) cut_.insert({x->name(), y->name()});
    trace("partition of the scenario " + opt_.scenario);
  });
  at(7500 * ms, [this] {
    cut_.clear();
    trace("partition healed");
  });
}

void world::final_check() {
  for (auto& c : clients_) {
    if (!c->finished()) {
      violation("served again while a majority is up",
                c->name() + " could not finish " + c->session() + " (stuck at turn " +
                    std::to_string(c->turn()) + ") " + std::to_string((opt_.settle_ns) / ms) +
                    " ms after every fault healed");
      return;
    }
  }
  for (auto& c : clients_) {
    auto& s = c->session();
    // The owner now, and every copy in the group.
    const stored_session* owner = nullptr;
    std::string owner_name;
    for (auto& n : nodes_) {
      auto* st = n->engine()->copy(s);
      if (!n->engine()->may_serve(s) || !st) continue;
      if (owner != nullptr) {
        violation("one owner at a time", owner_name + " and " + n->name() +
                                             " both hold the lease of " + s + " at the end");
        return;
      }
      owner = st;
      owner_name = n->name();
    }
    if (owner == nullptr) {
      violation("served again while a majority is up", "no node owns " + s + " after the run");
      return;
    }
    std::vector<std::string> users;
    for (auto& t : owner->data.turns) users.push_back(t.user);
    for (auto& [turn, user] : c->acknowledged()) {
      if (turn >= users.size() || users[turn] != user) {
        violation("acknowledged turns are never lost",
                  "turn " + std::to_string(turn) + " of " + s + " (\"" + user +
                      "\") was acknowledged but the final history at " + owner_name + " has " +
                      (turn < users.size() ? "\"" + users[turn] + "\"" : "no such turn"));
        return;
      }
    }
    for (size_t t = 0; t < owner->data.turns.size(); ++t)
      for (size_t i = 0; i < owner->data.turns[t].tokens.size(); ++i)
        if (owner->data.turns[t].tokens[i] != token_of(s, users, t, i)) {
          violation("exactly-once stream", "the final history of " + s + " at " + owner_name +
                                               " differs from the fault-free run at turn " +
                                               std::to_string(t) + " index " + std::to_string(i));
          return;
        }
    for (auto& m : node_at(0).engine()->group(s)) {
      auto* st = find(m)->engine()->copy(s);
      if (st == nullptr || st->accepted != owner->accepted || st->data != owner->data) {
        violation("copies agree after the cluster settles",
                  m + "'s copy of " + s + " (" + (st ? to_string(st->accepted) : "none") +
                      ") differs from the owner " + owner_name + "'s (" +
                      to_string(owner->accepted) + ")");
        return;
      }
    }
  }
}

result world::run() {
  for (auto& n : nodes_) n->start(config_for(n->name()));
  for (auto& c : clients_) {
    auto* cl = c.get();
    at(rng_.range(0, 500) * ms, [cl] { cl->start(); });
  }
  if (opt_.scenario.empty())
    schedule_faults();
  else
    scenario_faults();
  at(opt_.fault_ns, [this] { heal_all(); });
  int64_t end = opt_.fault_ns + opt_.settle_ns;
  bool all_done_at = false;
  int64_t quiet_until = 0;
  while (!queue_.empty() && !failed()) {
    auto e = queue_.top();
    queue_.pop();
    if (e.t > end) break;
    now_ = e.t;
    note(static_cast<uint64_t>(e.t));
    e.f();
    if (now_ >= opt_.fault_ns) {
      bool done = std::all_of(clients_.begin(), clients_.end(),
                              [](const std::unique_ptr<client>& c) { return c->finished(); });
      if (done && !all_done_at) {
        all_done_at = true;
        // Time for the last writes to reach every copy, after the last pause ended.
        quiet_until = now_;
        for (auto& n : nodes_) quiet_until = std::max(quiet_until, n->paused_until);
        quiet_until += 3000 * ms;
      }
      if (all_done_at && now_ >= quiet_until) break;
    }
  }
  res_.simulated_ns = now_;
  if (!failed()) final_check();
  res_.digest = digest_;
  return res_;
}

}  // namespace

result run(const options& opt) {
  world w(opt);
  return w.run();
}

}  // namespace keel::sim
