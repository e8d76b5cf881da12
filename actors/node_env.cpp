#include "actors/node_env.hpp"

#include <sys/random.h>

#include <cerrno>
#include <cstring>

#include "base/error.hpp"

namespace keel {

namespace {

caf::error kernel_random(unsigned char* out, size_t n) {
  size_t got = 0;
  while (got < n) {
    auto r = ::getrandom(out + got, n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return make_error(errc::failed, std::string("getrandom: ") + std::strerror(errno));
    got += static_cast<size_t>(r);
  }
  return {};
}

}  // namespace

node_env node_env::real() {
  node_env e;
  e.clock = steady_ownership_clock();
  e.random = kernel_random;
  e.open_store = [](const std::string& dir, const storage::store_options& opts) {
    return storage::session_store::open(dir, opts);
  };
  e.transport = [](const peer_transport_config& cfg) -> std::shared_ptr<ownership_transport> {
    return std::make_shared<peer_transport>(cfg);
  };
  e.threads = spawn_named_thread;
  return e;
}

node_env node_env::completed() const {
  auto r = real();
  node_env e = *this;
  if (!e.clock) e.clock = r.clock;
  if (!e.random) e.random = r.random;
  if (!e.open_store) e.open_store = r.open_store;
  if (!e.transport) e.transport = r.transport;
  if (!e.threads) e.threads = r.threads;
  return e;
}

}  // namespace keel
