#define BOOST_TEST_MODULE tokenizer_test
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <sstream>

#include "kernels/gguf.hpp"
#include "kernels/tokenizer.hpp"
#include "tests/test_support.hpp"

using namespace keel;
namespace utf = boost::unit_test;

namespace {

// Boost.Test may render an assertion's message even when it passes, so never touch
// `x.error()` of an expected that holds a value.
template <class T>
std::string why(const caf::expected<T>& x) {
  return x ? std::string("ok") : describe(x.error());
}


tokenizer load_gguf_tokenizer(const std::string& name) {
  auto file = gguf_file::open((test::shared_data() / "vocab" / name).string());
  BOOST_REQUIRE_MESSAGE(file, why(file));
  auto v = vocab_from_gguf(*file);
  BOOST_REQUIRE_MESSAGE(v, why(v));
  return tokenizer(std::move(*v));
}

std::string show_ids(const std::vector<int32_t>& ids) {
  std::string s;
  for (auto id : ids) s += " " + std::to_string(id);
  return s;
}

std::string escaped(std::string_view s) {
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n')
      out += "\\n";
    else if (c == '\r')
      out += "\\r";
    else if (c == '\t')
      out += "\\t";
    else
      out += static_cast<char>(c);
  }
  return out;
}

/// Checks every string of NAME.inp against its line in NAME.out; the files hold `count` strings.
void check_vectors(const std::string& name, size_t count) {
  auto tok = load_gguf_tokenizer(name);
  auto dir = test::shared_data() / "vocab";
  auto inp = test::read_file(dir / (name + ".inp"));
  auto outp = test::read_file(dir / (name + ".out"));

  // llama.cpp's convention: each string is followed by "\n__ggml_vocab_test__\n".
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0;;) {
    auto next = inp.find(sep, pos);
    if (next == std::string::npos) break;
    texts.push_back(inp.substr(pos, next - pos));
    pos = next + sep.size();
  }
  std::vector<std::vector<int32_t>> expected;
  std::istringstream lines(outp);
  for (std::string line; std::getline(lines, line);) {
    std::istringstream ids(line);
    expected.emplace_back();
    for (int32_t id; ids >> id;) expected.back().push_back(id);
  }
  BOOST_REQUIRE_EQUAL(texts.size(), expected.size());
  BOOST_REQUIRE_EQUAL(texts.size(), count);

  size_t passed = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    auto got = tok.encode(texts[i], false);
    if (got == expected[i]) {
      ++passed;
      continue;
    }
    BOOST_ERROR(name << " string " << i << " \"" << escaped(texts[i]) << "\"\n  expected:"
                     << show_ids(expected[i]) << "\n  got:     " << show_ids(got));
  }
  BOOST_TEST_MESSAGE(name << ": " << passed << " of " << texts.size() << " vectors match");
  BOOST_CHECK_EQUAL(passed, texts.size());
}

const std::vector<std::string> round_trip_strings = {
    "",
    " ",
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnew\r\nlines\n\n",
    "caf\xC3\xA9 na\xC3\xAFve \xE2\x82\xAC 100",                     // é ï €
    "\xE4\xBD\xA0\xE5\xA5\xBD\xEF\xBC\x8C\xE4\xB8\x96\xE7\x95\x8C",  // 你好，世界
    "emoji \xF0\x9F\x98\x80\xF0\x9F\x91\x8D\xF0\x9F\x8F\xBD and \xE2\x9C\x85 done",
    "\xF0\x9F\x91\xA8\xE2\x80\x8D\xF0\x9F\x91\xA9\xE2\x80\x8D\xF0\x9F\x91\xA7",  // ZWJ family
    "<s> is not parsed as a special token </s>",
    "don't we'll they're I've I'd 'S",
    "x = f(a[1], {b: \"c\"}); // 3.14159e-10",
};

void check_round_trip(const tokenizer& tok, const std::string& what) {
  for (auto& s : round_trip_strings) {
    auto ids = tok.encode(s, true);
    BOOST_CHECK_MESSAGE(tok.decode(ids) == s, what << ": decode(encode(\"" << escaped(s)
                                                   << "\")) is \"" << escaped(tok.decode(ids))
                                                   << "\"");
    // Streaming gives the same text for valid UTF-8.
    detokenizer d(tok);
    std::string streamed;
    for (auto id : ids) streamed += d.push(id);
    streamed += d.flush();
    BOOST_CHECK_MESSAGE(streamed == s, what << ": streamed \"" << escaped(streamed)
                                            << "\", expected \"" << escaped(s) << "\"");
  }
}

void put_i32(std::string& out, int32_t v) {
  out.append(reinterpret_cast<const char*>(&v), 4);
}
void put_f32(std::string& out, float v) {
  out.append(reinterpret_cast<const char*>(&v), 4);
}

/// A llama2.c tokenizer.bin: <unk>, <s>, </s>, 256 byte tokens, then `extra` with scores.
std::string llama2c_image(const std::vector<std::pair<std::string, float>>& extra) {
  std::vector<std::pair<std::string, float>> all = {{"<unk>", 0}, {"\n<s>\n", 0}, {"\n</s>\n", 0}};
  for (int b = 0; b < 256; ++b) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", b);
    all.emplace_back(buf, 0.0f);
  }
  all.insert(all.end(), extra.begin(), extra.end());
  std::string out;
  put_i32(out, 16);
  for (auto& [text, score] : all) {
    put_f32(out, score);
    put_i32(out, static_cast<int32_t>(text.size()));
    out += text;
  }
  return out;
}

void write_bytes(const std::filesystem::path& p, const std::string& bytes) {
  std::ofstream out(p, std::ios::binary);
  out << bytes;
}

/// A minimal spm vocabulary in GGUF form (6 tokens).
gguf_writer small_gguf(const std::string& model) {
  gguf_writer w;
  w.add_string("general.architecture", "llama");
  w.add_string("tokenizer.ggml.model", model);
  w.add_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>", "a", "b", "ab"});
  w.add_float32s("tokenizer.ggml.scores", {0, 0, 0, -1, -2, -0.5f});
  w.add_int32s("tokenizer.ggml.token_type", {2, 3, 3, 1, 1, 1});
  return w;
}

