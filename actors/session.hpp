#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <future>
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
#include "actors/protocols.hpp"
#include "actors/supervisor.hpp"
#include "base/turn_message.hpp"
#include "storage/session_store.hpp"
#include "wire/checkpoint.hpp"

namespace keel {

/// One turn of a conversation.
struct turn_record {
  uint64_t turn = 0;
  std::vector<int32_t> user;       // the user's tokens (BOS first on turn 0)
  std::vector<int32_t> generated;  // the reply so far
  int32_t max_tokens = 0;
  bool done = false;
  finish_reason reason = finish_reason::length;
  turn_sink_actor sink;  // receives the turn's events
  /// A chat turn (`chat_atom`): the messages it sent, whose rendering gave `user`
  /// (kernels/chat_prompt.hpp `next_chat_turn`). Empty: a text turn.
  std::vector<turn_message> messages;
  /// On a chat session's first turn: the template its turns render with (stored and
  /// replicated with the turn, so that another node renders the next turn identically).
  std::string chat_template;
  /// A chat turn under a template that rewrites earlier turns (docs/engine.md, "Chat turns"):
  /// how many tokens of what the model was fed before this turn stay; the rest are dropped and
  /// `user` follows them. -1: all of them (every other turn).
  int64_t keep = -1;
};

/// The tokens the model is fed before turn `upto` of `turns` (every earlier turn's input and
/// reply, less what a later turn dropped with `keep`), then that turn's own input when `with_input`.
/// `fed_reply` says how much of a reply later turns see (a chat reply's end token is not fed).
std::vector<int32_t> fed_tokens(const std::vector<turn_record>& turns, size_t upto, bool with_input,
                                const std::function<size_t(const std::vector<int32_t>&)>& fed_reply);

/// What a session is: enough to rebuild its actor after a crash.
struct session_record {
  std::string id;
  uint64_t number = 0;  // node-unique; a turn's seq_id is (number << 24) | turn
  sampling_params params;
  int32_t priority = 0;
  std::vector<turn_record> turns;
  /// The ownership lease: the epoch this node writes with (1 for a new session, the previous
  /// owner's + 1 after a takeover), and this node's name as the owner.
  uint64_t epoch = 1;
  std::string owner;
  /// The tenant whose API key opened it ("" on a node without --keys); stored and replicated,
  /// so that every node that serves it lets only that tenant use it.
  std::string tenant;
  /// The model that serves it (its file's name) and the file's digest (kernels/digest.hpp): the
  /// session is pinned to that digest, and only a node whose model has it serves the session.
  /// "" (a session from before the field): any model.
  std::string model;
  std::string model_digest;
  /// The session's own context length when it was opened shortened under load (the
  /// degradation policy, node_config::degrade); 0: the model's.
  int32_t context_limit = 0;
  /// Not stored: the record was rebuilt from a stored or replicated copy (recovery, takeover),
  /// which may lag the tokens its client already received; `resume` adopts a
  /// running turn's held tokens beyond the record's only then, and once.
  bool from_copy = false;
};

/// How a change to a session is recorded (see `session_table::put`).
enum class change : uint8_t {
  memory,     // in memory only (a new sink)
  structure,  // a finished turn: synced to the store (with peers: stored by a majority)
  accept,     // a new session, an accepted user turn: as `structure`, and with peers refused
              // (undone) when no majority of its group stored it
  tokens,     // a generated token: appended to the turn log every `checkpoint_every` tokens
};

/// Sessions' state, written by the session actors on every change and read by a restarted one.
/// In memory it keeps conversations through actor crashes; with a backing store
/// (`attach_store`) it also keeps them through process death:
/// - `change::structure` writes the session record (wire/checkpoint.hpp) and the last turn's
///   tokens not yet logged in one synced batch before `put` returns, so the caller acknowledges
///   only what is durable (ARCHITECTURE.md, guarantee 1);
/// - `change::tokens` appends the running turn's unlogged tokens to its turn log once
///   `checkpoint_every` of them have accumulated, buffered (in the OS page cache: it survives a
///   process crash; a power loss loses at most the tokens since the last synced write, and a
///   resumed turn regenerates exactly those, since sampling is deterministic).
/// When a store write fails, memory is left unchanged and the error is returned. Every write
/// carries the record's epoch. With peers (`on_change`) the ownership protocol keeps the
/// sessions instead of the store. A session dropped with `drop` (another node owns it now)
/// refuses every later `put` with `stale_epoch`. Thread-safe.
///
/// Each session has a slot of its own, with its own lock: a session actor takes a `handle` once
/// and records each token through it (`put_tokens`), under that session's lock only, so the
/// token path takes no lock that other sessions share (issue #10). The table's lock guards the
/// map of slots (and is taken before a slot's, never after).
class session_table {
 public:
  explicit session_table(int32_t checkpoint_every = 16) : checkpoint_every_(checkpoint_every) {}

