#include "apps/shell/admin_client.hpp"

#include <capnp/rpc-twoparty.h>
#include <kj/async-io.h>
#include <kj/time.h>
#include <kj/timer.h>

#include "base/error.hpp"
#include "wire/convert.hpp"
#include "wire/keel.capnp.h"
#include "wire/tls.hpp"

namespace keel::shell {

namespace {

std::string text(capnp::Text::Reader t) {
  return std::string(t.cStr(), t.size());
}

/// One member's connection, logged in.
struct link {
  kj::Own<kj::AsyncIoStream> stream;
  kj::Own<capnp::TwoPartyClient> rpc;
  wire::Admin::Client admin = nullptr;
};

}  // namespace

struct cluster::impl {
  kj::AsyncIoContext io = kj::setupAsyncIo();
  std::string key;
  options opts;
  kj::Own<kj::TlsContext> tls;       // with opts.tls; before `links`, which may use it
  std::vector<kj::Own<link>> links;  // by member; null while down

  /// `p`, failing with DISCONNECTED "WHAT: no answer within N ms" after `limit`.
  template <class T>
  kj::Promise<T> bounded(kj::Promise<T> p, std::chrono::milliseconds limit, std::string what) {
    // From the clock, not `Timer::now()`: that is the time the loop last waited, and between
    // commands the loop does not run (the shell waits for input), so `afterDelay` would count
    // from the previous command and time out at once after a pause longer than `limit`.
    auto deadline = kj::systemPreciseMonotonicClock().now() + limit.count() * kj::MILLISECONDS;
    auto timeout = io.provider->getTimer().atTime(deadline);
    auto msg = what + ": no answer within " + std::to_string(limit.count()) + " ms";
    return p.exclusiveJoin(
        timeout.then([msg]() -> kj::Promise<T> { return KJ_EXCEPTION(DISCONNECTED, msg); }));
  }
};

cluster::cluster(std::vector<std::string> addresses, std::string key, options opts)
    : impl_(std::make_unique<impl>()) {
  impl_->key = std::move(key);
  impl_->opts = opts;
  if (opts.tls) impl_->tls = opts.tls->context(false);
  for (auto& a : addresses) {
    members_.push_back(member{a, "", false, "not connected yet"});
    impl_->links.emplace_back();
  }
}

cluster::~cluster() = default;

caf::error cluster::connect() {
  auto& ws = impl_->io.waitScope;
  for (size_t i = 0; i < members_.size(); ++i) {
    auto& m = members_[i];
    if (m.up) continue;
    caf::error refused;
    KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] {
                   auto& io = *impl_->io.provider;
                   auto l = kj::heap<link>();
                   l->stream = wire::connect_to(io.getNetwork(), io.getTimer(), impl_->tls.get(),
                                                m.address, impl_->opts.tls_name,
                                                impl_->opts.connect_timeout)
                                   .wait(ws)
                                   .stream;
                   l->rpc = kj::heap<capnp::TwoPartyClient>(*l->stream);
                   auto gate = l->rpc->bootstrap().castAs<wire::AdminGate>();
                   auto req = gate.loginRequest();
                   req.setKey(impl_->key);
                   auto res =
                       impl_->bounded(req.send(), impl_->opts.connect_timeout, "login").wait(ws);
                   m.name = text(res.getNode());
                   if (auto err = wire::from_wire(res.getError())) {
                     refused = make_error(code_of(err), "node " + m.name + " at " + m.address +
                                                            ": " + message_of(err));
                     return;
                   }
                   l->admin = res.getAdmin();
                   impl_->links[i] = kj::mv(l);
                   m.up = true;
                   m.down_reason.clear();
                 })) {
      m.down_reason = message_of(wire::from_kj(*e));
      continue;
    }
    if (refused) return refused;
  }
  return {};
}

