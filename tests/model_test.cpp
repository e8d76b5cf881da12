#define BOOST_TEST_MODULE model_test
#include <boost/test/unit_test.hpp>

#include <cstring>
#include <fstream>

#include "kernels/engine.hpp"
#include "kernels/generate.hpp"
#include "kernels/model.hpp"
#include "kernels/synth.hpp"
#include "kernels/tokenizer.hpp"
#include "tests/test_support.hpp"

using namespace keel;

namespace {

struct tiny_weights {
  int32_t dim = 64, hidden = 96, layers = 2, heads = 4, kv_heads = 2, n_vocab = 300, seq = 128;
  std::vector<float> embed, att_norm, wq, wk, wv, wo, ffn_norm, w1, w2, w3, final_norm, wcls;

  explicit tiny_weights(uint64_t seed) {
    uint64_t x = seed * 0x9e3779b97f4a7c15ull + 1;
    auto fill = [&x](std::vector<float>& v, size_t n, float scale, float bias = 0) {
      v.resize(n);
      for (auto& f : v) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f = bias + scale * (static_cast<float>(x >> 40) / (1 << 24) * 2.0f - 1.0f);
      }
    };
    int32_t kv = dim / heads * kv_heads;
    fill(embed, n_vocab * dim, 1.0f);
    fill(att_norm, layers * dim, 0.1f, 1.0f);
    fill(wq, layers * dim * dim, 0.2f);
    fill(wk, layers * dim * kv, 0.2f);
    fill(wv, layers * dim * kv, 0.2f);
    fill(wo, layers * dim * dim, 0.1f);
    fill(ffn_norm, layers * dim, 0.1f, 1.0f);
    fill(w1, layers * hidden * dim, 0.2f);
    fill(w2, layers * dim * hidden, 0.1f);
    fill(w3, layers * hidden * dim, 0.2f);
    fill(final_norm, dim, 0.1f, 1.0f);
    fill(wcls, n_vocab * dim, 0.3f);
  }

  /// llama2.c's checkpoint: 7 int32 header, then the arrays in its order.
  void write_llama2c(const std::string& path, bool shared, size_t cut = 0) const {
    std::vector<char> out;
    auto put = [&out](const void* p, size_t n) {
      out.insert(out.end(), static_cast<const char*>(p), static_cast<const char*>(p) + n);
    };
    int32_t hdr[7] = {dim, hidden, layers, heads, kv_heads, shared ? n_vocab : -n_vocab, seq};
    put(hdr, sizeof hdr);
    for (auto* v : {&embed, &att_norm, &wq, &wk, &wv, &wo, &ffn_norm, &w1, &w2, &w3, &final_norm})
      put(v->data(), v->size() * 4);
    std::vector<float> freqs(seq * (dim / heads), 0.5f);  // freq_cis_real + imag: ignored
    put(freqs.data(), freqs.size() * 4);
    if (!shared) put(wcls.data(), wcls.size() * 4);
    out.resize(out.size() - cut);
    std::ofstream(path, std::ios::binary)
        .write(out.data(), static_cast<std::streamsize>(out.size()));
  }

  void write_tokenizer(const std::string& path) const {
    std::ofstream f(path, std::ios::binary);
    int32_t max_len = 16;
    f.write(reinterpret_cast<const char*>(&max_len), 4);
    for (int32_t i = 0; i < n_vocab; ++i) {
      std::string t;
      if (i == 0)
        t = "<unk>";
      else if (i == 1)
        t = "<s>";
      else if (i == 2)
        t = "</s>";
      else if (i < 3 + 256) {
        char b[8];
        std::snprintf(b, sizeof b, "<0x%02X>", i - 3);
        t = b;
      } else if (i == 3 + 256) {
        t = " ";  // the space piece every SentencePiece vocabulary has
      } else {
        t = std::string(i % 2 ? " " : "") + std::string(1, static_cast<char>('a' + i % 26)) +
            std::string(1, static_cast<char>('a' + (i / 26) % 26));
      }
      float score = -static_cast<float>(i);
      int32_t len = static_cast<int32_t>(t.size());
      f.write(reinterpret_cast<const char*>(&score), 4);
      f.write(reinterpret_cast<const char*>(&len), 4);
      f.write(t.data(), len);
    }
  }

