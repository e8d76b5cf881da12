#define BOOST_TEST_MODULE guardrail_test
#include <boost/test/unit_test.hpp>

// The guardrail (actors/guardrail.hpp): the rule filter, and a node with a guardrail that
// denies, stalls or crash-loops, driven by a real client over the node's Cap'n Proto port.

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <fstream>
#include <mutex>
#include <stdexcept>
#include <thread>

#include "actors/guardrail.hpp"
#include "tests/cluster.hpp"
#include "tests/http_support.hpp"
#include "tests/serving_node.hpp"

using namespace keel;
using namespace std::chrono_literals;

namespace {

rule_filter& must(caf::expected<std::unique_ptr<rule_filter>>& r) {
  BOOST_REQUIRE_MESSAGE(r, (r ? "" : describe(r.error())));
  return **r;
}

}  // namespace

BOOST_AUTO_TEST_CASE(rules_match_phrases_and_regexes_case_insensitively_per_stage) {
  auto r = rule_filter::parse(
      "# comment\n"
      "\n"
      "forbidden phrase\n"
      "prompt: only in prompts\n"
      "output: re: secret-[0-9]+\n",
      "rules.txt");
  auto& f = must(r);
  BOOST_TEST(f.size() == 3u);
  auto v = f.check(guard_stage::prompt, "This has a FORBIDDEN Phrase in it");
  BOOST_TEST(!v.allowed);
  BOOST_TEST(v.rule == "rule 3");
  BOOST_TEST(f.check(guard_stage::output, "forbidden phrase").rule == "rule 3");
  BOOST_TEST(!f.check(guard_stage::prompt, "only in prompts").allowed);
  BOOST_TEST(f.check(guard_stage::output, "only in prompts").allowed);
  BOOST_TEST(f.check(guard_stage::output, "the SECRET-42 is out").rule == "rule 5");
  BOOST_TEST(f.check(guard_stage::prompt, "the secret-42 is out").allowed);
  BOOST_TEST(f.check(guard_stage::prompt, "a harmless question").allowed);
}

BOOST_AUTO_TEST_CASE(a_bad_rules_file_is_refused_naming_the_line) {
  auto empty = rule_filter::parse("ok\nre:\n", "rules.txt");
  BOOST_REQUIRE(!empty);
  BOOST_TEST(describe(empty.error()).find("rules.txt line 2") != std::string::npos,
             describe(empty.error()));
  auto bad = rule_filter::parse("re: (unclosed\n", "rules.txt");
  BOOST_REQUIRE(!bad);
  BOOST_TEST(describe(bad.error()).find("line 1") != std::string::npos);
  BOOST_TEST(describe(bad.error()).find("does not compile") != std::string::npos);
  auto missing = rule_filter::load("/nonexistent/rules.txt");
  BOOST_REQUIRE(!missing);
  BOOST_TEST(describe(missing.error()).find("/nonexistent/rules.txt") != std::string::npos);
}

namespace {

/// A filter whose behaviour the test sets: deny a stage, block until released, or throw.
struct scripted {
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<bool> deny_prompt{false};
  std::atomic<bool> deny_output{false};
  std::atomic<bool> block{false};  // check() waits until `release`
  bool released = false;           // under `mu`
  std::atomic<bool> crash{false};  // check() throws
  std::atomic<int> checks{0};
  std::atomic<int> made{0};

  void release() {
    std::lock_guard<std::mutex> g(mu);
    released = true;
    cv.notify_all();
  }
};

class scripted_filter final : public guard_filter {
 public:
  explicit scripted_filter(std::shared_ptr<scripted> s) : s_(std::move(s)) {}
  guard_verdict check(guard_stage stage, std::string_view) override {
    ++s_->checks;
    std::unique_lock<std::mutex> lock(s_->mu);
    if (s_->crash) throw std::runtime_error("injected: the filter crashed");
    if (s_->block) s_->cv.wait(lock, [&] { return s_->released; });
    if (stage == guard_stage::prompt && s_->deny_prompt) return {false, "rule 7"};
    if (stage == guard_stage::output && s_->deny_output) return {false, "rule 9"};
    return {};
  }

