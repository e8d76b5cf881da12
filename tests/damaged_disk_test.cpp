// Issue #11, "A damaged disk never loses an acknowledged turn silently", on real keel-node
// processes (tests/cluster.hpp): a stopped node's WAL is cut in half or has a byte flipped, or
// one of its SST files has; it starts again, reports the damage, and every acknowledged turn is
// served again (its sessions' groups hold them: the ownership protocol). A single node names
// what it lost and starts. A full disk refuses turns with a classified error; the node stays up, serves
// reads, and takes turns again once space returns.

#define BOOST_TEST_MODULE damaged_disk_test
#include <boost/test/unit_test.hpp>

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "actors/ownership_codec.hpp"
#include "storage/session_store.hpp"
#include "tests/cluster.hpp"
#include "wire/client.hpp"

using namespace std::chrono_literals;
using keel::test::cluster;
using keel::test::cluster_config;
using keel::wire::client;
namespace fs = std::filesystem;

namespace {

/// Every acknowledged turn of each session: its generated tokens, by turn.
using acknowledged = std::map<std::string, std::vector<std::vector<int32_t>>>;

/// A cluster of real nodes (a, b, c, or a alone) with a synthetic model, the admin API, and a
/// long detection time, so that a stopped node comes back as the owner of its sessions.
struct nodes {
  keel::test::temp_dir root;
  std::string model;
  cluster cl;

  nodes(const std::string& label, std::vector<keel::test::node_spec> specs)
      : root("damaged_disk_test-" + label),
        model(keel::test::write_model(root.path / "model.gguf", keel::synth_options{})),
        cl(config(label, root.path, model, specs.size()), specs) {
    cl.start_all();
    BOOST_TEST_MESSAGE("region links up: " << (cl.wait_all_links_up(5s) ? "yes" : "not seen"));
  }

