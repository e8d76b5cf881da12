#pragma once

// keel-sim's parts (docs/sim.md): the seeded randomness and the model, the messages between
// clients and nodes, the simulated node (the product's `ownership` plus a tiny host), the
// client, and the world that runs them on simulated time and checks the history. Only
// apps/sim/ uses this header.

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <set>
#include <string>
#include <vector>

#include "actors/ownership.hpp"
#include "apps/sim/sim.hpp"

namespace keel::sim::detail {

inline constexpr int64_t ms = 1'000'000;

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

inline uint64_t mix(uint64_t h, uint64_t v) {
  h ^= v + 0x9e3779b97f4a7c15ull + (h << 6) + (h >> 2);
  return h;
}

inline uint64_t hash_str(uint64_t h, const std::string& s) {
  for (unsigned char c : s) h = mix(h, c);
  return mix(h, s.size());
}

/// The model: a token is a function of the session, every user input up to its turn, and its
/// index. A node whose copy lacks a turn, or has another one, produces other tokens.
inline int32_t token_of(const std::string& session, const std::vector<std::string>& users, size_t turn,
                 size_t index) {
  uint64_t h = hash_str(7, session);
  for (size_t t = 0; t <= turn && t < users.size(); ++t) h = hash_str(h, users[t]);
  h = mix(h, turn);
  h = mix(h, index);
  return static_cast<int32_t>(h % 32000);
}

inline size_t turn_length(const std::string& session, size_t turn) {
  return 5 + static_cast<size_t>(mix(hash_str(11, session), turn) % 30);
}

inline std::string user_text(const std::string& session, size_t turn) {
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
  /// While down: the store loses each session's state with probability 1/2 (drawn from
  /// `seed`), and the next start knows its store was damaged. How many it lost.
  size_t damage_store(uint64_t seed);
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
  bool damaged_ = false;  // the store was damaged since the last start
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
  bool damage_drawn_ = false;  // the run's one damaged store was drawn
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

}  // namespace keel::sim::detail
