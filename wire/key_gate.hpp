#pragma once

// What the client and admin ports share to check a key: a constant-time comparison, and the
// pacing of wrong keys (one answered at a time, 200 ms apart, across every connection).

#include <algorithm>
#include <cstddef>
#include <string_view>

#include <kj/async.h>
#include <kj/timer.h>

namespace keel::wire {

/// Whether `given` equals `expected`, in time independent of their content (a wrong guess
/// reveals no prefix). An empty `expected` matches nothing.
inline bool same_key(std::string_view given, std::string_view expected) {
  unsigned char diff = given.size() == expected.size() ? 0 : 1;
  for (size_t i = 0; i < given.size(); ++i)
    diff |=
        static_cast<unsigned char>(given[i] ^ expected[i % std::max<size_t>(expected.size(), 1)]);
  return diff == 0 && !expected.empty();
}

/// Paces the answers to wrong keys on one port: they are answered one at a time, `spacing`
/// apart, across every connection, so pipelined guesses gain nothing; while `max_waiting` wait,
/// every login is refused at once (`saturated`: the right key too, a brief lockout). Used on
/// the port's KJ thread only; `timer` must outlive it.
class refusal_pacer {
 public:
  static constexpr int max_waiting = 32;

  explicit refusal_pacer(kj::Timer& timer, kj::Duration spacing = 200 * kj::MILLISECONDS)
      : timer_(timer), spacing_(spacing), next_(timer.now()) {}

  /// Checked before the key, so that a fast answer tells nothing about it.
  bool saturated() const { return waiting_ >= max_waiting; }
  int waiting() const { return waiting_; }

  /// Resolves when the next wrong key may be answered.
  kj::Promise<void> delay() {
    next_ = std::max(timer_.now(), next_) + spacing_;
    ++waiting_;
    return timer_.atTime(next_).attach(kj::defer([this] { --waiting_; }));
  }

 private:
  kj::Timer& timer_;
  kj::Duration spacing_;
  kj::TimePoint next_;
  int waiting_ = 0;
};

}  // namespace keel::wire
