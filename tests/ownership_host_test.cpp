#define BOOST_TEST_MODULE ownership_host_test
#include <boost/test/unit_test.hpp>

// The ownership protocol hosted as keel-nodes host it (actors/ownership_host.hpp): one host
// actor per member in one process, each with its real peer endpoint on loopback, its real
// transport and the `partition` fault, on real time. keel-sim searches the protocol's races on
// simulated time; this shows the same code working over the product's own plumbing.

#include <chrono>
#include <cstdlib>
#include <climits>
#include <mutex>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/ownership_codec.hpp"
#include "actors/ownership_host.hpp"
#include "actors/peer_server.hpp"
#include "base/error.hpp"

using namespace keel;
using namespace std::chrono_literals;

namespace {

/// A store in memory that survives its host (a restarted host reads what the last one synced;
/// buffered writes are kept too, as a process crash keeps them).
class memory_storage final : public ownership_storage {
 public:
  bool put(const std::string& session, const stored_session& s, bool) override {
    std::lock_guard<std::mutex> guard(mu_);
    stored_[session] = s;
    return true;
  }
  std::map<std::string, stored_session> load() override {
    std::lock_guard<std::mutex> guard(mu_);
    return stored_;
  }

 private:
  std::mutex mu_;
  std::map<std::string, stored_session> stored_;
};

/// The error's message, or "" (Boost evaluates a message even when the check holds).
template <class T>
std::string why(const caf::expected<T>& x) {
  return x ? std::string{} : message_of(x.error());
}

int64_t now_ns() {
  return steady_ownership_clock()();
}

struct member {
  std::string name;
  std::shared_ptr<partition> cut = std::make_shared<partition>();
  std::unique_ptr<peer_server> server;
  std::shared_ptr<peer_transport> transport;
  std::shared_ptr<memory_storage> storage = std::make_shared<memory_storage>();
  std::shared_ptr<lease_board> board = std::make_shared<lease_board>(steady_ownership_clock());
  ownership_actor host;
  std::mutex mu;
  std::map<std::string, int64_t> acquired_at;  // session -> when this member acquired it
  std::map<std::string, session_data> acquired_data;
  std::map<std::string, int64_t> lost_at;
  std::vector<std::string> log;
};

struct fixture {
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  std::vector<std::unique_ptr<member>> members;
  std::vector<cluster_member> cluster;
  std::map<std::string, std::string> addresses;

  explicit fixture(std::vector<std::string> names = {"a", "b", "c"}) {
    for (auto& n : names) {
      auto m = std::make_unique<member>();
      m->name = n;
      cluster.push_back({n, "r-" + n});
      members.push_back(std::move(m));
    }
    for (auto& m : members) {
      peer_server_config pc;
      pc.name = m->name;
      pc.cut = m->cut;
      auto s = peer_server::start(pc);
      BOOST_REQUIRE_MESSAGE(s, "peer server: " + why(s));
      m->server = std::move(*s);
      addresses[m->name] = m->server->address();
    }
    for (auto& m : members) start_host(*m);
  }

  ~fixture() {
    for (auto& m : members) {
      if (std::getenv("KEEL_TEST_VERBOSE")) {
        auto st = m->transport ? m->transport->stats() : peer_transport::counters{};
        std::lock_guard<std::mutex> guard(m->mu);
        BOOST_TEST_MESSAGE(m->name << ": sent " << st.sent << ", delivered " << st.delivered
                                   << ", dropped " << st.dropped << ", failed " << st.failed);
        for (auto& line : m->log) BOOST_TEST_MESSAGE(m->name << ": " << line);
      }
      stop_host(*m);
    }
  }

  member& at(const std::string& name) {
    for (auto& m : members)
      if (m->name == name) return *m;
    BOOST_FAIL("no member " + name);
    return *members.front();
  }

