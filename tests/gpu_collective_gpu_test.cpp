#define BOOST_TEST_MODULE gpu_collective_gpu_test
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <string>
#include <thread>
#include <vector>

#include "kernels/gpu.hpp"

namespace gpu = keel::gpu;

namespace {

/// Precondition for tests that need `k` CUDA devices and NCCL: otherwise they report
/// "skipped: no GPU (<cuda error name>)", "skipped: needs 2 GPUs (found 1)" or
/// "skipped: NCCL not available".
struct needs_gpus {
  int k;
  boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
    std::string why;
    const auto devices = gpu::probe(&why);
    boost::test_tools::assertion_result r(false);
    if (devices.empty()) {
      r.message() << "skipped: no GPU (" << why.substr(0, why.find(':')) << ")";
    } else if (static_cast<int>(devices.size()) < k) {
      r.message() << "skipped: needs " << k << " GPUs (found " << devices.size() << ")";
    } else if (!gpu::nccl_group::available()) {
      r.message() << "skipped: NCCL not available";
    } else {
      return true;
    }
    return r;
  }
};

/// Rank r's input: small multiples of 0.25, so that every sum is exact in F32.
std::vector<float> rank_data(int rank, size_t n, int round) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    v[i] = static_cast<float>(static_cast<int>((i * 7 + round) % 1000) - 500 + 100 * rank) * 0.25f;
  }
  return v;
}

/// Runs `f` on another thread and gives up (ending the process, since a thread stuck in a
/// collective cannot be joined) if it does not finish within `limit`.
template <class F>
auto within(std::chrono::seconds limit, const char* what, F f) {
  auto fut = std::async(std::launch::async, std::move(f));
  if (fut.wait_for(limit) != std::future_status::ready) {
    std::fprintf(stderr, "error: %s did not return within %lld s\n", what,
                 static_cast<long long>(limit.count()));
    std::fflush(stderr);
    std::_Exit(1);
  }
  return fut.get();
}

}  // namespace

BOOST_AUTO_TEST_CASE(creating_a_group_without_usable_gpus_fails_cleanly_with_a_reason) {
  BOOST_TEST_MESSAGE("NCCL: " << gpu::nccl_group::version());
  std::string probe_why;
  const auto devices = gpu::probe(&probe_why);
  gpu::nccl_group group;
  std::string why;
  // With no GPU any device list fails; with GPUs, one past the last device does.
  const int bad = static_cast<int>(devices.size());
  const int rc = devices.empty() ? group.init({0, 1}, &why) : group.init({0, bad}, &why);
  BOOST_TEST(rc != gpu::status_ok);
  BOOST_TEST(!why.empty());
  BOOST_TEST(!gpu::status_string(rc).empty());
  BOOST_TEST_MESSAGE("init failed as expected: " << gpu::status_string(rc) << " / " << why);
  if (!gpu::nccl_group::available()) BOOST_TEST(rc == gpu::status_nccl_unavailable);
  BOOST_TEST(group.size() == 0);
  BOOST_TEST(group.device(0) == -1);

  // An empty group rejects calls without crashing; abort is harmless and sticks.
  gpu::buffer empty;
  BOOST_TEST(group.all_reduce_sum(0, empty, 0) != gpu::status_ok);
  BOOST_TEST(!group.aborted());
  group.abort();
  group.abort();
  BOOST_TEST(group.aborted());

  BOOST_TEST(gpu::status_string(gpu::status_aborted) == "aborted");
  BOOST_TEST(gpu::status_string(gpu::status_nccl_unavailable).find("NCCL not available") == 0u);
  BOOST_TEST(gpu::status_string(gpu::status_nccl_base - 1).find("ncclUnhandledCudaError") == 0u);
}

