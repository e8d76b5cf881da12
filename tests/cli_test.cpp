#define BOOST_TEST_MODULE cli_test
#include <boost/test/unit_test.hpp>

#include <sys/wait.h>

#include <cstdio>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

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
  auto report = (dir.path / "engine.md").string();
  auto r = sh(bin("keel-bench") + " engine --model " + m +
              " --threads 1 --steps 4 --prompt 16 --out " + report);
  BOOST_REQUIRE_MESSAGE(r.status == 0, r.out);
  auto text = slurp(report);
  BOOST_TEST(text.find("decode, batch 16") != std::string::npos);
  BOOST_TEST(text.find("roofline") != std::string::npos);
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
