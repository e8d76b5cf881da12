#define BOOST_TEST_MODULE node_test
#include <boost/test/unit_test.hpp>

#include <thread>

#include <condition_variable>
#include <map>
#include <mutex>
#include <random>
#include <set>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/node.hpp"
#include "kernels/generate.hpp"
#include "kernels/synth.hpp"
#include "tests/test_support.hpp"

using namespace keel;

namespace {

/// What a sink saw of each (session, turn): tokens by index, and how the turn ended.
struct transcript {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::pair<std::string, uint64_t>, std::vector<int32_t>> tokens;
  std::map<std::pair<std::string, uint64_t>, finish_reason> done;
  std::map<std::pair<std::string, uint64_t>, int64_t> retry_after;
  int violations = 0;  // an index out of order (lost or repeated token)

  bool wait_done(size_t n, std::chrono::seconds limit) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, limit, [&] { return done.size() >= n; });
  }
};

caf::behavior sink(caf::event_based_actor*, std::shared_ptr<transcript> t) {
  return {
      [t](token_atom, const std::string& s, uint64_t turn, int64_t index, int32_t tok,
          const std::string&) {
        std::lock_guard<std::mutex> guard(t->mu);
        auto& v = t->tokens[{s, turn}];
        if (index != static_cast<int64_t>(v.size()))
          ++t->violations;
        else
          v.push_back(tok);
      },
      [t](done_atom, const std::string& s, uint64_t turn, finish_reason why, const std::string&,
          int64_t retry) {
        std::lock_guard<std::mutex> guard(t->mu);
        t->done[{s, turn}] = why;
        t->retry_after[{s, turn}] = retry;
        t->cv.notify_all();
      },
  };
}

struct fixture {
  test::temp_dir dir{"node_test"};
  std::string model_path;
  fixture() {
    synth_options o;
    o.dim = 128;
    o.layers = 2;
    o.heads = 8;
    o.kv_heads = 4;
    o.ffn = 256;
    o.ctx = 512;
    o.seed = 11;
    model_path = test::write_model(dir.path / "m.gguf", o);
  }
};

struct run_result {
  std::map<std::pair<std::string, uint64_t>, std::vector<int32_t>> tokens;
  std::map<std::pair<std::string, uint64_t>, finish_reason> done;
  std::map<std::pair<std::string, uint64_t>, int64_t> retry_after;
  int violations = 0;
  batcher_stats stats;
  int32_t shard_restarts = 0;
};

const char* prompts[] = {"Once upon a time",
                         "The quick brown fox",
                         "hello",
                         "In the beginning",
                         "1 2 3",
                         "Keel keeps conversations alive",
                         "zzz",
                         "a b c d e f"};

sampling_params sampled(uint64_t seed) {
  sampling_params p;
  p.temperature = 0.8f;
  p.top_k = 40;
  p.seed = seed;
  return p;
}

