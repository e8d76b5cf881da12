#define BOOST_TEST_MODULE shell_test
#include <boost/test/unit_test.hpp>

// keel-shell against real keel-node processes on 127.0.0.1 (ports 0, read from the nodes'
// "listening on", "admin on" and "serving peers on" lines): one-shot (-c) and interactive
// (scripted stdin) use, the admin key, kill / restart / fault, and every error path.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <fstream>
#include <map>
#include <memory>
#include <sstream>
#include <thread>
#include <tuple>

#include "tests/process.hpp"
#include "tests/test_support.hpp"
#include "wire/client.hpp"

namespace {

using namespace std::chrono_literals;
using keel::test::process;
using keel::test::run;
using keel::test::run_result;

const std::string key = "test-admin-key-1";

using keel::test::bin;

std::string tiny_model() {
  static keel::test::temp_dir dir{"shell_test-" + std::to_string(getpid())};
  static std::string path = [] {
    auto p = (dir.path / "tiny.gguf").string();
    auto r = run({bin("keel-model"), "synth", "-o", p, "--dim", "64", "--layers", "2", "--heads",
                  "4", "--kv-heads", "2", "--ffn", "128", "--ctx", "256"});
    BOOST_REQUIRE_MESSAGE(r.status == 0, r.err);
    return p;
  }();
  return path;
}

/// The first "127.0.0.1:PORT" after `tag` in `s`, or "".
std::string address_after(const std::string& s, const std::string& tag) {
  const std::string host = "127.0.0.1:";
  auto at = s.find(tag);
  if (at == std::string::npos) return {};
  auto h = s.find(host, at + tag.size());
  if (h == std::string::npos) return {};
  auto end = s.find_first_not_of("0123456789", h + host.size());
  if (end == std::string::npos || end == h + host.size()) return {};
  return s.substr(h, end - h);
}

/// A keel-node with an admin endpoint, ended with the test.
struct node {
  std::unique_ptr<process> proc;
  std::string client, admin, peer;

  explicit node(std::vector<std::string> extra = {}, bool with_key = true,
                const std::string& model = tiny_model()) {
    std::vector<std::string> argv = {
        bin("keel-node"), "--listen", "127.0.0.1:0",    "--model",    model,
        "--threads",      "1",        "--admin-listen", "127.0.0.1:0"};
    if (with_key) argv.insert(argv.end(), {"--admin-key-file", keel::test::secret_file(key)});
    argv.insert(argv.end(), extra.begin(), extra.end());
    proc = std::make_unique<process>(argv);
    bool up = proc->wait_err(
        [](const std::string& s) { return !address_after(s, "keel-node: admin on ").empty(); },
        15s);
    BOOST_REQUIRE_MESSAGE(up, "keel-node did not start: " + proc->err());
    client = address_after(proc->err(), "keel-node: listening on ");
    admin = address_after(proc->err(), "keel-node: admin on ");
    peer = address_after(proc->err(), "keel-node: serving peers on ");
  }

  /// keel-shell -c COMMANDS against this node (and `more` addresses).
  run_result shell(const std::string& commands, std::vector<std::string> extra = {},
                   const std::string& more = "") const {
    std::vector<std::string> argv = {bin("keel-shell"), "--connect",
                                     admin + (more.empty() ? "" : "," + more), "--key-file",
                                     keel::test::secret_file(key)};
    argv.insert(argv.end(), extra.begin(), extra.end());
    argv.insert(argv.end(), {"-c", commands});
    return run(argv);
  }

  std::unique_ptr<keel::wire::client> connect() const {
    auto c = keel::wire::client::connect({client});
    BOOST_REQUIRE_MESSAGE(c, keel::test::why(c));
    return std::move(*c);
  }
};

keel::sampling_params sampled(uint64_t seed) {
  keel::sampling_params p;
  p.temperature = 0.8f;
  p.seed = seed;
  return p;
}

/// A port on 127.0.0.1 where nothing listens.
std::string closed_address() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
}

/// The line of `out` that contains `what` ("" when none).
std::string line_with(const std::string& out, const std::string& what) {
  auto at = out.find(what);
  if (at == std::string::npos) return {};
  auto b = out.rfind('\n', at);
  b = b == std::string::npos ? 0 : b + 1;
  return out.substr(b, out.find('\n', at) - b);
}

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

/// A conversation's turns as text, one line each, for comparisons that show what differs.
std::string transcript(const std::vector<keel::wire::turn_record>& turns) {
  std::ostringstream out;
  for (auto& t : turns) {
    out << "turn " << t.turn << " [";
    for (auto id : t.prompt) out << ' ' << id;
    out << " ] ->";
    for (auto id : t.generated) out << ' ' << id;
    if (t.done)
      out << " (" << t.reason << ")\n";
    else
      out << " (running)\n";
  }
  return out.str();
}

/// Three keel-nodes with session stores, linked to each other: a and b in region r1, c in r2,
/// each session with two replicas. The admin key comes from a config file; the peer ports are
/// chosen up front, since each node's --peers names the others'.
struct trio {
  keel::test::temp_dir dir;
  std::unique_ptr<node> a, b, c;

