#define BOOST_TEST_MODULE tensor_parallel_test
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstring>
#include <future>
#include <memory>
#include <random>
#include <sstream>
#include <thread>

#include "kernels/collective.hpp"
#include "kernels/engine.hpp"
#include "kernels/model.hpp"
#include "kernels/synth.hpp"
#include "kernels/tokenizer.hpp"
#include "tests/test_support.hpp"

using namespace keel;
using namespace std::chrono_literals;

namespace {

// ---- collective ----------------------------------------------------------------------------

/// Runs fn(rank) for every rank on its own thread and joins them.
template <class F>
void on_threads(int32_t n, F fn) {
  std::vector<std::thread> threads;
  for (int32_t r = 0; r < n; ++r) threads.emplace_back(fn, r);
  for (auto& t : threads) t.join();
}

/// Values of widely different magnitudes, so that the order of a sum changes its bits.
std::vector<float> values(uint64_t seed, int64_t n) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-20, 20);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) x = std::ldexp(unit(rng), exponent(rng));
  return v;
}

uint64_t seed_of(int32_t round, int32_t rank) {
  return static_cast<uint64_t>(round) * 1000 + static_cast<uint64_t>(rank);
}

const int64_t lengths[] = {1, 5, 16, 17, 100, 1000, 4099, 0, 64};

BOOST_AUTO_TEST_CASE(all_reduce_sums_in_rank_order_with_the_same_bits_on_every_rank) {
  for (int32_t size = 2; size <= 4; ++size) {
    BOOST_TEST_CONTEXT("ranks " << size) {
      collective coll(size);
      BOOST_TEST(coll.size() == size);
      const int32_t rounds = 300;
      std::vector<std::vector<std::vector<float>>> got(size);
      std::vector<int32_t> failures(size, 0);
      on_threads(size, [&](int32_t rank) {
        for (int32_t round = 0; round < rounds; ++round) {
          const int64_t n = lengths[round % std::size(lengths)];
          auto d = values(seed_of(round, rank), n);
          if (coll.all_reduce(rank, d.data(), n)) ++failures[rank];
          got[rank].push_back(std::move(d));
        }
      });
      int32_t order_matters = 0;
      bool all_equal = true;
      for (int32_t round = 0; round < rounds; ++round) {
        const int64_t n = lengths[round % std::size(lengths)];
        // ((rank0 + rank1) + rank2) + ..., sequentially, and the reverse order for contrast.
        auto want = values(seed_of(round, 0), n);
        auto reverse = values(seed_of(round, size - 1), n);
        for (int32_t r = 1; r < size; ++r) {
          auto v = values(seed_of(round, r), n), w = values(seed_of(round, size - 1 - r), n);
          for (int64_t i = 0; i < n; ++i) {
            want[i] += v[i];
            reverse[i] += w[i];
          }
        }
        // n == 0: no memcmp, whose pointers must be valid even for no bytes (data() is null).
        if (n == 0) continue;
        if (std::memcmp(want.data(), reverse.data(), n * sizeof(float)) != 0) ++order_matters;
        for (int32_t r = 0; r < size; ++r) {
          if (std::memcmp(got[r][round].data(), want.data(), n * sizeof(float)) != 0)
            all_equal = false;
        }
      }
      BOOST_TEST(failures == std::vector<int32_t>(size, 0), boost::test_tools::per_element());
      BOOST_TEST(all_equal);
      // With three or more ranks the order changes the bits, so the check above has teeth.
      if (size >= 3) BOOST_TEST(order_matters > 0);
    }
  }
}

BOOST_AUTO_TEST_CASE(abort_wakes_a_blocked_rank_and_later_calls_fail_at_once) {
  collective coll(3);
  std::atomic<bool> done{false};
  caf::error blocked_err;
  std::thread t([&] {
    float x = 1.0f;
    blocked_err = coll.all_reduce(0, &x, 1);
    done = true;
  });
  std::this_thread::sleep_for(100ms);  // long past the spin: rank 0 sleeps on the condition
  BOOST_TEST(!done.load());
  BOOST_TEST(!coll.aborted());
  coll.abort();
  t.join();
  BOOST_TEST(code_of(blocked_err) == errc::disconnected);
  BOOST_TEST(coll.aborted());
  float y = 2.0f;
  auto start = std::chrono::steady_clock::now();
  BOOST_TEST(code_of(coll.all_reduce(1, &y, 1)) == errc::disconnected);
  BOOST_TEST(code_of(coll.all_reduce(2, &y, 1)) == errc::disconnected);
  BOOST_TEST((std::chrono::steady_clock::now() - start < 1s));
  BOOST_TEST(y == 2.0f);
  coll.abort();  // idempotent
  BOOST_TEST(coll.aborted());
}

