#include "kernels/model.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <iterator>
#include <set>

namespace keel {

std::string llama_names::layer_tensor(int32_t layer, const char* suffix) {
  return "blk." + std::to_string(layer) + "." + suffix;
}

std::string llama_names::key(std::string_view arch, llm_kv k) {
  // In llm_kv's order.
  static constexpr const char* names[] = {
      "context_length",       "embedding_length",
      "block_count",          "feed_forward_length",
      "attention.head_count", "attention.head_count_kv",
      "attention.key_length", "attention.layer_norm_rms_epsilon",
      "rope.freq_base",       "rope.dimension_count",
      "rope.scaling.type",    "rope.scaling.factor",
      "rope.scale_linear",    "expert_count",
  };
  static_assert(std::size(names) == static_cast<size_t>(llm_kv::expert_count) + 1);
  return std::string(arch) + "." + names[static_cast<size_t>(k)];
}

namespace {

/// An architecture Keel runs, and what sets it apart from llama (docs/engine.md, "Model
/// families"; llama.cpp's llama_model_rope_type and its tensor lists).
struct family {
  const char* arch;
  const char* models;
  rope_type rope;
  bool qkv_bias;  // attn_q/k/v.bias required (llama: optional)
};

constexpr family families[] = {
    {"llama", "Llama 2/3.x, Mistral", rope_type::normal, false},
    {"qwen2", "Qwen 2/2.5", rope_type::neox, true},
};

const family* find_family(const std::string& arch) {
  for (const auto& f : families)
    if (arch == f.arch) return &f;
  return nullptr;
}

std::string supported_families() {
  std::string out;
  for (const auto& f : families) {
    if (!out.empty()) out += " or ";
    out += std::string("'") + f.arch + "' (" + f.models + ")";
  }
  return out;
}

/// Reads tensors of one file and remembers which it used, so that a tensor the model would
/// ignore (a bias Keel does not add, say) is refused instead of silently giving wrong results.
class tensor_reader {
 public:
  explicit tensor_reader(const gguf_file& f) : f_(f) {}

  bool has(const std::string& name) const { return f_.tensor(name) != nullptr; }

  /// A 1-D vector tensor of `n` values, as F32.
  caf::expected<std::vector<float>> vector(const std::string& name, uint64_t n) {
    auto t = f_.require_tensor(name, {n});
    if (!t) return std::move(t.error());
    used_.insert(name);
    std::vector<float> out(n);
    auto view = make_matrix((*t)->type, (*t)->data, 1, static_cast<int64_t>(n));
    dequantize_row(view, 0, out.data());
    return out;
  }

  /// Like vector(), but an absent tensor gives an empty vector.
  caf::expected<std::vector<float>> optional_vector(const std::string& name, uint64_t n) {
    if (!has(name)) return std::vector<float>{};
    return vector(name, n);
  }

  /// A 2-D matrix tensor with GGUF dims {cols, rows}.
  caf::expected<matrix_view> matrix(const std::string& name, uint64_t cols, uint64_t rows) {
    auto t = f_.require_tensor(name, {cols, rows});
    if (!t) return std::move(t.error());
    used_.insert(name);
    return make_matrix((*t)->type, (*t)->data, static_cast<int64_t>(rows),
                       static_cast<int64_t>(cols));
  }

  /// `bad_model` naming the first tensor of the file that was not read.
  caf::error check_all_used(const std::string& arch) const {
    if (used_.size() == f_.tensors().size()) return caf::none;
    for (const auto& t : f_.tensors()) {
      if (used_.count(t.name) == 0) {
        return make_error(errc::bad_model, f_.name() + ": tensor " + t.name +
                                               " is not part of the " + arch +
                                               " model Keel runs (it would be ignored)");
      }
    }
    return caf::none;
  }

