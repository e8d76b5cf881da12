#include "actors/ownership_codec.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>

#include <capnp/message.h>
#include <capnp/serialize.h>
#include <kj/array.h>
#include <kj/exception.h>

#include "wire/ownership.capnp.h"

namespace keel {

using namespace ownership_limits;

namespace {

constexpr int nesting_limit = 16;  // ours is 5 deep (message, write, data, turn, tokens)

// -- encoding -------------------------------------------------------------------------------------
// Every writer binds each field of its struct by name (a structured binding), so a field added
// to ownership.hpp stops the build here until it is encoded, instead of being dropped silently.

capnp::Text::Reader text(const std::string& s) {
  return {s.data(), s.size()};  // a std::string's data is NUL-terminated, as Text needs
}

capnp::Data::Reader blob(const std::string& s) {
  return {reinterpret_cast<const kj::byte*>(s.data()), s.size()};
}

unsigned count(size_t n) {
  return static_cast<unsigned>(n);
}

void put(wire::Ballot::Builder out, const ballot& b) {
  const auto& [epoch, owner] = b;
  out.setEpoch(epoch);
  out.setOwner(text(owner));
}

void put(wire::SessionData::Builder out, const session_data& d) {
  const auto& [meta, turns] = d;
  out.setMeta(blob(meta));
  auto list = out.initTurns(count(turns.size()));
  for (size_t i = 0; i < turns.size(); ++i) {
    const auto& [user, tokens, done, end] = turns[i];
    auto t = list[count(i)];
    t.setUser(blob(user));
    t.setTokens(kj::arrayPtr(tokens.data(), tokens.size()));
    t.setDone(done);
    t.setEnd(blob(end));
  }
}

void put(wire::HeartbeatMsg::Builder out, const heartbeat_msg& m) {
  const auto& [sent, claims] = m;
  out.setSent(sent);
  auto list = out.initClaims(count(claims.size()));
  for (size_t i = 0; i < claims.size(); ++i) {
    list[count(i)].setSession(text(claims[i].first));
    put(list[count(i)].initBallot(), claims[i].second);
  }
}

void put(wire::HeartbeatReply::Builder out, const heartbeat_reply& m) {
  const auto& [sent, promised] = m;
  out.setSent(sent);
  auto list = out.initPromised(count(promised.size()));
  for (size_t i = 0; i < promised.size(); ++i) put(list[count(i)], promised[i]);
}

void put(wire::PrepareMsg::Builder out, const prepare_msg& m) {
  const auto& [session, b, sent] = m;
  out.setSession(text(session));
  put(out.initB(), b);
  out.setSent(sent);
}

void put(wire::PromiseReply::Builder out, const promise_reply& m) {
  const auto& [session, b, sent, ok, promised, wait, accepted, data, starting] = m;
  out.setSession(text(session));
  put(out.initB(), b);
  out.setSent(sent);
  out.setOk(ok);
  put(out.initPromised(), promised);
  out.setWait(wait);
  put(out.initAccepted(), accepted);
  put(out.initData(), data);
  out.setStarting(starting);
}

void put(wire::WriteMsg::Builder out, const write_msg& m) {
  const auto& [session, b, seq, durable, data, sent] = m;
  out.setSession(text(session));
  put(out.initB(), b);
  out.setSeq(seq);
  out.setDurable(durable);
  put(out.initData(), data);
  out.setSent(sent);
}

void put(wire::WriteReply::Builder out, const write_reply& m) {
  const auto& [session, b, seq, durable, sent, ok, disk_failed, promised] = m;
  out.setSession(text(session));
  put(out.initB(), b);
  out.setSeq(seq);
  out.setDurable(durable);
  out.setSent(sent);
  out.setOk(ok);
  out.setDiskFailed(disk_failed);
  put(out.initPromised(), promised);
}

// Which union member each alternative of `ownership_msg` is.
void put(wire::OwnershipMsg::Builder out, const heartbeat_msg& m) {
  put(out.initHeartbeat(), m);
}
void put(wire::OwnershipMsg::Builder out, const heartbeat_reply& m) {
  put(out.initHeartbeatReply(), m);
}
void put(wire::OwnershipMsg::Builder out, const prepare_msg& m) {
  put(out.initPrepare(), m);
}
void put(wire::OwnershipMsg::Builder out, const promise_reply& m) {
  put(out.initPromise(), m);
}
void put(wire::OwnershipMsg::Builder out, const write_msg& m) {
  put(out.initWrite(), m);
}
void put(wire::OwnershipMsg::Builder out, const write_reply& m) {
  put(out.initWriteReply(), m);
}

std::string flat(capnp::MessageBuilder& msg) {
  auto words = capnp::messageToFlatArray(msg);
  auto bytes = words.asBytes();
  return std::string(reinterpret_cast<const char*>(bytes.begin()), bytes.size());
}

// -- decoding -------------------------------------------------------------------------------------
// Each reader calls every getter of its struct once: the traversal limit counts each call.

caf::error refuse(const std::string& what) {
  return make_error(errc::bad_request, what);
}

std::string str(capnp::Text::Reader t) {
  return std::string(t.begin(), t.size());
}

std::string str(capnp::Data::Reader d) {
  return std::string(reinterpret_cast<const char*>(d.begin()), d.size());
}

caf::error get_session(capnp::Text::Reader in, std::string& out, const std::string& what) {
  if (in.size() == 0) return refuse(what + ": empty session name");
  if (in.size() > max_session_name)
    return refuse(what + ": session name of " + std::to_string(in.size()) + " bytes, at most " +
                  std::to_string(max_session_name));
  if (std::memchr(in.begin(), 0, in.size()) != nullptr)
    return refuse(what + ": session name holds a NUL byte");
  out = str(in);
  return {};
}

caf::error get(wire::Ballot::Reader in, ballot& out, const std::string& what) {
  auto owner = in.getOwner();
  if (owner.size() > max_ballot_owner)
    return refuse(what + ": owner of " + std::to_string(owner.size()) + " bytes, at most " +
                  std::to_string(max_ballot_owner));
  out.epoch = in.getEpoch();
  out.owner = str(owner);
  return {};
}

caf::error get(wire::SessionData::Reader in, session_data& out, const std::string& what) {
  auto turns = in.getTurns();
  if (turns.size() > max_turns)
    return refuse(what + ": " + std::to_string(turns.size()) + " turns, at most " +
                  std::to_string(max_turns));
  out.meta = str(in.getMeta());
  out.turns.reserve(turns.size());
  for (unsigned i = 0; i < turns.size(); ++i) {
    auto t = turns[i];
    auto tokens = t.getTokens();
    if (tokens.size() > max_turn_tokens)
      return refuse(what + ": turn " + std::to_string(i) + " has " + std::to_string(tokens.size()) +
                    " tokens, at most " + std::to_string(max_turn_tokens));
    turn_entry e;
    e.user = str(t.getUser());
    e.tokens.reserve(tokens.size());
    for (auto x : tokens) e.tokens.push_back(x);
    e.done = t.getDone();
    e.end = str(t.getEnd());
    out.turns.push_back(std::move(e));
  }
  return {};
}

caf::error get(wire::HeartbeatMsg::Reader in, heartbeat_msg& out, const std::string& what) {
  out.sent = in.getSent();
  auto claims = in.getClaims();
  out.claims.reserve(claims.size());
  for (unsigned i = 0; i < claims.size(); ++i) {
    auto c = claims[i];
    auto where = what + ": claim " + std::to_string(i);
    std::pair<std::string, ballot> claim;
    if (auto err = get_session(c.getSession(), claim.first, where)) return err;
    if (auto err = get(c.getBallot(), claim.second, where + ": ballot")) return err;
    out.claims.push_back(std::move(claim));
  }
  return {};
}

caf::error get(wire::HeartbeatReply::Reader in, heartbeat_reply& out, const std::string& what) {
  out.sent = in.getSent();
  auto promised = in.getPromised();
  out.promised.resize(promised.size());
  for (unsigned i = 0; i < promised.size(); ++i)
    if (auto err = get(promised[i], out.promised[i], what + ": promised " + std::to_string(i)))
      return err;
  return {};
}

caf::error get(wire::PrepareMsg::Reader in, prepare_msg& out, const std::string& what) {
  if (auto err = get_session(in.getSession(), out.session, what)) return err;
  if (auto err = get(in.getB(), out.b, what + ": ballot")) return err;
  out.sent = in.getSent();
  return {};
}

caf::error get(wire::PromiseReply::Reader in, promise_reply& out, const std::string& what) {
  if (auto err = get_session(in.getSession(), out.session, what)) return err;
  if (auto err = get(in.getB(), out.b, what + ": ballot")) return err;
  out.sent = in.getSent();
  out.ok = in.getOk();
  if (auto err = get(in.getPromised(), out.promised, what + ": promised ballot")) return err;
  out.wait = in.getWait();
  if (auto err = get(in.getAccepted(), out.accepted, what + ": accepted ballot")) return err;
  if (auto err = get(in.getData(), out.data, what)) return err;
  out.starting = in.getStarting();
  return {};
}

caf::error get(wire::WriteMsg::Reader in, write_msg& out, const std::string& what) {
  if (auto err = get_session(in.getSession(), out.session, what)) return err;
  if (auto err = get(in.getB(), out.b, what + ": ballot")) return err;
  out.seq = in.getSeq();
  out.durable = in.getDurable();
  if (auto err = get(in.getData(), out.data, what)) return err;
  out.sent = in.getSent();
  return {};
}

caf::error get(wire::WriteReply::Reader in, write_reply& out, const std::string& what) {
  if (auto err = get_session(in.getSession(), out.session, what)) return err;
  if (auto err = get(in.getB(), out.b, what + ": ballot")) return err;
  out.seq = in.getSeq();
  out.durable = in.getDurable();
  out.sent = in.getSent();
  out.ok = in.getOk();
  out.disk_failed = in.getDiskFailed();
  if (auto err = get(in.getPromised(), out.promised, what + ": promised ballot")) return err;
  return {};
}

constexpr const char* msg_what = "ownership message";
constexpr const char* stored_what = "stored session";

/// The alternative `M` from a union member: refused when the member has no body (a null
/// pointer: no encoder of ours writes one).
template <class M, class Reader>
caf::error alternative(bool present, Reader in, const char* kind, ownership_msg& out) {
  auto what = std::string(msg_what) + ": " + kind;
  if (!present) return refuse(what + " without a body");
  M m;
  if (auto err = get(in, m, what)) return err;
  out = std::move(m);
  return {};
}

caf::error get(wire::OwnershipMsg::Reader in, ownership_msg& out, const std::string& what) {
  using w = wire::OwnershipMsg;
  switch (in.which()) {
    case w::HEARTBEAT:
      return alternative<heartbeat_msg>(in.hasHeartbeat(), in.getHeartbeat(), "heartbeat", out);
    case w::HEARTBEAT_REPLY:
      return alternative<heartbeat_reply>(in.hasHeartbeatReply(), in.getHeartbeatReply(),
                                          "heartbeat reply", out);
    case w::PREPARE:
      return alternative<prepare_msg>(in.hasPrepare(), in.getPrepare(), "prepare", out);
    case w::PROMISE:
      return alternative<promise_reply>(in.hasPromise(), in.getPromise(), "promise", out);
    case w::WRITE:
      return alternative<write_msg>(in.hasWrite(), in.getWrite(), "write", out);
    case w::WRITE_REPLY:
      return alternative<write_reply>(in.hasWriteReply(), in.getWriteReply(), "write reply", out);
  }
  return refuse(what + ": unknown message kind " +
                std::to_string(static_cast<unsigned>(in.which())));
}

caf::error get(wire::StoredSession::Reader in, stored_session& out, const std::string& what) {
  if (auto err = get(in.getPromised(), out.promised, what + ": promised ballot")) return err;
  if (auto err = get(in.getAccepted(), out.accepted, what + ": accepted ballot")) return err;
  return get(in.getData(), out.data, what);
}

/// Reads one flat message of root `Root` from `bytes` into a `T`, refusing (`bad_request`,
/// prefixed with `what`) anything but exactly one well-formed message within the limits.
template <class Root, class T>
caf::expected<T> decode_flat(std::string_view bytes, const std::string& what) {
  constexpr size_t word = sizeof(capnp::word);
  if (bytes.empty()) return refuse(what + ": no bytes");
  if (bytes.size() % word != 0)
    return refuse(what + ": " + std::to_string(bytes.size()) +
                  " bytes is not a whole number of words");
  if (bytes.size() > max_encoded_size)
    return refuse(what + ": " + std::to_string(bytes.size()) + " bytes, at most " +
                  std::to_string(max_encoded_size));
  // The bytes come with no alignment guarantee (a std::string, a RocksDB value): copy.
  auto words = kj::heapArray<capnp::word>(bytes.size() / word);
  std::memcpy(words.begin(), bytes.data(), bytes.size());
  capnp::ReaderOptions opts;
  // Each getter is called once, so an honest message traverses about its own size; the limit
  // stops a small message whose pointers overlap (or whose lists of empty structs are long)
  // from being read as a large one.
  opts.traversalLimitInWords = std::min<uint64_t>(2 * words.size() + 64, max_encoded_size / word);
  opts.nestingLimit = nesting_limit;
  try {
    capnp::FlatArrayMessageReader msg(words, opts);
    if (msg.getEnd() != words.end())
      return refuse(what + ": " +
                    std::to_string(static_cast<size_t>(words.end() - msg.getEnd()) * word) +
                    " bytes after the message");
    T out;
    if (auto err = get(msg.getRoot<Root>(), out, what)) return err;
    return out;
  } catch (const kj::Exception& e) {
    return refuse(what + ": " + std::string(e.getDescription().cStr()));
  }
}

}  // namespace

std::string encode(const ownership_msg& m) {
  capnp::MallocMessageBuilder msg;
  auto root = msg.initRoot<wire::OwnershipMsg>();
  std::visit([&](const auto& alt) { put(root, alt); }, m);
  return flat(msg);
}

caf::expected<ownership_msg> decode_ownership_msg(std::string_view bytes) {
  return decode_flat<wire::OwnershipMsg, ownership_msg>(bytes, msg_what);
}

std::string encode(const stored_session& s) {
  const auto& [promised, accepted, data] = s;
  capnp::MallocMessageBuilder msg;
  auto root = msg.initRoot<wire::StoredSession>();
  put(root.initPromised(), promised);
  put(root.initAccepted(), accepted);
  put(root.initData(), data);
  return flat(msg);
}

caf::expected<stored_session> decode_stored_session(std::string_view bytes) {
  return decode_flat<wire::StoredSession, stored_session>(bytes, stored_what);
}

}  // namespace keel