  explicit trio(const std::string& label, const std::string& model = tiny_model())
      : dir("shell_test-" + label + "-" + std::to_string(getpid())) {
    auto config = (dir.path / "admin.conf").string();
    std::ofstream(config) << "admin-key = " << key << "\n";
    std::map<std::string, std::string> peer = {
        {"a", closed_address()}, {"b", closed_address()}, {"c", closed_address()}};
    auto start = [&](const std::string& name, const std::string& region) {
      std::string others;
      for (auto& [n, address] : peer)
        if (n != name)
          others += (others.empty() ? "" : ",") + n + "=" + address;
      std::vector<std::string> args = {
          "--name",  name,   "--region", region, "--peer-listen", peer[name],
          "--peers", others, "--data",   (dir.path / name).string(), "--config", config,
          "--peer-regions", name == "c" ? "a=r1,b=r1" : name == "a" ? "b=r1,c=r2" : "a=r1,c=r2"};
      return std::make_unique<node>(args, false, model);
    };
    a = start("a", "r1");
    b = start("b", "r1");
    c = start("c", "r2");
    // Until a's region links see b and c up (drain hands sessions to live peers only).
    auto a_sees = [&] {
      auto r = a->shell("nodes");
      return contains(line_with(r.out, "b     r1"), "  up  ") &&
             contains(line_with(r.out, "c     r2"), "  up  ");
    };
    bool linked = a_sees();
    for (int i = 0; i < 50 && !linked; ++i) {
      std::this_thread::sleep_for(100ms);
      linked = a_sees();
    }
    BOOST_REQUIRE_MESSAGE(linked, "a's region links did not come up: " + a->proc->err());
  }

  /// keel-shell -c COMMANDS connected to all three.
  run_result shell(const std::string& commands, std::vector<std::string> extra = {}) const {
    return a->shell(commands, std::move(extra), b->admin + "," + c->admin);
  }

  const node& named(const std::string& name) const {
    return name == "a" ? *a : name == "b" ? *b : *c;
  }
};

/// The status of node `peer` as `from`'s region link sees it (up, suspect, down), from
/// `nodes --json` through `from`'s admin endpoint alone; "?" and the output when not listed.
std::string status_seen_by(const node& from, const std::string& peer) {
  auto r = from.shell("nodes", {"--json"});
  auto at = r.out.find("{\"name\":\"" + peer + "\",");
  if (r.status != 0 || at == std::string::npos) return "? " + r.out + r.err;
  const std::string tag = "\"status\":\"";
  auto b = r.out.find(tag, at);
  if (b == std::string::npos) return "? " + r.out;
  b += tag.size();
  return r.out.substr(b, r.out.find('"', b) - b);
}

/// (observer, peer, status): the peer's status as the observer's region link sees it.
using sightings = std::vector<std::tuple<std::string, std::string, std::string>>;

/// Whether every sighting holds, polled until `limit` has passed; `last` says what was seen.
bool all_seen_within(const trio& t, const sightings& want, std::chrono::milliseconds limit,
                     std::string& last) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  for (;;) {
    bool ok = true;
    last.clear();
    for (auto& [from, peer, status] : want) {
      auto got = status_seen_by(t.named(from), peer);
      last += from + " sees " + peer + " " + got + "; ";
      ok = ok && got == status;
    }
    if (ok) return true;
    if (std::chrono::steady_clock::now() >= deadline) return false;
    std::this_thread::sleep_for(50ms);
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(tree_shows_the_node_supervisors) {
  node n;
  auto r = n.shell("tree");
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.err);
  for (auto* path :
       {"node ", "node/engine ", "node/engine/shard-0 ", "node/batcher ", "node/sessions "})
    BOOST_TEST(contains(r.out, path), path);
  BOOST_TEST(contains(line_with(r.out, "node/engine "), "supervisor"));
  BOOST_TEST(contains(line_with(r.out, "node/engine/shard-0"), "shard_worker"));
  BOOST_TEST(contains(line_with(r.out, "node/engine/shard-0"), "running"));
  for (auto& line : {line_with(r.out, "PATH"), line_with(r.out, "node/engine/shard-0")})
    BOOST_TEST(line.size() <= 100u);

  auto j = n.shell("tree", {"--json"});
  BOOST_REQUIRE_MESSAGE(j.status == 0, j.err);
  BOOST_TEST(j.out.rfind("{\"nodes\":[{\"node\":\"node\"", 0) == 0u);
  BOOST_TEST(contains(j.out,
                      "{\"path\":\"node/engine/shard-0\",\"depth\":2,"
                      "\"kind\":\"shard_worker\",\"state\":\"running\",\"restarts\":0"));
}

BOOST_AUTO_TEST_CASE(kill_of_a_shard_worker_restarts_it_and_generation_continues) {
  node n;
  auto c = n.connect();
  // A seed whose reply runs past the stall below; its tokens, fault-free, are the reference.
  std::vector<int32_t> reference;
  uint64_t seed = 0;
  for (uint64_t s = 1; s <= 10 && reference.size() < 12; ++s) {
    auto sid = c->open_session(sampled(s));
    BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
    auto g = c->generate(*sid, "Hello there", 40);
    BOOST_REQUIRE_MESSAGE(g, keel::test::why(g));
    if (g->generated.size() > reference.size()) reference = g->generated, seed = s;
  }
  BOOST_REQUIRE(reference.size() >= 12u);

  // The 4th step from now stalls 1.5 s: the kill lands while the turn is mid-way.
  auto armed = n.shell("fault node/engine/shard-0 stall 1500ms 3");
  BOOST_REQUIRE_MESSAGE(armed.status == 0, armed.err);
  BOOST_TEST(contains(armed.out, "armed: node/engine/shard-0 stalls 1500 ms before step 4"));
  auto sid = c->open_session(sampled(seed));
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  std::atomic<int> seen{0};
  caf::expected<keel::wire::generation> result = keel::make_error(keel::errc::failed, "not run");
  std::thread gen([&] {
    // A client belongs to the thread that connected it.
    auto mine = keel::wire::client::connect({n.client});
    if (!mine) {
      result = std::move(mine.error());
      return;
    }
    result = (*mine)->generate(*sid, "Hello there", 40,
                               [&](uint64_t, uint64_t, int32_t, std::string_view) { ++seen; });
  });
  for (int i = 0; i < 500 && seen.load() < 2; ++i) std::this_thread::sleep_for(10ms);
  auto killed = n.shell("kill node/engine/shard-0");
  gen.join();
  BOOST_REQUIRE_MESSAGE(killed.status == 0, killed.err);
  BOOST_TEST(contains(killed.out, "killed node/engine/shard-0"), killed.out);
  BOOST_TEST(contains(killed.out, "node/engine restarted it"), killed.out);
  BOOST_REQUIRE_MESSAGE(result, keel::test::why(result));
  BOOST_TEST(result->generated == reference);  // no token lost, repeated or changed

  auto tree = n.shell("tree");
  BOOST_REQUIRE_MESSAGE(tree.status == 0, tree.err);
  auto shard = line_with(tree.out, "node/engine/shard-0");
  BOOST_TEST(contains(shard, "running  "), shard);
  BOOST_TEST(contains(shard, " 1  "), shard);  // restarts
  BOOST_TEST(contains(shard, "failed: killed by admin"), shard);
  BOOST_TEST(contains(shard, " ago"), shard);
}

