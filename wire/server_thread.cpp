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

namespace {

struct accept_state {
  kj::ConnectionReceiver& listener;
  kj::Timer& timer;
  on_connection on_accept;
  server_thread::log_fn log;
  std::string name;
  kj::Duration pause = 10 * kj::MILLISECONDS;
  uint64_t failures = 0;  // in the current run of failures
};

kj::Promise<void> accept_next(accept_state& st) {
  // evalNow: KJ's accept() throws at once when accept(2) fails (EMFILE), instead of rejecting.
  return kj::evalNow([&st] { return st.listener.acceptAuthenticated(); })
      .then(
          [&st](kj::AuthenticatedStream&& s) {
            if (st.failures > 0 && st.log)
              st.log(st.name + ": accepting again after " + std::to_string(st.failures) +
                     " failed accept(s)");
            st.failures = 0;
            st.pause = 10 * kj::MILLISECONDS;
            st.on_accept(kj::mv(s));
            return kj::Promise<void>(kj::READY_NOW);
          },
          [&st](kj::Exception&& e) {
            if (st.failures++ == 0 && st.log)
              st.log(st.name + ": accept failed (" + e.getDescription().cStr() +
                     "); retrying with backoff");
            auto wait = st.pause;
            st.pause = std::min(st.pause * 2, 1000 * kj::MILLISECONDS);
            return st.timer.afterDelay(wait);
          })
      .then([&st] { return accept_next(st); });
}

}  // namespace

kj::Promise<void> accept_retrying(kj::ConnectionReceiver& listener, kj::Timer& timer,
                                  on_connection on_accept, server_thread::log_fn log,
                                  const std::string& name) {
  auto st = kj::heap<accept_state>(
      accept_state{listener, timer, std::move(on_accept), std::move(log), name});
  auto& ref = *st;
  return accept_next(ref).attach(kj::mv(st));
}

namespace {

/// Failed handshakes since the last line about them (one line a second at most: a flood of
/// bad handshakes does not flood the log).
struct handshake_failures {
  uint64_t count = 0;
  kj::TimePoint last_line = kj::origin<kj::TimePoint>();
  std::string last_why;
};

}  // namespace

kj::Promise<void> accept_secured(kj::ConnectionReceiver& listener, kj::Timer& timer,
                                 kj::TlsContext* tls, kj::TaskSet& tasks, on_connection on_ready,
                                 server_thread::log_fn log, const std::string& name) {
  if (tls == nullptr) return accept_retrying(listener, timer, std::move(on_ready), log, name);
  auto failures = std::make_shared<handshake_failures>();
  auto ready = std::make_shared<on_connection>(std::move(on_ready));
  return accept_retrying(
      listener, timer,
      [tls, &timer, &tasks, failures, ready, log, name](kj::AuthenticatedStream&& s) {
        tasks.add(secure_accepted(tls, timer, kj::mv(s))
                      .then([ready](kj::AuthenticatedStream&& done) { (*ready)(kj::mv(done)); },
                            [&timer, failures, log, name](kj::Exception&& e) {
                              ++failures->count;
                              failures->last_why = e.getDescription().cStr();
                              auto now = timer.now();
                              if (!log || now - failures->last_line < 1 * kj::SECONDS) return;
                              log(name + ": " + std::to_string(failures->count) +
                                  " TLS handshake(s) failed, the last: " + failures->last_why);
                              failures->count = 0;
                              failures->last_line = now;
                            }));
      },
      log, name);
}

kj::Promise<void> accept_forever(
    kj::ConnectionReceiver& listener, kj::Timer& timer, kj::TlsContext* tls,
    std::function<capnp::Capability::Client(kj::Own<kj::PeerIdentity>)> bootstrap,
    kj::TaskSet& tasks, server_thread::log_fn log, const std::string& name,
    capnp::ReaderOptions reader) {
  return accept_secured(
      listener, timer, tls, tasks,
      [bootstrap = std::move(bootstrap), &tasks, reader](kj::AuthenticatedStream&& s) {
        auto c = kj::heap<rpc_connection>(kj::mv(s.stream), bootstrap(kj::mv(s.peerIdentity)),
                                          reader);
        auto gone = c->network.onDisconnect();
        tasks.add(gone.attach(kj::mv(c)));
      },
      std::move(log), name);
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
