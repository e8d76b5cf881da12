#pragma once

// Shared helpers for Keel's Boost.Test executables.

#include <cstdlib>
#include <filesystem>
#include <string>

#include <unistd.h>

#include <boost/test/unit_test.hpp>

#include "base/error.hpp"
#include "kernels/synth.hpp"
#include "kernels/tokenizer.hpp"

namespace keel::test {

/// The description of an expected's error, or "" when it holds a value. Boost evaluates the
/// message of BOOST_REQUIRE_MESSAGE eagerly, so `describe(x.error())` there would read the error
/// of an engaged expected.
template <class T>
std::string why(const caf::expected<T>& x) {
  return x ? std::string() : keel::describe(x.error());
}

/// ../shared/data beside the checkout (see ../shared/data/README.md).
inline std::filesystem::path shared_data() {
  return KEEL_SHARED_DATA;
}

inline bool under_ci() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && std::string(ci) == "true";
}

/// Precondition for tests that need ../shared/data: missing data fails under CI (CI=true) and
/// skips the test elsewhere, with the reason.
struct needs_shared_data {
  boost::test_tools::assertion_result operator()(boost::unit_test::test_unit_id) const {
    if (std::filesystem::exists(shared_data() / "vocab")) return true;
    if (under_ci()) return true;  // let the test run and fail on the missing file
    boost::test_tools::assertion_result r(false);
    r.message() << "skipped: test data not found at " << shared_data().string();
    return r;
  }
};

/// Synthesizes a model with `o` and the built-in byte vocabulary into `path`; returns the path.
inline std::string write_model(const std::filesystem::path& path, const keel::synth_options& o) {
  auto w = keel::synthesize(o, keel::builtin_byte_vocab());
  BOOST_REQUIRE_MESSAGE(w, why(w));
  BOOST_REQUIRE(!w->write(path.string()));
  return path.string();
}

/// A fresh directory under the build tree, removed on destruction.
struct temp_dir {
  std::filesystem::path path;
  /// `name` made unique to this process: runs of one test executable may overlap.
  explicit temp_dir(const std::string& name) {
    auto pid = "-" + std::to_string(::getpid());
    auto unique = name.find(pid) == std::string::npos ? name + pid : name;
    path = std::filesystem::path(KEEL_BINARY_DIR) / "test-tmp" / unique;
    std::filesystem::remove_all(path);
    std::filesystem::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    std::filesystem::remove_all(path, ec);
  }
};

}  // namespace keel::test
