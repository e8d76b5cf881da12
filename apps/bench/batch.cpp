// keel-bench batch: the actor path against the engine, and recovery from shard crashes.

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <latch>
#include <map>
#include <mutex>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/node.hpp"
#include "apps/cli.hpp"
#include "kernels/engine.hpp"
#include "kernels/generate.hpp"
#include "kernels/model.hpp"
#include "kernels/ops.hpp"
#include "wire/client.hpp"

#include "apps/bench/common.hpp"

namespace keel::bench {

namespace {

constexpr option batch_spec[] = {
    {"model", "FILE", "model to measure (required; must shard into --shards ranks)"},
    {"shards", "N", "engine shards of the recovery node (default 2)"},
    {"threads", "N",
     "CPU threads per node (default: all cores). The throughput node (one shard) and the raw "
     "engine use N; the recovery node gives each of its shards max(1, N / shards)"},
    {"tokens", "N", "max tokens of each throughput turn (default 64)"},
    {"crashes", "N", "shard crashes injected one after another in the recovery run (default 20)"},
    {"reps", "N",
     "runs of each throughput measurement, alternating paths; the best counts "
     "(default 3)"},
    {"caf-default-polling", nullptr,
     "keep CAF's idle polling instead of the node's setting (to measure its cost)"},
    {"out", "FILE", "also write the report (Markdown) to FILE, e.g. bench/batch.md"},
};

/// What a sink saw of each session's one turn: tokens in index order with their arrival times,
/// and how the turn ended. Written by the sink actor, read by the benchmark thread.
struct stream_log {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::string, std::vector<int32_t>> tokens;
  std::map<std::string, std::vector<clock_type::time_point>> times;
  std::map<std::string, keel::finish_reason> done;
  clock_type::time_point last_done{};
  int violations = 0;  // an index out of order: a token lost or repeated

  bool wait_done(size_t n, std::chrono::seconds limit) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, limit, [&] { return done.size() >= n; });
  }
};

caf::behavior bench_sink(caf::event_based_actor*, std::shared_ptr<stream_log> log) {
  return {
      [log](keel::token_atom, const std::string& s, uint64_t, int64_t index, int32_t tok,
            const std::string&) {
        auto now = clock_type::now();
        std::lock_guard<std::mutex> guard(log->mu);
        auto& v = log->tokens[s];
        if (index != static_cast<int64_t>(v.size())) {
          ++log->violations;
          return;
        }
        v.push_back(tok);
        log->times[s].push_back(now);
      },
      [log](keel::done_atom, const std::string& s, uint64_t, keel::finish_reason why,
            const std::string&, int64_t) {
        auto now = clock_type::now();
        std::lock_guard<std::mutex> guard(log->mu);
        log->done[s] = why;
        log->last_done = now;
        log->cv.notify_all();
      },
  };
}

/// Decode figures of one run: the tokens generated after the last sequence's first token (by
/// then every prompt has been prefilled) and the time from that token to `end`.
struct decode_figure {
  int64_t tokens = 0;
  double seconds = 0;
  double tps() const { return seconds > 0 ? static_cast<double>(tokens) / seconds : 0.0; }
};

decode_figure decode_window(const std::vector<std::vector<clock_type::time_point>>& times,
                            clock_type::time_point end) {
  clock_type::time_point t0{};
  for (auto& v : times)
    if (!v.empty()) t0 = std::max(t0, v.front());
  decode_figure f;
  for (auto& v : times)
    f.tokens +=
        std::count_if(v.begin(), v.end(), [t0](clock_type::time_point t) { return t > t0; });
  f.seconds = std::chrono::duration<double>(end - t0).count();
  return f;
}

struct run_figures {
  decode_figure decode;
  std::vector<std::vector<int32_t>> tokens;  // by session, in opening order
  std::vector<keel::finish_reason> reasons;
  int violations = 0;
};

