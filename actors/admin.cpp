// GCC 12 reports kj::ExceptionOr<caf::expected<T>> as maybe uninitialised where it inlines a
// cross-thread fulfilment (a false positive about kj::Maybe's storage; see gateway.cpp).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include "actors/admin.hpp"

#include <algorithm>
#include <atomic>
#include <future>
#include <map>
#include <mutex>
#include <optional>

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/timer.h>

#include "actors/admin_ops.hpp"
#include "actors/atoms.hpp"
#include "wire/bridge.hpp"
#include "wire/convert.hpp"
#include "wire/keel.capnp.h"
#include "wire/key_gate.hpp"

namespace keel {

namespace {

using namespace std::chrono_literals;
using sys_clock = std::chrono::system_clock;
using wire_kind = wire::Error::Kind;

std::optional<fault_kind> to_kind(wire::Fault::Kind k) {
  switch (k) {
    case wire::Fault::Kind::CRASH:
      return fault_kind::crash;
    case wire::Fault::Kind::STALL:
      return fault_kind::stall;
    case wire::Fault::Kind::KV_FAIL:
      return fault_kind::kv_fail;
    case wire::Fault::Kind::CUT:
      return fault_kind::cut;
    case wire::Fault::Kind::CLEAR:
      return fault_kind::clear;
    case wire::Fault::Kind::PARTITION:
      return fault_kind::partition;
    case wire::Fault::Kind::DISK_FULL:
      return fault_kind::disk_full;
  }
  return std::nullopt;  // from a newer keel-shell
}

void set_ok(wire::Error::Builder out) {
  out.setKind(wire_kind::NONE);
}

}  // namespace

/// The admin's state on its KJ thread (and the worker's `ops`).
struct admin::impl : kj::TaskSet::ErrorHandler {
  impl(caf::actor_system& s, node& n, const admin_config& c, kj::Timer& t, std::string addr)
      : sys(s), nd(n), cfg(c), timer(t), address(std::move(addr)), ops(s, n, c), blocking(16) {}

  void log(const std::string& line) const {
    if (cfg.log) cfg.log(line);
  }

  void taskFailed(kj::Exception&& e) override {
    log("admin: " + std::string(e.getDescription().cStr()));
  }

  /// Every second: the batcher's token count, for tokens/s over the last second.
  kj::Promise<void> sample_loop() {
    return timer.afterDelay(1 * kj::SECONDS)
        .then([this] {
          return wire::ask<batcher_stats>(sys, nd.context()->batcher(), 1000ms, stats_atom::value);
        })
        .then([this](caf::expected<batcher_stats> s) {
          auto now = std::chrono::steady_clock::now();
          if (s) {
            // A restarted batcher counts from 0 again.
            auto delta = s->tokens >= last_tokens ? s->tokens - last_tokens : s->tokens;
            double secs = std::chrono::duration<double>(now - last_sample).count();
            tokens_per_second.store(secs > 0 ? static_cast<double>(delta) / secs : 0.0);
            last_tokens = s->tokens;
          } else {
            tokens_per_second.store(0.0);
          }
          last_sample = now;
          return sample_loop();
        });
  }

  caf::actor_system& sys;
  node& nd;
  const admin_config& cfg;
  kj::Timer& timer;
  std::string address;
  sys_clock::time_point started = sys_clock::now();
  std::atomic<double> tokens_per_second{0.0};
  uint64_t last_tokens = 0;
  std::chrono::steady_clock::time_point last_sample = std::chrono::steady_clock::now();
  // Issue #11: 20,000 wrong keys on one connection were answered in 1.2 s.
  wire::refusal_pacer refusals{timer};
  admin_ops ops;                   // used on the worker's thread only
  wire::blocking_worker blocking;  // after ops: joined before ops goes
  kj::Own<kj::TlsContext> tls = cfg.tls ? cfg.tls->context(false) : kj::Own<kj::TlsContext>();
  kj::TaskSet tasks{*this};  // last: destroyed first, it references the rest
};

namespace {

using state = admin::impl;

class admin_server final : public wire::Admin::Server {
 public:
  explicit admin_server(state& a) : a_(a) {}

