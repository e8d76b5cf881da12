// Issue #11, "Clients can read and write each other's sessions": each finding of the hostile
// tester, reproduced against real keel-node processes on loopback, asserting the refusal.

#define BOOST_TEST_MODULE security
#include <boost/test/unit_test.hpp>

#include <sys/stat.h>

#include <fstream>
#include <regex>
#include <set>
#include <thread>

#include <capnp/ez-rpc.h>

#include "tests/process.hpp"
#include "tests/test_support.hpp"
#include "wire/client.hpp"
#include "wire/keel.capnp.h"

using namespace std::chrono_literals;
using keel::test::process;
using kind = keel::wire::Error::Kind;

namespace {

const std::string alice_key = "alice-key-0123456789";
const std::string bob_key = "bob-key-0123456789ab";

struct fixture {
  keel::test::temp_dir dir{"security_test"};
  std::string model = (dir.path / "model.gguf").string();
  std::string keys = (dir.path / "keys").string();

  fixture() {
    keel::test::write_model(model, keel::test::tiny_model());
    write_keys(
        "alice-key-0123456789 tenant=alice class=interactive rpm=6000 tpm=1000000 "
        "sessions=100\n"
        "bob-key-0123456789ab tenant=bob class=batch rpm=6000 tpm=1000000 sessions=100\n");
  }

  void write_keys(const std::string& text) {
    std::ofstream(keys) << text;
    ::chmod(keys.c_str(), 0600);
  }

  /// A file holding `key`, for `keel --key-file`.
  std::string key_file(const std::string& name, const std::string& key) {
    auto path = (dir.path / name).string();
    std::ofstream(path) << key << "\n";
    ::chmod(path.c_str(), 0600);
    return path;
  }
};

/// A keel-node on a free loopback port, up once it printed "listening on".
struct node {
  std::string address = "127.0.0.1:" + std::to_string(keel::test::free_port());
  std::unique_ptr<process> proc;

