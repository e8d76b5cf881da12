// Trust boundaries (issue #11): peers authenticate each other with the cluster's certificates,
// and every port speaks TLS when the node has a certificate. Real keel-node processes on
// loopback; the attacker is a raw Cap'n Proto client with whatever certificate it could get.

#define BOOST_TEST_MODULE tls
#include <boost/test/unit_test.hpp>

#include <unistd.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include "actors/ownership_codec.hpp"
#include "tests/cluster.hpp"
#include "tests/process.hpp"
#include "tests/test_support.hpp"
#include "wire/client.hpp"
#include "wire/peer.capnp.h"
#include "wire/rpc_client.hpp"
#include "wire/tls.hpp"

using namespace std::chrono_literals;
using keel::test::cluster;
using keel::test::cluster_config;

namespace {

/// A synthetic model and a CA with certificates for a, b, c (the cluster) and mallory (signed by
/// the same CA, but no node of the cluster), plus a second CA's "b" (an impostor).
struct fixture {
  keel::test::temp_dir dir{"tls_test-" + std::to_string(getpid())};
  std::filesystem::path certs = dir.path / "certs";
  std::filesystem::path evil = dir.path / "evil";
  std::string model = (dir.path / "model.gguf").string();

  fixture() {
    keel::test::write_model(model, keel::test::tiny_model());
    keel::test::make_certs(certs, {"a", "b", "c", "mallory"});
    keel::test::make_certs(evil, {"b"});
  }

  std::shared_ptr<const keel::wire::tls_config> tls(const std::filesystem::path& d,
                                                    const std::string& name) const {
    keel::wire::tls_files f;
    f.ca = (certs / "ca.crt").string();
    if (!name.empty()) {
      f.cert = (d / (name + ".crt")).string();
      f.key = (d / (name + ".key")).string();
    }
    auto t = keel::wire::tls_config::load(f);
    BOOST_REQUIRE_MESSAGE(static_cast<bool>(t), keel::test::why(t));
    return *t;
  }

  /// A three-node TLS cluster's settings (two replicas), with the admin port when `admin`.
  cluster_config cluster_cfg(const std::string& label, bool admin) const {
    cluster_config cfg;
    cfg.model = model;
    cfg.root = dir.path / "cluster";
    cfg.replicas = 2;
    cfg.tls = certs;
    cfg.admin = admin;
    cfg.label = label;
    return cfg;
  }

