#define BOOST_TEST_MODULE gguf_test
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <map>
#include <new>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "kernels/dtype.hpp"
#include "base/error.hpp"
#include "kernels/gguf.hpp"
#include "kernels/model.hpp"
#include "kernels/synth.hpp"
#include "kernels/tokenizer.hpp"
#include "tests/test_support.hpp"

// ---- allocation probe -------------------------------------------------------------------------
// The parser must reject impossible counts before sizing anything by them. Replacing the global
// operator new lets a test see the largest single allocation made while it parses.

namespace {
std::atomic<bool> probing{false};
std::atomic<size_t> largest_allocation{0};
}  // namespace

void* operator new(std::size_t n) {
  if (probing.load(std::memory_order_relaxed)) {
    size_t cur = largest_allocation.load(std::memory_order_relaxed);
    while (n > cur && !largest_allocation.compare_exchange_weak(cur, n)) {
    }
  }
  if (void* p = std::malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  return ::operator new(n);
}
// Not inlined: GCC would otherwise see `free` of a pointer from `operator new` and warn.
[[gnu::noinline]] void operator delete(void* p) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete[](void* p) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete(void* p, std::size_t) noexcept {
  std::free(p);
}
[[gnu::noinline]] void operator delete[](void* p, std::size_t) noexcept {
  std::free(p);
}

using namespace keel;

namespace {

using bytes = std::vector<uint8_t>;
constexpr const char* image_name = "model.gguf";

// ---- image surgery ----------------------------------------------------------------------------

template <class T>
T peek(const bytes& img, size_t pos) {
  T v{};
  std::memcpy(&v, img.data() + pos, sizeof(T));
  return v;
}

template <class T>
void poke(bytes& img, size_t pos, T v) {
  BOOST_REQUIRE_LE(pos + sizeof(T), img.size());
  std::memcpy(img.data() + pos, &v, sizeof(T));
}

/// Where each field of one tensor info sits in an image.
struct tensor_info_pos {
  size_t name = 0;    // the u64 length of the name
  size_t n_dims = 0;  // u32
  size_t dims = 0;    // u64 each
  size_t type = 0;    // u32
  size_t offset = 0;  // u64
};

/// The sections of a well-formed image, found by walking it independently of the reader.
struct image_layout {
  std::vector<size_t> kv;        // start of each metadata entry (its key length)
  std::vector<size_t> kv_value;  // start of each entry's value (after the type tag)
  std::vector<std::string> keys;
  size_t kv_end = 0;
  std::vector<tensor_info_pos> tensors;
  std::vector<std::string> tensor_names;
  size_t info_end = 0;
  size_t data_start = 0;
};

size_t scalar_size(uint32_t type, const bytes& img, size_t pos) {
  switch (static_cast<gguf_type>(type)) {
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
      return 8;
    case gguf_type::string:
      return 8 + peek<uint64_t>(img, pos);
    default:
      break;
  }
  BOOST_FAIL("walk: unexpected value type " << type);
  return 0;
}

image_layout walk(const bytes& img, uint64_t alignment = 32) {
  image_layout l;
  size_t pos = 8;
  auto n_tensors = peek<uint64_t>(img, pos);
  auto n_kv = peek<uint64_t>(img, pos + 8);
  pos += 16;
  for (uint64_t i = 0; i < n_kv; ++i) {
    l.kv.push_back(pos);
    auto len = peek<uint64_t>(img, pos);
    l.keys.emplace_back(reinterpret_cast<const char*>(img.data() + pos + 8), len);
    pos += 8 + len;
    auto type = peek<uint32_t>(img, pos);
    pos += 4;
    l.kv_value.push_back(pos);
    if (static_cast<gguf_type>(type) == gguf_type::array) {
      auto elem = peek<uint32_t>(img, pos);
      auto count = peek<uint64_t>(img, pos + 4);
      pos += 12;
      for (uint64_t k = 0; k < count; ++k) pos += scalar_size(elem, img, pos);
    } else {
      pos += scalar_size(type, img, pos);
    }
  }
  l.kv_end = pos;
  for (uint64_t i = 0; i < n_tensors; ++i) {
    tensor_info_pos t;
    t.name = pos;
    auto len = peek<uint64_t>(img, pos);
    l.tensor_names.emplace_back(reinterpret_cast<const char*>(img.data() + pos + 8), len);
    pos += 8 + len;
    t.n_dims = pos;
    auto n_dims = peek<uint32_t>(img, pos);
    t.dims = pos + 4;
    pos += 4 + 8 * n_dims;
    t.type = pos;
    t.offset = pos + 4;
    pos += 12;
    l.tensors.push_back(t);
  }
  l.info_end = pos;
  l.data_start = (pos + alignment - 1) / alignment * alignment;
  return l;
}

size_t index_of(const std::vector<std::string>& names, const std::string& name) {
  auto it = std::find(names.begin(), names.end(), name);
  BOOST_REQUIRE_MESSAGE(it != names.end(), "no entry named " << name);
  return static_cast<size_t>(it - names.begin());
}

// ---- checks -----------------------------------------------------------------------------------

/// The error of a failed result, for assertion messages (Boost.Test builds them even on success).
template <class T>
std::string why(const caf::expected<T>& r) {
  return r ? std::string() : describe(r.error());
}
std::string why(const caf::error& err) {
  return err ? describe(err) : std::string();
}

caf::expected<gguf_file> parse(const bytes& img, size_t size) {
  return gguf_file::parse(image_name, img.data(), size);
}
caf::expected<gguf_file> parse(const bytes& img) {
  return parse(img, img.size());
}

/// Asserts `err` is `want` and its message contains each of `parts`.
void check_error(const caf::error& err, errc want, std::initializer_list<std::string> parts) {
  BOOST_REQUIRE_MESSAGE(static_cast<bool>(err), "expected an error, got success");
  auto msg = message_of(err);
  BOOST_TEST_CONTEXT("message: " << msg) {
    BOOST_TEST(to_string(code_of(err)) == to_string(want));
    for (auto& p : parts) BOOST_TEST(msg.find(p) != std::string::npos, "missing '" << p << "'");
  }
}

template <class T>
void check_bad_model(const caf::expected<T>& r, std::initializer_list<std::string> parts) {
  BOOST_REQUIRE_MESSAGE(!r, "expected bad_model, got success");
  check_error(r.error(), errc::bad_model, parts);
}

void write_file(const std::filesystem::path& path, const bytes& img, size_t size) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(img.data()), static_cast<std::streamsize>(size));
  BOOST_REQUIRE(f.flush());
}

