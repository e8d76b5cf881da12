// libFuzzer target: the peer port's Cap'n Proto RPC layer (wire/peer.capnp `Peer`) fed arbitrary
// bytes as an incoming two-party RPC stream (docs/wire.md, "Fuzzing").
//
// The real `keel::peer_server` runs on loopback, each `ownership` message it hands on decoded as
// a node's host decodes it (actors/ownership_codec.hpp); each input is one connection: its bytes are written into an
// in-memory pipe whose other end the server's own `Peer` capability (`peer_server::bootstrap`)
// serves with the port's reader limits, as its accept loop does for a socket; then the input's
// side shuts its writing down and reads every answer until the server ends the connection.
// Properties: no crash, no sanitizer report, no hang (libFuzzer's -timeout), memory bounded
// (-rss_limit_mb), and every connection ends once its input does. The retired methods
// (replicate, locate, fetch, handoff, owned) are answered `unimplemented`.

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

#include "actors/ownership_codec.hpp"
#include "actors/peer_server.hpp"
#include "base/error.hpp"
#include "tests/fuzz/fuzz_support.hpp"
#include "wire/peer.capnp.h"
#include "wire/server_thread.hpp"

using namespace keel;

namespace {

/// Who is at the other end of a fuzzed connection (plain TCP would give a NetworkPeerIdentity;
/// without TLS the peer server only names it in log lines).
struct fuzz_caller final : kj::PeerIdentity {
  kj::String toString() override { return kj::str("fuzz input"); }
};

/// The server and this thread's event loop, made once per process.
struct fixture {
  std::unique_ptr<peer_server> server;
  capnp::ReaderOptions reader;
  kj::AsyncIoContext io = kj::setupAsyncIo();
  uint64_t decoded = 0;  // ownership messages that decoded (kept, so the decoder is not elided)

  fixture() {
    peer_server_config cfg;
    cfg.name = "fuzz-node";
    cfg.region = "r";
    reader = cfg.reader;
    auto p = peer_server::start(std::move(cfg));
    if (!p) fuzz::broken("peer server: " + describe(p.error()));
    server = std::move(*p);
    server->on_ownership([this](const std::string& from, std::string message) {
      if (from.empty()) return;
      if (decode_ownership_msg(message)) ++decoded;
    });
  }

  void close() {
    server.reset();  // stops its thread
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

/// An encoded write of a session with two turns, as a member sends it.
std::string write_message(const std::string& session) {
  write_msg w;
  w.session = session;
  w.b = {3, "peer-a"};
  w.seq = 4;
  w.durable = true;
  w.data.meta = "meta";
  w.data.turns.push_back({"hello", {100, 101, 102}, true, "length"});
  w.data.turns.push_back({"again", {7, 8}, false, {}});
  w.sent = 12345;
  return encode(ownership_msg{w});
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
  out.emplace_back("ownership-write", record_client(f, [](wire::Peer::Client& p, kj::WaitScope& ws) {
                     auto r = p.ownershipRequest();
                     set_from(r.initFrom(), "peer-a");
                     r.setMessage(bytes_of(write_message("s-1")));
                     r.send().wait(ws);
                   }));
  out.emplace_back("ownership-prepare-heartbeat",
                   record_client(f, [](wire::Peer::Client& p, kj::WaitScope& ws) {
                     prepare_msg pm;
                     pm.session = "s-2";
                     pm.b = {2, "peer-b"};
                     auto r = p.ownershipRequest();
                     set_from(r.initFrom(), "peer-b");
                     r.setMessage(bytes_of(encode(ownership_msg{pm})));
                     r.send().wait(ws);
                     heartbeat_msg hb;
                     hb.sent = 5;
                     hb.claims.push_back({"s-2", {2, "peer-b"}});
                     auto h = p.ownershipRequest();
                     set_from(h.initFrom(), "peer-b");
                     h.setMessage(bytes_of(encode(ownership_msg{hb})));
                     h.send().wait(ws);
                   }));
  out.emplace_back("retired", record_client(f, [](wire::Peer::Client& p, kj::WaitScope& ws) {
                     p.retiredReplicateRequest().send().then([](auto&&) {}, [](kj::Exception&&) {})
                         .wait(ws);
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
