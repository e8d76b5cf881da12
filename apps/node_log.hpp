#pragma once

// keel-node's log on stderr, as text ("keel-node: MESSAGE", one line each) or as JSON (one
// object per line: --log-format json, for log shippers). docs/operations.md, "Logs".

#include <ostream>
#include <string>

#include "actors/supervisor.hpp"
#include "base/error.hpp"

namespace keel::cli {

enum class log_format { text, json };

/// The value of `--log-format`: "text" or "json"; `bad_request` naming the flag and the value.
caf::expected<log_format> parse_log_format(const std::string& value);

enum class log_level { info, warning, error };

const char* to_string(log_level x);

inline std::ostream& operator<<(std::ostream& out, log_level x) {
  return out << to_string(x);
}

/// One line of the log, with what is known of where it comes from.
struct log_entry {
  log_level level = log_level::info;
  std::string message;
  std::string component;  // "node", "gateway", "peers", "admin", "supervisor"; "" for main()
  std::string actor;      // the supervised actor's path ("a/engine/shard-0"); "" when unknown
  std::string session;    // the session the line is about; "" when none
  std::string event;      // a supervision event's kind ("restarted"); "" for other lines
  std::string reason;     // a supervision event's exit reason; "" when none or normal
};

/// The first session id in `text` ("s-" and 24 base32 characters, "@" and a node name), or "".
std::string session_in(const std::string& text);

/// A free-text line as an entry of `component`: its session from `session_in`, its level from
/// its words: `error` for a node that is not ready or did not stop, `warning` for a line that
/// starts with "warning" or reports damage, a corrupt record, a failure, a refusal, a dropped
/// message or a parked session; `info` otherwise.
log_entry classify(const std::string& text, const std::string& component);

/// A supervision event as an entry: the child's path as `actor`, the kind as `event`, its
/// session when the child is a session actor; `error` for an escalation, `warning` for a failure
/// (an exit with a reason) or a parked child, `info` otherwise.
log_entry from_event(const supervision_event& e, const std::string& line);

/// Where keel-node's log lines go: stderr, one write per line, so that lines of several threads
/// never interleave. Thread-safe once `set_node` was called (before any thread logs).
class node_log {
 public:
  node_log(const char* program, log_format format) : program_(program), format_(format) {}

  /// The node's name, for the JSON `node` field.
  void set_node(std::string name) { node_ = std::move(name); }
  log_format format() const { return format_; }

  void write(const log_entry& e) const;
  /// One of main()'s own lines, at `level`.
  void line(const std::string& message, log_level level = log_level::info) const;
  /// A free-text line from the sink of `component` (`classify`).
  void line_from(const std::string& component, const std::string& text) const;
  /// A line from a supervision log's sink (`supervision_log::on_event`): an event when `e` is
  /// set, else a line the node reported (`classify`, component "node").
  void supervision(const supervision_event* e, const std::string& text) const;

  /// The line as written, without its newline: "PROGRAM: MESSAGE", or a JSON object with
  /// `time` (RFC 3339, UTC, milliseconds), `level`, `program`, `node` and `message`, and
  /// `component`, `actor`, `session`, `event`, `reason` when not empty.
  std::string render(const log_entry& e) const;

  /// Logs `err` as keel::cli::fail does and returns the same exit status.
  int fail(const caf::error& err) const;

 private:
  const char* program_;
  log_format format_;
  std::string node_;
};

}  // namespace keel::cli