  void start_host(member& m) {
    peer_transport_config tc;
    tc.self_name = m.name;
    tc.addresses = addresses;
    tc.cut = m.cut;
    m.transport = std::make_shared<peer_transport>(tc);
    ownership_host_config hc;
    hc.protocol.self = m.name;
    hc.protocol.members = cluster;
    hc.transport = m.transport;
    hc.storage = m.storage;
    hc.leases = m.board;
    auto* mp = &m;
    hc.acquired = [mp](const std::string& s, const session_data& d, uint64_t) {
      std::lock_guard<std::mutex> guard(mp->mu);
      mp->acquired_at[s] = now_ns();
      mp->acquired_data[s] = d;
    };
    hc.lost = [mp](const std::string& s) {
      std::lock_guard<std::mutex> guard(mp->mu);
      mp->lost_at[s] = now_ns();
    };
    hc.log = [mp](const std::string& line) {
      std::lock_guard<std::mutex> guard(mp->mu);
      mp->log.push_back(line);
    };
    m.host = spawn_ownership_host(sys, hc);
    auto host = m.host;
    m.server->on_ownership([host](const std::string& from, std::string bytes) {
      caf::anon_send(host, peer_message_atom::value, from, std::move(bytes));
    });
  }

  /// Stops the host as a crash would (its store stays).
  void stop_host(member& m) {
    if (!m.host) return;
    m.server->on_ownership({});
    caf::anon_send_exit(m.host, caf::exit_reason::kill);
    caf::scoped_actor self{sys};
    self->wait_for(m.host);
    m.host = nullptr;
    m.transport.reset();
    std::lock_guard<std::mutex> guard(m.mu);
    m.acquired_at.clear();
    m.acquired_data.clear();
  }

  /// The member that acquired `s` since it (re)started and serves it now ("" when none).
  std::string acquirer_of(const std::string& s) {
    for (auto& m : members) {
      std::lock_guard<std::mutex> guard(m->mu);
      if (m->acquired_at.count(s) && m->board->may_serve(s)) return m->name;
    }
    return {};
  }

  /// Cuts `side` from every other member, both ways.
  void split(const std::vector<std::string>& side) {
    for (auto& m : members) {
      bool in = std::find(side.begin(), side.end(), m->name) != side.end();
      std::vector<std::string> others;
      for (auto& o : members) {
        bool oin = std::find(side.begin(), side.end(), o->name) != side.end();
        if (oin != in) others.push_back(o->name);
      }
      if (!others.empty()) m->cut->cut(others, 0ms);
    }
  }
  void heal() {
    for (auto& m : members) m->cut->heal();
  }

  template <class T, class... Ts>
  caf::expected<T> ask(member& m, Ts&&... xs) {
    caf::scoped_actor self{sys};
    caf::expected<T> out{T{}};
    self->request(m.host, 5s, std::forward<Ts>(xs)...)
        .receive([&](T x) { out = std::move(x); }, [&](caf::error& e) { out = std::move(e); });
    return out;
  }

  /// Polls `f` every 10 ms for up to `limit`.
  template <class F>
  bool eventually(F f, std::chrono::milliseconds limit = 10s) {
    auto end = std::chrono::steady_clock::now() + limit;
    while (std::chrono::steady_clock::now() < end) {
      if (f()) return true;
      std::this_thread::sleep_for(10ms);
    }
    return f();
  }

  std::string owner_of(const std::string& s) {
    for (auto& m : members)
      if (m->board->may_serve(s)) return m->name;
    return {};
  }
};

const std::string session = "s-test@a";

}  // namespace

