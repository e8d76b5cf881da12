#pragma once

// Detecting a damaged session store and rebuilding it from what is readable (docs/storage.md,
// "Damage"). Used by `session_store::open`; knows RocksDB's files, not the store's records.

#include <cstddef>
#include <set>
#include <string>
#include <vector>

#include <caf/error.hpp>

namespace keel::storage {

/// What `session_store::open` found damaged in its directory and what it did about it.
struct damage_report {
  /// One line per finding, naming the file and the place:
  /// "WAL 000008.log: checksum mismatch in the record at byte 4711 of 9012".
  std::vector<std::string> findings;
  /// Where the damaged files were moved, untouched: DIR/damaged-<UTC time>. Empty when the
  /// store was not rebuilt.
  std::string aside;
  /// Session ids (keys of the `sessions` and `ownership` CFs, replica keys included, and the
  /// session of each turn-log key) whose writes lie in the damaged or dropped part: their
  /// records may be missing or older than acknowledged. Other sessions may be affected too when
  /// a whole stretch of keys is unreadable; the findings say which stretch.
  std::set<std::string> sessions;
  /// Records copied from the damaged store into the rebuilt one.
  size_t records_kept = 0;

  bool damaged() const { return !findings.empty(); }
};

/// Reads every WAL file (`*.log`) of the store in `dir` record by record, checking each
/// record's CRC-32C, length, type and fragments as RocksDB writes them. At the first damaged
/// record of a file it adds a finding (file, byte offset, what is wrong) and names in
/// `sessions` every session written from that record on (the ones point-in-time recovery
/// drops), reading on past the damage as far as it can. Changes nothing on disk.
damage_report inspect_wal(const std::string& dir);

/// Rebuilds the store in `dir` from what is readable in it: copies the damaged files to a
/// scratch directory (SST files hard-linked), opens that copy with point-in-time WAL recovery
/// (RocksDB's repair when it does not open), reads every column family forwards and, past an
/// unreadable stretch, backwards, and writes what it read into a new store. Then moves the
/// damaged files to DIR/damaged-<UTC time> and the new store into `dir`. Adds to `report`
/// the aside directory, the records kept, each unreadable stretch and the sessions around it.
/// Interrupted (a crash), it completes at the next call of `finish_salvage`. Fails only when
/// the file system does (the error names the path).
caf::error salvage(const std::string& dir, damage_report& report);

/// Completes a salvage of `dir` that a crash interrupted after its new store was whole, and
/// says so in `report` (the sessions that salvage named are not known again); a no-op
/// otherwise (a new store that was not whole is removed, and the damage is found again).
caf::error finish_salvage(const std::string& dir, damage_report& report);

}  // namespace keel::storage
