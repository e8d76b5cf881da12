#define BOOST_TEST_MODULE ownership_store_test
#include <boost/test/unit_test.hpp>

// The session store's `ownership` column family (storage/session_store.hpp, docs/storage.md):
// one opaque value per session, checksummed like every value, durable across reopens, reported
// when corrupt, refused on a full disk, created in a store made before it existed, and carried
// (or named as lost) when a damaged store is rebuilt.

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <rocksdb/db.h>
#include <rocksdb/options.h>

#include "storage/envelope.hpp"
#include "storage/session_store.hpp"
#include "tests/test_support.hpp"

using namespace keel;
using namespace keel::storage;
using keel::test::temp_dir;
using keel::test::why;
namespace fs = std::filesystem;

namespace {

std::unique_ptr<session_store> open_store(const std::string& dir, store_options o = {}) {
  auto s = session_store::open(dir, std::move(o));
  BOOST_REQUIRE_MESSAGE(s, "open " + dir + ": " + why(s));
  return std::move(*s);
}

void require_ok(const caf::error& err) {
  BOOST_REQUIRE_MESSAGE(!err, describe(err));
}

void require_code(const caf::error& err, errc code) {
  BOOST_REQUIRE_MESSAGE(err, "expected " << to_string(code) << ", got success");
  BOOST_REQUIRE_MESSAGE(code_of(err) == code,
                        "expected " << to_string(code) << ", got " << describe(err));
}

ownership_scan scan_of(const session_store& s) {
  auto r = s.scan_ownership();
  BOOST_REQUIRE_MESSAGE(r, why(r));
  return std::move(*r);
}

/// A value like an encoded stored_session: binary, any byte.
std::string blob(const std::string& session, size_t size = 64) {
  std::string out = session + std::string("\0\xff:", 3);
  for (size_t i = 0; out.size() < size; ++i) out.push_back(static_cast<char>(i * 31 + size));
  return out;
}

std::vector<std::string> cf_names(const std::string& dir) {
  std::vector<std::string> names;
  auto s = rocksdb::DB::ListColumnFamilies(rocksdb::DBOptions{}, dir, &names);
  BOOST_REQUIRE_MESSAGE(s.ok(), s.ToString());
  return names;
}

bool has(const std::vector<std::string>& v, const std::string& x) {
  return std::find(v.begin(), v.end(), x) != v.end();
}

/// The store's directory opened with raw RocksDB (every column family), to change it behind the
/// store's back. Handles are destroyed before the DB is closed.
struct raw_db {
  rocksdb::DB* db = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> cfs;

