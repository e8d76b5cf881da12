#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include <caf/actor.hpp>
#include <caf/actor_addr.hpp>
#include <caf/actor_cast.hpp>

#include "actors/fault.hpp"
#include "actors/guardrail.hpp"
#include "actors/metrics.hpp"
#include "actors/ownership_host.hpp"
#include "actors/protocols.hpp"
#include "actors/supervisor.hpp"
#include "kernels/model.hpp"
#include "kernels/tokenizer.hpp"

namespace keel {

/// What one node's actors share: the model (mapped once, so restarts do not reload it), the
/// tokenizer, fault injection, the supervision log, and the current handles of the
/// long-lived actors, which supervisors update when they (re)start them. Thread-safe.
struct node_context {
  std::string name;  // the root of actor paths ("node")
  std::shared_ptr<const model> llm;
  std::shared_ptr<const tokenizer> tok;
  /// The digest of the model file (kernels/digest.hpp): new sessions are pinned to it, and this
  /// node serves only sessions pinned to it (or to none).
  std::string model_digest;
  /// The chat template a new chat session renders with (and keeps: later turns, and any node
  /// that takes the session over, use the session's own): keel-node's --chat-template, else
  /// the model's tokenizer.chat_template, else Keel's default (kernels/chat_prompt.hpp).
  std::string chat_template;
  std::shared_ptr<fault_injector> faults;
  std::shared_ptr<supervision_log> log;
  /// What the node counts for GET /metrics (actors/metrics.hpp); never null.
  std::shared_ptr<node_metrics> metrics = std::make_shared<node_metrics>();
  /// The guardrail (actors/guardrail.hpp); never null (`enabled()` false: none configured).
  std::shared_ptr<guardrail> guard = std::make_shared<guardrail>(guard_config{});
  /// With peers (the ownership protocol): the node's host (invalid while it restarts), which the
  /// session actors send a new turn and a turn's end to, going on when it answers (no handler
  /// waits), and how long they wait for its answer. Empty: the node runs alone.
  std::function<ownership_actor()> ownership_host;
  std::chrono::milliseconds ownership_wait{3000};
  /// With peers: the host refused a session's write because another node owns it: the node
  /// stops serving it (node::lost).
  std::function<void(const std::string& id)> lost_session;
  /// With peers (the ownership protocol): whether this node holds the lease of session ID now (the
  /// host's lease_board), asked before each of its tokens and each resume. Empty: not asked.
  std::function<bool(const std::string& id)> may_serve_session;

  /// The current engine supervisor and batcher, or an invalid handle once the actor is gone.
  /// The context does not own them (their supervisors do): it keeps weak references.
  supervisor_actor engine_sup() const { return get<supervisor_actor>(engine_sup_); }
  batcher_actor batcher() const { return get<batcher_actor>(batcher_); }
  void set_engine_sup(const caf::actor& a) { set(engine_sup_, a); }
  void set_batcher(const caf::actor& a) { set(batcher_, a); }
  /// A node alone with a store: its `store` child, which does the session actors' synced
  /// writes on a thread of its own (store_writer_spec); invalid otherwise (or while it
  /// restarts).
  store_writer_actor store_writer() const { return get<store_writer_actor>(store_writer_); }
  void set_store_writer(const caf::actor& a) { set(store_writer_, a); }
  /// With peers: the node's `failover` child (invalid while it restarts).
  failover_actor failover() const { return get<failover_actor>(failover_); }
  void set_failover(const caf::actor& a) { set(failover_, a); }

 private:
  mutable std::mutex mu_;
  // Weak: a strong handle closed a cycle (engine supervisor -> its child specs -> engine_group
  // -> this context -> engine supervisor) that kept the stopped engine tree, its KV pools, the
  // batcher and the tokenizer alive until exit (LeakSanitizer, keel-node after SIGTERM).
  caf::actor_addr engine_sup_;
  caf::actor_addr batcher_;
  caf::actor_addr store_writer_;
  caf::actor_addr failover_;

  template <class Handle>
  Handle get(const caf::actor_addr& a) const {
    std::lock_guard<std::mutex> guard(mu_);
    return caf::actor_cast<Handle>(a);
  }
  void set(caf::actor_addr& slot, const caf::actor& a) {
    std::lock_guard<std::mutex> guard(mu_);
    slot = a.address();
  }
};

}  // namespace keel
