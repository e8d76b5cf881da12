#include "tests/fuzz/fuzz_support.hpp"

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string_view>

namespace keel::fuzz {

std::string corpus_dir_argument(int argc, char** argv) {
  constexpr std::string_view flag = "--write-corpus=";
  for (int i = 1; i < argc; ++i) {
    std::string_view a = argv[i];
    if (a.substr(0, flag.size()) == flag) return std::string(a.substr(flag.size()));
  }
  return {};
}

bool write_seeds(const std::string& dir, const seeds& s) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) {
    std::fprintf(stderr, "%s: cannot create: %s\n", dir.c_str(), ec.message().c_str());
    return false;
  }
  for (auto& [name, bytes] : s) {
    auto path = std::filesystem::path(dir) / name;
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) {
      std::fprintf(stderr, "%s: cannot write\n", path.c_str());
      return false;
    }
  }
  std::fprintf(stderr, "%s: %zu seeds written\n", dir.c_str(), s.size());
  return true;
}

void broken(const std::string& what) {
  std::fprintf(stderr, "fuzz property broken: %s\n", what.c_str());
  std::abort();
}

}  // namespace keel::fuzz