/// A byte-level BPE vocabulary in GGUF form: ids 0..4 "a", "b", "c", "ab", "abc"; 5 "<x>" and
/// 6 "<x" (user-defined); 7 "<|c|>" (control); 8..10 "<", ">", "|". One merge, "a b", so "abc"
/// is a token that no merge reaches.
gguf_writer small_bpe_gguf() {
  gguf_writer w;
  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_strings("tokenizer.ggml.tokens",
                {"a", "b", "c", "ab", "abc", "<x>", "<x", "<|c|>", "<", ">", "|"});
  w.add_int32s("tokenizer.ggml.token_type", {1, 1, 1, 1, 1, 4, 4, 3, 1, 1, 1});
  w.add_strings("tokenizer.ggml.merges", {"a b"});
  return w;
}

std::vector<std::string> words_of(pre_tokenizer p, std::string_view text) {
  auto words = pre_tokenize(p, text);
  return {words.begin(), words.end()};
}

std::string show_words(const std::vector<std::string>& words) {
  std::string s = "[";
  for (auto& w : words) s += (s.size() > 1 ? "|" : "") + escaped(w);
  return s + "]";
}

/// Checks that `p` splits `text` into `expected`.
void check_split(pre_tokenizer p, std::string_view text, const std::vector<std::string>& expected) {
  auto got = words_of(p, text);
  BOOST_CHECK_MESSAGE(got == expected, pre_tokenizer_name(p)
                                           << " splits \"" << escaped(text) << "\" as "
                                           << show_words(got) << ", expected "
                                           << show_words(expected));
}

/// Checks a split that "llama-bpe" and "qwen2" agree on.
void check_split_both(std::string_view text, const std::vector<std::string>& expected) {
  check_split(pre_tokenizer::llama_bpe, text, expected);
  check_split(pre_tokenizer::qwen2, text, expected);
}

caf::expected<vocab> vocab_of(const gguf_writer& w, const std::string& name) {
  auto image = w.serialize();
  auto file = gguf_file::parse(name, image.data(), image.size());
  BOOST_REQUIRE_MESSAGE(file, why(file));
  return vocab_from_gguf(*file);
}

}  // namespace

BOOST_AUTO_TEST_CASE(spm_vocab_matches_llama_cpp_reference_vectors,
                     *utf::precondition(test::needs_shared_data{})) {
  check_vectors("ggml-vocab-llama-spm.gguf", 46);
}

BOOST_AUTO_TEST_CASE(gpt2_vocab_matches_llama_cpp_reference_vectors,
                     *utf::precondition(test::needs_shared_data{})) {
  check_vectors("ggml-vocab-gpt-2.gguf", 46);
}

BOOST_AUTO_TEST_CASE(qwen_vocab_matches_reference_vectors,
                     *utf::precondition(test::needs_shared_data{})) {
  check_vectors("keel-vocab-qwen.gguf", 37);
}

BOOST_AUTO_TEST_CASE(gguf_vocabs_take_llama_cpp_defaults,
                     *utf::precondition(test::needs_shared_data{})) {
  auto spm = load_gguf_tokenizer("ggml-vocab-llama-spm.gguf");
  BOOST_CHECK(spm.vocabulary().kind == vocab_kind::spm);
  BOOST_CHECK_EQUAL(spm.size(), 32000);
  BOOST_CHECK_EQUAL(spm.bos(), 1);
  BOOST_CHECK_EQUAL(spm.eos(), 2);
  BOOST_CHECK_EQUAL(spm.vocabulary().unk, 0);
  BOOST_CHECK(spm.vocabulary().add_bos);
  BOOST_CHECK(spm.vocabulary().add_space_prefix);
  BOOST_CHECK(spm.encode("Hello world", true) == (std::vector<int32_t>{1, 15043, 3186}));
  BOOST_CHECK(spm.encode("", true) == (std::vector<int32_t>{1}));

  auto gpt2 = load_gguf_tokenizer("ggml-vocab-gpt-2.gguf");
  BOOST_CHECK(gpt2.vocabulary().kind == vocab_kind::bpe);
  BOOST_CHECK_EQUAL(gpt2.size(), 50257);
  BOOST_CHECK_EQUAL(gpt2.bos(), 50256);
  BOOST_CHECK_EQUAL(gpt2.eos(), 50256);
  BOOST_CHECK(!gpt2.vocabulary().add_space_prefix);
  BOOST_CHECK(!gpt2.vocabulary().add_bos);
  BOOST_CHECK_EQUAL(gpt2.vocabulary().merges.size(), 50000u);
  BOOST_CHECK_EQUAL(gpt2.token_text(18435), " Hello");
  BOOST_CHECK_EQUAL(gpt2.token_text(50256), "");              // control
  BOOST_CHECK(gpt2.vocabulary().pre == pre_tokenizer::gpt2);  // its key says "gpt-2"

  auto qwen = load_gguf_tokenizer("keel-vocab-qwen.gguf");
  BOOST_CHECK(qwen.vocabulary().kind == vocab_kind::bpe);
  BOOST_CHECK(qwen.vocabulary().pre == pre_tokenizer::qwen2);
  BOOST_CHECK_EQUAL(qwen.size(), 151936);
  BOOST_CHECK(!qwen.vocabulary().add_bos);
  BOOST_CHECK_EQUAL(qwen.eos(), 151645);
}

BOOST_AUTO_TEST_CASE(decode_inverts_encode_on_all_vocabularies) {
  check_round_trip(tokenizer(builtin_byte_vocab()), "builtin");
  if (std::filesystem::exists(test::shared_data() / "vocab")) {
    check_round_trip(load_gguf_tokenizer("ggml-vocab-llama-spm.gguf"), "llama-spm");
    check_round_trip(load_gguf_tokenizer("ggml-vocab-gpt-2.gguf"), "gpt-2");
    check_round_trip(load_gguf_tokenizer("keel-vocab-qwen.gguf"), "qwen");
  }
}

