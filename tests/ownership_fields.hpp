#pragma once

// Field-by-field equality of the ownership protocol's messages and stored state
// (actors/ownership.hpp declares no operator== for them), for ownership_codec_test and
// tests/fuzz/ownership_fuzz.cpp. Each `fields` binds every member by name, so a member added to
// ownership.hpp stops the build here until it is compared.

#include <string>
#include <tuple>
#include <variant>

#include "actors/ownership.hpp"

namespace keel::test {

inline auto fields(const heartbeat_msg& m) {
  const auto& [sent, claims] = m;
  return std::tie(sent, claims);
}
inline auto fields(const heartbeat_reply& m) {
  const auto& [sent, promised] = m;
  return std::tie(sent, promised);
}
inline auto fields(const prepare_msg& m) {
  const auto& [session, b, sent] = m;
  return std::tie(session, b, sent);
}
inline auto fields(const promise_reply& m) {
  const auto& [session, b, sent, ok, promised, wait, accepted, data, starting] = m;
  return std::tie(session, b, sent, ok, promised, wait, accepted, data, starting);
}
inline auto fields(const write_msg& m) {
  const auto& [session, b, seq, durable, data, sent] = m;
  return std::tie(session, b, seq, durable, data, sent);
}
inline auto fields(const write_reply& m) {
  const auto& [session, b, seq, durable, sent, ok, disk_failed, promised] = m;
  return std::tie(session, b, seq, durable, sent, ok, disk_failed, promised);
}
inline auto fields(const stored_session& s) {
  const auto& [promised, accepted, data] = s;
  return std::tie(promised, accepted, data);
}

template <class T>
bool same(const T& a, const T& b) {
  return fields(a) == fields(b);
}

inline bool same(const ownership_msg& a, const ownership_msg& b) {
  if (a.index() != b.index()) return false;
  return std::visit([&](const auto& x) { return same(x, std::get<std::decay_t<decltype(x)>>(b)); },
                    a);
}

/// "write", "promise", ... (for test messages).
inline std::string kind_of(const ownership_msg& m) {
  static const char* names[] = {"heartbeat", "heartbeat reply", "prepare",
                                "promise",   "write",           "write reply"};
  return names[m.index()];
}

}  // namespace keel::test
