#include "storage/session_store.hpp"

#include <algorithm>
#include <filesystem>
#include <mutex>
#include <optional>
#include <set>
#include <utility>

#include <rocksdb/db.h>
#include <rocksdb/env.h>
#include <rocksdb/iterator.h>
#include <rocksdb/options.h>
#include <rocksdb/snapshot.h>
#include <rocksdb/write_batch.h>

#include "storage/disk_fault.hpp"
#include "storage/envelope.hpp"

namespace keel::storage {

namespace {

constexpr const char* sessions_cf_name = "sessions";
constexpr const char* turns_cf_name = "turns";
constexpr const char* meta_cf_name = "meta";

constexpr std::string_view format_version_key = "format_version";
constexpr std::string_view node_id_key = "node_id";
constexpr std::string_view next_session_key = "next_session_number";

constexpr size_t max_id_size = 1024;


/// A rocksdb::Status as a classified keel error naming `what` (path, column family, key).
caf::error status_error(const rocksdb::Status& s, const std::string& what) {
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
    return make_error(errc::overloaded, what + ": disk full (no space left on device); refused, "
                                               "writes resume once space is freed: " + text);
  errc code = errc::failed;
  if (s.IsCorruption())
    code = errc::corrupt_record;
  else if (s.IsNotFound() || s.IsPathNotFound())
    code = errc::not_found;
  else if (s.IsBusy() || s.IsTimedOut() || s.IsTryAgain())
    code = errc::overloaded;
  return make_error(code, what + ": " + text);
}

caf::error check_id(const std::string& id) {
  if (id.empty()) return make_error(errc::bad_request, "session id is empty");
  if (id.size() > max_id_size)
    return make_error(errc::bad_request, "session id of " + std::to_string(id.size()) +
                                             " bytes, at most " + std::to_string(max_id_size));
  if (id.find('\0') != std::string::npos)
    return make_error(errc::bad_request, "session id contains a NUL byte");
  return {};
}

// Turn-log keys: session id, a NUL byte, the turn as 8 bytes big endian. Ids contain no NUL, so
// one session's turns are exactly the keys in [id + "\0", id + "\1"), in turn order.
std::string turn_key(const std::string& id, uint64_t turn) {
  std::string k = id;
  k.push_back('\0');
  for (int i = 7; i >= 0; --i) k.push_back(static_cast<char>((turn >> (8 * i)) & 0xFF));
  return k;
}

std::string turns_begin(const std::string& id) {
  return id + std::string(1, '\0');
}

std::string turns_end(const std::string& id) {
  return id + std::string(1, '\1');
}

std::optional<std::pair<std::string, uint64_t>> parse_turn_key(std::string_view k) {
  if (k.size() < 10 || k[k.size() - 9] != '\0') return std::nullopt;
  std::string id(k.substr(0, k.size() - 9));
  if (id.find('\0') != std::string::npos) return std::nullopt;
  uint64_t turn = 0;
  for (size_t i = k.size() - 8; i < k.size(); ++i)
    turn = (turn << 8) | static_cast<unsigned char>(k[i]);
  return std::make_pair(std::move(id), turn);
}

std::string printable_turn_key(std::string_view k) {
  if (auto p = parse_turn_key(k)) return p->first + "/" + std::to_string(p->second);
  std::string out;
  for (char c : k) out += (c >= 0x20 && c < 0x7f) ? std::string(1, c) : "\\x??";
  return out;
}

std::string encode_tokens(const std::vector<int32_t>& tokens) {
  std::string out;
  out.reserve(tokens.size() * 4);
  for (int32_t t : tokens) {
    auto u = static_cast<uint32_t>(t);
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((u >> (8 * i)) & 0xFF));
  }
  return out;
}

caf::expected<std::vector<int32_t>> decode_tokens(std::string_view bytes) {
  if (bytes.size() % 4 != 0)
    return make_error(errc::corrupt_record, "turn log of " + std::to_string(bytes.size()) +
                                                " bytes is not a whole number of tokens");
  std::vector<int32_t> out(bytes.size() / 4);
  for (size_t i = 0; i < out.size(); ++i) {
    uint32_t u = 0;
    for (int b = 0; b < 4; ++b)
      u |= uint32_t(static_cast<unsigned char>(bytes[4 * i + b])) << (8 * b);
    out[i] = static_cast<int32_t>(u);
  }
  return out;
}

std::string encode_u64(uint64_t v) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  return out;
}

