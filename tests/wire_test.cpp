#define BOOST_TEST_MODULE wire_test
#include <boost/test/unit_test.hpp>

// Integration tests of the client API: real keel-node processes on 127.0.0.1 (port 0, read
// from the node's "listening on" line), driven by the client library (wire/client.hpp) and by
// the real `keel` binary.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <memory>
#include <mutex>
#include <sstream>
#include <thread>

#include "tests/process.hpp"
#include "tests/test_support.hpp"
#include "wire/client.hpp"

namespace {

using namespace std::chrono_literals;
using keel::errc;
using keel::test::process;
using keel::test::run;
using keel::test::run_result;
using keel::wire::client;
using keel::wire::finish_reason;

using keel::test::bin;

/// The synthesized models every test uses, made once.
struct models {
  keel::test::temp_dir dir{"wire_test-" + std::to_string(getpid())};  // runs may overlap
  std::string tiny = (dir.path / "tiny.gguf").string();               // fast; context 256
  std::string slow = (dir.path / "slow.gguf").string();  // ~1 ms per token; context 2048
  uint64_t long_seed = 0;  // a seed whose reply on `slow` runs long at temperature 1
  size_t long_length = 0;  // that reply's length with --max-tokens 2000

  models() {
    auto a = run({bin("keel-model"), "synth", "-o", tiny, "--dim", "64", "--layers", "2", "--heads",
                  "4", "--kv-heads", "2", "--ffn", "128", "--ctx", "256"});
    BOOST_REQUIRE_MESSAGE(a.status == 0, a.err);
    auto b = run({bin("keel-model"), "synth", "-o", slow, "--dim", "256", "--layers", "4",
                  "--heads", "4", "--kv-heads", "2", "--ffn", "768", "--ctx", "2048"});
    BOOST_REQUIRE_MESSAGE(b.status == 0, b.err);
    // The synthetic model's EOS comes at random: pick a seed that keeps it talking.
    for (uint64_t seed = 1; seed <= 20 && long_length < 600; ++seed) {
      auto g = local_generate(
          slow, "Hello there",
          {"--max-tokens", "2000", "--temperature", "1", "--seed", std::to_string(seed)});
      auto n = count_gen(g);
      if (n > long_length) long_length = n, long_seed = seed;
    }
    BOOST_REQUIRE_MESSAGE(long_length >= 300, "no long reply among 20 seeds");
  }

  static std::string local_generate(const std::string& model, const std::string& prompt,
                                    std::vector<std::string> extra) {
    std::vector<std::string> argv = {bin("keel"), "generate",  "--model", model,  "--prompt",
                                     prompt,      "--threads", "1",       "--ids"};
    argv.insert(argv.end(), extra.begin(), extra.end());
    auto r = run(argv);
    BOOST_REQUIRE_MESSAGE(r.status == 0, r.err);
    return r.out;
  }

  static size_t count_gen(const std::string& out) {
    auto at = out.find("gen:");
    if (at == std::string::npos) return 0;
    std::istringstream in(out.substr(at + 4));
    size_t n = 0;
    int id;
    while (in >> id) ++n;
    return n;
  }
};

models& shared_models() {
  static models m;
  return m;
}

/// A keel-node on 127.0.0.1 and a free port, ended (SIGTERM, then SIGKILL) with the test.
struct node {
  std::unique_ptr<process> proc;
  std::string address;  // HOST:PORT

