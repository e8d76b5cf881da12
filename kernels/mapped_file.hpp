#pragma once

#include <cstdint>
#include <string>

#include "base/error.hpp"

namespace keel {

/// A read-only memory mapping of a whole file. Weights are used in place from it, so a model
/// costs page cache, not heap, and a restarted worker maps it again in milliseconds.
/// Movable, not copyable; unmaps on destruction.
class mapped_file {
 public:
  /// `not_found` when the file does not exist, `bad_model` when it cannot be mapped.
  static caf::expected<mapped_file> open(const std::string& path);

  mapped_file() = default;
  mapped_file(mapped_file&& other) noexcept;
  mapped_file& operator=(mapped_file&& other) noexcept;
  mapped_file(const mapped_file&) = delete;
  mapped_file& operator=(const mapped_file&) = delete;
  ~mapped_file();

  const uint8_t* data() const { return data_; }
  uint64_t size() const { return size_; }

 private:
  void reset();
  const uint8_t* data_ = nullptr;
  uint64_t size_ = 0;
};

}  // namespace keel
