#pragma once

// The envelope around every value the session store writes (see docs/storage.md):
//
//   offset  size  field
//        0     2  format: 0x4B01 ('K' magic in the high byte, envelope version 1), little endian
//        2     1  kind: record_kind (session, turn log, meta, ownership)
//        3     1  flags: 0 (reserved; a non-zero value is corrupt)
//        4     4  payload length in bytes, little endian
//        8     8  epoch, little endian (0 for meta and ownership records)
//       16     4  CRC-32C, little endian, over: key length (4 bytes LE), key, bytes 0..15, payload
//       20     n  payload
//
// The checksum covers the key as well, so a value stored under the wrong key is corrupt too.

#include <cstdint>
#include <string>
#include <string_view>

#include <caf/expected.hpp>

#include "base/error.hpp"

namespace keel::storage {

inline constexpr uint16_t envelope_format = 0x4B01;
inline constexpr size_t envelope_header_size = 20;

enum class record_kind : uint8_t { session = 1, turn_log = 2, meta = 3, ownership = 4 };

const char* to_string(record_kind k);

/// A decoded envelope: the writer's epoch and the opaque payload.
struct envelope {
  record_kind kind = record_kind::session;
  uint64_t epoch = 0;
  std::string payload;
};

/// The stored bytes for `payload` under `key`.
std::string encode_envelope(std::string_view key, record_kind kind, uint64_t epoch,
                            std::string_view payload);

/// Checks and unwraps the stored bytes of `key`. Fails with `errc::corrupt_record` whose message
/// is the bare reason ("checksum mismatch: stored 0x..., computed 0x..."); the caller adds where
/// the record lives.
caf::expected<envelope> decode_envelope(std::string_view key, record_kind kind,
                                        std::string_view bytes);

}  // namespace keel::storage
