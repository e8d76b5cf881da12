// Python semantics of chat template values: truth, equality, ordering, str() and repr(),
// json.dumps as transformers' tojson calls it, iteration, attributes, indexing and slicing by code
// point, and the operators.

#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>

#include "base/error.hpp"
#include "kernels/detail/chat_template_internal.hpp"
#include "kernels/unicode.hpp"

namespace keel::detail {

using kind = template_value::kind;
using access = template_value_access;

caf::error refuse(std::string what) {
  return make_error(errc::bad_request, std::move(what));
}

caf::error too_long(const template_budget& budget) {
  return refuse("a string exceeds the limit of " + std::to_string(budget.limits.max_output) +
                " bytes");
}

namespace {

// ---- str() and repr()
// ----------------------------------------------------------------------------

bool append_repr(std::string& out, const template_value& v, size_t cap);

bool append_items(std::string& out, const template_list& items, size_t cap) {
  for (size_t i = 0; i < items.size(); ++i) {
    if (i > 0) out += ", ";
    if (!append_repr(out, items[i], cap)) return false;
  }
  return out.size() <= cap;
}

bool append_entries(std::string& out, const template_dict& d, size_t cap) {
  out += '{';
  bool first = true;
  for (auto& [key, value] : d) {
    if (!first) out += ", ";
    first = false;
    out += repr_string(key);
    out += ": ";
    if (!append_repr(out, value, cap)) return false;
  }
  out += '}';
  return out.size() <= cap;
}

bool append_repr(std::string& out, const template_value& v, size_t cap) {
  switch (v.type()) {
    case kind::undefined:
      out += "Undefined";
      break;
    case kind::string:
      out += repr_string(v.as_string());
      break;
    case kind::list:
      out += '[';
      if (!append_items(out, v.as_list(), cap)) return false;
      out += ']';
      break;
    case kind::tuple:
      out += '(';
      if (!append_items(out, v.as_list(), cap)) return false;
      out += v.as_list().size() == 1 ? ",)" : ")";
      break;
    case kind::dict:
      return append_entries(out, v.as_dict(), cap);
    case kind::namespace_object:
      out += "<Namespace ";
      if (!append_entries(out, access::namespace_box(v)->attributes, cap)) return false;
      out += '>';
      break;
    case kind::function:
      out += "<function " + access::function_box(v)->name + ">";
      break;
    case kind::macro:
      out += "<Macro '" + access::macro_box(v)->node->text + "'>";
      break;
    default:
      return append_str(out, v, cap);
  }
  return out.size() <= cap;
}

// ---- json.dumps, as transformers' tojson calls it ---------------------------------------------

void append_hex4(std::string& out, uint32_t u) {
  static constexpr char digits[] = "0123456789abcdef";
  out += "\\u";
  for (int shift = 12; shift >= 0; shift -= 4) out += digits[(u >> shift) & 0xF];
}

void append_json_string(std::string& out, std::string_view s, bool ensure_ascii) {
  out += '"';
  for (size_t i = 0; i < s.size();) {
    auto c = decode_utf8(s, i);
    i += static_cast<size_t>(c.len);
    uint32_t cp = c.cp;
    switch (cp) {
      case '"':
        out += "\\\"";
        continue;
      case '\\':
        out += "\\\\";
        continue;
      case '\n':
        out += "\\n";
        continue;
      case '\r':
        out += "\\r";
        continue;
      case '\t':
        out += "\\t";
        continue;
      case '\b':
        out += "\\b";
        continue;
      case '\f':
        out += "\\f";
        continue;
      default:
        break;
    }
    if (cp < 0x20 || (ensure_ascii && cp >= 0x7F)) {
      if (cp >= 0x10000) {
        cp -= 0x10000;
        append_hex4(out, 0xD800 + (cp >> 10));
        append_hex4(out, 0xDC00 + (cp & 0x3FF));
      } else {
        append_hex4(out, cp);
      }
    } else if (c.valid) {
      append_utf8(out, cp);
    } else {
      out += static_cast<char>(cp);  // a stray byte stays as it is
    }
  }
  out += '"';
}

}  // namespace

caf::error append_json(std::string& out, const template_value& v, const json_style& style,
                       int level, size_t cap) {
  auto open = [&](char bracket) {
    out += bracket;
    if (style.indented) {
      out += '\n';
      for (int i = 0; i <= level; ++i) out += style.indent;
    }
  };
  auto separate = [&] {
    out += style.item_separator;
    if (style.indented) {
      out += '\n';
      for (int i = 0; i <= level; ++i) out += style.indent;
    }
  };
  auto close = [&](char bracket) {
    if (style.indented) {
      out += '\n';
      for (int i = 0; i < level; ++i) out += style.indent;
    }
    out += bracket;
  };
  switch (v.type()) {
    case kind::none:
      out += "null";
      break;
    case kind::boolean:
      out += v.as_bool() ? "true" : "false";
      break;
    case kind::integer:
      out += std::to_string(v.as_int());
      break;
    case kind::floating: {
      double d = v.as_float();
      out += std::isnan(d)   ? "NaN"
             : std::isinf(d) ? (d > 0 ? "Infinity" : "-Infinity")
                             : repr_float(d);
      break;
    }
    case kind::string:
      append_json_string(out, v.as_string(), style.ensure_ascii);
      break;
    case kind::list:
    case kind::tuple: {
      auto& items = v.as_list();
      if (items.empty()) {
        out += "[]";
        break;
      }
      open('[');
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) separate();
        if (auto e = append_json(out, items[i], style, level + 1, cap)) return e;
      }
      close(']');
      break;
    }
    case kind::dict: {
      auto& d = v.as_dict();
      if (d.empty()) {
        out += "{}";
        break;
      }
      std::vector<const template_dict::entry*> entries;
      for (auto& e : d) entries.push_back(&e);
      if (style.sort_keys)
        std::stable_sort(entries.begin(), entries.end(),
                         [](auto* a, auto* b) { return a->first < b->first; });
      open('{');
      for (size_t i = 0; i < entries.size(); ++i) {
        if (i > 0) separate();
        append_json_string(out, entries[i]->first, style.ensure_ascii);
        out += style.key_separator;
        if (auto e = append_json(out, entries[i]->second, style, level + 1, cap)) return e;
      }
      close('}');
      break;
    }
    default:
      return refuse(std::string("tojson: Object of type ") + type_name(v) +
                    " is not JSON serializable");
  }
  if (out.size() > cap)
    return refuse("tojson: the result exceeds the limit of " + std::to_string(cap) + " bytes");
  return {};
}

