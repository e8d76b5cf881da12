// keel-model: model tools. `synth` writes a llama or qwen2 GGUF with seeded random weights; `info`
// describes a model file; `quantize` converts a model's weights to a quantisation mix.

#include <algorithm>
#include <atomic>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <map>
#include <optional>
#include <span>
#include <thread>

#include "apps/cli.hpp"
#include "kernels/gguf.hpp"
#include "kernels/model.hpp"
#include "kernels/quants.hpp"
#include "kernels/synth.hpp"
#include "kernels/thread_pool.hpp"
#include "kernels/tokenizer.hpp"

namespace {

using keel::cli::option;

constexpr option synth_spec[] = {
    {"out", "FILE", "output GGUF path (also -o FILE)"},
    {"vocab", "FILE", "take the vocabulary from this GGUF (default: built-in byte-level BPE)"},
    {"dim", "N", "embedding width (default 256)"},
    {"layers", "N", "decoder blocks (default 4)"},
    {"heads", "N", "attention heads (default 8)"},
    {"kv-heads", "N", "key/value heads (default 4)"},
    {"ffn", "N", "feed-forward width (default 768)"},
    {"ctx", "N", "context length (default 1024)"},
    {"seed", "N", "weight seed (default 1)"},
    {"type", "T", "matrix type: f32, f16, bf16 or q8_0 (default f32)"},
    {"tied", nullptr, "tie the output head to the token embedding"},
    {"arch", "A", "architecture: llama or qwen2 (Q/K/V biases, NEOX rope; default llama)"},
    {"qkv-bias", nullptr, "llama: also write Q/K/V biases (qwen2 always has them)"},
    {"rope-freqs", nullptr, "write rope_freqs.weight (Llama 3.1-style RoPE frequency divisors)"},
};

const char* top_help =
    "usage: keel-model COMMAND [OPTIONS]\n\n"
    "Model tools for Keel.\n\n"
    "commands:\n"
    "  synth -o OUT.gguf [...]   write a llama or qwen2 GGUF with seeded random weights\n"
    "  info FILE                 architecture, sizes, tensor types, vocabulary\n"
    "  quantize IN OUT --type T  convert a model's weights to a quantisation mix (q4_k_m, ...)\n\n"
    "Run 'keel-model COMMAND --help' for a command's options.\n";

int fail(const caf::error& err) {
  return keel::cli::fail("keel-model", err);
}

int synth(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text("keel-model synth -o OUT.gguf [OPTIONS]",
                                      "Writes a valid llama or qwen2 GGUF with seeded random "
                                      "weights. The same options give the same bytes.",
                                      synth_spec);
    return 0;
  }
  std::vector<char*> norm(args.begin(), args.end());
  for (auto& a : norm)
    if (std::string(a) == "-o") a = const_cast<char*>("--out");
  auto opts = keel::cli::options::parse(norm, synth_spec);
  if (!opts) return fail(opts.error());
  auto out = opts->get("out");
  if (out.empty())
    return fail(keel::make_error(keel::errc::bad_request, "synth: -o OUT.gguf is required"));
  keel::synth_options o;
  struct {
    const char* name;
    int32_t* field;
  } ints[] = {{"dim", &o.dim},           {"layers", &o.layers}, {"heads", &o.heads},
              {"kv-heads", &o.kv_heads}, {"ffn", &o.ffn},       {"ctx", &o.ctx}};
  for (auto& i : ints) {
    auto v = opts->get_int(i.name, *i.field, 1, 1 << 20);
    if (!v) return fail(v.error());
    *i.field = static_cast<int32_t>(*v);
  }
  auto seed = opts->get_int("seed", 1, 0, INT64_MAX);
  if (!seed) return fail(seed.error());
  o.seed = static_cast<uint64_t>(*seed);
  auto type = keel::parse_dtype(opts->get("type", "f32"));
  if (!type || !keel::dtype_supported(*type)) {
    return fail(keel::make_error(keel::errc::bad_request, "--type " + opts->get("type") +
                                                              ": expected f32, f16, bf16 or q8_0"));
  }
  o.type = *type;
  o.tied_output = opts->has("tied");
  o.arch = opts->get("arch", "llama");
  o.qkv_bias = opts->has("qkv-bias");
  o.rope_freqs = opts->has("rope-freqs");
  keel::vocab v;
  if (opts->has("vocab")) {
    auto vf = keel::gguf_file::open(opts->get("vocab"));
    if (!vf) return fail(vf.error());
    auto vv = keel::vocab_from_gguf(*vf);
    if (!vv) return fail(vv.error());
    v = std::move(*vv);
  } else {
    v = keel::builtin_byte_vocab();
  }
  std::cerr << "keel-model: synthesizing " << o.layers << " layers, dim " << o.dim << ", "
            << keel::dtype_name(o.type) << ", vocabulary of " << v.tokens.size() << " tokens\n";
  auto w = keel::synthesize(o, v);
  if (!w) return fail(w.error());
  if (auto err = w->write(out)) return fail(err);
  std::cerr << "keel-model: wrote " << out << "\n";
  return 0;
}

