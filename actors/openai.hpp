#pragma once

// The OpenAI-style HTTP API's requests, texts and answers, apart from any I/O (docs/operations.md,
// "HTTP API"): what actors/http_openai.cpp serves with, and what tests/openai_test.cpp checks
// without a node.

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

#include "kernels/chat_template.hpp"
#include "kernels/sampler.hpp"

namespace keel::openai {

enum class endpoint { chat, completion };

/// One request of POST /v1/chat/completions or /v1/completions, checked.
struct request {
  endpoint kind = endpoint::chat;
  std::string model;                 // as asked ("" when not given)
  std::vector<chat_message> messages;  // chat
  std::string prompt;                  // completion
  std::optional<int64_t> max_tokens;   // none: up to the context length
  sampling_params sampling;            // temperature 1, top_p 1 unless given (OpenAI's defaults)
  bool seed_given = false;             // without one the server draws one (a takeover needs it)
  std::vector<std::string> stop;       // at most 4, none empty
  bool stream = false;
  bool include_usage = false;          // stream_options.include_usage
  int32_t priority = 0;                // Keel's extension (vLLM's name): higher first
};

/// Limits a request is checked against.
struct limits {
  size_t max_stop_bytes = 256;       // per stop string
  size_t max_messages = 1024;
};

/// Parses and checks `body` (JSON) as a request of `kind`. `bad_request` names the field and the
/// value: malformed JSON (with the byte), a wrong type, an unknown field, a value out of range,
/// a field Keel does not serve with a value other than its default (`n` other than 1, `tools`,
/// `logprobs`...).
caf::expected<request> parse(endpoint kind, std::string_view body, const limits& lim = {});

/// The text of a turn's tokens as clients get it: valid UTF-8 (a character split across tokens
/// waits for its end; bytes that cannot be UTF-8 become U+FFFD), cut before the first stop
/// string (text that may begin one waits until it cannot).
///
/// Released text only ever grows at token boundaries where nothing waits (`settled`), so a
/// stream that restarts from such a boundary (a resume from index `tokens()`) rebuilds exactly
/// the same text: the SSE event ids name those boundaries (docs/operations.md).
class text_stream {
 public:
  explicit text_stream(std::vector<std::string> stop = {});

  /// Adds one token's bytes. Returns the text that can go out now (maybe empty).
  std::string add(std::string_view piece);

  /// Whether a stop string appeared: nothing after it is released, the turn is over.
  bool stopped() const { return stopped_; }

  /// Whether no byte waits (no partial character, no possible stop string's beginning).
  bool settled() const { return pending_bytes_.empty() && held_.empty(); }

  /// The end of the turn: what waits goes out (a partial character as U+FFFD).
  std::string finish();

 private:
  std::string release(std::string text);

  std::vector<std::string> stop_;
  std::string pending_bytes_;  // the start of a character whose end has not come
  std::string held_;           // decoded text that may begin a stop string
  bool stopped_ = false;
};

/// Where a stream stands, as an SSE event's id: "SESSION/TURN/TOKENS", the tokens of the turn
/// the client holds the text of. A client reconnecting with it as Last-Event-ID continues from
/// token TOKENS of that turn.
struct event_id {
  std::string session;
  uint64_t turn = 0;
  uint64_t tokens = 0;

  std::string str() const;
  /// `bad_request` naming the value when it is not of that shape.
  static caf::expected<event_id> parse(std::string_view text);
};

/// Whether `text` is valid UTF-8.
bool valid_utf8(std::string_view text);

}  // namespace keel::openai
