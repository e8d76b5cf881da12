// keel-shell: the admin's console. Speaks the admin API (wire/keel.capnp `AdminGate`) to one or
// more keel-nodes: their supervision trees, nodes, sessions, kills, restarts, faults and drains
// (docs/shell.md).

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <span>
#include <string>
#include <vector>

#include "apps/cli.hpp"
#include "apps/shell/admin_client.hpp"
#include "apps/shell/line_editor.hpp"
#include "apps/shell/render.hpp"
#include "apps/shell/shell.hpp"
#include "wire/client.hpp"
#include "wire/tls.hpp"

namespace {

using keel::cli::option;

constexpr option spec[] = {
    {"connect", "HOST:PORT,...", "the nodes' admin addresses (keel-node --admin-listen; required)"},
    {"key-file", "FILE", "read the admin key from FILE's first line"},
    {"key", "KEY", "refused: ps shows it to every user (use --key-file or KEEL_ADMIN_KEY)"},
    {"command", "'CMD; ...'", "run these commands and exit (also -c)"},
    {"json", nullptr, "print each command's result as one line of JSON"},
    {"tls-ca", "FILE", "TLS, trusting only this CA certificate (PEM): for nodes with --tls-cert"},
    {"tls-name", "NAME",
     "with --tls-ca: the name the nodes' certificates must carry (default: each address's host)"},
};

constexpr const char* program = "keel-shell";

int fail(const caf::error& err) {
  return keel::cli::fail(program, err);
}

/// The admin key: --key-file, else $KEEL_ADMIN_KEY; never the command line.
caf::expected<std::string> read_key(const keel::cli::options& opts) {
  if (opts.has("key"))
    return keel::cli::secret_on_command_line("key", "give --key-file FILE or set KEEL_ADMIN_KEY");
  if (opts.has("key-file")) {
    auto path = opts.get("key-file");
    if (auto warn = keel::cli::readable_by_others(path); !warn.empty())
      keel::cli::log_line(program, "warning: " + warn);
    return keel::cli::read_secret_file("key-file", path);
  }
  if (const char* env = std::getenv("KEEL_ADMIN_KEY"); env != nullptr && *env != '\0')
    return std::string(env);
  return keel::make_error(keel::errc::bad_request,
                          "no admin key: give --key-file FILE or set KEEL_ADMIN_KEY (the key "
                          "keel-node was started with)");
}

std::string help_text() {
  auto out = keel::cli::help_text(
      "keel-shell --connect HOST:PORT[,...] [--key-file FILE] [-c 'CMD; ...'] [--json]",
      "The admin's console for keel-nodes started with --admin-listen and --admin-key.\n"
      "Interactive on a terminal (line editing, history, tab completion of commands, nodes and\n"
      "paths); reads commands from stdin otherwise; with -c runs those and exits. The exit\n"
      "status is 0, or the first failed command's: 1 failed, 2 wrong usage. See docs/shell.md.",
      spec);
  keel::shell::table t({{"COMMAND"}, {"WHAT IT DOES", false, true}});
  for (auto& c : keel::shell::commands()) t.add({c.usage, c.summary});
  return out + "\ncommands:\n" + t.render();
}

int run(std::vector<std::string> args) {
  for (auto& a : args)
    if (a == "-c") a = "--command";
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  if (keel::cli::wants_help(argv)) {
    std::cout << help_text();
    return 0;
  }
  auto opts = keel::cli::options::parse(argv, spec);
  if (!opts) return fail(opts.error());
  if (!opts->has("connect"))
    return fail(keel::make_error(keel::errc::bad_request,
                                 "--connect HOST:PORT[,...] is required: the nodes' admin "
                                 "addresses (keel-node --admin-listen)"));
  auto endpoints = keel::wire::parse_endpoints(opts->get("connect"));
  if (!endpoints) return fail(endpoints.error());
  auto key = read_key(*opts);
  if (!key) return fail(key.error());
  const bool json = opts->has("json");

  keel::shell::cluster::options copts;
  if (opts->has("tls-ca")) {
    auto tls = keel::wire::tls_config::load({"", "", opts->get("tls-ca")});
    if (!tls) return fail(tls.error());
    copts.tls = std::move(*tls);
    copts.tls_name = opts->get("tls-name");
  } else if (opts->has("tls-name")) {
    return fail(keel::make_error(keel::errc::bad_request, "--tls-name needs --tls-ca FILE"));
  }
  keel::shell::cluster nodes(*endpoints, *key, std::move(copts));
  // A node that refuses the key ends the shell; one that cannot be reached is shown as down.
  if (auto err = nodes.connect()) return fail(err);
  keel::shell::shell sh(nodes, json);
  if (opts->has("command")) return sh.run_line(opts->get("command"));

  keel::shell::line_editor input([&sh](const std::string& before, const std::string& word) {
    return sh.complete(before, word);
  });
  sh.set_terminal(input.interactive());
  if (input.interactive()) {
    std::string status;
    for (auto& m : nodes.members()) {
      status += status.empty() ? "" : ", ";
      status +=
          (m.name.empty() ? m.address : m.name) + (m.up ? "" : " (down: " + m.down_reason + ")");
    }
    std::fprintf(stderr, "keel-shell: nodes %s; 'help' lists the commands, 'quit' leaves\n",
                 status.c_str());
  }
  int result = 0;
  std::string line;
  while (!sh.quitting() && input.read("keel> ", line)) {
    int s = sh.run_line(line);
    if (result == 0) result = s;
  }
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  return run(std::vector<std::string>(argv + 1, argv + argc));
}
