#define BOOST_TEST_MODULE shutdown_test
#include <boost/test/unit_test.hpp>

// SIGTERM on a keel-node of a real three-node cluster on 127.0.0.1 (tests/cluster.hpp): the node
// drains (its sessions move to their groups' other members, a running reply finishes there and
// its client resumes), then stops cleanly within --shutdown-timeout; a second SIGTERM cuts the
// drain short and stops at once. apps/keel_node.cpp `shut_down`, docs/operations.md.

#include <signal.h>

#include <atomic>
#include <thread>

#include "tests/cluster.hpp"
#include "wire/client.hpp"

namespace {

using namespace std::chrono_literals;
using keel::test::cluster;
using keel::test::cluster_config;

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

/// The line of `text` that contains `what` ("" when none).
std::string line_with(const std::string& text, const std::string& what) {
  auto at = text.find(what);
  if (at == std::string::npos) return {};
  auto b = text.rfind('\n', at);
  b = b == std::string::npos ? 0 : b + 1;
  return text.substr(b, text.find('\n', at) - b);
}

keel::sampling_params sampled(uint64_t seed) {
  keel::sampling_params p;
  p.temperature = 0.8f;
  p.seed = seed;
  return p;
}

struct model_file {
  keel::test::temp_dir dir{"shutdown_test-model"};
  std::string path = keel::test::write_model(dir.path / "tiny.gguf", keel::test::tiny_model());
};

/// Three nodes a (r1), b (r2), c (r3), each session in a group of all three, each node with an
/// admin endpoint and `extra` flags; started, links up.
struct three_nodes {
  model_file model;
  keel::test::temp_dir root;
  cluster cl;

  three_nodes(const std::string& label, std::vector<std::string> extra, int down_after_ms = 500)
      : root("shutdown_test-" + label),
        cl(config(label, model.path, root.path, std::move(extra), down_after_ms),
           {{"a", "r1"}, {"b", "r2"}, {"c", "r3"}}) {
    cl.start_all();
    BOOST_REQUIRE_MESSAGE(cl.wait_all_links_up(20s), "the region links did not come up");
  }

  static cluster_config config(const std::string& label, const std::string& model,
                               const std::filesystem::path& root, std::vector<std::string> extra,
                               int down_after_ms) {
    cluster_config cfg;
    cfg.model = model;
    cfg.root = root;
    cfg.label = label;
    cfg.admin = true;
    cfg.down_after_ms = down_after_ms;
    cfg.extra_args = std::move(extra);
    return cfg;
  }
};

std::unique_ptr<keel::wire::client> connect(const std::vector<std::string>& endpoints) {
  auto c = keel::wire::client::connect(endpoints);
  BOOST_REQUIRE_MESSAGE(c, keel::test::why(c));
  return std::move(*c);
}

/// A session that node `at` of `cl` opened (and owns), with one short turn: something to drain.
std::string session_on(cluster& cl, size_t at, uint64_t seed) {
  auto c = connect({cl.address(at)});
  auto sid = c->open_session(sampled(seed));
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  BOOST_REQUIRE(c->generate(*sid, "Hello there", 4));
  return *sid;
}

/// GET http://`address``path` with curl: "STATUS BODY".
std::string http_get(const std::string& address, const std::string& path) {
  auto r = keel::test::run({"/usr/bin/curl", "-sS", "--max-time", "10", "-w", " %{http_code}",
                            "http://" + address + path});
  BOOST_REQUIRE_MESSAGE(r.status == 0, "curl failed: " << r.err);
  auto space = r.out.rfind(' ');
  return r.out.substr(space + 1) + " " + r.out.substr(0, space);
}

}  // namespace