  kj::Promise<void> tree(TreeContext ctx) override {
    auto& ops = a_.ops;
    return a_.blocking.run<std::vector<actor_row>>([&ops] { return ops.tree(); })
        .then([ctx](caf::expected<std::vector<actor_row>> rows) mutable {
          auto res = ctx.getResults();
          if (!rows) return wire::to_wire(rows.error(), res.initError());
          auto now = sys_clock::now();
          auto out = res.initActors(static_cast<unsigned>(rows->size()));
          for (size_t i = 0; i < rows->size(); ++i) {
            auto& r = (*rows)[i];
            auto a = out[static_cast<unsigned>(i)];
            a.setPath(r.path);
            a.setDepth(r.depth);
            a.setKind(r.kind);
            a.setState(r.state);
            a.setRestarts(static_cast<uint32_t>(std::max(r.restarts, 0)));
            a.setLastFailure(r.last_failure);
            if (r.failed_at != sys_clock::time_point{}) {
              auto age = std::chrono::duration_cast<std::chrono::milliseconds>(now - r.failed_at);
              a.setLastFailureAgeMs(static_cast<uint64_t>(std::max<int64_t>(age.count(), 0)));
              a.setLastFailureUnixMs(std::chrono::duration_cast<std::chrono::milliseconds>(
                                         r.failed_at.time_since_epoch())
                                         .count());
            }
          }
          set_ok(res.initError());
        });
  }

  kj::Promise<void> report(ReportContext ctx) override {
    auto& ops = a_.ops;
    return a_.blocking.run<figures>([&ops] { return ops.report(); })
        .then([this, ctx](caf::expected<figures> f) mutable {
          auto res = ctx.getResults();
          if (!f) return wire::to_wire(f.error(), res.initError());
          auto out = res.initReport();
          const auto& nc = a_.nd.config();
          out.setName(nc.name);
          out.setRegion(nc.region);
          out.setClientAddress(a_.cfg.client_address);
          out.setAdminAddress(a_.address);
          out.setPeerAddress(nc.peer_address);
          out.setModel(a_.nd.context()->llm->path());
          out.setModelDigest(a_.nd.context()->model_digest);
          out.setShards(static_cast<uint32_t>(nc.shards));
          out.setUptimeMs(static_cast<uint64_t>(
              std::chrono::duration_cast<std::chrono::milliseconds>(sys_clock::now() - a_.started)
                  .count()));
          out.setSessions(f->sessions);
          out.setRunningTurns(f->running);
          auto total = static_cast<uint32_t>(std::max(nc.batching.kv_pages, 0));
          out.setKvPagesTotal(total);
          if (f->stats) {
            auto& s = *f->stats;
            out.setQueueLength(static_cast<uint32_t>(std::max(s.waiting, 0)));
            auto free = static_cast<uint32_t>(std::clamp<int32_t>(s.free_pages, 0, total));
            out.setKvPagesUsed(total - free);
            out.setTokens(s.tokens);
            out.setSteps(s.steps);
            out.setGroupFailures(s.group_failures);
            out.setPreemptions(s.preemptions);
            out.setShed(s.shed);
            if (!s.recovery_ms.empty()) out.setLastRecoveryMs(s.recovery_ms.back());
          }
          out.setTokensPerSecond(a_.tokens_per_second.load());
          out.setRestarts(static_cast<uint32_t>(std::max(f->restarts, 0)));
          out.setFaultsFired(f->faults_fired);
          out.setReplicated(f->replicated);
          out.setReplicationFailures(f->replication_failures);
          out.setDraining(a_.nd.draining());
          out.setRoom(static_cast<float>(a_.nd.load().room()));
          auto peers = out.initPeers(static_cast<unsigned>(f->peers.size()));
          for (size_t i = 0; i < f->peers.size(); ++i) {
            auto& p = f->peers[i];
            auto o = peers[static_cast<unsigned>(i)];
            o.setAddress(p.address);
            o.setName(p.name);
            o.setRegion(p.region);
            o.setStatus(to_string(p.status));
            o.setBreaker(to_string(p.breaker));
            o.setRoundTripUs(static_cast<uint64_t>(
                std::chrono::duration_cast<std::chrono::microseconds>(p.round_trip).count()));
            o.setFailures(p.failures);
            o.setLastFailure(p.last_failure);
            o.setClientAddress(p.client_address);
            o.setKvPagesFree(static_cast<uint32_t>(std::max(p.load.kv_free, 0)));
            o.setKvPagesCapacity(static_cast<uint32_t>(std::max(p.load.kv_capacity, 0)));
            o.setWaiting(static_cast<uint32_t>(std::max(p.load.waiting, 0)));
            o.setRoom(static_cast<float>(p.load.room()));
            o.setModelDigest(p.model_digest);
          }
          set_ok(res.initError());
        });
  }