BOOST_AUTO_TEST_CASE(opens_a_session_and_acknowledges_turns_once_a_majority_stored_them) {
  fixture f;
  auto& a = f.at("a");
  auto opened = f.ask<session_data>(a, open_atom::value, session, std::string("params"));
  BOOST_REQUIRE_MESSAGE(opened, why(opened));
  BOOST_TEST(opened->meta == "params");
  BOOST_TEST(a.board->may_serve(session));
  auto ok = f.ask<bool>(a, submit_atom::value, session, uint64_t{0}, std::string("hello"));
  BOOST_REQUIRE_MESSAGE(ok, why(ok));
  caf::anon_send(a.host, own_tokens_atom::value, session, uint64_t{0}, uint64_t{0},
                 std::vector<int32_t>{5, 6});
  // The end brings the turn's every token (7 was never checkpointed).
  auto ended = f.ask<bool>(a, finish_atom::value, session, uint64_t{0}, std::vector<int32_t>{5, 6, 7},
                           std::string("eos"));
  BOOST_REQUIRE_MESSAGE(ended, why(ended));
  // A retried end is acknowledged again, not left waiting.
  auto again = f.ask<bool>(a, finish_atom::value, session, uint64_t{0},
                           std::vector<int32_t>{5, 6, 7}, std::string("eos"));
  BOOST_REQUIRE_MESSAGE(again, why(again));
  // A majority (a and one other) holds the ended turn synced; the owner's own copy has it.
  size_t holders = 0;
  for (auto& m : f.members) {
    auto stored = m->storage->load();
    auto i = stored.find(session);
    if (i == stored.end()) continue;
    auto& d = i->second.data;
    if (d.turns.size() == 1 && d.turns[0].user == "hello" && d.turns[0].done &&
        d.turns[0].tokens == std::vector<int32_t>{5, 6, 7} && d.turns[0].end == "eos" &&
        i->second.accepted.owner == "a")
      ++holders;
  }
  BOOST_TEST(holders >= 2u);
  // Only the owner serves it; the others know who does.
  BOOST_TEST(!f.at("b").board->may_serve(session));
  BOOST_TEST(!f.at("c").board->may_serve(session));
  auto view = f.ask<ownership_view>(f.at("b"), describe_atom::value, session);
  BOOST_REQUIRE(view);
  BOOST_TEST(view->owner == "a");
  BOOST_TEST(!view->owned);
  // A turn sent to a member that does not own it is refused, naming the owner (`stale_epoch`:
  // a node that still serves it stops).
  auto wrong = f.ask<bool>(f.at("b"), submit_atom::value, session, uint64_t{1}, std::string("x"));
  BOOST_REQUIRE(!wrong);
  BOOST_TEST(code_of(wrong.error()) == errc::stale_epoch);
  BOOST_TEST(message_of(wrong.error()).find("(a does)") != std::string::npos,
             why(wrong));
}

BOOST_AUTO_TEST_CASE(a_cut_off_owner_stops_serving_before_the_majority_takes_over) {
  fixture f;
  auto& a = f.at("a");
  BOOST_REQUIRE(f.ask<session_data>(a, open_atom::value, session, std::string("p")));
  BOOST_REQUIRE(f.ask<bool>(a, submit_atom::value, session, uint64_t{0}, std::string("one")));
  BOOST_REQUIRE(f.ask<bool>(a, finish_atom::value, session, uint64_t{0},
                            std::vector<int32_t>{}, std::string("length")));
  f.split({"a"});
  auto cut_at = now_ns();
  // The majority side takes it over, with the acknowledged turn.
  BOOST_REQUIRE(f.eventually([&] {
    auto o = f.owner_of(session);
    return o == "b" || o == "c";
  }));
  auto& winner = f.at(f.owner_of(session));
  int64_t acquired_at = 0;
  {
    std::lock_guard<std::mutex> guard(winner.mu);
    acquired_at = winner.acquired_at.at(session);
    auto& d = winner.acquired_data.at(session);
    BOOST_REQUIRE_EQUAL(d.turns.size(), 1u);
    BOOST_TEST(d.turns[0].user == "one");
    BOOST_TEST(d.turns[0].done);
  }
  // The old owner's lease ended before the new owner acquired (one process, one clock).
  BOOST_TEST(a.board->until(session) < acquired_at,
             "a may serve until " << a.board->until(session) << ", the new owner acquired at "
                                  << acquired_at);
  BOOST_TEST(!a.board->may_serve(session));
  BOOST_TEST(acquired_at > cut_at);
  // The minority refuses a new turn with a classified error; the majority acknowledges one.
  auto refused = f.ask<bool>(a, submit_atom::value, session, uint64_t{1}, std::string("two"));
  BOOST_REQUIRE(!refused);
  BOOST_TEST(code_of(refused.error()) == errc::disconnected, why(refused));
  // It refuses to open a new session at once, not after a candidacy that cannot succeed.
  auto opened = f.ask<session_data>(a, open_atom::value, std::string("s-new@a"), std::string("p"));
  BOOST_REQUIRE(!opened);
  BOOST_TEST(message_of(opened.error()).find("answers this node now") != std::string::npos,
             message_of(opened.error()));
  auto two = f.ask<bool>(winner, submit_atom::value, session, uint64_t{1}, std::string("two"));
  BOOST_REQUIRE_MESSAGE(two, why(two));
  // After the heal a learns it lost the session and never serves it again.
  f.heal();
  BOOST_REQUIRE(f.eventually([&] {
    std::lock_guard<std::mutex> guard(a.mu);
    return a.lost_at.count(session) > 0;
  }));
  BOOST_TEST(!a.board->may_serve(session));
  BOOST_REQUIRE_MESSAGE(f.eventually([&] {
    auto v = f.ask<ownership_view>(a, describe_atom::value, session);
    return v && v->turns == 2 && v->accepted.owner == winner.name;
  }), [&] {
    auto v = f.ask<ownership_view>(a, describe_atom::value, session);
    return v ? "a holds " + std::to_string(v->turns) + " turns at " + to_string(v->accepted) +
                   ", promised " + to_string(v->promised)
             : why(v);
  }());
}

