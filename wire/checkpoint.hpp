#pragma once

// The session record as the node's store keeps it (checkpoint.capnp): encoded here, stored by
// storage::session_store as an opaque payload.

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include <caf/expected.hpp>

#include "base/error.hpp"
#include "base/finish_reason.hpp"
#include "base/turn_message.hpp"
#include "kernels/sampler.hpp"

namespace keel::wire {

/// One turn as stored. Its generated tokens live in the store's turn log, not here.
struct turn_checkpoint {
  uint64_t turn = 0;
  std::vector<int32_t> user;
  int32_t max_tokens = 0;
  bool done = false;
  finish_reason reason = finish_reason::length;
  std::vector<turn_message> messages;  // a chat turn's messages; empty: a text turn
  std::string chat_template;           // on a chat session's first turn: its template's text
  /// A chat turn under a template that rewrites earlier turns: how many of the tokens fed
  /// before it stay (the rest are dropped, and `user` follows them); -1: all of them.
  int64_t keep = -1;
};

/// A session as stored: what a restarted node needs, besides the turn logs, to rebuild it.
struct session_checkpoint {
  std::string id;
  uint64_t number = 0;
  sampling_params params;
  int32_t priority = 0;
  std::vector<turn_checkpoint> turns;
  /// The owner's node name when the record was written: a replica holder finds the sessions of
  /// an owner declared down by it (docs/actors.md, "Takeover").
  std::string owner;
  /// The tenant that opened the session ("" without --keys): every owner enforces it.
  std::string tenant;
  /// The model that serves it (its file's name) and the file's digest, to which the session is
  /// pinned ("": not pinned, a record from before the field).
  std::string model;
  std::string model_digest;
  /// The session's own context length (shortened under load); 0: the model's.
  uint32_t context_limit = 0;
};

/// The checkpoint format version this build writes: 1, or 2 for a record with a turn that keeps
/// part of what was fed (`turn_checkpoint::keep`), so that a build that reads only version 1
/// refuses it rather than feed such a turn wrongly. It reads both.
inline constexpr uint16_t checkpoint_format_version = 1;
inline constexpr uint16_t checkpoint_format_version_keep = 2;

/// A checkpoint.capnp message (unpacked, flat).
std::string encode(const session_checkpoint& c);

/// The checkpoint in `bytes`; `corrupt_record` naming what is wrong ("session checkpoint: format
/// version 7, this build reads version 1", "session checkpoint s-3: turn 2 is numbered 5", ...)
/// when the bytes are not a well-formed version-1 checkpoint.
caf::expected<session_checkpoint> decode(std::string_view bytes);

}  // namespace keel::wire
