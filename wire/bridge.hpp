#pragma once

// The bridge between KJ's event loop (Cap'n Proto) and CAF actors.
//
// Threads: a KJ event loop owns exactly one thread, and every capnp object (clients, builders,
// promises) is used on that thread only. CAF actors run on CAF's worker threads. The rules:
//
// - KJ -> CAF: send a message (`caf::anon_send`), never block. Nothing here uses a
//   `scoped_actor` or a blocking `receive` on the KJ thread.
// - CAF -> KJ: through a cross-thread fulfiller (`kj::newPromiseAndCrossThreadFulfiller`, whose
//   `fulfill()` is const and callable from any thread). `kj::Executor::executeAsync` is not
//   used: it needs an event loop on the calling thread, and CAF's workers have none; and
//   `executeSync` would block a CAF worker.
//
// Three tools are built on that:
// - `stream_channel<T>`: a bounded queue, CAF producer and KJ consumer, with a doorbell. It
//   reports a consumer that falls too far behind instead of growing without bound.
// - `in_caf<T>(sys, f)` / `ask<R>(sys, dest, timeout, args...)`: await on the KJ thread what
//   a short-lived CAF actor computes (e.g. the answer to a request).
// - `blocking_worker`: runs calls that block (synchronous actor APIs) on a thread of its own,
//   so that they block neither the KJ thread nor a CAF worker.

#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>

#include <kj/async.h>
#include <caf/actor.hpp>
#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/expected.hpp>

#include "base/error.hpp"

namespace keel::wire {

/// A bounded queue from CAF (producer, any thread, never blocks) to one KJ event loop
/// (consumer). Shared by both sides through a `std::shared_ptr`.
///
/// The producer `push`es and finally `close`s. When `capacity` events wait unconsumed, the
/// consumer is too slow: the channel marks itself `overflowed`, drops the event and refuses every
/// later one (`push` returns false); the consumer sees the overflow on its next `drain` and
/// decides what to do (the gateway cuts the client off). `cancel` (consumer side) also makes
/// `push` return false, so that the producer can stop.
template <class T>
class stream_channel {
 public:
  explicit stream_channel(size_t capacity) : capacity_(capacity < 1 ? 1 : capacity) {}

  /// Producer. False when the channel is cancelled, closed or overflowed (the event is dropped).
  bool push(T event) {
    kj::Own<kj::CrossThreadPromiseFulfiller<void>> bell;
    bool accepted = false;
    {
      std::lock_guard<std::mutex> guard(mu_);
      if (cancelled_ || closed_ || overflowed_) return false;
      if (queue_.size() >= capacity_) {
        overflowed_ = true;
      } else {
        queue_.push_back(std::move(event));
        accepted = true;
      }
      bell = kj::mv(waiter_);
    }
    if (bell.get() != nullptr) bell->fulfill();
    return accepted;
  }

  /// Producer: the last event has been pushed (possibly together with it: `push` then `close`).
  void close() {
    kj::Own<kj::CrossThreadPromiseFulfiller<void>> bell;
    {
      std::lock_guard<std::mutex> guard(mu_);
      closed_ = true;
      bell = kj::mv(waiter_);
    }
    if (bell.get() != nullptr) bell->fulfill();
  }

  /// Either side: whether the consumer gave up (`push` would return false).
  bool cancelled() const {
    std::lock_guard<std::mutex> guard(mu_);
    return cancelled_;
  }

  bool overflowed() const {
    std::lock_guard<std::mutex> guard(mu_);
    return overflowed_;
  }

  /// Consumer (KJ thread): resolves when there is something to drain (events, the end, or an
  /// overflow). At most one wait at a time.
  kj::Promise<void> ready() {
    std::lock_guard<std::mutex> guard(mu_);
    if (!queue_.empty() || closed_ || overflowed_) return kj::READY_NOW;
    auto paf = kj::newPromiseAndCrossThreadFulfiller<void>();
    waiter_ = kj::mv(paf.fulfiller);
    return kj::mv(paf.promise);
  }

  struct batch {
    std::deque<T> events;
    bool closed = false;      // no event follows these
    bool overflowed = false;  // the consumer fell `capacity` events behind; later ones are lost
  };

  /// Consumer (KJ thread): takes every waiting event.
  batch drain() {
    std::lock_guard<std::mutex> guard(mu_);
    batch out;
    out.events.swap(queue_);
    out.closed = closed_;
    out.overflowed = overflowed_;
    return out;
  }

  /// Consumer (KJ thread): stop; later pushes are refused and waiting events dropped.
  void cancel() {
    kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter;
    {
      std::lock_guard<std::mutex> guard(mu_);
      cancelled_ = true;
      queue_.clear();
      waiter = kj::mv(waiter_);
    }
  }

  size_t capacity() const { return capacity_; }

