#define BOOST_TEST_MODULE sampler_test
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <set>
#include <thread>
#include <vector>

#include "base/error.hpp"
#include "kernels/sampler.hpp"

using namespace keel;

namespace {

sampling_params random_params(uint64_t seed) {
  sampling_params p;
  p.temperature = 1.0f;
  p.seed = seed;
  return p;
}

int32_t pick(const sampling_params& p, std::vector<float> logits, uint64_t turn = 0,
             uint64_t index = 0, const std::vector<int32_t>& recent = {}) {
  return sample(p, logits.data(), static_cast<int32_t>(logits.size()), recent.data(), recent.size(),
                turn, index);
}

// A vocabulary-sized, smoothly varying set of logits with no ties.
std::vector<float> wide_logits(int32_t n, uint64_t seed) {
  std::vector<float> l(n);
  for (int32_t i = 0; i < n; ++i) l[i] = static_cast<float>(draw_unit(seed, 99, i) * 12.0 - 6.0);
  return l;
}

void check_error(const sampling_params& p, const std::string& expected) {
  BOOST_TEST(describe(validate(p)) == "bad_request: " + expected);
}

}  // namespace

BOOST_AUTO_TEST_CASE(validation_names_the_parameter_and_value) {
  BOOST_TEST(!validate(sampling_params{}));
  sampling_params ok;
  ok.temperature = 0.7f;
  ok.top_k = 40;
  ok.top_p = 0.9f;
  ok.min_p = 0.05f;
  ok.repetition_penalty = 1.1f;
  BOOST_TEST(!validate(ok));

  sampling_params p;
  p.temperature = -1.0f;
  check_error(p, "temperature must be finite and >= 0, got -1");
  p = {};
  p.temperature = NAN;
  check_error(p, "temperature must be finite and >= 0, got nan");
  p = {};
  p.top_k = -3;
  check_error(p, "top_k must be >= 0, got -3");
  p = {};
  p.top_p = 1.5f;
  check_error(p, "top_p must be in (0, 1], got 1.5");
  p = {};
  p.top_p = 0.0f;
  check_error(p, "top_p must be in (0, 1], got 0");
  p = {};
  p.min_p = 2.0f;
  check_error(p, "min_p must be in [0, 1], got 2");
  p = {};
  p.repetition_penalty = 0.0f;
  check_error(p, "repetition_penalty must be finite and > 0, got 0");
  p = {};
  p.repetition_window = -1;
  check_error(p, "repetition_window must be >= 0, got -1");
}

BOOST_AUTO_TEST_CASE(greedy_picks_argmax_with_ties_to_the_lowest_id) {
  sampling_params p;
  BOOST_TEST(pick(p, {0.1f, 2.0f, -1.0f, 1.9f}) == 1);
  BOOST_TEST(pick(p, {0.1f, 3.0f, -1.0f, 3.0f, 3.0f}) == 1);
  BOOST_TEST(pick(p, {5.0f, 5.0f}) == 0);
  BOOST_TEST(pick(p, {NAN, -2.0f, NAN}) == 1);  // NaN counts as -inf
  BOOST_TEST(pick(p, {1.0f, INFINITY, 2.0f}) == 1);
  sampling_params cold;
  cold.temperature = 1e-40f;  // 1 / t overflows a float: still the argmax
  BOOST_TEST(pick(cold, {0.1f, 3.0f, 2.9f}) == 1);
  float one = 0.5f;
  BOOST_TEST(sample(p, &one, 1, nullptr, 0, 0, 0) == 0);
  BOOST_TEST(sample(p, &one, 0, nullptr, 0, 0, 0) == -1);
}

