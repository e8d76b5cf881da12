// The built-ins chat templates call: the string and dict methods, the filters, the tests and the
// globals (namespace, range, raise_exception), with Python's and jinja2's semantics.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <optional>

#include <unicode/uchar.h>
#include <unicode/ustring.h>

#include "base/error.hpp"
#include "kernels/detail/chat_template_internal.hpp"
#include "kernels/unicode.hpp"

namespace keel::detail {

using kind = template_value::kind;
using access = template_value_access;

namespace {

// ---- characters --------------------------------------------------------------------------------

size_t length_of(std::string_view s) {
  size_t n = 0;
  for (size_t i = 0; i < s.size(); i += static_cast<size_t>(decode_utf8(s, i).len)) ++n;
  return n;
}

/// Applies `map` to each code point of `s`; `first` says whether it is a word's first.
template <class Map>
std::string map_code_points(std::string_view s, Map map) {
  std::string out;
  out.reserve(s.size());
  uint32_t prev = 0;
  for (size_t i = 0; i < s.size();) {
    auto c = decode_utf8(s, i);
    if (c.valid)
      append_utf8(out, map(c.cp, i == 0, prev));
    else
      out += s[i];
    prev = c.cp;
    i += static_cast<size_t>(c.len);
  }
  return out;
}

/// Python's str.upper()/lower(): ICU's full case mapping in the root locale ("ß" upper is "SS").
/// Text that is not valid UTF-8 is mapped code point by code point, keeping the stray bytes.
std::string change_case(std::string_view s, bool to_upper) {
  auto simple = [&] {
    return map_code_points(s, [to_upper](uint32_t cp, bool, uint32_t) {
      auto c = static_cast<UChar32>(cp);
      return static_cast<uint32_t>(to_upper ? u_toupper(c) : u_tolower(c));
    });
  };
  if (s.size() > static_cast<size_t>(std::numeric_limits<int32_t>::max() / 4)) return simple();
  UErrorCode status = U_ZERO_ERROR;
  int32_t len16 = 0;
  std::u16string utf16(s.size(), u'\0');
  u_strFromUTF8(utf16.data(), static_cast<int32_t>(utf16.size()), &len16, s.data(),
                static_cast<int32_t>(s.size()), &status);
  if (U_FAILURE(status)) return simple();
  std::u16string mapped(static_cast<size_t>(len16) * 3 + 1, u'\0');
  auto map = to_upper ? u_strToUpper : u_strToLower;
  int32_t len =
      map(mapped.data(), static_cast<int32_t>(mapped.size()), utf16.data(), len16, "", &status);
  if (U_FAILURE(status)) return simple();
  std::string out(static_cast<size_t>(len) * 3, '\0');
  int32_t len8 = 0;
  u_strToUTF8(out.data(), static_cast<int32_t>(out.size()), &len8, mapped.data(), len, &status);
  if (U_FAILURE(status)) return simple();
  out.resize(static_cast<size_t>(len8));
  return out;
}

std::string upper(std::string_view s) {
  return change_case(s, true);
}
std::string lower(std::string_view s) {
  return change_case(s, false);
}

// ---- arguments ---------------------------------------------------------------------------------

/// Binds `args` to `params` as Python does: positional ones first, then by name. Absent
/// parameters are undefined; the first `required` must be given.
caf::expected<std::vector<template_value>> bind(std::string_view callee, const template_args& args,
                                                std::initializer_list<std::string_view> params,
                                                size_t required = 0) {
  std::vector<template_value> out(params.size());
  std::vector<bool> given(params.size());
  if (args.positional.size() > params.size())
    return refuse(std::string(callee) + "() takes at most " + std::to_string(params.size()) +
                  " arguments (" + std::to_string(args.positional.size()) + " given)");
  for (size_t i = 0; i < args.positional.size(); ++i) out[i] = args.positional[i], given[i] = true;
  for (auto& [name, value] : args.named) {
    auto it = std::find(params.begin(), params.end(), name);
    if (it == params.end())
      return refuse(std::string(callee) + "() got an unexpected keyword argument '" + name + "'");
    size_t i = static_cast<size_t>(it - params.begin());
    if (given[i])
      return refuse(std::string(callee) + "() got multiple values for argument '" + name + "'");
    out[i] = value, given[i] = true;
  }
  for (size_t i = 0; i < required; ++i)
    if (!given[i])
      return refuse(std::string(callee) + "() missing required argument '" +
                    std::string(params.begin()[i]) + "'");
  return out;
}

caf::expected<std::string> string_arg(std::string_view callee, const template_value& v) {
  if (is_str(v)) return v.as_string();
  return refuse(std::string(callee) + "() needs a string argument, got " + type_name(v));
}

// ---- methods -----------------------------------------------------------------------------------

caf::expected<template_value> split(std::string_view s, const template_value& sep,
                                    const template_value& maxsplit, template_budget& budget) {
  int64_t max = -1;
  if (!absent(maxsplit)) {
    if (!is_integer(maxsplit)) return refuse("split() maxsplit must be an integer");
    max = int_of(maxsplit);
  }
  template_list parts;
  auto add = [&](std::string_view part) -> caf::error {
    if (auto e = budget.check_list(parts.size() + 1)) return e;
    parts.emplace_back(part);
    return {};
  };
  if (absent(sep)) {  // runs of whitespace; no empty parts
    size_t i = lstrip_space(s);
    while (i < s.size()) {
      if (max-- == 0) {
        if (auto e = add(s.substr(i))) return e;
        break;
      }
      size_t j = i;
      while (j < s.size()) {
        auto c = decode_utf8(s, j);
        if (c.valid && is_python_space(c.cp)) break;
        j += static_cast<size_t>(c.len);
      }
      if (auto e = add(s.substr(i, j - i))) return e;
      i = j + lstrip_space(s.substr(j));
    }
    return template_value(std::move(parts));
  }
  auto delimiter = string_arg("split", sep);
  if (!delimiter) return delimiter.error();
  if (delimiter->empty()) return refuse("split(): empty separator");
  size_t i = 0;
  while (true) {
    size_t j = max-- == 0 ? std::string_view::npos : s.find(*delimiter, i);
    if (j == std::string_view::npos) {
      if (auto e = add(s.substr(i))) return e;
      break;
    }
    if (auto e = add(s.substr(i, j - i))) return e;
    i = j + delimiter->size();
  }
  return template_value(std::move(parts));
}

/// Python's strip family: `which` is 'l', 'r' or 'b' (both).
caf::expected<template_value> strip(std::string_view s, const template_value& chars, char which) {
  size_t begin = 0, end = s.size();
  if (absent(chars)) {
    if (which != 'r') begin = lstrip_space(s);
    if (which != 'l') end = std::max(begin, rstrip_space(s));
  } else {
    auto set = string_arg("strip", chars);
    if (!set) return set.error();
    std::vector<uint32_t> cps;
    for (size_t i = 0; i < set->size();) {
      auto c = decode_utf8(*set, i);
      cps.push_back(c.cp);
      i += static_cast<size_t>(c.len);
    }
    auto in_set = [&](uint32_t cp) { return std::find(cps.begin(), cps.end(), cp) != cps.end(); };
    if (which != 'r') begin = lstrip_if(s, in_set);
    if (which != 'l') end = std::max(begin, rstrip_if(s, in_set));
  }
  return template_value(s.substr(begin, end - begin));
}

caf::expected<template_value> replace(std::string_view s, const std::string& old,
                                      const std::string& with, int64_t count,
                                      template_budget& budget) {
  std::vector<size_t> at;  // where each replaced occurrence starts
  if (old.empty()) {
    char_index chars(s);
    for (size_t i = 0; i <= chars.size(); ++i) at.push_back(chars.offset(i));
  } else {
    for (size_t i = s.find(old); i != std::string_view::npos; i = s.find(old, i + old.size()))
      at.push_back(i);
  }
  if (count >= 0 && static_cast<uint64_t>(count) < at.size()) at.resize(static_cast<size_t>(count));
  size_t size = s.size() + at.size() * with.size();
  if (auto e = budget.check_string(size)) return e;
  std::string out;
  out.reserve(size);
  size_t last = 0;
  for (size_t i : at) {
    out.append(s.substr(last, i - last));
    out += with;
    last = i + old.size();
  }
  out.append(s.substr(last));
  return template_value(std::move(out));
}

bool is_string_method(std::string_view name) {
  static constexpr std::string_view names[] = {"startswith", "endswith", "split", "strip",
                                               "lstrip",     "rstrip",   "upper", "lower",
                                               "replace",    "find",     "count"};
  return std::find(std::begin(names), std::end(names), name) != std::end(names);
}

bool is_dict_method(std::string_view name) {
  return name == "items" || name == "keys" || name == "values" || name == "get";
}

caf::expected<template_value> affix_test(std::string_view name, std::string_view s,
                                         const template_args& args) {
  auto a = bind(name, args, {"prefix"}, 1);
  if (!a) return a.error();
  std::vector<std::string_view> affixes;
  if (is_str((*a)[0])) {
    affixes.push_back((*a)[0].as_string());
  } else if ((*a)[0].type() == kind::tuple) {
    for (auto& item : (*a)[0].as_list()) {
      if (!is_str(item)) return refuse(std::string(name) + "() needs strings");
      affixes.push_back(item.as_string());
    }
  } else {
    return refuse(std::string(name) + "() argument must be a str or a tuple of str, not " +
                  type_name((*a)[0]));
  }
  for (auto affix : affixes)
    if (name == "startswith" ? s.starts_with(affix) : s.ends_with(affix)) return true;
  return false;
}

caf::expected<template_value> string_method(const std::string& s, std::string_view name,
                                            const template_args& args, template_budget& budget) {
  if (name == "startswith" || name == "endswith") return affix_test(name, s, args);
  if (name == "split") {
    auto a = bind(name, args, {"sep", "maxsplit"});
    if (!a) return a.error();
    return split(s, (*a)[0], (*a)[1], budget);
  }
  if (name == "strip" || name == "lstrip" || name == "rstrip") {
    auto a = bind(name, args, {"chars"});
    if (!a) return a.error();
    return strip(s, (*a)[0], name[0] == 's' ? 'b' : name[0]);
  }
  if (name == "upper" || name == "lower") {
    auto a = bind(name, args, {});
    if (!a) return a.error();
    return template_value(name == "upper" ? upper(s) : lower(s));
  }
  if (name == "replace") {
    auto a = bind(name, args, {"old", "new", "count"}, 2);
    if (!a) return a.error();
    auto old = string_arg(name, (*a)[0]);
    auto with = string_arg(name, (*a)[1]);
    if (!old) return old.error();
    if (!with) return with.error();
    int64_t count = is_integer((*a)[2]) ? int_of((*a)[2]) : -1;
    return replace(s, *old, *with, count, budget);
  }
  // find, count
  auto a = bind(name, args, {"sub"}, 1);
  if (!a) return a.error();
  auto sub = string_arg(name, (*a)[0]);
  if (!sub) return sub.error();
  if (name == "find") {
    size_t at = s.find(*sub);
    if (at == std::string::npos) return int64_t{-1};
    return static_cast<int64_t>(length_of(std::string_view(s).substr(0, at)));
  }
  if (sub->empty()) return static_cast<int64_t>(length_of(s) + 1);
  int64_t n = 0;
  for (size_t i = s.find(*sub); i != std::string::npos; i = s.find(*sub, i + sub->size())) ++n;
  return n;
}

caf::expected<template_value> dict_method(const template_dict& d, std::string_view name,
                                          const template_args& args, template_budget& budget) {
  if (name == "get") {
    auto a = bind(name, args, {"key", "default"}, 1);
    if (!a) return a.error();
    if (is_str((*a)[0]))
      if (auto* v = d.find((*a)[0].as_string())) return *v;
    return (*a)[1].is_undefined() ? template_value::none() : (*a)[1];
  }
  auto a = bind(name, args, {});
  if (!a) return a.error();
  if (auto e = budget.check_list(d.size())) return e;
  template_list out;
  out.reserve(d.size());
  for (auto& [key, value] : d) {
    if (name == "items")
      out.push_back(template_value::tuple({key, value}));
    else
      out.emplace_back(name == "keys" ? template_value(key) : value);
  }
  return template_value(std::move(out));
}

// ---- filters -----------------------------------------------------------------------------------

using filter_fn = caf::expected<template_value> (*)(const template_value&, const template_args&,
                                                    template_budget&);

/// `item.a.0.b` as jinja2's attribute filters read a dotted path.
template_value attribute_path(template_value v, std::string_view path) {
  while (true) {
    size_t dot = path.find('.');
    auto part = path.substr(0, dot);
    int64_t index = 0;
    auto r = std::from_chars(part.data(), part.data() + part.size(), index);
    if (!part.empty() && r.ec == std::errc() && r.ptr == part.data() + part.size())
      v = get_item(v, index);
    else
      v = get_item(v, std::string(part));
    if (dot == std::string_view::npos) return v;
    path = path.substr(dot + 1);
  }
}

caf::expected<template_value> f_trim(const template_value& v, const template_args& args,
                                     template_budget& budget) {
  auto a = bind("trim", args, {"chars"});
  if (!a) return a.error();
  auto s = to_str(v, budget);
  if (!s) return s.error();
  return strip(*s, (*a)[0], 'b');
}

caf::expected<template_value> f_tojson(const template_value& v, const template_args& args,
                                       template_budget& budget) {
  // transformers' signature: tojson(x, ensure_ascii=False, indent=None, separators=None,
  // sort_keys=False)
  auto a = bind("tojson", args, {"ensure_ascii", "indent", "separators", "sort_keys"});
  if (!a) return a.error();
  json_style style;
  style.ensure_ascii = truthy((*a)[0]);
  auto& indent = (*a)[1];
  if (is_integer(indent)) {
    if (int_of(indent) > 1024) return refuse("tojson: indent above 1024");
    style.indented = true;
    style.indent.assign(static_cast<size_t>(std::max<int64_t>(int_of(indent), 0)), ' ');
  } else if (is_str(indent)) {
    style.indented = true;
    style.indent = indent.as_string();
  } else if (!absent(indent)) {
    return refuse(std::string("tojson: indent must be an integer or a string, got ") +
                  type_name(indent));
  }
  if (style.indented) style.item_separator = ",";
  if (!absent((*a)[2])) {
    auto& seps = (*a)[2];
    if (!is_seq(seps) || seps.as_list().size() != 2 || !is_str(seps.as_list()[0]) ||
        !is_str(seps.as_list()[1]))
      return refuse("tojson: separators must be two strings");
    style.item_separator = seps.as_list()[0].as_string();
    style.key_separator = seps.as_list()[1].as_string();
  }
  style.sort_keys = truthy((*a)[3]);
  std::string out;
  if (auto e = append_json(out, v, style, 0, budget.limits.max_output)) return e;
  return template_value(std::move(out));
}

caf::expected<template_value> f_length(const template_value& v, const template_args& args,
                                       template_budget&) {
  auto a = bind("length", args, {});
  if (!a) return a.error();
  switch (v.type()) {
    case kind::undefined:
      return int64_t{0};
    case kind::string:
      return static_cast<int64_t>(length_of(v.as_string()));
    case kind::list:
    case kind::tuple:
      return static_cast<int64_t>(v.as_list().size());
    case kind::dict:
      return static_cast<int64_t>(v.as_dict().size());
    default:
      return refuse(std::string("length: object of type '") + type_name(v) + "' has no len()");
  }
}

template <std::string (*Map)(std::string_view)>
caf::expected<template_value> f_case(const template_value& v, const template_args& args,
                                     template_budget& budget) {
  auto a = bind(Map == upper ? "upper" : "lower", args, {});
  if (!a) return a.error();
  auto s = to_str(v, budget);
  if (!s) return s.error();
  return template_value(Map(*s));
}

caf::expected<template_value> f_string(const template_value& v, const template_args& args,
                                       template_budget& budget) {
  auto a = bind("string", args, {});
  if (!a) return a.error();
  if (is_str(v)) return v;
  auto s = to_str(v, budget);
  if (!s) return s.error();
  return template_value(std::move(*s));
}

/// Python's int(s, base): optional sign, digits with single underscores, whitespace around.
std::optional<int64_t> parse_int(std::string_view s, int base) {
  s = s.substr(lstrip_space(s));
  s = s.substr(0, rstrip_space(s));
  bool negative = !s.empty() && s[0] == '-';
  if (!s.empty() && (s[0] == '-' || s[0] == '+')) s.remove_prefix(1);
  std::string digits;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '_' && i > 0 && i + 1 < s.size() && s[i - 1] != '_') continue;
    digits += s[i];
  }
  if (digits.empty()) return std::nullopt;
  uint64_t magnitude = 0;
  auto r = std::from_chars(digits.data(), digits.data() + digits.size(), magnitude, base);
  if (r.ec != std::errc() || r.ptr != digits.data() + digits.size()) return std::nullopt;
  if (magnitude > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) + (negative ? 1 : 0))
    return std::nullopt;
  return negative ? static_cast<int64_t>(0 - magnitude) : static_cast<int64_t>(magnitude);
}