 private:
  const gguf_file& f_;
  std::set<std::string> used_;
};

caf::error check_positive(const std::string& file, const std::string& key, int64_t v) {
  if (v > 0 && v < (int64_t{1} << 30)) return caf::none;
  return make_error(errc::bad_model,
                    file + ": " + key + " is " + std::to_string(v) + ", expected a positive size");
}

/// Refuses what changes the math in ways Keel does not implement: RoPE scaling (llama.cpp
/// applies rope.scaling.factor whatever rope.scaling.type says; Llama 3.x's scaling is in
/// rope_freqs.weight instead) and mixture-of-experts blocks (Mixtral is `llama` with experts).
caf::error check_unsupported_keys(const gguf_file& file, const std::string& arch) {
  const auto& name = file.name();
  auto key = [&](llm_kv k) { return llama_names::key(arch, k); };
  if (auto* t = file.find(key(llm_kv::rope_scaling_type))) {
    if (t->type != gguf_type::string || (t->s != "none" && t->s != "linear")) {
      return make_error(errc::bad_model, name + ": " + t->key + " is '" + t->s +
                                             "': RoPE scaling is not supported (only 'none')");
    }
  }
  for (auto k : {llm_kv::rope_scaling_factor, llm_kv::rope_scale_linear}) {
    double f = file.get_float_or(key(k), 0.0);
    if (f != 0.0 && f != 1.0) {
      char value[32];
      std::snprintf(value, sizeof value, "%g", f);
      return make_error(errc::bad_model, name + ": " + key(k) + " is " + value +
                                             ": RoPE scaling is not supported (only 1)");
    }
  }
  if (uint64_t experts = file.get_uint_or(key(llm_kv::expert_count), 0); experts > 0) {
    return make_error(errc::bad_model, name + ": " + key(llm_kv::expert_count) + " is " +
                                           std::to_string(experts) +
                                           ": mixture-of-experts models are not supported");
  }
  return caf::none;
}

}  // namespace

caf::expected<std::unique_ptr<model>> model::load(const std::string& path,
                                                  const std::string& llama2c_tokenizer) {
  // Tell the formats apart by the magic: GGUF files start with "GGUF".
  auto head = mapped_file::open(path);
  if (!head) return std::move(head.error());
  bool is_gguf = head->size() >= 4 && std::memcmp(head->data(), "GGUF", 4) == 0;
  if (!is_gguf) {
    auto ext = std::filesystem::path(path).extension().string();
    if (ext == ".gguf") {
      // A .gguf that lacks the magic is a bad GGUF, not a llama2.c checkpoint.
      return gguf_file::parse(path, head->data(), std::min<uint64_t>(head->size(), 64)).error();
    }
    return load_llama2c(path, llama2c_tokenizer);
  }
  auto file = gguf_file::open(path);
  if (!file) return std::move(file.error());
  return load_gguf(std::move(*file));
}

caf::expected<std::unique_ptr<model>> model::load_gguf(gguf_file file) {
  const auto& name = file.name();
  auto arch = file.get_string("general.architecture");
  if (!arch) return std::move(arch.error());
  const family* fam = find_family(*arch);
  if (fam == nullptr) {
    return make_error(errc::bad_model, name + ": general.architecture is '" + *arch +
                                           "', expected " + supported_families());
  }
  if (auto err = check_unsupported_keys(file, *arch)) return err;
  std::unique_ptr<model> m(new model);
  m->path_ = name;
  m->format_ = "gguf v" + std::to_string(file.version());
  auto& c = m->config_;
  c.arch = *arch;
  c.rope = fam->rope;
  auto key = [&](llm_kv k) { return llama_names::key(*arch, k); };
  auto get = [&](llm_kv k, int32_t& out) -> caf::error {
    auto v = file.get_uint(key(k));
    if (!v) return std::move(v.error());
    if (auto err = check_positive(name, key(k), static_cast<int64_t>(*v))) return err;
    out = static_cast<int32_t>(*v);
    return caf::none;
  };
  if (auto err = get(llm_kv::embedding_length, c.dim)) return err;
  if (auto err = get(llm_kv::block_count, c.n_layers)) return err;
  if (auto err = get(llm_kv::head_count, c.n_heads)) return err;
  if (auto err = get(llm_kv::feed_forward_length, c.ffn_dim)) return err;
  if (auto err = get(llm_kv::context_length, c.ctx_len)) return err;
  c.n_kv_heads = c.n_heads;
  if (file.find(key(llm_kv::head_count_kv))) {
    if (auto err = get(llm_kv::head_count_kv, c.n_kv_heads)) return err;
  }
  if (c.n_heads % c.n_kv_heads != 0) {
    return make_error(errc::bad_model, name + ": " + key(llm_kv::head_count) + " " +
                                           std::to_string(c.n_heads) + " is not a multiple of " +
                                           key(llm_kv::head_count_kv) + " " +
                                           std::to_string(c.n_kv_heads));
  }
  c.head_dim = c.dim / c.n_heads;
  if (file.find(key(llm_kv::key_length))) {
    if (auto err = get(llm_kv::key_length, c.head_dim)) return err;
  } else if (c.dim % c.n_heads != 0) {
    return make_error(errc::bad_model, name + ": " + key(llm_kv::embedding_length) + " " +
                                           std::to_string(c.dim) + " is not a multiple of " +
                                           key(llm_kv::head_count) + " " +
                                           std::to_string(c.n_heads));
  }
  // q_dim() and kv_dim() are int32: a huge key_length must not overflow them.
  if (int64_t{c.n_heads} * c.head_dim >= (int64_t{1} << 30)) {
    return make_error(errc::bad_model, name + ": " + key(llm_kv::key_length) + " " +
                                           std::to_string(c.head_dim) + " times " +
                                           key(llm_kv::head_count) + " " +
                                           std::to_string(c.n_heads) + " is too large");
  }
  if (c.head_dim % 2 != 0) {
    return make_error(errc::bad_model,
                      name + ": head dimension " + std::to_string(c.head_dim) + " is odd");
  }
  if (auto* rd = file.find(key(llm_kv::rope_dimension_count))) {
    if (static_cast<int64_t>(rd->u) != c.head_dim) {
      return make_error(errc::bad_model, name + ": " + rd->key + " is " + std::to_string(rd->u) +
                                             ", only full-head rotary (" +
                                             std::to_string(c.head_dim) + ") is supported");
    }
  }
  c.rms_eps = static_cast<float>(file.get_float_or(key(llm_kv::rms_epsilon), 1e-5));
  c.rope_theta = static_cast<float>(file.get_float_or(key(llm_kv::rope_freq_base), 10000.0));
  if (!(c.rms_eps > 0) || !(c.rope_theta > 0)) {
    return make_error(errc::bad_model, name + ": rms epsilon " + std::to_string(c.rms_eps) +
                                           " and rope base " + std::to_string(c.rope_theta) +
                                           " must be positive");
  }

  auto voc = vocab_from_gguf(file);
  if (!voc) return std::move(voc.error());
  m->vocab_ = std::move(*voc);

  auto* embd = file.tensor("token_embd.weight");
  if (!embd)
    return make_error(errc::bad_model, name + ": missing required tensor token_embd.weight");
  if (embd->dims.size() != 2) {
    return make_error(errc::bad_model, name + ": tensor token_embd.weight has " +
                                           std::to_string(embd->dims.size()) + " dims, expected 2");
  }
  c.vocab_size = static_cast<int32_t>(embd->dims[1]);
  if (static_cast<size_t>(c.vocab_size) != m->vocab_.tokens.size()) {
    return make_error(errc::bad_model, name + ": token_embd.weight has " +
                                           std::to_string(c.vocab_size) +
                                           " rows but the vocabulary has " +
                                           std::to_string(m->vocab_.tokens.size()) + " tokens");
  }
  const uint64_t dim = c.dim, vocab = c.vocab_size, q = c.q_dim(), kv = c.kv_dim(), ffn = c.ffn_dim;
  tensor_reader rd(file);
  auto te = rd.matrix("token_embd.weight", dim, vocab);
  if (!te) return std::move(te.error());
  m->token_embd_ = *te;
  auto on = rd.vector("output_norm.weight", dim);
  if (!on) return std::move(on.error());
  m->output_norm_ = std::move(*on);
  if (rd.has("output.weight")) {
    auto out = rd.matrix("output.weight", dim, vocab);
    if (!out) return std::move(out.error());
    m->output_ = *out;
  } else {  // tied embeddings (Llama 3.2 1B/3B, small Qwen 2.5): llama.cpp does the same
    m->output_ = m->token_embd_;
    c.tied_output = true;
  }
  // One table for all layers, as llama.cpp's: ggml divides pair i's angle by freq_factors[i].
  auto rf = rd.optional_vector("rope_freqs.weight", static_cast<uint64_t>(c.head_dim / 2));
  if (!rf) return std::move(rf.error());
  m->rope_freqs_ = std::move(*rf);
  for (size_t i = 0; i < m->rope_freqs_.size(); ++i) {
    float f = m->rope_freqs_[i];
    if (!(f > 0) || !std::isfinite(f)) {
      return make_error(errc::bad_model, name + ": rope_freqs.weight[" + std::to_string(i) +
                                             "] is " + std::to_string(f) +
                                             ", expected a positive divisor");
    }
  }
  // Layers are added as their tensors are found, so a corrupt block_count fails on a missing
  // tensor instead of allocating for up to 2^30 layers.
  m->layers_.reserve(std::min<size_t>(c.n_layers, file.tensors().size()));
  for (int32_t l = 0; l < c.n_layers; ++l) {
    auto& L = m->layers_.emplace_back();
    auto t = [&](const char* s) { return llama_names::layer_tensor(l, s); };
    struct mat {
      const char* suffix;
      uint64_t cols, rows;
      matrix_view* out;
    } mats[] = {{"attn_q.weight", dim, q, &L.wq},         {"attn_k.weight", dim, kv, &L.wk},
                {"attn_v.weight", dim, kv, &L.wv},        {"attn_output.weight", q, dim, &L.wo},
                {"ffn_gate.weight", dim, ffn, &L.w_gate}, {"ffn_up.weight", dim, ffn, &L.w_up},
                {"ffn_down.weight", ffn, dim, &L.w_down}};
    for (auto& mm : mats) {
      auto v = rd.matrix(t(mm.suffix), mm.cols, mm.rows);
      if (!v) return std::move(v.error());
      *mm.out = *v;
    }
    struct vec {
      const char* suffix;
      uint64_t n;
      bool required;
      std::vector<float>* out;
    } vecs[] = {{"attn_norm.weight", dim, true, &L.attn_norm},
                {"ffn_norm.weight", dim, true, &L.ffn_norm},
                {"attn_q.bias", q, fam->qkv_bias, &L.bq},
                {"attn_k.bias", kv, fam->qkv_bias, &L.bk},
                {"attn_v.bias", kv, fam->qkv_bias, &L.bv}};
    for (auto& vv : vecs) {
      auto v = vv.required ? rd.vector(t(vv.suffix), vv.n) : rd.optional_vector(t(vv.suffix), vv.n);
      if (!v) return std::move(v.error());
      *vv.out = std::move(*v);
    }
  }
  if (auto err = rd.check_all_used(*arch)) return err;
  m->gguf_.emplace(std::move(file));
  return m;
}

caf::expected<std::unique_ptr<model>> model::load_llama2c(const std::string& path,
                                                          const std::string& tokenizer) {
  auto file = mapped_file::open(path);
  if (!file) return std::move(file.error());
  std::unique_ptr<model> m(new model);
  m->path_ = path;
  m->format_ = "llama2.c";
  int32_t hdr[7];
  if (file->size() < sizeof(hdr)) {
    return make_error(errc::bad_model, path + ": neither GGUF nor a llama2.c checkpoint: " +
                                           std::to_string(file->size()) + " bytes");
  }
  std::memcpy(hdr, file->data(), sizeof(hdr));
  auto& c = m->config_;
  c.dim = hdr[0];
  c.ffn_dim = hdr[1];
  c.n_layers = hdr[2];
  c.n_heads = hdr[3];
  c.n_kv_heads = hdr[4];
  c.tied_output = hdr[5] > 0;
  c.vocab_size = hdr[5] < 0 ? -hdr[5] : hdr[5];
  c.ctx_len = hdr[6];
  const char* keys[] = {"dim",        "hidden_dim", "n_layers", "n_heads",
                        "n_kv_heads", "vocab_size", "seq_len"};
  int32_t vals[] = {c.dim, c.ffn_dim, c.n_layers, c.n_heads, c.n_kv_heads, c.vocab_size, c.ctx_len};
  for (int i = 0; i < 7; ++i) {
    if (vals[i] <= 0 || vals[i] > (1 << 24)) {
      return make_error(errc::bad_model, path + ": llama2.c header " + keys[i] + " is " +
                                             std::to_string(vals[i]) +
                                             " (not GGUF, and not a valid llama2.c checkpoint)");
    }
  }
  if (c.dim % c.n_heads != 0 || c.n_heads % c.n_kv_heads != 0 || (c.dim / c.n_heads) % 2 != 0) {
    return make_error(errc::bad_model, path + ": llama2.c header has dim " + std::to_string(c.dim) +
                                           ", n_heads " + std::to_string(c.n_heads) +
                                           ", n_kv_heads " + std::to_string(c.n_kv_heads) +
                                           ", which do not divide");
  }
  c.head_dim = c.dim / c.n_heads;
  const uint64_t dim = c.dim, kv = c.kv_dim(), ffn = c.ffn_dim, L = c.n_layers,
                 vocab = c.vocab_size, hs = c.head_dim, seq = c.ctx_len;
  uint64_t floats = vocab * dim + L * dim + L * dim * dim + 2 * L * dim * kv + L * dim * dim +
                    L * dim + 3 * L * dim * ffn + dim + seq * hs;
  if (!c.tied_output) floats += vocab * dim;
  uint64_t need = sizeof(hdr) + floats * 4;
  if (file->size() < need) {
    return make_error(errc::bad_model,
                      path + ": truncated llama2.c checkpoint: " + std::to_string(file->size()) +
                          " bytes, the header needs " + std::to_string(need));
  }
  const float* p = reinterpret_cast<const float*>(file->data() + sizeof(hdr));
  auto take = [&p](uint64_t n) {
    const float* r = p;
    p += n;
    return r;
  };
  auto mat = [](const float* data, uint64_t rows, uint64_t cols) {
    return make_matrix(dtype::f32, data, static_cast<int64_t>(rows), static_cast<int64_t>(cols));
  };
  m->token_embd_ = mat(take(vocab * dim), vocab, dim);
  m->layers_.resize(c.n_layers);
  const float* att_norm = take(L * dim);
  const float* wq = take(L * dim * dim);
  const float* wk = take(L * dim * kv);
  const float* wv = take(L * dim * kv);
  const float* wo = take(L * dim * dim);
  const float* ffn_norm = take(L * dim);
  const float* w1 = take(L * dim * ffn);
  const float* w2 = take(L * ffn * dim);
  const float* w3 = take(L * dim * ffn);
  const float* final_norm = take(dim);
  take(seq * hs);  // freq_cis_real and freq_cis_imag: RoPE is recomputed
  for (uint64_t l = 0; l < L; ++l) {
    auto& y = m->layers_[l];
    y.attn_norm.assign(att_norm + l * dim, att_norm + (l + 1) * dim);
    y.ffn_norm.assign(ffn_norm + l * dim, ffn_norm + (l + 1) * dim);
    y.wq = mat(wq + l * dim * dim, dim, dim);
    y.wk = mat(wk + l * dim * kv, kv, dim);
    y.wv = mat(wv + l * dim * kv, kv, dim);
    y.wo = mat(wo + l * dim * dim, dim, dim);
    y.w_gate = mat(w1 + l * dim * ffn, ffn, dim);
    y.w_down = mat(w2 + l * ffn * dim, dim, ffn);
    y.w_up = mat(w3 + l * dim * ffn, ffn, dim);
  }
  m->output_norm_.assign(final_norm, final_norm + dim);
  m->output_ = c.tied_output ? m->token_embd_ : mat(take(vocab * dim), vocab, dim);

  auto tok_path = tokenizer.empty()
                      ? (std::filesystem::path(path).parent_path() / "tokenizer.bin").string()
                      : tokenizer;
  auto voc = vocab_from_llama2c(tok_path, c.vocab_size);
  if (!voc) return std::move(voc.error());
  m->vocab_ = std::move(*voc);
  m->raw_ = std::move(*file);
  return m;
}

dtype model::weight_type() const {
  return layers_.empty() ? token_embd_.type : layers_[0].wq.type;
}

uint64_t model::weight_bytes_per_token() const {
  uint64_t total = output_.row_bytes * static_cast<uint64_t>(output_.rows);
  for (auto& l : layers_) {
    for (auto* m : {&l.wq, &l.wk, &l.wv, &l.wo, &l.w_gate, &l.w_up, &l.w_down})
      total += m->row_bytes * static_cast<uint64_t>(m->rows);
  }
  return total;
}

}  // namespace keel