/// Runs `n` conversations of one turn each on a fresh node; `arm` may inject faults after the
/// turns are submitted.
run_result run_node(const std::string& model, node_config cfg, int n, int32_t max_tokens,
                    const std::function<void(node&)>& arm = {},
                    const std::function<int32_t(int)>& priority = {}) {
  caf::actor_system_config sys_cfg;
  keel::tune_actor_system(sys_cfg);
  caf::actor_system sys{sys_cfg};
  cfg.model_path = model;
  // KEEL_TEST_VERBOSE=1 shows the supervision log.
  auto log = std::getenv("KEEL_TEST_VERBOSE")
                 ? std::make_shared<supervision_log>()
                 : std::make_shared<supervision_log>([](const std::string&) {});
  auto nd = node::start(sys, cfg, log);
  BOOST_REQUIRE_MESSAGE(nd, test::why(nd));
  auto t = std::make_shared<transcript>();
  auto snk = sys.spawn(sink, t);
  caf::scoped_actor self{sys};
  std::map<std::string, std::string> names;  // random session id -> "s-<i>@node", by opening
  for (int i = 0; i < n; ++i) {
    auto id = (*nd)->open_session(sampled(static_cast<uint64_t>(i)), priority ? priority(i) : 0);
    BOOST_REQUIRE_MESSAGE(id, test::why(id));
    names[*id] = "s-" + std::to_string(i + 1) + "@node";
    auto s = (*nd)->session(*id);
    BOOST_REQUIRE(s);
    self->request(s, std::chrono::seconds(10), send_atom::value, std::string(prompts[i % 8]),
                  max_tokens, caf::actor_cast<turn_sink_actor>(snk))
        .receive([](uint64_t) {}, [](caf::error& e) { BOOST_FAIL(caf::to_string(e)); });
  }
  if (arm) arm(**nd);
  if (!t->wait_done(static_cast<size_t>(n), std::chrono::seconds(60))) {
    auto st = (*nd)->stats();
    BOOST_FAIL("turns did not finish: "
               << t->done.size() << " of " << n << " done; batcher: "
               << (st ? std::to_string(st->running) + " running, " + std::to_string(st->waiting) +
                            " waiting, " + std::to_string(st->steps) + " steps, " +
                            std::to_string(st->group_failures) + " group failures"
                      : test::why(st)));
  }
  run_result r;
  {
    std::lock_guard<std::mutex> guard(t->mu);
    // Keyed by opening order, so that runs compare (session ids are random).
    auto rename = [&names](auto& from, auto& to) {
      for (auto& [key, v] : from) to[{names.at(key.first), key.second}] = v;
    };
    rename(t->tokens, r.tokens);
    rename(t->done, r.done);
    rename(t->retry_after, r.retry_after);
    r.violations = t->violations;
  }
  auto st = (*nd)->stats();
  BOOST_REQUIRE(st);
  r.stats = *st;
  for (int s = 0; s < cfg.shards; ++s)
    r.shard_restarts += log->restarts(cfg.name + "/engine/shard-" + std::to_string(s));
  (*nd)->stop();
  caf::anon_send_exit(snk, caf::exit_reason::user_shutdown);
  return r;
}

node_config two_shards() {
  node_config c;
  c.shards = 2;
  c.threads_per_shard = 1;
  c.kv_bytes = 64ull << 20;
  c.batching.max_batch = 8;
  c.batching.prefill_chunk = 16;
  return c;
}

}  // namespace

BOOST_FIXTURE_TEST_SUITE(node_tree, fixture)

BOOST_AUTO_TEST_CASE(one_shard_node_streams_what_the_engine_generates) {
  node_config c;
  c.batching.max_batch = 4;
  auto r = run_node(model_path, c, 4, 40);
  BOOST_TEST(r.violations == 0);
  // The same turns straight through the engine, one at a time.
  auto m = model::load(model_path);
  BOOST_REQUIRE(m);
  thread_pool pool(1);
  engine eng(**m, pool);
  kv_pool kv(kv_layout_for(**m), 64ull << 20);
  tokenizer tok((*m)->vocabulary());
  for (int i = 0; i < 4; ++i) {
    generation_request req;
    req.prompt = tok.encode(prompts[i], true);
    req.params = sampled(static_cast<uint64_t>(i));
    req.max_tokens = 40;
    auto out = generate(eng, kv, {req}, 1);
    BOOST_REQUIRE(out);
    auto key = std::make_pair("s-" + std::to_string(i + 1) + "@node", uint64_t{0});
    BOOST_TEST(r.tokens[key] == (*out)[0]);
  }
}

