#pragma once

// Helpers shared by keel-bench's commands (apps/bench/*.cpp).

#include <chrono>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <caf/error.hpp>

#include "apps/cli.hpp"
#include "kernels/sampler.hpp"

namespace keel::bench {

using keel::cli::option;
using clock_type = std::chrono::steady_clock;

/// Reports `err` as keel-bench's and returns the exit status.
int fail(const caf::error& err);

double seconds_since(clock_type::time_point t0);

/// "Intel(R) Xeon(R) ..." from /proc/cpuinfo.
std::string cpu_model();

/// Total memory from /proc/meminfo, e.g. "23.5 GiB".
std::string mem_total();

/// Deterministic token ids for benchmark prompts (skips the first few ids, usually specials).
std::vector<int32_t> bench_tokens(int32_t n, int32_t vocab, uint64_t salt);

/// Short prompts the session benchmarks send.
extern const char* const bench_prompts[];
constexpr int n_prompts = 8;

/// Seeded sampling, one seed per session: the same for the engine, the clean and the faulty run.
keel::sampling_params bench_params(uint64_t seed);

/// The nearest-rank percentile `p` (0 < p <= 1) of `v`; 0 when `v` is empty.
double percentile(std::vector<double> v, double p);

/// Prints the report and, when `out` is not empty, writes it there too; the exit status.
int publish(const std::string& report, const std::string& out);

// The commands.
int engine_command(std::span<char*> args);
int batch_command(std::span<char*> args);
int serve_command(std::span<char*> args);
int cascade_command(std::span<char*> args);  // apps/bench/cascade.cpp

}  // namespace keel::bench