  explicit node(const std::string& model) {
    proc = std::make_unique<process>(std::vector<std::string>{
        bin("keel-node"), "--listen", "127.0.0.1:0", "--model", model, "--threads", "1"});
    // Other threads' log lines may interleave with the "listening on" line, so look for the
    // first complete 127.0.0.1:PORT after the tag.
    const std::string tag = "keel-node: listening on ", host = "127.0.0.1:";
    auto find = [&](const std::string& s) -> std::string {
      auto at = s.find(tag);
      if (at == std::string::npos) return {};
      auto h = s.find(host, at + tag.size());
      if (h == std::string::npos) return {};
      auto end = s.find_first_not_of("0123456789", h + host.size());
      if (end == std::string::npos || end == h + host.size()) return {};
      return s.substr(h, end - h);
    };
    bool up = proc->wait_err([&](const std::string& s) { return !find(s).empty(); }, 15s);
    BOOST_REQUIRE_MESSAGE(up, "keel-node did not start: " + proc->err());
    address = find(proc->err());
  }

  std::unique_ptr<client> connect() const {
    auto c = client::connect({address});
    BOOST_REQUIRE_MESSAGE(c, keel::test::why(c));
    return std::move(*c);
  }
};

keel::sampling_params sampled(float temperature, uint64_t seed) {
  keel::sampling_params p;
  p.temperature = temperature;
  p.seed = seed;
  return p;
}

/// The `gen:` ids of a --ids output, as a vector.
std::vector<int32_t> gen_ids(const std::string& out) {
  std::vector<int32_t> ids;
  auto at = out.find("gen:");
  if (at == std::string::npos) return ids;
  std::istringstream in(out.substr(at + 4));
  int32_t id;
  while (in >> id) ids.push_back(id);
  return ids;
}

}  // namespace

BOOST_AUTO_TEST_CASE(tokens_stream_in_order_and_history_keeps_them) {
  auto& m = shared_models();
  node n(m.tiny);
  auto c = n.connect();
  auto info = c->info();
  BOOST_REQUIRE_MESSAGE(info, keel::test::why(info));
  BOOST_TEST(info->context_length == 256u);
  BOOST_TEST(info->vocab_size > 0u);

  auto sid = c->open_session(sampled(0.8f, 11));
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  std::vector<uint64_t> indices;
  std::vector<int32_t> streamed;
  std::string text;
  uint64_t accepted_turn = 99;
  bool accepted_first = false;
  auto g = c->generate(
      *sid, "Hello there", 24,
      [&](uint64_t turn, uint64_t index, int32_t id, std::string_view piece) {
        accepted_first = accepted_turn == turn;
        indices.push_back(index);
        streamed.push_back(id);
        text += piece;
      },
      [&](uint64_t turn, const std::vector<int32_t>&) { accepted_turn = turn; });
  BOOST_REQUIRE_MESSAGE(g, keel::test::why(g));
  BOOST_TEST(g->generated == streamed);
  BOOST_TEST(!g->prompt.empty());
  BOOST_TEST(g->generated.size() <= 24u);
  BOOST_TEST((g->reason == finish_reason::length || g->reason == finish_reason::eos));
  if (!streamed.empty()) BOOST_TEST(accepted_first);
  for (size_t i = 0; i < indices.size(); ++i) BOOST_TEST(indices[i] == i);
  // The same tokens as the local engine with the same seed.
  auto local = models::local_generate(
      m.tiny, "Hello there", {"--max-tokens", "24", "--temperature", "0.8", "--seed", "11"});
  BOOST_TEST(g->generated == gen_ids(local));

  auto h = c->history(*sid);
  BOOST_REQUIRE_MESSAGE(h, keel::test::why(h));
  BOOST_REQUIRE(h->size() == 1u);
  BOOST_TEST((*h)[0].turn == g->turn);
  BOOST_TEST((*h)[0].prompt == g->prompt);
  BOOST_TEST((*h)[0].generated == g->generated);
  BOOST_TEST((*h)[0].done);

  // A second turn continues the session.
  auto g2 = c->generate(*sid, "And then?", 8);
  BOOST_REQUIRE_MESSAGE(g2, keel::test::why(g2));
  BOOST_TEST(g2->turn != g->turn);
  auto list = c->sessions();
  BOOST_REQUIRE_MESSAGE(list, keel::test::why(list));
  bool found = false;
  for (auto& s : *list)
    if (s.id == *sid) {
      found = true;
      BOOST_TEST(s.turns == 2u);
      BOOST_TEST(s.tokens ==
                 g->prompt.size() + g->generated.size() + g2->prompt.size() + g2->generated.size());
      BOOST_TEST(!s.running);
    }
  BOOST_TEST(found);
}

