#pragma once

// A child process for tests that run the real binaries (keel-node, keel): started with
// fork/exec, its stdout and stderr captured by reader threads, and always ended and reaped.

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

namespace keel::test {

/// One child process. The destructor ends it if it still runs (SIGTERM, then SIGKILL after the
/// grace period) and reaps it, so no test path leaks a process. Output is kept in memory.
/// Member functions may be called from several threads.
class process {
 public:
  /// Starts `argv[0]` (a path) with `argv`. With `with_stdin`, the child's stdin is a pipe fed
  /// by `write_stdin`; otherwise it is /dev/null. Throws std::runtime_error if it cannot start.
  explicit process(std::vector<std::string> argv, bool with_stdin = false) {
    int out[2], err[2], in[2] = {-1, -1};
    if (pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0 ||
        (with_stdin && pipe2(in, O_CLOEXEC) != 0))
      throw std::runtime_error("pipe2 failed");
    std::vector<char*> args;
    for (auto& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    int devnull = with_stdin ? -1 : open("/dev/null", O_RDONLY | O_CLOEXEC);
    pid_t parent = getpid();
    pid_ = fork();
    if (pid_ < 0) throw std::runtime_error("fork failed");
    if (pid_ == 0) {
      // Only async-signal-safe calls between fork and exec: the test has threads. When the test
      // dies without running destructors (an abort), the kernel kills the child: no orphans.
      // (The signal follows the forking thread, so start processes from long-lived threads.)
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(127);
      dup2(with_stdin ? in[0] : devnull, 0);
      dup2(out[1], 1);
      dup2(err[1], 2);
      execv(args[0], args.data());
      _exit(127);
    }
    if (devnull >= 0) close(devnull);
    close(out[1]);
    close(err[1]);
    if (with_stdin) {
      close(in[0]);
      stdin_ = in[1];
    }
    readers_.emplace_back([this, fd = out[0]] { drain(fd, out_); });
    readers_.emplace_back([this, fd = err[0]] { drain(fd, err_); });
  }

  ~process() {
    close_stdin();
    if (!exited()) stop(std::chrono::seconds(5));
    for (auto& t : readers_) t.join();
  }

  process(const process&) = delete;
  process& operator=(const process&) = delete;

  pid_t pid() const { return pid_; }

  std::string out() const {
    std::lock_guard<std::mutex> g(mu_);
    return out_;
  }
  std::string err() const {
    std::lock_guard<std::mutex> g(mu_);
    return err_;
  }

  /// Waits until `pred(stdout so far)` holds; false on timeout or when the output ended first.
  bool wait_out(const std::function<bool(const std::string&)>& pred,
                std::chrono::milliseconds timeout) {
    return wait_for(out_, pred, timeout);
  }
  /// The same for stderr.
  bool wait_err(const std::function<bool(const std::string&)>& pred,
                std::chrono::milliseconds timeout) {
    return wait_for(err_, pred, timeout);
  }

  void write_stdin(const std::string& s) {
    if (stdin_ >= 0 && ::write(stdin_, s.data(), s.size()) != static_cast<ssize_t>(s.size()))
      throw std::runtime_error("write to the child's stdin failed");
  }
  void close_stdin() {
    if (stdin_ >= 0) close(stdin_);
    stdin_ = -1;
  }

  void signal(int sig) {
    std::lock_guard<std::mutex> g(wait_mu_);
    if (!status_) ::kill(pid_, sig);
  }

  /// Whether the child has ended (reaps it when it has).
  bool exited() { return poll(false).has_value(); }

  /// Waits up to `timeout` for the child to end: its exit status, 128 + N when signal N killed
  /// it, nothing on timeout.
  std::optional<int> wait(std::chrono::milliseconds timeout) {
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (true) {
      if (auto s = poll(false)) return s;
      if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }

  /// SIGTERM, then SIGKILL when the child has not ended after `grace`; its status as `wait`.
  int stop(std::chrono::milliseconds grace) {
    signal(SIGTERM);
    if (auto s = wait(grace)) return *s;
    signal(SIGKILL);
    return *poll(true);
  }

 private:
  std::optional<int> poll(bool block) {
    std::lock_guard<std::mutex> g(wait_mu_);
    if (status_) return status_;
    int st = 0;
    pid_t r;
    do {
      r = waitpid(pid_, &st, block ? 0 : WNOHANG);
    } while (r < 0 && errno == EINTR);
    if (r == pid_) status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return status_;
  }

  void drain(int fd, std::string& into) {
    char buf[4096];
    while (true) {
      ssize_t n = ::read(fd, buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      std::lock_guard<std::mutex> g(mu_);
      if (n <= 0) {
        ++closed_;
        cv_.notify_all();
        break;
      }
      into.append(buf, static_cast<size_t>(n));
      cv_.notify_all();
    }
    close(fd);
  }

  bool wait_for(const std::string& buffer, const std::function<bool(const std::string&)>& pred,
                std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> g(mu_);
    auto deadline = std::chrono::steady_clock::now() + timeout;
    while (!pred(buffer)) {
      if (closed_ == 2) return false;  // no more output will come
      if (cv_.wait_until(g, deadline) == std::cv_status::timeout) return pred(buffer);
    }
    return true;
  }

  pid_t pid_ = -1;
  int stdin_ = -1;
  mutable std::mutex mu_;  // guards out_, err_, closed_
  std::condition_variable cv_;
  std::string out_, err_;
  int closed_ = 0;
  std::mutex wait_mu_;  // guards status_ and the pid's reuse: no kill after reaping
  std::optional<int> status_;
  std::vector<std::thread> readers_;
};

/// What a binary run to its end left: its exit status and output.
struct run_result {
  int status = -1;
  std::string out, err;
};

/// Runs a binary to its end (at most `timeout`, else throws naming its stderr), feeding `input`
/// to its stdin when it is not empty.
inline run_result run(std::vector<std::string> argv, const std::string& input = "",
                      std::chrono::milliseconds timeout = std::chrono::seconds(30)) {
  process p(std::move(argv), !input.empty());
  if (!input.empty()) {
    p.write_stdin(input);
    p.close_stdin();
  }
  auto st = p.wait(timeout);
  if (!st) throw std::runtime_error("timed out: " + p.err());
  p.wait_out([](const std::string&) { return false; }, std::chrono::seconds(2));  // output ended
  return run_result{*st, p.out(), p.err()};
}

}  // namespace keel::test
