// A node's part in failover (docs/actors.md, "Takeover"): taking over the sessions of a peer
// declared down, giving up sessions another node took over, a restarted node's reconciliation,
// and finding a session's owner for forwarding.

#include <algorithm>
#include <future>
#include <set>
#include <thread>

#include <caf/scoped_actor.hpp>

#include "actors/node.hpp"
#include "actors/peer_server.hpp"
#include "wire/checkpoint.hpp"

namespace keel {

namespace {

/// Which of two copies of a session is newer: the higher epoch, then more turns, then more
/// tokens; a tie goes to the holder whose name sorts first, so every node picks the same one.
bool newer(const session_copy& a, const session_copy& b) {
  if (a.epoch != b.epoch) return a.epoch > b.epoch;
  if (a.turns != b.turns) return a.turns > b.turns;
  if (a.tokens != b.tokens) return a.tokens > b.tokens;
  return a.node < b.node;
}

uint64_t count_tokens(const std::map<uint64_t, std::vector<int32_t>>& logs) {
  uint64_t n = 0;
  for (auto& [turn, t] : logs) n += t.size();
  return n;
}

}  // namespace

std::vector<session_record> node::reconcile(std::vector<session_record> recovered,
                                            const std::vector<std::string>& corrupt,
                                            const std::set<std::string>& damaged) {
  // Wait until every link has heard from its peer or failed once (at most two detection
  // times): a restarted node must not serve a session another node took over meanwhile, and
  // must hear from its peers which sessions it owned (its store may have lost some).
  auto deadline = std::chrono::steady_clock::now() + cfg_.down_after * 2;
  while (std::chrono::steady_clock::now() < deadline) {
    auto all = peers_->snapshot();
    bool settled = all.size() >= cfg_.peers.size() &&
                   std::all_of(all.begin(), all.end(), [](const peer_info& p) {
                     return p.heartbeats > 0 || p.failures > 0;
                   });
    if (settled) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  std::vector<std::string> ids;
  for (auto& r : recovered) ids.push_back(r.id);
  ids.insert(ids.end(), corrupt.begin(), corrupt.end());
  auto copies = replicator_->locate(ids);
  // The peers' replicas of this node's sessions: every session it owned, whatever its store
  // still holds.
  auto theirs = replicator_->owned_by(cfg_.name);
  auto& log = *ctx_->log;
  std::vector<session_record> keep;
  struct to_repair {
    std::string id, why;
    std::optional<session_record> fallback;  // this node's own copy, served if none is restored
  };
  std::vector<to_repair> repair;
  for (auto& id : corrupt) repair.push_back({id, "its records here are corrupt", std::nullopt});
  for (auto& r : recovered) {
    const session_copy* newest = nullptr;
    for (auto& c : copies)
      if (c.session == r.id && c.epoch > r.epoch && (!newest || c.epoch > newest->epoch))
        newest = &c;
    if (newest != nullptr) {
      sessions_->drop(r.id, newest->epoch);
      if (auto err = store_->erase_session(r.id, r.epoch))
        log.report(cfg_.name + ": reconcile: cannot erase session " + r.id + ": " + describe(err));
      log.report(cfg_.name + ": reconcile: session " + r.id + " was taken over at epoch " +
                 std::to_string(newest->epoch) + " (owner " + newest->record_owner +
                 "); dropped this node's copy at epoch " + std::to_string(r.epoch));
      continue;
    }
    // A replica ahead of this node's own copy at the same epoch: the store lost writes.
    uint64_t tokens = 0;
    for (auto& t : r.turns) tokens += t.generated.size();
    const bool done = r.turns.empty() || r.turns.back().done;
    const session_copy* ahead = nullptr;
    for (auto& c : theirs)
      if (c.session == r.id && c.epoch == r.epoch &&
          (c.turns > r.turns.size() ||
           (c.turns == r.turns.size() && (c.tokens > tokens || (c.last_done && !done)))))
        ahead = &c;
    if (ahead == nullptr) {
      keep.push_back(std::move(r));
      continue;
    }
    auto why = "this node's copy (" + std::to_string(r.turns.size()) + " turns, " +
               std::to_string(tokens) + " tokens" + (done ? "" : ", the last running") +
               ") is behind the one on " + ahead->node + " (" + std::to_string(ahead->turns) +
               " turns, " + std::to_string(ahead->tokens) + " tokens" +
               (ahead->last_done ? "" : ", the last running") + ")";
    repair.push_back({r.id, std::move(why), std::move(r)});
  }
  auto repaired = [&](const std::string& id) {
    return std::any_of(repair.begin(), repair.end(), [&](auto& x) { return x.id == id; });
  };
  auto listed = [&](const std::string& id) {
    return repaired(id) ||
           std::any_of(keep.begin(), keep.end(), [&](auto& r) { return r.id == id; }) ||
           sessions_->dropped(id);
  };
  for (auto& c : theirs)
    if (!listed(c.session))
      repair.push_back({c.session, "it is missing from this node's store", std::nullopt});
  for (auto& x : repair) {
    if (auto r = restore(x.id, x.why))
      keep.push_back(std::move(*r));
    else if (x.fallback)
      keep.push_back(std::move(*x.fallback));
  }
  for (auto& id : damaged) {
    if (repaired(id)) continue;
    bool here = std::any_of(keep.begin(), keep.end(), [&](auto& r) { return r.id == id; });
    log.report(cfg_.name + ": damage: session " + id + " was in the damaged part of the store; " +
               (here ? "no peer holds a newer copy, so it is served as recovered"
                     : "no peer holds a copy: acknowledged turns of it may be lost"));
  }
  return keep;
}

std::optional<session_record> node::restore(const std::string& id, const std::string& why) {
  auto& log = *ctx_->log;
  auto f = replicator_->fetch(id);
  auto discarded = store_->discard_corrupt(id);
  if (!f) {
    log.report(cfg_.name + ": repair: session " + id + " (" + why +
               ") has no intact copy on a live peer (" + describe(f.error()) +
               "); its corrupt records are " + (discarded ? "discarded" : "kept"));
    return std::nullopt;
  }
  auto c = wire::decode(f->record);
  if (!c) {
    log.report(cfg_.name + ": repair: the copy of session " + id + " from " + f->node +
               " is unreadable: " + describe(c.error()));
    return std::nullopt;
  }
  if (!c->owner.empty() && c->owner != cfg_.name) {
    log.report(cfg_.name + ": repair: session " + id + " is owned by " + c->owner + " at epoch " +
               std::to_string(f->epoch) + "; dropped this node's copy");
    sessions_->drop(id, f->epoch);
    (void)store_->erase_session(id, f->epoch);
    return std::nullopt;
  }
  c->owner = cfg_.name;
  storage::write_batch b;
  b.erase_session(id, f->epoch);  // an older copy here is replaced whole
  b.put_session(id, f->epoch, wire::encode(*c));
  for (auto& [turn, tokens] : f->logs) b.append_turn_tokens(id, f->epoch, turn, 0, tokens);
  if (auto err = store_->write(b, storage::durability::sync)) {
    log.report(cfg_.name + ": repair: cannot store session " + id + ": " + describe(err));
    return std::nullopt;
  }
  auto r = from_checkpoint(std::move(*c), f->logs);
  r.epoch = f->epoch;
  sessions_->recovered(r);
  log.report(cfg_.name + ": repair: session " + id + " restored from the replica on " + f->node +
             " (epoch " + std::to_string(f->epoch) + ", " + std::to_string(r.turns.size()) +
             " turns, " + std::to_string(count_tokens(f->logs)) + " tokens): " + why);
  return r;
}

void node::drop_taken_over() {
  auto ids = sessions_->ids();
  if (ids.empty()) return;
  auto copies = replicator_->locate(ids);
  for (auto& c : copies) {
    auto mine = sessions_->get(c.session);
    if (mine && c.epoch > mine->epoch) lose_now(c.session, c.epoch);
  }
}

void node::replicate_again() {
  // A peer that went down may have been a replica of this node's sessions: each of them is
  // copied whole to its replicas among the live peers (a no-op where one already has it).
  for (auto& id : sessions_->ids()) {
    auto r = sessions_->get(id);
    if (!r) continue;
    replica_update u;
    u.session = id;
    u.epoch = r->epoch;
    replicator_->enqueue(std::move(u));
  }
}

void node::take_over(int attempt) {
  if (!store_ || !replicator_) return;
  std::set<std::string> live;
  for (auto& p : peers_->snapshot())
    if (p.status != peer_status::down && !p.name.empty() && !cfg_.cut->blocked(p.name))
      live.insert(p.name);
  // Only a node that sees a majority of the cluster (itself included) takes sessions over: a
  // minority side of a partition never does, so it cannot split a session in two.
  const size_t members = cfg_.peers.size() + 1;
  if (live.size() + 1 < members / 2 + 1) {
    ctx_->log->report(cfg_.name + ": takeover: " + std::to_string(live.size() + 1) + " of " +
                      std::to_string(members) + " nodes in view, no majority: not taking over");
    return;
  }
  auto keys = store_->list_sessions();
  if (!keys) return;
  // This node's replicas whose owner is not live.
  std::map<std::string, session_copy> mine;
  for (auto& key : *keys) {
    if (key.rfind(replica_prefix, 0) != 0) continue;
    auto entry = store_->get_session(key);
    if (!entry) continue;
    auto c = wire::decode(entry->payload);
    if (!c || c->owner.empty() || c->owner == cfg_.name || live.count(c->owner) > 0) continue;
    auto logs = store_->read_turns(key);
    if (!logs) continue;
    session_copy x;
    x.session = key.substr(replica_prefix.size());
    x.node = cfg_.name;
    x.epoch = entry->epoch;
    x.record_owner = c->owner;
    x.turns = static_cast<uint32_t>(c->turns.size());
    x.tokens = count_tokens(*logs);
    mine.emplace(x.session, std::move(x));
  }
  if (mine.empty()) return;
  std::vector<std::string> ids;
  for (auto& [id, c] : mine) ids.push_back(id);
  std::vector<std::string> missing;
  auto copies = replicator_->locate(ids, &missing);
  if (!missing.empty()) {
    // A live peer that did not answer may hold a newer copy, or own the session already:
    // deciding without it could make two owners. Ask again shortly (it is either answering
    // again soon, or declared down, which runs this again anyway).
    std::string who;
    for (auto& m : missing) who += (who.empty() ? "" : ", ") + m;
    ctx_->log->report(cfg_.name + ": takeover: no answer from " + who + "; deciding again in " +
                      std::to_string(cfg_.heartbeat_interval.count() * 2) + " ms");
    if (attempt < 20) {
      std::this_thread::sleep_for(cfg_.heartbeat_interval * 2);
      failover_->post([this, attempt] { take_over(attempt + 1); });
    }
    return;
  }
  for (auto& [id, own] : mine) {
    const session_copy* best = &own;
    uint64_t top_epoch = own.epoch;
    bool owned = false;
    for (auto& c : copies) {
      if (c.session != id) continue;
      top_epoch = std::max(top_epoch, c.epoch);
      if (c.owner && c.epoch >= own.epoch) owned = true;  // a live node serves it
      if (newer(c, *best)) best = &c;
    }
    if (owned) continue;
    if (best != &own) {
      ctx_->log->report(cfg_.name + ": takeover: " + best->node + " has the newest copy of session " +
                        id + " (owner " + own.record_owner + " is down); it takes over");
      continue;
    }
    (void)adopt(id, top_epoch + 1, own.record_owner);
  }
}

caf::error node::adopt(const std::string& id, uint64_t epoch, const std::string& from) {
  auto& log = *ctx_->log;
  auto key = replica_key(id);
  auto entry = store_->get_session(key);
  auto logs = store_->read_turns(key);
  if (!entry || !logs) {
    log.report(cfg_.name + ": takeover of session " + id + " failed: its copy is unreadable");
    return make_error(errc::corrupt_record, "the copy of session " + id + " on " + cfg_.name + " is unreadable");
  }
  auto c = wire::decode(entry->payload);
  if (!c) return c.error();
  auto number = store_->take_session_number();
  if (!number) return number.error();
  c->owner = cfg_.name;
  c->number = *number;  // seq ids are per node: take a number of this node's
  storage::write_batch b;
  b.put_session(id, epoch, wire::encode(*c));
  for (auto& [turn, tokens] : *logs) b.append_turn_tokens(id, epoch, turn, 0, tokens);
  b.erase_session(key, epoch);
  if (auto err = store_->write(b, storage::durability::sync)) {
    log.report(cfg_.name + ": takeover of session " + id + " failed: " + describe(err));
    return err;
  }
  auto r = from_checkpoint(std::move(*c), *logs);
  r.epoch = epoch;
  sessions_->recovered(r);
  bool running = !r.turns.empty() && !r.turns.back().done;
  if (auto err = start_session(r)) {
    log.report(cfg_.name + ": takeover of session " + id + ": cannot start it: " + describe(err));
    return err;
  }
  log.report(cfg_.name + ": took over session " + id + " from " + from + " at epoch " +
             std::to_string(epoch) + " (" + std::to_string(r.turns.size()) + " turns, " +
             std::to_string(count_tokens(*logs)) + " tokens" +
             (running ? "; its running turn continues)" : ")"));
  // Fence every other copy at the new epoch (queued after this task: not waited for here).
  replica_update u;
  u.session = id;
  u.epoch = epoch;
  u.fence_all = true;
  replicator_->enqueue(std::move(u));
  return {};
}

void node::lose(const std::string& id, uint64_t epoch) {
  if (failover_)
    failover_->post([this, id, epoch] { lose_now(id, epoch); });
  else
    lose_now(id, epoch);
}

void node::lose_now(const std::string& id, uint64_t epoch) {
  auto had = sessions_->drop(id, epoch);
  if (!had) return;
  auto detail = "session " + id + " was taken over by another node (this node's epoch " +
                std::to_string(had->epoch) + " is stale); reconnect and resume there";
  // The actor tells its running turn's stream to reconnect elsewhere, cancels the turn here
  // and exits normally (transient: not restarted).
  if (auto a = session(id)) caf::anon_send(a, moved_atom::value, detail);
  if (store_) (void)store_->erase_session(id, had->epoch);
  ctx_->log->report(cfg_.name + ": " + detail);
}

caf::expected<uint64_t> node::accept_handoff(const std::string& id, const std::string& from) {
  if (!store_ || !replicator_)
    return make_error(errc::unimplemented, "node " + cfg_.name + " keeps no replicas");
  if (draining_)
    return make_error(errc::overloaded, "node " + cfg_.name + " drains and takes no sessions");
  auto p = std::make_shared<std::promise<caf::expected<uint64_t>>>();
  auto f = p->get_future();
  // On the failover executor, like every takeover: never two at once for one session.
  failover_->post([this, id, from, p] {
    auto entry = store_->get_session(replica_key(id));
    if (!entry) {
      p->set_value(make_error(errc::not_found, "node " + cfg_.name + " has no copy of session " + id));
      return;
    }
    auto epoch = entry->epoch + 1;
    if (auto err = adopt(id, epoch, from))
      p->set_value(std::move(err));
    else
      p->set_value(epoch);
  });
  if (f.wait_for(std::chrono::seconds(30)) != std::future_status::ready)
    return make_error(errc::disconnected, "handoff of session " + id + ": the takeover did not finish");
  return f.get();
}

node::drained_session node::hand_over(const std::string& id) {
  drained_session d;
  d.id = id;
  std::vector<peer_info> live;
  for (auto& p : peers_->snapshot())
    if (p.accepts_work() && !p.name.empty()) live.push_back(p);
  if (live.empty()) {
    d.error = "no live peer to take it";
    return d;
  }
  auto order = replicator::placement(id, cfg_.region, cfg_.replicas, std::move(live));
  // Stop writing it here, and store every token it has (the table holds some not yet logged).
  auto had = sessions_->drop(id, 0);
  if (!had) {
    d.error = "no longer on this node";
    return d;
  }
  if (auto a = session(id)) {
    caf::anon_send(a, moved_atom::value,
                   "session " + id + " is handed over to another node (node " + cfg_.name +
                       " drains); reconnect and resume there");
  }
  caf::error err;
  if (!had->turns.empty()) {
    auto& last = had->turns.back();
    err = store_->append_turn_tokens(id, had->epoch, last.turn, 0, last.generated);
  }
  // The first peer in placement order that takes it (one that drains too refuses).
  caf::expected<uint64_t> epoch = err ? caf::expected<uint64_t>(err)
                                      : make_error(errc::failed, "no peer took it");
  std::string why;
  for (auto& target : order) {
    if (err) break;
    epoch = replicator_->handoff(id, target);
    if (epoch) {
      d.to = target.name;
      break;
    }
    why += (why.empty() ? "" : "; ") + target.name + ": " + describe(epoch.error());
  }
  if (epoch) {
    (void)store_->erase_session(id, had->epoch);
    d.epoch = *epoch;
    ctx_->log->report(cfg_.name + ": drain: session " + id + " handed over to " + d.to +
                      " at epoch " + std::to_string(*epoch));
    return d;
  }
  // Take it back: it is served here again (its running turn resumes).
  d.error = err ? describe(err) : why;
  sessions_->recovered(*had);
  (void)start_session(*had);
  ctx_->log->report(cfg_.name + ": drain: session " + id + " stays: " + d.error);
  return d;
}

caf::expected<std::vector<node::drained_session>> node::drain() {
  if (own_) return protocol_drain();
  if (!store_ || !replicator_) {
    return make_error(errc::unimplemented,
                      "node " + cfg_.name + " cannot drain: it needs --data and --peers");
  }
  if (!draining_.exchange(true) && on_draining_) on_draining_();
  ctx_->log->report(cfg_.name + ": draining: no new sessions; handing over " +
                    std::to_string(sessions_->ids().size()) + " session(s)");
  std::vector<drained_session> out;
  for (auto& id : sessions_->ids()) {
    // On the failover executor, one at a time with takeovers, losses and accepted handoffs.
    auto p = std::make_shared<std::promise<drained_session>>();
    auto f = p->get_future();
    failover_->post([this, id, p] { p->set_value(hand_over(id)); });
    if (f.wait_for(std::chrono::seconds(60)) != std::future_status::ready) {
      drained_session d;
      d.id = id;
      d.error = "the handoff did not finish within 60 s";
      out.push_back(std::move(d));
      continue;
    }
    out.push_back(f.get());
  }
  auto left = sessions_->ids().size();
  ctx_->log->report(cfg_.name + ": drain: " +
                    (left == 0 ? std::string("the node is empty and safe to stop")
                               : std::to_string(left) + " session(s) remain"));
  return out;
}

std::vector<std::string> node::replicas_of(const std::string& id) const {
  std::vector<std::string> out;
  if (!replicator_ || !store_) return out;
  std::vector<peer_info> live;
  for (auto& p : peers_->snapshot())
    if (p.accepts_work() && !p.name.empty()) live.push_back(p);
  auto order = replicator::placement(id, cfg_.region, cfg_.replicas, std::move(live));
  for (size_t i = 0; i < order.size() && i < static_cast<size_t>(cfg_.replicas); ++i)
    out.push_back(order[i].name);
  return out;
}

caf::expected<owner_endpoint> node::owner_address(const std::string& id) {
  if (own_) return protocol_owner(id);
  if (sessions_->get(id)) return owner_endpoint{};  // here
  if (!replicator_) return unknown_session(id);
  auto copies = replicator_->locate({id});
  const session_copy* owner = nullptr;
  for (auto& c : copies)
    if (c.owner && (!owner || c.epoch > owner->epoch)) owner = &c;
  if (owner != nullptr) {
    if (owner->client_address.empty())
      return make_error(errc::disconnected,
                        "session " + id + " is owned by " + owner->node + ", which serves no clients yet");
    return owner_endpoint{owner->node, owner->client_address};
  }
  // A copy here (as a replica, or as this node's own while a takeover of it is under way) or
  // on a peer: the session exists and will be served; the client retries.
  bool here = false;
  if (store_)
    here = static_cast<bool>(store_->get_session(replica_key(id))) ||
           static_cast<bool>(store_->get_session(id));
  if (!copies.empty() || here) {
    return make_error(errc::disconnected, "session " + id +
                                              ": its owner is down; a replica is taking it over "
                                              "(retry)");
  }
  return unknown_session(id);
}

}  // namespace keel