namespace {

/// Runs `call(admin)` for member `i`, bounded by the call timeout. A broken connection marks
/// the member down (`disconnected`, naming the node); the caller's `connect()` tries again.
template <class T, class Call>
caf::expected<T> with_admin(cluster::impl& im, std::vector<member>& members, size_t i,
                            const char* what, Call call) {
  auto& m = members.at(i);
  auto node = (m.name.empty() ? std::string("node") : "node " + m.name) + " at " + m.address;
  if (!m.up || im.links[i].get() == nullptr)
    return make_error(errc::disconnected, node + " is down: " + m.down_reason);
  caf::expected<T> out = make_error(errc::failed, "no answer");
  KJ_IF_MAYBE (e, kj::runCatchingExceptions([&] { out = call(im.links[i]->admin); })) {
    auto err = wire::from_kj(*e);
    if (code_of(err) == errc::disconnected) {
      m.up = false;
      m.down_reason = message_of(err);
      im.links[i] = nullptr;
      return make_error(errc::disconnected, node + " is down: " + m.down_reason);
    }
    return make_error(code_of(err), std::string(what) + " on " + node + ": " + message_of(err));
  }
  return out;
}

}  // namespace

caf::expected<std::vector<actor_row>> cluster::tree(size_t m) {
  auto& im = *impl_;
  return with_admin<std::vector<actor_row>>(
      im, members_, m, "tree",
      [&](wire::Admin::Client& a) -> caf::expected<std::vector<actor_row>> {
        auto res =
            im.bounded(a.treeRequest().send(), im.opts.call_timeout, "tree").wait(im.io.waitScope);
        if (auto err = wire::from_wire(res.getError())) return err;
        std::vector<actor_row> out;
        for (auto r : res.getActors()) {
          out.push_back(actor_row{text(r.getPath()), r.getDepth(), text(r.getKind()),
                                  text(r.getState()), r.getRestarts(), text(r.getLastFailure()),
                                  r.getLastFailureAgeMs(), r.getLastFailureUnixMs()});
        }
        return out;
      });
}

caf::expected<node_report> cluster::report(size_t m) {
  auto& im = *impl_;
  return with_admin<node_report>(
      im, members_, m, "report", [&](wire::Admin::Client& a) -> caf::expected<node_report> {
        auto res = im.bounded(a.reportRequest().send(), im.opts.call_timeout, "report")
                       .wait(im.io.waitScope);
        if (auto err = wire::from_wire(res.getError())) return err;
        auto r = res.getReport();
        node_report o;
        o.name = text(r.getName());
        o.region = text(r.getRegion());
        o.client_address = text(r.getClientAddress());
        o.admin_address = text(r.getAdminAddress());
        o.peer_address = text(r.getPeerAddress());
        o.model = text(r.getModel());
        o.model_digest = text(r.getModelDigest());
        o.shards = r.getShards();
        o.uptime_ms = r.getUptimeMs();
        o.sessions = r.getSessions();
        o.running_turns = r.getRunningTurns();
        o.queue_length = r.getQueueLength();
        o.kv_pages_used = r.getKvPagesUsed();
        o.kv_pages_total = r.getKvPagesTotal();
        o.tokens_per_second = r.getTokensPerSecond();
        o.tokens = r.getTokens();
        o.steps = r.getSteps();
        o.group_failures = r.getGroupFailures();
        o.preemptions = r.getPreemptions();
        o.shed = r.getShed();
        o.last_recovery_ms = r.getLastRecoveryMs();
        o.restarts = r.getRestarts();
        o.faults_fired = r.getFaultsFired();
        o.replicated = r.getReplicated();
        o.replication_failures = r.getReplicationFailures();
        for (auto p : r.getPeers()) {
          o.peers.push_back(peer_row{text(p.getAddress()), text(p.getName()), text(p.getRegion()),
                                     text(p.getStatus()), text(p.getBreaker()), p.getRoundTripUs(),
                                     p.getFailures(), text(p.getLastFailure()),
                                     text(p.getClientAddress()), p.getKvPagesFree(),
                                     p.getKvPagesCapacity(), p.getWaiting(), p.getRoom(),
                                     text(p.getModelDigest())});
        }
        o.draining = r.getDraining();
        o.room = r.getRoom();
        return o;
      });
}