std::string human_bytes(uint64_t b) {
  char buf[32];
  if (b >= (1ull << 30))
    std::snprintf(buf, sizeof buf, "%.2f GiB", b / double(1ull << 30));
  else if (b >= (1ull << 20))
    std::snprintf(buf, sizeof buf, "%.2f MiB", b / double(1ull << 20));
  else if (b >= (1ull << 10))
    std::snprintf(buf, sizeof buf, "%.2f KiB", b / double(1ull << 10));
  else
    std::snprintf(buf, sizeof buf, "%llu B", static_cast<unsigned long long>(b));
  return buf;
}

int info(std::span<char*> args) {
  if (keel::cli::wants_help(args) || args.size() != 1) {
    std::cout << "usage: keel-model info FILE\n\nDescribes a GGUF or llama2.c model: architecture, "
                 "sizes, tensor types and vocabulary.\n";
    return args.size() == 1 ? 0 : 2;
  }
  std::string path = args[0];
  auto m = keel::model::load(path);
  if (!m) return fail(m.error());
  const auto& c = (*m)->config();
  const auto& v = (*m)->vocabulary();
  std::printf("file          %s\n", path.c_str());
  std::printf("format        %s\n", (*m)->format().c_str());
  std::printf("architecture  %s\n", c.arch.c_str());
  std::printf("dim           %d\n", c.dim);
  std::printf("layers        %d\n", c.n_layers);
  std::printf("heads         %d (kv %d, head dim %d)\n", c.n_heads, c.n_kv_heads, c.head_dim);
  std::printf("ffn           %d\n", c.ffn_dim);
  std::printf("context       %d\n", c.ctx_len);
  std::printf("rope base     %g\n", c.rope_theta);
  std::printf("rms epsilon   %g\n", c.rms_eps);
  std::printf("output head   %s\n", c.tied_output ? "tied to token embedding" : "separate");
  std::printf("weights       %s read per token\n",
              human_bytes((*m)->weight_bytes_per_token()).c_str());
  std::printf("vocabulary    %zu tokens, %s, bos %d, eos %d%s\n", v.tokens.size(),
              v.kind == keel::vocab_kind::spm ? "sentencepiece (llama)" : "byte-level BPE (gpt2)",
              v.bos, v.eos, v.add_bos ? ", adds BOS" : "");
  auto file = keel::gguf_file::open(path);
  if (file) {
    std::map<std::string, std::pair<int, uint64_t>> types;
    for (auto& t : file->tensors()) {
      auto& e = types[std::string(keel::dtype_name(t.type))];
      ++e.first;
      e.second += t.n_bytes;
    }
    std::printf("tensors       %zu\n", file->tensors().size());
    for (auto& [name, e] : types)
      std::printf("  %-10s  %4d tensors  %s\n", name.c_str(), e.first,
                  human_bytes(e.second).c_str());
  }
  return 0;
}

