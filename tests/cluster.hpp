#pragma once

// A cluster of real keel-node processes on 127.0.0.1 for chaos tests. Every node has a fixed
// name, region, client port, peer port and data directory, chosen before any starts (the peers
// list names the other nodes' peer ports), so that a node can be killed with SIGKILL, stopped
// with SIGSTOP or SIGTERM, and started again as the same node. Each node's stderr is kept across
// restarts; when the test case has failed, the destructor writes every node's log to a file under
// the build tree and prints the end of each. Every process is ended and reaped on every path.
//
// Threading: a cluster belongs to the thread that made it, which must outlive its processes
// (process.hpp: PR_SET_PDEATHSIG follows the forking thread). Only `address`, `endpoints` and
// the other const accessors may be called from other threads.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <boost/test/results_collector.hpp>
#include <boost/test/unit_test.hpp>

#include "tests/process.hpp"
#include "tests/test_support.hpp"

namespace keel::test {

/// Whether the Boost.Test case running now has failed so far.
inline bool current_test_failed() {
  auto id = boost::unit_test::framework::current_test_case().p_id;
  return !boost::unit_test::results_collector.results(id).passed();
}

/// The last `n` lines of `text`.
inline std::string last_lines(const std::string& text, size_t n) {
  size_t at = text.size();
  for (size_t i = 0; i < n && at > 0; ++i) {
    auto nl = text.rfind('\n', at - 1);
    if (nl == std::string::npos) return text;
    at = nl;
  }
  return at == text.size() ? std::string() : text.substr(at + 1);
}

/// One node of a cluster: who it is and where it lives.
struct node_spec {
  std::string name;
  std::string region;
};

struct cluster_config {
  std::string model;           // GGUF path
  std::filesystem::path root;  // each node's data directory is root/NAME
  int replicas = 0;            // --replicas; 0 leaves the flag out (keel-node's default)
  int heartbeat_ms = 100;      // --heartbeat-interval
  int down_after_ms = 500;     // --down-after
  std::chrono::milliseconds start_timeout{15000};
  std::string label = "cluster";  // names the log files written on failure
  /// Each node also serves the admin API (keel-shell) on a port of its own, with a key kept in
  /// root/admin.conf; `shell` runs keel-shell against a node.
  bool admin = false;
  /// A directory with scripts/make-certs.sh's files for every node (see `make_certs`): TLS on
  /// every port, each node with its own certificate, the peers named. Empty: plain TCP.
  std::filesystem::path tls;
  /// A model of its own for some nodes, by name (the others serve `model`).
  std::map<std::string, std::string> models;
  /// Each node also serves HTTP (--http-listen on a free port; `http_address`).
  bool http = false;
  /// More flags for every node (e.g. {"--shutdown-timeout", "60000"}).
  std::vector<std::string> extra_args;
};

/// Makes a CA and a certificate per name in `dir` with scripts/make-certs.sh (the operators'
/// tool, so it is tested too).
inline void make_certs(const std::filesystem::path& dir, const std::vector<std::string>& names) {
  std::vector<std::string> argv = {"/bin/bash", std::string(KEEL_SOURCE_DIR) + "/scripts/make-certs.sh",
                                   dir.string()};
  argv.insert(argv.end(), names.begin(), names.end());
  process p(argv);
  auto st = p.wait(std::chrono::seconds(30));
  BOOST_REQUIRE_MESSAGE(st && *st == 0, "make-certs.sh failed: " + p.out() + p.err());
}

/// The nodes of one cluster. With a single node it is a standalone keel-node: no peers, no peer
/// port, no replication flags (the fault-free reference).
class cluster {
 public:
  cluster(cluster_config cfg, std::vector<node_spec> specs) : cfg_(std::move(cfg)) {
    std::filesystem::create_directories(cfg_.root);
    std::set<uint16_t> taken;
    auto port = [&taken] {
      uint16_t p = 0;
      do p = free_port();
      while (!taken.insert(p).second);
      return "127.0.0.1:" + std::to_string(p);
    };
    for (auto& s : specs) {
      member m;
      m.spec = s;
      m.address = port();
      if (specs.size() > 1) m.peer_address = port();
      m.data = cfg_.root / s.name;
      nodes_.push_back(std::move(m));
    }
  }

