#include "kernels/engine.hpp"

#include <cmath>
#include <cstring>
#include <string>
#include <tuple>

namespace keel {

namespace {

// Rows [r0, r0 + n) of `w`: contiguous.
matrix_view row_slice(const matrix_view& w, int64_t r0, int64_t n) {
  matrix_view v = w;
  v.data = static_cast<const char*>(w.data) + r0 * static_cast<int64_t>(w.row_bytes);
  v.rows = n;
  return v;
}

// Columns [c0, c0 + n) of `w`: a strided view (same row_bytes); c0 and n are whole blocks.
matrix_view column_slice(const matrix_view& w, int64_t c0, int64_t n) {
  matrix_view v = w;
  v.data =
      static_cast<const char*>(w.data) + bytes_of(*layout_of(w.type), static_cast<uint64_t>(c0));
  v.cols = n;
  return v;
}

// Adds `bias` (n values; null: nothing to add) to each of the T rows of y, as llama.cpp adds
// qwen2's Q/K/V biases after the products.
void add_bias(float* y, const float* bias, int64_t n, int64_t T) {
  if (bias == nullptr) return;
  for (int64_t t = 0; t < T; ++t)
    for (int64_t i = 0; i < n; ++i) y[t * n + i] += bias[i];
}

std::string dims_of(const model& m) {
  const auto& c = m.config();
  return m.path() + " (" + std::to_string(c.n_heads) + " heads, " + std::to_string(c.n_kv_heads) +
         " kv heads, head_dim " + std::to_string(c.head_dim) + ", ffn " +
         std::to_string(c.ffn_dim) + ")";
}

}  // namespace

caf::error check_sharding(const model& m, shard_layout shard) {
  const auto& c = m.config();
  const std::string n = std::to_string(shard.count);
  if (shard.count < 1 || shard.index < 0 || shard.index >= shard.count) {
    return make_error(errc::bad_request, "shard " + std::to_string(shard.index) + " of " + n +
                                             " is not a valid shard of " + dims_of(m));
  }
  auto not_divisible = [&](const char* what, int32_t v) {
    return make_error(errc::bad_request, dims_of(m) + ": " + std::to_string(v) + " " + what +
                                             " are not divisible by " + n + " shards");
  };
  if (c.n_heads % shard.count != 0) return not_divisible("heads", c.n_heads);
  if (c.n_kv_heads % shard.count != 0) return not_divisible("kv heads", c.n_kv_heads);
  if (c.ffn_dim % shard.count != 0) return not_divisible("feed-forward columns", c.ffn_dim);
  // wo and w_down are split by columns: each slice must be whole blocks of its type.
  const int64_t q_cols = int64_t{c.q_dim()} / shard.count, f_cols = c.ffn_dim / shard.count;
  for (size_t l = 0; l < m.layers().size(); ++l) {
    const auto& L = m.layers()[l];
    for (auto [w, cols, name] :
         {std::tuple{&L.wo, q_cols, "attn_output"}, std::tuple{&L.w_down, f_cols, "ffn_down"}}) {
      auto lay = layout_of(w->type);
      if (!lay) {
        return make_error(errc::bad_request, dims_of(m) + ": blk." + std::to_string(l) + "." +
                                                 name + " has type " +
                                                 std::string(dtype_name(w->type)) +
                                                 ", which cannot be split into columns");
      }
      if (cols % lay->block_elems != 0) {
        return make_error(errc::bad_request,
                          dims_of(m) + ": " + n + " shards give blk." + std::to_string(l) + "." +
                              name + " column slices of " + std::to_string(cols) + ", not a " +
                              "multiple of the " + std::string(dtype_name(w->type)) + " block of " +
                              std::to_string(lay->block_elems));
      }
    }
  }
  return caf::none;
}

kv_layout kv_layout_for(const model& m, shard_layout shard, int32_t page_tokens) {
  const auto& c = m.config();
  const int32_t n = shard.count > 0 ? shard.count : 1;
  return kv_layout{c.n_layers, c.n_kv_heads / n, c.head_dim, page_tokens};
}

engine::engine(const model& m, thread_pool& pool) : engine(m, pool, shard_layout{}, nullptr) {}

engine::engine(const model& m, thread_pool& pool, shard_layout shard, collective* coll)
    : model_(m), pool_(pool), shard_(shard), coll_(coll) {
  if (auto err = check_sharding(m, shard)) {
    setup_error_ = std::move(err);
    return;
  }
  if (shard.count > 1 && (coll == nullptr || coll->size() != shard.count)) {
    setup_error_ = make_error(
        errc::bad_request,
        "engine: shard " + std::to_string(shard.index) + " of " + std::to_string(shard.count) +
            " needs a collective of " + std::to_string(shard.count) + " ranks, got " +
            (coll == nullptr ? std::string("none") : std::to_string(coll->size())));
    return;
  }
  const auto& c = m.config();
  const int64_t k = shard.index, hd = c.head_dim;
  heads_ = c.n_heads / shard.count;
  kv_heads_ = c.n_kv_heads / shard.count;
  ffn_ = c.ffn_dim / shard.count;
  const int64_t qd = heads_ * hd, kvd = kv_heads_ * hd;
  slices_.reserve(m.layers().size());
  // A bias goes with the rows of its matrix: the shard's slice starts where its rows do.
  auto bias = [](const std::vector<float>& b, int64_t r0) {
    return b.empty() ? nullptr : b.data() + r0;
  };
  for (const auto& L : m.layers()) {
    const float *bq = bias(L.bq, k * qd), *bk = bias(L.bk, k * kvd), *bv = bias(L.bv, k * kvd);
    if (shard.count == 1) {  // the whole matrices, untouched: bit-identical to an unsharded run
      slices_.push_back({L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down, bq, bk, bv});
      continue;
    }
    slices_.push_back({row_slice(L.wq, k * qd, qd), row_slice(L.wk, k * kvd, kvd),
                       row_slice(L.wv, k * kvd, kvd), column_slice(L.wo, k * qd, qd),
                       row_slice(L.w_gate, k * ffn_, ffn_), row_slice(L.w_up, k * ffn_, ffn_),
                       column_slice(L.w_down, k * ffn_, ffn_), bq, bk, bv});
  }
}

caf::error engine::reduce(float* data, int64_t n) {
  if (shard_.count == 1) return caf::none;
  return coll_->all_reduce(shard_.index, data, n);
}

void engine::matmul(const matrix_view& w, const float* x, int64_t nb, float* y) {
  matmul({{w, y}}, x, nb);
}

void engine::matmul(std::initializer_list<std::pair<const matrix_view&, float*>> parts,
                    const float* x, int64_t nb) {
  // Rows are split across threads in grains of 16 (see keel::matmul); each output is computed by
  // one thread in the canonical order, so the split does not change its bits.
  std::vector<matmul_part> ps;
  ps.reserve(parts.size());
  for (auto& [w, y] : parts) ps.push_back({w, y, w.rows});
  const int64_t cols = ps.front().w.cols;
  keel::matmul(pool_, ps, x, cols, cols, nb);
}

caf::error engine::validate(std::span<const seq_step> steps) const {
  const auto& c = model_.config();
  const kv_layout want = kv_layout_for(model_, shard_);
  for (auto& s : steps) {
    if (s.kv == nullptr || s.n_tokens <= 0 || s.tokens == nullptr) {
      return make_error(errc::bad_request, "forward: a step has no tokens or no KV sequence");
    }
    const auto& have = s.kv->pool().layout();
    if (have.n_layers != want.n_layers || have.n_kv_heads != want.n_kv_heads ||
        have.head_dim != want.head_dim) {
      return make_error(
          errc::bad_request,
          "forward: KV pool of " + std::to_string(have.n_layers) + " layers x " +
              std::to_string(have.n_kv_heads) + " kv heads x " + std::to_string(have.head_dim) +
              ", shard " + std::to_string(shard_.index) + " of " + std::to_string(shard_.count) +
              " needs " + std::to_string(want.n_layers) + " x " + std::to_string(want.n_kv_heads) +
              " x " + std::to_string(want.head_dim));
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
  }
  return caf::none;
}

caf::error engine::forward(std::span<const seq_step> steps) {
  if (setup_error_) return setup_error_;
  const auto& c = model_.config();
  caf::error local = validate(steps);
  int64_t total = 0;
  for (auto& s : steps) total += s.n_tokens;
  if (!local && total == 0) return caf::none;
  // Reserve every sequence's pages before touching anything: all or nothing.
  size_t reserved = 0;
  for (; !local && reserved < steps.size(); ++reserved) {
    auto* kv = steps[reserved].kv;
    if (auto err = kv->reserve(kv->length() + steps[reserved].n_tokens)) local = std::move(err);
  }
  auto roll_back = [&](size_t n) {
    for (size_t j = 0; j < n; ++j) steps[j].kv->truncate(steps[j].kv->length());
  };
  if (local) {
    roll_back(reserved);
    // In a group, the other shards wait in the agreement below: tell them (see there).
    if (shard_.count > 1) {
      float verdict[2] = {code_of(local) == errc::overloaded ? 1.0f : 0.0f,
                          code_of(local) == errc::overloaded ? 0.0f : 1.0f};
      reduce(verdict, 2);
    }
    return local;
  }
  if (shard_.count > 1) {
    // The shards agree before computing: a step one shard cannot take (its KV pool is full) is
    // taken by none, and no shard is left waiting in an all-reduce the others never join.
    float verdict[2] = {0.0f, 0.0f};  // shards overloaded, shards refusing otherwise
    if (auto err = reduce(verdict, 2)) {
      roll_back(steps.size());
      return err;
    }
    if (verdict[0] + verdict[1] > 0) {
      roll_back(steps.size());
      if (verdict[1] > 0) {
        return make_error(errc::failed, "forward: another shard of " +
                                            std::to_string(shard_.count) +
                                            " rejected the step (were the steps identical?)");
      }
      return make_error(errc::overloaded, "forward: KV cache full on " +
                                              std::to_string(static_cast<int>(verdict[0])) +
                                              " other shard(s) of " + std::to_string(shard_.count));
    }
  }

  // This shard's widths: its heads, its KV heads, its feed-forward columns (all of them for a
  // single shard).
  const int64_t T = total, dim = c.dim, qd = int64_t{heads_} * c.head_dim,
                kvd = int64_t{kv_heads_} * c.head_dim, ffn = ffn_;
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

  const float* freqs = model_.rope_freqs().empty() ? nullptr : model_.rope_freqs().data();
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const auto& L = model_.layers()[l];
    const auto& S = slices_[l];
    for (int64_t t = 0; t < T; ++t)
      rmsnorm(&xb_[t * dim], &x_[t * dim], L.attn_norm.data(), dim, c.rms_eps);
    matmul({{S.wq, q_.data()}, {S.wk, k_.data()}, {S.wv, v_.data()}}, xb_.data(), T);
    add_bias(q_.data(), S.bq, qd, T);
    add_bias(k_.data(), S.bk, kvd, T);
    add_bias(v_.data(), S.bv, kvd, T);
    for (int64_t t = 0; t < T; ++t) {
      // RoPE depends only on the position within a head, so a shard rotates its heads alone.
      rope(&q_[t * qd], heads_, c.head_dim, pos_[t], c.rope_theta, c.rope, freqs);
      rope(&k_[t * kvd], kv_heads_, c.head_dim, pos_[t], c.rope_theta, c.rope, freqs);
      auto* kv = steps[seq_of_[t]].kv;
      std::memcpy(kv->key(l, pos_[t]), &k_[t * kvd], kvd * sizeof(float));
      std::memcpy(kv->value(l, pos_[t]), &v_[t * kvd], kvd * sizeof(float));
    }
    attention(l, steps);
    // A shard's heads times its columns of wo: a partial sum, completed across the group.
    matmul(S.wo, att_.data(), T, xb_.data());
    if (auto err = reduce(xb_.data(), T * dim)) {
      roll_back(steps.size());
      return err;
    }
    for (int64_t i = 0; i < T * dim; ++i) x_[i] += xb_[i];
    for (int64_t t = 0; t < T; ++t)
      rmsnorm(&xb_[t * dim], &x_[t * dim], L.ffn_norm.data(), dim, c.rms_eps);
    matmul({{S.w_gate, gate_.data()}, {S.w_up, up_.data()}}, xb_.data(), T);
    for (int64_t t = 0; t < T; ++t) silu_mul(&gate_[t * ffn], &up_[t * ffn], ffn);
    matmul(S.w_down, gate_.data(), T, xb_.data());
    if (auto err = reduce(xb_.data(), T * dim)) {
      roll_back(steps.size());
      return err;
    }
    for (int64_t i = 0; i < T * dim; ++i) x_[i] += xb_[i];
  }

  for (auto& s : steps) s.kv->set_length(s.kv->length() + s.n_tokens);
  // The residual stream is identical on every shard; the output head is not split, so one
  // shard computes the logits.
  if (shard_.index != 0) return caf::none;

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
  const int64_t T = static_cast<int64_t>(pos_.size()), hd = c.head_dim;
  const int64_t qd = int64_t{heads_} * hd;
  const int32_t heads = heads_;
  // A shard's heads are whole groups: its local head h reads its local KV head h / group.
  const int32_t group = c.n_heads / c.n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // One (token, head) pair per work item; each is computed by one thread, in a fixed order.
  pool_.parallel_for(T * heads, [&](int64_t b, int64_t e) {
    std::vector<float> scores;
    for (int64_t item = b; item < e; ++item) {
      const int64_t t = item / heads;
      const int32_t h = static_cast<int32_t>(item % heads);
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
