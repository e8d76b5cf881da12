#include "apps/bench/process.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <sstream>

#include "base/error.hpp"

namespace keel::bench {

namespace {

constexpr size_t max_kept = 16u << 20;

/// The last lines of a log, about 3000 bytes.
std::string tail(const std::string& log) {
  if (log.size() <= 3000) return log;
  auto nl = log.find('\n', log.size() - 3000);
  return "...\n" + log.substr(nl == std::string::npos ? log.size() - 3000 : nl + 1);
}

sigset_t stop_signals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

}  // namespace

process_group::process_group(std::function<void()> cleanup) : cleanup_(std::move(cleanup)) {
  auto set = stop_signals();
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  watcher_ = std::thread([this] { watch(); });
}

process_group::~process_group() {
  stopping_ = true;
  watcher_.join();
  auto set = stop_signals();
  pthread_sigmask(SIG_UNBLOCK, &set, nullptr);
}

void process_group::add(pid_t pid) {
  std::lock_guard<std::mutex> guard(mu_);
  pids_.insert(pid);
}

void process_group::remove(pid_t pid) {
  std::lock_guard<std::mutex> guard(mu_);
  pids_.erase(pid);
}

void process_group::watch() {
  auto set = stop_signals();
  const timespec tick{0, 100 * 1000 * 1000};
  while (!stopping_) {
    int sig = sigtimedwait(&set, nullptr, &tick);
    if (sig < 0) continue;  // the tick (EAGAIN) or EINTR
    std::cerr << "keel-bench: " << strsignal(sig) << ", ending the child processes\n";
    {
      // Held until exit: `remove` then blocks, so no registered pid is reaped (and reused)
      // before it is signalled.
      std::lock_guard<std::mutex> guard(mu_);
      for (auto pid : pids_) ::kill(pid, SIGKILL);
      for (auto pid : pids_) {
        siginfo_t info;
        // Waits for death without reaping; ECHILD when the owner reaped it already.
        while (waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOWAIT) < 0 &&
               errno == EINTR) {
        }
      }
      if (cleanup_) cleanup_();
    }
    std::_Exit(128 + sig);
  }
}

caf::expected<std::unique_ptr<process>> process::start(std::vector<std::string> argv,
                                                       process_group* group, bool keep_stdout) {
  if (argv.empty()) return keel::make_error(keel::errc::bad_request, "process: no program");
  int err[2];
  if (pipe2(err, O_CLOEXEC) != 0)
    return keel::make_error(keel::errc::failed, std::string("pipe2: ") + std::strerror(errno));
  int devnull = open("/dev/null", O_RDWR | O_CLOEXEC);
  std::vector<char*> args;
  for (auto& a : argv) args.push_back(a.data());
  args.push_back(nullptr);
  sigset_t none;
  sigemptyset(&none);
  std::unique_ptr<process> p(new process);
  p->program_ = argv[0].substr(argv[0].rfind('/') + 1);
  p->group_ = group;
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) {
    close(err[0]);
    close(err[1]);
    if (devnull >= 0) close(devnull);
    return keel::make_error(keel::errc::failed, std::string("fork: ") + std::strerror(errno));
  }
  if (pid == 0) {
    // Only async-signal-safe calls until exec: keel-bench has threads. The child must not keep
    // keel-bench's blocked SIGINT and SIGTERM (exec keeps the mask).
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    if (devnull >= 0) dup2(devnull, 0);
    if (keep_stdout)
      dup2(err[1], 1);
    else if (devnull >= 0)
      dup2(devnull, 1);
    dup2(err[1], 2);
    execv(args[0], args.data());
    _exit(127);
  }
  if (devnull >= 0) close(devnull);
  close(err[1]);
  p->pid_ = pid;
  if (group) group->add(pid);
  p->reader_ = std::thread([raw = p.get(), fd = err[0]] { raw->drain(fd); });
  return p;
}

process::~process() {
  if (!reaped_) {
    ::kill(pid_, SIGKILL);
    reap(true);
  }
  if (reader_.joinable()) reader_.join();
}

std::string process::err() const {
  std::lock_guard<std::mutex> guard(mu_);
  return err_;
}

bool process::wait_err(const std::function<bool(const std::string&)>& pred,
                       std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (!pred(err_)) {
    if (eof_) return false;
    if (cv_.wait_until(lock, deadline) == std::cv_status::timeout) return pred(err_);
  }
  return true;
}