  explicit raw_db(const std::string& dir) {
    std::vector<rocksdb::ColumnFamilyDescriptor> descs;
    for (auto& n : cf_names(dir)) descs.emplace_back(n, rocksdb::ColumnFamilyOptions{});
    auto s = rocksdb::DB::Open(rocksdb::DBOptions{}, dir, descs, &cfs, &db);
    BOOST_REQUIRE_MESSAGE(s.ok(), s.ToString());
  }
  ~raw_db() {
    for (auto* h : cfs) db->DestroyColumnFamilyHandle(h);
    db->Close();
    delete db;
  }
  rocksdb::ColumnFamilyHandle* cf(const std::string& name) {
    for (auto* h : cfs)
      if (h->GetName() == name) return h;
    BOOST_FAIL("no column family " + name);
    return nullptr;
  }
  std::string get(const std::string& cf_name, const std::string& key) {
    std::string v;
    auto s = db->Get({}, cf(cf_name), key, &v);
    BOOST_REQUIRE_MESSAGE(s.ok(), s.ToString());
    return v;
  }
  void put(const std::string& cf_name, const std::string& key, const std::string& value) {
    rocksdb::WriteOptions wo;
    wo.sync = true;
    auto s = db->Put(wo, cf(cf_name), key, value);
    BOOST_REQUIRE_MESSAGE(s.ok(), s.ToString());
  }
  void drop(const std::string& cf_name) {
    auto* h = cf(cf_name);
    auto s = db->DropColumnFamily(h);
    BOOST_REQUIRE_MESSAGE(s.ok(), s.ToString());
    db->DestroyColumnFamilyHandle(h);
    cfs.erase(std::find(cfs.begin(), cfs.end(), h));
  }
};

std::string joined(const std::set<std::string>& v) {
  std::string out;
  for (auto& s : v) out += (out.empty() ? "" : ", ") + s;
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(put_and_scan_round_trip_overwrite_and_erase) {
  temp_dir dir("ownership_store_round_trip");
  auto store = open_store(dir.path.string());
  BOOST_TEST(scan_of(*store).entries.empty());
  require_ok(store->put_ownership("s-1@a", blob("s-1@a")));
  require_ok(store->put_ownership("s-2@b", blob("s-2@b", 5000), durability::buffered));
  require_ok(store->put_ownership("s-3@c", ""));  // an empty value is a value
  auto scan = scan_of(*store);
  BOOST_TEST(scan.corrupt.empty());
  BOOST_REQUIRE_EQUAL(scan.entries.size(), 3u);
  BOOST_TEST(scan.entries.at("s-1@a") == blob("s-1@a"));
  BOOST_TEST(scan.entries.at("s-2@b") == blob("s-2@b", 5000));
  BOOST_TEST(scan.entries.at("s-3@c") == "");

  require_ok(store->put_ownership("s-1@a", "newer"));  // whole values: the last one wins
  BOOST_TEST(scan_of(*store).entries.at("s-1@a") == "newer");

  require_ok(store->erase_ownership("s-2@b"));
  require_ok(store->erase_ownership("s-9@z"));  // erasing a missing one succeeds
  scan = scan_of(*store);
  BOOST_TEST(scan.entries.size() == 2u);
  BOOST_TEST(scan.entries.count("s-2@b") == 0u);

  require_code(store->put_ownership("", "x"), errc::bad_request);
  require_code(store->put_ownership(std::string("a\0b", 3), "x"), errc::bad_request);
  require_code(store->put_ownership(std::string(1025, 's'), "x"), errc::bad_request);
  require_code(store->erase_ownership(""), errc::bad_request);
}

BOOST_AUTO_TEST_CASE(ownership_state_is_independent_of_session_records) {
  temp_dir dir("ownership_store_independent");
  auto store = open_store(dir.path.string());
  require_ok(store->put_session("s-1@a", 4, "record"));
  require_ok(store->append_turn_tokens("s-1@a", 4, 0, 0, {1, 2}));
  require_ok(store->put_ownership("s-1@a", "state"));
  require_ok(store->put_ownership("s-2@a", "state of a session with no record"));
  auto sessions = store->scan();
  BOOST_REQUIRE_MESSAGE(sessions, why(sessions));
  BOOST_TEST(sessions->sessions.size() == 1u);  // no record made up for s-2@a
  BOOST_TEST(sessions->corrupt.empty());        // and nothing reported about it
  require_ok(store->erase_session("s-1@a", 4));
  BOOST_TEST(scan_of(*store).entries.at("s-1@a") == "state");
  require_ok(store->put_session("s-1@a", 5, "record"));
  require_ok(store->erase_ownership("s-1@a"));
  BOOST_TEST(store->get_session("s-1@a")->payload == "record");
}

BOOST_AUTO_TEST_CASE(ownership_state_survives_close_and_reopen) {
  temp_dir dir("ownership_store_reopen");
  auto path = dir.path.string();
  {
    auto store = open_store(path);
    require_ok(store->put_ownership("s-1@a", blob("s-1@a")));
    require_ok(store->put_ownership("s-2@a", blob("s-2@a")));
    require_ok(store->put_ownership("s-3@a", blob("s-3@a")));
    require_ok(store->erase_ownership("s-3@a"));
  }
  for (int round = 0; round < 2; ++round) {  // the second open reads it from SST files
    auto store = open_store(path);
    BOOST_TEST(!store->damage().damaged());
    auto scan = scan_of(*store);
    BOOST_TEST(scan.corrupt.empty());
    BOOST_REQUIRE_EQUAL(scan.entries.size(), 2u);
    BOOST_TEST(scan.entries.at("s-1@a") == blob("s-1@a"));
    BOOST_TEST(scan.entries.at("s-2@a") == blob("s-2@a"));
  }
}

BOOST_AUTO_TEST_CASE(a_corrupt_value_is_reported_and_the_others_returned) {
  temp_dir dir("ownership_store_corrupt");
  auto path = dir.path.string();
  {
    auto store = open_store(path);
    for (int i = 1; i <= 3; ++i) {
      auto id = "s-" + std::to_string(i);
      require_ok(store->put_ownership(id, blob(id)));
    }
  }
  {
    raw_db raw(path);
    auto v = raw.get("ownership", "s-2");
    v[envelope_header_size + 3] ^= 0x01;  // one bit of the payload
    raw.put("ownership", "s-2", v);
    // A value under another key (the key is checksummed) and one of another kind.
    raw.put("ownership", "s-4", raw.get("ownership", "s-3"));
    raw.put("ownership", "s-5", encode_envelope("s-5", record_kind::session, 0, "x"));
  }
  auto store = open_store(path);
  auto scan = scan_of(*store);
  BOOST_REQUIRE_EQUAL(scan.entries.size(), 2u);
  BOOST_TEST(scan.entries.at("s-1") == blob("s-1"));
  BOOST_TEST(scan.entries.at("s-3") == blob("s-3"));
  BOOST_REQUIRE_EQUAL(scan.corrupt.size(), 3u);
  for (auto& c : scan.corrupt) {
    BOOST_TEST(c.cf == "ownership");
    BOOST_TEST(c.session == c.key);
    BOOST_TEST_MESSAGE(c.key << ": " << c.reason);
  }
  BOOST_TEST(scan.corrupt[0].key == "s-2");
  BOOST_TEST(scan.corrupt[0].reason.find("checksum mismatch") != std::string::npos);
  BOOST_TEST(scan.corrupt[1].key == "s-4");
  BOOST_TEST(scan.corrupt[1].reason.find("checksum mismatch") != std::string::npos);
  BOOST_TEST(scan.corrupt[2].key == "s-5");
  BOOST_TEST(scan.corrupt[2].reason.find("record kind 1, expected 4 (ownership)") !=
             std::string::npos);
  // The corrupt value is replaced whole (the protocol rewrites it from its peers).
  require_ok(store->put_ownership("s-2", blob("s-2")));
  require_ok(store->erase_ownership("s-4"));
  require_ok(store->erase_ownership("s-5"));
  scan = scan_of(*store);
  BOOST_TEST(scan.corrupt.empty());
  BOOST_TEST(scan.entries.size() == 3u);
}

BOOST_AUTO_TEST_CASE(a_full_disk_refuses_ownership_writes_keeps_reads_and_recovers) {
  temp_dir dir("ownership_store_full");
  store_options o;
  o.disk = std::make_shared<disk_fault>();
  auto store = open_store(dir.path.string(), o);
  require_ok(store->put_ownership("s-1@a", "before"));
  o.disk->fill(std::chrono::milliseconds(0));
  for (auto err : {store->put_ownership("s-2@a", "while full"), store->erase_ownership("s-1@a")}) {
    BOOST_REQUIRE(err);
    BOOST_TEST(code_of(err) == errc::overloaded, describe(err));
    BOOST_TEST(message_of(err).find("disk full") != std::string::npos, describe(err));
    BOOST_TEST(message_of(err).find(dir.path.string()) != std::string::npos, describe(err));
  }
  auto scan = scan_of(*store);  // readable, and nothing of the refused writes in it
  BOOST_TEST(scan.entries.size() == 1u);
  BOOST_TEST(scan.entries.at("s-1@a") == "before");
  o.disk->clear();
  // RocksDB's SstFileManager sees the space within its poll interval (5 s) and resumes.
  auto until = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  caf::error err;
  do {
    err = store->put_ownership("s-2@a", "after");
    if (err) BOOST_TEST(code_of(err) == errc::overloaded, describe(err));
    if (err) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  } while (err && std::chrono::steady_clock::now() < until);
  BOOST_REQUIRE_MESSAGE(!err, "writes did not resume within 10 s: " << describe(err));
  store.reset();
  store = open_store(dir.path.string());
  BOOST_TEST(scan_of(*store).entries.at("s-2@a") == "after");
}

BOOST_AUTO_TEST_CASE(a_store_made_without_the_column_family_opens_and_gets_it) {
  temp_dir dir("ownership_store_old");
  auto path = dir.path.string();
  {
    auto store = open_store(path);
    require_ok(store->put_session("s-1@a", 2, "record"));
    require_ok(store->append_turn_tokens("s-1@a", 2, 0, 0, {5, 6}));
    require_ok(store->set_node_id("node-a"));
  }
  {
    // The store as a build before the ownership CF left it: the same CFs but that one.
    raw_db raw(path);
    raw.drop("ownership");
  }
  BOOST_REQUIRE(!has(cf_names(path), "ownership"));
  {
    auto store = open_store(path);
    BOOST_TEST(!store->damage().damaged());
    BOOST_TEST(store->get_session("s-1@a")->payload == "record");
    BOOST_TEST(*store->read_turn("s-1@a", 0) == (std::vector<int32_t>{5, 6}),
               boost::test_tools::per_element());
    BOOST_TEST(*store->node_id() == "node-a");
    auto scan = scan_of(*store);
    BOOST_TEST(scan.entries.empty());
    BOOST_TEST(scan.corrupt.empty());
    require_ok(store->put_ownership("s-1@a", "state"));
  }
  BOOST_TEST(has(cf_names(path), "ownership"));
  auto store = open_store(path);
  BOOST_TEST(scan_of(*store).entries.at("s-1@a") == "state");
}

BOOST_AUTO_TEST_CASE(ownership_state_without_a_format_version_is_refused) {
  // As for session records: a store that holds data must say which layout it has.
  temp_dir dir("ownership_store_no_version");
  auto path = dir.path.string();
  {
    auto store = open_store(path);
    require_ok(store->put_ownership("s-1@a", "state"));
  }
  {
    raw_db raw(path);
    auto s = raw.db->Delete(rocksdb::WriteOptions{}, raw.cf("meta"), "format_version");
    BOOST_REQUIRE_MESSAGE(s.ok(), s.ToString());
  }
  auto store = session_store::open(path);
  BOOST_REQUIRE(!store);
  BOOST_TEST(code_of(store.error()) == errc::corrupt_record, describe(store.error()));
}

BOOST_AUTO_TEST_CASE(a_rebuilt_store_keeps_the_ownership_state_it_could_read) {
  // Ownership state in SST files, then a damaged WAL of later session writes: the store is
  // rebuilt, and every ownership value comes across, intact.
  temp_dir dir("ownership_store_rebuilt");
  auto path = dir.path.string();
  std::map<std::string, std::string> written;
  {
    auto store = open_store(path);
    for (int i = 0; i < 20; ++i) {
      auto id = "s-" + std::to_string(100 + i) + "@a";
      written[id] = blob(id, 1000);
      require_ok(store->put_ownership(id, written[id]));
    }
  }
  open_store(path).reset();  // replays the WAL into SST files
  {
    auto store = open_store(path);
    for (int i = 0; i < 3; ++i) {
      auto id = "t-" + std::to_string(i) + "@a";
      require_ok(store->put_session(id, 1, "record of " + id));
      std::vector<int32_t> tokens(500, i);
      require_ok(store->append_turn_tokens(id, 1, 0, 0, tokens));
    }
  }
  auto wal = keel::test::largest_file(dir.path, ".log");
  keel::test::flip_byte(wal, fs::file_size(wal) / 2);
  auto store = open_store(path);
  BOOST_REQUIRE_MESSAGE(store->damage().damaged(), "the damage was not detected");
  BOOST_TEST(fs::is_directory(store->damage().aside));
  auto scan = scan_of(*store);
  BOOST_TEST(scan.corrupt.empty());
  BOOST_TEST((scan.entries == written));
}

BOOST_AUTO_TEST_CASE(a_damaged_wal_names_every_session_whose_ownership_state_it_lost) {
  temp_dir dir("ownership_store_wal");
  auto path = dir.path.string();
  std::map<std::string, std::string> written;
  {
    auto store = open_store(path);
    for (int i = 0; i < 20; ++i) {
      auto id = "s-" + std::to_string(100 + i) + "@a";
      written[id] = blob(id, 1000);
      require_ok(store->put_ownership(id, written[id]));
    }
  }
  auto wal = keel::test::largest_file(dir.path, ".log");
  keel::test::flip_byte(wal, fs::file_size(wal) / 2);
  auto store = open_store(path);
  auto& d = store->damage();
  BOOST_REQUIRE_MESSAGE(d.damaged(), "the damage was not detected");
  auto scan = scan_of(*store);
  BOOST_TEST(scan.corrupt.empty());
  std::set<std::string> lost;
  for (auto& [id, value] : written)
    if (scan.entries.count(id) == 0 || scan.entries.at(id) != value) lost.insert(id);
  BOOST_TEST_MESSAGE("lost: " << joined(lost) << "; named: " << joined(d.sessions));
  BOOST_TEST(!lost.empty(), "the damage lost nothing: the test damaged the wrong place");
  BOOST_TEST(scan.entries.size() > 0u, "nothing before the damage was kept");
  for (auto& id : lost) BOOST_TEST(d.sessions.count(id) == 1u, id << " was lost silently");
}
