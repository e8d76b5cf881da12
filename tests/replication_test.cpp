#define BOOST_TEST_MODULE replication_test
#include <boost/test/unit_test.hpp>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>

#include <sys/resource.h>

#include <cstring>

#include <capnp/ez-rpc.h>
#include <capnp/serialize.h>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/node.hpp"
#include "actors/peer_server.hpp"
#include "kernels/synth.hpp"
#include "storage/session_store.hpp"
#include "tests/test_support.hpp"
#include "wire/checkpoint.hpp"
#include "wire/peer.capnp.h"

using namespace keel;
using namespace std::chrono_literals;

namespace {

struct done_flag {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
};

caf::behavior sink(caf::event_based_actor*, std::shared_ptr<done_flag> f) {
  return {
      [](token_atom, const std::string&, uint64_t, int64_t, int32_t, const std::string&) {},
      [f](done_atom, const std::string&, uint64_t, finish_reason, const std::string&, int64_t) {
        std::lock_guard<std::mutex> guard(f->mu);
        f->done = true;
        f->cv.notify_all();
      },
  };
}

struct fixture {
  test::temp_dir dir{"replication_test"};
  std::string model_path;
  caf::actor_system_config sys_cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::mutex mu;
  std::vector<std::string> lines;

  fixture() {
    synth_options o;
    o.dim = 32;
    o.layers = 1;
    o.heads = 4;
    o.kv_heads = 2;
    o.ffn = 64;
    o.ctx = 128;
    o.seed = 5;
    model_path = test::write_model(dir.path / "m.gguf", o);
    tune_actor_system(sys_cfg);
    sys = std::make_unique<caf::actor_system>(sys_cfg);
  }

  std::unique_ptr<peer_server> serve(const std::string& name) {
    peer_server_config c;
    c.name = name;
    c.log = [this](const std::string& line) {
      std::lock_guard<std::mutex> guard(mu);
      lines.push_back(line);
    };
    auto s = peer_server::start(c);
    BOOST_REQUIRE_MESSAGE(s, test::why(s));
    return std::move(*s);
  }

  std::unique_ptr<node> start_node(const std::string& name, const std::string& self,
                                   std::vector<std::string> peers) {
    node_config c;
    c.name = name;
    c.model_path = model_path;
    c.kv_bytes = 4 << 20;
    c.data_dir = (dir.path / ("data-" + name)).string();
    c.peer_address = self;
    c.peers = std::move(peers);
    auto log = std::make_shared<supervision_log>([this](const std::string& line) {
      std::lock_guard<std::mutex> guard(mu);
      lines.push_back(line);
    });
    auto n = node::start(*sys, c, log);
    BOOST_REQUIRE_MESSAGE(n, test::why(n));
    return std::move(*n);
  }