  static cluster_config config(const std::string& label, const fs::path& root,
                               const std::string& model, size_t n) {
    cluster_config cfg;
    cfg.model = model;
    cfg.root = root;
    cfg.replicas = n > 2 ? 2 : 0;  // both peers hold every session
    cfg.down_after_ms = 5000;
    cfg.label = label;
    cfg.admin = true;
    return cfg;
  }
};

std::unique_ptr<client> connect_to(cluster& cl, size_t i) {
  client::options o;
  o.connect_timeout = 2000ms;
  o.call_timeout = 30000ms;  // a turn's end may wait for the disk (a_turn_running_when_...)
  o.resume_for = 0ms;
  auto c = client::connect({cl.address(i)}, o);
  BOOST_REQUIRE_MESSAGE(c, "connect to " << cl.name(i) << ": " << keel::test::why(c));
  return std::move(*c);
}

/// Opens `n` sessions on node `i`, one after another, with two acknowledged turns each.
acknowledged converse(cluster& cl, size_t i, int n) {
  acknowledged out;
  auto c = connect_to(cl, i);
  for (int s = 0; s < n; ++s) {
    keel::sampling_params p;
    p.temperature = 0.8f;
    p.seed = 700 + static_cast<uint64_t>(s);
    auto id = c->open_session(p);
    BOOST_REQUIRE_MESSAGE(id, keel::test::why(id));
    for (auto text : {"Hello there", "And then?"}) {
      auto g = c->generate(*id, text, 24);
      BOOST_REQUIRE_MESSAGE(g, "turn of " << *id << ": " << keel::test::why(g));
      out[*id].push_back(g->generated);
    }
  }
  return out;
}

/// Whether node `i` serves every acknowledged turn of every session (retried for `patience`).
void check_served(cluster& cl, size_t i, const acknowledged& ack, const std::set<std::string>& skip,
                  std::chrono::milliseconds patience = 10s) {
  auto until = std::chrono::steady_clock::now() + patience;
  for (auto& [id, turns] : ack) {
    if (skip.count(id)) continue;
    std::string why;
    bool ok = false;
    while (!ok) {
      auto h = connect_to(cl, i)->history(id);
      if (!h) {
        why = keel::test::why(h);
      } else {
        ok = h->size() == turns.size();
        for (size_t t = 0; ok && t < turns.size(); ++t) ok = (*h)[t].generated == turns[t];
        why =
            std::to_string(h->size()) + " turns, " + std::to_string(turns.size()) + " acknowledged";
      }
      if (ok || std::chrono::steady_clock::now() >= until) break;
      std::this_thread::sleep_for(200ms);
    }
    BOOST_TEST(ok, "node " << cl.name(i) << " does not serve session " << id
                           << " as acknowledged: " << why);
  }
}

enum class damage { wal_cut, wal_flip, sst_flip };

/// Damages the store of a stopped node.
void damage_store(const fs::path& dir, damage d) {
  if (d == damage::sst_flip) {
    // A clean reopen replays the WAL into SST files (private, as keel-node makes its files).
    auto mask = ::umask(077);
    auto s = keel::storage::session_store::open(dir.string());
    ::umask(mask);
    BOOST_REQUIRE_MESSAGE(s, keel::test::why(s));
  }
  auto file = keel::test::largest_file(dir, d == damage::sst_flip ? ".sst" : ".log");
  auto size = fs::file_size(file);
  if (d == damage::wal_cut) {
    fs::resize_file(file, size / 2);
    return;
  }
  keel::test::flip_byte(file, d == damage::sst_flip ? size / 3 : size / 2);
}

/// The sessions of `ack` that the damaged store in `dir` no longer holds as acknowledged, found
/// on a copy (opening repairs the store). `peers`: the node had peers, and kept its sessions as
/// the ownership protocol's state; else as session records and turn logs.
std::set<std::string> lost_in(const fs::path& dir, const acknowledged& ack, bool peers) {
  auto copy = dir.parent_path() / (dir.filename().string() + "-probe");
  fs::remove_all(copy);
  fs::copy(dir, copy, fs::copy_options::recursive);
  std::set<std::string> lost;
  {
    auto s = keel::storage::session_store::open(copy.string());
    BOOST_REQUIRE_MESSAGE(s, keel::test::why(s));
    std::map<std::string, std::map<uint64_t, std::vector<int32_t>>> held;
    if (peers) {
      auto scan = (*s)->scan_ownership();
      BOOST_REQUIRE_MESSAGE(scan, keel::test::why(scan));
      for (auto& [id, blob] : scan->entries) {
        auto copy = keel::decode_stored_session(blob);
        if (!copy) continue;
        for (size_t t = 0; t < copy->data.turns.size(); ++t)
          if (copy->data.turns[t].done) held[id][t] = copy->data.turns[t].tokens;
      }
    } else {
      auto scan = (*s)->scan();
      BOOST_REQUIRE_MESSAGE(scan, keel::test::why(scan));
      for (auto& r : scan->sessions) held[r.id] = r.turns;
    }
    for (auto& [id, turns] : ack) {
      bool same = held[id].size() == turns.size();
      for (size_t t = 0; same && t < turns.size(); ++t) same = held[id][t] == turns[t];
      if (!same) lost.insert(id);
    }
  }
  fs::remove_all(copy);
  return lost;
}

/// Lines of `log` that name `id` and contain `word`.
std::vector<std::string> lines_naming(const std::string& log, const std::string& id,
                                      const std::string& word) {
  std::vector<std::string> out;
  std::istringstream in(log);
  for (std::string line; std::getline(in, line);)
    if (line.find(id + " ") != std::string::npos && line.find(word) != std::string::npos)
      out.push_back(line);
  return out;
}

/// A node of three loses part of its store while stopped; started again, it reports the damage,
/// and every acknowledged turn is served through it: another member of each lost session's
/// group takes the session over from the majority's copy (the node no longer claims it).
void damaged_node_restores_from_replicas(damage d, const std::string& label) {
  nodes net(label, {{"a", "r1"}, {"b", "r1"}, {"c", "r2"}});
  auto& cl = net.cl;
  auto ack = converse(cl, 0, 3);
  std::this_thread::sleep_for(300ms);
  BOOST_TEST(cl.terminate(0) == 0, "a did not stop cleanly:\n" << cl.log(0));
  damage_store(cl.data_dir(0), d);
  auto lost = lost_in(cl.data_dir(0), ack, true);
  BOOST_TEST_MESSAGE("sessions the damage took from a's store: " << lost.size());
  BOOST_REQUIRE_MESSAGE(!lost.empty(), "the damage lost nothing: the test damaged the wrong place");

  cl.start(0);
  auto log = cl.current_log(0);
  BOOST_TEST(log.find("session store damaged") != std::string::npos,
             "a does not report the damage:\n"
                 << log);
  BOOST_TEST(log.find("taken back from the newest copy of a majority") != std::string::npos,
             "a does not say where its sessions come from:\n"
                 << log);
  // Its promises may be gone: it votes only on what it read back (ownership::recover).
  BOOST_TEST(log.find("votes on a session only after reading it back") != std::string::npos, log);
  // The others suspect a's lost sessions once a claims them no more (down_after, 5 s).
  check_served(cl, 0, ack, {}, 30s);
  for (auto& id : lost) {
    auto named = lines_naming(cl.logs(), id, "took over session");
    BOOST_TEST(!named.empty(), "no node says it took " << id << " over:\n" << cl.logs());
    for (auto& line : named) BOOST_TEST_MESSAGE(line);
  }
  // The damaged files are kept for forensics.
  bool aside = false;
  for (auto& e : fs::directory_iterator(cl.data_dir(0)))
    aside = aside || e.path().filename().string().rfind("damaged-", 0) == 0;
  BOOST_TEST(aside, "no damaged-* directory in " << cl.data_dir(0));
  // The rebuilt store and the damaged files are the node's user's only (umask 077 in keel-node).
  for (auto& e : fs::recursive_directory_iterator(cl.data_dir(0))) {
    auto p = e.status().permissions();
    bool private_ = (p & (fs::perms::group_all | fs::perms::others_all)) == fs::perms::none;
    BOOST_TEST(private_, e.path().string() << " can be read or written by others");
  }
  // The next turn continues on the restored session.
  auto c = connect_to(cl, 0);
  auto g = c->generate(*lost.begin(), "And at last?", 8);
  BOOST_TEST(static_cast<bool>(g), keel::test::why(g));
  BOOST_TEST(cl.unexpected_exits().empty(), cl.unexpected_exits());
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_wal_cut_in_half_is_restored_from_the_replicas) {
  damaged_node_restores_from_replicas(damage::wal_cut, "cut");
}

BOOST_AUTO_TEST_CASE(a_flipped_byte_in_the_wal_is_restored_from_the_replicas) {
  damaged_node_restores_from_replicas(damage::wal_flip, "flip");
}

BOOST_AUTO_TEST_CASE(
    a_damaged_sst_file_is_restored_from_the_replicas_instead_of_refusing_to_start) {
  damaged_node_restores_from_replicas(damage::sst_flip, "sst");
}

BOOST_AUTO_TEST_CASE(a_single_node_names_the_sessions_a_damaged_wal_lost_and_starts) {
  nodes net("single", {{"a", ""}});
  auto& cl = net.cl;
  auto ack = converse(cl, 0, 3);
  BOOST_TEST(cl.terminate(0) == 0, "a did not stop cleanly:\n" << cl.log(0));
  damage_store(cl.data_dir(0), damage::wal_flip);
  auto lost = lost_in(cl.data_dir(0), ack, false);
  BOOST_REQUIRE_MESSAGE(!lost.empty(), "the damage lost nothing: the test damaged the wrong place");
  cl.start(0);
  auto log = cl.current_log(0);
  for (auto& id : lost)
    BOOST_TEST(!lines_naming(log, id, "may be lost").empty(), "a lost session " << id
                                                                                << " silently:\n"
                                                                                << log);
  check_served(cl, 0, ack, lost);
}

BOOST_AUTO_TEST_CASE(a_full_disk_refuses_turns_and_the_node_stays_up_and_serves_reads) {
  nodes net("full", {{"a", ""}});
  auto& cl = net.cl;
  auto c = connect_to(cl, 0);
  auto id = c->open_session({});
  BOOST_REQUIRE_MESSAGE(id, keel::test::why(id));
  auto first = c->generate(*id, "Hello there", 12);
  BOOST_REQUIRE_MESSAGE(first, keel::test::why(first));

  auto [st, out] = cl.shell(0, "fault a disk-full");
  BOOST_REQUIRE_MESSAGE(st == 0, out);
  for (int i = 0; i < 3; ++i) {
    auto g = c->generate(*id, "And then?", 12);
    BOOST_REQUIRE(!g);
    BOOST_TEST(keel::code_of(g.error()) == keel::errc::overloaded, keel::test::why(g));
    BOOST_TEST(keel::message_of(g.error()).find("disk full") != std::string::npos,
               keel::test::why(g));
  }
  auto opened = c->open_session({});
  BOOST_TEST(!opened, "a session opened on a full disk");
  auto h = c->history(*id);
  BOOST_REQUIRE_MESSAGE(h, "reads stop on a full disk: " << keel::test::why(h));
  BOOST_TEST(h->size() == 1u);
  BOOST_TEST(cl.alive(0), "the node died on a full disk:\n" << cl.current_log(0));

  std::tie(st, out) = cl.shell(0, "fault a clear");
  BOOST_REQUIRE_MESSAGE(st == 0, out);
  // RocksDB sees the space within its poll interval (5 s) and resumes writing.
  auto until = std::chrono::steady_clock::now() + 10s;
  auto second = c->generate(*id, "And then?", 12);
  while (!second && keel::code_of(second.error()) == keel::errc::overloaded &&
         std::chrono::steady_clock::now() < until) {
    std::this_thread::sleep_for(100ms);
    second = c->generate(*id, "And then?", 12);
  }
  BOOST_REQUIRE_MESSAGE(second, "turns do not resume within 10 s after the disk has space again: "
                                    << keel::test::why(second));
  h = c->history(*id);
  BOOST_REQUIRE_MESSAGE(h, keel::test::why(h));
  BOOST_TEST(h->size() == 2u);
  BOOST_TEST(cl.unexpected_exits().empty(), cl.unexpected_exits());
}

BOOST_AUTO_TEST_CASE(a_turn_running_when_the_disk_fills_ends_once_space_returns) {
  // The turn has happened when the disk fills under it: its end is written once there is space
  // again, and its client gets the whole reply then (before, the failed write crashed the
  // session over and over, and its supervisor gave up).
  nodes net("running", {{"a", ""}});
  auto& cl = net.cl;
  auto c = connect_to(cl, 0);
  auto id = c->open_session({});
  BOOST_REQUIRE_MESSAGE(id, keel::test::why(id));
  // The worker pauses a few tokens in, so that the disk is full before the turn ends.
  auto [stalled, why] = cl.shell(0, "fault a/engine/shard-0 stall 2000 4");
  BOOST_REQUIRE_MESSAGE(stalled == 0, why);
  bool filled = false;
  auto g =
      c->generate(*id, "Hello there", 48, [&](uint64_t, uint64_t index, int32_t, std::string_view) {
        if (index != 0 || filled) return;
        filled = true;
        auto [st, out] = cl.shell(0, "fault a disk-full --ms 4000");
        BOOST_TEST(st == 0, out);
      });
  BOOST_REQUIRE_MESSAGE(g, "the running turn failed on a full disk: " << keel::test::why(g));
  BOOST_TEST(g->generated.size() == 48u);
  auto log = cl.current_log(0);
  BOOST_TEST(log.find("waits for the disk") != std::string::npos,
             "the turn's end was not refused by the full disk (it ended too late?):\n"
                 << log);
  auto h = c->history(*id);
  BOOST_REQUIRE_MESSAGE(h, keel::test::why(h));
  BOOST_REQUIRE_EQUAL(h->size(), 1u);
  BOOST_TEST((*h)[0].done);
  BOOST_TEST((*h)[0].generated == g->generated);
  BOOST_TEST(cl.alive(0), "the node died on a full disk:\n" << log);
  // It is durable: the node restarted serves it as it was.
  BOOST_TEST(cl.terminate(0) == 0);
  cl.start(0);
  check_served(cl, 0, {{*id, {g->generated}}}, {});
}