  /// A client of the cluster's client ports, over TLS.
  keel::wire::client::options client_options() const {
    keel::wire::client::options co;
    co.tls = tls(certs, "");
    co.tls_name = "localhost";
    co.connect_timeout = 2000ms;
    co.call_timeout = 10000ms;
    return co;
  }
};

/// `Peer.ownership` from `from` on `address`, over `tls` (null: plain TCP), carrying a write of
/// `session` at a high ballot of `ballot_owner` with no turns: what an attacker sends to erase a
/// session (or, as a prepare, to steal it). "" when the call was served, else why it failed.
std::string forge_as(const std::string& address, std::shared_ptr<const keel::wire::tls_config> tls,
                     const std::string& from, const std::string& session,
                     const std::string& ballot_owner) {
  try {
    keel::wire::rpc_client rpc(address, tls, "a", 3000ms);
    keel::write_msg w;
    w.session = session;
    w.b = {1000, ballot_owner};
    w.seq = 1;
    w.durable = true;
    auto bytes = keel::encode(keel::ownership_msg{w});
    auto req = rpc.getMain<keel::wire::Peer>().ownershipRequest();
    req.initFrom().setName(from);
    req.setMessage(kj::arrayPtr(reinterpret_cast<const capnp::byte*>(bytes.data()), bytes.size()));
    req.send().wait(rpc.getWaitScope());
    return "";
  } catch (const kj::Exception& e) {
    std::string why = e.getDescription().cStr();
    return why.empty() ? "failed" : why;
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(tls_files_are_checked_and_errors_name_the_flag_and_file) {
  fixture f;
  auto load = [](keel::wire::tls_files x) { return keel::wire::tls_config::load(x); };
  auto ca = (f.certs / "ca.crt").string();
  auto a_crt = (f.certs / "a.crt").string();
  auto a_key = (f.certs / "a.key").string();

  BOOST_TEST(static_cast<bool>(load({a_crt, a_key, ca})));
  BOOST_TEST(static_cast<bool>(load({"", "", ca})));  // a client: the CA only

  auto missing = load({a_crt, a_key, (f.dir.path / "nope.crt").string()});
  BOOST_REQUIRE(!missing);
  BOOST_TEST(keel::test::why(missing).find("--tls-ca") != std::string::npos);
  BOOST_TEST(keel::test::why(missing).find("nope.crt") != std::string::npos);

  auto mismatch = load({a_crt, (f.certs / "b.key").string(), ca});
  BOOST_REQUIRE(!mismatch);
  BOOST_TEST(keel::test::why(mismatch).find("does not match") != std::string::npos,
             keel::test::why(mismatch));

  auto foreign = load({(f.evil / "b.crt").string(), (f.evil / "b.key").string(), ca});
  BOOST_REQUIRE(!foreign);
  BOOST_TEST(keel::test::why(foreign).find("not valid under --tls-ca") != std::string::npos,
             keel::test::why(foreign));

  auto half = load({a_crt, "", ca});
  BOOST_REQUIRE(!half);
  BOOST_TEST(keel::test::why(half).find("--tls-key") != std::string::npos);

  auto not_pem = load({a_crt, a_key, f.model});
  BOOST_REQUIRE(!not_pem);
  BOOST_TEST(keel::test::why(not_pem).find("not a PEM file") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(peers_serve_only_the_configured_nodes_their_certificates_name) {
  // Issue #11: with no credential, anyone who reached a peer port could read any session,
  // erase it at its owner and steal it. Today's peer calls are the ownership protocol's
  // messages: a forged write at a high ballot is what would erase it.
  fixture f;
  cluster cl(f.cluster_cfg("security", false), {{"a", "r1"}, {"b", "r1"}, {"c", "r2"}});
  cl.start_all();
  BOOST_REQUIRE(cl.wait_all_links_up(15s));

  auto c = keel::wire::client::connect({cl.address(0)}, f.client_options());
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(c), keel::test::why(c));
  auto session = (*c)->open_session({});
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(session), keel::test::why(session));
  auto g = (*c)->generate(*session, "my password is hunter2", 8);
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(g), keel::test::why(g));
  auto before = (*c)->history(*session);
  BOOST_REQUIRE(before && before->size() == 1);

  const auto peer = cl.peer_address(0);
  // The control: b, with b's certificate, is served (so what follows is refused for who asks).
  // Its forged write names c's ballot, not b's own: a's ownership host drops it (a member
  // speaks for itself only).
  auto as_b = forge_as(peer, f.tls(f.certs, "b"), "b", *session, "c");
  BOOST_TEST(as_b.empty(), as_b);

  // Plain TCP, and TLS with no certificate of one's own: the handshake fails.
  BOOST_TEST(!forge_as(peer, nullptr, "b", *session, "b").empty());
  BOOST_TEST(!forge_as(peer, f.tls(f.certs, ""), "b", *session, "b").empty());
  // A certificate from another CA naming b.
  auto evil = f.tls(f.certs, "");
  {
    keel::wire::tls_files x{(f.evil / "b.crt").string(), (f.evil / "b.key").string(),
                            (f.evil / "ca.crt").string()};
    auto t = keel::wire::tls_config::load(x);
    BOOST_REQUIRE(static_cast<bool>(t));
    evil = *t;
  }
  BOOST_TEST(!forge_as(peer, evil, "b", *session, "b").empty());
  // The cluster's CA signed mallory's certificate, but mallory is no configured peer; and b
  // cannot speak as c.
  auto as_mallory = forge_as(peer, f.tls(f.certs, "mallory"), "mallory", *session, "mallory");
  BOOST_TEST(as_mallory.find("permission denied") != std::string::npos, as_mallory);
  BOOST_TEST(!forge_as(peer, f.tls(f.certs, "mallory"), "b", *session, "b").empty());
  BOOST_TEST(!forge_as(peer, f.tls(f.certs, "b"), "c", *session, "c").empty());

  // Nothing changed: a still owns the session, with its turn, and says whom it refused.
  auto after = (*c)->history(*session);
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(after), keel::test::why(after));
  BOOST_REQUIRE_EQUAL(after->size(), 1u);
  BOOST_TEST(after->at(0).generated == before->at(0).generated);
  auto g2 = (*c)->generate(*session, "and again", 4);
  BOOST_TEST(static_cast<bool>(g2), keel::test::why(g2));
  BOOST_TEST(cl.current_log(0).find("refused a call from 'mallory'") != std::string::npos);
  BOOST_TEST(cl.current_log(0).find("refused a call from 'c'") != std::string::npos);
  BOOST_TEST(cl.current_log(0).find("took over") == std::string::npos);

  // The client port speaks TLS only, and a client checks the node's name.
  keel::wire::client::options plain;
  plain.connect_timeout = 2000ms;
  BOOST_TEST(!keel::wire::client::connect({cl.address(0)}, plain));
  auto wrong_name = f.client_options();
  wrong_name.tls_name = "b";
  auto w = keel::wire::client::connect({cl.address(0)}, wrong_name);
  BOOST_REQUIRE(!w);
  BOOST_TEST(keel::test::why(w).find("hostname mismatch") != std::string::npos,
             keel::test::why(w));
  auto named = f.client_options();
  named.tls_name = "a";
  BOOST_TEST(static_cast<bool>(keel::wire::client::connect({cl.address(0)}, named)));
}

BOOST_AUTO_TEST_CASE(a_tls_cluster_replicates_and_fails_over_with_no_turn_lost) {
  fixture f;
  cluster cl(f.cluster_cfg("security-failover", true), {{"a", "r1"}, {"b", "r1"}, {"c", "r2"}});
  cl.start_all();
  BOOST_REQUIRE(cl.wait_all_links_up(15s));

  auto co = f.client_options();
  auto c = keel::wire::client::connect({cl.address(0)}, co);
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(c), keel::test::why(c));
  auto session = (*c)->open_session({});
  BOOST_REQUIRE(static_cast<bool>(session));
  auto g = (*c)->generate(*session, "Once upon a time", 12);
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(g), keel::test::why(g));
  auto before = (*c)->history(*session);
  BOOST_REQUIRE(before && before->size() == 1);

  // keel-shell over TLS sees the session and its replicas.
  auto [rc, out] = cl.shell(0, "sessions");
  BOOST_TEST(rc == 0, out);
  BOOST_TEST(out.find(*session) != std::string::npos, out);

  // The owner dies; a replica takes the session over (its replication ran over TLS), and the
  // history read through b, which forwards over TLS when c took it, is the same.
  c->reset();
  cl.kill(0);
  std::vector<keel::wire::turn_record> after;
  auto until = std::chrono::steady_clock::now() + 20s;
  std::string last;
  while (std::chrono::steady_clock::now() < until) {
    auto b = keel::wire::client::connect({cl.address(1)}, co);
    if (b) {
      auto h = (*b)->history(*session);
      if (h) {
        after = *h;
        break;
      }
      last = keel::test::why(h);
    } else {
      last = keel::test::why(b);
    }
    std::this_thread::sleep_for(200ms);
  }
  BOOST_REQUIRE_MESSAGE(after.size() == 1, "history after the failover: " << last);
  BOOST_TEST(after[0].generated == before->at(0).generated);
  BOOST_TEST(cl.logs().find("took over session " + *session) != std::string::npos);
}

