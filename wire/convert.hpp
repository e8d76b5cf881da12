#pragma once

// Conversions between Keel's C++ types and the client API's Cap'n Proto types (keel.capnp).

#include <cstdint>
#include <string>
#include <string_view>

#include <kj/exception.h>
#include <caf/error.hpp>

#include "base/error.hpp"
#include "base/finish_reason.hpp"
#include "kernels/sampler.hpp"
#include "wire/keel.capnp.h"

namespace keel::wire {

/// The wire's error kind of an error class. Classes the wire does not name (stale_epoch,
/// corrupt_record, bad_model) travel as `failed`: the client cannot mend them by retrying.
Error::Kind to_wire(errc code);

/// The error class of a wire kind (`none` for `Error::Kind::NONE`).
errc from_wire(Error::Kind kind);

/// Fills `out` from `err` (kind and message); `retry_after_ms` goes with `overloaded`. An empty
/// `err` gives kind `none`.
void to_wire(const caf::error& err, Error::Builder out, uint32_t retry_after_ms = 0);

/// How a retry-after hint is appended to an error's message: "... (retry after 120 ms)".
inline constexpr std::string_view retry_after_prefix = " (retry after ";

/// The error a wire `Error` carries: empty for kind `none`; an `overloaded` error's retry-after
/// hint is appended to its message (see retry_after_prefix).
caf::error from_wire(Error::Reader in);

/// Classifies a Cap'n Proto / KJ exception the way the wire does: DISCONNECTED ->
/// `disconnected`, OVERLOADED -> `overloaded`, UNIMPLEMENTED -> `unimplemented`, the rest
/// `failed`; the message is the exception's description, after "`where`: " when given.
caf::error from_kj(const kj::Exception& e, const std::string& where = "");

FinishReason to_wire(finish_reason r);
finish_reason from_wire(FinishReason r);

void to_wire(const sampling_params& p, SamplingParams::Builder out);

/// The parameters as sent; they are not validated here (see `keel::validate`).
sampling_params from_wire(SamplingParams::Reader in);

}  // namespace keel::wire
