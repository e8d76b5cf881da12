#include "kernels/kv_cache.hpp"

#include <sys/mman.h>

#include <algorithm>
#include <limits>
#include <string>
#include <utility>

#include "base/error.hpp"

namespace keel {

namespace {

bool valid(const kv_layout& l) {
  return l.n_layers > 0 && l.n_kv_heads > 0 && l.head_dim > 0 && l.page_tokens > 0;
}

// Bytes of one page, or 0 when the layout is invalid or the size overflows.
uint64_t page_size(const kv_layout& l) {
  if (!valid(l)) return 0;
  uint64_t bytes = sizeof(float) * 2;
  for (int32_t f : {l.n_layers, l.n_kv_heads, l.head_dim, l.page_tokens})
    if (__builtin_mul_overflow(bytes, static_cast<uint64_t>(f), &bytes)) return 0;
  return bytes;
}

}  // namespace

int64_t kv_dim(const kv_layout& l) {
  return int64_t{l.n_kv_heads} * l.head_dim;
}

int64_t pages_for(const kv_layout& l, int64_t n_tokens) {
  if (n_tokens <= 0) return 0;
  if (l.page_tokens <= 0) return std::numeric_limits<int64_t>::max();  // no page holds anything
  return (n_tokens - 1) / l.page_tokens + 1;
}

kv_pool::kv_pool(kv_layout layout, uint64_t byte_budget)
    : layout_(layout), page_bytes_(page_size(layout)) {
  if (page_bytes_ == 0) return;
  uint64_t pages =
      std::min<uint64_t>(byte_budget / page_bytes_, std::numeric_limits<int32_t>::max());
  if (pages == 0) return;
  size_t bytes = static_cast<size_t>(pages * page_bytes_);
  // MAP_NORESERVE: the budget is a ceiling, not a commitment; pages cost memory when written.
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return;  // a pool of 0 pages: allocate() reports overloaded
  base_ = static_cast<float*>(p);
  mapped_bytes_ = bytes;
  total_pages_ = static_cast<int32_t>(pages);
  page_floats_ = static_cast<size_t>(page_bytes_ / sizeof(float));
  kv_dim_ = static_cast<size_t>(kv_dim(layout));
  free_.resize(static_cast<size_t>(total_pages_));
  for (int32_t i = 0; i < total_pages_; ++i) free_[i] = total_pages_ - 1 - i;
  in_use_.assign(static_cast<size_t>(total_pages_), 0);
}

kv_pool::~kv_pool() {
  if (base_ != nullptr) munmap(base_, mapped_bytes_);
}

caf::error kv_pool::full_error() const {
  return make_error(errc::overloaded,
                    "KV cache full: " + std::to_string(total_pages_ - free_pages()) + " of " +
                        std::to_string(total_pages_) + " pages in use");
}

caf::expected<int32_t> kv_pool::allocate() {
  if (fail_next_ > 0 && fail_after_-- <= 0) {
    fail_after_ = 0;
    --fail_next_;
    return make_error(errc::overloaded, "KV cache full (injected fault): " +
                                            std::to_string(total_pages_ - free_pages()) + " of " +
                                            std::to_string(total_pages_) + " pages in use");
  }
  if (free_.empty()) return full_error();
  int32_t page = free_.back();
  free_.pop_back();
  in_use_[page] = 1;
  return page;
}

void kv_pool::release(int32_t page) {
  if (page < 0 || page >= total_pages_ || in_use_[page] == 0) return;
  in_use_[page] = 0;
  free_.push_back(page);
}

kv_sequence::kv_sequence(kv_sequence&& other) noexcept
    : pool_(other.pool_), pages_(std::move(other.pages_)), length_(other.length_) {
  other.pages_.clear();
  other.length_ = 0;
}

kv_sequence& kv_sequence::operator=(kv_sequence&& other) noexcept {
  if (this != &other) {
    clear();
    pool_ = other.pool_;
    pages_ = std::move(other.pages_);
    length_ = other.length_;
    other.pages_.clear();
    other.length_ = 0;
  }
  return *this;
}

caf::error kv_sequence::reserve(int64_t n_tokens) {
  const int64_t need = pages_for(pool_->layout(), n_tokens);
  const auto have = static_cast<int64_t>(pages_.size());
  if (need <= have) return {};
  // Fail before taking anything when the pool cannot possibly satisfy the request.
  if (need - have > pool_->free_pages()) return pool_->full_error();
  const size_t keep = pages_.size();
  pages_.reserve(static_cast<size_t>(need));
  for (int64_t i = have; i < need; ++i) {
    auto page = pool_->allocate();
    if (!page) {
      release_from(keep);
      return std::move(page.error());
    }
    pages_.push_back(*page);
  }
  return {};
}

void kv_sequence::set_length(int64_t n) {
  length_ = std::clamp<int64_t>(n, 0, capacity());
}

void kv_sequence::truncate(int64_t n) {
  n = std::max<int64_t>(n, 0);
  length_ = std::min(length_, n);
  const int64_t keep = std::min<int64_t>(pages_for(pool_->layout(), n), pages_.size());
  release_from(static_cast<size_t>(keep));
}

void kv_sequence::clear() {
  release_from(0);
  length_ = 0;
}

void kv_sequence::release_from(size_t keep) {
  while (pages_.size() > keep) {
    pool_->release(pages_.back());
    pages_.pop_back();
  }
}

}  // namespace keel