// ---- quantize ------------------------------------------------------------------------------

constexpr option quantize_spec[] = {
    {"type", "T",
     "the mix: q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k_s, q3_k_m, q3_k_l, q4_k_s, q4_k_m, q5_k_s, "
     "q5_k_m, q6_k, f16, bf16 or f32 (q3_k, q4_k, q5_k mean their _m mix)"},
    {"threads", "N",
     "threads converting rows (default: all cores); any count writes the same bytes"},
};

/// llama.cpp's file type numbers (llama_ftype), written to general.file_type.
enum class ftype : uint32_t {
  all_f32 = 0,
  f16 = 1,
  q4_0 = 2,
  q4_1 = 3,
  q8_0 = 7,
  q5_0 = 8,
  q5_1 = 9,
  q2_k = 10,
  q3_k_s = 11,
  q3_k_m = 12,
  q3_k_l = 13,
  q4_k_s = 14,
  q4_k_m = 15,
  q5_k_s = 16,
  q5_k_m = 17,
  q6_k = 18,
  bf16 = 32,
};

/// A --type: the type of most 2-D weights and the file type that selects the per-tensor rule.
struct quant_mix {
  const char* name;
  keel::dtype base;
  ftype file_type;
};

constexpr quant_mix quant_mixes[] = {
    {"q4_0", keel::dtype::q4_0, ftype::q4_0},     {"q4_1", keel::dtype::q4_1, ftype::q4_1},
    {"q5_0", keel::dtype::q5_0, ftype::q5_0},     {"q5_1", keel::dtype::q5_1, ftype::q5_1},
    {"q8_0", keel::dtype::q8_0, ftype::q8_0},     {"q2_k", keel::dtype::q2_k, ftype::q2_k},
    {"q3_k_s", keel::dtype::q3_k, ftype::q3_k_s}, {"q3_k_m", keel::dtype::q3_k, ftype::q3_k_m},
    {"q3_k_l", keel::dtype::q3_k, ftype::q3_k_l}, {"q4_k_s", keel::dtype::q4_k, ftype::q4_k_s},
    {"q4_k_m", keel::dtype::q4_k, ftype::q4_k_m}, {"q5_k_s", keel::dtype::q5_k, ftype::q5_k_s},
    {"q5_k_m", keel::dtype::q5_k, ftype::q5_k_m}, {"q6_k", keel::dtype::q6_k, ftype::q6_k},
    {"f16", keel::dtype::f16, ftype::f16},        {"bf16", keel::dtype::bf16, ftype::bf16},
    {"f32", keel::dtype::f32, ftype::all_f32},
};

std::optional<quant_mix> find_mix(std::string name) {
  for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  if (name == "q3_k" || name == "q4_k" || name == "q5_k") name += "_m";  // as llama-quantize
  for (const auto& m : quant_mixes)
    if (name == m.name) return m;
  return std::nullopt;
}

std::string mix_names() {
  std::string s;
  for (const auto& m : quant_mixes) s += (s.empty() ? "" : ", ") + std::string(m.name);
  return s;
}

// GGUF metadata keys that quantize sets or drops (the architecture's own keys are in model.hpp).
constexpr const char* key_architecture = "general.architecture";
constexpr const char* key_file_type = "general.file_type";
constexpr const char* key_quantization_version = "general.quantization_version";
constexpr const char* key_alignment = "general.alignment";
constexpr uint32_t quantization_version = 2;  // ggml's GGML_QNT_VERSION

bool is_block_type(keel::dtype t) {
  return keel::layout_of(t)->block_elems > 1;
}

int64_t block_elems(keel::dtype t) {
  return keel::layout_of(t)->block_elems;
}

/// What the per-tensor rule needs to know about the whole model.
struct model_facts {
  bool has_output = false;  // no output.weight: the token embedding is the output head too
  int attn_v_count = 0;     // tensors named *attn_v.weight (llama.cpp's n_attention_wv)
  int layers = 0;           // <arch>.block_count
  int gqa = 1;              // attention heads per KV head
};