  ~cluster() {
    // Stopped processes do not act on SIGTERM: continue them first. Then SIGTERM everyone at
    // once, so that the nodes stop in parallel, and reap each (SIGKILL after the grace period).
    for (auto& m : nodes_)
      if (m.proc && m.paused) m.proc->signal(SIGCONT);
    for (auto& m : nodes_)
      if (m.proc) m.proc->signal(SIGTERM);
    for (auto& m : nodes_)
      if (m.proc) retire(m, m.proc->stop(std::chrono::seconds(5)));
    if (current_test_failed()) dump_logs();
  }

  cluster(const cluster&) = delete;
  cluster& operator=(const cluster&) = delete;

  size_t size() const { return nodes_.size(); }
  const std::string& name(size_t i) const { return nodes_.at(i).spec.name; }
  const std::string& region(size_t i) const { return nodes_.at(i).spec.region; }
  /// The client address HOST:PORT.
  const std::string& address(size_t i) const { return nodes_.at(i).address; }
  /// The peer address HOST:PORT ("" for a standalone node).
  const std::string& peer_address(size_t i) const { return nodes_.at(i).peer_address; }
  const std::filesystem::path& data_dir(size_t i) const { return nodes_.at(i).data; }
  /// The HTTP address HOST:PORT of the running node `i` (with cluster_config::http).
  const std::string& http_address(size_t i) const { return nodes_.at(i).http_address; }

  size_t index(const std::string& name) const {
    for (size_t i = 0; i < nodes_.size(); ++i)
      if (nodes_[i].spec.name == name) return i;
    BOOST_FAIL("no node named " + name);
    return 0;
  }

  /// Every node's client address, starting with node `first` and going round from there.
  std::vector<std::string> endpoints(size_t first = 0) const {
    std::vector<std::string> out;
    for (size_t k = 0; k < nodes_.size(); ++k)
      out.push_back(nodes_[(first + k) % nodes_.size()].address);
    return out;
  }

  /// keel-shell -c `commands` against node `i`'s admin endpoint (needs `cluster_config::admin`);
  /// its exit status and what it printed (stdout, then stderr).
  std::pair<int, std::string> shell(size_t i, const std::string& commands) {
    auto& m = running_member(i);
    auto admin = m.admin_address;
    BOOST_REQUIRE_MESSAGE(!admin.empty(), "node " + m.spec.name + " serves no admin API");
    std::vector<std::string> argv = {bin("keel-shell"), "--connect", admin, "--key-file",
                                     admin_key_file().string(), "-c", commands};
    if (!cfg_.tls.empty())
      argv.insert(argv.end(), {"--tls-ca", (cfg_.tls / "ca.crt").string(), "--tls-name", "localhost"});
    process p(argv);
    auto st = p.wait(std::chrono::seconds(20));
    if (!st) p.stop(std::chrono::seconds(1));
    return {st.value_or(-1), p.out() + p.err()};
  }

  /// Starts every node at once and waits until each is listening.
  void start_all() {
    for (size_t i = 0; i < nodes_.size(); ++i) launch(i);
    for (size_t i = 0; i < nodes_.size(); ++i) await_listening(i);
  }

  /// Starts node `i` (again): same name, ports and data directory. Returns once it listens.
  void start(size_t i) {
    launch(i);
    await_listening(i);
  }

  /// SIGKILL, then reaps it.
  void kill(size_t i) { kill({i}); }

  /// SIGKILL to every node of `which` at once (a lost region), then reaps them.
  void kill(std::initializer_list<size_t> which) {
    for (auto i : which) running_member(i).proc->signal(SIGKILL);
    for (auto i : which) {
      auto& m = nodes_.at(i);
      auto st = m.proc->wait(std::chrono::seconds(5));
      BOOST_REQUIRE_MESSAGE(st.has_value(), "node " + m.spec.name + " survived SIGKILL");
      retire(m, *st);
    }
  }

