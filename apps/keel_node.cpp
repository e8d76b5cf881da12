// keel-node: one Keel node. Serves a model's sessions to clients over Cap'n Proto
// (wire/keel.capnp) until SIGTERM or SIGINT.

#include <signal.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <iostream>
#include <map>
#include <stop_token>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <thread>
#include <vector>

#include <unistd.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/admin.hpp"
#include "actors/gateway.hpp"
#include <execinfo.h>

#include <exception>

#include <kj/exception.h>

#include "actors/node.hpp"
#include "actors/peer_server.hpp"
#include "apps/cli.hpp"
#include "kernels/digest.hpp"
#include "apps/node_log.hpp"
#include "apps/sd_notify.hpp"

#include <sys/resource.h>
#include <sys/stat.h>

namespace {

using keel::cli::option;

constexpr option spec[] = {
    {"listen", "HOST:PORT", "address to serve clients on; port 0 picks a free one (required)"},
    {"model", "FILE", "GGUF model or llama2.c checkpoint (required)"},
    {"tokenizer", "FILE", "llama2.c tokenizer.bin (default: beside the model)"},
    {"chat-template", "FILE",
     "the Jinja chat template new chat sessions render with (default: the model's, else "
     "ChatML); a session keeps the one it started with"},
    {"name", "NAME", "this node's name (default: node)"},
    {"region", "NAME", "this node's region, reported to clients (default: none)"},
    {"data", "DIR", "session store directory: sessions survive a restart on it (default: none)"},
    {"shards", "N", "tensor-parallel shards (default 1)"},
    {"threads", "N", "CPU threads per shard (default 1)"},
    {"kv-bytes", "B", "KV cache budget of the node, e.g. 256M (default 256M)"},
    {"max-queue", "N",
     "turns that may wait for KV pages or a batch slot; beyond it the lowest priority waiting "
     "turn is shed with a retry-after (default 256)"},
    {"guardrail-rules", "FILE",
     "check prompts and replies against the patterns in FILE (one per line: a phrase, or "
     "'re: REGEX'; 'prompt:' or 'output:' first for one stage only; '#' comments): a prompt "
     "that matches is refused, a reply that matches is stopped (docs/operations.md, "
     "\"Guardrails\"; default: none)"},
    {"guardrail-deadline", "MS", "how long a turn waits for a guardrail check (default 250)"},
    {"guardrail-failure", "open|closed",
     "when a check cannot be had in time (the guardrail is slow, busy or restarting): 'open' "
     "lets the turn go on (logged and counted), 'closed' refuses it with a retry-after "
     "(default open)"},
    {"guardrail-every", "N", "check the reply every N tokens (default 16)"},
    {"degrade-below", "PRIORITY",
     "degrade before shedding: once more than --degrade-above of the KV budget is taken (and no "
     "peer has more room), new sessions of a priority below PRIORITY get a shorter context "
     "(--degrade-context), so that their turns reserve fewer KV pages (default: off)"},
    {"degrade-context", "TOKENS",
     "the context of a session opened degraded (default: a quarter of the model's)"},
    {"degrade-above", "PERCENT", "the KV use past which new sessions are degraded (default 80)"},
    {"spread-above", "PERCENT",
     "with peers: once more than PERCENT of the KV budget is taken by running and waiting "
     "turns, open new sessions on a peer with more room, as its heartbeats report it (default "
     "80; 100: never)"},
    {"stall-timeout", "MS",
     "cut off a client that does not read its stream for MS ms (default "
     "10000)"},
    {"peer-listen", "HOST:PORT",
     "address to serve other nodes on (wire/peer.capnp); port 0 picks a free one (default: "
     "none)"},
    {"peers", "NAME=HOST:PORT,...",
     "the other nodes: each one's name (under TLS its certificate must name it) and peer "
     "address. With peers every session lives in a group of nodes under the ownership "
     "protocol (docs/actors.md); without, the node runs alone and its store is the only copy"},
    {"heartbeat-interval", "MS", "region link heartbeat interval (default 100)"},
    {"down-after", "MS", "declare a peer down after MS ms without a heartbeat (default 500)"},
    {"replicas", "N",
     "replicas of each session: its group is its owner and N other nodes, one member per "
     "region first (default 2, or 1 with one peer); a new session or turn is acknowledged once "
     "a majority of the group stored it. Every node of a cluster needs the same value"},
    {"peer-regions", "NAME=REGION,...",
     "each peer's region, as its --region says (a session's group takes one member per region "
     "first, so that it outlives a region's loss; default: none). Every node of a cluster needs "
     "the same view"},
    {"keys", "FILE",
     "API keys of the client port, one a line: KEY tenant=NAME class=batch|standard|interactive "
     "rpm=N tpm=N sessions=N (mode 600). Without it the port serves anyone, on loopback only"},
    {"admin-listen", "HOST:PORT", "the admin API's address (keel-shell); port 0 picks a free one"},
    {"http-listen", "HOST:PORT",
     "serve HTTP here (GET /health, /ready, /metrics, /v1/models; HTTPS with --tls-cert); port 0 "
     "picks a free one (default: no HTTP port). Without --keys, loopback only"},
    {"admin-key", "KEY",
     "the key keel-shell must give, in the --config file only (default: none; the admin API "
     "refuses all)"},
    {"admin-key-file", "FILE",
     "read the admin key from FILE's first line (or set KEEL_ADMIN_KEY; never on the command "
     "line)"},
    {"tls-cert", "FILE",
     "this node's certificate (PEM, signed by --tls-ca, common name = --name): TLS on the "
     "client, peer and admin ports; without it the peer and admin ports serve loopback only"},
    {"tls-key", "FILE", "the private key of --tls-cert (PEM)"},
    {"tls-ca", "FILE", "the cluster's CA certificate (PEM), the only one trusted"},
    {"max-connections", "N", "client connections open at once (default 1024)"},
    {"max-connections-per-address", "N",
     "client connections open at once from one IP address (default 256)"},
    {"max-unread", "BYTES",
     "answers queued for a client that does not read them, e.g. 16M, before it is cut off "
     "(default 16M)"},
    {"frame-timeout", "MS",
     "close a client connection whose message stays unfinished for MS ms (default 30000)"},
    {"shutdown-timeout", "MS",
     "SIGTERM or SIGINT drains the node (new sessions refused, every session handed to a peer, "
     "running turns continue there), then stops it; past MS milliseconds it exits anyway "
     "(default 30000; what was acknowledged is synced, so nothing acknowledged is lost). A "
     "second SIGTERM or SIGINT cuts the drain short and stops at once"},
    {"stop-timeout", "MS", "the older name of --shutdown-timeout"},
    {"log-format", "text|json",
     "text: 'keel-node: MESSAGE' lines; json: one JSON object per line with time, level, "
     "program, node, message and, when known, component, actor, session (default text)"},
    {"config", "FILE", "'key = value' lines with the names of these options; flags override"},
};

constexpr const char* program = "keel-node";

int fail(const caf::error& err) {
  return keel::cli::fail(program, err);
}

std::string trim(const std::string& s) {
  auto b = s.find_first_not_of(" \t\r");
  if (b == std::string::npos) return {};
  auto e = s.find_last_not_of(" \t\r");
  return s.substr(b, e - b + 1);
}

/// The options of a config file as `--key value` arguments: `key = value` lines, `#` comments,
/// blank lines. A key that is not an option (or is `config`) is an error naming it and its line.
caf::expected<std::vector<std::string>> read_config(const std::string& path) {
  std::ifstream in(path);
  if (!in) return keel::make_error(keel::errc::bad_request, path + ": cannot open the file");
  std::vector<std::string> out;
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    auto text = trim(line);
    if (text.empty() || text[0] == '#') continue;
    auto where = path + ":" + std::to_string(number);
    auto eq = text.find('=');
    if (eq == std::string::npos) {
      return keel::make_error(keel::errc::bad_request,
                              where + ": expected 'key = value', got '" + text + "'");
    }
    auto key = trim(text.substr(0, eq));
    auto value = trim(text.substr(eq + 1));
    bool known = false;
    for (auto& o : spec) known = known || (key == o.name && o.value != nullptr);
    if (!known || key == "config")
      return keel::make_error(keel::errc::bad_request, where + ": unknown key '" + key + "'");
    out.push_back("--" + key);
    out.push_back(value);
  }
  return out;
}