BOOST_AUTO_TEST_CASE(remote_generate_prints_exactly_what_local_generate_prints) {
  auto& m = shared_models();
  node n(m.tiny);
  const std::vector<std::vector<std::string>> variants = {
      {"--max-tokens", "40", "--ids"},
      {"--max-tokens", "40", "--ids", "--temperature", "0.9", "--seed", "3"},
      {"--max-tokens", "40", "--ids", "--temperature", "1.2", "--seed", "5", "--top-k", "40",
       "--top-p", "0.9", "--min-p", "0.02", "--repeat-penalty", "1.1"},
      {"--max-tokens", "40", "--temperature", "0.7", "--seed", "9"},  // text, not ids
  };
  for (const auto& v : variants) {
    std::vector<std::string> local = {bin("keel"), "generate", "--model",  m.tiny,
                                      "--threads", "1",        "--prompt", "Once upon a time"};
    std::vector<std::string> remote = {bin("keel"), "generate", "--connect",
                                       n.address,   "--prompt", "Once upon a time"};
    local.insert(local.end(), v.begin(), v.end());
    remote.insert(remote.end(), v.begin(), v.end());
    auto a = run(local);
    auto b = run(remote);
    BOOST_TEST_CONTEXT(v.size() << " options, " << v.back()) {
      BOOST_TEST(a.status == 0);
      BOOST_TEST(b.status == 0, b.err);
      BOOST_TEST(!a.out.empty());
      BOOST_TEST(a.out == b.out);
    }
  }
}