  /// SIGTERM (a clean stop), SIGKILL after `grace`; reaps it and returns its status.
  int terminate(size_t i, std::chrono::milliseconds grace = std::chrono::seconds(10)) {
    auto& m = running_member(i);
    if (m.paused) resume(i);
    int st = m.proc->stop(grace);
    retire(m, st);
    return st;
  }

  /// Sends `sig` to node `i`; `wait_exit` reaps it once it ends.
  void signal(size_t i, int sig) { running_member(i).proc->signal(sig); }

  /// Waits up to `timeout` for node `i` to end by itself, then reaps it: its status, nothing
  /// while it still runs.
  std::optional<int> wait_exit(size_t i, std::chrono::milliseconds timeout) {
    auto& m = running_member(i);
    auto st = m.proc->wait(timeout);
    if (st) retire(m, *st);
    return st;
  }

  /// Waits until the running incarnation of node `i` has logged `text`; false on timeout or
  /// when its output ended first.
  bool wait_log(size_t i, const std::string& text, std::chrono::milliseconds timeout) {
    return running_member(i).proc->wait_err(
        [&](const std::string& s) { return s.find(text) != std::string::npos; }, timeout);
  }

  /// SIGSTOP: the process freezes with its sockets open (connections still complete in the
  /// kernel's backlog, but nothing answers).
  void pause(size_t i) {
    auto& m = running_member(i);
    m.proc->signal(SIGSTOP);
    m.paused = true;
  }

  /// SIGCONT.
  void resume(size_t i) {
    auto& m = running_member(i);
    m.proc->signal(SIGCONT);
    m.paused = false;
  }

  /// Whether node `i` was started and not ended by the cluster since (it may have crashed).
  bool running(size_t i) const { return nodes_.at(i).proc != nullptr; }

  /// Whether node `i` is running and its process has not ended.
  bool alive(size_t i) { return running(i) && !nodes_[i].proc->exited(); }

  /// The nodes whose process ended without the cluster ending it, with their status ("c exited
  /// with status 134 (signal 6) in its start 1; "), or "" when there are none.
  std::string unexpected_exits() {
    std::string out;
    for (auto& m : nodes_) {
      if (!m.proc || !m.proc->exited()) continue;
      int st = m.proc->wait(std::chrono::milliseconds(0)).value_or(-1);
      out += m.spec.name + " exited with status " + std::to_string(st) +
             (st > 128 ? " (signal " + std::to_string(st - 128) + ")" : "") + " in its start " +
             std::to_string(m.starts) + "; ";
    }
    return out;
  }
  bool paused(size_t i) const { return nodes_.at(i).paused; }
  /// How many times node `i` was started.
  int starts(size_t i) const { return nodes_.at(i).starts; }

  /// The stderr of node `i`'s running (or last) incarnation.
  std::string current_log(size_t i) const {
    auto& m = nodes_.at(i);
    return m.proc ? m.proc->err() : m.last_log;
  }

  /// The stderr of every incarnation of node `i`, each after a header line.
  std::string log(size_t i) const {
    auto& m = nodes_.at(i);
    std::string out = m.past_logs;
    if (m.proc) out += header(m, m.starts) + m.proc->err();
    return out;
  }

  /// Every node's `log`.
  std::string logs() const {
    std::string out;
    for (size_t i = 0; i < nodes_.size(); ++i) out += log(i);
    return out;
  }

