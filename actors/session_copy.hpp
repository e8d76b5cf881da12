#pragma once

// A session as the ownership protocol replicates it (actors/ownership.hpp `session_data`): its
// fixed parameters as `meta`, and per turn the user's input and the reply's tokens. The node
// converts its session records to and from it (docs/actors.md, "Ownership protocol").

#include <string>

#include <caf/expected.hpp>

#include "actors/ownership.hpp"
#include "actors/session.hpp"

namespace keel {

/// What never changes in a session: id, sampling parameters, priority, tenant (a checkpoint
/// without turns, owner or node-local number, so that every owner makes the same bytes).
std::string session_meta(const session_record& r);

/// Turn `t`'s input as the protocol stores it: its number, the user's tokens, its token limit,
/// and for a chat turn its messages (and on a chat session's first turn the template).
std::string turn_input(const turn_record& t);

/// Why a turn ended, as the protocol stores it with the turn's end.
std::string turn_end(const turn_record& t);

/// Whether a node whose model has digest `digest` may serve the session of `data`: the session
/// is pinned to no digest (from before the field) or to this one. A copy whose parameters do
/// not decode is not refused here (taking it over reports it).
bool serves_model(const std::string& digest, const session_data& data);

/// The session record of `data`, a copy the protocol handed this node (a takeover, a restart):
/// owned by `self` at `epoch`, `from_copy` set, no node-local number. `corrupt_record` naming
/// the session and the part when a part does not decode.
caf::expected<session_record> record_of(const std::string& id, const session_data& data,
                                        const std::string& self, uint64_t epoch);

}  // namespace keel
