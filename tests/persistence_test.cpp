#define BOOST_TEST_MODULE persistence_test
#include <boost/test/unit_test.hpp>

#include <fstream>

#include <condition_variable>
#include <map>
#include <mutex>

#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/node.hpp"
#include "kernels/synth.hpp"
#include "storage/session_store.hpp"
#include "tests/test_support.hpp"
#include "wire/checkpoint.hpp"

using namespace keel;

namespace {

/// What a sink saw: tokens by (session, turn) and index (a repeat must equal the first), and
/// how each turn ended.
struct transcript {
  std::mutex mu;
  std::condition_variable cv;
  std::map<std::pair<std::string, uint64_t>, std::map<int64_t, int32_t>> tokens;
  std::map<std::pair<std::string, uint64_t>, finish_reason> done;
  int mismatches = 0;

  bool wait(const std::function<bool()>& pred, std::chrono::seconds limit) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, limit, pred);
  }
};

caf::behavior sink(caf::event_based_actor*, std::shared_ptr<transcript> t) {
  return {
      [t](token_atom, const std::string& s, uint64_t turn, int64_t index, int32_t tok,
          const std::string&) {
        std::lock_guard<std::mutex> guard(t->mu);
        auto [i, fresh] = t->tokens[{s, turn}].emplace(index, tok);
        if (!fresh && i->second != tok) ++t->mismatches;
        t->cv.notify_all();
      },
      [t](done_atom, const std::string& s, uint64_t turn, finish_reason why, const std::string&,
          int64_t) {
        std::lock_guard<std::mutex> guard(t->mu);
        t->done[{s, turn}] = why;
        t->cv.notify_all();
      },
  };
}

/// Collects the lines the node reports (recovery problems, supervision events).
struct lines {
  std::mutex mu;
  std::vector<std::string> all;
  bool any_contains(const std::string& a, const std::string& b) {
    std::lock_guard<std::mutex> guard(mu);
    for (auto& l : all)
      if (l.find(a) != std::string::npos && l.find(b) != std::string::npos) return true;
    return false;
  }
};

struct fixture {
  test::temp_dir dir{"persistence_test"};
  std::string model_path;
  caf::actor_system_config sys_cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::shared_ptr<lines> logged = std::make_shared<lines>();

  fixture() {
    synth_options o;
    o.dim = 128;
    o.layers = 2;
    o.heads = 8;
    o.kv_heads = 4;
    o.ffn = 256;
    o.ctx = 512;
    o.seed = 11;
    model_path = test::write_model(dir.path / "m.gguf", o);
    keel::tune_actor_system(sys_cfg);
    sys = std::make_unique<caf::actor_system>(sys_cfg);
  }

  std::string data(const std::string& name) { return (dir.path / name).string(); }

  std::unique_ptr<node> start(const std::string& data_dir) {
    node_config cfg;
    cfg.model_path = model_path;
    cfg.data_dir = data_dir;
    auto log = std::make_shared<supervision_log>([l = logged](const std::string& line) {
      std::lock_guard<std::mutex> guard(l->mu);
      l->all.push_back(line);
    });
    auto nd = node::start(*sys, cfg, log);
    BOOST_REQUIRE_MESSAGE(nd, test::why(nd));
    return std::move(*nd);
  }

  /// Sends a turn to the session and returns its number.
  uint64_t send(node& nd, const std::string& id, const std::string& text, int32_t max_tokens,
                caf::actor snk) {
    auto s = nd.session(id);
    BOOST_REQUIRE(s);
    caf::scoped_actor self{*sys};
    uint64_t turn = 0;
    self->request(s, std::chrono::seconds(10), send_atom::value, text, max_tokens,
                  caf::actor_cast<turn_sink_actor>(snk))
        .receive([&](uint64_t t) { turn = t; },
                 [](caf::error& e) { BOOST_FAIL(caf::to_string(e)); });
    return turn;
  }
};