BOOST_AUTO_TEST_CASE(without_tls_the_peer_and_admin_ports_serve_loopback_only) {
  fixture f;
  auto refused = [&](std::vector<std::string> extra, const std::string& expect) {
    std::vector<std::string> argv = {keel::test::bin("keel-node"), "--listen", "127.0.0.1:0",
                                     "--model", f.model};
    argv.insert(argv.end(), extra.begin(), extra.end());
    keel::test::process p(argv);
    auto st = p.wait(15s);
    BOOST_REQUIRE(st.has_value());
    BOOST_TEST(*st != 0);
    // The child is reaped before its stderr is necessarily read to the end: wait for the text.
    bool said =
        p.wait_err([&](const std::string& e) { return e.find(expect) != std::string::npos; }, 5s);
    BOOST_TEST(said, p.err());
  };
  refused({"--peer-listen", "0.0.0.0:0"}, "--peer-listen 0.0.0.0:0: without TLS");
  refused({"--admin-listen", "0.0.0.0:0", "--admin-key-file", keel::test::secret_file("0123456789")},
          "--admin-listen 0.0.0.0:0: without TLS");
  auto ca = (f.certs / "ca.crt").string();
  auto crt = (f.certs / "a.crt").string();
  auto key = (f.certs / "a.key").string();
  refused({"--name", "a", "--tls-cert", crt, "--tls-key", key, "--tls-ca", ca, "--peer-listen",
           "127.0.0.1:0", "--peers", "127.0.0.1:9"},
          "--peers 127.0.0.1:9: every peer needs its node name");
  refused({"--tls-cert", crt, "--tls-ca", ca}, "TLS needs all of");

  // And a node that has no TLS says so when it starts.
  keel::test::process p({keel::test::bin("keel-node"), "--listen", "127.0.0.1:0", "--model",
                         f.model, "--peer-listen", "127.0.0.1:0"});
  BOOST_TEST(p.wait_err(
      [](const std::string& s) { return s.find("no TLS (no --tls-cert)") != std::string::npos; },
      15s));
  p.signal(SIGTERM);
  p.stop(10s);
}