/// Python's float(s): whitespace around, `inf`, `nan`, exponents.
std::optional<double> parse_float(std::string_view s) {
  s = s.substr(lstrip_space(s));
  s = s.substr(0, rstrip_space(s));
  if (!s.empty() && s[0] == '+') s.remove_prefix(1);
  std::string digits;
  for (char c : s)
    if (c != '_') digits += c;
  double d = 0;
  auto r = std::from_chars(digits.data(), digits.data() + digits.size(), d);
  if (digits.empty() || r.ec != std::errc() || r.ptr != digits.data() + digits.size())
    return std::nullopt;
  return d;
}

caf::expected<template_value> f_int(const template_value& v, const template_args& args,
                                    template_budget&) {
  auto a = bind("int", args, {"default", "base"});
  if (!a) return a.error();
  template_value fallback = (*a)[0].is_undefined() ? template_value(0) : (*a)[0];
  int base = is_integer((*a)[1]) ? static_cast<int>(int_of((*a)[1])) : 10;
  if (base < 2 || base > 36) return refuse("int: base must be in 2..36");
  if (v.is_undefined()) return refuse("int: the value is undefined");
  if (is_integer(v)) return int_of(v);
  if (v.type() == kind::floating) {
    double d = v.as_float();
    if (!std::isfinite(d) || std::fabs(d) >= 9.2e18) return fallback;
    return static_cast<int64_t>(d);
  }
  if (is_str(v)) {
    if (auto i = parse_int(v.as_string(), base)) return *i;
    if (auto d = parse_float(v.as_string()); d && std::isfinite(*d) && std::fabs(*d) < 9.2e18)
      return static_cast<int64_t>(*d);
  }
  return fallback;
}