BOOST_AUTO_TEST_CASE(builtin_vocab_round_trips_arbitrary_bytes) {
  tokenizer tok(builtin_byte_vocab());
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  std::vector<std::string> cases = {all, "\xFF\xFE invalid \xC3 utf8 \xE2\x82", "\x80\x80 the",
                                    std::string(3, '\0') + "x"};
  uint32_t seed = 12345;
  for (int i = 0; i < 50; ++i) {
    std::string s;
    for (int j = 0; j < 40; ++j) {
      seed = seed * 1664525u + 1013904223u;
      s += static_cast<char>(seed >> 24);
    }
    cases.push_back(s);
  }
  for (auto& s : cases) BOOST_CHECK(tok.decode(tok.encode(s, false)) == s);
}

BOOST_AUTO_TEST_CASE(builtin_vocab_has_merges_and_control_tokens) {
  auto v = builtin_byte_vocab();
  BOOST_CHECK(v.kind == vocab_kind::bpe);
  BOOST_CHECK_GE(v.merges.size(), 200u);
  BOOST_CHECK_EQUAL(v.tokens.size(), v.scores.size());
  BOOST_CHECK_EQUAL(v.tokens.size(), v.types.size());
  BOOST_CHECK_EQUAL(v.tokens[v.bos], "<s>");
  BOOST_CHECK_EQUAL(v.tokens[v.eos], "</s>");
  BOOST_CHECK(v.add_bos);
  // Deterministic: built twice, the same.
  auto w = builtin_byte_vocab();
  BOOST_CHECK(v.tokens == w.tokens);
  BOOST_CHECK(v.merges == w.merges);

  tokenizer tok(std::move(v));
  auto ids = tok.encode("the information", true);
  BOOST_CHECK_EQUAL(ids.front(), tok.bos());
  BOOST_CHECK_LE(ids.size(), 8u);  // BOS and 15 bytes; merges must shorten it
  BOOST_CHECK_EQUAL(tok.encode(" the", false).size(), 1u);
  BOOST_CHECK(tok.is_control(tok.bos()));
  BOOST_CHECK_EQUAL(tok.token_text(tok.eos()), "");
  detokenizer d(tok);
  BOOST_CHECK_EQUAL(d.push(tok.bos()), "");
  BOOST_CHECK_EQUAL(d.push(tok.eos()), "");
}

BOOST_AUTO_TEST_CASE(detokenizer_holds_back_a_character_split_across_byte_tokens,
                     *utf::precondition(test::needs_shared_data{})) {
  auto tok = load_gguf_tokenizer("ggml-vocab-llama-spm.gguf");
  // "▁" then the four byte tokens of U+1F600 (the llama vocab has no token for it).
  auto ids = tok.encode("\xF0\x9F\x98\x80!", false);
  BOOST_REQUIRE_GE(ids.size(), 6u);
  BOOST_CHECK(tok.vocabulary().types[ids[1]] == token_type::byte);
  detokenizer d(tok);
  BOOST_CHECK_EQUAL(d.push(ids[0]), "");  // the space prefix, dropped
  BOOST_CHECK_EQUAL(d.push(ids[1]), "");
  BOOST_CHECK_EQUAL(d.push(ids[2]), "");
  BOOST_CHECK_EQUAL(d.push(ids[3]), "");
  BOOST_CHECK_EQUAL(d.push(ids[4]), "\xF0\x9F\x98\x80");
  BOOST_CHECK_EQUAL(d.push(ids[5]), "!");
  BOOST_CHECK_EQUAL(d.flush(), "");

  // A stream cut inside a character: flush gives U+FFFD.
  detokenizer cut(tok);
  BOOST_CHECK_EQUAL(cut.push(ids[0]), "");
  BOOST_CHECK_EQUAL(cut.push(ids[1]), "");
  BOOST_CHECK_EQUAL(cut.push(ids[2]), "");
  BOOST_CHECK_EQUAL(cut.flush(), "\xEF\xBF\xBD");
  // A byte that can never start a character is replaced at once.
  auto ff = tok.encode("\xFF", false);
  detokenizer bad(tok);
  std::string got;
  for (auto id : ff) got += bad.push(id);
  BOOST_CHECK_EQUAL(got, "\xEF\xBF\xBD");

  // Continuing after a prompt keeps the leading space.
  detokenizer more(tok, false);
  BOOST_CHECK_EQUAL(more.push(15043), " Hello");
}

BOOST_AUTO_TEST_CASE(detokenizer_unmaps_gpt2_bytes_split_across_tokens,
                     *utf::precondition(test::needs_shared_data{})) {
  auto tok = load_gguf_tokenizer("ggml-vocab-gpt-2.gguf");
  // From the reference vectors: " \xF0\x9F\x98\x81" is 30325 223 (split inside the emoji).
  detokenizer d(tok);
  BOOST_CHECK_EQUAL(d.push(30325), " ");
  BOOST_CHECK_EQUAL(d.push(223), "\xF0\x9F\x98\x81");
  BOOST_CHECK_EQUAL(d.push(18435), " Hello");
}

