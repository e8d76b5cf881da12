// The keel-node with peers hosts the ownership protocol: the host actor and its plumbing, what
// the session table hands it, what the node does when it acquires or loses a session, where a
// session is served, and drain. docs/actors.md, "Ownership protocol".

#include <algorithm>
#include <thread>

#include <caf/scoped_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include "actors/detail/ownership_part.hpp"
#include "actors/let_it_crash.hpp"
#include "actors/ownership_store.hpp"
#include "actors/session_copy.hpp"
#include "base/error.hpp"

namespace keel {

namespace {

std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

}  // namespace

uint64_t cluster_digest(const node_config& cfg) {
  if (cfg.peers.empty()) return 0;
  std::map<std::string, std::string> members{{cfg.name, cfg.region}};
  for (auto& n : cfg.peer_names) {
    auto r = cfg.peer_regions.find(n);
    members[n] = r == cfg.peer_regions.end() ? std::string() : r->second;
  }
  std::string text;
  for (auto& [n, r] : members) text += n + "=" + r + ";";
  auto group = std::clamp<int64_t>(cfg.group_size, 1, static_cast<int64_t>(members.size()));
  text += "|group=" + std::to_string(group) +
          "|heartbeat=" + std::to_string(cfg.heartbeat_interval.count()) +
          "|down_after=" + std::to_string(cfg.down_after.count());
  uint64_t h = 14695981039346656037ull;
  for (unsigned char c : text) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h == 0 ? 1 : h;
}

std::shared_ptr<node::ownership_part> make_ownership_part(const node_config& cfg,
                                                          const node_env& env, caf::error& err) {
  auto part = std::make_shared<node::ownership_part>();
  part->clock = env.clock;
  part->board = std::make_shared<lease_board>(env.clock);
  part->make_transport = env.transport;
  part->spawn = env.threads;
  auto& pc = part->protocol;
  pc.self = cfg.name;
  pc.members.push_back({cfg.name, cfg.region});
  for (size_t i = 0; i < cfg.peers.size(); ++i) {
    auto name = i < cfg.peer_names.size() ? cfg.peer_names[i] : std::string();
    if (name.empty()) {
      err = make_error(errc::bad_request,
                       "peer " + cfg.peers[i] +
                           " has no name: every peer needs one (--peers NAME=HOST:PORT), since "
                           "each session's group of nodes is chosen by name");
      return nullptr;
    }
    // Two members of one name would be one vote counted twice.
    for (auto& m : pc.members) {
      if (m.name == name) {
        err = make_error(errc::bad_request,
                         "peer " + cfg.peers[i] + " is named '" + name + "', which " +
                             (name == cfg.name ? std::string("is this node's own name")
                                               : "another peer has too"));
        return nullptr;
      }
    }
    auto r = cfg.peer_regions.find(name);
    pc.members.push_back({name, r == cfg.peer_regions.end() ? std::string() : r->second});
  }
  pc.group_size = static_cast<size_t>(
      std::clamp<int32_t>(cfg.group_size, 1, static_cast<int32_t>(pc.members.size())));
  // Heartbeats and detection as the region links have them; a lease of 4/5 of a detection time,
  // so that an owner cut off stops before the others suspect it.
  auto ns = [](std::chrono::milliseconds d) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
  };
  pc.timing.heartbeat = ns(cfg.heartbeat_interval);
  pc.timing.suspect_after = ns(cfg.down_after);
  pc.timing.lease = ns(cfg.down_after) * 4 / 5;
  pc.timing.retry = std::max<int64_t>(ns(cfg.heartbeat_interval) * 3 / 2, 1);
  pc.checkpoint_every = 1;  // the node sends its token checkpoints itself, every checkpoint_every
  // A member that (re)started promises nothing for `hold()`, so a session opened then (a new
  // cluster's first ones too) waits that long: the acknowledgement timeout covers it, with a
  // second to spare. 2 s at least.
  part->ack_timeout = std::max(
      std::chrono::milliseconds(2000),
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::nanoseconds(
          pc.timing.hold() + pc.timing.retry)) + std::chrono::seconds(1));
  return part;
}