BOOST_AUTO_TEST_CASE(abort_before_any_call_fails_every_rank) {
  collective coll(2);
  coll.abort();
  std::vector<caf::error> errs(2);
  on_threads(2, [&](int32_t rank) {
    float x = 1.0f;
    errs[rank] = coll.all_reduce(rank, &x, 1);
  });
  BOOST_TEST(code_of(errs[0]) == errc::disconnected);
  BOOST_TEST(code_of(errs[1]) == errc::disconnected);
}

BOOST_AUTO_TEST_CASE(mismatched_lengths_fail_the_round_on_every_rank_and_a_bad_rank_is_refused) {
  collective coll(2);
  float x = 1.0f;
  BOOST_TEST(code_of(coll.all_reduce(2, &x, 1)) == errc::bad_request);
  BOOST_TEST(code_of(coll.all_reduce(-1, &x, 1)) == errc::bad_request);
  std::vector<caf::error> errs(2);
  std::vector<std::vector<float>> data{{1, 2, 3, 4}, {10, 20, 30, 40, 50}};
  on_threads(2, [&](int32_t rank) {
    errs[rank] = coll.all_reduce(rank, data[rank].data(), rank == 0 ? 4 : 5);
  });
  BOOST_TEST(code_of(errs[0]) == errc::failed);
  BOOST_TEST(code_of(errs[1]) == errc::failed);
  // The next round works again.
  on_threads(2, [&](int32_t rank) { errs[rank] = coll.all_reduce(rank, data[rank].data(), 4); });
  BOOST_TEST(!errs[0]);
  BOOST_TEST(!errs[1]);
  BOOST_TEST(data[0] == (std::vector<float>{11, 22, 33, 44}), boost::test_tools::per_element());
  BOOST_TEST(data[1] == (std::vector<float>{11, 22, 33, 44, 50}), boost::test_tools::per_element());
}

// ---- sharded engine ------------------------------------------------------------------------

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

/// Dimensions that are multiples of 64 (128 for four shards), so that Q8_0 column slices are
/// whole blocks of 32.
synth_options tp_options(dtype type, int32_t heads = 8, int32_t kv_heads = 4) {
  synth_options o;
  o.dim = 128;
  o.layers = 2;
  o.heads = heads;
  o.kv_heads = kv_heads;
  o.ffn = 256;
  o.ctx = 256;
  o.seed = 7;
  o.type = type;
  return o;
}

std::vector<std::vector<int32_t>> prompts(const model& m) {
  tokenizer tok(m.vocabulary());
  std::vector<std::vector<int32_t>> out;
  for (const char* text : {"Once upon a time", "The quick brown fox jumps", "hello", "1 2 3"})
    out.push_back(tok.encode(text, true));
  return out;
}

