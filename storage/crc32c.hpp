#pragma once

#include <cstdint>
#include <string_view>

namespace keel::storage {

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78, initial value and final xor 0xFFFFFFFF),
/// the checksum of iSCSI, ext4 and RocksDB's own blocks. `crc32c("123456789") == 0xE3069283`.
/// `crc32c_extend(crc32c(a), b) == crc32c(a + b)`. Table-driven, 8 bytes per step; thread-safe.
uint32_t crc32c_extend(uint32_t crc, std::string_view bytes);

inline uint32_t crc32c(std::string_view bytes) {
  return crc32c_extend(0, bytes);
}

}  // namespace keel::storage
