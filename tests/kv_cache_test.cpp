#define BOOST_TEST_MODULE kv_cache_test
#include <boost/test/unit_test.hpp>

#include <set>
#include <thread>
#include <utility>
#include <vector>

#include "base/error.hpp"
#include "kernels/kv_cache.hpp"
#include "tests/test_support.hpp"

using namespace keel;

namespace {

// 2 layers x 2 heads x 4 dims, 16 slots: 2 * 2 * 2 * 4 * 16 * 4 bytes = 2048 bytes a page.
constexpr kv_layout small{2, 2, 4, 16};
constexpr uint64_t small_page = 2048;

// A value unique to (layer, pos, kv, element), exactly representable as a float.
float mark(int32_t layer, int64_t pos, int kv, int e) {
  return static_cast<float>(((layer * 4096 + pos) * 2 + kv) * 8 + e);
}

void fill(kv_sequence& s, int64_t begin, int64_t end) {
  for (int32_t layer = 0; layer < small.n_layers; ++layer)
    for (int64_t pos = begin; pos < end; ++pos)
      for (int e = 0; e < 8; ++e) {
        s.key(layer, pos)[e] = mark(layer, pos, 0, e);
        s.value(layer, pos)[e] = mark(layer, pos, 1, e);
      }
}

int64_t count_mismatches(kv_sequence& s, int64_t begin, int64_t end) {
  int64_t bad = 0;
  for (int32_t layer = 0; layer < small.n_layers; ++layer)
    for (int64_t pos = begin; pos < end; ++pos)
      for (int e = 0; e < 8; ++e) {
        bad += s.key(layer, pos)[e] != mark(layer, pos, 0, e);
        bad += s.value(layer, pos)[e] != mark(layer, pos, 1, e);
      }
  return bad;
}

}  // namespace

BOOST_AUTO_TEST_CASE(page_count_follows_the_budget) {
  kv_pool pool(small, 10 * small_page + small_page / 2);
  BOOST_TEST(pool.page_bytes() == small_page);
  BOOST_TEST(pool.total_pages() == 10);
  BOOST_TEST(pool.free_pages() == 10);
  BOOST_TEST(kv_dim(small) == 8);
  BOOST_TEST(pages_for(small, 0) == 0);
  BOOST_TEST(pages_for(small, 1) == 1);
  BOOST_TEST(pages_for(small, 16) == 1);
  BOOST_TEST(pages_for(small, 17) == 2);

  kv_pool tiny(small, small_page - 1);
  BOOST_TEST(tiny.total_pages() == 0);
  auto page = tiny.allocate();
  BOOST_REQUIRE(!page);
  BOOST_TEST(describe(page.error()) == "overloaded: KV cache full: 0 of 0 pages in use");

  kv_pool invalid(kv_layout{2, 0, 4, 16}, 1 << 20);
  BOOST_TEST(invalid.total_pages() == 0);
  BOOST_TEST(!invalid.allocate());
}

BOOST_AUTO_TEST_CASE(allocate_until_exhausted_reports_overloaded_and_release_recovers) {
  kv_pool pool(small, 4 * small_page);
  std::set<int32_t> pages;
  for (int i = 0; i < 4; ++i) {
    auto page = pool.allocate();
    BOOST_REQUIRE(page);
    pages.insert(*page);
  }
  BOOST_TEST(pages.size() == 4u);
  BOOST_TEST(pool.free_pages() == 0);
  for (int i = 0; i < 3; ++i) {
    auto page = pool.allocate();
    BOOST_REQUIRE(!page);
    BOOST_TEST((code_of(page.error()) == errc::overloaded),
               "not overloaded: " << keel::test::why(page));
    BOOST_TEST(message_of(page.error()) == "KV cache full: 4 of 4 pages in use");
  }
  pool.release(2);
  BOOST_TEST(pool.free_pages() == 1);
  pool.release(2);   // double release is ignored
  pool.release(-1);  // so are pages that do not exist
  pool.release(99);
  BOOST_TEST(pool.free_pages() == 1);
  auto again = pool.allocate();
  BOOST_REQUIRE(again);
  BOOST_TEST(*again == 2);
}

BOOST_AUTO_TEST_CASE(pages_hold_every_slot_without_overlap) {
  kv_pool pool(small, 3 * small_page);
  kv_sequence s(pool);
  BOOST_REQUIRE(!s.reserve(48));
  fill(s, 0, 48);
  BOOST_TEST(count_mismatches(s, 0, 48) == 0);
  // K and V of one slot, and consecutive slots, are kv_dim floats apart.
  BOOST_TEST(s.key(0, 1) - s.key(0, 0) == 8);
  BOOST_TEST(s.value(0, 0) - s.key(0, 0) == 16 * 8);
}

