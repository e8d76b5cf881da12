// keel: the command-line client. `keel generate --model FILE` runs a model in this process;
// `--connect HOST:PORT[,...]` sends the work to a keel-node instead (generate, chat, sessions,
// history).

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cerrno>
#include <iostream>
#include <memory>
#include <span>
#include <string>
#include <thread>

#include "apps/cli.hpp"
#include "kernels/chat_prompt.hpp"
#include "kernels/generate.hpp"
#include "kernels/model.hpp"
#include "kernels/tokenizer.hpp"
#include "wire/client.hpp"
#include "wire/tls.hpp"

#ifdef KEEL_HAVE_LIBEDIT
#include <editline/readline.h>
#endif

namespace {

using keel::cli::option;

// TLS, for nodes started with --tls-cert (docs/operations.md, "Security model").
constexpr option tls_ca_option = {"tls-ca", "FILE",
                                  "with --connect: TLS, trusting only this CA certificate (PEM)"};
constexpr option tls_name_option = {
    "tls-name", "NAME",
    "with --tls-ca: the name the node's certificate must carry (default: the address's host)"};

constexpr option generate_spec[] = {
    {"model", "FILE", "GGUF model or llama2.c checkpoint (this or --connect)"},
    {"connect", "HOST:PORT,...", "generate on the first keel-node that answers"},
    {"key-file", "FILE", "with --connect: the API key (first line; default: $KEEL_API_KEY)"},
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
    {"priority", "N", "with --connect: the session's priority, higher first (default 0)"},
    {"ids", nullptr, "print token ids: 'prompt: ...' then 'gen: ...'"},
    {"special", nullptr,
     "control-token text in --prompt (<|im_start|>, <s>...) is that token (default: plain "
     "text); with --model, generated control tokens are printed too (a node sends them "
     "without text)"},
    {"verbose", nullptr, "with --connect: print the session, its node and each failover to stderr"},
    tls_ca_option,
    tls_name_option,
};

constexpr option chat_spec[] = {
    {"connect", "HOST:PORT,...", "the keel-nodes to try, in order (required)"},
    {"key-file", "FILE", "the API key (first line; default: $KEEL_API_KEY)"},
    {"session", "ID", "continue this session instead of opening a new one"},
    {"system", "TEXT", "the system prompt: the first turn's system message"},
    {"max-tokens", "N", "most tokens per reply (default 256)"},
    {"temperature", "T", "0 for greedy (default 0)"},
    {"top-k", "K", "keep the K most likely tokens; 0 = off (default 0)"},
    {"top-p", "P", "nucleus sampling threshold in (0, 1] (default 1)"},
    {"min-p", "P", "drop tokens below P times the best one's probability (default 0)"},
    {"repeat-penalty", "R", "repetition penalty, 1 = off (default 1)"},
    {"seed", "S", "sampling seed (default 0)"},
    {"priority", "N", "the session's priority, higher first (default 0)"},
    tls_ca_option,
    tls_name_option,
};

constexpr option connect_spec[] = {
    {"connect", "HOST:PORT,...", "the keel-nodes to try, in order (required)"},
    tls_ca_option,
    tls_name_option,
    {"key-file", "FILE", "the API key (first line; default: $KEEL_API_KEY)"},
};

const char* top_help =
    "usage: keel COMMAND [OPTIONS]\n\n"
    "Keel's client.\n\n"
    "commands:\n"
    "  generate --model FILE --prompt TEXT [...]   generate a continuation in this process\n"
    "  generate --connect HOST:PORT --prompt TEXT  the same, on a keel-node\n"
    "  chat --connect HOST:PORT [...]              talk with a model on a keel-node\n"
    "  sessions --connect HOST:PORT                list a node's sessions\n"
    "  history --connect HOST:PORT SESSION         show a session's turns\n"
    "  template --model FILE --messages FILE.json  print a conversation as the model's chat\n"
    "                                              template renders it\n\n"
    "Run 'keel COMMAND --help' for a command's options.\n";

int fail(const caf::error& err) {
  return keel::cli::fail("keel", err);
}

/// The sampling options and --max-tokens shared by generate and chat, checked.
caf::expected<keel::generation_request> read_sampling(const keel::cli::options& opts,
                                                      int64_t default_max_tokens) {
  keel::generation_request req;
  auto max_tokens = opts.get_int("max-tokens", default_max_tokens, 1, 1 << 20);
  auto temperature = opts.get_real("temperature", 0.0, 0.0, 100.0);
  auto top_k = opts.get_int("top-k", 0, 0, 1 << 24);
  auto top_p = opts.get_real("top-p", 1.0, 0.0, 1.0);
  auto min_p = opts.get_real("min-p", 0.0, 0.0, 1.0);
  auto rep = opts.get_real("repeat-penalty", 1.0, 0.0, 100.0);
  auto seed = opts.get_int("seed", 0, 0, INT64_MAX);
  if (!max_tokens) return max_tokens.error();
  if (!top_k) return top_k.error();
  if (!seed) return seed.error();
  if (!temperature) return temperature.error();
  if (!top_p) return top_p.error();
  if (!min_p) return min_p.error();
  if (!rep) return rep.error();
  req.max_tokens = static_cast<int32_t>(*max_tokens);
  req.params.temperature = static_cast<float>(*temperature);
  req.params.top_k = static_cast<int32_t>(*top_k);
  req.params.top_p = static_cast<float>(*top_p);
  req.params.min_p = static_cast<float>(*min_p);
  req.params.repetition_penalty = static_cast<float>(*rep);
  req.params.seed = static_cast<uint64_t>(*seed);
  if (auto err = keel::validate(req.params)) return err;
  return req;
}

/// The client connected to the first node of --connect that answers.
caf::expected<std::unique_ptr<keel::wire::client>> connect(
    const keel::cli::options& opts, const char* command,
    keel::wire::client::options copts = keel::wire::client::options{}) {
  if (!opts.has("connect"))
    return keel::make_error(
        keel::errc::bad_request,
        std::string(command) + ": --connect HOST:PORT[,HOST:PORT...] is required");
  auto endpoints = keel::wire::parse_endpoints(opts.get("connect"));
  if (!endpoints) return endpoints.error();
  if (opts.has("tls-ca")) {
    auto tls = keel::wire::tls_config::load({"", "", opts.get("tls-ca")});
    if (!tls) return tls.error();
    copts.tls = std::move(*tls);
    copts.tls_name = opts.get("tls-name");
  } else if (opts.has("tls-name")) {
    return keel::make_error(keel::errc::bad_request, "--tls-name needs --tls-ca FILE");
  }
  // Never a key on the command line: other users see it in the process list.
  auto key = keel::wire::key_from(opts.get("key-file"));
  if (!key) return key.error();
  copts.api_key = std::move(*key);
  return keel::wire::client::connect(*endpoints, std::move(copts));
}

caf::expected<int32_t> read_priority(const keel::cli::options& opts) {
  auto p = opts.get_int("priority", 0, INT32_MIN, INT32_MAX);
  if (!p) return p.error();
  return static_cast<int32_t>(*p);
}

void print_ids(const char* label, const std::vector<int32_t>& ids) {
  std::string line = label;
  for (auto id : ids) {
    line += ' ';
    line += std::to_string(id);
  }
  std::printf("%s\n", line.c_str());
}

/// `keel generate --connect`: the same output as the local command, from a node.
int generate_remote(const keel::cli::options& opts, const keel::generation_request& req) {
  for (const char* local_only : {"model", "tokenizer", "threads", "kv-bytes"})
    if (opts.has(local_only))
      return fail(keel::make_error(keel::errc::bad_request,
                                   std::string("generate: --") + local_only +
                                       " applies to local generation, not with --connect"));
  auto priority = read_priority(opts);
  if (!priority) return fail(priority.error());
  const bool verbose = opts.has("verbose");
  keel::wire::client::options copts;
  if (verbose)
    copts.on_failover = [](const keel::wire::failover_event& ev) {
      std::fprintf(stderr,
                   "keel: failover of session %s turn %llu from %s to node %s (through %s) in %lld ms "
                   "(resuming at index %llu)\n",
                   ev.session.c_str(), static_cast<unsigned long long>(ev.turn), ev.from.c_str(),
                   ev.to_node.c_str(), ev.to.c_str(), static_cast<long long>(ev.duration.count()),
                   static_cast<unsigned long long>(ev.from_index));
    };
  auto c = connect(opts, "generate", std::move(copts));
  if (!c) return fail(c.error());
  auto session = (*c)->open_session(req.params, *priority);
  if (!session) return fail(session.error());
  if (verbose) {
    // The node that serves it may not be the one reached (placement on a node with room).
    auto info = (*c)->info();
    auto s = (*c)->session(*session);
    std::string owner = s && !s->owner.empty() ? s->owner : info ? info->name : "?";
    std::string context;
    if (s && s->context_length > 0) {
      context = ", context " + std::to_string(s->context_length);
      if (info && s->context_length < info->context_length) context += " (shortened under load)";
    }
    std::fprintf(stderr, "keel: session %s on node %s through %s at %s, model %s (digest %s)%s\n",
                 session->c_str(), owner.c_str(), info ? info->name.c_str() : "?",
                 (*c)->endpoint().c_str(), s ? s->model.c_str() : "?",
                 s && !s->model_digest.empty() ? s->model_digest.c_str() : "none",
                 context.c_str());
  }
  const bool ids = opts.has("ids");
  bool accepted = false;
  auto on_accept = [&](uint64_t, const std::vector<int32_t>& prompt) {
    accepted = true;
    if (!ids) return;
    std::string line = "prompt:";
    for (auto id : prompt) {
      line += ' ';
      line += std::to_string(id);
    }
    std::printf("%s\ngen:", line.c_str());
    std::fflush(stdout);
  };
  auto on_token = [&](uint64_t, uint64_t, int32_t id, std::string_view piece) {
    if (ids)
      std::printf(" %d", id);
    else
      std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
  };
  // Turn 0 of the session just opened: a send whose answer is lost is sent again safely.
  auto result = (*c)->generate(*session, opts.get("prompt"), static_cast<uint32_t>(req.max_tokens),
                               on_token, on_accept, uint64_t{0}, opts.has("special"));
  if (accepted) std::fputs("\n", stdout);
  std::fflush(stdout);
  if (!result) return fail(result.error());
  return 0;
}

int generate(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel generate (--model FILE | --connect HOST:PORT[,...]) --prompt TEXT [OPTIONS]",
        "Streams the continuation of TEXT to stdout, computed in this process (--model) or on "
        "the first keel-node of --connect that answers. The same model, prompt, seed and "
        "options always give the same tokens, locally or through a node.",
        generate_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, generate_spec);
  if (!opts) return fail(opts.error());
  if (opts->has("model") && opts->has("connect"))
    return fail(keel::make_error(keel::errc::bad_request,
                                 "generate: give --model FILE or --connect HOST:PORT, not both"));
  if (!opts->has("model") && !opts->has("connect"))
    return fail(keel::make_error(keel::errc::bad_request,
                                 "generate: --model FILE (or --connect HOST:PORT) is required"));
  if (!opts->has("prompt"))
    return fail(keel::make_error(keel::errc::bad_request, "generate: --prompt TEXT is required"));
  auto sampled = read_sampling(*opts, 64);
  if (!sampled) return fail(sampled.error());
  auto req = std::move(*sampled);
  if (opts->has("connect")) return generate_remote(*opts, req);
  if (opts->has("priority"))
    return fail(keel::make_error(keel::errc::bad_request,
                                 "generate: --priority applies only with --connect"));
  auto threads =
      opts->get_int("threads", std::max(1u, std::thread::hardware_concurrency()), 1, 1024);
  if (!threads) return fail(threads.error());

