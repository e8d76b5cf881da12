#include "apps/node_log.hpp"

#include <unistd.h>

#include <ctime>
#include <iostream>

#include <nlohmann/json.hpp>

#include "apps/cli.hpp"

namespace keel::cli {

caf::expected<log_format> parse_log_format(const std::string& value) {
  if (value == "text") return log_format::text;
  if (value == "json") return log_format::json;
  return make_error(errc::bad_request, "--log-format " + value + ": expected text or json");
}

const char* to_string(log_level x) {
  switch (x) {
    case log_level::info:
      return "info";
    case log_level::warning:
      return "warning";
    case log_level::error:
      return "error";
  }
  return "info";
}

namespace {

bool base32(char c) {
  return (c >= 'a' && c <= 'z') || (c >= '2' && c <= '7');
}

bool name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
         c == '_' || c == '.';
}

bool contains(const std::string& s, const char* what) {
  return s.find(what) != std::string::npos;
}

/// "2025-01-01T12:00:00.123Z".
std::string now_rfc3339() {
  auto now = std::chrono::system_clock::now();
  auto t = std::chrono::system_clock::to_time_t(now);
  auto ms = std::chrono::duration_cast<std::chrono::milliseconds>(now.time_since_epoch()) % 1000;
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[40];
  auto n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  std::snprintf(buf + n, sizeof buf - n, ".%03dZ", static_cast<int>(ms.count()));
  return buf;
}

}  // namespace

std::string session_in(const std::string& text) {
  constexpr size_t random_chars = 24;
  for (size_t at = text.find("s-"); at != std::string::npos; at = text.find("s-", at + 1)) {
    if (at > 0 && name_char(text[at - 1])) continue;  // inside a word
    size_t i = at + 2;
    while (i < text.size() && i - at - 2 < random_chars && base32(text[i])) ++i;
    if (i - at - 2 != random_chars || i >= text.size() || text[i] != '@') continue;
    size_t end = i + 1;
    while (end < text.size() && name_char(text[end])) ++end;
    while (end > i + 1 && text[end - 1] == '.') --end;  // the end of a sentence
    if (end == i + 1) continue;
    return text.substr(at, end - at);
  }
  return {};
}

log_entry classify(const std::string& text, const std::string& component) {
  log_entry e;
  e.message = text;
  e.component = component;
  e.session = session_in(text);
  // The words after an optional "NAME: " prefix (the node reports under its name).
  auto colon = text.find(": ");
  auto rest = colon != std::string::npos && colon < 40 && text.find(' ') > colon
                  ? text.substr(colon + 2)
                  : text;
  if (contains(text, "node not ready") || contains(text, "did not stop within"))
    e.level = log_level::error;
  else if (rest.rfind("warning", 0) == 0 || text.rfind("warning", 0) == 0 ||
           contains(text, "damage") || contains(text, "corrupt") || contains(text, "cannot ") ||
           contains(text, " failed") || contains(text, "refused") || contains(text, "dropped") ||
           contains(text, " parked"))
    e.level = log_level::warning;
  return e;
}

log_entry from_event(const supervision_event& ev, const std::string& line) {
  log_entry e;
  e.message = line;
  e.component = "supervisor";
  e.actor = ev.path;
  e.session = session_in(ev.path);
  e.event = to_string(ev.kind);
  e.reason = ev.reason;
  bool failure = !ev.reason.empty() && ev.reason != "user_shutdown" && ev.reason != "normal";
  switch (ev.kind) {
    case supervision_event_kind::escalated:
      e.level = log_level::error;
      break;
    case supervision_event_kind::parked:
      e.level = log_level::warning;
      break;
    case supervision_event_kind::exited:
      e.level = failure ? log_level::warning : log_level::info;
      break;
    default:
      break;
  }
  return e;
}

std::string node_log::render(const log_entry& e) const {
  if (format_ == log_format::text) return std::string(program_) + ": " + e.message;
  nlohmann::ordered_json j;
  j["time"] = now_rfc3339();
  j["level"] = to_string(e.level);
  j["program"] = program_;
  j["node"] = node_;
  j["message"] = e.message;
  auto optional = [&j](const char* key, const std::string& value) {
    if (!value.empty()) j[key] = value;
  };
  optional("component", e.component);
  optional("actor", e.actor);
  optional("session", e.session);
  optional("event", e.event);
  optional("reason", e.reason);
  // A message may hold bytes that are not UTF-8 (a peer's or a client's text): replaced, so that
  // every line stays valid JSON.
  return j.dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
}

void node_log::write(const log_entry& e) const {
  if (format_ == log_format::text) {
    log_line(program_, e.message);
    return;
  }
  auto text = render(e) + '\n';
  size_t done = 0;
  while (done < text.size()) {
    auto n = ::write(2, text.data() + done, text.size() - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
}

void node_log::line(const std::string& message, log_level level) const {
  log_entry e;
  e.level = level;
  e.message = message;
  e.session = session_in(message);
  write(e);
}

void node_log::line_from(const std::string& component, const std::string& text) const {
  write(classify(text, component));
}

void node_log::supervision(const supervision_event* e, const std::string& text) const {
  write(e != nullptr ? from_event(*e, text) : classify(text, "node"));
}

int node_log::fail(const caf::error& err) const {
  if (format_ == log_format::text) return keel::cli::fail(program_, err);
  line(describe(err), log_level::error);
  return code_of(err) == errc::bad_request ? 2 : 1;
}

}  // namespace keel::cli
