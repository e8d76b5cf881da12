#include "kernels/chat_prompt.hpp"

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "kernels/unicode.hpp"

namespace keel {

const char* const default_chat_template =
    "{%- if bos_token is defined and bos_token %}{{ bos_token }}{%- endif %}"
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}";

caf::expected<model_chat_template> chat_template_of(const gguf_file& file) {
  constexpr std::string_view key = "tokenizer.chat_template";
  bool present = false;
  for (auto& kv : file.metadata())
    if (kv.key == key) present = true;
  if (!present) return model_chat_template{default_chat_template, false};
  auto text = file.get_string(key);
  if (!text) return std::move(text.error());
  return model_chat_template{std::move(*text), true};
}

std::optional<std::string> special_token_text(const vocab& v, int32_t id) {
  if (id < 0 || static_cast<size_t>(id) >= v.tokens.size()) return std::nullopt;
  return v.tokens[static_cast<size_t>(id)];
}

namespace {

template <class Json>
template_value from_json(const Json& j) {
  switch (j.type()) {
    case nlohmann::json::value_t::null:
      return template_value::none();
    case nlohmann::json::value_t::boolean:
      return template_value(j.template get<bool>());
    case nlohmann::json::value_t::number_integer:
      return template_value(j.template get<int64_t>());
    case nlohmann::json::value_t::number_unsigned:
      return template_value(static_cast<int64_t>(j.template get<uint64_t>()));
    case nlohmann::json::value_t::number_float:
      return template_value(j.template get<double>());
    case nlohmann::json::value_t::string:
      return template_value(j.template get<std::string>());
    case nlohmann::json::value_t::array: {
      template_list out;
      for (auto& x : j) out.push_back(from_json(x));
      return template_value(std::move(out));
    }
    case nlohmann::json::value_t::object: {
      template_dict out;
      for (auto& [k, x] : j.items()) out.set(k, from_json(x));
      return template_value(std::move(out));
    }
    default:
      return template_value();
  }
}

}  // namespace

caf::expected<template_list> chat_messages_from_json(const std::string& text,
                                                     const std::string& what) {
  // Objects keep their members in file order, as the template may iterate them.
  auto j = nlohmann::ordered_json::parse(text, nullptr, false);
  if (j.is_discarded()) {
    // Parse again with exceptions for the position (only on the error path).
    try {
      auto again = nlohmann::json::parse(text);
      (void)again;
    } catch (const nlohmann::json::parse_error& e) {
      return make_error(errc::bad_request, what + ": not JSON: " + e.what());
    }
    return make_error(errc::bad_request, what + ": not JSON");
  }
  if (!j.is_array())
    return make_error(
        errc::bad_request,
        what + ": expected an array of {\"role\", \"content\"} objects, got a " + j.type_name());
  template_list out;
  size_t n = 0;
  for (auto& m : j) {
    ++n;
    auto where = what + ": message " + std::to_string(n);
    if (!m.is_object()) return make_error(errc::bad_request, where + " is not an object");
    for (const char* field : {"role", "content"}) {
      auto f = m.find(field);
      if (f == m.end() || !f->is_string())
        return make_error(errc::bad_request, where + " has no string '" + std::string(field) + "'");
    }
    template_dict d;
    for (auto& [k, x] : m.items()) d.set(k, from_json(x));
    out.push_back(template_value(std::move(d)));
  }
  return out;
}

namespace {

// Marks, inside a message, each place where a special token's text begins: U+FDD0 is a
// noncharacter, which Unicode reserves for a program's internal use, so no honest text holds
// it. The rendering keeps the mark inside the message's text; the encoder drops it and takes
// the text there literally.
constexpr std::string_view mark = "\xEF\xB7\x90";

caf::expected<std::string> marked(const tokenizer& tok, const std::string& s,
                                  const std::string& what) {
  if (s.find(mark) != std::string::npos)
    return make_error(errc::bad_request, what + " holds U+FDD0, a noncharacter Keel reserves");
  std::string out;
  out.reserve(s.size());
  for (size_t pos = 0; pos < s.size();) {
    size_t len = std::min<size_t>(s.size() - pos,
                                  static_cast<size_t>(utf8_len(static_cast<uint8_t>(s[pos]))));
    out.append(s, pos, len);
    if (tok.special_text_at(s, pos)) out.append(mark);
    pos += len;
  }
  return out;
}

/// The text of a reply as the conversation holds it and the model was fed: control tokens
/// shown, without a final end-of-generation token (`chat_fed_reply`).
std::string reply_text(const tokenizer& tok, std::span<const int32_t> reply) {
  std::string out;
  for (auto id : reply.first(chat_fed_reply(tok, reply)))
    out += tok.token_text(id, special_tokens::on);
  return out;
}

/// `s` from `at`, at most 40 bytes, marks dropped, quoted for an error message.
std::string excerpt(std::string_view s, size_t at) {
  std::string out = "\"";
  for (size_t i = at; i < s.size() && i < at + 40; ++i) {
    if (s.substr(i).starts_with(mark)) {
      i += mark.size() - 1;
      continue;
    }
    char c = s[i];
    if (c == '\n')
      out += "\\n";
    else if (c == '"' || c == '\\')
      out += std::string("\\") + c;
    else
      out += c;
  }
  return out + (s.size() > at + 40 ? "...\"" : "\"");
}

}  // namespace

