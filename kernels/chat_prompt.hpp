#pragma once

// Where a chat template and a conversation come from: the model file's `tokenizer.chat_template`
// (or Keel's default), and a conversation in JSON (`keel template --messages FILE.json`, later the
// HTTP API). The JSON edge is here, so that nothing else includes a JSON library.

#include <optional>
#include <string>

#include <caf/expected.hpp>

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

}  // namespace keel