int32_t argmax(const std::vector<float>& v) {
  return static_cast<int32_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

/// Greedy decoding results: per sequence, the logits of each step and the token chosen.
struct greedy_run {
  std::vector<std::vector<int32_t>> tokens;
  std::vector<std::vector<std::vector<float>>> logits;
  std::vector<caf::error> errors;  // per rank, the first error
};

/// Greedy decoding of `ps` for `steps` tokens (a prefill, then steps - 1 decode steps) by a
/// group of `shards` engines, each on its own thread with its own thread_pool(1) and KV pool; a
/// single shard uses the plain two-argument engine. All sequences share each forward step when
/// `batched`, otherwise they run one after another, each alone. Rank 0 picks the tokens and
/// hands them to the others between two barriers.
greedy_run run_greedy(const model& m, int32_t shards, const std::vector<std::vector<int32_t>>& ps,
                      int32_t steps, bool batched) {
  const size_t S = ps.size();
  const int32_t V = m.config().vocab_size;
  greedy_run out;
  out.tokens.resize(S);
  out.logits.resize(S);
  out.errors.resize(shards);
  collective coll(shards);
  std::barrier sync(shards);
  std::vector<int32_t> next(S);
  std::vector<std::vector<size_t>> groups;
  if (batched) {
    groups.emplace_back();
    for (size_t i = 0; i < S; ++i) groups.back().push_back(i);
  } else {
    for (size_t i = 0; i < S; ++i) groups.push_back({i});
  }
  on_threads(shards, [&](int32_t rank) {
    thread_pool pool(1);
    const shard_layout shard{rank, shards};
    auto eng = shards == 1 ? std::make_unique<engine>(m, pool)
                           : std::make_unique<engine>(m, pool, shard, &coll);
    kv_pool kv(kv_layout_for(m, shard), 32ull << 20);
    std::vector<kv_sequence> seqs;
    for (size_t i = 0; i < S; ++i) seqs.emplace_back(kv);
    std::vector<std::vector<float>> logits(S, std::vector<float>(V));
    std::vector<int32_t> mine(S);
    for (const auto& g : groups) {
      for (int32_t k = 0; k < steps; ++k) {
        std::vector<seq_step> st;
        for (size_t i : g) {
          st.push_back(k == 0 ? seq_step{&seqs[i], ps[i].data(), static_cast<int32_t>(ps[i].size()),
                                         logits[i].data()}
                              : seq_step{&seqs[i], &mine[i], 1, logits[i].data()});
        }
        if (auto err = eng->forward(st)) {
          if (!out.errors[rank]) out.errors[rank] = err;
          coll.abort();  // nobody waits for this rank
        }
        if (rank == 0) {
          for (size_t i : g) {
            out.logits[i].push_back(logits[i]);
            next[i] = argmax(logits[i]);
            out.tokens[i].push_back(next[i]);
          }
        }
        sync.arrive_and_wait();
        for (size_t i : g) mine[i] = next[i];
        sync.arrive_and_wait();
      }
    }
  });
  return out;
}

/// How a group's greedy run compares with the single engine's.
struct comparison {
  double max_rel_err = 0;  // max |a - b| / max |a| over the compared steps
  int32_t compared = 0;    // steps compared
  int32_t mismatches = 0;  // tokens that differ although the reference margin was clear
  std::string notes;
};

/// Compares logits step by step while both runs had the same inputs. A step whose reference
/// top-two logits are within 1e-4 (relative) may legitimately pick another token, so the
/// comparison of that sequence stops there (and says so).
comparison compare(const greedy_run& ref, const greedy_run& got) {
  comparison c;
  std::ostringstream notes;
  for (size_t s = 0; s < ref.logits.size(); ++s) {
    for (size_t k = 0; k < ref.logits[s].size(); ++k) {
      const auto &a = ref.logits[s][k], &b = got.logits[s][k];
      double scale = 0, err = 0;
      for (float v : a) scale = std::max(scale, std::abs(static_cast<double>(v)));
      for (size_t i = 0; i < a.size(); ++i)
        err = std::max(err, std::abs(static_cast<double>(a[i]) - b[i]) / scale);
      c.max_rel_err = std::max(c.max_rel_err, err);
      ++c.compared;
      auto sorted = a;
      std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<float>());
      const double margin = (static_cast<double>(sorted[0]) - sorted[1]) / scale;
      if (margin <= 1e-4) {
        notes << "sequence " << s << " step " << k << ": top-two margin " << margin
              << " too small, stopped comparing; ";
        break;
      }
      if (ref.tokens[s][k] != got.tokens[s][k]) {
        ++c.mismatches;
        notes << "sequence " << s << " step " << k << ": token " << got.tokens[s][k]
              << " instead of " << ref.tokens[s][k] << " at margin " << margin << "; ";
        break;
      }
    }
  }
  c.notes = notes.str();
  return c;
}

bool identical(const greedy_run& a, const greedy_run& b) {
  if (a.tokens != b.tokens || a.logits.size() != b.logits.size()) return false;
  for (size_t s = 0; s < a.logits.size(); ++s) {
    if (a.logits[s].size() != b.logits[s].size()) return false;
    for (size_t k = 0; k < a.logits[s].size(); ++k) {
      if (std::memcmp(a.logits[s][k].data(), b.logits[s][k].data(),
                      a.logits[s][k].size() * sizeof(float)) != 0)
        return false;
    }
  }
  return true;
}

void require_no_errors(const greedy_run& r) {
  for (size_t i = 0; i < r.errors.size(); ++i)
    BOOST_REQUIRE_MESSAGE(!r.errors[i], "rank " << i << ": " << describe(r.errors[i]));
}

constexpr int32_t steps = 32;