caf::expected<template_value> f_float(const template_value& v, const template_args& args,
                                      template_budget&) {
  auto a = bind("float", args, {"default"});
  if (!a) return a.error();
  template_value fallback = (*a)[0].is_undefined() ? template_value(0.0) : (*a)[0];
  if (v.is_undefined()) return refuse("float: the value is undefined");
  if (is_number(v)) return float_of(v);
  if (is_str(v))
    if (auto d = parse_float(v.as_string())) return *d;
  return fallback;
}

caf::expected<template_value> f_list(const template_value& v, const template_args& args,
                                     template_budget& budget) {
  auto a = bind("list", args, {});
  if (!a) return a.error();
  auto items = iterate(v, budget);
  if (!items) return items;
  return template_value(items->as_list());
}

template <bool First>
caf::expected<template_value> f_end(const template_value& v, const template_args& args,
                                    template_budget& budget) {
  auto a = bind(First ? "first" : "last", args, {});
  if (!a) return a.error();
  if (is_str(v)) {  // one character, without splitting the whole string
    auto& s = v.as_string();
    if (s.empty()) return template_value();
    if (First) return template_value(s.substr(0, static_cast<size_t>(decode_utf8(s, 0).len)));
    size_t start = s.size() - 1;
    while (start > 0 && s.size() - start < 4 && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80)
      --start;
    if (start + static_cast<size_t>(decode_utf8(s, start).len) != s.size()) start = s.size() - 1;
    return template_value(s.substr(start));
  }
  auto items = iterate(v, budget);
  if (!items) return items;
  auto& list = items->as_list();
  if (list.empty()) return template_value();
  return First ? list.front() : list.back();
}

