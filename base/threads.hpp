#pragma once

// How Keel starts its own threads (the seam a node's environment passes down, actors/node_env.hpp).

#include <functional>
#include <string>
#include <thread>

namespace keel {

/// Starts a thread that runs `body`, named `name` for ps, top and gdb (the kernel keeps 15
/// characters). Returns it joinable.
using thread_spawner =
    std::function<std::thread(const std::string& name, std::function<void()> body)>;

/// The default spawner: a std::thread, named with pthread_setname_np.
std::thread spawn_named_thread(const std::string& name, std::function<void()> body);

/// `spawn` when it is set, else the default.
inline std::thread spawn_thread(const thread_spawner& spawn, const std::string& name,
                                std::function<void()> body) {
  return spawn ? spawn(name, std::move(body)) : spawn_named_thread(name, std::move(body));
}

}  // namespace keel
