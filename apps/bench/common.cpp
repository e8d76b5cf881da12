#include "apps/bench/common.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iostream>

namespace keel::bench {

int fail(const caf::error& err) {
  return keel::cli::fail("keel-bench", err);
}

double seconds_since(clock_type::time_point t0) {
  return std::chrono::duration<double>(clock_type::now() - t0).count();
}

std::string cpu_model() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    if (line.rfind("model name", 0) == 0) {
      auto p = line.find(':');
      return p == std::string::npos ? line : line.substr(p + 2);
    }
  }
  return "unknown CPU";
}

std::string mem_total() {
  std::ifstream f("/proc/meminfo");
  std::string key, unit;
  uint64_t kb = 0;
  f >> key >> kb >> unit;
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f GiB", kb / 1048576.0);
  return buf;
}

std::vector<int32_t> bench_tokens(int32_t n, int32_t vocab, uint64_t salt) {
  std::vector<int32_t> out(n);
  uint64_t x = 0x2545f4914f6cdd1dull ^ salt;
  for (auto& t : out) {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    t = 3 + static_cast<int32_t>(x % static_cast<uint64_t>(vocab - 3));
  }
  return out;
}

const char* const bench_prompts[] = {"Once upon a time",
                                     "The quick brown fox",
                                     "hello",
                                     "In the beginning",
                                     "1 2 3",
                                     "Keel keeps conversations alive",
                                     "zzz",
                                     "a b c d e f"};

keel::sampling_params bench_params(uint64_t seed) {
  keel::sampling_params p;
  p.temperature = 0.8f;
  p.top_k = 40;
  p.seed = seed;
  return p;
}

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  auto k = static_cast<size_t>(std::ceil(p * static_cast<double>(v.size())));
  return v[std::clamp<size_t>(k, 1, v.size()) - 1];
}

int publish(const std::string& report, const std::string& out) {
  std::cout << report;
  if (out.empty()) return 0;
  std::ofstream f(out);
  f << report;
  if (!f) return fail(keel::make_error(keel::errc::failed, out + ": cannot write the report"));
  std::cerr << "keel-bench: wrote " << out << "\n";
  return 0;
}

}  // namespace keel::bench
