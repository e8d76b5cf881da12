#include "kernels/synth.hpp"

#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/model.hpp"
#include "kernels/ops.hpp"
#include "kernels/pre_tokenizer.hpp"

namespace keel {

namespace {

/// splitmix64: a tiny, well-mixed generator; one stream per tensor keeps tensors independent
/// of the order they are written in.
struct splitmix {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  /// Uniform in [-1, 1).
  float uniform() {
    return static_cast<float>(static_cast<double>(next() >> 40) / (1 << 23) - 1.0);
  }
};

uint64_t stream_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull ^ seed;  // FNV-1a over the tensor name
  for (unsigned char ch : name) h = (h ^ ch) * 1099511628211ull;
  return h;
}

/// rows x cols random values in [-scale, scale), encoded as `type`.
std::vector<uint8_t> random_matrix(dtype type, int64_t rows, int64_t cols, float scale,
                                   uint64_t seed) {
  auto lay = *layout_of(type);
  const uint64_t row_bytes = bytes_of(lay, cols);
  std::vector<uint8_t> out(row_bytes * rows);
  std::vector<float> row(cols);
  splitmix rng{seed};
  for (int64_t r = 0; r < rows; ++r) {
    for (auto& x : row) x = rng.uniform() * scale;
    quantize_row(type, row.data(), cols, out.data() + r * row_bytes);
  }
  return out;
}

/// n F32 values, center + half_width * uniform[-1, 1).
std::vector<uint8_t> random_vector(int64_t n, float center, float half_width, uint64_t seed) {
  std::vector<uint8_t> out(n * sizeof(float));
  splitmix rng{seed};
  for (int64_t i = 0; i < n; ++i) {
    float v = center + half_width * rng.uniform();
    std::memcpy(out.data() + i * sizeof(float), &v, sizeof(float));
  }
  return out;
}

caf::error bad(const char* option, int64_t value, const std::string& why) {
  return make_error(errc::bad_request,
                    std::string("--") + option + " " + std::to_string(value) + ": " + why);
}

}  // namespace

caf::error validate(const synth_options& o) {
  struct {
    const char* name;
    int32_t v;
  } sizes[] = {{"dim", o.dim},           {"layers", o.layers}, {"heads", o.heads},
               {"kv-heads", o.kv_heads}, {"ffn", o.ffn},       {"ctx", o.ctx}};
  for (auto& s : sizes)
    if (s.v <= 0 || s.v > (1 << 20)) return bad(s.name, s.v, "must be between 1 and 1048576");
  if (o.dim % o.heads != 0) return bad("dim", o.dim, "must be a multiple of --heads");
  if ((o.dim / o.heads) % 2 != 0) return bad("heads", o.heads, "gives an odd head dimension");
  if (o.heads % o.kv_heads != 0) return bad("kv-heads", o.kv_heads, "must divide --heads");
  if (o.arch != "llama" && o.arch != "qwen2")
    return make_error(errc::bad_request, "--arch " + o.arch + ": expected llama or qwen2");
  if (!dtype_supported(o.type)) {
    return make_error(errc::bad_request, "--type " + std::string(dtype_name(o.type)) +
                                             ": expected f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, "
                                             "q2_k, q3_k, q4_k, q5_k or q6_k");
  }
  auto block = static_cast<int32_t>(layout_of(o.type)->block_elems);
  if (o.dim % block != 0) return bad("dim", o.dim, "must be a multiple of the type's block");
  if (o.ffn % block != 0) return bad("ffn", o.ffn, "must be a multiple of the type's block");
  return caf::none;
}

void add_vocab_metadata(gguf_writer& w, const vocab& v) {
  w.add_string("tokenizer.ggml.model", v.kind == vocab_kind::spm ? "llama" : "gpt2");
  // The split the vocabulary came with (a copy of a Qwen vocabulary keeps Qwen's).
  if (v.kind == vocab_kind::bpe)
    w.add_string("tokenizer.ggml.pre", std::string(pre_tokenizer_name(v.pre)));
  w.add_strings("tokenizer.ggml.tokens", v.tokens);
  if (!v.scores.empty()) w.add_float32s("tokenizer.ggml.scores", v.scores);
  if (!v.types.empty()) {
    std::vector<int32_t> types(v.types.size());
    for (size_t i = 0; i < types.size(); ++i) types[i] = static_cast<int32_t>(v.types[i]);
    w.add_int32s("tokenizer.ggml.token_type", std::move(types));
  }
  if (!v.merges.empty()) w.add_strings("tokenizer.ggml.merges", v.merges);
  if (v.bos >= 0) w.add_uint32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(v.bos));
  if (v.eos >= 0) w.add_uint32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(v.eos));
  if (v.unk >= 0) w.add_uint32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(v.unk));
  if (v.pad >= 0) w.add_uint32("tokenizer.ggml.padding_token_id", static_cast<uint32_t>(v.pad));
  w.add_bool("tokenizer.ggml.add_bos_token", v.add_bos);
  w.add_bool("tokenizer.ggml.add_eos_token", v.add_eos);
  w.add_bool("tokenizer.ggml.add_space_prefix", v.add_space_prefix);
}