sampling_params sampled(uint64_t seed) {
  sampling_params p;
  p.temperature = 0.8f;
  p.top_k = 40;
  p.seed = seed;
  return p;
}

void require_same(const std::vector<session_record>& a, const std::vector<session_record>& b) {
  BOOST_REQUIRE_EQUAL(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    BOOST_TEST_CONTEXT("session " << a[i].id) {
      BOOST_TEST(a[i].id == b[i].id);
      BOOST_TEST(a[i].number == b[i].number);
      BOOST_TEST(a[i].params.seed == b[i].params.seed);
      BOOST_TEST(a[i].params.temperature == b[i].params.temperature);
      BOOST_TEST(a[i].params.top_k == b[i].params.top_k);
      BOOST_TEST(a[i].priority == b[i].priority);
      BOOST_REQUIRE_EQUAL(a[i].turns.size(), b[i].turns.size());
      for (size_t k = 0; k < a[i].turns.size(); ++k) {
        auto& x = a[i].turns[k];
        auto& y = b[i].turns[k];
        BOOST_TEST(x.turn == y.turn);
        BOOST_TEST(x.user == y.user, boost::test_tools::per_element());
        BOOST_TEST(x.generated == y.generated, boost::test_tools::per_element());
        BOOST_TEST(x.max_tokens == y.max_tokens);
        BOOST_TEST(x.done == y.done);
        BOOST_TEST(x.reason == y.reason);
      }
    }
  }
}

/// Runs one turn of a new session to its end on `nd`; returns the session id.
std::string one_turn(fixture& f, node& nd, uint64_t seed, const std::string& text,
                     int32_t max_tokens, const std::shared_ptr<transcript>& t, caf::actor snk) {
  auto id = nd.open_session(sampled(seed));
  BOOST_REQUIRE_MESSAGE(id, test::why(id));
  auto turn = f.send(nd, *id, text, max_tokens, snk);
  BOOST_REQUIRE_MESSAGE(t->wait(
                            [&] {
                              return t->done.count({*id, turn}) > 0;
                            },
                            std::chrono::seconds(30)),
                        "turn did not finish");
  return *id;
}

}  // namespace

BOOST_FIXTURE_TEST_CASE(finished_sessions_survive_a_restart, fixture) {
  auto dir = data("finished");
  auto t = std::make_shared<transcript>();
  auto snk = sys->spawn(sink, t);
  std::vector<session_record> before;
  {
    auto nd = start(dir);
    const char* texts[] = {"Once upon a time", "hello", "1 2 3"};
    for (int i = 0; i < 3; ++i) {
      auto id = one_turn(*this, *nd, static_cast<uint64_t>(i), texts[i], 12, t, snk);
      auto turn = send(*nd, id, " and then", 10, snk);  // a second turn on the history
      BOOST_REQUIRE(t->wait(
          [&] {
            return t->done.count({id, turn}) > 0;
          },
          std::chrono::seconds(30)));
    }
    before = nd->sessions();
    BOOST_REQUIRE_EQUAL(before.size(), 3u);
    for (auto& r : before) {
      BOOST_REQUIRE_EQUAL(r.turns.size(), 2u);
      BOOST_TEST(!r.turns[0].generated.empty());
    }
  }
  auto nd = start(dir);
  auto after = nd->sessions();
  require_same(before, after);
  // The session actors run again with the recovered history.
  caf::scoped_actor self{*sys};
  auto s = nd->session(before[1].id);
  BOOST_REQUIRE(s);
  self->request(s, std::chrono::seconds(10), history_atom::value)
      .receive(
          [&](const std::vector<std::vector<int32_t>>& h) {
            BOOST_REQUIRE_EQUAL(h.size(), 2u);
            BOOST_TEST(h[0] == before[1].turns[0].generated, boost::test_tools::per_element());
            BOOST_TEST(h[1] == before[1].turns[1].generated, boost::test_tools::per_element());
          },
          [](caf::error& e) { BOOST_FAIL(caf::to_string(e)); });
  // Numbers continue after the recovered ones; the id is a new one.
  auto id = nd->open_session(sampled(9));
  BOOST_REQUIRE_MESSAGE(id, test::why(id));
  for (auto& r : nd->sessions())
    if (r.id == *id) BOOST_TEST(r.number == 4u);
  for (auto& r : before) BOOST_TEST(r.id != *id);
  self->send_exit(snk, caf::exit_reason::user_shutdown);
}