caf::expected<template_value> f_join(const template_value& v, const template_args& args,
                                     template_budget& budget) {
  auto a = bind("join", args, {"d", "attribute"});
  if (!a) return a.error();
  std::string separator;
  if (!(*a)[0].is_undefined() && !append_str(separator, (*a)[0], budget.limits.max_output))
    return too_long(budget);
  auto items = iterate(v, budget);
  if (!items) return items;
  std::string out;
  bool first = true;
  for (auto& item : items->as_list()) {
    if (!first) out += separator;
    first = false;
    auto part = is_str((*a)[1]) ? attribute_path(item, (*a)[1].as_string()) : item;
    if (!append_str(out, part, budget.limits.max_output) || out.size() > budget.limits.max_output)
      return too_long(budget);
  }
  return template_value(std::move(out));
}

caf::expected<template_value> f_default(const template_value& v, const template_args& args,
                                        template_budget&) {
  auto a = bind("default", args, {"default_value", "boolean"});
  if (!a) return a.error();
  bool use_default = v.is_undefined() || (truthy((*a)[1]) && !truthy(v));
  if (!use_default) return v;
  return (*a)[0].is_undefined() ? template_value("") : (*a)[0];
}

caf::expected<template_value> f_items(const template_value& v, const template_args& args,
                                      template_budget& budget) {
  if (v.is_undefined()) return template_value(template_list{});
  if (v.type() != kind::dict)
    return refuse(std::string("items: can only get item pairs from a mapping, not ") +
                  type_name(v));
  return dict_method(v.as_dict(), "items", args, budget);
}

