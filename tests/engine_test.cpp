#define BOOST_TEST_MODULE engine_test
#include <boost/test/unit_test.hpp>

#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <thread>

#include "kernels/collective.hpp"
#include "kernels/engine.hpp"
#include "kernels/generate.hpp"
#include "kernels/model.hpp"
#include "kernels/synth.hpp"
#include "kernels/tokenizer.hpp"
#include "tests/test_support.hpp"

using namespace keel;

namespace {

/// Synthesizes a model into `dir` and loads it.
std::unique_ptr<model> make_model(const test::temp_dir& dir, synth_options o,
                                  const std::string& name) {
  auto w = synthesize(o, builtin_byte_vocab());
  BOOST_REQUIRE_MESSAGE(w, test::why(w));
  auto path = (dir.path / name).string();
  BOOST_REQUIRE(!w->write(path));
  auto m = model::load(path);
  BOOST_REQUIRE_MESSAGE(m, test::why(m));
  return std::move(*m);
}

synth_options small(dtype type, int32_t heads = 4, int32_t kv_heads = 2) {
  synth_options o;
  o.dim = 64;
  o.layers = 2;
  o.heads = heads;
  o.kv_heads = kv_heads;
  o.ffn = 128;
  o.ctx = 256;
  o.seed = 42;
  o.type = type;
  return o;
}

synth_options family(const char* arch, dtype type) {
  auto o = small(type);
  o.arch = arch;
  return o;
}

std::vector<double> dequant(const matrix_view& w, int64_t r) {
  std::vector<float> f(w.cols);
  dequantize_row(w, r, f.data());
  return {f.begin(), f.end()};
}

/// The input a block-quantised matrix multiplies: per block of the weight type (32, or 256 for
/// the K-quants), amax / 127 times the nearest integers to x / (amax / 127), as ops.cpp
/// documents (computed in float, as the engine holds its activations).
std::vector<double> rounded_input(const std::vector<double>& x, size_t unit) {
  std::vector<double> out(x.size());
  for (size_t k = 0; k + unit <= x.size(); k += unit) {
    float amax = 0;
    for (size_t i = k; i < k + unit; ++i)
      amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
    const float d = amax / 127.0f;
    const float id = amax != 0 ? 1.0f / d : 0.0f;
    for (size_t i = k; i < k + unit; ++i)
      out[i] = static_cast<double>(d) * std::nearbyint(static_cast<float>(x[i]) * id);
  }
  return out;
}

/// y = W x in double, from the dequantised weights (and the rounded input for block types).
std::vector<double> ref_matvec(const matrix_view& w, const std::vector<double>& x_in) {
  const std::vector<double> x =
      is_block_quantized(w.type) ? rounded_input(x_in, layout_of(w.type)->block_elems) : x_in;
  std::vector<double> y(w.rows);
  for (int64_t r = 0; r < w.rows; ++r) {
    auto row = dequant(w, r);
    double s = 0;
    for (int64_t c = 0; c < w.cols; ++c) s += row[c] * x[c];
    y[r] = s;
  }
  return y;
}

std::vector<double> ref_rmsnorm(const std::vector<double>& x, const std::vector<float>& w,
                                double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  double k = 1.0 / std::sqrt(ss / x.size() + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * k * w[i];
  return y;
}

/// What a model family adds to the plain llama forward pass, for the reference. Taken from the
/// GGUF file itself and from the family's definition in llama.cpp (not from the loader), so a
/// loader that drops, misplaces or misreads them makes the engine disagree with the reference.
struct ref_family {
  bool neox = false;          // rotate pairs (i, i + hd/2) (llama.cpp's LLAMA_ROPE_TYPE_NEOX)
  std::vector<double> freqs;  // rope_freqs.weight: pair i's angle is divided by freqs[i]
  std::vector<std::array<std::vector<double>, 3>> bias;  // per layer: Q, K, V biases, or none
  bool tied = false;  // no output.weight: the head is token_embd.weight
};

/// `m`'s extras as its file holds them; `neox` is the family's rotation (qwen2: true).
ref_family family_of(const model& m, bool neox) {
  auto f = gguf_file::open(m.path());
  BOOST_REQUIRE_MESSAGE(f, test::why(f));
  auto floats = [&](const std::string& name) {
    std::vector<double> out;
    if (auto* t = f->tensor(name)) {
      BOOST_REQUIRE(t->type == dtype::f32);
      std::vector<float> v(t->n_elements);
      std::memcpy(v.data(), t->data, t->n_bytes);
      out.assign(v.begin(), v.end());
    }
    return out;
  };
  ref_family r;
  r.neox = neox;
  r.freqs = floats("rope_freqs.weight");
  r.tied = f->tensor("output.weight") == nullptr;
  for (int l = 0; l < m.config().n_layers; ++l) {
    auto n = [l](const char* s) { return "blk." + std::to_string(l) + "." + s; };
    r.bias.push_back(
        {floats(n("attn_q.bias")), floats(n("attn_k.bias")), floats(n("attn_v.bias"))});
  }
  return r;
}

void ref_rope(std::vector<double>& x, int heads, int hd, int64_t pos, double theta,
              const ref_family& fam) {
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < hd / 2; ++i) {
      double angle = pos * std::pow(theta, -2.0 * i / hd);
      if (!fam.freqs.empty()) angle /= fam.freqs[i];
      const int a = h * hd + (fam.neox ? i : 2 * i), b = a + (fam.neox ? hd / 2 : 1);
      const double x0 = x[a], x1 = x[b];
      x[a] = x0 * std::cos(angle) - x1 * std::sin(angle);
      x[b] = x0 * std::sin(angle) + x1 * std::cos(angle);
    }
  }
}

