#include "actors/openai.hpp"

#include <charconv>
#include <cmath>

#include <nlohmann/json.hpp>

#include "base/error.hpp"
#include "kernels/unicode.hpp"

namespace keel::openai {

namespace {

using json = nlohmann::json;

caf::error bad(const std::string& what) {
  return make_error(errc::bad_request, what);
}

/// A value as the error messages show it: short JSON.
std::string shown(const json& v) {
  auto s = v.dump(-1, ' ', false, json::error_handler_t::replace);
  if (s.size() > 60) s = s.substr(0, 57) + "...";
  return s;
}

const char* type_name(const json& v) {
  switch (v.type()) {
    case json::value_t::null:
      return "null";
    case json::value_t::boolean:
      return "a boolean";
    case json::value_t::string:
      return "a string";
    case json::value_t::array:
      return "an array";
    case json::value_t::object:
      return "an object";
    default:
      return "a number";
  }
}

caf::error wrong_type(const std::string& field, const char* want, const json& v) {
  return bad(field + " must be " + want + ", got " + type_name(v) + " " + shown(v));
}

/// The fields of one request, read once each.
class fields {
 public:
  explicit fields(const json& obj) : obj_(obj) {}

  /// The field, or null when it is absent or null (OpenAI reads null as "not given").
  const json* get(const char* name) {
    seen_.push_back(name);
    auto it = obj_.find(name);
    if (it == obj_.end() || it->is_null()) return nullptr;
    return &*it;
  }

  /// The first field no reader asked for.
  std::optional<std::string> unknown() const {
    for (auto it = obj_.begin(); it != obj_.end(); ++it) {
      bool known = false;
      for (auto* s : seen_) known = known || it.key() == s;
      if (!known) return it.key();
    }
    return std::nullopt;
  }

