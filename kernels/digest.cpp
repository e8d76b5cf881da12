#include "kernels/digest.hpp"

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <vector>

#include "base/error.hpp"

namespace keel {

namespace {

constexpr uint64_t k1 = 0x87c37b91114253d5ull;
constexpr uint64_t k2 = 0x4cf5ad432745937full;

uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

uint64_t fmix(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdull;
  k ^= k >> 33;
  k *= 0xc4ceb9fe1a85ec53ull;
  k ^= k >> 33;
  return k;
}

/// Two 64-bit lanes over 16-byte blocks (the shape of MurmurHash3's x64 128-bit mixing), fed
/// in pieces.
class hasher {
 public:
  void add(const unsigned char* p, size_t n) {
    total_ += n;
    if (held_ > 0) {
      auto take = std::min(n, sizeof(buf_) - held_);
      std::memcpy(buf_ + held_, p, take);
      held_ += take;
      p += take;
      n -= take;
      if (held_ < sizeof(buf_)) return;
      block(buf_);
      held_ = 0;
    }
    for (; n >= 16; p += 16, n -= 16) block(p);
    std::memcpy(buf_, p, n);
    held_ = n;
  }

  std::string hex() {
    unsigned char last[16] = {};
    std::memcpy(last, buf_, held_);
    block(last);
    h1_ ^= total_;
    h2_ ^= total_;
    h1_ += h2_;
    h2_ += h1_;
    h1_ = fmix(h1_);
    h2_ = fmix(h2_);
    h1_ += h2_;
    h2_ += h1_;
    char out[33];
    std::snprintf(out, sizeof out, "%016llx%016llx", static_cast<unsigned long long>(h1_),
                  static_cast<unsigned long long>(h2_));
    return out;
  }

 private:
  void block(const unsigned char* p) {
    uint64_t a, b;
    std::memcpy(&a, p, 8);
    std::memcpy(&b, p + 8, 8);
    a *= k1;
    a = rotl(a, 31);
    a *= k2;
    h1_ ^= a;
    h1_ = rotl(h1_, 27) + h2_;
    h1_ = h1_ * 5 + 0x52dce729;
    b *= k2;
    b = rotl(b, 33);
    b *= k1;
    h2_ ^= b;
    h2_ = rotl(h2_, 31) + h1_;
    h2_ = h2_ * 5 + 0x38495ab5;
  }

  uint64_t h1_ = 0x6b656c2d6d6f646cull;  // "kel-modl"
  uint64_t h2_ = 0x6469676573742d31ull;  // "digest-1"
  uint64_t total_ = 0;
  unsigned char buf_[16] = {};
  size_t held_ = 0;
};

}  // namespace

caf::expected<std::string> file_digest(const std::string& path) {
  std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), &std::fclose);
  if (!f) return make_error(errc::not_found, path + ": cannot be opened to compute its digest");
  std::vector<unsigned char> chunk(4 << 20);
  hasher h;
  while (true) {
    auto n = std::fread(chunk.data(), 1, chunk.size(), f.get());
    h.add(chunk.data(), n);
    if (n < chunk.size()) {
      if (std::ferror(f.get())) return make_error(errc::failed, path + ": a read failed while computing its digest");
      break;
    }
  }
  return h.hex();
}

std::string bytes_digest(const std::string& bytes) {
  hasher h;
  h.add(reinterpret_cast<const unsigned char*>(bytes.data()), bytes.size());
  return h.hex();
}

}  // namespace keel
