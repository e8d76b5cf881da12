#include "apps/sim/sim.hpp"

#include <algorithm>
#include <iostream>

#include "apps/sim/detail.hpp"

namespace keel::sim::detail {

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
    auto kind = rng_.range(0, opt_.damage ? 7 : 6);
    // One damaged store per run: the protocol keeps acknowledged turns through one member's
    // amnesia per group, not two at once (docs/actors.md, "Bounds"). Later ones are crashes.
    if (kind == 7 && damage_drawn_) kind = 0;
    if (kind == 7) damage_drawn_ = true;
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
      case 7: {  // a damaged disk: crash, and the restart finds part of the store gone
        auto seed = rng_.next();
        at(t, [this, &victim] {
          if (!victim.up()) return;
          trace(victim.name() + ": crashed");
          victim.crash();
        });
        at(t + length, [this, &victim, seed] {
          if (victim.up()) return;
          auto lost = victim.damage_store(seed);
          trace(victim.name() + ": restarted on a damaged store (" + std::to_string(lost) +
                " session(s) lost)");
          victim.start(config_for(victim.name()));
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

}  // namespace keel::sim::detail

namespace keel::sim {

result run(const options& opt) {
  detail::world w(opt);
  return w.run();
}

}  // namespace keel::sim