/// Whether `host` names this machine only: 127.0.0.0/8, ::1, localhost.
bool loopback(const std::string& host) {
  return host == "localhost" || host == "::1" || host == "[::1]" || host.rfind("127.", 0) == 0;
}

/// "HOST:PORT" (the host may be bracketed: "[::1]:7000").
caf::expected<std::pair<std::string, uint16_t>> parse_listen(const std::string& s,
                                                             const std::string& flag = "listen") {
  auto colon = s.rfind(':');
  auto bad = [&] {
    return keel::make_error(keel::errc::bad_request,
                            "--" + flag + " " + s + ": expected HOST:PORT with PORT in [0, 65535]");
  };
  if (colon == std::string::npos || colon == 0) return bad();
  auto host = s.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']')
    host = host.substr(1, host.size() - 2);
  auto port = s.substr(colon + 1);
  if (port.empty() || port.size() > 5 || port.find_first_not_of("0123456789") != port.npos)
    return bad();
  auto n = std::stoul(port);
  if (n > 65535) return bad();
  return std::make_pair(host, static_cast<uint16_t>(n));
}

/// A port that trusts its callers (peer, admin) is served beyond this host only over TLS.
caf::error loopback_without_tls(const std::pair<std::string, uint16_t>& at, const std::string& flag,
                                bool tls) {
  if (tls || loopback(at.first)) return {};
  return keel::make_error(keel::errc::bad_request,
                          "--" + flag + " " + at.first + ":" + std::to_string(at.second) +
                              ": without TLS this port serves loopback only (127.0.0.1, ::1); "
                              "give --tls-cert, --tls-key and --tls-ca to serve other hosts");
}

/// Raises the soft limit on open files to the hard one, so that many clients (each a socket)
/// do not run the node out of descriptors, and says what the limit is.
void raise_open_file_limit(const keel::cli::node_log& log) {
  rlimit rl{};
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
  auto was = rl.rlim_cur;
  if (rl.rlim_cur < rl.rlim_max) {
    rl.rlim_cur = rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) != 0) rl.rlim_cur = was;
  }
  log.line("open files: limit " + std::to_string(rl.rlim_cur) +
                                   (rl.rlim_cur != was ? " (raised from " + std::to_string(was) + ")"
                                                       : ""));
}

