#pragma once

// The session store's state and the helpers its files share (session_store.cpp: reads and
// writes; recovery.cpp: open, damage, scan). Only storage/ includes it.

#include <algorithm>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/iterator.h>
#include <rocksdb/options.h>
#include <rocksdb/snapshot.h>
#include <rocksdb/write_batch.h>

#include "storage/detail/keys.hpp"
#include "storage/envelope.hpp"
#include "storage/session_store.hpp"

namespace keel::storage {

namespace detail {

constexpr const char* sessions_cf_name = "sessions";
constexpr const char* turns_cf_name = "turns";
constexpr const char* meta_cf_name = "meta";
constexpr const char* ownership_cf_name = "ownership";

constexpr std::string_view format_version_key = "format_version";
constexpr std::string_view node_id_key = "node_id";
constexpr std::string_view next_session_key = "next_session_number";

/// A rocksdb::Status as a classified keel error naming `what` (path, column family, key).
inline caf::error status_error(const rocksdb::Status& s, const std::string& what) {
  auto text = s.ToString();
  // RocksDB reports a held LOCK file as an I/O error ("While lock file: DIR/LOCK: Resource
  // temporarily unavailable", or "lock hold by current process" for a second open here).
  if (s.IsIOError() && text.find("/LOCK") != std::string::npos)
    return make_error(errc::failed, what +
                                        ": database is in use by another process (or already "
                                        "open in this one): " +
                                        text);
  // A full disk refuses the write, not the store: retry once space is freed (write_raw resumes
  // RocksDB, which stops writing after a failed write).
  if (s.IsNoSpace())
    return make_error(errc::overloaded, what +
                                            ": disk full (no space left on device); refused, "
                                            "writes resume once space is freed: " +
                                            text);
  errc code = errc::failed;
  if (s.IsCorruption())
    code = errc::corrupt_record;
  else if (s.IsNotFound() || s.IsPathNotFound())
    code = errc::not_found;
  else if (s.IsBusy() || s.IsTimedOut() || s.IsTryAgain())
    code = errc::overloaded;
  return make_error(code, what + ": " + text);
}

inline caf::error stale(const std::string& what, uint64_t epoch, uint64_t stored) {
  return make_error(errc::stale_epoch, what + ": write with epoch " + std::to_string(epoch) +
                                           ", stored epoch " + std::to_string(stored));
}

struct turn_log {
  uint64_t epoch = 0;
  std::vector<int32_t> tokens;
};

/// Whether an `open` failure means damaged files (a salvage may help), not a held or missing
/// store.
inline bool damaged(const rocksdb::Status& s) {
  auto text = s.ToString();
  if (text.find("/LOCK") != std::string::npos) return false;
  return s.IsCorruption() || (s.IsIOError() && text.find("No such file") != std::string::npos);
}

/// Releases a snapshot on scope exit.
struct snapshot_guard {
  rocksdb::DB* db;
  const rocksdb::Snapshot* snap;
  ~snapshot_guard() { db->ReleaseSnapshot(snap); }
};

}  // namespace detail

using namespace detail;

// -- session_store::impl --------------------------------------------------------------------------

struct session_store::impl {
  std::string dir;
  store_options opts;
  std::unique_ptr<rocksdb::Env> env;  // with opts.disk: the disk-full seam; outlives db
  damage_report damage;               // what open found damaged and salvaged
  bool resume_needed = false;         // a write failed: RocksDB stopped writing (write_mu)
  rocksdb::DB* db = nullptr;
  std::vector<rocksdb::ColumnFamilyHandle*> handles;  // every CF of the directory
  rocksdb::ColumnFamilyHandle* sessions = nullptr;
  rocksdb::ColumnFamilyHandle* turns = nullptr;
  rocksdb::ColumnFamilyHandle* meta = nullptr;
  rocksdb::ColumnFamilyHandle* ownership = nullptr;
  // Serializes check-and-write: fencing reads the stored epoch, then writes. Readers do not
  // take it (RocksDB reads are thread-safe and see whole batches or none).
  std::mutex write_mu;

  ~impl() { close(); }

  void close() {
    if (db == nullptr) return;
    for (auto* h : handles) db->DestroyColumnFamilyHandle(h);  // before closing the DB
    handles.clear();
    db->Close();
    delete db;
    db = nullptr;
  }

  /// Opens the directory with every column family it holds (known to this build or not), and
  /// creates the ones this build knows that it lacks (a store made by an older build).
  rocksdb::Status open_db(const rocksdb::DBOptions& dbo, bool exists) {
    std::vector<std::string> names;
    if (exists) {
      auto s = rocksdb::DB::ListColumnFamilies(dbo, dir, &names);
      if (!s.ok()) return s;
    }
    for (const char* n : {rocksdb::kDefaultColumnFamilyName.c_str(), sessions_cf_name,
                          turns_cf_name, meta_cf_name, ownership_cf_name})
      if (std::find(names.begin(), names.end(), n) == names.end()) names.emplace_back(n);
    std::vector<rocksdb::ColumnFamilyDescriptor> descs;
    for (auto& n : names) descs.emplace_back(n, rocksdb::ColumnFamilyOptions{});
    auto s = rocksdb::DB::Open(dbo, dir, descs, &handles, &db);
    if (!s.ok()) {
      db = nullptr;
      return s;
    }
    for (auto* h : handles) {
      if (h->GetName() == sessions_cf_name) sessions = h;
      if (h->GetName() == turns_cf_name) turns = h;
      if (h->GetName() == meta_cf_name) meta = h;
      if (h->GetName() == ownership_cf_name) ownership = h;
    }
    return s;
  }

