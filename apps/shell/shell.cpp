#include "apps/shell/shell.hpp"

#include <poll.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <ctime>
#include <iostream>
#include <thread>

#include "apps/shell/render.hpp"
#include "base/error.hpp"

namespace keel::shell {

const std::vector<command_info>& commands() {
  static const std::vector<command_info> all = {
      {"tree", "tree [NODE]", "the live supervision tree of every node, or of NODE",
       "Each actor's path, kind, state (running, restarting, stopped), how often its supervisor\n"
       "restarted it, and its last failure: when, and the exit reason. Paths are what kill,\n"
       "restart and fault take."},
      {"nodes", "nodes", "every node: region, address, status, sessions, KV pages, queue, tok/s",
       "Merges what every node of --connect reports about itself and about its peers. A node\n"
       "the shell reaches is up (draining after `drain`); another is as its peers' region\n"
       "links see it (up, suspect, down); one nobody reaches is down. KV pages are those of\n"
       "each shard, used/total."},
      {"sessions", "sessions [--node NODE]", "every session: owner, replicas, epoch, turns, tokens",
       "The last checkpoint is the newest turn in the node's store and how many of its\n"
       "generated tokens its log holds (nodes without --data keep sessions in memory only)."},
      {"rollout", "rollout status", "per model: the nodes that serve it, its sessions",
       "Every session is pinned to the digest of the model that served its first turn and is\n"
       "served only by nodes with that model. Per digest: the model file, the nodes serving\n"
       "it, and how many sessions (running now) are pinned to it, each counted once."},
      {"kill", "kill PATH", "make the actor at PATH fail, and see its supervisor react",
       "The actor exits with 'killed by admin', as if it had crashed: its supervisor restarts\n"
       "it (and, for one_for_all, its siblings), or escalates past its restart intensity.\n"
       "PATH is any actor of `tree` but a node's root, e.g. node/engine/shard-0."},
      {"restart", "restart PATH", "stop the actor at PATH and start it again",
       "A manual restart by the actor's supervisor: counted as a restart, not as a failure."},
      {"fault", "fault PATH KIND [ARGS]",
       "inject a fault: crash, stall, kv-fail, cut, partition, disk-full, clear",
       "  fault SHARD crash [AFTER]      the shard worker crashes at its (AFTER+1)-th step\n"
       "  fault SHARD stall TIME [AFTER] it sleeps TIME before that step\n"
       "  fault SHARD kv-fail [N]        its next N (default 1) KV page allocations fail\n"
       "  fault SESSION crash [--times N] the session crashes at its next (N) message(s);\n"
       "                                 failing 5 times in 10 s parks it\n"
       "  fault LINK cut TIME            the region link fails every heartbeat for TIME (this\n"
       "                                 node's side only; partition cuts both ways)\n"
       "  fault NODE partition --from PEER,... [--ms TIME]\n"
       "                                 cut all traffic between NODE and each PEER, both\n"
       "                                 ways, for TIME (without --ms: until clear)\n"
       "  fault NODE disk-full [--ms TIME]\n"
       "                                 every write to NODE's session store fails as on a\n"
       "                                 full disk, for TIME (without --ms: until clear)\n"
       "  fault NODE clear               disarm every fault of the node, heal its partition\n"
       "TIME is milliseconds (500, 500ms) or seconds (2s), up to 1 hour (partition, disk-full:\n"
       "24 hours).\n"
       "SHARD is e.g. node/engine/shard-0, SESSION node/sessions/s-1, LINK\n"
       "node/links/peer-HOST:PORT, NODE and PEER nodes' names."},
      {"drain", "drain NODE", "move NODE's sessions to other nodes; it opens no new ones",
       "Drains NODE before it is stopped: from now on it refuses new sessions (its clients get\n"
       "'overloaded': use another node), and it gives each session up to its group: another\n"
       "member takes it over from the majority's copy (a running turn continues there and its\n"
       "client resumes without losing a token). One line per session: which node owns it now,\n"
       "or why none does yet. Then either 'node NODE is empty and safe to stop' or how many\n"
       "sessions have no new owner yet (the status is then 1: their data is on the group's\n"
       "majority, but they are served again only once a majority of the group is reachable).\n"
       "NODE needs --peers. The node keeps refusing new sessions until it restarts."},
      {"stats", "stats", "every node's figures: steps, tokens, tok/s, restarts, faults, ...",
       "Uptime, batcher steps, generated tokens and tokens/s, restarts by every supervisor,\n"
       "faults fired, turns shed and preempted, the last recovery after a worker crash\n"
       "(failure to the next token), and session writes replicated / failed."},
      {"watch", "watch [--count N] COMMAND", "run COMMAND every second (Enter or Ctrl-C stops)",
       "Redraws COMMAND's output every second; --count N stops after N refreshes."},
      {"help", "help [COMMAND]", "the commands, or one command in detail", ""},
      {"quit", "quit", "leave the shell (also: exit, end of input)", ""},
  };
  return all;
}

std::vector<std::string> split_words(const std::string& line) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < line.size()) {
    while (i < line.size() && std::isspace(static_cast<unsigned char>(line[i]))) ++i;
    size_t b = i;
    while (i < line.size() && !std::isspace(static_cast<unsigned char>(line[i]))) ++i;
    if (i > b) out.push_back(line.substr(b, i - b));
  }
  return out;
}