BOOST_FIXTURE_TEST_CASE(a_turn_stopped_mid_stream_completes_after_restart, fixture) {
  const std::string text = "Once upon a time";
  const int32_t max_tokens = 300;
  const uint64_t seed = 5;
  auto key = std::make_pair(std::string(), uint64_t{0});  // the interrupted session's turn
  // Fault-free reference, on its own directory.
  std::vector<int32_t> reference;
  {
    auto t = std::make_shared<transcript>();
    auto snk = sys->spawn(sink, t);
    auto nd = start(data("reference"));
    auto id = one_turn(*this, *nd, seed, text, max_tokens, t, snk);
    reference = nd->sessions().at(0).turns.at(0).generated;
    caf::anon_send_exit(snk, caf::exit_reason::user_shutdown);
  }
  BOOST_REQUIRE_MESSAGE(reference.size() >= 100,
                        "reference turn too short to interrupt: " << reference.size() << " tokens");

  auto dir = data("interrupted");
  auto t1 = std::make_shared<transcript>();
  auto snk1 = sys->spawn(sink, t1);
  {
    auto nd = start(dir);
    auto id = nd->open_session(sampled(seed));
    BOOST_REQUIRE(id);
    key.first = *id;
    // The shard stalls after about 50 tokens, so that the stop surely lands mid-turn.
    nd->faults().stall_shard(0, std::chrono::milliseconds(1500), 50);
    send(*nd, *id, text, max_tokens, snk1);
    BOOST_REQUIRE(t1->wait([&] { return t1->tokens[key].size() >= 40; }, std::chrono::seconds(30)));
    nd->stop();  // mid-turn
  }
  size_t seen = 0;
  {
    std::lock_guard<std::mutex> guard(t1->mu);
    seen = t1->tokens[key].size();
    BOOST_TEST(t1->done.empty());
  }
  BOOST_TEST_MESSAGE("stopped after " << seen << " of " << reference.size() << " tokens");
  // The store holds the turn as running, with a prefix of the tokens.
  {
    storage::store_options existing;
    existing.create_if_missing = false;
    auto store = storage::session_store::open(dir, existing);
    BOOST_REQUIRE_MESSAGE(store, test::why(store));
    auto e = (*store)->get_session(key.first);
    BOOST_REQUIRE(e);
    auto c = wire::decode(e->payload);
    BOOST_REQUIRE_MESSAGE(c, test::why(c));
    BOOST_REQUIRE_EQUAL(c->turns.size(), 1u);
    BOOST_TEST(!c->turns[0].done);
    auto logged = (*store)->read_turn(key.first, 0);
    BOOST_REQUIRE(logged);
    BOOST_TEST(logged->size() >= 32u);  // checkpoints every 16 tokens
    BOOST_TEST(logged->size() < reference.size());
    BOOST_TEST(std::equal(logged->begin(), logged->end(), reference.begin()));
  }

  auto t2 = std::make_shared<transcript>();
  auto snk2 = sys->spawn(sink, t2);
  auto nd = start(dir);
  auto s = nd->session(key.first);
  BOOST_REQUIRE(s);
  caf::scoped_actor self{*sys};
  self->request(s, std::chrono::seconds(10), resume_atom::value, uint64_t{0},
                static_cast<int64_t>(seen), caf::actor_cast<turn_sink_actor>(snk2))
      .receive([](bool) {}, [](caf::error& e) { BOOST_FAIL(caf::to_string(e)); });
  BOOST_REQUIRE_MESSAGE(t2->wait([&] { return t2->done.count(key) > 0; }, std::chrono::seconds(30)),
                        "the resumed turn did not finish");
  // The client's view: what the first sink saw, then the continuation from the second.
  std::vector<int32_t> client;
  {
    std::lock_guard<std::mutex> g1(t1->mu);
    std::lock_guard<std::mutex> g2(t2->mu);
    BOOST_TEST(t1->mismatches == 0);
    BOOST_TEST(t2->mismatches == 0);
    auto all = t1->tokens[key];
    for (auto& [i, tok] : t2->tokens[key]) {
      auto [it, fresh] = all.emplace(i, tok);
      BOOST_TEST(it->second == tok);  // a regenerated token equals the one first streamed
    }
    BOOST_TEST(t2->tokens[key].count(static_cast<int64_t>(seen)) == 1u);
    int64_t k = 0;
    for (auto& [i, tok] : all) {
      BOOST_TEST(i == k++);
      client.push_back(tok);
    }
  }
  BOOST_TEST(client == reference, boost::test_tools::per_element());
  auto rec = nd->sessions().at(0);
  BOOST_TEST(rec.turns.at(0).done);
  BOOST_TEST(rec.turns.at(0).generated == reference, boost::test_tools::per_element());
  caf::anon_send_exit(snk1, caf::exit_reason::user_shutdown);
  caf::anon_send_exit(snk2, caf::exit_reason::user_shutdown);
}