child_spec node::ownership_spec() {
  auto& part = *own_;
  auto log = [l = ctx_->log](const std::string& line) { l->report(line); };
  if (store_)
    part.storage = std::make_shared<store_ownership_storage>(*store_, log);
  else
    part.storage = std::make_shared<memory_ownership_storage>();
  peer_transport_config tc;
  tc.self_name = cfg_.name;
  tc.self_region = cfg_.region;
  tc.self_address = cfg_.peer_address;
  tc.cluster = cluster_digest(cfg_);
  for (size_t i = 0; i < cfg_.peers.size(); ++i) tc.addresses[cfg_.peer_names[i]] = cfg_.peers[i];
  tc.tls = cfg_.tls;
  tc.cut = cfg_.cut;
  tc.log = log;
  tc.call_timeout = std::max(std::chrono::milliseconds(200), cfg_.down_after);
  tc.spawn = part.spawn;
  part.transport = part.make_transport(tc);
  ownership_host_config hc;
  hc.protocol = part.protocol;
  hc.transport = part.transport;
  hc.storage = part.storage;
  // Without a store, each process start forgets every promise: it starts as an amnesiac member.
  // (A restart of the host alone keeps the memory storage, and still reads back: harmless.)
  hc.forgets = !store_;
  hc.leases = part.board;
  hc.clock = part.clock;
  hc.ack_timeout = part.ack_timeout;
  hc.acquired = [this](const std::string& id, const session_data& data, uint64_t epoch) {
    acquired(id, data, epoch);
  };
  hc.lost = [this](const std::string& id) { lost(id); };
  hc.log = log;
  hc.acknowledged = [m = ctx_->metrics](std::chrono::nanoseconds d) {
    m->acknowledgement.observe(d);
  };
  hc.copies = [m = ctx_->metrics](size_t n) {
    m->sessions_replicated.store(n, std::memory_order_relaxed);
  };
  hc.room = [this](const std::string& name) { return room_of(name); };
  hc.may_own = [digest = ctx_->model_digest](const session_data& data) {
    return serves_model(digest, data);
  };
  child_spec host;
  host.id = "host";
  host.start = [hc, part = own_](caf::actor_system& sys, const std::string&,
                                 const caf::message&) -> caf::expected<caf::actor> {
    auto h = spawn_ownership_host(sys, hc);
    std::lock_guard<std::mutex> guard(part->mu);
    part->host = h;
    return caf::actor_cast<caf::actor>(h);
  };
  // rest_for_one: the failover actor first, the host after it. A failover actor that fails
  // takes the host down with it, and the restarted host takes this node's sessions back, each
  // `acquired` again: none the lost actor was about to start stays unserved.
  return supervisor_child("ownership",
                          make_flags(restart_strategy::rest_for_one, 5, std::chrono::seconds(10)),
                          {failover_spec(), std::move(host)}, ctx_->log);
}

namespace {

struct failover_state {
  static inline const char* name = "failover";
};

}  // namespace

child_spec node::failover_spec() {
  child_spec spec;
  spec.id = "failover";
  spec.start = [this](caf::actor_system& sys, const std::string&,
                      const caf::message&) -> caf::expected<caf::actor> {
    // Detached: its handlers wait for the session supervisor (and the store's session numbers)
    // on this actor's own thread, one at a time, in the order the host sent them.
    auto a = sys.spawn<caf::detached>(
        [this](failover_actor::stateful_pointer<failover_state> self)
            -> failover_actor::behavior_type {
          exceptions_as_failures(self);
          return {
              [this](acquired_atom, const std::string& id, const session_data& data,
                     uint64_t epoch) { serve_acquired(id, data, epoch); },
              [this](lost_atom, const std::string& id, const std::string& detail) {
                stop_lost(id, detail);
              },
          };
        });
    ctx_->set_failover(caf::actor_cast<caf::actor>(a));
    return caf::actor_cast<caf::actor>(a);
  };
  return spec;
}

void node::deliver_ownership(const std::string& from, std::string message) {
  if (!own_) return;
  if (auto h = own_->current()) caf::anon_send(h, peer_message_atom::value, from, std::move(message));
}

caf::error node::protocol_change(const session_record& r, change c,
                                 const std::optional<session_record>& previous) {
  auto host = own_->current();
  if (!host)
    return make_error(errc::disconnected, "node " + cfg_.name + " is stopping; retry elsewhere");
  if (c == change::accept && !previous) {
    // From node::open_session, on a thread of the gateway's (never a CAF worker): it waits.
    caf::scoped_actor self{sys_};
    caf::error out;
    self->request(host, own_->ack_timeout + std::chrono::seconds(1), open_atom::value, r.id,
                  session_meta(r))
        .receive([](session_data&) {},
                 [&](caf::error& e) { out = host_refusal(e, "opening session " + r.id); });
    return out;
  }
  // A new turn and a turn's end go from the session actor to the host itself, which answers
  // it when a majority stored them (session.cpp, accept_turn and end_turn): no wait here.
  return {};
}

void node::acquired(const std::string& id, const session_data& data, uint64_t epoch) {
  // On the host's thread: the start (which asks the session supervisor) is the failover
  // actor's, in order with every other acquisition and loss.
  if (auto f = ctx_->failover()) {
    caf::anon_send(f, acquired_atom::value, id, data, epoch);
    return;
  }
  // It is restarting, and the host restarts after it (rest_for_one) and acquires again.
  ctx_->log->report(cfg_.name + ": session " + id +
                    " is started when the ownership host takes it back (the failover actor "
                    "is restarting)");
}