  /// Waits until the running incarnation of node `i` reports its region link to every other
  /// live, unpaused node up (the link's last status line for that peer ends in "-> up"). False
  /// on timeout or when node `i` has ended; callers treat false as "not known", since the
  /// wording of those lines is the node's business.
  bool wait_links_up(size_t i, std::chrono::milliseconds timeout) {
    auto until = std::chrono::steady_clock::now() + timeout;
    while (true) {
      if (!alive(i)) return false;
      auto err = nodes_[i].proc->err();
      bool all = true;
      for (size_t j = 0; j < nodes_.size() && all; ++j) {
        if (j == i || !alive(j) || paused(j)) continue;
        all = link_up(err, nodes_[j].peer_address);
      }
      if (all) return true;
      if (std::chrono::steady_clock::now() >= until) return false;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }

  /// `wait_links_up` for every running node; false when any timed out.
  bool wait_all_links_up(std::chrono::milliseconds timeout) {
    bool all = true;
    auto until = std::chrono::steady_clock::now() + timeout;
    for (size_t i = 0; i < nodes_.size(); ++i) {
      auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
          until - std::chrono::steady_clock::now());
      if (running(i) && !paused(i))
        all = wait_links_up(i, std::max(left, std::chrono::milliseconds(0))) && all;
    }
    return all;
  }

 private:
  struct member {
    node_spec spec;
    std::string address, peer_address;
    std::filesystem::path data;
    std::unique_ptr<process> proc;
    std::string admin_address;  // with cluster_config::admin, once listening
    std::string http_address;   // with cluster_config::http, once listening
    bool paused = false;
    int starts = 0;
    std::string past_logs;  // the ended incarnations' stderr, with headers
    std::string last_log;   // the last ended incarnation's stderr
  };

  static std::string header(const member& m, int start) {
    return "==== " + m.spec.name + " (region " + m.spec.region + ", client " + m.address +
           ", peer " + m.peer_address + "), start " + std::to_string(start) + " ====\n";
  }

  member& running_member(size_t i) {
    auto& m = nodes_.at(i);
    BOOST_REQUIRE_MESSAGE(m.proc != nullptr, "node " + m.spec.name + " is not running");
    return m;
  }

  std::vector<std::string> argv(size_t i) const {
    auto& m = nodes_[i];
    std::vector<std::string> a = {
        bin("keel-node"), "--name",  m.spec.name, "--listen",  m.address, "--data",
        m.data.string(),  "--model", model_of(m.spec.name),  "--threads", "1"};
    if (!m.spec.region.empty()) a.insert(a.end(), {"--region", m.spec.region});
    if (nodes_.size() > 1) {
      std::string peers;
      for (size_t j = 0; j < nodes_.size(); ++j) {
        if (j == i) continue;
        if (!peers.empty()) peers += ",";
        peers += nodes_[j].spec.name + "=" + nodes_[j].peer_address;
      }
      std::string regions;
      for (size_t j = 0; j < nodes_.size(); ++j) {
        if (j == i || nodes_[j].spec.region.empty()) continue;
        regions += (regions.empty() ? "" : ",") + nodes_[j].spec.name + "=" + nodes_[j].spec.region;
      }
      if (!regions.empty()) a.insert(a.end(), {"--peer-regions", regions});
      a.insert(a.end(), {"--peer-listen", m.peer_address, "--peers", peers, "--heartbeat-interval",
                         std::to_string(cfg_.heartbeat_ms), "--down-after",
                         std::to_string(cfg_.down_after_ms)});
      if (cfg_.replicas > 0) a.insert(a.end(), {"--replicas", std::to_string(cfg_.replicas)});
    }
    if (!cfg_.tls.empty()) {
      a.insert(a.end(), {"--tls-cert", (cfg_.tls / (m.spec.name + ".crt")).string(), "--tls-key",
                         (cfg_.tls / (m.spec.name + ".key")).string(), "--tls-ca",
                         (cfg_.tls / "ca.crt").string()});
    }
    if (cfg_.admin) {
      auto conf = cfg_.root / "admin.conf";
      if (!std::filesystem::exists(conf)) std::ofstream(conf) << "admin-key = chaos-admin-key\n";
      if (!std::filesystem::exists(admin_key_file()))
        std::ofstream(admin_key_file()) << "chaos-admin-key\n";
      a.insert(a.end(), {"--admin-listen", "127.0.0.1:0", "--config", conf.string()});
    }
    if (cfg_.http) a.insert(a.end(), {"--http-listen", "127.0.0.1:0"});
    a.insert(a.end(), cfg_.extra_args.begin(), cfg_.extra_args.end());
    return a;
  }