 private:
  const size_t capacity_;
  mutable std::mutex mu_;
  std::deque<T> queue_;
  bool closed_ = false;
  bool cancelled_ = false;
  bool overflowed_ = false;
  kj::Own<kj::CrossThreadPromiseFulfiller<void>> waiter_;
};

/// The CAF side's handle to a promise held by a KJ thread: copyable (CAF's handlers must be),
/// callable from any thread, used once (later calls are ignored). Dropping every copy without
/// calling it rejects the KJ promise ("destroyed without fulfilling"); when the KJ side dropped
/// its promise first, calling it does nothing.
template <class T>
class kj_reply {
 public:
  explicit kj_reply(kj::Own<kj::CrossThreadPromiseFulfiller<T>> f)
      : state_(std::make_shared<state>(kj::mv(f))) {}

  void operator()(T value) const {
    std::lock_guard<std::mutex> guard(state_->mu);
    if (state_->fulfiller.get() == nullptr) return;
    state_->fulfiller->fulfill(std::move(value));
    state_->fulfiller = nullptr;
  }

 private:
  struct state {
    explicit state(kj::Own<kj::CrossThreadPromiseFulfiller<T>> f) : fulfiller(kj::mv(f)) {}
    std::mutex mu;
    kj::Own<kj::CrossThreadPromiseFulfiller<T>> fulfiller;
  };
  std::shared_ptr<state> state_;
};

/// Runs `f(self, reply)` in a new event-based CAF actor and returns, on the calling KJ thread, a
/// promise of what `f` (or a handler it installs) passes to `reply`. The actor ends when it has
/// no behaviour and awaits no response, so `f` typically sends requests whose handlers call
/// `reply`. `f` runs on a CAF thread: it must capture values and thread-safe objects only,
/// nothing of the KJ side. Never blocks the caller.
template <class T, class F>
kj::Promise<T> in_caf(caf::actor_system& sys, F f) {
  auto paf = kj::newPromiseAndCrossThreadFulfiller<T>();
  kj_reply<T> reply(kj::mv(paf.fulfiller));
  sys.spawn([f = std::move(f), reply](caf::event_based_actor* self) { f(self, reply); });
  return kj::mv(paf.promise);
}

/// Sends `xs...` to `dest` as a request and resolves with its answer (one value of type `R`) or
/// its error, e.g. `ask<uint64_t>(sys, session, 10s, send_atom::value, text, n, sink)`. An
/// invalid `dest` gives `errc::disconnected`.
template <class R, class Handle, class... Ts>
kj::Promise<caf::expected<R>> ask(caf::actor_system& sys, Handle dest,
                                  std::chrono::milliseconds timeout, Ts... xs) {
  if (!dest) return caf::expected<R>(make_error(errc::disconnected, "the actor is not running"));
  return in_caf<caf::expected<R>>(
      sys, [dest, timeout, xs...](caf::event_based_actor* self, kj_reply<caf::expected<R>> reply) {
        self->request(dest, timeout, xs...)
            .then([reply](R& r) { reply(caf::expected<R>(std::move(r))); },
                  [reply](caf::error& e) { reply(caf::expected<R>(std::move(e))); });
      });
}

/// Runs blocking calls (e.g. synchronous actor APIs built on `scoped_actor`) one at a time on a
/// thread of its own, and hands their results to the KJ thread that asked. The queue is bounded:
/// beyond `max_queue` waiting calls, `run` answers `errc::overloaded` at once. The destructor
/// finishes the running call, refuses the waiting ones (`errc::disconnected`) and joins.
class blocking_worker {
 public:
  explicit blocking_worker(size_t max_queue) : max_queue_(max_queue) {
    thread_ = std::thread([this] { loop(); });
  }
  ~blocking_worker() {
    {
      std::lock_guard<std::mutex> guard(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }
  blocking_worker(const blocking_worker&) = delete;
  blocking_worker& operator=(const blocking_worker&) = delete;

  /// Calls `fn` (which returns `caf::expected<T>`) on the worker thread. KJ thread only.
  template <class T>
  kj::Promise<caf::expected<T>> run(std::function<caf::expected<T>()> fn) {
    auto paf = kj::newPromiseAndCrossThreadFulfiller<caf::expected<T>>();
    kj_reply<caf::expected<T>> reply(kj::mv(paf.fulfiller));
    {
      std::lock_guard<std::mutex> guard(mu_);
      if (stopping_)
        return caf::expected<T>(make_error(errc::disconnected, "the server is stopping"));
      if (jobs_.size() >= max_queue_) {
        return caf::expected<T>(make_error(
            errc::overloaded, std::to_string(jobs_.size()) + " calls are waiting already"));
      }
      jobs_.push_back([fn = std::move(fn), reply](bool run) {
        if (run)
          reply(fn());
        else
          reply(caf::expected<T>(make_error(errc::disconnected, "the server is stopping")));
      });
    }
    cv_.notify_one();
    return kj::mv(paf.promise);
  }

 private:
  void loop() {
    for (;;) {
      std::function<void(bool)> job;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stopping_ || !jobs_.empty(); });
        if (stopping_) {
          for (auto& j : jobs_) j(false);
          jobs_.clear();
          return;
        }
        job = std::move(jobs_.front());
        jobs_.pop_front();
      }
      job(true);
    }
  }

  const size_t max_queue_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void(bool)>> jobs_;
  bool stopping_ = false;
  std::thread thread_;
};

}  // namespace keel::wire
