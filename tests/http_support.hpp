#pragma once

// HTTP exchanges for tests of the HTTP port, through curl (a real client): tests/http_test.cpp,
// tests/openai_http_test.cpp.

#include <cctype>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <boost/test/unit_test.hpp>
#include <nlohmann/json.hpp>

#include "tests/process.hpp"

namespace keel::test {

/// One HTTP exchange through curl: the status, the headers (lower-case names) and the body.
struct http_reply {
  int status = 0;
  std::map<std::string, std::string> headers;
  std::string body;
};

inline http_reply curl(const std::string& url, std::vector<std::string> extra = {}) {
  std::vector<std::string> argv = {"/usr/bin/curl", "-sS", "-i", "--max-time", "10"};
  argv.insert(argv.end(), extra.begin(), extra.end());
  argv.push_back(url);
  auto r = run(argv);
  BOOST_REQUIRE_MESSAGE(r.status == 0, "curl " << url << " failed: " << r.err);
  http_reply out;
  auto end = r.out.find("\r\n\r\n");
  BOOST_REQUIRE_MESSAGE(end != std::string::npos, "no header in: " << r.out);
  std::istringstream head(r.out.substr(0, end));
  std::string line;
  std::getline(head, line);
  out.status = std::stoi(line.substr(line.find(' ') + 1, 3));
  while (std::getline(head, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    for (auto& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    out.headers[name] = line.substr(line.find_first_not_of(' ', colon + 1));
  }
  out.body = r.out.substr(end + 4);
  return out;
}

/// Checks an OpenAI-style error body: {"error": {"message", "type", "code"}}.
inline void check_openai_error(const http_reply& r, const std::string& code,
                               const std::string& type = "invalid_request_error") {
  auto j = nlohmann::json::parse(r.body, nullptr, false);
  BOOST_REQUIRE_MESSAGE(!j.is_discarded(), "not JSON: " << r.body);
  BOOST_REQUIRE(j.contains("error"));
  BOOST_TEST(j["error"]["message"].is_string());
  BOOST_TEST(!j["error"]["message"].get<std::string>().empty());
  BOOST_TEST(j["error"]["type"].get<std::string>() == type);
  BOOST_TEST(j["error"]["code"].get<std::string>() == code);
}

}  // namespace keel::test