  std::filesystem::path admin_key_file() const { return cfg_.root / "admin.key"; }

  const std::string& model_of(const std::string& name) const {
    auto i = cfg_.models.find(name);
    return i == cfg_.models.end() ? cfg_.model : i->second;
  }

  void launch(size_t i) {
    auto& m = nodes_.at(i);
    BOOST_REQUIRE_MESSAGE(m.proc == nullptr, "node " + m.spec.name + " is already running");
    m.proc = std::make_unique<process>(argv(i));
    m.paused = false;
    ++m.starts;
  }

  void await_listening(size_t i) {
    auto& m = nodes_.at(i);
    const std::string line = "keel-node: listening on ";
    bool up =
        m.proc->wait_err([&](const std::string& s) { return s.find(line) != std::string::npos; },
                         cfg_.start_timeout);
    if (!up) {
      // Keep the log before the destructor reaps it, so that the failure shows why.
      std::string why = m.proc->exited() ? "it exited" : "timed out";
      BOOST_FAIL("keel-node " + m.spec.name + " did not start (" + why + "):\n" + m.proc->err());
    }
    if (cfg_.http) {
      const std::string tag = "keel-node: http on ";
      m.proc->wait_err([&](const std::string& s) { return s.find(tag) != std::string::npos; },
                       cfg_.start_timeout);
      auto err = m.proc->err();
      auto at = err.find(tag);
      m.http_address = at == std::string::npos
                           ? std::string()
                           : err.substr(at + tag.size(), err.find_first_of(" \n", at + tag.size()) -
                                                             at - tag.size());
    }
    if (cfg_.admin) {
      const std::string tag = "keel-node: admin on ";
      m.proc->wait_err([&](const std::string& s) { return s.find(tag) != std::string::npos; },
                       cfg_.start_timeout);
      auto err = m.proc->err();
      auto at = err.find(tag);
      m.admin_address = at == std::string::npos
                            ? std::string()
                            : err.substr(at + tag.size(), err.find_first_of(" \n", at + tag.size()) -
                                                              at - tag.size());
    }
  }

  void retire(member& m, int status) {
    // The process has ended; its last lines may still be in the pipe.
    m.proc->wait_err([](const std::string&) { return false; }, std::chrono::seconds(2));
    m.last_log = m.proc->err();
    m.past_logs += header(m, m.starts) + m.last_log + "---- " + m.spec.name +
                   " ended with status " + std::to_string(status) + " ----\n";
    m.proc.reset();
    m.paused = false;
  }

  /// Whether the last region link line about `peer` in `err` reports it up.
  static bool link_up(const std::string& err, const std::string& peer) {
    const std::string tag = " -> " + peer + ": ";
    std::istringstream in(err);
    std::string line;
    bool up = false;
    while (std::getline(in, line)) {
      auto at = line.find(tag);
      if (at == std::string::npos || line.find("link ") == std::string::npos) continue;
      auto rest = line.substr(at + tag.size());
      if (rest.rfind("breaker", 0) == 0) continue;
      auto paren = rest.find(" (");
      auto change = rest.substr(0, paren);
      auto arrow = change.rfind("-> ");
      if (arrow == std::string::npos) continue;
      up = change.substr(arrow + 3) == "up";
    }
    return up;
  }

  void dump_logs() const {
    auto dir = std::filesystem::path(KEEL_BINARY_DIR) / "test-logs";
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    for (size_t i = 0; i < nodes_.size(); ++i) {
      auto path = dir / (cfg_.label + "-" + std::to_string(getpid()) + "-" + name(i) + ".log");
      std::ofstream(path) << log(i);
      std::cerr << "---- " << cfg_.label << ": node " << name(i) << " (full log: " << path.string()
                << "), last lines ----\n"
                << last_lines(log(i), 60) << "\n";
    }
  }

  cluster_config cfg_;
  std::vector<member> nodes_;
};

}  // namespace keel::test
