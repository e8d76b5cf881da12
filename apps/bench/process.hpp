#pragma once

// Child processes for keel-bench's cluster benchmarks: a process started with fork/exec, its
// stderr read by a thread, always ended and reaped; the group that ends them all when keel-bench
// is interrupted; and a cluster of keel-node processes on loopback, optionally serving the admin
// API, with keel-shell to inject faults through it.

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

namespace keel::bench {

/// The running children of one benchmark, and a thread that ends them on SIGINT or SIGTERM.
///
/// Construct it on the main thread before any other thread starts: it blocks SIGINT and SIGTERM
/// there, so that every later thread inherits the mask and only its own thread receives them
/// (sigtimedwait). On a signal it SIGKILLs every child still registered, waits until each has
/// died, calls `cleanup` (e.g. removes data directories) and ends the program with 128 + the
/// signal's number. The destructor stops the thread and restores the signal mask.
class process_group {
 public:
  explicit process_group(std::function<void()> cleanup);
  ~process_group();
  process_group(const process_group&) = delete;
  process_group& operator=(const process_group&) = delete;

  /// Called by `process`: a pid is registered from its start until just before it is reaped,
  /// so the group never signals a pid that the system may have reused.
  void add(pid_t pid);
  void remove(pid_t pid);

 private:
  void watch();

  std::function<void()> cleanup_;
  std::mutex mu_;  // guards pids_
  std::set<pid_t> pids_;
  std::atomic<bool> stopping_{false};
  std::thread watcher_;
};

/// One child process: stdin on /dev/null, stdout on /dev/null or with stderr, stderr kept in
/// memory (the first 16 MiB).
/// The destructor SIGKILLs it when it still runs, reaps it and joins its reader, so no path of
/// a benchmark leaves it behind.
///
/// Threading: start, wait for, kill, stop and destroy it on one long-lived thread (the main
/// thread): PR_SET_PDEATHSIG, which kills the child when keel-bench dies without cleaning up,
/// follows the thread that forked. `err`, `wait_err` and `wait_line` may be called from any thread.
class process {
 public:
  /// Starts `argv[0]` (a path) with `argv`. `group`, when not null, must outlive the process.
  /// With `keep_stdout`, stdout goes where stderr goes (`err()` holds both, interleaved).
  /// `failed` naming the call when a pipe or fork fails; an exec failure shows as exit 127.
  static caf::expected<std::unique_ptr<process>> start(std::vector<std::string> argv,
                                                       process_group* group,
                                                       bool keep_stdout = false);

  ~process();
  process(const process&) = delete;
  process& operator=(const process&) = delete;

  pid_t pid() const { return pid_; }

  /// stderr so far.
  std::string err() const;

  /// Waits until `pred(stderr so far)` holds; false when the time runs out or stderr ends first.
  bool wait_err(const std::function<bool(const std::string&)>& pred,
                std::chrono::milliseconds timeout) const;

  /// The rest of the first complete stderr line that starts with `prefix`, waited for up to
  /// `timeout`. `failed`, naming the program and quoting its stderr, when it ends first or the
  /// time runs out.
  caf::expected<std::string> wait_line(const std::string& prefix,
                                       std::chrono::milliseconds timeout) const;

  /// Whether it still runs; "exit N" or "signal N" when it has ended (then it is reaped).
  std::string state();

  /// Waits up to `timeout` for it to end on its own, and reaps it. How it ended, as `stop` says
  /// it, or "running" when the time ran out.
  std::string wait(std::chrono::milliseconds timeout);

  /// SIGKILL, then reaps. How it ended, as `stop` says it.
  std::string kill();

  /// SIGTERM, then SIGKILL when it has not ended after `grace`; reaps. How it ended: "exit N"
  /// or "signal N".
  std::string stop(std::chrono::milliseconds grace);

 private:
  process() = default;
  bool reap(bool block);
  void drain(int fd);
  std::string how_it_ended() const;