caf::error stale(const std::string& what, uint64_t epoch, uint64_t stored) {
  return make_error(errc::stale_epoch, what + ": write with epoch " + std::to_string(epoch) +
                                           ", stored epoch " + std::to_string(stored));
}

struct turn_log {
  uint64_t epoch = 0;
  std::vector<int32_t> tokens;
};

/// Whether an `open` failure means damaged files (a salvage may help), not a held or missing
/// store.
bool damaged(const rocksdb::Status& s) {
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

}  // namespace

// -- write_batch ----------------------------------------------------------------------------------

write_batch& write_batch::put_session(std::string id, uint64_t epoch, std::string payload) {
  op o;
  o.kind = op_kind::put_session;
  o.id = std::move(id);
  o.epoch = epoch;
  o.payload = std::move(payload);
  ops_.push_back(std::move(o));
  return *this;
}

write_batch& write_batch::append_turn_tokens(std::string id, uint64_t epoch, uint64_t turn,
                                             uint64_t from_index, std::vector<int32_t> tokens) {
  op o;
  o.kind = op_kind::append_turn;
  o.id = std::move(id);
  o.epoch = epoch;
  o.turn = turn;
  o.from_index = from_index;
  o.tokens = std::move(tokens);
  ops_.push_back(std::move(o));
  return *this;
}

write_batch& write_batch::erase_session(std::string id, uint64_t epoch) {
  op o;
  o.kind = op_kind::erase_session;
  o.id = std::move(id);
  o.epoch = epoch;
  ops_.push_back(std::move(o));
  return *this;
}

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

  /// Opens the directory with every column family it holds (known to this build or not).
  rocksdb::Status open_db(const rocksdb::DBOptions& dbo, bool exists) {
    std::vector<std::string> names;
    if (exists) {
      auto s = rocksdb::DB::ListColumnFamilies(dbo, dir, &names);
      if (!s.ok()) return s;
    }
    for (const char* n : {rocksdb::kDefaultColumnFamilyName.c_str(), sessions_cf_name,
                          turns_cf_name, meta_cf_name})
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

  /// True when neither `sessions` nor `turns` holds a key.
  caf::expected<bool> data_cfs_empty() const {
    for (auto* cf : {sessions, turns}) {
      std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(rocksdb::ReadOptions{}, cf));
      it->SeekToFirst();
      if (!it->status().ok()) return status_error(it->status(), dir + ": " + cf->GetName());
      if (it->Valid()) return false;
    }
    return true;
  }
};

// -- session_store --------------------------------------------------------------------------------