caf::expected<std::string> process::wait_line(const std::string& prefix,
                                              std::chrono::milliseconds timeout) const {
  std::string found;
  auto has_line = [&](const std::string& text) {
    for (size_t at = 0; at < text.size();) {
      auto nl = text.find('\n', at);
      if (nl == std::string::npos) return false;
      if (text.compare(at, prefix.size(), prefix) == 0) {
        found = text.substr(at + prefix.size(), nl - at - prefix.size());
        return true;
      }
      at = nl + 1;
    }
    return false;
  };
  if (wait_err(has_line, timeout)) return found;
  std::lock_guard<std::mutex> guard(mu_);
  return keel::make_error(
      keel::errc::failed,
      program_ + " (pid " + std::to_string(pid_) + ") " +
          (eof_ ? std::string("ended")
                : "did not print it within " + std::to_string(timeout.count()) + " ms") +
          " before a line '" + prefix + "...'" + (err_.empty() ? "" : "; its stderr:\n" + err_));
}

std::string process::state() {
  reap(false);
  return how_it_ended();
}

std::string process::wait(std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  // The end of its output comes with its exit (a cv wakes us at once); then reaping is a poll.
  wait_err([](const std::string&) { return false; }, timeout);
  while (!reap(false)) {
    if (std::chrono::steady_clock::now() >= deadline) return how_it_ended();
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return how_it_ended();
}

std::string process::kill() {
  if (!reaped_) {
    ::kill(pid_, SIGKILL);
    reap(true);
  }
  return how_it_ended();
}

std::string process::stop(std::chrono::milliseconds grace) {
  if (!reaped_) {
    ::kill(pid_, SIGTERM);
    auto deadline = std::chrono::steady_clock::now() + grace;
    while (!reap(false) && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (!reaped_) {
      ::kill(pid_, SIGKILL);
      reap(true);
    }
  }
  return how_it_ended();
}

bool process::reap(bool block) {
  if (reaped_) return true;
  // Wait for death without reaping, leave the group, then reap: the group never signals a pid
  // that may have been reused.
  siginfo_t info;
  info.si_pid = 0;
  int r;
  do {
    r = waitid(P_PID, static_cast<id_t>(pid_), &info, WEXITED | WNOWAIT | (block ? 0 : WNOHANG));
  } while (r < 0 && errno == EINTR);
  if (r == 0 && info.si_pid == 0) return false;  // WNOHANG: still running
  if (group_) group_->remove(pid_);
  pid_t w;
  do {
    w = waitpid(pid_, &status_, 0);
  } while (w < 0 && errno == EINTR);
  reaped_ = true;
  return true;
}

std::string process::how_it_ended() const {
  if (!reaped_) return "running";
  return WIFEXITED(status_) ? "exit " + std::to_string(WEXITSTATUS(status_))
                            : "signal " + std::to_string(WTERMSIG(status_));
}

void process::drain(int fd) {
  char buf[4096];
  while (true) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    std::lock_guard<std::mutex> guard(mu_);
    if (n <= 0) {
      eof_ = true;
      cv_.notify_all();
      break;
    }
    if (err_.size() < max_kept) err_.append(buf, static_cast<size_t>(n));
    cv_.notify_all();
  }
  close(fd);
}

caf::expected<std::vector<uint16_t>> free_ports(int n) {
  std::vector<int> fds;
  std::vector<uint16_t> ports;
  caf::error err;
  for (int i = 0; i < n && !err; ++i) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof a;
    if (fd < 0 || bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0 ||
        getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len) != 0)
      err = keel::make_error(keel::errc::failed,
                             std::string("a free port of 127.0.0.1: ") + std::strerror(errno));
    if (fd >= 0) fds.push_back(fd);
    ports.push_back(ntohs(a.sin_port));
  }
  for (int fd : fds) close(fd);
  if (err) return err;
  return ports;
}

void cluster::add(std::string name, std::string region, std::string listen, std::string peer_listen,
                  std::string data, std::string admin_listen) {
  members_.push_back({std::move(name), std::move(region), std::move(listen), std::move(peer_listen),
                      std::move(data), std::move(admin_listen), nullptr});
}

size_t cluster::find(const std::string& endpoint) const {
  for (size_t i = 0; i < members_.size(); ++i)
    if (members_[i].listen == endpoint) return i;
  return members_.size();
}