BOOST_AUTO_TEST_CASE(a_message_over_the_peer_ports_limit_ends_only_its_connection) {
  // Issue #11: the peer and admin ports took Cap'n Proto's default of 64 MiB per message, which a
  // caller can make a node hold per connection. The peer port now reads at most 16 MiB.
  fixture f;
  keel::test::process node({keel::test::bin("keel-node"), "--listen", "127.0.0.1:0", "--model",
                            f.model, "--peer-listen", "127.0.0.1:0"});
  BOOST_REQUIRE(node.wait_err(
      [](const std::string& s) { return s.find("listening on") != std::string::npos; }, 15s));
  auto err = node.err();
  auto at = err.find("serving peers on ") + 17;
  auto peer = err.substr(at, err.find('\n', at) - at);

  auto call = [&](size_t bytes) -> std::string {
    try {
      keel::wire::rpc_client rpc(peer, nullptr, "", 3000ms);
      auto req = rpc.getMain<keel::wire::Peer>().ownershipRequest();
      req.initFrom().setName("b");
      req.initMessage(static_cast<unsigned>(bytes));
      req.send().wait(rpc.getWaitScope());
      return "answered";
    } catch (const kj::Exception& e) {
      return std::string("failed: ") + e.getDescription().cStr();
    }
  };
  // Under the limit the call is answered (the node runs alone and drops the message)...
  auto small = call(1 << 20);
  BOOST_TEST(small == "answered", small);
  // ...over it the connection ends, and the node serves the next caller.
  auto big = call(20 << 20);
  BOOST_TEST(big.rfind("failed:", 0) == 0, big);
  auto again = call(1 << 10);
  BOOST_TEST(again == "answered", again);
  node.signal(SIGTERM);
  BOOST_TEST(node.stop(10s) == 0);
}