caf::expected<gguf_writer> synthesize(const synth_options& o, const vocab& v) {
  if (auto err = validate(o)) return err;
  const int64_t n_vocab = static_cast<int64_t>(v.tokens.size());
  if (n_vocab == 0) return make_error(errc::bad_request, "synth: the vocabulary is empty");
  gguf_writer w;
  auto key = [&](llm_kv k) { return llama_names::key(o.arch, k); };
  w.add_string("general.architecture", o.arch);
  w.add_string("general.name", "keel-synth");
  w.add_uint64("keel.synth.seed", o.seed);
  w.add_uint32(key(llm_kv::context_length), static_cast<uint32_t>(o.ctx));
  w.add_uint32(key(llm_kv::embedding_length), static_cast<uint32_t>(o.dim));
  w.add_uint32(key(llm_kv::block_count), static_cast<uint32_t>(o.layers));
  w.add_uint32(key(llm_kv::feed_forward_length), static_cast<uint32_t>(o.ffn));
  w.add_uint32(key(llm_kv::head_count), static_cast<uint32_t>(o.heads));
  w.add_uint32(key(llm_kv::head_count_kv), static_cast<uint32_t>(o.kv_heads));
  w.add_float32(key(llm_kv::rms_epsilon), 1e-5f);
  w.add_float32(key(llm_kv::rope_freq_base), 10000.0f);
  w.add_uint32(key(llm_kv::rope_dimension_count), static_cast<uint32_t>(o.dim / o.heads));
  add_vocab_metadata(w, v);

  const int64_t dim = o.dim, hd = o.dim / o.heads, q = dim, kv = hd * o.kv_heads, ffn = o.ffn;
  auto mat = [&](const std::string& name, int64_t rows, int64_t cols, float scale) {
    w.add_tensor(name, {static_cast<uint64_t>(cols), static_cast<uint64_t>(rows)}, o.type,
                 random_matrix(o.type, rows, cols, scale, stream_seed(o.seed, name)));
  };
  auto vec = [&](const std::string& name, int64_t n, float center, float half_width) {
    w.add_tensor(name, {static_cast<uint64_t>(n)}, dtype::f32,
                 random_vector(n, center, half_width, stream_seed(o.seed, name)));
  };
  auto norm = [&](const std::string& name) { vec(name, dim, 1.0f, 0.1f); };
  const bool bias = o.qkv_bias || o.arch == "qwen2";
  // Scales keep activations of order one through the layers (uniform: var = s^2 / 3).
  auto s = [](int64_t fan_in) { return std::sqrt(3.0f / static_cast<float>(fan_in)); };
  mat("token_embd.weight", n_vocab, dim, 1.0f);
  // Divisors of every pair's angle, large enough to change the logits visibly (Llama 3.1's are
  // 1 for fast pairs and up to 8 for slow ones).
  if (o.rope_freqs) vec("rope_freqs.weight", hd / 2, 4.5f, 3.5f);
  for (int32_t l = 0; l < o.layers; ++l) {
    auto t = [&](const char* suffix) { return llama_names::layer_tensor(l, suffix); };
    norm(t("attn_norm.weight"));
    mat(t("attn_q.weight"), q, dim, s(dim));
    mat(t("attn_k.weight"), kv, dim, s(dim));
    mat(t("attn_v.weight"), kv, dim, s(dim));
    if (bias) {
      vec(t("attn_q.bias"), q, 0.0f, 0.5f);
      vec(t("attn_k.bias"), kv, 0.0f, 0.5f);
      vec(t("attn_v.bias"), kv, 0.0f, 0.5f);
    }
    mat(t("attn_output.weight"), dim, q, s(q) * 0.5f);
    norm(t("ffn_norm.weight"));
    mat(t("ffn_gate.weight"), ffn, dim, s(dim));
    mat(t("ffn_up.weight"), ffn, dim, s(dim));
    mat(t("ffn_down.weight"), dim, ffn, s(ffn) * 0.5f);
  }
  norm("output_norm.weight");
  if (!o.tied_output) mat("output.weight", n_vocab, dim, s(dim) * 4.0f);
  return w;
}

}  // namespace keel