BOOST_AUTO_TEST_CASE(restart_fault_sessions_stats_and_watch) {
  node n;
  auto c = n.connect();
  auto sid = c->open_session(sampled(3));
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  BOOST_REQUIRE(c->generate(*sid, "Hi", 8));

  auto r = n.shell("restart node/batcher; sessions; fault node/sessions/" + *sid + " crash");
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.err);
  BOOST_TEST(contains(r.out, "restarted node/batcher in "), r.out);
  BOOST_TEST(contains(r.out, "(restarts: 1)"), r.out);
  auto row = line_with(r.out, *sid + "  ");
  BOOST_TEST(contains(row, "node"), row);   // owner
  BOOST_TEST(contains(row, "  1  "), row);  // epoch 1, 1 turn
  BOOST_TEST(contains(row, "idle"), row);
  BOOST_TEST(contains(r.out, "armed: node/sessions/" + *sid + " crashes"), r.out);

  // The session crashes at its next message (that call fails), and comes back.
  BOOST_TEST(!c->generate(*sid, "again", 4));
  auto again = c->generate(*sid, "again", 4);
  for (int i = 0; i < 50 && !again; ++i) {
    std::this_thread::sleep_for(20ms);
    again = c->generate(*sid, "again", 4);
  }
  BOOST_REQUIRE_MESSAGE(again, keel::test::why(again));
  auto tree = n.shell("tree");
  BOOST_TEST(contains(line_with(tree.out, "node/batcher"), " 1  "), tree.out);
  auto srow = line_with(tree.out, "node/sessions/" + *sid);
  BOOST_TEST(contains(srow, "session"), srow);
  BOOST_TEST(contains(srow, " 1  "), srow);
  BOOST_TEST(contains(srow, "injected"), srow);

  auto w = n.shell("watch --count 2 stats; fault node clear");
  BOOST_REQUIRE_MESSAGE(w.status == 0, w.err);
  size_t refreshes = 0;
  for (size_t at = 0; (at = w.out.find("every 1 s: stats", at)) != std::string::npos; ++at)
    ++refreshes;
  BOOST_TEST(refreshes == 2u, w.out);
  BOOST_TEST(contains(w.out, "RESTARTS"));
  BOOST_TEST(contains(w.out, "disarmed every fault of node node"));
}

BOOST_AUTO_TEST_CASE(the_admin_key_is_enforced) {
  node n;
  auto wrong = run({bin("keel-shell"), "--connect", n.admin, "--key-file",
                    keel::test::secret_file("not-the-key"), "-c", "tree"});
  BOOST_TEST(wrong.status == 1);
  BOOST_TEST(contains(wrong.err, "admin key refused"), wrong.err);
  BOOST_TEST(wrong.out.empty());
  auto none = run({bin("keel-shell"), "--connect", n.admin, "-c", "tree"});
  BOOST_TEST(none.status == 2);
  BOOST_TEST(contains(none.err, "no admin key"), none.err);

  node open({}, false);  // --admin-listen without --admin-key
  BOOST_TEST(contains(open.proc->err(), "(disabled: no --admin-key)"));
  auto disabled = open.shell("tree");
  BOOST_TEST(disabled.status == 1);
  BOOST_TEST(contains(disabled.err,
                      "admin interface disabled: keel-node node was started "
                      "without --admin-key"),
             disabled.err);

  // The key may come from the config file instead of the command line (where ps shows it).
  keel::test::temp_dir dir{"shell_test-config-" + std::to_string(getpid())};
  auto config = (dir.path / "node.conf").string();
  {
    std::ofstream f(config);
    f << "# keel-node\nadmin-key = from-the-config-file\n";
  }
  node configured({"--config", config}, false);
  auto ok = run({bin("keel-shell"), "--connect", configured.admin, "--key-file",
                 keel::test::secret_file("from-the-config-file"), "-c", "tree node"});
  BOOST_TEST(ok.status == 0, ok.err);
  BOOST_TEST(contains(ok.out, "node/engine/shard-0"));

  auto short_key = run({bin("keel-node"), "--listen", "127.0.0.1:0", "--model", tiny_model(),
                        "--admin-listen", "127.0.0.1:0", "--admin-key-file",
                        keel::test::secret_file("short")});
  BOOST_TEST(short_key.status == 2);
  BOOST_TEST(contains(short_key.err, "at least 8"), short_key.err);
  auto no_listen = run({bin("keel-node"), "--listen", "127.0.0.1:0", "--model", tiny_model(),
                        "--admin-key-file", keel::test::secret_file(key)});
  BOOST_TEST(no_listen.status == 2);
  BOOST_TEST(contains(no_listen.err, "--admin-key needs --admin-listen"), no_listen.err);

  // Issue #11: a key on the command line is refused (ps shows it to every user of the host).
  auto on_line = run({bin("keel-node"), "--listen", "127.0.0.1:0", "--model", tiny_model(),
                      "--admin-listen", "127.0.0.1:0", "--admin-key", key});
  BOOST_TEST(on_line.status == 2);
  BOOST_TEST(contains(on_line.err, "a secret on the command line is visible"), on_line.err);
  auto shell_line = run({bin("keel-shell"), "--connect", n.admin, "--key", key, "-c", "tree"});
  BOOST_TEST(shell_line.status == 2);
  BOOST_TEST(contains(shell_line.err, "--key: a secret on the command line"), shell_line.err);
  // A key file others can read is warned about.
  auto loose = (dir.path / "loose.key").string();
  { std::ofstream(loose) << key << "\n"; }
  std::filesystem::permissions(loose, std::filesystem::perms::others_read,
                               std::filesystem::perm_options::add);
  auto warned = run({bin("keel-shell"), "--connect", n.admin, "--key-file", loose, "-c", "tree"});
  BOOST_TEST(warned.status == 0, warned.err);
  BOOST_TEST(contains(warned.err, "is readable by other users"), warned.err);
}