BOOST_AUTO_TEST_CASE(llama2c_tokenizer_bin_loads_as_spm) {
  test::temp_dir dir("tokenizer_llama2c");
  auto path = (dir.path / "tokenizer.bin").string();
  // Ids 259.. : " ", "a", "b", " a", "ab", " ab" (llama2.c writes spaces, not "▁").
  write_bytes(path,
              llama2c_image(
                  {{" ", -1}, {"a", -2}, {"b", -3}, {" a", -1.5f}, {"ab", -1.2f}, {" ab", -1.1f}}));
  auto v = vocab_from_llama2c(path, 265);
  BOOST_REQUIRE_MESSAGE(v, why(v));
  BOOST_CHECK_EQUAL(v->tokens[1], "<s>");
  BOOST_CHECK_EQUAL(v->tokens[2], "</s>");
  BOOST_CHECK_EQUAL(v->tokens[264],
                    "\xE2\x96\x81"
                    "ab");
  BOOST_CHECK(v->types[0] == token_type::unknown);
  BOOST_CHECK(v->types[1] == token_type::control);
  BOOST_CHECK(v->types[3 + 'a'] == token_type::byte);
  BOOST_CHECK(v->add_bos && v->add_space_prefix);
  tokenizer tok(std::move(*v));
  BOOST_CHECK_EQUAL(tok.bos(), 1);
  BOOST_CHECK_EQUAL(tok.eos(), 2);
  // "ab b" -> "▁ab▁b": "▁ab" merges (best score), "▁b" is no token -> "▁", "b".
  BOOST_CHECK(tok.encode("ab b", true) == (std::vector<int32_t>{1, 264, 259, 261}));
  // "c" is not in the vocabulary: byte fallback.
  BOOST_CHECK(tok.encode("c", false) == (std::vector<int32_t>{259, 3 + 'c'}));
  BOOST_CHECK_EQUAL(tok.decode(tok.encode("ab b c", true)), "ab b c");
}

