#include "actors/batcher.hpp"

#include <algorithm>
#include <map>
#include <optional>

#include <caf/event_based_actor.hpp>
#include <caf/stateful_actor.hpp>
#include <caf/typed_event_based_actor.hpp>

#include "kernels/kv_cache.hpp"

namespace keel {

namespace {

using clock_type = std::chrono::steady_clock;

struct sequence {
  generation_job job;
  std::vector<int32_t> tokens;  // job.tokens followed by every generated token
  int64_t kv_length = 0;        // tokens the shards hold in their caches
  /// With per-session leases (node_context::may_serve_session): since when its session's lease
  /// is missing (it takes no step meanwhile), and whether its client was sent elsewhere.
  std::optional<std::chrono::steady_clock::time_point> lease_lost;
  bool detached = false;
  int32_t pages = 0;            // pages reserved for it while admitted
  uint64_t arrival = 0;
  bool admitted = false;
};

struct batcher_state {
  std::shared_ptr<node_context> ctx;
  batcher_config cfg;
  std::map<seq_id, sequence> seqs;  // waiting and admitted
  std::vector<seq_id> running;      // admitted, in admission order
  std::vector<seq_id> released;     // to free on the shards with the next step
  int32_t free_pages = 0;
  uint64_t arrivals = 0;
  std::vector<shard_actor> shards;  // by rank; invalid while down
  bool group_failed = false;       // waiting for the group to restart
  uint64_t failure_epoch = 0;
  clock_type::time_point failed_at;
  bool recovering = false;    // a failure happened and no token was sent since
  bool reset_caches = false;  // the next step tells the shards to drop their KV caches
  bool in_flight = false;
  bool quorum_wait = false;  // a tick is due to look at the node's lease again
  uint64_t step_number = 0;
  supervisor_actor engine_sup;
  sampler_scratch scratch;
  batcher_stats stats;
  token_rate rate;
  static inline const char* name = "batcher";
};

using self_ptr = batcher_actor::stateful_pointer<batcher_state>;

int64_t retry_after_ms(const batcher_state& st) {
  // A rough hint: each waiting turn ahead costs about one admission slot of 50 ms.
  return 100 + 50 * static_cast<int64_t>(st.seqs.size() - st.running.size());
}

void finish(self_ptr self, seq_id id, finish_reason why, const std::string& detail = "") {
  auto& st = self->state;
  auto i = st.seqs.find(id);
  if (i == st.seqs.end()) return;
  auto& s = i->second;
  int64_t retry = why == finish_reason::overloaded ? retry_after_ms(st) : 0;
  self->send(s.job.session, done_atom::value, id, why, detail, retry);
  if (s.admitted) {
    st.free_pages += s.pages;
    st.running.erase(std::remove(st.running.begin(), st.running.end(), id), st.running.end());
    st.released.push_back(id);
  }
  st.seqs.erase(i);
}

/// The context length of `job`'s session: the model's, or the session's own when shorter.
int64_t context_of(const batcher_state& st, const generation_job& job) {
  int64_t model = st.ctx->llm->config().ctx_len;
  return job.context_limit > 0 ? std::min<int64_t>(model, job.context_limit) : model;
}

int32_t pages_needed(const batcher_state& st, const sequence& s) {
  int64_t remaining =
      std::max<int64_t>(0, s.job.max_tokens - static_cast<int64_t>(s.job.generated.size()));
  int64_t total =
      std::min<int64_t>(context_of(st, s.job), static_cast<int64_t>(s.tokens.size()) + remaining);
  return static_cast<int32_t>((total + st.cfg.page_tokens - 1) / st.cfg.page_tokens);
}

/// Waiting turns, best first: higher priority, then earlier arrival.
std::vector<seq_id> waiting_order(const batcher_state& st) {
  std::vector<seq_id> w;
  for (auto& [id, s] : st.seqs)
    if (!s.admitted) w.push_back(id);
  std::sort(w.begin(), w.end(), [&st](seq_id a, seq_id b) {
    auto& x = st.seqs.at(a);
    auto& y = st.seqs.at(b);
    if (x.job.priority != y.job.priority) return x.job.priority > y.job.priority;
    return x.arrival < y.arrival;
  });
  return w;
}

void schedule(self_ptr self);
void preempt(self_ptr self, seq_id id);

/// The running sequence of the lowest priority below `priority` (the last admitted among
/// equals), if any.
std::optional<seq_id> lowest_running_below(const batcher_state& st, int32_t priority) {
  std::optional<seq_id> out;
  for (auto id : st.running) {
    auto p = st.seqs.at(id).job.priority;
    if (p < priority && (!out || p <= st.seqs.at(*out).job.priority)) out = id;
  }
  return out;
}

void admit(self_ptr self) {
  auto& st = self->state;
  for (auto id : waiting_order(st)) {
    auto& s = st.seqs.at(id);
    int32_t need = pages_needed(st, s);
    if (need > st.cfg.kv_pages) {
      finish(self, id, finish_reason::overloaded,
             "the turn needs " + std::to_string(need) + " KV pages, the node has " +
                 std::to_string(st.cfg.kv_pages));
      continue;
    }
    bool full = static_cast<int32_t>(st.running.size()) >= st.cfg.max_batch;
    bool preempted = false;
    if (full || need > st.free_pages) {
      // Priority first: running turns of lower priority go back to the queue (their tokens
      // kept; they are prefilled again when admitted again) when that makes room for this one.
      // So a higher priority never waits behind a lower one, and the queue, whose overflow is
      // shed lowest first, holds the lower priorities.
      int32_t reclaimable = 0, slots = 0;
      for (auto r : st.running) {
        if (st.seqs.at(r).job.priority >= s.job.priority) continue;
        reclaimable += st.seqs.at(r).pages;
        ++slots;
      }
      if (need > st.free_pages + reclaimable || (full && slots == 0)) {
        return;  // Strict priority order: a turn that does not fit yet holds back those behind it.
      }
      while (need > st.free_pages ||
             static_cast<int32_t>(st.running.size()) >= st.cfg.max_batch) {
        auto victim = lowest_running_below(st, s.job.priority);
        if (!victim) return;
        preempt(self, *victim);
      }
      preempted = true;
    }
    st.free_pages -= need;
    s.pages = need;
    s.admitted = true;
    s.kv_length = 0;
    st.running.push_back(id);
    if (preempted) return;  // what was preempted is ordered again at the next admission
  }
}

/// Sends the running sequence admitted last back to the queue (KV pages ran out on a shard).
void preempt_one(self_ptr self) {
  auto& st = self->state;
  if (st.running.empty()) return;
  preempt(self, st.running.back());
}

/// Sends running sequence `id` back to the queue: its pages are freed (on the shards with the
/// next step) and it is prefilled again, from its tokens, when admitted again.
void preempt(self_ptr self, seq_id id) {
  auto& st = self->state;
  st.running.erase(std::remove(st.running.begin(), st.running.end(), id), st.running.end());
  auto& s = st.seqs.at(id);
  st.free_pages += s.pages;
  s.pages = 0;
  s.admitted = false;
  s.kv_length = 0;
  st.released.push_back(id);
  ++st.stats.preemptions;
}

/// Marks ranks as down (their handle is the one in `lost`). The first loss since the group was
/// last complete starts a recovery: every sequence restarts from an empty cache on the new
/// workers, and if no worker restarts within restart_grace, the batcher forces it.
void lose_shards(self_ptr self, const std::vector<shard_actor>& lost) {
  auto& st = self->state;
  bool any = false;
  for (size_t r = 0; r < st.shards.size(); ++r) {
    if (st.shards[r] && r < lost.size() && st.shards[r] == lost[r]) {
      st.shards[r] = shard_actor{};
      any = true;
    }
  }
  if (!any) return;
  // The restarted workers adopt their ranks' KV caches, so sequences go on from the lengths
  // the batcher counts. A new failure before any token was produced since the last one may
  // mean the caches themselves are the trouble: then drop them and prefill everything again.
  if (!st.group_failed) {
    if (st.recovering) {
      for (auto& [id, s] : st.seqs) s.kv_length = 0;
      st.reset_caches = true;
    }
    st.group_failed = true;
    ++st.failure_epoch;
    ++st.stats.group_failures;
    st.failed_at = clock_type::now();
    st.recovering = true;
    self->delayed_send(self, st.cfg.restart_grace, restart_atom::value, st.failure_epoch);
  }
}

void on_step_done(self_ptr self, const std::shared_ptr<const step_batch>& batch,
                  std::vector<std::vector<float>>& logits) {
  auto& st = self->state;
  ++st.stats.steps;
  auto tokens_before = st.stats.tokens;
  const auto& m = *st.ctx->llm;
  const auto& c = m.config();
  size_t li = 0;
  for (auto& e : batch->entries) {
    auto i = st.seqs.find(e.seq);
    if (i == st.seqs.end() || !i->second.admitted) {
      if (e.want_logits) ++li;
      continue;  // cancelled while the step ran
    }
    auto& s = i->second;
    if (e.want_logits && st.ctx->may_serve_session &&
        !st.ctx->may_serve_session(s.job.session_id)) {
      // The lease ran out while the step ran (a slow step can outlast the margin the lease
      // leaves): no token goes out. The step is done again, from the same cache length, once
      // the lease is back; if another node takes the session over, this one is cancelled.
      ++li;
      continue;
    }
    s.kv_length = e.kv_length + static_cast<int64_t>(e.tokens.size());
    if (!e.want_logits) continue;
    auto& l = logits[li++];
    auto n_recent = std::min<size_t>(std::max(s.job.params.repetition_window, 0), s.tokens.size());
    auto index = static_cast<int64_t>(s.job.generated.size());
    int32_t tok =
        sample(s.job.params, l.data(), c.vocab_size, s.tokens.data() + s.tokens.size() - n_recent,
               n_recent, s.job.turn, static_cast<uint64_t>(index), st.scratch);
    s.tokens.push_back(tok);
    s.job.generated.push_back(tok);
    self->send(s.job.session, token_atom::value, e.seq, index, tok);
    ++st.stats.tokens;
    st.ctx->metrics->generated_tokens.fetch_add(1, std::memory_order_relaxed);
    if (st.recovering) {
      st.recovering = false;
      st.stats.recovery_ms.push_back(
          std::chrono::duration<double, std::milli>(clock_type::now() - st.failed_at).count());
    }
    if (is_end_of_generation(m.vocabulary(), tok))  // eos, eot, <|im_end|>...
      finish(self, e.seq, finish_reason::eos);
    else if (static_cast<int32_t>(s.job.generated.size()) >= s.job.max_tokens)
      finish(self, e.seq, finish_reason::length);
    else if (static_cast<int64_t>(s.tokens.size()) >= context_of(st, s.job))
      finish(self, e.seq, finish_reason::context);
  }
  st.rate.add(static_cast<int64_t>(st.stats.tokens - tokens_before), clock_type::now());
}

void on_step_failed(self_ptr self, const caf::error& err, const std::vector<shard_actor>& used) {
  auto code = code_of(err);
  if (code == errc::overloaded) {
    preempt_one(self);
  } else {
    // A worker died (or failed in a way only a restart mends): the group restarts as a whole.
    lose_shards(self, used);
  }
}

/// Publishes the node's load (node_metrics::load) for heartbeats, placement and takeovers.
void publish(batcher_state& st) {
  node_load l;
  l.running = static_cast<int32_t>(st.running.size());
  l.waiting = static_cast<int32_t>(st.seqs.size() - st.running.size());
  l.kv_free = st.free_pages;
  l.kv_capacity = st.cfg.kv_pages;
  for (auto& [id, s] : st.seqs)
    if (!s.admitted) l.kv_wanted += std::min(pages_needed(st, s), st.cfg.kv_pages);
  if (st.running.empty()) st.rate.idle();
  l.tokens_per_s = st.rate.rate();
  st.ctx->metrics->load.publish(l);
}

void step(self_ptr self);

/// Admits what fits and starts the next step unless one runs; then publishes the load.
void schedule(self_ptr self) {
  step(self);
  publish(self->state);
}

void step(self_ptr self) {
  auto& st = self->state;
  if (st.in_flight || st.group_failed) return;
  admit(self);
  if (st.running.empty()) return;
  for (auto& a : st.shards)
    if (!a) return;  // not all ranks are up
  // Per session (the ownership protocol): a sequence whose session's lease is missing takes no
  // step; the others go on. After `quorum_grace` its client is sent elsewhere.
  std::vector<seq_id> serving;
  if (st.ctx->may_serve_session) {
    auto now = clock_type::now();
    for (auto id : st.running) {
      auto& s = st.seqs.at(id);
      if (st.ctx->may_serve_session(s.job.session_id)) {
        s.lease_lost.reset();
        s.detached = false;
        serving.push_back(id);
        continue;
      }
      if (!s.lease_lost) s.lease_lost = now;
      if (!s.detached && now - *s.lease_lost >= st.cfg.quorum_grace) {
        s.detached = true;
        self->send(s.job.session, detach_atom::value);
      }
    }
    if (serving.size() < st.running.size() && !st.quorum_wait) {
      st.quorum_wait = true;
      self->delayed_send(self, std::chrono::milliseconds(10), tick_atom::value);
    }
    if (serving.empty()) return;
  } else {
    serving = st.running;
  }
  auto batch = std::make_shared<step_batch>();
  batch->number = ++st.step_number;
  batch->released.swap(st.released);
  // Sequences of a previous batcher incarnation are stale, and so are distrusted caches.
  batch->reset = batch->number == 1 || st.reset_caches;
  st.reset_caches = false;
  for (auto id : serving) {
    auto& s = st.seqs.at(id);
    auto pending = static_cast<int64_t>(s.tokens.size()) - s.kv_length;
    auto n = std::min<int64_t>(pending, st.cfg.prefill_chunk);
    step_entry e;
    e.seq = id;
    e.kv_length = s.kv_length;
    e.tokens.assign(s.tokens.begin() + s.kv_length, s.tokens.begin() + s.kv_length + n);
    e.want_logits = n == pending;
    batch->entries.push_back(std::move(e));
  }
  std::shared_ptr<const step_batch> sent = batch;
  st.in_flight = true;
  auto replies = std::make_shared<int32_t>(0);
  auto failure = std::make_shared<caf::error>();
  auto logits = std::make_shared<std::vector<std::vector<float>>>();
  auto used = st.shards;
  for (auto& shard : st.shards) {
    self->request(shard, caf::infinite, step_atom::value, sent)
        .then(
            [=](step_result& r) {
              if (r.rank == 0) *logits = std::move(r.logits);
              if (++*replies < self->state.cfg.shards) return;
              self->state.in_flight = false;
              if (*failure)
                on_step_failed(self, *failure, used);
              else
                on_step_done(self, sent, *logits);
              schedule(self);
            },
            [=](caf::error& err) {
              // Keep the most telling error: a dead worker outranks the others' "disconnected".
              if (!*failure || code_of(*failure) == errc::disconnected) *failure = err;
              if (++*replies < self->state.cfg.shards) return;
              self->state.in_flight = false;
              on_step_failed(self, *failure, used);
              schedule(self);
            });
  }
}

void watch_engine(self_ptr self) {
  auto& st = self->state;
  auto sup = st.ctx->engine_sup();
  if (!sup || sup == st.engine_sup) return;
  st.engine_sup = sup;
  self->monitor(sup);
  self->send(sup, subscribe_atom::value, caf::actor_cast<supervision_observer_actor>(self));
}

batcher_actor::behavior_type batcher(self_ptr self, std::shared_ptr<node_context> ctx, batcher_config cfg) {
  auto& st = self->state;
  st.ctx = std::move(ctx);
  st.cfg = cfg;
  st.free_pages = cfg.kv_pages;
  st.shards.resize(cfg.shards);
  publish(st);  // a node's room is known from its start (placement reads it)
  self->set_down_handler([self](caf::down_msg& m) {
    auto& st = self->state;
    if (m.source == st.engine_sup.address()) {
      // engine_sup itself was restarted by node_sup: subscribe to the new one.
      st.engine_sup = supervisor_actor{};
      lose_shards(self, st.shards);
      for (auto& [id, s] : st.seqs) s.kv_length = 0;  // engine_sup gave up: start clean
      st.reset_caches = true;
      self->delayed_send(self, std::chrono::milliseconds(10), tick_atom::value);
      return;
    }
    std::vector<shard_actor> lost(st.shards.size());
    for (size_t r = 0; r < st.shards.size(); ++r)
      if (st.shards[r] && st.shards[r].address() == m.source) lost[r] = st.shards[r];
    lose_shards(self, lost);
  });
  watch_engine(self);
  return {
      [self](started_atom, const std::string& id, caf::actor worker) {
        auto& st = self->state;
        if (id.rfind("shard-", 0) != 0) return;
        auto rank = std::stoi(id.substr(6));
        if (rank < 0 || rank >= st.cfg.shards) return;
        self->monitor(worker);
        st.shards[rank] = caf::actor_cast<shard_actor>(std::move(worker));
        if (std::all_of(st.shards.begin(), st.shards.end(),
                        [](const shard_actor& a) { return static_cast<bool>(a); }))
          st.group_failed = false;
        schedule(self);
      },
      [self](submit_atom, generation_job& job) {
        auto& st = self->state;
        const auto& c = st.ctx->llm->config();
        auto id = job.seq;
        std::string bad;
        if (job.tokens.empty())
          bad = "the turn has no tokens";
        else if (static_cast<int64_t>(job.tokens.size() + job.generated.size()) >=
                 context_of(st, job))
          bad = "the conversation has " + std::to_string(job.tokens.size() + job.generated.size()) +
                " tokens, the context length is " + std::to_string(context_of(st, job));
        else if (auto err = validate(job.params))
          bad = message_of(err);
        // A token outside the vocabulary fails this turn only: the engine would refuse every step
        // it is in, and a step's failure restarts the whole worker group (issue #11: a forged or
        // poisoned session bricked the node that ran it).
        auto out_of_vocab = [&](const std::vector<int32_t>& v, const char* what) {
          for (size_t i = 0; i < v.size() && bad.empty(); ++i)
            if (v[i] < 0 || v[i] >= c.vocab_size)
              bad = std::string(what) + " token " + std::to_string(i) + " is " +
                    std::to_string(v[i]) + ", outside the vocabulary of " +
                    std::to_string(c.vocab_size);
        };
        if (bad.empty()) out_of_vocab(job.tokens, "conversation");
        if (bad.empty()) out_of_vocab(job.generated, "generated");
        if (!bad.empty()) {
          self->send(job.session, done_atom::value, id, finish_reason::failed, bad, int64_t{0});
          return;
        }
        if (auto old = st.seqs.find(id); old != st.seqs.end()) {
          // A resubmission replaces the old turn without telling its session.
          if (old->second.admitted) {
            st.free_pages += old->second.pages;
            st.running.erase(std::remove(st.running.begin(), st.running.end(), id),
                             st.running.end());
            st.released.push_back(id);
          }
          st.seqs.erase(old);
        }
        sequence s;
        s.tokens = job.tokens;
        s.tokens.insert(s.tokens.end(), job.generated.begin(), job.generated.end());
        s.job = std::move(job);
        s.arrival = ++st.arrivals;
        st.seqs.emplace(id, std::move(s));
        auto waiting = static_cast<int32_t>(st.seqs.size() - st.running.size());
        if (waiting > st.cfg.max_queue) {
          auto order = waiting_order(st);
          ++st.stats.shed;
          finish(self, order.back(), finish_reason::overloaded,
                 "the wait queue is full (" + std::to_string(st.cfg.max_queue) +
                     " turns); lowest priority shed");
        }
        schedule(self);
      },
      [self](cancel_atom, seq_id id) {
        finish(self, id, finish_reason::cancelled);
        schedule(self);
      },
      [self](stats_atom) {
        auto& st = self->state;
        auto out = st.stats;
        out.running = static_cast<int32_t>(st.running.size());
        out.waiting = static_cast<int32_t>(st.seqs.size() - st.running.size());
        out.free_pages = st.free_pages;
        return out;
      },
      [self](tick_atom) {
        self->state.quorum_wait = false;
        watch_engine(self);
        if (!self->state.engine_sup)
          self->delayed_send(self, std::chrono::milliseconds(10), tick_atom::value);
        schedule(self);
      },
      [self](restart_atom, uint64_t epoch) {
        auto& st = self->state;
        if (!st.group_failed || epoch != st.failure_epoch) return;
        // The group did not restart by itself: fail the workers so that engine_sup restarts them.
        if (st.engine_sup) {
          self->request(st.engine_sup, caf::infinite, list_atom::value)
              .then([](const std::vector<child_info>& children) {
                for (auto& c : children)
                  if (c.handle) caf::anon_send_exit(c.handle, caf::exit_reason::kill);
              });
        }
      },
  };
}

}  // namespace

batcher_actor spawn_batcher(caf::actor_system& sys, std::shared_ptr<node_context> ctx,
                            batcher_config cfg) {
  return sys.spawn(batcher, std::move(ctx), cfg);
}

}  // namespace keel