  auto m = keel::model::load(opts->get("model"), opts->get("tokenizer"));
  if (!m) return fail(m.error());
  const auto& model = **m;
  keel::tokenizer tok(model.vocabulary());
  const auto special = opts->has("special") ? keel::special_tokens::on : keel::special_tokens::off;
  req.prompt = tok.encode(opts->get("prompt"), model.vocabulary().add_bos, special);
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
  keel::detokenizer detok(tok, false, special);  // generated text continues the prompt
  if (ids) {
    std::string line = "prompt:";
    for (auto id : req.prompt) {
      line += ' ';
      line += std::to_string(id);
    }
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

/// Reads one line of user input: with line editing and history on a terminal, plain otherwise.
class line_reader {
 public:
  line_reader() : edit_(isatty(STDIN_FILENO) == 1) {}

  bool interactive() const { return edit_; }

  /// False at end of input.
  bool read(const char* prompt, std::string& line) {
#ifdef KEEL_HAVE_LIBEDIT
    if (edit_) {
      char* raw = readline(prompt);
      if (raw == nullptr) return false;
      line = raw;
      std::free(raw);
      if (!line.empty()) add_history(line.c_str());
      return true;
    }
#endif
    if (edit_) {
      std::fputs(prompt, stdout);
      std::fflush(stdout);
    }
    return static_cast<bool>(std::getline(std::cin, line));
  }

 private:
  bool edit_;
};

void print_history(const std::vector<keel::wire::turn_record>& turns) {
  for (const auto& t : turns) {
    std::printf("turn %llu (%s, %zu + %zu tokens)\n", static_cast<unsigned long long>(t.turn),
                t.done ? keel::to_string(t.reason) : "running", t.prompt.size(),
                t.generated.size());
    print_ids("prompt:", t.prompt);
    print_ids("gen:", t.generated);
  }
}

/// While a reply streams, Ctrl-C cancels it instead of ending the program. A thread takes SIGINT
/// with sigwait, so no work happens in a signal handler.
class interrupt_to_cancel {
 public:
  explicit interrupt_to_cancel(keel::wire::client& c) : client_(c) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    pthread_sigmask(SIG_BLOCK, &set, nullptr);
    std::thread([this, set] {
      int sig = 0;
      while (sigwait(&set, &sig) == 0) {
        if (!streaming_.load()) std::_Exit(130);  // at the prompt: Ctrl-C quits, as usual
        client_.request_cancel();
      }
    }).detach();
  }
  void streaming(bool on) { streaming_.store(on); }

 private:
  keel::wire::client& client_;  // outlives this object: main's frame holds both
  std::atomic<bool> streaming_{false};
};

int chat(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel chat --connect HOST:PORT[,...] [OPTIONS]",
        "Talks with the model of a keel-node: each line read from stdin is a user message, "
        "which the node renders with the model's chat template (the first turn after the "
        "--system prompt), and the reply streams to stdout. Commands: /history shows the "
        "session's turns, /quit (or end of input) leaves. Ctrl-C stops a reply.",
        chat_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, chat_spec);
  if (!opts) return fail(opts.error());
  auto sampled = read_sampling(*opts, 256);
  if (!sampled) return fail(sampled.error());
  auto priority = read_priority(*opts);
  if (!priority) return fail(priority.error());
  auto c = connect(*opts, "chat");
  if (!c) return fail(c.error());
  auto& cl = **c;
  std::string session = opts->get("session");
  uint64_t next_turn = 0;  // each turn is sent with its number, so sending again is safe
  if (session.empty()) {
    auto s = cl.open_session(sampled->params, *priority);
    if (!s) return fail(s.error());
    session = *s;
  } else if (auto h = cl.history(session); !h) {
    return fail(h.error());
  } else {
    next_turn = h->size();
  }
  const bool system = opts->has("system");
  if (system && next_turn > 0)
    return fail(keel::make_error(keel::errc::bad_request,
                                 "chat: --system gives a new session's system prompt; session " +
                                     session + " has " + std::to_string(next_turn) +
                                     " turn(s) already"));
  line_reader input;
  std::unique_ptr<interrupt_to_cancel> interrupts;
  if (input.interactive()) {
    interrupts = std::make_unique<interrupt_to_cancel>(cl);
    std::fprintf(stderr, "keel: session %s on %s; /history, /quit\n", session.c_str(),
                 cl.endpoint().c_str());
  }
  std::string line;
  while (input.read("> ", line)) {
    auto first = line.find_first_not_of(" \t\r");
    if (first == std::string::npos) continue;
    line = line.substr(first, line.find_last_not_of(" \t\r") - first + 1);
    if (line == "/quit" || line == "/exit") break;
    if (line == "/history") {
      auto h = cl.history(session);
      if (!h) return fail(h.error());
      print_history(*h);
      continue;
    }
    if (line[0] == '/') {
      std::fprintf(stderr, "keel: unknown command %s (try /history or /quit)\n", line.c_str());
      continue;
    }
    if (interrupts) interrupts->streaming(true);
    std::vector<keel::turn_message> messages;
    if (system && next_turn == 0) messages.push_back({"system", opts->get("system")});
    messages.push_back({"user", line});
    auto reply = cl.chat(session, messages, static_cast<uint32_t>(sampled->max_tokens),
                         [](uint64_t, uint64_t, int32_t, std::string_view piece) {
                           std::fwrite(piece.data(), 1, piece.size(), stdout);
                           std::fflush(stdout);
                         },
                         {}, next_turn);
    if (reply) next_turn = reply->turn + 1;
    if (interrupts) interrupts->streaming(false);
    std::fputs("\n", stdout);
    std::fflush(stdout);
    if (!reply) {
      auto code = keel::code_of(reply.error());
      // A refused turn leaves the session usable; a lost node does not.
      if (code == keel::errc::disconnected || code == keel::errc::failed)
        return fail(reply.error());
      std::fprintf(stderr, "keel: %s\n", keel::describe(reply.error()).c_str());
    } else if (reply->reason == keel::wire::finish_reason::cancelled) {
      std::fprintf(stderr, "keel: [reply cancelled]\n");
    } else if (reply->reason == keel::wire::finish_reason::context) {
      std::fprintf(stderr, "keel: [the context is full]\n");
    }
  }
  return 0;
}

