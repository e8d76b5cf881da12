#include "kernels/unicode.hpp"

#include <array>

#include <unicode/uchar.h>

namespace keel {

int utf8_len(uint8_t lead) {
  static constexpr int lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return lookup[lead >> 4];
}

utf8_char decode_utf8(std::string_view s, size_t pos) {
  auto b = [&](size_t i) { return static_cast<uint8_t>(s[i]); };
  uint8_t c = b(pos);
  utf8_char bad{c, 1, false};
  if (c < 0x80) return {c, 1, true};
  int len;
  uint32_t cp;
  if (c >= 0xC2 && c <= 0xDF) {
    len = 2, cp = c & 0x1F;
  } else if (c >= 0xE0 && c <= 0xEF) {
    len = 3, cp = c & 0x0F;
  } else if (c >= 0xF0 && c <= 0xF4) {
    len = 4, cp = c & 0x07;
  } else {
    return bad;
  }
  if (pos + len > s.size()) return bad;
  for (int i = 1; i < len; ++i) {
    uint8_t x = b(pos + i);
    if ((x & 0xC0) != 0x80) return bad;
    cp = (cp << 6) | (x & 0x3F);
  }
  // Overlong forms, surrogates and values above U+10FFFF are not valid UTF-8.
  if ((len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) || cp > 0x10FFFF ||
      (cp >= 0xD800 && cp <= 0xDFFF))
    return bad;
  return {cp, len, true};
}

void append_utf8(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

size_t utf8_incomplete_tail(std::string_view s) {
  // Look back at most 3 bytes for a lead byte whose sequence runs past the end.
  for (size_t back = 1; back <= 3 && back <= s.size(); ++back) {
    auto c = static_cast<uint8_t>(s[s.size() - back]);
    if ((c & 0xC0) == 0x80) continue;  // continuation byte: keep looking for the lead
    int need = (c >= 0xC2 && c <= 0xDF)   ? 2
               : (c >= 0xE0 && c <= 0xEF) ? 3
               : (c >= 0xF0 && c <= 0xF4) ? 4
                                          : 1;
    if (static_cast<size_t>(need) <= back) return 0;
    // A prefix can already be invalid at its second byte (overlong, surrogate, > U+10FFFF).
    if (back >= 2) {
      auto c1 = static_cast<uint8_t>(s[s.size() - back + 1]);
      if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F) || (c == 0xF0 && c1 < 0x90) ||
          (c == 0xF4 && c1 > 0x8F))
        return 0;
    }
    return back;
  }
  return 0;
}

std::string utf8_sanitize(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (size_t pos = 0; pos < s.size();) {
    auto ch = decode_utf8(s, pos);
    if (ch.valid)
      out.append(s.substr(pos, ch.len));
    else
      out += "\xEF\xBF\xBD";
    pos += ch.len;
  }
  return out;
}

namespace {

enum class cclass : uint8_t { letter, number, space, other };

cclass classify(const utf8_char& ch) {
  if (!ch.valid) return cclass::other;
  auto cp = static_cast<UChar32>(ch.cp);
  if (u_isUWhiteSpace(cp)) return cclass::space;
  auto mask = U_GET_GC_MASK(cp);
  if (mask & U_GC_L_MASK) return cclass::letter;
  if (mask & U_GC_N_MASK) return cclass::number;
  return cclass::other;
}

}  // namespace

std::vector<std::string_view> gpt2_pretokenize(std::string_view text) {
  // Decode once; position i of `cps` starts at byte offs[i]; offs has one extra end entry.
  std::vector<uint32_t> cps;
  std::vector<cclass> cls;
  std::vector<size_t> offs;
  for (size_t pos = 0; pos < text.size();) {
    auto ch = decode_utf8(text, pos);
    cps.push_back(ch.valid ? ch.cp : 0xFFFFFFFFu);  // invalid bytes never equal ' ' or a letter
    cls.push_back(classify(ch));
    offs.push_back(pos);
    pos += ch.len;
  }
  offs.push_back(text.size());
  const size_t n = cps.size();
  auto cp_at = [&](size_t i) { return i < n ? cps[i] : 0xFFFFFFFEu; };
  // Past the end no class matches (llama.cpp's empty flags).
  auto is = [&](size_t i, cclass c) { return i < n && cls[i] == c; };

  std::vector<std::string_view> words;
  size_t prev = 0;
  auto emit = [&](size_t end) {
    if (end > prev) words.push_back(text.substr(offs[prev], offs[end] - offs[prev]));
    prev = end;
  };
  for (size_t pos = 0; pos < n;) {
    uint32_t cp = cps[pos];
    // 's|'t|'re|'ve|'m|'ll|'d
    if (cp == '\'' && pos + 1 < n) {
      uint32_t a = cp_at(pos + 1);
      if (a == 's' || a == 't' || a == 'm' || a == 'd') {
        emit(pos += 2);
        continue;
      }
      uint32_t b = cp_at(pos + 2);
      if (pos + 2 < n &&
          ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))) {
        emit(pos += 3);
        continue;
      }
    }
    // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`
    size_t first = cp == ' ' ? pos + 1 : pos;
    bool matched = false;
    for (auto c : {cclass::letter, cclass::number, cclass::other}) {
      if (!is(first, c)) continue;
      pos = first;
      while (is(pos, c)) ++pos;
      emit(pos);
      matched = true;
      break;
    }
    if (matched) continue;
    // `\s+(?!\S)` then `\s+`
    size_t ws = 0;
    while (is(pos + ws, cclass::space)) ++ws;
    if (ws > 1 && pos + ws < n) {
      emit(pos += ws - 1);
      continue;
    }
    if (ws > 0) {
      emit(pos += ws);
      continue;
    }
    emit(++pos);
  }
  return words;
}

namespace {

struct byte_tables {
  std::array<std::string, 256> to_text;
  std::array<int16_t, 324> from_cp;  // every image code point is below 0x144
  byte_tables() {
    from_cp.fill(-1);
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE);
      uint32_t cp = printable ? static_cast<uint32_t>(b) : 256u + extra++;
      append_utf8(to_text[b], cp);
      from_cp[cp] = static_cast<int16_t>(b);
    }
  }
};

const byte_tables& tables() {
  static const byte_tables t;  // immutable lookup data, built once
  return t;
}

}  // namespace

const std::string& gpt2_byte_to_text(uint8_t byte) {
  return tables().to_text[byte];
}

int gpt2_cp_to_byte(uint32_t cp) {
  return cp < 324 ? tables().from_cp[cp] : -1;
}

}  // namespace keel
