#define BOOST_TEST_MODULE node_log_test
#include <boost/test/unit_test.hpp>

// keel-node's log formats (apps/node_log.hpp): how a line's level and session are found, and a
// real keel-node started with --log-format json, whose stderr must be JSON objects only, one a
// line, with the fields docs/operations.md ("Logs") promises.

#include <signal.h>

#include <fstream>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "apps/node_log.hpp"
#include "tests/process.hpp"
#include "tests/test_support.hpp"

namespace {

using namespace std::chrono_literals;
using keel::cli::log_level;

bool contains(const std::string& s, const std::string& what) {
  return s.find(what) != std::string::npos;
}

const std::string id = "s-k3v7qa7m2x4bd6rtyw5pcfhe@node-1";

/// Every line of `text` parsed; a line that is not a JSON object fails the test, naming it.
std::vector<nlohmann::json> parse_lines(const std::string& text) {
  std::vector<nlohmann::json> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    BOOST_TEST((!j.is_discarded() && j.is_object()), "not a JSON object: " << line);
    if (!j.is_discarded()) out.push_back(std::move(j));
  }
  return out;
}

/// The first entry whose `key` holds `value` (null when none).
const nlohmann::json* find(const std::vector<nlohmann::json>& lines, const std::string& key,
                           const std::string& value) {
  for (auto& j : lines)
    if (j.contains(key) && j[key].is_string() && j[key].get<std::string>() == value) return &j;
  return nullptr;
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_session_id_is_found_in_free_text) {
  BOOST_TEST(keel::cli::session_in("a: took over session " + id + " at epoch 3") == id);
  BOOST_TEST(keel::cli::session_in("session " + id + ": the end of turn 2") == id);
  BOOST_TEST(keel::cli::session_in("drain: session " + id + ".") == id);
  BOOST_TEST(keel::cli::session_in("a/sessions/" + id) == id);
  // Not an id: too short, a character outside base32, inside a word, no node name.
  BOOST_TEST(keel::cli::session_in("session s-7@a") == "");
  BOOST_TEST(keel::cli::session_in("s-k3v7qa7m2x4bd6rtyw5pcfh1@a") == "");
  BOOST_TEST(keel::cli::session_in("xs-k3v7qa7m2x4bd6rtyw5pcfhe@a") == "");
  BOOST_TEST(keel::cli::session_in("s-k3v7qa7m2x4bd6rtyw5pcfhe@ x") == "");
}

BOOST_AUTO_TEST_CASE(levels_come_from_the_event_or_the_words_of_the_line) {
  BOOST_TEST(keel::cli::classify("a: took over session " + id, "node").level == log_level::info);
  BOOST_TEST(keel::cli::classify("warning: the session store is readable", "").level ==
             log_level::warning);
  BOOST_TEST(keel::cli::classify("a: cannot serve session " + id + ": x", "node").level ==
             log_level::warning);
  BOOST_TEST(keel::cli::classify("node not ready: its root supervisor exited", "node").level ==
             log_level::error);

  keel::supervision_event e{
      keel::supervision_event_kind::exited, "a/sessions/" + id, "runtime_error: boom", {}, 1};
  auto x = keel::cli::from_event(e, "supervisor: a/sessions/... exited");
  BOOST_TEST(x.level == log_level::warning);
  BOOST_TEST(x.actor == "a/sessions/" + id);
  BOOST_TEST(x.session == id);
  BOOST_TEST(x.event == "exited");
  BOOST_TEST(x.reason == "runtime_error: boom");
  e.reason = "user_shutdown";
  BOOST_TEST((keel::cli::from_event(e, "").level == log_level::info));
  e.kind = keel::supervision_event_kind::escalated;
  BOOST_TEST((keel::cli::from_event(e, "").level == log_level::error));
}

