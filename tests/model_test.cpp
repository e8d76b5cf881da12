#define BOOST_TEST_MODULE model_test
#include <boost/test/unit_test.hpp>

#include <cstring>
#include <fstream>
#include <map>
#include <set>

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

/// A copy of GGUF file `f`: keys and tensors in `drop` left out, string keys in `strings` given
/// new values. Knows the metadata types that synthesize() and add_vocab_metadata() write.
gguf_writer copy_of(const gguf_file& f, const std::set<std::string>& drop,
                    const std::map<std::string, std::string>& strings = {}) {
  gguf_writer w;
  for (const auto& kv : f.metadata()) {
    if (drop.count(kv.key)) continue;
    switch (kv.type) {
      case gguf_type::string:
        w.add_string(kv.key, strings.count(kv.key) ? strings.at(kv.key) : kv.s);
        break;
      case gguf_type::u32:
        w.add_uint32(kv.key, static_cast<uint32_t>(kv.u));
        break;
      case gguf_type::u64:
        w.add_uint64(kv.key, kv.u);
        break;
      case gguf_type::f32:
        w.add_float32(kv.key, static_cast<float>(kv.f));
        break;
      case gguf_type::boolean:
        w.add_bool(kv.key, kv.i != 0);
        break;
      case gguf_type::array:
        if (kv.elem == gguf_type::string) {
          w.add_strings(kv.key, kv.strings);
        } else if (kv.elem == gguf_type::f32) {
          w.add_float32s(kv.key, std::vector<float>(kv.floats.begin(), kv.floats.end()));
        } else if (kv.elem == gguf_type::i32) {
          std::vector<int32_t> v(kv.ints.begin(), kv.ints.end());
          w.add_int32s(kv.key, std::move(v));
        } else {
          BOOST_FAIL("copy_of: array key " << kv.key);
        }
        break;
      default:
        BOOST_FAIL("copy_of: key " << kv.key << " of type " << gguf_type_name(kv.type));
    }
  }
  for (const auto& t : f.tensors()) {
    if (drop.count(t.name)) continue;
    w.add_tensor(t.name, t.dims, t.type, std::vector<uint8_t>(t.data, t.data + t.n_bytes));
  }
  return w;
}

/// Synthesizes `o` into dir/name and returns the path.
std::string synth_file(const test::temp_dir& dir, const synth_options& o, const std::string& name) {
  auto w = synthesize(o, builtin_byte_vocab());
  BOOST_REQUIRE_MESSAGE(w, test::why(w));
  auto path = (dir.path / name).string();
  BOOST_REQUIRE(!w->write(path));
  return path;
}

synth_options tiny(const char* arch) {
  synth_options o;
  o.arch = arch;
  o.dim = 64;
  o.layers = 2;
  o.heads = 4;
  o.kv_heads = 2;
  o.ffn = 96;
  o.ctx = 64;
  return o;
}

/// The F32 values of tensor `name` of the file at `path`.
std::vector<float> tensor_values(const std::string& path, const std::string& name) {
  auto f = gguf_file::open(path);
  BOOST_REQUIRE_MESSAGE(f, test::why(f));
  auto* t = f->tensor(name);
  BOOST_REQUIRE_MESSAGE(t != nullptr, "no tensor " << name);
  BOOST_REQUIRE(t->type == dtype::f32);
  std::vector<float> v(t->n_elements);
  std::memcpy(v.data(), t->data, t->n_bytes);
  return v;
}

/// Loading `path` fails with bad_model and a message holding each of `parts`.
void check_refused(const std::string& path, std::initializer_list<std::string> parts) {
  auto m = model::load(path);
  BOOST_REQUIRE_MESSAGE(!m, path << " loaded");
  BOOST_TEST(code_of(m.error()) == errc::bad_model);
  for (const auto& p : parts) {
    BOOST_TEST(message_of(m.error()).find(p) != std::string::npos,
               "'" << message_of(m.error()) << "' lacks '" << p << "'");
  }
}

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

