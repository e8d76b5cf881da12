// The HTTP port (keel-node --http-listen, actors/http_api.hpp): probes, Prometheus metrics and
// the model list, asked with curl of real keel-node processes; bad requests get their status
// and the port keeps serving.

#define BOOST_TEST_MODULE http
#include <boost/test/unit_test.hpp>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "tests/http_support.hpp"
#include "tests/process.hpp"
#include "tests/test_support.hpp"

using namespace std::chrono_literals;
using keel::test::bin;
using keel::test::process;
using keel::test::run;
using keel::test::run_result;
using keel::test::check_openai_error;
using keel::test::curl;
using keel::test::http_reply;

namespace {

struct model_file {
  keel::test::temp_dir dir{"http_test-" + std::to_string(getpid())};
  std::string path = (dir.path / "model.gguf").string();
  model_file() { keel::test::write_model(path, keel::test::tiny_model()); }
};

/// The text after `tag` up to the end of its line in `text`.
std::string after(const std::string& text, const std::string& tag) {
  auto at = text.find(tag) + tag.size();
  return text.substr(at, text.find('\n', at) - at);
}

/// A keel-node on loopback with an HTTP port; `address` is its client port, `http` its HTTP one.
struct node {
  process proc;
  std::string address, http, peer;

  node(const std::string& model, std::vector<std::string> extra)
      : proc([&] {
          std::vector<std::string> a = {
              bin("keel-node"), "--listen", "127.0.0.1:0",   "--model",    model,
              "--threads",      "1",        "--http-listen", "127.0.0.1:0"};
          a.insert(a.end(), extra.begin(), extra.end());
          return a;
        }()) {
    BOOST_REQUIRE_MESSAGE(
        proc.wait_err([](const std::string& s) { return s.find("http on ") != s.npos; }, 20s),
        "keel-node did not start: " << proc.err());
    auto err = proc.err();
    address = after(err, "listening on ");
    http = after(err, "http on ");
    if (err.find("serving peers on ") != err.npos) peer = after(err, "serving peers on ");
  }
  ~node() { proc.stop(10s); }
};

// -- a small parser of the Prometheus text exposition format (0.0.4) -----------------------

struct sample {
  std::string name;
  std::map<std::string, std::string> labels;
  double value = 0;
};

struct exposition {
  std::map<std::string, std::string> type;  // family -> counter | gauge | histogram
  std::set<std::string> help;
  std::vector<sample> samples;

