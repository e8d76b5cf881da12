#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace keel {

/// How a byte-level BPE vocabulary splits text into words before merging, as GGUF's
/// `tokenizer.ggml.pre` names it. Each is the split regex of its model family's
/// `tokenizer.json`, matched by hand (no regex library): `\p{L}` and `\p{N}` are the Unicode
/// general categories L* and N*, `\s` is the White_Space property, invalid UTF-8 bytes are single
/// characters of none of these classes.
enum class pre_tokenizer : uint8_t {
  /// "gpt-2", and a gpt2 vocabulary without the key: GPT-2's
  /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
  gpt2,
  /// "llama-bpe" (Llama 3.x): `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
  /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`: digits in groups of up to three.
  llama_bpe,
  /// "qwen2" (Qwen 2, 2.5 and 3): as `llama_bpe` but `\p{N}` alone, one digit a word.
  qwen2,
};

/// The `tokenizer.ggml.pre` value that names `p`.
std::string_view pre_tokenizer_name(pre_tokenizer p);

/// The pre-tokenizer that the `tokenizer.ggml.pre` value `name` names, or nothing when Keel does
/// not implement it.
std::optional<pre_tokenizer> pre_tokenizer_from_name(std::string_view name);

/// The names `pre_tokenizer_from_name` accepts, quoted and comma-separated, for error messages:
/// `"gpt-2", "llama-bpe", "qwen2"`.
std::string supported_pre_tokenizer_names();

/// Splits `text` into the words that `p`'s regex matches, in order. Every character belongs to
/// exactly one word, so the words concatenate back to `text`; none is empty. The views point
/// into `text`, which must outlive them.
std::vector<std::string_view> pre_tokenize(pre_tokenizer p, std::string_view text);

}  // namespace keel
