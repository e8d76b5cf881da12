#define BOOST_TEST_MODULE deploy_test
#include <boost/test/unit_test.hpp>

// deploy/: the systemd unit is checked with systemd-analyze verify (when installed) against the
// built keel-node, carries the settings docs/operations.md describes, and agrees with the
// example config file, whose keys keel-node must accept.

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include "tests/process.hpp"
#include "tests/test_support.hpp"

namespace {

using namespace std::chrono_literals;

const std::filesystem::path deploy = std::filesystem::path(KEEL_SOURCE_DIR) / "deploy";
const std::string installed_binary = "/usr/local/bin/keel-node";

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

std::string systemd_analyze() {
  for (auto* p : {"/usr/bin/systemd-analyze", "/bin/systemd-analyze"})
    if (access(p, X_OK) == 0) return p;
  return {};
}

/// Skips a test where systemd-analyze is not installed, saying so.
struct needs_systemd_analyze {
  boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
    if (!systemd_analyze().empty()) return true;
    boost::test_tools::assertion_result r(false);
    r.message() << "skipped: systemd-analyze is not installed (Debian package systemd)";
    return r;
  }
};

/// `KEY=VALUE` settings of a unit file, the last value of each key (comments skipped).
std::map<std::string, std::string> settings(const std::string& text) {
  std::map<std::string, std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#' || line[0] == '[') continue;
    auto eq = line.find('=');
    if (eq != std::string::npos) out[line.substr(0, eq)] = line.substr(eq + 1);
  }
  return out;
}

/// `key = value` lines of a keel-node config file.
std::map<std::string, std::string> config(const std::string& text) {
  std::map<std::string, std::string> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    auto eq = line.find(" = ");
    if (eq != std::string::npos) out[line.substr(0, eq)] = line.substr(eq + 3);
  }
  return out;
}

/// "45s", "2min", "500ms" as milliseconds (the forms the unit uses).
long long unit_ms(const std::string& v) {
  size_t end = 0;
  auto n = std::stoll(v, &end);
  auto unit = v.substr(end);
  if (unit == "ms") return n;
  if (unit == "s" || unit.empty()) return n * 1000;
  if (unit == "min") return n * 60000;
  BOOST_FAIL("unknown time unit in " + v);
  return 0;
}

}  // namespace

BOOST_AUTO_TEST_CASE(the_unit_passes_systemd_analyze_verify,
                     *boost::unit_test::precondition(needs_systemd_analyze{})) {
  // verify checks that ExecStart's binary exists: a copy runs the keel-node of this build instead
  // of the installed path (which this machine need not have).
  auto unit = keel::test::read_file(deploy / "keel-node.service");
  auto at = unit.find("ExecStart=" + installed_binary + " ");
  BOOST_REQUIRE_MESSAGE(at != std::string::npos, "ExecStart does not run " + installed_binary);
  unit.replace(at + 10, installed_binary.size(), keel::test::bin("keel-node"));
  keel::test::temp_dir dir("deploy_test");
  auto copy = dir.path / "keel-node.service";
  std::ofstream(copy) << unit;

  auto r = keel::test::run({systemd_analyze(), "verify", copy.string()}, "", 60s);
  BOOST_TEST_MESSAGE("systemd-analyze verify: status " << r.status << "\n" << r.out << r.err);
  BOOST_TEST(r.status == 0, r.out + r.err);
  // verify exits 0 on unknown keys and bad values too: it only warns, naming the file.
  BOOST_TEST(!contains(r.out + r.err, "keel-node.service"), r.out + r.err);
}

BOOST_AUTO_TEST_CASE(the_unit_is_a_hardened_notify_service_that_waits_for_the_drain) {
  auto s = settings(keel::test::read_file(deploy / "keel-node.service"));
  BOOST_TEST(s["Type"] == "notify");
  BOOST_TEST(s["NotifyAccess"] == "main");
  BOOST_TEST(!s["WatchdogSec"].empty());
  BOOST_TEST(s["KillSignal"] == "SIGTERM");
  BOOST_TEST(s["Restart"] == "on-failure");
  BOOST_TEST(s["User"] == "keel");
  BOOST_TEST(contains(s["ExecStart"], "--config /etc/keel/keel-node.conf"), s["ExecStart"]);
  for (auto [key, value] : std::initializer_list<std::pair<const char*, const char*>>{
           {"NoNewPrivileges", "yes"},
           {"ProtectSystem", "strict"},
           {"ProtectHome", "yes"},
           {"PrivateTmp", "yes"},
           {"PrivateDevices", "yes"},
           {"CapabilityBoundingSet", ""},
           {"RestrictAddressFamilies", "AF_INET AF_INET6 AF_UNIX"},
           {"SystemCallFilter", "@system-service"},
           {"ReadWritePaths", "/var/lib/keel"}})
    BOOST_TEST((s.count(key) == 1 && s[key] == value), key << "=" << s[key]);
  BOOST_TEST(!s["LimitNOFILE"].empty());

  // systemd waits longer than keel-node's own bound before SIGKILL, so that a drain that takes
  // the whole --shutdown-timeout still ends in a clean stop.
  auto c = config(keel::test::read_file(deploy / "keel-node.conf"));
  BOOST_REQUIRE(c.count("shutdown-timeout") == 1);
  auto stop = unit_ms(s["TimeoutStopSec"]);
  auto shutdown = std::stoll(c["shutdown-timeout"]);
  BOOST_TEST(stop > shutdown, "TimeoutStopSec " << stop << " ms, --shutdown-timeout " << shutdown);
  // The data directory of the config is one the unit lets the node write.
  BOOST_TEST(c["data"].rfind(s["ReadWritePaths"] + "/", 0) == 0u, c["data"]);
  // A watchdog ping every WatchdogSec/2 needs a period keel-node can keep while busy.
  BOOST_TEST(unit_ms(s["WatchdogSec"]) >= 10000);
}

BOOST_AUTO_TEST_CASE(the_example_config_has_only_keel_node_options) {
  // keel-node reads the whole file before anything else; with every key known it goes on to
  // what this machine lacks (the key file, the certificates), never to the file's own lines.
  auto r = keel::test::run(
      {keel::test::bin("keel-node"), "--config", (deploy / "keel-node.conf").string()});
  BOOST_TEST(r.status == 2, r.err);
  BOOST_TEST(!contains(r.err, "keel-node.conf:"), r.err);
  BOOST_TEST(!contains(r.err, "unknown"), r.err);
}