BOOST_AUTO_TEST_CASE(same_key_gives_the_same_token_on_any_thread) {
  auto logits = wide_logits(32000, 1);
  sampling_params p = random_params(42);
  p.top_k = 50;
  p.top_p = 0.95f;
  std::vector<int32_t> expected(64);
  for (uint64_t i = 0; i < expected.size(); ++i) expected[i] = pick(p, logits, 3, i);

  std::vector<std::vector<int32_t>> got(4, std::vector<int32_t>(expected.size()));
  std::vector<std::thread> threads;
  for (size_t t = 0; t < got.size(); ++t) {
    threads.emplace_back([&, t] {
      // Each thread walks the keys in a different order.
      for (size_t k = 0; k < expected.size(); ++k) {
        size_t i = (k * (2 * t + 1) + t) % expected.size();
        got[t][i] = pick(p, logits, 3, i);
      }
    });
  }
  for (auto& th : threads) th.join();
  for (auto& g : got) BOOST_TEST(g == expected, boost::test_tools::per_element());

  BOOST_TEST(draw_u64(7, 1, 2) == draw_u64(7, 1, 2));
  BOOST_TEST(draw_u64(7, 1, 2) != draw_u64(7, 2, 1));
  BOOST_TEST(draw_u64(7, 1, 2) != draw_u64(8, 1, 2));
}

BOOST_AUTO_TEST_CASE(different_turns_and_indices_spread_the_picks) {
  // Flat distribution over 1000 tokens: 200 draws must not collapse onto a few ids.
  std::vector<float> flat(1000, 0.0f);
  sampling_params p = random_params(5);
  std::set<int32_t> by_index, by_turn;
  for (uint64_t i = 0; i < 200; ++i) {
    by_index.insert(pick(p, flat, 0, i));
    by_turn.insert(pick(p, flat, i, 0));
  }
  BOOST_TEST(by_index.size() > 150u);
  BOOST_TEST(by_turn.size() > 150u);
}

BOOST_AUTO_TEST_CASE(draw_unit_is_roughly_uniform) {
  constexpr int bins = 100;
  constexpr int draws = 100000;
  std::vector<int> count(bins, 0);
  for (uint64_t i = 0; i < draws; ++i) {
    double u = draw_unit(11, 0, i);
    BOOST_REQUIRE(u >= 0.0);
    BOOST_REQUIRE(u < 1.0);
    ++count[static_cast<int>(u * bins)];
  }
  double expected = static_cast<double>(draws) / bins, chi2 = 0.0;
  for (int c : count) chi2 += (c - expected) * (c - expected) / expected;
  // 99 degrees of freedom: mean 99, sd 14; 200 is > 7 sd away.
  BOOST_TEST(chi2 < 200.0);

  // Consecutive turns with a fixed index must be just as uniform.
  std::fill(count.begin(), count.end(), 0);
  for (uint64_t t = 0; t < draws; ++t) ++count[static_cast<int>(draw_unit(11, t, 0) * bins)];
  chi2 = 0.0;
  for (int c : count) chi2 += (c - expected) * (c - expected) / expected;
  BOOST_TEST(chi2 < 200.0);
}

BOOST_AUTO_TEST_CASE(top_k_one_equals_greedy) {
  for (uint64_t s = 0; s < 20; ++s) {
    auto logits = wide_logits(5000, s);
    logits[4000] = logits[1234] = 9.0f;  // a tie: lowest id wins
    sampling_params p = random_params(s);
    p.temperature = 1.5f;
    p.top_k = 1;
    BOOST_TEST(pick(p, logits, 0, s) == 1234);
  }
}

BOOST_AUTO_TEST_CASE(tiny_top_p_equals_greedy) {
  for (uint64_t s = 0; s < 20; ++s) {
    auto logits = wide_logits(5000, s);
    int32_t best = pick(sampling_params{}, logits);
    sampling_params p = random_params(s);
    p.temperature = 2.0f;
    p.top_p = 1e-6f;
    BOOST_TEST(pick(p, logits, 1, s) == best);
  }
}

