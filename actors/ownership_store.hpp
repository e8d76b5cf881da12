#pragma once

// Where a keel-node keeps the ownership protocol's state of each session
// (actors/ownership_host.hpp `ownership_storage`).

#include <functional>
#include <map>
#include <mutex>
#include <string>

#include "actors/ownership_host.hpp"

namespace keel::storage {
class session_store;
}

namespace keel {

/// In the node's session store, column family `ownership` (docs/storage.md): one encoded
/// `stored_session` per session (actors/ownership_codec.hpp), synced when the protocol says so.
class store_ownership_storage final : public ownership_storage {
 public:
  /// `store` is not owned and must outlive this object. `log` hears every value `load` could
  /// not use (corrupt or undecodable: that session is then as if this node never had it, and
  /// the protocol restores it from the other members) and every failed write.
  store_ownership_storage(storage::session_store& store,
                          std::function<void(const std::string&)> log);
  bool put(const std::string& session, const stored_session& s, bool sync) override;
  std::map<std::string, stored_session> load() override;

 private:
  storage::session_store& store_;
  std::function<void(const std::string&)> log_;
};

/// In memory (a node without a data dir): lost with the process, like its sessions.
class memory_ownership_storage final : public ownership_storage {
 public:
  bool put(const std::string& session, const stored_session& s, bool sync) override;
  std::map<std::string, stored_session> load() override;

 private:
  std::mutex mu_;
  std::map<std::string, stored_session> stored_;
};

}  // namespace keel