caf::expected<template_value> f_replace(const template_value& v, const template_args& args,
                                        template_budget& budget) {
  auto a = bind("replace", args, {"old", "new", "count"}, 2);
  if (!a) return a.error();
  auto s = to_str(v, budget);
  auto old = to_str((*a)[0], budget);
  auto with = to_str((*a)[1], budget);
  if (!s) return s.error();
  if (!old) return old.error();
  if (!with) return with.error();
  int64_t count = is_integer((*a)[2]) ? int_of((*a)[2]) : -1;
  return replace(*s, *old, *with, count, budget);
}

caf::expected<template_value> f_capitalize(const template_value& v, const template_args& args,
                                           template_budget& budget) {
  auto a = bind("capitalize", args, {});
  if (!a) return a.error();
  auto s = to_str(v, budget);
  if (!s) return s.error();
  return template_value(map_code_points(*s, [](uint32_t cp, bool first, uint32_t) {
    auto c = static_cast<UChar32>(cp);
    return static_cast<uint32_t>(first ? u_totitle(c) : u_tolower(c));
  }));
}

caf::expected<template_value> f_title(const template_value& v, const template_args& args,
                                      template_budget& budget) {
  auto a = bind("title", args, {});
  if (!a) return a.error();
  auto s = to_str(v, budget);
  if (!s) return s.error();
  // jinja2 starts a word after whitespace or one of - ( { [ <.
  return template_value(map_code_points(*s, [](uint32_t cp, bool first, uint32_t prev) {
    bool starts = first || is_python_space(prev) || prev == '-' || prev == '(' || prev == '{' ||
                  prev == '[' || prev == '<';
    auto c = static_cast<UChar32>(cp);
    return static_cast<uint32_t>(starts ? u_toupper(c) : u_tolower(c));
  }));
}

