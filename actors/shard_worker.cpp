#include "actors/shard_worker.hpp"

#include <map>
#include <stdexcept>
#include <thread>

#include <caf/actor_system.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include "actors/let_it_crash.hpp"
#include "kernels/engine.hpp"
#include "kernels/kv_cache.hpp"
#include "kernels/thread_pool.hpp"

namespace keel {

std::shared_ptr<collective> engine_group::collective_for(int32_t rank) {
  std::lock_guard<std::mutex> guard(mu_);
  if (rank == 0 || !current_ || current_->aborted()) {
    if (current_) current_->abort();
    current_ = std::make_shared<collective>(shards);
  }
  return current_;
}

std::shared_ptr<rank_cache> engine_group::cache_for(int32_t rank) {
  std::lock_guard<std::mutex> guard(mu_);
  auto& c = caches_[rank];
  if (!c) {
    c = std::make_shared<rank_cache>();
    c->kv = std::make_unique<kv_pool>(kv_layout_for(*ctx->llm, shard_layout{rank, shards}),
                                      kv_bytes_per_shard);
  }
  return c;
}

namespace {

struct shard_state {
  std::shared_ptr<engine_group> group;
  int32_t rank = 0;
  std::string path;
  std::shared_ptr<collective> coll;
  std::unique_ptr<thread_pool> pool;
  std::shared_ptr<rank_cache> cache;
  std::unique_ptr<engine> eng;
  uint64_t steps = 0;
  static inline const char* name = "shard_worker";
};

caf::result<step_result> run_step(shard_state& st, const step_batch& b) {
  auto& faults = *st.group->ctx->faults;
  auto f = faults.on_shard_step(st.rank);
  if (f.stall.count() > 0) std::this_thread::sleep_for(f.stall);
  if (f.crash) {
    throw std::runtime_error("injected fault: " + st.path + " crashed at step " +
                             std::to_string(st.steps));
  }
  auto& seqs = st.cache->seqs;
  if (auto n = faults.take_kv_failures(st.rank); n > 0) st.cache->kv->fail_next_allocations(n);
  ++st.steps;
  if (b.reset) seqs.clear();
  for (auto id : b.released) seqs.erase(id);
  std::vector<seq_step> steps;
  steps.reserve(b.entries.size());
  step_result out;
  out.number = b.number;
  out.rank = st.rank;
  const bool leader = st.rank == 0;
  const auto vocab = st.group->ctx->llm->config().vocab_size;
  for (auto& e : b.entries) {
    auto& seq = seqs.try_emplace(e.seq, *st.cache->kv).first->second;
    if (seq.length() > e.kv_length) seq.truncate(e.kv_length);
    if (seq.length() != e.kv_length) {
      // This rank lacks state the batcher counts on: the group is inconsistent. Let it crash;
      // the batcher then drops every cache and prefills the sequences again.
      throw std::logic_error(st.path + ": sequence " + std::to_string(e.seq) + " has " +
                             std::to_string(seq.length()) + " cached tokens, the step expects " +
                             std::to_string(e.kv_length));
    }
    if (leader && e.want_logits) out.logits.emplace_back(vocab);
  }
  size_t li = 0;
  for (auto& e : b.entries) {
    seq_step s;
    s.kv = &seqs.at(e.seq);
    s.tokens = e.tokens.data();
    s.n_tokens = static_cast<int32_t>(e.tokens.size());
    s.logits = leader && e.want_logits ? out.logits[li++].data() : nullptr;
    steps.push_back(s);
  }
  if (auto err = st.eng->forward(steps)) return err;
  return out;
}

shard_actor::behavior_type shard_worker(shard_actor::stateful_pointer<shard_state> self,
                           std::shared_ptr<engine_group> group, int32_t rank, std::string path,
                           std::shared_ptr<collective> coll) {
  auto& st = self->state;
  st.group = group;
  st.rank = rank;
  st.path = std::move(path);
  st.coll = std::move(coll);
  const auto& m = *group->ctx->llm;
  shard_layout layout{rank, group->shards};
  st.pool = std::make_unique<thread_pool>(group->threads_per_shard, group->spawn,
                                          "keel-shard" + std::to_string(rank));
  st.cache = group->cache_for(rank);
  st.eng = std::make_unique<engine>(m, *st.pool, layout, st.coll.get());
  exceptions_as_failures(self);
  // Whatever ends this actor, the other ranks must not wait for it in the collective.
  self->attach_functor([coll = st.coll] { coll->abort(); });
  return {
      [self](step_atom, const std::shared_ptr<const step_batch>& b) -> caf::result<step_result> {
        return run_step(self->state, *b);
      },
  };
}

}  // namespace

caf::expected<shard_actor> spawn_shard_worker(caf::actor_system& sys,
                                              std::shared_ptr<engine_group> group, int32_t rank,
                                              std::string path) {
  if (auto err = check_sharding(*group->ctx->llm, shard_layout{rank, group->shards})) return err;
  // Taken here, in the supervisor's start order (rank 0 first), not in the new thread.
  auto coll = group->collective_for(rank);
  return sys.spawn<caf::detached>(shard_worker, std::move(group), rank, std::move(path),
                                  std::move(coll));
}

std::vector<child_spec> shard_worker_specs(std::shared_ptr<engine_group> group) {
  std::vector<child_spec> out;
  for (int32_t r = 0; r < group->shards; ++r) {
    child_spec c;
    c.id = "shard-" + std::to_string(r);
    c.start = [group, r](caf::actor_system& sys, const std::string& path,
                         const caf::message&) -> caf::expected<caf::actor> {
      auto w = spawn_shard_worker(sys, group, r, path);
      if (!w) return std::move(w.error());
      return caf::actor_cast<caf::actor>(*w);
    };
    c.restart = restart_type::permanent;
    c.shutdown.timeout = std::chrono::seconds(10);  // a step in progress finishes first
    out.push_back(std::move(c));
  }
  return out;
}

}  // namespace keel