BOOST_AUTO_TEST_CASE(cancel_ends_a_turn_early_from_the_stream_or_another_client) {
  auto& m = shared_models();
  node n(m.slow);
  auto c = n.connect();
  // From inside the stream: request_cancel() after five tokens.
  auto sid = c->open_session(sampled(1.0f, m.long_seed));
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  keel::wire::client* cp = c.get();
  auto g = c->generate(*sid, "Hello there", 2000,
                       [&](uint64_t, uint64_t index, int32_t, std::string_view) {
                         if (index == 4) cp->request_cancel();
                       });
  BOOST_REQUIRE_MESSAGE(g, keel::test::why(g));
  BOOST_TEST(g->reason == finish_reason::cancelled);
  BOOST_TEST(g->generated.size() >= 5u);
  BOOST_TEST(g->generated.size() < m.long_length);

  // From another client (on another thread: a client belongs to its thread), by session id and
  // turn.
  std::mutex mu;
  std::string sid2;
  std::atomic<int64_t> turn{-1};
  std::atomic<size_t> tokens{0};
  caf::expected<keel::wire::generation> g2 = keel::make_error(errc::failed, "not run");
  {
    std::jthread streamer([&] {
      auto own = client::connect({n.address});
      if (!own) {
        g2 = own.error();
        return;
      }
      auto s = (*own)->open_session(sampled(1.0f, m.long_seed));
      if (!s) {
        g2 = s.error();
        return;
      }
      {
        std::lock_guard<std::mutex> g(mu);
        sid2 = *s;
      }
      g2 = (*own)->generate(
          *s, "Hello there", 2000, [&](uint64_t, uint64_t, int32_t, std::string_view) { ++tokens; },
          [&](uint64_t t, const std::vector<int32_t>&) { turn = static_cast<int64_t>(t); });
    });
    auto deadline = std::chrono::steady_clock::now() + 10s;
    while (tokens < 3 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(1ms);
    BOOST_CHECK(tokens >= 3u);
    std::lock_guard<std::mutex> g(mu);
    auto err = c->cancel(sid2, static_cast<uint64_t>(turn.load()));
    BOOST_TEST(!err, keel::describe(err));
  }
  BOOST_REQUIRE_MESSAGE(g2, keel::test::why(g2));
  BOOST_TEST(g2->reason == finish_reason::cancelled);
  BOOST_TEST(g2->generated.size() < m.long_length);
}

BOOST_AUTO_TEST_CASE(eight_concurrent_clients_each_get_their_own_reply) {
  auto& m = shared_models();
  node n(m.tiny);
  constexpr int clients = 8;
  // One at a time first: the reference replies.
  std::vector<std::vector<int32_t>> expected(clients);
  {
    auto c = n.connect();
    for (int i = 0; i < clients; ++i) {
      auto sid = c->open_session(sampled(0.9f, 100 + i));
      BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
      auto g = c->generate(*sid, "Tell me a story number " + std::to_string(i), 32);
      BOOST_REQUIRE_MESSAGE(g, keel::test::why(g));
      expected[i] = g->generated;
    }
  }
  std::vector<std::vector<int32_t>> got(clients), streamed(clients);
  std::vector<std::string> errors(clients);
  std::vector<std::thread> threads;
  for (int i = 0; i < clients; ++i)
    threads.emplace_back([&, i] {
      auto c = client::connect({n.address});
      if (!c) {
        errors[i] = keel::describe(c.error());
        return;
      }
      auto sid = (*c)->open_session(sampled(0.9f, 100 + i));
      if (!sid) {
        errors[i] = keel::describe(sid.error());
        return;
      }
      auto g = (*c)->generate(
          *sid, "Tell me a story number " + std::to_string(i), 32,
          [&](uint64_t, uint64_t, int32_t id, std::string_view) { streamed[i].push_back(id); });
      if (!g) {
        errors[i] = keel::describe(g.error());
        return;
      }
      got[i] = g->generated;
    });
  for (auto& t : threads) t.join();
  for (int i = 0; i < clients; ++i) {
    BOOST_TEST_CONTEXT("client " << i) {
      BOOST_TEST(errors[i] == "");
      BOOST_TEST(!expected[i].empty());
      BOOST_TEST(got[i] == expected[i]);
      BOOST_TEST(streamed[i] == expected[i]);
    }
  }
}

BOOST_AUTO_TEST_CASE(unknown_session_is_not_found_naming_the_id) {
  auto& m = shared_models();
  node n(m.tiny);
  auto c = n.connect();
  auto g = c->generate("no-such-session", "hi", 4);
  BOOST_REQUIRE(!g);
  BOOST_TEST(keel::code_of(g.error()) == errc::not_found);
  BOOST_TEST(keel::describe(g.error()).find("no-such-session") != std::string::npos,
             keel::describe(g.error()));
  auto h = c->history("no-such-session");
  BOOST_REQUIRE(!h);
  BOOST_TEST(keel::code_of(h.error()) == errc::not_found);
  BOOST_TEST(keel::code_of(c->cancel("no-such-session", 0)) == errc::not_found);

  auto r = run({bin("keel"), "history", "--connect", n.address, "no-such-session"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(r.err.find("not_found") != std::string::npos, r.err);
  BOOST_TEST(r.err.find("no-such-session") != std::string::npos, r.err);
}

BOOST_AUTO_TEST_CASE(prompt_longer_than_the_context_is_a_bad_request) {
  auto& m = shared_models();
  node n(m.tiny);
  auto c = n.connect();
  auto sid = c->open_session({});
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  std::string long_prompt;
  for (int i = 0; i < 400; ++i) long_prompt += "word" + std::to_string(i) + " ";
  auto g = c->generate(*sid, long_prompt, 8);
  BOOST_REQUIRE(!g);
  BOOST_TEST(keel::code_of(g.error()) == errc::bad_request, keel::describe(g.error()));
  // The session and the node go on.
  auto ok = c->generate(*sid, "hi", 4);
  BOOST_TEST(static_cast<bool>(ok), keel::test::why(ok));
}

BOOST_AUTO_TEST_CASE(invalid_sampling_is_a_bad_request_naming_the_parameter) {
  auto& m = shared_models();
  node n(m.tiny);
  auto c = n.connect();
  auto p = sampled(0.5f, 1);
  p.top_p = 1.5f;
  auto s = c->open_session(p);
  BOOST_REQUIRE(!s);
  BOOST_TEST(keel::code_of(s.error()) == errc::bad_request);
  BOOST_TEST(keel::describe(s.error()).find("top_p") != std::string::npos,
             keel::describe(s.error()));
  p = sampled(-1.0f, 1);
  s = c->open_session(p);
  BOOST_REQUIRE(!s);
  BOOST_TEST(keel::code_of(s.error()) == errc::bad_request);
  BOOST_TEST(keel::describe(s.error()).find("temperature") != std::string::npos,
             keel::describe(s.error()));
  // The CLI checks before it connects, with the option's name.
  auto r = run({bin("keel"), "generate", "--connect", n.address, "--prompt", "hi", "--top-p", "2"});
  BOOST_TEST(r.status == 2);
  BOOST_TEST(r.err.find("--top-p") != std::string::npos, r.err);
}

BOOST_AUTO_TEST_CASE(a_client_killed_mid_stream_does_not_disturb_the_others) {
  auto& m = shared_models();
  node n(m.slow);
  auto c = n.connect();
  auto sid = c->open_session(sampled(0.8f, 4));
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  auto reference = c->generate(*sid, "A reference", 32);
  BOOST_REQUIRE_MESSAGE(reference, keel::test::why(reference));

  process victim({bin("keel"), "generate", "--connect", n.address, "--prompt", "Hello there",
                  "--max-tokens", "2000", "--temperature", "1", "--seed",
                  std::to_string(m.long_seed), "--ids"});
  bool streaming =
      victim.wait_out([](const std::string& s) { return gen_ids(s).size() >= 5; }, 15s);
  BOOST_REQUIRE_MESSAGE(streaming, "no tokens: " + victim.err());
  BOOST_TEST(!victim.exited());  // it is killed mid-stream, not after
  victim.signal(SIGKILL);
  BOOST_TEST(victim.wait(5s).value_or(-1) == 128 + SIGKILL);

  auto sid2 = c->open_session(sampled(0.8f, 4));
  BOOST_REQUIRE_MESSAGE(sid2, keel::test::why(sid2));
  auto after = c->generate(*sid2, "A reference", 32);
  BOOST_REQUIRE_MESSAGE(after, keel::test::why(after));
  BOOST_TEST(after->generated == reference->generated);
  BOOST_TEST(!n.proc->exited());
}

BOOST_AUTO_TEST_CASE(hundreds_of_connections_opened_and_dropped_leave_the_node_serving) {
  auto& m = shared_models();
  node n(m.tiny);
  auto colon = n.address.rfind(':');
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(std::stoi(n.address.substr(colon + 1))));
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  for (int i = 0; i < 300; ++i) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    BOOST_REQUIRE(fd >= 0);
    BOOST_REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    if (i % 3 == 1) {
      // Not a Cap'n Proto message: a segment table claiming far more than was sent.
      const char junk[] = "\x05\x00\x00\x00\xff\xff\xff\x7fgarbage";
      BOOST_REQUIRE(::write(fd, junk, sizeof junk) > 0);
    }
    close(fd);
  }
  for (int i = 0; i < 100; ++i) {
    auto c = client::connect({n.address});
    BOOST_REQUIRE_MESSAGE(c, keel::test::why(c));
    if (i % 10 == 0) {
      auto sid = (*c)->open_session({});
      BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
    }
  }
  auto c = n.connect();
  auto sid = c->open_session({});
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  auto g = c->generate(*sid, "Still there?", 8);
  BOOST_REQUIRE_MESSAGE(g, keel::test::why(g));
  BOOST_TEST(!g->generated.empty());
}

BOOST_AUTO_TEST_CASE(unreachable_nodes_are_disconnected_and_the_next_address_is_tried) {
  auto& m = shared_models();
  node n(m.tiny);
  auto none = client::connect({"127.0.0.1:1", "127.0.0.1:2"});
  BOOST_REQUIRE(!none);
  BOOST_TEST(keel::code_of(none.error()) == errc::disconnected);
  auto why = keel::describe(none.error());
  BOOST_TEST(why.find("127.0.0.1:1") != std::string::npos, why);
  BOOST_TEST(why.find("127.0.0.1:2") != std::string::npos, why);

  auto c = client::connect({"127.0.0.1:1", n.address});
  BOOST_REQUIRE_MESSAGE(c, keel::test::why(c));
  BOOST_TEST((*c)->endpoint() == n.address);

  auto r = run({bin("keel"), "sessions", "--connect", "127.0.0.1:1"});
  BOOST_TEST(r.status == 1);
  BOOST_TEST(r.err.find("disconnected") != std::string::npos, r.err);
  BOOST_TEST(r.err.find("127.0.0.1:1") != std::string::npos, r.err);
}

BOOST_AUTO_TEST_CASE(sessions_history_and_chat_commands_show_the_node_state) {
  auto& m = shared_models();
  node n(m.tiny);
  auto c = n.connect();
  auto sid = c->open_session({});
  BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
  auto g = c->generate(*sid, "Hello", 6);
  BOOST_REQUIRE_MESSAGE(g, keel::test::why(g));

  auto s = run({bin("keel"), "sessions", "--connect", n.address});
  BOOST_TEST(s.status == 0, s.err);
  BOOST_TEST(s.out.find("ID") != std::string::npos);
  BOOST_TEST(s.out.find(*sid) != std::string::npos, s.out);

  auto h = run({bin("keel"), "history", "--connect", n.address, *sid});
  BOOST_TEST(h.status == 0, h.err);
  std::string gen_line = "gen:";
  for (auto id : g->generated) gen_line += ' ' + std::to_string(id);
  BOOST_TEST(h.out.find(gen_line + "\n") != std::string::npos, h.out);

  // chat with stdin a pipe: plain lines, no editing.
  process chat({bin("keel"), "chat", "--connect", n.address, "--max-tokens", "5"}, true);
  chat.write_stdin("Hello\n/history\n/quit\n");
  chat.close_stdin();
  BOOST_TEST(chat.wait(20s).value_or(-1) == 0, chat.err());
  chat.wait_out([](const std::string&) { return false; }, 2s);
  BOOST_TEST(chat.out().find("prompt:") != std::string::npos, chat.out());
}

BOOST_AUTO_TEST_CASE(sigterm_makes_the_node_exit_zero) {
  auto& m = shared_models();
  node n(m.tiny);
  {
    auto c = n.connect();
    auto sid = c->open_session({});
    BOOST_REQUIRE_MESSAGE(sid, keel::test::why(sid));
    BOOST_REQUIRE(static_cast<bool>(c->generate(*sid, "Bye", 4)));
  }
  auto idle = n.connect();  // a client still connected does not hold the node up
  n.proc->signal(SIGTERM);
  auto st = n.proc->wait(10s);
  BOOST_REQUIRE_MESSAGE(st.has_value(), "keel-node ignored SIGTERM");
  BOOST_TEST(*st == 0, n.proc->err());
  // The client sees the loss as `disconnected`.
  auto info = idle->info();
  BOOST_REQUIRE(!info);
  BOOST_TEST(keel::code_of(info.error()) == errc::disconnected, keel::describe(info.error()));
}