BOOST_FIXTURE_TEST_CASE(a_recovered_turn_that_holds_all_its_tokens_ends_without_another, fixture) {
  // A copy saved between a turn's last token and the write of its end (a crash, a takeover) holds
  // the turn as running with max_tokens tokens. Resubmitted as it was, the batcher (which checks
  // the limit after each token) made one more, and every later turn differed (chaos_test saw it).
  const int32_t max_tokens = 24;
  session_record ref;
  {
    auto t = std::make_shared<transcript>();
    auto snk = sys->spawn(sink, t);
    auto nd = start(data("reference"));
    for (uint64_t seed = 1; seed < 40; ++seed) {
      auto id = one_turn(*this, *nd, seed, "Once upon a time", max_tokens, t, snk);
      for (auto& r : nd->sessions())
        if (r.id == id && r.turns.at(0).generated.size() == static_cast<size_t>(max_tokens))
          ref = r;
      if (!ref.id.empty()) break;
    }
    caf::anon_send_exit(snk, caf::exit_reason::user_shutdown);
  }
  BOOST_REQUIRE_MESSAGE(!ref.id.empty(), "no seed ran a turn to its limit");
  // The store as that moment left it: the turn running, its log holding every token.
  auto dir = data("full");
  {
    auto store = storage::session_store::open(dir);
    BOOST_REQUIRE_MESSAGE(store, test::why(store));
    auto running = ref;
    running.turns[0].done = false;
    BOOST_REQUIRE(!(*store)->put_session(ref.id, 1, wire::encode(to_checkpoint(running))));
    BOOST_REQUIRE(!(*store)->append_turn_tokens(ref.id, 1, 0, 0, ref.turns[0].generated));
  }
  auto nd = start(dir);
  auto t = std::make_shared<transcript>();
  auto snk = sys->spawn(sink, t);
  auto s = nd->session(ref.id);
  BOOST_REQUIRE(s);
  caf::scoped_actor self{*sys};
  self->request(s, std::chrono::seconds(10), resume_atom::value, uint64_t{0},
                static_cast<int64_t>(max_tokens), caf::actor_cast<turn_sink_actor>(snk))
      .receive([](bool) {}, [](caf::error& e) { BOOST_FAIL(caf::to_string(e)); });
  auto key = std::make_pair(ref.id, uint64_t{0});
  BOOST_REQUIRE_MESSAGE(t->wait([&] { return t->done.count(key) > 0; }, std::chrono::seconds(30)),
                        "the recovered turn did not end");
  {
    std::lock_guard<std::mutex> guard(t->mu);
    BOOST_TEST(t->done[key] == finish_reason::length);
    BOOST_TEST(t->tokens[key].empty(), "a token past the limit went out: index "
                                           << (t->tokens[key].empty() ? -1 : t->tokens[key].begin()->first));
  }
  auto rec = nd->sessions().at(0);
  BOOST_TEST(rec.turns.at(0).done);
  BOOST_TEST(rec.turns.at(0).generated == ref.turns[0].generated, boost::test_tools::per_element());
  caf::anon_send_exit(snk, caf::exit_reason::user_shutdown);
}

