#define BOOST_TEST_MODULE degrade_test
#include <boost/test/unit_test.hpp>

// Degrade before shedding (issue #14): under pressure a new session of a low priority gets a
// shorter context instead of the model's, which it keeps (its turns reserve fewer KV pages), and
// the client is told. A node and its gateway in this process, a real client over loopback.

#include <chrono>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include "actors/gateway.hpp"
#include "actors/node.hpp"
#include "kernels/synth.hpp"
#include "tests/test_support.hpp"
#include "wire/client.hpp"

using namespace keel;
using namespace std::chrono_literals;

namespace {

struct model_file {
  test::temp_dir dir{"degrade_test"};
  std::string path;
  model_file() {
    synth_options o;
    o.dim = 64;
    o.layers = 2;
    o.heads = 4;
    o.kv_heads = 2;
    o.ffn = 128;
    o.ctx = 512;
    path = test::write_model(dir.path / "m.gguf", o);
  }
};

model_file& test_model() {
  static model_file m;
  return m;
}

struct serving_node {
  caf::actor_system_config sys_cfg;  // the system keeps a reference: it must outlive it
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<node> nd;
  std::unique_ptr<gateway> gw;

  explicit serving_node(node_config cfg) {
    tune_actor_system(sys_cfg);
    sys = std::make_unique<caf::actor_system>(sys_cfg);
    cfg.model_path = test_model().path;
    auto n = node::start(*sys, cfg, std::make_shared<supervision_log>([](const std::string&) {}));
    BOOST_REQUIRE_MESSAGE(n, test::why(n));
    nd = std::move(*n);
    auto g = gateway::start(*sys, *nd, gateway_config{});
    BOOST_REQUIRE_MESSAGE(g, test::why(g));
    gw = std::move(*g);
  }
  ~serving_node() {
    gw.reset();
    nd->stop();
    nd.reset();
    sys.reset();
  }
  std::unique_ptr<wire::client> client() {
    auto c = wire::client::connect({gw->address()});
    BOOST_REQUIRE_MESSAGE(c, (c ? "" : describe(c.error())));
    return std::move(*c);
  }
};

sampling_params seeded(uint64_t seed) {
  sampling_params p;
  p.temperature = 0.8f;
  p.seed = seed;
  return p;
}

node_config policy() {
  node_config cfg;
  cfg.kv_bytes = 2 * 16 * 16 * 2 * 2 * 32 * sizeof(float);  // a few dozen pages
  cfg.degrade_below = 10;    // batch (priority 0) degrades; standard (10) and up do not
  cfg.degrade_room = 0.6;    // once 40% of the pages are taken
  cfg.degrade_context = 48;  // tokens
  return cfg;
}

}  // namespace

BOOST_AUTO_TEST_CASE(without_pressure_every_priority_gets_the_models_context) {
  serving_node n(policy());
  auto c = n.client();
  auto s = c->open_session(seeded(1), 0);
  BOOST_REQUIRE(s);
  auto info = c->session(*s);
  BOOST_REQUIRE(info);
  BOOST_TEST(info->context_length == 512u);
}

BOOST_AUTO_TEST_CASE(under_pressure_a_low_priority_session_gets_a_shorter_context_and_keeps_it) {
  serving_node n(policy());
  auto& nd = *n.nd;
  auto capacity = nd.config().batching.kv_pages;
  BOOST_REQUIRE(capacity >= 8);
  // A turn that holds most of the pages while the engine stalls: the node is under pressure.
  nd.context()->faults->stall_shard(0, 2000ms, 0);
  auto c = n.client();
  auto heavy = c->open_session(seeded(2), 20);
  BOOST_REQUIRE(heavy);
  int32_t pages = std::min(capacity * 3 / 4, 512 / 16 - 1);
  std::thread hold([&] {
    auto h = n.client();
    (void)h->generate(*heavy, "Hello", static_cast<uint32_t>(16 * pages - 8));
  });
  struct joiner {
    std::thread& t;
    ~joiner() { t.join(); }
  } join{hold};
  auto until = std::chrono::steady_clock::now() + 10s;
  while (nd.load().room() >= 0.6 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(5ms);
  BOOST_REQUIRE(nd.load().room() < 0.6);

  auto low = c->open_session(seeded(3), 0);
  auto high = c->open_session(seeded(4), 10);
  BOOST_REQUIRE(low);
  BOOST_REQUIRE(high);
  auto low_info = c->session(*low);
  auto high_info = c->session(*high);
  BOOST_REQUIRE(low_info);
  BOOST_REQUIRE(high_info);
  BOOST_TEST(low_info->context_length == 48u);   // degraded, and told so
  BOOST_TEST(high_info->context_length == 512u);  // not below the policy's priority
  BOOST_TEST(nd.context()->metrics->sessions_degraded.load() == 1u);

  // The degraded session keeps its context once the pressure is gone: a turn that asks for more
  // ends at it, and a prompt past it is refused naming it.
  auto g = c->generate(*low, "Once upon a time", 400);
  BOOST_REQUIRE_MESSAGE(g, (g ? "" : describe(g.error())));
  BOOST_TEST((g->reason == finish_reason::context || g->reason == finish_reason::eos));
  BOOST_TEST(g->prompt.size() + g->generated.size() <= 48u);
  if (g->reason == finish_reason::context)
    BOOST_TEST(g->prompt.size() + g->generated.size() == 48u);
  std::string long_prompt;
  for (int i = 0; i < 60; ++i) long_prompt += "word ";
  auto refused = c->generate(*low, long_prompt, 8);
  BOOST_REQUIRE(!refused);
  BOOST_TEST(describe(refused.error()).find("context length is 48 (this session's, shortened "
                                            "under load)") != std::string::npos,
             describe(refused.error()));
  auto again = c->session(*low);
  BOOST_REQUIRE(again);
  BOOST_TEST(again->context_length == 48u);
}
