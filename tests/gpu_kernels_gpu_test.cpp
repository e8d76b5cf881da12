#define BOOST_TEST_MODULE gpu_kernels_gpu_test
#include <boost/test/unit_test.hpp>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "kernels/dtype.hpp"
#include "kernels/gpu.hpp"
#include "kernels/ops.hpp"

namespace gpu = keel::gpu;
using keel::dtype;

namespace {

/// Precondition for tests that need a CUDA device: without one they report
/// "skipped: no GPU (<cuda error name>)".
struct needs_gpu {
  boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
    std::string why;
    if (!gpu::probe(&why).empty()) return true;
    boost::test_tools::assertion_result r(false);
    r.message() << "skipped: no GPU (" << why.substr(0, why.find(':')) << ")";
    return r;
  }
};

std::vector<float> random_floats(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

gpu::buffer to_device(const void* data, size_t bytes) {
  gpu::buffer b;
  BOOST_REQUIRE_EQUAL(gpu::status_string(b.allocate(bytes)), "ok");
  BOOST_REQUIRE_EQUAL(gpu::status_string(b.upload(data, bytes)), "ok");
  return b;
}

gpu::buffer to_device(const std::vector<float>& v) {
  return to_device(v.data(), v.size() * sizeof(float));
}

std::vector<float> to_host(const gpu::buffer& b, size_t n) {
  std::vector<float> v(n);
  BOOST_REQUIRE_EQUAL(gpu::status_string(gpu::synchronize()), "ok");
  BOOST_REQUIRE_EQUAL(gpu::status_string(b.download(v.data(), n * sizeof(float))), "ok");
  return v;
}

/// Checks |got - want| <= tol * scale element-wise, where scale[i] is the size of the terms that
/// produced want[i] (so cancellation does not turn rounding noise into a large relative error).
void check_close(const std::vector<float>& got, const std::vector<float>& want,
                 const std::vector<float>& scale, float tol, const std::string& what) {
  BOOST_REQUIRE_EQUAL(got.size(), want.size());
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const float err = std::fabs(got[i] - want[i]);
    if (!(err <= tol * scale[i])) {
      if (++bad <= 5) {
        BOOST_ERROR(what << ": element " << i << ": gpu " << got[i] << ", cpu " << want[i]
                         << ", error " << err << " > " << tol << " * " << scale[i]);
      }
    }
  }
  BOOST_TEST(bad == 0, what << ": " << bad << " of " << got.size() << " elements differ");
}

/// Relative comparison: scale is |want| with a floor for values near zero.
void check_relative(const std::vector<float>& got, const std::vector<float>& want, float tol,
                    const std::string& what) {
  std::vector<float> scale(want.size());
  for (size_t i = 0; i < want.size(); ++i) scale[i] = std::max(std::fabs(want[i]), 1e-6f);
  check_close(got, want, scale, tol, what);
}

}  // namespace

BOOST_AUTO_TEST_CASE(probe_reports_no_device_with_a_reason_instead_of_crashing) {
  std::string why;
  auto devices = gpu::probe(&why);
  if (devices.empty()) {
    BOOST_TEST_MESSAGE("no GPU: " << why);
    BOOST_TEST(!why.empty());
    // With no device, allocation fails with a CUDA status, not a crash.
    gpu::buffer b;
    const int status = b.allocate(1024);
    BOOST_TEST(status > 0);
    BOOST_TEST(b.empty());
    BOOST_TEST(gpu::status_string(status).rfind("cudaError", 0) == 0);
  } else {
    for (const auto& d : devices) {
      BOOST_TEST_MESSAGE("device " << d.index << ": " << d.name << ", sm_" << d.sm_major
                                   << d.sm_minor << ", " << (d.total_bytes >> 20) << " MiB");
      BOOST_TEST(!d.name.empty());
      BOOST_TEST(d.total_bytes > 0u);
      BOOST_TEST(d.sm_major >= 7);
    }
  }
  BOOST_TEST(gpu::probe(nullptr).size() == devices.size());
}

BOOST_AUTO_TEST_CASE(ops_reject_arguments_that_break_their_contract) {
  // Checked before any CUDA call, so this runs with or without a device.
  gpu::buffer empty;
  BOOST_TEST(gpu::matmul(dtype::q4_0, empty, 0, 0, empty, 0, empty) == gpu::status_bad_argument);
  BOOST_TEST(gpu::matmul(dtype::q8_0, empty, 1, 33, empty, 1, empty) == gpu::status_bad_argument);
  BOOST_TEST(gpu::matmul(dtype::f32, empty, 4, 8, empty, 1, empty) == gpu::status_bad_argument);
  BOOST_TEST(gpu::matmul(dtype::f32, empty, 0, 8, empty, 0, empty) == gpu::status_ok);
  BOOST_TEST(gpu::rmsnorm(empty, empty, empty, 8, 1, 1e-5f) == gpu::status_bad_argument);
  BOOST_TEST(gpu::softmax(empty, 8, 1) == gpu::status_bad_argument);
  BOOST_TEST(gpu::silu_mul(empty, empty, 8) == gpu::status_bad_argument);
  BOOST_TEST(gpu::rope(empty, 1, 1, 3, 0, 10000.0f) == gpu::status_bad_argument);
  float host[4] = {};
  BOOST_TEST(empty.upload(host, sizeof host) == gpu::status_bad_argument);
  BOOST_TEST(empty.download(host, sizeof host) == gpu::status_bad_argument);
  BOOST_TEST(gpu::status_string(gpu::status_bad_argument) == "bad_argument");
}

