#define BOOST_TEST_MODULE ownership_codec_test
#include <boost/test/unit_test.hpp>

// actors/ownership_codec.hpp: every message of the ownership protocol and the stored state
// round-trip field by field; hostile bytes and values out of bounds are refused with
// `bad_request` naming what was wrong, never a crash or an exception.

#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include <capnp/message.h>
#include <capnp/serialize.h>

#include "actors/ownership_codec.hpp"
#include "tests/ownership_fields.hpp"
#include "tests/test_support.hpp"
#include "wire/ownership.capnp.h"

using namespace keel;
using keel::test::fields;
using keel::test::kind_of;
using keel::test::same;
using keel::test::why;
namespace limits = keel::ownership_limits;

namespace {

bool contains(const std::string& s, const std::string& part) {
  return s.find(part) != std::string::npos;
}

session_data sample_data() {
  session_data d;
  d.meta = std::string("temp=0.7\0seed=9", 15);
  d.turns.push_back({"hello", {1, -2, 300000}, true, std::string("eos\0x", 5)});
  d.turns.push_back({std::string("\xff\x00user", 6), {42}, false, {}});
  return d;
}

// One of each message, every field different from its default (checked below).
heartbeat_msg sample_heartbeat() {
  return {-17, {{"s-1@a", {3, "a"}}, {"s-2@b", {9, "node-b"}}}};
}
heartbeat_reply sample_heartbeat_reply() {
  return {123456789012, {{3, "a"}, {10, "c"}}};
}
prepare_msg sample_prepare() {
  return {"s-1@a", {7, "b"}, 5'000'000'001};
}
promise_reply sample_promise() {
  return {"s-1@a", {7, "b"}, 99, true, {8, "c"}, 459'000'000, {6, "a"}, sample_data(), true};
}
write_msg sample_write() {
  return {"s-3@c", {12, "node-c"}, 77, true, sample_data(), -5};
}
write_reply sample_write_reply() {
  return {"s-3@c", {12, "node-c"}, 77, true, 31, true, true, {13, "a"}};
}
stored_session sample_stored() {
  return {{14, "b"}, {13, "a"}, sample_data()};
}

std::vector<ownership_msg> samples() {
  return {sample_heartbeat(), sample_heartbeat_reply(), sample_prepare(),
          sample_promise(),   sample_write(),           sample_write_reply()};
}

/// Whether every field of `a` differs from the same field of `b`.
template <class T>
bool every_field_differs(const T& a, const T& b) {
  return std::apply(
      [&](const auto&... x) {
        return std::apply([&](const auto&... y) { return ((x != y) && ...); }, fields(b));
      },
      fields(a));
}

void require_refused(const caf::error& err, const std::string& part) {
  BOOST_REQUIRE_MESSAGE(err, "expected a refusal naming '" << part << "', got success");
  BOOST_TEST(code_of(err) == errc::bad_request, describe(err));
  BOOST_TEST(contains(message_of(err), part),
             "'" << describe(err) << "' does not say '" << part << "'");
}

template <class T>
void require_refused(const caf::expected<T>& x, const std::string& part) {
  BOOST_REQUIRE_MESSAGE(!x, "expected a refusal naming '" << part << "', got a value");
  require_refused(x.error(), part);
}

template <class Builder>
std::string flat(Builder& msg) {
  auto words = capnp::messageToFlatArray(msg);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

std::string word_bytes(std::initializer_list<uint64_t> words) {
  std::string out;
  for (uint64_t w : words)
    for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((w >> (8 * i)) & 0xFF));
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(the_samples_set_every_field) {
  // Otherwise a field the codec dropped could go unnoticed by the round trips below.
  BOOST_TEST(every_field_differs(sample_heartbeat(), heartbeat_msg{}));
  BOOST_TEST(every_field_differs(sample_heartbeat_reply(), heartbeat_reply{}));
  BOOST_TEST(every_field_differs(sample_prepare(), prepare_msg{}));
  BOOST_TEST(every_field_differs(sample_promise(), promise_reply{}));
  BOOST_TEST(every_field_differs(sample_write(), write_msg{}));
  BOOST_TEST(every_field_differs(sample_write_reply(), write_reply{}));
  BOOST_TEST(every_field_differs(sample_stored(), stored_session{}));
  auto d = sample_data();
  BOOST_TEST((d.turns[0].done && !d.turns[1].done));  // both values of `done` are carried
  BOOST_TEST(!d.turns[0].end.empty());                 // and how a turn ended
}

BOOST_AUTO_TEST_CASE(every_message_kind_round_trips_field_by_field) {
  for (auto& m : samples()) {
    BOOST_TEST_CONTEXT(kind_of(m)) {
      auto bytes = encode(m);
      BOOST_TEST(bytes.size() % 8 == 0u);
      auto back = decode_ownership_msg(bytes);
      BOOST_REQUIRE_MESSAGE(back, why(back));
      BOOST_TEST(back->index() == m.index());
      BOOST_TEST(same(*back, m));
      BOOST_TEST(encode(*back) == bytes);  // deterministic
    }
  }
}

BOOST_AUTO_TEST_CASE(default_messages_round_trip_except_where_a_session_name_is_required) {
  auto hb = decode_ownership_msg(encode(heartbeat_msg{}));
  BOOST_REQUIRE_MESSAGE(hb, why(hb));
  BOOST_TEST(same(*hb, ownership_msg{heartbeat_msg{}}));
  auto hr = decode_ownership_msg(encode(heartbeat_reply{}));
  BOOST_REQUIRE_MESSAGE(hr, why(hr));
  BOOST_TEST(same(*hr, ownership_msg{heartbeat_reply{}}));
  auto st = decode_stored_session(encode(stored_session{}));
  BOOST_REQUIRE_MESSAGE(st, why(st));
  BOOST_TEST(same(*st, stored_session{}));
  require_refused(decode_ownership_msg(encode(prepare_msg{})), "prepare: empty session name");
}

BOOST_AUTO_TEST_CASE(stored_session_round_trips_field_by_field) {
  auto s = sample_stored();
  auto bytes = encode(s);
  auto back = decode_stored_session(bytes);
  BOOST_REQUIRE_MESSAGE(back, why(back));
  BOOST_TEST(same(*back, s));
  BOOST_TEST(encode(*back) == bytes);
}

BOOST_AUTO_TEST_CASE(misaligned_bytes_decode) {
  for (auto& m : samples()) {
    auto bytes = encode(m);
    for (size_t shift = 1; shift < 8; ++shift) {
      std::string buf(shift, 'x');
      buf += bytes;
      auto back = decode_ownership_msg(std::string_view(buf).substr(shift));
      BOOST_REQUIRE_MESSAGE(back, kind_of(m) << " at offset " << shift << ": " << why(back));
      BOOST_TEST(same(*back, m));
    }
  }
  std::string buf = "abc" + encode(sample_stored());
  auto back = decode_stored_session(std::string_view(buf).substr(3));
  BOOST_REQUIRE_MESSAGE(back, why(back));
  BOOST_TEST(same(*back, sample_stored()));
}

BOOST_AUTO_TEST_CASE(odd_sizes_and_empty_input_are_refused) {
  require_refused(decode_ownership_msg(std::string(13, '\0')),
                  "ownership message: 13 bytes is not a whole number of words");
  require_refused(decode_stored_session(std::string(13, '\0')),
                  "stored session: 13 bytes is not a whole number of words");
  require_refused(decode_ownership_msg(""), "ownership message: no bytes");
  require_refused(decode_stored_session(""), "stored session: no bytes");
  auto bytes = encode(sample_write());
  for (size_t extra = 1; extra < 8; ++extra)
    require_refused(decode_ownership_msg(bytes + std::string(extra, '\0')),
                    "is not a whole number of words");
}

BOOST_AUTO_TEST_CASE(truncated_input_is_refused) {
  for (auto& m : samples()) {
    auto bytes = encode(m);
    for (size_t n = 8; n < bytes.size(); n += 8) {
      BOOST_TEST_CONTEXT(kind_of(m) << " cut to " << n << " of " << bytes.size() << " bytes") {
        auto cut = decode_ownership_msg(bytes.substr(0, n));
        BOOST_REQUIRE(!cut);
        BOOST_TEST(code_of(cut.error()) == errc::bad_request, describe(cut.error()));
      }
    }
  }
  auto bytes = encode(sample_stored());
  for (size_t n = 8; n < bytes.size(); n += 8) {
    auto cut = decode_stored_session(bytes.substr(0, n));
    BOOST_REQUIRE_MESSAGE(!cut, "cut to " << n << " bytes");
    BOOST_TEST(code_of(cut.error()) == errc::bad_request, describe(cut.error()));
  }
}

BOOST_AUTO_TEST_CASE(bytes_after_the_message_are_refused) {
  require_refused(decode_ownership_msg(encode(sample_prepare()) + std::string(16, '\0')),
                  "ownership message: 16 bytes after the message");
  require_refused(decode_stored_session(encode(sample_stored()) + std::string(8, '\x01')),
                  "stored session: 8 bytes after the message");
}

BOOST_AUTO_TEST_CASE(garbage_is_refused_or_decoded_never_thrown) {
  std::mt19937_64 rng(20261207);
  size_t refused = 0, decoded = 0;
  auto check = [&](const std::string& bytes, auto decode) {
    auto x = decode(bytes);
    if (!x) {
      ++refused;
      BOOST_TEST(code_of(x.error()) == errc::bad_request, describe(x.error()));
      return;
    }
    ++decoded;
    auto y = decode(encode(*x));  // what decodes is a value the codec carries whole
    BOOST_REQUIRE_MESSAGE(y, why(y));
    BOOST_TEST(same(*x, *y));
  };
  std::vector<std::string> valid;
  for (auto& m : samples()) valid.push_back(encode(m));
  valid.push_back(encode(sample_stored()));
  for (int i = 0; i < 20000; ++i) {
    std::string bytes;
    if (i % 2 == 0) {
      // Random words; half of them with a valid segment table, so that the reader gets past it.
      bytes.assign(8 * (1 + rng() % 16), '\0');
      for (auto& c : bytes) c = static_cast<char>(rng());
      if (i % 4 == 0) bytes.replace(0, 8, word_bytes({uint64_t{bytes.size() / 8 - 1} << 32}));
    } else {
      // A valid encoding with a few bytes changed.
      bytes = valid[rng() % valid.size()];
      for (int k = 1 + static_cast<int>(rng() % 3); k > 0; --k)
        bytes[rng() % bytes.size()] = static_cast<char>(rng());
    }
    BOOST_CHECK_NO_THROW(check(bytes, decode_ownership_msg));
    BOOST_CHECK_NO_THROW(check(bytes, decode_stored_session));
  }
  BOOST_TEST_MESSAGE("garbage: " << refused << " refused, " << decoded << " decoded");
  BOOST_TEST(refused > 1000u);
  BOOST_TEST(decoded > 1000u);  // the changed encodings reach the field checks
  require_refused(decode_ownership_msg(std::string(64, '\xff')), "ownership message: ");
}

BOOST_AUTO_TEST_CASE(input_over_the_size_limit_is_refused_unread) {
  std::string big(limits::max_encoded_size + 8, '\0');
  require_refused(decode_ownership_msg(big), "bytes, at most 67108864");
  require_refused(decode_stored_session(big), "bytes, at most 67108864");
}

BOOST_AUTO_TEST_CASE(a_small_message_that_reads_as_a_large_one_hits_the_traversal_limit) {
  // A heartbeat whose claims list holds a million zero-sized structs in 56 bytes: Cap'n Proto
  // charges each element a word of the traversal limit, which is sized to the input.
  auto bytes = word_bytes({
      uint64_t{6} << 32,                          // one segment of 6 words
      (uint64_t{1} << 32) | (uint64_t{1} << 48),  // root: struct, 1 data word, 1 pointer
      0,                                          // discriminant 0: heartbeat
      (uint64_t{1} << 32) | (uint64_t{1} << 48),  // heartbeat: struct, 1 data word, 1 pointer
      0,                                          // sent
      1 | (uint64_t{7} << 32),                    // claims: list, inline composite, 0 words
      uint64_t{1} << 20 << 2,                     // tag: 2^20 elements of 0 data, 0 pointers
  });
  require_refused(decode_ownership_msg(bytes), "traversal limit");
}

BOOST_AUTO_TEST_CASE(unknown_or_missing_message_kinds_are_refused) {
  auto bytes = encode(sample_prepare());
  bytes[16] = 6;  // the union's discriminant: the first data word of the root
  require_refused(decode_ownership_msg(bytes), "ownership message: unknown message kind 6");

  capnp::MallocMessageBuilder empty;
  empty.initRoot<wire::OwnershipMsg>();  // heartbeat by default, with no body
  require_refused(decode_ownership_msg(flat(empty)), "ownership message: heartbeat without a body");
}

BOOST_AUTO_TEST_CASE(session_names_are_required_and_bounded) {
  auto refuse_name = [](std::string name, const std::string& part) {
    auto p = sample_prepare();
    p.session = name;
    require_refused(decode_ownership_msg(encode(p)), "ownership message: prepare: " + part);
    auto pr = sample_promise();
    pr.session = name;
    require_refused(decode_ownership_msg(encode(pr)), "ownership message: promise: " + part);
    auto w = sample_write();
    w.session = name;
    require_refused(decode_ownership_msg(encode(w)), "ownership message: write: " + part);
    auto wr = sample_write_reply();
    wr.session = name;
    require_refused(decode_ownership_msg(encode(wr)), "ownership message: write reply: " + part);
    auto hb = sample_heartbeat();
    hb.claims[1].first = name;
    require_refused(decode_ownership_msg(encode(hb)),
                    "ownership message: heartbeat: claim 1: " + part);
  };
  refuse_name("", "empty session name");
  refuse_name(std::string(limits::max_session_name + 1, 's'),
              "session name of 1025 bytes, at most 1024");
  refuse_name(std::string("s\0x", 3), "session name holds a NUL byte");

  auto p = sample_prepare();
  p.session = std::string(limits::max_session_name, 's');
  auto back = decode_ownership_msg(encode(p));
  BOOST_REQUIRE_MESSAGE(back, why(back));
  BOOST_TEST(same(*back, ownership_msg{p}));
}

BOOST_AUTO_TEST_CASE(ballot_owners_are_bounded) {
  std::string longest(limits::max_ballot_owner, 'n');
  std::string too_long(limits::max_ballot_owner + 1, 'n');
  auto p = sample_prepare();
  p.b.owner = longest;
  auto back = decode_ownership_msg(encode(p));
  BOOST_REQUIRE_MESSAGE(back, why(back));
  BOOST_TEST(same(*back, ownership_msg{p}));
  p.b.owner = too_long;
  require_refused(decode_ownership_msg(encode(p)),
                  "ownership message: prepare: ballot: owner of 256 bytes, at most 255");

  auto hr = sample_heartbeat_reply();
  hr.promised[1].owner = too_long;
  require_refused(decode_ownership_msg(encode(hr)), "heartbeat reply: promised 1: owner of 256");
  auto pr = sample_promise();
  pr.accepted.owner = too_long;
  require_refused(decode_ownership_msg(encode(pr)), "promise: accepted ballot: owner of 256");
  pr = sample_promise();
  pr.promised.owner = too_long;
  require_refused(decode_ownership_msg(encode(pr)), "promise: promised ballot: owner of 256");
  auto wr = sample_write_reply();
  wr.promised.owner = too_long;
  require_refused(decode_ownership_msg(encode(wr)), "write reply: promised ballot: owner of 256");
  auto hb = sample_heartbeat();
  hb.claims[0].second.owner = too_long;
  require_refused(decode_ownership_msg(encode(hb)), "heartbeat: claim 0: ballot: owner of 256");

  auto s = sample_stored();
  s.promised.owner = too_long;
  require_refused(decode_stored_session(encode(s)),
                  "stored session: promised ballot: owner of 256 bytes, at most 255");
  s = sample_stored();
  s.accepted.owner = too_long;
  require_refused(decode_stored_session(encode(s)), "stored session: accepted ballot: owner");
}

BOOST_AUTO_TEST_CASE(tokens_per_turn_are_bounded) {
  auto s = sample_stored();
  s.data.turns[1].tokens.assign(limits::max_turn_tokens, 7);
  auto back = decode_stored_session(encode(s));
  BOOST_REQUIRE_MESSAGE(back, why(back));
  BOOST_TEST(back->data.turns[1].tokens.size() == limits::max_turn_tokens);
  s.data.turns[1].tokens.push_back(8);
  require_refused(decode_stored_session(encode(s)),
                  "stored session: turn 1 has 1048577 tokens, at most 1048576");

  auto w = sample_write();
  w.data.turns[0].tokens.assign(limits::max_turn_tokens + 1, 7);
  require_refused(decode_ownership_msg(encode(w)), "ownership message: write: turn 0 has 1048577");
  auto pr = sample_promise();
  pr.data.turns[0].tokens.assign(limits::max_turn_tokens + 1, 7);
  require_refused(decode_ownership_msg(encode(pr)), "ownership message: promise: turn 0 has");
}

BOOST_AUTO_TEST_CASE(turns_per_session_are_bounded) {
  auto s = sample_stored();
  s.data.turns.resize(limits::max_turns);
  auto back = decode_stored_session(encode(s));
  BOOST_REQUIRE_MESSAGE(back, why(back));
  BOOST_TEST(back->data.turns.size() == limits::max_turns);
  BOOST_TEST(same(*back, s));
  s.data.turns.emplace_back();
  require_refused(decode_stored_session(encode(s)), "stored session: 65537 turns, at most 65536");

  auto w = sample_write();
  w.data.turns.resize(limits::max_turns + 1);
  require_refused(decode_ownership_msg(encode(w)), "ownership message: write: 65537 turns");
  auto pr = sample_promise();
  pr.data.turns.resize(limits::max_turns + 1);
  require_refused(decode_ownership_msg(encode(pr)), "ownership message: promise: 65537 turns");
}
