#pragma once

#include <string>

#include <caf/expected.hpp>

namespace keel {

/// A digest of the file at `path`: every byte read once, 128 bits as 32 hex digits. Not a
/// cryptographic hash: it tells two model files apart (a session is pinned to the digest of the
/// model that served it; docs/actors.md, "One model per session"), not a forgery. About as fast
/// as the disk or the page cache; `not_found` / `failed` naming the file when it cannot be read.
caf::expected<std::string> file_digest(const std::string& path);

/// The digest of `bytes` (what file_digest computes over a file's contents).
std::string bytes_digest(const std::string& bytes);

}  // namespace keel
