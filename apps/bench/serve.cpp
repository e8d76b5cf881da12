// keel-bench serve: clients over the wire (keel-node, Cap'n Proto) against the same node in
// process.

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <latch>
#include <map>
#include <mutex>
#include <random>
#include <span>
#include <sstream>
#include <string>
#include <thread>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/node.hpp"
#include "apps/cli.hpp"
#include "kernels/engine.hpp"
#include "kernels/generate.hpp"
#include "kernels/model.hpp"
#include "kernels/ops.hpp"
#include "wire/client.hpp"

#include <nlohmann/json.hpp>

#include "apps/bench/common.hpp"
#include "apps/bench/process.hpp"

namespace keel::bench {

namespace {

constexpr option serve_spec[] = {
    {"connect", "HOST:PORT",
     "keel-node to measure (default: start keel-node from this binary's directory on "
     "127.0.0.1:0 with --model, --threads and --kv-bytes, and stop it with SIGTERM at the end)"},
    {"model", "FILE",
     "the node's model, for the in-process comparison (required without --connect; with "
     "--connect but without --model only the wire is measured)"},
    {"threads", "N",
     "CPU threads of the node's one shard, for the node started here and the in-process node "
     "(default 1, keel-node's default). With --connect, pass the remote node's --threads: the "
     "comparison is fair only when both nodes have the same settings"},
    {"kv-bytes", "B",
     "KV budget of the node started here and of the in-process node (default 256M, keel-node's "
     "default)"},
    {"http", "HOST:PORT",
     "with --connect: the node's HTTP port (--http-listen), to measure the OpenAI-style API too "
     "(the node started here always has one)"},
    {"clients", "N", "concurrent clients (default: 1, 4 and 16 in turn)"},
    {"turns", "N", "turns of each client's session, one after another (default 4)"},
    {"tokens", "N", "max tokens of each turn (default 64)"},
    {"reps", "N",
     "runs of each client count, the paths alternating; the best tokens/s counts, latencies "
     "pool every run (default 3)"},
    {"out", "FILE", "also write the report (Markdown) to FILE, e.g. bench/serve.md"},
};

/// One benchmark client's session. run_turn sends a turn and blocks until it ends, appending
/// each token and its arrival time. Created, used and destroyed on its client's thread.
class turn_runner {
 public:
  virtual ~turn_runner() = default;
  virtual caf::error run_turn(const std::string& text, int32_t max_tokens,
                              std::vector<int32_t>& ids,
                              std::vector<clock_type::time_point>& times) = 0;
};

/// A session over the wire: its own wire::client (its own connection and KJ event loop).
class wire_runner final : public turn_runner {
 public:
  static caf::expected<std::unique_ptr<turn_runner>> open(const std::string& endpoint,
                                                          uint64_t seed) {
    auto c = keel::wire::client::connect({endpoint});
    if (!c) return std::move(c.error());
    auto id = (*c)->open_session(bench_params(seed));
    if (!id) return std::move(id.error());
    return std::unique_ptr<turn_runner>(new wire_runner(std::move(*c), std::move(*id)));
  }

  caf::error run_turn(const std::string& text, int32_t max_tokens, std::vector<int32_t>& ids,
                      std::vector<clock_type::time_point>& times) override {
    auto g = client_->generate(session_, text, static_cast<uint32_t>(max_tokens),
                               [&](uint64_t, uint64_t, int32_t id, std::string_view) {
                                 times.push_back(clock_type::now());
                                 ids.push_back(id);
                               });
    if (!g) return std::move(g.error());
    return {};
  }

 private:
  wire_runner(std::unique_ptr<keel::wire::client> c, std::string session)
      : client_(std::move(c)), session_(std::move(session)) {}