BOOST_AUTO_TEST_CASE(fault_arguments_out_of_range_are_refused_by_the_node) {
  // Issue #11: a 2^31 step count wrapped, and a stall of 2^32 - 1 ms hung a worker beyond clear,
  // kill and SIGTERM. keel-shell refuses the worst of those itself; the node checks every bound
  // too (a hostile client need not use keel-shell): these pass the shell and are refused by the
  // node, and nothing is armed.
  node n;
  for (auto& [command, message] : std::vector<std::pair<std::string, std::string>>{
           {"fault node/engine/shard-0 stall 120s", "a stall of 120000 ms is beyond 60000 ms"},
           {"fault node/engine/shard-0 kv-fail 4000000", "KV allocation failures are beyond"}}) {
    auto r = n.shell(command);
    BOOST_TEST(r.status != 0, command);
    BOOST_TEST(contains(r.err, message), command << ": " << r.err);
  }
  // Still serving, nothing armed: a turn streams to its end.
  auto c = n.connect();
  auto sid = c->open_session(sampled(3));
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  BOOST_TEST(static_cast<bool>(c->generate(*sid, "Hi", 4)));
}

BOOST_AUTO_TEST_CASE(every_error_is_one_line_and_the_shell_goes_on) {
  node n;
  struct expect {
    std::string command;
    int status;
    std::string message;
  };
  const std::vector<expect> cases = {
      {"nods", 2, "keel-shell: nods: unknown command; did you mean nodes?"},
      {"kill", 2, "keel-shell: kill: PATH is missing; usage: kill PATH"},
      {"tree a b", 2, "keel-shell: tree: give one node at most; usage: tree [NODE]"},
      {"fault node/engine/shard-0", 2,
       "KIND is missing (crash, stall, kv-fail, cut, partition or clear)"},
      {"fault node/engine/shard-0 stall 5x", 2, "stall: '5x' is not a time"},
      {"fault node/engine/shard-0 explode", 2, "unknown fault kind 'explode'"},
      {"fault node/batcher crash", 2, "node/batcher is a batcher; crash, stall and kv-fail"},
      {"kill node/engine/shard-9", 1,
       "keel-shell: kill: no actor node/engine/shard-9 on node node; node/engine has shard-0"},
      {"kill node/batcher/x", 1, "node/batcher is a batcher and has no children"},
      {"kill node", 2, "node is the node's root supervisor"},
      {"tree elsewhere", 1, "keel-shell: tree: no node elsewhere; nodes: node"},
      {"sessions --node", 2, "--node needs a node's name"},
      {"watch --count x nodes", 2, "--count x: expected a whole number from 1"},
      {"help nothing", 2, "no command nothing"},
      {"drain", 2, "keel-shell: drain: NODE is missing (nodes: node); usage: drain NODE"},
      {"drain node node", 2, "keel-shell: drain: it takes one NODE, got 2 arguments"},
      {"drain nosuch", 1, "keel-shell: drain: no node nosuch; nodes: node"},
      // Without --data and --peers there is nowhere to hand sessions over to.
      {"drain node", 1, "keel-shell: drain: node node cannot drain: it runs alone (no --peers)"},
      {"watch drain node", 2, "cannot watch 'drain'"},
  };
  for (auto& e : cases) {
    auto r = n.shell(e.command);
    BOOST_TEST(r.status == e.status, e.command << ": " << r.status);
    BOOST_TEST(contains(r.err, e.message), e.command << ": " << r.err);
    BOOST_TEST(std::count(r.err.begin(), r.err.end(), '\n') == 1, e.command << ": " << r.err);
  }

  // A node that is down: `nodes` shows it and succeeds; commands for it fail, naming it.
  auto gone = closed_address();
  auto r = n.shell("nodes", {}, gone);
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.err);
  BOOST_TEST(contains(line_with(r.out, "node  "), "up"), r.out);
  BOOST_TEST(contains(line_with(r.out, gone), "down"), r.out);
  auto t = n.shell("tree " + gone, {}, gone);
  BOOST_TEST(t.status == 1);
  BOOST_TEST(contains(t.err, "node at " + gone + " is down: "), t.err);
  BOOST_TEST(contains(t.err, "nodes up: node"), t.err);
  auto d = n.shell("drain " + gone, {}, gone);
  BOOST_TEST(d.status == 1);
  BOOST_TEST(contains(d.err, "keel-shell: drain: node at " + gone + " is down: "), d.err);
  BOOST_TEST(std::count(d.err.begin(), d.err.end(), '\n') == 1, d.err);

  // Interactive, from a script on stdin: each error is reported and the next command runs.
  auto s = run({bin("keel-shell"), "--connect", n.admin, "--key-file", keel::test::secret_file(key)},
               "nods\ntree\nkill node/nope\nfault node/engine/shard-0 crash 1000\nnodes\nquit\n"
               "tree\n");
  BOOST_TEST(s.status == 2);  // the first failure: a wrong command
  BOOST_TEST(contains(s.err, "unknown command"), s.err);
  BOOST_TEST(contains(s.err, "no actor node/nope"), s.err);
  BOOST_TEST(contains(s.out, "node/engine/shard-0"), s.out);
  BOOST_TEST(contains(s.out, "armed: node/engine/shard-0 crashes at step 1001"), s.out);
  BOOST_TEST(contains(s.out, "KV PAGES"), s.out);
  auto trees = 0;
  for (size_t at = 0; (at = s.out.find("PATH ", at)) != std::string::npos; ++at) ++trees;
  BOOST_TEST(trees == 1);  // nothing runs after quit

  auto dj = n.shell("drain node", {"--json"});
  BOOST_TEST(dj.status == 1);
  BOOST_TEST(contains(dj.out,
                      "{\"command\":\"drain\",\"error\":{\"kind\":\"unimplemented\","
                      "\"message\":\"node node cannot drain"),
             dj.out);
  // The refused drain still marks nothing: the node reports itself up, not draining.
  auto still = n.shell("nodes");
  BOOST_TEST(contains(line_with(still.out, "node  "), "  up  "), still.out);

  auto j = n.shell("kill node/nope", {"--json"});
  BOOST_TEST(j.status == 1);
  BOOST_TEST(contains(j.out,
                      "{\"command\":\"kill\",\"error\":{\"kind\":\"not_found\",\"message\":"
                      "\"no actor node/nope"),
             j.out);
}

