#pragma once

// A node and its gateway in the test's process, on loopback, for tests that drive the node
// through its real Cap'n Proto port with wire::client (tests/guardrail_test.cpp,
// tests/degrade_test.cpp), and the small model they serve.

#include <memory>
#include <string>

#include <caf/actor_system.hpp>
#include <caf/actor_system_config.hpp>

#include <boost/test/unit_test.hpp>

#include "actors/gateway.hpp"
#include "actors/node.hpp"
#include "kernels/synth.hpp"
#include "tests/test_support.hpp"
#include "wire/client.hpp"

namespace keel::test {

/// A synthetic model small enough to answer in milliseconds (context 512), made once per
/// process in a directory named after `label`.
inline const std::string& small_model(const std::string& label) {
  static temp_dir dir(label);
  static std::string path = [] {
    synth_options o;
    o.dim = 64;
    o.layers = 2;
    o.heads = 4;
    o.kv_heads = 2;
    o.ffn = 128;
    o.ctx = 512;
    return write_model(dir.path / "m.gguf", o);
  }();
  return path;
}

struct serving_node {
  caf::actor_system_config sys_cfg;  // the system keeps a reference: it must outlive it
  std::unique_ptr<caf::actor_system> sys;
  std::unique_ptr<node> nd;
  std::unique_ptr<gateway> gw;

  /// Starts a node with `cfg` (its model must be set) and a gateway on an ephemeral port.
  explicit serving_node(node_config cfg) {
    tune_actor_system(sys_cfg);
    sys = std::make_unique<caf::actor_system>(sys_cfg);
    auto n = node::start(*sys, cfg, std::make_shared<supervision_log>([](const std::string&) {}));
    BOOST_REQUIRE_MESSAGE(n, why(n));
    nd = std::move(*n);
    auto g = gateway::start(*sys, *nd, gateway_config{});
    BOOST_REQUIRE_MESSAGE(g, why(g));
    gw = std::move(*g);
  }
  ~serving_node() {
    gw.reset();
    nd->stop();
    nd.reset();
    sys.reset();
  }
  serving_node(const serving_node&) = delete;
  serving_node& operator=(const serving_node&) = delete;

  std::unique_ptr<wire::client> client() {
    auto c = wire::client::connect({gw->address()});
    BOOST_REQUIRE_MESSAGE(c, (c ? "" : describe(c.error())));
    return std::move(*c);
  }
};

}  // namespace keel::test