int sessions(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text("keel sessions --connect HOST:PORT[,...]",
                                      "Lists the sessions of the first keel-node that answers: "
                                      "id, turns, tokens, and whether a turn is running.",
                                      connect_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, connect_spec);
  if (!opts) return fail(opts.error());
  auto c = connect(*opts, "sessions");
  if (!c) return fail(c.error());
  auto list = (*c)->sessions();
  if (!list) return fail(list.error());
  size_t width = 2;
  for (const auto& s : *list) width = std::max(width, s.id.size());
  std::printf("%-*s %6s %8s %8s %s\n", static_cast<int>(width), "ID", "TURNS", "TOKENS", "PRIORITY",
              "RUNNING");
  for (const auto& s : *list)
    std::printf("%-*s %6u %8llu %8d %s\n", static_cast<int>(width), s.id.c_str(), s.turns,
                static_cast<unsigned long long>(s.tokens), s.priority, s.running ? "yes" : "no");
  return 0;
}

int history(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel history --connect HOST:PORT[,...] SESSION",
        "Prints every turn of SESSION: its number, how it ended, and the prompt and generated "
        "token ids ('prompt: ...' then 'gen: ...').",
        connect_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, connect_spec, 1);
  if (!opts) return fail(opts.error());
  if (opts->positional().size() != 1)
    return fail(keel::make_error(keel::errc::bad_request, "history: SESSION is required"));
  auto c = connect(*opts, "history");
  if (!c) return fail(c.error());
  auto turns = (*c)->history(opts->positional()[0]);
  if (!turns) return fail(turns.error());
  print_history(*turns);
  return 0;
}

