// The chat template evaluator: walks the tree of chat_template_parse.cpp with jinja2's scoping
// (a for loop's body and a macro have their own variables; `if` does not), counting every step
// and every byte built against the render's limits.

#include <utility>

#include "base/error.hpp"
#include "kernels/chat_template.hpp"
#include "kernels/detail/chat_template_internal.hpp"

namespace keel {
namespace detail {
namespace {

using access = template_value_access;

enum class flow { normal, break_loop, continue_loop };

/// `messages[0].role`, for an error about that expression.
std::string describe(const template_expr& e) {
  switch (e.op) {
    case expr_op::name:
      return e.name;
    case expr_op::attribute:
      return describe(*e.args[0]) + "." + e.name;
    case expr_op::subscript:
      if (e.args[1]->op == expr_op::literal) {
        auto& key = e.args[1]->value;
        std::string shown;
        if (key.type() == template_value::kind::string)
          shown = repr_string(key.as_string());
        else
          append_str(shown, key, 64);
        return describe(*e.args[0]) + "[" + shown + "]";
      }
      return describe(*e.args[0]) + "[...]";
    case expr_op::call:
      return describe(*e.args[0]) + "()";
    case expr_op::filter:
      return describe(*e.args[0]) + "|" + e.name;
    default:
      return "expression";
  }
}

/// Work to find a key of a dict (linear) or a character of a string (by code point); a list's
/// item is found directly.
uint64_t lookup_cost(const template_value& v) {
  auto k = v.type();
  return k == template_value::kind::dict || k == template_value::kind::string ? scan_cost(v) : 0;
}

/// describe(e) in quotes.
std::string quoted(const template_expr& e) {
  std::string out(1, '\'');
  out += describe(e);
  out += '\'';
  return out;
}

class renderer {
 public:
  renderer(std::shared_ptr<const template_program> program, const template_dict& context,
           const template_limits& limits)
      : program_(std::move(program)), context_(context) {
    budget_.limits = limits;
  }

  caf::expected<std::string> run() {
    std::string out;
    out_ = &out;
    scopes_.emplace_back();  // the template's own variables, in front of the context
    auto f = exec_body(program_->body);
    if (!f) return std::move(f.error());
    return out;
  }

 private:
  struct scope {
    template_dict vars;
    bool barrier = false;  // a macro's: names not found here are looked up at the top level
  };

  // Holds one level of nesting (and a step) for its lifetime.
  class nesting {
   public:
    nesting(renderer& r, uint32_t pos) : r_(r) {
      if (++r_.depth_ > r_.budget_.limits.max_depth)
        error_ = r_.fail(pos, "nesting deeper than " + std::to_string(r_.budget_.limits.max_depth) +
                                  " levels (a recursive macro?)");
      else if (auto e = r_.budget_.step())
        error_ = r_.locate(pos, e);
    }
    ~nesting() { --r_.depth_; }
    caf::error& error() { return error_; }

   private:
    renderer& r_;
    caf::error error_;
  };

  // A fresh scope for its lifetime.
  class scoped {
   public:
    scoped(renderer& r, bool barrier) : r_(r) { r_.scopes_.push_back({{}, barrier}); }
    ~scoped() { r_.scopes_.pop_back(); }

   private:
    renderer& r_;
  };

  // Output goes to `buffer` for its lifetime (a macro's result, a block set's value).
  class captured {
   public:
    captured(renderer& r, std::string& buffer) : r_(r), saved_(std::exchange(r.out_, &buffer)) {}
    ~captured() { r_.out_ = saved_; }

   private:
    renderer& r_;
    std::string* saved_;
  };

  caf::error fail(uint32_t pos, const std::string& what) const {
    return make_error(errc::bad_request, program_->where(pos) + ": " + what);
  }
  caf::error locate(uint32_t pos, const caf::error& e) const {
    return make_error(code_of(e), program_->where(pos) + ": " + message_of(e));
  }

