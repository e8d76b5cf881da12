// The OpenAI-style endpoints of the HTTP port (actors/http_openai.cpp): real keel-node processes
// asked by real clients (curl; Python's http.client through tests/sse_client.py, which reads
// server-sent events and reconnects with Last-Event-ID as an HTTP client would). A stream whose
// node is killed goes on, on another node, exactly once; bad requests get their status and the
// port keeps serving.

#define BOOST_TEST_MODULE openai_http
#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <csignal>
#include <fstream>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/http_support.hpp"
#include "tests/process.hpp"
#include "tests/test_support.hpp"

using namespace std::chrono_literals;
using json = nlohmann::json;
using keel::test::bin;
using keel::test::check_openai_error;
using keel::test::curl;
using keel::test::free_port;
using keel::test::http_reply;
using keel::test::process;
using keel::test::run;

namespace {

/// The text after `tag` up to the end of its line in `text`.
std::string after(const std::string& text, const std::string& tag) {
  auto at = text.find(tag) + tag.size();
  return text.substr(at, text.find('\n', at) - at);
}

std::string source(const std::string& rel) {
  return std::string(KEEL_SOURCE_DIR) + "/" + rel;
}

/// A keel-node on loopback with an HTTP port.
struct node {
  std::unique_ptr<process> proc;
  std::string http;

  node(const std::string& model, std::vector<std::string> extra) {
    std::vector<std::string> a = {bin("keel-node"), "--listen", "127.0.0.1:0", "--model", model,
                                  "--threads",      "1",        "--http-listen", "127.0.0.1:0"};
    a.insert(a.end(), extra.begin(), extra.end());
    proc = std::make_unique<process>(a);
    BOOST_REQUIRE_MESSAGE(
        proc->wait_err([](const std::string& s) { return s.find("http on ") != s.npos; }, 30s),
        "keel-node did not start: " << proc->err());
    http = after(proc->err(), "http on ");
  }
  ~node() {
    if (proc && !proc->exited()) proc->stop(10s);
  }
  std::string url(const std::string& path) const { return "http://" + http + path; }
};

struct files {
  keel::test::temp_dir dir{"openai_http_test-" + std::to_string(getpid())};

