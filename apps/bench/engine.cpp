// keel-bench engine: prefill and decode tokens/s of the CPU engine, and the decode roofline.

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

constexpr option engine_spec[] = {
    {"model", "FILE", "model to measure (required)"},
    {"threads", "N", "CPU threads (default: all cores)"},
    {"steps", "N", "decode steps per batch size (default 32)"},
    {"prompt", "N", "prefill length in tokens (default 256)"},
    {"out", "FILE", "also write the report (Markdown) to FILE, e.g. bench/engine.md"},
};

}  // namespace

int engine_command(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-bench engine --model FILE [--threads N] [--out bench/engine.md]",
        "Measures prefill tokens/s, decode tokens/s at batch 1, 4 and 16, the machine's memory "
        "bandwidth, and the decode roofline ratio (weight bytes read per token x tokens/s / "
        "bandwidth).",
        engine_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, engine_spec);
  if (!opts) return fail(opts.error());
  if (!opts->has("model"))
    return fail(keel::make_error(keel::errc::bad_request, "engine: --model FILE is required"));
  auto threads =
      opts->get_int("threads", std::max(1u, std::thread::hardware_concurrency()), 1, 1024);
  if (!threads) return fail(threads.error());
  auto steps = opts->get_int("steps", 32, 1, 100000);
  if (!steps) return fail(steps.error());
  auto prompt_len = opts->get_int("prompt", 256, 1, 1 << 20);
  if (!prompt_len) return fail(prompt_len.error());

  std::cerr << "keel-bench: loading " << opts->get("model") << "\n";
  auto m = keel::model::load(opts->get("model"));
  if (!m) return fail(m.error());
  const auto& model = **m;
  const auto& c = model.config();
  keel::thread_pool pool(static_cast<int>(*threads));
  keel::engine eng(model, pool);
  const int32_t batches[] = {1, 4, 16};
  int64_t plen = std::min<int64_t>(*prompt_len, c.ctx_len - *steps - 2);
  if (plen < 1)
    return fail(keel::make_error(keel::errc::bad_request,
                                 "engine: the context is too short for the prompt and steps"));
  auto layout = keel::kv_layout_for(model);
  auto per_seq = keel::pages_for(layout, plen + *steps + 1);
  keel::kv_pool kv(layout,
                   static_cast<uint64_t>(per_seq * 17) * keel::kv_pool(layout, 0).page_bytes());

  const uint64_t weight_bytes = model.weight_bytes_per_token();
  std::cerr << "keel-bench: measuring memory bandwidth\n";
  double bw = keel::measure_memory_bandwidth(pool, std::max<uint64_t>(weight_bytes, 1ull << 30));

  // Prefill: one sequence, the whole prompt in chunks of 64 tokens; best of two runs.
  std::cerr << "keel-bench: prefill of " << plen << " tokens\n";
  double prefill_tps = 0;
  for (int rep = 0; rep < 2; ++rep) {
    keel::kv_sequence seq(kv);
    auto toks = bench_tokens(static_cast<int32_t>(plen), c.vocab_size, 1);
    auto t0 = clock_type::now();
    for (int64_t done = 0; done < plen; done += 64) {
      keel::seq_step st{&seq, toks.data() + done,
                        static_cast<int32_t>(std::min<int64_t>(64, plen - done)), nullptr};
      if (auto err = eng.forward({&st, 1})) return fail(err);
    }
    prefill_tps = std::max(prefill_tps, plen / seconds_since(t0));
  }

  // Decode: b sequences with a short context, then `steps` batched decode steps, timed alone.
  double decode_tps[3] = {};
  std::vector<float> logits;
  for (int bi = 0; bi < 3; ++bi) {
    int32_t b = batches[bi];
    std::cerr << "keel-bench: decode at batch " << b << "\n";
    std::vector<keel::kv_sequence> seqs;
    for (int32_t i = 0; i < b; ++i) seqs.emplace_back(kv);
    logits.assign(static_cast<size_t>(b) * c.vocab_size, 0.0f);
    std::vector<keel::seq_step> st(b);
    std::vector<std::vector<int32_t>> toks(b);
    for (int32_t i = 0; i < b; ++i) {
      toks[i] = bench_tokens(16 + static_cast<int32_t>(*steps), c.vocab_size, 100 + i);
      keel::seq_step s{&seqs[i], toks[i].data(), 16, nullptr};
      if (auto err = eng.forward({&s, 1})) return fail(err);
    }
    auto t0 = clock_type::now();
    for (int64_t k = 0; k < *steps; ++k) {
      for (int32_t i = 0; i < b; ++i)
        st[i] = {&seqs[i], toks[i].data() + 16 + k, 1,
                 logits.data() + static_cast<size_t>(i) * c.vocab_size};
      if (auto err = eng.forward(st)) return fail(err);
    }
    decode_tps[bi] = static_cast<double>(b) * *steps / seconds_since(t0);
  }
  double roofline = weight_bytes * decode_tps[0] / bw;

  std::ostringstream r;
  char buf[512];
  r << "# Engine benchmark\n\n";
  r << "Command: `keel-bench engine --model " << opts->get("model") << " --threads " << *threads
    << "`\n\n";
  r << "## Machine\n\n";
  r << "- CPU: " << cpu_model() << ", " << std::thread::hardware_concurrency()
    << " hardware threads, kernels: " << keel::to_string(keel::active_isa()) << "\n";
  r << "- Memory: " << mem_total() << "\n";
  std::snprintf(buf, sizeof buf, "- Measured read bandwidth (%lld threads): %.2f GB/s\n\n",
                static_cast<long long>(*threads), bw / 1e9);
  r << buf;
  r << "## Model\n\n";
  std::snprintf(buf, sizeof buf,
                "- %s (%s): dim %d, %d layers, %d heads (kv %d), ffn %d, vocab %d, weights %s\n"
                "- Weight bytes read per decoded token: %.1f MB\n\n",
                model.path().c_str(), model.format().c_str(), c.dim, c.n_layers, c.n_heads,
                c.n_kv_heads, c.ffn_dim, c.vocab_size,
                std::string(keel::dtype_name(model.weight_type())).c_str(), weight_bytes / 1e6);
  r << buf;
  r << "## Results\n\n| measure | value |\n|---|---|\n";
  std::snprintf(buf, sizeof buf, "| prefill (%lld tokens, chunks of 64) | %.1f tokens/s |\n",
                static_cast<long long>(plen), prefill_tps);
  r << buf;
  for (int bi = 0; bi < 3; ++bi) {
    std::snprintf(buf, sizeof buf, "| decode, batch %d | %.1f tokens/s (%.2fx batch 1) |\n",
                  batches[bi], decode_tps[bi], decode_tps[bi] / decode_tps[0]);
    r << buf;
  }
  std::snprintf(buf, sizeof buf,
                "| decode roofline ratio, batch 1 | %.2f (target >= 0.80) |\n"
                "| batch 16 / batch 1 | %.2fx (target >= 6x) |\n",
                roofline, decode_tps[2] / decode_tps[0]);
  r << buf;
  return publish(r.str(), opts->get("out"));
}

}  // namespace keel::bench
