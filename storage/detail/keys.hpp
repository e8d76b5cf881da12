#pragma once

// The session store's keys and token encoding (docs/storage.md, "Column families and keys"),
// shared by session_store.cpp only.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

#include "base/error.hpp"

namespace keel::storage::detail {

inline constexpr size_t max_id_size = 1024;

inline caf::error check_id(const std::string& id) {
  if (id.empty()) return make_error(errc::bad_request, "session id is empty");
  if (id.size() > max_id_size)
    return make_error(errc::bad_request, "session id of " + std::to_string(id.size()) +
                                             " bytes, at most " + std::to_string(max_id_size));
  if (id.find('\0') != std::string::npos)
    return make_error(errc::bad_request, "session id contains a NUL byte");
  return {};
}

// Turn-log keys: session id, a NUL byte, the turn as 8 bytes big endian. Ids contain no NUL, so
// one session's turns are exactly the keys in [id + "\0", id + "\1"), in turn order.
inline std::string turn_key(const std::string& id, uint64_t turn) {
  std::string k = id;
  k.push_back('\0');
  for (int i = 7; i >= 0; --i) k.push_back(static_cast<char>((turn >> (8 * i)) & 0xFF));
  return k;
}

inline std::string turns_begin(const std::string& id) {
  return id + std::string(1, '\0');
}

inline std::string turns_end(const std::string& id) {
  return id + std::string(1, '\1');
}

inline std::optional<std::pair<std::string, uint64_t>> parse_turn_key(std::string_view k) {
  if (k.size() < 10 || k[k.size() - 9] != '\0') return std::nullopt;
  std::string id(k.substr(0, k.size() - 9));
  if (id.find('\0') != std::string::npos) return std::nullopt;
  uint64_t turn = 0;
  for (size_t i = k.size() - 8; i < k.size(); ++i)
    turn = (turn << 8) | static_cast<unsigned char>(k[i]);
  return std::make_pair(std::move(id), turn);
}

inline std::string printable_turn_key(std::string_view k) {
  if (auto p = parse_turn_key(k)) return p->first + "/" + std::to_string(p->second);
  std::string out;
  for (char c : k) out += (c >= 0x20 && c < 0x7f) ? std::string(1, c) : "\\x??";
  return out;
}

inline std::string encode_tokens(const std::vector<int32_t>& tokens) {
  std::string out;
  out.reserve(tokens.size() * 4);
  for (int32_t t : tokens) {
    auto u = static_cast<uint32_t>(t);
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((u >> (8 * i)) & 0xFF));
  }
  return out;
}

inline caf::expected<std::vector<int32_t>> decode_tokens(std::string_view bytes) {
  if (bytes.size() % 4 != 0)
    return make_error(errc::corrupt_record, "turn log of " + std::to_string(bytes.size()) +
                                                " bytes is not a whole number of tokens");
  std::vector<int32_t> out(bytes.size() / 4);
  for (size_t i = 0; i < out.size(); ++i) {
    uint32_t u = 0;
    for (int b = 0; b < 4; ++b)
      u |= uint32_t(static_cast<unsigned char>(bytes[4 * i + b])) << (8 * b);
    out[i] = static_cast<int32_t>(u);
  }
  return out;
}

inline std::string encode_u64(uint64_t v) {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
  return out;
}

}  // namespace keel::storage::detail
