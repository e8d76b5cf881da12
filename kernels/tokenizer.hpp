#pragma once

#include <array>
#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "base/error.hpp"
#include "kernels/pre_tokenizer.hpp"

namespace keel {

class gguf_file;

/// The two tokenizer families Keel runs: SentencePiece-style (GGUF "llama") and GPT-2-style
/// byte-level BPE (GGUF "gpt2").
enum class vocab_kind : uint8_t { spm, bpe };

/// Token types, numbered as GGUF's `tokenizer.ggml.token_type` (llama.cpp's numbering).
enum class token_type : int32_t {
  undefined = 0,
  normal = 1,
  unknown = 2,
  control = 3,
  user_defined = 4,
  unused = 5,
  byte = 6,
};

/// A tokenizer vocabulary as loaded from a model file. Plain data; `tokenizer` indexes it.
/// Invariants (checked by the loaders): `scores` and `types` have the size of `tokens`, and the
/// special ids are -1 (absent) or valid indexes into `tokens`.
struct vocab {
  vocab_kind kind = vocab_kind::spm;
  std::vector<std::string> tokens;  // spm: "▁" stands for a space; bpe: GPT-2 byte-mapped text
  std::vector<float> scores;        // spm merge priorities (higher merges first)
  std::vector<token_type> types;
  std::vector<std::string> merges;          // bpe only: "left right", highest priority first
  pre_tokenizer pre = pre_tokenizer::gpt2;  // bpe only: how text is split into words
  int32_t bos = -1;
  int32_t eos = -1;
  int32_t unk = -1;
  int32_t pad = -1;
  bool add_bos = false;  // callers should pass this to `tokenizer::encode`
  bool add_eos = false;
  bool add_space_prefix = false;  // spm: a space is prefixed to non-empty text before encoding
  int32_t eot = -1;  // end of turn (`tokenizer.ggml.eot_token_id`, e.g. Llama 3's <|eot_id|>)
  int32_t eom = -1;  // end of message (`tokenizer.ggml.eom_token_id`, Llama 3.1's <|eom_id|>)
  /// The end-of-generation tokens, ascending: generation stops at any of them. `eos`, `eot`,
  /// `eom` and every token whose text is a known end marker (`end_of_generation_texts`). Filled
  /// by the loaders; `tokenizer` completes it (with `eos`) for a hand-built vocabulary.
  std::vector<int32_t> eog;
};

/// The texts that mark a token as end-of-generation wherever it sits in a vocabulary, as
/// llama.cpp lists them: <|eot_id|>, <|eom_id|>, <|im_end|>, <|end|>, <end_of_turn>,
/// <|endoftext|>, <|end_of_text|>, <EOT>, _<EOT>, <end_of_utterance>.
std::span<const std::string_view> end_of_generation_texts();

/// Fills `v.eog` from `v.eos`, `v.eot`, `v.eom` and the texts of `end_of_generation_texts()`, and
/// makes each token of such a text a control token (llama.cpp does the same: some converters
/// write <|im_end|> as a normal token, which would then print and tokenize as text).
void mark_end_of_generation(vocab& v);

/// Whether `id` ends generation in `v` (one of `v.eog`).
bool is_end_of_generation(const vocab& v, int32_t id);

/// Whether text may name control tokens. `on`: encoding turns the text of a control token
/// ("<|im_start|>", "<s>") into that token, and decoding prints a control token's text; `off`:
/// such text is encoded as ordinary text, and control tokens decode to nothing. Untrusted text
/// (a chat message's content) is always encoded `off`, so that it cannot forge a turn.
enum class special_tokens : uint8_t { off, on };

/// Reads the `tokenizer.ggml.*` keys. `tokenizer.ggml.model` must be "llama" (spm) or "gpt2"
/// (bpe). `tokenizer.ggml.pre` must be absent or "default" for spm, and absent (GPT-2's split)
/// or a name `pre_tokenizer_from_name` accepts for bpe; any other value is refused, since the
/// text would be split differently from the model's training. Missing optional keys take
/// llama.cpp's defaults (spm: BOS 1, EOS 2, UNK 0, add BOS, add a space prefix; gpt2: no BOS
/// added, no space prefix, except "llama-bpe": add BOS). `tokenizer.ggml.eot_token_id` and
/// `eom_token_id` join `eos` in `vocab::eog` (`mark_end_of_generation`). Errors are `bad_model`
/// and name the file, the key and the value.
caf::expected<vocab> vocab_from_gguf(const gguf_file& file);

/// Reads llama2.c's tokenizer.bin (int32 max_token_length, then `vocab_size` times: float32
/// score, int32 length, that many bytes) as an spm vocabulary: id 0 `<unk>`, 1 `<s>` (BOS),
/// 2 `</s>` (EOS), `<0xNN>` byte tokens; llama2.c's spaces become "▁". A missing file is
/// `not_found`; a short or malformed one is `bad_model`, naming the file and the value.
caf::expected<vocab> vocab_from_llama2c(const std::string& tokenizer_bin_path, int32_t vocab_size);

/// A small byte-level BPE vocabulary that needs no files: the 256 GPT-2-mapped bytes (ids
/// 0..255 are bytes 0..255), `<s>` (256, BOS) and `</s>` (257, EOS), then a few hundred merges
/// learned deterministically from a built-in English text. Every byte string round-trips.
vocab builtin_byte_vocab();

/// Text to token ids and back for one vocabulary. Immutable after construction, so one instance
/// may be shared by any number of threads.
class tokenizer {
 public:
  explicit tokenizer(vocab v);