BOOST_AUTO_TEST_CASE(a_qwen2_model_loads_its_keys_biases_and_neox_rope) {
  test::temp_dir dir("model_qwen2");
  auto o = tiny("qwen2");
  o.tied_output = true;
  o.rope_freqs = true;
  auto path = synth_file(dir, o, "qwen2.gguf");
  auto m = model::load(path);
  BOOST_REQUIRE_MESSAGE(m, test::why(m));
  const auto& c = (*m)->config();
  BOOST_TEST(c.arch == "qwen2");
  BOOST_TEST((c.rope == rope_type::neox));
  BOOST_TEST(c.dim == 64);
  BOOST_TEST(c.n_layers == 2);
  BOOST_TEST(c.n_kv_heads == 2);
  BOOST_TEST(c.ffn_dim == 96);
  BOOST_TEST(c.ctx_len == 64);
  BOOST_TEST(c.tied_output);
  BOOST_TEST((*m)->output().data == (*m)->token_embedding().data);
  BOOST_TEST((*m)->rope_freqs() == tensor_values(path, "rope_freqs.weight"));
  for (int l = 0; l < 2; ++l) {
    auto n = [l](const char* s) { return llama_names::layer_tensor(l, s); };
    const auto& L = (*m)->layers()[l];
    BOOST_TEST(L.bq == tensor_values(path, n("attn_q.bias")));
    BOOST_TEST(L.bk == tensor_values(path, n("attn_k.bias")));
    BOOST_TEST(L.bv == tensor_values(path, n("attn_v.bias")));
  }
  // The keys are qwen2's own: the same file with llama.* keys would not load as qwen2.
  auto f = gguf_file::open(path);
  BOOST_REQUIRE(f);
  BOOST_TEST(f->find("qwen2.attention.head_count") != nullptr);
  BOOST_TEST(f->find("llama.attention.head_count") == nullptr);
}

BOOST_AUTO_TEST_CASE(a_llama_model_has_normal_rope_and_no_extras_unless_written) {
  test::temp_dir dir("model_llama_extras");
  auto plain = model::load(synth_file(dir, tiny("llama"), "plain.gguf"));
  BOOST_REQUIRE_MESSAGE(plain, test::why(plain));
  BOOST_TEST((*plain)->config().arch == "llama");
  BOOST_TEST(((*plain)->config().rope == rope_type::normal));
  BOOST_TEST((*plain)->rope_freqs().empty());
  BOOST_TEST((*plain)->layers()[0].bq.empty());
  BOOST_TEST(!(*plain)->config().tied_output);
  auto o = tiny("llama");
  o.qkv_bias = true;
  o.rope_freqs = true;
  auto path = synth_file(dir, o, "extras.gguf");
  auto m = model::load(path);
  BOOST_REQUIRE_MESSAGE(m, test::why(m));
  BOOST_TEST((*m)->rope_freqs().size() == 8u);
  BOOST_TEST((*m)->layers()[1].bv == tensor_values(path, "blk.1.attn_v.bias"));
}

BOOST_AUTO_TEST_CASE(another_architecture_is_refused_naming_it_and_the_supported_ones) {
  test::temp_dir dir("model_arch");
  auto src = gguf_file::open(synth_file(dir, tiny("llama"), "llama.gguf"));
  BOOST_REQUIRE(src);
  for (const char* arch : {"gemma2", "mistral3", "qwen3", "phi3"}) {
    BOOST_TEST_CONTEXT("architecture " << arch) {
      auto path = (dir.path / (std::string(arch) + ".gguf")).string();
      BOOST_REQUIRE(!copy_of(*src, {}, {{"general.architecture", arch}}).write(path));
      check_refused(path, {path, std::string("general.architecture is '") + arch + "'",
                           "'llama' (Llama 2/3.x, Mistral)", "'qwen2' (Qwen 2/2.5)"});
    }
  }
}

