#define BOOST_TEST_MODULE region_link_test
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <functional>
#include <mutex>
#include <thread>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include "actors/node.hpp"
#include "actors/peer_server.hpp"
#include "kernels/synth.hpp"
#include "tests/test_support.hpp"

using namespace keel;
using namespace std::chrono_literals;

namespace {

struct fixture {
  test::temp_dir dir{"region_link_test"};
  std::string model_path;
  caf::actor_system_config sys_cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::mutex mu;
  std::vector<std::string> lines;  // what the supervision logs' sinks received

  fixture() {
    synth_options o;
    o.dim = 32;
    o.layers = 1;
    o.heads = 4;
    o.kv_heads = 2;
    o.ffn = 64;
    o.ctx = 64;
    o.seed = 3;
    model_path = test::write_model(dir.path / "m.gguf", o);
    tune_actor_system(sys_cfg);
    sys = std::make_unique<caf::actor_system>(sys_cfg);
  }

  std::shared_ptr<supervision_log> make_log() {
    return std::make_shared<supervision_log>([this](const std::string& line) {
      std::lock_guard<std::mutex> guard(mu);
      lines.push_back(line);
    });
  }

  std::unique_ptr<node> start_node(const std::string& name, const std::string& self,
                                   std::vector<std::string> peers) {
    node_config c;
    c.name = name;
    c.model_path = model_path;
    c.kv_bytes = 4 << 20;
    c.region = name == "a" ? "r1" : "r2";
    c.peer_address = self;
    // Named as the peer servers of these tests are: a's peer is b, b's is a.
    for (size_t i = 0; i < peers.size(); ++i) c.peer_names.push_back(name == "a" ? "b" : "a");
    c.peers = std::move(peers);
    auto n = node::start(*sys, c, make_log());
    BOOST_REQUIRE_MESSAGE(n, test::why(n));
    return std::move(*n);
  }

  std::unique_ptr<peer_server> serve(const std::string& name, uint16_t port = 0) {
    peer_server_config c;
    c.name = name;
    c.port = port;
    auto s = peer_server::start(c);
    BOOST_REQUIRE_MESSAGE(s, test::why(s));
    return std::move(*s);
  }

  /// Waits (bounded) until `pred` holds for node `n`'s only peer; returns the time it took.
  std::optional<std::chrono::milliseconds> wait_peer(
      node& n, const std::function<bool(const peer_info&)>& pred, std::chrono::milliseconds limit) {
    auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - t0 < limit) {
      auto ps = n.peers();
      if (ps.size() == 1 && pred(ps[0]))
        return std::chrono::duration_cast<std::chrono::milliseconds>(
            std::chrono::steady_clock::now() - t0);
      std::this_thread::sleep_for(10ms);
    }
    return std::nullopt;
  }

  bool logged(const std::string& what) {
    std::lock_guard<std::mutex> guard(mu);
    for (auto& l : lines)
      if (l.find(what) != std::string::npos) return true;
    return false;
  }
};

