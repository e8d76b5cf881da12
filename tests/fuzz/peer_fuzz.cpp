// libFuzzer target: the peer port's Cap'n Proto RPC layer (wire/peer.capnp `Peer`) fed arbitrary
// bytes as an incoming two-party RPC stream (docs/wire.md, "Fuzzing").
//
// The real `keel::peer_server` runs on loopback with a real `storage::session_store` in a
// temporary directory attached; each input is one connection: its bytes are written into an
// in-memory pipe whose other end the server's own `Peer` capability (`peer_server::bootstrap`)
// serves with the port's reader limits, as its accept loop does for a socket; then the input's
// side shuts its writing down and reads every answer until the server ends the connection.
// Properties: no crash, no sanitizer report, no hang (libFuzzer's -timeout), memory bounded
// (-rss_limit_mb), and every connection ends once its input does. Records that `replicate`
// stores stay in the store across inputs, so a later `locate` decodes what an earlier one sent.

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include <capnp/rpc-twoparty.h>
#include <capnp/serialize.h>
#include <kj/async-io.h>

#include "actors/peer_server.hpp"
#include "base/error.hpp"
#include "storage/session_store.hpp"
#include "tests/fuzz/fuzz_support.hpp"
#include "wire/checkpoint.hpp"
#include "wire/peer.capnp.h"
#include "wire/server_thread.hpp"

using namespace keel;

namespace {

/// Who is at the other end of a fuzzed connection (plain TCP would give a NetworkPeerIdentity;
/// without TLS the peer server only names it in log lines).
struct fuzz_caller final : kj::PeerIdentity {
  kj::String toString() override { return kj::str("fuzz input"); }
};

/// The server, its store and this thread's event loop, made once per process.
struct fixture {
  std::string dir;
  std::unique_ptr<storage::session_store> store;
  std::unique_ptr<peer_server> server;
  capnp::ReaderOptions reader;
  kj::AsyncIoContext io = kj::setupAsyncIo();

  fixture() {
    // $KEEL_FUZZ_TMP (scripts/fuzz.sh removes it, even after a crash), else tmpfs when there is
    // one: `replicate` writes are synced.
    const char* env = std::getenv("KEEL_FUZZ_TMP");
    std::string base = env != nullptr && *env != 0 ? env
                       : std::filesystem::exists("/dev/shm")
                           ? "/dev/shm"
                           : std::filesystem::temp_directory_path().string();
    std::string templ = base + "/keel-peer-fuzz-XXXXXX";
    if (mkdtemp(templ.data()) == nullptr) fuzz::broken("mkdtemp " + templ + " failed");
    dir = templ;
    auto s = storage::session_store::open(dir + "/db");
    if (!s) fuzz::broken("session store: " + describe(s.error()));
    store = std::move(*s);
    peer_server_config cfg;
    cfg.name = "fuzz-node";
    cfg.region = "r";
    reader = cfg.reader;
    auto p = peer_server::start(std::move(cfg));
    if (!p) fuzz::broken("peer server: " + describe(p.error()));
    server = std::move(*p);
    server->attach_store(store.get());
    server->on_lost([](const std::string&, uint64_t) {});
    server->on_handoff(
        [](const std::string& session, const std::string&) -> caf::expected<uint64_t> {
          if (session.empty()) return make_error(errc::bad_request, "handoff: empty session id");
          return uint64_t{2};
        });
  }

  void close() {
    server.reset();  // stops its thread
    store.reset();
    std::error_code ec;
    std::filesystem::remove_all(dir, ec);
  }
};

fixture* the_fixture = nullptr;

/// Reads `s` until its end, dropping what it reads (the server's answers).
kj::Promise<void> drain(kj::AsyncIoStream& s, kj::Array<kj::byte>& buf) {
  return s.tryRead(buf.begin(), 1, buf.size()).then([&s, &buf](size_t n) -> kj::Promise<void> {
    if (n == 0) return kj::READY_NOW;
    return drain(s, buf);
  });
}

/// One connection: serves `bytes` as what the caller sent, until the server ends it.
void serve(fixture& f, kj::ArrayPtr<const kj::byte> bytes) {
  auto& ws = f.io.waitScope;
  auto pipe = kj::newTwoWayPipe();
  auto input = kj::mv(pipe.ends[1]);
  auto& timer = f.io.provider->getTimer();
  auto conn = kj::heap<wire::rpc_connection>(
      kj::mv(pipe.ends[0]), timer, f.server->bootstrap(kj::heap<fuzz_caller>()), f.reader);
  auto buf = kj::heapArray<kj::byte>(4096);
  {
    auto feed = input->write(bytes.begin(), bytes.size())
                    .then([&input]() { input->shutdownWrite(); })
                    .eagerlyEvaluate([](kj::Exception&&) {});  // the server stopped reading
    auto answers = drain(*input, buf).eagerlyEvaluate([](kj::Exception&&) {});
    wire::port_limits limits;
    wire::until_gone(*conn, timer, limits)
        .catch_([](kj::Exception&&) {})
        .wait(ws);
  }
  conn = nullptr;
}

// -- seeds: what a real client sends, recorded ------------------------------------------------

/// Passes everything through to `inner` and keeps a copy of what is written.
class recording_stream final : public kj::AsyncIoStream {
 public:
  recording_stream(kj::Own<kj::AsyncIoStream> inner, std::string& out)
      : inner_(kj::mv(inner)), out_(out) {}