BOOST_FIXTURE_TEST_CASE(a_corrupt_session_record_is_reported_and_skipped, fixture) {
  auto dir = data("corrupt");
  auto t = std::make_shared<transcript>();
  auto snk = sys->spawn(sink, t);
  std::vector<session_record> before;
  {
    auto nd = start(dir);
    for (int i = 0; i < 3; ++i) one_turn(*this, *nd, static_cast<uint64_t>(i), "hello", 8, t, snk);
    before = nd->sessions();
  }
  {
    // Flip a payload byte of the second session's record behind the store's back.
    rocksdb::DBOptions o;
    std::vector<std::string> names;
    auto st = rocksdb::DB::ListColumnFamilies(o, dir, &names);
    BOOST_REQUIRE_MESSAGE(st.ok(), st.ToString());
    std::vector<rocksdb::ColumnFamilyDescriptor> descs;
    for (auto& n : names) descs.emplace_back(n, rocksdb::ColumnFamilyOptions{});
    std::vector<rocksdb::ColumnFamilyHandle*> cfs;
    rocksdb::DB* db = nullptr;
    st = rocksdb::DB::Open(o, dir, descs, &cfs, &db);
    BOOST_REQUIRE_MESSAGE(st.ok(), st.ToString());
    rocksdb::ColumnFamilyHandle* sessions_cf = nullptr;
    for (auto* h : cfs)
      if (h->GetName() == "sessions") sessions_cf = h;
    BOOST_REQUIRE(sessions_cf);
    std::string v;
    BOOST_REQUIRE(db->Get({}, sessions_cf, before[1].id, &v).ok());
    v[v.size() - 3] ^= 0x5A;
    rocksdb::WriteOptions wo;
    wo.sync = true;
    BOOST_REQUIRE(db->Put(wo, sessions_cf, before[1].id, v).ok());
    for (auto* h : cfs) db->DestroyColumnFamilyHandle(h);
    db->Close();
    delete db;
  }
  auto nd = start(dir);
  BOOST_TEST(logged->any_contains(before[1].id, "checksum mismatch"));
  auto after = nd->sessions();
  require_same({before[0], before[2]}, after);
  BOOST_TEST(!nd->session(before[0].id) == false);
  BOOST_TEST(!nd->session(before[1].id));
  // The corrupt session's number and id are not handed out again.
  auto id = nd->open_session(sampled(7));
  BOOST_REQUIRE(id);
  BOOST_TEST(*id != before[1].id);
  for (auto& r : nd->sessions())
    if (r.id == *id) BOOST_TEST(r.number == 4u);
  caf::anon_send_exit(snk, caf::exit_reason::user_shutdown);
}

