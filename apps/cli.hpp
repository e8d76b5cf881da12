#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "base/error.hpp"

namespace keel::cli {

/// One command-line option: `--name VALUE` when `value` is set, else a switch `--name`.
struct option {
  const char* name;
  const char* value;  // placeholder shown in --help, e.g. "N"; nullptr for a switch
  const char* help;
};

/// Parsed options of one command. Values are checked when read, and errors name the option and
/// the value ("--threads abc: expected an integer").
class options {
 public:
  /// Parses `args` (without the program and command names). `bad_request` for an unknown
  /// option, a missing value, or a stray positional argument beyond `max_positional`.
  static caf::expected<options> parse(std::span<char*> args, std::span<const option> spec,
                                      size_t max_positional = 0);

  bool has(const std::string& name) const { return values_.count(name) > 0; }
  const std::vector<std::string>& positional() const { return positional_; }

  std::string get(const std::string& name, const std::string& fallback = "") const;
  caf::expected<int64_t> get_int(const std::string& name, int64_t fallback, int64_t min,
                                 int64_t max) const;
  caf::expected<double> get_real(const std::string& name, double fallback, double min,
                                 double max) const;
  /// A byte count with an optional K, M, G suffix (powers of 1024).
  caf::expected<uint64_t> get_bytes(const std::string& name, uint64_t fallback) const;

 private:
  std::map<std::string, std::string> values_;
  std::vector<std::string> positional_;
};

/// Writes "PROGRAM: LINE\n" to stderr in one write, so that lines logged from several threads
/// never interleave (tests read some of them, e.g. keel-node's "listening on").
void log_line(const char* program, const std::string& line);

/// A secret kept in a file: its first line, trimmed. An error names `flag` and the path when the
/// file cannot be read or the line is empty.
caf::expected<std::string> read_secret_file(const std::string& flag, const std::string& path);

/// "PATH is readable by other users (mode 0644)..." when users other than the owner can read
/// `path`; "" when they cannot (or it does not exist).
std::string readable_by_others(const std::string& path);

/// The refusal of a secret given on the command line (issue #11: `ps` shows it to every user),
/// naming `flag` and where to put it instead.
caf::error secret_on_command_line(const std::string& flag, const std::string& instead);

/// Whether `args` ask for help (`--help` or `-h`).
bool wants_help(std::span<char*> args);

/// Prints "PROGRAM: <class>: <message>" to stderr; returns the exit status: 2 for a bad request
/// (the caller's mistake), 1 for everything else.
int fail(const char* program, const caf::error& err);

/// A subcommand of a multi-command binary.
struct command {
  const char* name;
  int (*run)(std::span<char*> args);  // args after the command name
};

/// Runs the command named by argv[1]. No command: prints `top_help` and returns 2; `--help`,
/// `-h` or `help`: prints it and returns 0; an unknown name: a one-line error and 2.
int dispatch(int argc, char** argv, const char* program, const char* top_help,
             std::span<const command> commands);

/// The --help text of a command: usage line, description and the option table.
std::string help_text(const std::string& usage, const std::string& description,
                      std::span<const option> spec);

}  // namespace keel::cli