/// Sends `state` to systemd, logging (not failing) when it cannot.
void notify(const keel::sd::notifier& n, const std::string& state,
            const keel::cli::node_log& log) {
  if (auto err = n.notify(state))
    log.line("systemd: " + keel::describe(err), keel::cli::log_level::warning);
}

/// What run() started and a shutdown stops, in this order. Owned by run().
struct serving {
  keel::admin* adm = nullptr;  // null without --admin-listen
  keel::gateway* gw = nullptr;
  keel::node* nd = nullptr;
  keel::peer_server* ps = nullptr;  // null without --peer-listen

  /// The clean stop: the ports close, then the node's tree stops in reverse start order.
  void stop() const {
    if (adm) adm->stop();
    gw->stop();
    if (ps) ps->on_ownership({});
    if (ps) ps->set_readiness({});
    nd->stop();
    if (ps) ps->stop();
  }
};

/// The drain a stop signal starts: every session handed to another member of its group
/// (node::drain), each move logged, for at most `budget` or until `cut_short` is requested.
void drain_for_shutdown(keel::node& nd, const keel::cli::node_log& log, std::stop_token cut_short,
                        std::chrono::milliseconds budget) {
  using keel::cli::log_level;
  if (nd.config().peers.empty()) {
    log.line("drain: no peers (--peers), so no session can move; stopping");
    return;
  }
  keel::node::drain_options o;
  o.patience = budget;
  o.stop = cut_short;
  o.skip_unreachable = true;  // the last node up does not wait for a takeover none can make
  auto moved = nd.drain(o);
  if (!moved) {
    log.line("drain: " + keel::describe(moved.error()) + "; stopping without it",
             log_level::warning);
    return;
  }
  std::map<std::string, size_t> to;
  size_t stayed = 0;
  for (auto& d : *moved) {
    if (d.error.empty()) {
      ++to[d.to];
      log.line("drain: session " + d.id + " -> " + d.to + " (epoch " + std::to_string(d.epoch) +
               ")");
    } else {
      ++stayed;
      log.line("drain: session " + d.id + " stayed: " + d.error +
                   "; its group's majority holds it, and another member takes it over once this "
                   "node is gone",
               log_level::warning);
    }
  }
  std::string where;
  for (auto& [node, n] : to) where += (where.empty() ? "" : ", ") + node + " " + std::to_string(n);
  log.line("drain: " + std::to_string(moved->size() - stayed) + " of " +
               std::to_string(moved->size()) + " session(s) moved" +
               (where.empty() ? "" : " (to " + where + ")") +
               (stayed == 0 ? "" : "; " + std::to_string(stayed) + " stayed"),
           stayed == 0 ? log_level::info : log_level::warning);
}

/// Waits for SIGTERM or SIGINT (blocked in every thread, `signals`), then drains and stops
/// `parts` within `timeout`: the drain gets what the stop does not need (at most three
/// quarters of it, the stop at least a quarter up to 5 s). A second signal during the drain cuts
/// it short and stops at once (one during the stop changes nothing); past the timeout the process
/// ends with status 3 (every acknowledged write is already synced: as safe as a crash, issue #11).
/// `before_stop` runs when the drain ends. Returns the exit status.
int shut_down(const sigset_t& signals, const serving& parts, std::chrono::milliseconds timeout,
              const keel::sd::notifier* sdn, const keel::cli::node_log& log,
              std::function<void()> before_stop) {
  using keel::cli::log_level;
  int sig = 0;
  sigwait(&signals, &sig);
  auto ms = std::to_string(timeout.count());
  log.line(std::string(strsignal(sig)) + ": draining, then stopping within " + ms +
           " ms (--shutdown-timeout); a second SIGTERM or SIGINT stops at once");
  if (sdn) notify(*sdn, "STOPPING=1\nSTATUS=draining: handing sessions to peers", log);
  // The bound (issue #11: a worker stuck in a stall held SIGTERM in await_detached_threads).
  std::thread([&log, timeout, ms] {
    std::this_thread::sleep_for(timeout);
    log.line("did not stop within " + ms + " ms (--shutdown-timeout); exiting now",
             log_level::error);
    _exit(3);
  }).detach();
  auto reserve = std::min<std::chrono::milliseconds>(timeout / 4, std::chrono::seconds(5));
  std::stop_source cut_short;
  std::atomic<bool> stopping{false}, done{false};
  std::thread worker([&] {
    drain_for_shutdown(*parts.nd, log, cut_short.get_token(), timeout - reserve);
    stopping = true;
    log.line("stopping");
    if (sdn) notify(*sdn, "STATUS=stopping", log);
    if (before_stop) before_stop();
    parts.stop();
    done = true;
  });
  while (!done) {
    timespec poll{0, 50'000'000};
    int again = sigtimedwait(&signals, nullptr, &poll);
    if (again <= 0) continue;
    if (!stopping) {
      log.line(std::string(strsignal(again)) + " again: the drain is cut short; stopping now",
               log_level::warning);
      cut_short.request_stop();
    } else {
      // The clean stop is short; --shutdown-timeout bounds one that hangs.
      log.line(std::string(strsignal(again)) + " again: already stopping (within " + ms +
               " ms, --shutdown-timeout)");
    }
  }
  worker.join();
  log.line("stopped");
  return 0;
}

