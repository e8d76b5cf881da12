#include "wire/server_thread.hpp"

#include <future>

#include "base/error.hpp"

namespace keel::wire {

caf::expected<uint16_t> server_thread::start(const std::string& name, const std::string& host,
                                             uint16_t port, serve_fn serve, log_fn log) {
  std::promise<caf::expected<uint16_t>> bound;
  auto ready = bound.get_future();
  thread_ = std::thread([this, &bound, name, host, port, serve = std::move(serve),
                         log = std::move(log)] {
    bool reported = false;
    auto failed = [&](const std::string& what) {
      if (!reported)
        bound.set_value(make_error(errc::failed, what));
      else if (log)
        log(name + ": stopped: " + what);
    };
    try {
      auto io = kj::setupAsyncIo();
      auto addr = io.provider->getNetwork().parseAddress(host, port).wait(io.waitScope);
      auto listener = addr->listen();
      auto bound_port = static_cast<uint16_t>(listener->getPort());
      auto stop = kj::newPromiseAndCrossThreadFulfiller<void>();
      {
        std::lock_guard<std::mutex> guard(mu_);
        stop_ = kj::mv(stop.fulfiller);
      }
      auto serving = serve(io, kj::mv(listener), bound_port)
                         .eagerlyEvaluate([&log, &name](kj::Exception&& e) {
                           if (log) log(name + ": stopped serving: " + e.getDescription().cStr());
                         });
      bound.set_value(bound_port);
      reported = true;
      stop.promise.wait(io.waitScope);
    } catch (const kj::Exception& e) {
      failed(e.getDescription().cStr());
    } catch (const std::exception& e) {
      failed(e.what());
    }
  });
  auto r = ready.get();
  if (!r) {
    thread_.join();
    return make_error(code_of(r.error()), name + ": cannot listen on " + host + ":" +
                                              std::to_string(port) + ": " + message_of(r.error()));
  }
  return r;
}

kj::Promise<void> accept_forever(kj::ConnectionReceiver& listener,
                                 capnp::Capability::Client bootstrap, kj::TaskSet& tasks) {
  return listener.accept().then([&listener, bootstrap, &tasks](
                                    kj::Own<kj::AsyncIoStream>&& s) mutable -> kj::Promise<void> {
    auto c = kj::heap<rpc_connection>(kj::mv(s), bootstrap);
    auto gone = c->network.onDisconnect();
    tasks.add(gone.attach(kj::mv(c)));
    return accept_forever(listener, kj::mv(bootstrap), tasks);
  });
}

void server_thread::stop() {
  if (!thread_.joinable()) return;
  {
    std::lock_guard<std::mutex> guard(mu_);
    if (stop_.get() != nullptr) stop_->fulfill();
  }
  thread_.join();
}

}  // namespace keel::wire