/// Runs the group and the single engine on `m` and checks logits and greedy tokens.
void check_group_matches_single(const model& m, int32_t shards) {
  auto ps = prompts(m);
  auto one = run_greedy(m, 1, ps, steps, true);
  auto group = run_greedy(m, shards, ps, steps, true);
  require_no_errors(one);
  require_no_errors(group);
  auto c = compare(one, group);
  BOOST_TEST_MESSAGE(shards << " shards, " << dtype_name(m.weight_type()) << ", "
                            << m.config().n_heads << " heads / " << m.config().n_kv_heads
                            << " kv heads: max relative logit error " << c.max_rel_err << " over "
                            << c.compared << " steps" << (c.notes.empty() ? "" : "; ") << c.notes);
  // Float types: each shard's partial sums round differently, ~1e-7. Block types also round
  // every activation to one of 255 steps, and a value within ~1e-7 of a rounding boundary can go
  // the other way on a different layout, which moves logits by ~1e-3 (engine_test explains).
  const bool block = is_block_quantized(m.weight_type());
  BOOST_TEST(c.max_rel_err < (block ? 2e-2 : 1e-4));
  BOOST_TEST(c.mismatches == 0);
  // Most steps were compared: the check is not vacuous.
  BOOST_TEST(c.compared >= static_cast<int32_t>(ps.size()) * steps / 2);
  // Different prompts give different continuations.
  BOOST_TEST(one.tokens[0] != one.tokens[1]);
}

}  // namespace