  /// Backs the table with `store`, not owned: it must outlive every write, which the node
  /// ensures by stopping its tree (the only writers) before it detaches and closes the store.
  void attach_store(storage::session_store* store);
  void detach_store();
  int32_t checkpoint_every() const { return checkpoint_every_; }

  /// With the ownership protocol (docs/actors.md "Ownership protocol"): a new session's
  /// `accept` goes to `f` instead of the store, outside the table's lock; its error is `put`'s,
  /// and a refused one is undone in memory. (A new turn, its tokens and its end go from the
  /// session actor to the ownership host itself.) Set before the first `put`.
  using ownership_fn = std::function<caf::error(const session_record& r, change c,
                                                const std::optional<session_record>& previous)>;
  void on_change(ownership_fn f);

  /// Records `r`; writes it to the store as `c` says (see the class comment).
  caf::error put(const session_record& r, change c = change::memory);

  struct slot;  // one session's record, under its own lock (session.cpp)
  using handle = std::shared_ptr<slot>;
  /// The slot of session `id` (null when the table does not hold it): for `put_tokens`.
  handle handle_of(const std::string& id) const;
  /// Records `r`'s running turn's new tokens (the rest of `r` as the slot has it) and, alone
  /// with a store, appends them to its turn log every `checkpoint_every` (buffered). Under the
  /// session's lock only. `stale_epoch` once the session was dropped.
  caf::error put_tokens(const handle& h, const session_record& r);
  /// With peers: turn `turn`'s first `tokens` tokens went to the session's group as
  /// checkpoints (shown by keel-shell's `sessions`).
  void sent_to_group(const handle& h, uint64_t turn, size_t tokens);
  /// With peers: what `sent_to_group` last said of `id` (nullopt before it said anything).
  std::optional<std::pair<uint64_t, size_t>> group_checkpoint(const std::string& id) const;

  /// Records a session recovered from the store, whose turn logs hold its generated tokens.
  void recovered(const session_record& r);
  std::optional<session_record> get(const std::string& id) const;
  std::vector<std::string> ids() const;
  /// The tenant of session `id` (nullopt when the table does not hold it).
  std::optional<std::string> tenant_of(const std::string& id) const;
  /// How many sessions of `tenant` the table holds.
  size_t count_of(const std::string& tenant) const;
  void erase(const std::string& id);
  /// Forgets the session for good: another node owns it now (at `epoch`). Later `put`s of it
  /// are refused with `stale_epoch`, even from an actor that has not stopped yet. Returns the
  /// record it had, if any.
  std::optional<session_record> drop(const std::string& id, uint64_t epoch);
  /// Whether the session was dropped (moved to another node).
  bool dropped(const std::string& id) const;
  /// Parks the session: its actor failed again and again (supervisor_flags::park_after), so it
  /// is not started again until the node restarts; `why` says how it failed. Its record stays.
  void park(const std::string& id, const std::string& why);
  /// Why the session is parked; nullopt when it is not.
  std::optional<std::string> parked(const std::string& id) const;

 private:
  /// Writes `r` to the store as `c` says; `s`'s lock held.
  caf::error write_store(slot& s, const session_record& r, change c);
  /// The slot of `id`, made when missing; the table's lock held.
  handle& slot_for(const std::string& id);

