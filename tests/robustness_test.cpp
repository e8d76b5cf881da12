// A node under hostile load (issue #11): its listeners never die.

#define BOOST_TEST_MODULE robustness
#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <thread>
#include <vector>

#include "tests/cluster.hpp"
#include "tests/process.hpp"
#include "tests/test_support.hpp"
#include <capnp/ez-rpc.h>

#include "wire/client.hpp"
#include "wire/keel.capnp.h"

using namespace std::chrono_literals;

namespace {

struct model_file {
  keel::test::temp_dir dir{"robustness_test-" + std::to_string(getpid())};
  std::string path = (dir.path / "model.gguf").string();
  model_file() { keel::test::write_model(path, keel::test::tiny_model()); }
};

/// A raw TCP connection to 127.0.0.1:`port` that says nothing (-1 when it cannot connect).
int idle_connection(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

}  // namespace

BOOST_AUTO_TEST_CASE(the_client_port_accepts_again_after_running_out_of_file_descriptors) {
  // Issue #11: ~1,050 idle connections under `ulimit -n 1024` made accept fail once, and the
  // client port stayed closed for good. Here the node may open 128 files (a hard limit it cannot
  // raise) and 300 idle connections arrive: accept fails, then, once they are gone, a real
  // client is served again.
  model_file m;
  auto port = keel::test::free_port();
  keel::test::process node({"/bin/sh", "-c",
                            "ulimit -S -n 128 && ulimit -H -n 128 && exec " +
                                keel::test::bin("keel-node") + " --listen 127.0.0.1:" +
                                std::to_string(port) + " --model " + m.path + " --threads 1"});
  BOOST_REQUIRE_MESSAGE(
      node.wait_err([](const std::string& s) { return s.find("listening on") != std::string::npos; },
                    15s),
      "keel-node did not start: " << node.err());
  BOOST_TEST(node.err().find("open files: limit 128") != std::string::npos, node.err());

  std::vector<int> fds;
  for (int i = 0; i < 300; ++i) {
    int fd = idle_connection(port);
    if (fd >= 0) fds.push_back(fd);
  }
  BOOST_TEST_MESSAGE(fds.size() << " idle connections opened");
  bool failed = node.wait_err(
      [](const std::string& s) { return s.find("gateway: accept failed") != std::string::npos; },
      10s);
  BOOST_TEST(failed, "accept never failed: the test did not exhaust the node's descriptors:\n"
                         << node.err());
  for (int fd : fds) close(fd);

  // Served again within a few backoff periods (at most 1 s each).
  keel::wire::client::options co;
  co.connect_timeout = 1000ms;
  co.call_timeout = 5000ms;
  caf::expected<std::string> opened = keel::make_error(keel::errc::disconnected, "not tried");
  auto until = std::chrono::steady_clock::now() + 15s;
  while (std::chrono::steady_clock::now() < until) {
    auto c = keel::wire::client::connect({"127.0.0.1:" + std::to_string(port)}, co);
    if (c) {
      opened = (*c)->open_session({});
      if (opened) break;
    }
    std::this_thread::sleep_for(200ms);
  }
  BOOST_TEST(static_cast<bool>(opened), "the client port never served again: "
                                            << keel::test::why(opened) << "\n"
                                            << node.err());
  BOOST_TEST(node.err().find("gateway: accepting again") != std::string::npos, node.err());
  node.signal(SIGTERM);
  BOOST_TEST(node.stop(10s) == 0);
}

namespace {

/// A sink that takes every event and ignores it.
class null_sink final : public keel::wire::TokenSink::Server {
 protected:
  kj::Promise<void> token(TokenContext) override { return kj::READY_NOW; }
  kj::Promise<void> done(DoneContext) override { return kj::READY_NOW; }
};

/// A raw Cap'n Proto client that opened a session and sent one turn (its tokens to a null sink).
struct raw_turn {
  capnp::EzRpcClient rpc;
  keel::wire::Session::Client session = nullptr;
  uint64_t turn = 0;

