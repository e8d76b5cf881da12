#include "base/threads.hpp"

#include <pthread.h>

namespace keel {

std::thread spawn_named_thread(const std::string& name, std::function<void()> body) {
  std::thread t(std::move(body));
  // Linux keeps 15 characters and a NUL; longer names are refused, so they are cut here.
  (void)pthread_setname_np(t.native_handle(), name.substr(0, 15).c_str());
  return t;
}

}  // namespace keel
