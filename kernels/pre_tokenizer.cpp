#include "kernels/pre_tokenizer.hpp"

#include <array>

#include <unicode/uchar.h>

#include "kernels/unicode.hpp"

namespace keel {

namespace {

struct named {
  pre_tokenizer value;
  std::string_view name;
};

// The one table of names, read by both directions of the mapping.
constexpr std::array<named, 3> names = {{
    {pre_tokenizer::gpt2, "gpt-2"},
    {pre_tokenizer::llama_bpe, "llama-bpe"},
    {pre_tokenizer::qwen2, "qwen2"},
}};

enum class cclass : uint8_t { letter, number, space, other };

/// `text` decoded once: character i is code point `cps[i]` of class `cls[i]`, starting at byte
/// `offs[i]`; `offs` has one more entry, `text.size()`.
struct decoded {
  std::vector<uint32_t> cps;
  std::vector<cclass> cls;
  std::vector<size_t> offs;
};

decoded decode(std::string_view text) {
  decoded d;
  for (size_t pos = 0; pos < text.size();) {
    auto ch = decode_utf8(text, pos);
    cclass c = cclass::other;  // invalid bytes are "other": never a letter, digit or space
    if (ch.valid) {
      auto cp = static_cast<UChar32>(ch.cp);
      auto mask = U_GET_GC_MASK(cp);
      if (u_isUWhiteSpace(cp))
        c = cclass::space;
      else if (mask & U_GC_L_MASK)
        c = cclass::letter;
      else if (mask & U_GC_N_MASK)
        c = cclass::number;
    }
    // Invalid bytes get a value no comparison below can mistake for a character.
    d.cps.push_back(ch.valid ? ch.cp : 0xFFFFFFFFu);
    d.cls.push_back(c);
    d.offs.push_back(pos);
    pos += ch.len;
  }
  d.offs.push_back(text.size());
  return d;
}

/// `cp` folded for the contractions' `(?i:...)`: ASCII upper case to lower case, and U+017F
/// (long s), whose simple case folding is 's'.
uint32_t fold(uint32_t cp) {
  if (cp >= 'A' && cp <= 'Z') return cp + ('a' - 'A');
  if (cp == 0x17F) return 's';
  return cp;
}

/// The words of the Llama 3 / Qwen 2 regex
/// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}|
/// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`. At each position the first alternative
/// that matches wins, with the match a backtracking engine finds for it (noted per branch).
std::vector<std::string_view> split_llama3_style(std::string_view text, size_t max_digits) {
  const auto d = decode(text);
  const size_t n = d.cps.size();
  auto cp_at = [&](size_t i) { return i < n ? d.cps[i] : 0xFFFFFFFEu; };
  auto is = [&](size_t i, cclass c) { return i < n && d.cls[i] == c; };
  auto is_newline = [&](size_t i) { return i < n && (d.cps[i] == '\r' || d.cps[i] == '\n'); };

  std::vector<std::string_view> words;
  for (size_t pos = 0; pos < n;) {
    size_t end = pos;
    const uint32_t a = fold(cp_at(pos + 1)), b = fold(cp_at(pos + 2));
    if (d.cps[pos] == '\'' && (a == 's' || a == 't' || a == 'm' || a == 'd')) {
      end = pos + 2;  // 's 't 'm 'd
    } else if (d.cps[pos] == '\'' &&
               ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))) {
      end = pos + 3;  // 're 've 'll
    } else if (is(pos, cclass::letter) ||
               (is(pos + 1, cclass::letter) && !is_newline(pos) && !is(pos, cclass::number))) {
      // `[^\r\n\p{L}\p{N}]?\p{L}+`: the optional character (space, tab, punctuation) is taken
      // only when a letter follows it; otherwise the branch needs a letter at `pos`.
      end = pos + 1;
      while (is(end, cclass::letter)) ++end;
    } else if (is(pos, cclass::number)) {
      end = pos;
      while (end - pos < max_digits && is(end, cclass::number)) ++end;
    } else if (is(d.cps[pos] == ' ' ? pos + 1 : pos, cclass::other)) {
      // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
      end = d.cps[pos] == ' ' ? pos + 1 : pos;
      while (is(end, cclass::other)) ++end;
      while (is_newline(end)) ++end;
    } else {
      // Only whitespace is left. Over the run [pos, run_end):
      // `\s*[\r\n]+` matches when the run holds a newline, and ends after its last one;
      // `\s+(?!\S)` takes the run when it ends the text, else all of it but its last character
      // (which then prefixes the next word), which needs two characters; `\s+` takes one.
      size_t run_end = pos, after_newline = 0;
      while (is(run_end, cclass::space)) {
        if (is_newline(run_end)) after_newline = run_end + 1;
        ++run_end;
      }
      if (after_newline > 0)
        end = after_newline;
      else if (run_end == n || run_end - pos < 2)
        end = run_end;
      else
        end = run_end - 1;
    }
    if (end == pos) end = pos + 1;  // unreachable: every class has a branch; never loop
    words.push_back(text.substr(d.offs[pos], d.offs[end] - d.offs[pos]));
    pos = end;
  }
  return words;
}

}  // namespace

std::string_view pre_tokenizer_name(pre_tokenizer p) {
  for (auto& [value, name] : names)
    if (value == p) return name;
  return "?";
}

std::optional<pre_tokenizer> pre_tokenizer_from_name(std::string_view name) {
  for (auto& [value, n] : names)
    if (n == name) return value;
  return std::nullopt;
}

std::string supported_pre_tokenizer_names() {
  std::string out;
  for (auto& [value, name] : names) {
    if (!out.empty()) out += ", ";
    out.append("\"").append(name).append("\"");
  }
  return out;
}

std::vector<std::string_view> pre_tokenize(pre_tokenizer p, std::string_view text) {
  switch (p) {
    case pre_tokenizer::llama_bpe:
      return split_llama3_style(text, 3);
    case pre_tokenizer::qwen2:
      return split_llama3_style(text, 1);
    case pre_tokenizer::gpt2:
      break;
  }
  return gpt2_pretokenize(text);
}

}  // namespace keel
