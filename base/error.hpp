#pragma once

#include <cstdint>
#include <ostream>
#include <string>

#include <caf/error.hpp>
#include <caf/expected.hpp>

namespace keel {

/// Failure classes. Callers decide by class (as with KJ's exception types): `failed` is a bug or a
/// bad request (do not retry), `overloaded` means retry later, `disconnected` means reconnect.
enum class errc : uint8_t {
  none = 0,
  failed,
  overloaded,
  disconnected,
  unimplemented,
  stale_epoch,
  corrupt_record,
  bad_model,
  bad_request,
  not_found,
  unauthenticated,  // no API key, or a wrong one: log in (again) with a valid key
};

/// The CAF error category of `errc` values.
inline constexpr caf::atom_value errc_category = caf::atom("keel");

const char* to_string(errc x);

inline std::ostream& operator<<(std::ostream& out, errc x) {
  return out << to_string(x);
}

/// Makes a classified error whose message names the thing and the value.
caf::error make_error(errc code, std::string message);

/// Lets `caf::error err = errc::overloaded;` work (no message).
caf::error make_error(errc code);

/// The class of `err`, or `errc::failed` for errors outside Keel's category.
errc code_of(const caf::error& err);

/// The message attached by `make_error`, or an empty string.
std::string message_of(const caf::error& err);

/// "bad_model: model.gguf: tensor blk.3.attn_q.weight has 3 dims, expected 2".
std::string describe(const caf::error& err);

}  // namespace keel
