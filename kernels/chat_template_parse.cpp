// The chat template lexer and recursive-descent parser. The grammar and precedence follow
// jinja2's parser; whitespace control follows its lexer with trim_blocks and lstrip_blocks on.

#include <algorithm>
#include <charconv>
#include <cstring>
#include <span>

#include "base/error.hpp"
#include "kernels/detail/chat_template_internal.hpp"
#include "kernels/unicode.hpp"

namespace keel::detail {
namespace {

/// How deeply statements and expressions may nest, and how tall an expression's tree may be: a
/// template of a million `(` or `1 + 1 + ...` is refused instead of exhausting the stack (of the
/// parser, or of the evaluator and the destructors later).
constexpr uint32_t max_parse_depth = 200;

enum class tok : uint8_t {
  text,
  var_begin,
  var_end,
  block_begin,
  block_end,
  name,
  string,
  integer,
  floating,
  op,
  eof
};

struct token {
  token(tok k, uint32_t p, std::string t = {}) : kind(k), pos(p), text(std::move(t)) {}
  tok kind;
  uint32_t pos;
  std::string text;  // data, name, string value, operator, number as written
  int64_t integer = 0;
  double floating = 0;
};

struct failure {
  uint32_t pos = 0;
  std::string what;
};

std::string describe(const token& t) {
  switch (t.kind) {
    case tok::eof:
      return "end of template";
    case tok::text:
      return "template text";
    case tok::var_begin:
      return "'{{'";
    case tok::var_end:
      return "'}}'";
    case tok::block_begin:
      return "'{%'";
    case tok::block_end:
      return "'%}'";
    case tok::string:
      return "string " + repr_string(t.text.size() > 40 ? t.text.substr(0, 40) + "..." : t.text);
    default:
      return "'" + t.text + "'";
  }
}

bool is_name_start(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}
bool is_digit(char c) {
  return c >= '0' && c <= '9';
}
bool is_name_char(char c) {
  return is_name_start(c) || is_digit(c);
}
int hex_value(char c) {
  if (is_digit(c)) return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

// ---- lexer -----------------------------------------------------------------------------------

/// Splits the source into text and tags, applying whitespace control as jinja2 does with
/// trim_blocks and lstrip_blocks, and the inside of tags into tokens.
class lexer {
 public:
  explicit lexer(const std::string& src) : src_(src) {}

  bool run() {
    size_t p = 0;
    bool line_starting = true;  // the text begins a line (template start, or after a newline)
    while (p < src_.size()) {
      size_t start = find_tag(p);
      if (start == std::string::npos) {
        push_text(p, std::string_view(src_).substr(p));
        break;
      }
      char kind = src_[start + 1];
      char sign = start + 2 < src_.size() && (src_[start + 2] == '-' || src_[start + 2] == '+')
                      ? src_[start + 2]
                      : 0;
      std::string_view text = std::string_view(src_).substr(p, start - p);
      if (sign == '-') {
        text = text.substr(0, rstrip_space(text));
      } else if (sign != '+' && kind != '{') {
        // lstrip_blocks: a block or comment tag alone on its line takes the indentation along.
        size_t line = text.rfind('\n');
        line = line == std::string_view::npos ? 0 : line + 1;
        if ((line > 0 || line_starting) && blank(text.substr(line))) text = text.substr(0, line);
      }
      push_text(p, text);
      size_t q = start + 2 + (sign ? 1 : 0);
      if (kind == '#') {
        size_t close = src_.find("#}", q);
        if (close == std::string::npos)
          return error(static_cast<uint32_t>(start), "comment is not closed: expected '#}'");
        char end_sign =
            close > q && (src_[close - 1] == '-' || src_[close - 1] == '+') ? src_[close - 1] : 0;
        p = after_end(close + 2, end_sign, true);
      } else {
        bool block = kind == '%';
        tokens.push_back({block ? tok::block_begin : tok::var_begin, static_cast<uint32_t>(start)});
        if (!lex_tag(q, block, static_cast<uint32_t>(start))) return false;
        p = q;
      }
      line_starting = src_[p - 1] == '\n';
    }
    tokens.push_back({tok::eof, static_cast<uint32_t>(src_.size())});
    return true;
  }

  std::vector<token> tokens;
  failure fail;

 private:
  bool error(uint32_t pos, std::string what) {
    fail = {pos, std::move(what)};
    return false;
  }

  size_t find_tag(size_t p) const {
    for (p = src_.find('{', p); p != std::string::npos; p = src_.find('{', p + 1))
      if (p + 1 < src_.size() && (src_[p + 1] == '{' || src_[p + 1] == '%' || src_[p + 1] == '#'))
        return p;
    return std::string::npos;
  }

  // Only whitespace other than newlines, and at least one character (jinja2's `\s+`).
  static bool blank(std::string_view s) { return !s.empty() && lstrip_space(s) == s.size(); }

  void push_text(size_t pos, std::string_view text) {
    if (!text.empty()) tokens.push_back({tok::text, static_cast<uint32_t>(pos), std::string(text)});
  }

  // Past a tag's end marker at `p`: `-` strips all whitespace, `+` nothing, otherwise a block or
  // comment drops one newline (trim_blocks).
  size_t after_end(size_t p, char sign, bool block) const {
    if (sign == '-') return p + lstrip_space(std::string_view(src_).substr(p));
    if (sign == 0 && block && p < src_.size() && src_[p] == '\n') return p + 1;
    return p;
  }

  bool starts(size_t p, const char* s) const { return src_.compare(p, std::strlen(s), s) == 0; }

  // Tokens of a tag from `p` to its end marker (outside brackets, as jinja2 balances them);
  // leaves `p` past the marker and the whitespace control's effect.
  bool lex_tag(size_t& p, bool block, uint32_t begin) {
    std::vector<char> closers;
    while (true) {
      p += lstrip_space(std::string_view(src_).substr(p));
      if (p >= src_.size())
        return error(begin, block ? "tag is not closed: expected '%}'" : "expected '}}'");
      if (closers.empty()) {
        char sign = 0;
        size_t len = 0;
        if (block && (starts(p, "-%}") || starts(p, "+%}")))
          sign = src_[p], len = 3;
        else if (block && starts(p, "%}"))
          len = 2;
        else if (!block && starts(p, "-}}"))
          sign = '-', len = 3;
        else if (!block && starts(p, "}}"))
          len = 2;
        if (len > 0) {
          tokens.push_back({block ? tok::block_end : tok::var_end, static_cast<uint32_t>(p)});
          p = after_end(p + len, sign, block);
          return true;
        }
      }
      char c = src_[p];
      if (is_name_start(c)) {
        size_t e = p;
        while (e < src_.size() && is_name_char(src_[e])) ++e;
        tokens.push_back({tok::name, static_cast<uint32_t>(p), src_.substr(p, e - p)});
        p = e;
      } else if (is_digit(c)) {
        if (!lex_number(p)) return false;
      } else if (c == '\'' || c == '"') {
        if (!lex_string(p)) return false;
      } else if (!lex_operator(p, closers)) {
        return false;
      }
    }
  }

  bool lex_number(size_t& p) {
    uint32_t pos = static_cast<uint32_t>(p);
    auto digits = [&](std::string& out) {
      while (p < src_.size() && (is_digit(src_[p]) || (src_[p] == '_' && p + 1 < src_.size() &&
                                                       is_digit(src_[p + 1])))) {
        if (src_[p] != '_') out += src_[p];
        ++p;
      }
    };
    std::string number;
    digits(number);
    // After `.` (as in `foo.0.bar`) a number is an integer index, never a float.
    bool after_dot = !tokens.empty() && tokens.back().kind == tok::op && tokens.back().text == ".";
    bool is_float = false;
    if (!after_dot && p + 1 < src_.size() && src_[p] == '.' && is_digit(src_[p + 1])) {
      number += '.';
      ++p;
      digits(number);
      is_float = true;
    }
    if (!after_dot && p < src_.size() && (src_[p] == 'e' || src_[p] == 'E')) {
      size_t q = p + 1;
      if (q < src_.size() && (src_[q] == '+' || src_[q] == '-')) ++q;
      if (q < src_.size() && is_digit(src_[q])) {
        number += 'e';
        number.append(src_, p + 1, q - p - 1);
        p = q;
        digits(number);
        is_float = true;
      }
    }
    token t{is_float ? tok::floating : tok::integer, pos, src_.substr(pos, p - pos)};
    const char* end = number.data() + number.size();
    auto r = is_float ? std::from_chars(number.data(), end, t.floating)
                      : std::from_chars(number.data(), end, t.integer);
    if (r.ec != std::errc() || r.ptr != end)
      return error(pos, "number " + t.text + " is out of range");
    tokens.push_back(std::move(t));
    return true;
  }

  // A string literal, unescaped as Python's unicode-escape codec does (what jinja2 applies).
  bool lex_string(size_t& p) {
    uint32_t pos = static_cast<uint32_t>(p);
    char quote = src_[p++];
    std::string value;
    while (true) {
      if (p >= src_.size()) return error(pos, "string is not closed");
      char c = src_[p];
      if (c == quote) {
        ++p;
        break;
      }
      if (c != '\\' || p + 1 >= src_.size()) {
        value += c;
        ++p;
        continue;
      }
      char e = src_[p + 1];
      p += 2;
      static constexpr std::string_view simple_from = "ntrabfv\\'\"",
                                        simple_to = "\n\t\r\a\b\f\v\\'\"";
      if (size_t k = simple_from.find(e); k != std::string_view::npos) {
        value += simple_to[k];
      } else if (e == '\n') {
        // a line continuation
      } else if (e == 'x' || e == 'u' || e == 'U') {
        int n = e == 'x' ? 2 : e == 'u' ? 4 : 8;
        uint32_t cp = 0;
        for (int i = 0; i < n; ++i, ++p) {
          int h = p < src_.size() ? hex_value(src_[p]) : -1;
          if (h < 0)
            return error(static_cast<uint32_t>(p), std::string("truncated \\") + e + " escape");
          cp = cp * 16 + static_cast<uint32_t>(h);
        }
        if (cp > 0x10FFFF) return error(static_cast<uint32_t>(p), "escape beyond U+10FFFF");
        append_utf8(value, cp);
      } else if (e >= '0' && e <= '7') {
        uint32_t cp = static_cast<uint32_t>(e - '0');
        for (int i = 0; i < 2 && p < src_.size() && src_[p] >= '0' && src_[p] <= '7'; ++i)
          cp = cp * 8 + static_cast<uint32_t>(src_[p++] - '0');
        append_utf8(value, cp);
      } else {
        value += '\\';  // Python keeps an unknown escape as written
        value += e;
      }
    }
    tokens.push_back({tok::string, pos, std::move(value)});
    return true;
  }

  bool lex_operator(size_t& p, std::vector<char>& closers) {
    static constexpr const char* two[] = {"//", "**", "==", "!=", "<=", ">="};
    for (const char* op : two)
      if (starts(p, op)) {
        tokens.push_back({tok::op, static_cast<uint32_t>(p), op});
        p += 2;
        return true;
      }
    char c = src_[p];
    if (!std::strchr("+-*/%~()[]{}<>=.:|,", c))
      return error(static_cast<uint32_t>(p),
                   "unexpected character " + repr_string(std::string(1, c)) + " in a tag");
    if (c == '(' || c == '[' || c == '{') closers.push_back(c == '(' ? ')' : c == '[' ? ']' : '}');
    if (c == ')' || c == ']' || c == '}') {
      if (closers.empty())
        return error(static_cast<uint32_t>(p), std::string("unexpected '") + c + "'");
      if (closers.back() != c)
        return error(static_cast<uint32_t>(p),
                     std::string("unexpected '") + c + "', expected '" + closers.back() + "'");
      closers.pop_back();
    }
    tokens.push_back({tok::op, static_cast<uint32_t>(p), std::string(1, c)});
    ++p;
    return true;
  }

  const std::string& src_;
};

// ---- parser ----------------------------------------------------------------------------------

std::string one_of(std::span<const std::string_view> names) {
  std::string out;
  for (size_t i = 0; i < names.size(); ++i) {
    if (i > 0) out += i + 1 == names.size() ? " or " : ", ";
    out += '\'';
    out += names[i];
    out += '\'';
  }
  return out;
}

constexpr std::string_view if_ends[] = {"elif", "else", "endif"};
constexpr std::string_view endif_end[] = {"endif"};
constexpr std::string_view for_ends[] = {"else", "endfor"};
constexpr std::string_view endfor_end[] = {"endfor"};
constexpr std::string_view endset_end[] = {"endset"};
constexpr std::string_view endmacro_end[] = {"endmacro"};
constexpr std::string_view endgeneration_end[] = {"endgeneration"};

class parser {
 public:
  parser(const std::string& source, std::vector<token> tokens)
      : source_(source), toks_(std::move(tokens)) {}

  bool parse(stmt_list& out) {
    if (!parse_body(out, {}, "", 0)) return false;
    if (cur().kind != tok::eof) return error(cur().pos, "unexpected " + describe(cur()));
    return true;
  }

  failure fail;

 private:
  // Counts one level of nesting for its lifetime; false when that is one too many.
  struct nesting {
    explicit nesting(parser& p) : p_(p) { ++p_.depth_; }
    ~nesting() { --p_.depth_; }
    explicit operator bool() const {
      if (p_.depth_ <= max_parse_depth) return true;
      return p_.error(p_.cur().pos,
                      "nesting deeper than " + std::to_string(max_parse_depth) + " levels");
    }
    parser& p_;
  };

  const token& cur() const { return toks_[i_]; }
  const token& peek() const { return toks_[std::min(i_ + 1, toks_.size() - 1)]; }
  bool is_op(std::string_view s) const { return cur().kind == tok::op && cur().text == s; }
  bool is_name(std::string_view s) const { return cur().kind == tok::name && cur().text == s; }
  bool skip_op(std::string_view s) {
    if (!is_op(s)) return false;
    ++i_;
    return true;
  }
  bool skip_name(std::string_view s) {
    if (!is_name(s)) return false;
    ++i_;
    return true;
  }

  bool error(uint32_t pos, std::string what) {
    if (fail.what.empty()) fail = {pos, std::move(what)};
    return false;
  }
  bool expected(std::string_view what) {
    return error(cur().pos, "expected " + std::string(what) + ", got " + describe(cur()));
  }
  bool expect_op(std::string_view s) { return skip_op(s) || expected("'" + std::string(s) + "'"); }
  bool expect_block_end() {
    if (cur().kind != tok::block_end) return expected("'%}'");
    ++i_;
    return true;
  }
  bool expect_name(std::string& out) {
    if (cur().kind != tok::name) return expected("a name");
    out = toks_[i_++].text;
    return true;
  }

  static stmt_ptr make_stmt(stmt_op op, uint32_t pos) {
    auto s = std::make_unique<template_stmt>();
    s->op = op;
    s->pos = pos;
    return s;
  }
  static expr_ptr make_expr(expr_op op, uint32_t pos) {
    auto e = std::make_unique<template_expr>();
    e->op = op;
    e->pos = pos;
    return e;
  }
  // Sets the height of a finished node; null (and an error) when it is too tall.
  expr_ptr seal(expr_ptr e) {
    uint32_t h = 0;
    for (auto& a : e->args)
      if (a) h = std::max(h, a->height);
    for (auto& [name, a] : e->named) h = std::max(h, a->height);
    e->height = h + 1;
    if (e->height <= max_parse_depth) return e;
    error(e->pos, "expression nested deeper than " + std::to_string(max_parse_depth) + " levels");
    return nullptr;
  }
  expr_ptr binary(expr_op op, uint32_t pos, expr_ptr lhs, expr_ptr rhs) {
    if (!lhs || !rhs) return nullptr;
    auto e = make_expr(op, pos);
    e->args.push_back(std::move(lhs));
    e->args.push_back(std::move(rhs));
    return seal(std::move(e));
  }
  expr_ptr unary(expr_op op, uint32_t pos, expr_ptr operand) {
    if (!operand) return nullptr;
    auto e = make_expr(op, pos);
    e->args.push_back(std::move(operand));
    return seal(std::move(e));
  }

  // ---- statements ----

  // Statements up to a `{% name %}` with `name` in `ends` (left for the caller: see take_end), or
  // the end of the template when `ends` is empty. `opener` names the tag being closed.
  bool parse_body(stmt_list& out, std::span<const std::string_view> ends, std::string_view opener,
                  uint32_t opener_pos) {
    nesting n(*this);
    if (!n) return false;
    while (true) {
      const token& t = cur();
      switch (t.kind) {
        case tok::eof:
          if (ends.empty()) return true;
          return error(t.pos, "unexpected end of template: '" + std::string(opener) + "' at " +
                                  describe_position(source_, opener_pos) + " needs " +
                                  one_of(ends));
        case tok::text: {
          auto s = make_stmt(stmt_op::text, t.pos);
          s->text = t.text;
          out.push_back(std::move(s));
          ++i_;
          break;
        }
        case tok::var_begin: {
          auto s = make_stmt(stmt_op::output, t.pos);
          ++i_;
          s->value = tuple_expression();
          if (!s->value) return false;
          if (cur().kind != tok::var_end) return expected("'}}'");
          ++i_;
          out.push_back(std::move(s));
          break;
        }
        case tok::block_begin: {
          const token& name = peek();
          if (name.kind == tok::name &&
              std::find(ends.begin(), ends.end(), name.text) != ends.end())
            return true;
          ++i_;
          if (!parse_statement(out, ends)) return false;
          break;
        }
        default:
          return error(t.pos, "unexpected " + describe(t));
      }
    }
  }

  // Consumes the `{% name` that ended a body; returns the name.
  std::string take_end() {
    i_ += 2;
    return toks_[i_ - 1].text;
  }

  bool parse_statement(stmt_list& out, std::span<const std::string_view> ends) {
    std::string name;
    uint32_t pos = cur().pos;
    if (cur().kind != tok::name) return expected("a tag name");
    name = toks_[i_++].text;
    if (name == "if") return parse_if(out, pos);
    if (name == "for") return parse_for(out, pos);
    if (name == "set") return parse_set(out, pos);
    if (name == "macro") return parse_macro(out, pos);
    if (name == "break" || name == "continue") {
      if (loops_ == 0) return error(pos, "'" + name + "' outside a for loop");
      out.push_back(make_stmt(name == "break" ? stmt_op::break_ : stmt_op::continue_, pos));
      return expect_block_end();
    }
    if (name == "generation") {  // transformers' assistant-mask marker: renders its body
      auto s = make_stmt(stmt_op::block, pos);
      if (!expect_block_end() || !parse_body(s->body, endgeneration_end, name, pos)) return false;
      take_end();
      out.push_back(std::move(s));
      return expect_block_end();
    }
    if (name.starts_with("end") || name == "elif" || name == "else")
      return error(pos, "unexpected '" + name + "'" +
                            (ends.empty() ? std::string() : ", expected " + one_of(ends)));
    static constexpr std::string_view unsupported[] = {"include", "import", "from",       "extends",
                                                       "block",   "call",   "filter",     "raw",
                                                       "with",    "do",     "autoescape", "trans"};
    if (std::find(std::begin(unsupported), std::end(unsupported), name) != std::end(unsupported))
      return error(pos, "the '" + name + "' tag is not supported");
    return error(pos, "unknown tag '" + name + "'");
  }

  bool parse_if(stmt_list& out, uint32_t pos) {
    auto s = make_stmt(stmt_op::if_, pos);
    std::string end = "elif";
    while (end == "elif") {
      auto cond = expression();
      if (!cond || !expect_block_end()) return false;
      s->conditions.push_back(std::move(cond));
      s->branches.emplace_back();
      if (!parse_body(s->branches.back(), if_ends, "if", pos)) return false;
      end = take_end();
    }
    if (end == "else") {
      if (!expect_block_end() || !parse_body(s->otherwise, endif_end, "if", pos)) return false;
      take_end();
    }
    out.push_back(std::move(s));
    return expect_block_end();
  }

  bool parse_for(stmt_list& out, uint32_t pos) {
    auto s = make_stmt(stmt_op::for_, pos);
    bool parens = skip_op("(");
    do {
      s->targets.emplace_back();
      if (!expect_name(s->targets.back())) return false;
    } while (skip_op(","));
    if (parens && !expect_op(")")) return false;
    if (!skip_name("in")) return expected("'in'");
    s->value = expression(false);
    if (!s->value) return false;
    if (skip_name("if")) {
      s->filter = expression();
      if (!s->filter) return false;
    }
    if (is_name("recursive")) return error(cur().pos, "recursive loops are not supported");
    if (!expect_block_end()) return false;
    ++loops_;
    bool ok = parse_body(s->body, for_ends, "for", pos);
    --loops_;
    if (!ok) return false;
    if (take_end() == "else") {
      if (!expect_block_end() || !parse_body(s->otherwise, endfor_end, "for", pos)) return false;
      take_end();
    }
    out.push_back(std::move(s));
    return expect_block_end();
  }

  bool parse_set(stmt_list& out, uint32_t pos) {
    auto s = make_stmt(stmt_op::set, pos);
    s->targets.emplace_back();
    if (!expect_name(s->targets.back())) return false;
    if (skip_op(".")) {
      if (!expect_name(s->attribute)) return false;
    } else {
      while (skip_op(",")) {
        s->targets.emplace_back();
        if (!expect_name(s->targets.back())) return false;
      }
    }
    if (skip_op("=")) {
      s->value = tuple_expression();
      if (!s->value) return false;
      out.push_back(std::move(s));
      return expect_block_end();
    }
    if (!s->attribute.empty() || s->targets.size() > 1) return expected("'='");
    s->op = stmt_op::set_block;
    if (!expect_block_end() || !parse_body(s->body, endset_end, "set", pos)) return false;
    take_end();
    out.push_back(std::move(s));
    return expect_block_end();
  }

  bool parse_macro(stmt_list& out, uint32_t pos) {
    auto s = make_stmt(stmt_op::macro, pos);
    if (!expect_name(s->text) || !expect_op("(")) return false;
    while (!skip_op(")")) {
      if (!s->params.empty() && !expect_op(",")) return false;
      if (skip_op(")")) break;
      std::string param;
      uint32_t param_pos = cur().pos;
      if (!expect_name(param)) return false;
      expr_ptr fallback;
      if (skip_op("=")) {
        fallback = expression();
        if (!fallback) return false;
      } else if (!s->params.empty() && s->params.back().second) {
        return error(param_pos, "parameter '" + param + "' without a default follows one with");
      }
      s->params.emplace_back(std::move(param), std::move(fallback));
    }
    if (!expect_block_end()) return false;
    int loops = std::exchange(loops_, 0);
    bool ok = parse_body(s->body, endmacro_end, "macro", pos);
    loops_ = loops;
    if (!ok) return false;
    take_end();
    out.push_back(std::move(s));
    return expect_block_end();
  }

  // ---- expressions, lowest precedence first ----

  // An expression, or several separated by commas: a tuple (`{% set a, b = 1, 2 %}`).
  expr_ptr tuple_expression() {
    uint32_t pos = cur().pos;
    auto first = expression();
    if (!first || !is_op(",")) return first;
    auto t = make_expr(expr_op::tuple, pos);
    t->args.push_back(std::move(first));
    while (skip_op(",")) {
      if (cur().kind == tok::block_end || cur().kind == tok::var_end) break;
      auto item = expression();
      if (!item) return nullptr;
      t->args.push_back(std::move(item));
    }
    return seal(std::move(t));
  }

  expr_ptr expression(bool with_condition = true) {
    nesting n(*this);
    if (!n) return nullptr;
    auto e = or_expr();
    while (e && with_condition && is_name("if")) {
      uint32_t pos = cur().pos;
      ++i_;
      auto cond = or_expr();
      if (!cond) return nullptr;
      expr_ptr otherwise;
      if (skip_name("else")) {
        otherwise = expression();
        if (!otherwise) return nullptr;
      }
      auto c = make_expr(expr_op::condition, pos);
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(cond));
      c->args.push_back(std::move(otherwise));
      e = seal(std::move(c));
    }
    return e;
  }

  expr_ptr or_expr() {
    auto e = and_expr();
    while (e && is_name("or")) {
      uint32_t pos = toks_[i_++].pos;
      e = binary(expr_op::or_, pos, std::move(e), and_expr());
    }
    return e;
  }

  expr_ptr and_expr() {
    auto e = not_expr();
    while (e && is_name("and")) {
      uint32_t pos = toks_[i_++].pos;
      e = binary(expr_op::and_, pos, std::move(e), not_expr());
    }
    return e;
  }

  expr_ptr not_expr() {
    if (!is_name("not")) return compare();
    nesting n(*this);
    if (!n) return nullptr;
    uint32_t pos = toks_[i_++].pos;
    return unary(expr_op::not_, pos, not_expr());
  }

  expr_ptr compare() {
    auto first = math1();
    if (!first) return nullptr;
    expr_ptr e;
    while (true) {
      static constexpr std::pair<std::string_view, compare_op> ops[] = {
          {"==", compare_op::eq}, {"!=", compare_op::ne}, {"<", compare_op::lt},
          {"<=", compare_op::le}, {">", compare_op::gt},  {">=", compare_op::ge}};
      uint32_t pos = cur().pos;
      std::optional<compare_op> op;
      for (auto& [text, o] : ops)
        if (is_op(text)) op = o;
      if (op) {
        ++i_;
      } else if (is_name("in")) {
        op = compare_op::in, ++i_;
      } else if (is_name("not") && peek().kind == tok::name && peek().text == "in") {
        op = compare_op::not_in, i_ += 2;
      } else {
        break;
      }
      if (!e) {
        e = make_expr(expr_op::compare, pos);
        e->args.push_back(std::move(first));
      }
      auto rhs = math1();
      if (!rhs) return nullptr;
      e->args.push_back(std::move(rhs));
      e->compares.push_back(*op);
    }
    return e ? seal(std::move(e)) : std::move(first);
  }

  expr_ptr math1() {
    auto e = concat();
    while (e && (is_op("+") || is_op("-"))) {
      auto op = cur().text == "+" ? expr_op::add : expr_op::sub;
      uint32_t pos = toks_[i_++].pos;
      e = binary(op, pos, std::move(e), concat());
    }
    return e;
  }

  expr_ptr concat() {
    auto e = math2();
    while (e && is_op("~")) {
      uint32_t pos = toks_[i_++].pos;
      e = binary(expr_op::concat, pos, std::move(e), math2());
    }
    return e;
  }

  expr_ptr math2() {
    auto e = power();
    while (e && (is_op("*") || is_op("/") || is_op("//") || is_op("%"))) {
      auto& t = cur().text;
      auto op = t == "*"   ? expr_op::mul
                : t == "/" ? expr_op::div
                : t == "%" ? expr_op::mod
                           : expr_op::floordiv;
      uint32_t pos = toks_[i_++].pos;
      e = binary(op, pos, std::move(e), power());
    }
    return e;
  }

  expr_ptr power() {
    auto e = unary_expr(true);
    while (e && is_op("**")) {
      uint32_t pos = toks_[i_++].pos;
      e = binary(expr_op::pow, pos, std::move(e), unary_expr(true));
    }
    return e;
  }

  // As jinja2: `-x|f` is `(-x)|f`; filters and tests bind tighter than binary operators.
  expr_ptr unary_expr(bool with_filter) {
    expr_ptr e;
    if (is_op("-") || is_op("+")) {
      nesting n(*this);
      if (!n) return nullptr;
      auto op = cur().text == "-" ? expr_op::neg : expr_op::pos;
      uint32_t pos = toks_[i_++].pos;
      e = unary(op, pos, unary_expr(false));
    } else {
      e = primary();
    }
    e = postfix(std::move(e));
    return with_filter ? filters(std::move(e)) : std::move(e);
  }

  expr_ptr literal(uint32_t pos, template_value v) {
    auto e = make_expr(expr_op::literal, pos);
    e->value = std::move(v);
    return e;
  }

  expr_ptr primary() {
    const token& t = cur();
    uint32_t pos = t.pos;
    switch (t.kind) {
      case tok::name: {
        ++i_;
        if (t.text == "true" || t.text == "True") return literal(pos, true);
        if (t.text == "false" || t.text == "False") return literal(pos, false);
        if (t.text == "none" || t.text == "None") return literal(pos, template_value::none());
        auto e = make_expr(expr_op::name, pos);
        e->name = t.text;
        return e;
      }
      case tok::string: {
        std::string s;
        while (cur().kind == tok::string) s += toks_[i_++].text;  // "a" "b" is "ab"
        return literal(pos, std::move(s));
      }
      case tok::integer:
        ++i_;
        return literal(pos, t.integer);
      case tok::floating:
        ++i_;
        return literal(pos, t.floating);
      default:
        break;
    }
    if (skip_op("(")) {
      if (skip_op(")")) return seal(make_expr(expr_op::tuple, pos));
      auto e = expression();
      if (!e) return nullptr;
      if (is_op(",")) {
        auto t = make_expr(expr_op::tuple, pos);
        t->args.push_back(std::move(e));
        if (!items(*t, ")")) return nullptr;
        return seal(std::move(t));
      }
      if (!expect_op(")")) return nullptr;
      return e;
    }
    if (skip_op("[")) {
      auto l = make_expr(expr_op::list, pos);
      if (!items(*l, "]")) return nullptr;
      return seal(std::move(l));
    }
    if (skip_op("{")) {
      auto d = make_expr(expr_op::dict, pos);
      while (!skip_op("}")) {
        if (!d->args.empty() && !expect_op(",")) return nullptr;
        if (skip_op("}")) break;
        auto key = expression();
        if (!key || !expect_op(":")) return nullptr;
        auto value = expression();
        if (!value) return nullptr;
        d->args.push_back(std::move(key));
        d->args.push_back(std::move(value));
      }
      return seal(std::move(d));
    }
    expected("an expression");
    return nullptr;
  }

  // Comma-separated expressions up to `close` (a trailing comma allowed), appended to `e.args`.
  bool items(template_expr& e, std::string_view close) {
    bool first = e.args.empty();
    while (!skip_op(close)) {
      if (!first && !expect_op(",")) return false;
      first = false;
      if (skip_op(close)) break;
      auto item = expression();
      if (!item) return false;
      e.args.push_back(std::move(item));
    }
    return true;
  }

  expr_ptr postfix(expr_ptr e) {
    while (e) {
      uint32_t pos = cur().pos;
      if (skip_op(".")) {
        if (cur().kind == tok::integer) {
          auto s = make_expr(expr_op::subscript, pos);
          s->args.push_back(std::move(e));
          s->args.push_back(literal(cur().pos, toks_[i_++].integer));
          e = seal(std::move(s));
        } else {
          auto a = make_expr(expr_op::attribute, cur().pos);
          if (!expect_name(a->name)) return nullptr;
          a->args.push_back(std::move(e));
          e = seal(std::move(a));
        }
      } else if (skip_op("[")) {
        e = subscript(std::move(e), pos);
      } else if (is_op("(")) {
        e = call(std::move(e));
      } else {
        break;
      }
    }
    return e;
  }

  // After `[`: an index, or a slice with optional bounds and step.
  expr_ptr subscript(expr_ptr obj, uint32_t pos) {
    expr_ptr bounds[3];
    bool slice = false;
    if (!is_op(":")) {
      bounds[0] = expression();
      if (!bounds[0]) return nullptr;
    }
    if (skip_op(":")) {
      slice = true;
      if (!is_op("]") && !is_op(":") && !(bounds[1] = expression())) return nullptr;
      if (skip_op(":") && !is_op("]") && !(bounds[2] = expression())) return nullptr;
    }
    if (!expect_op("]")) return nullptr;
    auto s = make_expr(slice ? expr_op::slice : expr_op::subscript, pos);
    s->args.push_back(std::move(obj));
    s->args.push_back(std::move(bounds[0]));
    if (slice) {
      s->args.push_back(std::move(bounds[1]));
      s->args.push_back(std::move(bounds[2]));
    }
    return seal(std::move(s));
  }

  expr_ptr call(expr_ptr callee) {
    auto c = make_expr(expr_op::call, callee->pos);
    c->args.push_back(std::move(callee));
    if (!call_args(*c)) return nullptr;
    return seal(std::move(c));
  }

  // `(a, b, key=c)`, appended to `e.args` and `e.named`.
  bool call_args(template_expr& e) {
    if (!expect_op("(")) return false;
    bool first = true;
    while (!skip_op(")")) {
      if (!first && !expect_op(",")) return false;
      first = false;
      if (skip_op(")")) break;
      if (cur().kind == tok::name && peek().kind == tok::op && peek().text == "=") {
        std::string key = cur().text;
        i_ += 2;
        auto value = expression();
        if (!value) return false;
        e.named.emplace_back(std::move(key), std::move(value));
      } else {
        if (!e.named.empty()) return error(cur().pos, "positional argument after a keyword one");
        auto value = expression();
        if (!value) return false;
        e.args.push_back(std::move(value));
      }
    }
    return true;
  }

  expr_ptr filters(expr_ptr e) {
    while (e) {
      if (skip_op("|")) {
        auto f = make_expr(expr_op::filter, cur().pos);
        if (!expect_name(f->name)) return nullptr;
        if (!has_filter(f->name)) {
          error(f->pos, "no filter named '" + f->name + "'");
          return nullptr;
        }
        f->args.push_back(std::move(e));
        if (is_op("(") && !call_args(*f)) return nullptr;
        e = seal(std::move(f));
      } else if (is_name("is")) {
        ++i_;
        auto t = make_expr(expr_op::test, cur().pos);
        t->negated = skip_name("not");
        t->pos = cur().pos;
        if (!expect_name(t->name)) return nullptr;
        if (!has_test(t->name)) {
          error(t->pos, "no test named '" + t->name + "'");
          return nullptr;
        }
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          if (!call_args(*t)) return nullptr;
        } else if (takes_bare_argument()) {
          // `x is divisibleby 3`: one argument without parentheses, as jinja2 allows.
          if (is_name("is")) {
            error(cur().pos, "tests cannot be chained with 'is'");
            return nullptr;
          }
          auto arg = postfix(primary());
          if (!arg) return nullptr;
          t->args.push_back(std::move(arg));
        }
        e = seal(std::move(t));
      } else if (is_op("(")) {
        e = call(std::move(e));
      } else {
        break;
      }
    }
    return e;
  }

  bool takes_bare_argument() const {
    auto k = cur().kind;
    if (k == tok::name) return !is_name("else") && !is_name("or") && !is_name("and");
    return k == tok::string || k == tok::integer || k == tok::floating || is_op("[") || is_op("{");
  }

  const std::string& source_;
  std::vector<token> toks_;
  size_t i_ = 0;
  uint32_t depth_ = 0;
  int loops_ = 0;  // enclosing for loops (not counting those outside a macro), for break
};

}  // namespace

caf::expected<std::shared_ptr<template_program>> parse_template(std::string source) {
  auto program = std::make_shared<template_program>();
  program->source = std::move(source);
  auto refuse = [&](const failure& f) {
    return make_error(errc::bad_model, program->where(f.pos) + ": " + f.what);
  };
  lexer lex(program->source);
  if (!lex.run()) return refuse(lex.fail);
  parser p(program->source, std::move(lex.tokens));
  if (!p.parse(program->body)) return refuse(p.fail);
  return program;
}

}  // namespace keel::detail