caf::expected<std::vector<session_row>> cluster::sessions(size_t m) {
  auto& im = *impl_;
  return with_admin<std::vector<session_row>>(
      im, members_, m, "sessions",
      [&](wire::Admin::Client& a) -> caf::expected<std::vector<session_row>> {
        auto res = im.bounded(a.sessionsRequest().send(), im.opts.call_timeout, "sessions")
                       .wait(im.io.waitScope);
        if (auto err = wire::from_wire(res.getError())) return err;
        std::vector<session_row> out;
        for (auto s : res.getSessions()) {
          session_row o;
          o.id = text(s.getId());
          o.owner = text(s.getOwner());
          o.tenant = text(s.getTenant());
          o.model = text(s.getModel());
          o.model_digest = text(s.getModelDigest());
          o.context_limit = s.getContextLimit();
          for (auto r : s.getReplicas()) o.replicas.push_back(text(r));
          o.epoch = s.getEpoch();
          o.turns = s.getTurns();
          o.tokens = s.getTokens();
          o.running = s.getRunning();
          o.priority = s.getPriority();
          o.durable = s.getDurable();
          o.checkpoint_turn = s.getCheckpointTurn();
          o.checkpoint_tokens = s.getCheckpointTokens();
          o.parked = text(s.getParked());
          out.push_back(std::move(o));
        }
        return out;
      });
}

caf::expected<std::string> cluster::kill(size_t m, const std::string& path) {
  auto& im = *impl_;
  return with_admin<std::string>(
      im, members_, m, "kill", [&](wire::Admin::Client& a) -> caf::expected<std::string> {
        auto req = a.killRequest();
        req.setPath(path);
        auto res = im.bounded(req.send(), im.opts.call_timeout, "kill").wait(im.io.waitScope);
        if (auto err = wire::from_wire(res.getError())) return err;
        return text(res.getOutcome());
      });
}

caf::expected<std::string> cluster::restart(size_t m, const std::string& path) {
  auto& im = *impl_;
  return with_admin<std::string>(
      im, members_, m, "restart", [&](wire::Admin::Client& a) -> caf::expected<std::string> {
        auto req = a.restartRequest();
        req.setPath(path);
        auto res = im.bounded(req.send(), im.opts.call_timeout, "restart").wait(im.io.waitScope);
        if (auto err = wire::from_wire(res.getError())) return err;
        return text(res.getOutcome());
      });
}

caf::expected<std::string> cluster::fault(size_t m, const std::string& path, const fault_spec& f) {
  auto& im = *impl_;
  return with_admin<std::string>(
      im, members_, m, "fault", [&](wire::Admin::Client& a) -> caf::expected<std::string> {
        using k = wire::Fault::Kind;
        auto req = a.faultRequest();
        req.setPath(path);
        auto out = req.initFault();
        switch (f.what) {
          case fault_spec::kind::crash:
            out.setKind(k::CRASH);
            break;
          case fault_spec::kind::stall:
            out.setKind(k::STALL);
            break;
          case fault_spec::kind::kv_fail:
            out.setKind(k::KV_FAIL);
            break;
          case fault_spec::kind::cut:
            out.setKind(k::CUT);
            break;
          case fault_spec::kind::clear:
            out.setKind(k::CLEAR);
            break;
          case fault_spec::kind::partition:
            out.setKind(k::PARTITION);
            break;
          case fault_spec::kind::disk_full:
            out.setKind(k::DISK_FULL);
            break;
        }
        out.setAfterSteps(f.after_steps);
        out.setDurationMs(f.duration_ms);
        out.setCount(f.count);
        auto peers = out.initPeers(static_cast<unsigned>(f.peers.size()));
        for (unsigned i = 0; i < f.peers.size(); ++i) peers.set(i, f.peers[i]);
        auto res = im.bounded(req.send(), im.opts.call_timeout, "fault").wait(im.io.waitScope);
        if (auto err = wire::from_wire(res.getError())) return err;
        return text(res.getOutcome());
      });
}

caf::expected<drain_result> cluster::drain(size_t m) {
  auto& im = *impl_;
  return with_admin<drain_result>(
      im, members_, m, "drain", [&](wire::Admin::Client& a) -> caf::expected<drain_result> {
        auto res = im.bounded(a.drainRequest().send(), im.opts.drain_timeout, "drain")
                       .wait(im.io.waitScope);
        if (auto err = wire::from_wire(res.getError())) return err;
        drain_result out;
        for (auto s : res.getMoved())
          out.sessions.push_back(
              drained_row{text(s.getId()), text(s.getTo()), s.getEpoch(), text(s.getError())});
        out.remaining = res.getRemaining();
        return out;
      });
}

}  // namespace keel::shell
