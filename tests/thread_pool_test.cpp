#define BOOST_TEST_MODULE thread_pool_test
#include <boost/test/unit_test.hpp>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "kernels/ops.hpp"
#include "kernels/thread_pool.hpp"

using namespace keel;

BOOST_AUTO_TEST_CASE(every_index_runs_exactly_once_in_contiguous_parts) {
  for (int threads : {1, 2, 3, 4, 7}) {
    thread_pool pool(threads);
    BOOST_TEST(pool.size() == threads);
    for (int64_t n : {0, 1, 2, 3, 5, 6, 7, 64, 1000, 1001}) {
      for (int64_t grain : {1, 4, 16}) {
        for (int iter = 0; iter < 50; ++iter) {
          std::vector<std::atomic<int>> hits(static_cast<size_t>(n));
          std::atomic<int> calls{0}, empty{0};
          pool.parallel_for(
              n,
              [&](int64_t b, int64_t e) {  // Boost.Test is not thread-safe: assert afterwards
                empty.fetch_add(b >= e);
                calls.fetch_add(1);
                for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
              },
              grain);
          int bad = 0;
          for (auto& h : hits) bad += h.load() != 1;
          BOOST_TEST(bad == 0, "threads " << threads << " n " << n << " grain " << grain);
          BOOST_TEST(calls.load() <= threads);
          BOOST_TEST(empty.load() == 0);
        }
      }
    }
  }
}

BOOST_AUTO_TEST_CASE(parts_are_rounded_to_the_grain_and_the_caller_takes_the_first) {
  thread_pool pool(3);
  std::mutex mu;
  std::vector<std::pair<int64_t, int64_t>> parts;
  std::thread::id first;
  pool.parallel_for(
      100,
      [&](int64_t b, int64_t e) {
        std::lock_guard<std::mutex> lk(mu);
        parts.emplace_back(b, e);
        if (b == 0) first = std::this_thread::get_id();
      },
      8);
  std::sort(parts.begin(), parts.end());
  BOOST_TEST(parts.size() == 3u);
  for (size_t i = 0; i < parts.size(); ++i) {
    BOOST_TEST(parts[i].first % 8 == 0);
    if (i > 0) BOOST_TEST(parts[i].first == parts[i - 1].second);
  }
  BOOST_TEST(parts.back().second == 100);
  BOOST_TEST((first == std::this_thread::get_id()));
}

BOOST_AUTO_TEST_CASE(many_back_to_back_loops_with_idle_gaps_complete) {
  thread_pool pool(4);
  int64_t total = 0;
  std::atomic<int64_t> sum{0};
  for (int iter = 0; iter < 20000; ++iter) {
    if (iter % 5000 == 0) std::this_thread::sleep_for(std::chrono::milliseconds(5));  // sleepers
    pool.parallel_for(10, [&](int64_t b, int64_t e) { sum.fetch_add(e - b); });
    total += 10;
  }
  BOOST_TEST(sum.load() == total);
}

BOOST_AUTO_TEST_CASE(threaded_matmul_equals_single_threaded_bit_for_bit) {
  std::mt19937 rng(2);
  std::uniform_int_distribution<int> q(-127, 127);
  const int64_t rows = 203, cols = 512, nb = 5;
  std::vector<block_q8_0> w(static_cast<size_t>(rows * cols / 32));
  for (auto& b : w) {
    b.d = f32_to_fp16(0.01f * static_cast<float>(q(rng) + 128));
    for (auto& v : b.qs) v = static_cast<int8_t>(q(rng));
  }
  std::vector<float> x(static_cast<size_t>(nb * cols));
  std::normal_distribution<float> nd;
  for (auto& v : x) v = nd(rng);
  matrix_view m = make_matrix(dtype::q8_0, w.data(), rows, cols);
  std::vector<float> one(static_cast<size_t>(nb * rows));
  matmul(m, x.data(), cols, nb, one.data(), rows, 0, rows);
  for (int threads : {2, 3, 4}) {
    thread_pool pool(threads);
    std::vector<float> many(one.size(), -1.0f);
    matmul(pool, m, x.data(), cols, nb, many.data(), rows);
    BOOST_TEST(std::memcmp(one.data(), many.data(), one.size() * 4) == 0);
    std::fill(many.begin(), many.end(), -1.0f);
    pool.parallel_for(rows, [&](int64_t r0, int64_t r1) {  // odd splits, not on 4-row tiles
      matmul(m, x.data(), cols, nb, many.data(), rows, r0, r1);
    });
    BOOST_TEST(std::memcmp(one.data(), many.data(), one.size() * 4) == 0);
  }
}

BOOST_AUTO_TEST_CASE(memory_bandwidth_measures_a_positive_rate) {
  thread_pool pool(2);
  double bw = measure_memory_bandwidth(pool, 8u << 20);
  BOOST_TEST_MESSAGE("streaming read, 8 MiB, 2 threads: " << bw / 1e9 << " GB/s");
  BOOST_TEST(bw > 1e8);
}
