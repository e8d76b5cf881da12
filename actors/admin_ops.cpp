#include "actors/admin_ops.hpp"

#include <algorithm>
#include <thread>

#include <caf/actor_cast.hpp>
#include <caf/monitorable_actor.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/atoms.hpp"
#include "actors/fault.hpp"
#include "storage/session_store.hpp"

namespace keel {

namespace {

using namespace std::chrono_literals;

/// The answer of a request to `dest`, waited for on the calling (non-CAF, non-KJ) thread. A
/// timeout says which actor did not answer.
template <class T, class Handle, class... Ts>
caf::expected<T> call(caf::actor_system& sys, const Handle& dest, const std::string& what,
                      std::chrono::milliseconds timeout, Ts... xs) {
  if (!dest) return make_error(errc::disconnected, what + " is not running");
  caf::scoped_actor self{sys};
  caf::expected<T> out = make_error(errc::failed, what + ": no reply");
  self->request(dest, timeout, xs...)
      .receive([&](T& x) { out = std::move(x); },
               [&](caf::error& e) {
                 if (e == caf::sec::request_timeout)
                   out = make_error(errc::overloaded, what + " did not answer within " +
                                                          std::to_string(timeout.count()) + " ms");
                 else
                   out = std::move(e);
               });
  return out;
}

/// "a, b, c".
std::string joined(const std::vector<std::string>& xs) {
  std::string out;
  for (auto& x : xs) out += (out.empty() ? "" : ", ") + x;
  return out;
}

bool is_failure(const supervision_event& e) {
  return e.kind == supervision_event_kind::exited && !e.reason.empty() &&
         e.reason != "user_shutdown" && e.reason != "normal";
}

}  // namespace

caf::expected<std::vector<actor_row>> admin_ops::tree() {
  auto events = node_.log().events();
  event_index last, failed;
  for (auto& e : events) {
    last[e.path] = &e;
    if (is_failure(e)) failed[e.path] = &e;
  }
  std::vector<actor_row> out;
  actor_row root;
  root.path = name();
  root.kind = "supervisor";
  root.state = node_.root() ? "running" : "stopped";
  out.push_back(root);
  if (auto err = walk(caf::actor_cast<caf::actor>(node_.root()), root.path, 1, last, failed, out)) return err;
  return out;
}

caf::expected<figures> admin_ops::report() {
  figures f;
  if (auto s = node_.stats()) f.stats = std::move(*s);
  for (auto& r : node_.sessions()) {
    ++f.sessions;
    if (!r.turns.empty() && !r.turns.back().done) ++f.running;
  }
  for (auto& e : node_.log().events())
    if (e.kind == supervision_event_kind::restarted) ++f.restarts;
  f.faults_fired = static_cast<uint64_t>(node_.faults().fired());
  auto sent = node_.replication();
  f.replicated = sent.delivered;
  f.replication_failures = sent.failed + sent.dropped;
  f.peers = node_.peers();
  return f;
}

caf::expected<std::vector<session_row>> admin_ops::sessions() {
  std::vector<session_row> out;
  auto* store = node_.store();
  for (auto& r : node_.sessions()) {
    session_row row;
    row.durable = store != nullptr;
    if (auto sent = node_.sent_to_group(r.id)) {
      // With peers: the turn's tokens checkpointed to the session's group (its end carries
      // them all).
      row.checkpoint_turn = sent->first;
      row.checkpoint_tokens = sent->second;
      if (!r.turns.empty() && r.turns.back().turn == sent->first && r.turns.back().done)
        row.checkpoint_tokens = r.turns.back().generated.size();
    } else if (store != nullptr && !r.turns.empty() && node_.replicas_of(r.id).empty()) {
      row.checkpoint_turn = r.turns.back().turn;
      if (auto logged = store->read_turn(r.id, row.checkpoint_turn)) {
        row.checkpoint_tokens = logged->size();
      } else if (code_of(logged.error()) != errc::not_found) {
        return make_error(code_of(logged.error()),
                          "session " + r.id + ": " + message_of(logged.error()));
      }
    }
    row.replicas = node_.replicas_of(r.id);
    row.parked = node_.parked(r.id).value_or("");
    row.r = std::move(r);
    out.push_back(std::move(row));
  }
  return out;
}

caf::expected<std::string> admin_ops::kill(const std::string& path) {
  auto at = resolve(path);
  if (!at) return std::move(at.error());
  if (!at->parent) return root_refused();
  if (!at->child.handle)
    return make_error(errc::overloaded, path + " is not running now (restarting); try again");
  auto before = node_.log().events().size();
  auto started = std::chrono::steady_clock::now();
  {
    caf::scoped_actor self{sys_};
    self->send_exit(at->child.handle, make_error(errc::failed, "killed by admin"));
  }
  auto deadline = started + cfg_.reaction_wait;
  while (std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(2ms);
    auto events = node_.log().events();
    for (size_t i = before; i < events.size(); ++i) {
      auto& e = events[i];
      auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                    std::chrono::steady_clock::now() - started)
                    .count();
      if (e.kind == supervision_event_kind::restarted && e.path == path) {
        return "killed " + path + "; " + at->parent_path + " restarted it within " +
               std::to_string(ms) + " ms (restarts: " + std::to_string(e.restarts) + ")";
      }
      if (e.kind == supervision_event_kind::escalated && path.rfind(e.path + "/", 0) == 0) {
        return "killed " + path + "; " + e.path + " exceeded its restart intensity and " +
               "failed to its own supervisor";
      }
    }
  }
  return "killed " + path + "; no restart seen within " +
         std::to_string(cfg_.reaction_wait.count()) +
         " ms (a shard worker finishes its step first; see `tree`)";
}