void node::serve_acquired(const std::string& id, const session_data& data, uint64_t epoch) {
  {
    std::lock_guard<std::mutex> guard(own_->mu);
    if (own_->opening.count(id)) return;  // opened here: open_session starts it
  }
  if (sessions_->get(id)) return;  // served here already
  auto r = record_of(id, data, cfg_.name, epoch);
  if (!r) {
    ctx_->log->report(cfg_.name + ": cannot serve session " + id + ": " + describe(r.error()));
    return;
  }
  if (store_) {
    auto number = store_->take_session_number();
    if (!number) {
      ctx_->log->report(cfg_.name + ": cannot serve session " + id + ": " +
                        describe(number.error()));
      return;
    }
    r->number = *number;
  } else {
    r->number = ++next_session_;
  }
  sessions_->recovered(*r);
  ctx_->metrics->takeovers.fetch_add(1, std::memory_order_relaxed);
  ctx_->log->report(cfg_.name + ": took over session " + id + " at epoch " +
                    std::to_string(epoch) + " (" + std::to_string(r->turns.size()) +
                    " turns, the newest copy of a majority of its group)");
  if (auto err = start_session(*r))
    ctx_->log->report(cfg_.name + ": cannot start session " + id + ": " + describe(err));
}

void node::lost(const std::string& id) {
  auto detail = "session " + id + " was taken over by another node; reconnect and resume there";
  if (auto f = ctx_->failover()) {
    caf::anon_send(f, lost_atom::value, id, detail);
    return;
  }
  // The failover actor is restarting (this may be a CAF worker: nothing waits here). The table
  // refuses the session's writes from now on and its lease is gone, so its actor streams
  // nothing more, its running turn's client is detached (batcher_config::quorum_grace) and the
  // actor ends at its next write.
  if (sessions_->drop(id, 0)) ctx_->log->report(cfg_.name + ": " + detail);
}

void node::stop_lost(const std::string& id, const std::string& detail) {
  auto had = sessions_->drop(id, 0);
  if (!had) return;
  // The actor ends its running turn's stream (the client resumes elsewhere), cancels the
  // turn here and exits (transient: not restarted).
  if (auto a = session(id)) caf::anon_send(a, moved_atom::value, detail);
  ctx_->log->report(cfg_.name + ": " + detail);
}

caf::expected<owner_endpoint> node::owner_address(const std::string& id) {
  if (sessions_->get(id)) return owner_endpoint{};
  if (!own_) return unknown_session(id);
  // Not a member of its group (a cluster larger than a group): this node knows nothing of the
  // session, its group's members do. The first reachable one serves it or forwards it on.
  auto group = replica_group(id, own_->protocol.members, own_->protocol.group_size);
  if (std::find(group.begin(), group.end(), cfg_.name) == group.end()) {
    auto live = peers_->snapshot();
    for (auto& m : group)
      for (auto& p : live)
        if (p.name == m && p.accepts_work() && !p.client_address.empty())
          return owner_endpoint{p.name, p.client_address};
    return make_error(errc::disconnected, "session " + id + ": no member of its group (" +
                                              joined(group) + ") is reachable from node " +
                                              cfg_.name + " now (retry)");
  }
  auto host = own_->current();
  if (!host) return make_error(errc::disconnected, "node " + cfg_.name + " is stopping");
  caf::scoped_actor self{sys_};
  caf::expected<ownership_view> view = make_error(errc::failed, "no answer");
  self->request(host, std::chrono::seconds(2), describe_atom::value, id)
      .receive([&](ownership_view& v) { view = std::move(v); },
               [&](caf::error& e) { view = host_refusal(e, "locating session " + id); });
  if (!view) return std::move(view.error());
  if (view->owner.empty() && view->accepted.epoch == 0 && view->promised.epoch == 0)
    return unknown_session(id);
  if (view->owner.empty() || view->owner == cfg_.name) {
    return make_error(errc::disconnected,
                      "session " + id + ": its group is choosing its owner (retry)");
  }
  for (auto& p : peers_->snapshot()) {
    if (p.name != view->owner || !p.accepts_work()) continue;
    if (p.client_address.empty()) break;
    return owner_endpoint{p.name, p.client_address};
  }
  return make_error(errc::disconnected, "session " + id + " is owned by " + view->owner +
                                            ", which this node cannot reach now (retry)");
}

std::vector<std::string> node::replicas_of(const std::string& id) const {
  std::vector<std::string> out;
  if (!own_) return out;
  for (auto& m : replica_group(id, own_->protocol.members, own_->protocol.group_size))
    if (m != cfg_.name) out.push_back(m);
  return out;
}

