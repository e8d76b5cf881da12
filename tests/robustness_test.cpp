// A node under hostile load (issue #11): its listeners never die.

#define BOOST_TEST_MODULE robustness
#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <thread>
#include <vector>

#include "tests/process.hpp"
#include "tests/test_support.hpp"
#include "wire/client.hpp"

using namespace std::chrono_literals;

namespace {

struct model_file {
  keel::test::temp_dir dir{"robustness_test-" + std::to_string(getpid())};
  std::string path = (dir.path / "model.gguf").string();
  model_file() {
    keel::synth_options o;
    o.dim = 64;
    o.layers = 1;
    o.heads = 4;
    o.kv_heads = 2;
    o.ffn = 128;
    keel::test::write_model(path, o);
  }
};

/// A raw TCP connection to 127.0.0.1:`port` that says nothing (-1 when it cannot connect).
int idle_connection(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

BOOST_AUTO_TEST_CASE(the_client_port_accepts_again_after_running_out_of_file_descriptors) {
  // Issue #11: ~1,050 idle connections under `ulimit -n 1024` made accept fail once, and the
  // client port stayed closed for good. Here the node may open 128 files (a hard limit it cannot
  // raise) and 300 idle connections arrive: accept fails, then, once they are gone, a real
  // client is served again.
  model_file m;
  auto port = keel::test::free_port();
  keel::test::process node({"/bin/sh", "-c",
                            "ulimit -S -n 128 && ulimit -H -n 128 && exec " +
                                keel::test::bin("keel-node") + " --listen 127.0.0.1:" +
                                std::to_string(port) + " --model " + m.path + " --threads 1"});
  BOOST_REQUIRE_MESSAGE(
      node.wait_err([](const std::string& s) { return s.find("listening on") != std::string::npos; },
                    15s),
      "keel-node did not start: " << node.err());
  BOOST_TEST(node.err().find("open files: limit 128") != std::string::npos, node.err());

  std::vector<int> fds;
  for (int i = 0; i < 300; ++i) {
    int fd = idle_connection(port);
    if (fd >= 0) fds.push_back(fd);
  }
  BOOST_TEST_MESSAGE(fds.size() << " idle connections opened");
  bool failed = node.wait_err(
      [](const std::string& s) { return s.find("gateway: accept failed") != std::string::npos; },
      10s);
  BOOST_TEST(failed, "accept never failed: the test did not exhaust the node's descriptors:\n"
                         << node.err());
  for (int fd : fds) close(fd);

  // Served again within a few backoff periods (at most 1 s each).
  keel::wire::client::options co;
  co.connect_timeout = 1000ms;
  co.call_timeout = 5000ms;
  caf::expected<std::string> opened = keel::make_error(keel::errc::disconnected, "not tried");
  auto until = std::chrono::steady_clock::now() + 15s;
  while (std::chrono::steady_clock::now() < until) {
    auto c = keel::wire::client::connect({"127.0.0.1:" + std::to_string(port)}, co);
    if (c) {
      opened = (*c)->open_session({});
      if (opened) break;
    }
    std::this_thread::sleep_for(200ms);
  }
  BOOST_TEST(static_cast<bool>(opened), "the client port never served again: "
                                            << keel::test::why(opened) << "\n"
                                            << node.err());
  BOOST_TEST(node.err().find("gateway: accepting again") != std::string::npos, node.err());
  node.signal(SIGTERM);
  BOOST_TEST(node.stop(10s) == 0);
}
