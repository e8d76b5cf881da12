#define BOOST_TEST_MODULE store_damage_test
#include <boost/test/unit_test.hpp>

// Issue #11, "A damaged disk never loses an acknowledged turn silently", on the store alone: a
// damaged WAL or SST file is detected at open, set aside, the store rebuilt from what is
// readable, and every session whose records are not as written is named; a full disk refuses
// writes with a classified error and they resume when space returns.

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "storage/session_store.hpp"
#include "tests/test_support.hpp"

using namespace keel;
using namespace keel::storage;
using keel::test::temp_dir;
using keel::test::why;
namespace fs = std::filesystem;

namespace {

/// What the test wrote: per session, its turn logs.
using written = std::map<std::string, std::map<uint64_t, std::vector<int32_t>>>;

/// Writes `n` sessions of two turns of `tokens` tokens each, every write synced, one session
/// after another (as acknowledged turns arrive), and closes the store.
written write_sessions(const std::string& dir, int n, int tokens) {
  written out;
  auto store = session_store::open(dir);
  BOOST_REQUIRE_MESSAGE(store, why(store));
  for (int s = 0; s < n; ++s) {
    auto id = "s-" + std::to_string(100 + s) + "@a";
    BOOST_REQUIRE(!(*store)->put_session(id, 1, "record of " + id + "...."));
    for (uint64_t turn = 0; turn < 2; ++turn) {
      std::vector<int32_t> t;
      for (int k = 0; k < tokens; ++k) t.push_back(s * 100000 + static_cast<int>(turn) * 1000 + k);
      for (int from = 0; from < tokens; from += 16) {
        std::vector<int32_t> part(t.begin() + from, t.begin() + std::min(tokens, from + 16));
        BOOST_REQUIRE(!(*store)->append_turn_tokens(id, 1, turn, from, part));
      }
      out[id][turn] = t;
    }
  }
  return out;
}

/// The sessions of `dir`'s store that are not as `w` says they were written.
std::vector<std::string> differing(session_store& store, const written& w) {
  auto scan = store.scan();
  BOOST_REQUIRE_MESSAGE(scan, why(scan));
  std::map<std::string, std::map<uint64_t, std::vector<int32_t>>> got;
  for (auto& s : scan->sessions) got[s.id] = s.turns;
  std::vector<std::string> out;
  for (auto& [id, turns] : w)
    if (got[id] != turns) out.push_back(id);
  return out;
}

std::string joined(const std::vector<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

/// Opens the damaged store and checks the contract: it opens, reports the damage, keeps the
/// damaged files aside, lost something, and names every session that is not as written.
void check_reported(const std::string& dir, const written& w, const std::string& finding) {
  auto store = session_store::open(dir);
  BOOST_REQUIRE_MESSAGE(store, "the damaged store did not open: " << why(store));
  auto& d = (*store)->damage();
  BOOST_REQUIRE_MESSAGE(d.damaged(), "the damage was not detected");
  BOOST_TEST_MESSAGE("findings: " << joined(d.findings));
  BOOST_TEST(
      std::any_of(d.findings.begin(), d.findings.end(),
                  [&](const std::string& f) { return f.find(finding) != std::string::npos; }),
      "no finding says '" << finding << "': " << joined(d.findings));
  BOOST_TEST(fs::is_directory(d.aside), "the damaged files are not kept: " << d.aside);
  BOOST_TEST(fs::path(d.aside).parent_path() == fs::path(dir));
  auto lost = differing(**store, w);
  BOOST_TEST_MESSAGE("lost or older: " << joined(lost) << "; named: "
                                       << joined({d.sessions.begin(), d.sessions.end()}));
  BOOST_TEST(!lost.empty(), "the damage lost nothing: the test damaged the wrong place");
  for (auto& id : lost)
    BOOST_TEST(d.sessions.count(id) == 1, "session " << id << " was lost silently");
  // The rebuilt store is whole: a second open finds nothing, and writes go on.
  BOOST_TEST(!(*store)->put_session("s-1@a", 1, "after the repair"));
  store->reset();
  auto again = session_store::open(dir);
  BOOST_REQUIRE_MESSAGE(again, why(again));
  BOOST_TEST(!(*again)->damage().damaged(), joined((*again)->damage().findings));
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_flipped_byte_in_the_wal_is_detected_and_every_dropped_session_named) {
  temp_dir dir{"store_damage_test-flip"};
  auto w = write_sessions(dir.path.string(), 3, 64);
  auto wal = keel::test::largest_file(dir.path, ".log");
  keel::test::flip_byte(wal, fs::file_size(wal) / 2);
  check_reported(dir.path.string(), w, "WAL " + wal.filename().string());
  // The damaged WAL is kept as it was found.
  bool kept = false;
  for (auto& e : fs::recursive_directory_iterator(dir.path))
    kept = kept || (e.path().filename() == wal.filename() &&
                    e.path().parent_path().filename().string().rfind("damaged-", 0) == 0);
  BOOST_TEST(kept);
}

BOOST_AUTO_TEST_CASE(a_wal_cut_in_half_is_detected_and_its_torn_record_named) {
  // Sessions written wholly after the cut cannot be named from this store alone (their bytes
  // are gone); the one torn at the cut can. A node with peers learns the rest from them.
  temp_dir dir{"store_damage_test-cut"};
  auto w = write_sessions(dir.path.string(), 3, 64);
  auto wal = keel::test::largest_file(dir.path, ".log");
  fs::resize_file(wal, fs::file_size(wal) / 2);
  auto store = session_store::open(dir.path.string());
  BOOST_REQUIRE_MESSAGE(store, why(store));
  auto& d = (*store)->damage();
  BOOST_REQUIRE_MESSAGE(d.damaged(), "the cut was not detected");
  BOOST_TEST_MESSAGE("findings: " << joined(d.findings));
  BOOST_TEST(d.findings.front().find("incomplete record") != std::string::npos);
  auto lost = differing(**store, w);
  BOOST_REQUIRE(!lost.empty());
  BOOST_TEST(d.sessions.count(lost.front()) == 1,
             "the session torn at the cut, " << lost.front() << ", is not named");
}

BOOST_AUTO_TEST_CASE(a_damaged_sst_file_is_rebuilt_and_the_sessions_around_it_named) {
  temp_dir dir{"store_damage_test-sst"};
  auto w = write_sessions(dir.path.string(), 40, 400);
  {
    auto reopened = session_store::open(dir.path.string());  // replays the WAL into SST files
    BOOST_REQUIRE_MESSAGE(reopened, why(reopened));
  }
  auto sst = keel::test::largest_file(dir.path, ".sst");
  keel::test::flip_byte(sst, fs::file_size(sst) / 3);
  check_reported(dir.path.string(), w, "SST");
}

BOOST_AUTO_TEST_CASE(a_full_disk_refuses_writes_keeps_reads_and_recovers) {
  temp_dir dir{"store_damage_test-full"};
  store_options o;
  o.disk = std::make_shared<disk_fault>();
  auto store = session_store::open(dir.path.string(), o);
  BOOST_REQUIRE_MESSAGE(store, why(store));
  auto& s = **store;
  BOOST_REQUIRE(!s.put_session("s-1@a", 1, "before"));
  o.disk->fill(std::chrono::milliseconds(0));
  for (int i = 0; i < 3; ++i) {
    auto err = s.put_session("s-2@a", 1, "while full");
    BOOST_REQUIRE(err);
    BOOST_TEST(code_of(err) == errc::overloaded, describe(err));
    BOOST_TEST(message_of(err).find("disk full") != std::string::npos, describe(err));
    BOOST_TEST(message_of(err).find(dir.path.string()) != std::string::npos, describe(err));
  }
  auto before = s.get_session("s-1@a");
  BOOST_REQUIRE_MESSAGE(before, why(before));
  BOOST_TEST(before->payload == "before");
  o.disk->clear();
  // RocksDB's SstFileManager sees the space within its poll interval (5 s) and resumes.
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  caf::error err;
  do {
    err = s.put_session("s-2@a", 1, "after");
    if (err) BOOST_TEST(code_of(err) == errc::overloaded, describe(err));
    if (err) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  } while (err && std::chrono::steady_clock::now() < until);
  BOOST_REQUIRE_MESSAGE(!err, "writes did not resume within 10 s: " << describe(err));
  BOOST_TEST(s.get_session("s-2@a")->payload == "after");
  store->reset();
  auto again = session_store::open(dir.path.string());
  BOOST_REQUIRE_MESSAGE(again, why(again));
  BOOST_TEST((*again)->get_session("s-2@a")->payload == "after");
  BOOST_TEST(!(*again)->damage().damaged(), joined((*again)->damage().findings));
}

BOOST_AUTO_TEST_CASE(a_salvage_interrupted_by_a_crash_is_completed_at_the_next_open) {
  // A crash after the new store was whole and before the damaged files were moved aside: the
  // directory holds the damaged store and DIR/rebuilt with its SALVAGED marker.
  temp_dir dir{"store_damage_test-interrupted"};
  auto root = dir.path / "store";
  auto good = write_sessions((dir.path / "good").string(), 2, 16);
  write_sessions(root.string(), 3, 16);
  auto wal = keel::test::largest_file(root, ".log");
  keel::test::flip_byte(wal, fs::file_size(wal) / 2);
  fs::rename(dir.path / "good", root / "rebuilt");
  std::ofstream(root / "rebuilt" / "SALVAGED") << "damaged-19700101T000000Z\n";

  auto store = session_store::open(root.string());
  BOOST_REQUIRE_MESSAGE(store, why(store));
  auto& d = (*store)->damage();
  BOOST_REQUIRE(d.damaged());
  BOOST_TEST(d.findings.front().find("interrupted") != std::string::npos, joined(d.findings));
  BOOST_TEST(d.aside == (root / "damaged-19700101T000000Z").string());
  BOOST_TEST(fs::exists(root / "damaged-19700101T000000Z" / wal.filename()));
  BOOST_TEST(!fs::exists(root / "rebuilt"));
  // The store is the rebuilt one, and whole.
  BOOST_TEST(differing(**store, good).empty());
  auto ids = (*store)->list_sessions();
  BOOST_REQUIRE(ids);
  BOOST_TEST(ids->size() == good.size());
  BOOST_TEST(d.findings.size() == 1u, joined(d.findings));
}
