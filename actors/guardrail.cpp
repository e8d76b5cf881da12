#include "actors/guardrail.hpp"

#include <cctype>
#include <fstream>
#include <sstream>

#include <caf/typed_event_based_actor.hpp>

#include "actors/let_it_crash.hpp"

namespace keel {

namespace {

std::string lower(std::string_view s) {
  std::string out(s);
  for (auto& c : out) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return out;
}

std::string trim(const std::string& s) {
  auto b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return {};
  auto e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

bool take_prefix(std::string& s, const char* prefix) {
  auto n = std::char_traits<char>::length(prefix);
  if (s.compare(0, n, prefix) != 0) return false;
  s = trim(s.substr(n));
  return true;
}

}  // namespace

caf::expected<std::unique_ptr<rule_filter>> rule_filter::load(const std::string& path) {
  std::ifstream in(path);
  if (!in)
    return make_error(errc::bad_request, "guardrail rules " + path + ": cannot be read");
  std::stringstream text;
  text << in.rdbuf();
  return parse(text.str(), path);
}

caf::expected<std::unique_ptr<rule_filter>> rule_filter::parse(const std::string& text,
                                                               const std::string& origin) {
  auto out = std::make_unique<rule_filter>();
  std::istringstream in(text);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    auto s = trim(line);
    if (s.empty() || s[0] == '#') continue;
    rule r;
    r.line = n;
    if (take_prefix(s, "prompt:"))
      r.output = false;
    else if (take_prefix(s, "output:"))
      r.prompt = false;
    auto where = origin + " line " + std::to_string(n);
    if (take_prefix(s, "re:")) {
      if (s.empty()) return make_error(errc::bad_request, where + ": an empty regular expression");
      try {
        r.re.emplace(s, std::regex::ECMAScript | std::regex::icase | std::regex::optimize);
      } catch (const std::regex_error& e) {
        return make_error(errc::bad_request,
                          where + ": the regular expression '" + s + "' does not compile: " +
                              e.what());
      }
    } else {
      if (s.empty()) return make_error(errc::bad_request, where + ": an empty pattern");
      r.needle = lower(s);
    }
    out->rules_.push_back(std::move(r));
  }
  return out;
}

guard_verdict rule_filter::check(guard_stage stage, std::string_view text) {
  std::string folded;  // made once, for the substring rules
  for (auto& r : rules_) {
    if ((stage == guard_stage::prompt && !r.prompt) || (stage == guard_stage::output && !r.output))
      continue;
    bool hit = false;
    if (r.re) {
      hit = std::regex_search(text.begin(), text.end(), *r.re);
    } else {
      if (folded.empty() && !text.empty()) folded = lower(text);
      hit = folded.find(r.needle) != std::string::npos;
    }
    if (hit) return {false, "rule " + std::to_string(r.line)};
  }
  return {};
}

bool guardrail::enter() {
  auto n = pending_.fetch_add(1, std::memory_order_relaxed);
  if (n < cfg_.max_pending) return true;
  pending_.fetch_sub(1, std::memory_order_relaxed);
  return false;
}

guard_outcome guardrail::count(guard_outcome o, guard_stage stage, const std::string& why,
                               const std::function<void(const std::string&)>& log) {
  counts_[static_cast<size_t>(o)].fetch_add(1, std::memory_order_relaxed);
  if ((o == guard_outcome::failed_open || o == guard_outcome::failed_closed) && log) {
    auto now = std::chrono::duration_cast<std::chrono::nanoseconds>(
                   std::chrono::steady_clock::now().time_since_epoch())
                   .count();
    auto last = last_logged_ns_.load(std::memory_order_relaxed);
    if (now - last >= 1'000'000'000 &&
        last_logged_ns_.compare_exchange_strong(last, now, std::memory_order_relaxed)) {
      log(std::string("guardrail: a ") + (stage == guard_stage::prompt ? "prompt" : "reply") +
          " check failed (" + why + "); failing " +
          (o == guard_outcome::failed_open ? "open: the turn goes on" : "closed: the turn is refused") +
          " (logged at most once a second; keel_guardrail_checks_total counts them all)");
    }
  }
  return o;
}

namespace {

struct guard_state {
  std::shared_ptr<guardrail> g;
  std::unique_ptr<guard_filter> filter;
  static inline const char* name = "guard";
};

guard_actor::behavior_type guard_behavior(
    guard_actor::stateful_pointer<guard_state> self, std::shared_ptr<guardrail> g,
    std::unique_ptr<guard_filter> filter) {
  exceptions_as_failures(self);  // a throwing filter fails the actor: its supervisor restarts it
  self->state.g = std::move(g);
  self->state.filter = std::move(filter);
  return {
      [self](check_atom, guard_stage stage, const std::string& text) -> guard_verdict {
        auto& st = self->state;
        // Counted out before the filter runs: an exception below fails the actor, and its
        // restart resets the count.
        st.g->leave();
        return st.filter->check(stage, text);
      },
  };
}

}  // namespace

child_spec guard_spec(std::shared_ptr<guardrail> g) {
  child_spec spec;
  spec.id = "filter";
  spec.kind = "guardrail";
  spec.start = [g](caf::actor_system& sys, const std::string&,
                   const caf::message&) -> caf::expected<caf::actor> {
    auto filter = g->config().make();
    if (!filter) return std::move(filter.error());
    // Whatever waited for the previous incarnation is gone with its mailbox.
    g->reset();
    auto a = sys.spawn<caf::detached>(guard_behavior, g, std::move(*filter));
    g->set_current(caf::actor_cast<caf::actor>(a));
    return caf::actor_cast<caf::actor>(a);
  };
  return spec;
}

supervisor_flags guard_flags() {
  auto f = make_flags(restart_strategy::one_for_one, 100, std::chrono::seconds(60));
  f.backoff.initial = std::chrono::milliseconds(100);
  f.backoff.max = std::chrono::seconds(5);
  return f;
}

}  // namespace keel
