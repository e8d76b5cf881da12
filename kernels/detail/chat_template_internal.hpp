#pragma once

// What the parts of the chat template interpreter share and nobody else uses: the value boxes,
// the syntax tree, the budget of one render and the built-in filters, tests and methods.
// chat_template_parse.cpp builds the tree, chat_template_render.cpp walks it,
// chat_template_values.cpp holds the Python semantics of the values and chat_template_builtins.cpp
// the methods, filters, tests and globals.

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

#include "kernels/chat_template.hpp"
#include "kernels/unicode.hpp"

namespace keel::detail {

struct template_stmt;

/// A list or tuple. `depth` is 1 + the deepest item's; `holds_namespace` says some item is or
/// holds a namespace (such a value may not be stored in a namespace: that would allow cycles).
struct template_list_box {
  template_list items;
  bool tuple = false;
  bool holds_namespace = false;
  uint32_t depth = 1;
};

struct template_dict_box {
  template_dict entries;
  bool holds_namespace = false;
  uint32_t depth = 1;
};

/// A namespace() object: the only mutable value, changed by `{% set ns.attr = ... %}`.
struct template_namespace {
  template_dict attributes;
};

struct template_budget;

/// A callable value: a caller's function (`call`) or one of ours (`builtin`: bound methods and
/// globals, which may spend from the render's budget).
struct template_function {
  using builtin_type =
      std::function<caf::expected<template_value>(const template_args&, template_budget&)>;
  std::string name;
  template_value::function_type call;
  builtin_type builtin;
  bool holds_namespace = false;  // a bound method of a receiver that holds one
  uint32_t depth = 0;
};

/// A macro defined by the template. Keeps the parse alive, so the node stays valid.
struct template_macro {
  std::shared_ptr<const template_program> program;
  const template_stmt* node = nullptr;
};

/// Raw access to a value's representation, for the interpreter.
struct template_value_access {
  static const template_value::data_type& data(const template_value& v) { return v.data_; }
  static const template_list_box* list_box(const template_value& v);
  static const template_dict_box* dict_box(const template_value& v);
  static template_namespace* namespace_box(const template_value& v);
  static const template_function* function_box(const template_value& v);
  static const template_macro* macro_box(const template_value& v);
  static template_value make_namespace(template_dict attributes);
  static template_value make_builtin(std::string name, template_function::builtin_type fn,
                                     const template_value& receiver);
  static template_value make_macro(std::shared_ptr<const template_program> program,
                                   const template_stmt* node);
};

/// 1 + the nesting of lists, dicts and namespaces within `v` (0 for a scalar).
uint32_t depth_of(const template_value& v);
/// Whether `v` is or holds a namespace.
bool holds_namespace(const template_value& v);

// ---- syntax tree ---------------------------------------------------------------------------

enum class expr_op : uint8_t {
  literal,    // value
  name,       // name
  list,       // args: items
  tuple,      // args: items
  dict,       // args: key, value, key, value...
  attribute,  // args[0].name
  subscript,  // args[0][args[1]]
  slice,      // args[0][args[1]:args[2]:args[3]], each bound may be null
  call,       // args[0](args[1..], named)
  filter,     // args[0]|name(args[1..], named)
  test,       // args[0] is [not] name(args[1..], named)
  neg,
  pos,
  not_,
  and_,
  or_,
  add,
  sub,
  mul,
  div,
  floordiv,
  mod,
  pow,
  concat,     // ~
  compare,    // args[0] compares[0] args[1] compares[1] args[2]...
  condition,  // args[0] if args[1] else args[2] (args[2] may be null)
};

enum class compare_op : uint8_t { eq, ne, lt, le, gt, ge, in, not_in };

struct template_expr;
using expr_ptr = std::unique_ptr<template_expr>;

struct template_expr {
  expr_op op = expr_op::literal;
  uint32_t pos = 0;     // byte offset in the template, for error messages
  uint32_t height = 1;  // 1 + the highest child's height: the parser bounds it
  std::string name;
  template_value value;
  std::vector<expr_ptr> args;
  std::vector<std::pair<std::string, expr_ptr>> named;
  std::vector<compare_op> compares;
  bool negated = false;  // test: `is not`
};

enum class stmt_op : uint8_t {
  text,       // text
  output,     // {{ value }}
  if_,        // conditions[i] → branches[i], else otherwise
  for_,       // for targets in value [if filter]: body, else otherwise
  set,        // set targets = value; with attribute: set targets[0].attribute = value
  set_block,  // set targets[0]: body, captured
  macro,      // macro name(params): body
  block,      // generation: body, rendered in place
  break_,
  continue_,
};

struct template_stmt;
using stmt_ptr = std::unique_ptr<template_stmt>;
using stmt_list = std::vector<stmt_ptr>;

struct template_stmt {
  stmt_op op = stmt_op::text;
  uint32_t pos = 0;
  std::string text;  // text; macro: its name
  std::vector<std::string> targets;
  std::string attribute;
  expr_ptr value;
  expr_ptr filter;
  std::vector<expr_ptr> conditions;
  std::vector<stmt_list> branches;
  std::vector<std::pair<std::string, expr_ptr>> params;  // macro: name, default (may be null)
  stmt_list body;
  stmt_list otherwise;
};

/// "line 3, column 14" for the byte offset `pos` of `source` (columns count code points).
std::string describe_position(std::string_view source, uint32_t pos);

/// A parsed template: the source (newlines normalised, as positions refer to it) and its tree.
struct template_program {
  std::string source;
  stmt_list body;

