#define BOOST_TEST_MODULE gateway_test
#include <boost/test/unit_test.hpp>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>

#include <capnp/ez-rpc.h>
#include <kj/async-io.h>
#include <kj/timer.h>
#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>
#include <caf/event_based_actor.hpp>
#include <caf/scoped_actor.hpp>

#include "actors/atoms.hpp"
#include "actors/gateway.hpp"
#include "actors/node.hpp"
#include "kernels/synth.hpp"
#include "tests/test_support.hpp"
#include "wire/keel.capnp.h"

using namespace keel;
using namespace std::chrono_literals;

// Boost.Test prints the values of failed comparisons; the generated enums live here (ADL).
namespace capnp::schemas {
std::ostream& operator<<(std::ostream& o, keel::wire::Error::Kind k) {
  return o << "Error.Kind(" << static_cast<int>(k) << ")";
}
std::ostream& operator<<(std::ostream& o, keel::wire::FinishReason r) {
  return o << "FinishReason(" << static_cast<int>(r) << ")";
}
}  // namespace capnp::schemas

namespace {

// -- the client side (runs on the test's thread, in its KJ event loop) --------------------------

/// What one TokenSink received.
struct received {
  std::vector<uint64_t> turns;
  std::vector<uint64_t> indices;
  std::vector<int32_t> ids;
  bool done = false;
  wire::FinishReason reason = wire::FinishReason::LENGTH;
  wire::Error::Kind error = wire::Error::Kind::NONE;
  std::string message;
  /// When >= 0: the token() call that brings the count to this never returns (until `release`),
  /// so the client stops draining its stream.
  int stall_after = -1;
  std::chrono::steady_clock::time_point stalled_at;
  kj::Own<kj::PromiseFulfiller<void>> release;
};

class test_sink final : public wire::TokenSink::Server {
 public:
  explicit test_sink(std::shared_ptr<received> r) : r_(std::move(r)) {}

  kj::Promise<void> token(TokenContext ctx) override {
    auto e = ctx.getParams().getEvent();
    r_->turns.push_back(e.getTurn());
    r_->indices.push_back(e.getIndex());
    r_->ids.push_back(e.getId());
    if (r_->stall_after >= 0 && r_->ids.size() == static_cast<size_t>(r_->stall_after)) {
      r_->stalled_at = std::chrono::steady_clock::now();
      auto paf = kj::newPromiseAndFulfiller<void>();
      r_->release = kj::mv(paf.fulfiller);
      return kj::mv(paf.promise);
    }
    return kj::READY_NOW;
  }

  kj::Promise<void> done(DoneContext ctx) override {
    auto p = ctx.getParams();
    r_->done = true;
    r_->reason = p.getReason();
    r_->error = p.getError().getKind();
    r_->message = p.getError().getMessage();
    return kj::READY_NOW;
  }

