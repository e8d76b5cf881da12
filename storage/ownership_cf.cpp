// The session store's `ownership` column family (docs/storage.md): one opaque value per session,
// the ownership protocol's stored state, written whole and fenced by the protocol, not here.

#include <memory>
#include <mutex>

#include "storage/detail/store_impl.hpp"

namespace keel::storage {

caf::error session_store::put_ownership(const std::string& session, std::string_view blob,
                                        durability d) {
  if (auto err = check_id(session)) return err;
  auto& p = *impl_;
  rocksdb::WriteBatch wb;
  wb.Put(p.ownership, session, encode_envelope(session, record_kind::ownership, 0, blob));
  std::lock_guard<std::mutex> lock(p.write_mu);
  if (p.opts.before_write) p.opts.before_write();
  return p.write_raw(wb, d, "write of the ownership state of " + session);
}

caf::error session_store::erase_ownership(const std::string& session, durability d) {
  if (auto err = check_id(session)) return err;
  auto& p = *impl_;
  rocksdb::WriteBatch wb;
  wb.Delete(p.ownership, session);
  std::lock_guard<std::mutex> lock(p.write_mu);
  if (p.opts.before_write) p.opts.before_write();
  return p.write_raw(wb, d, "erase of the ownership state of " + session);
}

caf::expected<ownership_scan> session_store::scan_ownership() const {
  auto& p = *impl_;
  snapshot_guard snap{p.db, p.db->GetSnapshot()};
  rocksdb::ReadOptions ro;
  ro.snapshot = snap.snap;
  ownership_scan out;
  std::unique_ptr<rocksdb::Iterator> it(p.db->NewIterator(ro, p.ownership));
  for (it->SeekToFirst(); it->Valid(); it->Next()) {
    auto session = it->key().ToString();
    auto e = decode_envelope(session, record_kind::ownership, it->value().ToStringView());
    if (!e) {
      out.corrupt.push_back({ownership_cf_name, session, session, message_of(e.error())});
      continue;
    }
    out.entries.emplace(std::move(session), std::move(e->payload));
  }
  if (!it->status().ok()) return status_error(it->status(), p.dir + ": scanning ownership");
  return out;
}

}  // namespace keel::storage
