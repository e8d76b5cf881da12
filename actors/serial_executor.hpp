#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>

namespace keel {

/// Runs tasks one at a time, in order, on a thread of its own: a node's failover work (starting
/// a session it acquired, stopping one it lost), which waits for actors and so must run neither
/// on a CAF worker nor on the ownership host's thread (whose answers the session actors may be
/// waiting for). The destructor drops what was not started and joins.
class serial_executor {
 public:
  serial_executor() : thread_([this] { run(); }) {}
  ~serial_executor() {
    {
      std::lock_guard<std::mutex> guard(mu_);
      stopping_ = true;
      tasks_.clear();
    }
    cv_.notify_all();
    thread_.join();
  }
  serial_executor(const serial_executor&) = delete;
  serial_executor& operator=(const serial_executor&) = delete;

  void post(std::function<void()> task) {
    {
      std::lock_guard<std::mutex> guard(mu_);
      if (stopping_) return;
      tasks_.push_back(std::move(task));
    }
    cv_.notify_one();
  }

 private:
  void run() {
    for (;;) {
      std::function<void()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stopping_ || !tasks_.empty(); });
        if (stopping_) return;
        task = std::move(tasks_.front());
        tasks_.pop_front();
      }
      task();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;
  bool stopping_ = false;
  std::thread thread_;  // last: started after the rest is ready
};

}  // namespace keel
