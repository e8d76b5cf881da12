#pragma once

// Shared helpers for Keel's Boost.Test executables.

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>
#include <string>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
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
/// The whole file at `p` (the test fails when it cannot be opened).
inline std::string read_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  BOOST_REQUIRE_MESSAGE(in, "cannot open " << p);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

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

/// A model small enough for tests of real keel-node processes: one layer, 64 wide.
inline keel::synth_options tiny_model() {
  keel::synth_options o;
  o.dim = 64;
  o.layers = 1;
  o.heads = 4;
  o.kv_heads = 2;
  o.ffn = 128;
  return o;
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

/// A file holding `secret` on its first line, readable by its owner only, for `--key-file`
/// and `--admin-key-file` (a secret on the command line is refused). Lives as long as the
/// process's test-tmp directory.
inline std::string secret_file(const std::string& secret) {
  auto dir = std::filesystem::path(KEEL_BINARY_DIR) / "test-tmp" /
             ("secrets-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  auto path = dir / std::to_string(std::hash<std::string>{}(secret));
  { std::ofstream(path) << secret << "\n"; }
  std::filesystem::permissions(path, std::filesystem::perms::owner_read |
                                         std::filesystem::perms::owner_write);
  return path.string();
}

/// The largest file of `dir` whose extension is `ext` (".log": a RocksDB WAL, ".sst"); fails the
/// test when there is none.
inline std::filesystem::path largest_file(const std::filesystem::path& dir,
                                          const std::string& ext) {
  std::filesystem::path best;
  uintmax_t size = 0;
  for (auto& e : std::filesystem::directory_iterator(dir))
    if (e.path().extension() == ext && e.file_size() > size) {
      size = e.file_size();
      best = e.path();
    }
  BOOST_REQUIRE_MESSAGE(!best.empty(), "no " << ext << " file in " << dir);
  return best;
}

/// Damages `file` as a bad disk would: the byte at offset `at` is flipped (XOR 0x5A).
inline void flip_byte(const std::filesystem::path& file, uintmax_t at) {
  std::fstream f(file, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(static_cast<std::streamoff>(at));
  char c = 0;
  f.get(c);
  f.seekp(static_cast<std::streamoff>(at));
  f.put(static_cast<char>(c ^ 0x5A));
  BOOST_REQUIRE_MESSAGE(f.good(), "cannot flip byte " << at << " of " << file);
}

/// The path of an app built beside the tests (`keel-node`, `keel-model`, `keel`).
inline std::string bin(const std::string& name) {
  return std::string(KEEL_BINARY_DIR) + "/apps/" + name;
}

/// Binds a TCP socket to 127.0.0.1:`port` (0: any) and releases it; the port bound, or 0.
inline uint16_t try_port(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return 0;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  socklen_t len = sizeof addr;
  bool ok = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
            getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  close(fd);
  return ok ? ntohs(addr.sin_port) : 0;
}

/// A free TCP port on 127.0.0.1 for a node to listen on, preferably below the kernel's ephemeral
/// range: a node restarted on its port must not find it taken as the local port of some
/// client's outgoing connection meanwhile.
inline uint16_t free_port() {
  int low = 32768;
  std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> low;
  if (low > 20000) {
    static std::mt19937 rng(std::random_device{}());
    std::uniform_int_distribution<int> pick(10000, low - 1);
    for (int attempt = 0; attempt < 50; ++attempt)
      if (auto p = try_port(static_cast<uint16_t>(pick(rng)))) return p;
  }
  auto p = try_port(0);
  BOOST_REQUIRE_MESSAGE(p != 0, "no free port on 127.0.0.1");
  return p;
}

}  // namespace keel::test