constexpr option template_spec[] = {
    {"model", "FILE", "the GGUF model (or vocabulary) whose tokenizer.chat_template renders"},
    {"messages", "FILE.json", "the conversation: an array of {\"role\", \"content\"} objects"},
    {"chat-template", "FILE", "render this Jinja template instead of the model's"},
    {"no-generation-prompt", nullptr, "end after the last message (no assistant header)"},
};

/// A whole file, or an error naming the option and the path.
caf::expected<std::string> read_whole(const std::string& flag, const std::string& path) {
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (f == nullptr)
    return keel::make_error(keel::errc::bad_request,
                            "--" + flag + " " + path + ": " + std::strerror(errno));
  std::string out;
  char buf[65536];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) out.append(buf, n);
  bool bad = std::ferror(f) != 0;
  std::fclose(f);
  if (bad) return keel::make_error(keel::errc::failed, "--" + flag + " " + path + ": read error");
  return out;
}

int print_template(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel template --model FILE --messages FILE.json [OPTIONS]",
        "Prints the prompt a conversation becomes under the model's chat template "
        "(tokenizer.chat_template; Keel's default, ChatML, for a model without one), exactly: "
        "nothing is added after the rendering. bos_token and eos_token are the model's.",
        template_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, template_spec);
  if (!opts) return fail(opts.error());
  for (const char* required : {"model", "messages"})
    if (!opts->has(required))
      return fail(keel::make_error(keel::errc::bad_request,
                                   std::string("template: --") + required + " is required"));
  auto file = keel::gguf_file::open(opts->get("model"));
  if (!file) return fail(file.error());
  auto v = keel::vocab_from_gguf(*file);
  if (!v) return fail(v.error());
  std::string text;
  if (opts->has("chat-template")) {
    auto t = read_whole("chat-template", opts->get("chat-template"));
    if (!t) return fail(t.error());
    text = std::move(*t);
  } else {
    auto t = keel::chat_template_of(*file);
    if (!t) return fail(t.error());
    text = std::move(t->text);
  }
  auto tmpl = keel::chat_template::parse(std::move(text));
  if (!tmpl) return fail(tmpl.error());
  auto json = read_whole("messages", opts->get("messages"));
  if (!json) return fail(json.error());
  auto messages = keel::chat_messages_from_json(*json, opts->get("messages"));
  if (!messages) return fail(messages.error());
  auto prompt = tmpl->render_chat(*messages, !opts->has("no-generation-prompt"),
                                  keel::special_token_text(*v, v->bos),
                                  keel::special_token_text(*v, v->eos));
  if (!prompt) return fail(prompt.error());
  std::fwrite(prompt->data(), 1, prompt->size(), stdout);
  return std::fflush(stdout) == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  constexpr keel::cli::command commands[] = {{"generate", generate},
                                             {"chat", chat},
                                             {"sessions", sessions},
                                             {"history", history},
                                             {"template", print_template}};
  return keel::cli::dispatch(argc, argv, "keel", top_help, commands);
}