caf::expected<template_value> f_safe(const template_value& v, const template_args& args,
                                     template_budget& budget) {
  // jinja2's Markup(value): the value as a string (autoescaping is off, so nothing else).
  auto a = bind("safe", args, {});
  if (!a) return a.error();
  return f_string(v, {}, budget);
}

caf::expected<template_value> f_abs(const template_value& v, const template_args& args,
                                    template_budget&) {
  auto a = bind("abs", args, {});
  if (!a) return a.error();
  if (v.type() == kind::floating) return std::fabs(v.as_float());
  if (is_integer(v)) {
    int64_t i = int_of(v);
    if (i == std::numeric_limits<int64_t>::min()) return refuse("abs: integer overflow");
    return i < 0 ? -i : i;
  }
  return refuse(std::string("abs: bad operand type '") + type_name(v) + "'");
}

caf::expected<template_value> f_reverse(const template_value& v, const template_args& args,
                                        template_budget& budget) {
  auto a = bind("reverse", args, {});
  if (!a) return a.error();
  if (is_str(v)) return get_slice(v, {}, {}, -1, budget);
  auto items = iterate(v, budget);
  if (!items) return items;
  template_list out(items->as_list().rbegin(), items->as_list().rend());
  return template_value(std::move(out));
}

/// selectattr (`keep` true) and rejectattr.
template <bool Keep>
caf::expected<template_value> f_select_attr(const template_value& v, const template_args& args,
                                            template_budget& budget) {
  const char* name = Keep ? "selectattr" : "rejectattr";
  if (args.positional.empty() || !is_str(args.positional[0]) || !args.named.empty())
    return refuse(std::string(name) + "() needs an attribute name, then a test and its arguments");
  if (!truthy(v)) return template_value(template_list{});  // jinja2 skips a falsy value
  auto items = iterate(v, budget);
  if (!items) return items;
  template_args test_args;
  test_args.positional.assign(args.positional.begin() + std::min<size_t>(2, args.positional.size()),
                              args.positional.end());
  std::string test;
  if (args.positional.size() > 1) {
    if (!is_str(args.positional[1]) || !has_test(args.positional[1].as_string()))
      return refuse(std::string(name) + "(): no such test");
    test = args.positional[1].as_string();
  }
  template_list out;
  for (auto& item : items->as_list()) {
    auto value = attribute_path(item, args.positional[0].as_string());
    bool pass = truthy(value);
    if (!test.empty()) {
      auto r = apply_test(test, value, test_args);
      if (!r) return r.error();
      pass = *r;
    }
    if (pass == Keep) out.push_back(item);
  }
  return template_value(std::move(out));
}