BOOST_AUTO_TEST_CASE(buffer_round_trips_bytes_and_moves_ownership,
                     *boost::unit_test::precondition(needs_gpu())) {
  std::vector<uint8_t> bytes(1000);
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<uint8_t>(i * 7);
  gpu::buffer a = to_device(bytes.data(), bytes.size());
  BOOST_TEST(a.upload(bytes.data() + 10, 5, 500) == gpu::status_ok);
  BOOST_TEST(a.upload(bytes.data(), 2, 999) == gpu::status_bad_argument);
  gpu::buffer b = std::move(a);
  BOOST_TEST(a.empty());
  BOOST_TEST(b.size() == 1000u);
  std::vector<uint8_t> back(1000);
  BOOST_TEST(b.download(back.data(), back.size()) == gpu::status_ok);
  std::vector<uint8_t> want = bytes;
  std::copy(bytes.begin() + 10, bytes.begin() + 15, want.begin() + 500);
  BOOST_TEST(back == want, boost::test_tools::per_element());
}

namespace {

struct matmul_case {
  dtype type;
  int64_t rows, cols, nb;
  float tol;
};

void check_matmul(const matmul_case& c) {
  const std::string what = std::string(keel::dtype_name(c.type)) + " " + std::to_string(c.rows) +
                           "x" + std::to_string(c.cols) + " nb=" + std::to_string(c.nb);
  // Weights in the type's encoding, produced by the CPU quantiser.
  const auto layout = keel::layout_of(c.type);
  BOOST_REQUIRE(layout);
  const size_t row_bytes = keel::bytes_of(*layout, c.cols);
  std::vector<uint8_t> w(row_bytes * c.rows);
  const auto wf = random_floats(size_t(c.rows * c.cols), 1 + c.rows + c.cols);
  for (int64_t r = 0; r < c.rows; ++r) {
    keel::quantize_row(c.type, wf.data() + r * c.cols, c.cols, w.data() + r * row_bytes);
  }
  const auto x = random_floats(size_t(c.nb * c.cols), 2 + c.nb);

  const auto m = keel::make_matrix(c.type, w.data(), c.rows, c.cols);
  std::vector<float> want(size_t(c.nb * c.rows));
  keel::matmul(m, x.data(), c.cols, c.nb, want.data(), c.rows, 0, c.rows);

  // The tolerance is relative to sum |w x|, the size of the terms of each dot product.
  std::vector<float> scale(want.size());
  std::vector<float> row(size_t(c.cols));
  for (int64_t r = 0; r < c.rows; ++r) {
    keel::dequantize_row(m, r, row.data());
    for (int64_t b = 0; b < c.nb; ++b) {
      double s = 0;
      for (int64_t j = 0; j < c.cols; ++j) s += std::fabs(double(row[j]) * x[b * c.cols + j]);
      scale[b * c.rows + r] = static_cast<float>(std::max(s, 1e-6));
    }
  }

  gpu::buffer dw = to_device(w.data(), w.size());
  gpu::buffer dx = to_device(x);
  gpu::buffer dy;
  BOOST_REQUIRE(dy.allocate(want.size() * sizeof(float)) == gpu::status_ok);
  BOOST_REQUIRE_EQUAL(gpu::status_string(gpu::matmul(c.type, dw, c.rows, c.cols, dx, c.nb, dy)),
                      "ok");
  check_close(to_host(dy, want.size()), want, scale, c.tol, what);
}

}  // namespace

BOOST_AUTO_TEST_CASE(matmul_matches_cpu_for_every_type_and_batch,
                     *boost::unit_test::precondition(needs_gpu())) {
  // Batches of 1 (decode kernel), 3 (one partial batch tile) and 19 (several tiles); row counts
  // that do not fill the last block; column counts that need the scalar path (F32/F16/BF16).
  const std::vector<matmul_case> cases = {
      {dtype::f32, 67, 256, 1, 1e-4f},   {dtype::f32, 67, 256, 19, 1e-4f},
      {dtype::f32, 33, 101, 3, 1e-4f},   {dtype::f16, 67, 512, 1, 1e-3f},
      {dtype::f16, 45, 512, 19, 1e-3f},  {dtype::f16, 33, 100, 3, 1e-3f},
      {dtype::bf16, 67, 512, 1, 1e-3f},  {dtype::bf16, 45, 512, 19, 1e-3f},
      {dtype::bf16, 33, 100, 3, 1e-3f},  {dtype::q8_0, 67, 512, 1, 1e-3f},
      {dtype::q8_0, 45, 4096, 3, 1e-3f}, {dtype::q8_0, 130, 96, 19, 1e-3f},
  };
  for (const auto& c : cases) check_matmul(c);
}