BOOST_AUTO_TEST_CASE(sigterm_drains_the_node_its_running_reply_finishes_on_a_peer_and_it_exits_0) {
  three_nodes t("drain", {"--shutdown-timeout", "60000"});
  auto& cl = t.cl;
  const size_t a = 0;
  const std::string first = "Hello there", second = "Tell me more";

  // The reference, fault-free on c: of a few seeds, the one whose second reply runs longest.
  // Sampling is keyed by (seed, turn, index), so every node generates the same conversation.
  std::vector<keel::wire::turn_record> reference;
  uint64_t seed = 0;
  {
    auto rc = connect({cl.address(2)});
    for (uint64_t s = 1; s <= 10 && (reference.empty() || reference[1].generated.size() < 12);
         ++s) {
      auto sid = rc->open_session(sampled(s));
      BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
      BOOST_REQUIRE(rc->generate(*sid, first, 8));
      BOOST_REQUIRE(rc->generate(*sid, second, 40));
      auto h = rc->history(*sid);
      BOOST_REQUIRE_MESSAGE(h && h->size() == 2u, keel::test::why(h));
      if (reference.empty() || (*h)[1].generated.size() > reference[1].generated.size())
        reference = *h, seed = s;
    }
  }
  BOOST_REQUIRE(reference[1].generated.size() >= 12u);

  // Two conversations owned by a; the second one's second reply runs when a gets SIGTERM (a's
  // shard stalls 3 s four steps into it, so the reply is mid-way).
  auto ca = connect({cl.address(a)});
  std::vector<std::string> ids;
  for (uint64_t s : {seed + 100, seed}) {
    auto sid = ca->open_session(sampled(s));
    BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
    BOOST_REQUIRE_MESSAGE(contains(*sid, "@a"), *sid);
    auto g = ca->generate(*sid, first, 8);
    BOOST_REQUIRE_MESSAGE(g, keel::test::why(g));
    ids.push_back(*sid);
  }
  ca.reset();
  const auto running = ids.back();
  auto armed = cl.shell(a, "fault a/engine/shard-0 stall 3000ms 3");
  BOOST_REQUIRE_MESSAGE(armed.first == 0, armed.second);

  std::atomic<int> seen{0};
  std::vector<keel::wire::failover_event> failovers;
  caf::expected<keel::wire::generation> result = keel::make_error(keel::errc::failed, "not run");
  auto endpoints = cl.endpoints(a);
  std::thread gen([&] {
    keel::wire::client::options o;
    o.on_failover = [&](const keel::wire::failover_event& e) { failovers.push_back(e); };
    auto mine = keel::wire::client::connect(endpoints, o);  // a client belongs to its thread
    if (!mine) {
      result = std::move(mine.error());
      return;
    }
    result = (*mine)->generate(running, second, 40,
                               [&](uint64_t, uint64_t, int32_t, std::string_view) { ++seen; });
  });
  for (int i = 0; i < 1000 && seen.load() < 2; ++i) std::this_thread::sleep_for(10ms);
  BOOST_TEST(seen.load() >= 2);
  int status = cl.terminate(a, 90s);  // SIGTERM; SIGKILL only after 90 s
  gen.join();
  auto log = cl.log(a);
  BOOST_TEST_MESSAGE("a's log:\n" << log);

  // It drained, logged where each session went, and stopped by itself, cleanly.
  BOOST_TEST(status == 0, "a ended with status " << status);
  BOOST_TEST(contains(log, "keel-node: Terminated: draining, then stopping within 60000 ms"), log);
  for (auto& id : ids) {
    auto line = line_with(log, "keel-node: drain: session " + id + " -> ");
    BOOST_TEST(!line.empty(), id << " did not move");
    BOOST_TEST((contains(line, " -> b (epoch ") || contains(line, " -> c (epoch ")), line);
  }
  BOOST_TEST(contains(log, "keel-node: drain: 2 of 2 session(s) moved (to "), log);
  BOOST_TEST(contains(log, "keel-node: stopped\n"), log);
  BOOST_TEST(!contains(log, "did not stop within"), log);

  // The running reply finished on the new owner: the whole reply, each token once, equal to the
  // fault-free run.
  BOOST_REQUIRE_MESSAGE(result, keel::test::why(result));
  BOOST_TEST(result->prompt == reference[1].prompt);
  BOOST_TEST(result->generated == reference[1].generated);
  BOOST_TEST(!failovers.empty(), "the stream did not move: it ended on a");
  for (auto& e : failovers)
    BOOST_TEST_MESSAGE("resumed from index " << e.from_index << " via " << e.to << " (" << e.to_node
                                             << ")");

  // Both conversations are whole on the nodes left.
  auto rest = connect({cl.address(1), cl.address(2)});
  for (auto& id : ids) {
    auto h = rest->history(id);
    BOOST_REQUIRE_MESSAGE(h, id << ": " << keel::test::why(h));
    BOOST_TEST(h->size() == (id == running ? 2u : 1u), id);
  }
  auto h = rest->history(running);
  BOOST_REQUIRE(h && h->size() == 2u);
  BOOST_TEST((*h)[1].generated == reference[1].generated);
}

