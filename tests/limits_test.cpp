// Bounded resources on the client port (issue #11): connections per address, and answers queued
// for a client that does not read them. Real keel-node processes; the attacker is a raw socket.

#define BOOST_TEST_MODULE limits
#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <capnp/message.h>
#include <capnp/rpc.capnp.h>
#include <capnp/serialize.h>

#include "tests/process.hpp"
#include "tests/test_support.hpp"
#include "wire/client.hpp"
#include "wire/keel.capnp.h"

using namespace std::chrono_literals;

namespace {

struct model_file {
  keel::test::temp_dir dir{"limits_test-" + std::to_string(getpid())};
  std::string path = (dir.path / "model.gguf").string();
  model_file() {
    keel::test::write_model(path, keel::test::tiny_model());
  }
};

/// A keel-node on loopback with `extra` flags, listening; `address` is its client port.
struct node {
  keel::test::process proc;
  std::string address;
  uint16_t port = 0;

  node(const std::string& model, std::vector<std::string> extra)
      : proc([&] {
          std::vector<std::string> a = {keel::test::bin("keel-node"), "--listen", "127.0.0.1:0",
                                        "--model", model, "--threads", "1"};
          a.insert(a.end(), extra.begin(), extra.end());
          return a;
        }()) {
    const std::string tag = "listening on ";
    BOOST_REQUIRE_MESSAGE(
        proc.wait_err([&](const std::string& s) { return s.find(tag) != std::string::npos; }, 15s),
        "keel-node did not start: " << proc.err());
    auto err = proc.err();
    auto at = err.find(tag) + tag.size();
    address = err.substr(at, err.find('\n', at) - at);
    port = static_cast<uint16_t>(std::stoi(address.substr(address.rfind(':') + 1)));
  }
  ~node() {
    proc.signal(SIGTERM);
    proc.stop(10s);
  }
};

/// A raw TCP connection to 127.0.0.1:`port` (-1 when it cannot connect).
int raw_connection(uint16_t port) {
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

/// Whether the node closed `fd` within `limit` (reads what it sent until the end).
bool closed_by_peer(int fd, std::chrono::milliseconds limit) {
  auto until = std::chrono::steady_clock::now() + limit;
  char buf[65536];
  while (std::chrono::steady_clock::now() < until) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, 100) <= 0) continue;
    auto n = read(fd, buf, sizeof buf);
    if (n <= 0) return true;
  }
  return false;
}

/// Writes one Cap'n Proto RPC message to `fd`.
void send_rpc(int fd, capnp::MallocMessageBuilder& m) {
  capnp::writeMessageToFd(fd, m);
}

}  // namespace

BOOST_AUTO_TEST_CASE(connections_from_one_address_are_bounded_and_the_port_serves_after) {
  model_file m;
  node n(m.path, {"--max-connections-per-address", "4"});
  std::vector<int> fds;
  for (int i = 0; i < 4; ++i) {
    fds.push_back(raw_connection(n.port));
    BOOST_REQUIRE(fds.back() >= 0);
  }
  // The fifth is closed at once, and the node says why.
  int fifth = raw_connection(n.port);
  BOOST_REQUIRE(fifth >= 0);
  BOOST_TEST(closed_by_peer(fifth, 5s));
  close(fifth);
  BOOST_TEST(n.proc.wait_err(
                 [](const std::string& s) {
                   return s.find("gateway: refused a connection from 127.0.0.1: 4 are open from "
                                 "it, the limit is 4") != std::string::npos;
                 },
                 5s),
             n.proc.err());
  // The four held ones are still open; once one goes, a real client is served.
  for (int fd : fds) BOOST_TEST(!closed_by_peer(fd, 100ms));
  close(fds.back());
  fds.pop_back();
  keel::wire::client::options co;
  co.connect_timeout = 2000ms;
  caf::expected<std::unique_ptr<keel::wire::client>> c =
      keel::make_error(keel::errc::disconnected, "not tried");
  for (int tries = 0; tries < 20 && !c; ++tries) {
    c = keel::wire::client::connect({n.address}, co);
    if (!c) std::this_thread::sleep_for(100ms);
  }
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(c), keel::test::why(c));
  BOOST_TEST(static_cast<bool>((*c)->open_session({})));
  for (int fd : fds) close(fd);
}

