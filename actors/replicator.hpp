#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include <caf/error.hpp>
#include <caf/expected.hpp>

#include "actors/partition.hpp"
#include "wire/tls.hpp"
#include "actors/region_link.hpp"

namespace keel::storage {
class session_store;
}

namespace keel {

/// One write of a session to copy to its replicas (wire/peer.capnp `replicate`).
struct replica_update {
  std::string session;
  uint64_t epoch = 0;
  std::string record;  // the stored checkpoint; empty when only tokens advance
  uint64_t turn = 0;
  uint64_t from_index = 0;
  std::vector<int32_t> tokens;
  /// The writer waits for the answer (`replicator::enqueue` returns a future of it).
  bool acknowledged = false;
  /// With `acknowledged`: the answer is an error (`disconnected`) when live peers exist but
  /// none stored the update (a turn must not be acknowledged on this node alone).
  bool strict = false;
  /// A full copy to every live peer, not only the replicas: after a takeover, so that every
  /// copy of the session elsewhere is fenced at the new epoch.
  bool fence_all = false;
};

/// What one peer holds of one session (wire/peer.capnp `SessionCopy`).
struct session_copy {
  std::string session;
  std::string node;            // the holder's name
  std::string client_address;  // the holder's client Gateway
  bool owner = false;          // its own session (else a replica)
  uint64_t epoch = 0;
  std::string record_owner;  // the owner named in the copy's record
  uint32_t turns = 0;
  uint64_t tokens = 0;
  bool last_done = true;
};

/// A whole copy of a session, as `fetch` returns it.
struct fetched_session {
  std::string node;  // where it came from
  uint64_t epoch = 0;
  std::string record;
  std::map<uint64_t, std::vector<int32_t>> logs;
};

struct replicator_config {
  std::string self_name;
  std::string self_region;
  std::string self_address;
  /// Replicas per session (R), placed by rendezvous hashing over the live peers, at least one in
  /// another region when a live peer there exists.
  int32_t replicas = 1;
  /// A call unanswered for this long fails (and its connection is dropped).
  std::chrono::milliseconds call_timeout{1000};
  /// The node's store, not owned, read for full copies of a session (outlives the replicator).
  storage::session_store* store = nullptr;
  /// A replica refused an update with `stale_epoch`: another node owns the session now. Called
  /// on the replicator's thread after the update's future (if any) is set.
  std::function<void(const std::string& session, uint64_t epoch)> on_stale;
  /// Failed sends (one line each); empty: silent. Called on the replicator's thread.
  std::function<void(const std::string&)> log;
  /// The `partition` fault: peers cut from this node get nothing. May be null.
  std::shared_ptr<const partition> cut;
  /// TLS (wire/tls.hpp): calls go over TLS, presenting this node's certificate, to peers whose
  /// certificates name them.
  std::shared_ptr<const wire::tls_config> tls;
};

/// The node's calls to its peers, on one thread of its own (a KJ event loop with one Cap'n
/// Proto connection per peer), in the order they were queued:
/// - replication: `enqueue` queues a session write; it goes to the session's replicas, the first
///   R live peers in rendezvous order (`placement`). A peer that has not had the session since
///   it (re)joined first gets a full copy read from the store, and so does one that refuses an
///   update for a gap; later updates are deltas. An acknowledged update's future is set once a
///   replica stored it, or with `stale_epoch` when a replica refused it for an older epoch, or,
///   when no live peer could store it, with `disconnected` for a `strict` update and with
///   success and a log line otherwise (this node's synced write is then the only copy).
/// - `locate`, `fetch` and `handoff`: queued, waited for by the caller.
///
/// Thread-safe. The destructor runs nothing more and joins the thread.
class replicator {
 public:
  replicator(replicator_config cfg, std::shared_ptr<peer_table> peers);
  ~replicator();
  replicator(const replicator&) = delete;
  replicator& operator=(const replicator&) = delete;

  /// Queues `u`; returns a future of its answer when `u.acknowledged`, else an invalid one.
  std::future<caf::error> enqueue(replica_update u);

  /// Every copy of `sessions` that the live peers hold (queued; waits up to the call timeout
  /// per peer). Any thread but the replicator's own.
  /// `missing`, when given, receives the names of live peers that did not answer.
  std::vector<session_copy> locate(const std::vector<std::string>& sessions,
                                   std::vector<std::string>* missing = nullptr);
  /// Every copy the live peers hold of a session whose record names `owner` (their replicas of
  /// that node's sessions); waits like `locate`.
  std::vector<session_copy> owned_by(const std::string& owner,
                                     std::vector<std::string>* missing = nullptr);
  /// The newest copy of `session` among the live peers; `not_found` when none has one.
  caf::expected<fetched_session> fetch(const std::string& session);

  /// A clean handoff of `session` to the peer at `address`: a full copy from the store, then
  /// `Peer.handoff`; returns the epoch the peer took the session with. Queued, waited for.
  caf::expected<uint64_t> handoff(const std::string& session, const peer_info& target);

  /// The replicas of `session` among `live` (peers that accept work), best first: the top R by
  /// rendezvous hash of (session, peer name), the last replaced by the best peer of another
  /// region than `self_region` when none of the R is in one and such a peer exists; then the
  /// remaining peers in rendezvous order (fallbacks when a replica fails); draining peers last.
  static std::vector<peer_info> placement(const std::string& session,
                                          const std::string& self_region, int32_t replicas,
                                          std::vector<peer_info> live);

  /// Updates acknowledged by a replica, and refused or dropped ones.
  uint64_t sent() const;
  uint64_t failed() const;

  struct rpc;  // detail: the thread's connections (replicator.cpp)

 private:
  /// Runs `task` on the replicator's thread, after everything queued before.
  void post(std::function<void()> task);
  void run();
  caf::error replicate(const replica_update& u);
  /// `locate` (`owner` empty) or `owned_by`, queued and waited for.
  std::vector<session_copy> ask(const std::vector<std::string>& sessions, const std::string& owner,
                                std::vector<std::string>* missing);
  /// `locate` (`owner` empty), `owned_by` and `fetch`, on the replicator's thread.
  std::vector<session_copy> locate_now(const std::vector<std::string>& sessions,
                                       const std::string& owner, std::vector<std::string>* missing);
  caf::expected<fetched_session> fetch_now(const std::string& session);
  /// Sends `target` the session's full copy from the store.
  caf::error send_full(const std::string& session, const peer_info& target);
  /// Sends `target` the update `u` as it is (a delta).
  caf::error send_delta(const replica_update& u, const peer_info& target);
  std::vector<peer_info> live_peers();
  void report(bool ok, const std::string& why);

  replicator_config cfg_;
  std::shared_ptr<peer_table> peers_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> queue_;
  bool stopping_ = false;
  uint64_t sent_ = 0;
  uint64_t failed_ = 0;
  // Replicator thread only: which sessions each peer (by address) has had a full copy of since
  // its status last changed (the peer's `status_changes` when the set was started).
  struct seeded {
    int32_t status_changes = -1;
    std::set<std::string> sessions;
  };
  std::map<std::string, seeded> seeded_;
  rpc* rpc_ = nullptr;        // replicator thread only
  std::thread thread_;  // last: started after the rest is ready
};

}  // namespace keel