BOOST_AUTO_TEST_CASE(llama2c_tokenizer_bin_errors_name_the_file_and_value) {
  test::temp_dir dir("tokenizer_llama2c_bad");
  auto path = (dir.path / "tokenizer.bin").string();
  auto image = llama2c_image({{"a", -1}});
  write_bytes(path, image.substr(0, image.size() - 3));
  auto v = vocab_from_llama2c(path, 260);
  BOOST_REQUIRE(!v);
  BOOST_CHECK(code_of(v.error()) == errc::bad_model);
  auto msg = message_of(v.error());
  BOOST_TEST_MESSAGE(msg);
  BOOST_CHECK(msg.find(path) != std::string::npos);
  BOOST_CHECK(msg.find("token 259") != std::string::npos);

  // Asking for more tokens than the file holds is the same error.
  write_bytes(path, image);
  auto more = vocab_from_llama2c(path, 300);
  BOOST_REQUIRE(!more);
  BOOST_CHECK(message_of(more.error()).find("token 260 of 300") != std::string::npos);

  auto missing = vocab_from_llama2c((dir.path / "nope.bin").string(), 32000);
  BOOST_REQUIRE(!missing);
  BOOST_CHECK(code_of(missing.error()) == errc::not_found);
  BOOST_CHECK(message_of(missing.error()).find("nope.bin") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(vocab_from_gguf_reads_a_small_file) {
  auto w = small_gguf("llama");
  w.add_bool("tokenizer.ggml.add_space_prefix", false);
  auto v = vocab_of(w, "small.gguf");
  BOOST_REQUIRE_MESSAGE(v, why(v));
  BOOST_CHECK_EQUAL(v->bos, 1);
  BOOST_CHECK_EQUAL(v->pad, -1);
  BOOST_CHECK(!v->add_space_prefix);
  tokenizer tok(std::move(*v));
  BOOST_CHECK(tok.encode("abba", false) == (std::vector<int32_t>{5, 4, 3}));
}

BOOST_AUTO_TEST_CASE(vocab_from_gguf_rejects_unknown_models_and_bad_sizes) {
  auto v = vocab_of(small_gguf("bert"), "bert.gguf");
  BOOST_REQUIRE(!v);
  BOOST_CHECK(code_of(v.error()) == errc::bad_model);
  auto msg = message_of(v.error());
  BOOST_CHECK(msg.find("bert.gguf") != std::string::npos);
  BOOST_CHECK(msg.find("tokenizer.ggml.model") != std::string::npos);
  BOOST_CHECK(msg.find("\"bert\"") != std::string::npos);

  gguf_writer short_scores;
  short_scores.add_string("tokenizer.ggml.model", "llama");
  short_scores.add_strings("tokenizer.ggml.tokens", {"<unk>", "<s>", "</s>"});
  short_scores.add_float32s("tokenizer.ggml.scores", {0, 0});
  auto s = vocab_of(short_scores, "short.gguf");
  BOOST_REQUIRE(!s);
  BOOST_CHECK(message_of(s.error()).find("tokenizer.ggml.scores has 2 entries, expected 3") !=
              std::string::npos);

  auto ids = small_gguf("llama");
  ids.add_uint32("tokenizer.ggml.eos_token_id", 99);
  auto e = vocab_of(ids, "ids.gguf");
  BOOST_REQUIRE(!e);
  BOOST_CHECK(message_of(e.error()).find("tokenizer.ggml.eos_token_id is 99") != std::string::npos);

  gguf_writer no_merges;
  no_merges.add_string("tokenizer.ggml.model", "gpt2");
  no_merges.add_strings("tokenizer.ggml.tokens", {"a", "b"});
  auto m = vocab_of(no_merges, "nomerges.gguf");
  BOOST_REQUIRE(!m);
  BOOST_CHECK(message_of(m.error()).find("tokenizer.ggml.merges") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(builtin_vocab_survives_a_gguf_round_trip) {
  auto v = builtin_byte_vocab();
  gguf_writer w;
  w.add_string("tokenizer.ggml.model", "gpt2");
  w.add_strings("tokenizer.ggml.tokens", v.tokens);
  w.add_float32s("tokenizer.ggml.scores", v.scores);
  std::vector<int32_t> types;
  for (auto t : v.types) types.push_back(static_cast<int32_t>(t));
  w.add_int32s("tokenizer.ggml.token_type", types);
  w.add_strings("tokenizer.ggml.merges", v.merges);
  w.add_uint32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(v.bos));
  w.add_uint32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(v.eos));
  w.add_bool("tokenizer.ggml.add_bos_token", v.add_bos);
  auto back = vocab_of(w, "builtin.gguf");
  BOOST_REQUIRE_MESSAGE(back, why(back));
  BOOST_CHECK(back->tokens == v.tokens);
  BOOST_CHECK(back->merges == v.merges);
  BOOST_CHECK(back->types == v.types);
  BOOST_CHECK_EQUAL(back->bos, v.bos);
  BOOST_CHECK_EQUAL(back->eos, v.eos);
  BOOST_CHECK(back->add_bos && !back->add_space_prefix);
  const std::string text = "The server streams the generated text back to the client.";
  BOOST_CHECK(tokenizer(std::move(*back)).encode(text, true) ==
              tokenizer(std::move(v)).encode(text, true));
}

// ---- pre-tokenizers ---------------------------------------------------------------------------
// The expected words below are derived by hand from the split regexes (see pre_tokenizer.hpp).

BOOST_AUTO_TEST_CASE(llama_bpe_groups_digits_by_three_and_qwen2_splits_each_digit) {
  using enum pre_tokenizer;
  check_split(llama_bpe, "12345", {"123", "45"});
  check_split(qwen2, "12345", {"1", "2", "3", "4", "5"});
  check_split(gpt2, "12345", {"12345"});
  check_split(llama_bpe, "1234567 + 89", {"123", "456", "7", " +", " ", "89"});
  check_split(qwen2, "1234567 + 89", {"1", "2", "3", "4", "5", "6", "7", " +", " ", "8", "9"});
  check_split(llama_bpe, "3.14", {"3", ".", "14"});
  check_split(qwen2, "3.14", {"3", ".", "1", "4"});
  // \p{N} is any number: Arabic-Indic digits (Nd), a Roman numeral (Nl).
  check_split(llama_bpe, "٣٤٥٦", {"٣٤٥", "٦"});
  check_split(qwen2, "٣٤٥٦", {"٣", "٤", "٥", "٦"});
  check_split(llama_bpe, "Ⅻ10", {"Ⅻ10"});
  check_split(qwen2, "Ⅻ10", {"Ⅻ", "1", "0"});
  // A digit never prefixes a word, and a word never takes digits.
  check_split_both("1st x1", {"1", "st", " x", "1"});
}

BOOST_AUTO_TEST_CASE(llama_bpe_and_qwen2_split_contractions_in_any_case) {
  check_split_both("I'M", {"I", "'M"});
  check_split_both("YOU'RE", {"YOU", "'RE"});
  check_split_both("we'Ve a'lL i'D it'S don'T I'm",
                   {"we", "'Ve", " a", "'lL", " i", "'D", " it", "'S", " don", "'T", " I", "'m"});
  check_split_both("'ll", {"'ll"});
  check_split_both("'re'", {"'re", "'"});
  // Not a contraction: the apostrophe is the optional character before a word.
  check_split_both("'x 'em", {"'x", " '", "em"});
  check_split_both("'", {"'"});
  // (?i) folds by Unicode: U+017F (long s) folds to s.
  check_split_both("'ſa", {"'ſ", "a"});
  // GPT-2's contractions are lower case only.
  check_split(pre_tokenizer::gpt2, "I'M", {"I", "'", "M"});
}

BOOST_AUTO_TEST_CASE(llama_bpe_and_qwen2_let_one_non_letter_lead_a_word) {
  check_split_both("(hello)", {"(hello", ")"});
  check_split_both("..world", {"..", "world"});
  check_split_both("$value", {"$value"});
  check_split_both("a+b=c", {"a", "+b", "=c"});
  check_split_both("snake_case", {"snake", "_case"});
  check_split_both("\tword", {"\tword"});
  check_split_both(" word", {" word"});
  check_split_both("\nword", {"\n", "word"});  // a newline never leads a word
  check_split_both("\rword", {"\r", "word"});
}

BOOST_AUTO_TEST_CASE(llama_bpe_and_qwen2_leave_the_last_space_of_a_run_to_the_next_word) {
  check_split_both("a   b  ", {"a", "  ", " b", "  "});
  check_split_both("   ", {"   "});
  check_split_both(" ", {" "});
  check_split_both("a \tb", {"a", " ", "\tb"});
  check_split_both(" 7", {" ", "7"});  // a space never leads a number
  check_split_both("  !", {" ", " !"});
  check_split_both("", {});
}

BOOST_AUTO_TEST_CASE(llama_bpe_and_qwen2_end_whitespace_runs_after_their_last_newline) {
  check_split_both("a\n\nb", {"a", "\n\n", "b"});
  check_split_both("a\r\nb", {"a", "\r\n", "b"});
  check_split_both("\n\n\n", {"\n\n\n"});
  check_split_both("x \n\n  y", {"x", " \n\n", " ", " y"});
  check_split_both("a\n \n b", {"a", "\n \n", " b"});
  check_split_both("hi\n   ", {"hi", "\n", "   "});
  check_split_both("end\n", {"end", "\n"});
}

BOOST_AUTO_TEST_CASE(llama_bpe_and_qwen2_keep_newlines_after_punctuation) {
  check_split_both("end.\n\nNext", {"end", ".\n\n", "Next"});
  check_split_both("?!\r\n", {"?!\r\n"});
  check_split_both("a ;\n b", {"a", " ;\n", " b"});
  check_split_both("}\n\n  }", {"}\n\n", " ", " }"});
  check_split_both("x:\n\t\ty", {"x", ":\n", "\t", "\ty"});
}

BOOST_AUTO_TEST_CASE(llama_bpe_and_qwen2_split_non_latin_scripts_by_unicode_class) {
  check_split_both("Привет мир", {"Привет", " мир"});
  // In 你好，世界！ the full-width comma leads 世界.
  check_split_both("你好世界", {"你好世界"});
  check_split_both("你好，世界！", {"你好", "，世界", "！"});
  check_split(pre_tokenizer::llama_bpe, "日本語123", {"日本語", "123"});
  check_split(pre_tokenizer::qwen2, "日本語123", {"日本語", "1", "2", "3"});
  // In नमस्ते the virama and the vowel sign are marks (Mn), not letters: the virama leads त and
  // the vowel sign stands alone.
  check_split_both("नमस्ते", {"नमस", "्त", "े"});
}

BOOST_AUTO_TEST_CASE(llama_bpe_and_qwen2_treat_emoji_and_symbols_as_punctuation) {
  check_split_both("hi 😀😀!", {"hi", " 😀😀!"});
  check_split_both("😀hi", {"😀hi"});
  check_split_both("👍🏽", {"👍🏽"});  // So, then the skin tone modifier (Sk)
  check_split_both("👨\u200D👩", {"👨\u200D👩"});  // the zero-width joiner is Cf
  check_split(pre_tokenizer::llama_bpe, "€100", {"€", "100"});
  check_split(pre_tokenizer::qwen2, "€100", {"€", "1", "0", "0"});
  // An invalid byte is a character of no class: it may lead a word.
  check_split_both("\377abc \303", {"\377abc", " \303"});
}

BOOST_AUTO_TEST_CASE(pre_tokenizers_cover_every_byte_exactly_once) {
  std::vector<std::string> cases = {"Hello, y'all! 1234 \xF0\x9F\x98\x81\r\n\n  \t x",
                                    "\xE2\x82\xAC\xE2\x82 \xC3\xA9\xFF\xFE"};
  uint32_t seed = 7;
  const std::vector<std::string> alphabet = {
      "a", "Z", "1",      " ",      "\n",         "\r",     "\t",   "'",      "s",
      "!", ".", "\u00E9", "\u4E16", "\U0001F600", "\u0663", "\377", "\u200D", "\u094D"};
  for (int i = 0; i < 300; ++i) {
    std::string s;
    for (int j = 0; j < 30; ++j) {
      seed = seed * 1664525u + 1013904223u;
      s += alphabet[(seed >> 16) % alphabet.size()];
    }
    cases.push_back(s);
  }
  for (auto p : {pre_tokenizer::gpt2, pre_tokenizer::llama_bpe, pre_tokenizer::qwen2}) {
    for (auto& s : cases) {
      std::string joined;
      bool none_empty = true;
      for (auto w : pre_tokenize(p, s)) {
        joined.append(w);
        none_empty = none_empty && !w.empty();
      }
      BOOST_CHECK_MESSAGE(joined == s && none_empty,
                          pre_tokenizer_name(p) << " loses or repeats bytes of \"" << escaped(s)
                                                << "\": " << show_words(words_of(p, s)));
    }
  }
}

BOOST_AUTO_TEST_CASE(pre_tokenizer_names_are_the_gguf_values) {
  for (auto p : {pre_tokenizer::gpt2, pre_tokenizer::llama_bpe, pre_tokenizer::qwen2}) {
    auto back = pre_tokenizer_from_name(pre_tokenizer_name(p));
    BOOST_CHECK(back && *back == p);
  }
  BOOST_CHECK_EQUAL(pre_tokenizer_name(pre_tokenizer::llama_bpe), "llama-bpe");
  BOOST_CHECK(!pre_tokenizer_from_name("default"));
  BOOST_CHECK(!pre_tokenizer_from_name("Qwen2"));
}

BOOST_AUTO_TEST_CASE(vocab_from_gguf_reads_the_pre_tokenizer) {
  auto none = vocab_of(small_bpe_gguf(), "none.gguf");
  BOOST_REQUIRE_MESSAGE(none, why(none));
  BOOST_CHECK(none->pre == pre_tokenizer::gpt2);
  BOOST_CHECK(!none->add_bos);
  for (auto p : {pre_tokenizer::gpt2, pre_tokenizer::llama_bpe, pre_tokenizer::qwen2}) {
    auto w = small_bpe_gguf();
    w.add_string("tokenizer.ggml.pre", std::string(pre_tokenizer_name(p)));
    auto v = vocab_of(w, "pre.gguf");
    BOOST_REQUIRE_MESSAGE(v, why(v));
    BOOST_CHECK(v->pre == p);
    // llama.cpp's default for Llama 3 is to add BOS; the file's key still decides.
    BOOST_CHECK_EQUAL(v->add_bos, p == pre_tokenizer::llama_bpe);
  }
  auto w = small_bpe_gguf();
  w.add_string("tokenizer.ggml.pre", "llama-bpe");
  w.add_bool("tokenizer.ggml.add_bos_token", false);
  auto v = vocab_of(w, "nobos.gguf");
  BOOST_REQUIRE_MESSAGE(v, why(v));
  BOOST_CHECK(!v->add_bos);

  auto spm = small_gguf("llama");
  spm.add_string("tokenizer.ggml.pre", "default");
  auto s = vocab_of(spm, "spm.gguf");
  BOOST_REQUIRE_MESSAGE(s, why(s));
}

BOOST_AUTO_TEST_CASE(vocab_from_gguf_refuses_an_unknown_pre_tokenizer) {
  auto w = small_bpe_gguf();
  w.add_string("tokenizer.ggml.pre", "deepseek-llm");
  auto v = vocab_of(w, "deepseek.gguf");
  BOOST_REQUIRE(!v);
  BOOST_CHECK(code_of(v.error()) == errc::bad_model);
  auto msg = message_of(v.error());
  BOOST_TEST_MESSAGE(msg);
  for (auto part : {"deepseek.gguf", "tokenizer.ggml.pre", "\"deepseek-llm\"", "\"gpt-2\"",
                    "\"llama-bpe\"", "\"qwen2\""})
    BOOST_CHECK_MESSAGE(msg.find(part) != std::string::npos, msg << " does not name " << part);

  // SentencePiece does not pre-tokenize: a BPE pre-tokenizer on it is a converter's mistake.
  auto spm = small_gguf("llama");
  spm.add_string("tokenizer.ggml.pre", "qwen2");
  auto s = vocab_of(spm, "spm.gguf");
  BOOST_REQUIRE(!s);
  BOOST_CHECK(code_of(s.error()) == errc::bad_model);
  BOOST_CHECK(message_of(s.error()).find("\"qwen2\"") != std::string::npos);
  BOOST_CHECK(message_of(s.error()).find("spm.gguf") != std::string::npos);

  auto typed = small_bpe_gguf();
  typed.add_uint32("tokenizer.ggml.pre", 2);
  auto t = vocab_of(typed, "typed.gguf");
  BOOST_REQUIRE(!t);
  BOOST_CHECK(code_of(t.error()) == errc::bad_model);
  BOOST_CHECK(message_of(t.error()).find("tokenizer.ggml.pre") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(llama_bpe_takes_a_word_that_is_a_token_whole) {
  for (auto p : {pre_tokenizer::gpt2, pre_tokenizer::llama_bpe, pre_tokenizer::qwen2}) {
    auto w = small_bpe_gguf();
    w.add_string("tokenizer.ggml.pre", std::string(pre_tokenizer_name(p)));
    auto v = vocab_of(w, "small.gguf");
    BOOST_REQUIRE_MESSAGE(v, why(v));
    tokenizer tok(std::move(*v));
    // Merges give "ab" "c"; Llama 3's ignore_merges takes the token "abc".
    auto want =
        p == pre_tokenizer::llama_bpe ? std::vector<int32_t>{4} : std::vector<int32_t>{3, 2};
    BOOST_CHECK_MESSAGE(tok.encode("abc", false) == want,
                        pre_tokenizer_name(p) << ": abc is" << show_ids(tok.encode("abc", false)));
    // A word that is no token is merged as usual.
    BOOST_CHECK(tok.encode("abcab", false) == (std::vector<int32_t>{3, 2, 3}));
  }
}

BOOST_AUTO_TEST_CASE(bpe_matches_user_defined_tokens_whole_but_not_control_tokens) {
  auto v = vocab_of(small_bpe_gguf(), "small.gguf");
  BOOST_REQUIRE_MESSAGE(v, why(v));
  tokenizer tok(std::move(*v));
  BOOST_CHECK(tok.encode("a<x>b", false) == (std::vector<int32_t>{0, 5, 1}));
  BOOST_CHECK(tok.encode("<x><x>", false) == (std::vector<int32_t>{5, 5}));
  BOOST_CHECK(tok.encode("<<x>>", false) == (std::vector<int32_t>{8, 5, 9}));
  BOOST_CHECK(tok.encode("<xa", false) == (std::vector<int32_t>{6, 0}));  // the longest that fits
  // Control text is text: "<|", "c", "|>".
  BOOST_CHECK(tok.encode("<|c|>", false) == (std::vector<int32_t>{8, 10, 2, 10, 9}));
  BOOST_CHECK_EQUAL(tok.decode(tok.encode("a<x>b<x", false)), "a<x>b<x");
}

// ---- special tokens ---------------------------------------------------------------------------

BOOST_AUTO_TEST_CASE(control_token_text_is_that_token_only_when_special_parsing_is_on) {
  auto v = vocab_of(small_bpe_gguf(), "small.gguf");
  BOOST_REQUIRE_MESSAGE(v, why(v));
  tokenizer tok(std::move(*v));
  // Off (the default): "<|c|>" is text, user-defined "<x>" is cut whole as always.
  BOOST_CHECK(tok.encode("a<|c|>b", false) == (std::vector<int32_t>{0, 8, 10, 2, 10, 9, 1}));
  // On: the control token 7 too.
  BOOST_CHECK(tok.encode("a<|c|>b", false, special_tokens::on) ==
              (std::vector<int32_t>{0, 7, 1}));
  BOOST_CHECK(tok.encode("<x><|c|><|c|>", false, special_tokens::on) ==
              (std::vector<int32_t>{5, 7, 7}));
  // Where the caller says the text is literal (a chat message), it stays text.
  std::vector<size_t> literal{1};
  BOOST_CHECK(tok.encode("a<|c|>b<|c|>", false, special_tokens::on, literal) ==
              (std::vector<int32_t>{0, 8, 10, 2, 10, 9, 1, 7}));
  // Decoding shows control tokens only when asked.
  std::vector<int32_t> ids{0, 7, 1};
  BOOST_CHECK_EQUAL(tok.decode(ids), "ab");
  BOOST_CHECK_EQUAL(tok.decode(ids, special_tokens::on), "a<|c|>b");
  // Where a control token's text begins, or might begin once more text follows.
  BOOST_CHECK(tok.special_text_at("a<|c|>", 1));
  BOOST_CHECK(tok.special_text_at("a<|", 1));
  BOOST_CHECK(!tok.special_text_at("a<|d", 1));
  BOOST_CHECK(!tok.special_text_at("<x>", 0));  // user-defined: cut out in either mode
  BOOST_CHECK(!tok.special_text_at("abc", 0));
}

BOOST_AUTO_TEST_CASE(qwen_vocab_parses_chatml_tokens_only_with_special_on,
                     *utf::precondition(test::needs_shared_data{})) {
  auto tok = load_gguf_tokenizer("keel-vocab-qwen.gguf");
  const int32_t im_start = 151644, im_end = 151645, think = 151667;
  const std::string text = "<|im_start|>user\nHi<|im_end|>\n";
  auto plain = tok.encode(text, false);
  BOOST_CHECK(std::count(plain.begin(), plain.end(), im_start) == 0);
  BOOST_CHECK(std::count(plain.begin(), plain.end(), im_end) == 0);
  BOOST_CHECK_EQUAL(tok.decode(plain), text);  // every byte of it, as text
  auto parsed = tok.encode(text, false, special_tokens::on);
  std::vector<int32_t> want{im_start};
  for (auto id : tok.encode("user\nHi", false)) want.push_back(id);
  want.push_back(im_end);
  for (auto id : tok.encode("\n", false)) want.push_back(id);
  BOOST_CHECK_MESSAGE(parsed == want, "got" << show_ids(parsed) << ", want" << show_ids(want));
  BOOST_CHECK_EQUAL(tok.decode(parsed, special_tokens::on), text);
  BOOST_CHECK_EQUAL(tok.decode(parsed), "user\nHi\n");
  // User-defined tokens (<think>) are cut out in both modes, and always print.
  BOOST_CHECK(tok.encode("<think>", false) == (std::vector<int32_t>{think}));
  BOOST_CHECK(tok.encode("<think>", false, special_tokens::on) == (std::vector<int32_t>{think}));
  BOOST_CHECK_EQUAL(tok.decode(std::vector<int32_t>{think}), "<think>");
}

BOOST_AUTO_TEST_CASE(qwen_vocab_ends_generation_at_im_end_and_endoftext,
                     *utf::precondition(test::needs_shared_data{})) {
  auto tok = load_gguf_tokenizer("keel-vocab-qwen.gguf");
  BOOST_CHECK(tok.vocabulary().eog == (std::vector<int32_t>{151643, 151645}));
  BOOST_CHECK(tok.is_end_of_generation(151645));   // <|im_end|>, also its eos
  BOOST_CHECK(tok.is_end_of_generation(151643));   // <|endoftext|>
  BOOST_CHECK(!tok.is_end_of_generation(151644));  // <|im_start|>
  BOOST_CHECK(!tok.is_end_of_generation(151667));  // <think>
  BOOST_CHECK(!tok.is_end_of_generation(0));
}

BOOST_AUTO_TEST_CASE(eot_and_eom_keys_and_known_end_texts_end_generation) {
  // small_bpe_gguf's 11 tokens, then: 11 </s>, 12 <|eot_id|> written as a normal token (as some
  // converters do), 13 <|stop|>, 14 <|msg|>, 15 <|other|>.
  gguf_writer g;
  g.add_string("tokenizer.ggml.model", "gpt2");
  g.add_strings("tokenizer.ggml.tokens", {"a", "b", "c", "ab", "abc", "<x>", "<x", "<|c|>", "<",
                                          ">", "|", "</s>", "<|eot_id|>", "<|stop|>", "<|msg|>",
                                          "<|other|>"});
  g.add_int32s("tokenizer.ggml.token_type", {1, 1, 1, 1, 1, 4, 4, 3, 1, 1, 1, 3, 1, 3, 3, 3});
  g.add_strings("tokenizer.ggml.merges", {"a b"});
  g.add_uint32("tokenizer.ggml.eos_token_id", 11);
  g.add_uint32("tokenizer.ggml.eot_token_id", 13);
  g.add_uint32("tokenizer.ggml.eom_token_id", 14);
  auto v = vocab_of(g, "eog.gguf");
  BOOST_REQUIRE_MESSAGE(v, why(v));
  BOOST_CHECK_EQUAL(v->eot, 13);
  BOOST_CHECK_EQUAL(v->eom, 14);
  BOOST_CHECK(v->eog == (std::vector<int32_t>{11, 12, 13, 14}));
  // The known end text became a control token: not printed, and text unless parsing is on.
  BOOST_CHECK(v->types[12] == token_type::control);
  tokenizer tok(std::move(*v));
  BOOST_CHECK(!tok.is_end_of_generation(15));
  BOOST_CHECK(!tok.is_end_of_generation(7));
  BOOST_CHECK_EQUAL(tok.decode(std::vector<int32_t>{0, 12, 1}), "ab");
  BOOST_CHECK(tok.encode("<|eot_id|>", false, special_tokens::on) == (std::vector<int32_t>{12}));

  // Without those keys: the eos alone (llama.cpp's default spm ids).
  auto spm = vocab_of(small_gguf("llama"), "spm.gguf");
  BOOST_REQUIRE_MESSAGE(spm, why(spm));
  BOOST_CHECK(spm->eog == (std::vector<int32_t>{2}));
  // A vocabulary built by hand gets its set from its tokenizer.
  auto built = builtin_byte_vocab();
  built.eog.clear();
  BOOST_CHECK(tokenizer(built).vocabulary().eog == (std::vector<int32_t>{built.eos}));
}

BOOST_AUTO_TEST_CASE(spm_adds_its_space_prefix_at_the_start_and_after_each_special_token,
                     *utf::precondition(test::needs_shared_data{})) {
  auto tok = load_gguf_tokenizer("ggml-vocab-llama-spm.gguf");
  auto cat = [](std::initializer_list<std::vector<int32_t>> parts) {
    std::vector<int32_t> out;
    for (auto& p : parts) out.insert(out.end(), p.begin(), p.end());
    return out;
  };
  // As llama.cpp: "Hi" after <s> is "▁Hi", like "Hi" at the start of a text.
  auto got = tok.encode("<s>Hi</s>", false, special_tokens::on);
  auto want = cat({{1}, tok.encode("Hi", false), {2}});
  BOOST_CHECK_MESSAGE(got == want, "got" << show_ids(got) << ", want" << show_ids(want));
  got = tok.encode("Hi<s>there", false, special_tokens::on);
  want = cat({tok.encode("Hi", false), {1}, tok.encode("there", false)});
  BOOST_CHECK_MESSAGE(got == want, "got" << show_ids(got) << ", want" << show_ids(want));
  // Off, "<s>" is text.
  got = tok.encode("<s>Hi", false);
  BOOST_CHECK(std::find(got.begin(), got.end(), 1) == got.end());
}

BOOST_AUTO_TEST_CASE(detokenizer_prints_control_tokens_only_when_asked) {
  auto v = vocab_of(small_bpe_gguf(), "small.gguf");
  BOOST_REQUIRE_MESSAGE(v, why(v));
  tokenizer tok(std::move(*v));
  detokenizer quiet(tok, false);
  detokenizer shown(tok, false, special_tokens::on);
  std::string a, b;
  for (int32_t id : {0, 7, 5, 1}) {
    a += quiet.push(id);
    b += shown.push(id);
  }
  BOOST_CHECK_EQUAL(a + quiet.flush(), "a<x>b");
  BOOST_CHECK_EQUAL(b + shown.flush(), "a<|c|><x>b");
}
