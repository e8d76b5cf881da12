#include "kernels/generate.hpp"

#include <algorithm>
#include <deque>
#include <memory>

namespace keel {

kv_layout kv_layout_for(const model& m, int32_t page_tokens) {
  const auto& c = m.config();
  return kv_layout{c.n_layers, c.n_kv_heads, c.head_dim, page_tokens};
}

namespace {

/// A sequence being generated. `history` is prompt + generated tokens; the KV cache holds the
/// first kv.length() of them, and the rest run in the next steps (so a sequence sent back to the
/// queue resumes by prefilling its whole history, with identical results).
struct active_seq {
  size_t index;
  kv_sequence kv;
  std::vector<int32_t> history;
  std::vector<float> logits;
  bool done = false;
};

}  // namespace

caf::expected<std::vector<std::vector<int32_t>>> generate(
    engine& eng, kv_pool& pool, const std::vector<generation_request>& reqs, int32_t max_batch,
    const token_callback& on_token, int32_t prefill_chunk) {
  const auto& c = eng.get_model().config();
  for (size_t i = 0; i < reqs.size(); ++i) {
    const auto& r = reqs[i];
    if (r.prompt.empty())
      return make_error(errc::bad_request, "generate: prompt " + std::to_string(i) + " is empty");
    if (static_cast<int64_t>(r.prompt.size()) >= c.ctx_len) {
      return make_error(errc::bad_request,
                        "generate: prompt of " + std::to_string(r.prompt.size()) +
                            " tokens does not fit the context length " + std::to_string(c.ctx_len));
    }
    if (r.max_tokens < 1) {
      return make_error(errc::bad_request, "generate: max_tokens must be at least 1, got " +
                                               std::to_string(r.max_tokens));
    }
    if (auto err = validate(r.params)) return err;
  }
  max_batch = std::max(max_batch, 1);
  prefill_chunk = std::max(prefill_chunk, 1);
  std::vector<std::vector<int32_t>> out(reqs.size());
  std::deque<size_t> waiting;
  for (size_t i = 0; i < reqs.size(); ++i) waiting.push_back(i);
  std::vector<std::unique_ptr<active_seq>> active;
  std::vector<seq_step> steps;
  const vocab& voc = eng.get_model().vocabulary();
  // Lowered when the KV pool overflows, so that evicted sequences wait until another finishes.
  int32_t admit_limit = max_batch;
  while (!waiting.empty() || !active.empty()) {
    while (!waiting.empty() && static_cast<int32_t>(active.size()) < admit_limit) {
      size_t index = waiting.front();
      waiting.pop_front();
      auto s = std::make_unique<active_seq>(active_seq{index, kv_sequence(pool), {}, {}, false});
      s->history = reqs[index].prompt;
      s->history.insert(s->history.end(), out[index].begin(), out[index].end());
      s->logits.resize(c.vocab_size);
      active.push_back(std::move(s));
    }
    steps.clear();
    for (auto& s : active) {
      auto done = static_cast<size_t>(s->kv.length());
      auto n = std::min<size_t>(prefill_chunk, s->history.size() - done);
      bool last = done + n == s->history.size();
      steps.push_back({&s->kv, s->history.data() + done, static_cast<int32_t>(n),
                       last ? s->logits.data() : nullptr});
    }
    if (auto err = eng.forward(steps)) {
      // Alone and still no room: give up. Otherwise the batch is too big for the pool: the
      // newest sequence goes back to the front of the queue and the step is retried.
      if (code_of(err) != errc::overloaded || active.size() == 1) return err;
      waiting.push_front(active.back()->index);
      active.pop_back();
      admit_limit = static_cast<int32_t>(active.size());
      continue;
    }
    for (size_t i = 0; i < active.size(); ++i) {
      auto& s = *active[i];
      if (steps[i].logits == nullptr) continue;
      const auto& r = reqs[s.index];
      auto& gen = out[s.index];
      size_t window = static_cast<size_t>(std::max(r.params.repetition_window, 0));
      size_t n_recent = std::min(window, s.history.size());
      int32_t tok = sample(r.params, s.logits.data(), c.vocab_size,
                           s.history.data() + s.history.size() - n_recent, n_recent, r.turn,
                           static_cast<uint64_t>(gen.size()));
      gen.push_back(tok);
      s.history.push_back(tok);
      if (on_token) on_token(s.index, tok);
      bool stop = r.stop_at_eos && is_end_of_generation(voc, tok);
      bool full = static_cast<int64_t>(s.history.size()) >= c.ctx_len;
      s.done = stop || full || static_cast<int32_t>(gen.size()) >= r.max_tokens;
    }
    if (std::erase_if(active, [](const std::unique_ptr<active_seq>& s) { return s->done; }) > 0)
      admit_limit = max_batch;
  }
  return out;
}

}  // namespace keel