  node(const std::string& model, std::vector<std::string> extra) {
    std::vector<std::string> a = {
        keel::test::bin("keel-node"), "--listen", address, "--model", model, "--threads", "1"};
    a.insert(a.end(), extra.begin(), extra.end());
    proc = std::make_unique<process>(a);
    BOOST_REQUIRE_MESSAGE(
        proc->wait_err(
            [](const std::string& s) { return s.find("listening on") != std::string::npos; }, 15s),
        "keel-node did not start: " << proc->err());
  }
};

std::unique_ptr<keel::wire::client> client_of(const std::string& address, const std::string& key) {
  keel::wire::client::options o;
  o.api_key = key;
  o.call_timeout = 10s;
  auto c = keel::wire::client::connect({address}, o);
  BOOST_REQUIRE_MESSAGE(c, keel::test::why(c));
  return std::move(*c);
}

/// A sink that takes every event and ignores it.
class null_sink final : public keel::wire::TokenSink::Server {
 protected:
  kj::Promise<void> token(TokenContext) override { return kj::READY_NOW; }
  kj::Promise<void> done(DoneContext) override { return kj::READY_NOW; }
};

/// Runs `argv` to its end: exit status and stderr.
std::pair<int, std::string> run(std::vector<std::string> argv) {
  process p(std::move(argv));
  auto st = p.wait(20s);
  BOOST_REQUIRE_MESSAGE(st, "timed out: " << p.err());
  p.wait_err([](const std::string&) { return false; }, 1s);  // until the output has ended
  return {*st, p.out() + p.err()};
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(another_tenant_gets_the_answer_of_an_unknown_session, fixture) {
  // Finding: `keel history --connect ... s-1@a` from any second client printed another user's
  // conversation, and listSessions listed every id.
  node n(model, {"--keys", keys});
  auto alice = client_of(n.address, alice_key);
  auto id = alice->open_session({});
  BOOST_REQUIRE_MESSAGE(id, keel::test::why(id));
  auto reply = alice->generate(*id, "a secret of alice", 8);
  BOOST_REQUIRE_MESSAGE(reply, keel::test::why(reply));

  auto bob = client_of(n.address, bob_key);
  auto theirs = bob->history(*id);
  BOOST_REQUIRE(!theirs);
  auto unknown_id = "s-aaaaaaaaaaaaaaaaaaaaaaaa@node";
  auto unknown = bob->history(unknown_id);
  BOOST_REQUIRE(!unknown);
  BOOST_TEST(keel::code_of(theirs.error()) == keel::errc::not_found);
  auto same = keel::message_of(unknown.error());
  same.replace(same.find(unknown_id), std::string(unknown_id).size(), *id);
  BOOST_TEST(keel::message_of(theirs.error()) == same);
  BOOST_TEST(!bob->generate(*id, "PWNED", 4));
  BOOST_TEST(keel::code_of(bob->cancel(*id, 0)) == keel::errc::not_found);

  auto listed = bob->sessions();
  BOOST_REQUIRE(listed);
  BOOST_TEST(listed->empty());
  auto own = alice->sessions();
  BOOST_REQUIRE(own);
  BOOST_REQUIRE_EQUAL(own->size(), 1u);
  BOOST_TEST((*own)[0].id == *id);

  // The CLI, as the tester ran it: bob's key file gets nothing; alice's gets her conversation.
  auto as_bob = run({keel::test::bin("keel"), "history", "--connect", n.address, "--key-file",
                     key_file("bob.key", bob_key), *id});
  BOOST_TEST(as_bob.first != 0);
  BOOST_TEST(as_bob.second.find("not_found") != std::string::npos, as_bob.second);
  BOOST_TEST(as_bob.second.find("turn 0") == std::string::npos, as_bob.second);
  auto as_alice = run({keel::test::bin("keel"), "history", "--connect", n.address, "--key-file",
                       key_file("alice.key", alice_key), *id});
  BOOST_TEST(as_alice.first == 0, as_alice.second);
  BOOST_TEST(as_alice.second.find("turn 0") != std::string::npos, as_alice.second);
}

BOOST_FIXTURE_TEST_CASE(with_keys_the_bootstrap_answers_only_login, fixture) {
  node n(model, {"--keys", keys});
  BOOST_TEST(n.proc->wait_err(
                 [](const std::string& s) {
                   return s.find("client port: 2 API key(s) of 2 tenant(s)") != std::string::npos;
                 },
                 5s),
             n.proc->err());
  capnp::EzRpcClient rpc(n.address);
  auto& ws = rpc.getWaitScope();
  auto boot = rpc.getMain<keel::wire::Gateway>();
  BOOST_TEST((boot.infoRequest().send().wait(ws).getError().getKind() == kind::UNAUTHENTICATED));
  BOOST_TEST(
      (boot.listSessionsRequest().send().wait(ws).getError().getKind() == kind::UNAUTHENTICATED));
  BOOST_TEST(
      (boot.openSessionRequest().send().wait(ws).getError().getKind() == kind::UNAUTHENTICATED));
  auto get = boot.getSessionRequest();
  get.setId("s-1@node");
  BOOST_TEST((get.send().wait(ws).getError().getKind() == kind::UNAUTHENTICATED));

  auto wrong = boot.loginRequest();
  wrong.setKey("alice-key-012345678X");
  auto refused = wrong.send().wait(ws);
  BOOST_TEST((refused.getError().getKind() == kind::UNAUTHENTICATED));
  BOOST_TEST(std::string(refused.getError().getMessage().cStr()) == "API key refused");

  auto right = boot.loginRequest();
  right.setKey(alice_key);
  auto in = right.send().wait(ws);
  BOOST_REQUIRE((in.getError().getKind() == kind::NONE));
  BOOST_TEST(std::string(in.getTenant().cStr()) == "alice");
  auto info = in.getGateway().infoRequest().send().wait(ws);
  BOOST_TEST((info.getError().getKind() == kind::NONE));
  BOOST_TEST(std::string(info.getInfo().getName().cStr()) == "node");

  // The client library without a key says why it cannot connect.
  // (On a thread of its own: this one has the EzRpcClient's event loop, and a thread has one.)
  keel::wire::client::options o;
  caf::expected<std::unique_ptr<keel::wire::client>> none = keel::make_error(keel::errc::failed, "");
  std::thread([&] { none = keel::wire::client::connect({n.address}, o); }).join();
  BOOST_REQUIRE(!none);
  BOOST_TEST(keel::code_of(none.error()) == keel::errc::unauthenticated, keel::test::why(none));
}

BOOST_FIXTURE_TEST_CASE(session_ids_are_unguessable_and_never_reused, fixture) {
  // Finding: ids were `s-N@node`, and a node whose log lost sessions gave `s-1@d` again.
  auto data = (dir.path / "data").string();
  std::set<std::string> seen;
  for (int life = 0; life < 2; ++life) {
    std::filesystem::remove_all(data);  // the second life: the store lost every session
    node n(model, {"--name", "d", "--data", data});
    auto c = client_of(n.address, "");
    for (int i = 0; i < 3; ++i) {
      auto id = c->open_session({});
      BOOST_REQUIRE_MESSAGE(id, keel::test::why(id));
      BOOST_TEST(std::regex_match(*id, std::regex("s-[a-z2-7]{24}@d")), *id);
      BOOST_TEST(seen.insert(*id).second, *id << " given twice");
    }
  }
}

BOOST_FIXTURE_TEST_CASE(held_tokens_are_refused_unless_the_session_lost_them, fixture) {
  // Finding: `Session.resume` with extra held tokens wrote them into another client's live
  // reply ("PWNED PWNED", stored). The shard stalls, so the victim's turn has no token yet when
  // the attacker resumes it with held tokens of its own.
  node n(model, {"--admin-listen", "127.0.0.1:0", "--admin-key-file",
                 keel::test::secret_file("security-admin")});
  BOOST_REQUIRE(n.proc->wait_err(
      [](const std::string& s) { return s.find("admin on ") != std::string::npos; }, 5s));
  auto err = n.proc->err();
  auto at = err.find("admin on ") + 9;
  auto admin = err.substr(at, err.find_first_of(" \n", at) - at);
  auto victim = client_of(n.address, "");
  auto control = client_of(n.address, "");
  auto id = victim->open_session({});
  auto control_id = control->open_session({});
  BOOST_REQUIRE(id && control_id);
  process shell({keel::test::bin("keel-shell"), "--connect", admin, "--key-file",
                 keel::test::secret_file("security-admin"), "-c",
                 "fault node/engine/shard-0 stall 2s"});
  BOOST_REQUIRE_MESSAGE(shell.wait(20s).value_or(-1) == 0, shell.out() << shell.err());

  std::vector<int32_t> generated;
  std::thread streaming([&] {
    auto c = client_of(n.address, "");
    auto r = c->generate(*id, "Once upon a time", 32);
    if (r) generated = r->generated;
  });
  // Until the turn is accepted (its first step stalls): a sleep was too short under ASan.
  {
    auto watcher = client_of(n.address, "");
    auto until = std::chrono::steady_clock::now() + 20s;
    while (std::chrono::steady_clock::now() < until) {
      auto h = watcher->history(*id);
      if (h && !h->empty()) break;
      std::this_thread::sleep_for(20ms);
    }
  }
  {
    capnp::EzRpcClient rpc(n.address);
    auto& ws = rpc.getWaitScope();
    auto get = rpc.getMain<keel::wire::Gateway>().getSessionRequest();
    get.setId(*id);
    auto s = get.send().wait(ws);
    BOOST_REQUIRE((s.getError().getKind() == kind::NONE));
    auto resume = s.getSession().resumeRequest();
    resume.setTurn(0);
    resume.setFromIndex(0);
    resume.setSink(kj::heap<null_sink>());
    auto held = resume.initHeld(2);
    held.set(0, 80);  // 'P', 'W': tokens of the model, not of this session
    held.set(1, 87);
    auto answer = resume.send().wait(ws);
    BOOST_TEST((answer.getError().getKind() == kind::BAD_REQUEST));
    std::string why = answer.getError().getMessage().cStr();
    BOOST_TEST(why.find("the client holds 2 tokens, the session produced 0") != std::string::npos,
               why);
  }
  streaming.join();
  // The victim's reply is the one the same prompt gets in a session nobody touched.
  auto expected = control->generate(*control_id, "Once upon a time", 32);
  BOOST_REQUIRE(expected);
  BOOST_TEST(generated == expected->generated);
  auto stored = victim->history(*id);
  BOOST_REQUIRE(stored);
  BOOST_TEST((*stored)[0].generated == expected->generated);
}

BOOST_FIXTURE_TEST_CASE(a_tenant_is_held_to_its_limits_and_class_alone, fixture) {
  write_keys(
      "alice-key-0123456789 tenant=alice class=interactive rpm=6000 tpm=1000000 "
      "sessions=100\n"
      "bob-key-0123456789ab tenant=bob class=batch rpm=4 tpm=1000000 sessions=1\n");
  node n(model, {"--keys", keys});
  auto bob = client_of(n.address, bob_key);  // login and info: no request counted
  auto id = bob->open_session({}, 50);       // 1
  BOOST_REQUIRE_MESSAGE(id, keel::test::why(id));
  auto again = bob->open_session({});  // 2
  BOOST_REQUIRE(!again);
  BOOST_TEST(keel::code_of(again.error()) == keel::errc::overloaded);
  BOOST_TEST(keel::message_of(again.error()).find("tenant bob: over its limit sessions=1") !=
             std::string::npos);
  auto listed = bob->sessions();  // 3
  BOOST_REQUIRE(listed);
  BOOST_TEST((*listed)[0].priority == 0);            // asked 50, capped by the batch class
  BOOST_TEST(static_cast<bool>(bob->history(*id)));  // 4 (the session from openSession)
  auto over = bob->history(*id);                     // 5
  BOOST_REQUIRE(!over);
  BOOST_TEST(keel::code_of(over.error()) == keel::errc::overloaded);
  BOOST_TEST(keel::message_of(over.error()).find("over its limit rpm=4") != std::string::npos,
             keel::message_of(over.error()));
  BOOST_TEST(keel::wire::retry_after_ms(over.error()) > 0u);

  auto alice = client_of(n.address, alice_key);  // another tenant: unaffected
  auto mine = alice->open_session({}, 15);
  BOOST_REQUIRE(mine);
  BOOST_TEST(static_cast<bool>(alice->open_session({})));
  BOOST_TEST((*alice->sessions())[0].priority + (*alice->sessions())[1].priority == 15);
}

BOOST_FIXTURE_TEST_CASE(without_keys_the_client_port_serves_loopback_only_and_says_so, fixture) {
  auto open = run({keel::test::bin("keel-node"), "--listen", "0.0.0.0:0", "--model", model});
  BOOST_TEST(open.first != 0);
  BOOST_TEST(open.second.find("--listen 0.0.0.0:0: without --keys FILE") != std::string::npos,
             open.second);
  ::chmod(keys.c_str(), 0640);
  auto readable = run(
      {keel::test::bin("keel-node"), "--listen", "127.0.0.1:0", "--model", model, "--keys", keys});
  BOOST_TEST(readable.first != 0);
  BOOST_TEST(readable.second.find("mode 640") != std::string::npos, readable.second);
  node n(model, {});
  BOOST_TEST(n.proc->wait_err(
                 [](const std::string& s) {
                   return s.find("client port open to anyone on this host (no --keys)") !=
                          std::string::npos;
                 },
                 5s),
             n.proc->err());
}

/// `f()` until it succeeds or `limit` passed: its last answer.
template <class F>
auto eventually(F f, std::chrono::milliseconds limit = 15s) {
  auto r = f();
  for (auto until = std::chrono::steady_clock::now() + limit;
       !r && std::chrono::steady_clock::now() < until; r = f())
    std::this_thread::sleep_for(100ms);
  return r;
}

BOOST_FIXTURE_TEST_CASE(a_session_reached_through_another_node_is_tenant_checked_by_its_owner,
                        fixture) {
  // Node a forwards a request for b's session to b, logged in as the caller's tenant: b checks
  // it; after a takeover the new owner checks the tenant stored (and replicated) with it.
  std::vector<std::string> names = {"a", "b", "c"}, peer;
  for (size_t i = 0; i < names.size(); ++i)
    peer.push_back("127.0.0.1:" + std::to_string(keel::test::free_port()));
  std::vector<std::unique_ptr<node>> nodes;
  for (size_t i = 0; i < names.size(); ++i) {
    std::string others;
    for (size_t j = 0; j < names.size(); ++j)
      if (j != i) others += (others.empty() ? "" : ",") + names[j] + "=" + peer[j];
    nodes.push_back(std::make_unique<node>(
        model, std::vector<std::string>{"--name", names[i], "--keys", keys, "--data",
                                        (dir.path / names[i]).string(), "--peer-listen", peer[i],
                                        "--peers", others}));
  }
  auto& a = *nodes[0];
  auto& b = *nodes[1];
  auto alice_b = client_of(b.address, alice_key);
  auto id = eventually([&] { return alice_b->open_session({}); });  // once b sees a majority
  BOOST_REQUIRE_MESSAGE(id, keel::test::why(id));
  BOOST_REQUIRE(alice_b->generate(*id, "a secret of alice", 8));

  // Until a's links know where b serves clients, a answers `disconnected`.
  auto through = eventually([&] { return client_of(a.address, alice_key)->history(*id); });
  BOOST_REQUIRE_MESSAGE(through, keel::test::why(through));
  BOOST_TEST(through->size() == 1u);
  auto theirs = client_of(a.address, bob_key)->history(*id);
  BOOST_REQUIRE(!theirs);
  BOOST_TEST(keel::code_of(theirs.error()) == keel::errc::not_found, keel::test::why(theirs));
  BOOST_TEST(keel::message_of(theirs.error()) == "no node has session " + *id);

  // b dies; a or c takes the session over from its replica, with its tenant.
  b.proc->signal(SIGKILL);
  auto after = eventually([&] { return client_of(a.address, alice_key)->history(*id); });
  BOOST_REQUIRE_MESSAGE(after, keel::test::why(after));
  BOOST_TEST(after->size() == 1u);
  auto bob_after = client_of(a.address, bob_key)->history(*id);
  BOOST_REQUIRE(!bob_after);
  BOOST_TEST(keel::code_of(bob_after.error()) == keel::errc::not_found);
  BOOST_TEST(keel::message_of(bob_after.error()) == "no node has session " + *id);
}