BOOST_AUTO_TEST_CASE(nodes_merges_peers_and_a_cut_link_shows_the_peer_down) {
  node b({"--name", "b", "--region", "west", "--peer-listen", "127.0.0.1:0"});
  BOOST_REQUIRE(!b.peer.empty());
  node a({"--name", "a", "--region", "east", "--peer-listen", "127.0.0.1:0", "--peers", "b=" + b.peer});
  auto status_of_b = [&] {
    auto r = a.shell("nodes");
    BOOST_REQUIRE_MESSAGE(r.status == 0, r.err);
    auto row = line_with(r.out, "b     west");
    for (auto* s : {"  up  ", "  suspect  ", "  down  "})
      if (contains(row, s)) return std::string(s).substr(2, std::string(s).size() - 4);
    return "? " + r.out;
  };
  auto wait_for = [&](const std::string& want) {
    std::string got;
    for (int i = 0; i < 40 && (got = status_of_b()) != want; ++i)
      std::this_thread::sleep_for(100ms);
    return got;
  };
  BOOST_TEST(wait_for("up") == "up");
  // Not connected to b, the shell shows it as a's link sees it, with its client address.
  auto seen = a.shell("nodes");
  BOOST_TEST(contains(line_with(seen.out, "b     west"), b.client), seen.out);

  // Both connected: each is up, with its own figures.
  auto both = a.shell("nodes", {}, b.admin);
  BOOST_TEST(contains(line_with(both.out, "a     east"), a.client), both.out);
  BOOST_TEST(contains(line_with(both.out, "b     west"), b.client), both.out);

  auto link = "a/links/peer-" + b.peer;
  auto tree = a.shell("tree");
  BOOST_TEST(contains(line_with(tree.out, link), "region_link"), tree.out);
  auto cut = a.shell("fault " + link + " cut 1500ms");
  BOOST_REQUIRE_MESSAGE(cut.status == 0, cut.err);
  BOOST_TEST(contains(cut.out, "cut " + link + " for 1500 ms"));
  BOOST_TEST(wait_for("down") == "down");
  BOOST_TEST(wait_for("up") == "up");  // the cut ends, heartbeats are answered again
}