BOOST_AUTO_TEST_CASE(reserve_is_all_or_nothing) {
  kv_pool pool(small, 10 * small_page);
  kv_sequence a(pool), b(pool);
  BOOST_REQUIRE(!a.reserve(100));  // 7 pages
  BOOST_TEST(a.page_count() == 7u);
  BOOST_TEST(a.capacity() == 112);
  BOOST_TEST(!a.reserve(50));  // already covered: takes nothing
  BOOST_TEST(a.page_count() == 7u);

  auto err = b.reserve(64);  // 4 pages, only 3 free
  BOOST_TEST((code_of(err) == errc::overloaded), describe(err));
  BOOST_TEST(b.page_count() == 0u);
  BOOST_TEST(pool.free_pages() == 3);

  // A failure part-way through returns the pages that call took, and keeps older ones.
  BOOST_REQUIRE(!b.reserve(1));
  pool.fail_next_allocations(1, 1);
  err = b.reserve(48);  // needs 2 more: the first succeeds, the second fails
  BOOST_TEST((code_of(err) == errc::overloaded), describe(err));
  BOOST_TEST(message_of(err) == "KV cache full (injected fault): 9 of 10 pages in use");
  BOOST_TEST(b.page_count() == 1u);
  BOOST_TEST(pool.free_pages() == 2);
  BOOST_TEST(!b.reserve(48));
  BOOST_TEST(pool.free_pages() == 0);
}

BOOST_AUTO_TEST_CASE(data_reads_back_after_more_reservations) {
  kv_pool pool(small, 64 * small_page);
  kv_sequence a(pool), b(pool);
  BOOST_REQUIRE(!a.reserve(20));
  fill(a, 0, 20);
  a.set_length(20);
  float* first = a.key(1, 5);
  // Interleave another sequence so a's pages are not contiguous.
  for (int64_t n = 16; n <= 160; n += 16) {
    BOOST_REQUIRE(!b.reserve(n));
    BOOST_REQUIRE(!a.reserve(20 + n));
  }
  BOOST_TEST(a.key(1, 5) == first);  // pages do not move
  BOOST_TEST(count_mismatches(a, 0, 20) == 0);
  BOOST_TEST(a.length() == 20);
  fill(a, 20, a.capacity());
  fill(b, 0, b.capacity());  // b's writes land in b's pages only
  BOOST_TEST(count_mismatches(a, 0, a.capacity()) == 0);
}

BOOST_AUTO_TEST_CASE(fault_injection_fails_the_next_allocations) {
  kv_pool pool(small, 8 * small_page);
  pool.fail_next_allocations(2);
  BOOST_TEST(!pool.allocate());
  kv_sequence s(pool);
  auto err = s.reserve(10);
  BOOST_TEST((code_of(err) == errc::overloaded), describe(err));
  BOOST_TEST(s.page_count() == 0u);
  BOOST_TEST(pool.free_pages() == 8);
  BOOST_TEST(!s.reserve(10));  // the fault has passed
  pool.fail_next_allocations(5);
  pool.fail_next_allocations(0);  // cancelled
  BOOST_TEST(!!pool.allocate());
}

BOOST_AUTO_TEST_CASE(destruction_releases_pages) {
  kv_pool pool(small, 8 * small_page);
  {
    kv_sequence s(pool);
    BOOST_REQUIRE(!s.reserve(100));
    BOOST_TEST(pool.free_pages() == 1);
  }
  BOOST_TEST(pool.free_pages() == 8);

  // Moving hands the pages over; only the final owner releases them, once.
  kv_sequence outer(pool);
  {
    kv_sequence s(pool);
    BOOST_REQUIRE(!s.reserve(40));
    kv_sequence moved(std::move(s));
    BOOST_TEST(s.page_count() == 0u);
    BOOST_TEST(moved.page_count() == 3u);
    BOOST_REQUIRE(!outer.reserve(16));
    outer = std::move(moved);  // outer's own page goes back
    BOOST_TEST(pool.free_pages() == 5);
  }
  BOOST_TEST(outer.page_count() == 3u);
  BOOST_TEST(pool.free_pages() == 5);
  outer.clear();
  BOOST_TEST(pool.free_pages() == 8);
  BOOST_TEST(outer.capacity() == 0);
}

BOOST_AUTO_TEST_CASE(truncate_releases_pages_no_longer_needed) {
  kv_pool pool(small, 8 * small_page);
  kv_sequence s(pool);
  BOOST_REQUIRE(!s.reserve(64));
  s.set_length(50);
  fill(s, 0, 50);
  s.truncate(20);
  BOOST_TEST(s.length() == 20);
  BOOST_TEST(s.page_count() == 2u);
  BOOST_TEST(pool.free_pages() == 6);
  BOOST_TEST(count_mismatches(s, 0, 20) == 0);
  s.truncate(16);
  BOOST_TEST(s.page_count() == 1u);
  s.truncate(0);
  BOOST_TEST(s.page_count() == 0u);
  BOOST_TEST(pool.free_pages() == 8);

  // Pages reserved ahead of the length are given back too.
  BOOST_REQUIRE(!s.reserve(64));
  s.set_length(10);
  s.truncate(10);
  BOOST_TEST(s.length() == 10);
  BOOST_TEST(s.page_count() == 1u);
  s.set_length(1000);  // clamped to the capacity
  BOOST_TEST(s.length() == 16);
}

BOOST_AUTO_TEST_CASE(distinct_slots_can_be_written_from_different_threads) {
  kv_pool pool(small, 16 * small_page);
  kv_sequence s(pool);
  BOOST_REQUIRE(!s.reserve(256));
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) threads.emplace_back([&s, t] { fill(s, t * 64, (t + 1) * 64); });
  for (auto& th : threads) th.join();
  BOOST_TEST(count_mismatches(s, 0, 256) == 0);
}
