#define BOOST_TEST_MODULE placement_test
#include <boost/test/unit_test.hpp>

// Load across the cluster (issue #14) with real keel-node processes on loopback: a node near its
// KV budget opens new sessions on peers with room, and a killed node's conversations continue on
// the survivors without any node going past its budget, only the lowest priority being shed.

#include <atomic>
#include <chrono>
#include <map>
#include <mutex>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels/synth.hpp"
#include "tests/cluster.hpp"
#include "tests/http_support.hpp"
#include "tests/process.hpp"
#include "wire/client.hpp"

using namespace std::chrono_literals;
using keel::errc;
using keel::test::cluster;
using keel::test::cluster_config;
using keel::wire::client;

namespace {

struct model_file {
  keel::test::temp_dir dir{"placement_test-model"};
  std::string path = (dir.path / "model.gguf").string();
  model_file() {
    keel::synth_options o;
    o.ctx = 2048;
    keel::test::write_model(path, o);
  }
};

model_file& model() {
  static model_file m;
  return m;
}

/// One sample of node `i`'s GET /metrics (a gauge or counter without labels).
double metric(cluster& cl, size_t i, const std::string& name) {
  auto r = keel::test::curl("http://" + cl.http_address(i) + "/metrics");
  BOOST_REQUIRE(r.status == 200);
  std::istringstream in(r.body);
  std::string line;
  while (std::getline(in, line))
    if (line.rfind(name + " ", 0) == 0) return std::stod(line.substr(name.size() + 1));
  BOOST_FAIL("no sample " + name + " at node " + cl.name(i));
  return 0;
}

/// The KV pages of each shard of node `i`, from its start line ("KV cache: N pages of ...").
int kv_pages(cluster& cl, size_t i) {
  auto log = cl.log(i);
  const std::string tag = "KV cache: ";
  auto at = log.find(tag);
  BOOST_REQUIRE_MESSAGE(at != std::string::npos, "no KV line in:\n" << log);
  return std::stoi(log.substr(at + tag.size()));
}

std::string owner_of(const std::string& session) { return session.substr(session.rfind('@') + 1); }

cluster_config config(const std::filesystem::path& root, const std::string& label,
                      std::vector<std::string> extra) {
  cluster_config cfg;
  cfg.model = model().path;
  cfg.root = root;
  cfg.label = label;
  cfg.admin = true;
  cfg.http = true;
  cfg.extra_args = std::move(extra);
  return cfg;
}

std::vector<keel::test::node_spec> three() { return {{"a", "r1"}, {"b", "r2"}, {"c", "r3"}}; }

keel::sampling_params seeded(uint64_t seed) {
  keel::sampling_params p;
  p.temperature = 0.8f;
  p.seed = seed;
  return p;
}

client::options client_options() {
  client::options o;
  o.connect_timeout = 2s;
  // A resumed turn may wait in a full node's queue: silence is not a failure here.
  o.call_timeout = 60s;
  o.resume_for = 40s;
  return o;
}

/// Node a near its budget: its engine stalls before its next step (for `stall`), and a turn
/// admitted there meanwhile holds 90% of its pages (a prompt of at most 16 tokens plus
/// 16 * (P - 1) tokens of budget is P pages). The turn's client runs on a thread of its own,
/// joined by the destructor (the turn ends once the stall does, or when a is cleared or killed).
struct a_held_full {
  std::thread turn;
  explicit a_held_full(cluster& cl, const char* stall = "20000ms") {
    auto pages = kv_pages(cl, 0);
    BOOST_REQUIRE(pages >= 10);
    BOOST_REQUIRE(pages * 16 <= 2048);
    auto armed = cl.shell(0, std::string("fault a/engine/shard-0 stall ") + stall);
    BOOST_REQUIRE_MESSAGE(armed.first == 0, armed.second);
    int big = (pages * 9 + 9) / 10;
    auto at_a = client::connect({cl.address(0)}, client_options());
    BOOST_REQUIRE(at_a);
    auto heavy = (*at_a)->open_session(seeded(1));
    BOOST_REQUIRE_MESSAGE(heavy, (heavy ? "" : keel::describe(heavy.error())));
    BOOST_TEST(owner_of(*heavy) == "a");  // a had room then
    turn = std::thread([&cl, heavy = *heavy, big] {
      auto c = client::connect({cl.address(0)}, client_options());
      if (c) (void)(*c)->generate(heavy, "Hello", static_cast<uint32_t>(16 * (big - 1)));
    });
    auto until = std::chrono::steady_clock::now() + 10s;
    while (metric(cl, 0, "keel_kv_pages_used") < big && std::chrono::steady_clock::now() < until)
      std::this_thread::sleep_for(20ms);
    BOOST_REQUIRE(metric(cl, 0, "keel_kv_pages_used") >= big);
  }
  ~a_held_full() {
    if (turn.joinable()) turn.join();
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(a_node_near_its_kv_budget_opens_new_sessions_on_peers_with_room) {
  keel::test::temp_dir root("placement_test-open");
  cluster cl(config(root.path, "open", {"--kv-bytes", "8M"}), three());
  cl.start_all();
  BOOST_REQUIRE(cl.wait_all_links_up(10s));
  a_held_full held(cl);
  auto at_a = client::connect({cl.address(0)}, client_options());
  BOOST_REQUIRE(at_a);

  // Every new session asked of a opens on b or c, and works through a.
  std::map<std::string, int> where;
  std::vector<std::string> placed;
  for (int i = 0; i < 8; ++i) {
    auto s = (*at_a)->open_session(seeded(10 + i));
    BOOST_REQUIRE_MESSAGE(s, (s ? "" : keel::describe(s.error())));
    ++where[owner_of(*s)];
    placed.push_back(*s);
  }
  BOOST_TEST(where["a"] == 0);
  BOOST_TEST(where["b"] + where["c"] == 8);
  BOOST_TEST_MESSAGE("placed: b " << where["b"] << ", c " << where["c"]);
  auto g = (*at_a)->generate(placed[0], "Once upon a time", 24);
  BOOST_REQUIRE_MESSAGE(g, (g ? "" : keel::describe(g.error())));
  BOOST_TEST(g->generated.size() > 0u);  // served by b or c while a's engine is stalled

  // b has room: what it is asked to open, it opens itself.
  auto at_b = client::connect({cl.address(1)}, client_options());
  BOOST_REQUIRE(at_b);
  auto local = (*at_b)->open_session(seeded(99));
  BOOST_REQUIRE(local);
  BOOST_TEST(owner_of(*local) == "b");

  auto cleared = cl.shell(0, "fault a clear");
  BOOST_TEST(cleared.first == 0);
}

namespace {

/// One conversation of the cascade case: who opens it, at which priority, and what it did.
struct conversation {
  size_t home = 0;  // the node its client connects to first
  int32_t priority = 0;
  uint64_t seed = 0;
  std::string session;
  std::vector<std::vector<int32_t>> replies;  // each turn's generated ids (completed turns)
  int shed = 0;                               // turns ended `overloaded` (then sent again)
  std::string shed_why;                       // the last one's message
  bool clean = true;                          // no turn was shed: its replies are comparable
  std::string error;
};

const std::vector<std::string> texts = {"Tell me a story", "And then?"};

/// Holds conversation `c` through `endpoints`: each turn until it completes; a turn shed with
/// `overloaded` is sent again (as the next turn) after its retry-after.
void converse(conversation& c, const std::vector<std::string>& endpoints, uint32_t max_tokens,
              std::atomic<int>& streaming) {
  auto cl = client::connect(endpoints, client_options());
  if (!cl) {
    c.error = "connect: " + keel::describe(cl.error());
    return;
  }
  auto s = (*cl)->open_session(seeded(c.seed), c.priority);
  if (!s) {
    c.error = "open: " + keel::describe(s.error());
    return;
  }
  c.session = *s;
  uint64_t next = 0;  // the session's turns so far
  bool counted = false;
  auto deadline = std::chrono::steady_clock::now() + 180s;
  for (size_t t = 0; t < texts.size();) {
    if (std::chrono::steady_clock::now() > deadline) {
      c.error = "deadline passed at turn " + std::to_string(t);
      return;
    }
    auto on_token = [&](uint64_t, uint64_t index, int32_t, std::string_view) {
      if (!counted && index >= 4) {
        counted = true;
        ++streaming;
      }
    };
    auto g = (*cl)->generate(c.session, texts[t], max_tokens, on_token, {}, next);
    if (g) {
      c.replies.push_back(g->generated);
      next = g->turn + 1;
      ++t;
      continue;
    }
    auto code = keel::code_of(g.error());
    if (code != errc::overloaded) {
      c.error = "turn " + std::to_string(t) + ": " + keel::describe(g.error());
      return;
    }
    // Shed: the turn is in the history, ended. Wait as told, then send it again as a new turn.
    ++c.shed;
    c.shed_why = keel::describe(g.error());
    c.clean = false;
    std::this_thread::sleep_for(std::chrono::milliseconds(
        std::clamp<uint32_t>(keel::wire::retry_after_ms(g.error()), 50, 2000)));
    auto h = (*cl)->history(c.session);
    if (!h) {
      c.error = "history after a shed turn: " + keel::describe(h.error());
      return;
    }
    next = h->size();
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_killed_nodes_conversations_continue_within_every_survivors_kv_budget) {
  keel::test::temp_dir root("placement_test-cascade");
  // A queue of 4: a survivor holds at most 4 interactive conversations (its own 2 and a's 2),
  // at least one of them running, so the queue's overflow is always a batch turn.
  cluster cl(config(root.path, "cascade", {"--kv-bytes", "8M", "--max-queue", "4"}), three());
  cl.start_all();
  BOOST_REQUIRE(cl.wait_all_links_up(10s));
  int pages = kv_pages(cl, 0);
  // Each turn reserves R pages and a node fits five (and not six): four conversations per node
  // keep it at about 80% of its budget; after a node's loss each survivor is asked for ~120%.
  int r = pages / 5;
  BOOST_REQUIRE(r >= 3);
  auto max_tokens = static_cast<uint32_t>(16 * (r - 1));
  BOOST_TEST_MESSAGE("KV pages per node " << pages << ", a turn reserves " << r
                                         << " (max tokens " << max_tokens << ")");

  // Four conversations per node, opened there: two interactive (priority 20), two batch (0).
  std::vector<conversation> convs(12);
  for (size_t k = 0; k < convs.size(); ++k) {
    convs[k].home = k % 3;
    convs[k].priority = (k / 3) % 2 == 0 ? 20 : 0;
    convs[k].seed = 100 + k;
  }
  std::atomic<int> streaming{0};
  std::vector<std::thread> threads;
  for (auto& c : convs)
    threads.emplace_back([&, cp = &c] {
      converse(*cp, cl.endpoints(cp->home), max_tokens, streaming);
    });
  struct joiner {
    std::vector<std::thread>& ts;
    ~joiner() {
      for (auto& t : ts)
        if (t.joinable()) t.join();
    }
  } join{threads};

  // Every conversation streams its first turn: then a dies.
  auto until = std::chrono::steady_clock::now() + 60s;
  while (streaming.load() < static_cast<int>(convs.size()) && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(5ms);
  BOOST_REQUIRE_MESSAGE(streaming.load() == static_cast<int>(convs.size()),
                        "only " << streaming.load() << " conversations streamed");
  double before[3];
  for (size_t i = 0; i < 3; ++i) before[i] = metric(cl, i, "keel_kv_pages_used");
  BOOST_TEST_MESSAGE("KV pages in use before the kill: a " << before[0] << ", b " << before[1]
                                                           << ", c " << before[2]);
  cl.kill(0);
  for (auto& t : threads) t.join();

  // No survivor died, none went past its budget, and they were loaded.
  for (size_t i : {size_t{1}, size_t{2}}) {
    BOOST_TEST(cl.alive(i), cl.name(i) << " died");
    auto peak = metric(cl, i, "keel_kv_pages_peak");
    auto capacity = metric(cl, i, "keel_kv_pages_capacity");
    BOOST_TEST(peak <= capacity, cl.name(i) << ": peak " << peak << " of " << capacity);
    BOOST_TEST(peak >= 4 * r, cl.name(i) << ": peak " << peak);
    BOOST_TEST_MESSAGE(cl.name(i) << ": peak " << peak << " of " << capacity << " pages, "
                                  << metric(cl, i, "keel_takeovers_total") << " takeovers");
  }

  // Every conversation continued to its end; only the batch ones were ever shed.
  int shed = 0;
  for (auto& c : convs) {
    BOOST_TEST(c.error.empty(), c.session << " (priority " << c.priority << "): " << c.error);
    BOOST_TEST(c.replies.size() == texts.size(), c.session);
    if (c.priority > 0)
      BOOST_TEST(c.shed == 0, c.session << " was shed at priority " << c.priority << ": "
                                        << c.shed_why);
    shed += c.shed;
  }
  BOOST_TEST_MESSAGE("turns shed (all batch): " << shed);

  // The conversations never shed said what a fault-free cluster says: one node alone, the same
  // seeds and turns, one conversation at a time.
  keel::test::temp_dir ref_root("placement_test-reference");
  cluster_config rc = config(ref_root.path, "reference", {});
  rc.admin = false;
  cluster ref(rc, {{"solo", ""}});
  ref.start_all();
  for (auto& c : convs) {
    if (!c.clean || !c.error.empty()) continue;
    conversation again;
    again.priority = c.priority;
    again.seed = c.seed;
    std::atomic<int> ignored{0};
    converse(again, ref.endpoints(0), max_tokens, ignored);
    BOOST_REQUIRE_MESSAGE(again.error.empty(), again.error);
    BOOST_TEST(again.replies == c.replies, c.session << " differs from the fault-free run");
  }
}

BOOST_AUTO_TEST_CASE(a_session_is_served_only_by_nodes_with_its_model) {
  // a and b serve one model, c another (the same shape, other weights): c's digest differs.
  keel::test::temp_dir root("placement_test-pinned");
  auto other = (root.path / "other.gguf").string();
  {
    keel::synth_options o;
    o.ctx = 2048;
    o.seed = 99;
    keel::test::write_model(other, o);
  }
  auto cfg = config(root.path, "pinned", {"--kv-bytes", "8M"});
  cfg.models["c"] = other;
  cluster cl(cfg, three());
  cl.start_all();
  BOOST_REQUIRE(cl.wait_all_links_up(10s));

  // Sessions opened at a are pinned to a's model, and say so.
  auto at_a = client::connect(cl.endpoints(0), client_options());
  BOOST_REQUIRE(at_a);
  std::vector<std::string> ids;
  for (int i = 0; i < 6; ++i) {
    auto s = (*at_a)->open_session(seeded(200 + i));
    BOOST_REQUIRE(s);
    BOOST_REQUIRE(owner_of(*s) == "a");
    auto g = (*at_a)->generate(*s, "Hello", 8);
    BOOST_REQUIRE_MESSAGE(g, (g ? "" : keel::describe(g.error())));
    ids.push_back(*s);
  }
  auto info = (*at_a)->session(ids[0]);
  BOOST_REQUIRE(info);
  BOOST_TEST(info->model == model().path);
  BOOST_TEST(info->model_digest.size() == 32u);
  auto verbose = keel::test::run({keel::test::bin("keel"), "generate", "--connect", cl.address(1),
                                  "--prompt", "Hi", "--max-tokens", "4", "--verbose"});
  BOOST_TEST(verbose.status == 0, verbose.err);
  BOOST_TEST(verbose.err.find("model " + model().path + " (digest " + info->model_digest + ")") !=
                 std::string::npos,
             verbose.err);

  // a dies: every one of its sessions goes to b, none to c (whose model differs), and each
  // goes on there.
  cl.kill(0);
  auto at_b = client::connect({cl.address(1), cl.address(2)}, client_options());
  BOOST_REQUIRE(at_b);
  for (auto& id : ids) {
    caf::expected<keel::wire::generation> g = keel::make_error(errc::failed, "not tried");
    auto until = std::chrono::steady_clock::now() + 20s;
    while (!g && std::chrono::steady_clock::now() < until) {
      g = (*at_b)->generate(id, "And then?", 8);
      if (!g) std::this_thread::sleep_for(100ms);
    }
    BOOST_TEST(static_cast<bool>(g), id << ": " << (g ? "" : keel::describe(g.error())));
    auto s = (*at_b)->session(id);
    BOOST_REQUIRE(s);
    BOOST_TEST(s->owner == "b", id << " is served by " << s->owner);
  }
  BOOST_TEST(metric(cl, 2, "keel_takeovers_total") == 0);
  BOOST_TEST(metric(cl, 1, "keel_takeovers_total") == static_cast<double>(ids.size()));

  // keel-shell shows the rollout: a's model served by b alone now, with the 6 sessions opened
  // on a and the one `keel generate` opened on b, none running; c's model by c, with none.
  auto rollout = cl.shell(1, "rollout status");
  BOOST_TEST(rollout.first == 0, rollout.second);
  auto line_of = [&](const std::string& needle) {
    std::istringstream in(rollout.second);
    std::string line;
    while (std::getline(in, line))
      if (line.find(needle) != std::string::npos) return line;
    return std::string();
  };
  auto first = line_of(info->model_digest.substr(0, 12));
  BOOST_TEST(std::regex_search(first, std::regex(R"(\sb\s+7\s+0\s*$)")), rollout.second);
  auto second = line_of("seen by heartbeats");  // c, reached through b's heartbeats only
  BOOST_TEST(std::regex_search(second, std::regex(R"(\sc\s+0\s+0\s*$)")), rollout.second);
}

BOOST_AUTO_TEST_CASE(a_stream_through_the_node_that_placed_it_survives_its_owners_death) {
  // A session placed on b or c through a: the client knows a only, and a forwards every call.
  // When the owner dies, a itself is fine, so only a probe of the session (through a to the
  // owner) can tell the client its stream broke; without one it waited for its call timeout.
  keel::test::temp_dir root("placement_test-forwarded");
  cluster cl(config(root.path, "forwarded", {"--kv-bytes", "8M"}), three());
  cl.start_all();
  BOOST_REQUIRE(cl.wait_all_links_up(10s));
  a_held_full held(cl, "30000ms");
  auto opts = client_options();
  opts.call_timeout = std::chrono::milliseconds(0);  // no limit: only the probe can notice
  auto at_a = client::connect({cl.address(0)}, opts);
  BOOST_REQUIRE(at_a);

  auto placed = (*at_a)->open_session(seeded(5));
  BOOST_REQUIRE(placed);
  auto owner = owner_of(*placed);
  BOOST_REQUIRE(owner != "a");
  std::atomic<size_t> got{0};
  std::atomic<bool> finished{false};
  caf::expected<keel::wire::generation> result = keel::make_error(errc::failed, "not run");
  std::vector<keel::wire::failover_event> failovers;
  std::thread stream([&] {
    auto o = opts;
    o.on_failover = [&](const keel::wire::failover_event& e) { failovers.push_back(e); };
    auto c = client::connect({cl.address(0)}, o);
    if (c) {
      result = (*c)->generate(*placed, "Once upon a time", 300,
                              [&](uint64_t, uint64_t, int32_t, std::string_view) { ++got; });
    }
    finished = true;
  });
  struct joiner2 {
    std::thread& t;
    ~joiner2() {
      if (t.joinable()) t.join();
    }
  } join_stream{stream};
  auto until = std::chrono::steady_clock::now() + 30s;
  while (got.load() < 10 && !finished && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(5ms);
  BOOST_REQUIRE_MESSAGE(got.load() >= 10 || finished, "the placed stream did not start");
  if (!finished) cl.kill(cl.index(owner));
  // The stream goes on: it ends well within a minute (without the session probe it never
  // would: the client has no call timeout).
  until = std::chrono::steady_clock::now() + 60s;
  while (!finished && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(20ms);
  BOOST_REQUIRE_MESSAGE(finished.load(), "the stream through a did not go on after " << owner
                                                                                      << " died");
  stream.join();
  BOOST_TEST(static_cast<bool>(result), (result ? "" : keel::describe(result.error())));
  BOOST_TEST(failovers.size() >= 1u);
  (void)cl.shell(0, "fault a clear");
}