  static bool wait_for(const std::function<bool()>& pred, std::chrono::milliseconds limit) {
    auto t0 = std::chrono::steady_clock::now();
    while (std::chrono::steady_clock::now() - t0 < limit) {
      if (pred()) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }
};

/// Calls `replicate` on the peer endpoint at `address`; returns (code, message).
std::pair<uint8_t, std::string> replicate(const std::string& address, const std::string& id,
                                          uint64_t epoch, const std::string& record) {
  capnp::EzRpcClient client(address);
  auto req = client.getMain<wire::Peer>().replicateRequest();
  req.initFrom().setName("test");
  req.setSession(id);
  req.setEpoch(epoch);
  req.setRecord(kj::arrayPtr(reinterpret_cast<const capnp::byte*>(record.data()), record.size()));
  auto res = req.send().wait(client.getWaitScope());
  return {res.getError().getCode(), res.getError().getMessage().cStr()};
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(a_finished_turn_is_in_the_peers_store, fixture) {
  auto sa = serve("a");
  auto sb = serve("b");
  auto a = start_node("a", sa->address(), {sb->address()});
  auto b = start_node("b", sb->address(), {sa->address()});
  sa->attach_store(a->store());
  sb->attach_store(b->store());
  auto up = [](node& n) {
    auto ps = n.peers();
    return ps.size() == 1 && ps[0].accepts_work();
  };
  BOOST_REQUIRE(wait_for([&] { return up(*a) && up(*b); }, 5000ms));

  sampling_params params;
  params.temperature = 0.8f;
  params.seed = 7;
  auto id = a->open_session(params);
  BOOST_REQUIRE_MESSAGE(id, test::why(id));
  auto flag = std::make_shared<done_flag>();
  auto snk = sys->spawn(sink, flag);
  {
    caf::scoped_actor self{*sys};
    self->request(a->session(*id), 10s, send_atom::value, std::string("hello there"), int32_t{40},
                  snk)
        .receive([](uint64_t) {}, [](caf::error& e) { BOOST_FAIL(caf::to_string(e)); });
  }
  {
    std::unique_lock<std::mutex> lock(flag->mu);
    BOOST_REQUIRE(flag->cv.wait_for(lock, 10s, [&] { return flag->done; }));
  }
  auto mine = a->store()->read_turn(*id, 0);
  BOOST_REQUIRE_MESSAGE(mine, test::why(mine));
  BOOST_TEST(mine->size() == 40u);
  auto generated = a->sessions().at(0).turns.at(0).generated;
  BOOST_TEST(*mine == generated);
  // Replication is asynchronous: wait (bounded) for the last update to arrive.
  BOOST_REQUIRE(wait_for(
      [&] {
        auto theirs = b->store()->read_turn(replica_key(*id), 0);
        return theirs && *theirs == *mine;
      },
      5000ms));
  auto rec_a = a->store()->get_session(*id);
  auto rec_b = b->store()->get_session(replica_key(*id));
  BOOST_REQUIRE_MESSAGE(rec_b, test::why(rec_b));
  BOOST_REQUIRE(rec_a);
  BOOST_TEST(rec_b->epoch == rec_a->epoch);
  BOOST_TEST(rec_b->payload == rec_a->payload);
  BOOST_TEST(a->replication()->sent() >= 3u);  // open, turn accepted, tokens, turn finished
  BOOST_TEST(a->replication()->failed() == 0u);

  // The replica is kept apart from b's own sessions: b restarted on its data recovers none.
  sb->detach_store();
  b.reset();
  auto b2 = start_node("b", sb->address(), {});
  BOOST_TEST(b2->sessions().empty());
  {
    std::lock_guard<std::mutex> guard(mu);
    for (auto& line : lines) BOOST_TEST(line.find("recovery: skipped") == std::string::npos, line);
  }
  BOOST_TEST(static_cast<bool>(b2->store()->get_session(replica_key(*id))));
  sa->detach_store();
}

BOOST_FIXTURE_TEST_CASE(an_older_epoch_is_refused_with_stale_epoch, fixture) {
  auto store = storage::session_store::open((dir.path / "replica").string());
  BOOST_REQUIRE_MESSAGE(store, test::why(store));
  auto s = serve("b");
  // Without a store: unimplemented.
  auto [code0, msg0] = replicate(s->address(), "a-1", 5, "r5");
  BOOST_TEST(code0 == static_cast<uint8_t>(errc::unimplemented));
  s->attach_store(store->get());

  auto [code1, msg1] = replicate(s->address(), "a-1", 5, "r5");
  BOOST_TEST(code1 == 0u);
  BOOST_TEST(msg1 == "");
  auto [code2, msg2] = replicate(s->address(), "a-1", 4, "r4");
  BOOST_TEST(code2 == static_cast<uint8_t>(errc::stale_epoch));
  BOOST_TEST_MESSAGE(msg2);
  BOOST_TEST(msg2.find("a-1") != std::string::npos);
  BOOST_TEST(msg2.find("4") != std::string::npos);
  BOOST_TEST(msg2.find("5") != std::string::npos);
  auto kept = (*store)->get_session(replica_key("a-1"));
  BOOST_REQUIRE(kept);
  BOOST_TEST(kept->epoch == 5u);
  BOOST_TEST(kept->payload == "r5");
  s->stop();
}

namespace {

/// `n` TurnLogs of zero size (each reads as turn 0 with no tokens), in a message of three words
/// whatever `n`: what a hostile peer sends to make the callee do `n` things for two words.
struct zero_size_logs {
  kj::Array<capnp::word> words = kj::heapArray<capnp::word>(3);
  kj::Own<capnp::FlatArrayMessageReader> msg;

  explicit zero_size_logs(uint32_t n) {
    uint64_t raw[3] = {uint64_t{2} << 32,        // one segment of 2 words
                       1 | (uint64_t{7} << 32),  // a list pointer, inline composite, 0 words
                       uint64_t{n} << 2};        // tag: n elements, 0 data, 0 pointers
    std::memcpy(words.begin(), raw, sizeof raw);
    msg =
        kj::heap<capnp::FlatArrayMessageReader>(words, capnp::ReaderOptions{~uint64_t{0} / 2, 64});
  }
  capnp::List<wire::TurnLog>::Reader list() {
    return msg->getRoot<capnp::AnyPointer>().getAs<capnp::List<wire::TurnLog>>();
  }
};

long peak_rss_kb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss;
}

}  // namespace

// Found with tests/fuzz/peer_fuzz.cpp: a million zero-sized turn logs (a 500-byte message)
// became a million batch operations, 300 MB held by the peer server for one call.
BOOST_FIXTURE_TEST_CASE(turn_logs_not_in_turn_order_are_refused_before_anything_is_built, fixture) {
  auto store = storage::session_store::open((dir.path / "replica").string());
  BOOST_REQUIRE_MESSAGE(store, test::why(store));
  auto s = serve("b");
  s->attach_store(store->get());
  capnp::EzRpcClient client(s->address());
  auto peer_cap = client.getMain<wire::Peer>();

  zero_size_logs hostile(1u << 20);
  auto before = peak_rss_kb();
  auto req = peer_cap.replicateRequest();
  req.initFrom().setName("test");
  req.setSession("z-1");
  req.setEpoch(1);
  req.setLogs(hostile.list());
  auto res = req.send().wait(client.getWaitScope());
  BOOST_TEST(res.getError().getCode() == static_cast<uint8_t>(errc::bad_request));
  std::string msg = res.getError().getMessage().cStr();
  BOOST_TEST(msg.find("z-1: turn log 1 is for turn 0, not after turn 0") != std::string::npos, msg);
  BOOST_TEST(peak_rss_kb() - before < 64 * 1024, peak_rss_kb() - before << " KiB more at peak");
  BOOST_TEST(!(*store)->read_turn(replica_key("z-1"), 0));  // nothing written

  // Logs in turn order are stored, as a full copy from the replicator sends them.
  auto ok = peer_cap.replicateRequest();
  ok.initFrom().setName("test");
  ok.setSession("z-1");
  ok.setEpoch(1);
  std::string record = "r1";
  ok.setRecord(kj::arrayPtr(reinterpret_cast<const capnp::byte*>(record.data()), record.size()));
  auto logs = ok.initLogs(2);
  logs[0].setTurn(0);
  logs[0].initTokens(1).set(0, 5);
  logs[1].setTurn(3);
  logs[1].initTokens(2).set(1, 6);
  auto r2 = ok.send().wait(client.getWaitScope());
  BOOST_TEST(r2.getError().getCode() == 0u, r2.getError().getMessage().cStr());
  auto turn3 = (*store)->read_turn(replica_key("z-1"), 3);
  BOOST_REQUIRE_MESSAGE(turn3, test::why(turn3));
  BOOST_TEST((*turn3 == std::vector<int32_t>{0, 6}));
  s->stop();
}

namespace {

peer_info peer(const std::string& name, const std::string& region) {
  peer_info p;
  p.name = name;
  p.region = region;
  p.address = "127.0.0.1:" + std::to_string(7000 + name.size() * 10 + name[0]);
  p.status = peer_status::up;
  return p;
}

std::vector<std::string> names(const std::vector<peer_info>& ps, size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < std::min(n, ps.size()); ++i) out.push_back(ps[i].name);
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(placement_is_the_same_whatever_order_the_peers_come_in) {
  std::vector<peer_info> ps = {peer("b", "r1"), peer("c", "r1"), peer("d", "r1"), peer("e", "r1")};
  for (int s = 0; s < 50; ++s) {
    auto id = "s-" + std::to_string(s) + "@a";
    auto one = replicator::placement(id, "r1", 2, ps);
    auto rev = ps;
    std::reverse(rev.begin(), rev.end());
    auto two = replicator::placement(id, "r1", 2, rev);
    BOOST_TEST(names(one, 4) == names(two, 4), id);
    BOOST_TEST(one.size() == 4u);  // the rest follow as fallbacks
  }
}

BOOST_AUTO_TEST_CASE(placement_moves_only_the_sessions_of_a_peer_that_leaves) {
  // Rendezvous hashing: dropping peer d changes the replica of exactly the sessions whose
  // replica was d; every other session keeps its replica.
  std::vector<peer_info> all = {peer("b", "r1"), peer("c", "r1"), peer("d", "r1"), peer("e", "r1")};
  std::vector<peer_info> without_d = {peer("b", "r1"), peer("c", "r1"), peer("e", "r1")};
  int on_d = 0;
  std::map<std::string, int> count;
  for (int s = 0; s < 400; ++s) {
    auto id = "s-" + std::to_string(s) + "@a";
    auto before = replicator::placement(id, "r1", 1, all).front().name;
    auto after = replicator::placement(id, "r1", 1, without_d).front().name;
    ++count[before];
    if (before == "d") {
      ++on_d;
      BOOST_TEST(after != "d");
    } else {
      BOOST_TEST(after == before, id);
    }
  }
  BOOST_TEST(on_d > 0);
  // Spread: every peer holds a fair share (400 sessions over 4 peers: 100 expected each).
  for (auto& [name, n] : count) BOOST_TEST((n > 60 && n < 140), name << " holds " << n);
}

BOOST_AUTO_TEST_CASE(placement_keeps_a_replica_in_another_region_when_one_is_live) {
  std::vector<peer_info> ps = {peer("b", "r1"), peer("c", "r2"), peer("d", "r1"), peer("e", "r1")};
  for (int s = 0; s < 200; ++s) {
    auto id = "s-" + std::to_string(s) + "@a";
    auto r1 = replicator::placement(id, "r1", 1, ps);
    BOOST_TEST(r1.front().name == "c", id);  // the only other region
    auto r2 = replicator::placement(id, "r1", 2, ps);
    BOOST_TEST((r2[0].region == "r2" || r2[1].region == "r2"), id);
    BOOST_TEST(r2[0].name != r2[1].name);
  }
  // A node of region r2 places its R = 1 replica in r1.
  std::vector<peer_info> from_c = {peer("a", "r1"), peer("b", "r1"), peer("d", "r2")};
  for (int s = 0; s < 100; ++s) {
    auto id = "s-" + std::to_string(s) + "@c";
    BOOST_TEST(replicator::placement(id, "r2", 1, from_c).front().region == "r1", id);
  }
  // No other region is live: the rendezvous order alone.
  std::vector<peer_info> same = {peer("b", "r1"), peer("d", "r1")};
  BOOST_TEST(replicator::placement("s-1@a", "r1", 1, same).size() == 2u);
}

BOOST_FIXTURE_TEST_CASE(a_turn_no_live_replica_stored_is_refused_and_undone, fixture) {
  // b answers heartbeats, but its replica store fails every write (an injected disk fault): a's
  // new session and new turn are refused and leave nothing behind, in memory or on disk. Once
  // b stores again, the same turn is accepted with the same number.
  // Declared first: it outlives the servers and nodes that use it, on every path.
  std::atomic<bool> failing{true};
  storage::store_options faulty;
  faulty.before_write = [&failing] {
    if (failing) throw std::runtime_error("injected: the replica's disk fails");
  };
  auto replica = storage::session_store::open((dir.path / "replica-b").string(), faulty);
  BOOST_REQUIRE_MESSAGE(replica, test::why(replica));
  auto sa = serve("a");
  auto sb = serve("b");
  auto a = start_node("a", sa->address(), {sb->address()});
  auto b = start_node("b", sb->address(), {sa->address()});
  sa->attach_store(a->store());
  sb->attach_store(replica->get());
  auto up = [](node& n) {
    auto ps = n.peers();
    return ps.size() == 1 && ps[0].accepts_work();
  };
  BOOST_REQUIRE(wait_for([&] { return up(*a) && up(*b); }, 5000ms));

  sampling_params params;
  auto refused = a->open_session(params);
  BOOST_REQUIRE(!refused);
  BOOST_TEST(code_of(refused.error()) == errc::disconnected);
  BOOST_TEST_MESSAGE(describe(refused.error()));
  BOOST_TEST(a->sessions().empty());
  auto stored = a->store()->list_sessions();
  BOOST_REQUIRE(stored);
  BOOST_TEST(stored->empty());

  failing = false;
  BOOST_REQUIRE(
      wait_for([&] { return up(*a); }, 5000ms));  // the failed call dropped the link's work
  auto id = a->open_session(params);
  BOOST_REQUIRE_MESSAGE(id, test::why(id));
  BOOST_TEST(static_cast<bool>((*replica)->get_session(replica_key(*id))));

  auto send = [&](int32_t max_tokens) -> caf::expected<uint64_t> {
    auto flag = std::make_shared<done_flag>();
    auto snk = sys->spawn(sink, flag);
    caf::expected<uint64_t> out = make_error(errc::failed, "no reply");
    caf::scoped_actor self{*sys};
    self->request(a->session(*id), 10s, send_atom::value, std::string("hello there"), max_tokens,
                  snk)
        .receive([&](uint64_t t) { out = t; }, [&](caf::error& e) { out = std::move(e); });
    if (out) {
      std::unique_lock<std::mutex> lock(flag->mu);
      flag->cv.wait_for(lock, 10s, [&] { return flag->done; });
    }
    return out;
  };
  failing = true;
  auto t0 = send(8);
  BOOST_REQUIRE(!t0);
  BOOST_TEST(code_of(t0.error()) == errc::disconnected);
  BOOST_TEST(a->sessions().at(0).turns.empty());
  auto rec = a->store()->get_session(*id);
  BOOST_REQUIRE(rec);
  auto decoded = wire::decode(rec->payload);
  BOOST_REQUIRE(decoded);
  BOOST_TEST(decoded->turns.empty());

  failing = false;
  auto t1 = send(8);
  BOOST_REQUIRE_MESSAGE(t1, test::why(t1));
  BOOST_TEST(*t1 == 0u);
  BOOST_TEST(a->sessions().at(0).turns.size() == 1u);
  sa->detach_store();
  sb->detach_store();
}

BOOST_AUTO_TEST_CASE(placement_puts_a_draining_peer_last) {
  std::vector<peer_info> ps = {peer("b", "r1"), peer("c", "r2"), peer("d", "r1")};
  ps[1].draining = true;  // c, the only other region, drains: it is no replica any more
  for (int s = 0; s < 100; ++s) {
    auto id = "s-" + std::to_string(s) + "@a";
    auto order = replicator::placement(id, "r1", 1, ps);
    BOOST_REQUIRE(order.size() == 3u);
    BOOST_TEST(order.front().name != "c", id);
    BOOST_TEST(order.back().name == "c", id);
  }
}