  std::unique_ptr<keel::wire::client> client_;
  std::string session_;
};

/// A session over the HTTP port: POST /v1/completions with "stream": true on one kept-alive
/// HTTP/1.1 connection (a blocking socket, as a simple HTTP client has), the first turn opening
/// the session and the next ones continuing it with Keel-Session. Tokens are counted from the
/// answer's usage; each event's arrival is timestamped (an event is one token, or a few when a
/// character spans tokens), and ids are not known over HTTP: they are left -1.
class http_runner final : public turn_runner {
 public:
  static caf::expected<std::unique_ptr<turn_runner>> open(const std::string& endpoint,
                                                          uint64_t seed) {
    auto colon = endpoint.rfind(':');
    int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(static_cast<uint16_t>(std::stoi(endpoint.substr(colon + 1))));
    if (colon == std::string::npos || fd < 0 ||
        ::inet_pton(AF_INET, endpoint.substr(0, colon).c_str(), &a.sin_addr) != 1 ||
        ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      if (fd >= 0) ::close(fd);
      return keel::make_error(keel::errc::disconnected,
                              "serve: no HTTP port at " + endpoint + ": " + std::strerror(errno));
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    return std::unique_ptr<turn_runner>(new http_runner(fd, seed));
  }

  ~http_runner() override { ::close(fd_); }

  caf::error run_turn(const std::string& text, int32_t max_tokens, std::vector<int32_t>& ids,
                      std::vector<clock_type::time_point>& times) override {
    auto p = bench_params(seed_);
    nlohmann::json body = {{"prompt", text},
                           {"max_tokens", max_tokens},
                           {"temperature", p.temperature},
                           {"top_k", p.top_k},
                           {"seed", p.seed},
                           {"stream", true},
                           {"stream_options", {{"include_usage", true}}}};
    auto b = body.dump();
    std::string req = "POST /v1/completions HTTP/1.1\r\nHost: keel\r\nContent-Type: "
                      "application/json\r\nContent-Length: " +
                      std::to_string(b.size()) + "\r\n";
    if (!session_.empty()) req += "Keel-Session: " + session_ + "\r\n";
    req += "\r\n" + b;
    if (::send(fd_, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size()))
      return keel::make_error(keel::errc::disconnected, "serve: HTTP send failed");
    // The head.
    std::string head;
    if (!read_until("\r\n\r\n", head)) return broken("the answer's head");
    if (head.rfind("HTTP/1.1 200", 0) != 0)
      return keel::make_error(keel::errc::failed, "serve: HTTP answered " + head.substr(0, 200));
    if (auto at = head.find("Keel-Session: "); at != std::string::npos)
      session_ = head.substr(at + 14, head.find("\r\n", at) - at - 14);
    // The chunked body, as server-sent events.
    std::string events;
    int64_t tokens = -1;
    for (;;) {
      std::string size_line;
      if (!read_until("\r\n", size_line)) return broken("a chunk's size");
      auto size = std::stoul(size_line, nullptr, 16);
      std::string chunk;
      if (!read_exactly(size + 2, chunk)) return broken("a chunk");
      if (size == 0) break;
      events.append(chunk, 0, size);
      for (auto end = events.find("\n\n"); end != std::string::npos; end = events.find("\n\n")) {
        auto ev = events.substr(0, end);
        events.erase(0, end + 2);
        auto data = ev.find("data: ");
        if (data == std::string::npos) continue;
        auto json = ev.substr(data + 6);
        if (json == "[DONE]") continue;
        auto j = nlohmann::json::parse(json, nullptr, false);
        if (j.is_discarded() || j.contains("error"))
          return keel::make_error(keel::errc::failed, "serve: HTTP event " + json.substr(0, 200));
        if (j.contains("usage") && j["usage"].is_object())
          tokens = j["usage"]["completion_tokens"].get<int64_t>();
        if (!j["choices"].empty() && !j["choices"][0]["text"].get<std::string>().empty())
          times.push_back(clock_type::now());
      }
    }
    if (tokens < 0) return keel::make_error(keel::errc::failed, "serve: no usage in the answer");
    ids.insert(ids.end(), static_cast<size_t>(tokens), -1);
    return {};
  }

 private:
  http_runner(int fd, uint64_t seed) : fd_(fd), seed_(seed) {}

  caf::error broken(const char* what) {
    return keel::make_error(keel::errc::disconnected,
                            std::string("serve: the HTTP connection ended in ") + what);
  }

  bool fill() {
    char tmp[16384];
    auto n = ::recv(fd_, tmp, sizeof tmp, 0);
    if (n <= 0) return false;
    buf_.append(tmp, static_cast<size_t>(n));
    return true;
  }

  /// Takes what comes before `sep` (and `sep`) from the connection into `out` (without `sep`).
  bool read_until(const char* sep, std::string& out) {
    for (size_t at; (at = buf_.find(sep)) == std::string::npos;)
      if (!fill()) return false;
    auto at = buf_.find(sep);
    out = buf_.substr(0, at);
    buf_.erase(0, at + std::strlen(sep));
    return true;
  }

  bool read_exactly(size_t n, std::string& out) {
    while (buf_.size() < n)
      if (!fill()) return false;
    out = buf_.substr(0, n);
    buf_.erase(0, n);
    return true;
  }

  int fd_;
  uint64_t seed_;
  std::string session_;
  std::string buf_;
};

/// What the sink of an in-process session saw of the current turn.
struct turn_log {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<int32_t> ids;
  std::vector<clock_type::time_point> times;
  bool done = false;
  std::string failure;  // set when the turn ended failed or overloaded
};

caf::behavior turn_sink(caf::event_based_actor*, std::shared_ptr<turn_log> log) {
  return {
      [log](keel::token_atom, const std::string&, uint64_t, int64_t, int32_t tok,
            const std::string&) {
        auto now = clock_type::now();
        std::lock_guard<std::mutex> guard(log->mu);
        log->times.push_back(now);
        log->ids.push_back(tok);
      },
      [log](keel::done_atom, const std::string& s, uint64_t, keel::finish_reason why,
            const std::string& detail, int64_t) {
        std::lock_guard<std::mutex> guard(log->mu);
        if (why == keel::finish_reason::failed || why == keel::finish_reason::overloaded)
          log->failure = "serve: session " + s + ": turn " + keel::to_string(why) + ": " + detail;
        log->done = true;
        log->cv.notify_all();
      },
  };
}

/// A session of a node in this process, driven like a wire client: a scoped actor sends the
/// turn, a sink actor of its own timestamps the tokens as they arrive.
class local_runner final : public turn_runner {
 public:
  static caf::expected<std::unique_ptr<turn_runner>> open(caf::actor_system& sys, keel::node& nd,
                                                          uint64_t seed) {
    auto id = nd.open_session(bench_params(seed));
    if (!id) return std::move(id.error());
    auto h = nd.session(*id);
    if (!h) return keel::make_error(keel::errc::disconnected, "serve: session " + *id + " is down");
    return std::unique_ptr<turn_runner>(new local_runner(sys, std::move(h)));
  }

