#include "wire/frame_watch.hpp"

#include <algorithm>
#include <cstring>

namespace keel::wire {

frame_watch::frame_watch(kj::Own<kj::AsyncIoStream> inner, kj::Timer& timer)
    : inner_(kj::mv(inner)), timer_(timer) {}

void frame_watch::consume(const kj::byte* p, size_t n) {
  while (n > 0 && !lost_) {
    if (!partial_since_) partial_since_ = timer_.now();
    if (header_) {
      header_bytes_.push_back(*p++);
      --n;
      if (header_bytes_.size() < 4) continue;
      uint32_t more = 0;
      std::memcpy(&more, header_bytes_.data(), 4);  // little-endian, as capnp's framing
      if (more >= 511) {
        lost_ = true;
        partial_since_.reset();
        return;
      }
      size_t segments = size_t{more} + 1;
      size_t size = (4 * (segments + 1) + 7) / 8 * 8;
      if (header_bytes_.size() < size) continue;
      body_left_ = 0;
      for (size_t i = 0; i < segments; ++i) {
        uint32_t words = 0;
        std::memcpy(&words, header_bytes_.data() + 4 * (i + 1), 4);
        body_left_ += uint64_t{words} * 8;
      }
      header_bytes_.clear();
      header_ = false;
    } else {
      auto take = static_cast<size_t>(std::min<uint64_t>(body_left_, n));
      body_left_ -= take;
      p += take;
      n -= take;
    }
    if (!header_ && body_left_ == 0) {  // a whole message
      header_ = true;
      partial_since_.reset();
    }
  }
}

kj::Promise<size_t> frame_watch::tryRead(void* buffer, size_t min_bytes, size_t max_bytes) {
  return inner_->tryRead(buffer, min_bytes, max_bytes).then([this, buffer](size_t n) {
    consume(static_cast<const kj::byte*>(buffer), n);
    return n;
  });
}

kj::Promise<void> frame_watch::write(const void* buffer, size_t size) {
  return inner_->write(buffer, size);
}

kj::Promise<void> frame_watch::write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) {
  return inner_->write(pieces);
}

kj::Promise<void> frame_watch::whenWriteDisconnected() {
  return inner_->whenWriteDisconnected();
}

void frame_watch::shutdownWrite() {
  inner_->shutdownWrite();
}

void frame_watch::abortRead() {
  inner_->abortRead();
}

void frame_watch::getsockopt(int level, int option, void* value, kj::uint* length) {
  inner_->getsockopt(level, option, value, length);
}

void frame_watch::setsockopt(int level, int option, const void* value, kj::uint length) {
  inner_->setsockopt(level, option, value, length);
}

void frame_watch::getsockname(struct sockaddr* addr, kj::uint* length) {
  inner_->getsockname(addr, length);
}

void frame_watch::getpeername(struct sockaddr* addr, kj::uint* length) {
  inner_->getpeername(addr, length);
}

}  // namespace keel::wire
