#include "kernels/chat_template.hpp"

#include <algorithm>

#include "base/error.hpp"
#include "kernels/detail/chat_template_internal.hpp"
#include "kernels/unicode.hpp"

namespace keel {

using detail::template_value_access;

// ---- template_value --------------------------------------------------------------------------

template_value::template_value(bool b) : data_(b) {}
template_value::template_value(double d) : data_(d) {}
template_value::template_value(std::string s)
    : data_(std::make_shared<const std::string>(std::move(s))) {}
template_value::template_value(std::string_view s) : template_value(std::string(s)) {}
template_value::template_value(const char* s) : template_value(std::string(s)) {}

template_value::template_value(template_list items) {
  auto box = std::make_shared<detail::template_list_box>();
  for (auto& item : items) {
    box->depth = std::max(box->depth, 1 + detail::depth_of(item));
    box->holds_namespace = box->holds_namespace || detail::holds_namespace(item);
  }
  box->items = std::move(items);
  data_ = std::shared_ptr<const detail::template_list_box>(std::move(box));
}

template_value::template_value(template_dict entries) {
  auto box = std::make_shared<detail::template_dict_box>();
  for (auto& [key, value] : entries) {
    box->depth = std::max(box->depth, 1 + detail::depth_of(value));
    box->holds_namespace = box->holds_namespace || detail::holds_namespace(value);
  }
  box->entries = std::move(entries);
  data_ = std::shared_ptr<const detail::template_dict_box>(std::move(box));
}

template_value template_value::none() {
  return template_value(data_type(none_tag{}));
}

template_value template_value::tuple(template_list items) {
  template_value v(std::move(items));
  auto box = std::make_shared<detail::template_list_box>(
      *std::get<std::shared_ptr<const detail::template_list_box>>(v.data_));
  box->tuple = true;
  v.data_ = std::shared_ptr<const detail::template_list_box>(std::move(box));
  return v;
}

template_value template_value::function(std::string name, function_type fn) {
  auto box = std::make_shared<detail::template_function>();
  box->name = std::move(name);
  box->call = std::move(fn);
  return template_value(data_type(std::shared_ptr<const detail::template_function>(box)));
}

template_value::kind template_value::type() const {
  switch (data_.index()) {  // the alternatives of data_type, in order
    case 0:
      return kind::undefined;
    case 1:
      return kind::none;
    case 2:
      return kind::boolean;
    case 3:
      return kind::integer;
    case 4:
      return kind::floating;
    case 5:
      return kind::string;
    case 6:
      return template_value_access::list_box(*this)->tuple ? kind::tuple : kind::list;
    case 7:
      return kind::dict;
    case 8:
      return kind::namespace_object;
    case 9:
      return kind::function;
    default:
      return kind::macro;
  }
}

bool template_value::as_bool() const {
  return std::get<bool>(data_);
}
int64_t template_value::as_int() const {
  return std::get<int64_t>(data_);
}
double template_value::as_float() const {
  return std::get<double>(data_);
}
const std::string& template_value::as_string() const {
  return *std::get<std::shared_ptr<const std::string>>(data_);
}
const template_list& template_value::as_list() const {
  return template_value_access::list_box(*this)->items;
}
const template_dict& template_value::as_dict() const {
  return template_value_access::dict_box(*this)->entries;
}

// ---- template_dict ---------------------------------------------------------------------------

template_dict::template_dict(std::initializer_list<entry> entries) {
  for (auto& e : entries) set(e.first, e.second);
}

void template_dict::set(std::string key, template_value value) {
  for (auto& e : entries_)
    if (e.first == key) {
      e.second = std::move(value);
      return;
    }
  entries_.emplace_back(std::move(key), std::move(value));
}

const template_value* template_dict::find(std::string_view key) const {
  for (auto& e : entries_)
    if (e.first == key) return &e.second;
  return nullptr;
}

// ---- internals shared by the parts -------------------------------------------------------------

namespace detail {

const template_list_box* template_value_access::list_box(const template_value& v) {
  auto* p = std::get_if<std::shared_ptr<const template_list_box>>(&v.data_);
  return p ? p->get() : nullptr;
}
const template_dict_box* template_value_access::dict_box(const template_value& v) {
  auto* p = std::get_if<std::shared_ptr<const template_dict_box>>(&v.data_);
  return p ? p->get() : nullptr;
}
template_namespace* template_value_access::namespace_box(const template_value& v) {
  auto* p = std::get_if<std::shared_ptr<template_namespace>>(&v.data_);
  return p ? p->get() : nullptr;
}
const template_function* template_value_access::function_box(const template_value& v) {
  auto* p = std::get_if<std::shared_ptr<const template_function>>(&v.data_);
  return p ? p->get() : nullptr;
}
const template_macro* template_value_access::macro_box(const template_value& v) {
  auto* p = std::get_if<std::shared_ptr<const template_macro>>(&v.data_);
  return p ? p->get() : nullptr;
}

template_value template_value_access::make_namespace(template_dict attributes) {
  auto box = std::make_shared<template_namespace>();
  box->attributes = std::move(attributes);
  return template_value(template_value::data_type(std::move(box)));
}

template_value template_value_access::make_builtin(std::string name,
                                                   template_function::builtin_type fn,
                                                   const template_value& receiver) {
  auto box = std::make_shared<template_function>();
  box->name = std::move(name);
  box->builtin = std::move(fn);
  box->holds_namespace = holds_namespace(receiver);
  box->depth = depth_of(receiver);
  return template_value(
      template_value::data_type(std::shared_ptr<const template_function>(std::move(box))));
}

template_value template_value_access::make_macro(std::shared_ptr<const template_program> program,
                                                 const template_stmt* node) {
  auto box = std::make_shared<template_macro>();
  box->program = std::move(program);
  box->node = node;
  return template_value(
      template_value::data_type(std::shared_ptr<const template_macro>(std::move(box))));
}

uint32_t depth_of(const template_value& v) {
  if (auto* l = template_value_access::list_box(v)) return l->depth;
  if (auto* d = template_value_access::dict_box(v)) return d->depth;
  if (auto* f = template_value_access::function_box(v)) return f->depth;
  // A namespace's attributes are bounded when assigned (and cannot hold namespaces).
  if (template_value_access::namespace_box(v)) return 1;
  return 0;
}

bool holds_namespace(const template_value& v) {
  if (auto* l = template_value_access::list_box(v)) return l->holds_namespace;
  if (auto* d = template_value_access::dict_box(v)) return d->holds_namespace;
  if (auto* f = template_value_access::function_box(v)) return f->holds_namespace;
  return template_value_access::namespace_box(v) != nullptr;
}

std::string describe_position(std::string_view source, uint32_t pos) {
  pos = std::min<uint32_t>(pos, static_cast<uint32_t>(source.size()));
  size_t line = 1 + static_cast<size_t>(std::count(source.begin(), source.begin() + pos, '\n'));
  size_t start = pos == 0 ? std::string::npos : source.rfind('\n', pos - 1);
  start = start == std::string::npos ? 0 : start + 1;
  size_t column = 1;
  for (size_t i = start; i < pos; i += static_cast<size_t>(decode_utf8(source, i).len)) ++column;
  return "line " + std::to_string(line) + ", column " + std::to_string(column);
}

std::string template_program::where(uint32_t pos) const {
  return "chat template " + describe_position(source, pos);
}

caf::error template_budget::step(uint64_t n) {
  steps += n;
  if (steps <= limits.max_steps) return {};
  return make_error(errc::bad_request,
                    "the template took more than " + std::to_string(limits.max_steps) + " steps");
}

caf::error template_budget::build(size_t bytes) {
  built += bytes;
  if (built <= limits.max_built) return {};
  return make_error(errc::bad_request, "the template built more than " +
                                           std::to_string(limits.max_built) +
                                           " bytes of strings and lists");
}

caf::error template_budget::check_string(size_t bytes) const {
  if (bytes <= limits.max_output) return {};
  return make_error(errc::bad_request, "a string of " + std::to_string(bytes) +
                                           " bytes exceeds the limit of " +
                                           std::to_string(limits.max_output));
}

caf::error template_budget::check_list(size_t items) const {
  size_t left = limits.max_built > built ? limits.max_built - built : 0;
  if (items <= left / sizeof(template_value)) return {};
  return make_error(errc::bad_request, "a list of " + std::to_string(items) +
                                           " items exceeds what is left to build (" +
                                           std::to_string(left) + " bytes)");
}

size_t built_size(const template_value& v) {
  if (v.type() == template_value::kind::string) return v.as_string().size();
  if (auto* l = template_value_access::list_box(v)) return l->items.size() * sizeof(template_value);
  if (auto* d = template_value_access::dict_box(v))
    return d->entries.size() * sizeof(template_dict::entry);
  return 0;
}

uint64_t scan_cost(const template_value& v) {
  if (v.type() == template_value::kind::string) return v.as_string().size() / 64;
  if (auto* l = template_value_access::list_box(v)) return l->items.size();
  if (auto* d = template_value_access::dict_box(v)) return d->entries.size();
  return 0;
}

}  // namespace detail

// ---- chat_template ---------------------------------------------------------------------------

namespace {

// As jinja2 without keep_trailing_newline: \r\n and \r become \n, and one final newline goes.
std::string normalise_newlines(std::string text) {
  std::string out;
  out.reserve(text.size());
  for (size_t i = 0; i < text.size(); ++i) {
    if (text[i] == '\r') {
      out += '\n';
      if (i + 1 < text.size() && text[i + 1] == '\n') ++i;
    } else {
      out += text[i];
    }
  }
  if (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

}  // namespace

chat_template::chat_template(std::shared_ptr<const detail::template_program> program)
    : program_(std::move(program)) {}

caf::expected<chat_template> chat_template::parse(std::string text) {
  auto program = detail::parse_template(normalise_newlines(std::move(text)));
  if (!program) return std::move(program.error());
  return chat_template(std::move(*program));
}

caf::expected<std::string> chat_template::render_chat(const template_list& messages,
                                                      bool add_generation_prompt,
                                                      const std::optional<std::string>& bos_token,
                                                      const std::optional<std::string>& eos_token,
                                                      const template_dict& extra,
                                                      const template_limits& limits) const {
  template_dict context;
  context.set("messages", template_value(messages));
  context.set("add_generation_prompt", add_generation_prompt);
  if (bos_token) context.set("bos_token", *bos_token);
  if (eos_token) context.set("eos_token", *eos_token);
  for (auto& [key, value] : extra) context.set(key, value);
  return render(context, limits);
}

caf::expected<std::string> chat_template::render_chat(const std::vector<chat_message>& messages,
                                                      bool add_generation_prompt,
                                                      const std::optional<std::string>& bos_token,
                                                      const std::optional<std::string>& eos_token,
                                                      const template_dict& extra,
                                                      const template_limits& limits) const {
  template_list list;
  list.reserve(messages.size());
  for (auto& m : messages) {
    template_dict d;
    d.set("role", m.role);
    d.set("content", m.content);
    for (auto& [key, value] : m.fields) d.set(key, value);
    list.emplace_back(std::move(d));
  }
  return render_chat(list, add_generation_prompt, bos_token, eos_token, extra, limits);
}

}  // namespace keel