  kj::Promise<size_t> tryRead(void* buf, size_t min, size_t max) override {
    return inner_->tryRead(buf, min, max);
  }
  kj::Promise<void> write(const void* buf, size_t size) override {
    out_.append(static_cast<const char*>(buf), size);
    return inner_->write(buf, size);
  }
  kj::Promise<void> write(kj::ArrayPtr<const kj::ArrayPtr<const kj::byte>> pieces) override {
    for (auto p : pieces) out_.append(reinterpret_cast<const char*>(p.begin()), p.size());
    return inner_->write(pieces);
  }
  kj::Promise<void> whenWriteDisconnected() override { return inner_->whenWriteDisconnected(); }
  void shutdownWrite() override { inner_->shutdownWrite(); }
  void abortRead() override { inner_->abortRead(); }

 private:
  kj::Own<kj::AsyncIoStream> inner_;
  std::string& out_;
};

void set_from(wire::NodeId::Builder b, const char* name) {
  b.setName(name);
  b.setRegion("r");
  b.setAddress("127.0.0.1:1");
}

kj::ArrayPtr<const kj::byte> bytes_of(const std::string& s) {
  return kj::arrayPtr(reinterpret_cast<const kj::byte*>(s.data()), s.size());
}

std::string record(const std::string& id, size_t turns) {
  wire::session_checkpoint c;
  c.id = id;
  c.number = 1;
  c.owner = "peer-a";
  for (size_t i = 0; i < turns; ++i) {
    wire::turn_checkpoint t;
    t.turn = i;
    t.user = {1, 2, 3};
    t.max_tokens = 8;
    t.done = i + 1 < turns;
    c.turns.push_back(t);
  }
  return wire::encode(c);
}

/// A list of `n` TurnLogs of zero size (no data, no pointers: each reads as turn 0 with no
/// tokens), which a message carries in two words whatever `n` (Cap'n Proto charges each element
/// one word of the reader's traversal limit).
capnp::List<wire::TurnLog>::Reader zero_size_logs(uint32_t n) {
  static kj::Array<capnp::word> words;
  static kj::Own<capnp::FlatArrayMessageReader> msg;
  words = kj::heapArray<capnp::word>(3);
  uint64_t segment_table = uint64_t{2} << 32;       // one segment of 2 words
  uint64_t list_pointer = 1 | (uint64_t{7} << 32);  // list, inline composite, 0 words
  uint64_t tag = uint64_t{n} << 2;                  // n elements of 0 data, 0 pointers
  uint64_t raw[3] = {segment_table, list_pointer, tag};
  std::memcpy(words.begin(), raw, sizeof raw);
  capnp::ReaderOptions unbounded{~uint64_t{0} / 2, 64};
  msg = kj::heap<capnp::FlatArrayMessageReader>(words, unbounded);
  return msg->getRoot<capnp::AnyPointer>().getAs<capnp::List<wire::TurnLog>>();
}

/// Runs `calls` as a client of the fixture's server over an in-memory pipe and returns the bytes
/// the client sent (bootstrap, calls, finishes, releases), the server answering as it would.
template <class Calls>
std::string record_client(fixture& f, Calls calls) {
  std::string sent;
  auto& ws = f.io.waitScope;
  auto pipe = kj::newTwoWayPipe();
  auto server = kj::heap<wire::rpc_connection>(kj::mv(pipe.ends[0]), f.io.provider->getTimer(),
                                               f.server->bootstrap(kj::heap<fuzz_caller>()),
                                               f.reader);
  {
    recording_stream stream(kj::mv(pipe.ends[1]), sent);
    capnp::TwoPartyVatNetwork network(stream, capnp::rpc::twoparty::Side::CLIENT);
    auto rpc = capnp::makeRpcClient(network);
    capnp::MallocMessageBuilder vat;
    auto id = vat.initRoot<capnp::rpc::twoparty::VatId>();
    id.setSide(capnp::rpc::twoparty::Side::SERVER);
    auto peer = rpc.bootstrap(id).castAs<wire::Peer>();
    calls(peer, ws);
    peer = nullptr;
    kj::evalLast([] {}).wait(ws);  // the Finish and Release messages are written
  }
  // The client is gone, so the server reads the end of its input.
  server->network.onDisconnect().wait(ws);
  return sent;
}

fuzz::seeds peer_seeds() {
  auto& f = *the_fixture;
  fuzz::seeds out;
  out.emplace_back("heartbeat", record_client(f, [](wire::Peer::Client& p, kj::WaitScope& ws) {
                     auto r = p.heartbeatRequest();
                     set_from(r.initFrom(), "peer-a");
                     r.setSentNs(12345);
                     r.send().wait(ws);
                   }));
  out.emplace_back("replicate-full", record_client(f, [](wire::Peer::Client& p, kj::WaitScope& ws) {
                     auto r = p.replicateRequest();
                     set_from(r.initFrom(), "peer-a");
                     r.setSession("s-1");
                     r.setEpoch(1);
                     r.setRecord(bytes_of(record("s-1", 2)));
                     auto logs = r.initLogs(1);
                     logs[0].setTurn(0);
                     auto t = logs[0].initTokens(3);
                     for (unsigned i = 0; i < 3; ++i) t.set(i, static_cast<int32_t>(100 + i));
                     r.setTurn(1);
                     r.setFromIndex(0);
                     auto tokens = r.initTokens(2);
                     tokens.set(0, 7);
                     tokens.set(1, 8);
                     r.send().wait(ws);
                   }));
  out.emplace_back("replicate-then-locate-fetch",
                   record_client(f, [](wire::Peer::Client& p, kj::WaitScope& ws) {
                     auto r = p.replicateRequest();
                     set_from(r.initFrom(), "peer-b");
                     r.setSession("s-2");
                     r.setEpoch(3);
                     r.setRecord(bytes_of(record("s-2", 1)));
                     r.send().wait(ws);
                     auto gap = p.replicateRequest();
                     set_from(gap.initFrom(), "peer-b");
                     gap.setSession("s-2");
                     gap.setEpoch(3);
                     gap.setTurn(0);
                     gap.setFromIndex(5);
                     gap.initTokens(1).set(0, 9);
                     gap.send().wait(ws);
                     auto l = p.locateRequest();
                     auto ids = l.initSessions(3);
                     ids.set(0, "s-1");
                     ids.set(1, "s-2");
                     ids.set(2, "none");
                     set_from(l.initFrom(), "peer-b");
                     l.send().wait(ws);
                     auto g = p.fetchRequest();
                     g.setSession("s-2");
                     set_from(g.initFrom(), "peer-b");
                     g.send().wait(ws);
                   }));
  out.emplace_back("fetch-missing", record_client(f, [](wire::Peer::Client& p, kj::WaitScope& ws) {
                     auto g = p.fetchRequest();
                     g.setSession("missing");
                     set_from(g.initFrom(), "peer-c");
                     g.send().wait(ws);
                   }));
  out.emplace_back("handoff", record_client(f, [](wire::Peer::Client& p, kj::WaitScope& ws) {
                     auto h = p.handoffRequest();
                     set_from(h.initFrom(), "peer-a");
                     h.setSession("s-1");
                     h.send().wait(ws);
                   }));
  out.emplace_back("replicate-zero-size-logs",
                   record_client(f, [](wire::Peer::Client& p, kj::WaitScope& ws) {
                     auto r = p.replicateRequest();
                     set_from(r.initFrom(), "peer-a");
                     r.setSession("s-3");
                     r.setEpoch(1);
                     r.setLogs(zero_size_logs(1u << 20));
                     r.send().wait(ws);
                   }));
  return out;
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int* argc, char*** argv) {
  the_fixture = new fixture();
  std::atexit([] { the_fixture->close(); });
  fuzz::write_corpus_if_asked(*argc, *argv, peer_seeds);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  serve(*the_fixture, kj::arrayPtr(data, size));
  return 0;
}