size_t chat_fed_reply(const tokenizer& tok, std::span<const int32_t> reply) {
  return !reply.empty() && tok.is_end_of_generation(reply.back()) ? reply.size() - 1 : reply.size();
}

caf::expected<chat_turn_prompt> next_chat_turn(const chat_template& tmpl, const tokenizer& tok,
                                               std::span<const chat_exchange> past,
                                               std::span<const turn_message> next,
                                               std::span<const int32_t> fed_tokens) {
  const auto& v = tok.vocabulary();
  const auto bos = special_token_text(v, v.bos);
  const auto eos = special_token_text(v, v.eos);
  std::vector<chat_message> conversation;
  auto add = [&](std::span<const turn_message> messages, size_t turn) -> caf::error {
    for (size_t i = 0; i < messages.size(); ++i) {
      auto what = "turn " + std::to_string(turn) + ", message " + std::to_string(i + 1);
      auto role = marked(tok, messages[i].role, what + "'s role");
      if (!role) return role.error();
      auto content = marked(tok, messages[i].content, what);
      if (!content) return content.error();
      conversation.push_back({std::move(*role), std::move(*content), {}});
    }
    return {};
  };
  auto render = [&] { return tmpl.render_chat(conversation, true, bos, eos); };
  std::string fed;  // what the model was fed so far, as text
  for (size_t k = 0; k < past.size(); ++k) {
    if (auto err = add(past[k].sent, k)) return err;
    auto content = reply_text(tok, past[k].reply);
    if (k + 1 == past.size()) {
      auto so_far = render();
      if (!so_far) return so_far.error();
      fed = std::move(*so_far) + content;
    }
    conversation.push_back({"assistant", std::move(content), {}});
  }
  if (auto err = add(next, past.size())) return err;
  auto whole = render();
  if (!whole) return whole.error();
  // The template rewrote what was fed (Qwen3's drops earlier replies' reasoning): the turn
  // feeds the whole rendering from where its tokens part from the fed ones.
  const bool rewritten = !std::string_view(*whole).starts_with(fed);
  if (rewritten) fed.clear();
  chat_turn_prompt out;
  std::vector<size_t> literal_at;  // in `out.text`: where a message's special text begins
  std::string_view rest = std::string_view(*whole).substr(fed.size());
  for (size_t pos = 0; pos < rest.size();) {
    if (rest.substr(pos).starts_with(mark)) {
      // The mark follows the first character of the special text.
      size_t start = out.text.size();
      while (start > 0 && (static_cast<uint8_t>(out.text[start - 1]) & 0xC0) == 0x80) --start;
      if (start > 0) literal_at.push_back(start - 1);
      pos += mark.size();
      continue;
    }
    out.text += rest[pos++];
  }
  std::sort(literal_at.begin(), literal_at.end());
  literal_at.erase(std::unique(literal_at.begin(), literal_at.end()), literal_at.end());
  out.tokens = tok.encode(out.text, false, special_tokens::on, literal_at);
  if ((past.empty() || rewritten) && v.add_bos && v.bos >= 0 &&
      (out.tokens.empty() || out.tokens[0] != v.bos))
    out.tokens.insert(out.tokens.begin(), v.bos);
  if (rewritten) {
    size_t keep = 0;
    while (keep < fed_tokens.size() && keep < out.tokens.size() &&
           fed_tokens[keep] == out.tokens[keep])
      ++keep;
    out.keep = static_cast<int64_t>(keep);
    out.tokens.erase(out.tokens.begin(), out.tokens.begin() + static_cast<ptrdiff_t>(keep));
  }
  return out;
}

}  // namespace keel