 private:
  std::shared_ptr<received> r_;
};

/// Runs the test thread's event loop until `pred` holds or `limit` passes.
template <class Pred>
bool wait_for(capnp::EzRpcClient& c, Pred pred, std::chrono::milliseconds limit = 10s) {
  auto& timer = c.getIoProvider().getTimer();
  auto end = std::chrono::steady_clock::now() + limit;
  while (!pred()) {
    if (std::chrono::steady_clock::now() > end) return false;
    timer.afterDelay(2 * kj::MILLISECONDS).wait(c.getWaitScope());
  }
  return true;
}

struct opened {
  wire::Session::Client session{nullptr};
  std::string id;
};

opened open_session(capnp::EzRpcClient& c, uint64_t seed) {
  auto req = c.getMain<wire::Gateway>().openSessionRequest();
  auto p = req.initParams();
  p.setTemperature(0.8f);
  p.setTopK(40);
  p.setSeed(seed);
  auto res = req.send().wait(c.getWaitScope());
  BOOST_REQUIRE_MESSAGE(res.getError().getKind() == wire::Error::Kind::NONE,
                        res.getError().getMessage().cStr());
  return {res.getSession(), res.getId()};
}

struct sent {
  wire::Error::Kind error = wire::Error::Kind::NONE;
  std::string message;
  uint64_t turn = 0;
  std::vector<int32_t> prompt;
};

sent send_turn(capnp::EzRpcClient& c, wire::Session::Client& s, const std::string& text,
               uint32_t max_tokens, std::shared_ptr<received> r,
               std::optional<uint64_t> expect = std::nullopt) {
  auto req = s.sendRequest();
  req.setText(text);
  req.setMaxTokens(max_tokens);
  if (expect) {
    req.setTurn(*expect);
    req.setTurnGiven(true);
  }
  req.setSink(kj::heap<test_sink>(std::move(r)));
  auto res = req.send().wait(c.getWaitScope());
  sent out;
  out.error = res.getError().getKind();
  out.message = res.getError().getMessage();
  out.turn = res.getTurn();
  for (auto t : res.getPrompt()) out.prompt.push_back(t);
  return out;
}

wire::Error::Kind resume_turn(capnp::EzRpcClient& c, wire::Session::Client& s, uint64_t turn,
                              uint64_t from, std::shared_ptr<received> r) {
  auto req = s.resumeRequest();
  req.setTurn(turn);
  req.setFromIndex(from);
  req.setSink(kj::heap<test_sink>(std::move(r)));
  return req.send().wait(c.getWaitScope()).getError().getKind();
}

struct turn_view {
  std::vector<int32_t> prompt;
  std::vector<int32_t> generated;
  bool done = false;
  wire::FinishReason reason = wire::FinishReason::LENGTH;
};

std::vector<turn_view> history(capnp::EzRpcClient& c, wire::Session::Client& s) {
  auto res = s.historyRequest().send().wait(c.getWaitScope());
  BOOST_REQUIRE(res.getError().getKind() == wire::Error::Kind::NONE);
  std::vector<turn_view> out;
  for (auto t : res.getTurns()) {
    turn_view v;
    for (auto x : t.getPrompt()) v.prompt.push_back(x);
    for (auto x : t.getGenerated()) v.generated.push_back(x);
    v.done = t.getDone();
    v.reason = t.getReason();
    out.push_back(std::move(v));
  }
  return out;
}

/// Indices 0, 1, ... in order (nothing lost or repeated), starting at `from`.
bool in_order(const received& r, uint64_t from = 0) {
  for (size_t i = 0; i < r.indices.size(); ++i)
    if (r.indices[i] != from + i) return false;
  return true;
}

// -- the server side ----------------------------------------------------------------------------

/// Lines the gateway logged.
struct log_lines {
  std::mutex mu;
  std::vector<std::string> lines;
  bool contains(const std::string& s) {
    std::lock_guard<std::mutex> guard(mu);
    for (auto& l : lines)
      if (l.find(s) != std::string::npos) return true;
    return false;
  }
};

/// A node on a synthesized tiny model (context 512, byte vocabulary) and its gateway on an
/// ephemeral loopback port.
struct server {
  test::temp_dir dir{"gateway_test"};
  caf::actor_system_config sys_cfg;
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<node> nd;
  std::unique_ptr<gateway> gw;
  std::shared_ptr<log_lines> logs = std::make_shared<log_lines>();

