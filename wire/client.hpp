#pragma once

// A synchronous client of keel-node's Cap'n Proto API (wire/keel.capnp). No CAF actors: every
// call runs a KJ event loop on the calling thread until its answer arrives.

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

#include "base/error.hpp"
#include "base/finish_reason.hpp"
#include "base/turn_message.hpp"
#include "kernels/sampler.hpp"

namespace keel::wire {
class tls_config;
}

namespace keel::wire {

using keel::finish_reason;

/// What a node says about itself.
struct node_info {
  std::string name;
  std::string region;
  std::string model;
  uint32_t vocab_size = 0;
  uint32_t context_length = 0;
  uint32_t shards = 0;
};

/// One row of `client::sessions()`.
struct session_info {
  std::string id;
  uint32_t turns = 0;
  uint64_t tokens = 0;  // prompt and generated tokens of every turn
  int32_t priority = 0;
  bool running = false;  // a turn is being generated
  std::string owner;     // the node that serves it ("" when the node did not say)
  std::string model;     // the model that serves it, and its digest ("": not pinned)
  std::string model_digest;
  uint32_t context_length = 0;  // the model's, or shorter when opened under load; 0: not said
};

/// One turn of `client::history()`.
struct turn_record {
  uint64_t turn = 0;
  std::vector<int32_t> prompt;     // the user's tokens
  std::vector<int32_t> generated;  // the reply so far
  bool done = false;
  finish_reason reason = finish_reason::length;  // meaningful when `done`
};

/// The outcome of `client::generate()`.
struct generation {
  uint64_t turn = 0;
  std::vector<int32_t> prompt;     // the prompt's ids as the node tokenized them
  std::vector<int32_t> generated;  // every token of the reply, in order, without repeats
  finish_reason reason = finish_reason::length;
};

/// Called once per token, in index order, each (turn, index) at most once, and only after the
/// node has accepted the turn. `piece` is the token's bytes (a UTF-8 character may be split
/// across tokens); it is valid during the call only. Runs on the thread that called generate().
using token_handler =
    std::function<void(uint64_t turn, uint64_t index, int32_t id, std::string_view piece)>;

/// Called once when the node accepts a turn, before any token: the turn number and the prompt ids.
using accept_handler = std::function<void(uint64_t turn, const std::vector<int32_t>& prompt)>;

/// One failover of `client::generate()`: the stream from `from` broke (`disconnected`) and went
/// on from `to` (possibly the same address, served by a restarted node).
struct failover_event {
  std::string session;
  uint64_t turn = 0;
  uint64_t from_index = 0;                // the first index asked of the new node
  std::string from, to;                   // endpoints
  std::string to_node;                    // the name of the node that serves the turn now (the
                                          // new owner, also when `to` forwards to it)
  std::chrono::milliseconds duration{0};  // from the failure seen to the resumed stream accepted
};

/// The retry-after hint of an `overloaded` error from this library, in milliseconds; 0 when
/// there is none. The hint travels in the message as "(retry after N ms)".
uint32_t retry_after_ms(const caf::error& err);

/// The API key of a client: the first line of `file` when given (refused, naming the file, when
/// it is missing, empty, or readable by its group or others), else the environment variable
/// KEEL_API_KEY, else "" (no key).
caf::expected<std::string> key_from(const std::string& file);

/// Splits "HOST:PORT,HOST:PORT" into endpoints. `bad_request` naming the item for an empty
/// item or one without a port.
caf::expected<std::vector<std::string>> parse_endpoints(const std::string& list);

/// A connection to one keel-node, chosen as the first of a list of endpoints that answers.
///
/// Threading: a client belongs to the thread that connected it; every member function except
/// `request_cancel()` must be called on that thread (KJ's event loop is thread-local). Several
/// clients may live on one thread or on different threads.
///
/// Errors: no exception leaves this class. Failures are `caf::error`s of `keel::errc`: the
/// node's own classified errors (`bad_request`, `not_found`, `overloaded` with a retry-after
/// hint, ...) and Cap'n Proto exceptions mapped by type (DISCONNECTED -> `disconnected`,
/// OVERLOADED -> `overloaded`, UNIMPLEMENTED -> `unimplemented`, FAILED -> `failed`).
class client {
 public:
  struct options {
    /// How long each endpoint gets to answer `info()` while connecting.
    std::chrono::milliseconds connect_timeout{3000};
    /// How long a unary call (and a stream with no event) may take before it fails with
    /// `disconnected`; zero means no limit.
    std::chrono::milliseconds call_timeout{60000};
    /// How long `generate()` keeps trying to reconnect (every endpoint in order, with backoff)
    /// and resume a stream that broke with `disconnected`; zero turns resuming off.
    std::chrono::milliseconds resume_for{30000};
    /// The first pause between rounds over the endpoints; doubled up to 500 ms.
    std::chrono::milliseconds resume_backoff{25};
    /// While streaming, the node is asked `info()` this often, so that a dead connection is
    /// noticed without waiting for `call_timeout`.
    std::chrono::milliseconds probe_interval{100};
    /// The API key to log in with (`Gateway.login`) on every node connected to; empty: none
    /// (a node started with --keys then refuses every call with `unauthenticated`). Read it
    /// from a file or the environment (`key_from`), never from a command line.
    std::string api_key;
    /// Called on the generating thread after each failover, before the resumed tokens.
    std::function<void(const failover_event&)> on_failover;
    /// TLS (wire/tls.hpp): connect over TLS, trusting only this CA. Null: plain TCP.
    std::shared_ptr<const tls_config> tls;
    /// The name the nodes' certificates must carry; empty: each endpoint's host.
    std::string tls_name;
  };

