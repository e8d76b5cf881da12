// keel-model: model tools. `synth` writes a Llama GGUF with seeded random weights; `info`
// describes a model file.

#include <cstdio>
#include <iostream>
#include <map>
#include <span>

#include "apps/cli.hpp"
#include "kernels/gguf.hpp"
#include "kernels/model.hpp"
#include "kernels/synth.hpp"
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
};

const char* top_help =
    "usage: keel-model COMMAND [OPTIONS]\n\n"
    "Model tools for Keel.\n\n"
    "commands:\n"
    "  synth -o OUT.gguf [...]   write a Llama GGUF with seeded random weights\n"
    "  info FILE                 architecture, sizes, tensor types, vocabulary\n\n"
    "Run 'keel-model COMMAND --help' for a command's options.\n";

int fail(const caf::error& err) {
  return keel::cli::fail("keel-model", err);
}

int synth(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text("keel-model synth -o OUT.gguf [OPTIONS]",
                                      "Writes a valid Llama GGUF with seeded random weights. The "
                                      "same options give the same bytes.",
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
  std::printf("architecture  llama\n");
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

}  // namespace

int main(int argc, char** argv) {
  constexpr keel::cli::command commands[] = {{"synth", synth}, {"info", info}};
  return keel::cli::dispatch(argc, argv, "keel-model", top_help, commands);
}
