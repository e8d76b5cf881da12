#pragma once

// API keys and tenants of the client port (keel-node --keys FILE; docs/operations.md,
// "Security model").

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

#include "base/error.hpp"

namespace keel {

/// One line of a keys file: a key, the tenant it logs in as, and that tenant's limits.
struct api_key {
  std::string key;
  std::string tenant;
  std::string priority_class;  // batch, standard or interactive
  int32_t max_priority = 0;    // of the class: a session's priority is capped to it
  uint64_t requests_per_minute = 0;
  uint64_t tokens_per_minute = 0;  // prompt and generated tokens
  uint64_t max_sessions = 0;       // sessions the tenant holds on one node
};

/// The highest priority of a class ("batch" 0, "standard" 10, "interactive" 20); `bad_request`
/// naming the class when it is unknown.
caf::expected<int32_t> class_priority(std::string_view name);

/// The keys of a node, read once at start.
///
/// File format: one key a line, `KEY tenant=NAME class=CLASS rpm=N tpm=N sessions=N` (every
/// field required, in any order), `#` starts a comment, blank lines are skipped. Keys are at
/// least 16 characters of [A-Za-z0-9._~+/=-]; a key appears once.
class key_table {
 public:
  /// The table in `text`; `bad_request` naming `file`:line and the value on the first error.
  static caf::expected<key_table> parse(std::string_view text, const std::string& file);
  /// The table in `file`. Refused (`bad_request` naming the file and its mode) when the file
  /// is readable or writable by its group or others: keys are secrets.
  static caf::expected<key_table> load(const std::string& file);

  /// The key's entry (null for a wrong key). Compares with every key in constant time in
  /// their content, so that the time taken tells nothing about any key.
  const api_key* find(std::string_view key) const;
  const std::vector<api_key>& keys() const { return keys_; }

 private:
  std::vector<api_key> keys_;
};

/// Per tenant, the requests and tokens of the last minute on one node, as token buckets that
/// refill their limit over a minute. Not thread-safe: the gateway uses it on its thread only.
class tenant_usage {
 public:
  using clock = std::chrono::steady_clock;

  /// Counts one request of `k`'s tenant; `overloaded` naming the tenant, the limit and its
  /// value (with a retry-after) when it has none left this minute.
  caf::error request(const api_key& k, clock::time_point now = clock::now());
  /// `overloaded` when `k`'s tenant has used its tokens of the last minute (a turn may go
  /// past the limit; the next one waits until the bucket refilled).
  caf::error may_generate(const api_key& k, clock::time_point now = clock::now());
  /// Charges `n` tokens (prompt or generated) to `tenant`.
  void charge(const api_key& k, uint64_t n, clock::time_point now = clock::now());

  /// The retry-after of the last refusal, in milliseconds.
  uint32_t retry_after_ms() const { return retry_after_ms_; }

 private:
  struct bucket {
    double level = 0;
    clock::time_point at{};
    bool started = false;
  };
  void refill(bucket& b, uint64_t per_minute, clock::time_point now);
  caf::error refuse(const api_key& k, const char* limit, uint64_t value, const bucket& b,
                    uint64_t per_minute);

  std::map<std::string, bucket> requests_, tokens_;  // by tenant
  uint32_t retry_after_ms_ = 0;
};

}  // namespace keel
