#include "wire/rpc_client.hpp"

#include <sys/socket.h>
#include <unistd.h>

#include <capnp/ez-rpc.h>
#include <kj/debug.h>

namespace keel::wire {

/// The thread's event loop, taken from Cap'n Proto's EzRpc context (one per thread, shared with
/// every capnp::EzRpcClient of the thread, so that both kinds of client can live on one thread):
/// an EzRpcClient on one end of a socket pair that nobody writes to holds it.
struct rpc_client::loop {
  int fds[2] = {-1, -1};
  std::unique_ptr<capnp::EzRpcClient> anchor;

  loop() {
    KJ_SYSCALL(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds));
    anchor = std::make_unique<capnp::EzRpcClient>(fds[0]);
  }
  ~loop() noexcept(false) {
    anchor.reset();
    close(fds[0]);
    close(fds[1]);
  }
  kj::AsyncIoProvider& provider() { return anchor->getIoProvider(); }
  kj::WaitScope& wait_scope() { return anchor->getWaitScope(); }
};

namespace {
// The event loop of this thread's rpc_clients, alive while one of them is.
thread_local std::weak_ptr<void> this_thread_loop;
}  // namespace

struct rpc_client::connection {
  kj::AuthenticatedStream stream;
  capnp::TwoPartyVatNetwork network;
  capnp::RpcSystem<capnp::rpc::twoparty::VatId> rpc;

  connection(kj::AuthenticatedStream&& s, capnp::ReaderOptions reader)
      : stream(kj::mv(s)),
        network(*stream.stream, capnp::rpc::twoparty::Side::CLIENT, reader),
        rpc(capnp::makeRpcClient(network)) {}

  capnp::Capability::Client bootstrap() {
    capnp::word scratch[4] = {};
    capnp::MallocMessageBuilder message(scratch);
    auto server = message.getRoot<capnp::rpc::twoparty::VatId>();
    server.setSide(capnp::rpc::twoparty::Side::SERVER);
    return rpc.bootstrap(server);
  }
};

namespace {
std::shared_ptr<rpc_client::loop> this_thread_loop_or_new() {
  if (auto l = this_thread_loop.lock()) return std::static_pointer_cast<rpc_client::loop>(l);
  auto l = std::make_shared<rpc_client::loop>();
  this_thread_loop = l;
  return l;
}
}  // namespace

rpc_client::thread_loop::thread_loop() : loop_(this_thread_loop_or_new()) {}

kj::WaitScope& rpc_client::thread_loop::wait_scope() {
  return loop_->wait_scope();
}

kj::AsyncIoProvider& rpc_client::thread_loop::io() {
  return loop_->provider();
}

rpc_client::rpc_client(const std::string& address, std::shared_ptr<const tls_config> tls,
                       const std::string& server_name, std::chrono::milliseconds connect_timeout,
                       capnp::ReaderOptions reader)
    : tls_(std::move(tls)), setup_(nullptr) {
  loop_ = this_thread_loop_or_new();
  if (tls_) context_ = tls_->context(false);
  auto& io = loop_->provider();
  setup_ = connect_to(io.getNetwork(), io.getTimer(), context_.get(), address, server_name,
                      connect_timeout)
               .then([this, reader](kj::AuthenticatedStream s) {
                 conn_ = kj::heap<connection>(kj::mv(s), reader);
               })
               .fork();
}

rpc_client::~rpc_client() noexcept(false) {
  // The connection goes before the TLS context it may use, and both before the loop.
  conn_ = nullptr;
  setup_ = kj::Promise<void>(kj::READY_NOW).fork();
  context_ = nullptr;
}

capnp::Capability::Client rpc_client::getMain() {
  if (conn_.get() != nullptr) return conn_->bootstrap();
  return setup_.addBranch().then([this] { return conn_->bootstrap(); });
}

kj::WaitScope& rpc_client::getWaitScope() {
  return loop_->wait_scope();
}

kj::AsyncIoProvider& rpc_client::getIoProvider() {
  return loop_->provider();
}

}  // namespace keel::wire