/// The layer number of "blk.N....", or -1.
int layer_of(const std::string& name) {
  if (name.rfind("blk.", 0) != 0) return -1;
  int n = 0;
  size_t i = 4;
  if (i >= name.size() || !std::isdigit(static_cast<unsigned char>(name[i]))) return -1;
  while (i < name.size() && std::isdigit(static_cast<unsigned char>(name[i])))
    n = n * 10 + (name[i++] - '0');
  return n;
}

/// Whether a tensor is converted: a weight matrix (a name ending in "weight", two or more
/// dimensions) other than a norm or an expert router; everything else is copied unchanged.
bool is_converted(const keel::gguf_tensor& t) {
  const std::string& n = t.name;
  const bool weight = n.size() >= 6 && n.compare(n.size() - 6, 6, "weight") == 0;
  return weight && t.dims.size() >= 2 && n.find("_norm.weight") == std::string::npos &&
         n.find("ffn_gate_inp.weight") == std::string::npos;
}

/// The type of one converted tensor under a mix: a subset of llama.cpp's llama_tensor_get_type
/// for dense models (docs/engine.md, "Weight types", states the rule).
keel::dtype tensor_type(const quant_mix& mix, const keel::gguf_tensor& t, const model_facts& m) {
  using keel::dtype;
  if (!is_block_type(mix.base)) return mix.base;
  const std::string& name = t.name;
  const int64_t row = static_cast<int64_t>(t.dims[0]);
  const int layer = layer_of(name);
  const ftype f = mix.file_type;
  auto use_more_bits = [](int i, int n) {
    return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2;
  };
  dtype type = mix.base;
  if (name == "output.weight" || (!m.has_output && name == "token_embd.weight")) {
    if (row % block_elems(mix.base) != 0)
      type = dtype::q8_0;
    else if (mix.base != dtype::q8_0)
      type = dtype::q6_k;
  } else if (name.find("attn_v.weight") != std::string::npos) {
    if (f == ftype::q2_k)
      type = m.gqa >= 4 ? dtype::q4_k : dtype::q3_k;
    else if (f == ftype::q3_k_m)
      type = layer < 2 ? dtype::q5_k : dtype::q4_k;
    else if (f == ftype::q3_k_l)
      type = dtype::q5_k;
    else if ((f == ftype::q4_k_m || f == ftype::q5_k_m) && use_more_bits(layer, m.attn_v_count))
      type = dtype::q6_k;
    else if (f == ftype::q4_k_s && layer < 4)
      type = dtype::q5_k;
  } else if (name.find("ffn_down") != std::string::npos) {
    const int n = m.layers;
    if (f == ftype::q2_k)
      type = dtype::q3_k;
    else if (f == ftype::q3_k_m)
      type = layer < n / 16 ? dtype::q5_k : dtype::q4_k;
    else if (f == ftype::q3_k_l)
      type = dtype::q5_k;
    else if ((f == ftype::q4_k_m || f == ftype::q5_k_m) && use_more_bits(layer, n))
      type = dtype::q6_k;
    else if (f == ftype::q4_k_s && layer < n / 8)
      type = dtype::q5_k;
  } else if (name.find("attn_output.weight") != std::string::npos) {
    if (f == ftype::q2_k)
      type = dtype::q3_k;
    else if (f == ftype::q3_k_m)
      type = dtype::q4_k;
    else if (f == ftype::q3_k_l)
      type = dtype::q5_k;
  }
  // Rows that do not fill a super-block of 256 take a 32-block type of about as many bits
  // (llama.cpp uses IQ4_NL for Q2_K and Q3_K, which Keel does not have: Q4_0 is its size); rows
  // that do not fill 32 stay F16.
  if (row % block_elems(type) != 0) {
    switch (type) {
      case dtype::q2_k:
      case dtype::q3_k:
        type = dtype::q4_0;
        break;
      case dtype::q4_k:
        type = dtype::q5_0;
        break;
      case dtype::q5_k:
        type = dtype::q5_1;
        break;
      case dtype::q6_k:
        type = dtype::q8_0;
        break;
      default:
        break;
    }
    if (row % block_elems(type) != 0) type = dtype::f16;
  }
  return type;
}