  /// "chat template line 3, column 14" for the byte offset `pos` (columns count code points).
  std::string where(uint32_t pos) const;
};

/// Parses `source` (already normalised); errors are bad_model naming the line and column.
caf::expected<std::shared_ptr<template_program>> parse_template(std::string source);

// ---- one render ----------------------------------------------------------------------------

/// What one render may still spend; shared by the evaluator and the built-ins. Errors are
/// bad_request without a position (the evaluator adds it).
struct template_budget {
  template_limits limits;
  uint64_t steps = 0;
  size_t built = 0;

  /// Counts `n` steps of work.
  caf::error step(uint64_t n = 1);
  /// Counts `bytes` of strings or lists built.
  caf::error build(size_t bytes);
  /// Refuses a string of `bytes` (above limits.max_output) before it is built.
  caf::error check_string(size_t bytes) const;
  /// Refuses a list of `items` before it is built, when it would not fit what is left to build.
  caf::error check_list(size_t items) const;
};

/// Bytes a built value counts for in the budget.
size_t built_size(const template_value& v);
/// Work to scan `v` (items of a list or dict, 64-byte pieces of a string).
uint64_t scan_cost(const template_value& v);

// ---- helpers of the built-ins (chat_template_values.cpp, chat_template_builtins.cpp) ----------

/// A bad_request error without a position (the evaluator adds it).
caf::error refuse(std::string what);
/// The error for a string longer than budget.limits.max_output.
caf::error too_long(const template_budget& budget);

inline bool is_number(const template_value& v) {
  auto k = v.type();
  return k == template_value::kind::boolean || k == template_value::kind::integer ||
         k == template_value::kind::floating;
}
/// An int or a bool, which Python counts as an int.
inline bool is_integer(const template_value& v) {
  auto k = v.type();
  return k == template_value::kind::boolean || k == template_value::kind::integer;
}
/// The value of an int or a bool.
inline int64_t int_of(const template_value& v) {
  return v.type() == template_value::kind::boolean ? int64_t{v.as_bool()} : v.as_int();
}
/// The value of a number.
inline double float_of(const template_value& v) {
  return v.type() == template_value::kind::floating ? v.as_float() : static_cast<double>(int_of(v));
}
inline bool is_str(const template_value& v) {
  return v.type() == template_value::kind::string;
}
inline bool is_seq(const template_value& v) {
  return v.type() == template_value::kind::list || v.type() == template_value::kind::tuple;
}
/// Undefined or none: an optional argument that was not given.
inline bool absent(const template_value& v) {
  return v.is_undefined() || v.is_none();
}

/// The characters of a string as Python indexes them: code points (an invalid byte counts as
/// one). Offsets are computed only when the string is not ASCII.
class char_index {
 public:
  explicit char_index(std::string_view s) : s_(s) {
    bool ascii = std::all_of(s.begin(), s.end(), [](char c) { return (c & 0x80) == 0; });
    if (ascii) return;
    for (size_t i = 0; i < s.size(); i += static_cast<size_t>(decode_utf8(s, i).len))
      at_.push_back(i);
    at_.push_back(s.size());
  }
  size_t size() const { return at_.empty() ? s_.size() : at_.size() - 1; }
  /// The byte offset of character `i` (i == size() gives the end).
  size_t offset(size_t i) const { return at_.empty() ? i : at_[i]; }
  std::string_view operator[](size_t i) const {
    return s_.substr(offset(i), offset(i + 1) - offset(i));
  }