  // A value a built-in made: counted as built, and refused when nested too deeply.
  caf::expected<template_value> checked(uint32_t pos, caf::expected<template_value> v) {
    if (!v) return locate(pos, v.error());
    if (auto e = budget_.build(built_size(*v))) return locate(pos, e);
    if (depth_of(*v) > static_cast<uint32_t>(budget_.limits.max_depth))
      return fail(pos, "a value nested deeper than " + std::to_string(budget_.limits.max_depth) +
                           " levels");
    return v;
  }

  template_value lookup(const std::string& name) const {
    for (size_t i = scopes_.size(); i-- > 0;) {
      if (auto* v = scopes_[i].vars.find(name)) return *v;
      if (scopes_[i].barrier) i = 1;  // continue with the top level
    }
    if (auto* v = context_.find(name)) return *v;
    return global(name);
  }

  void assign(const std::string& name, template_value v) {
    scopes_.back().vars.set(name, std::move(v));
  }

  caf::error emit(std::string_view text, uint32_t pos) {
    if (out_->size() + text.size() > budget_.limits.max_output) return output_limit(pos);
    out_->append(text);
    return {};
  }
  caf::error output_limit(uint32_t pos) const {
    return fail(
        pos, "output exceeds the limit of " + std::to_string(budget_.limits.max_output) + " bytes");
  }

  // Binds `targets` to `v`: one name takes it whole, several unpack it.
  caf::error bind(const std::vector<std::string>& targets, const template_value& v, uint32_t pos) {
    if (targets.size() == 1) {
      assign(targets[0], v);
      return {};
    }
    auto parts = iterate(v, budget_);
    if (!parts) return locate(pos, parts.error());
    auto& items = parts->as_list();
    if (items.size() != targets.size())
      return fail(pos, "cannot unpack " + std::to_string(items.size()) + " values into " +
                           std::to_string(targets.size()) + " names");
    for (size_t i = 0; i < items.size(); ++i) assign(targets[i], items[i]);
    return {};
  }

  // ---- statements ----

  caf::expected<flow> exec_body(const stmt_list& body) {
    for (auto& s : body) {
      auto f = exec(*s);
      if (!f || *f != flow::normal) return f;
    }
    return flow::normal;
  }

  caf::expected<flow> exec(const template_stmt& s) {
    nesting n(*this, s.pos);
    if (n.error()) return std::move(n.error());
    switch (s.op) {
      case stmt_op::text:
        if (auto e = emit(s.text, s.pos)) return e;
        return flow::normal;
      case stmt_op::output: {
        auto v = eval(*s.value);
        if (!v) return std::move(v.error());
        if (!append_str(*out_, *v, budget_.limits.max_output)) return output_limit(s.pos);
        return flow::normal;
      }
      case stmt_op::if_:
        for (size_t i = 0; i < s.conditions.size(); ++i) {
          auto c = eval(*s.conditions[i]);
          if (!c) return std::move(c.error());
          if (truthy(*c)) return exec_body(s.branches[i]);
        }
        return exec_body(s.otherwise);
      case stmt_op::for_:
        return exec_for(s);
      case stmt_op::set:
        return exec_set(s);
      case stmt_op::set_block: {
        std::string buffer;
        {
          captured c(*this, buffer);
          auto f = exec_body(s.body);
          if (!f) return f;
        }
        if (auto e = budget_.build(buffer.size())) return locate(s.pos, e);
        assign(s.targets[0], std::move(buffer));
        return flow::normal;
      }
      case stmt_op::macro:
        assign(s.text, access::make_macro(program_, &s));
        return flow::normal;
      case stmt_op::block:
        return exec_body(s.body);
      case stmt_op::break_:
        return flow::break_loop;
      case stmt_op::continue_:
        return flow::continue_loop;
    }
    return flow::normal;
  }

