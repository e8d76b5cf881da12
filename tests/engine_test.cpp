#define BOOST_TEST_MODULE engine_test
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstring>
#include <fstream>
#include <map>

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

std::vector<double> dequant(const matrix_view& w, int64_t r) {
  std::vector<float> f(w.cols);
  dequantize_row(w, r, f.data());
  return {f.begin(), f.end()};
}

/// y = W x in double, from the dequantised weights.
std::vector<double> ref_matvec(const matrix_view& w, const std::vector<double>& x) {
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

void ref_rope(std::vector<double>& x, int heads, int hd, int64_t pos, double theta) {
  for (int h = 0; h < heads; ++h) {
    for (int i = 0; i < hd; i += 2) {
      double angle = pos * std::pow(theta, -static_cast<double>(i) / hd);
      double a = x[h * hd + i], b = x[h * hd + i + 1];
      x[h * hd + i] = a * std::cos(angle) - b * std::sin(angle);
      x[h * hd + i + 1] = a * std::sin(angle) + b * std::cos(angle);
    }
  }
}

/// A plain, independent Llama forward pass in double precision: logits after the last token.
std::vector<double> reference_logits(const model& m, const std::vector<int32_t>& tokens) {
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
      ref_rope(q, c.n_heads, hd, static_cast<int64_t>(t), c.rope_theta);
      ref_rope(k, c.n_kv_heads, hd, static_cast<int64_t>(t), c.rope_theta);
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
  return ref_matvec(m.output(), ref_rmsnorm(x, m.output_norm(), c.rms_eps));
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

void check_against_reference(const model& m, double tol) {
  std::vector<int32_t> tokens;
  for (int i = 0; i < 23; ++i) tokens.push_back((i * 37 + 5) % m.config().vocab_size);
  auto ref = reference_logits(m, tokens);
  auto got = engine_logits(m, tokens);
  double scale = 0;
  for (double v : ref) scale = std::max(scale, std::abs(v));
  double worst = 0;
  for (size_t i = 0; i < ref.size(); ++i)
    worst = std::max(worst, std::abs(got[i] - ref[i]) / scale);
  BOOST_TEST_MESSAGE("max relative logit error " << worst);
  BOOST_TEST(worst < tol);
  BOOST_TEST(scale > 0.1);  // the model is not degenerate
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
  for (auto t : {dtype::f16, dtype::bf16, dtype::q8_0}) {
    BOOST_TEST_CONTEXT("type " << dtype_name(t)) {
      check_against_reference(*make_model(dir, small(t), "m.gguf"), 1e-4);
    }
  }
}

BOOST_AUTO_TEST_CASE(multi_head_multi_query_and_tied_output_match_the_reference) {
  test::temp_dir dir("engine_ref_heads");
  check_against_reference(*make_model(dir, small(dtype::f32, 4, 4), "mha.gguf"), 1e-4);
  check_against_reference(*make_model(dir, small(dtype::f32, 8, 1), "mqa.gguf"), 1e-4);
  auto o = small(dtype::f16);
  o.tied_output = true;
  auto m = make_model(dir, o, "tied.gguf");
  BOOST_TEST(m->config().tied_output);
  check_against_reference(*m, 1e-4);
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
  auto m = make_model(dir, small(dtype::q8_0), "m.gguf");
  auto reqs = prompts(*m, 4);
  auto best = run(*m, reqs, 4, 1);
  for (auto isa : {cpu_isa::scalar, cpu_isa::avx2, cpu_isa::avx512}) {
    use_isa(isa);
    BOOST_TEST_CONTEXT("isa " << to_string(active_isa())) {
      BOOST_TEST(run(*m, reqs, 4, 1) == best);
    }
  }
  use_isa(detected_isa());
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
