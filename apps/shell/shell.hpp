#pragma once

// keel-shell's commands (docs/shell.md): parsing, running them against a cluster of nodes,
// printing the answers, errors and help, and completing words for the line editor.

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

#include "apps/shell/admin_client.hpp"

namespace keel::shell {

/// One command of the shell, as `help` shows it.
struct command_info {
  const char* name;
  const char* usage;
  const char* summary;
  const char* details;
};

/// Every command, in `help` order.
const std::vector<command_info>& commands();

/// Runs command lines against `cluster` (not owned; it outlives the shell). Results go to
/// stdout, as aligned tables of at most 100 columns or, with `json`, one JSON document per
/// command on one line; errors go to stderr as one line each ("keel-shell: kill: ..."), and,
/// with `json`, also to stdout as {"command": ..., "error": {"kind", "message"}}.
///
/// A command's status follows the command-line convention: 0 done, 1 failed, 2 wrong usage
/// (an unknown command, wrong arguments).
class shell {
 public:
  shell(cluster& c, bool json) : cluster_(c), json_(json) {}

  /// On a terminal, `watch` redraws the screen and stops on Enter; otherwise it prints each
  /// refresh after the last.
  void set_terminal(bool on) { terminal_ = on; }

  /// Runs "CMD; CMD; ..." in order (each one, even after one failed). The status of the first
  /// command that failed, 0 when none did.
  int run_line(const std::string& line);

  /// Whether a command asked to leave (`quit`, `exit`).
  bool quitting() const { return quitting_; }

  /// The words that can follow `before` (the line up to the word being completed) and start
  /// with `word`: command names, node names, actor paths, fault kinds.
  std::vector<std::string> complete(const std::string& before, const std::string& word);

 private:
  int run(const std::vector<std::string>& args);

  // The commands (views.cpp); `args` includes the command's name.
  int tree(const std::vector<std::string>& args);
  int nodes(const std::vector<std::string>& args);
  int sessions(const std::vector<std::string>& args);
  int rollout(const std::vector<std::string>& args);
  int stats(const std::vector<std::string>& args);
  int act(const std::vector<std::string>& args);  // kill, restart, fault
  int drain(const std::vector<std::string>& args);
  int help(const std::vector<std::string>& args);
  int watch(const std::vector<std::string>& args);

  /// `fault PATH partition`'s arguments after the kind: `--from NODE,...` (required; may be
  /// repeated) and `--ms TIME` (at most 24 h; none: until cleared), in any order.
  caf::expected<fault_spec> partition_args(const std::vector<std::string>& rest) const;

  /// Prints the error (see the class comment); returns 2 for bad_request, else 1.
  int fail(const std::string& command, const caf::error& err);
  /// `bad_request` "COMMAND: WHAT; usage: USAGE".
  caf::error usage_error(const std::string& command, const std::string& what) const;

  /// The member named `name` (its node name, or its admin address); an error naming the known
  /// nodes when there is none.
  caf::expected<size_t> member_named(const std::string& name) const;
  /// The member a path belongs to (by its first segment, the node's name) and the full path. A
  /// path without a node's name is taken as relative to the root when there is one node only.
  caf::expected<std::pair<size_t, std::string>> route(const std::string& path) const;
  std::string known_nodes() const;
  /// A node that is down: the error, with the nodes that are up.
  caf::error with_hint(const caf::error& err) const;

  /// Every actor path of the nodes that are up, for completion (refreshed at most every 2 s).
  const std::vector<std::string>& paths();

  cluster& cluster_;
  bool json_;
  bool terminal_ = false;
  bool quitting_ = false;
  bool in_watch_ = false;
  std::vector<std::string> paths_;
  int64_t paths_at_ms_ = -1'000'000;
};

/// Splits a command line into words (blanks separate; no quoting is needed by any command).
std::vector<std::string> split_words(const std::string& line);

}  // namespace keel::shell