 private:
  std::shared_ptr<scripted> s_;
};

const std::string& test_model_path() { return test::small_model("guardrail_test"); }

node_config guarded(const std::shared_ptr<scripted>& script, guard_failure policy, int32_t every) {
  node_config cfg;
  cfg.model_path = test_model_path();
  cfg.guard.make = [s = script]() -> caf::expected<std::unique_ptr<guard_filter>> {
    ++s->made;
    return std::unique_ptr<guard_filter>(std::make_unique<scripted_filter>(s));
  };
  cfg.guard.deadline = 100ms;
  cfg.guard.on_failure = policy;
  cfg.guard.output_every = every;
  cfg.guard.max_pending = 4;
  return cfg;
}

/// A node with a scripted guardrail and its gateway on loopback.
struct guarded_node {
  std::shared_ptr<scripted> script = std::make_shared<scripted>();
  /// Releases a blocked filter before the node stops (declared after it: destroyed before).
  struct releaser {
    std::shared_ptr<scripted> s;
    ~releaser() { s->release(); }
  };
  test::serving_node served;
  releaser release_at_end{script};

  explicit guarded_node(guard_failure policy, int32_t every = 8)
      : served(guarded(script, policy, every)) {}
  std::unique_ptr<wire::client> client() { return served.client(); }
  node& nd() { return *served.nd; }
  uint64_t counted(guard_outcome o) { return served.nd->context()->guard->counted(o); }
};

sampling_params seeded(uint64_t seed) {
  sampling_params p;
  p.temperature = 0.8f;
  p.seed = seed;
  return p;
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_denied_prompt_is_refused_naming_the_rule_and_the_session_goes_on) {
  guarded_node n(guard_failure::open);
  auto c = n.client();
  auto s = c->open_session(seeded(1));
  BOOST_REQUIRE(s);
  n.script->deny_prompt = true;
  auto g = c->generate(*s, "something the rules forbid", 16);
  BOOST_REQUIRE(!g);
  BOOST_TEST(code_of(g.error()) == errc::bad_request);
  BOOST_TEST(describe(g.error()).find("refused by the guardrail (rule 7)") != std::string::npos,
             describe(g.error()));
  // Nothing was recorded, and the next (allowed) turn is turn 0.
  n.script->deny_prompt = false;
  auto ok = c->generate(*s, "a fine question", 16);
  BOOST_REQUIRE_MESSAGE(ok, (ok ? "" : describe(ok.error())));
  BOOST_TEST(ok->turn == 0u);
  BOOST_TEST(n.counted(guard_outcome::denied) == 1u);
}

BOOST_AUTO_TEST_CASE(a_denied_reply_is_stopped_as_filtered_and_recorded_so) {
  guarded_node n(guard_failure::open, 8);
  auto c = n.client();
  // A seed whose reply runs long (the model may end a reply early): found with the guardrail
  // allowing everything; the same seed and prompt give the same reply again.
  uint64_t seed = 0;
  for (uint64_t k = 10; k < 60 && seed == 0; ++k) {
    auto s = c->open_session(seeded(k));
    BOOST_REQUIRE(s);
    auto g = c->generate(*s, "Once upon a time", 400);
    BOOST_REQUIRE(g);
    if (g->generated.size() >= 100) seed = k;
  }
  BOOST_REQUIRE_MESSAGE(seed != 0, "no seed gives a reply of 100 tokens");
  n.script->deny_output = true;
  auto s = c->open_session(seeded(seed));
  BOOST_REQUIRE(s);
  auto g = c->generate(*s, "Once upon a time", 400);
  BOOST_REQUIRE_MESSAGE(g, (g ? "" : describe(g.error())));
  BOOST_TEST(g->reason == finish_reason::filtered);
  BOOST_TEST(g->generated.size() >= 8u);   // the first check came after 8 tokens
  BOOST_TEST(g->generated.size() < 400u);  // and stopped the reply
  auto h = c->history(*s);
  BOOST_REQUIRE(h);
  BOOST_REQUIRE(h->size() == 1u);
  BOOST_TEST((*h)[0].reason == finish_reason::filtered);
  BOOST_TEST((*h)[0].generated == g->generated);  // the client got what the record holds
}

BOOST_AUTO_TEST_CASE(a_stalled_guardrail_failing_open_never_holds_a_turn_past_its_deadline) {
  guarded_node n(guard_failure::open, 8);
  n.script->block = true;  // every check blocks until the end of the test
  auto c = n.client();
  auto s = c->open_session(seeded(3));
  BOOST_REQUIRE(s);
  // Each turn completes while the filter is still blocked: nothing waited for it past the
  // deadline (a wait would last until the release below).
  for (int turn = 0; turn < 3; ++turn) {
    auto g = c->generate(*s, "Tell me more", 40);
    BOOST_REQUIRE_MESSAGE(g, (g ? "" : describe(g.error())));
    BOOST_TEST(g->generated.size() > 0u);
    BOOST_TEST(g->reason != finish_reason::filtered);
  }
  BOOST_TEST(n.counted(guard_outcome::failed_open) >= 3u);
  BOOST_TEST(n.counted(guard_outcome::allowed) == 0u);
  // The bulkhead held: at most max_pending checks (4) ever reached the blocked filter's queue,
  // however many were asked.
  BOOST_TEST(n.script->checks.load() <= 1);  // the one it is blocked in
  n.script->release();
}

BOOST_AUTO_TEST_CASE(a_stalled_guardrail_failing_closed_refuses_turns_cleanly_and_nothing_else) {
  guarded_node n(guard_failure::closed, 8);
  auto c = n.client();
  auto s = c->open_session(seeded(4));
  BOOST_REQUIRE(s);
  auto before = c->generate(*s, "Hello", 12);  // the guardrail answers: allowed
  BOOST_REQUIRE_MESSAGE(before, (before ? "" : describe(before.error())));
  n.script->block = true;
  auto g = c->generate(*s, "Hello again", 12);
  BOOST_REQUIRE(!g);
  BOOST_TEST(code_of(g.error()) == errc::overloaded);
  BOOST_TEST(describe(g.error()).find("guardrail") != std::string::npos, describe(g.error()));
  // Everything else is served: the session's history, new sessions, the node's info.
  auto h = c->history(*s);
  BOOST_REQUIRE(h);
  BOOST_TEST(h->size() == 1u);
  BOOST_TEST(static_cast<bool>(c->open_session(seeded(5))));
  BOOST_TEST(static_cast<bool>(c->info()));
  BOOST_TEST(n.counted(guard_outcome::failed_closed) >= 1u);
  // Once the guardrail answers again, turns go on.
  n.script->block = false;
  n.script->release();
  caf::expected<wire::generation> after = make_error(errc::failed, "not tried");
  for (int i = 0; i < 50 && !after; ++i) {
    after = c->generate(*s, "Hello at last", 12);
    if (!after) std::this_thread::sleep_for(100ms);
  }
  BOOST_TEST(static_cast<bool>(after));
}

BOOST_AUTO_TEST_CASE(a_crash_looping_guardrail_fails_open_and_never_takes_the_node_down) {
  guarded_node n(guard_failure::open, 4);
  n.script->crash = true;
  auto c = n.client();
  auto s = c->open_session(seeded(6));
  BOOST_REQUIRE(s);
  // Turns go on while the filter crashes at every check and is restarted, backing off, until it
  // was made a few times.
  auto until = std::chrono::steady_clock::now() + 30s;
  int turns = 0;
  while ((n.script->made.load() < 3 || turns < 6) && std::chrono::steady_clock::now() < until) {
    // A fresh conversation now and then: a slow machine takes many turns to see the restarts,
    // and one conversation would reach the model's context.
    if (turns > 0 && turns % 20 == 0) {
      s = c->open_session(seeded(6 + turns));
      BOOST_REQUIRE(s);
    }
    auto g = c->generate(*s, "Go on", 8);
    BOOST_REQUIRE_MESSAGE(g, (g ? "" : describe(g.error())));
    BOOST_TEST(g->generated.size() > 0u);
    ++turns;
  }
  // The node never escalated: it is ready and its root never restarted a child for it.
  BOOST_TEST(n.script->made.load() >= 3);
  BOOST_TEST(n.nd().not_ready().empty());
  BOOST_TEST(n.nd().log().restarts("node/guard") == 0);
  BOOST_TEST(n.counted(guard_outcome::failed_open) >= 1u);
  n.script->crash = false;
}

BOOST_AUTO_TEST_CASE(keel_node_loads_a_rules_file_refuses_matching_prompts_and_counts_them) {
  test::temp_dir dir("guardrail_test-node");
  auto rules = dir.path / "rules.txt";
  std::ofstream(rules) << "# what this deployment refuses\nforbidden topic\noutput: re: x{1000}\n";
  test::cluster_config cfg;
  cfg.model = test_model_path();
  cfg.root = dir.path;
  cfg.label = "guardrail";
  cfg.http = true;
  cfg.extra_args = {"--guardrail-rules", rules.string(), "--guardrail-failure", "closed"};
  test::cluster cl(cfg, {{"solo", ""}});
  cl.start_all();
  // Logged after "listening on", which the cluster waits for.
  const auto said = "guardrail: " + rules.string() + " (2 rules)";
  for (int i = 0; i < 250 && cl.log(0).find(said) == std::string::npos; ++i)
    std::this_thread::sleep_for(20ms);
  BOOST_TEST(cl.log(0).find(said) != std::string::npos, cl.log(0));

  auto refused = test::run({test::bin("keel"), "generate", "--connect", cl.address(0), "--prompt",
                            "Tell me about the Forbidden Topic", "--max-tokens", "8"});
  BOOST_TEST(refused.status != 0);
  BOOST_TEST(refused.err.find("refused by the guardrail (rule 2)") != std::string::npos,
             refused.err);
  auto fine = test::run({test::bin("keel"), "generate", "--connect", cl.address(0), "--prompt",
                         "Tell me a story", "--max-tokens", "8"});
  BOOST_TEST(fine.status == 0, fine.err);

  // The OpenAI-style API refuses it too: 400, the error naming the guardrail.
  auto http = test::curl("http://" + cl.http_address(0) + "/v1/completions",
                         {"-H", "Content-Type: application/json", "-d",
                          R"({"prompt": "forbidden topic, please", "max_tokens": 8})"});
  BOOST_TEST(http.status == 400);
  BOOST_TEST(http.body.find("refused by the guardrail (rule 2)") != std::string::npos, http.body);

  auto m = test::curl("http://" + cl.http_address(0) + "/metrics").body;
  BOOST_TEST(m.find("keel_guardrail_checks_total{result=\"denied\"} 2") != std::string::npos, m);
  BOOST_TEST(m.find("keel_requests_total{outcome=\"bad_request\"} 2") != std::string::npos, m);

  // A rules file that does not parse stops the start, naming the line.
  std::ofstream(rules) << "fine\nre: (\n";
  auto bad = test::run({test::bin("keel-node"), "--model", test_model_path(), "--listen", "127.0.0.1:0",
                        "--guardrail-rules", rules.string()});
  BOOST_TEST(bad.status != 0);
  BOOST_TEST(bad.err.find(rules.string() + " line 2") != std::string::npos, bad.err);
}