caf::expected<template_value> f_map(const template_value& v, const template_args& args,
                                    template_budget& budget) {
  if (!truthy(v)) return template_value(template_list{});  // jinja2 skips a falsy value
  auto items = iterate(v, budget);
  if (!items) return items;
  template_list out;
  out.reserve(items->as_list().size());
  const template_value* attribute = nullptr;
  const template_value* fallback = nullptr;
  for (auto& [key, value] : args.named) {
    if (key == "attribute")
      attribute = &value;
    else if (key == "default")
      fallback = &value;
  }
  if (attribute) {
    if (!is_str(*attribute)) return refuse("map(): attribute must be a string");
    for (auto& item : items->as_list()) {
      auto value = attribute_path(item, attribute->as_string());
      out.push_back(value.is_undefined() && fallback ? *fallback : value);
    }
    return template_value(std::move(out));
  }
  if (args.positional.empty() || !is_str(args.positional[0]) ||
      !has_filter(args.positional[0].as_string()))
    return refuse("map() needs attribute= or the name of a filter");
  template_args rest;
  rest.positional.assign(args.positional.begin() + 1, args.positional.end());
  rest.named = args.named;
  for (auto& item : items->as_list()) {
    auto value = apply_filter(args.positional[0].as_string(), item, rest, budget);
    if (!value) return value;
    out.push_back(std::move(*value));
  }
  return template_value(std::move(out));
}

struct filter_entry {
  std::string_view name;
  filter_fn fn;
};

constexpr filter_entry filters[] = {
    {"trim", f_trim},
    {"tojson", f_tojson},
    {"length", f_length},
    {"count", f_length},
    {"lower", f_case<lower>},
    {"upper", f_case<upper>},
    {"string", f_string},
    {"int", f_int},
    {"float", f_float},
    {"list", f_list},
    {"first", f_end<true>},
    {"last", f_end<false>},
    {"join", f_join},
    {"default", f_default},
    {"d", f_default},
    {"items", f_items},
    {"replace", f_replace},
    {"capitalize", f_capitalize},
    {"title", f_title},
    {"safe", f_safe},
    {"abs", f_abs},
    {"reverse", f_reverse},
    {"selectattr", f_select_attr<true>},
    {"rejectattr", f_select_attr<false>},
    {"map", f_map},
};

// ---- tests -------------------------------------------------------------------------------------

using test_fn = bool (*)(const template_value&, const template_value& arg);

struct test_entry {
  std::string_view name;
  test_fn fn;
  bool takes_argument = false;
  bool needs_number = false;  // odd, even
};

/// Python's `v % 2` for a number.
double mod2(const template_value& v) {
  if (is_integer(v)) return static_cast<double>((int_of(v) % 2 + 2) % 2);
  double r = std::fmod(v.as_float(), 2.0);
  return r < 0 ? r + 2 : r;
}

bool is_iterable(const template_value& v) {  // undefined iterates as empty, as in jinja2
  return v.is_undefined() || is_str(v) || is_seq(v) || v.type() == kind::dict;
}

constexpr test_entry tests[] = {
    {"defined", [](auto& v, auto&) { return !v.is_undefined(); }},
    {"undefined", [](auto& v, auto&) { return v.is_undefined(); }},
    {"none", [](auto& v, auto&) { return v.is_none(); }},
    {"string", [](auto& v, auto&) { return is_str(v); }},
    {"number", [](auto& v, auto&) { return is_number(v); }},
    {"integer", [](auto& v, auto&) { return v.type() == kind::integer; }},
    {"float", [](auto& v, auto&) { return v.type() == kind::floating; }},
    {"boolean", [](auto& v, auto&) { return v.type() == kind::boolean; }},
    {"true", [](auto& v, auto&) { return v.type() == kind::boolean && v.as_bool(); }},
    {"false", [](auto& v, auto&) { return v.type() == kind::boolean && !v.as_bool(); }},
    {"mapping", [](auto& v, auto&) { return v.type() == kind::dict; }},
    {"iterable", [](auto& v, auto&) { return is_iterable(v); }},
    {"sequence", [](auto& v, auto&) { return is_iterable(v); }},
    {"callable",
     [](auto& v, auto&) { return v.type() == kind::function || v.type() == kind::macro; }},
    {"odd", [](auto& v, auto&) { return mod2(v) == 1; }, false, true},
    {"even", [](auto& v, auto&) { return mod2(v) == 0; }, false, true},
    {"eq", [](auto& v, auto& a) { return equals(v, a); }, true},
    {"equalto", [](auto& v, auto& a) { return equals(v, a); }, true},
    {"==", [](auto& v, auto& a) { return equals(v, a); }, true},
    {"ne", [](auto& v, auto& a) { return !equals(v, a); }, true},
    {"!=", [](auto& v, auto& a) { return !equals(v, a); }, true},
};