bool is_up(const peer_info& p) {
  return p.status == peer_status::up;
}
bool is_down(const peer_info& p) {
  return p.status == peer_status::down;
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(links_come_up_and_measure_the_round_trip, fixture) {
  auto sa = serve("a");
  auto sb = serve("b");
  auto a = start_node("a", sa->address(), {sb->address()});
  auto b = start_node("b", sb->address(), {sa->address()});
  BOOST_REQUIRE(wait_peer(*a, is_up, 5000ms));
  BOOST_REQUIRE(wait_peer(*b, is_up, 5000ms));
  auto p = a->peers().at(0);
  BOOST_TEST(p.address == sb->address());
  BOOST_TEST(p.name == "b");
  BOOST_TEST(p.round_trip.count() > 0);
  BOOST_TEST(p.round_trip < std::chrono::nanoseconds(500ms));
  BOOST_TEST(to_string(p.breaker) == std::string("closed"));
  BOOST_TEST(p.accepts_work());
  // Heartbeats go on.
  auto beats = p.heartbeats;
  BOOST_REQUIRE(wait_peer(
      *a, [beats](const peer_info& q) { return q.heartbeats >= beats + 3; }, 3000ms));
  BOOST_TEST(logged("link a -> " + sb->address() + ": down -> up"));
}

BOOST_FIXTURE_TEST_CASE(a_stopped_peer_is_declared_down_and_comes_back_up, fixture) {
  auto sb = serve("b");
  auto port = sb->port();
  auto addr = sb->address();
  auto a = start_node("a", "127.0.0.1:1", {addr});
  BOOST_REQUIRE(wait_peer(*a, is_up, 5000ms));
  sb->stop();
  auto took = wait_peer(*a, is_down, 3000ms);
  BOOST_REQUIRE_MESSAGE(took, "the stopped peer was not declared down within 3 s");
  BOOST_TEST_MESSAGE("declared down " << took->count() << " ms after the peer stopped");
  BOOST_TEST(!a->peers().at(0).accepts_work());
  BOOST_TEST(a->peers().at(0).failures >= 1u);
  BOOST_TEST(logged("link a -> " + addr + ": "));
  BOOST_TEST(logged("-> down"));
  sb.reset();
  auto again = serve("b", port);
  auto back = wait_peer(*a, is_up, 5000ms);
  BOOST_REQUIRE_MESSAGE(back, "the restarted peer was not seen up within 5 s");
  BOOST_TEST_MESSAGE("up again " << back->count() << " ms after the restart");
  BOOST_TEST(a->peers().at(0).status_changes >= 3);
}

BOOST_FIXTURE_TEST_CASE(the_breaker_opens_after_repeated_failures_and_closes_on_recovery, fixture) {
  auto sb = serve("b");
  auto port = sb->port();
  auto a = start_node("a", "127.0.0.1:1", {sb->address()});
  BOOST_REQUIRE(wait_peer(*a, is_up, 5000ms));
  sb.reset();
  auto opened = wait_peer(
      *a, [](const peer_info& p) { return p.breaker != breaker_state::closed; }, 8000ms);
  BOOST_REQUIRE_MESSAGE(opened, "the breaker did not open within 8 s");
  auto p = a->peers().at(0);
  BOOST_TEST(p.breaker_opens >= 1);
  BOOST_TEST(p.consecutive_failures >= 5);
  BOOST_TEST(logged("breaker closed -> open"));
  auto again = serve("b", port);
  BOOST_REQUIRE(wait_peer(
      *a,
      [](const peer_info& q) {
        return q.status == peer_status::up && q.breaker == breaker_state::closed;
      },
      8000ms));
  BOOST_TEST(a->peers().at(0).accepts_work());
}

/// A listening socket that accepts connections (the kernel does, from its backlog) and never
/// answers: what a SIGSTOPped or hung peer looks like from outside.
struct silent_peer {
  int fd = -1;
  uint16_t port = 0;
  silent_peer() {
    fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    BOOST_REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
    BOOST_REQUIRE(::listen(fd, 16) == 0);
    socklen_t len = sizeof a;
    BOOST_REQUIRE(::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) == 0);
    port = ntohs(a.sin_port);
  }
  ~silent_peer() { ::close(fd); }
};

BOOST_FIXTURE_TEST_CASE(a_peer_that_accepts_but_never_answers_stays_down, fixture) {
  silent_peer silent;
  auto addr = "127.0.0.1:" + std::to_string(silent.port);
  auto a = start_node("a", "127.0.0.1:1", {addr});
  // Connecting succeeds, heartbeats time out after down_after: failures pile up, never up.
  BOOST_REQUIRE(wait_peer(
      *a, [](const peer_info& p) { return p.failures >= 2; }, 5000ms));
  auto p = a->peers().at(0);
  BOOST_TEST(p.heartbeats == 0u);
  BOOST_TEST(to_string(p.status) == std::string("down"));
  BOOST_TEST(p.last_failure.find("no answer to a heartbeat") != std::string::npos,
             "last failure: " << p.last_failure);
}

BOOST_FIXTURE_TEST_CASE(a_bad_peer_address_is_refused, fixture) {
  node_config c;
  c.model_path = model_path;
  c.kv_bytes = 4 << 20;
  c.peers = {"nowhere"};
  c.peer_names = {"b"};
  auto n = node::start(*sys, c);
  BOOST_REQUIRE(!n);
  BOOST_TEST(keel::describe(n.error()).find("nowhere") != std::string::npos);
}

BOOST_FIXTURE_TEST_CASE(heartbeats_carry_the_client_address_and_draining, fixture) {
  // What a peer learns from the heartbeats: where the node serves clients (for forwarding) and
  // whether it drains.
  auto sb = serve("b");
  auto a = start_node("a", "127.0.0.1:1", {sb->address()});
  BOOST_REQUIRE(wait_peer(*a, is_up, 5000ms));
  BOOST_TEST(a->peers().at(0).client_address.empty());
  BOOST_TEST(!a->peers().at(0).draining);
  sb->set_client_address("127.0.0.1:7777");
  sb->set_draining(true);
  auto seen = wait_peer(
      *a, [](const peer_info& p) { return p.client_address == "127.0.0.1:7777" && p.draining; },
      5000ms);
  BOOST_TEST(seen.has_value());
  BOOST_TEST(a->peers().at(0).name == "b");
}
