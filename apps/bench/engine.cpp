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
    {"model", "FILE[,FILE...]", "models to measure side by side in one run (required)"},
    {"threads", "N", "CPU threads (default: all cores)"},
    {"steps", "N", "decode steps per batch size (default 32)"},
    {"prompt", "N", "prefill length in tokens (default 256)"},
    {"out", "FILE", "also write the report (Markdown) to FILE, e.g. bench/engine.md"},
};

constexpr int32_t batches[] = {1, 4, 16};

struct measured {
  std::string path, format, summary, types;
  uint64_t weight_bytes = 0;
  double macs_per_token = 0;  // multiply-adds of the matrix products per token
  bool integer = false;       // the attention and feed-forward matrices use the integer kernels
  int64_t prefill_len = 0;
  double prefill_tps = 0;
  double decode_tps[3] = {};
};

std::vector<std::string> split_commas(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream in(s);
  for (std::string item; std::getline(in, item, ',');)
    if (!item.empty()) out.push_back(item);
  return out;
}

// "q4_k x 150, q6_k x 30" over the matrices a decode step reads.
std::string type_mix(const keel::model& m) {
  std::map<std::string, int> count;
  auto add = [&](const keel::matrix_view& v) { ++count[std::string(keel::dtype_name(v.type))]; };
  for (auto& l : m.layers())
    for (auto* v : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down}) add(*v);
  add(m.output());
  std::string out;
  for (auto& [name, n] : count) {
    if (!out.empty()) out += ", ";
    out += name;
    out += " x ";
    out += std::to_string(n);
  }
  return out;
}

caf::expected<measured> measure_model(const std::string& path, keel::thread_pool& pool,
                                      int64_t steps, int64_t prompt_len) {
  std::cerr << "keel-bench: loading " << path << "\n";
  auto m = keel::model::load(path);
  if (!m) return std::move(m.error());
  const auto& model = **m;
  const auto& c = model.config();
  keel::engine eng(model, pool);
  measured out;
  out.path = path;
  out.format = model.format();
  out.types = type_mix(model);
  out.weight_bytes = model.weight_bytes_per_token();
  out.integer = keel::is_block_quantized(model.weight_type());
  double macs = static_cast<double>(model.output().rows) * model.output().cols;
  for (auto& l : model.layers())
    for (auto* v : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down})
      macs += static_cast<double>(v->rows) * v->cols;
  out.macs_per_token = macs;
  char buf[256];
  std::snprintf(buf, sizeof buf, "dim %d, %d layers, %d heads (kv %d), ffn %d, vocab %d", c.dim,
                c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim, c.vocab_size);
  out.summary = buf;

  int64_t plen = std::min<int64_t>(prompt_len, c.ctx_len - steps - 2);
  if (plen < 1)
    return keel::make_error(keel::errc::bad_request,
                            "engine: the context of " + path + " is too short for the prompt and steps");
  out.prefill_len = plen;
  auto layout = keel::kv_layout_for(model);
  auto per_seq = keel::pages_for(layout, plen + steps + 1);
  keel::kv_pool kv(layout,
                   static_cast<uint64_t>(per_seq * 17) * keel::kv_pool(layout, 0).page_bytes());

  // Prefill: one sequence, the whole prompt in chunks of 64 tokens; best of two runs.
  std::cerr << "keel-bench: prefill of " << plen << " tokens\n";
  for (int rep = 0; rep < 2; ++rep) {
    keel::kv_sequence seq(kv);
    auto toks = bench_tokens(static_cast<int32_t>(plen), c.vocab_size, 1);
    auto t0 = clock_type::now();
    for (int64_t done = 0; done < plen; done += 64) {
      keel::seq_step st{&seq, toks.data() + done,
                        static_cast<int32_t>(std::min<int64_t>(64, plen - done)), nullptr};
      if (auto err = eng.forward({&st, 1})) return err;
    }
    out.prefill_tps = std::max(out.prefill_tps, plen / seconds_since(t0));
  }

  // Decode: b sequences with a short context, then `steps` batched decode steps, timed alone.
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
      toks[i] = bench_tokens(16 + static_cast<int32_t>(steps), c.vocab_size, 100 + i);
      keel::seq_step s{&seqs[i], toks[i].data(), 16, nullptr};
      if (auto err = eng.forward({&s, 1})) return err;
    }
    auto t0 = clock_type::now();
    for (int64_t k = 0; k < steps; ++k) {
      for (int32_t i = 0; i < b; ++i)
        st[i] = {&seqs[i], toks[i].data() + 16 + k, 1,
                 logits.data() + static_cast<size_t>(i) * c.vocab_size};
      if (auto err = eng.forward(st)) return err;
    }
    out.decode_tps[bi] = static_cast<double>(b) * steps / seconds_since(t0);
  }
  return out;
}

std::string isa_features() {
  __builtin_cpu_init();
  std::string out;
  auto add = [&](bool has, const char* name) {
    if (!has) return;
    if (!out.empty()) out += ' ';
    out += name;
  };
  add(__builtin_cpu_supports("avx2"), "avx2");
  add(__builtin_cpu_supports("fma"), "fma");
  add(__builtin_cpu_supports("f16c"), "f16c");
  add(__builtin_cpu_supports("avx512f"), "avx512f");
  add(__builtin_cpu_supports("avx512bw"), "avx512bw");
  add(__builtin_cpu_supports("avx512vl"), "avx512vl");
  add(__builtin_cpu_supports("avx512dq"), "avx512dq");
  add(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
  add(__builtin_cpu_supports("avxvnni"), "avxvnni");
  return out.empty() ? "none of the ones Keel uses" : out;
}

}  // namespace

