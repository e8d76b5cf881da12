#include "kernels/gguf.hpp"

#include "kernels/mapped_file.hpp"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>

namespace keel {

namespace {

constexpr uint32_t gguf_magic = 0x46554747;  // "GGUF" read little-endian
constexpr uint64_t max_dims = 4;

/// Bounds-checked little-endian cursor over the file image.
class reader {
 public:
  reader(const std::string& name, const uint8_t* data, uint64_t size)
      : name_(name), data_(data), size_(size) {}

  uint64_t pos() const { return pos_; }
  const std::string& name() const { return name_; }

  caf::error truncated(std::string_view what) const {
    return make_error(errc::bad_model, name_ + ": truncated file: " + std::string(what) +
                                           " at offset " + std::to_string(pos_) +
                                           " runs past the end (" + std::to_string(size_) +
                                           " bytes)");
  }

  template <class T>
  caf::error read(T& out, std::string_view what) {
    if (size_ - pos_ < sizeof(T)) return truncated(what);
    std::memcpy(&out, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return caf::none;
  }

  caf::error read_string(std::string& out, std::string_view what) {
    uint64_t len = 0;
    if (auto err = read(len, what)) return err;
    if (len > size_ - pos_) {
      return make_error(errc::bad_model, name_ + ": truncated file: " + std::string(what) +
                                             " of length " + std::to_string(len) + " at offset " +
                                             std::to_string(pos_) + " runs past the end (" +
                                             std::to_string(size_) + " bytes)");
    }
    out.assign(reinterpret_cast<const char*>(data_ + pos_), len);
    pos_ += len;
    return caf::none;
  }

  uint64_t remaining() const { return size_ - pos_; }

 private:
  const std::string& name_;
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

/// Smallest encoded size of one value of type t (0 for an unknown type).
uint64_t min_size(gguf_type t) {
  switch (t) {
    case gguf_type::u8:
    case gguf_type::i8:
    case gguf_type::boolean:
      return 1;
    case gguf_type::u16:
    case gguf_type::i16:
      return 2;
    case gguf_type::u32:
    case gguf_type::i32:
    case gguf_type::f32:
      return 4;
    case gguf_type::u64:
    case gguf_type::i64:
    case gguf_type::f64:
    case gguf_type::string:
      return 8;
    case gguf_type::array:
      return 12;
  }
  return 0;
}

/// Reads one scalar of type t into (i, u, f, s).
caf::error read_scalar(reader& r, gguf_type t, gguf_kv& kv, const std::string& key) {
  auto what = "value of " + key;
  switch (t) {
#define KEEL_GGUF_INT(tag, ctype)               \
  case gguf_type::tag: {                        \
    ctype v{};                                  \
    if (auto err = r.read(v, what)) return err; \
    kv.i = static_cast<int64_t>(v);             \
    kv.u = static_cast<uint64_t>(v);            \
    kv.f = static_cast<double>(v);              \
    return caf::none;                           \
  }
    KEEL_GGUF_INT(u8, uint8_t)
    KEEL_GGUF_INT(i8, int8_t)
    KEEL_GGUF_INT(u16, uint16_t)
    KEEL_GGUF_INT(i16, int16_t)
    KEEL_GGUF_INT(u32, uint32_t)
    KEEL_GGUF_INT(i32, int32_t)
    KEEL_GGUF_INT(u64, uint64_t)
    KEEL_GGUF_INT(i64, int64_t)
#undef KEEL_GGUF_INT
    case gguf_type::boolean: {
      uint8_t v = 0;
      if (auto err = r.read(v, what)) return err;
      kv.i = kv.u = v != 0;
      return caf::none;
    }
    case gguf_type::f32: {
      float v = 0;
      if (auto err = r.read(v, what)) return err;
      kv.f = v;
      return caf::none;
    }
    case gguf_type::f64: {
      double v = 0;
      if (auto err = r.read(v, what)) return err;
      kv.f = v;
      return caf::none;
    }
    case gguf_type::string:
      return r.read_string(kv.s, what);
    case gguf_type::array:
      break;
  }
  return make_error(errc::bad_model, r.name() + ": key " + key + " has unknown value type " +
                                         std::to_string(static_cast<uint32_t>(t)));
}

caf::error read_value(reader& r, gguf_kv& kv) {
  if (kv.type != gguf_type::array) return read_scalar(r, kv.type, kv, kv.key);
  uint32_t elem = 0;
  uint64_t count = 0;
  if (auto err = r.read(elem, "array type of " + kv.key)) return err;
  if (auto err = r.read(count, "array length of " + kv.key)) return err;
  kv.elem = static_cast<gguf_type>(elem);
  auto esize = min_size(kv.elem);
  if (esize == 0 || kv.elem == gguf_type::array) {
    return make_error(errc::bad_model, r.name() + ": key " + kv.key +
                                           " is an array of unsupported element type " +
                                           std::to_string(elem));
  }
  if (count > r.remaining() / esize) {
    return make_error(errc::bad_model, r.name() + ": truncated file: array " + kv.key + " of " +
                                           std::to_string(count) + " elements at offset " +
                                           std::to_string(r.pos()) + " runs past the end");
  }
  gguf_kv tmp;
  tmp.key = kv.key;
  if (kv.elem == gguf_type::string) {
    kv.strings.resize(count);
    for (auto& s : kv.strings)
      if (auto err = r.read_string(s, "element of " + kv.key)) return err;
  } else if (kv.elem == gguf_type::f32 || kv.elem == gguf_type::f64) {
    kv.floats.resize(count);
    for (auto& f : kv.floats) {
      if (auto err = read_scalar(r, kv.elem, tmp, kv.key)) return err;
      f = tmp.f;
    }
  } else {
    kv.ints.resize(count);
    for (auto& i : kv.ints) {
      if (auto err = read_scalar(r, kv.elem, tmp, kv.key)) return err;
      i = tmp.i;
    }
  }
  return caf::none;
}

}  // namespace

bool gguf_is_integer(gguf_type t) {
  switch (t) {
    case gguf_type::u8:
    case gguf_type::i8:
    case gguf_type::u16:
    case gguf_type::i16:
    case gguf_type::u32:
    case gguf_type::i32:
    case gguf_type::u64:
    case gguf_type::i64:
      return true;
    default:
      return false;
  }
}

std::string_view gguf_type_name(gguf_type t) {
  switch (t) {
    case gguf_type::u8:
      return "u8";
    case gguf_type::i8:
      return "i8";
    case gguf_type::u16:
      return "u16";
    case gguf_type::i16:
      return "i16";
    case gguf_type::u32:
      return "u32";
    case gguf_type::i32:
      return "i32";
    case gguf_type::f32:
      return "f32";
    case gguf_type::boolean:
      return "bool";
    case gguf_type::string:
      return "string";
    case gguf_type::array:
      return "array";
    case gguf_type::u64:
      return "u64";
    case gguf_type::i64:
      return "i64";
    case gguf_type::f64:
      return "f64";
  }
  return "unknown";
}

/// The bytes of the file: a mapping of it, or an owned copy for `parse`.
struct gguf_file::mapping {
  mapped_file file;
  std::vector<uint8_t> owned;
  const uint8_t* data = nullptr;
  uint64_t size = 0;
};

gguf_file::gguf_file(gguf_file&&) noexcept = default;
gguf_file& gguf_file::operator=(gguf_file&&) noexcept = default;
gguf_file::~gguf_file() = default;

uint64_t gguf_file::file_size() const {
  return map_ ? map_->size : 0;
}

caf::expected<gguf_file> gguf_file::open(const std::string& path) {
  auto file = mapped_file::open(path);
  if (!file) return std::move(file.error());
  gguf_file f;
  f.name_ = path;
  f.map_ = std::make_unique<mapping>();
  f.map_->file = std::move(*file);
  f.map_->data = f.map_->file.data();
  f.map_->size = f.map_->file.size();
  if (auto err = f.parse_all()) return err;
  return f;
}

caf::expected<gguf_file> gguf_file::parse(std::string name, const void* bytes, size_t size) {
  gguf_file f;
  f.name_ = std::move(name);
  f.map_ = std::make_unique<mapping>();
  f.map_->owned.assign(static_cast<const uint8_t*>(bytes),
                       static_cast<const uint8_t*>(bytes) + size);
  f.map_->data = f.map_->owned.data();
  f.map_->size = size;
  if (auto err = f.parse_all()) return err;
  return f;
}

caf::error gguf_file::parse_all() {
  reader r(name_, map_->data, map_->size);
  uint32_t magic = 0;
  if (map_->size < 4) {
    return make_error(errc::bad_model, name_ + ": not a GGUF file: " + std::to_string(map_->size) +
                                           " bytes, too short");
  }
  if (auto err = r.read(magic, "magic")) return err;
  if (magic != gguf_magic) {
    char hex[16];
    std::snprintf(hex, sizeof(hex), "0x%08x", magic);
    return make_error(errc::bad_model,
                      name_ + ": not a GGUF file: magic " + hex + ", expected 0x46554747 (GGUF)");
  }
  if (auto err = r.read(version_, "version")) return err;
  if (version_ != 2 && version_ != 3) {
    return make_error(errc::bad_model, name_ + ": unsupported GGUF version " +
                                           std::to_string(version_) + ", expected 2 or 3");
  }
  uint64_t n_tensors = 0;
  uint64_t n_kv = 0;
  if (auto err = r.read(n_tensors, "tensor count")) return err;
  if (auto err = r.read(n_kv, "metadata count")) return err;
  // Each entry takes at least 12 bytes; larger counts cannot fit and would exhaust memory.
  if (n_kv > r.remaining() / 12 || n_tensors > r.remaining() / 24) {
    return make_error(errc::bad_model, name_ + ": truncated file: header claims " +
                                           std::to_string(n_kv) + " metadata entries and " +
                                           std::to_string(n_tensors) + " tensors in " +
                                           std::to_string(r.remaining()) + " bytes");
  }
  kvs_.resize(n_kv);
  for (auto& kv : kvs_) {
    if (auto err = r.read_string(kv.key, "metadata key")) return err;
    uint32_t t = 0;
    if (auto err = r.read(t, "type of " + kv.key)) return err;
    kv.type = static_cast<gguf_type>(t);
    if (min_size(kv.type) == 0) {
      return make_error(errc::bad_model,
                        name_ + ": key " + kv.key + " has unknown value type " + std::to_string(t));
    }
    if (auto err = read_value(r, kv)) return err;
  }
  if (auto* a = find("general.alignment")) {
    if (!gguf_is_integer(a->type) || a->u == 0 || (a->u & (a->u - 1)) != 0 || a->u > 65536) {
      return make_error(errc::bad_model, name_ + ": general.alignment is " + std::to_string(a->u) +
                                             ", expected a power of two up to 65536");
    }
    alignment_ = a->u;
  }
  tensors_.resize(n_tensors);
  for (auto& t : tensors_) {
    if (auto err = r.read_string(t.name, "tensor name")) return err;
    uint32_t n_dims = 0;
    if (auto err = r.read(n_dims, "dimension count of tensor " + t.name)) return err;
    if (n_dims == 0 || n_dims > max_dims) {
      return make_error(errc::bad_model, name_ + ": tensor " + t.name + " has " +
                                             std::to_string(n_dims) + " dims, expected 1 to 4");
    }
    t.dims.resize(n_dims);
    t.n_elements = 1;
    for (auto& d : t.dims) {
      if (auto err = r.read(d, "dims of tensor " + t.name)) return err;
      if (d == 0 || d > (uint64_t{1} << 40) || t.n_elements > (uint64_t{1} << 48) / d) {
        return make_error(errc::bad_model, name_ + ": tensor " + t.name + " has dimension " +
                                               std::to_string(d) + ", out of range");
      }
      t.n_elements *= d;
    }
    uint32_t type = 0;
    if (auto err = r.read(type, "type of tensor " + t.name)) return err;
    t.type = static_cast<dtype>(type);
    if (auto err = r.read(t.offset, "offset of tensor " + t.name)) return err;
    auto lay = layout_of(t.type);
    if (!lay) {
      return make_error(errc::bad_model,
                        name_ + ": tensor " + t.name + " has unknown type " + std::to_string(type));
    }
    if (t.dims[0] % lay->block_elems != 0) {
      return make_error(errc::bad_model, name_ + ": tensor " + t.name + " has row length " +
                                             std::to_string(t.dims[0]) + ", not a multiple of " +
                                             std::to_string(lay->block_elems) + " for type " +
                                             std::string(dtype_name(t.type)));
    }
    t.n_bytes = bytes_of(*lay, t.n_elements);
  }
  uint64_t data_start = (r.pos() + alignment_ - 1) / alignment_ * alignment_;
  if (data_start > map_->size && n_tensors > 0) {
    return make_error(errc::bad_model, name_ + ": truncated file: tensor data would start at " +
                                           std::to_string(data_start) + " beyond the end (" +
                                           std::to_string(map_->size) + " bytes)");
  }
  uint64_t data_size = map_->size - std::min(data_start, map_->size);
  for (auto& t : tensors_) {
    if (t.offset % alignment_ != 0) {
      return make_error(errc::bad_model, name_ + ": tensor " + t.name + " offset " +
                                             std::to_string(t.offset) + " is not a multiple of " +
                                             std::to_string(alignment_));
    }
    if (t.offset > data_size || t.n_bytes > data_size - t.offset) {
      // Name the stored offset: a sum with it may wrap and print an in-bounds range.
      return make_error(
          errc::bad_model,
          name_ + ": tensor " + t.name + " data at offset " + std::to_string(t.offset) + " (" +
              std::to_string(t.n_bytes) + " bytes, data section at " + std::to_string(data_start) +
              ") is out of bounds of the file (" + std::to_string(map_->size) + " bytes)");
    }
    t.data = map_->data + data_start + t.offset;
  }
  return caf::none;
}

const gguf_kv* gguf_file::find(std::string_view key) const {
  for (auto& kv : kvs_)
    if (kv.key == key) return &kv;
  return nullptr;
}

const gguf_tensor* gguf_file::tensor(std::string_view name) const {
  for (auto& t : tensors_)
    if (t.name == name) return &t;
  return nullptr;
}

namespace {

caf::error missing_key(const std::string& file, std::string_view key) {
  return make_error(errc::bad_model, file + ": missing required key " + std::string(key));
}

caf::error wrong_type(const std::string& file, const gguf_kv& kv, std::string_view expected) {
  auto got = std::string(gguf_type_name(kv.type));
  if (kv.type == gguf_type::array) got += " of " + std::string(gguf_type_name(kv.elem));
  return make_error(errc::bad_model, file + ": key " + kv.key + " has type " + got + ", expected " +
                                         std::string(expected));
}

}  // namespace

caf::expected<uint64_t> gguf_file::get_uint(std::string_view key) const {
  auto* kv = find(key);
  if (!kv) return missing_key(name_, key);
  if (!gguf_is_integer(kv->type)) return wrong_type(name_, *kv, "an integer");
  bool is_signed = kv->type == gguf_type::i8 || kv->type == gguf_type::i16 ||
                   kv->type == gguf_type::i32 || kv->type == gguf_type::i64;
  if (is_signed && kv->i < 0) {
    return make_error(errc::bad_model, name_ + ": key " + kv->key + " is " + std::to_string(kv->i) +
                                           ", expected a non-negative value");
  }
  return kv->u;
}

caf::expected<double> gguf_file::get_float(std::string_view key) const {
  auto* kv = find(key);
  if (!kv) return missing_key(name_, key);
  if (kv->type == gguf_type::f32 || kv->type == gguf_type::f64) return kv->f;
  if (gguf_is_integer(kv->type)) return kv->f;
  return wrong_type(name_, *kv, "a number");
}

caf::expected<std::string> gguf_file::get_string(std::string_view key) const {
  auto* kv = find(key);
  if (!kv) return missing_key(name_, key);
  if (kv->type != gguf_type::string) return wrong_type(name_, *kv, "string");
  return kv->s;
}

caf::expected<bool> gguf_file::get_bool(std::string_view key) const {
  auto* kv = find(key);
  if (!kv) return missing_key(name_, key);
  if (kv->type != gguf_type::boolean) return wrong_type(name_, *kv, "bool");
  return kv->i != 0;
}

caf::expected<const gguf_kv*> gguf_file::get_array(std::string_view key, gguf_type elem) const {
  auto* kv = find(key);
  if (!kv) return missing_key(name_, key);
  bool ok = kv->type == gguf_type::array &&
            (kv->elem == elem || (gguf_is_integer(elem) && gguf_is_integer(kv->elem)) ||
             (elem == gguf_type::f32 && kv->elem == gguf_type::f64) ||
             (elem == gguf_type::f64 && kv->elem == gguf_type::f32));
  if (!ok) return wrong_type(name_, *kv, "array of " + std::string(gguf_type_name(elem)));
  return kv;
}

uint64_t gguf_file::get_uint_or(std::string_view key, uint64_t fallback) const {
  auto* kv = find(key);
  return kv && gguf_is_integer(kv->type) ? kv->u : fallback;
}

double gguf_file::get_float_or(std::string_view key, double fallback) const {
  auto v = find(key) ? get_float(key) : caf::expected<double>{fallback};
  return v ? *v : fallback;
}

bool gguf_file::get_bool_or(std::string_view key, bool fallback) const {
  auto* kv = find(key);
  return kv && kv->type == gguf_type::boolean ? kv->i != 0 : fallback;
}

caf::expected<const gguf_tensor*> gguf_file::require_tensor(
    std::string_view name, const std::vector<uint64_t>& dims) const {
  auto* t = tensor(name);
  if (!t) {
    return make_error(errc::bad_model, name_ + ": missing required tensor " + std::string(name));
  }
  auto shape = [](const std::vector<uint64_t>& d) {
    std::string s = "[";
    for (size_t i = 0; i < d.size(); ++i) s += (i ? ", " : "") + std::to_string(d[i]);
    return s + "]";
  };
  if (t->dims != dims) {
    return make_error(errc::bad_model, name_ + ": tensor " + t->name + " has shape " +
                                           shape(t->dims) + ", expected " + shape(dims));
  }
  if (!dtype_supported(t->type)) {
    return make_error(errc::bad_model, name_ + ": tensor " + t->name + " has type " +
                                           std::string(dtype_name(t->type)) +
                                           ", which Keel does not compute with (it computes "
                                           "with f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, "
                                           "q2_k, q3_k, q4_k, q5_k and q6_k)");
  }
  return t;
}

// ---- writer -------------------------------------------------------------------------------

namespace {

template <class T>
void put(std::vector<uint8_t>& out, T v) {
  auto* p = reinterpret_cast<const uint8_t*>(&v);
  out.insert(out.end(), p, p + sizeof(T));
}

void put_string(std::vector<uint8_t>& out, const std::string& s) {
  put<uint64_t>(out, s.size());
  out.insert(out.end(), s.begin(), s.end());
}

}  // namespace

void gguf_writer::add_uint32(std::string key, uint32_t v) {
  entry e{std::move(key), gguf_type::u32, gguf_type::u32, {}};
  put(e.payload, v);
  kvs_.push_back(std::move(e));
}

void gguf_writer::add_uint64(std::string key, uint64_t v) {
  entry e{std::move(key), gguf_type::u64, gguf_type::u64, {}};
  put(e.payload, v);
  kvs_.push_back(std::move(e));
}

void gguf_writer::add_int32(std::string key, int32_t v) {
  entry e{std::move(key), gguf_type::i32, gguf_type::i32, {}};
  put(e.payload, v);
  kvs_.push_back(std::move(e));
}

void gguf_writer::add_float32(std::string key, float v) {
  entry e{std::move(key), gguf_type::f32, gguf_type::f32, {}};
  put(e.payload, v);
  kvs_.push_back(std::move(e));
}

void gguf_writer::add_bool(std::string key, bool v) {
  entry e{std::move(key), gguf_type::boolean, gguf_type::boolean, {}};
  put<uint8_t>(e.payload, v ? 1 : 0);
  kvs_.push_back(std::move(e));
}

void gguf_writer::add_string(std::string key, std::string v) {
  entry e{std::move(key), gguf_type::string, gguf_type::string, {}};
  put_string(e.payload, v);
  kvs_.push_back(std::move(e));
}

void gguf_writer::add_strings(std::string key, std::vector<std::string> v) {
  entry e{std::move(key), gguf_type::array, gguf_type::string, {}};
  put<uint32_t>(e.payload, static_cast<uint32_t>(gguf_type::string));
  put<uint64_t>(e.payload, v.size());
  for (auto& s : v) put_string(e.payload, s);
  kvs_.push_back(std::move(e));
}

void gguf_writer::add_float32s(std::string key, std::vector<float> v) {
  entry e{std::move(key), gguf_type::array, gguf_type::f32, {}};
  put<uint32_t>(e.payload, static_cast<uint32_t>(gguf_type::f32));
  put<uint64_t>(e.payload, v.size());
  for (float f : v) put(e.payload, f);
  kvs_.push_back(std::move(e));
}

void gguf_writer::add_int32s(std::string key, std::vector<int32_t> v) {
  entry e{std::move(key), gguf_type::array, gguf_type::i32, {}};
  put<uint32_t>(e.payload, static_cast<uint32_t>(gguf_type::i32));
  put<uint64_t>(e.payload, v.size());
  for (int32_t i : v) put(e.payload, i);
  kvs_.push_back(std::move(e));
}

void gguf_writer::add_tensor(std::string name, std::vector<uint64_t> dims, dtype type,
                             std::vector<uint8_t> bytes) {
  tensors_.push_back({std::move(name), std::move(dims), type, std::move(bytes)});
}

uint64_t gguf_writer::aligned(uint64_t x) const {
  return (x + alignment_ - 1) / alignment_ * alignment_;
}

std::vector<uint8_t> gguf_writer::header() const {
  std::vector<uint8_t> out;
  put<uint32_t>(out, gguf_magic);
  put<uint32_t>(out, 3);
  put<uint64_t>(out, tensors_.size());
  put<uint64_t>(out, kvs_.size());
  for (auto& e : kvs_) {
    put_string(out, e.key);
    put<uint32_t>(out, static_cast<uint32_t>(e.type));
    out.insert(out.end(), e.payload.begin(), e.payload.end());
  }
  uint64_t offset = 0;
  for (auto& t : tensors_) {
    put_string(out, t.name);
    put<uint32_t>(out, static_cast<uint32_t>(t.dims.size()));
    for (auto d : t.dims) put<uint64_t>(out, d);
    put<uint32_t>(out, static_cast<uint32_t>(t.type));
    put<uint64_t>(out, offset);
    offset = aligned(offset + t.bytes.size());
  }
  out.resize(aligned(out.size()), 0);
  return out;
}

std::vector<uint8_t> gguf_writer::serialize() const {
  auto out = header();
  for (auto& t : tensors_) {
    out.insert(out.end(), t.bytes.begin(), t.bytes.end());
    out.resize(aligned(out.size()), 0);
  }
  return out;
}

caf::error gguf_writer::write(const std::string& path) const {
  auto tmp = path + ".tmp";
  {
    // Streamed tensor by tensor: a large model is never held twice in memory.
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    if (!f) return make_error(errc::failed, tmp + ": cannot create: " + std::strerror(errno));
    auto head = header();
    f.write(reinterpret_cast<const char*>(head.data()), static_cast<std::streamsize>(head.size()));
    const char zeros[64] = {};
    for (auto& t : tensors_) {
      f.write(reinterpret_cast<const char*>(t.bytes.data()),
              static_cast<std::streamsize>(t.bytes.size()));
      f.write(zeros, static_cast<std::streamsize>(aligned(t.bytes.size()) - t.bytes.size()));
    }
    if (!f.flush())
      return make_error(errc::failed, tmp + ": write failed: " + std::strerror(errno));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec)
    return make_error(errc::failed, path + ": cannot rename from " + tmp + ": " + ec.message());
  return caf::none;
}

}  // namespace keel
