// keel-bench: benchmarks that report (never assert). `engine` measures the CPU engine; `batch`
// measures the actor path (node, batcher, sessions) against it, and recovery from shard crashes;
// `serve` measures clients over the wire (keel-node, Cap'n Proto) against the same node in process;
// `failover` kills the node serving a client in a real cluster and measures the client's recovery.

#include "apps/bench/common.hpp"

namespace keel::bench {
int failover_command(std::span<char*> args);  // apps/bench/failover.cpp
}  // namespace keel::bench

namespace {

const char* top_help =
    "usage: keel-bench COMMAND [OPTIONS]\n\n"
    "Keel's benchmarks. They report figures; they never fail on a target.\n\n"
    "commands:\n"
    "  engine --model FILE [--threads N]   prefill and decode tokens/s, decode roofline\n"
    "  batch --model FILE [--shards N]     actor path vs engine decode tokens/s at 1-64\n"
    "                                      sessions; recovery time after shard crashes\n"
    "  serve [--connect HOST:PORT] --model FILE [--clients N]\n"
    "                                      clients over the wire: time to first token,\n"
    "                                      inter-token latency, tokens/s, against the same\n"
    "                                      node in process\n"
    "  failover --model FILE [--kills N] [--partitions N]\n"
    "                                      3-node cluster: kill or partition the serving node\n"
    "                                      mid-reply, time to the client's next token; cost of\n"
    "                                      majority acknowledgements in tokens/s and latency\n"
    "  cascade --model FILE [--policy off|on|both]\n"
    "                                      3-node cluster: load stepped to 2x capacity, a node\n"
    "                                      killed at the peak; goodput, TTFT and shedding per\n"
    "                                      priority, peak KV per node\n\n"
    "Run 'keel-bench COMMAND --help' for a command's options.\n";

}  // namespace

int main(int argc, char** argv) {
  constexpr keel::cli::command commands[] = {{"engine", keel::bench::engine_command},
                                             {"batch", keel::bench::batch_command},
                                             {"serve", keel::bench::serve_command},
                                             {"failover", keel::bench::failover_command},
                                             {"cascade", keel::bench::cascade_command}};
  return keel::cli::dispatch(argc, argv, "keel-bench", top_help, commands);
}
