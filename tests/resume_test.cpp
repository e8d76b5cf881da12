#define BOOST_TEST_MODULE resume_test
#include <boost/test/unit_test.hpp>

// Client resume across a node's death: `keel generate --connect` streams from a keel-node that
// is killed with SIGKILL mid-reply and restarted on the same address and data directory; the
// client reconnects, resumes the turn from the first index it lacks, and prints exactly what a
// fault-free run prints. Real processes on 127.0.0.1, every one ended and reaped on every path.

#include <memory>
#include <sstream>

#include "tests/process.hpp"
#include "tests/test_support.hpp"

namespace {

using namespace std::chrono_literals;
using keel::test::process;
using keel::test::run;
using keel::test::run_result;

using keel::test::bin;

std::vector<int32_t> gen_ids(const std::string& out) {
  std::vector<int32_t> ids;
  auto at = out.find("gen:");
  if (at == std::string::npos) return ids;
  std::istringstream in(out.substr(at + 4));
  int32_t id;
  while (in >> id) ids.push_back(id);
  return ids;
}

using keel::test::free_port;

/// keel-node on `address` with `--data dir`, up once it printed its "listening on" line.
std::unique_ptr<process> start_node(const std::string& model, const std::string& address,
                                    const std::string& dir) {
  auto p = std::make_unique<process>(std::vector<std::string>{
      bin("keel-node"), "--listen", address, "--model", model, "--threads", "1", "--data", dir});
  bool up = p->wait_err(
      [&](const std::string& s) { return s.find("keel-node: listening on ") != std::string::npos; },
      15s);
  BOOST_REQUIRE_MESSAGE(up, "keel-node did not start: " + p->err());
  return p;
}

}  // namespace

BOOST_AUTO_TEST_CASE(generate_resumes_across_a_node_killed_and_restarted_on_its_data) {
  keel::test::temp_dir dir{"resume_test-" + std::to_string(getpid())};
  auto model = (dir.path / "slow.gguf").string();
  // About 3 ms per token on one thread: a 1000-token reply streams for a few seconds.
  auto synth = run({bin("keel-model"), "synth", "-o", model, "--dim", "512", "--layers", "6",
                    "--heads", "8", "--kv-heads", "4", "--ffn", "1536", "--ctx", "2048"});
  BOOST_REQUIRE_MESSAGE(synth.status == 0, synth.err);

  // The synthetic model's EOS comes at random: pick a seed whose reply runs long.
  const std::vector<std::string> common = {"--prompt", "Hello there",   "--ids", "--max-tokens",
                                           "1000",     "--temperature", "1"};
  std::string seed, reference;
  for (int s = 2; s <= 12 && seed.empty(); ++s) {
    std::vector<std::string> argv = {bin("keel"), "generate", "--model", model,
                                     "--threads", "1",        "--seed",  std::to_string(s)};
    argv.insert(argv.end(), common.begin(), common.end());
    auto r = run(argv);
    BOOST_REQUIRE_MESSAGE(r.status == 0, r.err);
    if (gen_ids(r.out).size() >= 600) seed = std::to_string(s), reference = r.out;
  }
  BOOST_REQUIRE_MESSAGE(!seed.empty(), "no long reply among the seeds");

  auto address = "127.0.0.1:" + std::to_string(free_port());
  auto data = (dir.path / "data").string();
  auto node = start_node(model, address, data);

  std::vector<std::string> argv = {bin("keel"), "generate", "--connect", address,
                                   "--verbose", "--seed",   seed};
  argv.insert(argv.end(), common.begin(), common.end());
  process client(argv);
  bool streaming =
      client.wait_out([](const std::string& s) { return gen_ids(s).size() >= 30; }, 15s);
  BOOST_REQUIRE_MESSAGE(streaming, "no tokens: " + client.err());
  node->signal(SIGKILL);
  BOOST_REQUIRE(node->wait(5s).value_or(-1) == 128 + SIGKILL);
  auto seen = gen_ids(client.out()).size();
  BOOST_TEST_MESSAGE("node killed after the client printed " << seen << " tokens");
  BOOST_TEST(!client.exited());  // killed mid-stream, not after
  BOOST_TEST(seen < gen_ids(reference).size());

  node = start_node(model, address, data);
  auto status = client.wait(20s);
  BOOST_REQUIRE_MESSAGE(status.has_value(), "the client did not finish: " + client.err());
  client.wait_out([](const std::string&) { return false; }, 2s);  // until the output has ended
  BOOST_TEST(*status == 0, client.err());
  BOOST_TEST(client.out() == reference);
  BOOST_TEST(gen_ids(client.out()) == gen_ids(reference));
  BOOST_TEST(client.err().find("failover of session") != std::string::npos, client.err());
  BOOST_TEST_MESSAGE(client.err());
}