BOOST_AUTO_TEST_CASE(min_p_filters_unlikely_tokens) {
  // Probabilities proportional to 1, 0.5, 0.09, 0.01: min_p 0.1 keeps only ids 0 and 1.
  std::vector<float> logits = {0.0f, std::log(0.5f), std::log(0.09f), std::log(0.01f)};
  sampling_params p = random_params(3);
  p.min_p = 0.1f;
  std::vector<int> seen(4, 0);
  for (uint64_t i = 0; i < 3000; ++i) ++seen[pick(p, logits, 0, i)];
  BOOST_TEST(seen[2] == 0);
  BOOST_TEST(seen[3] == 0);
  BOOST_TEST(seen[0] > 1800);  // expected 2000 of 3000
  BOOST_TEST(seen[1] > 800);   // expected 1000

  p.min_p = 0.0f;  // without the filter the tail shows up
  std::fill(seen.begin(), seen.end(), 0);
  for (uint64_t i = 0; i < 3000; ++i) ++seen[pick(p, logits, 0, i)];
  BOOST_TEST(seen[2] > 0);
}

BOOST_AUTO_TEST_CASE(top_p_keeps_the_smallest_nucleus) {
  // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 keeps ids 0 and 1 (cumulative 0.8).
  std::vector<float> logits = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  sampling_params p = random_params(4);
  p.top_p = 0.75f;
  std::vector<int> seen(4, 0);
  for (uint64_t i = 0; i < 4000; ++i) ++seen[pick(p, logits, 0, i)];
  BOOST_TEST(seen[2] == 0);
  BOOST_TEST(seen[3] == 0);
  BOOST_TEST(std::abs(seen[0] / 4000.0 - 0.625) < 0.03);  // 0.5 / 0.8
}

BOOST_AUTO_TEST_CASE(top_p_on_a_large_vocabulary_matches_a_full_sort) {
  // Reference nucleus by sorting everything; the sampler selects it without a sort.
  const int32_t n = 5000;
  auto logits = wide_logits(n, 21);
  for (float top_p : {0.05f, 0.5f, 0.97f}) {
    std::vector<int32_t> order(n);
    for (int32_t i = 0; i < n; ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) {
      return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
    });
    double z = 0.0;
    for (float l : logits) z += std::exp(static_cast<double>(l) - logits[order[0]]);
    std::set<int32_t> nucleus;
    double cum = 0.0;
    for (int32_t id : order) {
      nucleus.insert(id);
      cum += std::exp(static_cast<double>(logits[id]) - logits[order[0]]);
      if (cum >= top_p * z) break;
    }
    sampling_params p = random_params(6);
    p.top_p = top_p;
    std::set<int32_t> picked;
    for (uint64_t i = 0; i < 1000; ++i) picked.insert(pick(p, logits, 0, i));
    BOOST_TEST_CONTEXT("top_p " << top_p << " nucleus " << nucleus.size()) {
      BOOST_TEST(std::includes(nucleus.begin(), nucleus.end(), picked.begin(), picked.end()));
      BOOST_TEST(picked.size() * 3 > std::min<size_t>(nucleus.size(), 1000));
    }
  }
}

BOOST_AUTO_TEST_CASE(repetition_penalty_changes_the_pick) {
  std::vector<float> logits = {1.0f, 2.0f, 1.8f, -0.5f};
  sampling_params p;
  BOOST_TEST(pick(p, logits, 0, 0, {1}) == 1);  // penalty off
  p.repetition_penalty = 1.5f;
  BOOST_TEST(pick(p, logits, 0, 0, {1}) == 2);        // 2.0 / 1.5 < 1.8
  BOOST_TEST(pick(p, logits, 0, 0, {1, 1, 1}) == 2);  // once per distinct id, not per occurrence
  p.repetition_penalty = 2.5f;
  BOOST_TEST(pick(p, logits, 0, 0, {1, 2}) == 0);  // 0.8 and 0.72 fall below 1.0
}

