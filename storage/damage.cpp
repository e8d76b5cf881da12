#include "storage/damage.hpp"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>

#include <rocksdb/db.h>
#include <rocksdb/iterator.h>
#include <rocksdb/options.h>
#include <rocksdb/write_batch.h>

#include "base/error.hpp"
#include "storage/crc32c.hpp"

namespace keel::storage {

namespace fs = std::filesystem;

namespace {

// RocksDB's WAL format (db/log_format.h): 32 KiB blocks of records, each with a 7-byte header
// (masked CRC-32C of type and payload, 2-byte length, 1-byte type; recyclable types add a
// 4-byte log number); a block's last < 7 bytes are zero padding. A logical record (a
// WriteBatch) is one FULL record or FIRST, MIDDLE..., LAST.
constexpr size_t block_size = 32768;
constexpr size_t header_size = 7;
constexpr size_t recyclable_header_size = 11;
enum : uint8_t { zero_type = 0, full = 1, first = 2, middle = 3, last = 4, set_compression = 9 };

constexpr const char* rebuilt_name = "rebuilt";
constexpr const char* scratch_name = "salvage";
constexpr const char* aside_prefix = "damaged-";
constexpr const char* whole_marker = "SALVAGED";    // the new store is whole
constexpr const char* aside_marker = "ASIDE_DONE";  // the damaged files are aside

uint32_t unmask(uint32_t masked) {
  uint32_t rot = masked - 0xa282ead8u;
  return (rot >> 17) | (rot << 15);
}

uint32_t fixed32(const std::string& b, size_t at) {
  return static_cast<uint32_t>(static_cast<unsigned char>(b[at])) |
         static_cast<uint32_t>(static_cast<unsigned char>(b[at + 1])) << 8 |
         static_cast<uint32_t>(static_cast<unsigned char>(b[at + 2])) << 16 |
         static_cast<uint32_t>(static_cast<unsigned char>(b[at + 3])) << 24;
}

/// The session a key belongs to: a turn key's id is before its NUL; meta keys belong to none.
std::string session_of(std::string_view key) {
  auto id = key.substr(0, key.find('\0'));
  if (id.empty() || id == "format_version" || id == "node_id" || id == "next_session_number")
    return {};
  return std::string(id);
}

bool varint32(std::string_view& in, uint32_t& v) {
  v = 0;
  for (int shift = 0; shift <= 28 && !in.empty(); shift += 7) {
    auto byte = static_cast<unsigned char>(in.front());
    in.remove_prefix(1);
    v |= static_cast<uint32_t>(byte & 0x7F) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

/// Names the sessions a WriteBatch's bytes write (RocksDB's db/write_batch.cc layout: an
/// 12-byte header, then records of a tag, a column family id for the CF tags, a length-prefixed
/// key and, for puts, merges and range deletions, a length-prefixed value). Lenient, unlike
/// `WriteBatch::Iterate`: a batch torn inside a value still names that value's key.
void name_sessions(std::string_view rep, std::set<std::string>& out) {
  if (rep.size() < 12) return;
  rep.remove_prefix(12);
  while (!rep.empty()) {
    auto tag = static_cast<unsigned char>(rep.front());
    rep.remove_prefix(1);
    const bool cf = tag == 0x4 || tag == 0x5 || tag == 0x6 || tag == 0x8 || tag == 0xE;
    const bool keyed = cf || tag <= 0x2 || tag == 0x7 || tag == 0xF;
    const bool valued =
        tag == 0x1 || tag == 0x2 || tag == 0x5 || tag == 0x6 || tag == 0xE || tag == 0xF;
    if (!keyed) return;  // a tag this store never writes: stop rather than guess
    uint32_t n = 0;
    if (cf && !varint32(rep, n)) return;
    if (!varint32(rep, n) || n > rep.size()) return;
    if (auto id = session_of(rep.substr(0, n)); !id.empty()) out.insert(std::move(id));
    rep.remove_prefix(n);
    if (valued && (!varint32(rep, n) || n > rep.size())) return;
    if (valued) rep.remove_prefix(n);
  }
}

/// One WAL file, checked record by record; `finding` is empty when it is whole.
struct wal_check {
  std::string finding;
  std::set<std::string> dropped;  // sessions written from the damaged record on
};

wal_check check_wal(const std::string& name, const std::string& b) {
  wal_check out;
  auto fail = [&](size_t at, const std::string& why) {
    if (out.finding.empty())
      out.finding = "WAL " + name + ": " + why + " at byte " + std::to_string(at) + " of " +
                    std::to_string(b.size());
  };
  std::string record;  // the logical record being assembled
  size_t record_at = 0;
  bool fragmented = false;
  size_t pos = 0;
  while (pos < b.size()) {
    size_t left_in_block = block_size - pos % block_size;
    if (left_in_block < header_size) {  // the block's zero trailer
      pos += left_in_block;
      continue;
    }
    size_t left = b.size() - pos;
    // Read only where a record is missing: scanning to the end at every record is quadratic.
    auto zeros = [&] {
      return std::all_of(b.begin() + static_cast<long>(pos), b.end(), [](char c) { return c == 0; });
    };
    if (left < header_size) {
      if (!zeros())
        fail(pos,
             "incomplete record header (the file ends " + std::to_string(left) + " bytes into it)");
      break;
    }
    auto type = static_cast<uint8_t>(b[pos + 6]);
    size_t length = static_cast<unsigned char>(b[pos + 4]) |
                    static_cast<size_t>(static_cast<unsigned char>(b[pos + 5])) << 8;
    if (type == zero_type && length == 0) {
      if (zeros()) break;    // preallocated space, never written
      pos += left_in_block;  // RocksDB skips the rest of such a block
      continue;
    }
    size_t head = type >= 5 && type <= 8 ? recyclable_header_size : header_size;
    bool whole = head + length <= left;
    bool fits = head + length <= left_in_block;
    bool crc_ok =
        whole && fits &&
        unmask(fixed32(b, pos)) == crc32c(std::string_view(b).substr(pos + 6, head - 6 + length));
    if (!whole || !fits || !crc_ok) {
      fail(pos, !whole ? "incomplete record (header says " + std::to_string(length) +
                             " bytes, the file ends " +
                             std::to_string(left - std::min(left, head)) + " bytes into it)"
                : !fits ? "record of " + std::to_string(length) + " bytes crosses its block"
                        : "checksum mismatch in the record");
      // Name what can be named from here on: this record's bytes, then every later one.
      name_sessions((fragmented ? record : std::string()) +
                        b.substr(pos + head, std::min(length, left - std::min(left, head))),
                    out.dropped);
      fragmented = false;
      record.clear();
      pos += whole && fits ? head + length : left_in_block;
      continue;
    }
    auto payload = std::string_view(b).substr(pos + head, length);
    auto bad_fragment = [&](const char* why) {
      fail(pos, why);
      name_sessions(record, out.dropped);  // the unfinished record, as far as it goes
      name_sessions(payload, out.dropped);
      record.clear();
      fragmented = false;
    };
    const uint8_t kind = type >= 5 && type <= 8 ? static_cast<uint8_t>(type - 4) : type;
    switch (kind) {
      case full:
        if (fragmented)
          bad_fragment("a record starts inside an unfinished one");
        else if (!out.finding.empty())
          name_sessions(payload, out.dropped);
        break;
      case first:
        if (fragmented) bad_fragment("a record starts inside an unfinished one");
        record.assign(payload);
        record_at = pos;
        fragmented = true;
        break;
      case middle:
      case last:
        if (!fragmented) {
          bad_fragment("a record continues one that never started");
          break;
        }
        record.append(payload);
        if (kind == last) {
          if (!out.finding.empty()) name_sessions(record, out.dropped);
          record.clear();
          fragmented = false;
        }
        break;
      case set_compression:
        break;
      default:
        bad_fragment(("record of unknown type " + std::to_string(type)).c_str());
    }
    pos += head + length;
  }
  if (fragmented) {
    fail(record_at, "incomplete record (the file ends inside it)");
    name_sessions(record, out.dropped);
  }
  return out;
}

std::string utc_stamp() {
  auto t = std::chrono::system_clock::to_time_t(std::chrono::system_clock::now());
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y%m%dT%H%M%SZ", &tm);
  return buf;
}

bool special(const std::string& name) {
  return name.rfind(aside_prefix, 0) == 0 || name == rebuilt_name || name == scratch_name;
}

caf::error fs_error(const std::string& what, const std::error_code& ec) {
  return make_error(errc::failed, what + ": " + ec.message());
}

/// fsync of a file or directory, so that a rename or a marker survives a crash.
void sync_path(const fs::path& p) {
  int fd = ::open(p.c_str(), O_RDONLY);
  if (fd < 0) return;
  (void)::fsync(fd);
  ::close(fd);
}

/// Opens the store copy in `dir` for reading: point-in-time WAL recovery, and RocksDB's repair
/// when it does not open. The handles cover every column family.
rocksdb::Status open_copy(const std::string& dir, rocksdb::DB** db,
                          std::vector<rocksdb::ColumnFamilyHandle*>& handles,
                          std::vector<std::string>& findings) {
  rocksdb::Options o;
  o.paranoid_checks = false;  // read what can be read; every record is checked by its envelope
  o.wal_recovery_mode = rocksdb::WALRecoveryMode::kPointInTimeRecovery;
  auto attempt = [&]() {
    std::vector<std::string> names;
    auto s = rocksdb::DB::ListColumnFamilies(o, dir, &names);
    if (!s.ok()) return s;
    std::vector<rocksdb::ColumnFamilyDescriptor> descs;
    for (auto& n : names) descs.emplace_back(n, rocksdb::ColumnFamilyOptions{});
    return rocksdb::DB::Open(o, dir, descs, &handles, db);
  };
  auto s = attempt();
  if (s.ok()) return s;
  findings.push_back("RocksDB does not open the damaged store (" + s.ToString() +
                     "); running its repair on a copy");
  auto r = rocksdb::RepairDB(dir, o);
  if (!r.ok()) return r;
  return attempt();
}

/// A stretch of keys that could not be read: after `from` and before `to` ("" at either end).
struct hole {
  std::string cf, from, to, why;
};

std::string printable(std::string_view key) {
  std::string out;
  for (char c : key) {
    if (c == '\0') return out + "/...";
    out += (c >= 0x20 && c < 0x7f) ? c : '?';
  }
  return out;
}

/// Reads every record of `cf` it can: forwards, and past an unreadable stretch backwards.
std::map<std::string, std::string> read_cf(rocksdb::DB* db, rocksdb::ColumnFamilyHandle* cf,
                                           std::vector<hole>& holes) {
  std::map<std::string, std::string> out;
  rocksdb::ReadOptions ro;
  ro.verify_checksums = true;
  ro.fill_cache = false;
  std::unique_ptr<rocksdb::Iterator> it(db->NewIterator(ro, cf));
  std::string after;
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    after = it->key().ToString();
    out[after] = it->value().ToString();
  }
  if (it->status().ok()) return out;
  hole h{cf->GetName(), after, "", it->status().ToString()};
  it.reset(db->NewIterator(ro, cf));
  for (it->SeekToLast(); it->Valid() && (after.empty() || it->key().ToString() > after);
       it->Prev()) {
    h.to = it->key().ToString();
    out[h.to] = it->value().ToString();
  }
  holes.push_back(std::move(h));
  return out;
}

/// Writes `data` (CF name -> key -> value) as a new store in `dir`, synced.
caf::error write_store(const std::string& dir,
                       const std::map<std::string, std::map<std::string, std::string>>& data) {
  rocksdb::DBOptions o;
  o.create_if_missing = true;
  o.create_missing_column_families = true;
  std::vector<rocksdb::ColumnFamilyDescriptor> descs{
      {rocksdb::kDefaultColumnFamilyName, rocksdb::ColumnFamilyOptions{}}};
  for (auto& [name, kv] : data)
    if (name != rocksdb::kDefaultColumnFamilyName)
      descs.emplace_back(name, rocksdb::ColumnFamilyOptions{});
  std::vector<rocksdb::ColumnFamilyHandle*> handles;
  rocksdb::DB* db = nullptr;
  auto s = rocksdb::DB::Open(o, dir, descs, &handles, &db);
  if (!s.ok())
    return make_error(errc::failed, dir + ": cannot create the rebuilt store: " + s.ToString());
  for (size_t i = 0; i < descs.size() && s.ok(); ++i) {
    auto d = data.find(descs[i].name);
    if (d == data.end()) continue;
    rocksdb::WriteBatch wb;
    for (auto& [k, v] : d->second) wb.Put(handles[i], k, v);
    rocksdb::WriteOptions wo;
    wo.sync = true;
    s = db->Write(wo, &wb);
  }
  if (s.ok()) s = db->FlushWAL(true);
  for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
  db->Close();
  delete db;
  if (!s.ok())
    return make_error(errc::failed, dir + ": writing the rebuilt store: " + s.ToString());
  return {};
}

/// Moves every store file of `dir` (all but the salvage's own directories) into `aside`.
caf::error move_aside(const fs::path& dir, const fs::path& aside) {
  std::error_code ec;
  fs::create_directories(aside, ec);
  if (ec) return fs_error(aside.string(), ec);
  for (auto& e : fs::directory_iterator(dir, ec)) {
    auto name = e.path().filename().string();
    if (special(name)) continue;
    fs::rename(e.path(), aside / name, ec);
    if (ec) return fs_error("moving " + e.path().string() + " aside", ec);
  }
  if (ec) return fs_error(dir.string(), ec);
  sync_path(aside);
  sync_path(dir);
  return {};
}

}  // namespace

damage_report inspect_wal(const std::string& dir) {
  damage_report out;
  std::vector<fs::path> wals;
  std::error_code ec;
  for (auto& e : fs::directory_iterator(dir, ec))
    if (e.path().extension() == ".log" && e.is_regular_file()) wals.push_back(e.path());
  std::sort(wals.begin(), wals.end());
  for (auto& p : wals) {
    std::ifstream in(p, std::ios::binary);
    std::string bytes(fs::file_size(p, ec), '\0');
    in.read(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    bytes.resize(static_cast<size_t>(in.gcount()));
    auto c = check_wal(p.filename().string(), bytes);
    if (c.finding.empty()) continue;
    out.findings.push_back(dir + ": " + c.finding);
    out.sessions.insert(c.dropped.begin(), c.dropped.end());
  }
  return out;
}

namespace {

/// Completes the salvage of `root` whose new store is whole (`rebuilt/SALVAGED` names the
/// aside directory): the damaged files aside (unless done), the new store's files in. Returns
/// the aside directory, or "" when there was nothing to complete.
caf::expected<std::string> complete(const fs::path& root) {
  auto rebuilt = root / rebuilt_name;
  std::error_code ec;
  if (!fs::exists(rebuilt, ec)) return std::string();
  if (!fs::exists(rebuilt / whole_marker, ec)) {
    fs::remove_all(rebuilt, ec);  // not whole: the salvage starts again
    return std::string();
  }
  std::string name;
  std::getline(std::ifstream(rebuilt / whole_marker), name);
  if (name.rfind(aside_prefix, 0) != 0) name = aside_prefix + utc_stamp();
  auto aside = root / name;
  if (!fs::exists(rebuilt / aside_marker, ec)) {
    if (auto err = move_aside(root, aside)) return err;
    std::ofstream(rebuilt / aside_marker) << "aside\n";
    sync_path(rebuilt / aside_marker);
  }
  for (auto& e : fs::directory_iterator(rebuilt, ec)) {
    auto file = e.path().filename().string();
    if (file == whole_marker || file == aside_marker) continue;
    fs::rename(e.path(), root / file, ec);
    if (ec) return fs_error("moving " + e.path().string() + " into the store", ec);
  }
  sync_path(root);
  fs::remove_all(rebuilt, ec);
  fs::remove_all(root / scratch_name, ec);
  return aside.string();
}

}  // namespace

caf::error finish_salvage(const std::string& dir, damage_report& report) {
  auto aside = complete(dir);
  if (!aside) return aside.error();
  if (aside->empty()) return {};
  report.aside = *aside;
  report.findings.push_back(dir + ": completed a salvage that a crash interrupted (its " +
                            "findings were logged before the crash, or lost with it); the " +
                            "damaged files are in " + *aside);
  return {};
}

caf::error salvage(const std::string& dir, damage_report& report) {
  fs::path root(dir), scratch = root / scratch_name, rebuilt = root / rebuilt_name;
  std::error_code ec;
  fs::remove_all(scratch, ec);
  fs::remove_all(rebuilt, ec);
  fs::create_directories(scratch, ec);
  if (ec) return fs_error(scratch.string(), ec);
  // A scratch copy to open (opening writes): SST files are immutable, so links will do.
  for (auto& e : fs::directory_iterator(root, ec)) {
    auto name = e.path().filename().string();
    if (special(name) || name == "LOCK" || !e.is_regular_file()) continue;
    if (e.path().extension() == ".sst") {
      fs::create_hard_link(e.path(), scratch / name, ec);
      if (!ec) continue;
    }
    fs::copy_file(e.path(), scratch / name, ec);
    if (ec) return fs_error("copying " + e.path().string(), ec);
  }

  std::map<std::string, std::map<std::string, std::string>> data;
  std::vector<hole> holes;
  {
    rocksdb::DB* db = nullptr;
    std::vector<rocksdb::ColumnFamilyHandle*> handles;
    auto s = open_copy(scratch.string(), &db, handles, report.findings);
    if (!s.ok()) {
      report.findings.push_back(dir + ": nothing is readable in the damaged store (" +
                                s.ToString() + "); the node starts with an empty one");
    } else {
      for (auto* h : handles) data[h->GetName()] = read_cf(db, h, holes);
      for (auto* h : handles) db->DestroyColumnFamilyHandle(h);
      db->Close();
      delete db;
    }
  }
  // The sessions of an unreadable stretch are the ones whose keys sort into it, in any CF
  // (every CF is keyed by session id first).
  for (auto& h : holes) {
    auto lo = session_of(h.from), hi = session_of(h.to);
    report.findings.push_back(dir + ": column family " + h.cf + ": keys " +
                              (h.from.empty() ? "from the first" : "after " + printable(h.from)) +
                              (h.to.empty() ? " on" : " and before " + printable(h.to)) +
                              " are unreadable: " + h.why);
    for (auto& [cf, kv] : data)
      for (auto& [k, v] : kv) {
        auto id = session_of(k);
        if (!id.empty() && (h.from.empty() || id >= lo) && (h.to.empty() || id <= hi))
          report.sessions.insert(id);
      }
  }
  for (auto& [cf, kv] : data) report.records_kept += kv.size();

  if (auto err = write_store(rebuilt.string(), data)) return err;
  auto aside = aside_prefix + utc_stamp();
  for (int n = 2; fs::exists(root / aside, ec); ++n)
    aside = aside_prefix + utc_stamp() + "-" + std::to_string(n);
  std::ofstream(rebuilt / whole_marker) << aside << "\n";
  sync_path(rebuilt / whole_marker);
  sync_path(rebuilt);
  auto done = complete(root);
  if (!done) return done.error();
  report.aside = *done;
  return {};
}

}  // namespace keel::storage
