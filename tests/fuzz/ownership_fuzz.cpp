// libFuzzer target: the ownership protocol's codec (actors/ownership_codec.hpp,
// wire/ownership.capnp): `decode_ownership_msg`, the bytes a peer sends a member, and
// `decode_stored_session`, the bytes a member reads back from its store (docs/wire.md, "Fuzzing").
//
// Properties, for any input and each decoder: it returns a value or `bad_request` (no crash, no
// sanitizer report, no other error class); what decodes re-encodes to bytes that decode to an
// equal value (field by field), and encoding that again gives the same bytes.

#include <cstdint>
#include <string>
#include <string_view>

#include "actors/ownership_codec.hpp"
#include "base/error.hpp"
#include "tests/fuzz/fuzz_support.hpp"
#include "tests/ownership_fields.hpp"

using namespace keel;

namespace {

session_data data_of(size_t turns) {
  session_data d;
  d.meta = std::string("temperature=0.7\0seed=42", 23);
  for (size_t i = 0; i < turns; ++i)
    d.turns.push_back(
        {"user text " + std::to_string(i), {1, 15043, -7, int32_t(i)}, i + 1 < turns});
  return d;
}

fuzz::seeds ownership_seeds() {
  fuzz::seeds out;
  ballot a{3, "node-a"}, b{4, "node-b"};
  out.emplace_back("heartbeat",
                   encode(ownership_msg{heartbeat_msg{100, {{"s-1@a", a}, {"s-2@b", b}}}}));
  out.emplace_back("heartbeat-reply", encode(ownership_msg{heartbeat_reply{100, {a, b}}}));
  out.emplace_back("prepare", encode(ownership_msg{prepare_msg{"s-1@a", b, 200}}));
  out.emplace_back("promise-ok",
                   encode(ownership_msg{promise_reply{
                       "s-1@a", b, 200, true, {}, 459'000'000, a, data_of(2), false}}));
  out.emplace_back(
      "promise-refused",
      encode(ownership_msg{promise_reply{"s-1@a", a, 200, false, b, 0, {}, {}, true}}));
  out.emplace_back("write", encode(ownership_msg{write_msg{"s-1@a", b, 5, true, data_of(3), 300}}));
  out.emplace_back(
      "write-reply",
      encode(ownership_msg{write_reply{"s-1@a", b, 5, true, 300, false, true, {5, "node-c"}}}));
  out.emplace_back("stored-empty", encode(stored_session{}));
  out.emplace_back("stored", encode(stored_session{b, a, data_of(3)}));
  return out;
}

/// Checks the properties for one decoder, `decode`, on `bytes`.
template <class Decode>
void check(std::string_view bytes, Decode decode, const char* what) {
  auto v = decode(bytes);
  if (!v) {
    if (code_of(v.error()) != errc::bad_request)
      fuzz::broken(std::string(what) + ": decode failed with " + describe(v.error()) +
                   ", not bad_request");
    return;
  }
  auto again = encode(*v);
  auto w = decode(again);
  if (!w)
    fuzz::broken(std::string(what) +
                 ": a decoded value re-encodes to bytes that fail: " + describe(w.error()));
  if (!test::same(*v, *w)) fuzz::broken(std::string(what) + ": re-encoding changed the value");
  if (encode(*w) != again) fuzz::broken(std::string(what) + ": encoding one value twice differs");
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  fuzz::write_corpus_if_asked(*argc, *argv, ownership_seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  check(bytes, decode_ownership_msg, "ownership message");
  check(bytes, decode_stored_session, "stored session");
  return 0;
}