  std::string write(const std::string& name, const std::string& content) {
    auto p = (dir.path / name).string();
    std::ofstream(p, std::ios::binary) << content;
    return p;
  }
};

/// POST `body` (JSON text) to `url` with curl.
http_reply post(const std::string& url, const std::string& body,
                std::vector<std::string> headers = {}) {
  static files scratch;
  static int n = 0;
  auto file = scratch.write("body-" + std::to_string(n++) + ".json", body);
  std::vector<std::string> extra = {"--max-time", "60", "-H", "Content-Type: application/json",
                                    "-H", "Expect:", "--data-binary", "@" + file};
  for (auto& h : headers) {
    extra.push_back("-H");
    extra.push_back(h);
  }
  return curl(url, extra);
}

json parse(const http_reply& r) {
  auto j = json::parse(r.body, nullptr, false);
  BOOST_REQUIRE_MESSAGE(!j.is_discarded(), "not JSON: " << r.body);
  return j;
}

/// tests/sse_client.py: what it received, as its last line says; `on_event` sees each event
/// line as it comes (return false to stop watching).
struct sse_result {
  json result;
  std::vector<json> events;
};

sse_result sse(const std::string& endpoints, const json& body, std::vector<std::string> extra = {},
               const std::function<void(size_t)>& after_events = {}, size_t at = 0) {
  static files scratch;
  static int n = 0;
  auto file = scratch.write("sse-" + std::to_string(n++) + ".json", body.dump());
  std::vector<std::string> argv = {"/usr/bin/python3", source("tests/sse_client.py"),
                                   "--endpoints",      endpoints,
                                   "--body",           file};
  argv.insert(argv.end(), extra.begin(), extra.end());
  if (body.contains("prompt")) {
    argv.push_back("--path");
    argv.push_back("/v1/completions");
  }
  process p(argv);
  if (after_events) {
    bool seen = p.wait_out(
        [&](const std::string& out) { return static_cast<size_t>(std::count(out.begin(), out.end(), '\n')) >= at; },
        60s);
    BOOST_REQUIRE_MESSAGE(seen, "the stream did not reach " << at << " events: " << p.out()
                                                            << p.err());
    after_events(at);
  }
  // Generous: a 600-token reply of the slow model takes seconds, but minutes under TSan.
  auto st = p.wait(300s);
  BOOST_REQUIRE_MESSAGE(st.has_value(), "sse_client.py did not end: " << p.out() << p.err());
  p.wait_out([](const std::string&) { return false; }, 1s);
  sse_result out;
  std::istringstream lines(p.out());
  std::string line;
  while (std::getline(lines, line)) {
    auto j = json::parse(line, nullptr, false);
    BOOST_REQUIRE_MESSAGE(!j.is_discarded(), "sse_client.py printed: " << line);
    if (j.contains("result"))
      out.result = j["result"];
    else
      out.events.push_back(j);
  }
  BOOST_REQUIRE_MESSAGE(out.result.is_object(), "no result: " << p.out() << p.err());
  return out;
}

/// The token counts of SSE ids "SESSION/TURN/TOKENS", which must only grow.
std::vector<uint64_t> id_tokens(const json& ids) {
  std::vector<uint64_t> out;
  for (auto& id : ids) {
    auto s = id.get<std::string>();
    out.push_back(std::stoull(s.substr(s.rfind('/') + 1)));
  }
  return out;
}

bool strictly_growing(const std::vector<uint64_t>& v) {
  for (size_t i = 1; i < v.size(); ++i)
    if (v[i] <= v[i - 1]) return false;
  return true;
}

/// The value of an unlabelled sample `name` at the metrics endpoint `url`.
double metric(const std::string& url, const std::string& name) {
  auto text = "\n" + curl(url).body;
  auto at = text.find("\n" + name + " ");
  BOOST_REQUIRE_MESSAGE(at != std::string::npos, "no sample " << name << " in " << text);
  return std::stod(text.substr(at + name.size() + 2));
}

json chat(const std::string& content, int max_tokens, uint64_t seed) {
  return {{"model", "model.gguf"},
          {"messages", json::array({{{"role", "user"}, {"content", content}}})},
          {"max_tokens", max_tokens},
          {"seed", seed}};
}

std::string tiny(files& f) {
  auto path = (f.dir.path / "model.gguf").string();
  keel::test::write_model(path, keel::test::tiny_model());
  return path;
}

}  // namespace

