#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "actors/messages.hpp"
#include "actors/node_context.hpp"
#include "actors/supervisor.hpp"
#include "kernels/collective.hpp"
#include "kernels/kv_cache.hpp"

namespace keel {

/// A rank's KV cache: its page pool and the pages of each sequence. The engine group owns it,
/// so it outlives a crashed worker: the restarted worker adopts it and sequences continue
/// without being prefilled again. The batcher still names each sequence's valid length in
/// every step (a step cut short may have written past it), and can drop the caches with
/// `step_batch::reset` when it no longer trusts them. Used by one worker thread at a time.
struct rank_cache {
  std::unique_ptr<kv_pool> kv;  // declared first: the sequences release into it
  std::map<seq_id, kv_sequence> seqs;
};

/// The shared set-up of one tensor-parallel engine group (the children of engine_sup).
struct engine_group {
  std::shared_ptr<node_context> ctx;
  int32_t shards = 1;
  int32_t threads_per_shard = 1;
  /// Starts each shard's compute threads (the node's environment; empty: the default).
  thread_spawner spawn;
  uint64_t kv_bytes_per_shard = 64ull << 20;

  /// The collective of the group's current incarnation: rank 0 starts first (one_for_all starts
  /// children in order) and makes a new one; the other ranks join it.
  std::shared_ptr<collective> collective_for(int32_t rank);

  /// The rank's cache, made on first use.
  std::shared_ptr<rank_cache> cache_for(int32_t rank);

 private:
  std::mutex mu_;
  std::shared_ptr<collective> current_;
  std::map<int32_t, std::shared_ptr<rank_cache>> caches_;
};

/// A shard worker owns one device (here: a group of CPU threads), its slice of the weights and
/// its KV pages. It runs as a detached actor (compute and the collective block its thread).
///
/// Messages (`shard_actor`, messages.hpp):
/// - `(step_atom, std::shared_ptr<const step_batch>) -> step_result`: frees the released
///   sequences, then runs the entries as one batched forward step. Errors: `overloaded` when
///   KV pages run out (nothing changed), `disconnected` when another rank of the group died
///   mid-step. An entry whose kv_length this shard's cache does not have means the group's state
///   is inconsistent: the worker fails, so that its group restarts clean.
/// Faults (fault_injector): crash (an exception: the actor fails), stall, failed KV allocations.
/// When it terminates for any reason it aborts the group's collective, so that no other rank
/// stays blocked.
caf::expected<shard_actor> spawn_shard_worker(caf::actor_system& sys,
                                              std::shared_ptr<engine_group> group, int32_t rank,
                                              std::string path);

/// Child specs "shard-0" .. "shard-{n-1}" for engine_sup.
std::vector<child_spec> shard_worker_specs(std::shared_ptr<engine_group> group);

}  // namespace keel
