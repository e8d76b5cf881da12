#include "base/finish_reason.hpp"

namespace keel {

const char* to_string(finish_reason r) {
  switch (r) {
    case finish_reason::length: return "length";
    case finish_reason::eos: return "eos";
    case finish_reason::context: return "context";
    case finish_reason::cancelled: return "cancelled";
    case finish_reason::overloaded: return "overloaded";
    case finish_reason::failed: return "failed";
    case finish_reason::filtered: return "filtered";
  }
  return "unknown";
}

}  // namespace keel
