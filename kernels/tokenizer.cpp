#include "kernels/tokenizer.hpp"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iterator>
#include <map>
#include <queue>

#include "kernels/gguf.hpp"
#include "kernels/unicode.hpp"

namespace keel {

namespace {

constexpr std::string_view space_mark = "\xE2\x96\x81";  // U+2581 "▁", SentencePiece's space

std::string replace_all(std::string_view s, std::string_view from, std::string_view to) {
  std::string out;
  out.reserve(s.size());
  for (size_t pos = 0;;) {
    size_t hit = s.find(from, pos);
    if (hit == std::string_view::npos) {
      out.append(s.substr(pos));
      return out;
    }
    out.append(s.substr(pos, hit - pos)).append(to);
    pos = hit + from.size();
  }
}

/// The byte of a "<0xNN>" token, or -1.
int parse_byte_token(std::string_view t) {
  if (t.size() != 6 || t.substr(0, 3) != "<0x" || t[5] != '>') return -1;
  auto hex = [](char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  int hi = hex(t[3]), lo = hex(t[4]);
  return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
}

std::string byte_token_name(uint8_t b) {
  char buf[8];
  std::snprintf(buf, sizeof buf, "<0x%02X>", b);
  return buf;
}

// ---- GGUF loading -----------------------------------------------------------------------------

caf::error bad(const gguf_file& f, const std::string& what) {
  return make_error(errc::bad_model, f.name() + ": " + what);
}

/// Reads a special token id into `id` when the key exists. -1 (or u32 0xFFFFFFFF, as some
/// converters write) means "none".
caf::error read_id(const gguf_file& f, std::string_view key, size_t n_tokens, int32_t& id) {
  auto* kv = f.find(key);
  if (!kv) return {};
  if (!gguf_is_integer(kv->type)) {
    return bad(f, "key " + kv->key + " has type " + std::string(gguf_type_name(kv->type)) +
                      ", expected an integer");
  }
  bool none = kv->i == -1 || (kv->type == gguf_type::u32 && kv->u == 0xFFFFFFFFu);
  if (none) {
    id = -1;
    return {};
  }
  bool is_unsigned = kv->type == gguf_type::u8 || kv->type == gguf_type::u16 ||
                     kv->type == gguf_type::u32 || kv->type == gguf_type::u64;
  bool in_range =
      is_unsigned ? kv->u < n_tokens : kv->i >= 0 && static_cast<uint64_t>(kv->i) < n_tokens;
  if (!in_range) {
    auto value = is_unsigned ? std::to_string(kv->u) : std::to_string(kv->i);
    return bad(f, "key " + kv->key + " is " + value + ", outside the vocabulary of " +
                      std::to_string(n_tokens) + " tokens");
  }
  id = static_cast<int32_t>(kv->i);
  return {};
}

caf::error read_flag(const gguf_file& f, std::string_view key, bool& flag) {
  auto* kv = f.find(key);
  if (!kv) return {};
  if (kv->type != gguf_type::boolean) {
    return bad(f, "key " + kv->key + " has type " + std::string(gguf_type_name(kv->type)) +
                      ", expected bool");
  }
  flag = kv->i != 0;
  return {};
}

/// Reads `tokenizer.ggml.pre` into `v.pre` (after `v.kind` is known). SentencePiece does not
/// pre-tokenize, so an spm vocabulary accepts only the converters' "default".
caf::error read_pre(const gguf_file& f, vocab& v) {
  constexpr std::string_view key = "tokenizer.ggml.pre";
  if (!f.find(key)) return {};
  auto name = f.get_string(key);
  if (!name) return name.error();
  if (v.kind == vocab_kind::spm) {
    if (*name == "default") return {};
    return bad(f, "key " + std::string(key) + " is \"" + *name +
                      "\", expected \"default\" (or no key) for a SentencePiece vocabulary");
  }
  auto pre = pre_tokenizer_from_name(*name);
  if (!pre) {
    return bad(f, "key " + std::string(key) + " is \"" + *name +
                      "\", a pre-tokenizer Keel does not implement; supported: " +
                      supported_pre_tokenizer_names() + " (or no key, for GPT-2's)");
  }
  v.pre = *pre;
  return {};
}

// ---- built-in vocabulary ----------------------------------------------------------------------

// Merges for the built-in vocabulary are learned from this text, so that common English words
// and word pieces become single tokens. Changing it changes the vocabulary (and models made
// with it), so leave it alone.
constexpr std::string_view builtin_corpus =
    "The quick brown fox jumps over the lazy dog. This is a small piece of English text that "
    "teaches the built-in tokenizer which pairs of letters appear together most often. There are "
    "many words here, and they are the words that people write every day: the, and, that, with, "
    "from, they, there, their, which, would, could, should, about, other, these, those, after, "
    "before, because, between, through, under, over, again, where, when, what, while, will, have, "
    "has, had, been, being, were, was, are, is, it, its, in, into, on, one, only, or, our, out, "
    "of, off, often, for, form, first, find, found, for the, in the, of the, to the, on the. "
    "In the beginning the model knows nothing, and then it learns to predict the next token from "
    "the tokens that came before it. A language model reads a prompt, computes attention over "
    "the context, and generates an answer one token at a time. The server receives a request, "
    "schedules the work on the available devices, and streams the generated text back to the "
    "client as soon as each piece is ready. Engineers measure the time to the first token and the "
    "number of tokens per second, and they try to make both better without making the answers "
    "worse. Information, computation, generation, attention, question, function, condition, "
    "position, action, station, nation, relation, operation: many English words end in tion. "
    "Others end in ing, like running, reading, writing, thinking, making, taking, working, "
    "learning, training, testing, being, having, going, coming, doing, saying, seeing, getting. "
    "Some end in ed, like started, stopped, wanted, needed, used, played, asked, worked, called, "
    "tried, moved, lived, believed, happened, included, continued, created, provided, returned. "
    "Some end in er or est, like faster, fastest, smaller, smallest, larger, largest, better, "
    "water, number, under, never, ever, order, other, mother, father, brother, together, weather. "
    "And some end in ly, like quickly, really, only, early, nearly, clearly, simply, finally, "
    "usually, actually, probably, especially, recently, certainly, exactly, directly, easily. "
    "The children played in the garden while their parents were talking in the house. It was a "
    "warm evening at the end of the summer, and the sun was going down behind the hills. Nobody "
    "wanted to go inside yet, so they stayed there and watched the stars come out one by one. "
    "She said that she would come back tomorrow with the books and the letters he had asked for. "
    "He thought about it for a long time and then decided that it was the right thing to do. "
    "We can't say what they'll do, but we're sure that you've seen it and that it's true. "
    "Numbers like 0, 1, 2, 3, 10, 100, 2024 and 3.14 appear too, as do symbols: (a + b) * c = d; "
    "x -> y, \"quoted\", 'single', [list], {set}, 50% and #1.\n\n"
    "Keel is an inference engine. It loads a model, splits it across the workers of a cluster, "
    "and answers requests. When a worker fails, the supervisor restarts it and the request is "
    "tried again on another worker. The store keeps the state of every session, so that nothing "
    "is lost when a process stops. Everything is tested: the kernels, the tokenizer, the server.\n";

constexpr int builtin_max_merges = 400;

}  // namespace

caf::expected<vocab> vocab_from_gguf(const gguf_file& f) {
  vocab v;
  auto model = f.get_string("tokenizer.ggml.model");
  if (!model) return model.error();
  if (*model == "llama") {
    v.kind = vocab_kind::spm;
  } else if (*model == "gpt2") {
    v.kind = vocab_kind::bpe;
  } else {
    return bad(f, "key tokenizer.ggml.model is \"" + *model +
                      "\", expected \"llama\" (SentencePiece) or \"gpt2\" (byte-level BPE)");
  }
  if (auto err = read_pre(f, v)) return err;
  auto tokens = f.get_array("tokenizer.ggml.tokens", gguf_type::string);
  if (!tokens) return tokens.error();
  v.tokens = (*tokens)->strings;
  const size_t n = v.tokens.size();
  if (n == 0) return bad(f, "key tokenizer.ggml.tokens is empty");
  if (n > static_cast<size_t>(INT32_MAX)) {
    return bad(f, "key tokenizer.ggml.tokens has " + std::to_string(n) + " entries, too many");
  }

  v.scores.assign(n, 0.0f);
  if (f.find("tokenizer.ggml.scores")) {
    auto scores = f.get_array("tokenizer.ggml.scores", gguf_type::f32);
    if (!scores) return scores.error();
    auto& s = (*scores)->floats;
    if (s.size() != n) {
      return bad(f, "key tokenizer.ggml.scores has " + std::to_string(s.size()) +
                        " entries, expected " + std::to_string(n) + " (one per token)");
    }
    for (size_t i = 0; i < n; ++i) v.scores[i] = static_cast<float>(s[i]);
  }

  v.types.assign(n, token_type::normal);
  if (f.find("tokenizer.ggml.token_type")) {
    auto types = f.get_array("tokenizer.ggml.token_type", gguf_type::i32);
    if (!types) return types.error();
    auto& t = (*types)->ints;
    if (t.size() != n) {
      return bad(f, "key tokenizer.ggml.token_type has " + std::to_string(t.size()) +
                        " entries, expected " + std::to_string(n) + " (one per token)");
    }
    for (size_t i = 0; i < n; ++i) {
      if (t[i] < 0 || t[i] > 6) {
        return bad(f, "key tokenizer.ggml.token_type[" + std::to_string(i) + "] is " +
                          std::to_string(t[i]) + ", expected 0..6");
      }
      v.types[i] = static_cast<token_type>(t[i]);
    }
  }

  if (v.kind == vocab_kind::bpe) {
    auto merges = f.get_array("tokenizer.ggml.merges", gguf_type::string);
    if (!merges) return merges.error();
    v.merges = (*merges)->strings;
    for (size_t i = 0; i < v.merges.size(); ++i) {
      auto& m = v.merges[i];
      auto sp = m.find(' ', 1);
      if (sp == std::string::npos || sp + 1 >= m.size()) {
        return bad(f, "key tokenizer.ggml.merges[" + std::to_string(i) + "] is \"" + m +
                          "\", expected \"left right\"");
      }
    }
  }

  // llama.cpp's defaults, then the file's values.
  if (v.kind == vocab_kind::spm) {
    v.bos = n > 1 ? 1 : -1;
    v.eos = n > 2 ? 2 : -1;
    v.unk = 0;
    v.add_bos = true;
    v.add_space_prefix = true;
  } else if (v.pre == pre_tokenizer::llama_bpe) {
    v.add_bos = true;
  }
  struct {
    const char* key;
    int32_t* id;
  } ids[] = {{"tokenizer.ggml.bos_token_id", &v.bos},
             {"tokenizer.ggml.eos_token_id", &v.eos},
             {"tokenizer.ggml.unknown_token_id", &v.unk},
             {"tokenizer.ggml.padding_token_id", &v.pad},
             {"tokenizer.ggml.eot_token_id", &v.eot},
             {"tokenizer.ggml.eom_token_id", &v.eom}};
  for (auto& [key, id] : ids)
    if (auto err = read_id(f, key, n, *id)) return err;
  if (auto err = read_flag(f, "tokenizer.ggml.add_bos_token", v.add_bos)) return err;
  if (auto err = read_flag(f, "tokenizer.ggml.add_eos_token", v.add_eos)) return err;
  if (auto err = read_flag(f, "tokenizer.ggml.add_space_prefix", v.add_space_prefix)) return err;
  mark_end_of_generation(v);
  return v;
}

caf::expected<vocab> vocab_from_llama2c(const std::string& path, int32_t vocab_size) {
  if (vocab_size <= 0) {
    return make_error(errc::bad_request,
                      path + ": vocab_size is " + std::to_string(vocab_size) + ", expected > 0");
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return make_error(errc::not_found, path + ": cannot open tokenizer file");
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return make_error(errc::failed, path + ": read error");

  size_t pos = 0;
  auto read = [&](void* dst, size_t len) {
    if (bytes.size() - pos < len) return false;
    std::memcpy(dst, bytes.data() + pos, len);
    pos += len;
    return true;
  };
  auto truncated = [&](const std::string& what) {
    return make_error(errc::bad_model, path + ": truncated at offset " + std::to_string(pos) +
                                           " (file size " + std::to_string(bytes.size()) +
                                           ") reading " + what);
  };
  int32_t max_len = 0;
  if (!read(&max_len, 4)) return truncated("max_token_length");
  if (max_len <= 0) {
    return make_error(errc::bad_model,
                      path + ": max_token_length is " + std::to_string(max_len) + ", expected > 0");
  }

  vocab v;
  v.kind = vocab_kind::spm;
  v.tokens.resize(vocab_size);
  v.scores.resize(vocab_size);
  v.types.assign(vocab_size, token_type::normal);
  for (int32_t i = 0; i < vocab_size; ++i) {
    auto which = "token " + std::to_string(i) + " of " + std::to_string(vocab_size);
    int32_t len = 0;
    if (!read(&v.scores[i], 4)) return truncated("the score of " + which);
    if (!read(&len, 4)) return truncated("the length of " + which);
    if (len < 0 || len > max_len) {
      return make_error(errc::bad_model, path + ": " + which + " has length " +
                                             std::to_string(len) + ", expected 0.." +
                                             std::to_string(max_len));
    }
    std::string text(static_cast<size_t>(len), '\0');
    if (!read(text.data(), text.size())) return truncated("the text of " + which);
    // llama2.c writes BOS/EOS as "\n<s>\n" / "\n</s>\n" and spaces instead of "▁".
    if (i == 1 || i == 2) {
      auto b = text.find_first_not_of('\n'), e = text.find_last_not_of('\n');
      text = b == std::string::npos ? std::string() : text.substr(b, e - b + 1);
    }
    v.tokens[i] = replace_all(text, " ", space_mark);
    if (i == 0)
      v.types[i] = token_type::unknown;
    else if (i == 1 || i == 2)
      v.types[i] = token_type::control;
    else if (parse_byte_token(text) >= 0)
      v.types[i] = token_type::byte;
  }
  v.unk = 0;
  v.bos = vocab_size > 1 ? 1 : -1;
  v.eos = vocab_size > 2 ? 2 : -1;
  v.add_bos = true;
  v.add_space_prefix = true;
  mark_end_of_generation(v);
  return v;
}

vocab builtin_byte_vocab() {
  vocab v;
  v.kind = vocab_kind::bpe;
  for (int b = 0; b < 256; ++b) v.tokens.push_back(gpt2_byte_to_text(static_cast<uint8_t>(b)));
  v.types.assign(256, token_type::normal);
  v.bos = static_cast<int32_t>(v.tokens.size());
  v.tokens.push_back("<s>");
  v.eos = static_cast<int32_t>(v.tokens.size());
  v.tokens.push_back("</s>");
  v.types.push_back(token_type::control);
  v.types.push_back(token_type::control);
  v.add_bos = true;

  // Learn merges: the most frequent adjacent pair (ties: the smallest ids) becomes a token.
  std::map<std::string, int> counts;
  for (auto w : gpt2_pretokenize(builtin_corpus)) ++counts[std::string(w)];
  std::vector<std::pair<std::vector<int32_t>, int>> words;
  for (auto& [w, c] : counts) {
    std::vector<int32_t> ids;
    for (unsigned char b : w) ids.push_back(b);
    words.emplace_back(std::move(ids), c);
  }
  std::map<std::string, int32_t> by_text;
  for (int32_t i = 0; i < static_cast<int32_t>(v.tokens.size()); ++i) by_text[v.tokens[i]] = i;
  for (int m = 0; m < builtin_max_merges; ++m) {
    std::map<std::pair<int32_t, int32_t>, int> pairs;
    for (auto& [ids, c] : words)
      for (size_t i = 0; i + 1 < ids.size(); ++i) pairs[{ids[i], ids[i + 1]}] += c;
    std::pair<int32_t, int32_t> best{-1, -1};
    int best_count = 1;  // a pair seen once is not worth a token
    for (auto& [p, c] : pairs)
      if (c > best_count) best = p, best_count = c;
    if (best.first < 0) break;
    auto text = v.tokens[best.first] + v.tokens[best.second];
    v.merges.push_back(v.tokens[best.first] + " " + v.tokens[best.second]);
    int32_t id;
    if (auto it = by_text.find(text); it != by_text.end()) {
      id = it->second;  // the same text reached through another split
    } else {
      id = static_cast<int32_t>(v.tokens.size());
      v.tokens.push_back(text);
      v.types.push_back(token_type::normal);
      by_text[text] = id;
    }
    for (auto& [ids, c] : words) {
      std::vector<int32_t> next;
      for (size_t i = 0; i < ids.size(); ++i) {
        if (i + 1 < ids.size() && ids[i] == best.first && ids[i + 1] == best.second) {
          next.push_back(id);
          ++i;
        } else {
          next.push_back(ids[i]);
        }
      }
      ids = std::move(next);
    }
  }
  v.scores.assign(v.tokens.size(), 0.0f);
  mark_end_of_generation(v);
  return v;
}

std::span<const std::string_view> end_of_generation_texts() {
  static constexpr std::string_view texts[] = {
      "<|eot_id|>",     "<|eom_id|>",      "<|im_end|>", "<|end|>", "<end_of_turn>",
      "<|endoftext|>", "<|end_of_text|>", "<EOT>",      "_<EOT>",  "<end_of_utterance>"};
  return texts;
}

void mark_end_of_generation(vocab& v) {
  const auto n = static_cast<int32_t>(v.tokens.size());
  v.types.resize(v.tokens.size(), token_type::normal);
  std::vector<int32_t> eog;
  for (int32_t id : {v.eos, v.eot, v.eom})
    if (id >= 0 && id < n) eog.push_back(id);
  for (int32_t id = 0; id < n; ++id) {
    const auto& t = v.tokens[static_cast<size_t>(id)];
    if (t.size() < 5 || t.size() > 20) continue;  // the known texts' lengths: a cheap filter
    for (auto text : end_of_generation_texts()) {
      if (t != text) continue;
      eog.push_back(id);
      v.types[static_cast<size_t>(id)] = token_type::control;
    }
  }
  for (int32_t id : v.eog)
    if (id >= 0 && id < n) eog.push_back(id);
  std::sort(eog.begin(), eog.end());
  eog.erase(std::unique(eog.begin(), eog.end()), eog.end());
  v.eog = std::move(eog);
}

bool is_end_of_generation(const vocab& v, int32_t id) {
  return id >= 0 && std::binary_search(v.eog.begin(), v.eog.end(), id);
}

// ---- tokenizer --------------------------------------------------------------------------------

tokenizer::tokenizer(vocab v) : vocab_(std::move(v)) {
  const auto n = vocab_.tokens.size();
  vocab_.scores.resize(n, 0.0f);
  vocab_.types.resize(n, token_type::normal);
  // A vocabulary built by hand (tests) may not have its end-of-generation set yet.
  if (vocab_.eog.empty() || (vocab_.eos >= 0 && !keel::is_end_of_generation(vocab_, vocab_.eos)))
    mark_end_of_generation(vocab_);
  ids_.reserve(n);
  // As in llama.cpp, a later duplicate text wins.
  for (size_t i = 0; i < n; ++i) ids_[vocab_.tokens[i]] = static_cast<int32_t>(i);
  for (size_t i = 0; i < vocab_.merges.size(); ++i)
    merge_ranks_.emplace(vocab_.merges[i], static_cast<int32_t>(i));

  for (int b = 0; b < 256; ++b) {
    auto byte = static_cast<uint8_t>(b);
    int32_t id = -1;
    if (vocab_.kind == vocab_kind::spm) {
      id = find(byte_token_name(byte));
      if (id < 0) id = find(std::string(1, static_cast<char>(byte)));
    } else {
      id = find(gpt2_byte_to_text(byte));
    }
    byte_ids_[b] = id >= 0 ? id : vocab_.unk;
  }

  for (size_t i = 0; i < n; ++i) {
    const auto& t = vocab_.tokens[i];
    auto type = vocab_.types[i];
    if (!t.empty() && (type == token_type::control || type == token_type::user_defined ||
                       type == token_type::unknown))
      specials_by_byte_[static_cast<uint8_t>(t[0])].push_back(static_cast<int32_t>(i));
  }
  for (auto& ids : specials_by_byte_) {
    std::stable_sort(ids.begin(), ids.end(), [&](int32_t a, int32_t b) {
      return vocab_.tokens[a].size() > vocab_.tokens[b].size();
    });
  }

  pieces_.resize(n);
  for (size_t i = 0; i < n; ++i) {
    const auto& t = vocab_.tokens[i];
    auto& p = pieces_[i];
    switch (vocab_.types[i]) {
      case token_type::normal:
        if (vocab_.kind == vocab_kind::spm) {
          p = replace_all(t, space_mark, " ");
        } else {
          for (size_t pos = 0; pos < t.size();) {
            auto ch = decode_utf8(t, pos);
            int b = ch.valid ? gpt2_cp_to_byte(ch.cp) : -1;
            if (b >= 0)
              p += static_cast<char>(b);
            else
              p.append(t, pos, ch.len);  // not a mapped byte: keep the text
            pos += ch.len;
          }
        }
        break;
      case token_type::byte:
        if (int b = parse_byte_token(t); b >= 0)
          p = std::string(1, static_cast<char>(b));
        else
          p = t;
        break;
      case token_type::user_defined:
        p = t;
        break;
      case token_type::unknown:
        p = vocab_.kind == vocab_kind::spm ? "\xE2\x96\x85" : t;  // llama.cpp shows "▅"
        break;
      default:
        break;  // control, unused, undefined: nothing
    }
  }
}

int32_t tokenizer::find(std::string_view text) const {
  auto it = ids_.find(std::string(text));
  return it == ids_.end() ? -1 : it->second;
}

bool tokenizer::is_control(int32_t id) const {
  return id >= 0 && id < size() && vocab_.types[id] == token_type::control;
}

bool tokenizer::is_end_of_generation(int32_t id) const {
  return keel::is_end_of_generation(vocab_, id);
}

const std::string& tokenizer::token_text(int32_t id) const {
  static const std::string none;
  return id >= 0 && id < size() ? pieces_[id] : none;
}

const std::string& tokenizer::token_text(int32_t id, special_tokens special) const {
  if (special == special_tokens::on && is_control(id)) return vocab_.tokens[id];
  return token_text(id);
}

int32_t tokenizer::special_at(std::string_view text, size_t pos, special_tokens special) const {
  const bool parse = special == special_tokens::on;
  if (!parse && vocab_.kind == vocab_kind::spm) return -1;
  for (auto id : specials_by_byte_[static_cast<uint8_t>(text[pos])]) {
    if (!parse && vocab_.types[id] != token_type::user_defined) continue;
    if (text.substr(pos).starts_with(vocab_.tokens[id])) return id;
  }
  return -1;
}

bool tokenizer::special_text_at(std::string_view text, size_t pos) const {
  if (pos >= text.size()) return false;
  auto rest = text.substr(pos);
  for (auto id : specials_by_byte_[static_cast<uint8_t>(text[pos])]) {
    if (vocab_.kind == vocab_kind::bpe && vocab_.types[id] == token_type::user_defined) continue;
    std::string_view t = vocab_.tokens[id];
    if (rest.starts_with(t) || t.starts_with(rest)) return true;
  }
  return false;
}

std::vector<int32_t> tokenizer::encode(std::string_view text, bool add_bos,
                                       special_tokens special,
                                       std::span<const size_t> literal_at) const {
  std::vector<int32_t> out;
  if (add_bos && vocab_.bos >= 0) out.push_back(vocab_.bos);
  if (text.empty()) return out;
  // The text between the tokens cut out whole is encoded piece by piece; an spm space prefix
  // goes on the piece at the start and on each piece after a cut token (llama.cpp's rule).
  bool after_cut = true;
  auto encode_piece = [&](std::string_view piece) {
    if (piece.empty()) return;
    if (vocab_.kind == vocab_kind::spm)
      encode_spm(piece, vocab_.add_space_prefix && after_cut, out);
    else
      encode_bpe_text(piece, out);
    after_cut = false;
  };
  size_t start = 0;  // of the text not yet encoded
  size_t next_literal = 0;  // the first of `literal_at` not behind `pos`
  for (size_t pos = 0; pos < text.size();) {
    while (next_literal < literal_at.size() && literal_at[next_literal] < pos) ++next_literal;
    bool literal = next_literal < literal_at.size() && literal_at[next_literal] == pos;
    int32_t id = special_at(text, pos, literal ? special_tokens::off : special);
    if (id < 0) {
      ++pos;
      continue;
    }
    encode_piece(text.substr(start, pos - start));
    out.push_back(id);
    after_cut = true;
    pos += vocab_.tokens[id].size();
    start = pos;
  }
  encode_piece(text.substr(start));
  return out;
}

std::string tokenizer::decode(std::span<const int32_t> ids, special_tokens special) const {
  std::string out;
  bool strip = vocab_.add_space_prefix;
  for (auto id : ids) {
    const auto& p = token_text(id, special);
    if (p.empty()) continue;
    out.append(p, strip && p[0] == ' ' ? 1 : 0);
    strip = false;
  }
  return out;
}

namespace {

/// A piece of the text being merged, in a doubly linked list over the pieces.
struct symbol {
  int prev;
  int next;
  size_t start;
  size_t len;
};

/// Splits `s` into UTF-8 characters (lead byte decides the length, clamped to the end).
std::vector<symbol> split_chars(std::string_view s) {
  std::vector<symbol> syms;
  for (size_t pos = 0; pos < s.size();) {
    size_t len = std::min<size_t>(s.size() - pos, utf8_len(static_cast<uint8_t>(s[pos])));
    int idx = static_cast<int>(syms.size());
    syms.push_back({idx - 1, pos + len == s.size() ? -1 : idx + 1, pos, len});
    pos += len;
  }
  return syms;
}

struct bigram {
  double priority;  // higher merges first: the spm score, or minus the bpe rank
  int left;
  int right;
  size_t len;  // combined length when queued; a mismatch later means the bigram is stale
  bool operator<(const bigram& o) const {
    return priority < o.priority || (priority == o.priority && left > o.left);
  }
};

/// The merge loop shared by spm and bpe: `score(l, r)` gives the priority of merging symbols l
/// and r, or nothing when they do not merge.
template <class Score>
void merge_symbols(std::vector<symbol>& syms, Score score) {
  std::priority_queue<bigram> queue;
  auto try_add = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    double p;
    if (score(syms[l], syms[r], p)) queue.push({p, l, r, syms[l].len + syms[r].len});
  };
  for (size_t i = 1; i < syms.size(); ++i) try_add(static_cast<int>(i) - 1, static_cast<int>(i));
  while (!queue.empty()) {
    auto b = queue.top();
    queue.pop();
    auto& l = syms[b.left];
    auto& r = syms[b.right];
    if (l.len == 0 || r.len == 0 || l.len + r.len != b.len) continue;
    l.len += r.len;
    r.len = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = b.left;
    try_add(l.prev, b.left);
    try_add(b.left, l.next);
  }
}

}  // namespace

void tokenizer::encode_spm(std::string_view text, bool space_prefix,
                           std::vector<int32_t>& out) const {
  std::string s = space_prefix ? " " : "";
  s.append(text);
  s = replace_all(s, " ", space_mark);
  auto syms = split_chars(s);
  std::string buf;
  merge_symbols(syms, [&](const symbol& l, const symbol& r, double& p) {
    buf.assign(s, l.start, l.len + r.len);
    auto it = ids_.find(buf);
    if (it == ids_.end()) return false;
    p = vocab_.scores[it->second];
    return true;
  });
  // Every merged symbol is a token; only single characters can be missing from the vocabulary.
  for (auto& sym : syms) {
    if (sym.len == 0) continue;
    buf.assign(s, sym.start, sym.len);
    if (auto it = ids_.find(buf); it != ids_.end()) {
      out.push_back(it->second);
      continue;
    }
    for (unsigned char b : buf)
      if (byte_ids_[b] >= 0) out.push_back(byte_ids_[b]);
  }
}

void tokenizer::encode_bpe_text(std::string_view text, std::vector<int32_t>& out) const {
  for (auto word : pre_tokenize(vocab_.pre, text)) encode_bpe_word(word, out);
}

void tokenizer::encode_bpe_word(std::string_view word, std::vector<int32_t>& out) const {
  std::string s, buf;
  for (unsigned char b : word) s += gpt2_byte_to_text(b);
  // Llama 3's tokenizer.json sets `ignore_merges`: a word that is a token is that token, even
  // where the merges would not reach it.
  if (vocab_.pre == pre_tokenizer::llama_bpe) {
    if (auto it = ids_.find(s);
        it != ids_.end() && vocab_.types[it->second] == token_type::normal) {
      out.push_back(it->second);
      return;
    }
  }
  auto syms = split_chars(s);
  merge_symbols(syms, [&](const symbol& l, const symbol& r, double& p) {
    buf.assign(s, l.start, l.len).append(" ").append(s, r.start, r.len);
    auto it = merge_ranks_.find(buf);
    if (it == merge_ranks_.end()) return false;
    p = -static_cast<double>(it->second);
    return true;
  });
  for (auto& sym : syms) {
    if (sym.len == 0) continue;
    buf.assign(s, sym.start, sym.len);
    if (auto it = ids_.find(buf); it != ids_.end()) {
      out.push_back(it->second);
      continue;
    }
    // Not a token (a vocabulary without this merge result): fall back to single bytes.
    for (size_t pos = 0; pos < buf.size();) {
      auto ch = decode_utf8(buf, pos);
      int b = ch.valid ? gpt2_cp_to_byte(ch.cp) : -1;
      if (b >= 0 && byte_ids_[b] >= 0) out.push_back(byte_ids_[b]);
      pos += ch.len;
    }
  }
}

// ---- detokenizer ------------------------------------------------------------------------------

detokenizer::detokenizer(const tokenizer& tok, bool at_start, special_tokens special)
    : tok_(tok), strip_space_(at_start && tok.vocabulary().add_space_prefix), special_(special) {}

std::string detokenizer::push(int32_t id) {
  const auto& p = tok_.token_text(id, special_);
  if (p.empty()) return {};
  held_.append(p, strip_space_ && p[0] == ' ' ? 1 : 0);
  strip_space_ = false;
  size_t keep = utf8_incomplete_tail(held_);
  auto out = utf8_sanitize(std::string_view(held_).substr(0, held_.size() - keep));
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string detokenizer::flush() {
  // The held bytes are one incomplete character: one U+FFFD, as for a maximal invalid subpart.
  size_t keep = utf8_incomplete_tail(held_);
  auto out = utf8_sanitize(std::string_view(held_).substr(0, held_.size() - keep));
  if (keep > 0) out += "\xEF\xBF\xBD";
  held_.clear();
  return out;
}

}  // namespace keel