  raw_turn(const std::string& address, uint32_t max_tokens) : rpc(address) {
    auto& ws = rpc.getWaitScope();
    auto opened = rpc.getMain<keel::wire::Gateway>().openSessionRequest().send().wait(ws);
    BOOST_REQUIRE(opened.getError().getKind() == keel::wire::Error::Kind::NONE);
    session = opened.getSession();
    auto send = session.sendRequest();
    send.setText("Once upon a time");
    send.setMaxTokens(max_tokens);
    send.setSink(kj::heap<null_sink>());
    auto sent = send.send().wait(ws);
    BOOST_REQUIRE(sent.getError().getKind() == keel::wire::Error::Kind::NONE);
    turn = sent.getTurn();
  }
};

/// A keel-node on `address` with an admin endpoint (key `key`), started and listening.
struct admin_node {
  keel::test::process proc;
  std::string admin;  // the admin endpoint's HOST:PORT

  admin_node(const std::string& model, const std::string& address, const std::string& key,
             std::vector<std::string> extra = {})
      : proc(argv(model, address, key, std::move(extra))) {
    BOOST_REQUIRE_MESSAGE(
        proc.wait_err([](const std::string& s) { return s.find("admin on ") != std::string::npos; },
                      15s),
        "keel-node did not start: " << proc.err());
    auto err = proc.err();
    auto at = err.find("admin on ") + 9;
    admin = err.substr(at, err.find('\n', at) - at);
  }

  /// keel-shell -c `commands` with the key; requires it to succeed.
  void shell(const std::string& key, const std::string& commands) {
    keel::test::process sh(
        {keel::test::bin("keel-shell"), "--connect", admin, "--key-file",
         keel::test::secret_file(key), "-c", commands});
    BOOST_REQUIRE_MESSAGE(sh.wait(20s).value_or(-1) == 0, sh.out() << sh.err());
  }