caf::expected<std::string> admin_ops::restart(const std::string& path) {
  auto at = resolve(path);
  if (!at) return std::move(at.error());
  if (!at->parent) return root_refused();
  auto started = std::chrono::steady_clock::now();
  auto ok = call<bool>(sys_, caf::actor_cast<supervisor_actor>(at->parent), at->parent_path,
                       cfg_.call_timeout, restart_atom::value, at->child.id);
  if (!ok) return std::move(ok.error());
  if (!*ok)
    return make_error(errc::failed, at->parent_path + " did not restart " + at->child.id +
                                        " (it is shutting down, or the child is gone)");
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                  started)
                .count();
  return "restarted " + path + " in " + std::to_string(ms) +
         " ms (restarts: " + std::to_string(node_.log().restarts(path)) + ")";
}

caf::expected<std::string> admin_ops::fault(const std::string& path, const fault_request& f) {
  auto at = resolve(path);
  if (!at) return std::move(at.error());
  auto& faults = node_.faults();
  if (f.kind == fault_kind::clear || f.kind == fault_kind::partition ||
      f.kind == fault_kind::disk_full) {
    const char* what = f.kind == fault_kind::clear       ? "clear"
                       : f.kind == fault_kind::partition ? "partition"
                                                         : "disk-full";
    if (at->parent)
      return make_error(errc::bad_request,
                        std::string(what) + " applies to the node, " + name() + ", not to " + path);
    if (f.kind == fault_kind::partition) return partition_from(f);
    if (f.kind == fault_kind::disk_full) return disk_full(f);
    auto was_cut = node_.cut().cut_now();
    faults.clear();
    node_.cut().heal();
    node_.disk().clear();
    return "disarmed every fault of node " + name() + " and healed its partition" +
           (was_cut.empty() ? std::string(" (there was none)") : " from " + joined(was_cut));
  }
  // Range checks before anything is armed (issue #11: a 2^31 step count wrapped, and a stall of
  // 2^32 - 1 ms hung a worker past clear, kill and SIGTERM).
  if (f.after_steps > max_fault_steps)
    return make_error(errc::bad_request, "fault " + path + ": after " +
                                             std::to_string(f.after_steps) + " steps is beyond " +
                                             std::to_string(max_fault_steps));
  if (f.kind == fault_kind::stall && f.duration_ms > max_stall_ms)
    return make_error(errc::bad_request, "fault " + path + ": a stall of " +
                                             std::to_string(f.duration_ms) + " ms is beyond " +
                                             std::to_string(max_stall_ms) + " ms");
  if (f.kind == fault_kind::cut && f.duration_ms > max_partition_ms)
    return make_error(errc::bad_request, "fault " + path + ": a cut of " +
                                             std::to_string(f.duration_ms) + " ms is beyond " +
                                             std::to_string(max_partition_ms) + " ms");
  if (f.kind == fault_kind::kv_fail && f.count > max_kv_failures)
    return make_error(errc::bad_request, "fault " + path + ": " + std::to_string(f.count) +
                                             " KV allocation failures are beyond " +
                                             std::to_string(max_kv_failures));
  auto kind = kind_of(path, at->child);
  auto& id = at->child.id;
  const bool shard = kind == "shard_worker" && id.rfind("shard-", 0) == 0;
  if (shard && f.kind != fault_kind::cut) {
    auto rank = static_cast<int32_t>(std::strtol(id.c_str() + 6, nullptr, 10));
    auto after = static_cast<int32_t>(f.after_steps);
    auto when = f.after_steps == 0 ? std::string("its next step")
                                   : "step " + std::to_string(f.after_steps + 1) + " from now";
    switch (f.kind) {
      case fault_kind::crash:
        faults.crash_shard(rank, after);
        return "armed: " + path + " crashes at " + when;
      case fault_kind::stall:
        faults.stall_shard(rank, std::chrono::milliseconds(f.duration_ms), after);
        return "armed: " + path + " stalls " + std::to_string(f.duration_ms) + " ms before " + when;
      case fault_kind::kv_fail:
        faults.fail_kv_allocations(rank, static_cast<int32_t>(std::max(f.count, 1u)));
        return "armed: the next " + std::to_string(std::max(f.count, 1u)) +
               " KV page allocation(s) of " + path + " fail";
      default:
        break;
    }
  }
  if (kind == "session" && f.kind == fault_kind::crash) {
    if (f.after_steps != 0)
      return make_error(errc::bad_request, "a session crashes at its next message; " +
                                               std::string("AFTER applies to shard workers"));
    if (f.count > 1000000)
      return make_error(errc::bad_request, "fault " + path + ": " + std::to_string(f.count) +
                                               " crashes are beyond 1000000");
    auto times = static_cast<int32_t>(std::max(f.count, 1u));
    faults.crash_session(id, times);
    return "armed: " + path + " crashes when it next handles a message" +
           (times > 1 ? ", " + std::to_string(times) + " times" : std::string());
  }
  if (kind == "region_link" && f.kind == fault_kind::cut) {
    auto ok = call<bool>(sys_, caf::actor_cast<link_actor>(at->child.handle), path,
                         cfg_.call_timeout, cut_atom::value, static_cast<int64_t>(f.duration_ms));
    if (!ok) return std::move(ok.error());
    return "cut " + path + " for " + std::to_string(f.duration_ms) + " ms";
  }
  return make_error(errc::bad_request,
                    path + " is a " + (kind.empty() ? "actor" : kind) +
                        "; crash, stall and kv-fail apply to shard workers, crash to sessions, "
                        "cut to region links, clear and partition to the node (" +
                        name() + ")");
}