model_facts facts_of(const keel::gguf_file& in) {
  model_facts m;
  for (const auto& t : in.tensors()) {
    if (t.name == "output.weight") m.has_output = true;
    if (t.name.find("attn_v.weight") != std::string::npos) ++m.attn_v_count;
  }
  const auto* arch = in.find(key_architecture);
  const std::string a = arch && arch->type == keel::gguf_type::string ? arch->s : "llama";
  m.layers = static_cast<int>(in.get_uint_or(keel::llama_names::key(a, keel::llm_kv::block_count),
                                             static_cast<uint64_t>(m.attn_v_count)));
  const uint64_t heads = in.get_uint_or(keel::llama_names::key(a, keel::llm_kv::head_count), 1);
  const uint64_t kv = in.get_uint_or(keel::llama_names::key(a, keel::llm_kv::head_count_kv), heads);
  m.gqa = kv > 0 ? static_cast<int>(heads / kv) : 1;
  return m;
}

/// Copies one metadata entry. Keel's GGUF writer has no 8- and 16-bit integers, 64-bit signed
/// integers or 64-bit floats: those are written as the nearest type it has, with a warning naming
/// the key; values that would not survive that are refused.
caf::error copy_kv(const keel::gguf_file& in, const keel::gguf_kv& kv, keel::gguf_writer& w) {
  using keel::gguf_type;
  auto widened = [&](gguf_type to) {
    std::cerr << "keel-model: warning: " << kv.key << " is "
              << keel::gguf_type_name(kv.type == gguf_type::array ? kv.elem : kv.type)
              << (kv.type == gguf_type::array ? " array" : "") << " in " << in.name()
              << "; written as " << keel::gguf_type_name(to) << "\n";
  };
  auto refuse = [&](const std::string& why) {
    return keel::make_error(keel::errc::bad_model, in.name() + ": metadata " + kv.key + " " + why +
                                                       ": Keel's GGUF writer cannot copy it");
  };
  switch (kv.type) {
    case gguf_type::u8:
    case gguf_type::u16:
      widened(gguf_type::u32);
      [[fallthrough]];
    case gguf_type::u32:
      w.add_uint32(kv.key, static_cast<uint32_t>(kv.u));
      return caf::none;
    case gguf_type::i8:
    case gguf_type::i16:
      widened(gguf_type::i32);
      [[fallthrough]];
    case gguf_type::i32:
      w.add_int32(kv.key, static_cast<int32_t>(kv.i));
      return caf::none;
    case gguf_type::u64:
      w.add_uint64(kv.key, kv.u);
      return caf::none;
    case gguf_type::i64:
      if (kv.i < 0) {
        if (kv.i < INT32_MIN) return refuse("is " + std::to_string(kv.i) + " (i64)");
        widened(gguf_type::i32);
        w.add_int32(kv.key, static_cast<int32_t>(kv.i));
      } else {
        widened(gguf_type::u64);
        w.add_uint64(kv.key, static_cast<uint64_t>(kv.i));
      }
      return caf::none;
    case gguf_type::f64:
      widened(gguf_type::f32);
      [[fallthrough]];
    case gguf_type::f32:
      w.add_float32(kv.key, static_cast<float>(kv.f));
      return caf::none;
    case gguf_type::boolean:
      w.add_bool(kv.key, kv.i != 0);
      return caf::none;
    case gguf_type::string:
      w.add_string(kv.key, kv.s);
      return caf::none;
    case gguf_type::array:
      break;
  }
  if (kv.elem == gguf_type::string) {
    w.add_strings(kv.key, kv.strings);
  } else if (kv.elem == gguf_type::f32 || kv.elem == gguf_type::f64) {
    if (kv.elem == gguf_type::f64) widened(gguf_type::f32);
    w.add_float32s(kv.key, std::vector<float>(kv.floats.begin(), kv.floats.end()));
  } else {
    std::vector<int32_t> v;
    v.reserve(kv.ints.size());
    for (int64_t x : kv.ints) {
      if (x < INT32_MIN || x > INT32_MAX)
        return refuse("holds " + std::to_string(x) + ", beyond an i32 array");
      v.push_back(static_cast<int32_t>(x));
    }
    if (kv.elem != gguf_type::i32) widened(gguf_type::i32);
    w.add_int32s(kv.key, std::move(v));
  }
  return caf::none;
}

