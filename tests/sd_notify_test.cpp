#define BOOST_TEST_MODULE sd_notify_test
#include <boost/test/unit_test.hpp>

// systemd's notification protocol without libsystemd (apps/sd_notify.hpp): datagrams read from a
// socket bound here, as systemd's would be; the watchdog actor on a real actor system; and a real
// keel-node run the way systemd runs a Type=notify unit ($NOTIFY_SOCKET, $WATCHDOG_USEC).

#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/send.hpp>

#include "apps/sd_notify.hpp"
#include "tests/process.hpp"
#include "tests/test_support.hpp"

namespace {

using namespace std::chrono_literals;

/// A datagram socket bound where systemd's notification socket would be: a file in a fresh
/// directory, or an abstract name ("@...").
struct notify_socket {
  keel::test::temp_dir dir{"sd_notify_test"};
  int fd = -1;
  std::string address;  // as $NOTIFY_SOCKET names it

  explicit notify_socket(bool abstract) {
    fd = ::socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    BOOST_REQUIRE(fd >= 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    socklen_t len;
    if (abstract) {
      address = "@keel-sd-notify-test-" + std::to_string(getpid()) + "-" + std::to_string(fd);
      std::memcpy(sa.sun_path, address.data(), address.size());
      sa.sun_path[0] = '\0';
      len = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + address.size());
    } else {
      // A short path: sun_path holds 107 characters, and the build tree may be deep.
      address = "/tmp/keel-sd-" + std::to_string(getpid()) + "-" + std::to_string(fd);
      ::unlink(address.c_str());
      std::memcpy(sa.sun_path, address.c_str(), address.size() + 1);
      len = sizeof sa;
    }
    BOOST_REQUIRE_MESSAGE(::bind(fd, reinterpret_cast<sockaddr*>(&sa), len) == 0,
                          "bind " << address << ": " << std::strerror(errno));
  }
  ~notify_socket() {
    ::close(fd);
    if (address[0] == '/') ::unlink(address.c_str());
  }

  /// The next datagram, or nullopt after `timeout` without one.
  std::optional<std::string> next(std::chrono::milliseconds timeout) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, static_cast<int>(timeout.count())) <= 0) return std::nullopt;
    char buf[4096];
    auto n = ::recv(fd, buf, sizeof buf, 0);
    if (n < 0) return std::nullopt;
    return std::string(buf, static_cast<size_t>(n));
  }

  /// Datagrams until one that starts with `prefix` (returned), all of them kept in `seen`;
  /// nullopt when none came within `timeout`.
  std::optional<std::string> until(const std::string& prefix, std::chrono::milliseconds timeout,
                                   std::string& seen) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return std::nullopt;
      auto d = next(left);
      if (!d) return std::nullopt;
      seen += "[" + *d + "] ";
      if (d->rfind(prefix, 0) == 0) return d;
    }
  }
};

/// Sets an environment variable for the life of the object (the test's children inherit it).
struct scoped_env {
  std::string name;
  scoped_env(std::string n, const std::string& value) : name(std::move(n)) {
    ::setenv(name.c_str(), value.c_str(), 1);
  }
  ~scoped_env() { ::unsetenv(name.c_str()); }
};

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

}  // namespace

BOOST_AUTO_TEST_CASE(each_notification_is_one_datagram_on_a_socket_file) {
  notify_socket sock(false);
  auto n = keel::sd::notifier::open(sock.address);
  BOOST_REQUIRE_MESSAGE(n, keel::test::why(n));
  BOOST_REQUIRE(!n->notify("READY=1\nSTATUS=serving clients on 127.0.0.1:7100"));
  BOOST_REQUIRE(!n->notify("STOPPING=1"));
  BOOST_TEST(sock.next(5s).value_or("none") == "READY=1\nSTATUS=serving clients on 127.0.0.1:7100");
  BOOST_TEST(sock.next(5s).value_or("none") == "STOPPING=1");
}

BOOST_AUTO_TEST_CASE(an_address_starting_with_at_is_an_abstract_socket) {
  notify_socket sock(true);
  auto n = keel::sd::notifier::open(sock.address);
  BOOST_REQUIRE_MESSAGE(n, keel::test::why(n));
  BOOST_REQUIRE(!n->notify("WATCHDOG=1"));
  BOOST_TEST(sock.next(5s).value_or("none") == "WATCHDOG=1");
}