BOOST_AUTO_TEST_CASE(drain_hands_every_session_to_its_group_and_the_node_is_safe_to_stop) {
  // The reference, on one fault-free node: a seed whose second reply runs past the stall below.
  // Sampling is keyed by (seed, turn, index), so any node generates the same conversation.
  const std::string first = "Hello there", second = "Tell me more";
  std::vector<keel::wire::turn_record> reference;
  uint64_t seed = 0;
  {
    node single;
    auto rc = single.connect();
    for (uint64_t s = 1; s <= 10 && (reference.empty() || reference[1].generated.size() < 12);
         ++s) {
      auto sid = rc->open_session(sampled(s));
      BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
      BOOST_REQUIRE(rc->generate(*sid, first, 8));
      BOOST_REQUIRE(rc->generate(*sid, second, 40));
      auto h = rc->history(*sid);
      BOOST_REQUIRE_MESSAGE(h, keel::test::why(h));
      BOOST_REQUIRE(h->size() == 2u);
      if (reference.empty() || (*h)[1].generated.size() > reference[1].generated.size())
        reference = *h, seed = s;
    }
  }
  BOOST_REQUIRE(reference[1].generated.size() >= 12u);

  trio t("drain", tiny_model());
  auto& a = t.a;
  auto& b = t.b;
  auto& c = t.c;

  // Three conversations on a, each with a finished turn; the last one's second turn runs while
  // a drains (a's shard stalls 1.5 s three steps into it).
  auto ca = a->connect();
  std::vector<std::string> ids;
  for (uint64_t s : {seed + 100, seed + 200, seed}) {
    auto sid = ca->open_session(sampled(s));
    BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
    auto g = ca->generate(*sid, first, 8);
    BOOST_REQUIRE_MESSAGE(g, keel::test::why(g));
    ids.push_back(*sid);
  }
  const auto running = ids.back();
  std::map<std::string, std::string> before;
  for (auto& id : ids) {
    auto h = ca->history(id);
    BOOST_REQUIRE_MESSAGE(h, keel::test::why(h));
    before[id] = transcript(*h);
  }
  BOOST_TEST(before[running] == transcript({reference[0]}));

  auto armed = a->shell("fault a/engine/shard-0 stall 1500ms 3");
  BOOST_REQUIRE_MESSAGE(armed.status == 0, armed.err);
  std::atomic<int> seen{0};
  std::vector<keel::wire::failover_event> failovers;
  caf::expected<keel::wire::generation> result = keel::make_error(keel::errc::failed, "not run");
  std::thread gen([&] {
    keel::wire::client::options o;
    o.on_failover = [&](const keel::wire::failover_event& e) { failovers.push_back(e); };
    // A client belongs to the thread that connected it.
    auto mine = keel::wire::client::connect({a->client, b->client, c->client}, o);
    if (!mine) {
      result = std::move(mine.error());
      return;
    }
    result = (*mine)->generate(running, second, 40,
                               [&](uint64_t, uint64_t, int32_t, std::string_view) { ++seen; });
  });
  for (int i = 0; i < 500 && seen.load() < 2; ++i) std::this_thread::sleep_for(10ms);
  BOOST_TEST(seen.load() >= 2);
  auto drained = t.shell("drain a");
  gen.join();

  BOOST_TEST_MESSAGE("drain a:\n" << drained.out << drained.err);
  BOOST_REQUIRE_MESSAGE(drained.status == 0, drained.out + drained.err);
  std::map<std::string, std::string> owner;
  for (auto& id : ids) {
    auto line = line_with(drained.out, id + " -> ");
    BOOST_TEST_REQUIRE(!line.empty(), id << " did not move: " << drained.out);
    BOOST_TEST(contains(line, " (epoch 2)"), line);
    owner[id] = line.substr(id.size() + 4, 1);
    BOOST_TEST((owner[id] == "b" || owner[id] == "c"), line);
  }
  BOOST_TEST(contains(drained.out, "node a is empty and safe to stop\n"), drained.out);

  // The running turn continued on its new owner: the client got the whole reply, each token
  // once, as the fault-free node generated it.
  BOOST_REQUIRE_MESSAGE(result, keel::test::why(result));
  BOOST_TEST(result->prompt == reference[1].prompt);
  BOOST_TEST(result->generated == reference[1].generated);
  BOOST_TEST(!failovers.empty(), "the stream did not move: it ended on a");
  for (auto& e : failovers)
    BOOST_TEST_MESSAGE("the running turn resumed from index " << e.from_index << " via " << e.to
                                                              << " (" << e.to_node << ") after "
                                                              << e.duration.count() << " ms");

  // a holds nothing, reports itself draining, and opens no sessions.
  auto left = a->shell("sessions --node a; nodes");
  BOOST_REQUIRE_MESSAGE(left.status == 0, left.err);
  BOOST_TEST(contains(left.out, "(no sessions)"), left.out);
  BOOST_TEST(contains(line_with(left.out, "a     r1"), "  draining  "), left.out);
  auto refused = ca->open_session(sampled(1));
  BOOST_REQUIRE(!refused);
  BOOST_TEST(keel::code_of(refused.error()) == keel::errc::overloaded);
  BOOST_TEST(contains(keel::message_of(refused.error()), "draining"),
             keel::describe(refused.error()));

  // Each conversation is whole on its new owner, which lists it at epoch 2.
  before[running] = transcript(reference);
  auto listed = b->shell("sessions", {}, c->admin);
  BOOST_REQUIRE_MESSAGE(listed.status == 0, listed.err);
  for (auto& id : ids) {
    auto cl = t.named(owner[id]).connect();
    auto h = cl->history(id);
    BOOST_REQUIRE_MESSAGE(h, id << " on " << owner[id] << ": " << keel::test::why(h));
    BOOST_TEST(transcript(*h) == before[id], id << " on " << owner[id]);
    auto row = line_with(listed.out, id + "  ");
    BOOST_TEST(contains(row, "  " + owner[id] + "  "), row);
    BOOST_TEST(contains(row, "  2  "), row);
  }

  // Draining again finds nothing to move.
  auto again = a->shell("drain a", {"--json"});
  BOOST_TEST(again.status == 0, again.err);
  BOOST_TEST(again.out ==
                 "{\"command\":\"drain\",\"node\":\"a\",\"sessions\":[],\"remaining\":0,"
                 "\"safe_to_stop\":true}\n",
             again.out);
}

