// The OpenAI-style API's requests, texts and event ids apart from any I/O (actors/openai.hpp):
// every field checked and named in its error, text released only at settled token boundaries,
// stop strings cut across tokens.

#define BOOST_TEST_MODULE openai
#include <boost/test/unit_test.hpp>

#include <string>
#include <vector>

#include "actors/openai.hpp"
#include "base/error.hpp"

using namespace keel;
using namespace keel::openai;

namespace {

std::string refusal(endpoint kind, const std::string& body) {
  auto r = parse(kind, body);
  if (r) return "(accepted)";
  BOOST_TEST((code_of(r.error()) == errc::bad_request));
  return message_of(r.error());
}

bool names(const std::string& message, const std::string& what) {
  return message.find(what) != std::string::npos;
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_chat_request_takes_openai_fields_and_defaults) {
  auto r = parse(endpoint::chat, R"({"model": "m.gguf", "messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "you"}]}],
      "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": -1, "stop": "END",
      "stream": true, "stream_options": {"include_usage": true}, "n": 1, "user": "u",
      "presence_penalty": 0, "top_k": 40, "priority": 5})");
  BOOST_REQUIRE_MESSAGE(r, (r ? std::string() : describe(r.error())));
  BOOST_TEST(r->model == "m.gguf");
  BOOST_TEST(r->messages.size() == 2u);
  BOOST_TEST(r->messages[1].content == "Hi you");
  BOOST_TEST(*r->max_tokens == 7);
  BOOST_TEST(r->sampling.temperature == 0.5f);
  BOOST_TEST(r->sampling.top_p == 0.9f);
  BOOST_TEST(r->sampling.top_k == 40);
  BOOST_TEST(r->seed_given);
  BOOST_TEST(r->sampling.seed == UINT64_MAX);
  BOOST_TEST(r->stop == std::vector<std::string>{"END"});
  BOOST_TEST(r->stream);
  BOOST_TEST(r->include_usage);
  BOOST_TEST(r->priority == 5);

  auto d = parse(endpoint::chat, R"({"messages": [{"role": "user", "content": "x"}], "seed": null})");
  BOOST_REQUIRE(d);
  BOOST_TEST(d->sampling.temperature == 1.0f);  // OpenAI's default, not greedy
  BOOST_TEST(!d->max_tokens.has_value());       // to the context's end
  BOOST_TEST(!d->seed_given);
  BOOST_TEST(!d->stream);
  auto c = parse(endpoint::completion, R"({"prompt": ["Once"]})");
  BOOST_REQUIRE(c);
  BOOST_TEST(c->prompt == "Once");
  BOOST_TEST(*c->max_tokens == 16);  // OpenAI's default for completions
}

BOOST_AUTO_TEST_CASE(a_bad_request_is_refused_naming_the_field_and_the_value) {
  auto chat = endpoint::chat;
  BOOST_TEST(names(refusal(chat, "{"), "not JSON"));
  BOOST_TEST(names(refusal(chat, "\"x\""), "a JSON object"));
  BOOST_TEST(names(refusal(chat, "{}"), "messages is required"));
  BOOST_TEST(names(refusal(chat, R"({"messages": {}})"), "messages must be an array"));
  BOOST_TEST(names(refusal(chat, R"({"messages": [3]})"), "messages[0] must be an object"));
  BOOST_TEST(names(refusal(chat, R"({"messages": [{"content": "x"}]})"), "messages[0].role"));
  BOOST_TEST(names(refusal(chat, R"({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})"),
                   "'tool_calls'"));
  BOOST_TEST(names(refusal(chat, R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})"),
                   "messages[0].content[0].type"));
  auto with = [](const std::string& field) {
    return R"({"messages": [{"role": "user", "content": "x"}], )" + field + "}";
  };
  BOOST_TEST(names(refusal(chat, with(R"("max_tokens": 0)")), "max_tokens must be in [1, "));
  BOOST_TEST(names(refusal(chat, with(R"("max_tokens": 1.5)")), "max_tokens must be an integer"));
  BOOST_TEST(names(refusal(chat, with(R"("max_tokens": 18446744073709551615)")), "max_tokens"));
  BOOST_TEST(names(refusal(chat, with(R"("max_tokens": 3, "max_completion_tokens": 4)")), "disagree"));
  BOOST_TEST(names(refusal(chat, with(R"("temperature": 2.5)")), "temperature must be in [0, 2], got 2.5"));
  BOOST_TEST(names(refusal(chat, with(R"("top_p": 0)")), "top_p must be in (0, 1], got 0"));
  BOOST_TEST(names(refusal(chat, with(R"("stop": "")")), "stop must not be empty"));
  BOOST_TEST(names(refusal(chat, with(R"("stop": [1])")), "stop[0] must be a string"));
  BOOST_TEST(names(refusal(chat, with(R"("stream_options": {"include_usage": true})")),
                   "only allowed with"));
  BOOST_TEST(names(refusal(chat, with(R"("n": 3)")), "n 3 is not supported"));
  BOOST_TEST(names(refusal(chat, with(R"("tools": [{"type": "function"}])")), "tools"));
  BOOST_TEST(names(refusal(chat, with(R"("frequency_penalty": 0.5)")), "frequency_penalty"));
  BOOST_TEST(names(refusal(chat, with(R"("stream": "yes")")), "stream must be a boolean"));
  BOOST_TEST(names(refusal(chat, with(R"("colour": "red")")), "unknown field 'colour'"));
  // Invalid UTF-8 is not JSON.
  BOOST_TEST(names(refusal(chat, "{\"messages\": [{\"role\": \"user\", \"content\": \"\xc3\x28\"}]}"),
                   "not JSON"));
  BOOST_TEST(names(refusal(endpoint::completion, R"({"prompt": ["a", "b"]})"), "one string"));
  BOOST_TEST(names(refusal(endpoint::completion, R"({"prompt": "a", "echo": true})"), "echo"));
  BOOST_TEST(names(refusal(endpoint::completion, R"({"messages": []})"), "prompt is required"));
}