BOOST_AUTO_TEST_CASE(eight_conversations_survive_five_shard_crashes_unchanged) {
  auto clean = run_node(model_path, two_shards(), 8, 200);
  BOOST_TEST(clean.violations == 0);
  BOOST_TEST(clean.shard_restarts == 0);
  std::mt19937 rng(20261122);
  auto crashed = run_node(model_path, two_shards(), 8, 200, [&rng](node& n) {
    // Five crashes at random steps of random ranks, one after another.
    for (int k = 0; k < 5; ++k) {
      auto before = n.stats()->group_failures;
      n.faults().crash_shard(static_cast<int32_t>(rng() % 2), static_cast<int32_t>(rng() % 20));
      for (int w = 0; w < 2000 && n.stats()->group_failures == before; ++w)
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  });
  BOOST_TEST(crashed.violations == 0);
  BOOST_TEST(crashed.stats.group_failures == 5u);
  BOOST_TEST(crashed.shard_restarts >= 5);
  BOOST_TEST(crashed.tokens == clean.tokens);
  for (auto& [key, v] : clean.tokens) BOOST_TEST_CONTEXT(key.first) {
      BOOST_TEST(!v.empty());
    }
  BOOST_TEST(crashed.done == clean.done);
}

BOOST_AUTO_TEST_CASE(failed_kv_allocations_and_stalls_change_nothing) {
  auto clean = run_node(model_path, two_shards(), 4, 60);
  auto faulty = run_node(model_path, two_shards(), 4, 60, [](node& n) {
    n.faults().fail_kv_allocations(1, 3);
    n.faults().stall_shard(0, std::chrono::milliseconds(30), 5);
  });
  BOOST_TEST(faulty.violations == 0);
  BOOST_TEST(faulty.tokens == clean.tokens);
  BOOST_TEST(faulty.stats.group_failures == 0u);
}

BOOST_AUTO_TEST_CASE(a_crashed_session_is_rebuilt_and_its_stream_continues) {
  node_config c = two_shards();
  auto clean = run_node(model_path, c, 3, 120);
  auto faulty = run_node(model_path, c, 3, 120, [](node& n) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    for (auto& r : n.sessions())
      if (r.number == 2) n.faults().crash_session(r.id);  // the second one opened
  });
  BOOST_TEST(faulty.violations == 0);
  BOOST_TEST(faulty.tokens == clean.tokens);
}

BOOST_AUTO_TEST_CASE(a_restarted_session_supervisor_starts_every_session_again) {
  // The whole `sessions` supervisor fails (as keel-shell's `kill node/sessions` makes it): the
  // node's supervisor restarts it, and it starts every session of the table again; their
  // running turns continue and the streams equal the fault-free ones.
  node_config c = two_shards();
  auto clean = run_node(model_path, c, 3, 120);
  auto faulty = run_node(model_path, c, 3, 120, [](node& n) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    caf::scoped_actor self{n.root().home_system()};
    self->send_exit(n.child("sessions"), make_error(errc::failed, "injected: sessions down"));
  });
  BOOST_TEST(faulty.violations == 0);
  BOOST_TEST(faulty.tokens == clean.tokens);
}

BOOST_AUTO_TEST_CASE(more_work_than_the_kv_budget_is_queued_or_shed_by_priority) {
  node_config c;
  // Room for about two turns at once; a queue of four.
  c.kv_bytes = 2 * 15 * 16 * 2 * 2 * 64 * sizeof(float);  // pages for ~2 x 240 tokens
  c.batching.max_queue = 4;
  c.batching.max_batch = 8;
  auto r = run_node(model_path, c, 12, 200, {}, [](int i) { return i % 3; });
  BOOST_TEST(r.violations == 0);
  int shed = 0, finished = 0;
  for (auto& [key, why] : r.done) {
    int prio = (std::stoi(key.first.substr(2)) - 1) % 3;
    if (why == finish_reason::overloaded) {
      ++shed;
      BOOST_TEST(r.retry_after[key] > 0);
      BOOST_TEST(prio < 2);  // the highest priority is never the one shed
    } else {
      ++finished;
      BOOST_TEST(r.tokens[key].size() > 0u);
    }
  }
  BOOST_TEST(shed > 0);
  BOOST_TEST(finished > 0);
  BOOST_TEST(shed + finished == 12);
  BOOST_TEST(r.stats.shed == static_cast<uint64_t>(shed));
}

/// A node of `model` with a KV budget of about 30 pages (room for two turns of ~240 tokens).
std::unique_ptr<node> small_budget_node(caf::actor_system& sys, const std::string& model) {
  node_config cfg;
  cfg.model_path = model;
  cfg.kv_bytes = 2 * 15 * 16 * 2 * 2 * 64 * sizeof(float);
  auto nd = node::start(sys, cfg, std::make_shared<supervision_log>([](const std::string&) {}));
  BOOST_REQUIRE_MESSAGE(nd, test::why(nd));
  return std::move(*nd);
}