BOOST_AUTO_TEST_CASE(the_environment_names_the_socket_and_a_bad_value_is_an_error_naming_it) {
  ::unsetenv("NOTIFY_SOCKET");
  auto none = keel::sd::notifier::from_environment();
  BOOST_REQUIRE_MESSAGE(none, keel::test::why(none));
  BOOST_TEST(!none->has_value());

  notify_socket sock(true);
  {
    scoped_env env("NOTIFY_SOCKET", sock.address);
    auto n = keel::sd::notifier::from_environment();
    BOOST_REQUIRE_MESSAGE(n, keel::test::why(n));
    BOOST_REQUIRE(n->has_value());
    BOOST_REQUIRE(!(*n)->notify("READY=1"));
    BOOST_TEST(sock.next(5s).value_or("none") == "READY=1");
  }
  {
    scoped_env env("NOTIFY_SOCKET", "vsock:2:1234");
    auto bad = keel::sd::notifier::from_environment();
    BOOST_REQUIRE(!bad);
    BOOST_TEST(keel::code_of(bad.error()) == keel::errc::bad_request);
    BOOST_TEST(contains(keel::message_of(bad.error()), "NOTIFY_SOCKET=vsock:2:1234"),
               keel::describe(bad.error()));
  }
  // A socket nobody listens on: the send fails, naming it (keel-node logs it and goes on).
  auto gone = keel::sd::notifier::open("/tmp/keel-sd-nobody-" + std::to_string(getpid()));
  BOOST_REQUIRE(gone);
  auto err = gone->notify("READY=1");
  BOOST_TEST(keel::code_of(err) == keel::errc::disconnected);
  BOOST_TEST(contains(keel::message_of(err), "cannot send 'READY=1'"), keel::describe(err));
}

BOOST_AUTO_TEST_CASE(the_watchdog_period_is_half_of_watchdog_usec_and_only_for_this_process) {
  auto half = keel::sd::watchdog_period("30000000", nullptr, 42);
  BOOST_REQUIRE(half);
  BOOST_TEST(half->value_or(0us).count() == 15000000);
  auto mine = keel::sd::watchdog_period("1000", "42", 42);
  BOOST_REQUIRE(mine);
  BOOST_TEST(mine->value_or(0us).count() == 500);
  // Another process's watchdog, or none.
  auto other = keel::sd::watchdog_period("1000", "43", 42);
  BOOST_REQUIRE(other);
  BOOST_TEST(!other->has_value());
  auto off = keel::sd::watchdog_period(nullptr, nullptr, 42);
  BOOST_REQUIRE(off);
  BOOST_TEST(!off->has_value());
  for (auto [usec, pid, names] :
       {std::tuple{"ten", "", "WATCHDOG_USEC=ten"}, std::tuple{"0", "", "WATCHDOG_USEC=0"},
        std::tuple{"1000", "-1", "WATCHDOG_PID=-1"}}) {
    auto bad = keel::sd::watchdog_period(usec, pid, 42);
    BOOST_REQUIRE(!bad);
    BOOST_TEST(contains(keel::message_of(bad.error()), names), keel::describe(bad.error()));
  }
}

BOOST_AUTO_TEST_CASE(the_watchdog_pings_while_the_node_is_healthy_and_stops_when_it_is_not) {
  notify_socket sock(false);
  auto n = keel::sd::notifier::open(sock.address);
  BOOST_REQUIRE_MESSAGE(n, keel::test::why(n));
  auto shared = std::make_shared<const keel::sd::notifier>(std::move(*n));
  std::mutex mu;
  std::string why_not;  // what the node's not_ready() answers
  caf::actor_system_config cfg;
  caf::actor_system sys{cfg};
  auto dog = keel::sd::spawn_watchdog(sys, shared, 20ms, [&] {
    std::lock_guard<std::mutex> g(mu);
    return why_not;
  });
  std::string seen;
  BOOST_TEST(sock.until("WATCHDOG=1", 5s, seen).has_value(), seen);
  BOOST_TEST(sock.until("WATCHDOG=1", 5s, seen).has_value(), seen);

  {
    std::lock_guard<std::mutex> g(mu);
    why_not = "its root supervisor exited (escalated)";
  }
  auto status = sock.until("STATUS=", 5s, seen);
  BOOST_REQUIRE_MESSAGE(status, seen);
  BOOST_TEST(
      *status == "STATUS=not ready: its root supervisor exited (escalated); watchdog pings stopped",
      seen);
  // After the status, nothing: ten periods without a ping (a late one would come before it).
  auto after = sock.next(200ms);
  BOOST_TEST(!after.has_value(),
             "a datagram after the node went unhealthy: " << after.value_or(""));

  {
    std::lock_guard<std::mutex> g(mu);
    why_not.clear();
  }
  BOOST_TEST(sock.next(5s).value_or("none") == "STATUS=serving again");
  BOOST_TEST(sock.next(5s).value_or("none") == "WATCHDOG=1");
  caf::anon_send_exit(dog, caf::exit_reason::kill);
}