caf::expected<std::string> admin_ops::disk_full(const fault_request& f) {
  if (f.duration_ms > max_partition_ms)
    return make_error(errc::bad_request, "disk-full of " + name() + " for " +
                                             std::to_string(f.duration_ms) + " ms: at most " +
                                             std::to_string(max_partition_ms) + " ms (24 h)");
  if (!node_.store())
    return make_error(errc::bad_request,
                      "disk-full: node " + name() + " has no session store (--data)");
  node_.disk().fill(std::chrono::milliseconds(f.duration_ms));
  return "the disk of " + name() + " is full (every session store write fails with ENOSPC)" +
         (f.duration_ms > 0 ? " for " + std::to_string(f.duration_ms) + " ms"
                            : std::string(" until cleared (fault ") + name() + " clear)");
}

caf::expected<std::string> admin_ops::partition_from(const fault_request& f) {
  if (f.peers.empty())
    return make_error(errc::bad_request, "partition of " + name() +
                                             " names no peer to cut it from; give --from NODE,...");
  if (f.duration_ms > max_partition_ms)
    return make_error(errc::bad_request, "partition of " + name() + " for " +
                                             std::to_string(f.duration_ms) + " ms: at most " +
                                             std::to_string(max_partition_ms) + " ms (24 h)");
  // Peers are known by the names they answered heartbeats with; one never heard from has none.
  std::vector<std::string> known;
  size_t nameless = 0;
  for (auto& p : node_.peers()) {
    if (p.name.empty())
      ++nameless;
    else
      known.push_back(p.name);
  }
  auto known_list = [&] {
    if (known.empty() && nameless == 0) return std::string("no peers");
    std::string out = known.empty() ? "no named peers" : "peers " + joined(known);
    if (nameless > 0) out += " (" + std::to_string(nameless) + " not heard from yet)";
    return out;
  };
  std::vector<std::string> peers;  // f.peers without repeats, in order
  for (auto& p : f.peers)
    if (std::find(peers.begin(), peers.end(), p) == peers.end()) peers.push_back(p);
  for (auto& p : peers) {
    if (p == name())
      return make_error(errc::bad_request, "partition of " + name() +
                                               ": a node cannot be cut from itself (" + p + ")");
    if (std::find(known.begin(), known.end(), p) == known.end())
      return make_error(errc::bad_request, "partition of " + name() + ": no peer named '" + p +
                                               "'; " + name() + " has " + known_list());
  }
  node_.cut().cut(peers, std::chrono::milliseconds(f.duration_ms));
  return "partitioned " + name() + " from " + joined(peers) +
         (f.duration_ms > 0 ? " for " + std::to_string(f.duration_ms) + " ms"
                            : std::string(" until cleared (fault ") + name() + " clear)");
}