/// `n` sequences of one turn each straight through keel::generate (max_batch = n).
caf::expected<run_figures> run_engine(keel::engine& eng, keel::kv_pool& kv,
                                      const keel::tokenizer& tok, int32_t n, int32_t max_tokens) {
  std::vector<keel::generation_request> reqs(n);
  for (int32_t i = 0; i < n; ++i) {
    reqs[i].prompt = tok.encode(bench_prompts[i % n_prompts], tok.vocabulary().add_bos);
    reqs[i].params = bench_params(static_cast<uint64_t>(i));
    reqs[i].max_tokens = max_tokens;
  }
  std::vector<std::vector<clock_type::time_point>> times(n);
  auto out = keel::generate(eng, kv, reqs, n,
                            [&times](size_t s, int32_t) { times[s].push_back(clock_type::now()); });
  auto end = clock_type::now();
  if (!out) return std::move(out.error());
  run_figures r;
  r.decode = decode_window(times, end);
  r.tokens = std::move(*out);
  return r;
}

/// Opens `n` sessions on `nd`, sends each one turn (all before waiting for any), calls `during`
/// while they run, and waits until every turn is done.
caf::expected<run_figures> run_actor(caf::actor_system& sys, keel::node& nd, int32_t n,
                                     int32_t max_tokens,
                                     const std::function<void(stream_log&)>& during = {}) {
  std::vector<std::string> ids;
  std::vector<keel::session_actor> handles;
  for (int32_t i = 0; i < n; ++i) {
    auto id = nd.open_session(bench_params(static_cast<uint64_t>(i)));
    if (!id) return std::move(id.error());
    auto h = nd.session(*id);
    if (!h) return keel::make_error(keel::errc::disconnected, "batch: session " + *id + " is down");
    ids.push_back(*id);
    handles.push_back(std::move(h));
  }
  auto log = std::make_shared<stream_log>();
  auto snk = sys.spawn(bench_sink, log);
  caf::error failure;
  {
    caf::scoped_actor self{sys};
    for (int32_t i = 0; i < n && !failure; ++i) {
      self->request(handles[i], std::chrono::seconds(10), keel::send_atom::value,
                    std::string(bench_prompts[i % n_prompts]), max_tokens,
                    caf::actor_cast<keel::turn_sink_actor>(snk))
          .receive([](uint64_t) {}, [&failure](caf::error& e) { failure = std::move(e); });
    }
  }
  if (!failure && during) during(*log);
  if (!failure && !log->wait_done(static_cast<size_t>(n), std::chrono::seconds(1800))) {
    std::lock_guard<std::mutex> guard(log->mu);
    failure = keel::make_error(keel::errc::failed, "batch: " + std::to_string(log->done.size()) +
                                                       " of " + std::to_string(n) +
                                                       " turns finished within 1800 s");
  }
  caf::anon_send_exit(snk, caf::exit_reason::user_shutdown);
  if (failure) return failure;
  run_figures r;
  std::lock_guard<std::mutex> guard(log->mu);
  std::vector<std::vector<clock_type::time_point>> times;
  for (auto& id : ids) {
    r.tokens.push_back(log->tokens[id]);
    r.reasons.push_back(log->done[id]);
    times.push_back(log->times[id]);
  }
  r.decode = decode_window(times, log->last_done);
  r.violations = log->violations;
  return r;
}

/// KV bytes for `n` sequences of up to `tokens` tokens each, with a quarter to spare.
uint64_t kv_bytes_for(const keel::model& m, int32_t n, int64_t tokens) {
  auto layout = keel::kv_layout_for(m);
  auto pages = static_cast<uint64_t>(keel::pages_for(layout, tokens)) * n;
  return (pages + pages / 4 + 4) * keel::kv_pool(layout, 0).page_bytes();
}

/// Per crash, milliseconds from the crashed shard's exit to the last rank of the group being
/// started again, from the supervision log.
std::vector<double> group_restart_ms(const keel::supervision_log& log, const std::string& engine,
                                     int32_t shards) {
  std::vector<double> out;
  bool open = false;
  int32_t restarted = 0;
  std::chrono::system_clock::time_point crashed_at;
  for (auto& e : log.events()) {
    if (e.path.rfind(engine + "/shard-", 0) != 0) continue;
    if (e.kind == keel::supervision_event_kind::exited &&
        e.reason.find("injected fault") != std::string::npos) {
      open = true;
      restarted = 0;
      crashed_at = e.when;
    } else if (open && e.kind == keel::supervision_event_kind::restarted && ++restarted == shards) {
      out.push_back(std::chrono::duration<double, std::milli>(e.when - crashed_at).count());
      open = false;
    }
  }
  return out;
}

}  // namespace