BOOST_AUTO_TEST_CASE(repetition_penalty_looks_only_at_the_window) {
  std::vector<float> logits = {1.0f, 2.0f, 1.8f};
  sampling_params p;
  p.repetition_penalty = 1.5f;
  p.repetition_window = 2;
  BOOST_TEST(pick(p, logits, 0, 0, {1, 0, 0}) == 1);  // the 1 is outside the last 2
  BOOST_TEST(pick(p, logits, 0, 0, {0, 1, 0}) == 2);
  p.repetition_window = 0;
  BOOST_TEST(pick(p, logits, 0, 0, {1}) == 1);
  // Negative logits are multiplied, and out-of-range ids are ignored.
  std::vector<float> neg = {-1.0f, -1.2f};
  BOOST_TEST(pick(p, neg, 0, 0, {0}) == 0);
  p.repetition_window = 64;
  BOOST_TEST(pick(p, neg, 0, 0, {0, -5, 7}) == 1);  // -1.5 < -1.2
}

BOOST_AUTO_TEST_CASE(empirical_frequencies_match_the_softmax) {
  std::vector<float> logits = {1.0f, 0.0f, 2.0f, -1.0f, 0.5f, 1.5f};
  const float temperature = 0.8f;
  std::vector<double> prob(logits.size());
  double z = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) z += prob[i] = std::exp(logits[i] / temperature);
  for (double& x : prob) x /= z;

  sampling_params p = random_params(2024);
  p.temperature = temperature;
  constexpr int draws = 20000;
  std::vector<int> seen(logits.size(), 0);
  for (uint64_t i = 0; i < draws; ++i) ++seen[pick(p, logits, 7, i)];
  for (size_t i = 0; i < logits.size(); ++i) {
    double sd = std::sqrt(prob[i] * (1.0 - prob[i]) / draws);
    BOOST_TEST_CONTEXT("token " << i << " p=" << prob[i] << " seen " << seen[i]) {
      BOOST_TEST(std::abs(seen[i] / static_cast<double>(draws) - prob[i]) < 5.0 * sd);
    }
  }
}

BOOST_AUTO_TEST_CASE(filters_that_keep_everything_give_the_same_pick) {
  // The final draw walks survivors in id order, so top_k = n_vocab and top_k = 0 agree.
  auto logits = wide_logits(2000, 8);
  sampling_params a = random_params(9), b = a;
  b.top_k = 2000;
  for (uint64_t i = 0; i < 50; ++i) BOOST_TEST(pick(a, logits, 0, i) == pick(b, logits, 0, i));
}

BOOST_AUTO_TEST_CASE(masked_tokens_are_never_picked) {
  std::vector<float> logits(1000, -INFINITY);
  logits[17] = 0.0f;
  logits[600] = 0.0f;
  sampling_params p = random_params(1);
  p.top_p = 0.9f;
  p.min_p = 0.01f;
  for (uint64_t i = 0; i < 100; ++i) {
    int32_t t = pick(p, logits, 0, i);
    BOOST_TEST((t == 17 || t == 600));
  }
  std::vector<float> all_masked(10, -INFINITY);
  BOOST_TEST(pick(p, all_masked) == 0);
}

BOOST_AUTO_TEST_CASE(large_vocabulary_is_fast) {
  // 150k vocabulary; each configuration well under the time of a forward pass.
  auto base = wide_logits(150000, 3);
  sampler_scratch scratch;
  std::vector<sampling_params> configs(4, random_params(1));
  configs[0].top_k = 40;
  configs[1].top_p = 0.9f;
  configs[2].min_p = 0.05f;
  configs[3].top_k = 0;
  for (auto& p : configs) {
    std::vector<float> logits;
    auto start = std::chrono::steady_clock::now();
    constexpr int rounds = 20;
    for (int r = 0; r < rounds; ++r) {
      logits = base;
      int32_t t = sample(p, logits.data(), 150000, nullptr, 0, 0, r, scratch);
      BOOST_REQUIRE(t >= 0);
      BOOST_REQUIRE(t < 150000);
    }
    double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                    .count() /
                rounds;
    BOOST_TEST_MESSAGE("top_k " << p.top_k << " top_p " << p.top_p << " min_p " << p.min_p << ": "
                                << ms << " ms");
    BOOST_TEST(ms < 50.0);
  }
}