  caf::expected<flow> exec_for(const template_stmt& s) {
    auto iterable = eval(*s.value);
    if (!iterable) return std::move(iterable.error());
    auto items = iterate(*iterable, budget_);
    if (!items) return locate(s.value->pos, items.error());
    if (auto e = budget_.step(scan_cost(*items))) return locate(s.pos, e);
    // `for x in xs if cond`: the condition filters first (loop.length counts what is kept).
    template_list kept;
    if (s.filter) {
      for (auto& item : items->as_list()) {
        scoped sc(*this, false);
        if (auto e = bind(s.targets, item, s.pos)) return e;
        auto c = eval(*s.filter);
        if (!c) return std::move(c.error());
        if (truthy(*c)) kept.push_back(item);
      }
    }
    const template_list& seq = s.filter ? kept : items->as_list();
    if (seq.empty()) return exec_body(s.otherwise);
    const size_t n = seq.size();
    for (size_t i = 0; i < n; ++i) {
      scoped sc(*this, false);  // each iteration starts afresh, as in jinja2
      if (auto e = bind(s.targets, seq[i], s.pos)) return e;
      assign("loop", template_dict{{"index", i + 1},
                                   {"index0", i},
                                   {"revindex", n - i},
                                   {"revindex0", n - i - 1},
                                   {"first", i == 0},
                                   {"last", i + 1 == n},
                                   {"length", n},
                                   {"depth", 1},
                                   {"depth0", 0},
                                   {"previtem", i > 0 ? seq[i - 1] : template_value()},
                                   {"nextitem", i + 1 < n ? seq[i + 1] : template_value()}});
      auto f = exec_body(s.body);
      if (!f) return f;
      if (*f == flow::break_loop) break;
    }
    return flow::normal;
  }

  caf::expected<flow> exec_set(const template_stmt& s) {
    auto v = eval(*s.value);
    if (!v) return std::move(v.error());
    if (s.attribute.empty()) {
      if (auto e = bind(s.targets, *v, s.pos)) return e;
      return flow::normal;
    }
    auto target = lookup(s.targets[0]);
    auto* ns = access::namespace_box(target);
    if (!ns)
      return fail(s.pos, "cannot set attribute '" + s.attribute + "' of '" + s.targets[0] +
                             "', a " + type_name(target) + ": only a namespace() has attributes");
    if (holds_namespace(*v))
      return fail(s.pos, "namespace attribute '" + s.attribute + "' cannot hold a namespace");
    ns->attributes.set(s.attribute, std::move(*v));
    return flow::normal;
  }

  // ---- expressions ----

  caf::expected<template_value> eval(const template_expr& e) {
    nesting n(*this, e.pos);
    if (n.error()) return std::move(n.error());
    switch (e.op) {
      case expr_op::literal:
        return e.value;
      case expr_op::name:
        return lookup(e.name);
      case expr_op::list:
      case expr_op::tuple:
        return make_list(e);
      case expr_op::dict:
        return make_dict(e);
      case expr_op::attribute: {
        auto obj = eval(*e.args[0]);
        if (!obj) return obj;
        if (auto err = budget_.step(lookup_cost(*obj))) return locate(e.pos, err);
        return get_attribute(*obj, e.name);
      }
      case expr_op::subscript: {
        auto obj = eval(*e.args[0]);
        if (!obj) return obj;
        auto key = eval(*e.args[1]);
        if (!key) return key;
        if (auto err = budget_.step(lookup_cost(*obj))) return locate(e.pos, err);
        return get_item(*obj, *key);
      }
      case expr_op::slice:
        return slice(e);
      case expr_op::call:
        return call(e);
      case expr_op::filter:
        return filter(e);
      case expr_op::test:
        return test(e);
      case expr_op::not_: {
        auto v = eval(*e.args[0]);
        if (!v) return v;
        return !truthy(*v);
      }
      case expr_op::and_:
      case expr_op::or_: {
        auto a = eval(*e.args[0]);
        if (!a || truthy(*a) == (e.op == expr_op::or_)) return a;
        return eval(*e.args[1]);
      }
      case expr_op::compare:
        return compare(e);
      case expr_op::condition: {
        auto c = eval(*e.args[1]);
        if (!c) return c;
        if (truthy(*c)) return eval(*e.args[0]);
        return e.args[2] ? eval(*e.args[2]) : template_value();
      }
      default:
        return operation(e);
    }
  }

