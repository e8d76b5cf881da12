#pragma once

// A Cap'n Proto connection from a thread that waits on its own event loop (a CLI, the node's
// ownership transport), plain or TLS: what capnp::EzRpcClient is, plus TLS (wire/tls.hpp).

#include <chrono>
#include <memory>
#include <string>

#include <capnp/capability.h>
#include <capnp/message.h>
#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>

#include "wire/tls.hpp"

namespace keel::wire {

class rpc_client {
 public:
  struct loop;  // detail: the thread's event loop (rpc_client.cpp)

  /// This thread's event loop, the one its rpc_clients share (made when the thread has none),
  /// for a thread that runs the loop before or between its connections (the node's ownership
  /// transport). Lives while a handle or an rpc_client of the thread does; used on that thread.
  class thread_loop {
   public:
    thread_loop();
    kj::WaitScope& wait_scope();
    kj::AsyncIoProvider& io();

   private:
    std::shared_ptr<loop> loop_;
  };

  /// Starts connecting to "HOST:PORT" (the connection is made while the caller waits on a call,
  /// as with EzRpcClient). With `tls`, over TLS: the server's certificate must name
  /// `server_name` (the HOST when empty), and this side presents its own when it has one. A
  /// connection not made within `connect_timeout` fails every call with DISCONNECTED. Every
  /// rpc_client of one thread shares that thread's event loop, made by the first and ended with
  /// the last (the loop of Cap'n Proto's EzRpc, shared with any capnp::EzRpcClient of the
  /// thread); an rpc_client is used and destroyed on the thread that made it.
  explicit rpc_client(const std::string& address, std::shared_ptr<const tls_config> tls = nullptr,
                      const std::string& server_name = {},
                      std::chrono::milliseconds connect_timeout = std::chrono::seconds(10),
                      capnp::ReaderOptions reader = {});
  ~rpc_client() noexcept(false);
  rpc_client(const rpc_client&) = delete;
  rpc_client& operator=(const rpc_client&) = delete;

  /// The server's bootstrap capability (calls made before the connection is up wait for it).
  capnp::Capability::Client getMain();
  template <class T>
  typename T::Client getMain() {
    return getMain().castAs<T>();
  }

  kj::WaitScope& getWaitScope();
  kj::AsyncIoProvider& getIoProvider();

 private:
  struct connection;
  std::shared_ptr<loop> loop_;
  std::shared_ptr<const tls_config> tls_;
  kj::Own<kj::TlsContext> context_;
  kj::ForkedPromise<void> setup_;
  kj::Own<connection> conn_;
};

}  // namespace keel::wire