std::vector<std::string> cluster::argv(size_t i) const {
  const auto& m = members_[i];
  std::vector<std::string> a = {flags_.exe, "--name", m.name, "--listen", m.listen};
  if (!m.region.empty()) a.insert(a.end(), {"--region", m.region});
  if (!m.peer_listen.empty()) {
    std::string peers;
    for (const auto& o : members_)
      if (&o != &m && !o.peer_listen.empty())
        peers += (peers.empty() ? "" : ",") + o.name + "=" + o.peer_listen;
    a.insert(a.end(), {"--peer-listen", m.peer_listen});
    if (!peers.empty()) a.insert(a.end(), {"--peers", peers});
    std::string regions;
    for (auto& o : members_)
      if (&o != &m && !o.peer_listen.empty() && !o.region.empty())
        regions += (regions.empty() ? "" : ",") + o.name + "=" + o.region;
    if (!regions.empty()) a.insert(a.end(), {"--peer-regions", regions});
    a.insert(a.end(), {"--heartbeat-interval", std::to_string(flags_.heartbeat), "--down-after",
                       std::to_string(flags_.down_after)});
  }
  if (!m.data.empty()) a.insert(a.end(), {"--data", m.data});
  a.insert(a.end(), {"--model", flags_.model, "--threads", std::to_string(flags_.threads)});
  if (!m.admin_listen.empty())
    a.insert(a.end(), {"--admin-listen", m.admin_listen, "--config", flags_.admin_config});
  a.insert(a.end(), flags_.extra.begin(), flags_.extra.end());
  return a;
}

std::string cluster::command(size_t i) const {
  auto a = argv(i);
  std::string s = "keel-node";
  for (size_t k = 1; k < a.size(); ++k) s += " " + a[k];
  return s;
}

caf::error cluster::start(size_t i) {
  auto p = process::start(argv(i), &group_);
  if (!p) return std::move(p.error());
  members_[i].proc = std::move(*p);
  // A model load can take a while.
  auto addr = members_[i].proc->wait_line("keel-node: listening on ", std::chrono::minutes(2));
  if (!addr) return std::move(addr.error());
  if (members_[i].admin_listen.empty()) return {};
  // It binds the admin port after the client port; without a key it serves nothing.
  auto admin = members_[i].proc->wait_line("keel-node: admin on ", std::chrono::seconds(30));
  if (!admin) return std::move(admin.error());
  if (admin->find("disabled") != std::string::npos)
    return keel::make_error(keel::errc::failed, "node " + members_[i].name + ": admin on " +
                                                    *admin + " (config " + flags_.admin_config +
                                                    ": no admin-key line?)");
  return {};
}

caf::expected<cluster::admin_run> cluster::admin(size_t i, const std::string& commands,
                                                 std::chrono::milliseconds timeout) {
  const auto& m = members_[i];
  if (m.admin_listen.empty() || flags_.shell.empty())
    return keel::make_error(
        keel::errc::bad_request,
        "node " + m.name + " serves no admin API (keel-shell -c '" + commands + "' not run)");
  admin_run run;
  run.started = std::chrono::steady_clock::now();
  auto p = process::start({flags_.shell, "--connect", m.admin_listen, "--key-file",
                           flags_.admin_key_file, "-c", commands},
                          &group_, true);
  if (!p) return std::move(p.error());
  auto how = (*p)->wait(timeout);
  run.returned = std::chrono::steady_clock::now();
  run.output = (*p)->err();
  if (how == "running")
    how = "killed after " + std::to_string(timeout.count()) + " ms: " + (*p)->kill();
  if (how != "exit 0")
    return keel::make_error(keel::errc::failed, "keel-shell --connect " + m.admin_listen +
                                                    " (node " + m.name + ") -c '" + commands +
                                                    "': " + how + "; its output:\n" + run.output);
  return run;
}

size_t cluster::ups(size_t j, size_t i) const {
  if (!members_[j].proc || members_[i].peer_listen.empty()) return 0;
  // keel-node logs "link a -> 127.0.0.1:7101: down -> up (heartbeat answered in 180 us)".
  const std::string link = "link " + members_[j].name + " -> " + members_[i].peer_listen + ": ";
  std::istringstream lines(members_[j].proc->err());
  size_t n = 0;
  for (std::string line; std::getline(lines, line);)
    if (line.find(link) != std::string::npos && line.find("-> up (") != std::string::npos) ++n;
  return n;
}

cluster::link_ups cluster::ups_to(size_t i) const {
  link_ups v;
  for (size_t j = 0; j < members_.size(); ++j) {
    v.pids.push_back(members_[j].proc ? members_[j].proc->pid() : -1);
    v.ups.push_back(ups(j, i));
  }
  return v;
}

