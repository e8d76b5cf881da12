#pragma once

// The node's durable session store: one RocksDB directory (see docs/storage.md).

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

#include "base/error.hpp"
#include "storage/damage.hpp"
#include "storage/disk_fault.hpp"

namespace keel::storage {

/// `sync`: the write's WAL record is fsynced before the call returns (acknowledged means durable;
/// about 0.1 ms on this machine, see docs/storage.md). `buffered`: written to the WAL in the OS
/// page cache; survives a process crash, not a power loss or kernel crash.
enum class durability : uint8_t { sync, buffered };

struct store_options {
  /// Create the directory and the store when they do not exist; otherwise `open` of a missing
  /// store fails with `not_found`.
  bool create_if_missing = true;

  /// Fault-injection seam for tests: called by every write after its checks (fencing, gaps)
  /// passed and before the RocksDB write, with the store's write mutex held. Empty in
  /// production.
  std::function<void()> before_write;

  /// The disk-full seam (disk_fault.hpp): while it is full, every file write of the store
  /// fails with ENOSPC. Null: the plain file system.
  std::shared_ptr<disk_fault> disk;
};

/// A session record as stored: the owner's epoch and the opaque payload (a checkpoint.capnp
/// message; wire/ converts it).
struct session_entry {
  uint64_t epoch = 0;
  std::string payload;
};

/// One intact session found by `scan`, with its intact turn logs.
struct recovered_session {
  std::string id;
  uint64_t epoch = 0;
  std::string payload;
  std::map<uint64_t, std::vector<int32_t>> turns;
};

/// A record `scan` could not use.
struct corrupt_entry {
  std::string cf;       // "sessions", "turns", "meta" or "ownership"
  std::string key;      // printable: "s-3", "s-3/2" (session/turn) or a meta key
  std::string session;  // the session it belongs to ("" for meta or an unparsable key)
  std::string reason;   // "checksum mismatch: stored 0x..., computed 0x..."
};

/// What a restarted node recovers: every intact session, and every record that is not, each
/// reported separately so that the rest can be repaired from a replica.
struct scan_result {
  std::vector<recovered_session> sessions;
  std::vector<corrupt_entry> corrupt;
};

/// What `scan_ownership` finds: every intact value of the `ownership` column family, by session,
/// and every value that fails its checks (cf "ownership", key and session: the session id).
struct ownership_scan {
  std::map<std::string, std::string> entries;  // session id -> the opaque value
  std::vector<corrupt_entry> corrupt;
};

/// Writes applied together by `session_store::write`: one RocksDB WriteBatch, one sync. Each
/// operation is checked (fencing, gaps) against the store as modified by the operations before
/// it in the same batch; if any is refused, nothing is written. Not thread-safe; a value.
class write_batch {
 public:
  /// See `session_store::put_session`.
  write_batch& put_session(std::string id, uint64_t epoch, std::string payload);

  /// See `session_store::append_turn_tokens`.
  write_batch& append_turn_tokens(std::string id, uint64_t epoch, uint64_t turn,
                                  uint64_t from_index, std::vector<int32_t> tokens);

  /// See `session_store::erase_session`.
  write_batch& erase_session(std::string id, uint64_t epoch);

  size_t size() const { return ops_.size(); }
  bool empty() const { return ops_.empty(); }

 private:
  friend class session_store;
  enum class op_kind : uint8_t { put_session, append_turn, erase_session };
  struct op {
    op_kind kind = op_kind::put_session;
    std::string id;
    uint64_t epoch = 0;
    std::string payload;  // put_session
    uint64_t turn = 0;    // append_turn
    uint64_t from_index = 0;
    std::vector<int32_t> tokens;
  };
  std::vector<op> ops_;
};

/// Sessions, their turn logs, the ownership protocol's state of each session and the node's
/// metadata in one RocksDB directory, with column families `sessions`, `turns`, `ownership`,
/// `meta` (and RocksDB's `default`, unused). Every value is wrapped in a checksummed, versioned
/// envelope (storage/envelope.hpp); a record that fails its checks is reported as
/// `corrupt_record` naming the column family and key, never returned.
///
/// Fencing: every session write carries the writer's ownership epoch and is refused with
/// `stale_epoch` when the stored record has a newer one. Check and write happen under one mutex
/// per store, so they are atomic with respect to the store's other writers (one store per
/// directory: RocksDB's LOCK file keeps other processes and other `open`s out).
///
/// Thread-safe: writers serialize on the mutex; readers do not take it.
/// Session ids are non-empty, at most 1024 bytes, and contain no NUL byte (`bad_request`).
class session_store {
 public:
  /// Opens (or creates) the store in `dir`. Opens every column family the directory holds,
  /// including ones this build does not know, creates the ones it knows that are missing (a
  /// store made by an older build gets an empty `ownership`), and refuses a store whose format
  /// version it does not read. A directory held by another process or another open store fails
  /// with `failed` "DIR: database is in use by another process (...)".
  ///
  /// A damaged store (a WAL record that fails its checks, a file RocksDB refuses, an SST block
  /// whose checksum fails) is not refused and not skipped silently: its files are moved to
  /// DIR/damaged-<UTC time>, the store is rebuilt from every record still readable, and
  /// `damage()` names the findings and the sessions whose records may be lost or older.
  static caf::expected<std::unique_ptr<session_store>> open(const std::string& dir,
                                                            store_options opts = {});

