#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

namespace keel {

/// Shape of the attention cache of one model.
struct kv_layout {
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_tokens = 16;
};

/// Floats in one K (or V) vector of one slot of one layer: n_kv_heads * head_dim.
int64_t kv_dim(const kv_layout& l);

/// Pages needed for n tokens (0 for n <= 0).
int64_t pages_for(const kv_layout& l, int64_t n_tokens);

/// A pool of fixed-size KV pages carved from one byte budget, allocated up front (mmap'ed
/// anonymous memory, so untouched pages cost nothing). Page p holds, for page_tokens slots, the
/// K and V vectors (n_kv_heads*head_dim floats each) of every layer: per layer, the K vectors of
/// all slots (contiguous, slot-major), then the V vectors. Not thread-safe for allocate/release;
/// key()/value() of distinct slots may be written from different threads. A layout with a field
/// <= 0, or a budget smaller than one page, gives a pool of 0 pages.
class kv_pool {
 public:
  kv_pool(kv_layout layout, uint64_t byte_budget);
  ~kv_pool();
  kv_pool(const kv_pool&) = delete;
  kv_pool& operator=(const kv_pool&) = delete;

  const kv_layout& layout() const { return layout_; }
  uint64_t page_bytes() const { return page_bytes_; }
  int32_t total_pages() const { return total_pages_; }
  int32_t free_pages() const { return static_cast<int32_t>(free_.size()); }

  /// A free page (a fresh pool hands out 0, 1, 2, ...; released pages are reused first), or
  /// errc::overloaded ("KV cache full: N of N pages in use") when none is left or a fault was
  /// injected. Never throws, never crashes.
  caf::expected<int32_t> allocate();

  /// Returns `page` to the pool. Ignores a page that is out of range or not allocated.
  void release(int32_t page);

  /// The K / V vector of `slot` of `layer` in `page` (kv_dim floats). No bounds checks.
  float* key(int32_t page, int32_t layer, int32_t slot) { return slot_ptr(page, layer, slot, 0); }
  float* value(int32_t page, int32_t layer, int32_t slot) { return slot_ptr(page, layer, slot, 1); }

  /// Fault injection: after `after` more allocate() calls go through, the next n fail with
  /// overloaded (n <= 0 cancels). Costs one branch when off.
  void fail_next_allocations(int32_t n, int32_t after = 0) {
    fail_next_ = n > 0 ? n : 0;
    fail_after_ = fail_next_ > 0 && after > 0 ? after : 0;
  }

  /// The overloaded error allocate() returns, for callers that fail on the pool's behalf.
  caf::error full_error() const;

 private:
  float* slot_ptr(int32_t page, int32_t layer, int32_t slot, int32_t kv) {
    return base_ + static_cast<size_t>(page) * page_floats_ +
           ((static_cast<size_t>(layer) * 2 + kv) * layout_.page_tokens + slot) * kv_dim_;
  }

  kv_layout layout_;
  uint64_t page_bytes_ = 0;
  size_t page_floats_ = 0;
  size_t kv_dim_ = 0;
  int32_t total_pages_ = 0;
  float* base_ = nullptr;
  size_t mapped_bytes_ = 0;
  std::vector<int32_t> free_;    // a stack
  std::vector<uint8_t> in_use_;  // guards against double release
  int32_t fail_next_ = 0;
  int32_t fail_after_ = 0;
};

/// The pages of one sequence, in order; position pos lives in page pages[pos / page_tokens],
/// slot pos % page_tokens. Releases its pages on destruction. Movable, not copyable.
/// The pool must outlive it.
class kv_sequence {
 public:
  explicit kv_sequence(kv_pool& pool) : pool_(&pool) {}
  ~kv_sequence() { clear(); }
  kv_sequence(const kv_sequence&) = delete;
  kv_sequence& operator=(const kv_sequence&) = delete;
  kv_sequence(kv_sequence&& other) noexcept;
  kv_sequence& operator=(kv_sequence&& other) noexcept;

  /// Ensures capacity for n_tokens positions; all-or-nothing (on failure, pages taken by this
  /// call are returned and the error is the pool's overloaded error).
  caf::error reserve(int64_t n_tokens);

  /// pages * page_tokens.
  int64_t capacity() const { return static_cast<int64_t>(pages_.size()) * page_tokens(); }

  /// Positions written so far.
  int64_t length() const { return length_; }

  /// Sets the length, clamped to [0, capacity()].
  void set_length(int64_t n);

  /// Shrinks the length to at most n and releases the pages beyond those n positions need (also
  /// pages reserved ahead of the length).
  void truncate(int64_t n);

  /// Releases every page; length and capacity become 0.
  void clear();

  /// The K / V vector of position `pos` (< capacity()) of `layer`.
  float* key(int32_t layer, int64_t pos) {
    return pool_->key(pages_[pos / page_tokens()], layer,
                      static_cast<int32_t>(pos % page_tokens()));
  }
  float* value(int32_t layer, int64_t pos) {
    return pool_->value(pages_[pos / page_tokens()], layer,
                        static_cast<int32_t>(pos % page_tokens()));
  }

  size_t page_count() const { return pages_.size(); }

  /// The page ids in position order (for attention kernels that walk page by page).
  const std::vector<int32_t>& pages() const { return pages_; }
  kv_pool& pool() const { return *pool_; }

 private:
  int64_t page_tokens() const { return pool_->layout().page_tokens; }
  void release_from(size_t keep);

  kv_pool* pool_;
  std::vector<int32_t> pages_;
  int64_t length_ = 0;
};

}  // namespace keel