BOOST_AUTO_TEST_CASE(a_qwen2_model_without_its_biases_is_refused_naming_the_tensor) {
  test::temp_dir dir("model_qwen2_bias");
  auto src = gguf_file::open(synth_file(dir, tiny("qwen2"), "qwen2.gguf"));
  BOOST_REQUIRE(src);
  auto path = (dir.path / "nobias.gguf").string();
  BOOST_REQUIRE(!copy_of(*src, {"blk.1.attn_k.bias"}).write(path));
  check_refused(path, {path, "missing required tensor blk.1.attn_k.bias"});
  // llama with qwen2's keys renamed is not qwen2: the keys must carry the architecture's name.
  BOOST_REQUIRE(!copy_of(*src, {}, {{"general.architecture", "llama"}}).write(path));
  check_refused(path, {"missing required key llama."});
}

BOOST_AUTO_TEST_CASE(a_tensor_keel_would_ignore_is_refused_naming_it) {
  test::temp_dir dir("model_unused");
  for (const char* extra : {"blk.0.attn_output.bias", "output.bias", "blk.1.ffn_up.bias"}) {
    BOOST_TEST_CONTEXT("tensor " << extra) {
      auto w = synthesize(tiny("qwen2"), builtin_byte_vocab());
      BOOST_REQUIRE(w);
      w->add_tensor(extra, {64}, dtype::f32, std::vector<uint8_t>(64 * 4));
      auto path = (dir.path / "extra.gguf").string();
      BOOST_REQUIRE(!w->write(path));
      check_refused(path, {path, std::string("tensor ") + extra, "qwen2"});
    }
  }
}

BOOST_AUTO_TEST_CASE(rope_scaling_and_experts_are_refused_but_a_sliding_window_is_ignored) {
  test::temp_dir dir("model_keys");
  auto path = (dir.path / "m.gguf").string();
  auto with = [&](auto add) {
    auto w = synthesize(tiny("llama"), builtin_byte_vocab());
    BOOST_REQUIRE(w);
    add(*w);
    BOOST_REQUIRE(!w->write(path));
  };
  with([](gguf_writer& w) { w.add_string("llama.rope.scaling.type", "yarn"); });
  check_refused(path, {path, "llama.rope.scaling.type is 'yarn'", "RoPE scaling"});
  with([](gguf_writer& w) { w.add_float32("llama.rope.scaling.factor", 8.0f); });
  check_refused(path, {"llama.rope.scaling.factor is 8", "RoPE scaling"});
  with([](gguf_writer& w) { w.add_uint32("llama.expert_count", 8); });
  check_refused(path, {"llama.expert_count is 8", "mixture-of-experts"});
  // A rope_freqs table of the wrong length, or with a divisor that is not positive.
  with([](gguf_writer& w) {
    w.add_tensor("rope_freqs.weight", {16}, dtype::f32, std::vector<uint8_t>(16 * 4));
  });
  check_refused(path, {"tensor rope_freqs.weight", "expected [8]"});
  with([](gguf_writer& w) {
    w.add_tensor("rope_freqs.weight", {8}, dtype::f32, std::vector<uint8_t>(8 * 4));
  });
  check_refused(path, {"rope_freqs.weight[0] is 0"});

  // Mistral is llama; a sliding window key (Mistral 7B v0.1) is ignored, as llama.cpp does, and
  // so are scaling keys that say "no scaling".
  auto plain = model::load(synth_file(dir, tiny("llama"), "plain.gguf"));
  BOOST_REQUIRE_MESSAGE(plain, test::why(plain));
  with([](gguf_writer& w) {
    w.add_uint32("llama.attention.sliding_window", 4096);
    w.add_string("llama.rope.scaling.type", "none");
    w.add_float32("llama.rope.scaling.factor", 1.0f);
  });
  auto mistral = model::load(path);
  BOOST_REQUIRE_MESSAGE(mistral, test::why(mistral));
  std::vector<int32_t> toks = {1, 60, 17, 200, 3};
  auto a = logits_of(**plain, toks), b = logits_of(**mistral, toks);
  BOOST_TEST(std::memcmp(a.data(), b.data(), a.size() * 4) == 0);
}

BOOST_AUTO_TEST_CASE(synth_refuses_an_unknown_architecture) {
  auto o = tiny("gpt2");
  auto err = validate(o);
  BOOST_TEST(code_of(err) == errc::bad_request);
  BOOST_TEST(message_of(err).find("--arch gpt2") != std::string::npos);
}
