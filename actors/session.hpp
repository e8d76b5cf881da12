#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include <caf/actor.hpp>
#include <caf/actor_system.hpp>

#include "actors/messages.hpp"
#include "actors/node_context.hpp"
#include "actors/supervisor.hpp"

namespace keel {

/// One turn of a conversation.
struct turn_record {
  uint64_t turn = 0;
  std::vector<int32_t> user;       // the user's tokens (BOS first on turn 0)
  std::vector<int32_t> generated;  // the reply so far
  int32_t max_tokens = 0;
  bool done = false;
  finish_reason reason = finish_reason::length;
  caf::actor sink;  // receives the turn's events
};

/// What a session is: enough to rebuild its actor after a crash.
struct session_record {
  std::string id;
  uint64_t number = 0;  // node-unique; a turn's seq_id is (number << 24) | turn
  sampling_params params;
  int32_t priority = 0;
  std::vector<turn_record> turns;
};

/// Sessions' state, written by the session actors on every change and read by a restarted
/// one. An in-memory stand-in for the RocksDB session store of the failover issue: it keeps
/// conversations through actor crashes, not through process death. Thread-safe.
class session_table {
 public:
  void put(const session_record& r);
  std::optional<session_record> get(const std::string& id) const;
  std::vector<std::string> ids() const;
  void erase(const std::string& id);

 private:
  mutable std::mutex mu_;
  std::map<std::string, session_record> records_;
};

/// A session actor owns one conversation: its token history and sampling parameters. It
/// submits each user turn (with the whole history) to the batcher, numbers nothing itself (the
/// batcher's token index is the turn's index) but drops repeats and forwards each token to the
/// turn's sink, and rebuilds itself from the session table when its supervisor restarts it.
///
/// Messages:
/// - `(send_atom, std::string text, int32_t max_tokens, caf::actor sink) -> uint64_t turn`:
///   starts a turn; `bad_request` while another turn runs or when the text is empty.
/// - `(cancel_atom)`: cancels the running turn.
/// - `(history_atom) -> std::vector<std::vector<int32_t>>`: each turn's generated tokens.
/// - `(get_atom) -> session_record`: the whole conversation.
/// - `(resume_atom, uint64_t turn, int64_t from_index, caf::actor sink) -> bool`: sends the
///   turn's tokens from `from_index` on to `sink` (and `done` when the turn has ended); a running
///   turn streams the rest there too, instead of to its previous sink. `not_found` for an unknown
///   turn.
/// To the sink: `(token_atom, std::string session, uint64_t turn, int64_t index, int32_t token,
/// std::string piece)` once per index in order, then `(done_atom, std::string session,
/// uint64_t turn, finish_reason, std::string detail, int64_t retry_after_ms)`.
caf::actor spawn_session(caf::actor_system& sys, std::shared_ptr<node_context> ctx,
                         std::shared_ptr<session_table> table, session_record initial);

/// The template child spec of session_sup (simple_one_for_one, transient): start arguments are
/// one `session_record` (the new session); a restart rebuilds from the table.
child_spec session_spec(std::shared_ptr<node_context> ctx, std::shared_ptr<session_table> table);

}  // namespace keel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::session_record)