  caf::expected<template_value> make_list(const template_expr& e) {
    template_list items;
    items.reserve(e.args.size());
    for (auto& a : e.args) {
      auto v = eval(*a);
      if (!v) return v;
      items.push_back(std::move(*v));
    }
    if (e.op == expr_op::tuple) return checked(e.pos, template_value::tuple(std::move(items)));
    return checked(e.pos, template_value(std::move(items)));
  }

  caf::expected<template_value> make_dict(const template_expr& e) {
    template_dict entries;
    for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
      auto key = eval(*e.args[i]);
      if (!key) return key;
      if (key->type() != template_value::kind::string)
        return fail(e.args[i]->pos,
                    std::string("dict keys must be strings, got ") + type_name(*key));
      auto value = eval(*e.args[i + 1]);
      if (!value) return value;
      entries.set(key->as_string(), std::move(*value));
    }
    return checked(e.pos, template_value(std::move(entries)));
  }

  caf::expected<template_value> slice(const template_expr& e) {
    template_value parts[4];
    for (size_t i = 0; i < 4; ++i) {
      if (!e.args[i]) continue;
      auto v = eval(*e.args[i]);
      if (!v) return v;
      parts[i] = std::move(*v);
    }
    if (auto err = budget_.step(scan_cost(parts[0]))) return locate(e.pos, err);
    return checked(e.pos, get_slice(parts[0], parts[1], parts[2], parts[3], budget_));
  }

  caf::error eval_args(const template_expr& e, size_t first, template_args& out) {
    for (size_t i = first; i < e.args.size(); ++i) {
      auto v = eval(*e.args[i]);
      if (!v) return std::move(v.error());
      out.positional.push_back(std::move(*v));
    }
    for (auto& [name, arg] : e.named) {
      auto v = eval(*arg);
      if (!v) return std::move(v.error());
      out.named.emplace_back(name, std::move(*v));
    }
    return {};
  }

  caf::expected<template_value> call(const template_expr& e) {
    const template_expr& callee = *e.args[0];
    template_value fn;
    if (callee.op == expr_op::attribute) {
      // `s.strip('x')` calls the method directly instead of binding it first.
      auto obj = eval(*callee.args[0]);
      if (!obj) return obj;
      if (has_method(*obj, callee.name)) {
        template_args args;
        if (auto err = eval_args(e, 1, args)) return err;
        if (auto err = budget_.step(scan_cost(*obj))) return locate(e.pos, err);
        return checked(callee.pos, call_method(*obj, callee.name, args, budget_));
      }
      fn = get_attribute(*obj, callee.name);
    } else {
      auto v = eval(callee);
      if (!v) return v;
      fn = std::move(*v);
    }
    if (fn.is_undefined()) return fail(callee.pos, quoted(callee) + " is undefined");
    template_args args;
    if (auto err = eval_args(e, 1, args)) return err;
    if (auto* m = access::macro_box(fn)) return call_macro(e.pos, *m->node, args);
    if (auto* f = access::function_box(fn))
      return checked(e.pos, f->builtin ? f->builtin(args, budget_) : f->call(args));
    return fail(e.pos, quoted(callee) + ", a " + type_name(fn) + ", is not callable");
  }

  caf::expected<template_value> call_macro(uint32_t pos, const template_stmt& m,
                                           const template_args& args) {
    if (args.positional.size() > m.params.size())
      return fail(pos, "macro '" + m.text + "' takes " + std::to_string(m.params.size()) +
                           " arguments, got " + std::to_string(args.positional.size()));
    for (auto& [name, value] : args.named) {
      bool known = false;
      for (auto& p : m.params) known = known || p.first == name;
      if (!known) return fail(pos, "macro '" + m.text + "' has no parameter '" + name + "'");
    }
    scoped sc(*this, true);
    for (size_t i = 0; i < m.params.size(); ++i) {
      auto& [name, fallback] = m.params[i];
      const template_value* given = i < args.positional.size() ? &args.positional[i] : nullptr;
      for (auto& [key, value] : args.named)
        if (key == name) given = &value;
      if (given) {
        assign(name, *given);
      } else if (fallback) {
        auto v = eval(*fallback);
        if (!v) return v;
        assign(name, std::move(*v));
      } else {
        assign(name, template_value());
      }
    }
    std::string buffer;
    {
      captured c(*this, buffer);
      auto f = exec_body(m.body);
      if (!f) return std::move(f.error());
    }
    return checked(pos, template_value(std::move(buffer)));
  }