BOOST_AUTO_TEST_CASE(checkpoints_round_trip_and_refuse_bad_bytes) {
  wire::session_checkpoint c;
  c.id = "s-7@node";
  c.number = 7;
  c.params = sampled(3);
  c.priority = 2;
  c.turns.push_back({0, {1, 72, 105}, 12, true, finish_reason::eos, {}, {}});
  c.turns.push_back({1, {33}, 5, false, finish_reason::length, {}, {}});
  auto bytes = wire::encode(c);
  auto d = wire::decode(bytes);
  BOOST_REQUIRE_MESSAGE(d, test::why(d));
  BOOST_TEST(d->id == "s-7@node");
  BOOST_TEST(d->number == 7u);
  BOOST_TEST(d->params.seed == 3u);
  BOOST_TEST(d->params.temperature == 0.8f);
  BOOST_TEST(d->priority == 2);
  BOOST_REQUIRE_EQUAL(d->turns.size(), 2u);
  BOOST_TEST(d->turns[0].user == c.turns[0].user, boost::test_tools::per_element());
  BOOST_TEST(d->turns[0].reason == finish_reason::eos);
  BOOST_TEST(!d->turns[1].done);

  auto odd = wire::decode(bytes.substr(0, bytes.size() - 3));
  BOOST_REQUIRE(!odd);
  BOOST_TEST(odd.error().code() == make_error(errc::corrupt_record).code());
  BOOST_TEST(describe(odd.error()).find("8-byte words") != std::string::npos);
  auto garbage = wire::decode(std::string(16, '\xff'));
  BOOST_REQUIRE(!garbage);
  BOOST_TEST(describe(garbage.error()).find("session checkpoint") != std::string::npos);
  // Format version: the first field of the root struct's data section (word 2 of a flat
  // single-segment message).
  auto newer = bytes;
  newer[16] = 9;
  auto v = wire::decode(newer);
  BOOST_REQUIRE(!v);
  BOOST_TEST(describe(v.error()).find("format version 9") != std::string::npos,
             describe(v.error()));
  BOOST_TEST(static_cast<uint8_t>(bytes[16]) == 1);  // nothing kept: version 1, as before

  // A chat turn that keeps part of what was fed is written as version 2 and read back.
  wire::session_checkpoint k;
  k.id = "s-8@node";
  k.turns.push_back({0, {1, 5}, 4, true, finish_reason::eos, {{"user", "a"}}, "tmpl", -1});
  k.turns.push_back({1, {7}, 4, false, finish_reason::length, {{"user", "b"}}, {}, 3});
  auto kept = wire::encode(k);
  BOOST_TEST(static_cast<uint8_t>(kept[16]) == 2);
  auto back = wire::decode(kept);
  BOOST_REQUIRE_MESSAGE(back, test::why(back));
  BOOST_TEST(back->turns[0].keep == -1);
  BOOST_TEST(back->turns[1].keep == 3);
  // A text turn cannot keep: the record is damaged.
  k.turns[1].messages.clear();
  auto bad = wire::decode(wire::encode(k));
  BOOST_REQUIRE(!bad);
  BOOST_TEST(describe(bad.error()).find("keeps 3 tokens") != std::string::npos, describe(bad.error()));
}

BOOST_AUTO_TEST_CASE(a_checkpoint_claiming_more_elements_than_bytes_is_refused_without_allocating) {
  // Found by the checkpoint fuzzer: 424 bytes whose message list claims millions of empty
  // messages (Cap'n Proto stores an all-default struct in no bytes), which decode used to copy
  // into a vector of 64 MiB and more. The input is kept in the fuzz corpus.
  std::ifstream in(std::string(KEEL_SOURCE_DIR) +
                       "/tests/fuzz/corpus/checkpoint/many-empty-messages",
                   std::ios::binary);
  BOOST_REQUIRE(in);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  BOOST_REQUIRE_EQUAL(bytes.size(), 424u);
  auto d = wire::decode(bytes);
  BOOST_REQUIRE(!d);
  BOOST_TEST(d.error().code() == make_error(errc::corrupt_record).code());
  BOOST_TEST(describe(d.error()).find("messages in 53 words") != std::string::npos,
             describe(d.error()));
}
