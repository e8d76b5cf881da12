#include "storage/envelope.hpp"

#include <cstdio>

#include "storage/crc32c.hpp"

namespace keel::storage {

namespace {

void put_le(std::string& out, uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xFF));
}

uint64_t get_le(std::string_view in, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v |= uint64_t(static_cast<unsigned char>(in[at + i])) << (8 * i);
  return v;
}

uint32_t checksum(std::string_view key, std::string_view header16, std::string_view payload) {
  std::string len;
  put_le(len, key.size(), 4);
  uint32_t c = crc32c(len);
  c = crc32c_extend(c, key);
  c = crc32c_extend(c, header16);
  return crc32c_extend(c, payload);
}

std::string hex(uint64_t v, int digits) {
  char buf[24];
  std::snprintf(buf, sizeof buf, "0x%0*llx", digits, static_cast<unsigned long long>(v));
  return buf;
}

caf::error corrupt(std::string reason) {
  return make_error(errc::corrupt_record, std::move(reason));
}

}  // namespace

const char* to_string(record_kind k) {
  switch (k) {
    case record_kind::session:
      return "session";
    case record_kind::turn_log:
      return "turn log";
    case record_kind::meta:
      return "meta";
    case record_kind::ownership:
      return "ownership";
  }
  return "unknown";
}

std::string encode_envelope(std::string_view key, record_kind kind, uint64_t epoch,
                            std::string_view payload) {
  std::string out;
  out.reserve(envelope_header_size + payload.size());
  put_le(out, envelope_format, 2);
  out.push_back(static_cast<char>(kind));
  out.push_back(0);
  put_le(out, payload.size(), 4);
  put_le(out, epoch, 8);
  put_le(out, checksum(key, out, payload), 4);
  out.append(payload);
  return out;
}

caf::expected<envelope> decode_envelope(std::string_view key, record_kind kind,
                                        std::string_view bytes) {
  if (bytes.size() < envelope_header_size)
    return corrupt("truncated: " + std::to_string(bytes.size()) + " bytes, shorter than the " +
                   std::to_string(envelope_header_size) + "-byte envelope header");
  auto format = get_le(bytes, 0, 2);
  if (format != envelope_format)
    return corrupt("unknown envelope format " + hex(format, 4) + " (this build reads " +
                   hex(envelope_format, 4) + ")");
  auto length = get_le(bytes, 4, 4);
  auto held = bytes.size() - envelope_header_size;
  if (length != held)
    return corrupt((held < length ? "truncated: header says " : "length mismatch: header says ") +
                   std::to_string(length) + " payload bytes, record holds " + std::to_string(held));
  auto stored = static_cast<uint32_t>(get_le(bytes, 16, 4));
  auto payload = bytes.substr(envelope_header_size);
  auto computed = checksum(key, bytes.substr(0, 16), payload);
  if (stored != computed)
    return corrupt("checksum mismatch: stored " + hex(stored, 8) + ", computed " +
                   hex(computed, 8));
  // Kind and flags are covered by the checksum, so a mismatch here is a record written by a
  // buggy or newer writer, not bit rot; it is refused all the same.
  auto got = static_cast<uint8_t>(bytes[2]);
  if (got != static_cast<uint8_t>(kind))
    return corrupt("record kind " + std::to_string(got) + ", expected " +
                   std::to_string(static_cast<int>(kind)) + " (" + to_string(kind) + ")");
  if (bytes[3] != 0)
    return corrupt("unknown envelope flags " + hex(static_cast<uint8_t>(bytes[3]), 2));
  envelope e;
  e.kind = kind;
  e.epoch = get_le(bytes, 8, 8);
  e.payload.assign(payload);
  return e;
}

}  // namespace keel::storage