int batch_command(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-bench batch --model FILE [--shards N] [--threads N] [--tokens N] [--crashes N] "
        "[--out bench/batch.md]",
        "Runs a node in this process. Throughput: 1, 4, 16 and 64 concurrent sessions of one "
        "turn each through the actor path (sessions, batcher, shard worker) against "
        "keel::generate on an engine with the same threads, as decode tokens/s after every "
        "prefill, and the actor path's overhead. Recovery: 16 sessions of long turns on a node of "
        "--shards shards while shard crashes are injected one after another; reports the time "
        "from each group failure to the next token (p50, p99, max) and whether the transcripts "
        "equal a fault-free run.",
        batch_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, batch_spec);
  if (!opts) return fail(opts.error());
  if (!opts->has("model"))
    return fail(keel::make_error(keel::errc::bad_request, "batch: --model FILE is required"));
  auto threads =
      opts->get_int("threads", std::max(1u, std::thread::hardware_concurrency()), 1, 1024);
  if (!threads) return fail(threads.error());
  auto shards = opts->get_int("shards", 2, 1, 64);
  if (!shards) return fail(shards.error());
  auto max_tokens = opts->get_int("tokens", 64, 2, 1 << 20);
  if (!max_tokens) return fail(max_tokens.error());
  auto crashes = opts->get_int("crashes", 20, 0, 10000);
  if (!crashes) return fail(crashes.error());
  auto reps = opts->get_int("reps", 3, 1, 100);
  if (!reps) return fail(reps.error());
  std::string command = "keel-bench batch";
  for (auto* a : args) command += std::string(" ") + a;

  const std::string path = opts->get("model");
  std::cerr << "keel-bench: loading " << path << "\n";
  auto m = keel::model::load(path);
  if (!m) return fail(m.error());
  const auto& model = **m;
  const auto& c = model.config();
  if (auto err = keel::check_sharding(model, keel::shard_layout{0, static_cast<int32_t>(*shards)}))
    return fail(err);
  keel::tokenizer tok(model.vocabulary());
  std::vector<int64_t> prompt_len(n_prompts);
  for (int i = 0; i < n_prompts; ++i)
    prompt_len[i] =
        static_cast<int64_t>(tok.encode(bench_prompts[i], tok.vocabulary().add_bos).size());
  const int64_t longest = *std::max_element(prompt_len.begin(), prompt_len.end());
  if (longest + *max_tokens >= c.ctx_len) {
    return fail(keel::make_error(keel::errc::bad_request,
                                 "batch: --tokens " + std::to_string(*max_tokens) +
                                     " and a prompt of " + std::to_string(longest) +
                                     " tokens do not fit the context length " +
                                     std::to_string(c.ctx_len)));
  }
  const int32_t sizes[] = {1, 4, 16, 64};
  constexpr int n_sizes = 4;
  const int32_t max_sessions = sizes[n_sizes - 1];

  caf::actor_system_config sys_cfg;
  // The node's setting (keel::tune_actor_system); --caf-default-polling measures without it.
  if (!opts->has("caf-default-polling")) keel::tune_actor_system(sys_cfg);
  caf::actor_system sys{sys_cfg};
  auto quiet = [] { return std::make_shared<keel::supervision_log>([](const std::string&) {}); };

  // Throughput: one node (one shard of `threads` threads) and one engine of as many threads,
  // run alternately so that both see the same machine.
  keel::node_config tcfg;
  tcfg.name = "bench";
  tcfg.model_path = path;
  tcfg.shards = 1;
  tcfg.threads_per_shard = static_cast<int32_t>(*threads);
  tcfg.batching.max_batch = max_sessions;
  tcfg.kv_bytes = kv_bytes_for(model, max_sessions, longest + *max_tokens + 1);
  double engine_tps[n_sizes] = {}, actor_tps[n_sizes] = {};
  int64_t engine_counted[n_sizes] = {}, actor_counted[n_sizes] = {}, generated[n_sizes] = {};
  bool same_tokens = true;
  int violations = 0;
  size_t caf_workers = sys.scheduler().num_workers();
  {
    auto nd = keel::node::start(sys, tcfg, quiet());
    if (!nd) return fail(nd.error());
    keel::thread_pool pool(static_cast<int>(*threads));
    keel::engine eng(model, pool);
    keel::kv_pool kv(keel::kv_layout_for(model), tcfg.kv_bytes);
    for (int si = 0; si < n_sizes; ++si) {
      int32_t n = sizes[si];
      for (int64_t rep = 0; rep < *reps; ++rep) {
        std::cerr << "keel-bench: throughput, " << n << " sessions, run " << rep + 1 << " of "
                  << *reps << ": engine\n";
        auto e = run_engine(eng, kv, tok, n, static_cast<int32_t>(*max_tokens));
        if (!e) return fail(e.error());
        std::cerr << "keel-bench: throughput, " << n << " sessions, run " << rep + 1 << " of "
                  << *reps << ": actor path\n";
        auto a = run_actor(sys, **nd, n, static_cast<int32_t>(*max_tokens));
        if (!a) return fail(a.error());
        if (e->decode.tps() > engine_tps[si]) {
          engine_tps[si] = e->decode.tps();
          engine_counted[si] = e->decode.tokens;
        }
        if (a->decode.tps() > actor_tps[si]) {
          actor_tps[si] = a->decode.tps();
          actor_counted[si] = a->decode.tokens;
        }
        same_tokens = same_tokens && a->tokens == e->tokens;
        violations += a->violations;
        generated[si] = 0;
        for (auto& v : a->tokens) generated[si] += static_cast<int64_t>(v.size());
      }
    }
  }

  // Recovery: the same 16 sessions of long turns on a fresh node, first without faults, then
  // with crashes injected one after another: arm a crash at a random step of a random rank,
  // wait for the group failure, wait for the next token, repeat.
  const int32_t rec_sessions = 16;
  const int32_t rec_threads = std::max<int32_t>(1, static_cast<int32_t>(*threads / *shards));
  const int64_t long_tokens = std::min<int64_t>(32 + 8 * *crashes, c.ctx_len - longest - 1);
  keel::node_config rcfg;
  rcfg.name = "bench";
  rcfg.model_path = path;
  rcfg.shards = static_cast<int32_t>(*shards);
  rcfg.threads_per_shard = rec_threads;
  rcfg.batching.max_batch = rec_sessions;
  rcfg.kv_bytes = kv_bytes_for(model, rec_sessions, longest + long_tokens + 1);
  // Every crash restarts the group: let the engine supervisor take them all without escalating.
  rcfg.engine_flags.intensity = static_cast<int32_t>(2 * *crashes + 10);

  std::cerr << "keel-bench: recovery, fault-free run (" << rec_sessions << " sessions of "
            << long_tokens << " tokens, " << *shards << " shards x " << rec_threads
            << " threads)\n";
  run_figures clean;
  {
    auto nd = keel::node::start(sys, rcfg, quiet());
    if (!nd) return fail(nd.error());
    auto r = run_actor(sys, **nd, rec_sessions, static_cast<int32_t>(long_tokens));
    if (!r) return fail(r.error());
    clean = std::move(*r);
  }

  std::cerr << "keel-bench: recovery, " << *crashes << " shard crashes\n";
  auto rlog = quiet();
  run_figures faulty;
  keel::batcher_stats fstats;
  int32_t injected = 0, shard_restarts = 0;
  std::vector<double> context_at_failure;
  {
    auto nd = keel::node::start(sys, rcfg, rlog);
    if (!nd) return fail(nd.error());
    auto& n = **nd;
    std::mt19937 rng(20261122);
    auto inject = [&](stream_log& log) {
      // Polls the batcher until `pred` holds or no turn is left; false when none is left.
      auto poll = [&n](auto pred) {
        auto deadline = clock_type::now() + std::chrono::seconds(300);
        while (clock_type::now() < deadline) {
          auto st = n.stats();
          if (st && pred(*st)) return true;
          if (st && st->running + st->waiting == 0) return false;
          std::this_thread::sleep_for(std::chrono::milliseconds(1));
        }
        return false;
      };
      for (int64_t k = 0; k < *crashes; ++k) {
        auto st = n.stats();
        if (!st || st->running + st->waiting == 0) break;
        auto before = st->group_failures;
        n.faults().crash_shard(static_cast<int32_t>(rng() % *shards),
                               static_cast<int32_t>(rng() % 8));
        if (!poll([before](const keel::batcher_stats& s) { return s.group_failures > before; }))
          break;
        ++injected;
        {
          std::lock_guard<std::mutex> guard(log.mu);
          // Sessions of a fresh node are s-1, s-2, ... in opening order.
          int64_t ctx_tokens = 0;
          for (int32_t s = 0; s < rec_sessions; ++s) {
            auto id = "s-" + std::to_string(s + 1);
            if (log.done.count(id)) continue;
            ctx_tokens += prompt_len[s % n_prompts] + static_cast<int64_t>(log.tokens[id].size());
          }
          context_at_failure.push_back(static_cast<double>(ctx_tokens));
        }
        if (!poll([before](const keel::batcher_stats& s) { return s.recovery_ms.size() > before; }))
          break;
      }
      n.faults().clear();
      std::cerr << "keel-bench: recovery, " << injected << " crashes injected, waiting for the "
                << "turns to finish\n";
    };
    auto r = run_actor(sys, n, rec_sessions, static_cast<int32_t>(long_tokens), inject);
    if (!r) return fail(r.error());
    faulty = std::move(*r);
    auto st = n.stats();
    if (!st) return fail(st.error());
    fstats = *st;
    for (int32_t s = 0; s < *shards; ++s)
      shard_restarts += rlog->restarts(rcfg.name + "/engine/shard-" + std::to_string(s));
  }
  auto restart_ms = group_restart_ms(*rlog, rcfg.name + "/engine", rcfg.shards);
  const bool transcripts_equal =
      faulty.violations == 0 && faulty.tokens == clean.tokens && faulty.reasons == clean.reasons;
  int64_t clean_tokens = 0;
  for (auto& v : clean.tokens) clean_tokens += static_cast<int64_t>(v.size());

  std::ostringstream r;
  char buf[512];
  r << "# Batching benchmark\n\n";
  r << "Command: `" << command << "`\n\n";
  r << "## Machine\n\n";
  r << "- CPU: " << cpu_model() << ", " << std::thread::hardware_concurrency()
    << " hardware threads, kernels: " << keel::to_string(keel::active_isa()) << "\n";
  r << "- Memory: " << mem_total() << "\n";
  r << "- CAF scheduler: " << caf_workers << " work-stealing worker threads, "
    << (opts->has("caf-default-polling") ? "CAF's default polling (--caf-default-polling)"
                                         : "keel::tune_actor_system (idle workers sleep at once)")
    << "; shard workers are detached threads\n\n";
  r << "## Model\n\n";
  std::snprintf(buf, sizeof buf,
                "- %s (%s): dim %d, %d layers, %d heads (kv %d), ffn %d, vocab %d, ctx %d, "
                "weights %s\n- Weight bytes read per decoded token: %.1f MB\n\n",
                model.path().c_str(), model.format().c_str(), c.dim, c.n_layers, c.n_heads,
                c.n_kv_heads, c.ffn_dim, c.vocab_size, c.ctx_len,
                std::string(keel::dtype_name(model.weight_type())).c_str(),
                model.weight_bytes_per_token() / 1e6);
  r << buf;

  r << "## Throughput: actor path against the engine\n\n";
  std::snprintf(
      buf, sizeof buf,
      "- Node: 1 shard x %lld threads, batching.max_batch %d, prefill_chunk %d, KV budget %.0f "
      "MiB\n- Engine: keel::generate with max_batch = sessions, %lld threads\n",
      static_cast<long long>(*threads), tcfg.batching.max_batch, tcfg.batching.prefill_chunk,
      tcfg.kv_bytes / 1048576.0, static_cast<long long>(*threads));
  r << buf;
  std::snprintf(buf, sizeof buf,
                "- Each session: one turn, a short prompt (%lld to %lld tokens), at most %lld "
                "tokens, temperature 0.8, top-k 40, seed = session index; EOS may end a turn "
                "early (the same on both paths)\n",
                static_cast<long long>(*std::min_element(prompt_len.begin(), prompt_len.end())),
                static_cast<long long>(longest), static_cast<long long>(*max_tokens));
  r << buf;
  std::snprintf(buf, sizeof buf,
                "- Decode tokens/s: the tokens generated after the last session's first token "
                "(every prompt is prefilled by then), over the time from that token to the last "
                "done event (engine: to the return of generate); best of %lld runs, the paths "
                "alternating\n\n",
                static_cast<long long>(*reps));
  r << buf;
  r << "| sessions | engine tokens/s | actor path tokens/s | overhead (target < 5%) | tokens "
       "counted (engine / actor) | tokens generated |\n|---|---|---|---|---|---|\n";
  for (int si = 0; si < n_sizes; ++si) {
    double over = engine_tps[si] > 0 ? 100.0 * (1.0 - actor_tps[si] / engine_tps[si]) : 0.0;
    std::snprintf(buf, sizeof buf, "| %d | %.1f | %.1f | %.1f%% %s | %lld / %lld | %lld |\n",
                  sizes[si], engine_tps[si], actor_tps[si], over, over < 5.0 ? "(met)" : "(missed)",
                  static_cast<long long>(engine_counted[si]),
                  static_cast<long long>(actor_counted[si]), static_cast<long long>(generated[si]));
    r << buf;
  }
  r << "\nActor path tokens equal the engine's: " << (same_tokens ? "yes" : "no")
    << "; stream violations (lost or repeated index): " << violations << "\n\n";

  r << "## Recovery from shard crashes\n\n";
  std::snprintf(buf, sizeof buf,
                "- Node: %lld shards x %d threads, batching.max_batch %d, prefill_chunk %d, KV "
                "budget %.0f MiB; the model is mapped once, restarts map nothing again\n",
                static_cast<long long>(*shards), rec_threads, rcfg.batching.max_batch,
                rcfg.batching.prefill_chunk, rcfg.kv_bytes / 1048576.0);
  r << buf;
  std::snprintf(buf, sizeof buf,
                "- %d sessions, one turn each of at most %lld tokens (sampling as above); a "
                "fault-free run first (%lld tokens, %.1f decode tokens/s), then the same sessions "
                "on a fresh node with %lld crashes: crash_shard(random rank, after 0-7 steps), "
                "wait for the group failure, wait for the next token, repeat\n",
                rec_sessions, static_cast<long long>(long_tokens),
                static_cast<long long>(clean_tokens), clean.decode.tps(),
                static_cast<long long>(*crashes));
  r << buf;
  r << "- Recovery = batcher_stats.recovery_ms: from the batcher seeing the group failure to the "
       "next token it sends. It spans the group restart (one_for_all) and the next step; the "
       "restarted workers adopt their ranks' KV caches, so running sequences are not prefilled "
       "again (a second failure before any progress drops the caches and prefills)\n\n";
  r << "| measure | value |\n|---|---|\n";
  std::snprintf(buf, sizeof buf,
                "| crashes injected | %d of %lld (group failures %llu, shard restarts %d) |\n",
                injected, static_cast<long long>(*crashes),
                static_cast<unsigned long long>(fstats.group_failures), shard_restarts);
  r << buf;
  auto& rec = fstats.recovery_ms;
  std::snprintf(buf, sizeof buf,
                "| recovery p50 | %.1f ms |\n| recovery p99 | %.1f ms (target < 50 ms: %s) |\n"
                "| recovery max | %.1f ms |\n",
                percentile(rec, 0.5), percentile(rec, 0.99),
                rec.empty()                    ? "no sample"
                : percentile(rec, 0.99) < 50.0 ? "met"
                                               : "missed",
                percentile(rec, 1.0));
  r << buf;
  std::snprintf(buf, sizeof buf,
                "| of which group restart (crash to last rank started), p50 / max | %.1f / %.1f "
                "ms |\n",
                percentile(restart_ms, 0.5), percentile(restart_ms, 1.0));
  r << buf;
  double ctx_mean = 0;
  for (double x : context_at_failure) ctx_mean += x;
  if (!context_at_failure.empty()) ctx_mean /= static_cast<double>(context_at_failure.size());
  std::snprintf(buf, sizeof buf,
                "| tokens in the running sessions' caches at a failure, mean | about %.0f |\n"
                "| stream violations (lost or repeated index) | %d |\n\n",
                ctx_mean, faulty.violations);
  r << buf;
  size_t rows = std::min({rec.size(), restart_ms.size(), context_at_failure.size()});
  if (rows > 0) {
    r << "Each crash:\n\n"
         "| crash | tokens in the caches | group restart | recovery |\n"
         "|---|---|---|---|\n";
    for (size_t k = 0; k < rows; ++k) {
      std::snprintf(buf, sizeof buf, "| %zu | %.0f | %.1f ms | %.1f ms |\n", k + 1,
                    context_at_failure[k], restart_ms[k], rec[k]);
      r << buf;
    }
    r << "\n";
  }
  r << "transcripts equal: " << (transcripts_equal ? "yes" : "no") << "\n";
  return publish(r.str(), opts->get("out"));
}

}  // namespace keel::bench
