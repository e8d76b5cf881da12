#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace keel {

/// The length of the UTF-8 sequence that `lead` starts, judged by its high nibble alone (as
/// llama.cpp does): 1 for ASCII and for stray continuation bytes, else 2, 3 or 4.
int utf8_len(uint8_t lead);

/// One decoded code point. `len` is the number of bytes consumed (at least 1); when the bytes
/// at the position do not form a valid, complete sequence, `valid` is false, `len` is 1 and
/// `cp` is the raw byte value.
struct utf8_char {
  uint32_t cp = 0;
  int len = 1;
  bool valid = false;
};

/// Decodes the code point starting at `s[pos]`; `pos < s.size()`.
utf8_char decode_utf8(std::string_view s, size_t pos);

/// Appends the UTF-8 encoding of `cp` (must be at most 0x10FFFF).
void append_utf8(std::string& out, uint32_t cp);

/// Given bytes that end a stream so far, the number of trailing bytes that are the start of a
/// valid but still incomplete UTF-8 sequence (0 to 3). Those must be held back by a streaming
/// decoder until more bytes arrive.
size_t utf8_incomplete_tail(std::string_view s);

/// Replaces every byte that is not part of a valid UTF-8 sequence by U+FFFD.
std::string utf8_sanitize(std::string_view s);

/// Splits `text` into the words of the GPT-2 pre-tokenizer regex
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, matched the way
/// llama.cpp's hand-written matcher does (whitespace is the Unicode White_Space property).
/// Invalid UTF-8 bytes are kept as single-byte "other" characters, so the words always
/// concatenate back to `text`. The views point into `text`.
std::vector<std::string_view> gpt2_pretokenize(std::string_view text);

/// GPT-2's byte-level mapping: every byte to a printable code point, as UTF-8 ("Ġ" for ' ').
const std::string& gpt2_byte_to_text(uint8_t byte);

/// The inverse of `gpt2_byte_to_text` on one code point; -1 when `cp` is not in the image.
int gpt2_cp_to_byte(uint32_t cp);

}  // namespace keel