int run(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-node --listen HOST:PORT --model FILE [OPTIONS]",
        "Runs one Keel node: loads the model, starts the node's actors and serves clients on "
        "HOST:PORT until SIGTERM or SIGINT, which drain it (its sessions move to its peers) "
        "and stop it within --shutdown-timeout. Logs go to stderr, among them one line "
        "'keel-node: listening on HOST:PORT' with the bound port (--log-format json: an object "
        "whose message is 'listening on HOST:PORT'). Run by systemd (Type=notify, "
        "$NOTIFY_SOCKET) it reports READY=1, STOPPING=1 and, with WatchdogSec, WATCHDOG=1 while "
        "healthy (deploy/keel-node.service).",
        spec);
    return 0;
  }
  auto flags = keel::cli::options::parse(args, spec);
  if (!flags) return fail(flags.error());
  // Config-file entries first, then the command line: a later value wins.
  std::vector<std::string> merged;
  if (flags->has("config")) {
    auto file = read_config(flags->get("config"));
    if (!file) return fail(file.error());
    merged = std::move(*file);
  }
  for (auto* a : args) merged.emplace_back(a);
  std::vector<char*> argv;
  for (auto& a : merged) argv.push_back(a.data());
  auto opts = keel::cli::options::parse(argv, spec);
  if (!opts) return fail(opts.error());
  auto format = keel::cli::parse_log_format(opts->get("log-format", "text"));
  if (!format) return fail(format.error());
  // From here on every line, errors included, is in the chosen format.
  keel::cli::node_log logger(program, *format);
  logger.set_node(opts->get("name", "node"));
  auto fail = [&logger](const caf::error& err) { return logger.fail(err); };
  constexpr auto warning = keel::cli::log_level::warning;

  if (!opts->has("listen"))
    return fail(keel::make_error(keel::errc::bad_request, "--listen HOST:PORT is required"));
  if (!opts->has("model"))
    return fail(keel::make_error(keel::errc::bad_request, "--model FILE is required"));
  auto listen = parse_listen(opts->get("listen"));
  if (!listen) return fail(listen.error());
  // Who may use the client port (docs/operations.md, "Security model").
  std::shared_ptr<const keel::key_table> keys;
  if (opts->has("keys")) {
    auto k = keel::key_table::load(opts->get("keys"));
    if (!k) return fail(k.error());
    keys = std::make_shared<const keel::key_table>(std::move(*k));
  } else if (!loopback(listen->first)) {
    return fail(keel::make_error(
        keel::errc::bad_request,
        "--listen " + opts->get("listen") +
            ": without --keys FILE the client port serves anyone, so it listens only on a "
            "loopback address (127.0.0.1, ::1, localhost); give --keys FILE to serve " +
            listen->first));
  }
  // The HTTP port: off unless asked for, and like the client port kept to this host unless
  // the cluster is run with API keys.
  std::optional<std::pair<std::string, uint16_t>> http_listen;
  if (opts->has("http-listen")) {
    auto hl = parse_listen(opts->get("http-listen"), "http-listen");
    if (!hl) return fail(hl.error());
    if (!keys && !loopback(hl->first))
      return fail(keel::make_error(
          keel::errc::bad_request,
          "--http-listen " + opts->get("http-listen") +
              ": without --keys FILE the HTTP port listens only on a loopback address "
              "(127.0.0.1, ::1, localhost)"));
    http_listen = *hl;
  }
  auto shards = opts->get_int("shards", 1, 1, 64);
  auto threads = opts->get_int("threads", 1, 1, 1024);
  auto kv_bytes = opts->get_bytes("kv-bytes", 256ull << 20);
  auto stall = opts->get_int("stall-timeout", 10000, 1, 24 * 3600 * 1000);
  auto guard_deadline = opts->get_int("guardrail-deadline", 250, 1, 60 * 1000);
  auto guard_every = opts->get_int("guardrail-every", 16, 1, 1 << 20);
  if (!guard_deadline) return fail(guard_deadline.error());
  if (!guard_every) return fail(guard_every.error());
  auto guard_failure = opts->get("guardrail-failure");
  if (!guard_failure.empty() && guard_failure != "open" && guard_failure != "closed")
    return fail(keel::make_error(keel::errc::bad_request,
                                 "--guardrail-failure must be open or closed, got '" +
                                     guard_failure + "'"));
  auto degrade_below = opts->get_int("degrade-below", 0, -(1 << 30), 1 << 30);
  auto degrade_context = opts->get_int("degrade-context", 0, 1, 1 << 24);
  auto degrade_above = opts->get_int("degrade-above", 80, 0, 100);
  if (!degrade_below) return fail(degrade_below.error());
  if (opts->has("degrade-context") && !degrade_context) return fail(degrade_context.error());
  if (!degrade_above) return fail(degrade_above.error());
  auto max_queue = opts->get_int("max-queue", 256, 0, 1 << 20);
  auto spread_above = opts->get_int("spread-above", 80, 0, 100);
  if (!max_queue) return fail(max_queue.error());
  if (!spread_above) return fail(spread_above.error());
  if (!shards) return fail(shards.error());
  if (!threads) return fail(threads.error());
  if (!kv_bytes) return fail(kv_bytes.error());
  if (!stall) return fail(stall.error());
  auto heartbeat = opts->get_int("heartbeat-interval", 100, 1, 60 * 1000);
  auto down_after = opts->get_int("down-after", 500, 2, 10 * 60 * 1000);
  // --stop-timeout is the older name of --shutdown-timeout: scripts that give it keep working.
  if (opts->has("stop-timeout") && opts->has("shutdown-timeout"))
    return fail(keel::make_error(keel::errc::bad_request,
                                 "--stop-timeout " + opts->get("stop-timeout") +
                                     " and --shutdown-timeout " + opts->get("shutdown-timeout") +
                                     ": give one (--stop-timeout is its older name)"));
  auto shutdown_timeout =
      opts->get_int(opts->has("stop-timeout") ? "stop-timeout" : "shutdown-timeout", 30000, 100,
                    60 * 60 * 1000);
  if (!shutdown_timeout) return fail(shutdown_timeout.error());
  if (!heartbeat) return fail(heartbeat.error());
  if (!down_after) return fail(down_after.error());
  std::vector<std::string> peers, peer_names;
  if (opts->has("peers")) {
    std::string list = opts->get("peers");
    for (size_t b = 0; b <= list.size();) {
      auto e = list.find(',', b);
      if (e == std::string::npos) e = list.size();
      auto one = trim(list.substr(b, e - b));
      if (!one.empty()) {
        auto eq = one.find('=');
        if (eq == std::string::npos)
          return fail(keel::make_error(
              keel::errc::bad_request,
              "--peers " + one + ": every peer needs its node name, NAME=HOST:PORT (each "
              "session's group of nodes is chosen by name)"));
        std::string name = trim(one.substr(0, eq));
        one = trim(one.substr(eq + 1));
        if (name.empty())
          return fail(keel::make_error(keel::errc::bad_request,
                                       "--peers: '=" + one + "' has an empty node name"));
        auto hp = parse_listen(one, "peers");
        if (!hp) return fail(hp.error());
        peers.push_back(one);
        peer_names.push_back(name);
      }
      b = e + 1;
    }
  }
  // TLS on every port, or none (issue #11): a node without it keeps its peer and admin ports to
  // this host, where anyone who reaches them is already on the machine.
  std::shared_ptr<const keel::wire::tls_config> tls;
  if (opts->has("tls-cert") || opts->has("tls-key") || opts->has("tls-ca")) {
    if (!opts->has("tls-cert") || !opts->has("tls-key") || !opts->has("tls-ca"))
      return fail(keel::make_error(keel::errc::bad_request,
                                   "TLS needs all of --tls-cert, --tls-key and --tls-ca"));
    auto t = keel::wire::tls_config::load(
        {opts->get("tls-cert"), opts->get("tls-key"), opts->get("tls-ca")});
    if (!t) return fail(t.error());
    tls = std::move(*t);
  }
  std::optional<std::pair<std::string, uint16_t>> peer_listen;
  if (opts->has("peer-listen")) {
    auto pl = parse_listen(opts->get("peer-listen"), "peer-listen");
    if (!pl) return fail(pl.error());
    if (auto err = loopback_without_tls(*pl, "peer-listen", tls != nullptr)) return fail(err);
    peer_listen = *pl;
  }

  // The admin endpoint (keel-shell, docs/shell.md): its own port, and only with a key.
  std::optional<std::pair<std::string, uint16_t>> admin_listen;
  if (opts->has("admin-listen")) {
    auto al = parse_listen(opts->get("admin-listen"), "admin-listen");
    if (!al) return fail(al.error());
    if (auto err = loopback_without_tls(*al, "admin-listen", tls != nullptr)) return fail(err);
    admin_listen = *al;
  }
  // The admin key: from the config file, a key file or the environment; never the command line,
  // where ps shows it to every user of the host.
  for (auto* a : args)
    if (std::string(a) == "--admin-key")
      return fail(keel::cli::secret_on_command_line(
          "admin-key", "put 'admin-key = KEY' in the --config file, give --admin-key-file FILE, "
                       "or set KEEL_ADMIN_KEY"));
  std::string admin_key;
  if (opts->has("admin-key")) {
    admin_key = opts->get("admin-key");
    if (auto warn = keel::cli::readable_by_others(opts->get("config")); !warn.empty())
      logger.line("warning: the config file holds the admin key, and " + warn, warning);
  } else if (opts->has("admin-key-file")) {
    if (auto warn = keel::cli::readable_by_others(opts->get("admin-key-file")); !warn.empty())
      logger.line("warning: " + warn, warning);
    auto k = keel::cli::read_secret_file("admin-key-file", opts->get("admin-key-file"));
    if (!k) return fail(k.error());
    admin_key = *k;
  } else if (const char* env = std::getenv("KEEL_ADMIN_KEY"); env != nullptr && *env != '\0') {
    admin_key = env;
  }
  if (!admin_key.empty() && !admin_listen)
    return fail(keel::make_error(keel::errc::bad_request,
                                 "--admin-key needs --admin-listen HOST:PORT to serve the admin "
                                 "API on"));
  if (!admin_key.empty() && admin_key.size() < 8)
    return fail(keel::make_error(keel::errc::bad_request,
                                 "--admin-key: the key has " +
                                     std::to_string(admin_key.size()) +
                                     " characters, at least 8 are needed"));

  keel::node_config ncfg;
  ncfg.name = opts->get("name", "node");
  ncfg.model_path = opts->get("model");
  ncfg.tokenizer_path = opts->get("tokenizer");
  if (opts->has("chat-template")) {
    std::ifstream in(opts->get("chat-template"), std::ios::binary);
    if (!in)
      return fail(keel::make_error(keel::errc::bad_request,
                                   "--chat-template " + opts->get("chat-template") +
                                       ": cannot open the file"));
    ncfg.chat_template.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    if (ncfg.chat_template.empty())
      return fail(keel::make_error(keel::errc::bad_request,
                                   "--chat-template " + opts->get("chat-template") +
                                       ": the file is empty"));
  }
  ncfg.shards = static_cast<int32_t>(*shards);
  ncfg.threads_per_shard = static_cast<int32_t>(*threads);
  ncfg.kv_bytes = *kv_bytes;
  ncfg.batching.max_queue = static_cast<int32_t>(*max_queue);
  if (opts->has("degrade-below")) ncfg.degrade_below = static_cast<int32_t>(*degrade_below);
  ncfg.degrade_room = 1.0 - static_cast<double>(*degrade_above) / 100.0;
  if (opts->has("degrade-context")) ncfg.degrade_context = static_cast<int32_t>(*degrade_context);
  if (opts->has("guardrail-rules")) {
    // Read now, so that a bad file stops the start with its line named; each (re)start of the
    // guardrail reads it again.
    auto path = opts->get("guardrail-rules");
    auto rules = keel::rule_filter::load(path);
    if (!rules) return fail(rules.error());
    ncfg.guard.origin = path + " (" + std::to_string((*rules)->size()) + " rules)";
    ncfg.guard.make = [path]() -> caf::expected<std::unique_ptr<keel::guard_filter>> {
      auto r = keel::rule_filter::load(path);
      if (!r) return std::move(r.error());
      return std::unique_ptr<keel::guard_filter>(std::move(*r));
    };
    ncfg.guard.deadline = std::chrono::milliseconds(*guard_deadline);
    ncfg.guard.output_every = static_cast<int32_t>(*guard_every);
    ncfg.guard.on_failure =
        guard_failure == "closed" ? keel::guard_failure::closed : keel::guard_failure::open;
  }
  ncfg.keep_room = 1.0 - static_cast<double>(*spread_above) / 100.0;
  ncfg.data_dir = opts->get("data");
  // The store holds every conversation in clear (new files are the owner's only: umask below).
  if (auto warn = keel::cli::readable_by_others(ncfg.data_dir); !ncfg.data_dir.empty() && !warn.empty())
    logger.line("warning: the session store " + warn, warning);
  ncfg.region = opts->get("region");
  // Two replicas once there are three nodes: a group of three keeps acknowledging with one
  // member lost (a group of two would stop at any loss).
  auto replicas = opts->get_int("replicas", peers.size() >= 2 ? 2 : 1, 1, 16);
  if (!replicas) return fail(replicas.error());
  if (!peers.empty() && static_cast<size_t>(*replicas) > peers.size())
    return fail(keel::make_error(keel::errc::bad_request,
                                 "--replicas " + std::to_string(*replicas) + ": there are only " +
                                     std::to_string(peers.size()) + " peer(s) to hold them"));
  ncfg.peers = std::move(peers);
  ncfg.peer_names = peer_names;
  ncfg.tls = tls;
  ncfg.heartbeat_interval = std::chrono::milliseconds(*heartbeat);
  ncfg.down_after = std::chrono::milliseconds(*down_after);
  ncfg.group_size = static_cast<int32_t>(*replicas) + 1;
  if (opts->has("peer-regions")) {
    std::string list = opts->get("peer-regions");
    for (size_t b = 0; b <= list.size();) {
      auto e = list.find(',', b);
      if (e == std::string::npos) e = list.size();
      auto one = trim(list.substr(b, e - b));
      if (!one.empty()) {
        auto eq = one.find('=');
        auto name = eq == std::string::npos ? std::string() : trim(one.substr(0, eq));
        if (name.empty() ||
            std::find(ncfg.peer_names.begin(), ncfg.peer_names.end(), name) == ncfg.peer_names.end())
          return fail(keel::make_error(keel::errc::bad_request,
                                       "--peer-regions: '" + one +
                                           "' is not NAME=REGION with NAME one of --peers"));
        ncfg.peer_regions[name] = trim(one.substr(eq + 1));
      }
      b = e + 1;
    }
  }
  keel::gateway_config gcfg;
  gcfg.host = listen->first;
  gcfg.port = listen->second;
  gcfg.region = opts->get("region");
  gcfg.stall_timeout = std::chrono::milliseconds(*stall);
  gcfg.keys = keys;
  gcfg.log = [&logger](const std::string& line) { logger.line_from("gateway", line); };
  gcfg.tls = tls;
  auto max_conn = opts->get_int("max-connections", 1024, 1, 1 << 20);
  auto per_address = opts->get_int("max-connections-per-address", 256, 1, 1 << 20);
  auto max_unread = opts->get_bytes("max-unread", 16ull << 20);
  if (!max_conn) return fail(max_conn.error());
  if (!per_address) return fail(per_address.error());
  if (!max_unread) return fail(max_unread.error());
  gcfg.limits.connections = static_cast<size_t>(*max_conn);
  gcfg.limits.per_address = static_cast<size_t>(*per_address);
  gcfg.limits.max_unread = static_cast<size_t>(*max_unread);
  auto frame_timeout = opts->get_int("frame-timeout", 30000, 10, 3600 * 1000);
  if (!frame_timeout) return fail(frame_timeout.error());
  gcfg.limits.frame_timeout = *frame_timeout * kj::MILLISECONDS;
  if (http_listen) {
    keel::http_config hcfg;
    hcfg.host = http_listen->first;
    hcfg.port = http_listen->second;
    gcfg.http = hcfg;
  }

  // Block the stop signals before any thread starts, so that every thread inherits the mask
  // and only sigwait below receives them.
  raise_open_file_limit(logger);
  // Sessions are conversations: the store's files (and anything else the node creates) are
  // for this user only (issue #11).
  umask(077);
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGTERM);
  sigaddset(&stop_signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  // systemd (Type=notify): READY=1 once every port serves, STOPPING=1 when a drain starts,
  // WATCHDOG=1 while the node is healthy. Nothing without $NOTIFY_SOCKET.
  std::shared_ptr<const keel::sd::notifier> sdn;
  std::optional<std::chrono::microseconds> watchdog_every;
  if (auto n = keel::sd::notifier::from_environment(); !n) {
    logger.line("systemd: " + keel::describe(n.error()) + "; not notifying", warning);
  } else if (*n) {
    sdn = std::make_shared<const keel::sd::notifier>(std::move(**n));
    auto w = keel::sd::watchdog_period(std::getenv("WATCHDOG_USEC"), std::getenv("WATCHDOG_PID"),
                                       getpid());
    if (!w)
      logger.line("systemd: " + keel::describe(w.error()) + "; no watchdog pings", warning);
    else
      watchdog_every = *w;
    logger.line("systemd: notifying " + sdn->address() +
                (watchdog_every ? ", watchdog ping every " +
                                      std::to_string(watchdog_every->count() / 1000) + " ms"
                                : std::string()));
  }

  caf::actor_system_config sys_cfg;
  keel::tune_actor_system(sys_cfg);
  caf::actor_system sys{sys_cfg};
  caf::actor watchdog;  // with WATCHDOG_USEC; ended before the tree stops
  auto log = std::make_shared<keel::supervision_log>(keel::supervision_log::event_sink_fn(
      [&logger](const keel::supervision_event* e, const std::string& line) {
        logger.supervision(e, line);
      }));
  // The model's digest, which every new session is pinned to (and the peers learn from the
  // heartbeats): read once here, before anything serves.
  {
    auto started = std::chrono::steady_clock::now();
    auto digest = keel::file_digest(ncfg.model_path);
    if (!digest) return fail(digest.error());
    ncfg.model_digest = *digest;
    logger.line("model " + ncfg.model_path + ": digest " + *digest + " (" +
                std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                   std::chrono::steady_clock::now() - started)
                                   .count()) +
                " ms)");
  }
  // The peer endpoint first: the node's links name it in their heartbeats.
  std::unique_ptr<keel::peer_server> peer_srv;
  ncfg.cut = std::make_shared<keel::partition>();  // shared by the node and its peer endpoint
  if (peer_listen) {
    keel::peer_server_config pcfg;
    pcfg.host = peer_listen->first;
    pcfg.port = peer_listen->second;
    pcfg.name = ncfg.name;
    pcfg.region = ncfg.region;
    pcfg.cut = ncfg.cut;
    pcfg.tls = tls;
    pcfg.cluster = keel::cluster_digest(ncfg);
    pcfg.model_digest = ncfg.model_digest;
    for (auto& n : peer_names)
      if (!n.empty()) pcfg.peers.push_back(n);
    pcfg.log = [&logger](const std::string& line) { logger.line_from("peers", line); };
    auto ps = keel::peer_server::start(pcfg);
    if (!ps) return fail(ps.error());
    peer_srv = std::move(*ps);
    ncfg.peer_address = peer_srv->address();
    logger.line("serving peers on " + peer_srv->address());
  }
  // The node's environment, built here once: the real clock, randomness, store, transport and
  // threads (tests give their own; actors/node_env.hpp).
  auto env = keel::node_env::real();
  auto nd = keel::node::start(sys, ncfg, log, env);
  if (!nd) return fail(nd.error());
  auto gw = keel::gateway::start(sys, **nd, gcfg);
  if (!gw) return fail(gw.error());
  if (peer_srv) {
    // Peers learn where this node serves clients (they forward requests here); the ownership
    // protocol's messages go to the node's host.
    peer_srv->set_client_address((*gw)->address());
    (*nd)->on_draining([ps = peer_srv.get()] { ps->set_draining(true); });
    peer_srv->set_readiness([n = nd->get()] { return n->not_ready(); });
    peer_srv->set_load([n = nd->get()] { return n->load(); });
    peer_srv->on_ownership([n = nd->get()](const std::string& from, std::string message) {
      n->deliver_ownership(from, std::move(message));
    });
  }
  logger.line("listening on " + (*gw)->address());
  if (http_listen) logger.line("http on " + (*gw)->http_address());
  if (keys) {
    std::set<std::string> tenants;
    for (auto& k : keys->keys()) tenants.insert(k.tenant);
    logger.line("client port: " + std::to_string(keys->keys().size()) +
                                     " API key(s) of " + std::to_string(tenants.size()) +
                                     " tenant(s) from " + opts->get("keys") + "; clients log in");
  } else {
    logger.line(
                        "client port open to anyone on this host (no --keys): every "
                        "local user can read and write every session");
  }
  logger.line("node " + ncfg.name + ", model " + ncfg.model_path + ", " +
                                   std::to_string(ncfg.shards) + " shard(s) x " +
                                   std::to_string(ncfg.threads_per_shard) + " thread(s)" +
                                   (gcfg.region.empty() ? "" : ", region " + gcfg.region) +
                                   (opts->has("data") ? ", data " + opts->get("data") : ""));
  if (ncfg.guard.make)
    logger.line("guardrail: " + ncfg.guard.origin + ", " +
                std::to_string(ncfg.guard.deadline.count()) + " ms per check, failing " +
                (ncfg.guard.on_failure == keel::guard_failure::open ? "open" : "closed") +
                ", replies checked every " + std::to_string(ncfg.guard.output_every) + " tokens");
  {
    const auto& b = (*nd)->config().batching;
    logger.line("KV cache: " + std::to_string(b.kv_pages) + " pages of " +
                std::to_string(b.page_tokens) + " tokens per shard (--kv-bytes " +
                std::to_string(ncfg.kv_bytes) + "); at most " + std::to_string(b.max_queue) +
                " turns wait" +
                (ncfg.peers.empty() || ncfg.keep_room <= 0
                     ? std::string()
                     : "; new sessions go to peers with more room once " +
                           std::to_string(static_cast<int>(100 - ncfg.keep_room * 100 + 0.5)) +
                           "% is taken"));
  }
  logger.line(
      tls ? "TLS on the client, peer and admin ports: certificate " +
                         opts->get("tls-cert") + ", CA " + opts->get("tls-ca") +
                         (peer_listen ? "; peers must present certificates naming them" : "")
                   : "no TLS (no --tls-cert): the peer and admin ports serve loopback only, and "
                     "trust whoever reaches them there");
  std::unique_ptr<keel::admin> adm;
  if (admin_listen) {
    keel::admin_config acfg;
    acfg.host = admin_listen->first;
    acfg.port = admin_listen->second;
    acfg.key = admin_key;
    acfg.client_address = (*gw)->address();
    acfg.log = [&logger](const std::string& line) { logger.line_from("admin", line); };
    acfg.tls = tls;
    auto a = keel::admin::start(sys, **nd, std::move(acfg));
    if (!a) return fail(a.error());
    adm = std::move(*a);
    logger.line("admin on " + adm->address() +
                                     (admin_key.empty() ? " (disabled: no --admin-key)" : ""));
  }

  if (sdn) {
    notify(*sdn, "READY=1\nSTATUS=serving clients on " + (*gw)->address(), logger);
    if (watchdog_every)
      watchdog = keel::sd::spawn_watchdog(sys, sdn, *watchdog_every,
                                          [n = nd->get()] { return n->not_ready(); });
  }

  serving parts{adm.get(), gw->get(), nd->get(), peer_srv.get()};
  // The watchdog reads the node: it ends (and is waited for) before the node stops.
  auto end_watchdog = [&] {
    if (!watchdog) return;
    caf::scoped_actor self{sys};
    self->monitor(watchdog);
    self->send_exit(watchdog, caf::exit_reason::kill);
    self->receive([](const caf::down_msg&) {});
  };
  return shut_down(stop_signals, parts, std::chrono::milliseconds(*shutdown_timeout), sdn.get(),
                   logger, end_watchdog);
}

}  // namespace

/// A node that ends on an exception nobody caught says which, and where, before it aborts.
[[noreturn]] void on_terminate() {
  std::string what = "unknown";
  if (auto e = std::current_exception()) {
    try {
      std::rethrow_exception(e);
    } catch (const kj::Exception& k) {
      what = k.getDescription().cStr() + std::string(" at ") + k.getFile() + ":" +
             std::to_string(k.getLine());
    } catch (const std::exception& x) {
      what = x.what();
    } catch (...) {
    }
  }
  std::fprintf(stderr, "keel-node: terminating on an uncaught exception: %s\n", what.c_str());
  void* frames[64];
  backtrace_symbols_fd(frames, backtrace(frames, 64), 2);
  std::abort();
}

int main(int argc, char** argv) {
  std::set_terminate(on_terminate);
  return run(std::span<char*>(argv + 1, static_cast<size_t>(argc - 1)));
}