  /// The same weights as a GGUF (F32): llama2.c's row-major [out][in] is GGUF's {in, out}.
  void write_gguf(const std::string& path, const vocab& v, bool shared) const {
    gguf_writer w;
    w.add_string("general.architecture", "llama");
    w.add_uint32("llama.context_length", seq);
    w.add_uint32("llama.embedding_length", dim);
    w.add_uint32("llama.block_count", layers);
    w.add_uint32("llama.feed_forward_length", hidden);
    w.add_uint32("llama.attention.head_count", heads);
    w.add_uint32("llama.attention.head_count_kv", kv_heads);
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
    add_vocab_metadata(w, v);
    auto bytes = [](const float* p, size_t n) {
      return std::vector<uint8_t>(reinterpret_cast<const uint8_t*>(p),
                                  reinterpret_cast<const uint8_t*>(p + n));
    };
    uint64_t d = dim, h = hidden, kv = dim / heads * kv_heads, V = n_vocab;
    w.add_tensor("token_embd.weight", {d, V}, dtype::f32, bytes(embed.data(), embed.size()));
    for (int32_t l = 0; l < layers; ++l) {
      auto n = [l](const char* s) { return llama_names::layer_tensor(l, s); };
      w.add_tensor(n("attn_norm.weight"), {d}, dtype::f32, bytes(&att_norm[l * d], d));
      w.add_tensor(n("attn_q.weight"), {d, d}, dtype::f32, bytes(&wq[l * d * d], d * d));
      w.add_tensor(n("attn_k.weight"), {d, kv}, dtype::f32, bytes(&wk[l * d * kv], d * kv));
      w.add_tensor(n("attn_v.weight"), {d, kv}, dtype::f32, bytes(&wv[l * d * kv], d * kv));
      w.add_tensor(n("attn_output.weight"), {d, d}, dtype::f32, bytes(&wo[l * d * d], d * d));
      w.add_tensor(n("ffn_norm.weight"), {d}, dtype::f32, bytes(&ffn_norm[l * d], d));
      w.add_tensor(n("ffn_gate.weight"), {d, h}, dtype::f32, bytes(&w1[l * d * h], d * h));
      w.add_tensor(n("ffn_down.weight"), {h, d}, dtype::f32, bytes(&w2[l * d * h], d * h));
      w.add_tensor(n("ffn_up.weight"), {d, h}, dtype::f32, bytes(&w3[l * d * h], d * h));
    }
    w.add_tensor("output_norm.weight", {d}, dtype::f32, bytes(final_norm.data(), d));
    if (!shared) w.add_tensor("output.weight", {d, V}, dtype::f32, bytes(wcls.data(), wcls.size()));
    BOOST_REQUIRE(!w.write(path));
  }
};

