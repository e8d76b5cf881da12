// The commands that ask nodes: tree, nodes, sessions, stats, kill, restart, fault, drain.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>

#include "apps/shell/render.hpp"
#include "apps/shell/shell.hpp"
#include "base/error.hpp"

namespace keel::shell {

namespace {

void print(const std::string& text) {
  std::fputs(text.c_str(), stdout);
  std::fflush(stdout);
}

void print_json(const json& j) {
  print(j.str() + "\n");
}

/// A node that did not answer while others did: one line on stderr; the command goes on.
void warn(const std::string& command, const caf::error& err) {
  std::fflush(stdout);
  std::fprintf(stderr, "keel-shell: %s: %s\n", command.c_str(), message_of(err).c_str());
}

int status_rank(const std::string& s) {
  return s == "up" ? 2 : s == "suspect" ? 1 : 0;
}

constexpr uint32_t one_hour_ms = 3'600'000;
constexpr uint32_t one_day_ms = 86'400'000;  // the longest partition (admin_ops.hpp)

/// "500", "500ms", "2s", "1.5s" as whole milliseconds, 1 ms to `max_ms`.
std::optional<uint32_t> parse_ms(const std::string& s, uint32_t max_ms = one_hour_ms) {
  std::string num = s;
  double scale = 1;
  if (num.size() > 2 && num.compare(num.size() - 2, 2, "ms") == 0) {
    num.resize(num.size() - 2);
  } else if (num.size() > 1 && num.back() == 's') {
    num.pop_back();
    scale = 1000;
  }
  if (num.empty() || num.find_first_not_of("0123456789.") != std::string::npos) return {};
  char* end = nullptr;
  double v = std::strtod(num.c_str(), &end) * scale;
  // A fraction of a millisecond ("2.5") is refused rather than cut off; the tolerance is for
  // binary fractions ("1.1s" is 1100.0000000000002).
  if (*end != '\0' || v < 1 || v > max_ms || std::abs(v - std::round(v)) > 1e-6) return {};
  return static_cast<uint32_t>(std::llround(v));
}

std::optional<uint32_t> parse_count(const std::string& s, uint32_t min) {
  if (s.empty() || s.find_first_not_of("0123456789") != std::string::npos || s.size() > 9)
    return {};
  auto v = static_cast<uint32_t>(std::strtoul(s.c_str(), nullptr, 10));
  if (v < min) return {};
  return v;
}

}  // namespace

int shell::tree(const std::vector<std::string>& args) {
  if (args.size() > 2) return fail("tree", usage_error("tree", "give one node at most"));
  std::vector<size_t> which;
  if (args.size() == 2) {
    auto m = member_named(args[1]);
    if (!m) return fail("tree", m.error());
    which.push_back(*m);
  } else {
    for (size_t i = 0; i < cluster_.members().size(); ++i) which.push_back(i);
  }
  table t({{"PATH"},
           {"KIND"},
           {"STATE"},
           {"RESTARTS", true},
           {"FAILED", true},
           {"LAST FAILURE", false, true}});
  json j;
  j.begin_object().key("nodes").begin_array();
  size_t answered = 0;
  for (auto i : which) {
    auto rows = cluster_.tree(i);
    const auto& m = cluster_.members()[i];
    if (!rows) {
      if (which.size() == 1) return fail("tree", with_hint(rows.error()));
      warn("tree", rows.error());
      j.begin_object().field("node", m.name).field("address", m.address);
      j.field("error", message_of(rows.error())).end_object();
      continue;
    }
    ++answered;
    j.begin_object().field("node", m.name).field("address", m.address).key("actors");
    j.begin_array();
    for (auto& r : *rows) {
      const bool never = r.last_failure.empty();
      t.add({std::string(2 * r.depth, ' ') + r.path, r.kind.empty() ? "-" : r.kind, r.state,
             std::to_string(r.restarts),
             format_age_ms(r.last_failure_age_ms, never || r.last_failure_unix_ms == 0),
             never ? "-" : r.last_failure});
      j.begin_object().field("path", r.path).field("depth", r.depth).field("kind", r.kind);
      j.field("state", r.state).field("restarts", r.restarts).key("last_failure");
      if (never) {
        j.null().key("last_failure_age_ms").null().key("last_failure_unix_ms").null();
      } else {
        j.value(r.last_failure).field("last_failure_age_ms", r.last_failure_age_ms);
        j.field("last_failure_unix_ms", r.last_failure_unix_ms);
      }
      j.end_object();
    }
    j.end_array().end_object();
  }
  j.end_array().end_object();
  if (answered == 0)
    return fail("tree",
                make_error(errc::disconnected, "no node answered; nodes: " + known_nodes()));
  if (json_)
    print_json(j);
  else
    print(t.render());
  return 0;
}

int shell::nodes(const std::vector<std::string>& args) {
  if (args.size() > 1) return fail("nodes", usage_error("nodes", "it takes no arguments"));
  struct entry {
    std::string name, region, address, admin, peer, status = "down", note;
    bool reached = false;
    std::optional<node_report> r;
    std::optional<peer_row> seen;  // not reached: what a peer's heartbeats say of its load
  };
  std::vector<entry> rows;
  std::map<std::string, size_t> by_key;  // a node's name, or its address while nameless
  std::vector<node_report> reports;
  const auto& ms = cluster_.members();
  for (size_t i = 0; i < ms.size(); ++i) {
    entry e;
    e.admin = ms[i].address;
    auto r = cluster_.report(i);
    e.name = ms[i].name;  // after the call: a reconnect may have learnt it
    if (r) {
      e.name = r->name;
      e.region = r->region;
      e.address = r->client_address;
      e.peer = r->peer_address;
      e.status = r->draining ? "draining" : "up";
      e.reached = true;
      e.r = *r;
      reports.push_back(*r);
    } else {
      e.address = ms[i].address;
      e.note = ms[i].up ? message_of(r.error()) : ms[i].down_reason;
    }
    by_key[e.name.empty() ? e.admin : e.name] = rows.size();
    rows.push_back(std::move(e));
  }
  // What the reached nodes' region links say of their peers.
  for (auto& rep : reports) {
    for (auto& p : rep.peers) {
      bool self = false;
      for (auto& other : reports)
        self = self || (!other.peer_address.empty() && other.peer_address == p.address);
      auto key = p.name.empty() ? p.address : p.name;
      auto at = by_key.find(key);
      if (self || (at != by_key.end() && rows[at->second].reached)) continue;
      if (at == by_key.end()) {
        entry e;
        e.name = p.name;
        e.region = p.region;
        e.address = p.client_address.empty() ? p.address : p.client_address;
        e.peer = p.address;
        e.status = p.status;
        e.note = "seen by " + rep.name + "'s region link";
        if (p.kv_pages_capacity > 0) e.seen = p;
        by_key[key] = rows.size();
        rows.push_back(std::move(e));
      } else if (status_rank(p.status) > status_rank(rows[at->second].status) ||
                 rows[at->second].peer.empty()) {
        auto& e = rows[at->second];
        e.status = status_rank(p.status) > status_rank(e.status) ? p.status : e.status;
        e.peer = p.address;
        if (e.region.empty()) e.region = p.region;
        if (!p.client_address.empty()) e.address = p.client_address;
        e.note += (e.note.empty() ? "" : "; ") + rep.name + "'s link sees it " + p.status;
        if (p.kv_pages_capacity > 0 && !e.seen) e.seen = p;
      }
    }
  }
  table t({{"NODE"},
           {"REGION"},
           {"ADDRESS"},
           {"STATUS"},
           {"SESSIONS", true},
           {"KV PAGES", true},
           {"QUEUE", true},
           {"ROOM", true},
           {"TOK/S", true}});
  json j;
  j.begin_object().key("nodes").begin_array();
  std::string notes;
  for (auto& e : rows) {
    auto dash = std::string("-");
    auto percent = [](float x) { return std::to_string(static_cast<int>(x * 100 + 0.5f)) + "%"; };
    std::string kv = dash, queue = dash, room = dash;
    if (e.r) {
      kv = std::to_string(e.r->kv_pages_used) + "/" + std::to_string(e.r->kv_pages_total);
      queue = std::to_string(e.r->queue_length);
      room = percent(e.r->room);
    } else if (e.seen) {  // from a peer's heartbeats: the node is not reached, its load is known
      kv = std::to_string(e.seen->kv_pages_capacity - std::min(e.seen->kv_pages_free,
                                                               e.seen->kv_pages_capacity)) +
           "/" + std::to_string(e.seen->kv_pages_capacity);
      queue = std::to_string(e.seen->waiting);
      room = percent(e.seen->room);
    }
    t.add({e.name.empty() ? "?" : e.name, e.region.empty() ? dash : e.region, e.address, e.status,
           e.r ? std::to_string(e.r->sessions) : dash, kv, queue, room,
           e.r ? format_rate(e.r->tokens_per_second) : dash});
    if (!e.reached)
      notes += "  " + (e.name.empty() ? e.address : e.name) + ": not reached" +
               (e.admin.empty() || e.admin == e.address ? "" : " at " + e.admin) +
               (e.note.empty() ? "" : ": " + e.note) + "\n";
    j.begin_object().field("name", e.name).field("region", e.region).field("status", e.status);
    j.field("reached", e.reached).field("address", e.address).field("admin_address", e.admin);
    j.field("peer_address", e.peer);
    if (e.r) {
      j.field("draining", e.r->draining);
      j.field("sessions", e.r->sessions).field("running_turns", e.r->running_turns);
      j.field("kv_pages_used", e.r->kv_pages_used).field("kv_pages_total", e.r->kv_pages_total);
      j.field("queue_length", e.r->queue_length);
      j.field("tokens_per_second", e.r->tokens_per_second);
      j.field("room", static_cast<double>(e.r->room));
    } else {
      if (e.seen) j.field("room", static_cast<double>(e.seen->room));
      j.field("note", e.note);
    }
    j.end_object();
  }
  j.end_array().end_object();
  if (json_)
    print_json(j);
  else
    print(t.render() + (notes.empty() ? "" : "\n" + notes));
  return 0;
}

int shell::sessions(const std::vector<std::string>& args) {
  std::vector<size_t> which;
  if (args.size() == 3 && args[1] == "--node") {
    auto m = member_named(args[2]);
    if (!m) return fail("sessions", m.error());
    which.push_back(*m);
  } else if (args.size() != 1) {
    return fail("sessions", usage_error("sessions", args.size() == 2 && args[1] == "--node"
                                                        ? "--node needs a node's name"
                                                        : "unexpected argument " + args[1]));
  } else {
    for (size_t i = 0; i < cluster_.members().size(); ++i) which.push_back(i);
  }
  table t({{"ID"},
           {"OWNER"},
           {"TENANT"},
           {"REPLICAS"},
           {"EPOCH", true},
           {"TURNS", true},
           {"TOKENS", true},
           {"STATE"},
           {"LAST CHECKPOINT", false, true}});
  json j;
  j.begin_object().key("sessions").begin_array();
  std::vector<std::pair<std::string, std::string>> unreachable;
  size_t answered = 0;
  for (auto i : which) {
    auto rows = cluster_.sessions(i);
    if (!rows) {
      if (which.size() == 1) return fail("sessions", with_hint(rows.error()));
      warn("sessions", rows.error());
      unreachable.emplace_back(cluster_.members()[i].address, message_of(rows.error()));
      continue;
    }
    ++answered;
    for (auto& s : *rows) {
      std::string replicas;
      for (auto& r : s.replicas) replicas += (replicas.empty() ? "" : ",") + r;
      std::string checkpoint = !s.durable     ? "none (memory only)"
                               : s.turns == 0 ? "-"
                                              : "turn " + std::to_string(s.checkpoint_turn) + ": " +
                                                    std::to_string(s.checkpoint_tokens) + " tokens";
      t.add({s.id, s.owner, s.tenant.empty() ? "-" : s.tenant, replicas.empty() ? "-" : replicas,
             std::to_string(s.epoch), std::to_string(s.turns), std::to_string(s.tokens),
             !s.parked.empty() ? "parked" : s.running ? "running" : "idle",
             checkpoint});
      j.begin_object().field("id", s.id).field("owner", s.owner).field("tenant", s.tenant);
      j.key("replicas").begin_array();
      for (auto& r : s.replicas) j.value(r);
      j.end_array().field("epoch", s.epoch).field("turns", s.turns).field("tokens", s.tokens);
      j.field("running", s.running).field("priority", s.priority).field("durable", s.durable);
      j.field("parked", s.parked).field("model", s.model).field("model_digest", s.model_digest);
      j.field("context_limit", s.context_limit);
      j.field("checkpoint_turn", s.checkpoint_turn);
      j.field("checkpoint_tokens", s.checkpoint_tokens).end_object();
    }
  }
  j.end_array().key("unreachable").begin_array();
  for (auto& [address, why] : unreachable)
    j.begin_object().field("address", address).field("error", why).end_object();
  j.end_array().end_object();
  if (answered == 0)
    return fail("sessions",
                make_error(errc::disconnected, "no node answered; nodes: " + known_nodes()));
  if (json_)
    print_json(j);
  else
    print(t.render() + (t.empty() ? "(no sessions)\n" : ""));
  return 0;
}

int shell::rollout(const std::vector<std::string>& args) {
  if (args.size() != 2 || args[1] != "status")
    return fail("rollout", usage_error("rollout", args.size() < 2 ? "it needs 'status'"
                                                                  : "unknown argument " + args[1]));
  // Per model digest: the nodes that serve it (their own reports) and the sessions pinned to
  // it, each counted once (by the row of the node that owns it, else the first row).
  struct version {
    std::string model;
    std::vector<std::string> nodes;
    size_t sessions = 0, running = 0;
  };
  std::map<std::string, version> by_digest;
  std::map<std::string, session_row> sessions;
  std::vector<node_report> reports;
  size_t answered = 0;
  for (size_t i = 0; i < cluster_.members().size(); ++i) {
    auto r = cluster_.report(i);
    if (!r) {
      warn("rollout", r.error());
      continue;
    }
    ++answered;
    reports.push_back(*r);
    auto& v = by_digest[r->model_digest];
    v.model = r->model;
    v.nodes.push_back(r->name);
    auto rows = cluster_.sessions(i);
    if (!rows) continue;
    for (auto& s : *rows) {
      auto at = sessions.find(s.id);
      if (at == sessions.end() || (s.owner == r->name && at->second.owner != r->name))
        sessions[s.id] = s;
    }
  }
  if (answered == 0)
    return fail("rollout",
                make_error(errc::disconnected, "no node answered; nodes: " + known_nodes()));
  // Nodes not reached but up, as the reached nodes' heartbeats see them (their model digest
  // comes with every heartbeat; its file name does not).
  for (auto& r : reports)
    for (auto& p : r.peers) {
      if (p.status != "up" || p.model_digest.empty() || p.name.empty()) continue;
      auto& v = by_digest[p.model_digest];
      if (std::find(v.nodes.begin(), v.nodes.end(), p.name) == v.nodes.end())
        v.nodes.push_back(p.name);
    }
  for (auto& [id, s] : sessions) {
    auto& v = by_digest[s.model_digest];
    if (v.model.empty()) v.model = s.model.empty() ? "(not pinned)" : s.model;
    ++v.sessions;
    v.running += s.running ? 1 : 0;
  }
  table t({{"MODEL", false, true}, {"DIGEST"}, {"NODES"}, {"SESSIONS", true}, {"RUNNING", true}});
  json j;
  j.begin_object().key("versions").begin_array();
  for (auto& [digest, v] : by_digest) {
    if (v.model.empty()) v.model = "(not reached; seen by heartbeats)";
    std::string nodes;
    for (auto& n : v.nodes) nodes += (nodes.empty() ? "" : ",") + n;
    t.add({v.model, digest.empty() ? "-" : digest.substr(0, 12), nodes.empty() ? "none" : nodes,
           std::to_string(v.sessions), std::to_string(v.running)});
    j.begin_object().field("model", v.model).field("digest", digest).key("nodes").begin_array();
    for (auto& n : v.nodes) j.value(n);
    j.end_array().field("sessions", v.sessions).field("running", v.running).end_object();
  }
  j.end_array().end_object();
  if (json_)
    print_json(j);
  else
    print(t.render());
  return 0;
}

int shell::stats(const std::vector<std::string>& args) {
  if (args.size() > 1) return fail("stats", usage_error("stats", "it takes no arguments"));
  table t({{"NODE", false, true},
           {"UPTIME", true},
           {"STEPS", true},
           {"TOKENS", true},
           {"TOK/S", true},
           {"RESTARTS", true},
           {"FAULTS", true},
           {"SHED", true},
           {"PREEMPT", true},
           {"RECOVERY", true},
           {"REPL OK/FAIL", true}});
  json j;
  j.begin_object().key("nodes").begin_array();
  size_t answered = 0;
  for (size_t i = 0; i < cluster_.members().size(); ++i) {
    auto r = cluster_.report(i);
    const auto& m = cluster_.members()[i];
    if (!r) {
      std::string d = "-";
      t.add({m.name.empty() ? m.address : m.name, "down", d, d, d, d, d, d, d, d, d});
      j.begin_object().field("name", m.name).field("admin_address", m.address);
      j.field("status", "down").field("error", message_of(r.error())).end_object();
      continue;
    }
    ++answered;
    t.add({r->name, format_duration_ms(r->uptime_ms), format_count(r->steps),
           format_count(r->tokens), format_rate(r->tokens_per_second), std::to_string(r->restarts),
           format_count(r->faults_fired), format_count(r->shed), format_count(r->preemptions),
           format_ms(r->last_recovery_ms),
           format_count(r->replicated) + "/" + format_count(r->replication_failures)});
    j.begin_object().field("name", r->name).field("admin_address", m.address);
    j.field("status", "up").field("model", r->model).field("shards", r->shards);
    j.field("uptime_ms", r->uptime_ms).field("steps", r->steps).field("tokens", r->tokens);
    j.field("tokens_per_second", r->tokens_per_second).field("running_turns", r->running_turns);
    j.field("queue_length", r->queue_length).field("restarts", r->restarts);
    j.field("faults_fired", r->faults_fired).field("shed", r->shed);
    j.field("preemptions", r->preemptions).field("group_failures", r->group_failures);
    j.field("last_recovery_ms", r->last_recovery_ms).field("replicated", r->replicated);
    j.field("replication_failures", r->replication_failures).end_object();
  }
  j.end_array().end_object();
  if (answered == 0)
    return fail("stats",
                make_error(errc::disconnected, "no node answered; nodes: " + known_nodes()));
  if (json_)
    print_json(j);
  else
    print(t.render());
  return 0;
}

int shell::act(const std::vector<std::string>& args) {
  const auto& cmd = args[0];
  if (args.size() < 2) return fail(cmd, usage_error(cmd, "PATH is missing"));
  if (cmd != "fault" && args.size() > 2)
    return fail(cmd, usage_error(cmd, "it takes one PATH, got " + std::to_string(args.size() - 1) +
                                          " arguments"));
  fault_spec f;
  if (cmd == "fault") {
    using k = fault_spec::kind;
    if (args.size() < 3)
      return fail(cmd, usage_error(cmd,
                                   "KIND is missing (crash, stall, kv-fail, cut, partition "
                                   "or clear)"));
    const auto& kind = args[2];
    std::vector<std::string> rest(args.begin() + 3, args.end());
    auto too_many = [&](size_t most) { return rest.size() > most; };
    auto bad_time = [&](const std::string& s) {
      return usage_error(cmd, kind + ": '" + s +
                                  "' is not a time; give milliseconds (500, 500ms) or seconds "
                                  "(2s), from 1 ms to 1 hour");
    };
    auto bad_count = [&](const std::string& what, const std::string& s, uint32_t min) {
      return usage_error(cmd, kind + ": " + what + " '" + s + "' is not a whole number from " +
                                  std::to_string(min));
    };
    if (kind == "crash") {
      f.what = k::crash;
      if (rest.size() == 2 && rest[0] == "--times") {  // a session: its next N messages
        auto n = parse_count(rest[1], 1);
        if (!n) return fail(cmd, bad_count("--times", rest[1], 1));
        f.count = *n;
        rest.clear();
      }
      if (too_many(1))
        return fail(cmd, usage_error(cmd, "crash takes at most AFTER (steps), or --times N"));
      if (!rest.empty()) {
        auto n = parse_count(rest[0], 0);
        if (!n) return fail(cmd, bad_count("AFTER", rest[0], 0));
        f.after_steps = *n;
      }
    } else if (kind == "stall") {
      f.what = k::stall;
      if (rest.empty() || too_many(2))
        return fail(cmd, usage_error(cmd, "stall takes TIME [AFTER], e.g. stall 500ms"));
      auto ms = parse_ms(rest[0]);
      if (!ms) return fail(cmd, bad_time(rest[0]));
      f.duration_ms = *ms;
      if (rest.size() == 2) {
        auto n = parse_count(rest[1], 0);
        if (!n) return fail(cmd, bad_count("AFTER", rest[1], 0));
        f.after_steps = *n;
      }
    } else if (kind == "kv-fail") {
      f.what = k::kv_fail;
      f.count = 1;
      if (too_many(1)) return fail(cmd, usage_error(cmd, "kv-fail takes at most N"));
      if (!rest.empty()) {
        auto n = parse_count(rest[0], 1);
        if (!n) return fail(cmd, bad_count("N", rest[0], 1));
        f.count = *n;
      }
    } else if (kind == "cut") {
      f.what = k::cut;
      if (rest.size() != 1) return fail(cmd, usage_error(cmd, "cut takes TIME, e.g. cut 2s"));
      auto ms = parse_ms(rest[0]);
      if (!ms) return fail(cmd, bad_time(rest[0]));
      f.duration_ms = *ms;
    } else if (kind == "partition") {
      auto p = partition_args(rest);
      if (!p) return fail(cmd, p.error());
      f = std::move(*p);
    } else if (kind == "disk-full") {
      f.what = k::disk_full;
      if (rest.size() == 2 && rest[0] == "--ms") {
        auto ms = parse_ms(rest[1], one_day_ms);
        if (!ms) return fail(cmd, bad_time(rest[1]));
        f.duration_ms = *ms;
      } else if (!rest.empty()) {
        return fail(cmd, usage_error(cmd, "disk-full takes at most --ms TIME"));
      }
    } else if (kind == "clear") {
      f.what = k::clear;
      if (!rest.empty()) return fail(cmd, usage_error(cmd, "clear takes no arguments"));
    } else {
      return fail(cmd, usage_error(cmd, "unknown fault kind '" + kind +
                                            "'; kinds: crash, stall, kv-fail, cut, partition, "
                                            "disk-full, clear"));
    }
  }
  auto at = route(args[1]);
  if (!at) return fail(cmd, at.error());
  auto [i, path] = *at;
  auto out = cmd == "kill"      ? cluster_.kill(i, path)
             : cmd == "restart" ? cluster_.restart(i, path)
                                : cluster_.fault(i, path, f);
  if (!out) return fail(cmd, with_hint(out.error()));
  if (json_) {
    json j;
    j.begin_object().field("command", cmd).field("node", cluster_.members()[i].name);
    j.field("path", path).field("outcome", *out).end_object();
    print_json(j);
  } else {
    print(*out + "\n");
  }
  return 0;
}

caf::expected<fault_spec> shell::partition_args(const std::vector<std::string>& rest) const {
  const std::string takes = "partition takes --from NODE,... [--ms TIME]";
  fault_spec f;
  f.what = fault_spec::kind::partition;
  bool timed = false;
  for (size_t i = 0; i < rest.size(); i += 2) {
    const auto& opt = rest[i];
    if (opt != "--from" && opt != "--ms")
      return usage_error("fault", "partition: unknown argument '" + opt + "'; " + takes);
    if (i + 1 >= rest.size())
      return usage_error("fault", "partition: " + opt + " needs a value; " + takes);
    const auto& value = rest[i + 1];
    if (opt == "--ms") {
      if (timed) return usage_error("fault", "partition: --ms is given twice");
      auto ms = parse_ms(value, one_day_ms);
      if (!ms)
        return usage_error("fault", "partition: --ms '" + value +
                                        "' is not a time; give whole milliseconds (6000, "
                                        "6000ms) or seconds (6s), from 1 ms to 24 hours");
      f.duration_ms = *ms;
      timed = true;
      continue;
    }
    for (size_t b = 0; b <= value.size();) {
      auto e = std::min(value.find(',', b), value.size());
      auto peer = value.substr(b, e - b);
      if (peer.empty())
        return usage_error("fault", "partition: --from '" + value +
                                        "' has an empty node name; give NODE,NODE,...");
      f.peers.push_back(std::move(peer));
      b = e + 1;
    }
  }
  if (f.peers.empty())
    return usage_error("fault", "partition: --from NODE,... is missing (the nodes to cut from)");
  return f;
}

int shell::drain(const std::vector<std::string>& args) {
  if (args.size() < 2)
    return fail("drain", usage_error("drain", "NODE is missing (nodes: " + known_nodes() + ")"));
  if (args.size() > 2)
    return fail("drain", usage_error("drain", "it takes one NODE, got " +
                                                  std::to_string(args.size() - 1) + " arguments"));
  auto m = member_named(args[1]);
  if (!m) return fail("drain", m.error());
  auto d = cluster_.drain(*m);
  if (!d) return fail("drain", with_hint(d.error()));
  const auto& name = cluster_.members()[*m].name;
  const bool safe = d->remaining == 0;
  if (json_) {
    json j;
    j.begin_object().field("command", "drain").field("node", name).key("sessions").begin_array();
    for (auto& s : d->sessions) {
      j.begin_object().field("id", s.id).field("moved", s.error.empty());
      if (s.error.empty())
        j.field("to", s.to).field("epoch", s.epoch).key("error").null();
      else
        j.key("to").null().key("epoch").null().field("error", s.error);
      j.end_object();
    }
    j.end_array().field("remaining", d->remaining).field("safe_to_stop", safe).end_object();
    print_json(j);
  } else {
    std::string out;
    for (auto& s : d->sessions) {
      if (s.error.empty())
        out += s.id + " -> " + s.to + " (epoch " + std::to_string(s.epoch) + ")\n";
      else
        out += s.id + " stays: " + s.error + "\n";
    }
    out += safe ? "node " + name + " is empty and safe to stop\n"
                : "node " + name + ": " + std::to_string(d->remaining) +
                      " session(s) have no new owner yet; it is not safe to stop\n";
    print(out);
  }
  return safe ? 0 : 1;
}

}  // namespace keel::shell