caf::expected<drain_outcome> admin_ops::drain() {
  auto moved = node_.drain();
  if (!moved) return std::move(moved.error());
  drain_outcome out;
  out.sessions = std::move(*moved);
  // The node gave every session up; those no other member owns yet are not served anywhere
  // (their data is safe on the group's majority, but a stop now leaves them unserved longer).
  size_t without = node_.sessions().size();
  for (auto& s : out.sessions) without += s.error.empty() ? 0 : 1;
  out.remaining = static_cast<uint32_t>(without);
  return out;
}

caf::error admin_ops::root_refused() const {
  return make_error(errc::bad_request, name() +
                                           " is the node's root supervisor and nothing would " +
                                           "restart it; give a path below it, e.g. " + name() +
                                           "/engine/shard-0 (stop the node with SIGTERM instead)");
}

caf::expected<std::vector<child_info>> admin_ops::list(const caf::actor& sup,
                                                       const std::string& path) {
  return call<std::vector<child_info>>(sys_, caf::actor_cast<supervisor_actor>(sup), path,
                                       cfg_.call_timeout, list_atom::value);
}

// From its spec, else the actor's own name (stateful actors name themselves: shard_worker,
// batcher, session), else the last kind seen at its path (an actor between restarts has no
// handle).
std::string admin_ops::kind_of(const std::string& path, const child_info& c) {
  std::string kind = c.kind;
  if (kind.empty() && c.handle) {
    auto* a = caf::actor_cast<caf::abstract_actor*>(c.handle);
    if (auto* m = dynamic_cast<caf::monitorable_actor*>(a)) {
      std::string n = m->name();
      if (n != "scheduled_actor" && n.find("actor") == std::string::npos) kind = n;
    }
  }
  if (!kind.empty()) kinds_[path] = kind;
  auto i = kinds_.find(path);
  return i == kinds_.end() ? std::string() : i->second;
}

caf::error admin_ops::walk(const caf::actor& sup, const std::string& path, uint32_t depth,
                           const event_index& last, const event_index& failed,
                           std::vector<actor_row>& out) {
  auto children = list(sup, path);
  if (!children) return std::move(children.error());
  for (auto& c : *children) {
    actor_row row;
    row.path = c.path;
    row.depth = depth;
    row.kind = kind_of(c.path, c);
    row.restarts = c.restarts;
    row.last_failure = c.last_failure;
    if (auto f = failed.find(c.path); f != failed.end()) row.failed_at = f->second->when;
    if (c.handle) {
      row.state = "running";
    } else {
      auto l = last.find(c.path);
      bool stopped = l != last.end() && l->second->kind == supervision_event_kind::stopped;
      row.state = stopped ? "stopped" : "restarting";
    }
    out.push_back(row);
    if (row.kind == "supervisor" && c.handle) {
      if (auto err = walk(c.handle, c.path, depth + 1, last, failed, out)) return err;
    }
  }
  return {};
}

caf::expected<located> admin_ops::resolve(const std::string& path) {
  std::vector<std::string> parts;
  for (size_t b = 0; b <= path.size();) {
    auto e = std::min(path.find('/', b), path.size());
    parts.push_back(path.substr(b, e - b));
    b = e + 1;
  }
  if (parts.empty() || parts[0] != name() ||
      std::any_of(parts.begin(), parts.end(), [](auto& p) { return p.empty(); })) {
    return make_error(errc::not_found, "no actor " + path + " on node " + name() +
                                           ": paths start with the node's name, e.g. " + name() +
                                           "/engine/shard-0 (see `tree`)");
  }
  located at;
  at.child.id = name();
  at.child.path = name();
  at.child.handle = caf::actor_cast<caf::actor>(node_.root());
  at.child.kind = "supervisor";
  for (size_t i = 1; i < parts.size(); ++i) {
    auto& here = at.child;
    if (kind_of(here.path, here) != "supervisor")
      return make_error(errc::not_found, "no actor " + path + ": " + here.path + " is a " +
                                             kind_of(here.path, here) + " and has no children");
    if (!here.handle) return make_error(errc::overloaded, here.path + " is restarting; try again");
    auto children = list(here.handle, here.path);
    if (!children) return std::move(children.error());
    auto c = std::find_if(children->begin(), children->end(),
                          [&](const child_info& x) { return x.id == parts[i]; });
    if (c == children->end()) {
      std::string names;
      for (auto& x : *children) names += (names.empty() ? "" : ", ") + x.id;
      return make_error(errc::not_found, "no actor " + path + " on node " + name() + "; " +
                                             here.path + " has " +
                                             (names.empty() ? "no children" : names));
    }
    at.parent = here.handle;
    at.parent_path = here.path;
    at.child = *c;
  }
  return at;
}

}  // namespace keel