// ---- a round-trip image -----------------------------------------------------------------------

std::vector<uint8_t> pattern(size_t n, uint8_t seed) {
  std::vector<uint8_t> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = static_cast<uint8_t>(seed + i * 7 + (i >> 3));
  return out;
}

const std::string nul_string("with\0nul", 8);

struct tensor_spec {
  std::string name;
  std::vector<uint64_t> dims;
  dtype type;
  std::vector<uint8_t> data;
};

std::vector<tensor_spec> round_trip_tensors() {
  return {
      {"odd.f32", {3, 5}, dtype::f32, pattern(3 * 5 * 4, 1)},       // 60 bytes: needs padding
      {"odd.f16", {7}, dtype::f16, pattern(7 * 2, 2)},              // 14 bytes
      {"rows.q8_0", {64, 3}, dtype::q8_0, pattern(2 * 3 * 34, 3)},  // 204 bytes
      {"cube.f16", {5, 1, 3}, dtype::f16, pattern(5 * 3 * 2, 4)},   // 3-D
      {"four.f32", {1, 2, 1, 3}, dtype::f32, pattern(6 * 4, 5)},    // 4-D
      {"one.q8_0", {32}, dtype::q8_0, pattern(34, 6)},
  };
}

void add_round_trip_entries(gguf_writer& w) {
  w.add_uint32("t.u32", 0xdeadbeefu);
  w.add_uint64("t.u64", 0xfedcba9876543210ull);  // above 2^63
  w.add_int32("t.i32", -123456);
  w.add_float32("t.f32", 3.25f);
  w.add_bool("t.true", true);
  w.add_bool("t.false", false);
  w.add_string("t.str", "h\xc3\xa9llo \xe2\x96\x81world");
  w.add_string("t.empty", "");
  w.add_string("t.nul", nul_string);
  w.add_strings("t.strs", {"", "a", "\xe2\x96\x81the", nul_string});
  w.add_strings("t.no_strs", {});
  w.add_float32s("t.f32s", {1.5f, -0.0f, 1e-30f, -65504.0f});
  w.add_int32s("t.i32s", {std::numeric_limits<int32_t>::min(), -1, 0, 7,
                          std::numeric_limits<int32_t>::max()});
  for (auto& t : round_trip_tensors()) w.add_tensor(t.name, t.dims, t.type, t.data);
}

gguf_writer round_trip_writer() {
  gguf_writer w;
  add_round_trip_entries(w);
  return w;
}

void check_round_trip(const gguf_file& f, uint32_t version) {
  BOOST_TEST(f.version() == version);
  BOOST_TEST(f.alignment() == 32u);
  BOOST_REQUIRE_EQUAL(f.metadata().size(), 13u);
  std::vector<std::string> keys;
  for (auto& kv : f.metadata()) keys.push_back(kv.key);
  std::vector<std::string> want_keys{"t.u32",     "t.u64",  "t.i32",   "t.f32", "t.true",
                                     "t.false",   "t.str",  "t.empty", "t.nul", "t.strs",
                                     "t.no_strs", "t.f32s", "t.i32s"};
  BOOST_TEST(keys == want_keys, boost::test_tools::per_element());

  BOOST_TEST(gguf_type_name(f.find("t.u32")->type) == "u32");
  BOOST_TEST(*f.get_uint("t.u32") == 0xdeadbeefu);
  BOOST_TEST(gguf_type_name(f.find("t.u64")->type) == "u64");
  BOOST_TEST(*f.get_uint("t.u64") == 0xfedcba9876543210ull);
  BOOST_TEST(gguf_type_name(f.find("t.i32")->type) == "i32");
  BOOST_TEST(f.find("t.i32")->i == -123456);
  BOOST_TEST(gguf_type_name(f.find("t.f32")->type) == "f32");
  BOOST_TEST(*f.get_float("t.f32") == 3.25);
  BOOST_TEST(gguf_type_name(f.find("t.true")->type) == "bool");
  BOOST_TEST(*f.get_bool("t.true") == true);
  BOOST_TEST(*f.get_bool("t.false") == false);
  BOOST_TEST(*f.get_string("t.str") == "h\xc3\xa9llo \xe2\x96\x81world");
  BOOST_TEST(*f.get_string("t.empty") == "");
  BOOST_TEST(*f.get_string("t.nul") == nul_string);

  auto strs = f.get_array("t.strs", gguf_type::string);
  BOOST_REQUIRE(strs);
  std::vector<std::string> want_strs{"", "a", "\xe2\x96\x81the", nul_string};
  BOOST_TEST((*strs)->strings == want_strs, boost::test_tools::per_element());
  auto none = f.get_array("t.no_strs", gguf_type::string);
  BOOST_REQUIRE(none);
  BOOST_TEST((*none)->strings.empty());
  auto floats = f.get_array("t.f32s", gguf_type::f32);
  BOOST_REQUIRE(floats);
  std::vector<double> want_floats{1.5, -0.0, static_cast<double>(1e-30f), -65504.0};
  BOOST_TEST((*floats)->floats == want_floats, boost::test_tools::per_element());
  BOOST_TEST(std::signbit((*floats)->floats[1]));
  auto ints = f.get_array("t.i32s", gguf_type::i32);
  BOOST_REQUIRE(ints);
  std::vector<int64_t> want_ints{std::numeric_limits<int32_t>::min(), -1, 0, 7,
                                 std::numeric_limits<int32_t>::max()};
  BOOST_TEST((*ints)->ints == want_ints, boost::test_tools::per_element());

  auto want = round_trip_tensors();
  BOOST_REQUIRE_EQUAL(f.tensors().size(), want.size());
  const uint8_t* section = f.tensors()[0].data - f.tensors()[0].offset;
  for (size_t i = 0; i < want.size(); ++i) {
    auto& t = f.tensors()[i];
    BOOST_TEST_CONTEXT("tensor " << want[i].name) {
      BOOST_TEST(t.name == want[i].name);
      BOOST_TEST(t.dims == want[i].dims, boost::test_tools::per_element());
      BOOST_TEST(dtype_name(t.type) == dtype_name(want[i].type));
      uint64_t n = 1;
      for (auto d : want[i].dims) n *= d;
      BOOST_TEST(t.n_elements == n);
      BOOST_TEST(t.n_bytes == want[i].data.size());
      BOOST_TEST(t.offset % 32 == 0u);
      BOOST_TEST(t.data == section + t.offset);
      BOOST_TEST(std::memcmp(t.data, want[i].data.data(), want[i].data.size()) == 0);
      BOOST_TEST(f.tensor(want[i].name) == &t);
    }
  }
}