 private:
  static std::vector<std::string> argv(const std::string& model, const std::string& address,
                                       const std::string& key, std::vector<std::string> extra) {
    std::vector<std::string> a = {keel::test::bin("keel-node"), "--listen", address, "--model",
                                  model, "--threads", "1", "--admin-listen", "127.0.0.1:0",
                                  "--admin-key-file", keel::test::secret_file(key)};
    a.insert(a.end(), extra.begin(), extra.end());
    return a;
  }
};

}  // namespace

BOOST_AUTO_TEST_CASE(a_resume_with_held_tokens_outside_the_vocabulary_fails_alone) {
  // Issue #11: a resume whose held tokens included 99999 reached the engine, every later request
  // answered "the session supervisor is down", and the node broke again after a restart. Now the
  // resume is refused with bad_request, naming the token, and the node serves on.
  model_file m;
  auto port = keel::test::free_port();
  auto address = "127.0.0.1:" + std::to_string(port);
  admin_node n(m.path, address, "robustness");
  auto& node = n.proc;
  // The shard stalls before its next step: the turn below stays at zero tokens while the
  // resume arrives, so the held tokens pass the check against what the session has (none).
  n.shell("robustness", "fault node/engine/shard-0 stall 3s");
  {
    raw_turn t(address, 500);
    auto& ws = t.rpc.getWaitScope();
    auto resume = t.session.resumeRequest();
    resume.setTurn(t.turn);
    resume.setFromIndex(0);
    resume.setSink(kj::heap<null_sink>());
    auto held = resume.initHeld(3);
    for (unsigned i = 0; i < held.size(); ++i) held.set(i, 99999);
    auto answer = resume.send().wait(ws);
    BOOST_TEST((answer.getError().getKind() == keel::wire::Error::Kind::BAD_REQUEST));
    std::string why = answer.getError().getMessage().cStr();
    BOOST_TEST(why.find("99999") != std::string::npos, why);
    BOOST_TEST(why.find("outside the vocabulary") != std::string::npos, why);
  }
  // The node serves another client as before.
  keel::wire::client::options co;
  co.call_timeout = 20000ms;
  auto c = keel::wire::client::connect({address}, co);
  BOOST_REQUIRE_MESSAGE(c, keel::test::why(c));
  auto s = (*c)->open_session({});
  BOOST_REQUIRE_MESSAGE(s, keel::test::why(s));
  auto g = (*c)->generate(*s, "Hello", 8);
  BOOST_TEST(static_cast<bool>(g), keel::test::why(g));
  BOOST_TEST(node.err().find("supervisor is down") == std::string::npos, node.err());
  node.signal(SIGTERM);
  BOOST_TEST(node.stop(10s) == 0);
}

BOOST_AUTO_TEST_CASE(the_session_store_is_readable_by_its_owner_only) {
  // Issue #11: data files are created readable by the owner only, whatever the umask.
  model_file m;
  keel::test::temp_dir data{"robustness_test-data-" + std::to_string(getpid())};
  auto port = keel::test::free_port();
  auto address = "127.0.0.1:" + std::to_string(port);
  keel::test::process node({"/bin/sh", "-c",
                            "umask 022 && exec " + keel::test::bin("keel-node") + " --listen " +
                                address + " --model " + m.path + " --threads 1 --data " +
                                (data.path / "store").string()});
  BOOST_REQUIRE_MESSAGE(
      node.wait_err([](const std::string& s) { return s.find("listening on") != std::string::npos; },
                    15s),
      "keel-node did not start: " << node.err());
  {
    auto c = keel::wire::client::connect({address});
    BOOST_REQUIRE_MESSAGE(c, keel::test::why(c));
    auto s = (*c)->open_session({});
    BOOST_REQUIRE_MESSAGE(s, keel::test::why(s));
    BOOST_REQUIRE(static_cast<bool>((*c)->generate(*s, "Hello", 4)));
  }
  node.signal(SIGTERM);
  BOOST_TEST(node.stop(10s) == 0);
  size_t files = 0;
  for (auto& e : std::filesystem::recursive_directory_iterator(data.path / "store")) {
    ++files;
    auto p = e.status().permissions();
    using std::filesystem::perms;
    bool private_ = (p & (perms::group_all | perms::others_all)) == perms::none;
    BOOST_TEST(private_, e.path().string() << " can be read or written by others");
  }
  BOOST_TEST(files > 3u);
}

BOOST_AUTO_TEST_CASE(sigterm_stops_the_node_within_its_bound_even_with_a_stuck_worker) {
  // Issue #11: SIGTERM hung in await_detached_threads behind a stuck worker. A shard stalled for
  // 60 s holds the clean stop; --stop-timeout ends the process after 2 s anyway, saying so.
  model_file m;
  auto port = keel::test::free_port();
  auto address = "127.0.0.1:" + std::to_string(port);
  admin_node n(m.path, address, "robustness", {"--stop-timeout", "2000"});
  auto& node = n.proc;
  n.shell("robustness", "fault node/engine/shard-0 stall 60s");
  raw_turn stalled(address, 50);  // its first step stalls the worker
  std::this_thread::sleep_for(300ms);  // the worker is in its stall now
  auto t0 = std::chrono::steady_clock::now();
  node.signal(SIGTERM);
  auto st = node.wait(20s);
  auto took = std::chrono::steady_clock::now() - t0;
  BOOST_REQUIRE_MESSAGE(st.has_value(), "keel-node still runs 20 s after SIGTERM");
  BOOST_TEST((took < 10s));
  BOOST_TEST_MESSAGE("stopped " << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                                << " ms after SIGTERM, status " << *st);
  BOOST_TEST(node.err().find("did not stop within 2000 ms") != std::string::npos, node.err());
}

BOOST_AUTO_TEST_CASE(wrong_admin_keys_are_answered_one_at_a_time) {
  // Issue #11: 20,000 wrong keys pipelined on one connection were answered in 1.2 s. Wrong keys
  // are now answered 200 ms apart across the whole endpoint, and past 32 waiting, every login is
  // refused as overloaded without looking at the key.
  model_file m;
  admin_node n(m.path, "127.0.0.1:0", "the-right-key");
  capnp::EzRpcClient rpc(n.admin);
  auto& ws = rpc.getWaitScope();
  auto gate = rpc.getMain<keel::wire::AdminGate>();
  auto t0 = std::chrono::steady_clock::now();
  std::vector<kj::Promise<capnp::Response<keel::wire::AdminGate::LoginResults>>> guesses;
  for (int i = 0; i < 40; ++i) {
    auto req = gate.loginRequest();
    req.setKey("guess-" + std::to_string(i));
    guesses.push_back(req.send());
  }
  int refused = 0, overloaded = 0;
  for (auto& g : guesses) {
    auto r = g.wait(ws);
    auto kind = r.getError().getKind();
    refused += kind == keel::wire::Error::Kind::FAILED;
    overloaded += kind == keel::wire::Error::Kind::OVERLOADED;
    BOOST_TEST(!r.hasAdmin());
  }
  auto took = std::chrono::steady_clock::now() - t0;
  BOOST_TEST(refused == 32);
  BOOST_TEST(overloaded == 8);
  BOOST_TEST((took >= 6s), "32 wrong keys were answered in "
                              << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                              << " ms");
  // The lockout ends with the answers: the right key gets in at once.
  auto right = gate.loginRequest();
  right.setKey("the-right-key");
  auto t1 = std::chrono::steady_clock::now();
  auto r = right.send().wait(ws);
  BOOST_TEST((r.getError().getKind() == keel::wire::Error::Kind::NONE));
  BOOST_TEST(r.hasAdmin());
  BOOST_TEST((std::chrono::steady_clock::now() - t1 < 1s));
}

BOOST_AUTO_TEST_CASE(an_actor_path_with_a_nul_byte_is_refused) {
  // Issue #11: a path read up to its NUL byte names another actor: "node/engine/shard-0\0x"
  // would have killed shard-0.
  model_file m;
  admin_node n(m.path, "127.0.0.1:0", "the-right-key");
  capnp::EzRpcClient rpc(n.admin);
  auto& ws = rpc.getWaitScope();
  auto login = rpc.getMain<keel::wire::AdminGate>().loginRequest();
  login.setKey("the-right-key");
  auto admin = login.send().wait(ws).getAdmin();
  auto kill = admin.killRequest();
  const std::string path("node/engine/shard-0\0x", 21);
  kill.setPath(capnp::Text::Reader(path.data(), path.size()));
  auto r = kill.send().wait(ws);
  BOOST_TEST((r.getError().getKind() == keel::wire::Error::Kind::BAD_REQUEST));
  BOOST_TEST(std::string(r.getError().getMessage().cStr()).find("NUL byte at 19") !=
                 std::string::npos,
             r.getError().getMessage().cStr());
  BOOST_TEST(n.proc.err().find("shard-0 failed") == std::string::npos, n.proc.err());
  BOOST_TEST(n.proc.err().find("shard-0 restarted") == std::string::npos, n.proc.err());
}

BOOST_AUTO_TEST_CASE(a_session_that_keeps_crashing_is_parked_and_the_others_are_served) {
  // Issue #11: a session crashed again and again was restarted forever, and enough of that
  // escalated to the session supervisor and took every session down. After 5 failures within
  // 10 s it is parked: its requests fail, saying so, keel-shell shows it, the rest go on.
  model_file m;
  auto port = keel::test::free_port();
  auto address = "127.0.0.1:" + std::to_string(port);
  admin_node n(m.path, address, "the-right-key");
  keel::wire::client::options co;
  co.resume_for = 0ms;  // every failure shows
  auto c = keel::wire::client::connect({address}, co);
  BOOST_REQUIRE(static_cast<bool>(c));
  auto poison = (*c)->open_session({});
  auto good = (*c)->open_session({});
  BOOST_REQUIRE(poison && good);
  n.shell("the-right-key", "fault node/sessions/" + *poison + " crash --times 100");
  std::string last;
  for (int i = 0; i < 10 && last.find("parked") == std::string::npos; ++i) {
    auto h = (*c)->generate(*poison, "hello", 2);  // a crash at each turn it is sent
    if (!h) last = keel::test::why(h);
    std::this_thread::sleep_for(50ms);
  }
  BOOST_TEST(last.find("is parked: 5 failures within 10000 ms") != std::string::npos, last);
  BOOST_TEST(n.proc.err().find("session " + *poison + " parked") != std::string::npos,
             n.proc.err());
  BOOST_TEST(n.proc.err().find("escalated") == std::string::npos, n.proc.err());
  // The other session is served; the shell lists the parked one as such.
  auto g = (*c)->generate(*good, "Once upon a time", 4);
  BOOST_TEST(static_cast<bool>(g), keel::test::why(g));
  keel::test::process sh({keel::test::bin("keel-shell"), "--connect", n.admin, "--key-file",
                          keel::test::secret_file("the-right-key"), "-c", "sessions"});
  BOOST_REQUIRE(sh.wait(20s).value_or(-1) == 0);
  BOOST_TEST(sh.out().find("parked") != std::string::npos, sh.out());
}

BOOST_AUTO_TEST_CASE(a_node_whose_root_supervisor_gave_up_is_not_ready_and_its_sessions_move) {
  // Issue #11: a node whose supervisor was down answered every request with "the session
  // supervisor is down" while its heartbeats said "up", so nobody took its sessions over. Now it
  // says it is not ready, its peers declare it down, and a replica takes its sessions.
  model_file m;
  keel::test::cluster_config cfg;
  cfg.model = m.path;
  cfg.root = m.dir.path / "cluster";
  cfg.replicas = 2;
  cfg.admin = true;
  cfg.label = "readiness";
  keel::test::cluster cl(cfg, {{"a", "r1"}, {"b", "r1"}, {"c", "r2"}});
  cl.start_all();
  BOOST_REQUIRE(cl.wait_all_links_up(15s));
  auto c = keel::wire::client::connect({cl.address(0)});
  BOOST_REQUIRE(static_cast<bool>(c));
  auto session = (*c)->open_session({});
  BOOST_REQUIRE(static_cast<bool>(session));
  auto g = (*c)->generate(*session, "Once upon a time", 6);
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(g), keel::test::why(g));
  c->reset();