  pid_t pid_ = -1;
  std::string program_;
  process_group* group_ = nullptr;
  int status_ = 0;
  bool reaped_ = false;
  std::thread reader_;
  mutable std::mutex mu_;  // guards err_ and eof_
  mutable std::condition_variable cv_;
  std::string err_;
  bool eof_ = false;
};

/// `n` distinct free TCP ports of 127.0.0.1: bound to port 0 together, then released. Another
/// program may take one before a node binds it; that node then fails to start, saying so.
caf::expected<std::vector<uint16_t>> free_ports(int n);

/// What every node of a cluster shares.
struct node_flags {
  std::string exe;  // keel-node's path
  std::string model;
  int64_t threads = 1;
  int64_t heartbeat = 100;   // --heartbeat-interval, ms
  int64_t down_after = 500;  // --down-after, ms
  // The admin API, for members added with an admin address: a config file holding the line
  // "admin-key = KEY" (--config), and for `cluster::admin` keel-shell's path and a file whose
  // first line is KEY. Empty: no node serves it.
  std::string admin_config, admin_key_file, shell;
  /// More flags for every node (e.g. {"--kv-bytes", "8M"}).
  std::vector<std::string> extra;
};

/// keel-node processes on 127.0.0.1. A node keeps its addresses and data directory, so a killed
/// node restarts as itself. The nodes are `process`es: start, kill and restart them from the
/// main thread. The destructor kills the nodes still running.
class cluster {
 public:
  struct member {
    std::string name, region, listen, peer_listen, data;  // peer_listen, data: empty for none
    std::string admin_listen;                             // empty for none
    std::unique_ptr<process> proc;                        // null while not running
  };

  /// `group` must outlive the cluster.
  cluster(node_flags flags, process_group& group) : flags_(std::move(flags)), group_(group) {}

  /// Adds a node ("HOST:PORT" addresses); its --peers are the peer addresses of the other nodes
  /// that have one. With `admin_listen` it also serves the admin API there (with the key of
  /// node_flags::admin_config).
  void add(std::string name, std::string region, std::string listen, std::string peer_listen,
           std::string data, std::string admin_listen = {});

  size_t size() const { return members_.size(); }
  const member& at(size_t i) const { return members_[i]; }

  /// The node listening on `endpoint`; size() when none is.
  size_t find(const std::string& endpoint) const;

  /// Node i's command line, the program by its name.
  std::string command(size_t i) const;

  /// Starts node i and waits for its "listening on" line (and its "admin on" line when it
  /// serves the admin API; `failed` when it says the admin API is disabled).
  caf::error start(size_t i);

  /// One run of keel-shell: what it printed (stdout and stderr), and the steady_clock times
  /// just before it was started and once it had ended.
  struct admin_run {
    std::string output;
    std::chrono::steady_clock::time_point started, returned;
  };

  /// Runs `keel-shell -c commands` against node i's admin endpoint and waits for it. `failed`,
  /// naming the commands and quoting the output, when keel-shell fails (non-zero exit) or runs
  /// longer than `timeout` (then it is killed); `bad_request` when node i serves no admin API.
  caf::expected<admin_run> admin(size_t i, const std::string& commands,
                                 std::chrono::milliseconds timeout);

  /// How often node j has logged its region link to node i going up.
  size_t ups(size_t j, size_t i) const;

  /// ups(j, i) of every node j, with the process it counts in.
  struct link_ups {
    std::vector<pid_t> pids;  // -1 for a node not running
    std::vector<size_t> ups;
  };
  link_ups ups_to(size_t i) const;

  /// Waits until node i's links to the other running nodes are up, and theirs to node i have
  /// gone up since `before` (ups_to(i) taken before node i started; a node restarted since then
  /// counts from zero, and so does every node by default). `failed` naming the links still
  /// down after `timeout`.
  caf::error wait_joined(size_t i, const link_ups& before, std::chrono::milliseconds timeout);

  /// ups(j, i) of every pair of nodes, [j][i], with the processes they count in.
  struct link_counts {
    std::vector<pid_t> pids;  // -1 for a node not running
    std::vector<std::vector<size_t>> ups;
  };
  link_counts all_ups() const;

  /// After a partition of node i that has ended: waits until every link between node i and
  /// the other running nodes, both ways, has gone up again since `before` (all_ups() taken
  /// before the cut; a link of a node restarted since counts from zero). `failed` naming the
  /// links still down after `timeout`.
  caf::error wait_relinked(size_t i, const link_counts& before, std::chrono::milliseconds timeout);

  /// The last lines (about 3000 bytes) of node i's stderr; empty when it is not running.
  std::string log_tail(size_t i) const;

  /// `failed` naming every node that should run but has ended, with the tail of its stderr.
  caf::error check() const;

  /// The nodes that should run but have ended: each node's index, and how it ended ("signal 6")
  /// followed by the last lines of its stderr. They count as not running afterwards (start()
  /// restarts them).
  std::vector<std::pair<size_t, std::string>> take_ended();

  /// SIGKILLs node i and reaps it; the time just before the signal.
  std::chrono::steady_clock::time_point kill(size_t i);

  /// SIGTERM to every running node (SIGKILL after 10 s); how each ended, e.g. "a exit 0".
  std::string stop();

 private:
  std::vector<std::string> argv(size_t i) const;

  node_flags flags_;
  process_group& group_;
  std::vector<member> members_;
};

}  // namespace keel::bench