  ~local_runner() override { caf::anon_send_exit(sink_, caf::exit_reason::user_shutdown); }

  caf::error run_turn(const std::string& text, int32_t max_tokens, std::vector<int32_t>& ids,
                      std::vector<clock_type::time_point>& times) override {
    {
      std::lock_guard<std::mutex> guard(log_->mu);
      log_->ids.clear();
      log_->times.clear();
      log_->done = false;
      log_->failure.clear();
    }
    caf::error failure;
    (*self_)
        ->request(session_, std::chrono::seconds(10), keel::send_atom::value, text, max_tokens,
                  caf::actor_cast<keel::turn_sink_actor>(sink_))
        .receive([](uint64_t) {}, [&failure](caf::error& e) { failure = std::move(e); });
    if (failure) return failure;
    std::unique_lock<std::mutex> lock(log_->mu);
    if (!log_->cv.wait_for(lock, std::chrono::seconds(600), [this] { return log_->done; }))
      return keel::make_error(keel::errc::failed, "serve: a turn did not end within 600 s");
    if (!log_->failure.empty()) return keel::make_error(keel::errc::failed, log_->failure);
    ids.insert(ids.end(), log_->ids.begin(), log_->ids.end());
    times.insert(times.end(), log_->times.begin(), log_->times.end());
    return {};
  }

 private:
  local_runner(caf::actor_system& sys, keel::session_actor session)
      : self_(std::make_unique<caf::scoped_actor>(sys)),
        session_(std::move(session)),
        log_(std::make_shared<turn_log>()),
        sink_(sys.spawn(turn_sink, log_)) {}