// ---- a complete small llama model -------------------------------------------------------------

synth_options small_options() {
  synth_options o;
  o.dim = 64;
  o.layers = 1;
  o.heads = 4;
  o.kv_heads = 2;
  o.ffn = 128;
  o.ctx = 64;
  return o;
}

const vocab& byte_vocab() {
  static const vocab v = builtin_byte_vocab();
  return v;
}

bytes synthesized_image() {
  auto w = synthesize(small_options(), byte_vocab());
  BOOST_REQUIRE_MESSAGE(w, "synthesize: " << why(w));
  return w->serialize();
}

/// A llama model built from pieces, to leave things out or change them. Defaults give the same
/// shape as `small_options()`, with zero weights and unit norms.
struct llama_spec {
  std::string arch = "llama";
  std::set<std::string> drop;                         // keys and tensors to leave out
  std::map<std::string, uint64_t> uints;              // integer keys to set (or add)
  std::map<std::string, std::vector<uint64_t>> dims;  // tensor shapes to change
  std::map<std::string, dtype> types;                 // tensor types to change
};

gguf_writer build_llama(const llama_spec& s) {
  gguf_writer w;
  if (!s.drop.count("general.architecture")) w.add_string("general.architecture", s.arch);
  std::map<std::string, uint64_t> uints{
      {"llama.context_length", 64},       {"llama.embedding_length", 64},
      {"llama.block_count", 1},           {"llama.feed_forward_length", 128},
      {"llama.attention.head_count", 4},  {"llama.attention.head_count_kv", 2},
      {"llama.rope.dimension_count", 16},
  };
  for (auto& [k, v] : s.uints) uints[k] = v;
  for (auto& [k, v] : uints) {
    if (s.drop.count(k)) continue;
    if (v > 0xffffffffu) {
      w.add_uint64(k, v);
    } else {
      w.add_uint32(k, static_cast<uint32_t>(v));
    }
  }
  w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  add_vocab_metadata(w, byte_vocab());

  const uint64_t vocab_n = byte_vocab().tokens.size();
  auto tensor = [&](const std::string& name, std::vector<uint64_t> dims) {
    if (s.drop.count(name)) return;
    if (auto it = s.dims.find(name); it != s.dims.end()) dims = it->second;
    dtype type = dtype::f32;
    if (auto it = s.types.find(name); it != s.types.end()) type = it->second;
    uint64_t n = 1;
    for (auto d : dims) n *= d;
    auto lay = *layout_of(type);
    std::vector<uint8_t> data(bytes_of(lay, n), 0);
    if (type == dtype::f32) {
      for (uint64_t i = 0; i < n; ++i) {
        float one = 1.0f;
        std::memcpy(data.data() + 4 * i, &one, 4);
      }
    }
    w.add_tensor(name, std::move(dims), type, std::move(data));
  };
  tensor("token_embd.weight", {64, vocab_n});
  tensor("output_norm.weight", {64});
  tensor("output.weight", {64, vocab_n});
  tensor("blk.0.attn_norm.weight", {64});
  tensor("blk.0.attn_q.weight", {64, 64});
  tensor("blk.0.attn_k.weight", {64, 32});
  tensor("blk.0.attn_v.weight", {64, 32});
  tensor("blk.0.attn_output.weight", {64, 64});
  tensor("blk.0.ffn_norm.weight", {64});
  tensor("blk.0.ffn_gate.weight", {64, 128});
  tensor("blk.0.ffn_up.weight", {64, 128});
  tensor("blk.0.ffn_down.weight", {128, 64});
  return w;
}

/// Writes `w` to a temp file and loads it as a model.
caf::expected<std::unique_ptr<model>> load_variant(const test::temp_dir& dir, const gguf_writer& w,
                                                   const std::string& file = "variant.gguf") {
  auto path = (dir.path / file).string();
  auto err = w.write(path);
  BOOST_REQUIRE_MESSAGE(!err, "write: " << why(err));
  return model::load(path);
}

}  // namespace

// ============================================================================================
BOOST_AUTO_TEST_SUITE(round_trip)

BOOST_AUTO_TEST_CASE(parse_gives_back_every_metadata_kind_and_tensor) {
  auto img = round_trip_writer().serialize();
  auto f = parse(img);
  BOOST_REQUIRE_MESSAGE(f, why(f));
  BOOST_TEST(f->name() == image_name);
  BOOST_TEST(f->file_size() == img.size());
  check_round_trip(*f, 3);
}

BOOST_AUTO_TEST_CASE(open_gives_back_the_same_as_parse_and_aligns_tensor_data) {
  test::temp_dir dir("gguf_round_trip");
  auto path = (dir.path / "rt.gguf").string();
  auto w = round_trip_writer();
  auto err = w.write(path);
  BOOST_REQUIRE_MESSAGE(!err, why(err));
  BOOST_TEST(std::filesystem::file_size(path) == w.serialize().size());
  auto f = gguf_file::open(path);
  BOOST_REQUIRE_MESSAGE(f, why(f));
  BOOST_TEST(f->name() == path);
  check_round_trip(*f, 3);
  // The mapping is page-aligned, so data aligned within the file is aligned in memory too.
  for (auto& t : f->tensors()) BOOST_TEST(reinterpret_cast<uintptr_t>(t.data) % 32 == 0u, t.name);
}

BOOST_AUTO_TEST_CASE(writer_places_data_at_aligned_offsets_after_an_aligned_header) {
  auto img = round_trip_writer().serialize();
  auto l = walk(img);
  BOOST_TEST(img.size() % 32 == 0u);
  auto want = round_trip_tensors();
  uint64_t expect = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    uint64_t off = peek<uint64_t>(img, l.tensors[i].offset);
    BOOST_TEST(off == expect);
    BOOST_TEST(std::memcmp(img.data() + l.data_start + off, want[i].data.data(),
                           want[i].data.size()) == 0);
    expect = (off + want[i].data.size() + 31) / 32 * 32;
  }
  for (size_t p = l.info_end; p < l.data_start; ++p) BOOST_TEST(img[p] == 0u);
}

BOOST_AUTO_TEST_CASE(version_2_files_are_read_like_version_3) {
  auto img = round_trip_writer().serialize();
  poke<uint32_t>(img, 4, 2);
  auto f = parse(img);
  BOOST_REQUIRE_MESSAGE(f, why(f));
  check_round_trip(*f, 2);
}