BOOST_AUTO_TEST_CASE(a_client_that_does_not_read_its_answers_is_cut_off) {
  // Issue #11: 300 unread `listSessions` took a node from 77 MB to 1.1 GB. Answers queued for a
  // connection are bounded (--max-unread); past the bound the connection is closed, and nobody
  // else notices.
  model_file m;
  node n(m.path, {"--max-unread", "256K"});
  auto c = keel::wire::client::connect({n.address});
  BOOST_REQUIRE(static_cast<bool>(c));
  for (int i = 0; i < 200; ++i) BOOST_REQUIRE(static_cast<bool>((*c)->open_session({})));

  int fd = raw_connection(n.port);
  BOOST_REQUIRE(fd >= 0);
  {
    capnp::MallocMessageBuilder msg;
    msg.initRoot<capnp::rpc::Message>().initBootstrap().setQuestionId(0);
    send_rpc(fd, msg);
  }
  // listSessions, pipelined on the bootstrap, 2,000 times, and never a byte read.
  for (uint32_t q = 1; q <= 2000; ++q) {
    capnp::MallocMessageBuilder msg;
    auto call = msg.initRoot<capnp::rpc::Message>().initCall();
    call.setQuestionId(q);
    call.initTarget().initPromisedAnswer().setQuestionId(0);
    call.setInterfaceId(capnp::typeId<keel::wire::Gateway>());
    call.setMethodId(3);  // listSessions
    call.initParams().getContent().initAs<keel::wire::Gateway::ListSessionsParams>();
    try {
      send_rpc(fd, msg);
    } catch (const kj::Exception&) {
      break;  // the node closed it already
    }
  }
  BOOST_TEST(n.proc.wait_err(
                 [](const std::string& s) {
                   return s.find("closed a connection that does not read its answers") !=
                          std::string::npos;
                 },
                 20s),
             n.proc.err());
  BOOST_TEST(closed_by_peer(fd, 10s));
  close(fd);
  // The other client goes on.
  auto list = (*c)->sessions();
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(list), keel::test::why(list));
  BOOST_TEST(list->size() == 200u);
}

BOOST_AUTO_TEST_CASE(a_message_begun_and_never_finished_ends_its_connection_an_idle_one_stays) {
  // Issue #11: a truncated frame held a connection forever. A message begun and left unfinished
  // for --frame-timeout is closed; a connection idle between messages is not.
  model_file m;
  node n(m.path, {"--frame-timeout", "500"});
  int idle = raw_connection(n.port);
  int header_only = raw_connection(n.port);
  int half_body = raw_connection(n.port);
  BOOST_REQUIRE((idle >= 0 && header_only >= 0 && half_body >= 0));
  // Two segments announced, the header cut after its first word.
  const uint32_t first[2] = {1, 4};
  BOOST_REQUIRE(write(header_only, first, sizeof first) == sizeof first);
  // One segment of 64 words announced in a whole header, and 100 of its 512 bytes sent.
  const uint32_t header[2] = {0, 64};
  std::vector<char> some(100, 0);
  BOOST_REQUIRE(write(half_body, header, sizeof header) == sizeof header);
  BOOST_REQUIRE(write(half_body, some.data(), some.size()) == static_cast<ssize_t>(some.size()));
  BOOST_TEST(closed_by_peer(header_only, 5s));
  BOOST_TEST(closed_by_peer(half_body, 5s));
  BOOST_TEST(n.proc.wait_err(
                 [](const std::string& s) {
                   return s.find("message stayed unfinished for 500 ms") != std::string::npos;
                 },
                 5s),
             n.proc.err());
  BOOST_TEST(!closed_by_peer(idle, 1500ms));
  // The idle one is a real connection still: a whole bootstrap message is answered.
  {
    capnp::MallocMessageBuilder msg;
    msg.initRoot<capnp::rpc::Message>().initBootstrap().setQuestionId(0);
    send_rpc(idle, msg);
  }
  pollfd p{idle, POLLIN, 0};
  BOOST_TEST(poll(&p, 1, 5000) == 1);
  char buf[256];
  BOOST_TEST(read(idle, buf, sizeof buf) > 0);
  for (int fd : {idle, header_only, half_body}) close(fd);
}
