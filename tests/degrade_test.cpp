#define BOOST_TEST_MODULE degrade_test
#include <boost/test/unit_test.hpp>

// Degrade before shedding (issue #14): under pressure a new session of a low priority gets a
// shorter context instead of the model's, which it keeps (its turns reserve fewer KV pages), and
// the client is told. A node and its gateway in this process, a real client over loopback.

#include <chrono>
#include <thread>

#include "tests/serving_node.hpp"

using namespace keel;
using namespace std::chrono_literals;

namespace {

using test::serving_node;

sampling_params seeded(uint64_t seed) {
  sampling_params p;
  p.temperature = 0.8f;
  p.seed = seed;
  return p;
}

node_config policy() {
  node_config cfg;
  cfg.model_path = test::small_model("degrade_test");
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
  // No Boost.Test macro on this thread (they are not thread-safe): the client directly.
  std::thread hold([&n, heavy = *heavy, pages] {
    auto h = wire::client::connect({n.gw->address()});
    if (h) (void)(*h)->generate(heavy, "Hello", static_cast<uint32_t>(16 * pages - 8));
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

BOOST_AUTO_TEST_CASE(without_a_policy_no_priority_is_degraded_even_under_pressure) {
  node_config cfg;
  cfg.model_path = test::small_model("degrade_test");
  cfg.degrade_room = 1.1;  // "under pressure" whatever the load: only the priority decides
  serving_node n(cfg);
  for (int32_t priority : {-1000, -1, 0, 10, 20})
    BOOST_TEST(n.nd->context_for_new_session(priority) == 0, "priority " << priority);
}