BOOST_AUTO_TEST_CASE(a_keel_node_reports_ready_pings_and_reports_stopping_on_sigterm) {
  keel::test::temp_dir dir("sd_notify_test-node");
  auto model = keel::test::write_model(dir.path / "tiny.gguf", keel::test::tiny_model());
  notify_socket sock(true);
  std::unique_ptr<keel::test::process> node;
  {
    // systemd sets these for a Type=notify unit with WatchdogSec=200ms (children inherit them).
    scoped_env socket_env("NOTIFY_SOCKET", sock.address);
    scoped_env usec("WATCHDOG_USEC", "200000");
    node = std::make_unique<keel::test::process>(
        std::vector<std::string>{keel::test::bin("keel-node"), "--listen", "127.0.0.1:0", "--model",
                                 model, "--threads", "1"});
  }
  std::string seen;
  auto ready = sock.until("READY=1", 30s, seen);
  BOOST_REQUIRE_MESSAGE(ready, "no READY=1: " << seen << "\n" << node->err());
  // READY comes once the client port serves: its line was logged before (the pipe from the
  // node may deliver it a little later).
  auto logged = [&](const std::string& line) {
    return node->wait_err([&](const std::string& s) { return contains(s, line); }, 10s);
  };
  BOOST_TEST(logged("keel-node: listening on 127.0.0.1:"), node->err());
  BOOST_TEST(contains(*ready, "\nSTATUS=serving clients on 127.0.0.1:"), *ready);
  BOOST_TEST(logged("keel-node: systemd: notifying " + sock.address +
                    ", watchdog ping every 100 ms"),
             node->err());
  BOOST_TEST(sock.until("WATCHDOG=1", 10s, seen).has_value(), seen);

  node->signal(SIGTERM);
  auto stopping = sock.until("STOPPING=1", 10s, seen);
  BOOST_REQUIRE_MESSAGE(stopping, "no STOPPING=1: " << seen << "\n" << node->err());
  BOOST_TEST(contains(*stopping, "STATUS=draining"), *stopping);
  auto st = node->wait(30s);
  BOOST_REQUIRE_MESSAGE(st.has_value(), "keel-node still runs 30 s after SIGTERM: " << node->err());
  BOOST_TEST(*st == 0, node->err());
  node->wait_err([](const std::string&) { return false; }, 5s);  // the output ended
  // Alone, it has no one to hand sessions to: it says so and stops.
  BOOST_TEST(contains(node->err(), "keel-node: drain: no peers (--peers), so no session can move"),
             node->err());
  BOOST_TEST(contains(node->err(), "keel-node: stopped\n"), node->err());
}

BOOST_AUTO_TEST_CASE(a_keel_node_whose_supervisors_gave_up_stops_its_watchdog_pings) {
  keel::test::temp_dir dir("sd_notify_test-wedged");
  auto model = keel::test::write_model(dir.path / "tiny.gguf", keel::test::tiny_model());
  auto key_file = keel::test::secret_file("sd-notify-test-admin-key");
  notify_socket sock(false);
  std::unique_ptr<keel::test::process> node;
  {
    scoped_env socket_env("NOTIFY_SOCKET", sock.address);
    scoped_env usec("WATCHDOG_USEC", "200000");
    node = std::make_unique<keel::test::process>(std::vector<std::string>{
        keel::test::bin("keel-node"), "--listen", "127.0.0.1:0", "--model", model, "--threads",
        "1", "--admin-listen", "127.0.0.1:0", "--admin-key-file", key_file});
  }
  std::string seen;
  BOOST_REQUIRE_MESSAGE(sock.until("READY=1", 30s, seen), seen << "\n" << node->err());
  BOOST_REQUIRE(sock.until("WATCHDOG=1", 10s, seen));
  auto err = node->err();
  const std::string tag = "keel-node: admin on ";
  auto at = err.find(tag) + tag.size();
  auto admin = err.substr(at, err.find_first_of(" \n", at) - at);

  // More failures of the engine within 10 s than the root's intensity (5), so it gives up. A
  // kill that reaches the engine between two restarts kills nothing (on a loaded machine one
  // in six did), so the engine is killed until the node says it gave up.
  std::optional<std::string> status;
  for (int i = 0; i < 30 && !status; ++i) {
    auto shell = keel::test::run({keel::test::bin("keel-shell"), "--connect", admin, "--key-file",
                                  key_file, "-c", "kill node/engine"});
    BOOST_TEST_MESSAGE("keel-shell: " << shell.out << shell.err);
    status = sock.until("STATUS=not ready", 200ms, seen);
  }
  BOOST_REQUIRE_MESSAGE(status, seen << "\n" << node->err());
  BOOST_TEST(contains(*status, "its root supervisor exited"), *status);
  BOOST_TEST(contains(*status, "watchdog pings stopped"), *status);
  // Five times the period without a ping: systemd (WatchdogSec) would restart it now.
  auto after = sock.next(500ms);
  BOOST_TEST(!after.has_value(), "a datagram after the node gave up: " << after.value_or(""));
  BOOST_TEST(node->wait_err([](const std::string& s) { return contains(s, "node not ready"); }, 10s),
             node->err());
}
