@0xb4ba85ce2c53715f;

# Node to node (region links). Each node serves `Peer` on its peer endpoint (`--peer-listen`),
# a listening port of its own, apart from the client `Gateway` (keel.capnp).
#
# Today: `heartbeat` only, which region links call every `heartbeat_interval` to measure the
# round trip and to declare a silent peer down (docs/actors.md, "Region links").
# TODO (issue 5): `replicate @1` (checkpoints and token progress to a replica), `takeover @2`
# (a replica takes a dead owner's session lease with epoch + 1) and `forward @3` (a request for a
# session that another node owns). Keep ordinals @1..@3 free for them.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("keel::wire");

struct NodeId {
  name @0 :Text;     # the node's name (`--name`)
  region @1 :Text;   # the node's region (`--region`)
  address @2 :Text;  # HOST:PORT of the node's peer endpoint
}

interface Peer {
  # Liveness and round trip. `sentNs` is the caller's clock, echoed back unchanged so that the
  # caller can measure the round trip on its own clock; `receivedNs` is the callee's
  # steady clock when it answered (not comparable across nodes; for diagnostics only).
  heartbeat @0 (from :NodeId, sentNs :UInt64) -> (node :NodeId, sentNs :UInt64, receivedNs :UInt64);
}
