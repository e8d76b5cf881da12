// keel: the command-line client. `keel generate --model FILE` runs a model in this process.

#include <cstdio>
#include <iostream>
#include <span>
#include <string>
#include <thread>

#include "apps/cli.hpp"
#include "kernels/generate.hpp"
#include "kernels/model.hpp"
#include "kernels/tokenizer.hpp"

namespace {

using keel::cli::option;

constexpr option generate_spec[] = {
    {"model", "FILE", "GGUF model or llama2.c checkpoint (required)"},
    {"tokenizer", "FILE", "llama2.c tokenizer.bin (default: beside the model)"},
    {"prompt", "TEXT", "the prompt (required)"},
    {"max-tokens", "N", "most tokens to generate (default 64)"},
    {"temperature", "T", "0 for greedy (default 0)"},
    {"top-k", "K", "keep the K most likely tokens; 0 = off (default 0)"},
    {"top-p", "P", "nucleus sampling threshold in (0, 1] (default 1)"},
    {"min-p", "P", "drop tokens below P times the best one's probability (default 0)"},
    {"repeat-penalty", "R", "repetition penalty, 1 = off (default 1)"},
    {"seed", "S", "sampling seed (default 0)"},
    {"threads", "N", "CPU threads (default: all cores)"},
    {"kv-bytes", "B", "KV cache budget, e.g. 256M (default: enough for the context)"},
    {"ids", nullptr, "print token ids: 'prompt: ...' then 'gen: ...'"},
};

const char* top_help =
    "usage: keel COMMAND [OPTIONS]\n\n"
    "Keel's client.\n\n"
    "commands:\n"
    "  generate --model FILE --prompt TEXT [...]   generate a continuation in this process\n\n"
    "Run 'keel COMMAND --help' for a command's options.\n";

int fail(const caf::error& err) {
  return keel::cli::fail("keel", err);
}

int generate(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel generate --model FILE --prompt TEXT [OPTIONS]",
        "Streams the continuation of TEXT to stdout. The same model, prompt, seed and options "
        "always give the same tokens.",
        generate_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, generate_spec);
  if (!opts) return fail(opts.error());
  if (!opts->has("model"))
    return fail(keel::make_error(keel::errc::bad_request, "generate: --model FILE is required"));
  if (!opts->has("prompt"))
    return fail(keel::make_error(keel::errc::bad_request, "generate: --prompt TEXT is required"));
  keel::generation_request req;
  auto max_tokens = opts->get_int("max-tokens", 64, 1, 1 << 20);
  auto temperature = opts->get_real("temperature", 0.0, 0.0, 100.0);
  auto top_k = opts->get_int("top-k", 0, 0, 1 << 24);
  auto top_p = opts->get_real("top-p", 1.0, 0.0, 1.0);
  auto min_p = opts->get_real("min-p", 0.0, 0.0, 1.0);
  auto rep = opts->get_real("repeat-penalty", 1.0, 0.0, 100.0);
  auto seed = opts->get_int("seed", 0, 0, INT64_MAX);
  auto threads =
      opts->get_int("threads", std::max(1u, std::thread::hardware_concurrency()), 1, 1024);
  if (!max_tokens) return fail(max_tokens.error());
  if (!top_k) return fail(top_k.error());
  if (!seed) return fail(seed.error());
  if (!threads) return fail(threads.error());
  if (!temperature) return fail(temperature.error());
  if (!top_p) return fail(top_p.error());
  if (!min_p) return fail(min_p.error());
  if (!rep) return fail(rep.error());
  req.max_tokens = static_cast<int32_t>(*max_tokens);
  req.params.temperature = static_cast<float>(*temperature);
  req.params.top_k = static_cast<int32_t>(*top_k);
  req.params.top_p = static_cast<float>(*top_p);
  req.params.min_p = static_cast<float>(*min_p);
  req.params.repetition_penalty = static_cast<float>(*rep);
  req.params.seed = static_cast<uint64_t>(*seed);
  if (auto err = keel::validate(req.params)) return fail(err);

  auto m = keel::model::load(opts->get("model"), opts->get("tokenizer"));
  if (!m) return fail(m.error());
  const auto& model = **m;
  keel::tokenizer tok(model.vocabulary());
  req.prompt = tok.encode(opts->get("prompt"), model.vocabulary().add_bos);
  if (req.prompt.empty())
    return fail(keel::make_error(keel::errc::bad_request,
                                 "generate: --prompt is empty and the model adds no BOS"));
  auto layout = keel::kv_layout_for(model);
  auto need = static_cast<uint64_t>(keel::pages_for(layout, model.config().ctx_len) + 1) *
              keel::kv_pool(layout, 0).page_bytes();
  auto kv_bytes = opts->get_bytes("kv-bytes", need);
  if (!kv_bytes) return fail(kv_bytes.error());
  keel::kv_pool pool(layout, *kv_bytes);
  keel::thread_pool threads_pool(static_cast<int>(*threads));
  keel::engine eng(model, threads_pool);

  const bool ids = opts->has("ids");
  keel::detokenizer detok(tok, false);  // generated text continues the prompt
  if (ids) {
    std::string line = "prompt:";
    for (auto id : req.prompt) line += " " + std::to_string(id);
    std::printf("%s\ngen:", line.c_str());
  }
  auto on_token = [&](size_t, int32_t id) {
    if (ids)
      std::printf(" %d", id);
    else
      std::fputs(detok.push(id).c_str(), stdout);
    std::fflush(stdout);
  };
  auto result = keel::generate(eng, pool, {req}, 1, on_token);
  if (!ids) std::fputs(detok.flush().c_str(), stdout);
  std::fputs("\n", stdout);
  if (!result) return fail(result.error());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  constexpr keel::cli::command commands[] = {{"generate", generate}};
  return keel::cli::dispatch(argc, argv, "keel", top_help, commands);
}