BOOST_AUTO_TEST_CASE(rmsnorm_matches_cpu, *boost::unit_test::precondition(needs_gpu())) {
  const int64_t n = 1000, nrows = 5;
  const float eps = 1e-5f;
  const auto x = random_floats(size_t(n * nrows), 11, -3.0f, 3.0f);
  const auto weight = random_floats(size_t(n), 12, 0.5f, 1.5f);
  std::vector<float> want(x.size());
  for (int64_t r = 0; r < nrows; ++r) {
    keel::rmsnorm(want.data() + r * n, x.data() + r * n, weight.data(), n, eps);
  }
  gpu::buffer dx = to_device(x);
  gpu::buffer dw = to_device(weight);
  gpu::buffer out;
  BOOST_REQUIRE(out.allocate(x.size() * sizeof(float)) == gpu::status_ok);
  BOOST_REQUIRE(gpu::rmsnorm(out, dx, dw, n, nrows, eps) == gpu::status_ok);
  check_relative(to_host(out, want.size()), want, 1e-4f, "rmsnorm");
  // In place (out is x).
  BOOST_REQUIRE(gpu::rmsnorm(dx, dx, dw, n, nrows, eps) == gpu::status_ok);
  check_relative(to_host(dx, want.size()), want, 1e-4f, "rmsnorm in place");
}

BOOST_AUTO_TEST_CASE(softmax_matches_cpu, *boost::unit_test::precondition(needs_gpu())) {
  const int64_t n = 777, nrows = 4;
  auto x = random_floats(size_t(n * nrows), 21, -20.0f, 20.0f);
  gpu::buffer dx = to_device(x);
  for (int64_t r = 0; r < nrows; ++r) keel::softmax(x.data() + r * n, n);
  BOOST_REQUIRE(gpu::softmax(dx, n, nrows) == gpu::status_ok);
  const auto got = to_host(dx, x.size());
  // Values far below the max underflow differently; compare relative to the row's max term too.
  std::vector<float> scale(x.size());
  for (size_t i = 0; i < x.size(); ++i) scale[i] = std::max(std::fabs(x[i]), 1e-30f);
  check_close(got, x, scale, 1e-4f, "softmax");
  for (int64_t r = 0; r < nrows; ++r) {
    double s = 0;
    for (int64_t i = 0; i < n; ++i) s += got[r * n + i];
    BOOST_TEST(std::fabs(s - 1.0) < 1e-5);
  }
}

BOOST_AUTO_TEST_CASE(silu_mul_matches_cpu, *boost::unit_test::precondition(needs_gpu())) {
  const int64_t n = 5003;
  auto gate = random_floats(size_t(n), 31, -8.0f, 8.0f);
  const auto up = random_floats(size_t(n), 32, -2.0f, 2.0f);
  gpu::buffer dg = to_device(gate);
  gpu::buffer du = to_device(up);
  keel::silu_mul(gate.data(), up.data(), n);
  BOOST_REQUIRE(gpu::silu_mul(dg, du, n) == gpu::status_ok);
  check_relative(to_host(dg, gate.size()), gate, 1e-4f, "silu_mul");
}

BOOST_AUTO_TEST_CASE(rope_matches_cpu_at_consecutive_positions,
                     *boost::unit_test::precondition(needs_gpu())) {
  const int n_heads = 4, head_dim = 64;
  const int64_t nb = 3, pos0 = 37;
  const float theta = 10000.0f;
  const int64_t row = int64_t(n_heads) * head_dim;
  auto x = random_floats(size_t(nb * row), 41);
  // A pair's rotated values have the size |x0| + |x1| at most.
  std::vector<float> scale(x.size());
  for (size_t i = 0; i < x.size(); i += 2) {
    scale[i] = scale[i + 1] = std::fabs(x[i]) + std::fabs(x[i + 1]);
  }
  gpu::buffer dx = to_device(x);
  for (int64_t b = 0; b < nb; ++b)
    keel::rope(x.data() + b * row, n_heads, head_dim, pos0 + b, theta);
  BOOST_REQUIRE(gpu::rope(dx, nb, n_heads, head_dim, pos0, theta) == gpu::status_ok);
  check_close(to_host(dx, x.size()), x, scale, 1e-4f, "rope");
}
