#include "actors/session_copy.hpp"

#include "wire/checkpoint.hpp"

namespace keel {

std::string session_meta(const session_record& r) {
  // The stored form without what changes: turns, owner, node-local number.
  auto c = to_checkpoint(r);
  c.turns.clear();
  c.owner.clear();
  c.number = 0;
  return wire::encode(c);
}

bool serves_model(const std::string& digest, const session_data& data) {
  if (data.meta.empty()) return true;
  auto meta = wire::decode(data.meta);
  return !meta || meta->model_digest.empty() || meta->model_digest == digest;
}

std::string turn_input(const turn_record& t) {
  // A checkpoint holding this one turn, not ended: the checkpoint format and its checks (which
  // number turns from 0: the turn's own number goes in the checkpoint's `number`).
  wire::session_checkpoint c;
  c.id = "turn";
  c.number = t.turn;
  c.turns.push_back(
      {0, t.user, t.max_tokens, false, finish_reason::length, t.messages, t.chat_template, t.keep});
  return wire::encode(c);
}

std::string turn_end(const turn_record& t) {
  return std::string(1, static_cast<char>(t.reason));
}

caf::expected<session_record> record_of(const std::string& id, const session_data& data,
                                        const std::string& self, uint64_t epoch) {
  auto meta = wire::decode(data.meta);
  if (!meta) {
    return make_error(errc::corrupt_record,
                      "session " + id + ": its parameters do not decode: " + message_of(meta.error()));
  }
  if (meta->id != id) {
    return make_error(errc::corrupt_record,
                      "session " + id + ": its parameters name session " + meta->id);
  }
  session_record r;
  r.id = id;
  r.params = meta->params;
  r.priority = meta->priority;
  r.tenant = meta->tenant;
  r.model = meta->model;
  r.model_digest = meta->model_digest;
  r.context_limit = static_cast<int32_t>(std::min<uint32_t>(meta->context_limit, 1u << 30));
  r.owner = self;
  r.epoch = epoch;
  r.from_copy = true;
  for (size_t k = 0; k < data.turns.size(); ++k) {
    auto& e = data.turns[k];
    auto in = wire::decode(e.user);
    if (!in || in->turns.size() != 1 || in->number != k) {
      return make_error(errc::corrupt_record,
                        "session " + id + ": the input of turn " + std::to_string(k) +
                            (in ? " is not that turn's" : " does not decode: " + message_of(in.error())));
    }
    turn_record t;
    t.turn = k;
    t.user = std::move(in->turns[0].user);
    t.max_tokens = in->turns[0].max_tokens;
    t.messages = std::move(in->turns[0].messages);
    t.chat_template = std::move(in->turns[0].chat_template);
    t.keep = in->turns[0].keep;
    t.generated = e.tokens;
    t.done = e.done;
    if (e.done) {
      auto why = e.end.empty() ? 0 : static_cast<uint8_t>(e.end[0]);
      if (why > static_cast<uint8_t>(finish_reason::filtered)) {
        return make_error(errc::corrupt_record, "session " + id + ": turn " + std::to_string(k) +
                                                    " ended for an unknown reason " +
                                                    std::to_string(why));
      }
      t.reason = static_cast<finish_reason>(why);
    }
    r.turns.push_back(std::move(t));
  }
  return r;
}

}  // namespace keel