session_store::session_store(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

session_store::~session_store() = default;

const std::string& session_store::dir() const {
  return impl_->dir;
}

const damage_report& session_store::damage() const {
  return impl_->damage;
}

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
    if (auto err = finish_salvage(dir)) return err;
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
    p->damage = inspect_wal(dir);
    if (p->damage.damaged())
      if (auto err = salvage(dir, p->damage)) return err;
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

caf::error session_store::put_session(const std::string& id, uint64_t epoch,
                                      std::string_view payload, durability d) {
  write_batch b;
  b.put_session(id, epoch, std::string(payload));
  return write(b, d);
}

caf::expected<session_entry> session_store::get_session(const std::string& id) const {
  if (auto err = check_id(id)) return err;
  auto r = impl_->read_session(rocksdb::ReadOptions{}, id);
  if (!r) return r.error();
  if (!*r) return make_error(errc::not_found, "session " + id + ": no record in " + impl_->dir);
  return std::move(**r);
}

caf::expected<std::vector<std::string>> session_store::list_sessions() const {
  std::vector<std::string> ids;
  std::unique_ptr<rocksdb::Iterator> it(
      impl_->db->NewIterator(rocksdb::ReadOptions{}, impl_->sessions));
  for (it->SeekToFirst(); it->Valid(); it->Next()) ids.push_back(it->key().ToString());
  if (!it->status().ok())
    return status_error(it->status(), impl_->dir + ": listing " + sessions_cf_name);
  return ids;
}

caf::error session_store::erase_session(const std::string& id, uint64_t epoch, durability d) {
  write_batch b;
  b.erase_session(id, epoch);
  return write(b, d);
}

caf::error session_store::append_turn_tokens(const std::string& id, uint64_t epoch, uint64_t turn,
                                             uint64_t from_index,
                                             const std::vector<int32_t>& tokens, durability d) {
  write_batch b;
  b.append_turn_tokens(id, epoch, turn, from_index, tokens);
  return write(b, d);
}

caf::expected<std::vector<int32_t>> session_store::read_turn(const std::string& id,
                                                             uint64_t turn) const {
  if (auto err = check_id(id)) return err;
  auto t = impl_->read_turn(rocksdb::ReadOptions{}, id, turn);
  if (!t) return t.error();
  if (!*t)
    return make_error(errc::not_found, "session " + id + " turn " + std::to_string(turn) +
                                           ": no turn log in " + impl_->dir);
  return std::move((*t)->tokens);
}

caf::expected<std::map<uint64_t, std::vector<int32_t>>> session_store::read_turns(
    const std::string& id) const {
  if (auto err = check_id(id)) return err;
  std::map<uint64_t, std::vector<int32_t>> out;
  auto lo = turns_begin(id);
  auto hi = turns_end(id);
  rocksdb::Slice upper(hi);
  rocksdb::ReadOptions ro;
  ro.iterate_upper_bound = &upper;
  std::unique_ptr<rocksdb::Iterator> it(impl_->db->NewIterator(ro, impl_->turns));
  for (it->Seek(lo); it->Valid(); it->Next()) {
    auto key = it->key().ToStringView();
    auto parsed = parse_turn_key(key);
    auto t = impl_->decode_turn(key, it->value().ToStringView());
    if (!t) return t.error();
    if (parsed) out[parsed->second] = std::move(t->tokens);
  }
  if (!it->status().ok()) return status_error(it->status(), impl_->where(turns_cf_name, id + "/*"));
  return out;
}

caf::error session_store::write(const write_batch& b, durability d) {
  if (b.empty()) return {};
  for (auto& o : b.ops_)
    if (auto err = check_id(o.id)) return err;

  auto& p = *impl_;
  std::lock_guard<std::mutex> lock(p.write_mu);

  // The store as modified by the batch's earlier operations.
  struct pending_session {
    std::optional<uint64_t> epoch;  // nullopt: erased in this batch
    bool turns_cleared = false;     // erased in this batch: the stored turn logs are gone
  };
  std::map<std::string, pending_session> sessions;
  std::map<std::pair<std::string, uint64_t>, turn_log> turns;
  rocksdb::ReadOptions ro;

  auto session_epoch = [&](const std::string& id) -> caf::expected<std::optional<uint64_t>> {
    if (auto i = sessions.find(id); i != sessions.end()) return i->second.epoch;
    auto r = p.read_session(ro, id);
    if (!r) return r.error();
    if (!*r) return std::optional<uint64_t>{};
    return std::optional<uint64_t>{(*r)->epoch};
  };
  auto current_turn = [&](const std::string& id,
                          uint64_t turn) -> caf::expected<std::optional<turn_log>> {
    if (auto i = turns.find({id, turn}); i != turns.end())
      return std::optional<turn_log>{i->second};
    if (auto i = sessions.find(id); i != sessions.end() && i->second.turns_cleared)
      return std::optional<turn_log>{};
    return p.read_turn(ro, id, turn);
  };

  rocksdb::WriteBatch wb;
  auto apply = [&](const write_batch::op& o) -> caf::error {
    const auto& id = o.id;
    auto cur = session_epoch(id);
    if (!cur) return cur.error();
    switch (o.kind) {
      case write_batch::op_kind::put_session: {
        if (*cur && **cur > o.epoch) return stale("session " + id, o.epoch, **cur);
        wb.Put(p.sessions, id, encode_envelope(id, record_kind::session, o.epoch, o.payload));
        sessions[id].epoch = o.epoch;
        return {};
      }
      case write_batch::op_kind::erase_session: {
        if (*cur && **cur > o.epoch) return stale("session " + id, o.epoch, **cur);
        wb.Delete(p.sessions, id);
        wb.DeleteRange(p.turns, turns_begin(id), turns_end(id));
        sessions[id] = pending_session{std::nullopt, true};
        for (auto i = turns.begin(); i != turns.end();)
          i = i->first.first == id ? turns.erase(i) : std::next(i);
        return {};
      }
      case write_batch::op_kind::append_turn: {
        auto what = "session " + id + " turn " + std::to_string(o.turn);
        if (!*cur)
          return make_error(errc::not_found,
                            what + ": no session record; write the session before its turns");
        auto log = current_turn(id, o.turn);
        if (!log) return log.error();
        uint64_t fence = **cur;
        if (*log) fence = std::max(fence, (*log)->epoch);
        if (fence > o.epoch) return stale(what, o.epoch, fence);
        std::vector<int32_t> tokens = *log ? std::move((*log)->tokens) : std::vector<int32_t>{};
        uint64_t held = tokens.size();
        if (o.from_index > held)
          return make_error(errc::bad_request,
                            what + ": append at index " + std::to_string(o.from_index) +
                                " leaves a gap: the log holds " + std::to_string(held) + " tokens");
        for (uint64_t k = o.from_index; k < o.from_index + o.tokens.size(); ++k) {
          auto t = o.tokens[k - o.from_index];
          if (k < held) {
            if (tokens[k] != t)
              return make_error(errc::bad_request, what + ": token " + std::to_string(k) + " is " +
                                                       std::to_string(tokens[k]) +
                                                       " in the log, the append has " +
                                                       std::to_string(t));
          } else {
            tokens.push_back(t);
          }
        }
        // Rewritten even when nothing is new, so that a synced repeat of a buffered append
        // makes it durable.
        auto key = turn_key(id, o.turn);
        wb.Put(p.turns, key,
               encode_envelope(key, record_kind::turn_log, o.epoch, encode_tokens(tokens)));
        turns[{id, o.turn}] = turn_log{o.epoch, std::move(tokens)};
        return {};
      }
    }
    return make_error(errc::failed, "unknown batch operation");
  };

  for (size_t i = 0; i < b.ops_.size(); ++i) {
    if (auto err = apply(b.ops_[i])) {
      if (b.ops_.size() == 1) return err;
      return make_error(code_of(err), message_of(err) + " (operation " + std::to_string(i + 1) +
                                          " of " + std::to_string(b.ops_.size()) +
                                          " in a batch; nothing written)");
    }
  }
  if (p.opts.before_write) p.opts.before_write();
  return p.write_raw(wb, d, "write of " + std::to_string(b.ops_.size()) + " operation(s)");
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

caf::expected<std::string> session_store::node_id() const {
  auto v = impl_->read_meta(node_id_key);
  if (!v) return v.error();
  if (!*v) return make_error(errc::not_found, impl_->dir + ": no node id set");
  return std::move(**v);
}

caf::error session_store::set_node_id(const std::string& id) {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  return impl_->write_meta(node_id_key, id);
}

caf::expected<uint64_t> session_store::next_session_number() const {
  return impl_->read_counter();
}

caf::error session_store::set_next_session_number(uint64_t n) {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  return impl_->write_meta(next_session_key, encode_u64(n));
}

caf::expected<uint64_t> session_store::take_session_number() {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  auto n = impl_->read_counter();
  if (!n) return n;
  if (auto err = impl_->write_meta(next_session_key, encode_u64(*n + 1))) return err;
  return n;
}

}  // namespace keel::storage