bool is_python_space(uint32_t cp) {
  if (cp < 0x80) return (cp >= 0x09 && cp <= 0x0D) || (cp >= 0x1C && cp <= 0x20);
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

size_t rstrip_space(std::string_view s) {
  return rstrip_if(s, is_python_space);
}

size_t lstrip_space(std::string_view s) {
  return lstrip_if(s, is_python_space);
}

const char* type_name(const template_value& v) {
  switch (v.type()) {
    case kind::undefined:
      return "Undefined";
    case kind::none:
      return "NoneType";
    case kind::boolean:
      return "bool";
    case kind::integer:
      return "int";
    case kind::floating:
      return "float";
    case kind::string:
      return "str";
    case kind::list:
      return "list";
    case kind::tuple:
      return "tuple";
    case kind::dict:
      return "dict";
    case kind::namespace_object:
      return "Namespace";
    case kind::function:
      return "function";
    case kind::macro:
      return "Macro";
  }
  return "object";
}

bool truthy(const template_value& v) {
  switch (v.type()) {
    case kind::undefined:
    case kind::none:
      return false;
    case kind::boolean:
      return v.as_bool();
    case kind::integer:
      return v.as_int() != 0;
    case kind::floating:
      return v.as_float() != 0;
    case kind::string:
      return !v.as_string().empty();
    case kind::list:
    case kind::tuple:
      return !v.as_list().empty();
    case kind::dict:
      return !v.as_dict().empty();
    default:
      return true;
  }
}

bool equals(const template_value& a, const template_value& b) {
  if (is_number(a) && is_number(b)) {
    if (a.type() == kind::floating || b.type() == kind::floating) return float_of(a) == float_of(b);
    return int_of(a) == int_of(b);
  }
  if (a.type() != b.type()) return false;
  switch (a.type()) {
    case kind::undefined:
    case kind::none:
      return true;
    case kind::string:
      return a.as_string() == b.as_string();
    case kind::list:
    case kind::tuple: {
      auto &x = a.as_list(), &y = b.as_list();
      if (x.size() != y.size()) return false;
      for (size_t i = 0; i < x.size(); ++i)
        if (!equals(x[i], y[i])) return false;
      return true;
    }
    case kind::dict: {
      auto &x = a.as_dict(), &y = b.as_dict();
      if (x.size() != y.size()) return false;
      for (auto& [key, value] : x) {
        auto* other = y.find(key);
        if (!other || !equals(value, *other)) return false;
      }
      return true;
    }
    default:  // namespaces, functions, macros: the same object
      return access::data(a) == access::data(b);
  }
}

caf::expected<int> order(const template_value& a, const template_value& b) {
  if (is_number(a) && is_number(b)) {
    if (a.type() == kind::floating || b.type() == kind::floating) {
      double x = float_of(a), y = float_of(b);
      return x < y ? -1 : x > y ? 1 : 0;
    }
    int64_t x = int_of(a), y = int_of(b);
    return x < y ? -1 : x > y ? 1 : 0;
  }
  if (is_str(a) && is_str(b)) {  // UTF-8 byte order is code point order
    int c = a.as_string().compare(b.as_string());
    return c < 0 ? -1 : c > 0 ? 1 : 0;
  }
  if (is_seq(a) && a.type() == b.type()) {
    auto &x = a.as_list(), &y = b.as_list();
    for (size_t i = 0; i < x.size() && i < y.size(); ++i) {
      if (equals(x[i], y[i])) continue;
      return order(x[i], y[i]);
    }
    return x.size() < y.size() ? -1 : x.size() > y.size() ? 1 : 0;
  }
  return refuse(std::string("cannot order '") + type_name(a) + "' and '" + type_name(b) + "'");
}

bool append_str(std::string& out, const template_value& v, size_t cap) {
  switch (v.type()) {
    case kind::undefined:
      return true;
    case kind::none:
      out += "None";
      break;
    case kind::boolean:
      out += v.as_bool() ? "True" : "False";
      break;
    case kind::integer:
      out += std::to_string(v.as_int());
      break;
    case kind::floating:
      out += repr_float(v.as_float());
      break;
    case kind::string: {
      auto& s = v.as_string();
      if (out.size() + s.size() > cap) return false;
      out += s;
      break;
    }
    default:
      return append_repr(out, v, cap);
  }
  return out.size() <= cap;
}

caf::expected<std::string> to_str(const template_value& v, const template_budget& budget) {
  if (is_str(v)) return v.as_string();
  std::string out;
  if (!append_str(out, v, budget.limits.max_output)) return too_long(budget);
  return out;
}

std::string repr_string(std::string_view s) {
  char quote =
      s.find('\'') != std::string_view::npos && s.find('"') == std::string_view::npos ? '"' : '\'';
  std::string out(1, quote);
  for (char ch : s) {
    auto c = static_cast<unsigned char>(ch);
    if (c == '\\' || c == static_cast<unsigned char>(quote)) {
      out += '\\';
      out += ch;
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (c < 0x20 || c == 0x7F) {
      static constexpr char digits[] = "0123456789abcdef";
      out += "\\x";
      out += digits[c >> 4];
      out += digits[c & 0xF];
    } else {
      out += ch;
    }
  }
  out += quote;
  return out;
}

std::string repr_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string_view sci(buf, static_cast<size_t>(r.ptr - buf));  // "-1.2345e+17": shortest digits
  std::string out;
  if (sci[0] == '-') {
    out += '-';
    sci.remove_prefix(1);
  }
  size_t e = sci.find('e');
  std::string digits;
  for (char c : sci.substr(0, e))
    if (c != '.') digits += c;
  int exponent = 0;
  auto exp_text = sci.substr(e + (sci[e + 1] == '+' ? 2 : 1));
  std::from_chars(exp_text.data(), exp_text.data() + exp_text.size(), exponent);
  // Python's repr: positional from 1e-4 up to 1e16, scientific outside.
  if (exponent >= 0 && exponent < 16) {
    auto point = static_cast<size_t>(exponent) + 1;
    if (digits.size() < point) digits.resize(point, '0');
    out.append(digits, 0, point);
    out += '.';
    out += digits.size() > point ? digits.substr(point) : "0";
  } else if (exponent < 0 && exponent >= -4) {
    out += "0.";
    out.append(static_cast<size_t>(-exponent - 1), '0');
    out += digits;
  } else {
    out += digits[0];
    if (digits.size() > 1) {
      out += '.';
      out.append(digits, 1);
    }
    out += exponent < 0 ? "e-" : "e+";
    if (std::abs(exponent) < 10) out += '0';
    out += std::to_string(std::abs(exponent));
  }
  return out;
}

caf::expected<template_value> iterate(const template_value& v, template_budget& budget) {
  switch (v.type()) {
    case kind::list:
    case kind::tuple:
      return v;
    case kind::undefined:
      return template_value(template_list{});
    case kind::dict: {
      if (auto e = budget.check_list(v.as_dict().size())) return e;
      template_list keys;
      keys.reserve(v.as_dict().size());
      for (auto& [key, value] : v.as_dict()) keys.emplace_back(key);
      return template_value(std::move(keys));
    }
    case kind::string: {
      char_index chars(v.as_string());
      if (auto e = budget.check_list(chars.size())) return e;
      template_list out;
      out.reserve(chars.size());
      for (size_t i = 0; i < chars.size(); ++i) out.emplace_back(chars[i]);
      return template_value(std::move(out));
    }
    default:
      return refuse(std::string("'") + type_name(v) + "' object is not iterable");
  }
}

template_value get_attribute(const template_value& obj, const std::string& name) {
  if (has_method(obj, name))
    return access::make_builtin(
        name,
        [obj, name](const template_args& args, template_budget& budget) {
          return call_method(obj, name, args, budget);
        },
        obj);
  if (obj.type() == kind::dict)
    if (auto* v = obj.as_dict().find(name)) return *v;
  if (auto* ns = access::namespace_box(obj))
    if (auto* v = ns->attributes.find(name)) return *v;
  return {};
}

template_value get_item(const template_value& obj, const template_value& key) {
  if (is_integer(key) && (is_seq(obj) || is_str(obj))) {
    int64_t i = int_of(key);
    if (is_seq(obj)) {
      auto& items = obj.as_list();
      int64_t n = static_cast<int64_t>(items.size());
      if (i < 0) i += n;
      return i >= 0 && i < n ? items[static_cast<size_t>(i)] : template_value();
    }
    char_index chars(obj.as_string());
    int64_t n = static_cast<int64_t>(chars.size());
    if (i < 0) i += n;
    if (i < 0 || i >= n) return {};
    return template_value(chars[static_cast<size_t>(i)]);
  }
  if (!is_str(key)) return {};
  if (obj.type() == kind::dict)
    if (auto* v = obj.as_dict().find(key.as_string())) return *v;
  return get_attribute(obj, key.as_string());  // jinja2 falls back to the attribute
}

caf::expected<template_value> get_slice(const template_value& obj, const template_value& start,
                                        const template_value& stop, const template_value& step,
                                        template_budget& budget) {
  for (auto* bound : {&start, &stop, &step})
    if (!absent(*bound) && !is_integer(*bound))
      return refuse(std::string("slice indices must be integers or None, not ") +
                    type_name(*bound));
  int64_t by = absent(step) ? 1 : int_of(step);
  if (by == 0) return refuse("slice step cannot be zero");
  if (!is_seq(obj) && !is_str(obj)) return template_value();
  std::optional<char_index> chars;
  if (is_str(obj)) chars.emplace(obj.as_string());
  int64_t n = static_cast<int64_t>(chars ? chars->size() : obj.as_list().size());
  // Python's slice.indices(n).
  auto clamp = [&](const template_value& bound, int64_t fallback) {
    if (absent(bound)) return fallback;
    int64_t i = int_of(bound);
    if (i < 0) i = std::max<int64_t>(i + n, by < 0 ? -1 : 0);
    return std::min<int64_t>(i, by < 0 ? n - 1 : n);
  };
  int64_t from = clamp(start, by < 0 ? n - 1 : 0);
  int64_t to = clamp(stop, by < 0 ? -1 : n);
  by = std::clamp<int64_t>(by, -(n + 1), n + 1);  // a longer step picks the same one item
  int64_t count = by > 0 ? (to > from ? (to - from + by - 1) / by : 0)
                         : (from > to ? (from - to - by - 1) / -by : 0);
  auto pick = [&](int64_t k) { return static_cast<size_t>(from + k * by); };
  if (chars) {
    std::string out;
    for (int64_t k = 0; k < count; ++k) out += (*chars)[pick(k)];
    return template_value(std::move(out));
  }
  if (auto e = budget.check_list(static_cast<size_t>(count))) return e;
  template_list out;
  out.reserve(static_cast<size_t>(count));
  for (int64_t k = 0; k < count; ++k) out.push_back(obj.as_list()[pick(k)]);
  return obj.type() == kind::tuple ? template_value::tuple(std::move(out))
                                   : template_value(std::move(out));
}

caf::expected<template_value> negate(const template_value& v) {
  if (v.type() == kind::floating) return -v.as_float();
  if (is_integer(v)) {
    int64_t i = int_of(v);
    if (i == std::numeric_limits<int64_t>::min()) return refuse("integer overflow in -");
    return -i;
  }
  return refuse(std::string("bad operand type for unary -: '") + type_name(v) + "'");
}

namespace {

caf::error operand_error(const char* op, const template_value& a, const template_value& b) {
  return refuse(std::string("unsupported operand types for ") + op + ": '" + type_name(a) +
                "' and '" + type_name(b) + "'");
}

caf::expected<template_value> integer_op(expr_op op, int64_t x, int64_t y) {
  int64_t r = 0;
  switch (op) {
    case expr_op::add:
      if (__builtin_add_overflow(x, y, &r)) return refuse("integer overflow in +");
      return r;
    case expr_op::sub:
      if (__builtin_sub_overflow(x, y, &r)) return refuse("integer overflow in -");
      return r;
    case expr_op::mul:
      if (__builtin_mul_overflow(x, y, &r)) return refuse("integer overflow in *");
      return r;
    case expr_op::floordiv:
    case expr_op::mod: {
      if (y == 0) return refuse("integer division or modulo by zero");
      if (x == std::numeric_limits<int64_t>::min() && y == -1) {
        if (op == expr_op::mod) return int64_t{0};
        return refuse("integer overflow in //");
      }
      int64_t q = x / y, m = x % y;
      if (m != 0 && ((m < 0) != (y < 0))) --q, m += y;  // Python rounds toward -inf
      return op == expr_op::mod ? m : q;
    }
    case expr_op::pow: {
      if (y < 0) return std::pow(static_cast<double>(x), static_cast<double>(y));
      int64_t result = 1, base = x;
      while (y > 0) {
        if ((y & 1) && __builtin_mul_overflow(result, base, &result))
          return refuse("integer overflow in **");
        y >>= 1;
        if (y > 0 && __builtin_mul_overflow(base, base, &base))
          return refuse("integer overflow in **");
      }
      return result;
    }
    default:
      return static_cast<double>(x) / static_cast<double>(y);  // div, checked by the caller
  }
}

caf::expected<template_value> float_op(expr_op op, double x, double y) {
  switch (op) {
    case expr_op::add:
      return x + y;
    case expr_op::sub:
      return x - y;
    case expr_op::mul:
      return x * y;
    case expr_op::div:
      return x / y;
    case expr_op::floordiv:
    case expr_op::mod: {
      // CPython's float_divmod: the remainder takes the divisor's sign, the quotient is floored.
      double m = std::fmod(x, y);
      double q = (x - m) / y;
      if (m != 0) {
        if ((y < 0) != (m < 0)) m += y, q -= 1;
      } else {
        m = std::copysign(0.0, y);
      }
      if (q != 0) {
        double f = std::floor(q);
        q = q - f > 0.5 ? f + 1 : f;
      } else {
        q = std::copysign(0.0, x / y);
      }
      return op == expr_op::mod ? m : q;
    }
    default:
      if (x == 0 && y < 0) return refuse("0.0 cannot be raised to a negative power");
      return std::pow(x, y);
  }
}

caf::expected<template_value> repeat(const template_value& seq, int64_t times,
                                     template_budget& budget) {
  size_t n = times > 0 ? static_cast<size_t>(times) : 0;
  if (is_str(seq)) {
    auto& s = seq.as_string();
    if (!s.empty() && n > budget.limits.max_output / s.size()) return too_long(budget);
    std::string out;
    out.reserve(s.size() * n);
    for (size_t i = 0; i < n; ++i) out += s;
    return template_value(std::move(out));
  }
  auto& items = seq.as_list();
  if (!items.empty() && n > std::numeric_limits<size_t>::max() / items.size())
    return budget.check_list(std::numeric_limits<size_t>::max());
  if (auto e = budget.check_list(items.size() * n)) return e;
  template_list out;
  out.reserve(items.size() * n);
  for (size_t i = 0; i < n; ++i) out.insert(out.end(), items.begin(), items.end());
  return seq.type() == kind::tuple ? template_value::tuple(std::move(out))
                                   : template_value(std::move(out));
}

}  // namespace

caf::expected<template_value> arithmetic(expr_op op, const template_value& a,
                                         const template_value& b, template_budget& budget) {
  static constexpr const char* symbols[] = {"+", "-", "*", "/", "//", "%", "**"};
  const char* symbol =
      op == expr_op::concat ? "~" : symbols[static_cast<int>(op) - static_cast<int>(expr_op::add)];
  if (op == expr_op::concat) {
    std::string out;
    size_t cap = budget.limits.max_output;
    if (!append_str(out, a, cap) || !append_str(out, b, cap)) return too_long(budget);
    return template_value(std::move(out));
  }
  if (is_number(a) && is_number(b)) {
    if ((op == expr_op::div || op == expr_op::floordiv || op == expr_op::mod) && float_of(b) == 0)
      return refuse(op == expr_op::div ? "division by zero" : "integer division or modulo by zero");
    if (a.type() == kind::floating || b.type() == kind::floating || op == expr_op::div)
      return float_op(op, float_of(a), float_of(b));
    return integer_op(op, int_of(a), int_of(b));
  }
  if (op == expr_op::add && is_str(a) && is_str(b)) {
    if (auto e = budget.check_string(a.as_string().size() + b.as_string().size())) return e;
    return template_value(a.as_string() + b.as_string());
  }
  if (op == expr_op::add && is_seq(a) && a.type() == b.type()) {
    auto &x = a.as_list(), &y = b.as_list();
    if (auto e = budget.check_list(x.size() + y.size())) return e;
    template_list out(x);
    out.insert(out.end(), y.begin(), y.end());
    return a.type() == kind::tuple ? template_value::tuple(std::move(out))
                                   : template_value(std::move(out));
  }
  if (op == expr_op::mul) {
    if ((is_str(a) || is_seq(a)) && is_integer(b)) return repeat(a, int_of(b), budget);
    if (is_integer(a) && (is_str(b) || is_seq(b))) return repeat(b, int_of(a), budget);
  }
  if (op == expr_op::mod && is_str(a)) return refuse("string formatting with % is not supported");
  return operand_error(symbol, a, b);
}

caf::expected<bool> contains(const template_value& container, const template_value& item) {
  switch (container.type()) {
    case kind::undefined:
      return false;
    case kind::string:
      if (!is_str(item))
        return refuse(std::string("'in <string>' requires a string as left operand, not ") +
                      type_name(item));
      return container.as_string().find(item.as_string()) != std::string::npos;
    case kind::list:
    case kind::tuple:
      for (auto& x : container.as_list())
        if (equals(x, item)) return true;
      return false;
    case kind::dict:
      return is_str(item) && container.as_dict().find(item.as_string()) != nullptr;
    default:
      return refuse(std::string("argument of type '") + type_name(container) + "' is not iterable");
  }
}

}  // namespace keel::detail
