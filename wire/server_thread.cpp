#include "wire/server_thread.hpp"

#include <sys/socket.h>

#include <future>
#include <map>

#include <kj/debug.h>

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

/// Lines about one kind of refusal, at most one a second, each with the count since the last
/// (a flood of bad handshakes or connections does not flood the log).
struct throttled_log {
  server_thread::log_fn log;
  uint64_t count = 0;
  kj::TimePoint last_line = kj::origin<kj::TimePoint>();

  void operator()(kj::Timer& timer, const std::string& what) {
    ++count;
    auto now = timer.now();
    if (!log || now - last_line < 1 * kj::SECONDS) return;
    log(what + (count > 1 ? " (" + std::to_string(count) + " such since the last line)" : ""));
    count = 0;
    last_line = now;
  }
};

/// The connections open on one port, by remote address.
struct connection_count {
  port_limits limits;
  size_t open = 0;
  std::map<std::string, size_t> by_address;
  throttled_log refused;
};

/// The remote IP of a connection ("" when unknown): its network identity without the port.
std::string remote_host(kj::PeerIdentity& id) {
  auto* net = dynamic_cast<kj::NetworkPeerIdentity*>(&id);
  if (net == nullptr) return {};
  std::string a = net->getAddress().toString().cStr();
  auto colon = a.rfind(':');
  return colon == std::string::npos ? a : a.substr(0, colon);
}

}  // namespace

kj::Promise<void> accept_secured(kj::ConnectionReceiver& listener, kj::Timer& timer,
                                 kj::TlsContext* tls, kj::TaskSet& tasks, on_connection on_ready,
                                 server_thread::log_fn log, const std::string& name,
                                 port_limits limits) {
  auto count = std::make_shared<connection_count>();
  count->limits = limits;
  count->refused.log = log;
  auto failures = std::make_shared<throttled_log>();
  failures->log = log;
  auto ready = std::make_shared<on_connection>(std::move(on_ready));
  return accept_retrying(
      listener, timer,
      [tls, &timer, &tasks, count, failures, ready, name](kj::AuthenticatedStream&& s) {
        auto host = remote_host(*s.peerIdentity);
        auto& mine = count->by_address[host];
        if (count->open >= count->limits.connections || mine >= count->limits.per_address) {
          bool total = count->open >= count->limits.connections;
          count->refused(timer, name + ": refused a connection from " + host + ": " +
                                    std::to_string(total ? count->open : mine) + " are open" +
                                    (total ? "" : " from it") + ", the limit is " +
                                    std::to_string(total ? count->limits.connections
                                                         : count->limits.per_address));
          if (mine == 0) count->by_address.erase(host);
          return;  // the stream goes: closed
        }
        ++count->open;
        ++mine;
        if (int size = count->limits.send_buffer; size > 0) {
          KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                         s.stream->setsockopt(SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
                       })) {
            count->refused(timer, name + ": cannot set SO_SNDBUF: " + e->getDescription().cStr());
          }
        }
        // Counted until the stream goes, whoever holds it then.
        s.stream = s.stream.attach(kj::defer([count, host] {
          --count->open;
          if (--count->by_address[host] == 0) count->by_address.erase(host);
        }));
        if (tls == nullptr) {
          (*ready)(kj::mv(s));
          return;
        }
        tasks.add(secure_accepted(tls, timer, kj::mv(s))
                      .then([ready](kj::AuthenticatedStream&& done) { (*ready)(kj::mv(done)); },
                            [&timer, failures, name](kj::Exception&& e) {
                              (*failures)(timer, name + ": a TLS handshake failed: " +
                                                     e.getDescription().cStr());
                            }));
      },
      log, name);
}

kj::Promise<void> until_gone(rpc_connection& c, kj::Timer& timer, const port_limits& limits) {
  auto watch = [&c, &timer, limits](auto& self) -> kj::Promise<void> {
    return timer.afterDelay(100 * kj::MILLISECONDS).then([&c, &timer, limits, self]() mutable
                                                         -> kj::Promise<void> {
      auto queued = c.network.getCurrentQueueSize();
      if (queued > limits.max_unread)
        return KJ_EXCEPTION(OVERLOADED, "closed a connection that does not read its answers: " +
                                            std::to_string(queued) + " bytes unread, the limit is " +
                                            std::to_string(limits.max_unread));
      if (auto since = c.io->partial_since(); since && timer.now() - *since > limits.frame_timeout)
        return KJ_EXCEPTION(DISCONNECTED,
                            "closed a connection whose message stayed unfinished for " +
                                std::to_string(limits.frame_timeout / kj::MILLISECONDS) + " ms");
      return self(self);
    });
  };
  return c.network.onDisconnect().exclusiveJoin(watch(watch));
}

kj::Promise<void> accept_forever(
    kj::ConnectionReceiver& listener, kj::Timer& timer, kj::TlsContext* tls,
    std::function<capnp::Capability::Client(kj::Own<kj::PeerIdentity>)> bootstrap,
    kj::TaskSet& tasks, server_thread::log_fn log, const std::string& name,
    capnp::ReaderOptions reader, port_limits limits) {
  return accept_secured(
      listener, timer, tls, tasks,
      [bootstrap = std::move(bootstrap), &tasks, &timer, reader, limits](kj::AuthenticatedStream&& s) {
        auto c = kj::heap<rpc_connection>(kj::mv(s.stream), timer,
                                          bootstrap(kj::mv(s.peerIdentity)), reader);
        auto gone = until_gone(*c, timer, limits);
        tasks.add(gone.attach(kj::mv(c)));
      },
      std::move(log), name, limits);
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