  /// Connects to the first endpoint ("HOST:PORT") of `endpoints` that answers `info()`, trying
  /// them in order. `disconnected`, naming every address and why it failed, when none answers.
  static caf::expected<std::unique_ptr<client>> connect(const std::vector<std::string>& endpoints,
                                                        options opts);
  static caf::expected<std::unique_ptr<client>> connect(const std::vector<std::string>& endpoints);

  ~client();
  client(const client&) = delete;
  client& operator=(const client&) = delete;

  /// The endpoint this client is connected to (it changes when generate() fails over).
  const std::string& endpoint() const;

  /// The node's name, model and limits.
  caf::expected<node_info> info();

  /// Opens a session with these sampling parameters; returns its id. `bad_request` naming the
  /// parameter when one is out of range.
  caf::expected<std::string> open_session(const sampling_params& params, int32_t priority = 0);

  /// Sends a user turn to `session` and blocks until the reply ends, calling `on_token` for each
  /// token as it arrives. Returns the prompt and generated ids and why the turn ended (a turn
  /// ended by `cancel` or `request_cancel` returns normally with `finish_reason::cancelled`). An
  /// error when the node refuses the turn (`not_found`, `bad_request`, `overloaded`), when the
  /// turn ends with an error, when the stream skips an index (`failed`), or when the
  /// connection is lost (`disconnected`) and cannot be resumed: once the turn is accepted, a
  /// broken stream is resumed for up to `options::resume_for` by reconnecting (the endpoints
  /// in order) and `Session.resume(turn, next index)`; `on_token` still sees each index once.
  /// `turn`: the number the turn must get (the session's turns so far). Then sending is safe to
  /// repeat, and a send that got no answer (`disconnected`: the node died, or the session's
  /// group did not store the turn in time) is sent again, within `resume_for`, instead of
  /// failing: the node takes a turn of that number with the same text as the same turn.
  /// `special`: the node parses control-token text in `text` as those tokens (a node older
  /// than keel.capnp's `special` treats it as text).
  caf::expected<generation> generate(const std::string& session, const std::string& text,
                                     uint32_t max_tokens, const token_handler& on_token = {},
                                     const accept_handler& on_accept = {},
                                     std::optional<uint64_t> turn = std::nullopt,
                                     bool special = false);

  /// A chat turn: as `generate`, with role/content `messages` (a system prompt, a user turn)
  /// instead of text, which the node renders with the session's chat template
  /// (keel.capnp `Session.chat`). `prompt` in the result is what the rendering fed.
  caf::expected<generation> chat(const std::string& session,
                                 const std::vector<turn_message>& messages, uint32_t max_tokens,
                                 const token_handler& on_token = {},
                                 const accept_handler& on_accept = {},
                                 std::optional<uint64_t> turn = std::nullopt);

  /// Asks the node to stop a turn of `session` (a turn that another client, or this one in an
  /// earlier call, started). `not_found` for an unknown session or turn.
  caf::error cancel(const std::string& session, uint64_t turn);

  /// Cancels the turn that `generate()` is streaming now (the call then returns with
  /// `finish_reason::cancelled`); does nothing when no generate() runs. Callable from any
  /// thread, including from inside `on_token`.
  void request_cancel();

  /// Every turn of `session`, oldest first.
  caf::expected<std::vector<turn_record>> history(const std::string& session);

  /// Every session the node holds.
  caf::expected<std::vector<session_info>> sessions();
  /// Session `session` as its owner describes it (through this node when it forwards).
  caf::expected<session_info> session(const std::string& session);

 private:
  struct impl;
  explicit client(std::unique_ptr<impl> p);
  /// `generate` and `chat`: a turn of text or of messages.
  struct turn_input {
    const std::string* text = nullptr;
    const std::vector<turn_message>* messages = nullptr;
    bool special = false;  // text: control-token text is parsed
  };
  caf::expected<generation> run_turn(const std::string& session, turn_input input,
                                     uint32_t max_tokens, const token_handler& on_token,
                                     const accept_handler& on_accept,
                                     std::optional<uint64_t> turn);
  std::unique_ptr<impl> impl_;
};

}  // namespace keel::wire