std::string shape_of(const keel::gguf_tensor& t) {
  std::string s = "[";
  for (size_t i = 0; i < t.dims.size(); ++i) s += (i ? ", " : "") + std::to_string(t.dims[i]);
  return s + "]";
}

/// Converts the rows of `t` to `to` on `pool` (each row on one thread, so the bytes do not
/// depend on the thread count). Source rows are read as F32 first; a non-finite value is
/// refused, naming the tensor, the row and the column.
caf::expected<std::vector<uint8_t>> convert_tensor(const keel::gguf_file& in,
                                                   const keel::gguf_tensor& t, keel::dtype to,
                                                   keel::thread_pool& pool) {
  const int64_t cols = static_cast<int64_t>(t.dims[0]);
  const int64_t rows = static_cast<int64_t>(t.n_elements) / cols;
  const uint64_t in_row = keel::bytes_of(*keel::layout_of(t.type), cols);
  const uint64_t out_row = keel::bytes_of(*keel::layout_of(to), cols);
  std::vector<uint8_t> out(out_row * rows);
  std::atomic<int64_t> bad{INT64_MAX};  // the first non-finite element (row-major)
  pool.parallel_for(rows, [&](int64_t r0, int64_t r1) {
    std::vector<float> x(cols);
    for (int64_t r = r0; r < r1; ++r) {
      keel::dequantize_blocks(t.type, reinterpret_cast<const char*>(t.data) + r * in_row, cols,
                              x.data());
      for (int64_t c = 0; c < cols; ++c) {
        if (!std::isfinite(x[c])) {
          int64_t seen = bad.load();
          while (r * cols + c < seen && !bad.compare_exchange_weak(seen, r * cols + c)) {
          }
          return;
        }
      }
      keel::quantize_blocks(to, x.data(), cols, out.data() + r * out_row);
    }
  });
  if (const int64_t b = bad.load(); b != INT64_MAX) {
    std::vector<float> x(cols);
    keel::dequantize_blocks(t.type, reinterpret_cast<const char*>(t.data) + (b / cols) * in_row,
                            cols, x.data());
    return keel::make_error(keel::errc::bad_model,
                            in.name() + ": tensor " + t.name + " has " +
                                std::to_string(x[b % cols]) + " at row " +
                                std::to_string(b / cols) + ", column " + std::to_string(b % cols) +
                                ": refusing to quantize a non-finite weight");
  }
  return out;
}

/// The type of every tensor of `in` under `mix`, after checking that each tensor to convert has
/// a type quantize reads.
caf::expected<std::vector<keel::dtype>> plan_types(const keel::gguf_file& in,
                                                   const quant_mix& mix) {
  const model_facts facts = facts_of(in);
  std::vector<keel::dtype> types;
  for (const auto& t : in.tensors()) {
    const bool convert = is_converted(t);
    types.push_back(convert ? tensor_type(mix, t, facts) : t.type);
    if (!convert || types.back() == t.type) continue;
    if (t.type != keel::dtype::f32 && t.type != keel::dtype::f16 && t.type != keel::dtype::bf16 &&
        t.type != keel::dtype::q8_0) {
      return keel::make_error(keel::errc::bad_model,
                              in.name() + ": tensor " + t.name + " has type " +
                                  std::string(keel::dtype_name(t.type)) +
                                  "; keel-model quantize reads f32, f16, bf16 and q8_0");
    }
  }
  return types;
}