  caf::expected<template_value> filter(const template_expr& e) {
    auto v = eval(*e.args[0]);
    if (!v) return v;
    template_args args;
    if (auto err = eval_args(e, 1, args)) return err;
    if (auto err = budget_.step(scan_cost(*v))) return locate(e.pos, err);
    return checked(e.pos, apply_filter(e.name, *v, args, budget_));
  }

  caf::expected<template_value> test(const template_expr& e) {
    auto v = eval(*e.args[0]);
    if (!v) return v;
    template_args args;
    if (auto err = eval_args(e, 1, args)) return err;
    auto r = apply_test(e.name, *v, args);
    if (!r) return locate(e.pos, r.error());
    return *r != e.negated;
  }

  caf::expected<template_value> compare(const template_expr& e) {
    auto lhs = eval(*e.args[0]);
    if (!lhs) return lhs;
    for (size_t i = 0; i < e.compares.size(); ++i) {
      auto rhs = eval(*e.args[i + 1]);
      if (!rhs) return rhs;
      if (auto err = budget_.step(scan_cost(*rhs))) return locate(e.pos, err);
      caf::expected<bool> r = false;
      switch (e.compares[i]) {
        case compare_op::eq:
          r = equals(*lhs, *rhs);
          break;
        case compare_op::ne:
          r = !equals(*lhs, *rhs);
          break;
        case compare_op::in:
        case compare_op::not_in:
          r = contains(*rhs, *lhs);
          if (r && e.compares[i] == compare_op::not_in) r = !*r;
          break;
        default: {
          auto o = order(*lhs, *rhs);
          if (!o) return locate(e.pos, o.error());
          auto op = e.compares[i];
          r = op == compare_op::lt   ? *o < 0
              : op == compare_op::le ? *o <= 0
              : op == compare_op::gt ? *o > 0
                                     : *o >= 0;
        }
      }
      if (!r) return locate(e.pos, r.error());
      if (!*r) return false;
      lhs = std::move(rhs);
    }
    return true;
  }

  // Unary and binary arithmetic, and `~`.
  caf::expected<template_value> operation(const template_expr& e) {
    auto a = eval(*e.args[0]);
    if (!a) return a;
    if (e.op != expr_op::concat && a->is_undefined())
      return fail(e.args[0]->pos, quoted(*e.args[0]) + " is undefined");
    if (e.op == expr_op::neg) return checked(e.pos, negate(*a));
    if (e.op == expr_op::pos) {
      auto k = a->type();
      if (k == template_value::kind::integer || k == template_value::kind::floating) return a;
      if (k == template_value::kind::boolean) return template_value(int64_t{a->as_bool()});
      return fail(e.pos, std::string("bad operand type for unary +: '") + type_name(*a) + "'");
    }
    auto b = eval(*e.args[1]);
    if (!b) return b;
    if (e.op != expr_op::concat && b->is_undefined())
      return fail(e.args[1]->pos, quoted(*e.args[1]) + " is undefined");
    if (auto err = budget_.step(scan_cost(*a) + scan_cost(*b))) return locate(e.pos, err);
    return checked(e.pos, arithmetic(e.op, *a, *b, budget_));
  }

  std::shared_ptr<const template_program> program_;
  const template_dict& context_;
  template_budget budget_;
  std::vector<scope> scopes_;
  std::string* out_ = nullptr;
  int depth_ = 0;
};

}  // namespace
}  // namespace detail

caf::expected<std::string> chat_template::render(const template_dict& context,
                                                 const template_limits& limits) const {
  detail::renderer r(program_, context, limits);
  return r.run();
}

}  // namespace keel
