#include "wire/checkpoint.hpp"

#include <cstring>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/exception.h>

#include "wire/checkpoint.capnp.h"

namespace keel::wire {

namespace {

using stored::SessionCheckpoint;

SessionCheckpoint::FinishReason to_stored(finish_reason r) {
  switch (r) {
    case finish_reason::length:
      return SessionCheckpoint::FinishReason::LENGTH;
    case finish_reason::eos:
      return SessionCheckpoint::FinishReason::EOS;
    case finish_reason::context:
      return SessionCheckpoint::FinishReason::CONTEXT;
    case finish_reason::cancelled:
      return SessionCheckpoint::FinishReason::CANCELLED;
    case finish_reason::overloaded:
      return SessionCheckpoint::FinishReason::OVERLOADED;
    case finish_reason::failed:
      return SessionCheckpoint::FinishReason::FAILED;
    case finish_reason::filtered:
      return SessionCheckpoint::FinishReason::FILTERED;
  }
  return SessionCheckpoint::FinishReason::FAILED;
}

caf::error corrupt(const std::string& what) {
  return make_error(errc::corrupt_record, "session checkpoint" + what);
}

}  // namespace

std::string encode(const session_checkpoint& c) {
  capnp::MallocMessageBuilder msg;
  auto root = msg.initRoot<SessionCheckpoint>();
  bool keeps = false;
  for (auto& t : c.turns) keeps = keeps || t.keep >= 0;
  root.setFormatVersion(keeps ? checkpoint_format_version_keep : checkpoint_format_version);
  root.setId(c.id);
  root.setNumber(c.number);
  auto p = root.initParams();
  p.setTemperature(c.params.temperature);
  p.setTopK(c.params.top_k);
  p.setTopP(c.params.top_p);
  p.setMinP(c.params.min_p);
  p.setRepetitionPenalty(c.params.repetition_penalty);
  p.setRepetitionWindow(c.params.repetition_window);
  p.setSeed(c.params.seed);
  root.setPriority(c.priority);
  root.setOwner(c.owner);
  root.setTenant(c.tenant);
  root.setModel(c.model);
  root.setModelDigest(c.model_digest);
  root.setContextLimit(c.context_limit);
  auto turns = root.initTurns(static_cast<unsigned>(c.turns.size()));
  for (size_t i = 0; i < c.turns.size(); ++i) {
    auto& t = c.turns[i];
    auto out = turns[static_cast<unsigned>(i)];
    out.setTurn(t.turn);
    auto user = out.initUser(static_cast<unsigned>(t.user.size()));
    for (size_t k = 0; k < t.user.size(); ++k) user.set(static_cast<unsigned>(k), t.user[k]);
    out.setMaxTokens(t.max_tokens);
    out.setDone(t.done);
    out.setReason(to_stored(t.reason));
    if (!t.messages.empty()) {
      auto messages = out.initMessages(static_cast<unsigned>(t.messages.size()));
      for (size_t k = 0; k < t.messages.size(); ++k) {
        auto m = messages[static_cast<unsigned>(k)];
        m.setRole(t.messages[k].role);
        m.setContent(t.messages[k].content);
      }
    }
    if (!t.chat_template.empty()) out.setChatTemplate(t.chat_template);
    out.setKeep(t.keep);
  }
  auto words = capnp::messageToFlatArray(msg);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

caf::expected<session_checkpoint> decode(std::string_view bytes) {
  if (bytes.empty() || bytes.size() % sizeof(capnp::word) != 0) {
    return corrupt(": " + std::to_string(bytes.size()) +
                   " bytes, not a whole number of 8-byte words");
  }
  // The payload comes from a std::string, which guarantees no 8-byte alignment: copy.
  auto words = kj::heapArray<capnp::word>(bytes.size() / sizeof(capnp::word));
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  session_checkpoint c;
  try {
    capnp::FlatArrayMessageReader msg(words);
    auto root = msg.getRoot<SessionCheckpoint>();
    if (root.getFormatVersion() != checkpoint_format_version &&
        root.getFormatVersion() != checkpoint_format_version_keep) {
      return corrupt(": format version " + std::to_string(root.getFormatVersion()) +
                     ", this build reads versions " + std::to_string(checkpoint_format_version) +
                     " and " + std::to_string(checkpoint_format_version_keep));
    }
    c.id = root.getId();
    if (c.id.empty()) return corrupt(": empty session id");
    c.number = root.getNumber();
    auto p = root.getParams();
    c.params.temperature = p.getTemperature();
    c.params.top_k = p.getTopK();
    c.params.top_p = p.getTopP();
    c.params.min_p = p.getMinP();
    c.params.repetition_penalty = p.getRepetitionPenalty();
    c.params.repetition_window = p.getRepetitionWindow();
    c.params.seed = p.getSeed();
    if (auto err = validate(c.params))
      return corrupt(" " + c.id + ": sampling parameters: " + describe(err));
    c.priority = root.getPriority();
    c.owner = root.getOwner();
    c.tenant = root.getTenant();
    c.model = root.getModel();
    c.model_digest = root.getModelDigest();
    c.context_limit = root.getContextLimit();
    // A list of structs may claim far more elements than the bytes hold (a struct whose fields
    // are all default takes no bytes; Cap'n Proto only charges such lists against its 64 MiB
    // traversal limit). Every turn and every message Keel writes takes at least one word of its
    // own, so more of them, all lists together, than the input has words is corruption, refused
    // before anything is allocated for them.
    const size_t word_count = bytes.size() / sizeof(capnp::word);
    size_t elements = 0;
    auto over_budget = [&](size_t n) {
      elements += n;
      return elements > word_count;
    };
    auto refuse = [&](size_t n, const char* what) {
      return corrupt(" " + c.id + ": " + std::to_string(n) + " " + what + " in " +
                     std::to_string(word_count) + " words");
    };
    auto turns = root.getTurns();
    if (over_budget(turns.size())) return refuse(turns.size(), "turns");
    for (unsigned i = 0; i < turns.size(); ++i) {
      auto in = turns[i];
      turn_checkpoint t;
      t.turn = in.getTurn();
      if (t.turn != i) {
        return corrupt(" " + c.id + ": turn " + std::to_string(i) + " is numbered " +
                       std::to_string(t.turn));
      }
      for (auto x : in.getUser()) t.user.push_back(x);
      t.max_tokens = in.getMaxTokens();
      t.done = in.getDone();
      if (!t.done && i + 1 != turns.size()) {
        return corrupt(" " + c.id + ": turn " + std::to_string(i) +
                       " is not done but is not the last turn");
      }
      auto r = static_cast<uint16_t>(in.getReason());
      if (r > static_cast<uint16_t>(finish_reason::filtered)) {
        return corrupt(" " + c.id + ": turn " + std::to_string(i) + ": unknown finish reason " +
                       std::to_string(r));
      }
      t.reason = static_cast<finish_reason>(r);
      if (over_budget(in.getMessages().size()))
        return refuse(in.getMessages().size(), "messages");
      for (auto m : in.getMessages())
        t.messages.push_back({std::string(m.getRole()), std::string(m.getContent())});
      t.chat_template = in.getChatTemplate();
      if (!t.chat_template.empty() && t.messages.empty()) {
        return corrupt(" " + c.id + ": turn " + std::to_string(i) +
                       " has a chat template but no messages");
      }
      t.keep = in.getKeep();
      if (t.keep < -1 || (t.keep >= 0 && t.messages.empty())) {
        return corrupt(" " + c.id + ": turn " + std::to_string(i) + " keeps " +
                       std::to_string(t.keep) + " tokens (only a chat turn keeps some)");
      }
      c.turns.push_back(std::move(t));
    }
  } catch (const kj::Exception& e) {
    return corrupt(": " + std::string(e.getDescription().cStr()));
  }
  return c;
}

}  // namespace keel::wire
