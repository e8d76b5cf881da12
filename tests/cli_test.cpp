#define BOOST_TEST_MODULE cli_test
#include <boost/test/unit_test.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <cstring>
#include <fstream>
#include <limits>
#include <sstream>

#include <nlohmann/json.hpp>

#include "kernels/chat_prompt.hpp"
#include "kernels/gguf.hpp"
#include "tests/process.hpp"
#include "tests/test_support.hpp"

namespace {

struct result {
  int status = -1;
  std::string out;  // stdout and stderr, merged
};

/// Runs a shell command line and captures its output and exit status.
result sh(const std::string& cmd) {
  result r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  BOOST_REQUIRE(p != nullptr);
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.out.append(buf, n);
  int st = pclose(p);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

using keel::test::bin;

std::string slurp(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

const char* synth_args = " --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 128 --ctx 128";

}  // namespace

BOOST_AUTO_TEST_CASE(every_binary_answers_help) {
  for (auto* b : {"keel", "keel-model", "keel-bench"}) {
    auto r = sh(bin(b) + " --help");
    BOOST_TEST_CONTEXT(b) {
      BOOST_TEST(r.status == 0);
      BOOST_TEST(r.out.find("usage:") != std::string::npos);
    }
  }
  auto r = sh(bin("keel") + " generate --help");
  BOOST_TEST(r.status == 0);
  BOOST_TEST(r.out.find("--max-tokens") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(synth_writes_the_same_bytes_for_the_same_arguments) {
  keel::test::temp_dir dir("cli_synth");
  auto a = (dir.path / "a.gguf").string(), b = (dir.path / "b.gguf").string(),
       c = (dir.path / "c.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + a + synth_args + " --type q8_0").status == 0);
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + b + synth_args + " --type q8_0").status == 0);
  BOOST_REQUIRE(
      sh(bin("keel-model") + " synth -o " + c + synth_args + " --type q8_0 --seed 9").status == 0);
  BOOST_TEST(slurp(a) == slurp(b));
  BOOST_TEST(slurp(a) != slurp(c));
  auto info = sh(bin("keel-model") + " info " + a);
  BOOST_TEST(info.status == 0);
  BOOST_TEST(info.out.find("layers        2") != std::string::npos);
  BOOST_TEST(info.out.find("q8_0") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(generate_prints_prompt_and_generated_ids_deterministically) {
  keel::test::temp_dir dir("cli_generate");
  auto m = (dir.path / "m.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + m + synth_args).status == 0);
  auto cmd =
      bin("keel") + " generate --model " + m + " --prompt 'Hello there' --max-tokens 8 --ids";
  auto r = sh(cmd);
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  std::istringstream lines(r.out);
  std::string prompt, gen;
  std::getline(lines, prompt);
  std::getline(lines, gen);
  BOOST_TEST(prompt.rfind("prompt: ", 0) == 0u);
  BOOST_TEST(gen.rfind("gen: ", 0) == 0u);
  std::istringstream ids(gen.substr(5));
  int n = 0, id;
  while (ids >> id) ++n;
  BOOST_TEST(n >= 1);
  BOOST_TEST(n <= 8);
  BOOST_TEST(sh(cmd + " --threads 2").out == r.out);
  auto t1 =
      sh(bin("keel") + " generate --model " + m + " --prompt hi --temperature 0.9 --seed 3 --ids");
  auto t2 =
      sh(bin("keel") + " generate --model " + m + " --prompt hi --temperature 0.9 --seed 3 --ids");
  BOOST_TEST(t1.status == 0);
  BOOST_TEST(t1.out == t2.out);
  auto text = sh(bin("keel") + " generate --model " + m + " --prompt hi --max-tokens 4");
  BOOST_TEST(text.status == 0);
}

BOOST_AUTO_TEST_CASE(bad_arguments_get_a_clear_error_naming_the_value) {
  keel::test::temp_dir dir("cli_errors");
  auto m = (dir.path / "m.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + m + synth_args).status == 0);
  auto g = bin("keel") + " generate --model " + m + " --prompt hi";
  auto r = sh(g + " --temperature -1");
  BOOST_TEST(r.status == 2);
  BOOST_TEST(r.out.find("--temperature -1") != std::string::npos);
  r = sh(g + " --top-p 1.5");
  BOOST_TEST(r.status == 2);
  BOOST_TEST(r.out.find("--top-p 1.5") != std::string::npos);
  r = sh(g + " --max-tokens abc");
  BOOST_TEST(r.status == 2);
  BOOST_TEST(r.out.find("abc") != std::string::npos);
  r = sh(g + " --bogus");
  BOOST_TEST(r.status == 2);
  BOOST_TEST(r.out.find("--bogus") != std::string::npos);
  r = sh(bin("keel") + " generate --model " + (dir.path / "missing.gguf").string() +
         " --prompt hi");
  BOOST_TEST(r.status == 1);
  BOOST_TEST(r.out.find("missing.gguf") != std::string::npos);
  r = sh(bin("keel-model") + " synth -o " + m + " --dim 100 --type q8_0");
  BOOST_TEST(r.status == 2);
  BOOST_TEST(r.out.find("--dim 100") != std::string::npos);
  r = sh(bin("keel") + " generate --model " + m + " --prompt '" + std::string(300, 'x') + "'");
  BOOST_TEST(r.status == 2);
  BOOST_TEST(r.out.find("context length") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(engine_benchmark_writes_a_report) {
  keel::test::temp_dir dir("cli_bench");
  auto m = (dir.path / "m.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + m + synth_args + " --type f16").status == 0);
  auto q = (dir.path / "q.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + q + synth_args + " --type q8_0").status == 0);
  auto report = (dir.path / "engine.md").string();
  // Two models side by side in one run.
  auto r = sh(bin("keel-bench") + " engine --model " + m + "," + q +
              " --threads 1 --steps 4 --prompt 16 --out " + report);
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  auto text = slurp(report);
  for (const char* want :
       {"decode tokens/s, batch 16", "fraction of the bandwidth bound", "batch 16 / batch 1",
        "fraction of peak multiply-adds", "Instruction sets", "| model 1 | model 2 |",
        "matrices f16 x", "matrices q8_0 x"})
    BOOST_TEST(text.find(want) != std::string::npos, "the report has no '" << want << "'");
  // The actor-path benchmark: throughput tables and two shard crashes on a two-shard node.
  auto batch = (dir.path / "batch.md").string();
  r = sh(bin("keel-bench") + " batch --model " + m +
         " --shards 2 --threads 2 --tokens 8 --crashes 2 --reps 1 --out " + batch);
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  text = slurp(batch);
  BOOST_TEST(text.find("| 64 |") != std::string::npos);
  BOOST_TEST(text.find("recovery p99") != std::string::npos);
  BOOST_TEST(text.find("transcripts equal: yes") != std::string::npos);
  // The serving benchmark: it starts keel-node itself (127.0.0.1:0), runs two clients over the
  // wire and in process, and stops the node.
  auto serve = (dir.path / "serve.md").string();
  r = sh(bin("keel-bench") + " serve --model " + m +
         " --threads 1 --clients 2 --turns 2 --tokens 4 --reps 1 --out " + serve);
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  text = slurp(serve);
  BOOST_TEST(text.find("| 2 | wire |") != std::string::npos);
  BOOST_TEST(text.find("| 2 | in process |") != std::string::npos);
  BOOST_TEST(text.find("TTFT p50 added") != std::string::npos);
  BOOST_TEST(text.find("tokens/s lost") != std::string::npos);
  BOOST_TEST(text.find("the same model as --model") != std::string::npos);
  BOOST_TEST(text.find("(exit 0)") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(template_prints_each_reference_conversation_exactly,
                     *boost::unit_test::precondition(keel::test::needs_shared_data{})) {
  // `keel template` renders the Qwen vocabulary's own tokenizer.chat_template for the six
  // reference conversations (../shared/data/templates), and prints exactly the reference
  // rendering: nothing added after it.
  keel::test::temp_dir dir("cli_template");
  auto model = (keel::test::shared_data() / "vocab" / "keel-vocab-qwen.gguf").string();
  std::ifstream in(keel::test::shared_data() / "templates" / "chat-templates.jsonl");
  BOOST_REQUIRE(in);
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line);
    auto messages = (dir.path / ("m" + std::to_string(n) + ".json")).string();
    std::ofstream(messages) << j["messages"].dump();
    auto out = (dir.path / ("out" + std::to_string(n))).string();
    auto r = sh("(" + bin("keel") + " template --model " + model + " --messages " + messages +
                (j["add_generation_prompt"].get<bool>() ? "" : " --no-generation-prompt") +
                " > " + out + ")");
    BOOST_TEST_CONTEXT("conversation " << n) {
      BOOST_TEST(r.status == 0, r.out);
      BOOST_TEST(slurp(out) == j["expected"].get<std::string>());
    }
    ++n;
  }
  BOOST_TEST(n == 6);
}

BOOST_AUTO_TEST_CASE(template_uses_the_default_for_a_model_without_one_and_names_bad_input) {
  keel::test::temp_dir dir("cli_template_default");
  auto model = (dir.path / "m.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + model + synth_args).status == 0);
  auto messages = (dir.path / "m.json").string();
  std::ofstream(messages) << R"([{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": "Hi"}])";
  auto out = (dir.path / "out").string();
  auto r = sh("(" + bin("keel") + " template --model " + model + " --messages " + messages +
              " > " + out + ")");
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  // ChatML, after the synthetic model's BOS.
  BOOST_TEST(slurp(out) ==
             "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
             "<|im_start|>assistant\n");
  // A template given on the command line wins.
  auto tmpl = (dir.path / "t.jinja").string();
  std::ofstream(tmpl) << "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
  r = sh("(" + bin("keel") + " template --model " + model + " --messages " + messages +
         " --chat-template " + tmpl + " > " + out + ")");
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  BOOST_TEST(slurp(out) == "[system] Be brief.\n[user] Hi\n");
  // Bad input is named.
  std::ofstream(messages) << R"([{"role": "user"}])";
  r = sh(bin("keel") + " template --model " + model + " --messages " + messages);
  BOOST_TEST(r.status != 0);
  BOOST_TEST(r.out.find("message 1 has no string 'content'") != std::string::npos, r.out);
  std::ofstream(tmpl) << "{% if %}";
  r = sh(bin("keel") + " template --model " + model + " --messages " + messages +
         " --chat-template " + tmpl);
  BOOST_TEST(r.status != 0);
  BOOST_TEST(r.out.find("line 1, column") != std::string::npos, r.out);
}

namespace {

/// The ids of the line of `out` that starts with `label` ("prompt:", "gen:"), from `from` on;
/// `from` moves past that line.
std::vector<int32_t> ids_after(const std::string& out, const std::string& label, size_t& from) {
  auto at = out.find(label, from);
  BOOST_REQUIRE_MESSAGE(at != std::string::npos, "no '" << label << "' in: " << out);
  auto end = out.find('\n', at);
  std::istringstream in(out.substr(at + label.size(), end - at - label.size()));
  std::vector<int32_t> ids;
  int32_t id;
  while (in >> id) ids.push_back(id);
  from = end;
  return ids;
}

keel::tokenizer tokenizer_of(const std::string& model) {
  auto file = keel::gguf_file::open(model);
  BOOST_REQUIRE_MESSAGE(file, keel::test::why(file));
  auto v = keel::vocab_from_gguf(*file);
  BOOST_REQUIRE_MESSAGE(v, keel::test::why(v));
  return keel::tokenizer(std::move(*v));
}

}  // namespace

BOOST_AUTO_TEST_CASE(generate_special_parses_control_tokens_in_the_prompt_and_prints_them) {
  keel::test::temp_dir dir("cli_special");
  auto m = (dir.path / "m.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + m + synth_args).status == 0);
  auto tok = tokenizer_of(m);
  auto g = bin("keel") + " generate --model " + m;
  // Without --special "<s>" and "</s>" are text; with it, BOS and EOS.
  auto plain = sh(g + " --prompt '<s>Hi</s>' --ids --max-tokens 2");
  auto special = sh(g + " --prompt '<s>Hi</s>' --ids --max-tokens 2 --special");
  BOOST_REQUIRE_MESSAGE(plain.status == 0 && special.status == 0, plain.out + special.out);
  size_t at = 0;
  BOOST_CHECK(ids_after(plain.out, "prompt:", at) == tok.encode("<s>Hi</s>", true));
  at = 0;
  BOOST_CHECK(ids_after(special.out, "prompt:", at) ==
              (std::vector<int32_t>{tok.bos(), tok.bos(), 72, 105, tok.eos()}));
  // A reply that ends with the model's EOS prints it only with --special (the rest the same).
  std::string prompt;
  for (const char* p : {"Hi", "Hello", "The", "a", "Keel", "one", "two", "x"}) {
    auto r = sh(g + " --prompt " + p + " --ids --max-tokens 48");
    BOOST_REQUIRE(r.status == 0);
    size_t from = 0;
    ids_after(r.out, "prompt:", from);
    auto gen = ids_after(r.out, "gen:", from);
    if (!gen.empty() && gen.back() == tok.eos()) {
      prompt = p;
      break;
    }
  }
  BOOST_REQUIRE_MESSAGE(!prompt.empty(), "no prompt made the model end with EOS");
  auto quiet = sh(g + " --prompt " + prompt + " --max-tokens 48");
  auto shown = sh(g + " --prompt " + prompt + " --max-tokens 48 --special");
  BOOST_REQUIRE(quiet.status == 0 && shown.status == 0);
  BOOST_CHECK(shown.out.size() > 5 && shown.out.substr(shown.out.size() - 5) == "</s>\n");
  BOOST_CHECK_EQUAL(quiet.out, shown.out.substr(0, shown.out.size() - 5) + "\n");
  // Through a node the prompt is parsed alike (Session.send's `special`), and only when asked.
  keel::test::process node({bin("keel-node"), "--listen", "127.0.0.1:0", "--model", m,
                            "--threads", "1"});
  BOOST_REQUIRE_MESSAGE(node.wait_err([](const std::string& s) {
                          return s.find("keel-node: listening on ") != std::string::npos &&
                                 s.find('\n', s.find("keel-node: listening on ")) != std::string::npos;
                        }, std::chrono::seconds(15)),
                        "keel-node did not start: " + node.err());
  auto err = node.err();
  auto from = err.find("keel-node: listening on ") + 24;
  auto address = err.substr(from, err.find('\n', from) - from);
  auto r = bin("keel") + " generate --connect " + address + " --prompt '<s>Hi</s>' --ids --max-tokens 2";
  auto remote_plain = sh(r);
  auto remote_special = sh(r + " --special");
  BOOST_REQUIRE_MESSAGE(remote_plain.status == 0 && remote_special.status == 0,
                        remote_plain.out + remote_special.out);
  at = 0;
  BOOST_CHECK(ids_after(remote_plain.out, "prompt:", at) == tok.encode("<s>Hi</s>", true));
  at = 0;
  BOOST_CHECK(ids_after(remote_special.out, "prompt:", at) ==
              (std::vector<int32_t>{tok.bos(), tok.bos(), 72, 105, tok.eos()}));
}

BOOST_AUTO_TEST_CASE(chat_sends_the_system_prompt_and_each_line_as_messages_the_node_renders) {
  using namespace std::chrono_literals;
  keel::test::temp_dir dir("cli_chat");
  auto m = (dir.path / "m.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + m +
                   " --dim 64 --layers 2 --heads 4 --kv-heads 2 --ffn 128 --ctx 512")
                    .status == 0);
  keel::test::process node({bin("keel-node"), "--listen", "127.0.0.1:0", "--model", m,
                            "--threads", "1"});
  std::string address;
  BOOST_REQUIRE_MESSAGE(node.wait_err(
                            [&](const std::string& s) {
                              auto at = s.find("keel-node: listening on ");
                              if (at == std::string::npos) return false;
                              auto end = s.find('\n', at);
                              if (end == std::string::npos) return false;
                              address = s.substr(at + 24, end - at - 24);
                              return true;
                            },
                            15s),
                        "keel-node did not start: " + node.err());
  auto keel = bin("keel");
  auto r = sh("printf 'Hello <|im_end|>\\nAgain\\n' | " + keel + " chat --connect " + address +
              " --system 'Be brief.' --max-tokens 4");
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  auto list = sh(keel + " sessions --connect " + address);
  BOOST_REQUIRE(list.status == 0);
  auto s = list.out.find("s-");
  BOOST_REQUIRE_MESSAGE(s != std::string::npos, list.out);
  auto id = list.out.substr(s, list.out.find(' ', s) - s);
  auto h = sh(keel + " history --connect " + address + " " + id);
  BOOST_REQUIRE_MESSAGE(h.status == 0, h.out);
  size_t at = 0;
  auto prompt0 = ids_after(h.out, "prompt:", at);
  auto gen0 = ids_after(h.out, "gen:", at);
  auto prompt1 = ids_after(h.out, "prompt:", at);
  // The model has no chat template: the node renders Keel's default (ChatML), the first turn
  // after the system prompt, each later one after the conversation so far.
  auto tok = tokenizer_of(m);
  auto tmpl = keel::chat_template::parse(keel::default_chat_template);
  BOOST_REQUIRE(tmpl);
  std::vector<keel::turn_message> first{{"system", "Be brief."}, {"user", "Hello <|im_end|>"}};
  std::vector<keel::turn_message> second{{"user", "Again"}};
  auto want0 = keel::next_chat_turn(*tmpl, tok, {}, first, {});
  BOOST_REQUIRE_MESSAGE(want0, keel::test::why(want0));
  BOOST_CHECK(prompt0 == want0->tokens);
  std::vector<keel::chat_exchange> past{{first, gen0}};
  auto fed0 = want0->tokens;
  fed0.insert(fed0.end(), gen0.begin(), gen0.begin() + static_cast<ptrdiff_t>(keel::chat_fed_reply(tok, gen0)));
  auto want1 = keel::next_chat_turn(*tmpl, tok, past, second, fed0);
  BOOST_REQUIRE_MESSAGE(want1, keel::test::why(want1));
  BOOST_CHECK(prompt1 == want1->tokens);
  // --system is the first turn's: a session with turns takes none.
  auto late = sh("printf 'More\\n' | " + keel + " chat --connect " + address + " --session " + id +
                 " --system 'Other.'");
  BOOST_TEST(late.status != 0);
  BOOST_TEST(late.out.find("--system") != std::string::npos, late.out);
}

// ---- keel-model quantize ---------------------------------------------------------------------

namespace {

/// A llama model whose rows fill K-quant super-blocks (256 wide, feed-forward 512), in F16, with
/// four layers and four query heads per KV head.
std::string synth_for_quantize(const std::filesystem::path& dir) {
  auto m = (dir / "m.gguf").string();
  auto r = sh(bin("keel-model") + " synth -o " + m +
              " --dim 256 --layers 4 --heads 8 --kv-heads 2 --ffn 512 --ctx 128 --type f16");
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  return m;
}

bool has(const std::string& name, const char* part) {
  return name.find(part) != std::string::npos;
}

/// The type of every tensor of a GGUF file, by name.
std::vector<std::pair<std::string, std::string>> tensor_types(const std::string& path) {
  auto f = keel::gguf_file::open(path);
  BOOST_REQUIRE_MESSAGE(f, keel::test::why(f));
  std::vector<std::pair<std::string, std::string>> out;
  for (const auto& t : f->tensors())
    out.emplace_back(t.name, std::string(keel::dtype_name(t.type)));
  return out;
}

}  // namespace

BOOST_AUTO_TEST_CASE(quantize_converts_each_mix_with_llama_cpp_s_per_tensor_types) {
  // The rule (docs/engine.md, "Weight types") for this model: 4 layers, so use_more_bits picks
  // layers 2 and 3; 4 query heads per KV head. Norms stay F32; the output head takes Q6_K.
  keel::test::temp_dir dir("cli_quantize");
  const auto in = synth_for_quantize(dir.path);
  struct mix {
    const char* type;
    uint64_t file_type;  // llama.cpp's llama_ftype
    // The expected type of a tensor (name) in layer `layer` (-1 outside the layers).
    std::string (*expect)(const std::string& name, int layer);
  };
  const mix mixes[] = {
      {"q4_0", 2,
       [](const std::string& n, int) -> std::string {
         return n == "output.weight" ? "q6_k" : "q4_0";
       }},
      {"q8_0", 7, [](const std::string&, int) -> std::string { return "q8_0"; }},
      {"q2_k", 10,
       [](const std::string& n, int) -> std::string {
         if (n == "output.weight") return "q6_k";
         if (has(n, "attn_v")) return "q4_k";  // four query heads per KV head
         if (has(n, "ffn_down") || has(n, "attn_output")) return "q3_k";
         return "q2_k";
       }},
      {"q3_k_m", 12,
       [](const std::string& n, int layer) -> std::string {
         if (n == "output.weight") return "q6_k";
         if (has(n, "attn_v")) return layer < 2 ? "q5_k" : "q4_k";
         if (has(n, "ffn_down") || has(n, "attn_output")) return "q4_k";
         return "q3_k";
       }},
      {"q4_k_m", 15,
       [](const std::string& n, int layer) -> std::string {
         if (n == "output.weight") return "q6_k";
         if ((has(n, "attn_v") || has(n, "ffn_down")) && layer >= 2) return "q6_k";
         return "q4_k";
       }},
      {"q5_k_m", 17,
       [](const std::string& n, int layer) -> std::string {
         if (n == "output.weight") return "q6_k";
         if ((has(n, "attn_v") || has(n, "ffn_down")) && layer >= 2) return "q6_k";
         return "q5_k";
       }},
      {"q6_k", 18, [](const std::string&, int) -> std::string { return "q6_k"; }},
      {"f16", 1, [](const std::string&, int) -> std::string { return "f16"; }},
  };
  auto source = keel::gguf_file::open(in);
  BOOST_REQUIRE(source);
  for (const auto& m : mixes) {
    BOOST_TEST_CONTEXT(m.type) {
      const auto out = (dir.path / (std::string(m.type) + ".gguf")).string();
      auto r = sh(bin("keel-model") + " quantize " + in + " " + out + " --type " + m.type);
      BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
      // Progress names each tensor, its place and its conversion.
      BOOST_TEST(r.out.find("[ 3/39] blk.0.attn_q.weight") != std::string::npos, r.out);
      BOOST_TEST(r.out.find("f16 -> " + m.expect("blk.0.attn_q.weight", 0)) != std::string::npos);
      for (const auto& [name, type] : tensor_types(out)) {
        const bool one_d = name.find("norm") != std::string::npos;
        const int layer = name.rfind("blk.", 0) == 0 ? std::stoi(name.substr(4)) : -1;
        BOOST_TEST(type == (one_d ? std::string("f32") : m.expect(name, layer)), name);
      }
      // Metadata is copied; general.file_type says the mix.
      auto q = keel::gguf_file::open(out);
      BOOST_REQUIRE(q);
      BOOST_TEST(q->get_uint_or("general.file_type", 999) == m.file_type);
      for (const auto& kv : source->metadata()) {
        const auto* copy = q->find(kv.key);
        BOOST_REQUIRE_MESSAGE(copy, kv.key);
        BOOST_TEST((copy->type == kv.type && copy->s == kv.s && copy->u == kv.u &&
                    copy->strings == kv.strings && copy->ints == kv.ints),
                   kv.key);
      }
      // `keel-model info` reads it and lists its types.
      auto info = sh(bin("keel-model") + " info " + out);
      BOOST_REQUIRE_MESSAGE(info.status == 0, info.out);
      BOOST_TEST(info.out.find("layers        4") != std::string::npos);
      for (const auto& [name, type] : tensor_types(out))
        BOOST_TEST(info.out.find("  " + type + " ") != std::string::npos, type);
    }
  }
}

BOOST_AUTO_TEST_CASE(quantize_falls_back_to_32_blocks_for_narrow_rows_and_any_thread_count_agrees) {
  keel::test::temp_dir dir("cli_quantize_narrow");
  const auto in = (dir.path / "m.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + in + synth_args).status == 0);
  const auto a = (dir.path / "a.gguf").string(), b = (dir.path / "b.gguf").string();
  auto r = sh(bin("keel-model") + " quantize " + in + " " + a + " --type q4_k_m --threads 1");
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  BOOST_REQUIRE(
      sh(bin("keel-model") + " quantize " + in + " " + b + " --type q4_k_m --threads 2").status ==
      0);
  BOOST_TEST(slurp(a) == slurp(b));
  // Rows of 64 or 128 do not fill a super-block of 256: Q4_K becomes Q5_0, Q6_K becomes Q8_0.
  for (const auto& [name, type] : tensor_types(a)) {
    const bool one_d = name.find("norm") != std::string::npos;
    const bool more_bits = name == "output.weight" || name == "blk.1.attn_v.weight" ||
                           name == "blk.1.ffn_down.weight";  // layer 1 of 2: use_more_bits
    BOOST_TEST(type == (one_d ? "f32" : more_bits ? "q8_0" : "q5_0"), name);
  }
}

BOOST_AUTO_TEST_CASE(quantize_refuses_bad_input_naming_the_thing_and_the_value) {
  keel::test::temp_dir dir("cli_quantize_errors");
  const auto in = (dir.path / "m.gguf").string(), out = (dir.path / "out.gguf").string();
  BOOST_REQUIRE(sh(bin("keel-model") + " synth -o " + in + synth_args).status == 0);
  const auto q = bin("keel-model") + " quantize ";
  // An unknown mix is named, with the valid ones.
  auto r = sh(q + in + " " + out + " --type q9_k");
  BOOST_TEST(r.status == 2);
  BOOST_TEST(r.out.find("--type q9_k") != std::string::npos, r.out);
  BOOST_TEST(r.out.find("q4_k_m") != std::string::npos, r.out);
  r = sh(q + in + " " + out);
  BOOST_TEST(r.status == 2);
  BOOST_TEST(r.out.find("--type is required") != std::string::npos, r.out);
  // A source type it does not read (here a Q5_0 model) is named with the tensor.
  const auto q5 = (dir.path / "q5.gguf").string();
  BOOST_REQUIRE(sh(q + in + " " + q5 + " --type q5_0").status == 0);
  r = sh(q + q5 + " " + out + " --type q4_0");
  BOOST_TEST(r.status == 1);
  BOOST_TEST(r.out.find("tensor token_embd.weight has type q5_0") != std::string::npos, r.out);
  // A non-finite weight is refused with its place.
  keel::gguf_writer w;
  w.add_string("general.architecture", "llama");
  std::vector<float> values(64 * 2, 0.5f);
  values[64 + 7] = std::numeric_limits<float>::quiet_NaN();
  std::vector<uint8_t> bytes(values.size() * 4);
  std::memcpy(bytes.data(), values.data(), bytes.size());
  w.add_tensor("blk.0.attn_q.weight", {64, 2}, keel::dtype::f32, std::move(bytes));
  const auto nan = (dir.path / "nan.gguf").string();
  BOOST_REQUIRE(!w.write(nan));
  r = sh(q + nan + " " + out + " --type q8_0");
  BOOST_TEST(r.status == 1);
  BOOST_TEST(
      r.out.find("tensor blk.0.attn_q.weight has nan at row 1, column 7") != std::string::npos,
      r.out);
  BOOST_TEST(!std::filesystem::exists(out));
}