  // Six failures of the engine within 10 s: more than the root's intensity (5), so it gives up.
  std::string kills;
  for (int i = 0; i < 6; ++i) kills += "kill a/engine; ";
  cl.shell(0, kills);
  auto until = std::chrono::steady_clock::now() + 20s;
  while (std::chrono::steady_clock::now() < until &&
         cl.current_log(0).find("node not ready") == std::string::npos)
    std::this_thread::sleep_for(100ms);
  BOOST_REQUIRE_MESSAGE(cl.current_log(0).find("node not ready") != std::string::npos,
                        cl.current_log(0));
  // b declares it down for that reason, and the session is served elsewhere with its turn.
  std::vector<keel::wire::turn_record> h;
  std::string last;
  until = std::chrono::steady_clock::now() + 20s;
  while (std::chrono::steady_clock::now() < until) {
    auto b = keel::wire::client::connect({cl.address(1)});
    if (b) {
      auto r = (*b)->history(*session);
      if (r) {
        h = *r;
        break;
      }
      last = keel::test::why(r);
    }
    std::this_thread::sleep_for(200ms);
  }
  BOOST_REQUIRE_MESSAGE(h.size() == 1, "history through b: " << last << "\n" << cl.logs());
  BOOST_TEST(h[0].generated == g->generated);
  BOOST_TEST(cl.current_log(1).find("not ready: its root supervisor exited") != std::string::npos,
             cl.current_log(1));
  BOOST_TEST(cl.logs().find("took over session " + *session) != std::string::npos);
}