  /// The value of `name` with exactly `labels`; fails the test when absent.
  double get(const std::string& name, const std::map<std::string, std::string>& labels = {}) const {
    for (auto& s : samples)
      if (s.name == name && s.labels == labels) return s.value;
    BOOST_FAIL("no sample " << name);
    return 0;
  }
  bool has(const std::string& name) const {
    for (auto& s : samples)
      if (s.name == name) return true;
    return false;
  }
};

/// Parses `text`, checking what promtool's linter checks that a node could get wrong: every
/// sample belongs to a family declared with # HELP and # TYPE before it; names and labels are
/// well-formed; counters end in _total; a histogram has increasing `le` bounds ending in +Inf,
/// cumulative counts, _count equal to the +Inf bucket, and a _sum; no sample is repeated.
exposition parse_exposition(const std::string& text) {
  static const std::regex name_re("[a-zA-Z_:][a-zA-Z0-9_:]*");
  static const std::regex label_re(R"re(([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)")re");
  exposition x;
  std::set<std::string> seen;
  BOOST_REQUIRE_MESSAGE(!text.empty() && text.back() == '\n', "the exposition must end in \\n");
  std::istringstream in(text);
  std::string line;
  auto family_of = [&](const std::string& name) -> std::string {
    if (x.type.count(name)) return name;
    for (const char* suffix : {"_bucket", "_sum", "_count"}) {
      std::string s(suffix);
      if (name.size() > s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0) {
        auto base = name.substr(0, name.size() - s.size());
        if (x.type.count(base) && x.type[base] == "histogram") return base;
      }
    }
    return {};
  };
  while (std::getline(in, line)) {
    BOOST_REQUIRE_MESSAGE(!line.empty(), "an empty line in the exposition");
    if (line[0] == '#') {
      std::istringstream w(line);
      std::string hash, kind, name, rest;
      w >> hash >> kind >> name;
      std::getline(w, rest);
      BOOST_REQUIRE_MESSAGE(std::regex_match(name, name_re), "bad name in: " << line);
      if (kind == "HELP") {
        BOOST_REQUIRE_MESSAGE(x.help.insert(name).second, "HELP twice: " << name);
        BOOST_REQUIRE_MESSAGE(rest.size() > 1, "empty HELP: " << name);
      } else if (kind == "TYPE") {
        auto t = rest.substr(rest.find_first_not_of(' '));
        BOOST_REQUIRE_MESSAGE(t == "counter" || t == "gauge" || t == "histogram",
                              "type " << t << " of " << name);
        BOOST_REQUIRE_MESSAGE(!x.type.count(name), "TYPE twice: " << name);
        BOOST_REQUIRE_MESSAGE(x.help.count(name), "TYPE before HELP: " << name);
        if (t == "counter")
          BOOST_REQUIRE_MESSAGE(name.size() > 6 && name.substr(name.size() - 6) == "_total",
                                "counter " << name << " does not end in _total");
        x.type[name] = t;
      } else {
        BOOST_FAIL("unknown comment: " << line);
      }
      continue;
    }
    sample s;
    auto brace = line.find('{');
    auto space = line.rfind(' ');
    BOOST_REQUIRE_MESSAGE(space != std::string::npos, "no value: " << line);
    if (brace != std::string::npos && brace < space) {
      s.name = line.substr(0, brace);
      auto close = line.rfind('}');
      BOOST_REQUIRE_MESSAGE(close != std::string::npos && close + 1 == space, "labels: " << line);
      auto labels = line.substr(brace + 1, close - brace - 1);
      auto it = std::sregex_iterator(labels.begin(), labels.end(), label_re);
      size_t covered = 0;
      for (; it != std::sregex_iterator(); ++it) {
        BOOST_REQUIRE_MESSAGE(s.labels.emplace((*it)[1].str(), (*it)[2].str()).second,
                              "a label twice: " << line);
        covered += static_cast<size_t>(it->length());
      }
      covered += s.labels.empty() ? 0 : s.labels.size() - 1;  // the commas
      BOOST_REQUIRE_MESSAGE(covered == labels.size(), "malformed labels: " << line);
    } else {
      s.name = line.substr(0, space);
    }
    BOOST_REQUIRE_MESSAGE(std::regex_match(s.name, name_re), "bad name: " << line);
    auto value = line.substr(space + 1);
    char* end = nullptr;
    s.value = value == "+Inf" ? INFINITY : std::strtod(value.c_str(), &end);
    BOOST_REQUIRE_MESSAGE(value == "+Inf" || (end != nullptr && *end == '\0'), "value: " << line);
    auto family = family_of(s.name);
    BOOST_REQUIRE_MESSAGE(!family.empty(), "sample of an undeclared family: " << line);
    if (x.type[family] == "counter") BOOST_REQUIRE_MESSAGE(s.value >= 0, "negative: " << line);
    auto key = line.substr(0, space);
    BOOST_REQUIRE_MESSAGE(seen.insert(key).second, "a sample twice: " << line);
    x.samples.push_back(std::move(s));
  }
  // Histograms: cumulative buckets in increasing order, +Inf last and equal to _count.
  for (auto& [family, t] : x.type) {
    if (t != "histogram") continue;
    double last_le = -INFINITY, last_count = 0;
    bool inf = false;
    for (auto& s : x.samples) {
      if (s.name != family + "_bucket") continue;
      BOOST_REQUIRE_MESSAGE(s.labels.count("le"), family << " bucket without le");
      double le = s.labels["le"] == "+Inf" ? INFINITY : std::stod(s.labels["le"]);
      BOOST_REQUIRE_MESSAGE(le > last_le, family << ": le out of order");
      BOOST_REQUIRE_MESSAGE(s.value >= last_count, family << ": buckets not cumulative");
      last_le = le;
      last_count = s.value;
      inf = inf || std::isinf(le);
    }
    BOOST_REQUIRE_MESSAGE(inf, family << " has no +Inf bucket");
    BOOST_REQUIRE_MESSAGE(x.get(family + "_count") == last_count, family << ": _count != +Inf");
    BOOST_REQUIRE_MESSAGE(x.has(family + "_sum"), family << " has no _sum");
  }
  return x;
}

/// `promtool check metrics` on `text` when promtool is installed; says so when it is not.
void promtool_check(const std::string& text, const keel::test::temp_dir& dir) {
  if (std::system("command -v promtool >/dev/null 2>&1") != 0) {
    BOOST_TEST_MESSAGE("promtool check metrics: skipped (promtool is not on PATH)");
    return;
  }
  auto file = (dir.path / "metrics.txt").string();
  std::ofstream(file) << text;
  auto status = std::system(("promtool check metrics < " + file).c_str());
  BOOST_TEST(status == 0, "promtool check metrics failed on:\n" << text);
}

/// Sends `request` on a new connection to 127.0.0.1:`port` and reads until the node closes it
/// (or `limit` passes: "<timeout>" is appended).
std::string exchange(uint16_t port, const std::string& request, std::chrono::milliseconds limit) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  BOOST_REQUIRE(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof a) == 0);
  (void)!write(fd, request.data(), request.size());  // may fail half-way: the node closed it
  std::string out;
  auto until = std::chrono::steady_clock::now() + limit;
  while (true) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        until - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      out += "<timeout>";
      break;
    }
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, static_cast<int>(left.count())) <= 0) continue;
    char buf[4096];
    auto got = read(fd, buf, sizeof buf);
    if (got <= 0) break;  // closed (or reset)
    out.append(buf, static_cast<size_t>(got));
  }
  close(fd);
  return out;
}