BOOST_AUTO_TEST_CASE(chat_and_completions_answer_as_json_and_as_events_alike) {
  files f;
  node n(tiny(f), {});
  auto req = chat("Hello there", 40, 7);
  auto whole = post(n.url("/v1/chat/completions"), req.dump());
  BOOST_REQUIRE_MESSAGE(whole.status == 200, whole.body);
  auto j = parse(whole);
  BOOST_TEST(j["object"] == "chat.completion");
  BOOST_TEST(j["model"] == "model.gguf");
  auto session = whole.headers["keel-session"];
  BOOST_TEST(!session.empty());
  BOOST_TEST(j["id"] == "chatcmpl-" + session + "-0");
  auto text = j["choices"][0]["message"]["content"].get<std::string>();
  BOOST_TEST(j["choices"][0]["message"]["role"] == "assistant");
  auto finish = j["choices"][0]["finish_reason"].get<std::string>();
  BOOST_TEST((finish == "length" || finish == "stop"));
  BOOST_TEST(j["usage"]["prompt_tokens"].get<int>() > 0);
  auto generated = j["usage"]["completion_tokens"].get<int>();
  BOOST_TEST(generated > 0);
  BOOST_TEST(generated <= 40);
  BOOST_TEST(j["usage"]["total_tokens"].get<int>() ==
             j["usage"]["prompt_tokens"].get<int>() + generated);

  // The same request streamed: the same text, in events whose ids only grow, the role first.
  auto streamed = req;
  streamed["stream"] = true;
  streamed["stream_options"] = {{"include_usage", true}};
  auto s = sse(n.http, streamed);
  BOOST_REQUIRE_MESSAGE(s.result["done"] == true, s.result.dump());
  BOOST_TEST(s.result["text"] == text);
  BOOST_TEST(s.result["finish_reason"] == finish);
  BOOST_TEST(s.result["usage"]["completion_tokens"] == generated);
  BOOST_TEST(s.result["reconnects"] == 0);
  auto first = json::parse(s.events.at(0)["data"].get<std::string>());
  BOOST_TEST(first["choices"][0]["delta"]["role"] == "assistant");
  BOOST_TEST(first["object"] == "chat.completion.chunk");
  auto tokens = id_tokens(s.result["ids"]);
  BOOST_TEST(strictly_growing(tokens));
  BOOST_TEST(tokens.front() == 0u);
  BOOST_TEST(tokens.back() <= static_cast<uint64_t>(generated));

  // A stop string: the text up to its first appearance, finish_reason "stop".
  size_t at = std::string::npos;
  char stop = 0;
  for (size_t i = 3; i < text.size() && !stop; ++i) {
    if (std::isalnum(static_cast<unsigned char>(text[i]))) {
      stop = text[i];
      at = text.find(stop);
    }
  }
  BOOST_REQUIRE_MESSAGE(stop != 0, "no letter in the reply: " << text);
  auto stopped = req;
  stopped["stop"] = json::array({std::string(1, stop), "never appears \x01"});
  auto r = parse(post(n.url("/v1/chat/completions"), stopped.dump()));
  BOOST_TEST(r["choices"][0]["message"]["content"] == text.substr(0, at));
  BOOST_TEST(r["choices"][0]["finish_reason"] == "stop");
  stopped["stream"] = true;
  auto rs = sse(n.http, stopped);
  BOOST_TEST(rs.result["text"] == text.substr(0, at));
  BOOST_TEST(rs.result["finish_reason"] == "stop");

  // The conversation goes on with Keel-Session: turn 1 of the same session.
  auto next = post(n.url("/v1/chat/completions"), chat("And then?", 5, 7).dump(),
                   {"Keel-Session: " + session});
  BOOST_REQUIRE_MESSAGE(next.status == 200, next.body);
  BOOST_TEST(parse(next)["id"] == "chatcmpl-" + session + "-1");
  BOOST_TEST(next.headers["keel-session"] == session);

  // Completions: the same through /v1/completions, a text session.
  json creq = {{"prompt", "Once upon"}, {"max_tokens", 12}, {"temperature", 0}};
  auto c = post(n.url("/v1/completions"), creq.dump());
  BOOST_REQUIRE_MESSAGE(c.status == 200, c.body);
  auto cj = parse(c);
  BOOST_TEST(cj["object"] == "text_completion");
  auto ctext = cj["choices"][0]["text"].get<std::string>();
  creq["stream"] = true;
  auto cs = sse(n.http, creq);
  BOOST_TEST(cs.result["text"] == ctext);
  BOOST_TEST(cs.result["done"] == true);
}

