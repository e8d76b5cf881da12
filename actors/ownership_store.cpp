#include "actors/ownership_store.hpp"

#include "actors/ownership_codec.hpp"
#include "storage/session_store.hpp"

namespace keel {

store_ownership_storage::store_ownership_storage(storage::session_store& store,
                                                 std::function<void(const std::string&)> log)
    : store_(store), log_(std::move(log)) {}

bool store_ownership_storage::put(const std::string& session, const stored_session& s, bool sync) {
  auto err = store_.put_ownership(session, encode(s),
                                  sync ? storage::durability::sync : storage::durability::buffered);
  if (err && log_) log_("ownership: storing session " + session + " failed: " + message_of(err));
  return !err;
}

std::map<std::string, stored_session> store_ownership_storage::load() {
  std::map<std::string, stored_session> out;
  auto scan = store_.scan_ownership();
  if (!scan) {
    if (log_) log_("ownership: reading the store failed: " + message_of(scan.error()));
    return out;
  }
  for (auto& c : scan->corrupt)
    if (log_)
      log_("ownership: skipped corrupt " + c.cf + " value " + c.key + " in " + store_.dir() +
           ": " + c.reason + " (the other members hold the session)");
  for (auto& [session, blob] : scan->entries) {
    auto s = decode_stored_session(blob);
    if (!s) {
      if (log_)
        log_("ownership: skipped session " + session + " in " + store_.dir() + ": " +
             message_of(s.error()) + " (the other members hold the session)");
      continue;
    }
    out.emplace(session, std::move(*s));
  }
  return out;
}

bool memory_ownership_storage::put(const std::string& session, const stored_session& s, bool) {
  std::lock_guard<std::mutex> guard(mu_);
  stored_[session] = s;
  return true;
}

std::map<std::string, stored_session> memory_ownership_storage::load() {
  std::lock_guard<std::mutex> guard(mu_);
  return stored_;
}

}  // namespace keel