  explicit server(gateway_config cfg = {}) {
    synth_options o;
    o.dim = 128;
    o.layers = 2;
    o.heads = 8;
    o.kv_heads = 4;
    o.ffn = 256;
    o.ctx = 512;
    o.seed = 11;
    auto w = synthesize(o, builtin_byte_vocab());
    BOOST_REQUIRE(w);
    auto path = (dir.path / "m.gguf").string();
    BOOST_REQUIRE(!w->write(path));
    keel::tune_actor_system(sys_cfg);
    sys = std::make_unique<caf::actor_system>(sys_cfg);
    node_config nc;
    nc.model_path = path;
    nc.kv_bytes = 64ull << 20;
    nc.batching.max_batch = 8;
    auto n = node::start(*sys, nc, std::make_shared<supervision_log>([](const std::string&) {}));
    BOOST_REQUIRE_MESSAGE(n, test::why(n));
    nd = std::move(*n);
    cfg.log = [l = logs](const std::string& line) {
      if (std::getenv("KEEL_TEST_VERBOSE")) BOOST_TEST_MESSAGE(line);
      std::lock_guard<std::mutex> guard(l->mu);
      l->lines.push_back(line);
    };
    auto g = gateway::start(*sys, *nd, cfg);
    BOOST_REQUIRE_MESSAGE(g, test::why(g));
    gw = std::move(*g);
  }
  ~server() {
    gw.reset();
    nd.reset();
    sys.reset();
  }
  std::string address() const { return gw->address(); }
};

/// The tokens of one turn run on the node directly (no gateway), through a CAF sink.
std::vector<int32_t> node_alone(server& s, uint64_t seed, const std::string& text,
                                int32_t max_tokens) {
  struct result {
    std::mutex mu;
    std::condition_variable cv;
    std::vector<int32_t> ids;
    bool done = false;
  };
  auto r = std::make_shared<result>();
  auto sink = s.sys->spawn([r](caf::event_based_actor* self) -> caf::behavior {
    return {
        [r](token_atom, const std::string&, uint64_t, int64_t, int32_t tok, const std::string&) {
          std::lock_guard<std::mutex> guard(r->mu);
          r->ids.push_back(tok);
        },
        [r, self](done_atom, const std::string&, uint64_t, finish_reason, const std::string&,
                  int64_t) {
          std::lock_guard<std::mutex> guard(r->mu);
          r->done = true;
          r->cv.notify_all();
          self->quit();
        },
    };
  });
  sampling_params p;
  p.temperature = 0.8f;
  p.top_k = 40;
  p.seed = seed;
  auto id = s.nd->open_session(p);
  BOOST_REQUIRE(id);
  caf::scoped_actor self{*s.sys};
  self->request(s.nd->session(*id), 10s, send_atom::value, text, max_tokens,
                caf::actor_cast<turn_sink_actor>(sink))
      .receive([](uint64_t) {}, [](caf::error& e) { BOOST_FAIL(caf::to_string(e)); });
  std::unique_lock<std::mutex> lock(r->mu);
  BOOST_REQUIRE(r->cv.wait_for(lock, 10s, [&] { return r->done; }));
  return r->ids;
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_streamed_turn_has_the_tokens_of_the_node_alone) {
  server srv;
  auto expected = node_alone(srv, 7, "Once upon a time", 60);
  BOOST_REQUIRE(!expected.empty());

  capnp::EzRpcClient c(srv.address());
  auto answer = c.getMain<wire::Gateway>().infoRequest().send().wait(c.getWaitScope());
  auto info = answer.getInfo();
  BOOST_TEST(info.getContextLength() == 512u);
  BOOST_TEST(std::string(info.getName().cStr()) == "node");
  auto s = open_session(c, 7);
  auto r = std::make_shared<received>();
  auto res = send_turn(c, s.session, "Once upon a time", 60, r);
  BOOST_REQUIRE_MESSAGE(res.error == wire::Error::Kind::NONE, res.message);
  BOOST_TEST(res.turn == 0u);
  BOOST_TEST(!res.prompt.empty());
  BOOST_REQUIRE(wait_for(c, [&] { return r->done; }));
  BOOST_TEST(r->ids == expected);
  BOOST_TEST(in_order(*r));
  BOOST_TEST(r->error == wire::Error::Kind::NONE);
  BOOST_TEST((r->reason == wire::FinishReason::LENGTH || r->reason == wire::FinishReason::EOS));
  auto h = history(c, s.session);
  BOOST_REQUIRE(h.size() == 1u);
  BOOST_TEST(h[0].prompt == res.prompt);
  auto all = c.getMain<wire::Gateway>().listSessionsRequest().send().wait(c.getWaitScope());
  BOOST_TEST(all.getSessions().size() == 2u);  // the node's own and the client's
}

BOOST_AUTO_TEST_CASE(cancel_ends_the_running_turn) {
  server srv;
  capnp::EzRpcClient c(srv.address());
  auto s = open_session(c, 1);
  srv.nd->faults().stall_shard(0, 300ms, 3);  // keeps the turn running until the cancel lands
  auto r = std::make_shared<received>();
  auto res = send_turn(c, s.session, "hello", 400, r);
  BOOST_REQUIRE(res.error == wire::Error::Kind::NONE);
  auto req = s.session.cancelRequest();
  req.setTurn(res.turn);
  BOOST_TEST(req.send().wait(c.getWaitScope()).getError().getKind() == wire::Error::Kind::NONE);
  BOOST_REQUIRE(wait_for(c, [&] { return r->done; }));
  BOOST_TEST(r->reason == wire::FinishReason::CANCELLED);
  BOOST_TEST(r->ids.size() < 400u);
  BOOST_TEST(in_order(*r));
  auto bad = s.session.cancelRequest();
  bad.setTurn(5);
  auto answer = bad.send().wait(c.getWaitScope());  // owns the message `e` reads from
  auto e = answer.getError();
  BOOST_TEST(e.getKind() == wire::Error::Kind::NOT_FOUND);
  BOOST_TEST(std::string(e.getMessage().cStr()).find("turn 5") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(history_lists_every_turn_as_streamed) {
  server srv;
  capnp::EzRpcClient c(srv.address());
  auto s = open_session(c, 3);
  std::vector<std::shared_ptr<received>> rs;
  for (auto text : {"The quick brown fox", "jumps"}) {
    auto r = std::make_shared<received>();
    auto res = send_turn(c, s.session, text, 30, r);
    BOOST_REQUIRE_MESSAGE(res.error == wire::Error::Kind::NONE, res.message);
    BOOST_REQUIRE(wait_for(c, [&] { return r->done; }));
    rs.push_back(r);
  }
  auto h = history(c, s.session);
  BOOST_REQUIRE(h.size() == 2u);
  for (size_t i = 0; i < 2; ++i) {
    BOOST_TEST(h[i].done);
    BOOST_TEST(h[i].generated == rs[i]->ids);
    BOOST_TEST(!h[i].prompt.empty());
  }
  BOOST_TEST(rs[1]->turns.front() == 1u);
}

BOOST_AUTO_TEST_CASE(a_turn_sent_again_with_its_number_is_the_same_turn) {
  // Session.send with `turn`: sending again after a lost answer is safe (keel.capnp).
  server srv;
  capnp::EzRpcClient c(srv.address());
  auto s = open_session(c, 3);
  auto first = std::make_shared<received>();
  auto r0 = send_turn(c, s.session, "The quick brown fox", 20, first, 0);
  BOOST_REQUIRE_MESSAGE(r0.error == wire::Error::Kind::NONE, r0.message);
  BOOST_REQUIRE(wait_for(c, [&] { return first->done; }));
  // The same text under the same number: turn 0 again, streamed whole, nothing added.
  auto again = std::make_shared<received>();
  auto r1 = send_turn(c, s.session, "The quick brown fox", 20, again, 0);
  BOOST_REQUIRE_MESSAGE(r1.error == wire::Error::Kind::NONE, r1.message);
  BOOST_TEST(r1.turn == 0u);
  BOOST_TEST(r1.prompt == r0.prompt);
  BOOST_REQUIRE(wait_for(c, [&] { return again->done; }));
  BOOST_TEST(again->ids == first->ids);
  BOOST_TEST(history(c, s.session).size() == 1u);
  // Another text under a number taken, or a number that is not the next: refused, named.
  auto other = send_turn(c, s.session, "jumps", 20, std::make_shared<received>(), 0);
  BOOST_TEST((other.error == wire::Error::Kind::BAD_REQUEST), other.message);
  BOOST_TEST(other.message.find("turn 0 has another text") != std::string::npos, other.message);
  auto ahead = send_turn(c, s.session, "jumps", 20, std::make_shared<received>(), 5);
  BOOST_TEST((ahead.error == wire::Error::Kind::BAD_REQUEST), ahead.message);
  BOOST_TEST(ahead.message.find("turn 5 cannot be the next one") != std::string::npos,
             ahead.message);
  // The next number starts the next turn.
  auto next = std::make_shared<received>();
  auto r2 = send_turn(c, s.session, "jumps", 20, next, 1);
  BOOST_REQUIRE_MESSAGE(r2.error == wire::Error::Kind::NONE, r2.message);
  BOOST_TEST(r2.turn == 1u);
  BOOST_REQUIRE(wait_for(c, [&] { return next->done; }));
  BOOST_TEST(history(c, s.session).size() == 2u);
}

BOOST_AUTO_TEST_CASE(resume_from_an_index_returns_the_rest_exactly_once) {
  server srv;
  capnp::EzRpcClient c(srv.address());
  auto s = open_session(c, 4);
  auto first = std::make_shared<received>();
  BOOST_REQUIRE(send_turn(c, s.session, "In the beginning", 50, first).error ==
                wire::Error::Kind::NONE);
  BOOST_REQUIRE(wait_for(c, [&] { return first->done; }));
  auto rest = std::make_shared<received>();
  BOOST_REQUIRE(resume_turn(c, s.session, 0, 20, rest) == wire::Error::Kind::NONE);
  BOOST_REQUIRE(wait_for(c, [&] { return rest->done; }));
  BOOST_TEST(in_order(*rest, 20));
  BOOST_TEST(rest->ids == std::vector<int32_t>(first->ids.begin() + 20, first->ids.end()));
  BOOST_TEST(rest->reason == first->reason);
  BOOST_TEST(resume_turn(c, s.session, 3, 0, std::make_shared<received>()) ==
             wire::Error::Kind::NOT_FOUND);
}

BOOST_AUTO_TEST_CASE(an_unknown_session_is_not_found) {
  server srv;
  capnp::EzRpcClient c(srv.address());
  auto req = c.getMain<wire::Gateway>().getSessionRequest();
  req.setId("s-999");
  auto res = req.send().wait(c.getWaitScope());
  BOOST_TEST(res.getError().getKind() == wire::Error::Kind::NOT_FOUND);
  BOOST_TEST(std::string(res.getError().getMessage().cStr()).find("s-999") != std::string::npos);
}

BOOST_AUTO_TEST_CASE(a_prompt_longer_than_the_context_is_a_bad_request) {
  server srv;
  capnp::EzRpcClient c(srv.address());
  auto s = open_session(c, 5);
  auto res = send_turn(c, s.session, std::string(2000, 'a'), 10, std::make_shared<received>());
  BOOST_TEST(res.error == wire::Error::Kind::BAD_REQUEST);
  BOOST_TEST_MESSAGE(res.message);
  BOOST_TEST(res.message.find("context length is 512") != std::string::npos);
  // Nothing was recorded, and the session still takes a turn.
  auto r = std::make_shared<received>();
  auto ok = send_turn(c, s.session, "short", 5, r);
  BOOST_TEST(ok.error == wire::Error::Kind::NONE);
  BOOST_TEST(ok.turn == 0u);
  BOOST_REQUIRE(wait_for(c, [&] { return r->done; }));
}

BOOST_AUTO_TEST_CASE(invalid_sampling_is_a_bad_request_naming_the_parameter) {
  server srv;
  capnp::EzRpcClient c(srv.address());
  auto req = c.getMain<wire::Gateway>().openSessionRequest();
  req.initParams().setTopP(1.5f);
  auto res = req.send().wait(c.getWaitScope());
  BOOST_TEST(res.getError().getKind() == wire::Error::Kind::BAD_REQUEST);
  std::string msg = res.getError().getMessage().cStr();
  BOOST_TEST(msg.find("top_p") != std::string::npos);
  BOOST_TEST(msg.find("1.5") != std::string::npos);
  auto req2 = c.getMain<wire::Gateway>().openSessionRequest();
  req2.initParams().setTemperature(-1.0f);
  auto res2 = req2.send().wait(c.getWaitScope());
  BOOST_TEST(res2.getError().getKind() == wire::Error::Kind::BAD_REQUEST);
  BOOST_TEST(std::string(res2.getError().getMessage().cStr()).find("temperature") !=
             std::string::npos);
  BOOST_TEST(srv.nd->sessions().empty());
}

BOOST_AUTO_TEST_CASE(over_size_text_is_refused_and_an_over_size_message_costs_only_its_connection) {
  gateway_config cfg;
  cfg.max_text_bytes = 4096;
  cfg.traversal_limit_words = 64 << 10;  // 512 KiB
  server srv(cfg);
  {
    capnp::EzRpcClient c(srv.address());
    auto s = open_session(c, 6);
    auto res = send_turn(c, s.session, std::string(5000, 'x'), 10, std::make_shared<received>());
    BOOST_TEST(res.error == wire::Error::Kind::BAD_REQUEST);
    BOOST_TEST(res.message.find("5000 bytes") != std::string::npos);
    // Past the traversal limit the server cannot read the message at all: the call fails with an
    // exception and this connection is dropped.
    bool threw = false;
    try {
      send_turn(c, s.session, std::string(1 << 20, 'x'), 10, std::make_shared<received>());
    } catch (const kj::Exception& e) {
      threw = true;
      BOOST_TEST_MESSAGE("over-size message: " << e.getDescription().cStr());
    }
    BOOST_TEST(threw);
  }
  capnp::EzRpcClient c2(srv.address());
  auto s2 = open_session(c2, 6);
  auto r = std::make_shared<received>();
  BOOST_TEST(send_turn(c2, s2.session, "still here", 5, r).error == wire::Error::Kind::NONE);
  BOOST_TEST(wait_for(c2, [&] { return r->done; }));
}

BOOST_AUTO_TEST_CASE(a_client_that_disconnects_mid_stream_leaves_its_turn_running) {
  server srv;
  std::string id;
  size_t got = 0;
  std::vector<int32_t> prefix;
  {
    capnp::EzRpcClient a(srv.address());
    auto s = open_session(a, 8);
    id = s.id;
    srv.nd->faults().stall_shard(0, 200ms, 10);  // the turn is still running when `a` leaves
    auto r = std::make_shared<received>();
    BOOST_REQUIRE(send_turn(a, s.session, "Keel keeps conversations alive", 300, r).error ==
                  wire::Error::Kind::NONE);
    BOOST_REQUIRE(wait_for(a, [&] { return r->ids.size() >= 5; }));
    got = r->ids.size();
    prefix = r->ids;
    BOOST_TEST(!r->done);
  }  // disconnects
  capnp::EzRpcClient b(srv.address());
  // Another client is served meanwhile.
  auto mine = open_session(b, 9);
  auto rb = std::make_shared<received>();
  BOOST_REQUIRE(send_turn(b, mine.session, "hello", 20, rb).error == wire::Error::Kind::NONE);
  BOOST_REQUIRE(wait_for(b, [&] { return rb->done; }));
  BOOST_TEST(in_order(*rb));
  // The abandoned turn completes, and its tokens are all there.
  auto req = b.getMain<wire::Gateway>().getSessionRequest();
  req.setId(id);
  auto found = req.send().wait(b.getWaitScope());
  BOOST_REQUIRE(found.getError().getKind() == wire::Error::Kind::NONE);
  wire::Session::Client s = found.getSession();
  BOOST_REQUIRE(wait_for(b, [&] { return history(b, s)[0].done; }));
  auto h = history(b, s);
  BOOST_TEST(h[0].generated.size() > got);
  auto rest = std::make_shared<received>();
  BOOST_REQUIRE(resume_turn(b, s, 0, got, rest) == wire::Error::Kind::NONE);
  BOOST_REQUIRE(wait_for(b, [&] { return rest->done; }));
  BOOST_TEST(in_order(*rest, got));
  prefix.insert(prefix.end(), rest->ids.begin(), rest->ids.end());
  BOOST_TEST(prefix == h[0].generated);
  BOOST_TEST(srv.logs->contains("client gone"));
}

BOOST_AUTO_TEST_CASE(a_client_that_stops_reading_is_cut_off_and_others_keep_streaming) {
  gateway_config cfg;
  cfg.stall_timeout = 1500ms;
  cfg.socket_send_buffer = 4096;  // a small flow-control window: it fills after a few tokens
  server srv(cfg);
  capnp::EzRpcClient a(srv.address());
  auto sa = open_session(a, 10);
  auto ra = std::make_shared<received>();
  ra->stall_after = 3;
  BOOST_REQUIRE(send_turn(a, sa.session, "1 2 3", 450, ra).error == wire::Error::Kind::NONE);
  BOOST_REQUIRE(wait_for(a, [&] { return ra->ids.size() >= 3; }));

  // Another client streams a whole turn while `a` is stuck.
  capnp::EzRpcClient b(srv.address());
  auto sb = open_session(b, 11);
  auto rb = std::make_shared<received>();
  BOOST_REQUIRE(send_turn(b, sb.session, "zzz", 100, rb).error == wire::Error::Kind::NONE);
  BOOST_REQUIRE(wait_for(b, [&] { return rb->done; }));
  BOOST_TEST(rb->ids.size() > 10u);
  BOOST_TEST(in_order(*rb));
  BOOST_TEST(!srv.logs->contains("cut off"));  // b was not held up by a's timeout

  // `a` is cut off after the timeout; its turn goes on to the end.
  BOOST_REQUIRE(wait_for(b, [&] { return srv.logs->contains("cut off"); }));
  auto waited = std::chrono::steady_clock::now() - ra->stalled_at;
  BOOST_TEST(waited >= 1500ms);
  BOOST_TEST(waited < 8s);
  BOOST_REQUIRE(wait_for(b, [&] { return history(a, sa.session)[0].done; }));
  auto h = history(b, sb.session);
  BOOST_TEST(h[0].generated == rb->ids);
  auto ha = history(a, sa.session);
  BOOST_TEST(ha[0].generated.size() > 100u);  // well past what `a` received
  auto rest = std::make_shared<received>();
  BOOST_REQUIRE(resume_turn(b, sa.session, 0, 3, rest) == wire::Error::Kind::NONE);
  BOOST_REQUIRE(wait_for(b, [&] { return rest->done; }));
  BOOST_TEST(in_order(*rest, 3));
  BOOST_TEST(rest->ids == std::vector<int32_t>(ha[0].generated.begin() + 3, ha[0].generated.end()));
  ra->release->fulfill();
}

BOOST_AUTO_TEST_CASE(stopping_the_gateway_ends_its_connections_not_the_node) {
  server srv;
  capnp::EzRpcClient c(srv.address());
  auto s = open_session(c, 12);
  srv.nd->faults().stall_shard(0, 300ms, 2);
  auto r = std::make_shared<received>();
  BOOST_REQUIRE(send_turn(c, s.session, "hello", 100, r).error == wire::Error::Kind::NONE);
  srv.gw->stop();  // from this thread, while the turn streams
  bool threw = false;
  try {
    history(c, s.session);
  } catch (const kj::Exception& e) {
    threw = e.getType() == kj::Exception::Type::DISCONNECTED;
  }
  BOOST_TEST(threw);
  // The node goes on: the turn completes and new sessions open.
  auto id = srv.nd->open_session(sampling_params{});
  BOOST_TEST(bool(id));
  // The streaming session (ids are random: not the first in id order).
  auto turn_done = [&] {
    for (auto& r : srv.nd->sessions())
      if (r.id == s.id) return !r.turns.empty() && r.turns[0].done;
    return false;
  };
  for (int i = 0; i < 400 && !turn_done(); ++i) std::this_thread::sleep_for(10ms);
  BOOST_TEST(turn_done());
}