void add(std::vector<double>& y, const std::vector<double>& bias) {
  for (size_t i = 0; i < bias.size(); ++i) y[i] += bias[i];
}

/// A plain, independent Llama-family forward pass in double precision: logits after the last
/// token.
std::vector<double> reference_logits(const model& m, const std::vector<int32_t>& tokens,
                                     const ref_family& fam = {}) {
  const auto& c = m.config();
  const int hd = c.head_dim, group = c.n_heads / c.n_kv_heads;
  std::vector<std::vector<std::vector<double>>> K(c.n_layers), V(c.n_layers);
  std::vector<double> x;
  for (size_t t = 0; t < tokens.size(); ++t) {
    x = dequant(m.token_embedding(), tokens[t]);
    for (int l = 0; l < c.n_layers; ++l) {
      const auto& L = m.layers()[l];
      auto xb = ref_rmsnorm(x, L.attn_norm, c.rms_eps);
      auto q = ref_matvec(L.wq, xb), k = ref_matvec(L.wk, xb), v = ref_matvec(L.wv, xb);
      if (!fam.bias.empty()) {
        add(q, fam.bias[l][0]);
        add(k, fam.bias[l][1]);
        add(v, fam.bias[l][2]);
      }
      ref_rope(q, c.n_heads, hd, static_cast<int64_t>(t), c.rope_theta, fam);
      ref_rope(k, c.n_kv_heads, hd, static_cast<int64_t>(t), c.rope_theta, fam);
      K[l].push_back(k);
      V[l].push_back(v);
      std::vector<double> att(c.q_dim(), 0.0);
      for (int h = 0; h < c.n_heads; ++h) {
        int kvh = h / group;
        std::vector<double> s(t + 1);
        double mx = -1e300;
        for (size_t p = 0; p <= t; ++p) {
          double d = 0;
          for (int i = 0; i < hd; ++i) d += q[h * hd + i] * K[l][p][kvh * hd + i];
          s[p] = d / std::sqrt(static_cast<double>(hd));
          mx = std::max(mx, s[p]);
        }
        double sum = 0;
        for (auto& e : s) sum += (e = std::exp(e - mx));
        for (size_t p = 0; p <= t; ++p)
          for (int i = 0; i < hd; ++i) att[h * hd + i] += s[p] / sum * V[l][p][kvh * hd + i];
      }
      auto o = ref_matvec(L.wo, att);
      for (int i = 0; i < c.dim; ++i) x[i] += o[i];
      xb = ref_rmsnorm(x, L.ffn_norm, c.rms_eps);
      auto g = ref_matvec(L.w_gate, xb), u = ref_matvec(L.w_up, xb);
      for (size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      auto d = ref_matvec(L.w_down, g);
      for (int i = 0; i < c.dim; ++i) x[i] += d[i];
    }
  }
  const auto& head = fam.tied ? m.token_embedding() : m.output();
  return ref_matvec(head, ref_rmsnorm(x, m.output_norm(), c.rms_eps));
}

std::vector<float> engine_logits(const model& m, const std::vector<int32_t>& tokens,
                                 int threads = 1, int32_t chunk = 64) {
  thread_pool pool(threads);
  engine eng(m, pool);
  kv_pool kv(kv_layout_for(m), 64ull << 20);
  kv_sequence seq(kv);
  std::vector<float> logits(m.config().vocab_size);
  for (size_t done = 0; done < tokens.size(); done += chunk) {
    auto n = std::min<size_t>(chunk, tokens.size() - done);
    seq_step st{&seq, tokens.data() + done, static_cast<int32_t>(n),
                done + n == tokens.size() ? logits.data() : nullptr};
    auto err = eng.forward({&st, 1});
    BOOST_REQUIRE_MESSAGE(!err, describe(err));
  }
  return logits;
}

/// Logits from shard 0 of an n-shard group (one thread per shard) after prefilling `tokens`.
std::vector<float> group_logits(const model& m, const std::vector<int32_t>& tokens, int32_t n) {
  collective coll(n);
  std::vector<float> logits(m.config().vocab_size);
  std::vector<caf::error> errs(n);
  std::vector<std::thread> threads;
  for (int32_t k = 0; k < n; ++k) {
    threads.emplace_back([&, k] {
      thread_pool pool(1);
      const shard_layout shard{k, n};
      engine eng(m, pool, shard, &coll);
      kv_pool kv(kv_layout_for(m, shard), 16ull << 20);
      kv_sequence seq(kv);
      seq_step st{&seq, tokens.data(), static_cast<int32_t>(tokens.size()),
                  k == 0 ? logits.data() : nullptr};
      errs[k] = eng.forward({&st, 1});
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errs) BOOST_REQUIRE_MESSAGE(!e, describe(e));
  return logits;
}

/// ggml's CPU rope of one head (ggml_rope_cache_init; rope_yarn with ext_factor 0, freq_scale
/// and mscale 1; rotate_pairs with n_offset 1 or n_dims/2), transcribed operation by operation.
void ggml_rope_head(float* x, int n_dims, int64_t pos, float base, const float* ff, bool neox) {
  const float theta_scale = powf(base, -2.0f / n_dims);
  std::vector<float> cache(n_dims);
  float theta = static_cast<float>(pos);
  for (int i0 = 0; i0 < n_dims; i0 += 2) {
    const float f = ff != nullptr ? ff[i0 / 2] : 1.0f;
    const float theta_interp = 1.0f * (theta / f);
    cache[i0 + 0] = cosf(theta_interp) * 1.0f;
    cache[i0 + 1] = sinf(theta_interp) * 1.0f;
    theta *= theta_scale;
  }
  const int n_offset = neox ? n_dims / 2 : 1;
  for (int i0 = 0; i0 < n_dims; i0 += 2) {
    const int ic = neox ? i0 / 2 : i0;
    const float c = cache[i0 + 0], s = cache[i0 + 1];
    const float x0 = x[ic], x1 = x[ic + n_offset];
    x[ic] = x0 * c - x1 * s;
    x[ic + n_offset] = x0 * s + x1 * c;
  }
}

std::vector<int32_t> reference_tokens(const model& m) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < 23; ++i) tokens.push_back((i * 37 + 5) % m.config().vocab_size);
  return tokens;
}

/// The largest difference between two logit vectors, relative to the largest of `ref`.
template <class A>
double relative_error(const A& got, const std::vector<double>& ref) {
  double scale = 0, worst = 0;
  for (double v : ref) scale = std::max(scale, std::abs(v));
  for (size_t i = 0; i < ref.size(); ++i)
    worst = std::max(worst, std::abs(got[i] - ref[i]) / scale);
  return worst;
}

void check_against_reference(const model& m, double tol, const ref_family& fam = {}) {
  auto tokens = reference_tokens(m);
  auto ref = reference_logits(m, tokens, fam);
  auto got = engine_logits(m, tokens);
  double scale = 0;
  for (double v : ref) scale = std::max(scale, std::abs(v));
  double worst = relative_error(got, ref);
  BOOST_TEST_MESSAGE("max relative logit error " << worst);
  BOOST_TEST(worst < tol);
  BOOST_TEST(scale > 0.1);  // the model is not degenerate
}

/// Checks that leaving a feature out of the reference (`without`) moves its logits far beyond
/// the tolerance, so that an engine ignoring the feature could not pass.
void check_feature_matters(const model& m, const ref_family& with, const ref_family& without,
                           const char* feature) {
  auto tokens = reference_tokens(m);
  double d =
      relative_error(reference_logits(m, tokens, without), reference_logits(m, tokens, with));
  BOOST_TEST_MESSAGE(feature << " moves the logits by " << d);
  BOOST_TEST(d > 1e-2, feature << " changes the logits by only " << d);
}

std::vector<generation_request> prompts(const model& m, int n, sampling_params p = {}) {
  tokenizer tok(m.vocabulary());
  const char* texts[] = {"Once upon a time",
                         "The quick brown fox",
                         "hello",
                         "a",
                         "In the beginning there was a very long sentence that goes on",
                         "1 2 3 4 5",
                         "Keel keeps conversations alive",
                         "zzz"};
  std::vector<generation_request> out;
  for (int i = 0; i < n; ++i) {
    generation_request r;
    r.prompt = tok.encode(std::string(texts[i % 8]) + std::string(i / 8, '!'), true);
    r.params = p;
    r.params.seed = static_cast<uint64_t>(i);
    r.max_tokens = 24;
    r.stop_at_eos = false;
    out.push_back(r);
  }
  return out;
}

std::vector<std::vector<int32_t>> run(const model& m, const std::vector<generation_request>& reqs,
                                      int32_t batch, int threads, int32_t chunk = 64,
                                      uint64_t kv_bytes = 64ull << 20) {
  thread_pool pool(threads);
  engine eng(m, pool);
  kv_pool kv(kv_layout_for(m), kv_bytes);
  auto out = generate(eng, kv, reqs, batch, {}, chunk);
  BOOST_REQUIRE_MESSAGE(out, test::why(out));
  BOOST_TEST(kv.free_pages() == kv.total_pages());  // every page came back
  return *out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(f32_model_matches_a_double_precision_reference) {
  test::temp_dir dir("engine_ref_f32");
  check_against_reference(*make_model(dir, small(dtype::f32), "m.gguf"), 1e-4);
}

BOOST_AUTO_TEST_CASE(quantized_models_match_the_reference_on_their_own_weights) {
  test::temp_dir dir("engine_ref_q");
  for (auto t : {dtype::f16, dtype::bf16, dtype::q8_0, dtype::q4_0, dtype::q4_1, dtype::q5_0,
                 dtype::q5_1, dtype::q2_k, dtype::q3_k, dtype::q4_k, dtype::q5_k, dtype::q6_k}) {
    BOOST_TEST_CONTEXT("type " << dtype_name(t)) {
      auto o = small(t);
      if (layout_of(t)->block_elems == 256) {  // K-quants: rows of whole super-blocks
        o.dim = 256;
        o.ffn = 512;
      }
      // The block types round each activation to one of 255 steps. The reference rounds the
      // same way but from double-precision activations, so now and then a value on a rounding
      // boundary goes the other way (about one per token here), which moves the logits by up to
      // ~7e-3 of the largest; a wrong decoding, scale or min term moves them by far more.
      const double tol = is_block_quantized(t) ? 2e-2 : 1e-4;
      check_against_reference(*make_model(dir, o, "m.gguf"), tol);
    }
  }
}

BOOST_AUTO_TEST_CASE(every_weight_type_stays_close_to_the_f32_model) {
  // synth draws the same floats for any type and quantises them, so each model is the F32
  // model quantised. The bounds (largest difference of the last position's logits over the
  // largest F32 logit) are about 1.5x what was measured; see docs/engine.md.
  test::temp_dir dir("engine_vs_f32");
  auto opts = [](dtype t) {
    auto o = small(t);
    o.dim = 256;
    o.ffn = 512;
    return o;
  };
  auto f32 = make_model(dir, opts(dtype::f32), "f32.gguf");
  auto tokens = reference_tokens(*f32);
  auto want = engine_logits(*f32, tokens);
  std::vector<double> ref(want.begin(), want.end());
  const std::pair<dtype, double> bounds[] = {
      {dtype::f16, 6e-4},  {dtype::bf16, 5e-3},  {dtype::q8_0, 2e-2}, {dtype::q6_k, 4e-2},
      {dtype::q5_1, 9e-2}, {dtype::q5_0, 9e-2},  {dtype::q5_k, 9e-2}, {dtype::q4_1, 0.18},
      {dtype::q4_0, 0.18}, {dtype::q4_k, 0.18},  {dtype::q3_k, 0.35}, {dtype::q2_k, 0.6}};
  std::map<dtype, double> err;
  for (auto [t, bound] : bounds) {
    auto m = make_model(dir, opts(t), std::string(dtype_name(t)) + ".gguf");
    err[t] = relative_error(engine_logits(*m, tokens), ref);
    BOOST_TEST_MESSAGE(dtype_name(t) << ": largest logit difference from F32 " << err[t]);
    BOOST_TEST(err[t] < bound, dtype_name(t) << ": " << err[t]);
    BOOST_TEST(err[t] > 0.0, dtype_name(t) << " gave the F32 logits exactly");
  }
  // More bits, closer to F32.
  BOOST_TEST(err[dtype::q8_0] < err[dtype::q6_k]);
  BOOST_TEST(err[dtype::q6_k] < err[dtype::q4_k]);
  BOOST_TEST(err[dtype::q4_k] < err[dtype::q2_k]);
}

BOOST_AUTO_TEST_CASE(multi_head_multi_query_and_tied_output_match_the_reference) {
  test::temp_dir dir("engine_ref_heads");
  check_against_reference(*make_model(dir, small(dtype::f32, 4, 4), "mha.gguf"), 1e-4);
  check_against_reference(*make_model(dir, small(dtype::f32, 8, 1), "mqa.gguf"), 1e-4);
  auto o = small(dtype::f16);
  o.tied_output = true;
  auto m = make_model(dir, o, "tied.gguf");
  BOOST_TEST(m->config().tied_output);
  check_against_reference(*m, 1e-4, family_of(*m, false));
}

BOOST_AUTO_TEST_CASE(qwen2_biases_and_neox_rope_match_the_reference) {
  test::temp_dir dir("engine_ref_qwen2");
  // Float types; the block types' rounding of the activations is covered by
  // quantized_models_match_the_reference_on_their_own_weights, and Q8_0 qwen2 runs in the
  // batch-independence test below.
  for (auto t : {dtype::f32, dtype::bf16}) {
    BOOST_TEST_CONTEXT("type " << dtype_name(t)) {
      auto m = make_model(dir, family("qwen2", t), "qwen2.gguf");
      auto fam = family_of(*m, true);
      BOOST_REQUIRE(!fam.bias[0][0].empty());
      check_against_reference(*m, 1e-4, fam);
      // Each feature moves the logits far past the tolerance: an engine without it fails.
      auto normal = fam;
      normal.neox = false;
      check_feature_matters(*m, fam, normal, "the neox rotation");
      for (int j = 0; j < 3; ++j) {
        auto without = fam;
        for (auto& b : without.bias) b[j].clear();
        check_feature_matters(*m, fam, without, j == 0 ? "Q bias" : j == 1 ? "K bias" : "V bias");
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(llama3_rope_freqs_with_tied_output_match_the_reference) {
  test::temp_dir dir("engine_ref_llama3");
  auto o = small(dtype::f32);
  o.rope_freqs = true;
  o.tied_output = true;
  auto m = make_model(dir, o, "llama3.gguf");
  BOOST_TEST(m->config().tied_output);
  auto fam = family_of(*m, false);
  BOOST_REQUIRE(fam.freqs.size() == 8u);
  check_against_reference(*m, 1e-4, fam);
  auto plain = fam;
  plain.freqs.clear();
  check_feature_matters(*m, fam, plain, "rope_freqs");
}

BOOST_AUTO_TEST_CASE(every_feature_combined_matches_the_reference) {
  test::temp_dir dir("engine_ref_combined");
  // A small Qwen 2.5: biases, neox, tied output; plus frequency factors, which llama.cpp reads
  // only for llama but Keel applies to both.
  auto q = family("qwen2", dtype::f16);
  q.rope_freqs = true;
  q.tied_output = true;
  auto mq = make_model(dir, q, "qwen25.gguf");
  check_against_reference(*mq, 1e-4, family_of(*mq, true));
  // llama with the optional Q/K/V biases llama.cpp also accepts.
  auto l = small(dtype::bf16, 8, 2);
  l.qkv_bias = true;
  l.rope_freqs = true;
  auto ml = make_model(dir, l, "llama_bias.gguf");
  auto fam = family_of(*ml, false);
  check_against_reference(*ml, 1e-4, fam);
  auto no_bias = fam;
  no_bias.bias.clear();
  check_feature_matters(*ml, fam, no_bias, "llama's optional biases");
}

BOOST_AUTO_TEST_CASE(rope_matches_ggml_bit_for_bit_for_both_pairings_and_frequency_factors) {
  std::vector<float> ff(64);
  for (size_t i = 0; i < ff.size(); ++i) ff[i] = 1.0f + 7.0f * static_cast<float>(i % 9) / 8.0f;
  const float* factors[] = {nullptr, ff.data()};
  int64_t differ = 0;
  for (int hd : {16, 64, 128}) {
    for (float base : {10000.0f, 500000.0f, 1000000.0f}) {
      for (int64_t pos : {0, 1, 7, 1000, 32767}) {
        for (auto type : {rope_type::normal, rope_type::neox}) {
          for (const float* f : factors) {
            BOOST_TEST_CONTEXT("head_dim " << hd << ", base " << base << ", pos " << pos
                                           << (type == rope_type::neox ? ", neox" : ", normal")
                                           << (f ? ", factors" : "")) {
              const int heads = 3;
              std::vector<float> x(heads * hd);
              for (size_t i = 0; i < x.size(); ++i) x[i] = std::sin(0.37f * i + 0.1f);
              auto want = x;
              for (int h = 0; h < heads; ++h)
                ggml_rope_head(&want[h * hd], hd, pos, base, f, type == rope_type::neox);
              auto other = x;
              rope(other.data(), heads, hd, pos, base,
                   type == rope_type::neox ? rope_type::normal : rope_type::neox, f);
              rope(x.data(), heads, hd, pos, base, type, f);
              BOOST_TEST(std::memcmp(x.data(), want.data(), x.size() * sizeof(float)) == 0);
              if (std::memcmp(x.data(), other.data(), x.size() * sizeof(float)) != 0) ++differ;
            }
          }
        }
      }
    }
  }
  // The two pairings really differ (everywhere but position 0): the check above has teeth.
  BOOST_TEST(differ == 3 * 3 * 4 * 2 * 2);
}

BOOST_AUTO_TEST_CASE(greedy_output_is_identical_for_batch_sizes_1_4_and_16) {
  test::temp_dir dir("engine_batch");
  auto m = make_model(dir, small(dtype::q8_0), "m.gguf");
  auto reqs = prompts(*m, 16);
  auto b1 = run(*m, reqs, 1, 1);
  BOOST_TEST(run(*m, reqs, 4, 1) == b1);
  BOOST_TEST(run(*m, reqs, 16, 1) == b1);
  // Different prompts give different continuations: the comparison is not vacuous.
  BOOST_TEST(b1[0] != b1[1]);
}

BOOST_AUTO_TEST_CASE(qwen2_and_llama3_output_is_identical_for_any_batch_threads_and_chunk) {
  test::temp_dir dir("engine_batch_families");
  auto q = family("qwen2", dtype::q8_0);
  q.tied_output = true;
  q.rope_freqs = true;
  auto l = small(dtype::q8_0);
  l.rope_freqs = true;
  l.qkv_bias = true;
  for (auto& o : {q, l}) {
    BOOST_TEST_CONTEXT("arch " << o.arch) {
      auto m = make_model(dir, o, o.arch + ".gguf");
      auto reqs = prompts(*m, 16);
      auto b1 = run(*m, reqs, 1, 1);
      BOOST_TEST(run(*m, reqs, 4, 1) == b1);
      BOOST_TEST(run(*m, reqs, 16, 2) == b1);
      BOOST_TEST(run(*m, reqs, 16, 1, 5) == b1);
      BOOST_TEST(b1[0] != b1[1]);
    }
  }
}

BOOST_AUTO_TEST_CASE(a_two_shard_qwen2_group_slices_the_biases_and_matches_the_reference) {
  test::temp_dir dir("engine_shards_qwen2");
  auto o = family("qwen2", dtype::f32);
  o.rope_freqs = true;
  auto m = make_model(dir, o, "qwen2.gguf");
  auto tokens = reference_tokens(*m);
  auto ref = reference_logits(*m, tokens, family_of(*m, true));
  auto two = group_logits(*m, tokens, 2);
  // Shard 1 adds the second half of each bias vector (its rows); any other half would move the
  // logits by about as much as leaving the biases out, far past the tolerance.
  BOOST_TEST(relative_error(two, ref) < 1e-4);
}

BOOST_AUTO_TEST_CASE(output_is_identical_for_one_and_two_threads_and_any_prefill_chunk) {
  test::temp_dir dir("engine_threads");
  auto m = make_model(dir, small(dtype::f16), "m.gguf");
  auto reqs = prompts(*m, 6);
  auto one = run(*m, reqs, 3, 1);
  BOOST_TEST(run(*m, reqs, 3, 2) == one);
  BOOST_TEST(run(*m, reqs, 3, 2, 1) == one);
  BOOST_TEST(run(*m, reqs, 3, 1, 5) == one);
  std::vector<int32_t> tokens(40);
  for (int i = 0; i < 40; ++i) tokens[i] = 3 + i * 7;
  auto a = engine_logits(*m, tokens, 1, 64), b = engine_logits(*m, tokens, 2, 3);
  BOOST_TEST(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

BOOST_AUTO_TEST_CASE(sampled_output_is_deterministic_and_batch_independent) {
  test::temp_dir dir("engine_sampled");
  auto m = make_model(dir, small(dtype::f32), "m.gguf");
  sampling_params p;
  p.temperature = 0.9f;
  p.top_k = 40;
  p.top_p = 0.95f;
  auto reqs = prompts(*m, 8, p);
  auto a = run(*m, reqs, 1, 1);
  BOOST_TEST(run(*m, reqs, 8, 2) == a);
  auto greedy = run(*m, prompts(*m, 8), 8, 1);
  BOOST_TEST(a != greedy);  // sampling did something
}

BOOST_AUTO_TEST_CASE(every_cpu_isa_gives_the_same_tokens) {
  test::temp_dir dir("engine_isa");
  for (dtype t : {dtype::q8_0, dtype::q4_k, dtype::q6_k, dtype::f16}) {
    auto o = small(t);
    if (layout_of(t)->block_elems == 256) {
      o.dim = 256;
      o.ffn = 512;
    }
    auto m = make_model(dir, o, std::string(dtype_name(t)) + ".gguf");
    auto reqs = prompts(*m, 4);
    auto best = run(*m, reqs, 4, 1);
    for (auto isa : {cpu_isa::scalar, cpu_isa::avx2, cpu_isa::avx512}) {
      for (bool vnni : {true, false}) {
        use_isa(isa);
        use_vnni(vnni);
        BOOST_TEST_CONTEXT("type " << dtype_name(t) << " isa " << to_string(active_isa())
                                   << " integer kernels " << to_string(active_qdot())) {
          BOOST_TEST(run(*m, reqs, 4, 1) == best);
        }
      }
    }
    use_isa(detected_isa());
    use_vnni(true);
  }
}

BOOST_AUTO_TEST_CASE(full_kv_pool_is_overloaded_and_changes_nothing) {
  test::temp_dir dir("engine_kv");
  auto m = make_model(dir, small(dtype::f32), "m.gguf");
  thread_pool pool(1);
  engine eng(*m, pool);
  auto layout = kv_layout_for(*m);
  kv_pool kv(layout, kv_pool(layout, 0).page_bytes() * 2);  // 2 pages = 32 tokens
  BOOST_REQUIRE(kv.total_pages() == 2);
  kv_sequence a(kv), b(kv);
  std::vector<int32_t> toks(20, 7);
  seq_step st{&a, toks.data(), 20, nullptr};
  BOOST_REQUIRE(!eng.forward({&st, 1}));
  seq_step both[] = {{&a, toks.data(), 1, nullptr}, {&b, toks.data(), 20, nullptr}};
  auto err = eng.forward(both);
  BOOST_TEST(code_of(err) == errc::overloaded);
  BOOST_TEST(a.length() == 20);
  BOOST_TEST(b.length() == 0);
  BOOST_TEST(kv.free_pages() == 0);
  BOOST_TEST(b.page_count() == 0u);
}

BOOST_AUTO_TEST_CASE(a_small_kv_pool_still_completes_a_large_batch_identically) {
  test::temp_dir dir("engine_kv_small");
  auto m = make_model(dir, small(dtype::f32), "m.gguf");
  auto reqs = prompts(*m, 8);
  auto roomy = run(*m, reqs, 8, 1);
  auto layout = kv_layout_for(*m);
  // Room for about two sequences at a time: the rest wait and are re-admitted.
  auto tight = run(*m, reqs, 8, 1, 64, kv_pool(layout, 0).page_bytes() * 9);
  BOOST_TEST(tight == roomy);
}

BOOST_AUTO_TEST_CASE(bad_tokens_and_context_overflow_are_bad_requests) {
  test::temp_dir dir("engine_bad");
  auto m = make_model(dir, small(dtype::f32), "m.gguf");
  thread_pool pool(1);
  engine eng(*m, pool);
  kv_pool kv(kv_layout_for(*m), 64ull << 20);
  kv_sequence s(kv);
  int32_t bad = m->config().vocab_size;
  seq_step st{&s, &bad, 1, nullptr};
  auto err = eng.forward({&st, 1});
  BOOST_TEST(code_of(err) == errc::bad_request);
  BOOST_TEST(message_of(err).find(std::to_string(bad)) != std::string::npos);
  std::vector<int32_t> many(m->config().ctx_len + 1, 5);
  seq_step st2{&s, many.data(), static_cast<int32_t>(many.size()), nullptr};
  BOOST_TEST(code_of(eng.forward({&st2, 1})) == errc::bad_request);
  BOOST_TEST(s.length() == 0);
  generation_request r;
  r.prompt = many;
  auto out = generate(eng, kv, {r}, 1);
  BOOST_TEST(!out);
  BOOST_TEST(code_of(out.error()) == errc::bad_request);
}