BOOST_AUTO_TEST_CASE(an_explicit_general_alignment_of_32_is_accepted) {
  auto w = round_trip_writer();
  w.add_uint32("general.alignment", 32);
  auto f = parse(w.serialize());
  BOOST_REQUIRE_MESSAGE(f, why(f));
  BOOST_TEST(f->alignment() == 32u);
  BOOST_TEST(f->tensors().size() == round_trip_tensors().size());
}

BOOST_AUTO_TEST_CASE(a_file_without_tensors_or_metadata_parses) {
  auto f = parse(gguf_writer{}.serialize());
  BOOST_REQUIRE_MESSAGE(f, why(f));
  BOOST_TEST(f->metadata().empty());
  BOOST_TEST(f->tensors().empty());
}

BOOST_AUTO_TEST_CASE(typed_getters_name_the_key_and_type_on_mismatch) {
  auto f = parse(round_trip_writer().serialize());
  BOOST_REQUIRE(f);
  check_bad_model(f->get_string("t.u32"), {image_name, "t.u32", "u32", "string"});
  check_bad_model(f->get_uint("t.i32"), {image_name, "t.i32", "-123456", "non-negative"});
  check_bad_model(f->get_uint("t.absent"), {image_name, "missing required key t.absent"});
  check_bad_model(f->get_array("t.f32s", gguf_type::string),
                  {image_name, "t.f32s", "array of f32", "array of string"});
  BOOST_TEST(f->get_uint_or("t.absent", 17u) == 17u);
  BOOST_TEST(f->get_bool_or("t.u32", true) == true);
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================================
BOOST_AUTO_TEST_SUITE(validation)

BOOST_AUTO_TEST_CASE(wrong_magic_is_bad_model_naming_the_magic) {
  auto img = round_trip_writer().serialize();
  img[0] = 'X';  // "XGUF" read little-endian
  check_bad_model(parse(img), {image_name, "not a GGUF file", "magic 0x46554758"});
  check_bad_model(parse(img, 3), {image_name, "not a GGUF file", "3 bytes"});
  check_bad_model(parse(img, 0), {image_name, "0 bytes"});
}

BOOST_AUTO_TEST_CASE(versions_other_than_2_and_3_are_rejected_by_number) {
  auto img = round_trip_writer().serialize();
  for (uint32_t v : {0u, 1u, 4u, 0xffffffffu}) {
    poke<uint32_t>(img, 4, v);
    check_bad_model(parse(img), {image_name, "unsupported GGUF version " + std::to_string(v)});
  }
}

BOOST_AUTO_TEST_CASE(truncation_anywhere_is_reported_with_what_was_being_read) {
  // A long first string keeps the cuts below past the header's plausibility check of the counts,
  // so that each reaches the read it is aimed at.
  gguf_writer w;
  w.add_string("t.pad", std::string(400, 'p'));
  add_round_trip_entries(w);
  auto img = w.serialize();
  auto l = walk(img);
  auto key = [&](const std::string& k) { return l.kv[index_of(l.keys, k)]; };
  auto value = [&](const std::string& k) { return l.kv_value[index_of(l.keys, k)]; };
  auto tinfo = [&](const std::string& n) { return l.tensors[index_of(l.tensor_names, n)]; };
  const size_t strs = value("t.strs") + 12;  // the first element of t.strs
  struct cut {
    size_t at;
    std::string what;
  } cuts[] = {
      {6, "version at offset 4"},
      {10, "tensor count at offset 8"},
      {20, "metadata count at offset 16"},
      {key("t.u64") + 3, "metadata key at offset " + std::to_string(key("t.u64"))},
      {key("t.u64") + 8 + 2, "metadata key of length 5"},  // inside a key's text
      {value("t.u64") - 2, "type of t.u64"},
      {value("t.u64") + 5, "value of t.u64"},
      {value("t.str") + 12, "value of t.str of length 15"},  // inside a string value
      {value("t.strs") + 2, "array type of t.strs"},
      {value("t.strs") + 8, "array length of t.strs"},
      // Inside the text of the last element (three shorter ones come before it).
      {strs + 8 + 9 + 14 + 8 + 3, "element of t.strs of length 8"},
      {tinfo("odd.f16").name + 9, "tensor name of length 7"},
      {tinfo("odd.f16").n_dims + 1, "dimension count of tensor odd.f16"},
      {tinfo("cube.f16").dims + 12, "dims of tensor cube.f16"},
      {tinfo("rows.q8_0").type + 3, "type of tensor rows.q8_0"},
      {tinfo("rows.q8_0").offset + 7, "offset of tensor rows.q8_0"},
      {l.info_end, "tensor data would start at " + std::to_string(l.data_start)},
  };
  for (auto& c : cuts) {
    BOOST_TEST_CONTEXT("cut at " << c.at) {
      check_bad_model(parse(img, c.at), {image_name, "truncated file", c.what,
                                         "(" + std::to_string(c.at) + " bytes)"});
    }
  }
  // An array whose elements cannot fit in what is left fails on its length, before any element.
  for (const char* k : {"t.strs", "t.f32s", "t.i32s"}) {
    size_t at = value(k) + 12 + 3;
    BOOST_TEST_CONTEXT("cut at " << at) {
      check_bad_model(parse(img, at), {image_name, "truncated file", std::string("array ") + k,
                                       "elements at offset " + std::to_string(value(k) + 12)});
    }
  }
  // Cut inside the data of each tensor: the message names the tensor and its byte range.
  auto f = parse(img);
  BOOST_REQUIRE(f);
  for (auto& t : f->tensors()) {
    size_t start = l.data_start + t.offset;
    for (size_t at : {start, start + t.n_bytes / 2, start + t.n_bytes - 1}) {
      BOOST_TEST_CONTEXT("cut at " << at << " inside " << t.name) {
        check_bad_model(parse(img, at), {image_name, "tensor " + t.name, "out of bounds",
                                         std::to_string(t.offset), std::to_string(at)});
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(tensor_data_past_the_end_names_the_tensor_and_offset) {
  auto img = round_trip_writer().serialize();
  auto l = walk(img);
  auto at = l.tensors[index_of(l.tensor_names, "odd.f16")].offset;
  for (uint64_t off : {uint64_t{1} << 20, img.size() - l.data_start,
                       ~uint64_t{0} / 32 * 32 /* would overflow offset + size */}) {
    poke<uint64_t>(img, at, off);
    BOOST_TEST_CONTEXT("offset " << off) {
      check_bad_model(parse(img), {image_name, "tensor odd.f16", "out of bounds",
                                   std::to_string(off), std::to_string(img.size()) + " bytes"});
    }
  }
}

BOOST_AUTO_TEST_CASE(unknown_tensor_type_is_rejected_by_number) {
  auto img = round_trip_writer().serialize();
  auto l = walk(img);
  for (uint32_t type : {99u, 4u, 31u, 0xffffffffu}) {  // 4 and 31 are holes in ggml's numbering
    poke<uint32_t>(img, l.tensors[index_of(l.tensor_names, "rows.q8_0")].type, type);
    check_bad_model(parse(img),
                    {image_name, "tensor rows.q8_0", "unknown type " + std::to_string(type)});
  }
}

BOOST_AUTO_TEST_CASE(dimension_counts_outside_1_to_4_are_rejected) {
  auto img = round_trip_writer().serialize();
  auto l = walk(img);
  auto at = l.tensors[index_of(l.tensor_names, "cube.f16")].n_dims;
  for (uint32_t n : {0u, 5u, 1000000u}) {
    poke<uint32_t>(img, at, n);
    check_bad_model(parse(img), {image_name, "tensor cube.f16",
                                 "has " + std::to_string(n) + " dims, expected 1 to 4"});
  }
}

BOOST_AUTO_TEST_CASE(zero_or_huge_dimensions_are_rejected) {
  auto img = round_trip_writer().serialize();
  auto l = walk(img);
  auto at = l.tensors[index_of(l.tensor_names, "cube.f16")].dims + 8;
  for (uint64_t d : {uint64_t{0}, uint64_t{1} << 41, ~uint64_t{0}}) {
    poke<uint64_t>(img, at, d);
    check_bad_model(parse(img), {image_name, "tensor cube.f16",
                                 "dimension " + std::to_string(d) + ", out of range"});
  }
  // Each dimension in range, the product not (2^30 * 2^30 elements).
  auto img2 = round_trip_writer().serialize();
  auto q = l.tensors[index_of(l.tensor_names, "four.f32")].dims;
  poke<uint64_t>(img2, q, uint64_t{1} << 30);
  poke<uint64_t>(img2, q + 8, uint64_t{1} << 30);
  check_bad_model(parse(img2), {image_name, "tensor four.f32", "out of range"});
}

BOOST_AUTO_TEST_CASE(q8_0_rows_must_be_whole_blocks) {
  gguf_writer w;
  w.add_tensor("bad.q8_0", {48, 2}, dtype::q8_0, std::vector<uint8_t>(3 * 34));
  check_bad_model(parse(w.serialize()),
                  {image_name, "tensor bad.q8_0", "row length 48", "not a multiple of 32", "q8_0"});
  // The rows of a matrix are whole blocks even when the element count is a multiple of 32.
  gguf_writer w2;
  w2.add_tensor("bad.q8_0", {16, 4}, dtype::q8_0, std::vector<uint8_t>(2 * 34));
  check_bad_model(parse(w2.serialize()), {image_name, "tensor bad.q8_0", "row length 16"});
}

BOOST_AUTO_TEST_CASE(misaligned_tensor_offset_is_rejected) {
  auto img = round_trip_writer().serialize();
  auto l = walk(img);
  auto at = l.tensors[index_of(l.tensor_names, "rows.q8_0")].offset;
  uint64_t off = peek<uint64_t>(img, at) + 4;
  poke<uint64_t>(img, at, off);
  check_bad_model(parse(img), {image_name, "tensor rows.q8_0",
                               "offset " + std::to_string(off) + " is not a multiple of 32"});
}

BOOST_AUTO_TEST_CASE(general_alignment_must_be_a_power_of_two_up_to_65536) {
  for (uint32_t a : {0u, 3u, 48u, 131072u}) {
    auto w = round_trip_writer();
    w.add_uint32("general.alignment", a);
    check_bad_model(parse(w.serialize()),
                    {image_name, "general.alignment is " + std::to_string(a), "power of two"});
  }
  auto w = round_trip_writer();
  w.add_string("general.alignment", "32");
  check_bad_model(parse(w.serialize()), {image_name, "general.alignment"});
}

BOOST_AUTO_TEST_CASE(unknown_metadata_value_types_are_rejected_by_number) {
  auto img = round_trip_writer().serialize();
  auto l = walk(img);
  auto i = index_of(l.keys, "t.f32");
  poke<uint32_t>(img, l.kv_value[i] - 4, 13);
  check_bad_model(parse(img), {image_name, "key t.f32", "unknown value type 13"});

  auto img2 = round_trip_writer().serialize();
  auto j = index_of(l.keys, "t.i32s");
  for (uint32_t elem : {static_cast<uint32_t>(gguf_type::array), 77u}) {
    poke<uint32_t>(img2, l.kv_value[j], elem);
    check_bad_model(parse(img2),
                    {image_name, "key t.i32s", "unsupported element type " + std::to_string(elem)});
  }
}

BOOST_AUTO_TEST_CASE(a_missing_file_is_not_found_naming_the_path) {
  test::temp_dir dir("gguf_missing");
  auto path = (dir.path / "absent.gguf").string();
  auto f = gguf_file::open(path);
  BOOST_REQUIRE(!f);
  check_error(f.error(), errc::not_found, {path});
  auto m = model::load(path);
  BOOST_REQUIRE(!m);
  check_error(m.error(), errc::not_found, {path});
}

BOOST_AUTO_TEST_CASE(open_reports_errors_with_the_path) {
  test::temp_dir dir("gguf_open_errors");
  auto img = round_trip_writer().serialize();
  poke<uint32_t>(img, 4, 1);
  auto path = (dir.path / "v1.gguf").string();
  write_file(path, img, img.size());
  check_bad_model(gguf_file::open(path), {path, "unsupported GGUF version 1"});
  write_file(path, img, 0);
  check_bad_model(gguf_file::open(path), {path, "0 bytes"});
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================================
BOOST_AUTO_TEST_SUITE(huge_counts)

/// Parses `img` and asserts it fails as bad_model without any large allocation.
void check_fails_small(const bytes& img, std::initializer_list<std::string> parts) {
  largest_allocation = 0;
  probing = true;
  auto start = std::chrono::steady_clock::now();
  auto f = parse(img);
  auto elapsed = std::chrono::steady_clock::now() - start;
  probing = false;
  check_bad_model(f, parts);
  BOOST_TEST(largest_allocation.load() < (size_t{1} << 20),
             "largest allocation " << largest_allocation.load());
  BOOST_TEST(elapsed < std::chrono::milliseconds(100));
}

BOOST_AUTO_TEST_CASE(the_allocation_probe_sees_the_image_copy) {
  // Guards the probe itself: parse copies the image, so the largest allocation is at least that.
  bytes img = round_trip_writer().serialize();
  img.resize(img.size() + (size_t{2} << 20), 0);
  largest_allocation = 0;
  probing = true;
  auto f = parse(img);
  probing = false;
  BOOST_TEST(static_cast<bool>(f));
  BOOST_TEST(largest_allocation.load() >= img.size());
}

BOOST_AUTO_TEST_CASE(impossible_metadata_and_tensor_counts_fail_before_allocating) {
  auto img = round_trip_writer().serialize();
  for (uint64_t n : {uint64_t{1} << 60, ~uint64_t{0}, uint64_t{1} << 32}) {
    auto a = img;
    poke<uint64_t>(a, 16, n);  // metadata count
    check_fails_small(a, {image_name, "truncated file", std::to_string(n) + " metadata entries"});
    auto b = img;
    poke<uint64_t>(b, 8, n);  // tensor count
    check_fails_small(b, {image_name, "truncated file", std::to_string(n) + " tensors"});
  }
}

BOOST_AUTO_TEST_CASE(impossible_array_lengths_fail_before_allocating) {
  auto img = round_trip_writer().serialize();
  auto l = walk(img);
  for (const char* key : {"t.strs", "t.f32s", "t.i32s"}) {
    for (uint64_t n : {uint64_t{1} << 62, ~uint64_t{0}, uint64_t{1} << 28}) {
      auto a = img;
      poke<uint64_t>(a, l.kv_value[index_of(l.keys, key)] + 4, n);
      check_fails_small(a,
                        {image_name, std::string("array ") + key, std::to_string(n) + " elements"});
    }
  }
}

BOOST_AUTO_TEST_CASE(impossible_string_lengths_fail_before_allocating) {
  auto img = round_trip_writer().serialize();
  auto l = walk(img);
  for (uint64_t n : {uint64_t{1} << 63, ~uint64_t{0}, uint64_t{1} << 30}) {
    auto a = img;  // a key
    poke<uint64_t>(a, l.kv[index_of(l.keys, "t.str")], n);
    check_fails_small(a, {image_name, "metadata key of length " + std::to_string(n)});
    auto b = img;  // a string value
    poke<uint64_t>(b, l.kv_value[index_of(l.keys, "t.str")], n);
    check_fails_small(b, {image_name, "value of t.str of length " + std::to_string(n)});
    auto c = img;  // an array element
    poke<uint64_t>(c, l.kv_value[index_of(l.keys, "t.strs")] + 12, n);
    check_fails_small(c, {image_name, "element of t.strs of length " + std::to_string(n)});
    auto d = img;  // a tensor name
    poke<uint64_t>(d, l.tensors[1].name, n);
    check_fails_small(d, {image_name, "tensor name of length " + std::to_string(n)});
  }
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================================
BOOST_AUTO_TEST_SUITE(model_load)

BOOST_AUTO_TEST_CASE(the_synthesized_model_loads_with_its_configuration) {
  test::temp_dir dir("gguf_model_synth");
  auto img = synthesized_image();
  auto path = (dir.path / "synth.gguf").string();
  write_file(path, img, img.size());
  auto m = model::load(path);
  BOOST_REQUIRE_MESSAGE(m, why(m));
  auto& c = (*m)->config();
  BOOST_TEST(c.dim == 64);
  BOOST_TEST(c.n_layers == 1);
  BOOST_TEST(c.n_heads == 4);
  BOOST_TEST(c.n_kv_heads == 2);
  BOOST_TEST(c.head_dim == 16);
  BOOST_TEST(c.ffn_dim == 128);
  BOOST_TEST(c.ctx_len == 64);
  BOOST_TEST(c.vocab_size == static_cast<int32_t>(byte_vocab().tokens.size()));
  BOOST_TEST((*m)->format() == "gguf v3");
  BOOST_TEST((*m)->layers().size() == 1u);

  poke<uint32_t>(img, 4, 2);
  write_file(path, img, img.size());
  auto m2 = model::load(path);
  BOOST_REQUIRE_MESSAGE(m2, why(m2));
  BOOST_TEST((*m2)->format() == "gguf v2");
}

BOOST_AUTO_TEST_CASE(the_unmodified_test_variant_loads) {
  // The variants below differ from this one in one thing each, so each error is that thing's.
  test::temp_dir dir("gguf_model_variant");
  auto m = load_variant(dir, build_llama({}));
  BOOST_REQUIRE_MESSAGE(m, why(m));
  BOOST_TEST((*m)->config().dim == 64);
  BOOST_TEST((*m)->config().n_kv_heads == 2);
  BOOST_TEST((*m)->config().tied_output == false);
}

BOOST_AUTO_TEST_CASE(a_missing_required_key_is_named) {
  test::temp_dir dir("gguf_model_missing_key");
  for (const char* key : {"llama.block_count", "llama.embedding_length", "llama.context_length",
                          "general.architecture", "llama.attention.head_count"}) {
    llama_spec s;
    s.drop = {key};
    auto m = load_variant(dir, build_llama(s));
    BOOST_TEST_CONTEXT("without " << key) {
      check_bad_model(
          m, {(dir.path / "variant.gguf").string(), std::string("missing required key ") + key});
    }
  }
}

BOOST_AUTO_TEST_CASE(a_missing_required_tensor_is_named) {
  test::temp_dir dir("gguf_model_missing_tensor");
  for (const char* name : {"blk.0.attn_q.weight", "blk.0.ffn_norm.weight", "output_norm.weight",
                           "token_embd.weight"}) {
    llama_spec s;
    s.drop = {name};
    auto m = load_variant(dir, build_llama(s));
    BOOST_TEST_CONTEXT("without " << name) {
      check_bad_model(m, {(dir.path / "variant.gguf").string(),
                          std::string("missing required tensor ") + name});
    }
  }
}

BOOST_AUTO_TEST_CASE(a_shape_mismatch_names_the_tensor_and_both_shapes) {
  test::temp_dir dir("gguf_model_shape");
  llama_spec s;
  s.dims["blk.0.attn_k.weight"] = {64, 64};
  check_bad_model(load_variant(dir, build_llama(s)),
                  {"variant.gguf", "tensor blk.0.attn_k.weight", "[64, 64]", "expected [64, 32]"});
  llama_spec s2;
  s2.dims["blk.0.ffn_down.weight"] = {128, 64, 1};
  check_bad_model(load_variant(dir, build_llama(s2)),
                  {"tensor blk.0.ffn_down.weight", "[128, 64, 1]", "expected [128, 64]"});
  llama_spec s3;
  s3.dims["output_norm.weight"] = {32};
  check_bad_model(load_variant(dir, build_llama(s3)),
                  {"tensor output_norm.weight", "[32]", "expected [64]"});
}

BOOST_AUTO_TEST_CASE(another_architecture_is_rejected_by_name) {
  test::temp_dir dir("gguf_model_arch");
  llama_spec s;
  s.arch = "gpt2";
  check_bad_model(load_variant(dir, build_llama(s)),
                  {"variant.gguf", "general.architecture is 'gpt2'", "expected 'llama'"});
}

BOOST_AUTO_TEST_CASE(a_tensor_type_keel_cannot_compute_with_is_named) {
  test::temp_dir dir("gguf_model_q4");
  for (dtype t : {dtype::q8_1, dtype::i8, dtype::f64, dtype::i32}) {
    llama_spec s;
    s.types["blk.0.ffn_up.weight"] = t;
    check_bad_model(load_variant(dir, build_llama(s)),
                    {"variant.gguf", "tensor blk.0.ffn_up.weight",
                     "has type " + std::string(dtype_name(t)), "does not compute with",
                     "q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q4_k, q5_k and q6_k"});
  }
}

BOOST_AUTO_TEST_CASE(a_huge_block_count_fails_on_the_first_missing_layer_without_allocating) {
  test::temp_dir dir("gguf_model_layers");
  llama_spec s;
  s.uints["llama.block_count"] = (uint64_t{1} << 30) - 1;
  auto w = build_llama(s);
  auto path = (dir.path / "variant.gguf").string();
  BOOST_REQUIRE(!w.write(path));
  largest_allocation = 0;
  probing = true;
  auto m = model::load(path);
  probing = false;
  check_bad_model(m, {"variant.gguf", "missing required tensor blk.1.attn_q.weight"});
  BOOST_TEST(largest_allocation.load() < (size_t{16} << 20));
}

BOOST_AUTO_TEST_CASE(a_block_count_beyond_the_limit_is_named) {
  test::temp_dir dir("gguf_model_layers_limit");
  llama_spec s;
  s.uints["llama.block_count"] = uint64_t{1} << 40;
  check_bad_model(load_variant(dir, build_llama(s)),
                  {"variant.gguf", "llama.block_count is 1099511627776"});
}

BOOST_AUTO_TEST_CASE(a_head_size_whose_projection_overflows_is_rejected) {
  test::temp_dir dir("gguf_model_head_dim");
  llama_spec s;
  s.drop = {"llama.rope.dimension_count"};
  s.uints["llama.attention.key_length"] = uint64_t{1} << 29;  // 4 heads: 2^31 query rows
  check_bad_model(load_variant(dir, build_llama(s)),
                  {"variant.gguf", "llama.attention.key_length", "536870912"});
}

BOOST_AUTO_TEST_CASE(a_gguf_file_without_the_magic_is_a_bad_gguf_not_llama2c) {
  test::temp_dir dir("gguf_model_magic");
  auto img = synthesized_image();
  img[3] = 'X';
  auto path = (dir.path / "nomagic.gguf").string();
  write_file(path, img, img.size());
  check_bad_model(model::load(path), {path, "not a GGUF file", "magic"});
}

BOOST_AUTO_TEST_SUITE_END()

// ============================================================================================
BOOST_AUTO_TEST_SUITE(fuzz)

namespace {

uint64_t scalar_bytes(const gguf_kv& kv, gguf_type t, size_t index) {
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
      return 8;
    case gguf_type::string:
      return 8 + (kv.type == gguf_type::array ? kv.strings[index].size() : kv.s.size());
    default:
      return 0;
  }
}

/// Where the data section of a parsed file starts, recomputed from what was parsed (not from
/// the reader's own position), so that a reader that lost its place is caught.
uint64_t data_section_of(const gguf_file& f) {
  uint64_t pos = 24;
  for (auto& kv : f.metadata()) {
    pos += 8 + kv.key.size() + 4;
    if (kv.type == gguf_type::array) {
      pos += 12;
      size_t n = kv.elem == gguf_type::string                               ? kv.strings.size()
                 : (kv.elem == gguf_type::f32 || kv.elem == gguf_type::f64) ? kv.floats.size()
                                                                            : kv.ints.size();
      for (size_t i = 0; i < n; ++i) pos += scalar_bytes(kv, kv.elem, i);
    } else {
      pos += scalar_bytes(kv, kv.type, 0);
    }
  }
  for (auto& t : f.tensors()) pos += 8 + t.name.size() + 4 + 8 * t.dims.size() + 4 + 8;
  return (pos + f.alignment() - 1) / f.alignment() * f.alignment();
}

struct fuzz_stats {
  size_t parsed_ok = 0;
  size_t parse_errors = 0;
  size_t loaded_ok = 0;
  size_t load_errors = 0;
};

/// Parses the first `size` bytes of `img` and loads them from `path` as a model: each must
/// succeed or fail with a classified error and a message; a success must keep every tensor
/// inside the image.
void exercise(const bytes& img, size_t size, const std::string& path, bool load,
              fuzz_stats& stats) {
  try {
    auto f = gguf_file::parse(image_name, img.data(), size);
    if (!f) {
      ++stats.parse_errors;
      if (message_of(f.error()).empty() || code_of(f.error()) != errc::bad_model)
        BOOST_ERROR("parse error without a message or class: " << test::why(f));
    } else {
      ++stats.parsed_ok;
      uint64_t start = data_section_of(*f);
      bool inside = f->tensors().empty() || start <= size;
      for (auto& t : f->tensors()) {
        uint64_t n = 1;
        for (auto d : t.dims) n *= d;
        auto lay = layout_of(t.type);
        inside = inside && lay && n == t.n_elements && t.n_bytes == bytes_of(*lay, n) &&
                 t.offset <= size - start && t.n_bytes <= size - start - t.offset &&
                 std::memcmp(t.data, img.data() + start + t.offset, t.n_bytes) == 0;
      }
      if (!inside) BOOST_ERROR("a tensor lies outside the image or at the wrong place");
    }
    if (load) {
      write_file(path, img, size);
      auto m = model::load(path);
      if (!m) {
        ++stats.load_errors;
        if (message_of(m.error()).empty()) BOOST_ERROR("load error without a message");
      } else {
        ++stats.loaded_ok;
      }
    }
  } catch (const std::exception& e) {
    BOOST_ERROR("exception: " << e.what());
  } catch (...) {
    BOOST_ERROR("unknown exception");
  }
}

}  // namespace

BOOST_AUTO_TEST_CASE(every_truncation_fails_cleanly, *boost::unit_test::timeout(120)) {
  test::temp_dir dir("gguf_fuzz_truncate");
  auto path = (dir.path / "cut.gguf").string();
  auto img = synthesized_image();
  auto l = walk(img);
  fuzz_stats stats;
  for (size_t n = 0; n <= l.info_end; ++n) {
    BOOST_TEST_CONTEXT("length " << n) {
      exercise(img, n, path, n < 64 || n % 5 == 0, stats);
    }
  }
  std::mt19937_64 rng(7);
  auto whole = gguf_file::parse(image_name, img.data(), img.size());
  BOOST_REQUIRE(whole);
  uint64_t data_end = 0;  // the end of the last tensor's bytes: cuts before it lose data
  for (auto& t : whole->tensors())
    data_end = std::max(data_end, l.data_start + t.offset + t.n_bytes);
  std::uniform_int_distribution<size_t> in_data(l.data_start, data_end - 1);
  for (int i = 0; i < 300; ++i) {
    size_t n = in_data(rng);
    BOOST_TEST_CONTEXT("length " << n) {
      exercise(img, n, path, i % 3 == 0, stats);
    }
  }
  // Every cut before the last tensor ends leaves something missing.
  BOOST_TEST(stats.parsed_ok == 0u);
  BOOST_TEST(stats.loaded_ok == 0u);
  BOOST_TEST(stats.parse_errors == l.info_end + 1 + 300);
  exercise(img, img.size(), path, true, stats);
  BOOST_TEST(stats.parsed_ok == 1u);
  BOOST_TEST(stats.loaded_ok == 1u);
}

BOOST_AUTO_TEST_CASE(random_corruption_never_crashes_or_escapes_the_image,
                     *boost::unit_test::timeout(120)) {
  test::temp_dir dir("gguf_fuzz_flip");
  auto path = (dir.path / "flip.gguf").string();
  const auto base = synthesized_image();
  auto l = walk(base);
  std::mt19937_64 rng(20240611);
  // Every count, length, type, dimension and offset field, and every scalar metadata value, so
  // that many mutations land on the numbers the reader and the loader act on rather than on
  // vocabulary text.
  struct field {
    size_t at;
    size_t width;
  };
  std::vector<field> structure{{4, 4}, {8, 8}, {16, 8}};
  std::vector<field> values;
  for (size_t k = 0; k < l.kv.size(); ++k) {
    auto type = static_cast<gguf_type>(peek<uint32_t>(base, l.kv_value[k] - 4));
    structure.insert(structure.end(), {{l.kv[k], 8}, {l.kv_value[k] - 4, 4}});
    if (type == gguf_type::array) {
      structure.insert(structure.end(), {{l.kv_value[k], 4}, {l.kv_value[k] + 4, 8}});
    } else if (type == gguf_type::string) {
      structure.push_back({l.kv_value[k], 8});
    } else {
      values.push_back({l.kv_value[k], scalar_size(static_cast<uint32_t>(type), base, 0)});
    }
  }
  for (auto& t : l.tensors) {
    structure.insert(
        structure.end(),
        {{t.name, 8}, {t.n_dims, 4}, {t.dims, 8}, {t.dims + 8, 8}, {t.type, 4}, {t.offset, 8}});
  }
  std::uniform_int_distribution<size_t> in_header(0, l.info_end - 1);
  std::uniform_int_distribution<size_t> anywhere(0, base.size() - 1);
  std::uniform_int_distribution<size_t> pick_structure(0, structure.size() - 1);
  std::uniform_int_distribution<size_t> pick_value(0, values.size() - 1);
  std::uniform_int_distribution<int> kind(0, 9), count(1, 8), bit(0, 7), byte(0, 255);
  const uint64_t interesting[] = {0,
                                  1,
                                  2,
                                  3,
                                  4,
                                  5,
                                  8,
                                  31,
                                  32,
                                  33,
                                  0x7f,
                                  0xff,
                                  0xffff,
                                  uint64_t{1} << 20,
                                  uint64_t{1} << 24,
                                  (uint64_t{1} << 29) + 1,
                                  0x7fffffffull,
                                  0xffffffffull,
                                  uint64_t{1} << 32,
                                  uint64_t{1} << 40,
                                  uint64_t{1} << 60,
                                  uint64_t{1} << 63,
                                  ~uint64_t{0}};
  std::uniform_int_distribution<size_t> pick(0, std::size(interesting) - 1);
  fuzz_stats stats;
  const int rounds = 5000;
  bytes img;
  for (int i = 0; i < rounds; ++i) {
    img = base;
    int n = i % 3 == 0 ? 1 : count(rng);  // one change alone often keeps the file parseable
    for (int k = 0; k < n; ++k) {
      field f{0, 1};
      switch (i % 4) {
        case 0:
          f = structure[pick_structure(rng)];
          break;
        case 1:
          f = values[pick_value(rng)];
          break;
        case 2:
          f = {in_header(rng), 1};
          break;
        default:
          f = {i % 8 == 3 ? anywhere(rng) : in_header(rng), 1};
          break;
      }
      int how = kind(rng);
      size_t at = f.at + std::uniform_int_distribution<size_t>(0, f.width - 1)(rng);
      if (how < 5) {
        img[at] ^= static_cast<uint8_t>(1u << bit(rng));
      } else if (how < 8) {
        img[at] = static_cast<uint8_t>(byte(rng));
      } else {
        // The whole field (or 4 or 8 bytes anywhere) set to an edge value.
        uint64_t v = interesting[pick(rng)];
        size_t width = f.width > 1 ? f.width : how == 8 ? 8 : 4;
        at = std::min(f.at, img.size() - width);
        std::memcpy(img.data() + at, &v, width);
      }
    }
    BOOST_TEST_CONTEXT("round " << i) {
      exercise(img, img.size(), path, true, stats);
    }
  }
  BOOST_TEST_MESSAGE("parsed " << stats.parsed_ok << ", parse errors " << stats.parse_errors
                               << ", loaded " << stats.loaded_ok << ", load errors "
                               << stats.load_errors);
  // The corruption must reach both outcomes, or the test exercises nothing.
  BOOST_TEST(stats.parse_errors > static_cast<size_t>(rounds / 10));
  BOOST_TEST(stats.parsed_ok > static_cast<size_t>(rounds / 10));
  BOOST_TEST(stats.load_errors > static_cast<size_t>(rounds / 10));
  BOOST_TEST(stats.loaded_ok > 0u);
}

BOOST_AUTO_TEST_SUITE_END()