// ---- globals -----------------------------------------------------------------------------------

caf::expected<template_value> g_namespace(const template_args& args, template_budget&) {
  template_dict attributes;
  if (args.positional.size() > 1 ||
      (args.positional.size() == 1 && args.positional[0].type() != kind::dict))
    return refuse("namespace() takes keyword arguments, or one dict");
  if (!args.positional.empty())
    for (auto& [key, value] : args.positional[0].as_dict()) attributes.set(key, value);
  for (auto& [key, value] : args.named) attributes.set(key, value);
  for (auto& [key, value] : attributes)
    if (holds_namespace(value))
      return refuse("namespace attribute '" + key + "' cannot hold a namespace");
  return access::make_namespace(std::move(attributes));
}

caf::expected<template_value> g_range(const template_args& args, template_budget& budget) {
  if (!args.named.empty() || args.positional.empty() || args.positional.size() > 3)
    return refuse("range() takes 1 to 3 integers");
  for (auto& a : args.positional)
    if (!is_integer(a)) return refuse(std::string("range() needs integers, got ") + type_name(a));
  int64_t start = 0, stop = 0, step = 1;
  if (args.positional.size() == 1) {
    stop = int_of(args.positional[0]);
  } else {
    start = int_of(args.positional[0]);
    stop = int_of(args.positional[1]);
    if (args.positional.size() == 3) step = int_of(args.positional[2]);
  }
  if (step == 0) return refuse("range() step must not be zero");
  double span =
      (static_cast<double>(stop) - static_cast<double>(start)) / static_cast<double>(step);
  size_t count = span <= 0 ? 0 : static_cast<size_t>(std::min(std::ceil(span), 1e18));
  if (auto e = budget.check_list(count)) return e;
  template_list out;
  out.reserve(count);
  for (size_t i = 0; i < count; ++i) {
    out.emplace_back(start);
    if (i + 1 < count) start += step;  // stays within [start, stop): no overflow
  }
  return template_value(std::move(out));
}

caf::expected<template_value> g_raise_exception(const template_args& args,
                                                template_budget& budget) {
  std::string message;
  if (!args.positional.empty()) {
    auto s = to_str(args.positional[0], budget);
    if (!s) return s.error();
    message = std::move(*s);
  }
  return refuse("raise_exception: " + message);
}

}  // namespace

bool has_method(const template_value& obj, std::string_view name) {
  if (is_str(obj)) return is_string_method(name);
  if (obj.type() == kind::dict) return is_dict_method(name);
  return false;
}

caf::expected<template_value> call_method(const template_value& obj, std::string_view name,
                                          const template_args& args, template_budget& budget) {
  if (is_str(obj)) return string_method(obj.as_string(), name, args, budget);
  return dict_method(obj.as_dict(), name, args, budget);
}

bool has_filter(std::string_view name) {
  for (auto& f : filters)
    if (f.name == name) return true;
  return false;
}

caf::expected<template_value> apply_filter(std::string_view name, const template_value& v,
                                           const template_args& args, template_budget& budget) {
  for (auto& f : filters)
    if (f.name == name) return f.fn(v, args, budget);
  return refuse("no filter named '" + std::string(name) + "'");
}

bool has_test(std::string_view name) {
  for (auto& t : tests)
    if (t.name == name) return true;
  return false;
}

caf::expected<bool> apply_test(std::string_view name, const template_value& v,
                               const template_args& args) {
  for (auto& t : tests) {
    if (t.name != name) continue;
    size_t wanted = t.takes_argument ? 1 : 0;
    if (args.positional.size() != wanted || !args.named.empty())
      return refuse("test '" + std::string(name) + "' takes " + std::to_string(wanted) +
                    " argument" + (wanted == 1 ? "" : "s"));
    if (t.needs_number && !is_number(v))
      return refuse("test '" + std::string(name) + "' needs a number, got " + type_name(v));
    return t.fn(v, wanted ? args.positional[0] : template_value());
  }
  return refuse("no test named '" + std::string(name) + "'");
}

template_value global(std::string_view name) {
  static const template_value namespace_fn = access::make_builtin("namespace", g_namespace, {});
  static const template_value range_fn = access::make_builtin("range", g_range, {});
  static const template_value raise_fn =
      access::make_builtin("raise_exception", g_raise_exception, {});
  if (name == "namespace") return namespace_fn;
  if (name == "range") return range_fn;
  if (name == "raise_exception") return raise_fn;
  return {};
}

}  // namespace keel::detail