 private:
  const json& obj_;
  std::vector<const char*> seen_;
};

caf::error read_string(fields& f, const char* name, std::string& out) {
  auto v = f.get(name);
  if (!v) return {};
  if (!v->is_string()) return wrong_type(name, "a string", *v);
  out = v->get<std::string>();
  return {};
}

caf::error read_bool(fields& f, const char* name, bool& out) {
  auto v = f.get(name);
  if (!v) return {};
  if (!v->is_boolean()) return wrong_type(name, "a boolean", *v);
  out = v->get<bool>();
  return {};
}

caf::error read_number(fields& f, const char* name, double lo, double hi, bool lo_open,
                       std::optional<double>& out) {
  auto v = f.get(name);
  if (!v) return {};
  if (!v->is_number()) return wrong_type(name, "a number", *v);
  auto x = v->get<double>();
  if (!std::isfinite(x) || x > hi || (lo_open ? x <= lo : x < lo)) {
    char range[64];
    std::snprintf(range, sizeof range, "%c%g, %g]", lo_open ? '(' : '[', lo, hi);
    return bad(std::string(name) + " must be in " + range + ", got " + shown(*v));
  }
  out = x;
  return {};
}

caf::error read_integer(fields& f, const char* name, int64_t lo, int64_t hi,
                        std::optional<int64_t>& out) {
  auto v = f.get(name);
  if (!v) return {};
  if (!v->is_number_integer()) return wrong_type(name, "an integer", *v);
  // Unsigned values past INT64_MAX are out of every range asked for here.
  if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    return bad(std::string(name) + " must be at most " + std::to_string(hi) + ", got " + shown(*v));
  auto x = v->get<int64_t>();
  if (x < lo || x > hi) {
    return bad(std::string(name) + " must be in [" + std::to_string(lo) + ", " +
               std::to_string(hi) + "], got " + shown(*v));
  }
  out = x;
  return {};
}

/// A field Keel accepts only with the value that means "off" (`is_default` says which).
template <class IsDefault>
caf::error only_default(fields& f, const char* name, const char* what, IsDefault is_default) {
  auto v = f.get(name);
  if (!v || is_default(*v)) return {};
  return bad(std::string(name) + " " + shown(*v) + " is not supported: Keel serves " + what);
}

/// Message content: a string, or an array of text parts ({"type": "text", "text": ...}).
caf::error read_content(const json& v, const std::string& where, std::string& out) {
  if (v.is_string()) {
    out = v.get<std::string>();
    return {};
  }
  if (!v.is_array()) return wrong_type(where, "a string or an array of text parts", v);
  out.clear();
  for (size_t i = 0; i < v.size(); ++i) {
    auto at = where + "[" + std::to_string(i) + "]";
    const auto& part = v[i];
    if (!part.is_object()) return wrong_type(at, "an object", part);
    auto type = part.find("type");
    if (type == part.end() || !type->is_string())
      return bad(at + ".type must be a string (\"text\")");
    if (*type != "text")
      return bad(at + ".type " + shown(*type) + " is not supported: Keel takes text parts only");
    auto text = part.find("text");
    if (text == part.end() || !text->is_string()) return bad(at + ".text must be a string");
    for (auto it = part.begin(); it != part.end(); ++it)
      if (it.key() != "type" && it.key() != "text")
        return bad(at + ": unknown field '" + it.key() + "'");
    out += text->get<std::string>();
  }
  return {};
}

caf::error read_messages(fields& f, const limits& lim, std::vector<chat_message>& out) {
  auto v = f.get("messages");
  if (!v) return bad("messages is required (an array of {\"role\", \"content\"})");
  if (!v->is_array()) return wrong_type("messages", "an array", *v);
  if (v->empty()) return bad("messages must hold at least one message, got []");
  if (v->size() > lim.max_messages) {
    return bad("messages holds " + std::to_string(v->size()) + " messages, the limit is " +
               std::to_string(lim.max_messages));
  }
  for (size_t i = 0; i < v->size(); ++i) {
    auto at = "messages[" + std::to_string(i) + "]";
    const auto& m = (*v)[i];
    if (!m.is_object()) return wrong_type(at, "an object", m);
    fields mf(m);
    chat_message msg;
    if (auto err = read_string(mf, "role", msg.role)) return bad(at + "." + message_of(err));
    if (msg.role.empty()) return bad(at + ".role is required (\"system\", \"user\", ...)");
    auto content = mf.get("content");
    if (!content) return bad(at + ".content is required");
    if (auto err = read_content(*content, at + ".content", msg.content)) return err;
    std::string name;  // accepted and not used: the templates Keel renders have no place for it
    if (auto err = read_string(mf, "name", name)) return bad(at + "." + message_of(err));
    if (auto k = mf.unknown())
      return bad(at + ": unknown field '" + *k + "' (Keel takes role, content and name)");
    out.push_back(std::move(msg));
  }
  return {};
}

caf::error read_stop(fields& f, const limits& lim, std::vector<std::string>& out) {
  auto v = f.get("stop");
  if (!v) return {};
  auto one = [&](const json& s, const std::string& at) -> caf::error {
    if (!s.is_string()) return wrong_type(at, "a string", s);
    auto text = s.get<std::string>();
    if (text.empty()) return bad(at + " must not be empty");
    if (text.size() > lim.max_stop_bytes) {
      return bad(at + " has " + std::to_string(text.size()) + " bytes, the limit is " +
                 std::to_string(lim.max_stop_bytes));
    }
    out.push_back(std::move(text));
    return {};
  };
  if (v->is_string()) return one(*v, "stop");
  if (!v->is_array()) return wrong_type("stop", "a string or an array of strings", *v);
  if (v->size() > 4) return bad("stop holds " + std::to_string(v->size()) + " strings, at most 4");
  for (size_t i = 0; i < v->size(); ++i)
    if (auto err = one((*v)[i], "stop[" + std::to_string(i) + "]")) return err;
  return {};
}

caf::error read_prompt(fields& f, std::string& out) {
  auto v = f.get("prompt");
  if (!v) return bad("prompt is required (a string)");
  if (v->is_string()) {
    out = v->get<std::string>();
    return {};
  }
  if (v->is_array() && v->size() == 1 && (*v)[0].is_string()) {
    out = (*v)[0].get<std::string>();
    return {};
  }
  if (v->is_array())
    return bad("prompt must be one string (Keel answers one prompt per request), got " + shown(*v));
  return wrong_type("prompt", "a string", *v);
}

}  // namespace

caf::expected<request> parse(endpoint kind, std::string_view body, const limits& lim) {
  json doc;
  try {
    doc = json::parse(body.begin(), body.end());
  } catch (const json::parse_error& e) {
    return bad("the body is not JSON: " + std::string(e.what()));
  }
  if (!doc.is_object()) return wrong_type("the body", "a JSON object", doc);
  fields f(doc);
  request r;
  r.kind = kind;
  r.sampling.temperature = 1.0f;
  r.sampling.top_p = 1.0f;
  if (auto err = read_string(f, "model", r.model)) return err;
  if (kind == endpoint::chat) {
    if (auto err = read_messages(f, lim, r.messages)) return err;
  } else {
    if (auto err = read_prompt(f, r.prompt)) return err;
  }
  std::optional<int64_t> max_tokens, max_completion, seed, priority, top_k;
  if (auto err = read_integer(f, "max_tokens", 1, INT32_MAX, max_tokens)) return err;
  if (kind == endpoint::chat) {
    if (auto err = read_integer(f, "max_completion_tokens", 1, INT32_MAX, max_completion))
      return err;
    if (max_tokens && max_completion && *max_tokens != *max_completion) {
      return bad("max_tokens " + std::to_string(*max_tokens) + " and max_completion_tokens " +
                 std::to_string(*max_completion) + " disagree");
    }
  }
  r.max_tokens = max_tokens ? max_tokens : max_completion;
  // OpenAI's completions default to 16 tokens; its chat completions run to the context's end.
  if (!r.max_tokens && kind == endpoint::completion) r.max_tokens = 16;
  std::optional<double> temperature, top_p, min_p, repetition;
  if (auto err = read_number(f, "temperature", 0, 2, false, temperature)) return err;
  if (auto err = read_number(f, "top_p", 0, 1, true, top_p)) return err;
  if (auto err = read_integer(f, "seed", INT64_MIN, INT64_MAX, seed)) return err;
  // vLLM's extensions, which Keel's sampler has too.
  if (auto err = read_integer(f, "top_k", -1, INT32_MAX, top_k)) return err;
  if (auto err = read_number(f, "min_p", 0, 1, false, min_p)) return err;
  if (auto err = read_number(f, "repetition_penalty", 0, 1e6, true, repetition)) return err;
  if (auto err = read_integer(f, "priority", -1000000, 1000000, priority)) return err;
  if (temperature) r.sampling.temperature = static_cast<float>(*temperature);
  if (top_p) r.sampling.top_p = static_cast<float>(*top_p);
  if (min_p) r.sampling.min_p = static_cast<float>(*min_p);
  if (repetition) r.sampling.repetition_penalty = static_cast<float>(*repetition);
  if (top_k) r.sampling.top_k = static_cast<int32_t>(std::max<int64_t>(*top_k, 0));
  if (seed) {
    r.sampling.seed = static_cast<uint64_t>(*seed);
    r.seed_given = true;
  }
  if (priority) r.priority = static_cast<int32_t>(*priority);
  if (auto err = read_stop(f, lim, r.stop)) return err;
  if (auto err = read_bool(f, "stream", r.stream)) return err;
  if (auto v = f.get("stream_options")) {
    if (!v->is_object()) return wrong_type("stream_options", "an object", *v);
    if (!r.stream) return bad("stream_options is only allowed with \"stream\": true");
    fields so(*v);
    if (auto err = read_bool(so, "include_usage", r.include_usage))
      return bad("stream_options." + message_of(err));
    if (auto k = so.unknown()) return bad("stream_options: unknown field '" + *k + "'");
  }
  std::string user;  // accepted, not used
  if (auto err = read_string(f, "user", user)) return err;
  auto is_one = [](const json& v) { return v.is_number_integer() && v.get<int64_t>() == 1; };
  auto is_zero = [](const json& v) { return v.is_number() && v.get<double>() == 0.0; };
  auto is_false = [](const json& v) { return v.is_boolean() && !v.get<bool>(); };
  auto is_empty = [](const json& v) { return (v.is_object() || v.is_array()) && v.empty(); };
  if (auto err = only_default(f, "n", "one choice per request", is_one)) return err;
  if (auto err = only_default(f, "presence_penalty", "no presence penalty (see "
                              "repetition_penalty)", is_zero))
    return err;
  if (auto err = only_default(f, "frequency_penalty", "no frequency penalty (see "
                              "repetition_penalty)", is_zero))
    return err;
  if (auto err = only_default(f, "logit_bias", "no logit bias", is_empty)) return err;
  if (kind == endpoint::chat) {
    if (auto err = only_default(f, "logprobs", "no log probabilities", is_false)) return err;
    if (auto err = only_default(f, "tools", "no tools", is_empty)) return err;
    if (auto err = only_default(f, "tool_choice", "no tools",
                                [](const json& v) { return v == "none"; }))
      return err;
    if (auto err = only_default(f, "response_format", "text only",
                                [](const json& v) { return v == json{{"type", "text"}}; }))
      return err;
  } else {
    if (auto err = only_default(f, "echo", "no echo of the prompt", is_false)) return err;
    if (auto err = only_default(f, "best_of", "one choice per request", is_one)) return err;
    if (auto err = only_default(f, "logprobs", "no log probabilities",
                                [](const json&) { return false; }))
      return err;
    if (auto err = only_default(f, "suffix", "no suffix",
                                [](const json& v) { return v == ""; }))
      return err;
  }
  if (auto k = f.unknown()) return bad("unknown field '" + *k + "'");
  if (auto err = validate(r.sampling)) return err;
  return r;
}

// -- text_stream --------------------------------------------------------------------------

text_stream::text_stream(std::vector<std::string> stop) : stop_(std::move(stop)) {}

std::string text_stream::add(std::string_view piece) {
  if (stopped_) return {};
  pending_bytes_.append(piece);
  auto tail = utf8_incomplete_tail(pending_bytes_);
  auto whole = utf8_sanitize(std::string_view(pending_bytes_).substr(0, pending_bytes_.size() - tail));
  pending_bytes_.erase(0, pending_bytes_.size() - tail);
  return release(std::move(whole));
}

std::string text_stream::release(std::string text) {
  held_ += text;
  if (stop_.empty()) return std::exchange(held_, {});
  // The earliest stop string ends the text.
  size_t cut = std::string::npos;
  for (auto& s : stop_) cut = std::min(cut, held_.find(s));
  if (cut != std::string::npos) {
    stopped_ = true;
    pending_bytes_.clear();
    auto out = held_.substr(0, cut);
    held_.clear();
    return out;
  }
  // Keep the longest end of the text that some stop string begins with.
  size_t keep = 0;
  for (auto& s : stop_) {
    for (size_t n = std::min(s.size() - 1, held_.size()); n > keep; --n) {
      if (held_.compare(held_.size() - n, n, s, 0, n) == 0) {
        keep = n;
        break;
      }
    }
  }
  auto out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string text_stream::finish() {
  if (stopped_) return {};
  // What waits is the start of one character the text ended in: one U+FFFD for it.
  auto out = held_ + (pending_bytes_.empty() ? "" : "\xef\xbf\xbd");
  pending_bytes_.clear();
  held_.clear();
  return out;
}

// -- event ids ------------------------------------------------------------------------------

std::string event_id::str() const {
  return session + "/" + std::to_string(turn) + "/" + std::to_string(tokens);
}

caf::expected<event_id> event_id::parse(std::string_view text) {
  auto refuse = [&] {
    return bad("Last-Event-ID must be SESSION/TURN/TOKENS as the stream's events name them, got '" +
               std::string(text.substr(0, 200)) + "'");
  };
  auto b = text.rfind('/');
  if (b == std::string_view::npos || b == 0) return refuse();
  auto a = text.rfind('/', b - 1);
  if (a == std::string_view::npos || a == 0) return refuse();
  event_id out;
  out.session = std::string(text.substr(0, a));
  auto number = [](std::string_view s, uint64_t& v) {
    if (s.empty()) return false;
    auto r = std::from_chars(s.data(), s.data() + s.size(), v);
    return r.ec == std::errc() && r.ptr == s.data() + s.size();
  };
  if (!number(text.substr(a + 1, b - a - 1), out.turn) || !number(text.substr(b + 1), out.tokens))
    return refuse();
  return out;
}

bool valid_utf8(std::string_view text) {
  return utf8_sanitize(text) == text;
}

}  // namespace keel::openai