std::vector<float> logits_of(const model& m, const std::vector<int32_t>& toks) {
  thread_pool pool(1);
  engine eng(m, pool);
  kv_pool kv(kv_layout_for(m), 16ull << 20);
  kv_sequence s(kv);
  std::vector<float> out(m.config().vocab_size);
  seq_step st{&s, toks.data(), static_cast<int32_t>(toks.size()), out.data()};
  auto err = eng.forward({&st, 1});
  BOOST_REQUIRE_MESSAGE(!err, describe(err));
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(llama2c_checkpoint_gives_the_same_logits_as_the_same_weights_in_gguf) {
  test::temp_dir dir("model_llama2c");
  tiny_weights w(7);
  for (bool shared : {false, true}) {
    auto bin = (dir.path / (shared ? "shared.bin" : "model.bin")).string();
    w.write_llama2c(bin, shared);
    w.write_tokenizer((dir.path / "tokenizer.bin").string());
    auto a = model::load(bin);
    BOOST_REQUIRE_MESSAGE(a, test::why(a));
    BOOST_TEST((*a)->format() == "llama2.c");
    BOOST_TEST((*a)->config().n_kv_heads == 2);
    BOOST_TEST((*a)->config().tied_output == shared);
    BOOST_TEST((*a)->vocabulary().bos == 1);
    auto gg = (dir.path / "same.gguf").string();
    w.write_gguf(gg, (*a)->vocabulary(), shared);
    auto b = model::load(gg);
    BOOST_REQUIRE_MESSAGE(b, test::why(b));
    std::vector<int32_t> toks = {1, 260, 17, 299, 3, 42, 100};
    auto la = logits_of(**a, toks), lb = logits_of(**b, toks);
    BOOST_TEST(std::memcmp(la.data(), lb.data(), la.size() * 4) == 0);
    // The output head really is what the file says: tied and separate heads differ.
    BOOST_TEST(la[0] != 0.0f);
  }
}

BOOST_AUTO_TEST_CASE(llama2c_tokenizer_encodes_with_bos_and_byte_fallback) {
  test::temp_dir dir("model_llama2c_tok");
  tiny_weights w(3);
  w.write_llama2c((dir.path / "m.bin").string(), true);
  w.write_tokenizer((dir.path / "tokenizer.bin").string());
  auto m = model::load((dir.path / "m.bin").string());
  BOOST_REQUIRE_MESSAGE(m, test::why(m));
  tokenizer tok((*m)->vocabulary());
  auto ids = tok.encode("\x01", true);
  BOOST_REQUIRE(!ids.empty());
  BOOST_TEST(ids.front() == 1);
  BOOST_TEST(tok.decode(ids) == "\x01");
}

BOOST_AUTO_TEST_CASE(truncated_llama2c_checkpoint_and_missing_tokenizer_are_reported) {
  test::temp_dir dir("model_llama2c_bad");
  tiny_weights w(5);
  auto bin = (dir.path / "m.bin").string();
  w.write_llama2c(bin, false, 4);
  auto m = model::load(bin);
  BOOST_REQUIRE(!m);
  BOOST_TEST(code_of(m.error()) == errc::bad_model);
  BOOST_TEST(message_of(m.error()).find("truncated") != std::string::npos);
  BOOST_TEST(message_of(m.error()).find(bin) != std::string::npos);
  w.write_llama2c(bin, false);
  auto no_tok = model::load(bin);
  BOOST_REQUIRE(!no_tok);
  BOOST_TEST(message_of(no_tok.error()).find("tokenizer.bin") != std::string::npos);
  std::ofstream(dir.path / "junk.bin") << "hello";
  auto junk = model::load((dir.path / "junk.bin").string());
  BOOST_REQUIRE(!junk);
  BOOST_TEST(code_of(junk.error()) == errc::bad_model);
  auto missing = model::load((dir.path / "nope.gguf").string());
  BOOST_TEST(code_of(missing.error()) == errc::not_found);
}

BOOST_AUTO_TEST_CASE(synth_is_deterministic_and_seed_dependent) {
  synth_options o;
  o.dim = 64;
  o.layers = 1;
  o.heads = 4;
  o.kv_heads = 1;
  o.ffn = 96;
  o.ctx = 64;
  o.type = dtype::q8_0;
  auto v = builtin_byte_vocab();
  auto a = synthesize(o, v), b = synthesize(o, v);
  BOOST_REQUIRE(a && b);
  BOOST_TEST((a->serialize() == b->serialize()));
  o.seed = 2;
  auto c = synthesize(o, v);
  BOOST_TEST((a->serialize() != c->serialize()));
}

BOOST_AUTO_TEST_CASE(synth_rejects_impossible_shapes_naming_the_option) {
  synth_options o;
  o.dim = 100;
  o.type = dtype::q8_0;
  auto err = validate(o);
  BOOST_TEST(code_of(err) == errc::bad_request);
  BOOST_TEST(message_of(err).find("--dim 100") != std::string::npos);
  o = {};
  o.kv_heads = 3;
  BOOST_TEST(message_of(validate(o)).find("--kv-heads 3") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(synthesized_model_loads_with_its_shape_and_vocabulary) {
  test::temp_dir dir("model_synth");
  synth_options o;
  o.dim = 128;
  o.layers = 3;
  o.heads = 8;
  o.kv_heads = 2;
  o.ffn = 256;
  o.ctx = 512;
  o.type = dtype::bf16;
  auto v = builtin_byte_vocab();
  auto w = synthesize(o, v);
  BOOST_REQUIRE(w);
  auto path = (dir.path / "m.gguf").string();
  BOOST_REQUIRE(!w->write(path));
  auto m = model::load(path);
  BOOST_REQUIRE_MESSAGE(m, test::why(m));
  const auto& c = (*m)->config();
  BOOST_TEST(c.dim == 128);
  BOOST_TEST(c.n_layers == 3);
  BOOST_TEST(c.n_heads == 8);
  BOOST_TEST(c.n_kv_heads == 2);
  BOOST_TEST(c.head_dim == 16);
  BOOST_TEST(c.ffn_dim == 256);
  BOOST_TEST(c.ctx_len == 512);
  BOOST_TEST(c.vocab_size == static_cast<int32_t>(v.tokens.size()));
  BOOST_TEST((*m)->weight_type() == dtype::bf16);
  BOOST_TEST((*m)->vocabulary().tokens == v.tokens);
  BOOST_TEST((*m)->vocabulary().bos == v.bos);
}