BOOST_AUTO_TEST_CASE(a_crashed_owner_loses_no_acknowledged_turn_and_takes_nothing_back_stale) {
  fixture f;
  auto& a = f.at("a");
  BOOST_REQUIRE(f.ask<session_data>(a, open_atom::value, session, std::string("p")));
  BOOST_REQUIRE(f.ask<bool>(a, submit_atom::value, session, uint64_t{0}, std::string("kept")));
  f.stop_host(a);
  BOOST_REQUIRE(f.eventually([&] {
    auto o = f.owner_of(session);
    return o == "b" || o == "c";
  }));
  auto& winner = f.at(f.owner_of(session));
  {
    std::lock_guard<std::mutex> guard(winner.mu);
    auto& d = winner.acquired_data.at(session);
    BOOST_REQUIRE_EQUAL(d.turns.size(), 1u);
    BOOST_TEST(d.turns[0].user == "kept");
  }
  // The new owner ends the turn; a restarted a (same store) does not take it back.
  BOOST_REQUIRE(f.ask<bool>(winner, finish_atom::value, session, uint64_t{0},
                            std::vector<int32_t>{}, std::string("length")));
  f.start_host(a);
  std::this_thread::sleep_for(1500ms);  // past a's restart hold and a suspect time
  BOOST_TEST(f.owner_of(session) == winner.name);
  BOOST_TEST(!a.board->may_serve(session));
}

BOOST_AUTO_TEST_CASE(a_restarted_owner_takes_its_sessions_back_after_its_hold) {
  fixture f;
  auto& a = f.at("a");
  BOOST_REQUIRE(f.ask<session_data>(a, open_atom::value, session, std::string("p")));
  BOOST_REQUIRE(f.ask<bool>(a, submit_atom::value, session, uint64_t{0}, std::string("t")));
  // The whole cluster restarts (every host, their stores kept).
  for (auto& m : f.members) f.stop_host(*m);
  for (auto& m : f.members) f.start_host(*m);
  BOOST_REQUIRE(f.eventually([&] { return !f.acquirer_of(session).empty(); }));
  auto& owner = f.at(f.acquirer_of(session));
  std::lock_guard<std::mutex> guard(owner.mu);
  BOOST_REQUIRE_EQUAL(owner.acquired_data.at(session).turns.size(), 1u);
  BOOST_TEST(owner.acquired_data.at(session).turns[0].user == "t");
}

BOOST_AUTO_TEST_CASE(messages_that_do_not_decode_or_forge_a_ballot_are_dropped_and_logged) {
  fixture f;
  auto& a = f.at("a");
  BOOST_REQUIRE(f.ask<session_data>(a, open_atom::value, session, std::string("p")));
  auto& b = f.at("b");
  // Garbage, and a prepare that b sends in c's name: neither moves b's promise.
  caf::anon_send(b.host, peer_message_atom::value, std::string("c"), std::string("garbage!"));
  prepare_msg forged{session, ballot{99, "c"}, 0};
  caf::anon_send(b.host, peer_message_atom::value, std::string("a"),
                 encode(ownership_msg{forged}));
  caf::anon_send(b.host, peer_message_atom::value, std::string("mallory"),
                 encode(ownership_msg{prepare_msg{session, ballot{99, "mallory"}, 0}}));
  auto v = f.ask<ownership_view>(b, describe_atom::value, session);
  BOOST_REQUIRE(v);
  BOOST_TEST(v->promised.owner == "a");
  BOOST_TEST(v->promised.epoch < 99u);
  BOOST_TEST(a.board->may_serve(session));
  std::lock_guard<std::mutex> guard(b.mu);
  BOOST_REQUIRE(!b.log.empty());
  BOOST_TEST(b.log.front().find("dropped a message from c") != std::string::npos, b.log.front());
}