  std::string where(std::string_view cf, std::string_view key) const {
    return dir + ": " + std::string(cf) + " key " + std::string(key);
  }

  caf::error corrupt(std::string_view cf, std::string_view key, const caf::error& why) const {
    return make_error(errc::corrupt_record,
                      where(cf, key) + ": corrupt record: " + message_of(why));
  }

  /// Writes `wb`; write_mu held (or the store not yet shared). After a write failed for lack
  /// of space RocksDB refuses every write until it recovers: its SstFileManager polls the free
  /// space (every 5 s) and resumes once there is room (`Resume` answers busy meanwhile). Any
  /// other failed write is resumed by the next write's `Resume`.
  caf::error write_raw(rocksdb::WriteBatch& wb, durability d, const std::string& what) {
    if (resume_needed) {
      auto r = db->Resume();
      if (r.IsBusy())
        return make_error(errc::overloaded,
                          dir + ": " + what + ": disk full (no space left on device); refused, " +
                              "writes resume within about 5 s of space being freed");
      if (!r.ok()) return status_error(r, dir + ": " + what + " (resuming after a failed write)");
    }
    rocksdb::WriteOptions wo;
    wo.sync = d == durability::sync;
    auto s = db->Write(wo, &wb);
    resume_needed = s.IsIOError() || s.IsNoSpace();
    if (!s.ok()) return status_error(s, dir + ": " + what);
    return {};
  }

  /// The stored session record, or nullopt; corrupt_record when it cannot be used.
  caf::expected<std::optional<session_entry>> read_session(const rocksdb::ReadOptions& ro,
                                                           const std::string& id) const {
    std::string raw;
    auto s = db->Get(ro, sessions, id, &raw);
    if (s.IsNotFound()) return std::optional<session_entry>{};
    if (!s.ok()) return status_error(s, where(sessions_cf_name, id));
    auto e = decode_envelope(id, record_kind::session, raw);
    if (!e) return corrupt(sessions_cf_name, id, e.error());
    return std::optional<session_entry>{session_entry{e->epoch, std::move(e->payload)}};
  }

  caf::expected<turn_log> decode_turn(std::string_view key, std::string_view raw) const {
    auto e = decode_envelope(key, record_kind::turn_log, raw);
    if (!e) return corrupt(turns_cf_name, printable_turn_key(key), e.error());
    auto tokens = decode_tokens(e->payload);
    if (!tokens) return corrupt(turns_cf_name, printable_turn_key(key), tokens.error());
    return turn_log{e->epoch, std::move(*tokens)};
  }

  caf::expected<std::optional<turn_log>> read_turn(const rocksdb::ReadOptions& ro,
                                                   const std::string& id, uint64_t turn) const {
    auto key = turn_key(id, turn);
    std::string raw;
    auto s = db->Get(ro, turns, key, &raw);
    if (s.IsNotFound()) return std::optional<turn_log>{};
    if (!s.ok()) return status_error(s, where(turns_cf_name, printable_turn_key(key)));
    auto t = decode_turn(key, raw);
    if (!t) return t.error();
    return std::optional<turn_log>{std::move(*t)};
  }

  /// The meta value under `key`, or nullopt.
  caf::expected<std::optional<std::string>> read_meta(std::string_view key) const {
    std::string raw;
    auto s = db->Get(rocksdb::ReadOptions{}, meta, key, &raw);
    if (s.IsNotFound()) return std::optional<std::string>{};
    if (!s.ok()) return status_error(s, where(meta_cf_name, key));
    auto e = decode_envelope(key, record_kind::meta, raw);
    if (!e) return corrupt(meta_cf_name, key, e.error());
    return std::optional<std::string>{std::move(e->payload)};
  }

  caf::expected<uint64_t> read_counter() const {
    auto v = read_meta(next_session_key);
    if (!v) return v.error();
    if (!*v) return uint64_t{1};
    if ((*v)->size() != 8)
      return make_error(errc::corrupt_record,
                        where(meta_cf_name, next_session_key) + ": corrupt record: counter of " +
                            std::to_string((*v)->size()) + " bytes, expected 8");
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<unsigned char>((**v)[i]);
    return n;
  }

  caf::error write_meta(std::string_view key, std::string_view payload) {
    rocksdb::WriteBatch wb;
    wb.Put(meta, key, encode_envelope(key, record_kind::meta, 0, payload));
    return write_raw(wb, durability::sync, "write of meta key " + std::string(key));
  }

  /// True when none of `sessions`, `turns` and `ownership` holds a key.
  caf::expected<bool> data_cfs_empty() const {
    for (auto* cf : {sessions, turns, ownership}) {
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions{}, cf));
      it->SeekToFirst();
      if (!it->status().ok()) return status_error(it->status(), dir + ": " + cf->GetName());
      if (it->Valid()) return false;
    }
    return true;
  }
};

}  // namespace keel::storage