int engine_command(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-bench engine --model FILE[,FILE...] [--threads N] [--out bench/engine.md]",
        "Measures, for each model in one run: prefill tokens/s and the fraction of the machine's "
        "peak multiply-adds it reaches, decode tokens/s at batch 1, 4 and 16, and the decode "
        "roofline ratio (weight bytes read per token x tokens/s / measured memory bandwidth). "
        "The report names the CPU's instruction sets and the kernels in use.",
        engine_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, engine_spec);
  if (!opts) return fail(opts.error());
  const auto paths = split_commas(opts->get("model"));
  if (paths.empty())
    return fail(keel::make_error(keel::errc::bad_request, "engine: --model FILE is required"));
  auto threads =
      opts->get_int("threads", std::max(1u, std::thread::hardware_concurrency()), 1, 1024);
  if (!threads) return fail(threads.error());
  auto steps = opts->get_int("steps", 32, 1, 100000);
  if (!steps) return fail(steps.error());
  auto prompt_len = opts->get_int("prompt", 256, 1, 1 << 20);
  if (!prompt_len) return fail(prompt_len.error());

  keel::thread_pool pool(static_cast<int>(*threads));
  std::cerr << "keel-bench: measuring memory bandwidth and peak arithmetic\n";
  // A buffer far larger than the last-level cache (this VM reports 508 MiB of L3): 2 GiB, or
  // the largest model file if that is larger.
  uint64_t largest = 0;
  for (auto& path : paths) {
    std::error_code ec;
    largest = std::max<uint64_t>(largest, std::filesystem::file_size(path, ec));
  }
  const double bw = keel::measure_memory_bandwidth(pool, std::max<uint64_t>(largest, 2ull << 30));
  const double peak_fma = keel::measure_peak_macs(pool, false);
  const double peak_int = keel::measure_peak_macs(pool, true);
  std::vector<measured> results;
  for (auto& path : paths) {
    auto r = measure_model(path, pool, *steps, *prompt_len);
    if (!r) return fail(r.error());
    results.push_back(std::move(*r));
  }

  std::ostringstream r;
  char buf[512];
  r << "# Engine benchmark\n\n";
  r << "Command: `keel-bench engine --model " << opts->get("model") << " --threads " << *threads
    << " --steps " << *steps << "`\n\n";
  r << "## Machine\n\n";
  r << "- CPU: " << cpu_model() << ", " << std::thread::hardware_concurrency()
    << " hardware threads\n";
  r << "- Instruction sets: " << isa_features() << "\n";
  r << "- Kernels in use: float " << keel::to_string(keel::active_isa()) << ", integer "
    << keel::to_string(keel::active_qdot()) << "\n";
  r << "- Memory: " << mem_total() << "\n";
  std::snprintf(buf, sizeof buf,
                "- Measured with %lld threads: read bandwidth %.2f GB/s; peak F32 multiply-adds "
                "%.1f G/s; peak byte multiply-adds (integer kernels' instruction) %.1f G/s\n\n",
                static_cast<long long>(*threads), bw / 1e9, peak_fma / 1e9, peak_int / 1e9);
  r << buf;
  r << "## Models\n\n";
  for (size_t i = 0; i < results.size(); ++i) {
    const auto& m = results[i];
    std::snprintf(buf, sizeof buf, "%zu. %s (%s): %s; matrices %s; %.1f MB of weights per token\n",
                  i + 1, m.path.c_str(), m.format.c_str(), m.summary.c_str(), m.types.c_str(),
                  m.weight_bytes / 1e6);
    r << buf;
  }
  r << "\n## Results\n\n| measure |";
  for (size_t i = 0; i < results.size(); ++i) r << " model " << i + 1 << " |";
  r << "\n|---|";
  for (size_t i = 0; i < results.size(); ++i) r << "---|";
  r << "\n";
  auto row = [&](const std::string& name, auto cell) {
    r << "| " << name << " |";
    for (const auto& m : results) r << " " << cell(m) << " |";
    r << "\n";
  };
  auto fmt = [&](const char* f, double v) {
    std::snprintf(buf, sizeof buf, f, v);
    return std::string(buf);
  };
  row("prefill tokens/s (chunks of 64)", [&](const measured& m) {
    return fmt("%.1f", m.prefill_tps);
  });
  row("prefill, fraction of peak multiply-adds", [&](const measured& m) {
    const double peak = m.integer ? peak_int : peak_fma;
    return fmt("%.2f", m.prefill_tps * m.macs_per_token / peak) + (m.integer ? " (int)" : " (f32)");
  });
  for (int bi = 0; bi < 3; ++bi)
    row("decode tokens/s, batch " + std::to_string(batches[bi]),
        [&](const measured& m) { return fmt("%.1f", m.decode_tps[bi]); });
  row("decode batch 1, fraction of the bandwidth bound (target >= 0.85)",
      [&](const measured& m) { return fmt("%.2f", m.weight_bytes * m.decode_tps[0] / bw); });
  row("batch 16 / batch 1 (target >= 6x)",
      [&](const measured& m) { return fmt("%.2fx", m.decode_tps[2] / m.decode_tps[0]); });
  return publish(r.str(), opts->get("out"));
}

}  // namespace keel::bench