namespace {

const command_info* find_command(const std::string& name) {
  for (auto& c : commands())
    if (name == c.name) return &c;
  return nullptr;
}

size_t edit_distance(const std::string& a, const std::string& b) {
  std::vector<size_t> d(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) d[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t prev = d[0];
    d[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cur = d[j];
      d[j] = std::min({d[j] + 1, d[j - 1] + 1, prev + (a[i - 1] == b[j - 1] ? 0 : 1)});
      prev = cur;
    }
  }
  return d[b.size()];
}

int64_t steady_ms() {
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

volatile std::sig_atomic_t interrupted = 0;  // set by SIGINT while `watch` runs

extern "C" void on_interrupt(int) {
  interrupted = 1;
}

}  // namespace

int shell::run_line(const std::string& line) {
  int status = 0;
  bool ran_any = false;
  size_t b = 0;
  while (b <= line.size() && !quitting_) {
    auto e = std::min(line.find(';', b), line.size());
    auto words = split_words(line.substr(b, e - b));
    if (!words.empty()) {
      if (ran_any && !json_) std::printf("\n");  // a blank line between commands' outputs
      ran_any = true;
      int s = run(words);
      if (status == 0) status = s;
    }
    b = e + 1;
  }
  return status;
}

int shell::run(const std::vector<std::string>& args) {
  const auto& name = args[0];
  if (name == "quit" || name == "exit") {
    if (args.size() > 1) return fail(name, usage_error(name, "it takes no arguments"));
    quitting_ = true;
    return 0;
  }
  if (name == "help") return help(args);
  if (find_command(name) == nullptr) {
    std::string best;
    size_t best_d = 3;
    for (auto& c : commands()) {
      auto d = edit_distance(name, c.name);
      if (d < best_d) best_d = d, best = c.name;
    }
    std::string names;
    for (auto& c : commands()) names += (names.empty() ? "" : ", ") + std::string(c.name);
    return fail(name,
                make_error(errc::bad_request,
                           "unknown command" +
                               (best.empty() ? std::string() : "; did you mean " + best + "?") +
                               " (commands: " + names + "; see help)"));
  }
  if (name == "watch") return watch(args);
  // Nodes that were down may be back; a node that refuses the key is an error.
  if (auto err = cluster_.connect()) return fail(name, err);
  if (name == "tree") return tree(args);
  if (name == "nodes") return nodes(args);
  if (name == "sessions") return sessions(args);
  if (name == "rollout") return rollout(args);
  if (name == "stats") return stats(args);
  if (name == "drain") return drain(args);
  return act(args);
}

int shell::fail(const std::string& command, const caf::error& err) {
  auto msg = message_of(err);
  if (msg.empty()) msg = describe(err);
  std::string line = "keel-shell: " + command + ": " + msg + "\n";
  std::fflush(stdout);
  std::fputs(line.c_str(), stderr);
  if (json_) {
    json j;
    j.begin_object().field("command", command).key("error").begin_object();
    j.field("kind", to_string(code_of(err))).field("message", msg).end_object().end_object();
    std::printf("%s\n", j.str().c_str());
    std::fflush(stdout);
  }
  return code_of(err) == errc::bad_request ? 2 : 1;
}

caf::error shell::usage_error(const std::string& command, const std::string& what) const {
  auto* c = find_command(command);
  return make_error(errc::bad_request,
                    what + "; usage: " + (c != nullptr ? c->usage : command.c_str()) +
                        " (see help " + command + ")");
}

std::string shell::known_nodes() const {
  std::string out;
  for (auto& m : cluster_.members()) {
    out += out.empty() ? "" : ", ";
    out += m.name.empty() ? m.address : m.name;
    if (!m.up) out += " (down)";
  }
  return out;
}

caf::error shell::with_hint(const caf::error& err) const {
  if (code_of(err) != errc::disconnected) return err;
  std::string up;
  for (auto& m : cluster_.members())
    if (m.up) up += (up.empty() ? "" : ", ") + (m.name.empty() ? m.address : m.name);
  return make_error(errc::disconnected,
                    message_of(err) + (up.empty() ? "; no node is up" : "; nodes up: " + up));
}

caf::expected<size_t> shell::member_named(const std::string& name) const {
  auto& ms = cluster_.members();
  for (size_t i = 0; i < ms.size(); ++i)
    if (ms[i].name == name || ms[i].address == name) return i;
  return make_error(errc::not_found, "no node " + name + "; nodes: " + known_nodes());
}

caf::expected<std::pair<size_t, std::string>> shell::route(const std::string& path) const {
  auto& ms = cluster_.members();
  auto first = path.substr(0, path.find('/'));
  for (size_t i = 0; i < ms.size(); ++i)
    if (!ms[i].name.empty() && ms[i].name == first) return std::make_pair(i, path);
  if (ms.size() == 1 && !ms[0].name.empty())
    return std::make_pair(size_t{0}, ms[0].name + "/" + path);
  std::string examples;
  for (auto& m : ms)
    if (!m.name.empty()) examples += (examples.empty() ? "" : ", ") + m.name + "/engine/shard-0";
  return make_error(errc::not_found, "no node " + first + " for path " + path +
                                         "; paths start with a node's name" +
                                         (examples.empty() ? std::string() : ", e.g. " + examples) +
                                         " (nodes: " + known_nodes() + ")");
}

int shell::help(const std::vector<std::string>& args) {
  if (args.size() > 2) return fail("help", usage_error("help", "give one command at most"));
  if (args.size() == 2) {
    auto* c = find_command(args[1]);
    if (c == nullptr)
      return fail("help", make_error(errc::bad_request,
                                     "no command " + args[1] + "; run help for the list"));
    if (json_) {
      json j;
      j.begin_object().field("name", c->name).field("usage", c->usage);
      j.field("summary", c->summary).field("details", c->details).end_object();
      std::printf("%s\n", j.str().c_str());
    } else {
      std::printf("usage: %s\n\n%s.\n", c->usage, c->summary);
      if (*c->details != '\0') std::printf("\n%s\n", c->details);
    }
    return 0;
  }
  if (json_) {
    json j;
    j.begin_object().key("commands").begin_array();
    for (auto& c : commands())
      j.begin_object()
          .field("name", c.name)
          .field("usage", c.usage)
          .field("summary", c.summary)
          .end_object();
    j.end_array().end_object();
    std::printf("%s\n", j.str().c_str());
    return 0;
  }
  table t({{"COMMAND"}, {"WHAT IT DOES", false, true}});
  for (auto& c : commands()) t.add({c.usage, c.summary});
  std::printf(
      "%s\nCommands run one per line, or several separated by ';'. 'help COMMAND' for "
      "details.\n",
      t.render().c_str());
  return 0;
}

int shell::watch(const std::vector<std::string>& args) {
  if (in_watch_) return fail("watch", usage_error("watch", "watch cannot watch itself"));
  size_t at = 1;
  int64_t count = -1;
  if (at < args.size() && args[at] == "--count") {
    if (at + 1 >= args.size()) return fail("watch", usage_error("watch", "--count needs a number"));
    char* end = nullptr;
    count = std::strtoll(args[at + 1].c_str(), &end, 10);
    if (*end != '\0' || count < 1)
      return fail("watch", usage_error("watch", "--count " + args[at + 1] +
                                                    ": expected a whole number from 1"));
    at += 2;
  }
  if (at >= args.size()) return fail("watch", usage_error("watch", "COMMAND is missing"));
  std::vector<std::string> inner(args.begin() + static_cast<ptrdiff_t>(at), args.end());
  auto* c = find_command(inner[0]);
  if (c == nullptr || inner[0] == "watch" || inner[0] == "quit" || inner[0] == "help" ||
      inner[0] == "drain")
    return fail("watch", usage_error("watch", "cannot watch '" + inner[0] +
                                                  "'; watch tree, nodes, sessions or stats"));
  std::string shown;
  for (auto& w : inner) shown += (shown.empty() ? "" : " ") + w;
  struct sigaction sa = {}, old = {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGINT, &sa, &old);
  interrupted = 0;
  in_watch_ = true;
  int status = 0;
  for (int64_t n = 0; (count < 0 || n < count) && interrupted == 0; ++n) {
    auto started = steady_ms();
    if (!json_) {
      std::time_t now = std::time(nullptr);
      char when[16];
      std::strftime(when, sizeof when, "%H:%M:%S", std::localtime(&now));
      if (terminal_)
        std::printf("\033[H\033[2J");  // home, clear screen
      else if (n > 0)
        std::printf("\n");
      std::printf("every 1 s: %s  %s%s\n\n", shown.c_str(), when,
                  terminal_ ? "  (Enter or Ctrl-C stops)" : "");
      std::fflush(stdout);
    }
    status = run(inner);
    std::fflush(stdout);
    if (count >= 0 && n + 1 >= count) break;
    // Sleep out the second, waking for Ctrl-C or (on a terminal) Enter.
    while (interrupted == 0 && steady_ms() - started < 1000) {
      auto left = static_cast<int>(std::min<int64_t>(1000 - (steady_ms() - started), 50));
      if (terminal_) {
        pollfd p{STDIN_FILENO, POLLIN, 0};
        if (::poll(&p, 1, left) > 0) {
          std::string ignored;
          std::getline(std::cin, ignored);
          interrupted = 1;
        }
      } else {
        std::this_thread::sleep_for(std::chrono::milliseconds(left));
      }
    }
  }
  in_watch_ = false;
  sigaction(SIGINT, &old, nullptr);
  return status;
}

const std::vector<std::string>& shell::paths() {
  if (steady_ms() - paths_at_ms_ < 2000) return paths_;
  paths_.clear();
  (void)cluster_.connect();
  for (size_t i = 0; i < cluster_.members().size(); ++i) {
    if (!cluster_.members()[i].up) continue;
    if (auto rows = cluster_.tree(i))
      for (auto& r : *rows) paths_.push_back(r.path);
  }
  paths_at_ms_ = steady_ms();
  return paths_;
}

std::vector<std::string> shell::complete(const std::string& before, const std::string& word) {
  auto words = split_words(
      before.substr(before.rfind(';') == std::string::npos ? 0 : before.rfind(';') + 1));
  // `watch [--count N]` completes as the command it watches.
  if (!words.empty() && words[0] == "watch") {
    words.erase(words.begin());
    if (!words.empty() && words[0] == "--count")
      words.erase(words.begin(), words.begin() + std::min<size_t>(2, words.size()));
  }
  std::vector<std::string> options;
  auto node_names = [&] {
    for (auto& m : cluster_.members()) options.push_back(m.name.empty() ? m.address : m.name);
  };
  if (words.empty()) {
    for (auto& c : commands()) options.push_back(c.name);
    if (before.find("watch") != std::string::npos && word.empty()) options.push_back("--count");
  } else {
    const auto& cmd = words[0];
    const size_t index = words.size();  // the position of the word being completed
    if (cmd == "help" && index == 1) {
      for (auto& c : commands()) options.push_back(c.name);
    } else if ((cmd == "tree" || cmd == "drain") && index == 1) {
      node_names();
    } else if (cmd == "sessions") {
      if (index >= 2 && words[index - 1] == "--node")
        node_names();
      else
        options.push_back("--node");
    } else if ((cmd == "kill" || cmd == "restart" || cmd == "fault") && index == 1) {
      options = paths();
      if (cmd == "fault")
        for (auto& m : cluster_.members())
          if (!m.name.empty()) options.push_back(m.name);
    } else if (cmd == "fault" && index == 2) {
      options = {"crash", "stall", "kv-fail", "cut", "partition", "disk-full", "clear"};
    } else if (cmd == "fault" && index >= 3 && words[2] == "partition") {
      if (words[index - 1] == "--from") {
        // A list's next name: "a,b<TAB>" completes what follows the last comma.
        auto comma = word.rfind(',');
        auto prefix = comma == std::string::npos ? std::string() : word.substr(0, comma + 1);
        node_names();
        for (auto& o : options) o = prefix + o;
      } else if (words[index - 1] != "--ms") {
        options = {"--from", "--ms"};
      }
    }
  }
  std::vector<std::string> out;
  for (auto& o : options)
    if (o.compare(0, word.size(), word) == 0) out.push_back(o);
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

}  // namespace keel::shell