BOOST_AUTO_TEST_CASE(two_shards_match_one_shard_for_f32_and_q8_0_with_grouped_query_attention) {
  test::temp_dir dir("tp_two");
  for (auto type : {dtype::f32, dtype::q8_0}) {
    for (int32_t kv_heads : {4, 2}) {
      BOOST_TEST_CONTEXT("type " << dtype_name(type) << ", kv heads " << kv_heads) {
        auto m = make_model(dir, tp_options(type, 8, kv_heads), "m.gguf");
        BOOST_REQUIRE(!check_sharding(*m, {0, 2}));
        check_group_matches_single(*m, 2);
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(four_shards_match_one_shard_where_the_model_divides) {
  test::temp_dir dir("tp_four");
  for (auto type : {dtype::f32, dtype::q8_0}) {
    BOOST_TEST_CONTEXT("type " << dtype_name(type)) {
      auto m = make_model(dir, tp_options(type, 8, 4), "m.gguf");
      BOOST_REQUIRE(!check_sharding(*m, {3, 4}));
      check_group_matches_single(*m, 4);
    }
  }
}

BOOST_AUTO_TEST_CASE(a_one_shard_layout_gives_the_same_bits_as_the_plain_engine) {
  test::temp_dir dir("tp_one");
  auto m = make_model(dir, tp_options(dtype::q8_0), "m.gguf");
  auto ps = prompts(*m);
  auto plain = run_greedy(*m, 1, ps, 8, true);
  // The same through the sharded constructor with a collective of one.
  greedy_run via;
  {
    collective coll(1);
    thread_pool pool(1);
    engine eng(*m, pool, {0, 1}, &coll);
    kv_pool kv(kv_layout_for(*m, shard_layout{0, 1}), 32ull << 20);
    kv_sequence seq(kv);
    std::vector<float> logits(m->config().vocab_size);
    seq_step st{&seq, ps[0].data(), static_cast<int32_t>(ps[0].size()), logits.data()};
    BOOST_REQUIRE(!eng.forward({&st, 1}));
    BOOST_TEST(
        std::memcmp(logits.data(), plain.logits[0][0].data(), logits.size() * sizeof(float)) == 0);
  }
}

BOOST_AUTO_TEST_CASE(two_shard_results_are_bit_identical_run_to_run_and_batch_independent) {
  test::temp_dir dir("tp_repeat");
  auto m = make_model(dir, tp_options(dtype::q8_0, 8, 2), "m.gguf");
  auto ps = prompts(*m);
  auto a = run_greedy(*m, 2, ps, 16, true);
  auto b = run_greedy(*m, 2, ps, 16, true);
  auto alone = run_greedy(*m, 2, ps, 16, false);
  require_no_errors(a);
  require_no_errors(b);
  require_no_errors(alone);
  BOOST_TEST(identical(a, b));
  BOOST_TEST(identical(a, alone));
  BOOST_TEST(a.tokens[0] != a.tokens[2]);
}

BOOST_AUTO_TEST_CASE(check_sharding_names_the_dimension_that_does_not_divide) {
  test::temp_dir dir("tp_check");
  auto gqa = make_model(dir, tp_options(dtype::f32, 8, 2), "gqa.gguf");
  BOOST_TEST(!check_sharding(*gqa, {1, 2}));
  auto heads = check_sharding(*gqa, {0, 3});
  BOOST_TEST(code_of(heads) == errc::bad_request);
  BOOST_TEST_MESSAGE(describe(heads));
  BOOST_TEST(message_of(heads).find("8 heads are not divisible by 3 shards") != std::string::npos);
  auto kv = check_sharding(*gqa, {0, 4});
  BOOST_TEST(code_of(kv) == errc::bad_request);
  BOOST_TEST(message_of(kv).find("2 kv heads are not divisible by 4 shards") != std::string::npos);
  BOOST_TEST(code_of(check_sharding(*gqa, {2, 2})) == errc::bad_request);
  BOOST_TEST(code_of(check_sharding(*gqa, {0, 0})) == errc::bad_request);

  auto o = tp_options(dtype::f32, 8, 8);
  o.ffn = 250;
  auto odd_ffn = make_model(dir, o, "ffn.gguf");
  auto ffn = check_sharding(*odd_ffn, {0, 4});
  BOOST_TEST(code_of(ffn) == errc::bad_request);
  BOOST_TEST(message_of(ffn).find("250 feed-forward columns") != std::string::npos);

  // Eight shards of a Q8_0 model: 16 columns of attn_output each, half a block.
  auto q8 = make_model(dir, tp_options(dtype::q8_0, 8, 8), "q8.gguf");
  BOOST_TEST(!check_sharding(*q8, {0, 4}));
  auto blocks = check_sharding(*q8, {0, 8});
  BOOST_TEST(code_of(blocks) == errc::bad_request);
  BOOST_TEST_MESSAGE(describe(blocks));
  BOOST_TEST(message_of(blocks).find("column slices of 16") != std::string::npos);
  BOOST_TEST(message_of(blocks).find("q8_0 block of 32") != std::string::npos);

  // An engine with such a layout, or without its collective, refuses every step.
  thread_pool pool(1);
  kv_pool kvp(kv_layout_for(*gqa, shard_layout{0, 2}), 8ull << 20);
  kv_sequence seq(kvp);
  int32_t tok = 5;
  seq_step st{&seq, &tok, 1, nullptr};
  engine bad(*gqa, pool, {0, 3}, nullptr);
  BOOST_TEST(code_of(bad.forward({&st, 1})) == errc::bad_request);
  engine alone(*gqa, pool, {0, 2}, nullptr);
  BOOST_TEST(code_of(alone.forward({&st, 1})) == errc::bad_request);
  collective three(3);
  engine wrong(*gqa, pool, {0, 2}, &three);
  BOOST_TEST(code_of(wrong.forward({&st, 1})) == errc::bad_request);
  // A KV pool of the whole model does not fit a shard.
  collective one(1);
  engine single(*gqa, pool, {0, 1}, &one);
  auto err = single.forward({&st, 1});
  BOOST_TEST(code_of(err) == errc::bad_request);
  BOOST_TEST(seq.length() == 0);
  BOOST_TEST(kvp.free_pages() == kvp.total_pages());
}

BOOST_AUTO_TEST_CASE(a_full_kv_pool_on_one_shard_makes_every_shard_refuse_the_step) {
  test::temp_dir dir("tp_overloaded");
  auto m = make_model(dir, tp_options(dtype::f32), "m.gguf");
  collective coll(2);
  std::vector<caf::error> first(2), second(2);
  std::vector<int64_t> lengths_after(2), free_after(2), total(2);
  auto ps = prompts(*m);
  on_threads(2, [&](int32_t rank) {
    thread_pool pool(1);
    engine eng(*m, pool, {rank, 2}, &coll);
    kv_pool kv(kv_layout_for(*m, shard_layout{rank, 2}), 8ull << 20);
    if (rank == 1) kv.fail_next_allocations(1);
    kv_sequence seq(kv);
    seq_step st{&seq, ps[1].data(), static_cast<int32_t>(ps[1].size()), nullptr};
    first[rank] = eng.forward({&st, 1});
    lengths_after[rank] = seq.length();
    free_after[rank] = kv.free_pages();
    total[rank] = kv.total_pages();
    second[rank] = eng.forward({&st, 1});
  });
  BOOST_TEST(code_of(first[0]) == errc::overloaded);
  BOOST_TEST(code_of(first[1]) == errc::overloaded);
  BOOST_TEST_MESSAGE(describe(first[0]));
  BOOST_TEST(lengths_after == (std::vector<int64_t>{0, 0}), boost::test_tools::per_element());
  BOOST_TEST(free_after == total, boost::test_tools::per_element());
  BOOST_TEST(!second[0]);
  BOOST_TEST(!second[1]);
}

BOOST_AUTO_TEST_CASE(a_rank_that_never_arrives_is_aborted_and_the_other_returns_disconnected) {
  test::temp_dir dir("tp_abort");
  auto m = make_model(dir, tp_options(dtype::f32), "m.gguf");
  collective coll(2);
  thread_pool pool(1);
  engine eng(*m, pool, {0, 2}, &coll);
  kv_pool kv(kv_layout_for(*m, shard_layout{0, 2}), 8ull << 20);
  kv_sequence seq(kv);
  auto ps = prompts(*m);
  std::vector<float> logits(m->config().vocab_size);
  seq_step st{&seq, ps[0].data(), static_cast<int32_t>(ps[0].size()), logits.data()};
  // Rank 1 "crashed": rank 0 waits for it inside forward until the group is aborted.
  auto f = std::async(std::launch::async, [&] { return eng.forward({&st, 1}); });
  BOOST_TEST((f.wait_for(200ms) == std::future_status::timeout));
  coll.abort();
  BOOST_REQUIRE((f.wait_for(10s) == std::future_status::ready));
  BOOST_TEST(code_of(f.get()) == errc::disconnected);
  BOOST_TEST(seq.length() == 0);
  BOOST_TEST(kv.free_pages() == kv.total_pages());
  // Later steps fail at once.
  BOOST_TEST(code_of(eng.forward({&st, 1})) == errc::disconnected);
}

BOOST_AUTO_TEST_CASE(an_abort_in_the_middle_of_a_forward_step_never_hangs_the_group) {
  test::temp_dir dir("tp_abort_mid");
  auto o = tp_options(dtype::f32);
  o.layers = 4;
  auto m = make_model(dir, o, "m.gguf");
  std::vector<int32_t> long_prompt(200);
  for (size_t i = 0; i < long_prompt.size(); ++i)
    long_prompt[i] = 3 + static_cast<int32_t>(i % 200);
  int32_t aborted_mid_step = 0;
  for (int attempt = 0; attempt < 20; ++attempt) {
    collective coll(2);
    std::vector<caf::error> errs(2);
    std::vector<int64_t> lengths(2);
    std::atomic<int32_t> started{0}, finished{0};
    std::vector<std::thread> ranks;
    for (int32_t rank = 0; rank < 2; ++rank) {
      ranks.emplace_back([&, rank] {
        thread_pool pool(1);
        engine eng(*m, pool, {rank, 2}, &coll);
        kv_pool kv(kv_layout_for(*m, shard_layout{rank, 2}), 16ull << 20);
        kv_sequence seq(kv);
        std::vector<float> logits(m->config().vocab_size);
        seq_step st{&seq, long_prompt.data(), static_cast<int32_t>(long_prompt.size()),
                    logits.data()};
        ++started;
        errs[rank] = eng.forward({&st, 1});
        lengths[rank] = seq.length();
        ++finished;
      });
    }
    while (started.load() < 2) std::this_thread::yield();
    // From at once to long after the step would have finished.
    std::this_thread::sleep_for(std::chrono::microseconds(attempt == 0 ? 0 : 25 << (attempt / 2)));
    coll.abort();
    // A hung rank fails the test (the process ends on the joinable threads) rather than hang.
    auto deadline = std::chrono::steady_clock::now() + 30s;
    while (finished.load() < 2 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(1ms);
    BOOST_REQUIRE(finished.load() == 2);
    for (auto& t : ranks) t.join();
    for (int32_t rank = 0; rank < 2; ++rank) {
      BOOST_TEST((!errs[rank] || code_of(errs[rank]) == errc::disconnected));
      // A step that failed left its sequence as it was.
      BOOST_TEST(lengths[rank] == (errs[rank] ? 0 : 200));
    }
    if (errs[0] || errs[1]) ++aborted_mid_step;
  }
  BOOST_TEST_MESSAGE(aborted_mid_step << " of 20 steps were cut short by the abort");
  BOOST_TEST(aborted_mid_step > 0);
}