  kj::Promise<void> sessions(SessionsContext ctx) override {
    auto& ops = a_.ops;
    return a_.blocking.run<std::vector<session_row>>([&ops] { return ops.sessions(); })
        .then([this, ctx](caf::expected<std::vector<session_row>> rows) mutable {
          auto res = ctx.getResults();
          if (!rows) return wire::to_wire(rows.error(), res.initError());
          auto out = res.initSessions(static_cast<unsigned>(rows->size()));
          for (size_t i = 0; i < rows->size(); ++i) {
            auto& row = (*rows)[i];
            auto& r = row.r;
            auto o = out[static_cast<unsigned>(i)];
            uint64_t tokens = 0;
            for (auto& t : r.turns) tokens += t.user.size() + t.generated.size();
            o.setId(r.id);
            o.setOwner(r.owner.empty() ? a_.nd.config().name : r.owner);
            auto reps = o.initReplicas(static_cast<unsigned>(row.replicas.size()));
            for (unsigned k = 0; k < row.replicas.size(); ++k) reps.set(k, row.replicas[k]);
            o.setEpoch(r.epoch);
            o.setTurns(static_cast<uint32_t>(r.turns.size()));
            o.setTokens(tokens);
            o.setRunning(!r.turns.empty() && !r.turns.back().done);
            o.setPriority(r.priority);
            o.setDurable(row.durable);
            o.setCheckpointTurn(row.checkpoint_turn);
            o.setCheckpointTokens(row.checkpoint_tokens);
            o.setParked(row.parked);
            o.setTenant(r.tenant);
            o.setModel(r.model);
            o.setModelDigest(r.model_digest);
            o.setContextLimit(static_cast<uint32_t>(std::max(r.context_limit, 0)));
          }
          set_ok(res.initError());
        });
  }

  /// An actor path from the wire, refused when it holds a NUL byte (read up to the NUL it would
  /// name another actor) or is longer than any path of a node's tree can be.
  static caf::expected<std::string> actor_path(capnp::Text::Reader t) {
    std::string path(t.begin(), t.size());
    if (path.size() > 4096)
      return make_error(errc::bad_request,
                        "actor path of " + std::to_string(path.size()) + " bytes: at most 4096");
    if (auto nul = path.find('\0'); nul != std::string::npos)
      return make_error(errc::bad_request, "actor path '" + path.substr(0, nul) +
                                               "\\0...' holds a NUL byte at " +
                                               std::to_string(nul));
    return path;
  }

  kj::Promise<void> kill(KillContext ctx) override {
    auto path = actor_path(ctx.getParams().getPath());
    if (!path) return outcome(ctx, kj::Promise<caf::expected<std::string>>(std::move(path)));
    auto& ops = a_.ops;
    return outcome(ctx,
                   a_.blocking.run<std::string>([&ops, p = *path] { return ops.kill(p); }));
  }

  kj::Promise<void> restart(RestartContext ctx) override {
    auto path = actor_path(ctx.getParams().getPath());
    if (!path) return outcome(ctx, kj::Promise<caf::expected<std::string>>(std::move(path)));
    auto& ops = a_.ops;
    return outcome(ctx,
                   a_.blocking.run<std::string>([&ops, p = *path] { return ops.restart(p); }));
  }

  kj::Promise<void> fault(FaultContext ctx) override {
    auto p = ctx.getParams();
    auto checked = actor_path(p.getPath());
    if (!checked) return outcome(ctx, kj::Promise<caf::expected<std::string>>(std::move(checked)));
    auto path = *checked;
    auto f = p.getFault();
    auto kind = to_kind(f.getKind());
    if (!kind) {
      wire::to_wire(make_error(errc::unimplemented,
                               "fault kind " + std::to_string(static_cast<int>(f.getKind())) +
                                   " is unknown to keel-node " + a_.nd.config().name),
                    ctx.getResults().initError());
      return kj::READY_NOW;
    }
    fault_request req{*kind, f.getAfterSteps(), f.getDurationMs(), f.getCount(), {}};
    for (auto peer : f.getPeers()) req.peers.emplace_back(peer.cStr(), peer.size());
    auto& ops = a_.ops;
    return outcome(
        ctx, a_.blocking.run<std::string>([&ops, path, req] { return ops.fault(path, req); }));
  }