  std::unique_ptr<caf::scoped_actor> self_;
  keel::session_actor session_;
  std::shared_ptr<turn_log> log_;
  caf::actor sink_;
};

/// Opens client `i`'s session (on that client's thread).
using runner_factory = std::function<caf::expected<std::unique_ptr<turn_runner>>(int32_t)>;

/// Figures of one run of `n` clients.
struct serve_figures {
  std::vector<double> ttft_ms;  // per turn: from the send to the first token's arrival
  std::vector<std::vector<double>> ttft_by_client;  // the same, by client, in turn order
  std::vector<double> itl_ms;                       // between consecutive tokens of a turn
  int64_t tokens = 0;
  int64_t turns = 0;
  double seconds = 0;  // from the start (every session open) to the end of the last turn
  std::vector<std::vector<int32_t>> transcripts;  // by client: every turn's tokens
  double tps() const { return seconds > 0 ? static_cast<double>(tokens) / seconds : 0.0; }
};

/// The first three fields of /proc/loadavg.
std::string load_average() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return a.empty() ? "unknown" : a + " " + b + " " + c;
}

double ms_between(clock_type::time_point a, clock_type::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

/// Runs `n` clients, each on a thread of its own: opens its session, waits until every client
/// is ready, then runs `turns` turns one after another (client i's turn k sends prompt i + k).
caf::expected<serve_figures> run_clients(int32_t n, int32_t turns, int32_t max_tokens,
                                         const runner_factory& open) {
  struct per_client {
    std::vector<double> ttft_ms, itl_ms;
    std::vector<int32_t> tokens;
    int64_t turns = 0;
    clock_type::time_point end{};
    caf::error failure;
  };
  std::vector<per_client> per(static_cast<size_t>(n));
  std::latch ready(n), go(1);
  std::vector<std::thread> threads;
  for (int32_t i = 0; i < n; ++i) {
    threads.emplace_back([&, i] {
      auto& me = per[static_cast<size_t>(i)];
      auto runner = open(i);
      ready.count_down();
      go.wait();
      if (!runner) {
        me.failure = std::move(runner.error());
        return;
      }
      std::vector<int32_t> ids;
      std::vector<clock_type::time_point> times;
      for (int32_t k = 0; k < turns; ++k) {
        ids.clear();
        times.clear();
        auto sent = clock_type::now();
        if (auto err =
                (*runner)->run_turn(bench_prompts[(i + k) % n_prompts], max_tokens, ids, times)) {
          me.failure = std::move(err);
          return;
        }
        if (!times.empty()) me.ttft_ms.push_back(ms_between(sent, times.front()));
        for (size_t j = 1; j < times.size(); ++j)
          me.itl_ms.push_back(ms_between(times[j - 1], times[j]));
        me.tokens.insert(me.tokens.end(), ids.begin(), ids.end());
        ++me.turns;
      }
      me.end = clock_type::now();
    });
  }
  ready.wait();
  auto start = clock_type::now();
  go.count_down();
  for (auto& t : threads) t.join();
  serve_figures f;
  clock_type::time_point end = start;
  for (auto& c : per) {
    if (c.failure) return std::move(c.failure);
    f.ttft_ms.insert(f.ttft_ms.end(), c.ttft_ms.begin(), c.ttft_ms.end());
    f.ttft_by_client.push_back(c.ttft_ms);
    f.itl_ms.insert(f.itl_ms.end(), c.itl_ms.begin(), c.itl_ms.end());
    f.tokens += static_cast<int64_t>(c.tokens.size());
    f.turns += c.turns;
    f.transcripts.push_back(std::move(c.tokens));
    end = std::max(end, c.end);
  }
  f.seconds = std::chrono::duration<double>(end - start).count();
  return f;
}

/// What differs between the node's NodeInfo and the local model file; empty when nothing does.
/// The file counts as the same when the node's path names it on this machine, or (a remote node)
/// names a file of the same name.
std::string model_mismatch(const keel::wire::node_info& info, const keel::model& m) {
  std::string out;
  auto add = [&out](const std::string& s) { out += (out.empty() ? "" : "; ") + s; };
  const auto& c = m.config();
  namespace fs = std::filesystem;
  std::error_code ec;
  if (!fs::equivalent(info.model, m.path(), ec) &&
      fs::path(info.model).filename() != fs::path(m.path()).filename())
    add("the node serves " + info.model + ", --model is " + m.path());
  if (info.vocab_size != static_cast<uint32_t>(c.vocab_size))
    add("vocabulary " + std::to_string(info.vocab_size) + " against " +
        std::to_string(c.vocab_size));
  if (info.context_length != static_cast<uint32_t>(c.ctx_len))
    add("context length " + std::to_string(info.context_length) + " against " +
        std::to_string(c.ctx_len));
  return out;
}

/// The best (highest tokens/s) run and every run's latencies, for one client count and path.
struct serve_summary {
  double tps = 0;
  int64_t tokens = 0;  // of the best run
  int64_t turns = 0;
  std::vector<double> ttft_ms, itl_ms;
  std::vector<double> first_ttft_ms;  // first turns only: the prompt alone is prefilled
  bool ran = false;

  void add(const serve_figures& f) {
    ran = true;
    for (auto& v : f.ttft_by_client)
      if (!v.empty()) first_ttft_ms.push_back(v.front());
    if (f.tps() > tps) {
      tps = f.tps();
      tokens = f.tokens;
      turns = f.turns;
    }
    ttft_ms.insert(ttft_ms.end(), f.ttft_ms.begin(), f.ttft_ms.end());
    itl_ms.insert(itl_ms.end(), f.itl_ms.begin(), f.itl_ms.end());
  }
};

}  // namespace

int serve_command(std::span<char*> args) {
  if (keel::cli::wants_help(args)) {
    std::cout << keel::cli::help_text(
        "keel-bench serve [--connect HOST:PORT] --model FILE [--threads N] [--clients N] "
        "[--tokens N] [--out bench/serve.md]",
        "Clients over the wire: N concurrent clients, each a thread with its own connection "
        "(wire::client) and session, run turns one after another (short prompts, seeded "
        "sampling); reports time to first token and inter-token latency (p50, p99) and aggregate "
        "tokens/s, for 1, 4 and 16 clients unless --clients is given. The same workload runs "
        "through a node in this process (sessions and sink actors, no wire) with the same model "
        "and threads, and the report gives the wire's cost (targets: under 5% of tokens/s, under "
        "1 ms of p50 time to first token on loopback). Without --connect it starts keel-node "
        "itself on 127.0.0.1:0.",
        serve_spec);
    return 0;
  }
  auto opts = keel::cli::options::parse(args, serve_spec);
  if (!opts) return fail(opts.error());
  if (!opts->has("model") && !opts->has("connect"))
    return fail(keel::make_error(keel::errc::bad_request,
                                 "serve: --model FILE is required (with or without --connect)"));
  auto threads = opts->get_int("threads", 1, 1, 1024);
  if (!threads) return fail(threads.error());
  auto kv_bytes = opts->get_bytes("kv-bytes", 256ull << 20);
  if (!kv_bytes) return fail(kv_bytes.error());
  auto turns = opts->get_int("turns", 4, 1, 1000);
  if (!turns) return fail(turns.error());
  auto max_tokens = opts->get_int("tokens", 64, 1, 1 << 20);
  if (!max_tokens) return fail(max_tokens.error());
  auto reps = opts->get_int("reps", 3, 1, 100);
  if (!reps) return fail(reps.error());
  std::vector<int32_t> sizes = {1, 4, 16};
  if (opts->has("clients")) {
    auto n = opts->get_int("clients", 1, 1, 1024);
    if (!n) return fail(n.error());
    sizes = {static_cast<int32_t>(*n)};
  }
  std::string command = "keel-bench serve";
  for (auto* a : args) command += std::string(" ") + a;

  std::string load_before = load_average();
  // The local model: the in-process node's, and the reference for what the remote node serves.
  std::unique_ptr<keel::model> model;
  std::vector<int64_t> prompt_len;
  if (opts->has("model")) {
    std::cerr << "keel-bench: loading " << opts->get("model") << "\n";
    auto m = keel::model::load(opts->get("model"));
    if (!m) return fail(m.error());
    model = std::move(*m);
    keel::tokenizer tok(model->vocabulary());
    for (int i = 0; i < n_prompts; ++i)
      prompt_len.push_back(
          static_cast<int64_t>(tok.encode(bench_prompts[i], tok.vocabulary().add_bos).size()));
    // A session sends its whole history with every turn: every turn must fit the context.
    const int64_t longest = *std::max_element(prompt_len.begin(), prompt_len.end());
    if (*turns * (longest + *max_tokens) >= model->config().ctx_len) {
      return fail(keel::make_error(keel::errc::bad_request,
                                   "serve: --turns " + std::to_string(*turns) + " of up to " +
                                       std::to_string(longest + *max_tokens) +
                                       " tokens (--tokens " + std::to_string(*max_tokens) +
                                       ") do not fit the context length " +
                                       std::to_string(model->config().ctx_len)));
    }
  }

  // The node over the wire: --connect, or a child keel-node with the in-process node's settings.
  std::unique_ptr<keel::bench::process> child;
  std::string endpoint = opts->get("connect");
  std::string http_endpoint = opts->get("http");
  std::string child_command;
  if (!opts->has("connect")) {
    auto exe = std::filesystem::read_symlink("/proc/self/exe").parent_path() / "keel-node";
    std::vector<std::string> argv = {exe.string(),
                                     "--listen",
                                     "127.0.0.1:0",
                                     "--model",
                                     opts->get("model"),
                                     "--threads",
                                     std::to_string(*threads),
                                     "--kv-bytes",
                                     std::to_string(*kv_bytes),
                                     "--http-listen",
                                     "127.0.0.1:0"};
    child_command = "keel-node";
    for (size_t k = 1; k < argv.size(); ++k) child_command += " " + argv[k];
    std::cerr << "keel-bench: starting " << exe.string() << child_command.substr(9) << "\n";
    auto c = keel::bench::process::start(argv, nullptr);
    if (!c) return fail(c.error());
    child = std::move(*c);
    auto address = child->wait_line("keel-node: listening on ", std::chrono::seconds(120));
    if (!address) return fail(address.error());
    endpoint = *address;
    auto http = child->wait_line("keel-node: http on ", std::chrono::seconds(30));
    if (!http) return fail(http.error());
    http_endpoint = *http;
  }
  keel::wire::node_info info;
  {
    auto probe = keel::wire::client::connect({endpoint});
    if (!probe) return fail(probe.error());
    auto i = (*probe)->info();
    if (!i) return fail(i.error());
    info = *i;
  }
  std::string mismatch = model ? model_mismatch(info, *model) : "";
  if (!mismatch.empty())
    std::cerr << "keel-bench: warning: the node's model differs from --model: " << mismatch << "\n";

  // The in-process node: keel-node's settings (one shard, default batching, the same KV budget,
  // keel::tune_actor_system), sessions driven by threads like the wire clients.
  caf::actor_system_config sys_cfg;
  keel::tune_actor_system(sys_cfg);
  caf::actor_system sys{sys_cfg};
  keel::node_config ncfg;
  ncfg.name = "bench";
  ncfg.model_path = opts->get("model");
  ncfg.shards = 1;
  ncfg.threads_per_shard = static_cast<int32_t>(*threads);
  ncfg.kv_bytes = *kv_bytes;
  std::unique_ptr<keel::node> nd;
  if (model) {
    auto n = keel::node::start(sys, ncfg,
                               std::make_shared<keel::supervision_log>([](const std::string&) {}));
    if (!n) return fail(n.error());
    nd = std::move(*n);
  }

  std::vector<serve_summary> local(sizes.size()), wire(sizes.size()), http(sizes.size());
  // Per client count: wire minus in-process TTFT of the same client's same turn in the same
  // run, a comparison that the machine's drift between runs does not blur.
  std::vector<std::vector<double>> ttft_added(sizes.size());
  // The same, HTTP minus Cap'n Proto.
  std::vector<std::vector<double>> http_ttft_added(sizes.size());
  bool same_tokens = true, same_counts = true;
  std::mutex open_mu;  // node::open_session from one client thread at a time
  for (size_t si = 0; si < sizes.size(); ++si) {
    const int32_t n = sizes[si];
    for (int64_t rep = 0; rep < *reps; ++rep) {
      std::vector<std::vector<int32_t>> local_tokens;
      std::vector<std::vector<double>> local_ttft;
      if (nd) {
        std::cerr << "keel-bench: serve, " << n << " clients, run " << rep + 1 << " of " << *reps
                  << ": in process\n";
        auto f = run_clients(n, static_cast<int32_t>(*turns), static_cast<int32_t>(*max_tokens),
                             [&](int32_t i) {
                               std::lock_guard<std::mutex> guard(open_mu);
                               return local_runner::open(sys, *nd, static_cast<uint64_t>(i));
                             });
        if (!f) return fail(f.error());
        local[si].add(*f);
        local_tokens = std::move(f->transcripts);
        local_ttft = std::move(f->ttft_by_client);
      }
      std::cerr << "keel-bench: serve, " << n << " clients, run " << rep + 1 << " of " << *reps
                << ": over the wire (" << endpoint << ")\n";
      auto f = run_clients(
          n, static_cast<int32_t>(*turns), static_cast<int32_t>(*max_tokens),
          [&](int32_t i) { return wire_runner::open(endpoint, static_cast<uint64_t>(i)); });
      if (!f) return fail(f.error());
      wire[si].add(*f);
      if (nd) same_tokens = same_tokens && f->transcripts == local_tokens;
      for (size_t i = 0; i < local_ttft.size() && i < f->ttft_by_client.size(); ++i) {
        auto& a = local_ttft[i];
        auto& b = f->ttft_by_client[i];
        for (size_t k = 0; k < a.size() && k < b.size(); ++k) ttft_added[si].push_back(b[k] - a[k]);
      }
      if (http_endpoint.empty()) continue;
      std::cerr << "keel-bench: serve, " << n << " clients, run " << rep + 1 << " of " << *reps
                << ": over HTTP (" << http_endpoint << ")\n";
      auto h = run_clients(
          n, static_cast<int32_t>(*turns), static_cast<int32_t>(*max_tokens),
          [&](int32_t i) { return http_runner::open(http_endpoint, static_cast<uint64_t>(i)); });
      if (!h) return fail(h.error());
      http[si].add(*h);
      for (size_t i = 0; i < h->transcripts.size() && i < f->transcripts.size(); ++i)
        same_counts = same_counts && h->transcripts[i].size() == f->transcripts[i].size();
      for (size_t i = 0; i < f->ttft_by_client.size() && i < h->ttft_by_client.size(); ++i) {
        auto& a = f->ttft_by_client[i];
        auto& b = h->ttft_by_client[i];
        for (size_t k = 0; k < a.size() && k < b.size(); ++k)
          http_ttft_added[si].push_back(b[k] - a[k]);
      }
    }
  }
  nd.reset();
  std::string child_exit;
  if (child) {
    std::cerr << "keel-bench: stopping the node (SIGTERM)\n";
    child_exit = child->stop(std::chrono::seconds(10));
    child.reset();
  }

  std::ostringstream r;
  char buf[768];
  r << "# Serving benchmark\n\n";
  r << "Command: `" << command << "`\n\n";
  r << "## Machine\n\n";
  r << "- CPU: " << cpu_model() << ", " << std::thread::hardware_concurrency()
    << " hardware threads, kernels: " << keel::to_string(keel::active_isa()) << "\n";
  r << "- Memory: " << mem_total() << "\n";
  r << "- Load average before the run (other processes share the machine): " << load_before << "\n";
  r << "- Network: " << (opts->has("connect") ? "--connect " + endpoint : "loopback (127.0.0.1)")
    << "; clients, node and (for the comparison) the in-process node share this machine\n\n";
  if (model) {
    const auto& c = model->config();
    r << "## Model\n\n";
    std::snprintf(buf, sizeof buf,
                  "- %s (%s): dim %d, %d layers, %d heads (kv %d), ffn %d, vocab %d, ctx %d, "
                  "weights %s\n- Weight bytes read per decoded token: %.1f MB\n\n",
                  model->path().c_str(), model->format().c_str(), c.dim, c.n_layers, c.n_heads,
                  c.n_kv_heads, c.ffn_dim, c.vocab_size, c.ctx_len,
                  std::string(keel::dtype_name(model->weight_type())).c_str(),
                  model->weight_bytes_per_token() / 1e6);
    r << buf;
  }
  r << "## Nodes\n\n";
  if (!child_command.empty()) {
    r << "- Over the wire: a keel-node child started by the benchmark, `" << child_command
      << "`, at " << endpoint << ", stopped with SIGTERM at the end (" << child_exit << ")\n";
  } else {
    r << "- Over the wire: the keel-node at " << endpoint
      << " (its threads and KV budget are its own: they must equal --threads and --kv-bytes "
         "for a fair comparison)\n";
  }
  r << "- NodeInfo: name " << info.name << ", model " << info.model << ", vocab " << info.vocab_size
    << ", context " << info.context_length << ", " << info.shards << " shard(s); ";
  if (!model)
    r << "no --model, so no in-process comparison\n";
  else if (mismatch.empty())
    r << "the same model as --model\n";
  else
    r << "**a different model from --model: " << mismatch
      << "; the comparison below is not like for like**\n";
  if (info.shards != 1 && model)
    r << "- **The node has " << info.shards
      << " shards, the in-process node 1: the comparison is not like for like**\n";
  if (model) {
    std::snprintf(buf, sizeof buf,
                  "- In process: keel::node with keel-node's settings, 1 shard x %lld threads, "
                  "batching.max_batch %d, prefill_chunk %d, KV budget %.0f MiB, "
                  "keel::tune_actor_system (%zu CAF workers); each client a thread with a scoped "
                  "actor that sends the turn and a sink actor that timestamps each token\n",
                  static_cast<long long>(*threads), ncfg.batching.max_batch,
                  ncfg.batching.prefill_chunk, *kv_bytes / 1048576.0,
                  sys.scheduler().num_workers());
    r << buf;
  }
  r << "- Over the wire, each client a thread with its own keel::wire::client (connection and KJ "
       "event loop); the token callback timestamps each token\n\n";
  r << "## Workload and measures\n\n";
  std::snprintf(buf, sizeof buf,
                "- Each client: one session (temperature 0.8, top-k 40, seed = client index), %lld "
                "turns one after another, client i's turn k sends prompt (i + k) mod 8 of the "
                "batch benchmark's short prompts",
                static_cast<long long>(*turns));
  r << buf;
  if (!prompt_len.empty()) {
    std::snprintf(buf, sizeof buf, " (%lld to %lld tokens)",
                  static_cast<long long>(*std::min_element(prompt_len.begin(), prompt_len.end())),
                  static_cast<long long>(*std::max_element(prompt_len.begin(), prompt_len.end())));
    r << buf;
  }
  std::snprintf(buf, sizeof buf,
                ", at most %lld tokens per turn; EOS may end a turn early (the same on both "
                "paths). A session sends its whole history with each turn, so later turns "
                "prefill more\n",
                static_cast<long long>(*max_tokens));
  r << buf;
  std::snprintf(
      buf, sizeof buf,
      "- TTFT (time to first token): from the call that sends a turn (wire::client::generate, or "
      "the scoped actor's send request) to the first token's arrival at the client. Inter-token: "
      "between consecutive tokens of a turn. Percentiles are nearest-rank over every turn (or "
      "gap) of all %lld runs\n"
      "- Tokens/s: every generated token over the time from the start (all clients connected, "
      "sessions open) to the end of the last turn, prefill included; the best of %lld runs, the "
      "paths alternating (in process first)\n\n",
      static_cast<long long>(*reps), static_cast<long long>(*reps));
  r << buf;

  r << "## Results\n\n";
  r << "| clients | path | tokens/s | TTFT p50 | TTFT p99 | inter-token p50 | inter-token p99 | "
       "turns / tokens (best run) |\n|---|---|---|---|---|---|---|---|\n";
  auto row = [&](int32_t n, const char* path, const serve_summary& s) {
    std::snprintf(buf, sizeof buf,
                  "| %d | %s | %.1f | %.2f ms | %.2f ms | %.2f ms | %.2f ms | %lld / %lld |\n", n,
                  path, s.tps, percentile(s.ttft_ms, 0.5), percentile(s.ttft_ms, 0.99),
                  percentile(s.itl_ms, 0.5), percentile(s.itl_ms, 0.99),
                  static_cast<long long>(s.turns), static_cast<long long>(s.tokens));
    r << buf;
  };
  for (size_t si = 0; si < sizes.size(); ++si) {
    if (local[si].ran) row(sizes[si], "in process", local[si]);
    row(sizes[si], "wire", wire[si]);
    if (http[si].ran) row(sizes[si], "http", http[si]);
  }
  r << "\n";
  if (model) {
    r << "## The wire's cost\n\n";
    r << "- TTFT p50 added: the wire's p50 minus the in-process p50 (the target's measure). "
         "Paired: the median over every (run, client, turn) of the wire's TTFT minus the "
         "in-process TTFT of the same client's same turn in the same run; it is less sensitive "
         "to the machine's speed changing between runs. First turns: the TTFT p50 of turns that "
         "prefill the short prompt alone (later turns prefill the whole history)\n\n";
    r << "| clients | tokens/s lost (target < 5%) | TTFT p50 added (target < 1 ms) | TTFT "
         "added, paired median | first-turn TTFT p50, in process / wire | inter-token p50 added "
         "|\n|---|---|---|---|---|---|\n";
    for (size_t si = 0; si < sizes.size(); ++si) {
      double lost = local[si].tps > 0 ? 100.0 * (1.0 - wire[si].tps / local[si].tps) : 0.0;
      double ttft = percentile(wire[si].ttft_ms, 0.5) - percentile(local[si].ttft_ms, 0.5);
      double paired = percentile(ttft_added[si], 0.5);
      double itl = percentile(wire[si].itl_ms, 0.5) - percentile(local[si].itl_ms, 0.5);
      std::snprintf(buf, sizeof buf,
                    "| %d | %.1f%% (%s) | %.2f ms (%s) | %.2f ms (%s, %zu pairs) | %.2f / %.2f ms "
                    "| %.2f ms |\n",
                    sizes[si], lost, lost < 5.0 ? "met" : "missed", ttft,
                    ttft < 1.0 ? "met" : "missed", paired, paired < 1.0 ? "met" : "missed",
                    ttft_added[si].size(), percentile(local[si].first_ttft_ms, 0.5),
                    percentile(wire[si].first_ttft_ms, 0.5), itl);
      r << buf;
    }
    r << "\nWire tokens equal the in-process tokens (every client, every run): "
      << (same_tokens ? "yes" : "no") << "\n\n";
  }
  if (!http_endpoint.empty()) {
    r << "## HTTP's cost\n\n";
    r << "- The OpenAI-style API (POST /v1/completions, server-sent events, one kept-alive "
         "connection per client, the session continued with Keel-Session) at "
      << http_endpoint
      << ". Its inter-token figures are between events: an event is one token, or a few when a "
         "character spans tokens. TTFT added: HTTP's p50 minus Cap'n Proto's, and paired (the "
         "same client's same turn in the same run)\n\n";
    r << "| clients | tokens/s against in process (target within 5%) | TTFT p50 added to Cap'n "
         "Proto's (target < 2 ms) | TTFT added, paired median |\n|---|---|---|---|\n";
    for (size_t si = 0; si < sizes.size(); ++si) {
      double base = local[si].tps > 0 ? local[si].tps : wire[si].tps;
      double lost = base > 0 ? 100.0 * (1.0 - http[si].tps / base) : 0.0;
      double ttft = percentile(http[si].ttft_ms, 0.5) - percentile(wire[si].ttft_ms, 0.5);
      double paired = percentile(http_ttft_added[si], 0.5);
      std::snprintf(buf, sizeof buf, "| %d | %.1f%% lost%s (%s) | %.2f ms (%s) | %.2f ms (%s, %zu pairs) |\n",
                    sizes[si], lost, local[si].tps > 0 ? "" : " (against the wire: no --model)",
                    lost < 5.0 ? "met" : "missed", ttft, ttft < 2.0 ? "met" : "missed",
                    paired, paired < 2.0 ? "met" : "missed", http_ttft_added[si].size());
      r << buf;
    }
    r << "\nHTTP turns generated as many tokens as the Cap'n Proto turns (every client, every run): "
      << (same_counts ? "yes" : "no") << "\n";
  }
  return publish(r.str(), opts->get("out"));
}

}  // namespace keel::bench