BOOST_AUTO_TEST_CASE(all_reduce_sums_known_data_across_two_ranks_on_two_threads,
                     *boost::unit_test::precondition(needs_gpus{2})) {
  gpu::nccl_group group;
  std::string why;
  BOOST_REQUIRE_MESSAGE(group.init({0, 1}, &why) == gpu::status_ok, why);
  BOOST_REQUIRE_EQUAL(group.size(), 2);

  const std::vector<size_t> sizes = {1, 1000, 1u << 20, 3};  // reuse across rounds and sizes
  struct result {
    std::vector<std::string> errors;
    std::vector<std::vector<float>> outputs;  // one per round
  };
  auto run_rank = [&](int rank) {
    result out;
    if (int s = gpu::use_device(group.device(rank)); s != gpu::status_ok) {
      out.errors.push_back("use_device: " + gpu::status_string(s));
      return out;
    }
    for (size_t round = 0; round < sizes.size(); ++round) {
      const size_t n = sizes[round];
      const auto in = rank_data(rank, n, static_cast<int>(round));
      gpu::buffer b;
      int s = b.allocate((n + 16) * sizeof(float));  // larger than n: only n is reduced
      if (s == gpu::status_ok) s = b.upload(in.data(), n * sizeof(float));
      if (s == gpu::status_ok) s = group.all_reduce_sum(rank, b, static_cast<int64_t>(n));
      std::vector<float> got(n);
      if (s == gpu::status_ok) s = b.download(got.data(), n * sizeof(float));
      if (s != gpu::status_ok) {
        out.errors.push_back("round " + std::to_string(round) + ": " + gpu::status_string(s));
        group.abort();  // do not leave the other rank waiting
        return out;
      }
      out.outputs.push_back(std::move(got));
    }
    return out;
  };
  auto [r0, r1] = within(std::chrono::seconds(120), "two-rank all_reduce", [&] {
    auto f1 = std::async(std::launch::async, run_rank, 1);
    auto a = run_rank(0);
    return std::pair(std::move(a), f1.get());
  });
  for (const auto& e : r0.errors) BOOST_ERROR("rank 0: " << e);
  for (const auto& e : r1.errors) BOOST_ERROR("rank 1: " << e);
  BOOST_REQUIRE_EQUAL(r0.outputs.size(), sizes.size());
  BOOST_REQUIRE_EQUAL(r1.outputs.size(), sizes.size());
  for (size_t round = 0; round < sizes.size(); ++round) {
    const auto a = rank_data(0, sizes[round], static_cast<int>(round));
    const auto b = rank_data(1, sizes[round], static_cast<int>(round));
    int bad = 0;
    for (size_t i = 0; i < sizes[round]; ++i) {
      const double want = static_cast<double>(a[i]) + b[i];
      for (const auto* got : {&r0.outputs[round], &r1.outputs[round]}) {
        if (!(std::abs((*got)[i] - want) <= 1e-6) && ++bad <= 5) {
          BOOST_ERROR("round " << round << " element " << i << ": got " << (*got)[i]
                               << ", want " << want);
        }
      }
    }
    BOOST_TEST(bad == 0, "round " << round << ": " << bad << " wrong elements");
    // Ring and Tree broadcast the reduced value: both ranks hold the same bits.
    BOOST_TEST(r0.outputs[round] == r1.outputs[round]);
  }
}

BOOST_AUTO_TEST_CASE(abort_wakes_a_rank_blocked_in_all_reduce,
                     *boost::unit_test::precondition(needs_gpus{2})) {
  gpu::nccl_group group;
  std::string why;
  BOOST_REQUIRE_MESSAGE(group.init({0, 1}, &why) == gpu::status_ok, why);

  std::promise<void> started;
  auto blocked = std::async(std::launch::async, [&] {
    int s = gpu::use_device(group.device(0));
    gpu::buffer b;
    if (s == gpu::status_ok) s = b.allocate(4096 * sizeof(float));
    started.set_value();
    if (s != gpu::status_ok) return s;
    return group.all_reduce_sum(0, b, 4096);  // rank 1 never arrives
  });
  started.get_future().wait();
  std::this_thread::sleep_for(std::chrono::milliseconds(500));
  BOOST_TEST((blocked.wait_for(std::chrono::seconds(0)) == std::future_status::timeout),
             "rank 0 returned although rank 1 never called");
  group.abort();
  const int s = within(std::chrono::seconds(60), "aborted all_reduce", [&] { return blocked.get(); });
  BOOST_TEST(s == gpu::status_aborted, "rank 0 got " << gpu::status_string(s));
  BOOST_TEST(group.aborted());

  // Later calls fail at once.
  gpu::buffer b1;
  BOOST_REQUIRE_EQUAL(gpu::status_string(gpu::use_device(group.device(1))), "ok");
  BOOST_REQUIRE_EQUAL(gpu::status_string(b1.allocate(16 * sizeof(float))), "ok");
  BOOST_TEST(group.all_reduce_sum(1, b1, 16) == gpu::status_aborted);
}