BOOST_AUTO_TEST_CASE(the_ownership_host_is_in_the_tree_and_a_killed_one_comes_back) {
  // Under the protocol the host is "ownership/host", after the failover actor that starts and
  // stops the sessions it gains and loses: `kill` restarts it, and the restarted host recovers
  // from the store and takes its sessions back; the conversation goes on.
  trio t("ownership-kill", tiny_model());
  auto client = keel::wire::client::connect({t.a->client, t.b->client, t.c->client});
  BOOST_REQUIRE_MESSAGE(client, keel::test::why(client));
  auto& cl = *client;
  auto sid = cl->open_session(sampled(5));
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  auto first = cl->generate(*sid, "Hello there", 8);
  BOOST_REQUIRE_MESSAGE(first, keel::test::why(first));

  auto tree = t.a->shell("tree");
  BOOST_REQUIRE_MESSAGE(tree.status == 0, tree.err);
  BOOST_TEST(contains(line_with(tree.out, "a/ownership "), "supervisor"), tree.out);
  BOOST_TEST(contains(line_with(tree.out, "a/ownership/failover"), "running  "), tree.out);
  BOOST_TEST(contains(line_with(tree.out, "a/ownership/host"), "running  "), tree.out);
  auto killed = t.a->shell("kill a/ownership/host");
  BOOST_REQUIRE_MESSAGE(killed.status == 0, killed.err);
  BOOST_TEST(contains(killed.out, "killed a/ownership/host; a/ownership restarted it"),
             killed.out);

  // The next turn is acknowledged (by whichever member owns the session now; refused with
  // `disconnected`, a retry, while the restarted host takes its sessions back) and every node
  // answers the same two turns.
  // A client told to reconnect does so (here: a new connection, b first, as `keel` would
  // with the next endpoint of its list).
  auto second = cl->generate(*sid, "Tell me more", 8);
  for (int i = 0; i < 50 && !second && keel::code_of(second.error()) == keel::errc::disconnected;
       ++i) {
    std::this_thread::sleep_for(100ms);
    auto again = keel::wire::client::connect({t.b->client, t.c->client, t.a->client});
    BOOST_REQUIRE_MESSAGE(again, keel::test::why(again));
    second = (*again)->generate(*sid, "Tell me more", 8);
  }
  BOOST_REQUIRE_MESSAGE(second, keel::test::why(second));
  std::string expected;
  for (auto* n : {t.a.get(), t.b.get(), t.c.get()}) {
    auto h = n->connect()->history(*sid);
    BOOST_REQUIRE_MESSAGE(h, keel::test::why(h));
    BOOST_TEST(h->size() == 2u);
    if (expected.empty()) expected = transcript(*h);
    BOOST_TEST(transcript(*h) == expected);
  }
  tree = t.a->shell("tree");
  auto row = line_with(tree.out, "a/ownership/host");
  BOOST_TEST(contains(row, "running  "), row);
  BOOST_TEST(contains(row, " 1  "), row);  // restarts
  // The host alone: the failover actor before it went on.
  row = line_with(tree.out, "a/ownership/failover");
  BOOST_TEST(contains(row, " 0  "), row);
}

BOOST_AUTO_TEST_CASE(a_drain_that_cannot_move_a_session_says_why_and_fails) {
  // A node cut off from both its peers, which are cut from each other: its sessions have
  // nowhere to go. (A node alone never acknowledges a turn, so the session is opened while the
  // peers are there.)
  trio t("stays");
  auto c = t.a->connect();
  auto sid = c->open_session(sampled(5));
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  auto hi = c->generate(*sid, "Hi", 4);
  BOOST_REQUIRE_MESSAGE(hi, keel::test::why(hi));
  // The session's checkpoint is what its group holds: the whole finished turn.
  auto listed = t.a->shell("sessions --node a");
  BOOST_TEST(contains(line_with(listed.out, *sid),
                      "turn 0: " + std::to_string(hi->generated.size()) + " tokens"),
             listed.out);
  auto cut = t.a->shell("fault a partition --from b,c");
  BOOST_REQUIRE_MESSAGE(cut.status == 0, cut.out + cut.err);
  bool alone = false;
  for (int i = 0; i < 50 && !alone; ++i) {
    std::this_thread::sleep_for(100ms);
    auto r = t.a->shell("nodes");
    alone = contains(line_with(r.out, "b     r1"), "  down  ") &&
            contains(line_with(r.out, "c     r2"), "  down  ");
  }
  BOOST_REQUIRE_MESSAGE(alone, "a still sees a peer after the partition");

  // a gives the session up. b and c could still take it over together (a majority of its
  // group); cut from each other too, neither can, and the drain says so.
  auto bc = t.b->shell("fault b partition --from c");
  BOOST_REQUIRE_MESSAGE(bc.status == 0, bc.out + bc.err);
  auto r = t.a->shell("drain a");
  BOOST_TEST(r.status == 1);
  BOOST_TEST(contains(r.out, *sid + " stays: no other member of its group took it over within "),
             r.out);
  BOOST_TEST(contains(r.out, "node a: 1 session(s) have no new owner yet; it is not safe to stop\n"),
             r.out);
  BOOST_TEST(!contains(r.out, "safe to stop\nnode"), r.out);

  // A second drain asks again about the session the first gave up.
  auto j = t.a->shell("drain a", {"--json"});
  BOOST_TEST(j.status == 1);
  BOOST_TEST(contains(j.out, "{\"command\":\"drain\",\"node\":\"a\",\"sessions\":[{\"id\":\"" +
                                 *sid + "\",\"moved\":false,\"to\":null,\"epoch\":null,"
                                 "\"error\":\"no other member of its group took it over within "),
             j.out);
  BOOST_TEST(contains(j.out, "\"remaining\":1,\"safe_to_stop\":false}\n"), j.out);

  // A minority acknowledges no new session (and a draining node takes none anyway).
  auto refused = c->open_session(sampled(6));
  BOOST_TEST(!refused);
  auto nodes = t.a->shell("nodes; help drain");
  BOOST_TEST(contains(line_with(nodes.out, "a     r1"), "  draining  "), nodes.out);
  BOOST_TEST(contains(nodes.out, "usage: drain NODE"), nodes.out);
}

