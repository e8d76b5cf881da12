#include "actors/ownership.hpp"
#include "actors/rendezvous.hpp"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>

namespace keel {

namespace {

/// The pending event of a takeover's first write (not a turn).
constexpr uint64_t acquired_event = std::numeric_limits<uint64_t>::max();

}  // namespace

std::string to_string(const ballot& b) {
  if (b.epoch == 0 && b.owner.empty()) return "-";
  return std::to_string(b.epoch) + "/" + b.owner;
}

const char* to_string(refusal r) {
  switch (r) {
    case refusal::none: return "none";
    case refusal::not_owner: return "not_owner";
    case refusal::no_quorum: return "no_quorum";
    case refusal::busy: return "busy";
    case refusal::bad_turn: return "bad_turn";
    case refusal::not_in_group: return "not_in_group";
  }
  return "?";
}

std::vector<std::string> replica_group(const std::string& session,
                                       const std::vector<cluster_member>& members, size_t size) {
  std::vector<const cluster_member*> order;
  for (auto& m : members) order.push_back(&m);
  std::sort(order.begin(), order.end(), [&](const cluster_member* a, const cluster_member* b) {
    auto wa = rendezvous_weight(session, a->name), wb = rendezvous_weight(session, b->name);
    return wa != wb ? wa > wb : a->name < b->name;
  });
  size = std::min(size, order.size());
  std::vector<std::string> out;
  std::set<std::string> regions;
  std::vector<bool> taken(order.size(), false);
  // One member of each region first, in rendezvous order; then the rest in that order.
  for (size_t i = 0; i < order.size() && out.size() < size; ++i) {
    if (regions.insert(order[i]->region).second) {
      out.push_back(order[i]->name);
      taken[i] = true;
    }
  }
  for (size_t i = 0; i < order.size() && out.size() < size; ++i)
    if (!taken[i]) out.push_back(order[i]->name);
  return out;
}

bool extends(const session_data& a, const session_data& b) {
  if (a.turns.size() != b.turns.size()) return a.turns.size() > b.turns.size();
  if (a.turns.empty()) return true;
  auto& x = a.turns.back();
  auto& y = b.turns.back();
  if (x.tokens.size() != y.tokens.size()) return x.tokens.size() > y.tokens.size();
  return x.done || !y.done;
}

ownership::ownership(config cfg, ownership_env& env) : cfg_(std::move(cfg)), env_(env) {
  started_at_ = env_.now();
}

void ownership::recover(std::map<std::string, stored_session> stored, bool damaged) {
  amnesia_ = damaged || stored.count(amnesia_key) > 0;
  stored.erase(amnesia_key);
  trusted_.clear();
  to_read_.clear();
  read_sent_.clear();
  reads_.clear();
  // The mark outlives this start: a later restart must read back too (what it has is what
  // the damaged store kept, plus what it learned since, which need not be everything). A
  // failed write of it is tried again at every tick.
  amnesia_marked_ = !damaged;
  mark_amnesia();
  stored_ = std::move(stored);
  owned_.clear();
  candidacies_.clear();
  retry_after_.clear();
  heard_.clear();
  last_grant_.clear();
  claims_sent_.clear();
  claimed_.clear();
  serving_.clear();
  started_at_ = env_.now();
  last_heartbeat_ = 0;
  if (amnesia_)
    for (auto& [s, st] : stored_) need_read(s);
}

const std::vector<std::string>& ownership::group(const std::string& session) {
  auto i = groups_.find(session);
  if (i == groups_.end())
    i = groups_.emplace(session, replica_group(session, cfg_.members, cfg_.group_size)).first;
  return i->second;
}

stored_session& ownership::stored(const std::string& session) {
  return stored_[session];
}

bool ownership::persist(const std::string& session, bool sync) {
  return env_.store(session, stored_[session], sync);
}

const session_data* ownership::data(const std::string& session) const {
  auto i = owned_.find(session);
  return i == owned_.end() ? nullptr : &i->second.data;
}

const stored_session* ownership::copy(const std::string& session) const {
  auto i = stored_.find(session);
  return i == stored_.end() ? nullptr : &i->second;
}

std::string ownership::owner_hint(const std::string& session) const {
  auto i = stored_.find(session);
  if (i == stored_.end()) return {};
  return i->second.promised.owner.empty() ? i->second.accepted.owner : i->second.promised.owner;
}

bool ownership::alive(const std::string& member) const {
  if (member == cfg_.self) return true;
  auto i = heard_.find(member);
  return i != heard_.end() && env_.now() - i->second < cfg_.timing.suspect_after;
}

// ---- acceptor side -------------------------------------------------------------------------

void ownership::resign(const std::string& session) {
  if (owned_.erase(session) == 0) return;
  candidacies_.erase(session);
  resigned_.insert(session);
}

void ownership::promise_to(const std::string& session, const ballot& b) {
  auto previous = stored(session).promised;
  stored(session).promised = b;
  if (b.owner != cfg_.self) {
    resigned_.erase(session);
    auto c = candidacies_.find(session);
    if (c != candidacies_.end() && c->second.b < b) candidacies_.erase(c);
    auto o = owned_.find(session);
    if (o != owned_.end() && o->second.b < b) {
      lose(session);
    } else if (o == owned_.end() && previous.owner == cfg_.self) {
      // This node owned it before a restart of its protocol (a host restarted alone may still
      // serve it from before): another owns it now.
      env_.lost(session);
    }
  }
}

void ownership::learn(const std::string& session, const ballot& b) {
  auto& st = stored(session);
  if (!(b > st.promised)) return;
  // Promising more than a member was asked to is always allowed (it only refuses more), and
  // it makes this node follow the new owner: without it, a node whose own promise still named
  // itself after it lost the session took it back as after a restart, and the session bounced
  // back to it after every heal. Synced like any promise, and kept in memory only if it is on
  // disk: a prepare for the same ballot is answered from memory
  // as already promised, and a promise forgotten in a crash would let a lower ballot win a
  // majority (keel-sim seed 782548 lost an acknowledged turn so, with a failing disk and a
  // crash).
  auto saved = st;
  // Promising b here owes what a promise to b's candidate owes: b's owner may serve only once
  // this node's last grant to the previous owner has run out (`hold()`). Without this, a member
  // that had granted the old owner and learned the new ballot from a refusal answered the new
  // owner's prepare as a repeat, with no wait (keel-sim seed 302406 --damage, with members
  // refusing candidates while the owner is alive: two owners at once).
  auto previous = st.promised.owner;
  int64_t until = 0;
  if (!previous.empty() && previous != b.owner) {
    auto g = last_grant_.find(previous);
    if (g != last_grant_.end()) until = g->second + cfg_.timing.hold();
  }
  promise_to(session, b);
  if (!persist(session, true)) {
    stored(session) = saved;
    return;
  }
  hold_until_[session] = std::max(hold_until_[session], until);
  // Heard of just now: the new owner gets a suspect time to claim it here before this node
  // counts it silent (its last claim here may be long ago, or by the previous owner).
  claimed_[session] = env_.now();
}

void ownership::on_heartbeat(const std::string& from, const heartbeat_msg& m) {
  heartbeat_reply r;
  r.sent = m.sent;
  for (auto& [s, b] : m.claims) {
    if (!votes(s)) {
      // An amnesiac member grants nothing (and takes no one's side) before it read it back;
      // it notes the claim, so that it does not find the owner silent and run against it.
      need_read(s);
      if (b.owner == from) claimed_[s] = env_.now();
      r.promised.push_back(ballot{});
      continue;
    }
    // An owner this node has not promised (it was cut off while the owner took the session
    // over): follow it, or this node finds the session's promised owner silent and takes it
    // over, and the session bounces back after every heal.
    if (b.owner == from && b > stored(s).promised) learn(s, b);
    auto i = stored_.find(s);
    r.promised.push_back(i == stored_.end() ? ballot{} : i->second.promised);
    if (r.promised.back() == b) last_grant_[from] = claimed_[s] = serving_[s] = env_.now();
  }
  env_.send(from, std::move(r));
}

bool ownership::disturbs(const std::string& session, const ballot& b, int64_t now) {
  if (cfg_.rule == ownership_rule::view) return false;
  auto& st = stored(session);
  if (st.promised.owner.empty() || st.promised.owner == b.owner) return false;
  // This node owns it and holds the lease.
  if (st.promised.owner == cfg_.self) return may_serve(session);
  // The promised owner claimed it here as its owner (a heartbeat this node granted, or a write)
  // within suspect_after. A mere candidate's prepare does not count: two candidates each
  // holding one member would refuse each other for ever.
  auto c = serving_.find(session);
  return c != serving_.end() && now - c->second < cfg_.timing.suspect_after;
}

void ownership::on_prepare(const std::string& from, const prepare_msg& m) {
  auto now = env_.now();
  auto& st = stored(m.session);
  promise_reply r;
  r.session = m.session;
  r.b = m.b;
  r.sent = m.sent;
  if (m.b.epoch == 0) {
    // A read by an amnesiac member (send_reads): this node's promise and copy, nothing
    // promised. An amnesiac answerer's may be behind too; the reader takes the highest and
    // newest of enough answers to include every majority's survivors (one damaged store per
    // group at a time: docs/actors.md, "Bounds").
    r.promised = st.promised;
    r.accepted = st.accepted;
    r.data = st.data;
    need_read(m.session);
    if (from != cfg_.self) env_.send(from, std::move(r));
    return;
  }
  if (!votes(m.session)) {
    // Not before it read the session back: its promise could undercut one it forgot.
    need_read(m.session);
    r.starting = true;
    r.promised = st.promised;
  } else if (now - started_at_ < cfg_.timing.hold()) {
    // Restarted: this node forgot whom it granted leases, so it cannot say how long to wait.
    r.starting = true;
    r.promised = st.promised;
  } else if (m.b > st.promised && disturbs(m.session, m.b, now)) {
    // The promised owner is alive and reaches this member (CheckQuorum): a candidate that
    // cannot hear it (cut off, just back from a partition) does not take the session from it.
    // Refusing a promise is always safe; the candidate tries again once the owner is silent.
    r.promised = st.promised;
  } else if (m.b > st.promised || (m.b == st.promised && m.b.owner == from)) {
    bool fresh = m.b != st.promised;
    if (fresh) {
      auto previous = st.promised.owner;
      int64_t until = 0;
      if (!previous.empty() && previous != m.b.owner) {
        auto g = last_grant_.find(previous);
        if (g != last_grant_.end()) until = g->second + cfg_.timing.hold();
      }
      auto saved = st;
      promise_to(m.session, m.b);
      if (!persist(m.session, true)) {
        // Nothing promised: the old promise stands (in memory too, so it is not half kept).
        stored(m.session) = saved;
        r.promised = saved.promised;
        env_.send(from, std::move(r));
        return;
      }
      // Kept at its latest: a member that promised one candidate and then a higher one still
      // owes the wait for the grants it gave before either (the previous owner's lease), not
      // only for the grants to the candidate it promised last (which has none).
      hold_until_[m.session] = std::max(hold_until_[m.session], until);
    }
    // A repeated prepare (a duplicate, or one sent again) gets the same wait as the first.
    auto h = hold_until_.find(m.session);
    r.ok = true;
    claimed_[m.session] = now;
    r.wait = h == hold_until_.end() ? 0 : std::max<int64_t>(0, h->second - now);
    r.accepted = stored(m.session).accepted;
    r.data = stored(m.session).data;
    last_grant_[from] = now;
  } else {
    r.promised = st.promised;
  }
  if (from == cfg_.self)
    on_promise(from, r);
  else
    env_.send(from, std::move(r));
}

void ownership::on_write(const std::string& from, const write_msg& m) {
  need_read(m.session);
  auto& st = stored(m.session);
  write_reply r;
  r.session = m.session;
  r.b = m.b;
  r.seq = m.seq;
  r.durable = m.durable;
  r.sent = m.sent;
  if (m.b < st.promised) {
    r.promised = st.promised;
    env_.send(from, std::move(r));
    return;
  }
  bool moved = m.b > st.promised;
  auto saved = st;
  if (moved) promise_to(m.session, m.b);
  auto& s = stored(m.session);
  bool newer = m.b > s.accepted || (m.b == s.accepted && extends(m.data, s.data) && m.data != s.data);
  if (newer) {
    s.accepted = m.b;
    s.data = m.data;
  }
  bool ok = true;
  if (newer || moved || m.durable) ok = persist(m.session, m.durable || moved);
  // A promise or copy that is not on disk is not kept either: memory never claims more than a
  // restart would remember.
  if (!ok) stored(m.session) = saved;
  // An amnesiac member keeps the copy but does not count for the owner before it read the
  // session back (its acknowledgement would stand for copies it may have forgotten).
  r.ok = ok && votes(m.session);
  r.disk_failed = !ok;
  if (m.b.owner == from) {
    last_grant_[from] = claimed_[m.session] = env_.now();
    if (r.ok && m.b == stored(m.session).promised) serving_[m.session] = env_.now();
  }
  env_.send(from, std::move(r));
}

// ---- owner side ----------------------------------------------------------------------------

void ownership::on_heartbeat_reply(const std::string& from, const heartbeat_reply& m) {
  // The claims of the heartbeat answered (a recent one: older answers are of no use).
  auto& sent = claims_sent_[from];
  auto c = sent.find(m.sent);
  if (c == sent.end() || c->second.size() != m.promised.size()) return;
  auto claims = c->second;
  for (size_t k = 0; k < claims.size(); ++k) {
    auto& [s, b] = claims[k];
    auto& p = m.promised[k];
    seen_[s] = std::max(seen_[s], p.epoch);
    auto o = owned_.find(s);
    if (o == owned_.end() || o->second.b != b) continue;
    if (p > b && p.owner == from && p.owner != cfg_.self && lease_valid(s, o->second)) {
      // The answerer promised itself (a candidacy of its own while it could not hear this
      // owner, say across a partition) and nobody else: this owner, still granted by a
      // majority, takes the session again at a ballot above that one, rather than giving a
      // healthy session up to a member that just came back. (That member cannot undo its
      // promise, and would grant this owner nothing more at the old ballot.)
      seen_[s] = std::max(seen_[s], p.epoch);
      acquire(s, false, {});
    } else if (p > b) {
      learn(s, p);
      lose(s);
    } else if (p == b) {
      auto& g = o->second.granted[from];
      g = std::max(g, m.sent);
    }
  }
}

void ownership::acquire(const std::string& session, bool open, const std::string& meta) {
  auto now = env_.now();
  auto& st = stored(session);
  owned_.erase(session);
  ballot b{std::max({st.promised.epoch, st.accepted.epoch, seen_[session]}) + 1, cfg_.self};
  if (cfg_.rule == ownership_rule::view) {
    // The old rule: take it at once with this node's own copy.
    promise_to(session, b);
    auto& s = stored(session);
    owned_session o;
    o.b = b;
    o.data = s.accepted.epoch > 0 ? s.data : session_data{meta, {}};
    o.seq = o.durable_seq = 1;
    o.ready = true;
    s.accepted = b;
    s.data = o.data;
    if (persist(session, true)) o.acked[cfg_.self] = o.durable_acked[cfg_.self] = 1;
    owned_[session] = std::move(o);
    send_writes(session, true);
    env_.acquired(session);
    return;
  }
  candidacy c;
  c.b = b;
  c.open = open;
  c.meta = meta;
  c.started = now;
  c.last_sent = now;
  candidacies_[session] = std::move(c);
  prepare_msg m{session, b, now};
  for (auto& g : group(session))
    if (g != cfg_.self) env_.send(g, m);
  on_prepare(cfg_.self, m);  // this node is a member too
}

void ownership::on_promise(const std::string& from, const promise_reply& m) {
  if (m.b.epoch == 0) {
    on_read_reply(from, m);
    return;
  }
  auto i = candidacies_.find(m.session);
  if (i == candidacies_.end() || i->second.b != m.b) return;
  auto& c = i->second;
  if (!m.ok) {
    seen_[m.session] = std::max(seen_[m.session], m.promised.epoch);
    if (!m.starting && m.promised > c.b) {
      // Another candidate (or owner) is ahead: let it finish before trying again.
      candidacies_.erase(i);
      learn(m.session, m.promised);
      retry_after_[m.session] = env_.now() + cfg_.timing.suspect_after;
    }
    return;
  }
  if (c.promises.count(from) == 0) {
    c.promises[from] = m;
    c.received[from] = env_.now();
  }
  try_complete(m.session);
}

void ownership::try_complete(const std::string& session) {
  auto i = candidacies_.find(session);
  if (i == candidacies_.end()) return;
  auto& c = i->second;
  if (c.promises.size() < majority(group(session).size())) return;
  // Every promiser's last grant to the previous owner must have run out: any majority that
  // could still back the old owner's lease contains one of them.
  int64_t ready = 0;
  for (auto& [g, p] : c.promises) ready = std::max(ready, c.received[g] + cfg_.timing.convert(p.wait));
  if (env_.now() < ready) return;
  become_owner(session, c);
}

void ownership::become_owner(const std::string& session, candidacy& c) {
  // The newest copy among the promisers: the highest accepted ballot, then the longest (copies
  // of one ballot are prefixes of its owner's history). Every acknowledged write is on a
  // majority, which shares a member with the promisers, so the newest copy has it.
  const promise_reply* newest = nullptr;
  for (auto& [g, p] : c.promises) {
    if (p.accepted.epoch == 0) continue;
    if (!newest || p.accepted > newest->accepted ||
        (p.accepted == newest->accepted && extends(p.data, newest->data)))
      newest = &p;
  }
  if (!newest && !c.open) {
    // Nothing to take over (no promiser has a copy): give up the candidacy.
    candidacies_.erase(session);
    retry_after_[session] = env_.now() + cfg_.timing.suspect_after;
    return;
  }
  owned_session o;
  o.b = c.b;
  o.data = newest ? newest->data : session_data{c.meta, {}};
  o.seq = o.durable_seq = 1;
  for (auto& [g, p] : c.promises)
    if (g != cfg_.self) o.granted[g] = p.sent;
  o.pending.emplace_back(1, acquired_event, false);
  for (size_t t = 0; t < o.data.turns.size(); ++t) o.turn_seq[t] = 1;
  candidacies_.erase(session);
  // Its copy is now the newest of a majority of voters: this node votes on it again.
  if (amnesia_) {
    trusted_.insert(session);
    to_read_.erase(session);
    reads_.erase(session);
  }
  auto& mine = owned_[session] = std::move(o);
  write_own(session, mine, true);
  send_writes(session, true);
  fire_pending(session);
}

void ownership::write_to(const std::string& session, owned_session& o, const std::string& member) {
  write_msg m;
  m.session = session;
  m.b = o.b;
  m.seq = o.seq;
  m.durable = o.durable_acked[member] < o.durable_seq;
  m.data = o.data;
  m.sent = env_.now();
  o.last_sent[member] = m.sent;
  env_.send(member, std::move(m));
}

void ownership::send_writes(const std::string& session, bool force) {
  auto i = owned_.find(session);
  if (i == owned_.end()) return;
  auto& o = i->second;
  auto now = env_.now();
  for (auto& g : group(session)) {
    if (g == cfg_.self) continue;
    bool behind = o.durable_acked[g] < o.durable_seq || o.acked[g] < o.seq;
    if (force || (behind && now - o.last_sent[g] >= cfg_.timing.retry)) write_to(session, o, g);
  }
}

void ownership::on_write_reply(const std::string& from, const write_reply& m) {
  auto i = owned_.find(m.session);
  if (i == owned_.end() || i->second.b != m.b) return;
  auto& o = i->second;
  if (!m.ok) {
    if (m.promised > o.b) {
      seen_[m.session] = std::max(seen_[m.session], m.promised.epoch);
      learn(m.session, m.promised);
      lose(m.session);
    }
    return;
  }
  o.acked[from] = std::max(o.acked[from], m.seq);
  if (m.durable) o.durable_acked[from] = std::max(o.durable_acked[from], m.seq);
  o.granted[from] = std::max(o.granted[from], m.sent);
  fire_pending(m.session);
}

bool ownership::may_serve(const std::string& session) {
  auto i = owned_.find(session);
  if (i == owned_.end() || !i->second.ready) return false;
  return lease_valid(session, i->second);
}

bool ownership::lease_valid(const std::string& session, owned_session& o) {
  if (cfg_.rule == ownership_rule::view) return true;
  auto now = env_.now();
  auto& g = group(session);
  size_t n = stored(session).promised == o.b ? 1 : 0;
  for (auto& m : g) {
    if (m == cfg_.self) continue;
    auto t = o.granted.find(m);
    if (t != o.granted.end() && t->second + cfg_.timing.lease > now) ++n;
  }
  return n >= majority(g.size());
}

int64_t ownership::serve_until(const std::string& session) {
  auto i = owned_.find(session);
  if (i == owned_.end() || !i->second.ready) return INT64_MIN;
  auto& o = i->second;
  if (cfg_.rule == ownership_rule::view) return INT64_MAX;
  // lease_valid counts the members whose grant has not expired; it holds while the majority-th
  // latest expiry is ahead.
  auto& g = group(session);
  std::vector<int64_t> until;
  if (stored(session).promised == o.b) until.push_back(INT64_MAX);
  for (auto& m : g) {
    if (m == cfg_.self) continue;
    auto t = o.granted.find(m);
    if (t != o.granted.end()) until.push_back(t->second + cfg_.timing.lease);
  }
  size_t need = majority(g.size());
  if (until.size() < need) return INT64_MIN;
  std::sort(until.rbegin(), until.rend());
  return until[need - 1];
}

size_t ownership::copies_for_others() const {
  size_t n = stored_.size();
  for (auto& [id, o] : owned_) n -= stored_.count(id);
  return n;
}

std::vector<std::string> ownership::owned_sessions() const {
  std::vector<std::string> out;
  for (auto& [s, o] : owned_) out.push_back(s);
  return out;
}

uint64_t ownership::durable_through(const std::string& session, owned_session& o) {
  auto& g = group(session);
  if (cfg_.rule == ownership_rule::view) {
    // The old rule: this node's synced write and any one other member, or none when no other
    // member looks live.
    uint64_t mine = o.durable_acked[cfg_.self];
    uint64_t other = 0;
    bool anyone = false;
    for (auto& m : g) {
      if (m == cfg_.self) continue;
      anyone = anyone || alive(m);
      other = std::max(other, o.durable_acked[m]);
    }
    return anyone ? std::min(mine, other) : mine;
  }
  std::vector<uint64_t> seqs;
  for (auto& m : g) seqs.push_back(o.durable_acked[m]);
  std::sort(seqs.rbegin(), seqs.rend());
  return seqs[majority(g.size()) - 1];
}

void ownership::fire_pending(const std::string& session) {
  auto i = owned_.find(session);
  if (i == owned_.end()) return;
  auto& o = i->second;
  if (o.pending.empty()) return;
  auto through = durable_through(session, o);
  // A turn is acknowledged only by an owner that still holds its lease; otherwise it waits
  // (and is dropped with the session if another node takes it over).
  bool acquiring = std::get<1>(o.pending.front()) == acquired_event;
  if (!acquiring && !lease_valid(session, o)) return;
  std::vector<std::tuple<uint64_t, uint64_t, bool>> due;
  for (auto p = o.pending.begin(); p != o.pending.end();) {
    if (std::get<0>(*p) <= through) {
      due.push_back(*p);
      p = o.pending.erase(p);
    } else {
      ++p;
    }
  }
  // Callbacks may come back into this object (and change owned_): `o` is not used below.
  for (auto& [seq, turn, finished] : due) {
    auto j = owned_.find(session);
    if (j == owned_.end()) return;
    if (turn == acquired_event) {
      j->second.ready = true;
      env_.acquired(session);
    } else {
      env_.durable(session, turn, finished);
    }
  }
}

void ownership::lose(const std::string& session) {
  if (owned_.erase(session) == 0) return;
  if (cfg_.rule == ownership_rule::view) {
    // The old rule dropped the loser's copy (and with it what it had acknowledged alone).
    auto& st = stored(session);
    st.accepted = {};
    st.data = {};
    persist(session, true);
  }
  env_.lost(session);
}

bool ownership::reaches_majority(const std::string& session) {
  // Just started: nobody was heard yet, and the candidacy finds out.
  if (env_.now() - started_at_ < cfg_.timing.suspect_after) return true;
  auto& g = group(session);
  size_t n = 0;
  for (auto& m : g) n += alive(m) ? 1 : 0;
  return n >= majority(g.size());
}

refusal ownership::open(const std::string& session, const std::string& meta) {
  auto& g = group(session);
  if (std::find(g.begin(), g.end(), cfg_.self) == g.end()) return refusal::not_in_group;
  if (owned_.count(session) || candidacies_.count(session)) return refusal::none;
  acquire(session, true, meta);
  return refusal::none;
}

refusal ownership::submit_turn(const std::string& session, uint64_t turn, const std::string& user) {
  auto i = owned_.find(session);
  if (i == owned_.end() || !i->second.ready) return refusal::not_owner;
  auto& o = i->second;
  if (!lease_valid(session, o)) return refusal::no_quorum;
  auto& turns = o.data.turns;
  if (turn < turns.size()) {
    if (turns[turn].user != user) return refusal::bad_turn;
    // Already here (a retry): acknowledged once it is on a majority.
    o.pending.emplace_back(o.turn_seq.count(turn) ? o.turn_seq[turn] : 1, turn, false);
    fire_pending(session);
    return refusal::none;
  }
  if (turn > turns.size()) return refusal::bad_turn;
  if (!turns.empty() && !turns.back().done) return refusal::busy;
  turns.push_back(turn_entry{user, {}, false, {}});
  o.seq++;
  o.durable_seq = o.seq;
  o.turn_seq[turn] = o.seq;
  o.unsent_tokens = 0;
  o.pending.emplace_back(o.seq, turn, false);
  write_own(session, o, true);
  send_writes(session, true);
  fire_pending(session);
  return refusal::none;
}

void ownership::write_own(const std::string& session, owned_session& o, bool sync) {
  auto& st = stored(session);
  if (st.promised > o.b) return;
  // This node's own promise may have been refused while it restarted: its copy is a member's
  // like any other, and accepts its owner's write.
  if (st.promised < o.b) promise_to(session, o.b);
  st.accepted = o.b;
  st.data = o.data;
  if (!persist(session, sync)) return;
  o.acked[cfg_.self] = o.seq;
  if (sync) o.durable_acked[cfg_.self] = o.seq;
}

void ownership::append_tokens(const std::string& session, uint64_t turn, size_t from,
                              const std::vector<int32_t>& tokens) {
  auto i = owned_.find(session);
  if (i == owned_.end()) return;
  auto& o = i->second;
  if (turn + 1 != o.data.turns.size() || o.data.turns.back().done) return;
  auto& have = o.data.turns.back().tokens;
  if (from > have.size()) return;
  size_t added = 0;
  for (size_t k = have.size() - from; k < tokens.size(); ++k, ++added) have.push_back(tokens[k]);
  if (added == 0) return;
  o.seq++;
  o.unsent_tokens += added;
  if (o.unsent_tokens < cfg_.checkpoint_every) return;
  o.unsent_tokens = 0;
  write_own(session, o, false);
  for (auto& g : group(session))
    if (g != cfg_.self) write_to(session, o, g);
}

void ownership::finish_turn(const std::string& session, uint64_t turn, const std::string& end) {
  auto i = owned_.find(session);
  if (i == owned_.end()) return;
  auto& o = i->second;
  if (turn + 1 != o.data.turns.size()) return;
  if (o.data.turns.back().done) {
    // Ended already (a retry): acknowledged once the end is on a majority. Nothing changes a
    // session after its turn's end but a new turn, so the current version holds the end.
    o.pending.emplace_back(o.seq, turn, true);
    fire_pending(session);
    return;
  }
  o.data.turns.back().done = true;
  o.data.turns.back().end = end;
  o.seq++;
  o.durable_seq = o.seq;
  o.unsent_tokens = 0;
  o.pending.emplace_back(o.seq, turn, true);
  write_own(session, o, true);
  send_writes(session, true);
  fire_pending(session);
}

// ---- time ----------------------------------------------------------------------------------

size_t takeover_rank(const std::string& session, const std::string& self,
                     const std::vector<std::string>& live, const std::vector<double>& rooms) {
  bool same = std::all_of(rooms.begin(), rooms.end(), [&](double r) { return r == rooms[0]; });
  auto me = std::find(live.begin(), live.end(), self);
  if (me == live.end()) return live.size();
  if (same) return static_cast<size_t>(me - live.begin());
  // (has room, score): members without room after every member with some, among themselves
  // by the hash alone.
  auto score = [&](size_t i) {
    auto w = rooms[i] > 0 ? rooms[i] : 1.0;
    // u in (0, 1) from the top 53 bits of the hash; -w / ln(u) is positive and grows with w.
    auto h = rendezvous_weight(session, live[i]);
    double u = (static_cast<double>(h >> 11) + 0.5) / static_cast<double>(uint64_t{1} << 53);
    return std::make_pair(rooms[i] > 0, -w / std::log(u));
  };
  auto i = static_cast<size_t>(me - live.begin());
  auto mine = score(i);
  size_t rank = 0;
  for (size_t j = 0; j < live.size(); ++j) {
    if (j == i) continue;
    auto other = score(j);
    if (other > mine || (other == mine && j < i)) ++rank;
  }
  return rank;
}

void ownership::takeovers() {
  auto now = env_.now();
  auto& t = cfg_.timing;
  if (now - started_at_ < t.suspect_after) return;  // not heard from everyone yet
  std::map<std::string, double> room_cache;  // asked once per member per round
  for (auto& [s, st] : stored_) {
    if (owned_.count(s) || candidacies_.count(s)) continue;
    auto r = retry_after_.find(s);
    if (r != retry_after_.end() && now < r->second) continue;
    auto owner = st.promised.owner;
    if (owner.empty()) continue;
    auto& g = group(s);
    if (std::find(g.begin(), g.end(), cfg_.self) == g.end()) continue;
    if (owner == cfg_.self && resigned_.count(s)) continue;  // given up: another takes it
    if (!env_.may_own(s, st.data)) continue;  // pinned to a model this node does not serve
    if (owner == cfg_.self) {
      // Ours before a restart (or a candidacy of ours that stopped halfway): take it back.
      if (st.accepted.epoch > 0 || st.promised.epoch > 0) acquire(s, false, {});
      continue;
    }
    // The owner has not claimed it here for a while (it died, is cut off, or is a candidate
    // that gave up): the group's first live member (in group order) tries first, the next ones
    // later, so that candidates rarely duel.
    auto h = claimed_.find(s);
    int64_t silent = now - std::max(started_at_, h == claimed_.end() ? 0 : h->second);
    if (silent < t.suspect_after) continue;
    std::vector<std::string> live;
    std::vector<double> rooms;
    for (auto& m : g) {
      if (m == owner || (m != cfg_.self && !alive(m))) continue;
      live.push_back(m);
      auto r = room_cache.find(m);
      if (r == room_cache.end()) r = room_cache.emplace(m, env_.room(m)).first;
      rooms.push_back(r->second);
    }
    auto rank = takeover_rank(s, cfg_.self, live, rooms);
    if (silent >= t.suspect_after + static_cast<int64_t>(rank) * t.suspect_after / 2)
      acquire(s, false, {});
  }
}

void ownership::tick() {
  auto now = env_.now();
  auto& t = cfg_.timing;
  if (now - last_heartbeat_ >= t.heartbeat) {
    last_heartbeat_ = now;
    for (auto& m : cfg_.members) {
      if (m.name == cfg_.self) continue;
      heartbeat_msg h{now, {}};
      for (auto& [s, o] : owned_) {
        auto& g = group(s);
        if (std::find(g.begin(), g.end(), m.name) == g.end()) continue;
        // An owner whose lease lapsed suspect_after ago (it can send but hears no grant back)
        // stops claiming, so that the members it still reaches stop refusing other candidates
        // for its sake (`disturbs`) and the group can move on.
        if (o.ready && cfg_.rule != ownership_rule::view) {
          auto until = serve_until(s);
          if (until == INT64_MIN || until + t.suspect_after < now) continue;
        }
        h.claims.emplace_back(s, o.b);
      }
      auto& sent = claims_sent_[m.name];
      sent[now] = h.claims;
      while (!sent.empty() && sent.begin()->first + cfg_.timing.lease < now) sent.erase(sent.begin());
      env_.send(m.name, std::move(h));
    }
  }
  std::vector<std::string> ids;
  for (auto& [s, c] : candidacies_) ids.push_back(s);
  for (auto& s : ids) {
    auto i = candidacies_.find(s);
    if (i == candidacies_.end()) continue;
    auto& c = i->second;
    if (now - c.started > 2 * t.suspect_after) {
      candidacies_.erase(i);
      retry_after_[s] = now + t.suspect_after / 2;
      continue;
    }
    if (now - c.last_sent >= t.retry) {
      c.last_sent = now;
      prepare_msg m{s, c.b, now};
      bool self = false;
      for (auto& g : group(s)) {
        if (c.promises.count(g)) continue;
        if (g == cfg_.self)
          self = true;
        else
          env_.send(g, m);
      }
      // Last: the answer may complete the candidacy (and end `c`).
      if (self) on_prepare(cfg_.self, m);
    }
    try_complete(s);
  }
  ids.clear();
  for (auto& [s, o] : owned_) ids.push_back(s);
  for (auto& s : ids) {
    send_writes(s, false);
    fire_pending(s);
  }
  mark_amnesia();
  send_reads();
  takeovers();
}

void ownership::receive(const std::string& from, const ownership_msg& m) {
  heard_[from] = env_.now();
  // The amnesiac mark's key is no session: a message naming it is dropped.
  bool reserved = std::visit(
      [](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, heartbeat_msg>) {
          for (auto& [s, b] : x.claims)
            if (s == amnesia_key) return true;
          return false;
        } else if constexpr (std::is_same_v<T, heartbeat_reply>) {
          return false;
        } else {
          return x.session == amnesia_key;
        }
      },
      m);
  if (reserved) return;
  std::visit(
      [&](const auto& x) {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, heartbeat_msg>) on_heartbeat(from, x);
        if constexpr (std::is_same_v<T, heartbeat_reply>) on_heartbeat_reply(from, x);
        if constexpr (std::is_same_v<T, prepare_msg>) on_prepare(from, x);
        if constexpr (std::is_same_v<T, promise_reply>) on_promise(from, x);
        if constexpr (std::is_same_v<T, write_msg>) on_write(from, x);
        if constexpr (std::is_same_v<T, write_reply>) on_write_reply(from, x);
      },
      m);
}

}  // namespace keel