caf::error cluster::wait_joined(size_t i, const link_ups& before,
                                std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    std::string missing;
    for (size_t j = 0; j < members_.size(); ++j) {
      if (j == i || !members_[j].proc || members_[j].peer_listen.empty()) continue;
      if (ups(i, j) == 0) missing += " " + members_[i].name + "->" + members_[j].name;
      bool same = j < before.pids.size() && before.pids[j] == members_[j].proc->pid();
      if (ups(j, i) <= (same ? before.ups[j] : 0))
        missing += " " + members_[j].name + "->" + members_[i].name;
    }
    if (missing.empty()) return {};
    if (std::chrono::steady_clock::now() >= deadline) {
      if (auto err = check()) return err;
      auto log = members_[i].proc ? tail(members_[i].proc->err()) : std::string();
      return keel::make_error(keel::errc::failed,
                              "node " + members_[i].name + " did not join within " +
                                  std::to_string(timeout.count()) + " ms: links not up:" + missing +
                                  "; its stderr:\n" + log);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

cluster::link_counts cluster::all_ups() const {
  link_counts v;
  v.ups.assign(members_.size(), std::vector<size_t>(members_.size(), 0));
  for (size_t j = 0; j < members_.size(); ++j) {
    v.pids.push_back(members_[j].proc ? members_[j].proc->pid() : -1);
    for (size_t i = 0; i < members_.size(); ++i)
      if (i != j) v.ups[j][i] = ups(j, i);
  }
  return v;
}

caf::error cluster::wait_relinked(size_t i, const link_counts& before,
                                  std::chrono::milliseconds timeout) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  // Node j's count of ups of its link to node k at `before`, when it still runs as then.
  auto was = [&](size_t j, size_t k) {
    bool same = j < before.pids.size() && before.pids[j] == members_[j].proc->pid();
    return same ? before.ups[j][k] : size_t{0};
  };
  while (true) {
    std::string missing;
    for (size_t j = 0; j < members_.size(); ++j) {
      if (j == i || !members_[i].proc || !members_[j].proc || members_[j].peer_listen.empty())
        continue;
      if (ups(i, j) <= was(i, j)) missing += " " + members_[i].name + "->" + members_[j].name;
      if (ups(j, i) <= was(j, i)) missing += " " + members_[j].name + "->" + members_[i].name;
    }
    if (missing.empty()) return {};
    if (std::chrono::steady_clock::now() >= deadline) {
      if (auto err = check()) return err;
      return keel::make_error(keel::errc::failed,
                              "the links of node " + members_[i].name + " were not up again " +
                                  std::to_string(timeout.count()) + " ms after its partition: " +
                                  "still down:" + missing + "; its stderr:\n" + log_tail(i));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

std::string cluster::log_tail(size_t i) const {
  return members_[i].proc ? tail(members_[i].proc->err()) : std::string();
}

caf::error cluster::check() const {
  std::string ended;
  for (auto& m : members_)
    if (m.proc)
      if (auto state = m.proc->state(); state != "running")
        ended += "\nnode " + m.name + " ended (" + state + "); its stderr:\n" + tail(m.proc->err());
  if (ended.empty()) return {};
  return keel::make_error(keel::errc::failed, "keel-node ended on its own:" + ended);
}

std::vector<std::pair<size_t, std::string>> cluster::take_ended() {
  std::vector<std::pair<size_t, std::string>> out;
  for (size_t i = 0; i < members_.size(); ++i) {
    auto& p = members_[i].proc;
    if (!p) continue;
    auto state = p->state();
    if (state == "running") continue;
    // The last lines say why: an abort's message and stack, a fatal error.
    auto err = p->err();
    size_t at = err.size(), lines = 0;
    while (at > 0 && lines < 6)
      if (err[--at] == '\n' && at + 1 < err.size()) ++lines;
    out.emplace_back(i, state + "\n" + err.substr(lines == 6 ? at + 1 : 0));
    p.reset();
  }
  return out;
}

std::chrono::steady_clock::time_point cluster::kill(size_t i) {
  auto t = std::chrono::steady_clock::now();
  members_[i].proc->kill();
  members_[i].proc.reset();
  return t;
}

std::string cluster::stop() {
  std::string out;
  for (auto& m : members_) {
    if (!m.proc) continue;
    out += (out.empty() ? "" : ", ") + m.name + " " + m.proc->stop(std::chrono::seconds(10));
    m.proc.reset();
  }
  return out;
}

}  // namespace keel::bench
