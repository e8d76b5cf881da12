#include "kernels/chat_prompt.hpp"

#include <nlohmann/json.hpp>

#include "base/error.hpp"

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
    return make_error(errc::bad_request,
                      what + ": expected an array of {\"role\", \"content\"} objects, got a " +
                          j.type_name());
  template_list out;
  size_t n = 0;
  for (auto& m : j) {
    ++n;
    auto where = what + ": message " + std::to_string(n);
    if (!m.is_object()) return make_error(errc::bad_request, where + " is not an object");
    for (const char* field : {"role", "content"}) {
      auto f = m.find(field);
      if (f == m.end() || !f->is_string())
        return make_error(errc::bad_request,
                          where + " has no string '" + std::string(field) + "'");
    }
    template_dict d;
    for (auto& [k, x] : m.items()) d.set(k, from_json(x));
    out.push_back(template_value(std::move(d)));
  }
  return out;
}

}  // namespace keel