BOOST_AUTO_TEST_CASE(a_json_line_holds_every_field_and_stays_valid_with_bytes_that_are_not_utf8) {
  keel::cli::node_log log("keel-node", keel::cli::log_format::json);
  log.set_node("a");
  keel::cli::log_entry e;
  e.level = log_level::warning;
  e.message = "bad \xff byte \"quoted\"\n";
  e.actor = "a/engine/shard-0";
  e.session = id;
  auto j = nlohmann::json::parse(log.render(e));
  BOOST_TEST(j["level"] == "warning");
  BOOST_TEST(j["program"] == "keel-node");
  BOOST_TEST(j["node"] == "a");
  BOOST_TEST(j["actor"] == "a/engine/shard-0");
  BOOST_TEST(j["session"] == id);
  BOOST_TEST(j["message"] == "bad \xef\xbf\xbd byte \"quoted\"\n");
  BOOST_TEST(!j.contains("event"));  // empty fields are left out
  BOOST_TEST(std::regex_match(j["time"].get<std::string>(),
                              std::regex(R"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)")),
             j["time"]);
  keel::cli::node_log text("keel-node", keel::cli::log_format::text);
  BOOST_TEST(text.render(e) == "keel-node: " + e.message);
}

BOOST_AUTO_TEST_CASE(a_bad_log_format_is_refused_naming_the_flag_and_the_value) {
  auto r = keel::test::run({keel::test::bin("keel-node"), "--listen", "127.0.0.1:0", "--model",
                            "m.gguf", "--log-format", "xml"});
  BOOST_TEST(r.status == 2);
  BOOST_TEST(contains(r.err, "--log-format xml: expected text or json"), r.err);
}

BOOST_AUTO_TEST_CASE(a_node_with_json_logs_writes_only_json_lines_with_its_fields) {
  keel::test::temp_dir dir("node_log_test-node");
  auto model = keel::test::write_model(dir.path / "tiny.gguf", keel::test::tiny_model());
  const std::string key = "node-log-test-key";
  auto key_file = keel::test::secret_file(key);
  keel::test::process node({keel::test::bin("keel-node"), "--name", "n1", "--listen", "127.0.0.1:0",
                            "--model", model, "--threads", "1", "--admin-listen", "127.0.0.1:0",
                            "--admin-key-file", key_file, "--data", (dir.path / "data").string(),
                            "--log-format", "json"});
  // "admin on ADDRESS" is the last line of the start.
  const std::string tag = "\"message\":\"admin on ";
  BOOST_REQUIRE_MESSAGE(node.wait_err([&](const std::string& s) { return contains(s, tag); }, 30s),
                        node.err());
  auto err = node.err();
  auto at = err.find(tag) + tag.size();
  auto admin = err.substr(at, err.find_first_of(" \"", at) - at);

  // A fault through the admin API: the supervisor's lines name the actor.
  auto shell = keel::test::run({keel::test::bin("keel-shell"), "--connect", admin, "--key-file",
                                key_file, "-c", "kill n1/engine/shard-0"});
  BOOST_REQUIRE_MESSAGE(shell.status == 0, shell.out + shell.err);
  BOOST_REQUIRE_MESSAGE(node.wait_err(
                            [](const std::string& s) {
                              return contains(s, "\"actor\":\"n1/engine/shard-0\"") &&
                                     contains(s, "\"event\":\"restarted\"");
                            },
                            30s),
                        node.err());
  node.signal(SIGTERM);
  auto st = node.wait(60s);
  BOOST_REQUIRE(st.has_value());
  BOOST_TEST(*st == 0, node.err());
  node.wait_err([](const std::string&) { return false; }, 5s);  // the output ended

  auto lines = parse_lines(node.err());
  BOOST_TEST(lines.size() >= 8u, node.err());
  for (auto& j : lines) {
    for (auto* k : {"time", "level", "program", "node", "message"})
      BOOST_TEST((j.contains(k) && j[k].is_string()), k << " missing in " << j.dump());
    BOOST_TEST(j.value("program", "") == "keel-node", j.dump());
    BOOST_TEST(j.value("node", "") == "n1", j.dump());
    auto level = j.value("level", "");
    BOOST_TEST((level == "info" || level == "warning" || level == "error"), j.dump());
  }
  auto listening = std::find_if(lines.begin(), lines.end(), [](const nlohmann::json& j) {
    return j.value("message", "").rfind("listening on 127.0.0.1:", 0) == 0;
  });
  BOOST_TEST((listening != lines.end()), node.err());
  auto exited = find(lines, "event", "exited");
  BOOST_REQUIRE_MESSAGE(exited, node.err());
  BOOST_TEST((*exited)["actor"] == "n1/engine/shard-0");
  BOOST_TEST((*exited)["component"] == "supervisor");
  BOOST_TEST((*exited)["level"] == "warning");
  BOOST_TEST(find(lines, "message", "stopped") != nullptr, node.err());
}
