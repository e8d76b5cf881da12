#include "kernels/engine.hpp"

#include <cmath>
#include <cstring>

namespace keel {

engine::engine(const model& m, thread_pool& pool) : model_(m), pool_(pool) {}

void engine::matmul(const matrix_view& w, const float* x, int64_t nb, float* y) {
  // Rows are split across threads in grains of 16 so that threads never share a cache line of y
  // for nb = 1; each output is computed by one thread in the canonical order.
  pool_.parallel_for(
      w.rows, [&](int64_t r0, int64_t r1) { keel::matmul(w, x, w.cols, nb, y, w.rows, r0, r1); },
      16);
}

caf::error engine::forward(std::span<const seq_step> steps) {
  const auto& c = model_.config();
  int64_t total = 0;
  for (auto& s : steps) {
    if (s.kv == nullptr || s.n_tokens <= 0 || s.tokens == nullptr) {
      return make_error(errc::bad_request, "forward: a step has no tokens or no KV sequence");
    }
    if (s.kv->length() + s.n_tokens > c.ctx_len) {
      return make_error(errc::bad_request,
                        "forward: sequence of " + std::to_string(s.kv->length() + s.n_tokens) +
                            " tokens exceeds the context length " + std::to_string(c.ctx_len));
    }
    for (int32_t i = 0; i < s.n_tokens; ++i) {
      if (s.tokens[i] < 0 || s.tokens[i] >= c.vocab_size) {
        return make_error(errc::bad_request, "forward: token id " + std::to_string(s.tokens[i]) +
                                                 " is outside the vocabulary of " +
                                                 std::to_string(c.vocab_size));
      }
    }
    total += s.n_tokens;
  }
  if (total == 0) return caf::none;
  // Reserve every sequence's pages before touching anything: all or nothing.
  for (size_t i = 0; i < steps.size(); ++i) {
    auto* kv = steps[i].kv;
    if (auto err = kv->reserve(kv->length() + steps[i].n_tokens)) {
      for (size_t j = 0; j <= i; ++j) steps[j].kv->truncate(steps[j].kv->length());
      return err;
    }
  }

  const int64_t T = total, dim = c.dim, qd = c.q_dim(), kvd = c.kv_dim(), ffn = c.ffn_dim;
  x_.resize(T * dim);
  xb_.resize(T * std::max<int64_t>(dim, qd));
  q_.resize(T * qd);
  k_.resize(T * kvd);
  v_.resize(T * kvd);
  att_.resize(T * qd);
  gate_.resize(T * ffn);
  up_.resize(T * ffn);
  pos_.resize(T);
  seq_of_.resize(T);
  {
    int64_t t = 0;
    for (size_t s = 0; s < steps.size(); ++s) {
      for (int32_t i = 0; i < steps[s].n_tokens; ++i, ++t) {
        pos_[t] = steps[s].kv->length() + i;
        seq_of_[t] = static_cast<int32_t>(s);
        dequantize_row(model_.token_embedding(), steps[s].tokens[i], &x_[t * dim]);
      }
    }
  }

  for (int32_t l = 0; l < c.n_layers; ++l) {
    const auto& L = model_.layers()[l];
    for (int64_t t = 0; t < T; ++t)
      rmsnorm(&xb_[t * dim], &x_[t * dim], L.attn_norm.data(), dim, c.rms_eps);
    matmul(L.wq, xb_.data(), T, q_.data());
    matmul(L.wk, xb_.data(), T, k_.data());
    matmul(L.wv, xb_.data(), T, v_.data());
    for (int64_t t = 0; t < T; ++t) {
      rope(&q_[t * qd], c.n_heads, c.head_dim, pos_[t], c.rope_theta);
      rope(&k_[t * kvd], c.n_kv_heads, c.head_dim, pos_[t], c.rope_theta);
      auto* kv = steps[seq_of_[t]].kv;
      std::memcpy(kv->key(l, pos_[t]), &k_[t * kvd], kvd * sizeof(float));
      std::memcpy(kv->value(l, pos_[t]), &v_[t * kvd], kvd * sizeof(float));
    }
    attention(l, steps);
    matmul(L.wo, att_.data(), T, xb_.data());
    for (int64_t i = 0; i < T * dim; ++i) x_[i] += xb_[i];
    for (int64_t t = 0; t < T; ++t)
      rmsnorm(&xb_[t * dim], &x_[t * dim], L.ffn_norm.data(), dim, c.rms_eps);
    matmul(L.w_gate, xb_.data(), T, gate_.data());
    matmul(L.w_up, xb_.data(), T, up_.data());
    for (int64_t t = 0; t < T; ++t) silu_mul(&gate_[t * ffn], &up_[t * ffn], ffn);
    matmul(L.w_down, gate_.data(), T, xb_.data());
    for (int64_t i = 0; i < T * dim; ++i) x_[i] += xb_[i];
  }

  for (auto& s : steps) s.kv->set_length(s.kv->length() + s.n_tokens);

  // Logits only for the last token of the steps that ask for them, as one batch.
  std::vector<int64_t> want;
  {
    int64_t t = 0;
    for (auto& s : steps) {
      t += s.n_tokens;
      if (s.logits != nullptr) want.push_back(t - 1);
    }
  }
  if (want.empty()) return caf::none;
  const int64_t nw = static_cast<int64_t>(want.size()), V = c.vocab_size;
  logits_in_.resize(nw * dim);
  logits_out_.resize(nw * V);
  for (int64_t i = 0; i < nw; ++i)
    rmsnorm(&logits_in_[i * dim], &x_[want[i] * dim], model_.output_norm().data(), dim, c.rms_eps);
  matmul(model_.output(), logits_in_.data(), nw, logits_out_.data());
  int64_t i = 0;
  for (auto& s : steps) {
    if (s.logits != nullptr) {
      std::memcpy(s.logits, &logits_out_[i * V], V * sizeof(float));
      ++i;
    }
  }
  return caf::none;
}

void engine::attention(int32_t layer, std::span<const seq_step> steps) {
  const auto& c = model_.config();
  const int64_t T = static_cast<int64_t>(pos_.size()), hd = c.head_dim, qd = c.q_dim();
  const int32_t group = c.n_heads / c.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // One (token, head) pair per work item; each is computed by one thread, in a fixed order.
  pool_.parallel_for(T * c.n_heads, [&](int64_t b, int64_t e) {
    std::vector<float> scores;
    for (int64_t item = b; item < e; ++item) {
      const int64_t t = item / c.n_heads;
      const int32_t h = static_cast<int32_t>(item % c.n_heads);
      const int32_t kvh = h / group;
      auto* kv = steps[seq_of_[t]].kv;
      const int64_t n = pos_[t] + 1;  // causal: positions 0 .. pos
      scores.resize(n);
      const float* q = &q_[t * qd + h * hd];
      for (int64_t p = 0; p < n; ++p)
        scores[p] = dot_f32(q, kv->key(layer, p) + kvh * hd, hd) * scale;
      softmax(scores.data(), n);
      float* out = &att_[t * qd + h * hd];
      std::memset(out, 0, hd * sizeof(float));
      for (int64_t p = 0; p < n; ++p) axpy_f32(out, scores[p], kv->value(layer, p) + kvh * hd, hd);
    }
  });
}

}  // namespace keel
