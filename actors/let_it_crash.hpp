#pragma once

#include <exception>
#include <string>

#include <caf/scheduled_actor.hpp>

#include "base/error.hpp"

namespace keel {

/// Makes an exception escaping a handler of `self` end the actor with a `failed` error carrying
/// the exception's text (instead of CAF's default, which prints "*** unhandled exception" and
/// exits with a bare runtime_error). Its supervisor logs the reason and restarts it.
inline void exceptions_as_failures(caf::scheduled_actor* self) {
  self->set_exception_handler([](caf::scheduled_actor*, std::exception_ptr& ptr) -> caf::error {
    try {
      std::rethrow_exception(ptr);
    } catch (const std::exception& e) {
      return make_error(errc::failed, e.what());
    } catch (...) {
      return make_error(errc::failed, "unknown exception");
    }
  });
}

}  // namespace keel