BOOST_AUTO_TEST_CASE(a_partition_cuts_peer_traffic_both_ways_and_heals) {
  trio t("partition");
  std::string last;
  const sightings all_up = {
      {"c", "a", "up"}, {"c", "b", "up"}, {"a", "c", "up"}, {"b", "c", "up"}, {"a", "b", "up"}};
  BOOST_REQUIRE_MESSAGE(all_seen_within(t, all_up, 5s, last),
                        "the links did not come up: " << last);

  // Applied at c only, through c's admin endpoint: a and b are told nothing.
  auto cut = t.c->shell("fault c partition --from a,b --ms 3000");
  auto cut_at = std::chrono::steady_clock::now();
  BOOST_REQUIRE_MESSAGE(cut.status == 0, cut.err);
  BOOST_TEST(cut.out == "partitioned c from a, b for 3000 ms\n", cut.out);

  // While it lasts (down_after is 500 ms): c sees a and b down, and a and b see c down, since
  // c refuses their heartbeats; a and b still see each other.
  bool cut_seen = all_seen_within(t,
                                  {{"c", "a", "down"},
                                   {"c", "b", "down"},
                                   {"a", "c", "down"},
                                   {"b", "c", "down"},
                                   {"a", "b", "up"}},
                                  2500ms, last);
  auto seen_after = std::chrono::duration_cast<std::chrono::milliseconds>(
      std::chrono::steady_clock::now() - cut_at);
  BOOST_TEST_MESSAGE("partition seen from both sides after " << seen_after.count() << " ms");
  BOOST_TEST(cut_seen, "the partition was not seen both ways: " << last);
  BOOST_TEST(seen_after < 3000ms, "seen only after the partition ended: " << last);
  auto cut_links = t.c->proc->err();
  BOOST_TEST(contains(cut_links, "partitioned from a by fault injection"), cut_links);
  BOOST_TEST(contains(t.a->proc->err(), "partitioned (fault injection)"), t.a->proc->err());

  // It ends by itself after 3 s: every link comes back up (after its reconnect backoff).
  std::this_thread::sleep_until(cut_at + 3000ms);
  bool healed = all_seen_within(t, all_up, 10s, last);
  BOOST_TEST(healed, "the links did not come back: " << last);
  auto cleared = t.c->shell("fault c clear");
  BOOST_TEST(contains(cleared.out, "healed its partition (there was none)"), cleared.out);
}

BOOST_AUTO_TEST_CASE(partition_arguments_are_checked) {
  trio t("partition-args");
  struct expect {
    std::string command;
    std::string message;
  };
  const std::vector<expect> cases = {
      {"fault c partition", "keel-shell: fault: partition: --from NODE,... is missing"},
      {"fault c partition --ms 3000", "partition: --from NODE,... is missing"},
      {"fault c partition --from", "partition: --from needs a value"},
      {"fault c partition --from a,,b", "partition: --from 'a,,b' has an empty node name"},
      {"fault c partition --from a --for 3s", "partition: unknown argument '--for'"},
      {"fault c partition --from a --ms 0x", "partition: --ms '0x' is not a time"},
      {"fault c partition --from a --ms 0", "partition: --ms '0' is not a time"},
      {"fault c partition --from a --ms 2.5", "partition: --ms '2.5' is not a time"},
      {"fault c partition --from a --ms 86400001", "from 1 ms to 24 hours"},
      {"fault c partition --from a --ms 1s --ms 2s", "partition: --ms is given twice"},
      {"fault c partition --from d", "keel-shell: fault: partition of c: no peer named 'd'; c has"},
      {"fault c partition --from a,d --ms 5s", "partition of c: no peer named 'd'"},
      {"fault c partition --from c", "partition of c: a node cannot be cut from itself (c)"},
      {"fault c/engine partition --from a", "partition applies to the node, c, not to c/engine"},
      {"fault c/engine/shard-0 partition --from a",
       "partition applies to the node, c, not to c/engine/shard-0"},
  };
  for (auto& e : cases) {
    auto r = t.c->shell(e.command);
    BOOST_TEST(r.status == 2, e.command << ": " << r.status);
    BOOST_TEST(contains(r.err, e.message), e.command << ": " << r.err);
    BOOST_TEST(std::count(r.err.begin(), r.err.end(), '\n') == 1, e.command << ": " << r.err);
    BOOST_TEST(r.out.empty(), e.command << ": " << r.out);
  }
  // The unknown name is answered with the peers c knows.
  auto unknown = t.c->shell("fault c partition --from d").err;
  BOOST_TEST((contains(unknown, "c has peers a, b\n") || contains(unknown, "c has peers b, a\n")),
             unknown);
  // The help and the list of kinds name it.
  auto help = t.c->shell("help fault");
  BOOST_TEST(contains(help.out, "fault NODE partition --from PEER,... [--ms TIME]"), help.out);
  auto kinds = t.c->shell("fault c explode");
  BOOST_TEST(contains(kinds.err, "kinds: crash, stall, kv-fail, cut, partition, disk-full, clear"),
             kinds.err);

  // Nothing refused was applied (not even a of "a,d"): there is no partition to heal.
  auto none = t.c->shell("fault c clear");
  BOOST_REQUIRE_MESSAGE(none.status == 0, none.err);
  BOOST_TEST(
      none.out == "disarmed every fault of node c and healed its partition (there was none)\n",
      none.out);

  // Without --ms the partition lasts until `clear`.
  auto cut = t.c->shell("fault c partition --from a");
  BOOST_REQUIRE_MESSAGE(cut.status == 0, cut.err);
  BOOST_TEST(cut.out == "partitioned c from a until cleared (fault c clear)\n", cut.out);
  std::string last;
  BOOST_TEST(
      all_seen_within(t, {{"c", "a", "down"}, {"a", "c", "down"}, {"c", "b", "up"}}, 3s, last),
      last);
  auto healed = t.c->shell("fault c clear");
  BOOST_REQUIRE_MESSAGE(healed.status == 0, healed.err);
  BOOST_TEST(healed.out == "disarmed every fault of node c and healed its partition from a\n",
             healed.out);
  BOOST_TEST(all_seen_within(t, {{"c", "a", "up"}, {"a", "c", "up"}}, 10s, last), last);
}