std::optional<std::pair<uint64_t, size_t>> node::sent_to_group(const std::string& id) const {
  if (!own_) return std::nullopt;
  return sessions_->group_checkpoint(id);
}

peer_transport::counters node::replication() const {
  if (!own_) return {};
  // Another transport (node_env::transport) keeps no such counters.
  auto t = std::dynamic_pointer_cast<peer_transport>(own_->transport);
  return t ? t->stats() : peer_transport::counters{};
}

std::string node::no_other_member_up(const std::string& id) const {
  std::map<std::string, peer_status> status;  // by peer name, from the region links
  auto seen = peers_->snapshot();
  for (size_t i = 0; i < cfg_.peers.size() && i < cfg_.peer_names.size(); ++i)
    for (auto& p : seen)
      if (p.address == cfg_.peers[i]) status[cfg_.peer_names[i]] = p.status;
  std::string list;
  for (auto& m : replicas_of(id)) {
    auto it = status.find(m);
    if (it == status.end() || it->second != peer_status::down) return {};
    list += (list.empty() ? "" : ", ") + m;
  }
  if (list.empty()) return {};
  return "no other member of its group answers this node (" + list +
         " down); it is taken over once a majority of its group is up";
}

caf::expected<std::vector<node::drained_session>> node::drain(const drain_options& o) {
  if (!own_)
    return make_error(errc::unimplemented,
                      "node " + cfg_.name + " cannot drain: it runs alone (no --peers)");
  auto host = own_->current();
  if (!host) return make_error(errc::disconnected, "node " + cfg_.name + " is stopping");
  if (!draining_.exchange(true) && on_draining_) on_draining_();
  auto ids = sessions_->ids();
  ctx_->log->report(cfg_.name + ": draining: no new sessions; giving up " +
                    std::to_string(ids.size()) + " session(s) to their groups");
  std::vector<std::string> asked = ids;  // with those an earlier drain gave up
  {
    std::lock_guard<std::mutex> guard(own_->mu);
    for (auto& id : ids) own_->given_up.insert(id);
    for (auto& id : own_->given_up)
      if (std::find(asked.begin(), asked.end(), id) == asked.end()) asked.push_back(id);
  }
  caf::scoped_actor self{sys_};
  for (auto& id : ids) {
    self->request(host, std::chrono::seconds(5), resign_atom::value, id)
        .receive([](bool) {}, [](caf::error&) {});
    // As when another node takes it over: this node stops serving it now, and its client
    // resumes at the new owner.
    auto detail = "session " + id + " is handed over (node " + cfg_.name +
                  " drains); reconnect and resume on another node";
    if (auto f = ctx_->failover())
      caf::anon_send(f, lost_atom::value, id, detail);
    else
      stop_lost(id, detail);  // drain's own thread: it may wait
  }
  // Another member of each group takes it over after suspect_after, as from a silent owner:
  // waited for a few times that.
  std::vector<drained_session> out;
  auto patience = o.patience;
  if (patience.count() <= 0)
    patience = std::max<std::chrono::milliseconds>(std::chrono::seconds(5), cfg_.down_after * 6);
  auto until = std::chrono::steady_clock::now() + patience;
  for (auto& id : asked) {
    drained_session d;
    d.id = id;
    for (;;) {
      caf::expected<ownership_view> v = make_error(errc::failed, "no answer");
      self->request(host, std::chrono::seconds(2), describe_atom::value, id)
          .receive([&](ownership_view& x) { v = std::move(x); },
                   [&](caf::error& e) { v = std::move(e); });
      if (v && !v->owner.empty() && v->owner != cfg_.name) {
        d.to = v->owner;
        d.epoch = v->promised.epoch;
        std::lock_guard<std::mutex> guard(own_->mu);
        own_->given_up.erase(id);
        break;
      }
      if (o.stop.stop_requested()) {
        d.error = "the drain was cut short before another member of its group took it over";
        break;
      }
      if (auto why = o.skip_unreachable ? no_other_member_up(id) : std::string(); !why.empty()) {
        d.error = why;
        break;
      }
      if (std::chrono::steady_clock::now() >= until) {
        d.error = "no other member of its group took it over within " +
                  std::to_string(patience.count()) + " ms" +
                  (v ? std::string() : " (" + describe(v.error()) + ")");
        break;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    out.push_back(std::move(d));
  }
  size_t left = 0;
  for (auto& d : out) left += d.error.empty() ? 0 : 1;
  ctx_->log->report(cfg_.name + ": drain: " +
                    (left == 0 ? std::string("every session has a new owner; safe to stop")
                               : std::to_string(left) + " session(s) have no new owner yet"));
  return out;
}

}  // namespace keel
