#pragma once

// A server connection's stream that follows Cap'n Proto's message framing as the bytes go by,
// so that a message begun and never finished is noticed (issue #11: a truncated frame held a
// connection, and what it had read, forever). It sits under the RPC system and above TLS.

#include <cstdint>
#include <optional>
#include <vector>

#include <kj/async-io.h>
#include <kj/time.h>

namespace keel::wire {

class frame_watch final : public kj::AsyncIoStream {
 public:
  /// `timer` must outlive the stream.
  frame_watch(kj::Own<kj::AsyncIoStream> inner, kj::Timer& timer);

  /// Since when a message has been partly read, or nullopt between messages.
  std::optional<kj::TimePoint> partial_since() const { return partial_since_; }

  kj::Promise<size_t> tryRead(void* buffer, size_t min_bytes, size_t max_bytes) override;
  kj::Promise<void> write(const void* buffer, size_t size) override;
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override;
  kj::Promise<void> whenWriteDisconnected() override;
  void shutdownWrite() override;
  void abortRead() override;
  void getsockopt(int level, int option, void* value, kj::uint* length) override;
  void setsockopt(int level, int option, const void* value, kj::uint length) override;
  void getsockname(struct sockaddr* addr, kj::uint* length) override;
  void getpeername(struct sockaddr* addr, kj::uint* length) override;

 private:
  /// Follows `n` bytes of the stream through the framing.
  void consume(const kj::byte* p, size_t n);

  kj::Own<kj::AsyncIoStream> inner_;
  kj::Timer& timer_;
  std::optional<kj::TimePoint> partial_since_;
  // The framing: a u32 (segments - 1), a u32 size (in words) per segment, padding to a word,
  // then the segments. The header is gathered whole (capnp refuses 512 segments or more, and so
  // does this: past that it stops following the stream, which the RPC system then ends).
  bool header_ = true;
  bool lost_ = false;  // a frame this cannot follow: watch no more
  std::vector<kj::byte> header_bytes_;
  uint64_t body_left_ = 0;
};

}  // namespace keel::wire