  /// The ids of `text`, preceded by BOS when `add_bos` is true and the vocabulary has one.
  /// With `special_tokens::off` control-token text (e.g. "<s>" or "<|im_start|>" inside
  /// `text`) is not recognised; it is encoded as text. With `on`, the text of every control,
  /// user-defined and unknown token is cut out as that token first (the leftmost match, the
  /// longest token at a position) and the text between is encoded as below; an spm vocabulary
  /// that adds a space prefix adds it to the text at the start and after each such token, as
  /// llama.cpp does. Follows llama.cpp and Hugging Face: spm merges by score with byte
  /// fallback; bpe first cuts out the text of user-defined tokens (such as Qwen's "<think>";
  /// the leftmost match, the longest token at a position), splits the rest with the
  /// vocabulary's `pre_tokenizer`, and merges each word by rank ("llama-bpe" first takes a word
  /// that is a token whole, as Llama 3's `ignore_merges` says).
  /// `literal_at`: ascending byte offsets of `text` where no token is cut out as with `on`
  /// (only as with `off`): text that came from a chat message, whose control-token text must
  /// stay text (kernels/chat_prompt.hpp).
  std::vector<int32_t> encode(std::string_view text, bool add_bos,
                              special_tokens special = special_tokens::off,
                              std::span<const size_t> literal_at = {}) const;

  /// Whether `encode(..., on)` could cut a token out at `pos` where `encode(..., off)` would
  /// not: the text of a control or unknown token (and in spm of a user-defined one) begins at
  /// `pos`, or `text` from `pos` to its end is the beginning of one (more text after it could
  /// complete it).
  bool special_text_at(std::string_view text, size_t pos) const;

  /// The bytes that token `id` stands for: "▁" becomes ' ', byte tokens give their byte, GPT-2
  /// mapped characters give their bytes; empty for control, unused and out-of-range ids. The
  /// result may be a fragment of a UTF-8 character.
  const std::string& token_text(int32_t id) const;
  /// As above; with `special_tokens::on` a control token gives its text ("<|im_end|>").
  const std::string& token_text(int32_t id, special_tokens special) const;

  /// The bytes of a whole id sequence, without the space prefix the encoder added (when the
  /// vocabulary adds one). `decode(encode(s, b)) == s` for any bytes when every byte has a token
  /// (and `decode(encode(s, b, on), on) == s` when the text has no spm space prefix to add).
  std::string decode(std::span<const int32_t> ids,
                     special_tokens special = special_tokens::off) const;

  const vocab& vocabulary() const { return vocab_; }
  int32_t bos() const { return vocab_.bos; }
  int32_t eos() const { return vocab_.eos; }
  int32_t size() const { return static_cast<int32_t>(vocab_.tokens.size()); }

  /// Whether `id` is a control token (BOS, EOS and the like).
  bool is_control(int32_t id) const;
  /// Whether generation ends at `id` (`vocab::eog`: eos, eot, eom, <|im_end|>...).
  bool is_end_of_generation(int32_t id) const;

 private:
  void encode_spm(std::string_view text, bool space_prefix, std::vector<int32_t>& out) const;
  void encode_bpe_text(std::string_view text, std::vector<int32_t>& out) const;
  void encode_bpe_word(std::string_view word, std::vector<int32_t>& out) const;
  /// The token whose text is cut out whole at `pos` (-1: none): user-defined tokens always in
  /// a bpe vocabulary, and with `special` every control, user-defined and unknown token.
  int32_t special_at(std::string_view text, size_t pos, special_tokens special) const;
  int32_t find(std::string_view text) const;

  vocab vocab_;
  std::unordered_map<std::string, int32_t> ids_;
  std::unordered_map<std::string, int32_t> merge_ranks_;  // key: "left right"
  std::array<int32_t, 256> byte_ids_;                     // fallback token of each byte, or -1
  std::vector<std::string> pieces_;                       // token_text of each id
  // The control, user-defined and unknown tokens whose text starts with each byte, longest text
  // first: what `special_at` may cut out.
  std::array<std::vector<int32_t>, 256> specials_by_byte_;
};

/// Streaming decode for generated tokens: `push` returns the text that became complete. Bytes of
/// a UTF-8 character split across tokens are held back until the character completes. Holds a
/// reference to the tokenizer, which must outlive it. Not thread-safe.
class detokenizer {
 public:
  /// `at_start`: the ids begin a text (as from `encode`), so the space prefix the encoder added
  /// is dropped from the first token. Pass false when continuing after a prompt. Control tokens
  /// give nothing, unless `special` is `on` (`keel generate --special`): then their text.
  explicit detokenizer(const tokenizer& tok, bool at_start = true,
                       special_tokens special = special_tokens::off);

  /// Appends token `id`; returns the complete UTF-8 text now available (possibly empty).
  /// Bytes that can never form a valid character come out as U+FFFD.
  std::string push(int32_t id);

  /// Returns whatever is held back (an incomplete character becomes one U+FFFD) and empties the
  /// hold.
  std::string flush();

 private:
  const tokenizer& tok_;
  std::string held_;
  bool strip_space_;
  special_tokens special_;
};

}  // namespace keel