  kj::Promise<void> drain(DrainContext ctx) override {
    auto& ops = a_.ops;
    a_.log("admin: drain of node " + a_.nd.config().name + " asked");
    return a_.blocking.run<drain_outcome>([&ops] { return ops.drain(); })
        .then([this, ctx](caf::expected<drain_outcome> d) mutable {
          auto res = ctx.getResults();
          if (!d) {
            a_.log("admin: drain: " + describe(d.error()));
            return wire::to_wire(d.error(), res.initError());
          }
          auto out = res.initMoved(static_cast<unsigned>(d->sessions.size()));
          size_t moved = 0;
          for (size_t i = 0; i < d->sessions.size(); ++i) {
            auto& s = d->sessions[i];
            auto o = out[static_cast<unsigned>(i)];
            o.setId(s.id);
            o.setTo(s.to);
            o.setEpoch(s.epoch);
            o.setError(s.error);
            if (s.error.empty()) ++moved;
          }
          res.setRemaining(d->remaining);
          a_.log("admin: drain: moved " + std::to_string(moved) + " of " +
                 std::to_string(d->sessions.size()) + " session(s); " +
                 std::to_string(d->remaining) + " remain");
          set_ok(res.initError());
        });
  }

 private:
  template <class Context>
  kj::Promise<void> outcome(Context ctx, kj::Promise<caf::expected<std::string>> p) {
    return p.then([this, ctx](caf::expected<std::string> r) mutable {
      auto res = ctx.getResults();
      if (!r) {
        a_.log("admin: " + describe(r.error()));
        return wire::to_wire(r.error(), res.initError());
      }
      a_.log("admin: " + *r);
      res.setOutcome(*r);
      set_ok(res.initError());
    });
  }

  state& a_;
};

class gate_server final : public wire::AdminGate::Server {
 public:
  explicit gate_server(state& a) : a_(a) {}

  kj::Promise<void> login(LoginContext ctx) override {
    const auto& name = a_.nd.config().name;
    std::string key = ctx.getParams().getKey().cStr();
    auto res = ctx.getResults();
    res.setNode(name);
    if (a_.cfg.key.empty()) {
      wire::to_wire(make_error(errc::unimplemented, "admin interface disabled: keel-node " + name +
                                                        " was started without --admin-key"),
                    res.initError());
      return kj::READY_NOW;
    }
    // Checked before the key, so that a fast answer tells nothing about it: while this many
    // wrong keys wait, every login is refused (the right key too: a brief lockout, logged).
    if (a_.refusals.saturated()) {
      a_.log("admin: refused a login: " + std::to_string(a_.refusals.waiting()) +
             " wrong keys are waiting for their answer");
      wire::to_wire(make_error(errc::overloaded,
                               "too many wrong admin keys lately on keel-node " + name +
                                   "; try again in a few seconds"),
                    res.initError());
      return kj::READY_NOW;
    }
    if (!wire::same_key(key, a_.cfg.key)) {
      a_.log("admin: refused a login with a wrong key");
      return a_.refusals.delay().then([ctx]() mutable {
        wire::to_wire(make_error(errc::failed, "admin key refused"), ctx.getResults().initError());
      });
    }
    res.setAdmin(kj::heap<admin_server>(a_));
    set_ok(res.initError());
    return kj::READY_NOW;
  }

 private:
  state& a_;
};

}  // namespace

caf::expected<std::unique_ptr<admin>> admin::start(caf::actor_system& sys, node& n,
                                                   admin_config cfg) {
  std::unique_ptr<admin> a(new admin());
  a->cfg_ = std::move(cfg);
  a->server_ = std::make_unique<wire::server_thread>();
  auto serve = [&sys, &n, ap = a.get()](kj::AsyncIoContext& io,
                                        kj::Own<kj::ConnectionReceiver> listener, uint16_t port) {
    auto st = kj::heap<state>(sys, n, ap->cfg_, io.provider->getTimer(),
                              ap->cfg_.host + ":" + std::to_string(port));
    auto main = std::make_shared<capnp::Capability::Client>(kj::heap<gate_server>(*st));
    auto sampling = st->sample_loop().eagerlyEvaluate([s = st.get()](kj::Exception&& e) {
      s->log("admin: stopped sampling tokens/s: " + std::string(e.getDescription().cStr()));
    });
    auto accepting = wire::accept_forever(
        *listener, io.provider->getTimer(), st->tls.get(),
        [main](kj::Own<kj::PeerIdentity>) { return *main; }, st->tasks, ap->cfg_.log, "admin",
        // The admin's requests are a key, a path and a fault's numbers: 1 MiB is plenty.
        capnp::ReaderOptions{128 * 1024, 16});
    return accepting.attach(kj::mv(sampling), kj::mv(listener), kj::mv(st));
  };
  auto port = a->server_->start("admin", a->cfg_.host, a->cfg_.port, std::move(serve), a->cfg_.log);
  if (!port) return std::move(port.error());
  a->port_ = *port;
  return a;
}

std::string admin::address() const {
  return cfg_.host + ":" + std::to_string(port_);
}

void admin::stop() {
  if (server_) server_->stop();
}

admin::~admin() {
  stop();
}

}  // namespace keel
