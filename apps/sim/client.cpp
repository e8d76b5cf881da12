// keel-sim: the simulated client (apps/sim/detail.hpp).

#include <algorithm>
#include <iostream>

#include "apps/sim/detail.hpp"

namespace keel::sim::detail {

// ---- client ----------------------------------------------------------------------------------

void client::start() {
  for (size_t t = 0; t < turns_; ++t) users_.push_back(user_text(session_, t));
  last_progress_ = w_.real();
  request();
  w_.at(w_.real() + 50 * ms, [this] { tick(); });
}

void client::next_target(const std::string& hint) {
  if (!hint.empty()) {
    for (int i = 0; i < w_.node_count(); ++i)
      if (w_.node_at(i).name() == hint) {
        target_ = i;
        return;
      }
  }
  target_ = (target_ + 1) % w_.node_count();
}

void client::request() {
  auto to = w_.node_at(target_).name();
  next_try_ = w_.real() + 400 * ms;
  rotate_ = true;
  w_.trace(name_ + ": request " + std::to_string(static_cast<int>(phase_)) + " turn " +
           std::to_string(turn_) + " to " + to);
  switch (phase_) {
    case phase::opening:
      w_.client_send(name_, to, client_msg{client_msg::open, session_, 0, 0, 0, {}, {}, {}});
      break;
    case phase::sending:
      w_.client_send(name_, to,
                     client_msg{client_msg::submit, session_, turn_, 0, 0, users_[turn_], {}, {}});
      break;
    case phase::streaming:
      w_.client_send(name_, to,
                     client_msg{client_msg::resume, session_, turn_, got_.size(), 0, {}, {}, got_});
      break;
    case phase::finished:
      break;
  }
}

void client::tick() {
  if (phase_ == phase::finished) return;
  // No answer, or a stream that stopped: try the next node (the same request: idempotent).
  bool stalled = phase_ != phase::streaming || w_.real() - last_progress_ >= 600 * ms;
  if (w_.real() >= next_try_ && stalled) {
    if (rotate_) next_target({});
    request();
  }
  w_.at(w_.real() + 50 * ms, [this] { tick(); });
}

void client::on_msg(const std::string& from, const client_msg& m) {
  if (m.session != session_ || phase_ == phase::finished) return;
  switch (m.kind) {
    case client_msg::opened:
      if (phase_ != phase::opening) return;
      w_.trace(name_ + ": opened " + session_ + " at " + from);
      phase_ = phase::sending;
      last_progress_ = w_.real();
      request();
      return;
    case client_msg::ack:
      if (phase_ != phase::sending || m.turn != turn_) return;
      acked_[turn_] = users_[turn_];
      w_.acknowledged_turn();
      w_.trace(name_ + ": turn " + std::to_string(turn_) + " of " + session_ + " acknowledged by " +
               from);
      phase_ = phase::streaming;
      got_.clear();
      last_progress_ = w_.real();
      return;
    case client_msg::token: {
      if (m.turn != turn_ || (phase_ != phase::streaming && phase_ != phase::sending)) return;
      // Exactly once: every token received, a repeat included, must be the fault-free one.
      auto want = token_of(session_, users_, turn_, m.index);
      w_.checked_token();
      if (m.tok != want) {
        w_.violation("exactly-once stream",
                     name_ + " got token " + std::to_string(m.tok) + " at " + session_ + " turn " +
                         std::to_string(turn_) + " index " + std::to_string(m.index) + " from " +
                         from + "; the fault-free run has " + std::to_string(want));
        return;
      }
      if (phase_ == phase::sending) {
        // The ack was lost but the turn runs: it was acknowledged by the stream itself.
        return;
      }
      if (m.index == got_.size()) {
        got_.push_back(m.tok);
        last_progress_ = w_.real();
      }
      return;
    }
    case client_msg::done:
      if (phase_ != phase::streaming || m.turn != turn_) return;
      if (m.index != turn_length(session_, turn_)) {
        w_.violation("exactly-once stream", name_ + ": " + session_ + " turn " +
                                                std::to_string(turn_) + " ended after " +
                                                std::to_string(m.index) + " tokens; the fault-free run has " +
                                                std::to_string(turn_length(session_, turn_)));
        return;
      }
      if (got_.size() < m.index) {
        // Tokens lost on the way: ask for the rest.
        request();
        return;
      }
      last_progress_ = w_.real();
      ++turn_;
      got_.clear();
      if (turn_ == turns_) {
        phase_ = phase::finished;
        w_.trace(name_ + ": finished " + session_);
        return;
      }
      phase_ = phase::sending;
      request();
      return;
    case client_msg::refused:
      w_.trace(name_ + ": refused by " + from + ": " + m.text + (m.hint.empty() ? "" : ", try " + m.hint));
      next_target(m.hint);
      rotate_ = false;
      next_try_ = w_.real() + 60 * ms;
      last_progress_ = std::min(last_progress_, w_.real() - 600 * ms);
      return;
    case client_msg::moved:
      next_target({});
      rotate_ = false;
      next_try_ = w_.real() + 20 * ms;
      last_progress_ = std::min(last_progress_, w_.real() - 600 * ms);
      return;
    default:
      return;
  }
}

}  // namespace keel::sim::detail