BOOST_AUTO_TEST_CASE(bad_requests_get_their_status_and_the_port_keeps_serving) {
  files f;
  node n(tiny(f), {});
  auto url = n.url("/v1/chat/completions");
  auto expect = [&](const std::string& body, int status, const std::string& code,
                    const std::string& names, std::vector<std::string> headers = {}) {
    auto r = post(url, body, headers);
    BOOST_TEST(r.status == status, body.substr(0, 80) << " -> " << r.status << " " << r.body);
    check_openai_error(r, code, status == 404 || status == 400 ? "invalid_request_error"
                                                               : "server_error");
    BOOST_TEST(r.body.find(names) != std::string::npos, r.body << " should name " << names);
  };
  expect("{\"messages\": [", 400, "bad_request", "not JSON");
  expect("[1, 2]", 400, "bad_request", "JSON object");
  expect(R"({"messages": "hi"})", 400, "bad_request", "messages must be an array");
  expect(R"({"messages": []})", 400, "bad_request", "at least one message");
  expect(R"({"messages": [{"role": "user"}]})", 400, "bad_request", "messages[0].content");
  expect(R"({"messages": [{"role": "user", "content": 5}]})", 400, "bad_request",
         "messages[0].content");
  expect(R"({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0})", 400,
         "bad_request", "max_tokens");
  expect(R"({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"})", 400,
         "bad_request", "temperature");
  expect(R"({"messages": [{"role": "user", "content": "x"}], "top_p": 1.5})", 400,
         "bad_request", "top_p");
  expect(R"({"messages": [{"role": "user", "content": "x"}], "wat": 1})", 400, "bad_request",
         "unknown field 'wat'");
  expect(R"({"messages": [{"role": "user", "content": "x"}], "n": 2})", 400, "bad_request", "n 2");
  expect(R"({"messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]})",
         400, "bad_request", "stop");
  expect("{\"messages\": [{\"role\": \"user\", \"content\": \"\xff\xfe\"}]}", 400, "bad_request",
         "not JSON");
  expect(R"({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"})", 404,
         "model_not_found", "gpt-4");
  expect(R"({"messages": [{"role": "user", "content": "x"}], "stream": true})", 400,
         "bad_request", "Last-Event-ID", {"Last-Event-ID: nonsense"});
  expect(R"({"messages": [{"role": "user", "content": "x"}]})", 404, "not_found", "s-nobody",
         {"Keel-Session: s-nobody@node"});
  expect(R"({"messages": [{"role": "user", "content": "x"}], "stream": true})", 404, "not_found",
         "s-nobody", {"Last-Event-ID: s-nobody@node/0/3"});

  auto get = curl(url);
  BOOST_TEST(get.status == 405);
  BOOST_TEST(get.headers["allow"] == "POST");
  // A body over 4 MiB.
  auto big = f.write("big.json", R"({"prompt": ")" + std::string(5 << 20, 'x') + "\"}");
  auto huge = curl(n.url("/v1/completions"), {"--data-binary", "@" + big, "-H", "Expect:"});
  BOOST_TEST(huge.status == 413);

  // A body that never finishes holds its own connection only.
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(static_cast<uint16_t>(std::stoi(n.http.substr(n.http.rfind(':') + 1))));
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  BOOST_REQUIRE(::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  std::string slow = "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{";
  BOOST_REQUIRE(::send(fd, slow.data(), slow.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(slow.size()));

  // 1,000 idle connections: past the per-address limit they are refused; a client from another
  // address is served meanwhile, and this one once they are gone.
  rlimit lim{};
  getrlimit(RLIMIT_NOFILE, &lim);
  lim.rlim_cur = std::min<rlim_t>(lim.rlim_max, 4096);
  setrlimit(RLIMIT_NOFILE, &lim);
  std::vector<int> idle;
  for (int i = 0; i < 1000; ++i) {
    int c = ::socket(AF_INET, SOCK_STREAM, 0);
    if (c < 0) break;
    if (::connect(c, reinterpret_cast<sockaddr*>(&a), sizeof a) != 0) {
      ::close(c);
      continue;
    }
    idle.push_back(c);
  }
  BOOST_TEST(idle.size() >= 256u);
  auto ok = chat("still there?", 3, 1).dump();
  auto file = f.write("ok.json", ok);
  auto elsewhere = curl(url, {"--interface", "127.0.0.2", "-H", "Content-Type: application/json",
                              "--data-binary", "@" + file});
  BOOST_TEST(elsewhere.status == 200, elsewhere.body);
  for (int c : idle) ::close(c);
  ::close(fd);
  http_reply after_all;
  for (int i = 0; i < 50; ++i) {  // until the node has seen the closes
    after_all = post(url, ok);
    if (after_all.status == 200) break;
    std::this_thread::sleep_for(100ms);
  }
  BOOST_TEST(after_all.status == 200, after_all.body);
}

BOOST_AUTO_TEST_CASE(api_keys_are_bearer_tokens_and_a_tenants_limit_answers_429) {
  files f;
  auto keys = f.write("keys", "key-of-acme-0123456789 tenant=acme class=standard rpm=3 tpm=100000 sessions=10\n"
                              "key-of-bolt-0123456789 tenant=bolt class=standard rpm=600 tpm=100000 sessions=10\n");
  ::chmod(keys.c_str(), 0600);
  node n(tiny(f), {"--keys", keys});
  auto url = n.url("/v1/chat/completions");
  auto body = chat("hi", 3, 1).dump();
  auto none = post(url, body);
  BOOST_TEST(none.status == 401);
  check_openai_error(none, "missing_api_key", "authentication_error");
  auto wrong = post(url, body, {"Authorization: Bearer key-of-nobody-0123456789"});
  BOOST_TEST(wrong.status == 401);
  check_openai_error(wrong, "invalid_api_key", "authentication_error");
  auto acme = post(url, body, {"Authorization: Bearer key-of-acme-0123456789"});
  BOOST_REQUIRE_MESSAGE(acme.status == 200, acme.body);
  auto session = acme.headers["keel-session"];
  // Another tenant's session is as unknown as one nobody has.
  auto theirs = post(url, body, {"Authorization: Bearer key-of-bolt-0123456789",
                                 "Keel-Session: " + session});
  BOOST_TEST(theirs.status == 404, theirs.body);
  // acme's 3 requests a minute (each request is one or more calls of the API: open, chat).
  http_reply limited;
  for (int i = 0; i < 5 && limited.status != 429; ++i)
    limited = post(url, body, {"Authorization: Bearer key-of-acme-0123456789"});
  BOOST_REQUIRE_MESSAGE(limited.status == 429, limited.body);
  check_openai_error(limited, "rate_limit_exceeded", "rate_limit_error");
  BOOST_TEST(!limited.headers["retry-after"].empty());
  BOOST_TEST(limited.body.find("rpm") != std::string::npos, limited.body);
  // bolt is not limited by acme's use.
  BOOST_TEST(post(url, body, {"Authorization: Bearer key-of-bolt-0123456789"}).status == 200);
}

namespace {

/// Three nodes a, b, c on loopback with HTTP ports, each the others' peer, and a model slow
/// enough (about 3 ms a token) that a reply streams for seconds.
struct trio {
  files f;
  std::string model = (f.dir.path / "slow.gguf").string();
  std::map<std::string, std::unique_ptr<node>> nodes;

  trio() {
    auto synth = run({bin("keel-model"), "synth", "-o", model, "--dim", "512", "--layers", "6",
                      "--heads", "8", "--kv-heads", "4", "--ffn", "1536", "--ctx", "2048"});
    BOOST_REQUIRE_MESSAGE(synth.status == 0, synth.err);
    std::map<std::string, std::string> peer;
    for (auto name : {"a", "b", "c"}) peer[name] = "127.0.0.1:" + std::to_string(free_port());
    for (auto& [name, address] : peer) {
      std::string others;
      for (auto& [o, addr] : peer)
        if (o != name) others += (others.empty() ? "" : ",") + o + "=" + addr;
      nodes[name] = std::make_unique<node>(
          model, std::vector<std::string>{"--name", name, "--peer-listen", address, "--peers",
                                          others, "--data", (f.dir.path / name).string()});
    }
    // Until every node is ready (its peers up).
    for (auto& [name, n] : nodes) {
      int status = 0;
      for (int i = 0; i < 100 && status != 200; ++i) {
        status = curl(n->url("/ready")).status;
        if (status != 200) std::this_thread::sleep_for(100ms);
      }
      BOOST_REQUIRE_MESSAGE(status == 200, name << " not ready: " << n->proc->err());
    }
  }

  std::string http(const std::string& name) const { return nodes.at(name)->http; }
};

json long_chat(uint64_t seed) {
  auto j = chat("Tell me a long story", 600, seed);
  j["model"] = "slow.gguf";
  j["stream"] = true;
  return j;
}

/// The synthetic model's end-of-text comes at random: a seed whose reply to `request(seed)`,
/// streamed from `endpoint` with `extra` (fault-free), runs 300 tokens or more, and that reply.
std::pair<uint64_t, sse_result> long_reply(const std::function<json(uint64_t)>& request,
                                           const std::string& endpoint,
                                           const std::function<std::vector<std::string>(uint64_t)>& extra =
                                               [](uint64_t) { return std::vector<std::string>{}; }) {
  for (uint64_t seed = 1; seed <= 16; ++seed) {
    auto r = sse(endpoint, request(seed), extra(seed));
    BOOST_REQUIRE_MESSAGE(r.result["done"] == true, r.result.dump());
    if (id_tokens(r.result["ids"]).back() >= 300) return {seed, r};
  }
  BOOST_FAIL("no seed of 1..16 gives a reply of 300 tokens");
  return {};
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_stream_goes_on_with_last_event_id_on_another_node_after_its_node_is_killed) {
  trio t;
  auto [seed, reference] = long_reply(long_chat, t.http("c"));
  auto req = long_chat(seed);
  // c's group acknowledged the turns it served, and b keeps copies of c's sessions (GET /metrics).
  BOOST_TEST(metric(t.nodes["c"]->url("/metrics"), "keel_acknowledgement_seconds_count") > 0);
  BOOST_TEST(metric(t.nodes["b"]->url("/metrics"), "keel_sessions_replicated") > 0);
  BOOST_TEST(metric(t.nodes["c"]->url("/metrics"), "keel_sessions_owned") > 0);

  // The client reaches a (which opens the session and owns it); a is killed after 40 events;
  // the client reconnects to b with Last-Event-ID.
  auto cut = sse(t.http("a") + "," + t.http("b"), req, {}, [&](size_t) {
    t.nodes["a"]->proc->signal(SIGKILL);
  }, 40);
  BOOST_REQUIRE_MESSAGE(cut.result["done"] == true, cut.result.dump());
  BOOST_TEST(cut.result["reconnects"].get<int>() >= 1);
  BOOST_TEST(cut.result["text"] == reference.result["text"]);
  BOOST_TEST(cut.result["finish_reason"] == reference.result["finish_reason"]);
  auto tokens = id_tokens(cut.result["ids"]);
  BOOST_TEST(strictly_growing(tokens));  // no event twice
  BOOST_TEST(tokens.back() == id_tokens(reference.result["ids"]).back());
}

namespace {

/// Turn 1 of a session that node a opened (a owns it), streamed from node b, which forwards it
/// to a; `fault` (SIGKILL, SIGSTOP) hits a after 40 events. b must resume the turn from the
/// next owner by itself: the client never reconnects, and the text equals the same two turns
/// run fault-free on c.
void owner_fails_under_a_forwarded_stream(trio& t, int fault) {
  // A session's sampling is its first request's (the seed among it).
  auto first = [](uint64_t seed) {
    auto j = chat("Hello", 2, seed);
    j["model"] = "slow.gguf";
    return j;
  };
  auto open_on = [&](const std::string& name, uint64_t seed) {
    auto r = post("http://" + t.http(name) + "/v1/chat/completions", first(seed).dump());
    BOOST_REQUIRE_MESSAGE(r.status == 200, r.body);
    return r;
  };
  std::map<uint64_t, http_reply> ref_open;
  auto [seed, reference] = long_reply(long_chat, t.http("c"), [&](uint64_t s) {
    ref_open[s] = open_on("c", s);
    return std::vector<std::string>{"--session", ref_open[s].headers["keel-session"]};
  });
  auto opened = open_on("a", seed);
  BOOST_REQUIRE(parse(opened)["choices"] == parse(ref_open[seed])["choices"]);
  auto cut = sse(t.http("b"), long_chat(seed), {"--session", opened.headers["keel-session"]},
                 [&](size_t) { t.nodes["a"]->proc->signal(fault); }, 40);
  if (fault == SIGSTOP) t.nodes["a"]->proc->signal(SIGCONT);
  BOOST_REQUIRE_MESSAGE(cut.result["done"] == true, cut.result.dump());
  BOOST_TEST(cut.result["reconnects"] == 0);
  BOOST_TEST(cut.result["text"] == reference.result["text"]);
  BOOST_TEST(strictly_growing(id_tokens(cut.result["ids"])));
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_stream_through_a_node_whose_owner_dies_goes_on_without_a_reconnect) {
  trio t;
  owner_fails_under_a_forwarded_stream(t, SIGKILL);
}

BOOST_AUTO_TEST_CASE(a_stream_through_a_node_whose_owner_hangs_goes_on_from_the_next_owner) {
  trio t;
  // a's connections stay open and silent: b notices the silence (no token, and no answer to
  // `info`, for its call timeout) and resumes the turn from whichever node took it over.
  owner_fails_under_a_forwarded_stream(t, SIGSTOP);
}
