#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "kernels/dtype.hpp"
#include "base/error.hpp"

namespace keel {

/// Metadata value types, numbered as in the GGUF specification.
enum class gguf_type : uint32_t {
  u8 = 0,
  i8 = 1,
  u16 = 2,
  i16 = 3,
  u32 = 4,
  i32 = 5,
  f32 = 6,
  boolean = 7,
  string = 8,
  array = 9,
  u64 = 10,
  i64 = 11,
  f64 = 12,
};

std::string_view gguf_type_name(gguf_type t);

/// Whether `t` is one of the eight integer types (not bool).
bool gguf_is_integer(gguf_type t);

/// One metadata entry. Scalars use the field of their kind (`i` for every integer type and for
/// booleans, `f` for floats, `s` for strings); arrays fill `ints`, `floats` or `strings` by
/// element kind and set `elem`.
struct gguf_kv {
  std::string key;
  gguf_type type = gguf_type::u32;
  gguf_type elem = gguf_type::u32;
  int64_t i = 0;
  uint64_t u = 0;  // integer scalars also as unsigned, so u64 values above 2^63 survive
  double f = 0;
  std::string s;
  std::vector<int64_t> ints;
  std::vector<double> floats;
  std::vector<std::string> strings;
};

/// A tensor's description and its bytes inside the mapped file.
struct gguf_tensor {
  std::string name;
  std::vector<uint64_t> dims;  // GGUF order: dims[0] is the contiguous (row) length
  dtype type = dtype::f32;
  uint64_t offset = 0;  // from the start of the data section
  uint64_t n_elements = 0;
  uint64_t n_bytes = 0;
  const uint8_t* data = nullptr;  // points into the mapping owned by the gguf_file
};

/// A parsed, memory-mapped GGUF file (versions 2 and 3). Tensor data is not copied: `data`
/// pointers stay valid for the life of this object. Movable, not copyable. Thread-safe to read.
class gguf_file {
 public:
  /// Maps and validates `path`. Errors are `bad_model` (or `not_found`) and name the file, the
  /// key or tensor, and the offending value.
  static caf::expected<gguf_file> open(const std::string& path);

  /// Parses a GGUF image held in memory; `name` is used in error messages. The bytes are copied.
  static caf::expected<gguf_file> parse(std::string name, const void* bytes, size_t size);

  gguf_file(gguf_file&&) noexcept;
  gguf_file& operator=(gguf_file&&) noexcept;
  ~gguf_file();

  const std::string& name() const { return name_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_size() const;

  const std::vector<gguf_kv>& metadata() const { return kvs_; }
  const std::vector<gguf_tensor>& tensors() const { return tensors_; }

  const gguf_kv* find(std::string_view key) const;
  const gguf_tensor* tensor(std::string_view name) const;

  /// Typed access. Each fails with `bad_model` naming the file and key when the key is missing
  /// or holds another type.
  caf::expected<uint64_t> get_uint(std::string_view key) const;  // any non-negative integer
  caf::expected<double> get_float(std::string_view key) const;   // f32, f64 or an integer
  caf::expected<std::string> get_string(std::string_view key) const;
  caf::expected<bool> get_bool(std::string_view key) const;
  caf::expected<const gguf_kv*> get_array(std::string_view key, gguf_type elem) const;

  uint64_t get_uint_or(std::string_view key, uint64_t fallback) const;
  double get_float_or(std::string_view key, double fallback) const;
  bool get_bool_or(std::string_view key, bool fallback) const;

  /// A tensor that must exist with exactly these dims (GGUF order); `bad_model` otherwise.
  caf::expected<const gguf_tensor*> require_tensor(std::string_view name,
                                                   const std::vector<uint64_t>& dims) const;

 private:
  struct mapping;
  gguf_file() = default;
  caf::error parse_all();

  std::string name_;
  std::unique_ptr<mapping> map_;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  std::vector<gguf_kv> kvs_;
  std::vector<gguf_tensor> tensors_;
};

/// Builds a GGUF v3 file in memory and writes it. Used by `keel-model synth` and by tests that
/// need malformed or small models.
class gguf_writer {
 public:
  void add_uint32(std::string key, uint32_t v);
  void add_uint64(std::string key, uint64_t v);
  void add_int32(std::string key, int32_t v);
  void add_float32(std::string key, float v);
  void add_bool(std::string key, bool v);
  void add_string(std::string key, std::string v);
  void add_strings(std::string key, std::vector<std::string> v);
  void add_float32s(std::string key, std::vector<float> v);
  void add_int32s(std::string key, std::vector<int32_t> v);

  /// Adds a tensor; `dims` in GGUF order; `bytes` must hold exactly its encoded data.
  void add_tensor(std::string name, std::vector<uint64_t> dims, dtype type,
                  std::vector<uint8_t> bytes);

  /// The whole file image.
  std::vector<uint8_t> serialize() const;

  /// Writes the image to `path` (via a temporary file and rename). `failed` on an I/O error.
  caf::error write(const std::string& path) const;

 private:
  struct entry {
    std::string key;
    gguf_type type;
    gguf_type elem;
    std::vector<uint8_t> payload;  // encoded value (after the type tag)
  };
  struct tensor_entry {
    std::string name;
    std::vector<uint64_t> dims;
    dtype type;
    std::vector<uint8_t> bytes;
  };
  std::vector<uint8_t> header() const;  // everything before the tensor data
  uint64_t aligned(uint64_t x) const;

  std::vector<entry> kvs_;
  std::vector<tensor_entry> tensors_;
  uint64_t alignment_ = 32;
};

}  // namespace keel