/// Copies the metadata of `in` in order, with general.file_type set for `mix`.
caf::error copy_metadata(const keel::gguf_file& in, const quant_mix& mix, keel::gguf_writer& w) {
  bool file_type_written = false;
  for (const auto& kv : in.metadata()) {
    if (kv.key == key_alignment || kv.key == key_quantization_version) continue;
    if (kv.key == key_file_type) {
      w.add_uint32(key_file_type, static_cast<uint32_t>(mix.file_type));
      file_type_written = true;
      continue;
    }
    if (auto err = copy_kv(in, kv, w)) return err;
  }
  if (!file_type_written) w.add_uint32(key_file_type, static_cast<uint32_t>(mix.file_type));
  if (is_block_type(mix.base)) w.add_uint32(key_quantization_version, quantization_version);
  return caf::none;
}

int quantize(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-model quantize IN.gguf OUT.gguf --type T [--threads N]",
        "Converts the weight matrices of a GGUF model (F32, F16, BF16 or Q8_0) to a quantisation "
        "mix, per tensor as llama.cpp's llama-quantize chooses (docs/engine.md, \"Weight "
        "types\"); norms, biases and other one-dimensional tensors are copied unchanged, and so "
        "is all metadata but general.file_type.",
        quantize_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, quantize_spec, 2);
  if (!opts) return fail(opts.error());
  if (opts->positional().size() != 2)
    return fail(keel::make_error(keel::errc::bad_request,
                                 "quantize: expected IN.gguf OUT.gguf, got " +
                                     std::to_string(opts->positional().size()) + " paths"));
  if (!opts->has("type"))
    return fail(keel::make_error(keel::errc::bad_request,
                                 "quantize: --type is required: one of " + mix_names()));
  auto mix = find_mix(opts->get("type"));
  if (!mix)
    return fail(keel::make_error(keel::errc::bad_request, "--type " + opts->get("type") +
                                                              ": expected one of " + mix_names()));
  const int64_t cores = std::max(1u, std::thread::hardware_concurrency());
  auto threads = opts->get_int("threads", cores, 1, 1024);
  if (!threads) return fail(threads.error());
  const std::string out_path = opts->positional()[1];
  auto in = keel::gguf_file::open(opts->positional()[0]);
  if (!in) return fail(in.error());
  auto types = plan_types(*in, *mix);  // every refusal before any work
  if (!types) return fail(types.error());
  keel::gguf_writer w;
  if (auto err = copy_metadata(*in, *mix, w)) return fail(err);

  keel::thread_pool pool(static_cast<int>(*threads), {}, "keel-quantize");
  const size_t n = in->tensors().size();
  uint64_t bytes_in = 0, bytes_out = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto& t = in->tensors()[i];
    const keel::dtype to = (*types)[i];
    std::fprintf(stderr, "keel-model: [%*zu/%zu] %-28s %-14s %5s -> %s\n",
                 static_cast<int>(std::to_string(n).size()), i + 1, n, t.name.c_str(),
                 shape_of(t).c_str(), std::string(keel::dtype_name(t.type)).c_str(),
                 std::string(keel::dtype_name(to)).c_str());
    std::vector<uint8_t> bytes;
    if (to == t.type) {
      bytes.assign(t.data, t.data + t.n_bytes);
    } else {
      auto converted = convert_tensor(*in, t, to, pool);
      if (!converted) return fail(converted.error());
      bytes = std::move(*converted);
    }
    bytes_in += t.n_bytes;
    bytes_out += bytes.size();
    w.add_tensor(t.name, t.dims, to, std::move(bytes));
  }
  if (auto err = w.write(out_path)) return fail(err);
  std::cerr << "keel-model: wrote " << out_path << " (" << mix->name << ", " << n << " tensors, "
            << human_bytes(bytes_in) << " -> " << human_bytes(bytes_out) << ")\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  constexpr keel::cli::command commands[] = {
      {"synth", synth}, {"info", info}, {"quantize", quantize}};
  return keel::cli::dispatch(argc, argv, "keel-model", top_help, commands);
}