BOOST_AUTO_TEST_CASE(the_batcher_publishes_its_load_for_heartbeats_and_placement) {
  caf::actor_system_config sys_cfg;
  keel::tune_actor_system(sys_cfg);
  caf::actor_system sys{sys_cfg};
  auto nd = small_budget_node(sys, model_path);
  auto& n = *nd;
  // From the start: the whole budget is free, so the node has all its room.
  auto capacity = n.config().batching.kv_pages;
  auto l = n.load();
  BOOST_TEST(l.kv_capacity == capacity);
  BOOST_TEST(l.kv_free == capacity);
  BOOST_TEST(l.running == 0);
  BOOST_TEST(l.waiting == 0);
  BOOST_TEST(l.room() == 1.0);
  BOOST_REQUIRE(capacity >= 6);
  BOOST_REQUIRE(16 * (capacity / 2 + 1) <= 512);  // within the model's context

  // The first step stalls, so the admitted turn holds its pages while the load is read. Turn 1
  // reserves half the pages; turn 2 needs one page more than is left, so it waits.
  n.context()->faults->stall_shard(0, std::chrono::milliseconds(1500), 0);
  caf::scoped_actor self{sys};
  auto sk = sys.spawn([](caf::event_based_actor*) -> caf::behavior {
    return {[](token_atom, seq_id, int64_t, int32_t) {},
            [](done_atom, seq_id, finish_reason, const std::string&, int64_t) {}};
  });
  int32_t half = capacity / 2;
  auto job = [&](seq_id seq, int32_t pages) {
    generation_job j;
    j.seq = seq;
    j.session = caf::actor_cast<sequence_sink_actor>(sk);
    j.session_id = "s-" + std::to_string(seq);
    j.tokens = {1, 2, 3};
    j.max_tokens = 16 * pages - 3;  // prompt plus budget: exactly `pages` pages
    j.params = sampled(7);
    return j;
  };
  auto batcher = caf::actor_cast<batcher_actor>(n.child("batcher"));
  self->send(batcher, submit_atom::value, job(1, half));
  self->send(batcher, submit_atom::value, job(2, capacity - half + 1));
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  while ((l = n.load()).waiting != 1 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  BOOST_TEST(l.running == 1);
  BOOST_TEST(l.waiting == 1);
  BOOST_TEST(l.kv_free == capacity - half);
  BOOST_TEST(l.kv_wanted == capacity - half + 1);
  BOOST_TEST(l.room() == 0.0);  // what is free is wanted already
  BOOST_TEST_MESSAGE("loaded: " << l.describe());

  // Both turns run in turn; then everything is free again, the rate falls back to 0, and the
  // peak is the larger turn's reservation.
  until = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (((l = n.load()).running != 0 || l.waiting != 0) && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  BOOST_TEST(l.running == 0);
  BOOST_TEST(l.waiting == 0);
  BOOST_TEST(l.kv_free == capacity);
  BOOST_TEST(l.tokens_per_s == 0.0f);
  BOOST_TEST(n.context()->metrics->load.peak_used() == capacity - half + 1);
  self->send_exit(sk, caf::exit_reason::user_shutdown);
  n.stop();
}

BOOST_AUTO_TEST_CASE(a_higher_priority_turn_sends_a_running_lower_one_back_to_the_queue) {
  caf::actor_system_config sys_cfg;
  keel::tune_actor_system(sys_cfg);
  caf::actor_system sys{sys_cfg};
  auto nd = small_budget_node(sys, model_path);
  auto& n = *nd;
  auto capacity = n.config().batching.kv_pages;
  int32_t most = capacity * 2 / 3;  // two such turns do not fit together
  BOOST_REQUIRE(16 * most <= 512);

  struct seen {
    std::mutex mu;
    std::map<seq_id, std::vector<int32_t>> tokens;
    std::map<seq_id, finish_reason> done;
    int gaps = 0;  // a token index out of order: lost or repeated
  };
  auto log_of = std::make_shared<seen>();
  auto sk = sys.spawn([log_of](caf::event_based_actor*) -> caf::behavior {
    return {[log_of](token_atom, seq_id seq, int64_t index, int32_t tok) {
              std::lock_guard<std::mutex> g(log_of->mu);
              auto& v = log_of->tokens[seq];
              if (index != static_cast<int64_t>(v.size()))
                ++log_of->gaps;
              else
                v.push_back(tok);
            },
            [log_of](done_atom, seq_id seq, finish_reason why, const std::string&, int64_t) {
              std::lock_guard<std::mutex> g(log_of->mu);
              log_of->done[seq] = why;
            }};
  });
  auto job = [&](seq_id seq, int32_t priority, uint64_t seed) {
    generation_job j;
    j.seq = seq;
    j.session = caf::actor_cast<sequence_sink_actor>(sk);
    j.session_id = "s-" + std::to_string(seq);
    j.tokens = {1, 2, 3};
    j.max_tokens = 16 * most - 3;
    j.params = sampled(seed);
    j.priority = priority;
    return j;
  };
  caf::scoped_actor self{sys};
  auto batcher = caf::actor_cast<batcher_actor>(n.child("batcher"));
  // The low-priority turn runs a few steps, then its 6th step stalls: the high one arrives
  // while it holds its pages.
  n.context()->faults->stall_shard(0, std::chrono::milliseconds(800), 5);
  self->send(batcher, submit_atom::value, job(1, 0, 1));
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  auto low_tokens = [&] {
    std::lock_guard<std::mutex> g(log_of->mu);
    return log_of->tokens[1].size();
  };
  while (low_tokens() < 3 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  BOOST_REQUIRE(low_tokens() >= 3);
  self->send(batcher, submit_atom::value, job(2, 20, 2));
  node_load l;
  until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  while ((l = n.load()).waiting != 1 && std::chrono::steady_clock::now() < until)
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  BOOST_TEST(l.running == 1);  // the high one
  BOOST_TEST(l.waiting == 1);  // the low one, back in the queue
  BOOST_TEST(l.kv_free == capacity - most);

  auto wait_done = [&](size_t count) {
    auto end = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (std::chrono::steady_clock::now() < end) {
      {
        std::lock_guard<std::mutex> g(log_of->mu);
        if (log_of->done.size() >= count) return;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  };
  wait_done(2);
  // The same turn again, alone and never preempted: the same tokens.
  self->send(batcher, submit_atom::value, job(3, 0, 1));
  wait_done(3);
  std::lock_guard<std::mutex> g(log_of->mu);
  BOOST_TEST(log_of->done.size() == 3u);
  BOOST_TEST(log_of->tokens[3] == log_of->tokens[1]);
  BOOST_TEST(log_of->gaps == 0);  // the preempted turn went on from its next index
  for (seq_id s : {seq_id{1}, seq_id{2}}) {
    BOOST_TEST((log_of->done[s] == finish_reason::length || log_of->done[s] == finish_reason::eos));
    BOOST_TEST(log_of->tokens[s].size() > 0u);
  }
  auto st = n.stats();
  BOOST_REQUIRE(st);
  BOOST_TEST(st->preemptions == 1u);
  BOOST_TEST(st->shed == 0u);
  self->send_exit(sk, caf::exit_reason::user_shutdown);
  n.stop();
}

BOOST_AUTO_TEST_CASE(a_turn_with_a_token_outside_the_vocabulary_fails_alone) {
  // Issue #11: a forged session with token 99999 reached the engine; every step failed, the
  // worker group restarted forever. The batcher refuses that turn alone, and the node serves on.
  caf::actor_system_config sys_cfg;
  keel::tune_actor_system(sys_cfg);
  caf::actor_system sys{sys_cfg};
  node_config cfg;
  cfg.model_path = model_path;
  auto log = std::make_shared<supervision_log>([](const std::string&) {});
  auto nd = node::start(sys, cfg, log);
  BOOST_REQUIRE_MESSAGE(nd, test::why(nd));
  caf::scoped_actor self{sys};
  generation_job job;
  job.seq = 12345;
  job.session = caf::actor_cast<sequence_sink_actor>(self);
  job.tokens = {1, 2, 3};
  job.generated = {4, 99999};
  job.params = sampled(1);
  job.max_tokens = 8;
  self->send(caf::actor_cast<batcher_actor>((*nd)->child("batcher")), submit_atom::value,
             std::move(job));
  bool refused = false;
  self->receive(
      [&](done_atom, seq_id seq, finish_reason why, const std::string& detail, int64_t) {
        refused = seq == 12345 && why == finish_reason::failed &&
                  detail.find("99999") != std::string::npos;
        BOOST_TEST_MESSAGE("refused: " << detail);
      },
      caf::after(std::chrono::seconds(10)) >> [] { BOOST_FAIL("no answer from the batcher"); });
  BOOST_TEST(refused);
  // Nothing reached the workers: no step failed, no worker restarted.
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  auto st = (*nd)->stats();
  BOOST_REQUIRE(st);
  BOOST_TEST(st->group_failures == 0u);
  BOOST_TEST(log->restarts("node/engine/shard-0") == 0);
  (*nd)->stop();
}

BOOST_AUTO_TEST_SUITE_END()

BOOST_FIXTURE_TEST_CASE(a_node_takes_its_threads_and_randomness_from_its_environment, fixture) {
  // Issue #10: one environment, built by main() or a test and passed down. Here the test's
  // thread spawner sees every thread the node starts itself (named, and all joined when it
  // stops), and its randomness makes every session id the same: the node never hands out an
  // id twice, so the second session is refused once its draws are used up; a source that
  // fails fails the new session with its reason.
  caf::actor_system_config sys_cfg;
  keel::tune_actor_system(sys_cfg);
  caf::actor_system sys{sys_cfg};
  struct counts {
    std::mutex mu;
    std::vector<std::string> names;
    int running = 0;
  };
  auto c = std::make_shared<counts>();
  node_env env;
  env.threads = [c](const std::string& name, std::function<void()> body) {
    {
      std::lock_guard<std::mutex> guard(c->mu);
      c->names.push_back(name);
      ++c->running;
    }
    return spawn_named_thread(name, [c, body = std::move(body)] {
      body();
      std::lock_guard<std::mutex> guard(c->mu);
      --c->running;
    });
  };
  bool fail_random = false;
  env.random = [&fail_random](unsigned char* out, size_t n) -> caf::error {
    if (fail_random) return make_error(errc::failed, "the test's source is dry");
    std::fill(out, out + n, 0);
    return {};
  };
  node_config cfg;
  cfg.model_path = model_path;
  cfg.shards = 2;
  cfg.threads_per_shard = 2;
  auto log = std::make_shared<supervision_log>([](const std::string&) {});
  auto nd = node::start(sys, cfg, log, env);
  BOOST_REQUIRE_MESSAGE(nd, test::why(nd));

  auto first = (*nd)->open_session(sampled(1));
  BOOST_REQUIRE_MESSAGE(first, test::why(first));
  BOOST_TEST(*first == "s-aaaaaaaaaaaaaaaaaaaaaaaa@node");
  auto second = (*nd)->open_session(sampled(2));
  BOOST_REQUIRE(!second);
  BOOST_TEST(describe(second.error()).find("no unused session id") != std::string::npos,
             describe(second.error()));
  fail_random = true;
  auto third = (*nd)->open_session(sampled(3));
  BOOST_REQUIRE(!third);
  BOOST_TEST(describe(third.error()).find("the test's source is dry") != std::string::npos,
             describe(third.error()));

  // The shard workers start on the engine supervisor's own time: wait for both.
  for (int i = 0; i < 1000; ++i) {
    {
      std::lock_guard<std::mutex> guard(c->mu);
      if (c->names.size() >= 2) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  {
    std::lock_guard<std::mutex> guard(c->mu);
    // Each shard's pool: the calling thread and one more (started again if the engine group
    // restarted, under the same name).
    std::set<std::string> distinct(c->names.begin(), c->names.end());
    std::string all;
    for (auto& n : c->names) all += n + " ";
    BOOST_TEST((distinct == std::set<std::string>{"keel-shard0-1", "keel-shard1-1"}), all);
  }
  nd->reset();
  std::lock_guard<std::mutex> guard(c->mu);
  BOOST_TEST(c->running == 0);
}
