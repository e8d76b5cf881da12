// libFuzzer target: wire::decode of a stored session record (wire/checkpoint.capnp), the bytes a
// peer sends as `replicate`'s `record` and a takeover later decodes (docs/wire.md, "Fuzzing").
//
// Properties, for any input: decode returns a checkpoint or `corrupt_record` (no crash, no
// sanitizer report, no other error class); what decodes re-encodes to bytes that decode to the
// same checkpoint, and encoding that again gives the same bytes.

#include <bit>
#include <cstdint>
#include <string>
#include <string_view>

#include "base/error.hpp"
#include "tests/fuzz/fuzz_support.hpp"
#include "wire/checkpoint.hpp"

using namespace keel;

namespace {

/// Field by field; floats by their bits, so that a NaN that got through compares equal to itself.
bool same(const wire::session_checkpoint& a, const wire::session_checkpoint& b) {
  auto bits = [](float x) { return std::bit_cast<uint32_t>(x); };
  auto& p = a.params;
  auto& q = b.params;
  if (a.id != b.id || a.number != b.number || a.priority != b.priority || a.owner != b.owner ||
      bits(p.temperature) != bits(q.temperature) || p.top_k != q.top_k ||
      bits(p.top_p) != bits(q.top_p) || bits(p.min_p) != bits(q.min_p) ||
      bits(p.repetition_penalty) != bits(q.repetition_penalty) ||
      p.repetition_window != q.repetition_window || p.seed != q.seed ||
      a.turns.size() != b.turns.size())
    return false;
  for (size_t i = 0; i < a.turns.size(); ++i) {
    auto& s = a.turns[i];
    auto& t = b.turns[i];
    if (s.turn != t.turn || s.user != t.user || s.max_tokens != t.max_tokens || s.done != t.done ||
        s.reason != t.reason || s.messages != t.messages || s.chat_template != t.chat_template)
      return false;
  }
  return true;
}

wire::turn_checkpoint turn(uint64_t n, std::vector<int32_t> user, bool done, finish_reason r) {
  wire::turn_checkpoint t;
  t.turn = n;
  t.user = std::move(user);
  t.max_tokens = 16;
  t.done = done;
  t.reason = r;
  return t;
}

fuzz::seeds checkpoint_seeds() {
  fuzz::seeds out;
  wire::session_checkpoint c;
  c.id = "s-1";
  out.emplace_back("bare", wire::encode(c));
  c.number = 7;
  c.priority = -3;
  c.owner = "node-a";
  c.params.temperature = 0.8f;
  c.params.top_k = 40;
  c.params.top_p = 0.95f;
  c.params.min_p = 0.05f;
  c.params.repetition_penalty = 1.1f;
  c.params.repetition_window = 32;
  c.params.seed = 42;
  c.turns.push_back(turn(0, {1, 15043, 3186}, true, finish_reason::eos));
  out.emplace_back("one-turn-done", wire::encode(c));
  c.turns.push_back(turn(1, {29871, 13}, true, finish_reason::length));
  c.turns.push_back(turn(2, {}, false, finish_reason::length));
  out.emplace_back("three-turns-last-running", wire::encode(c));
  c.turns.back().done = true;
  c.turns.back().reason = finish_reason::failed;
  c.owner = std::string(300, 'n');
  out.emplace_back("long-owner", wire::encode(c));
  // A chat session: messages on every turn, the template on the first.
  wire::session_checkpoint chat;
  chat.id = "s-chat";
  chat.turns.push_back(turn(0, {1, 2, 3}, true, finish_reason::eos));
  chat.turns[0].messages = {{"system", "Be brief."}, {"user", "Hi <|im_end|>"}};
  chat.turns[0].chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}";
  chat.turns.push_back(turn(1, {4}, false, finish_reason::length));
  chat.turns[1].messages = {{"user", "More"}};
  out.emplace_back("chat-turns", wire::encode(chat));
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  fuzz::write_corpus_if_asked(*argc, *argv, checkpoint_seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto c = wire::decode(bytes);
  if (!c) {
    if (code_of(c.error()) != errc::corrupt_record)
      fuzz::broken("decode failed with " + describe(c.error()) + ", not corrupt_record");
    return 0;
  }
  auto again = wire::encode(*c);
  auto d = wire::decode(again);
  if (!d)
    fuzz::broken("a decoded checkpoint re-encodes to bytes that fail: " + describe(d.error()));
  if (!same(*c, *d)) fuzz::broken("a decoded checkpoint re-encodes to a different one");
  if (wire::encode(*d) != again) fuzz::broken("encoding the same checkpoint twice differs");
  return 0;
}