BOOST_AUTO_TEST_CASE(text_waits_for_a_characters_end_and_bad_bytes_become_replacement) {
  text_stream t;
  // "é" (C3 A9) split across two tokens, then "€" (E2 82 AC) across three.
  BOOST_TEST(t.add("a\xc3") == "a");
  BOOST_TEST(!t.settled());
  BOOST_TEST(t.add("\xa9") == "\xc3\xa9");
  BOOST_TEST(t.settled());
  BOOST_TEST(t.add("\xe2") == "");
  BOOST_TEST(t.add("\x82") == "");
  BOOST_TEST(t.add("\xac!") == "\xe2\x82\xac!");
  // A byte that cannot start a character, and a character cut off by the end.
  BOOST_TEST(t.add("\xff") == "\xef\xbf\xbd");
  BOOST_TEST(t.add("\xe2\x82") == "");
  BOOST_TEST(t.finish() == "\xef\xbf\xbd");
  BOOST_TEST(valid_utf8("a\xc3\xa9"));
  BOOST_TEST(!valid_utf8("a\xc3"));
}

BOOST_AUTO_TEST_CASE(a_stop_string_across_tokens_cuts_the_text_before_it) {
  text_stream t({"STOP", "xyz"});
  BOOST_TEST(t.add("hello S") == "hello ");  // "S" may begin STOP
  BOOST_TEST(!t.settled());
  BOOST_TEST(t.add("T") == "");
  BOOST_TEST(t.add("AR") == "STAR");  // not STOP after all: released whole
  BOOST_TEST(t.settled());
  BOOST_TEST(t.add(" x") == " ");
  BOOST_TEST(t.add("yz and more") == "");
  BOOST_TEST(t.stopped());
  BOOST_TEST(t.add("more") == "");
  BOOST_TEST(t.finish() == "");

  // The earliest of two stop strings in one piece wins; what waits at the end goes out.
  text_stream u({"bb", "a"});
  BOOST_TEST(u.add("xxbbya") == "xx");
  text_stream v({"end"});
  BOOST_TEST(v.add("the en") == "the ");
  BOOST_TEST(v.finish() == "en");
}

BOOST_AUTO_TEST_CASE(event_ids_name_session_turn_and_tokens) {
  event_id e{"s-abc@node-1", 3, 41};
  BOOST_TEST(e.str() == "s-abc@node-1/3/41");
  auto back = event_id::parse(e.str());
  BOOST_REQUIRE(back);
  BOOST_TEST(back->session == e.session);
  BOOST_TEST(back->turn == 3u);
  BOOST_TEST(back->tokens == 41u);
  for (auto bad : {"", "x", "s/1", "/1/2", "s//2", "s/1/", "s/1/-2", "s/a/2", "s/1/2x",
                   "s/1/99999999999999999999999"}) {
    auto r = event_id::parse(bad);
    BOOST_TEST(!r, bad);
  }
}
