#pragma once

// Chat templates: a model's `tokenizer.chat_template` (Jinja2 text) turned into a prompt by a small
// Jinja interpreter with the semantics of Python jinja2 as Hugging Face transformers configures it
// (trim_blocks, lstrip_blocks, its own `tojson`, `raise_exception`). docs/engine.md, "Chat
// templates", lists the supported subset and the bounds.

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <initializer_list>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

namespace keel {

class template_value;
class template_dict;
struct template_args;

namespace detail {
struct template_program;
struct template_list_box;
struct template_dict_box;
struct template_namespace;
struct template_function;
struct template_macro;
struct template_value_access;

/// Integer types a template_value takes as an int (bool is its own kind).
template <class T>
concept template_integer = std::integral<T> && !std::same_as<T, bool>;
}  // namespace detail

/// The items of a list or tuple of template data.
using template_list = std::vector<template_value>;

/// A value of template data, typed as Python jinja2 sees it: undefined, none, bool, int (64-bit
/// here), float, str (UTF-8 bytes, indexed by code point), list, tuple, dict (string keys in
/// insertion order), and what only a template makes: namespace() objects, macros, functions (a
/// caller's own, e.g. `strftime_now`, or a bound method such as `s.strip`). Copies are cheap: the
/// contents are shared and immutable, except a namespace's attributes, which only a template sets.
class template_value {
 public:
  enum class kind : uint8_t {
    undefined,
    none,
    boolean,
    integer,
    floating,
    string,
    list,
    tuple,
    dict,
    namespace_object,
    function,
    macro,
  };

  /// A caller's function: takes the call's arguments, returns a value or an error (whose message
  /// the render error repeats, after the template line and column of the call).
  using function_type = std::function<caf::expected<template_value>(const template_args&)>;

  /// Undefined: what a name that is not set evaluates to.
  template_value() = default;
  template_value(bool b);
  template <detail::template_integer T>
  template_value(T i) : data_(static_cast<int64_t>(i)) {}
  template_value(double d);
  template_value(std::string s);
  template_value(std::string_view s);
  template_value(const char* s);
  template_value(template_list items);
  template_value(template_dict entries);

  /// Python's None.
  static template_value none();
  /// A tuple: a list that renders as `(a, b)`, as dict.items() pairs do.
  static template_value tuple(template_list items);
  /// A function the template can call, e.g. `function("strftime_now", ...)` passed as a variable.
  static template_value function(std::string name, function_type fn);

  kind type() const;
  bool is_undefined() const { return std::holds_alternative<std::monostate>(data_); }
  bool is_none() const { return std::holds_alternative<none_tag>(data_); }

  /// The value itself; each requires type() to be that kind.
  bool as_bool() const;
  int64_t as_int() const;
  double as_float() const;
  const std::string& as_string() const;
  const template_list& as_list() const;  // a list or a tuple
  const template_dict& as_dict() const;

 private:
  friend struct detail::template_value_access;
  struct none_tag {
    bool operator==(const none_tag&) const = default;
  };
  using data_type = std::variant<
      std::monostate, none_tag, bool, int64_t, double, std::shared_ptr<const std::string>,
      std::shared_ptr<const detail::template_list_box>,
      std::shared_ptr<const detail::template_dict_box>, std::shared_ptr<detail::template_namespace>,
      std::shared_ptr<const detail::template_function>,
      std::shared_ptr<const detail::template_macro>>;
  explicit template_value(data_type data) : data_(std::move(data)) {}
  data_type data_;
};

/// A dict of template data: string keys, each once, kept in insertion order as Python's dicts
/// keep them (tojson and iteration follow it). Lookups are linear: template dicts are small.
class template_dict {
 public:
  using entry = std::pair<std::string, template_value>;
  using const_iterator = std::vector<entry>::const_iterator;

  template_dict() = default;
  /// The entries in order; a repeated key keeps its first place and its last value.
  template_dict(std::initializer_list<entry> entries);

  /// Sets `key`: replaces its value in place when present, else appends it.
  void set(std::string key, template_value value);
  /// The value of `key`, or nullptr.
  const template_value* find(std::string_view key) const;

  size_t size() const { return entries_.size(); }
  bool empty() const { return entries_.empty(); }
  const_iterator begin() const { return entries_.begin(); }
  const_iterator end() const { return entries_.end(); }

 private:
  std::vector<entry> entries_;
};

/// The arguments of a call from a template, `f(1, 'a', key=2)`, in the order written.
struct template_args {
  template_list positional;
  std::vector<std::pair<std::string, template_value>> named;
};

/// Bounds on one render, so that a hostile template (it comes from a model file) is refused with
/// a bad_request error naming the bound instead of exhausting the stack, memory or time.
struct template_limits {
  /// Bytes of rendered output; also the largest string a template may build.
  size_t max_output = size_t{16} << 20;
  /// Bytes of strings and lists (24 bytes an item) the template builds in one render, in total.
  size_t max_built = size_t{256} << 20;
  /// Nesting of evaluation (statements, expressions, macro calls) and of the lists and dicts a
  /// template builds. A recursive macro stops here.
  int max_depth = 400;
  /// Statements and expressions evaluated, plus items and 64-byte pieces of strings scanned by
  /// filters, methods and operators, in one render.
  uint64_t max_steps = 20'000'000;
};

/// One message of a conversation: `role` and `content`, plus any further fields the template may
/// read (`reasoning_content`, `tool_calls`, `name`...), given to it as they are.
struct chat_message {
  std::string role;
  std::string content;
  template_dict fields;
};

/// A parsed chat template. Immutable once parsed: copies share the parse, and render may be called
/// from any number of threads at once.
class chat_template {
 public:
  /// Parses `text`, a model's tokenizer.chat_template. Refuses (bad_model) text outside the
  /// supported subset or malformed, naming the place: "chat template line 3, column 14: expected
  /// '%}', got 'foo'".
  static caf::expected<chat_template> parse(std::string text);

  /// Renders with the variables of `context`. Errors name the template line and column and are
  /// bad_request: type errors, calling an undefined name, a bound of `limits` exceeded, and
  /// `raise_exception(msg)`, whose message is carried ("...: raise_exception: <msg>"). An error
  /// returned by a caller's function keeps its class.
  caf::expected<std::string> render(const template_dict& context,
                                    const template_limits& limits = {}) const;

  /// Renders a conversation as transformers' apply_chat_template does: variables `messages`,
  /// `add_generation_prompt`, `bos_token` and `eos_token` (left undefined when nullopt, as for a
  /// model without that token), then `extra` (tools, enable_thinking...), which may override them.
  /// `messages` are dicts with at least `role` and `content`.
  caf::expected<std::string> render_chat(const template_list& messages, bool add_generation_prompt,
                                         const std::optional<std::string>& bos_token,
                                         const std::optional<std::string>& eos_token,
                                         const template_dict& extra = {},
                                         const template_limits& limits = {}) const;

  /// As above, for messages given as role, content and further fields.
  caf::expected<std::string> render_chat(const std::vector<chat_message>& messages,
                                         bool add_generation_prompt,
                                         const std::optional<std::string>& bos_token,
                                         const std::optional<std::string>& eos_token,
                                         const template_dict& extra = {},
                                         const template_limits& limits = {}) const;

 private:
  explicit chat_template(std::shared_ptr<const detail::template_program> program);
  std::shared_ptr<const detail::template_program> program_;
};

}  // namespace keel
