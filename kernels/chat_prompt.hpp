#pragma once

// Where a chat template and a conversation come from: the model file's `tokenizer.chat_template`
// (or Keel's default), and a conversation in JSON (`keel template --messages FILE.json`, later the
// HTTP API). The JSON edge is here, so that nothing else includes a JSON library.

#include <optional>
#include <span>
#include <string>
#include <vector>

#include <caf/expected.hpp>

#include "base/turn_message.hpp"
#include "kernels/chat_template.hpp"
#include "kernels/gguf.hpp"
#include "kernels/tokenizer.hpp"

namespace keel {

/// The template of a model without one (docs/engine.md, "Chat templates"): ChatML, as Qwen and
/// many fine-tunes use it, with `bos_token` first when the model has one.
extern const char* const default_chat_template;

/// A model's chat template text and where it came from.
struct model_chat_template {
  std::string text;
  bool from_model = false;  // false: the model has no `tokenizer.chat_template` (the default)
};

/// The model file's `tokenizer.chat_template`, or the default when it has none. `bad_model`
/// when the key holds something other than a string.
caf::expected<model_chat_template> chat_template_of(const gguf_file& file);

/// The text of special token `id` of `v` (its piece as stored: control tokens are stored
/// verbatim), or nullopt when the model has no such token (id -1).
std::optional<std::string> special_token_text(const vocab& v, int32_t id);

/// A conversation from JSON: an array of objects, each with string `role` and `content`; their
/// other members (strings, numbers, booleans, null, arrays, objects) are kept for the template
/// (`reasoning_content`, `tool_calls`...). Errors are `bad_request` and name `what` (a file name)
/// and what is wrong ("FILE.json: message 2 has no string 'content'"; a syntax error with its
/// byte offset).
caf::expected<template_list> chat_messages_from_json(const std::string& text,
                                                     const std::string& what);

/// How many tokens of a chat turn's `reply` (as generated) the model is fed in the turns after
/// it: all but a final end-of-generation token. The template closes a reply with its own
/// marker (which the next turn feeds), whichever end token the model chose (<|endoftext|> or
/// <|im_end|>, <|eom_id|> or <|eot_id|>), as llama.cpp's server, which does not feed the token
/// that stopped generation, and transformers, which renders the history again, both do.
size_t chat_fed_reply(const tokenizer& tok, std::span<const int32_t> reply);

/// One past turn of a chat session: the messages it sent and the tokens the model answered
/// (the reply as generated, an end-of-generation token last when it ended so). Views: the
/// caller keeps both alive during the call.
struct chat_exchange {
  std::span<const turn_message> sent;
  std::span<const int32_t> reply;
};

/// What a new chat turn feeds the model.
struct chat_turn_prompt {
  /// The text the rendering of the whole conversation adds after what was already fed (the
  /// whole rendering when the template rewrote what was fed: `keep`).
  std::string text;
  /// `text` encoded with special-token parsing on for the template's own text only: the text
  /// of the messages stays text, so that a message cannot forge a control token. On the first
  /// turn BOS comes first when the vocabulary adds one and the rendering did not put it there.
  std::vector<int32_t> tokens;
  /// -1: `tokens` follow everything fed so far. Otherwise the template rewrote earlier turns:
  /// the first `keep` fed tokens stay (where the whole rendering's tokens agree with them),
  /// the rest are dropped, and `tokens` are the rendering's tokens after them.
  int64_t keep = -1;
};

/// The prompt of chat turn `past.size()` of a session whose earlier turns are `past`, sending
/// `next` (docs/engine.md, "Chat turns"). The conversation is every turn's messages, each turn's
/// reply after them as an assistant message (its fed tokens' text, control tokens shown), then
/// `next`; it is rendered with `add_generation_prompt` and the vocabulary's BOS and EOS texts,
/// as `keel template` renders it. What was fed so far is the same rendering of the
/// conversation up to the last past turn's messages, then that turn's reply: the new turn
/// feeds what the whole rendering adds after it. When the rendering
/// does not begin with what was fed (a template that rewrites earlier turns: Qwen3's drops the
/// reasoning of earlier replies, one that trims replies), the whole rendering is encoded as a
/// first turn's and compared with `fed_tokens` (the tokens the model was fed so far): the turn
/// keeps the fed tokens up to the first that differs and feeds the rest (`keep`), as llama.cpp
/// reuses its cache up to the first difference. Template errors keep their class and place; a
/// message holding U+FDD0 (which Keel reserves) is `bad_request`.
caf::expected<chat_turn_prompt> next_chat_turn(const chat_template& tmpl, const tokenizer& tok,
                                               std::span<const chat_exchange> past,
                                               std::span<const turn_message> next,
                                               std::span<const int32_t> fed_tokens);

}  // namespace keel