BOOST_AUTO_TEST_CASE(a_second_sigterm_cuts_the_drain_short_and_stops_at_once) {
  // A down-after of 10 s makes the drain wait up to 60 s for new owners; b and c are stopped
  // (SIGSTOP), so none comes: only the second SIGTERM ends the drain.
  three_nodes t("twice", {"--shutdown-timeout", "300000", "--http-listen", "127.0.0.1:0"}, 10000);
  auto& cl = t.cl;
  const size_t a = 0;
  auto sid = session_on(cl, a, 7);
  auto http = line_with(cl.current_log(a), "keel-node: http on ");
  http = http.substr(http.rfind(' ') + 1);
  auto before = http_get(http, "/ready");
  BOOST_TEST(before.rfind("200 ready", 0) == 0u, before);
  cl.pause(1);
  cl.pause(2);

  // SIGTERM: the drain starts, and /ready says so.
  cl.signal(a, SIGTERM);
  BOOST_REQUIRE_MESSAGE(cl.wait_log(a, "a: draining: no new sessions; giving up 1 session(s)", 30s),
                        cl.current_log(a));
  auto ready = http_get(http, "/ready");
  BOOST_TEST(ready.rfind("503 draining", 0) == 0u, ready);

  // The second SIGTERM: the drain ends without a new owner for the session, and the node stops.
  cl.signal(a, SIGTERM);
  auto status = cl.wait_exit(a, 40s);  // the drain alone would wait 60 s
  auto log = cl.log(a);
  BOOST_TEST_MESSAGE("a's log:\n" << log);
  BOOST_REQUIRE_MESSAGE(status.has_value(), "a still runs 40 s after its second SIGTERM");
  BOOST_TEST(*status == 0);
  BOOST_TEST(contains(log, "keel-node: Terminated again: the drain is cut short; stopping now"),
             log);
  auto stayed = line_with(log, "keel-node: drain: session " + sid + " stayed: ");
  BOOST_TEST(contains(stayed, "the drain was cut short"), stayed);
  BOOST_TEST(contains(log, "keel-node: drain: 0 of 1 session(s) moved; 1 stayed"), log);
  BOOST_TEST(contains(log, "keel-node: stopped\n"), log);
  BOOST_TEST(!contains(log, "did not stop within"), log);
}

BOOST_AUTO_TEST_CASE(the_last_node_up_stops_without_waiting_for_takeovers_that_cannot_happen) {
  // b and c are killed: no session of a can move. a's drain sees them down (its region links) and
  // does not wait the drain's patience (six times --down-after) for new owners.
  three_nodes t("last", {"--shutdown-timeout", "300000"}, 2000);
  auto& cl = t.cl;
  const size_t a = 0;
  auto sid = session_on(cl, a, 11);
  cl.kill({1, 2});
  for (size_t peer : {1, 2})
    BOOST_REQUIRE_MESSAGE(
        cl.wait_log(a, "link a -> " + cl.peer_address(peer) + ": suspect -> down", 60s),
        cl.current_log(a));

  int status = cl.terminate(a, 60s);
  auto log = cl.log(a);
  BOOST_TEST_MESSAGE("a's log:\n" << log);
  BOOST_TEST(status == 0);
  auto stayed = line_with(log, "keel-node: drain: session " + sid + " stayed: ");
  BOOST_TEST((contains(stayed, "no other member of its group answers this node (b, c down)") ||
              contains(stayed, "no other member of its group answers this node (c, b down)")),
             stayed);
  BOOST_TEST(contains(log, "keel-node: stopped\n"), log);
}
