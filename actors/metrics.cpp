#include "actors/metrics.hpp"

namespace keel {

std::string_view to_label(request_outcome x) {
  switch (x) {
    case request_outcome::eos:
      return "eos";
    case request_outcome::length:
      return "length";
    case request_outcome::context:
      return "context";
    case request_outcome::cancelled:
      return "cancelled";
    case request_outcome::overloaded:
      return "overloaded";
    case request_outcome::failed:
      return "failed";
    case request_outcome::filtered:
      return "filtered";
    case request_outcome::moved:
      return "moved";
    case request_outcome::cut_off:
      return "cut_off";
    case request_outcome::bad_request:
      return "bad_request";
    case request_outcome::disconnected:
      return "disconnected";
    case request_outcome::count_:
      break;
  }
  return "unknown";
}

}  // namespace keel
