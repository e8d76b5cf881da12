#pragma once

#include <cstdint>
#include <string>

namespace keel {

/// The rendezvous weight of (session, node): FNV-1a of "SESSION/NODE", finished like splitmix64
/// (FNV's low bits mix poorly for short keys). The same in every process and build, so every
/// node ranks the nodes of a session alike (ownership groups).
inline uint64_t rendezvous_weight(const std::string& session, const std::string& node) {
  uint64_t h = 1469598103934665603ull;
  auto mix = [&h](const std::string& s) {
    for (unsigned char c : s) {
      h ^= c;
      h *= 1099511628211ull;
    }
  };
  mix(session);
  mix("/");
  mix(node);
  h ^= h >> 31;
  h *= 0x9e3779b97f4a7c15ull;
  h ^= h >> 29;
  return h;
}

}  // namespace keel
