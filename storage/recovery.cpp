// Opening a session store, with its damage checks (docs/storage.md, "Damage"), and recovering
// from it: scan, discard_corrupt.

#include <filesystem>
#include <set>

#include "storage/damage.hpp"
#include "storage/detail/store_impl.hpp"
#include "storage/disk_fault.hpp"

namespace keel::storage {

caf::expected<std::unique_ptr<session_store>> session_store::open(const std::string& dir,
                                                                  store_options opts) {
  namespace fs = std::filesystem;
  auto p = std::make_unique<impl>();
  p->dir = dir;
  p->opts = opts;
  std::error_code ec;
  bool exists = fs::exists(fs::path(dir) / "CURRENT", ec);
  if (fs::exists(dir, ec)) {
    // A salvage that a crash interrupted is completed first.
    if (auto err = finish_salvage(dir, p->damage)) return err;
    exists = fs::exists(fs::path(dir) / "CURRENT", ec);
  }
  if (!exists && !opts.create_if_missing)
    return make_error(errc::not_found, dir + ": no session store there (no CURRENT file)");
  if (!exists) {
    fs::create_directories(dir, ec);
    if (ec) return make_error(errc::failed, dir + ": cannot create directory: " + ec.message());
  }

  rocksdb::DBOptions dbo;
  dbo.create_if_missing = opts.create_if_missing;
  dbo.create_missing_column_families = true;
  // Damage is detected, never skipped silently (docs/storage.md, "Damage"): RocksDB checks
  // every file it opens and every block it reads (paranoid checks, block checksums on reads);
  // the WAL is checked record by record before RocksDB replays it (point-in-time recovery
  // would end the replay at a damaged record without saying what it dropped); after the open
  // every SST block's checksum is verified. Damage found: the store is rebuilt from what is
  // readable (damage.hpp) and `damage()` says what was lost.
  dbo.paranoid_checks = true;
  dbo.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  if (opts.disk) {
    p->env = faulty_env(opts.disk);
    dbo.env = p->env.get();
  }
  auto rebuild = [&](const std::string& finding) -> caf::error {
    p->close();
    p->damage.findings.push_back(finding);
    if (auto err = salvage(dir, p->damage)) return err;
    auto s = p->open_db(dbo, true);
    return s.ok() ? caf::error{} : status_error(s, dir + ": the rebuilt store");
  };
  if (exists) {
    auto wal = inspect_wal(dir);
    auto& d = p->damage;
    d.findings.insert(d.findings.end(), wal.findings.begin(), wal.findings.end());
    d.sessions.insert(wal.sessions.begin(), wal.sessions.end());
    if (wal.damaged())
      if (auto err = salvage(dir, d)) return err;
  }
  auto s = p->open_db(dbo, exists);
  if (!s.ok() && !(exists && damaged(s))) return status_error(s, dir);
  if (!s.ok()) {
    if (auto err = rebuild(dir + ": RocksDB refuses to open it: " + s.ToString())) return err;
  } else if (exists) {
    auto v = p->db->VerifyChecksum();
    if (!v.ok() && damaged(v))
      if (auto err = rebuild(dir + ": an SST file is damaged: " + v.ToString())) return err;
  }

  auto version = p->read_meta(format_version_key);
  if (!version) return version.error();
  if (!*version) {
    // A new store, or one that crashed before its first metadata write: it must be empty.
    auto empty = p->data_cfs_empty();
    if (!empty) return empty.error();
    if (!*empty)
      return make_error(errc::corrupt_record, p->where(meta_cf_name, format_version_key) +
                                                  ": missing from a store that holds sessions");
    std::string v{static_cast<char>(format_version & 0xFF), static_cast<char>(format_version >> 8)};
    if (auto err = p->write_meta(format_version_key, v)) return err;
  } else {
    const auto& v = **version;
    if (v.size() != 2)
      return make_error(errc::corrupt_record, p->where(meta_cf_name, format_version_key) +
                                                  ": corrupt record: " + std::to_string(v.size()) +
                                                  " bytes, expected 2");
    auto got = static_cast<uint16_t>(static_cast<unsigned char>(v[0]) |
                                     static_cast<unsigned char>(v[1]) << 8);
    if (got != format_version)
      return make_error(errc::failed, dir + ": store format version " + std::to_string(got) +
                                          ", this build reads version " +
                                          std::to_string(format_version));
  }
  return std::unique_ptr<session_store>(new session_store(std::move(p)));
}

caf::expected<scan_result> session_store::scan() const {
  auto& p = *impl_;
  snapshot_guard snap{p.db, p.db->GetSnapshot()};
  rocksdb::ReadOptions ro;
  ro.snapshot = snap.snap;
  scan_result out;
  std::map<std::string, size_t> index;  // intact session id -> position in out.sessions
  std::set<std::string> corrupt_sessions;

  std::unique_ptr<rocksdb::Iterator> it(p.db->NewIterator(ro, p.sessions));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    auto id = it->key().ToString();
    auto e = decode_envelope(id, record_kind::session, it->value().ToStringView());
    if (!e) {
      out.corrupt.push_back({sessions_cf_name, id, id, message_of(e.error())});
      corrupt_sessions.insert(id);
      continue;
    }
    index[id] = out.sessions.size();
    out.sessions.push_back({id, e->epoch, std::move(e->payload), {}});
  }
  if (!it->status().ok()) return status_error(it->status(), p.dir + ": scanning sessions");

