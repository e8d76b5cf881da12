#include "base/error.hpp"

#include <caf/make_message.hpp>
#include <caf/message.hpp>

namespace keel {

const char* to_string(errc x) {
  switch (x) {
    case errc::none:
      return "none";
    case errc::failed:
      return "failed";
    case errc::overloaded:
      return "overloaded";
    case errc::disconnected:
      return "disconnected";
    case errc::unimplemented:
      return "unimplemented";
    case errc::stale_epoch:
      return "stale_epoch";
    case errc::corrupt_record:
      return "corrupt_record";
    case errc::bad_model:
      return "bad_model";
    case errc::bad_request:
      return "bad_request";
    case errc::not_found:
      return "not_found";
    case errc::unauthenticated:
      return "unauthenticated";
  }
  return "unknown";
}

caf::error make_error(errc code, std::string message) {
  return caf::error(static_cast<uint8_t>(code), errc_category,
                    caf::make_message(std::move(message)));
}

caf::error make_error(errc code) {
  return caf::error(static_cast<uint8_t>(code), errc_category);
}

errc code_of(const caf::error& err) {
  if (!err) return errc::none;
  if (err.category() != errc_category) return errc::failed;
  return static_cast<errc>(err.code());
}

std::string message_of(const caf::error& err) {
  if (!err) return {};
  const auto& ctx = err.context();
  if (ctx.size() == 1 && ctx.match_element<std::string>(0)) return ctx.get_as<std::string>(0);
  return {};
}

std::string describe(const caf::error& err) {
  if (!err) return "ok";
  if (err.category() != errc_category) return caf::to_string(err);
  std::string out = to_string(code_of(err));
  auto msg = message_of(err);
  if (!msg.empty()) {
    out += ": ";
    out += msg;
  }
  return out;
}

}  // namespace keel
