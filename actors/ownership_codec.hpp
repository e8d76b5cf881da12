#pragma once

// The session-ownership protocol's messages and stored state as bytes (wire/ownership.capnp):
// what a keel-node hosting `ownership` (actors/ownership.hpp) sends its peers and keeps in its
// store (storage::session_store's `ownership` column family holds the bytes of a
// `stored_session`, opaque to it).
//
// Each value is one flat Cap'n Proto message (`capnp::messageToFlatArray`, unpacked). Decoding
// takes hostile bytes: it never throws or crashes, and refuses with `errc::bad_request`, naming
// what was wrong, bytes that are not one well-formed message (empty, not whole 8-byte words,
// truncated, bytes after the message, larger than `max_encoded_size`, over the traversal or
// nesting limit, an unknown or missing message kind) and values the protocol never makes
// (limits in `ownership_limits`):
// - a session name that is empty, longer than 1024 bytes or holds a NUL byte (what the session
//   store takes as an id);
// - a ballot owner longer than 255 bytes;
// - more than 2^16 turns in a session, more than 2^20 tokens in a turn.
// `encode` checks nothing: a value out of those bounds encodes to bytes that decoding refuses.

#include <cstddef>
#include <string>
#include <string_view>

#include <caf/expected.hpp>

#include "actors/ownership.hpp"
#include "base/error.hpp"

namespace keel {

/// What the decoders accept.
namespace ownership_limits {
inline constexpr size_t max_session_name = 1024;
inline constexpr size_t max_ballot_owner = 255;
inline constexpr size_t max_turns = size_t{1} << 16;
inline constexpr size_t max_turn_tokens = size_t{1} << 20;
/// The largest input (bytes); also the ceiling of the Cap'n Proto traversal limit.
inline constexpr size_t max_encoded_size = size_t{64} << 20;
}  // namespace ownership_limits

/// `m` as a flat OwnershipMsg.
std::string encode(const ownership_msg& m);

/// The message in `bytes`; `bad_request` ("ownership message: 13 bytes is not a whole number of
/// words", "ownership message: prepare: empty session name", ...) when they are not one.
caf::expected<ownership_msg> decode_ownership_msg(std::string_view bytes);

/// `s` as a flat StoredSession.
std::string encode(const stored_session& s);

/// The stored session in `bytes`; `bad_request` ("stored session: accepted ballot: owner of 300
/// bytes, at most 255", ...) when they are not one.
caf::expected<stored_session> decode_stored_session(std::string_view bytes);

}  // namespace keel