  it.reset(p.db->NewIterator(ro, p.turns));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    auto key = it->key().ToStringView();
    auto parsed = parse_turn_key(key);
    if (!parsed) {
      out.corrupt.push_back({turns_cf_name, printable_turn_key(key), "", "malformed turn key"});
      continue;
    }
    auto printable = parsed->first + "/" + std::to_string(parsed->second);
    auto e = decode_envelope(key, record_kind::turn_log, it->value().ToStringView());
    caf::expected<std::vector<int32_t>> tokens{std::vector<int32_t>{}};
    if (e) tokens = decode_tokens(e->payload);
    if (!e || !tokens) {
      out.corrupt.push_back(
          {turns_cf_name, printable, parsed->first, message_of(e ? tokens.error() : e.error())});
      continue;
    }
    auto i = index.find(parsed->first);
    if (i == index.end()) {
      // The session record itself is corrupt (already reported), or missing.
      if (!corrupt_sessions.count(parsed->first))
        out.corrupt.push_back(
            {turns_cf_name, printable, parsed->first, "turn log without a session record"});
      continue;
    }
    out.sessions[i->second].turns[parsed->second] = std::move(*tokens);
  }
  if (!it->status().ok()) return status_error(it->status(), p.dir + ": scanning turns");
  return out;
}

caf::expected<size_t> session_store::discard_corrupt(const std::string& id) {
  if (auto err = check_id(id)) return err;
  auto& p = *impl_;
  std::lock_guard<std::mutex> lock(p.write_mu);
  rocksdb::WriteBatch wb;
  size_t n = 0;
  std::string raw;
  auto s = p.db->Get(rocksdb::ReadOptions{}, p.sessions, id, &raw);
  if (s.IsCorruption() || (s.ok() && !decode_envelope(id, record_kind::session, raw))) {
    wb.Delete(p.sessions, id);
    ++n;
  } else if (!s.ok() && !s.IsNotFound()) {
    return status_error(s, p.where(sessions_cf_name, id));
  }
  auto lo = turns_begin(id);
  auto hi = turns_end(id);
  rocksdb::Slice upper(hi);
  rocksdb::ReadOptions ro;
  ro.iterate_upper_bound = &upper;
  std::unique_ptr<rocksdb::Iterator> it(p.db->NewIterator(ro, p.turns));
  for (it->Seek(lo); it->Valid(); it->Next()) {
    if (!p.decode_turn(it->key().ToStringView(), it->value().ToStringView())) {
      wb.Delete(p.turns, it->key());
      ++n;
    }
  }
  if (!it->status().ok()) return status_error(it->status(), p.where(turns_cf_name, id + "/*"));
  if (n == 0) return size_t{0};
  if (auto err = p.write_raw(wb, durability::sync, "discarding corrupt records of " + id))
    return err;
  return n;
}

}  // namespace keel::storage