  /// Closes the database (column family handles first).
  ~session_store();

  session_store(const session_store&) = delete;
  session_store& operator=(const session_store&) = delete;

  const std::string& dir() const;

  /// What `open` found damaged and salvaged; `damaged()` false when the store was whole.
  const damage_report& damage() const;

  /// The store layout version this build writes and reads.
  static constexpr uint16_t format_version = 1;

  // -- sessions ---------------------------------------------------------------------------------

  /// Every write fails with `overloaded` ("DIR: ...: disk full (no space left on device); ...")
  /// while the disk is full, and the store stays readable; the first write after space returns
  /// resumes RocksDB (which stops writing after a failed write) and goes through.

  /// Stores the session record. `stale_epoch` ("session s-3: write with epoch 4, stored epoch 5")
  /// when the stored record's epoch is newer; an equal epoch overwrites. `corrupt_record` when
  /// the stored record cannot be read (its epoch is unknown; see `discard_corrupt`).
  caf::error put_session(const std::string& id, uint64_t epoch, std::string_view payload,
                         durability d = durability::sync);

  /// The stored record; `not_found` when there is none.
  caf::expected<session_entry> get_session(const std::string& id) const;

  /// The ids of all session records, in key order (records are not decoded).
  caf::expected<std::vector<std::string>> list_sessions() const;

  /// Removes the session record and all its turn logs, fenced like `put_session`. Erasing a
  /// missing session succeeds.
  caf::error erase_session(const std::string& id, uint64_t epoch, durability d = durability::sync);

  // -- turn logs --------------------------------------------------------------------------------

  /// Writes `tokens` as the turn's tokens from index `from_index` on. Fenced by the session
  /// record's epoch (and the turn log's own): `not_found` without a session record,
  /// `stale_epoch` when either is newer. Tokens already in the log must be equal (writing the
  /// same tokens again is a no-op in effect); a different token there or a `from_index` beyond
  /// the log's end (a gap) is `bad_request`.
  caf::error append_turn_tokens(const std::string& id, uint64_t epoch, uint64_t turn,
                                uint64_t from_index, const std::vector<int32_t>& tokens,
                                durability d = durability::sync);

  /// The turn's tokens; `not_found` when the turn has no log.
  caf::expected<std::vector<int32_t>> read_turn(const std::string& id, uint64_t turn) const;

  /// All turn logs of the session, by turn; `corrupt_record` when any of them is corrupt.
  caf::expected<std::map<uint64_t, std::vector<int32_t>>> read_turns(const std::string& id) const;

  // -- ownership protocol state ------------------------------------------------------------------
  // One opaque value per session: what the ownership protocol (actors/ownership.hpp) stores of
  // it, an encoded `stored_session` (actors/ownership_codec.hpp), always written whole. Not
  // fenced by the store (the protocol's ballots fence it) and independent of the session's
  // record and turn logs: `erase_session` leaves it, `erase_ownership` leaves them.

  /// Stores `blob` as `session`'s ownership state, replacing any value (a corrupt one too).
  /// Session ids as for `put_session` (`bad_request`); a full disk as for every write.
  caf::error put_ownership(const std::string& session, std::string_view blob,
                           durability d = durability::sync);

  /// Removes `session`'s ownership state; removing a missing one succeeds.
  caf::error erase_ownership(const std::string& session, durability d = durability::sync);

  /// Every intact ownership value, read from one snapshot, and every corrupt one (listed in
  /// `corrupt`, never returned as data). Fails as a whole only when RocksDB itself fails.
  caf::expected<ownership_scan> scan_ownership() const;

  // -- batches and recovery ---------------------------------------------------------------------

  /// Applies all of `b` in one atomic RocksDB write, or none of it (the error names the refused
  /// operation). An empty batch is a no-op.
  caf::error write(const write_batch& b, durability d = durability::sync);

  /// Every intact session with its intact turn logs, read from one snapshot; each corrupt
  /// record, and each turn log without a session record, is listed in `corrupt` instead. Fails as
  /// a whole only when RocksDB itself fails.
  caf::expected<scan_result> scan() const;

  /// Deletes the session's corrupt records (its session record and/or turn logs), leaving the
  /// intact ones, so that it can be rewritten from a replica. Returns how many were deleted.
  /// Always synced.
  caf::expected<size_t> discard_corrupt(const std::string& id);

  // -- node metadata (always synced) ------------------------------------------------------------

  /// The node's id; `not_found` when never set.
  caf::expected<std::string> node_id() const;
  caf::error set_node_id(const std::string& id);

  /// The number the next `take_session_number` returns (1 on a new store).
  caf::expected<uint64_t> next_session_number() const;
  caf::error set_next_session_number(uint64_t n);

  /// Returns the next session number and durably advances the counter past it.
  caf::expected<uint64_t> take_session_number();

 private:
  struct impl;
  explicit session_store(std::unique_ptr<impl> p);
  std::unique_ptr<impl> impl_;
};

}  // namespace keel::storage