/// A TCP port nothing listens on now (bound, read and closed).
uint16_t free_port() {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof a);
  socklen_t len = sizeof a;
  getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  close(fd);
  return ntohs(a.sin_port);
}

}  // namespace

BOOST_AUTO_TEST_CASE(probes_and_the_model_list_answer_and_bad_requests_get_their_status) {
  model_file m;
  node n(m.path, {});
  auto base = "http://" + n.http;

  auto health = curl(base + "/health");
  BOOST_TEST(health.status == 200);
  BOOST_TEST(health.body == "ok\n");
  auto ready = curl(base + "/ready");
  BOOST_TEST(ready.status == 200, ready.body);
  BOOST_TEST(ready.body == "ready\n");

  auto models = curl(base + "/v1/models");
  BOOST_TEST(models.status == 200);
  BOOST_TEST(models.headers["content-type"] == "application/json");
  auto j = nlohmann::json::parse(models.body);
  BOOST_TEST(j["object"].get<std::string>() == "list");
  BOOST_REQUIRE(j["data"].is_array());
  BOOST_REQUIRE(j["data"].size() == 1u);
  BOOST_TEST(j["data"][0]["id"].get<std::string>() == "model.gguf");
  BOOST_TEST(j["data"][0]["object"].get<std::string>() == "model");
  BOOST_TEST(j["data"][0]["owned_by"].get<std::string>() == "keel");

  auto missing = curl(base + "/v1/nothing?x=1");
  BOOST_TEST(missing.status == 404);
  check_openai_error(missing, "not_found");
  BOOST_TEST(missing.body.find("/v1/nothing") != std::string::npos, missing.body);

  auto post = curl(base + "/health", {"-X", "POST"});
  BOOST_TEST(post.status == 405);
  BOOST_TEST(post.headers["allow"] == "GET");
  check_openai_error(post, "method_not_allowed");
  auto del = curl(base + "/metrics", {"-X", "DELETE"});
  BOOST_TEST(del.status == 405);

  // A body over the limit (64 KiB), announced by its length and sent in chunks of unknown total
  // (100 kB: what is left unread after the answer fits the grace the node gives a client to
  // finish sending, so curl reads the answer rather than a reset).
  auto big = (m.dir.path / "big.bin").string();
  std::ofstream(big) << std::string(100000, 'x');
  auto sized = curl(base + "/v1/models", {"--data-binary", "@" + big, "-H", "Expect:"});
  BOOST_TEST(sized.status == 413);
  check_openai_error(sized, "request_too_large");
  // A length of 1 GiB announced, never sent: refused at once from the header alone.
  auto port = static_cast<uint16_t>(std::stoi(n.http.substr(n.http.rfind(':') + 1)));
  auto announced = exchange(
      port, "POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n", 5s);
  BOOST_TEST(announced.rfind("HTTP/1.1 413 ", 0) == 0, announced);
  BOOST_TEST(announced.find("<timeout>") == std::string::npos);  // and the connection closes
  auto chunked = curl(base + "/v1/models", {"--data-binary", "@" + big, "-H",
                                            "Transfer-Encoding: chunked", "-H", "Expect:"});
  BOOST_TEST(chunked.status == 413);
  // A small body is read and dropped: the request is answered as usual.
  auto small = curl(base + "/v1/models", {"-X", "GET", "--data-binary", "hello"});
  BOOST_TEST(small.status == 200);

  // Garbage that is not HTTP, and a header over kj-http's buffer, cost their own connection.
  auto http_port = port;
  auto junk = exchange(http_port, "\x01\x02 not http at all\r\n\r\n", 5s);
  BOOST_TEST(junk.rfind("HTTP/1.1 501 ", 0) == 0, junk);
  BOOST_TEST(junk.find("\"code\":\"bad_http_request\"") != std::string::npos, junk);
  auto huge = exchange(
      http_port,
      "GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + std::string(200000, 'a') + "\r\n\r\n", 5s);
  BOOST_TEST(huge.find("200 OK") == std::string::npos, huge.substr(0, 200));
  // A kept-alive connection idle after its answer is closed after the idle timeout (5 s).
  auto t0 = std::chrono::steady_clock::now();
  auto idle = exchange(http_port, "GET /health HTTP/1.1\r\nHost: x\r\n\r\n", 15s);
  auto idle_for = std::chrono::steady_clock::now() - t0;
  BOOST_TEST(idle.rfind("HTTP/1.1 200 OK", 0) == 0, idle);
  BOOST_TEST(idle.find("<timeout>") == std::string::npos);
  BOOST_TEST(idle_for > 4s);
  BOOST_TEST(idle_for < 10s);
  // A header that never ends is cut off after the header timeout (10 s), with no answer.
  auto slow = exchange(http_port, "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ", 30s);
  BOOST_TEST(slow.find("<timeout>") == std::string::npos, slow);

  // The node goes on serving.
  BOOST_TEST(curl(base + "/health").status == 200);
  BOOST_TEST(curl(base + "/ready").status == 200);
  BOOST_TEST(!n.proc.exited());
}

BOOST_AUTO_TEST_CASE(the_http_port_is_off_without_its_flag_and_loopback_only_without_keys) {
  model_file m;
  {
    process p({bin("keel-node"), "--listen", "127.0.0.1:0", "--model", m.path, "--threads", "1"});
    BOOST_REQUIRE(
        p.wait_err([](const std::string& s) { return s.find("listening on ") != s.npos; }, 20s));
    BOOST_TEST(p.err().find("http on") == std::string::npos, p.err());
    p.stop(10s);
  }
  auto r = run({bin("keel-node"), "--listen", "127.0.0.1:0", "--model", m.path, "--http-listen",
                "0.0.0.0:0"});
  BOOST_TEST(r.status != 0);
  BOOST_TEST(r.err.find("--http-listen 0.0.0.0:0") != std::string::npos, r.err);
}

BOOST_AUTO_TEST_CASE(metrics_are_valid_exposition_and_count_a_generate) {
  model_file m;
  node n(m.path, {});
  auto url = "http://" + n.http + "/metrics";

  auto before = curl(url);
  BOOST_TEST(before.status == 200);
  BOOST_TEST(before.headers["content-type"].rfind("text/plain; version=0.0.4", 0) == 0);
  auto x0 = parse_exposition(before.body);
  promtool_check(before.body, m.dir);
  for (const char* family :
       {"keel_requests_total", "keel_prompt_tokens_total", "keel_generated_tokens_total",
        "keel_time_to_first_token_seconds", "keel_sessions_owned", "keel_takeovers_total",
        "keel_supervision_restarts_total", "keel_queue_length", "keel_kv_pages_capacity",
        "keel_kv_pages_used", "keel_kv_pages_peak", "keel_ready", "keel_inter_token_seconds",
        "keel_acknowledgement_seconds"})
    BOOST_TEST(x0.type.count(family) == 1u, family);
  BOOST_TEST(x0.get("keel_requests_total", {{"outcome", "length"}}) == 0);
  BOOST_TEST(x0.get("keel_generated_tokens_total") == 0);
  BOOST_TEST(x0.get("keel_sessions_owned") == 0);
  BOOST_TEST(x0.get("keel_kv_pages_capacity") > 0);
  BOOST_TEST(x0.get("keel_kv_pages_used") == 0);
  BOOST_TEST(x0.get("keel_ready") == 1);

  auto g = run({bin("keel"), "generate", "--connect", n.address, "--prompt", "Once upon a time",
                "--max-tokens", "12", "--ids"});
  BOOST_REQUIRE_MESSAGE(g.status == 0, g.err);

  auto after_text = curl(url).body;
  auto x1 = parse_exposition(after_text);
  promtool_check(after_text, m.dir);
  double ended = x1.get("keel_requests_total", {{"outcome", "length"}}) +
                 x1.get("keel_requests_total", {{"outcome", "eos"}});
  BOOST_TEST(ended == 1);
  BOOST_TEST(x1.get("keel_requests_total", {{"outcome", "cut_off"}}) == 0);
  BOOST_TEST(x1.get("keel_prompt_tokens_total") > 0);
  BOOST_TEST(x1.get("keel_generated_tokens_total") >= 1);
  BOOST_TEST(x1.get("keel_generated_tokens_total") <= 12);
  BOOST_TEST(x1.get("keel_time_to_first_token_seconds_count") == 1);
  BOOST_TEST(x1.get("keel_time_to_first_token_seconds_sum") > 0);
  // One interval between each two tokens of the stream; no peers, nothing acknowledged.
  BOOST_TEST(x1.get("keel_inter_token_seconds_count") ==
             x1.get("keel_generated_tokens_total") - 1);
  BOOST_TEST(x1.get("keel_acknowledgement_seconds_count") == 0);
  BOOST_TEST(x1.get("keel_sessions_owned") == 1);
  // The session's id is never on the HTTP port.
  auto id_at = g.err.find("s-");
  if (id_at != std::string::npos)
    BOOST_TEST(after_text.find(g.err.substr(id_at, 26)) == std::string::npos);
}

BOOST_AUTO_TEST_CASE(ready_is_503_with_its_reason_until_a_majority_of_peers_answers) {
  model_file m;
  auto b_port = free_port();
  auto b_peer = "127.0.0.1:" + std::to_string(b_port);
  node a(m.path, {"--name", "a", "--peer-listen", "127.0.0.1:0", "--peers", "b=" + b_peer,
                  "--replicas", "1"});
  auto base = "http://" + a.http;
  auto r = curl(base + "/ready");
  BOOST_TEST(r.status == 503);
  BOOST_TEST(r.body.find("peers: 0 of 1 up") != std::string::npos, r.body);
  BOOST_TEST(std::count(r.body.begin(), r.body.end(), '\n') == 1);  // one line
  BOOST_TEST(curl(base + "/health").status == 200);                 // alive all the same
  auto x = parse_exposition(curl(base + "/metrics").body);
  BOOST_TEST(x.get("keel_ready") == 0);
  BOOST_TEST(x.get("keel_peer_up", {{"peer", "b"}}) == 0);

  node b(m.path,
         {"--name", "b", "--peer-listen", b_peer, "--peers", "a=" + a.peer, "--replicas", "1"});
  int status = 0;
  for (auto until = std::chrono::steady_clock::now() + 10s;
       std::chrono::steady_clock::now() < until && status != 200;) {
    status = curl(base + "/ready").status;
    if (status != 200) std::this_thread::sleep_for(100ms);
  }
  BOOST_TEST(status == 200);
  auto y = parse_exposition(curl(base + "/metrics").body);
  BOOST_TEST(y.get("keel_ready") == 1);
  BOOST_TEST(y.get("keel_peer_up", {{"peer", "b"}}) == 1);
}