  const int32_t checkpoint_every_;
  mutable std::mutex mu_;
  std::atomic<storage::session_store*> store_{nullptr};
  ownership_fn on_change_;
  std::map<std::string, uint64_t> dropped_;  // id -> the epoch of the node that has it now
  std::map<std::string, std::string> parked_;  // id -> why
  std::map<std::string, handle> records_;
};

/// The stored form of a session (without generated tokens, which live in the turn logs).
wire::session_checkpoint to_checkpoint(const session_record& r);
/// A session from its stored form and its turn logs (turn -> generated tokens).
session_record from_checkpoint(wire::session_checkpoint c,
                               const std::map<uint64_t, std::vector<int32_t>>& logs);

/// A session actor owns one conversation: its token history and sampling parameters. It
/// submits each user turn (with the whole history) to the batcher, numbers nothing itself (the
/// batcher's token index is the turn's index) but drops repeats and forwards each token to the
/// turn's sink, and rebuilds itself from the session table when its supervisor restarts it.
///
/// Messages (`session_actor`, protocols.hpp):
/// - `(send_atom, std::string text, int32_t max_tokens, turn_sink_actor sink[, int64_t expect[,
///   bool special]]) -> uint64_t turn`: starts a turn; `bad_request` while another turn runs or
///   when the text is empty. `expect`: the number the client expects (keel.capnp
///   `Session.send`): the same text under a number taken already is that turn, sent again.
///   `special`: control-token text in `text` is parsed as those tokens.
/// - `(chat_atom, std::vector<turn_message> messages, int32_t max_tokens, turn_sink_actor sink,
///   int64_t expect) -> uint64_t turn`: a chat turn (keel.capnp `Session.chat`): the session's
///   chat template (the node's at its first turn, kept with that turn) renders the whole
///   conversation and the turn feeds what the rendering adds after what was fed
///   (kernels/chat_prompt.hpp). A session's first turn fixes its kind: chat sessions refuse
///   `send_atom`, text sessions `chat_atom` (`bad_request`).
/// - `(cancel_atom)`: cancels the running turn.
/// - `(history_atom) -> std::vector<std::vector<int32_t>>`: each turn's generated tokens.
/// - `(get_atom) -> session_record`: the whole conversation.
/// - `(resume_atom, uint64_t turn, int64_t from_index, turn_sink_actor sink[, held]) -> bool`:
///   sends the turn's tokens from `from_index` on to `sink` (and `done` when the turn has
///   ended); a running turn streams the rest there too, instead of to its previous sink.
///   `not_found` for an unknown turn.
/// - from the batcher, `sequence_sink_actor`: the running turn's tokens and end.
/// To the sink (`turn_sink_actor`, messages.hpp): each token once per index in order, then
/// `done`, or `moved` when another node serves the session now.
session_actor spawn_session(caf::actor_system& sys, std::shared_ptr<node_context> ctx,
                            std::shared_ptr<session_table> table, session_record initial);

/// The node's `store` child (a node alone with a store): a detached actor that does the session
/// actors' synced writes, so that no session actor's handler waits for the disk.
/// `store_writer_actor`: `(write_atom, session_record, uint8_t change) -> bool` is
/// `table->put(record, change)`, answered when it is done (its error, if any).
child_spec store_writer_spec(std::shared_ptr<session_table> table);

/// The template child spec of session_sup (simple_one_for_one, transient): start arguments are
/// one `session_record` (the new session); a restart rebuilds from the table.
child_spec session_spec(std::shared_ptr<node_context> ctx, std::shared_ptr<session_table> table);

}  // namespace keel

namespace keel {
/// The context length of session `r` on a model of `model_ctx`: the model's, or the session's
/// own when it was opened shortened.
inline size_t session_context(const session_record& r, size_t model_ctx) {
  return r.context_limit > 0 ? std::min(model_ctx, static_cast<size_t>(r.context_limit))
                             : model_ctx;
}
}  // namespace keel

CAF_ALLOW_UNSAFE_MESSAGE_TYPE(keel::session_record)
