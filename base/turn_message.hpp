#pragma once

#include <string>

namespace keel {

/// One role/content message of a chat turn ("system", "user", "tool"...), as a session, the
/// wire (keel.capnp `Message`) and the store (checkpoint.capnp) carry it. The node renders a
/// chat session's messages with its chat template (kernels/chat_prompt.hpp).
struct turn_message {
  std::string role;
  std::string content;

  friend bool operator==(const turn_message&, const turn_message&) = default;
};

}  // namespace keel
