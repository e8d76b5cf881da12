#pragma once

#include <cstdint>
#include <ostream>

namespace keel {

/// Why a turn ended; the same values travel as the wire's FinishReason.
/// Why a turn ended. `filtered`: the guardrail stopped the reply (actors/guardrail.hpp).
enum class finish_reason : uint8_t { length, eos, context, cancelled, overloaded, failed, filtered };

const char* to_string(finish_reason r);

inline std::ostream& operator<<(std::ostream& out, finish_reason r) { return out << to_string(r); }

}  // namespace keel