 private:
  std::string_view s_;
  std::vector<size_t> at_;
};

/// The length of the prefix of `s` whose code points satisfy `pred` (an invalid byte stops it).
template <class Pred>
size_t lstrip_if(std::string_view s, Pred pred) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = decode_utf8(s, i);
    if (!c.valid || !pred(c.cp)) break;
    i += static_cast<size_t>(c.len);
  }
  return i;
}

/// The length of `s` without its suffix of code points that satisfy `pred`.
template <class Pred>
size_t rstrip_if(std::string_view s, Pred pred) {
  size_t end = s.size();
  while (end > 0) {
    size_t start = end - 1;
    while (start > 0 && end - start < 4 && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80) --start;
    auto c = decode_utf8(s, start);
    if (!c.valid || start + static_cast<size_t>(c.len) != end || !pred(c.cp)) break;
    end = start;
  }
  return end;
}

/// How json.dumps writes: transformers' tojson passes ensure_ascii, indent, separators, sort_keys.
struct json_style {
  bool ensure_ascii = false;
  bool indented = false;
  std::string indent;
  std::string item_separator = ", ";
  std::string key_separator = ": ";
  bool sort_keys = false;
};

/// Appends json.dumps(v) at nesting `level`; an error for what JSON cannot hold (undefined,
/// namespaces, functions) or when `out` passes `cap` bytes.
caf::error append_json(std::string& out, const template_value& v, const json_style& style,
                       int level, size_t cap);

// ---- Python semantics of values (chat_template_values.cpp) --------------------------------

/// Python's str.isspace() for one code point.
bool is_python_space(uint32_t cp);
/// The length of `s` without its trailing whitespace (Python's rstrip()).
size_t rstrip_space(std::string_view s);
/// The length of the leading whitespace of `s`.
size_t lstrip_space(std::string_view s);

/// Python's type name: "str", "int", "NoneType", "Undefined"...
const char* type_name(const template_value& v);
bool truthy(const template_value& v);
bool equals(const template_value& a, const template_value& b);
/// -1, 0 or 1 as Python orders numbers, strings and lists; an error for other types.
caf::expected<int> order(const template_value& a, const template_value& b);

/// Appends Python's str(v) (undefined gives nothing) to `out`; false, leaving `out` longer but
/// unfinished, when `out` would pass `cap` bytes.
bool append_str(std::string& out, const template_value& v, size_t cap);
caf::expected<std::string> to_str(const template_value& v, const template_budget& budget);
/// Python's repr of a string.
std::string repr_string(std::string_view s);
/// Python's repr of a float: shortest round trip, `1.0`, `1e+16`, `inf`.
std::string repr_float(double d);

/// The items of iterating `v`: a list's items, a dict's keys, a string's characters, nothing for
/// undefined; an error for the rest.
caf::expected<template_value> iterate(const template_value& v, template_budget& budget);

/// `obj.name`: a bound method of a string or a dict, a dict's key, a namespace's attribute, or
/// undefined.
template_value get_attribute(const template_value& obj, const std::string& name);
/// `obj[key]`: an item, a key, or (string keys) an attribute; undefined when missing.
template_value get_item(const template_value& obj, const template_value& key);
/// `obj[start:stop:step]` (undefined or none bounds are open).
caf::expected<template_value> get_slice(const template_value& obj, const template_value& start,
                                        const template_value& stop, const template_value& step,
                                        template_budget& budget);
/// +, -, *, /, //, %, ** and ~ on two values.
caf::expected<template_value> arithmetic(expr_op op, const template_value& a,
                                         const template_value& b, template_budget& budget);
caf::expected<template_value> negate(const template_value& v);
/// `item in container`.
caf::expected<bool> contains(const template_value& container, const template_value& item);

// ---- built-ins (chat_template_builtins.cpp) --------------------------------------------------

/// Whether `obj` (a string or a dict) has the method `name`; calls it.
bool has_method(const template_value& obj, std::string_view name);
caf::expected<template_value> call_method(const template_value& obj, std::string_view name,
                                          const template_args& args, template_budget& budget);

bool has_filter(std::string_view name);
caf::expected<template_value> apply_filter(std::string_view name, const template_value& v,
                                           const template_args& args, template_budget& budget);
bool has_test(std::string_view name);
caf::expected<bool> apply_test(std::string_view name, const template_value& v,
                               const template_args& args);

/// The global functions: namespace(), range(), raise_exception(); undefined for other names.
template_value global(std::string_view name);

}  // namespace keel::detail
