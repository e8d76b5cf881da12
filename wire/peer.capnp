@0xb4ba85ce2c53715f;

# Node to node. Each node serves `Peer` on its peer endpoint (`--peer-listen`), a listening port
# of its own, apart from the client `Gateway` (keel.capnp).
#
# `heartbeat`, which region links call every `heartbeat_interval` to measure the round trip and
# to tell operators, forwarding and admission which peers are up (docs/actors.md, "Region
# links"); `ownership`, which carries the ownership protocol's messages: every session's
# replication, takeover and fencing (docs/actors.md, "Ownership protocol"). Forwarding goes
# through the client API: a node passes on the owner's `Session`.
#
# Methods 1 to 5 were the interim replication rules' (replicate, locate, fetch, handoff, owned),
# retired with them: kept so that the ordinals stay, answered `unimplemented`.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("keel::wire");

struct NodeId {
  name @0 :Text;     # the node's name (`--name`)
  region @1 :Text;   # the node's region (`--region`)
  address @2 :Text;  # HOST:PORT of the node's peer endpoint
  clientAddress @3 :Text;  # HOST:PORT of the node's client Gateway ("" when not serving yet)
  draining @4 :Bool;       # the node drains: it opens no sessions
  notReady @5 :Text;       # why the node cannot serve (its root supervisor is down); "": it can
  # A digest of the sender's view of the cluster: every member's name and region, the group size
  # and the protocol's timing (`node::cluster_digest`). Every node must have the same view, since
  # each computes every session's group and its leases from it; a node drops the ownership
  # messages of a peer whose digest differs from its own. 0: not given (no peers).
  cluster @6 :UInt64;
  # The node's load when it answered (heartbeat answers only; not set in calls): placement of
  # new sessions and the order of takeovers read it (docs/actors.md, "Load across the cluster").
  load @7 :NodeLoad;
  # The digest of the node's model file (kernels/digest.hpp): new sessions are placed only on
  # peers with the same model (a session is pinned to its model's digest). "": not given.
  modelDigest @8 :Text;
}

struct NodeLoad {
  waiting @0 :UInt32;          # turns waiting for admission
  running @1 :UInt32;          # turns generating
  kvPagesFree @2 :UInt32;      # KV pages no running turn reserved
  kvPagesCapacity @3 :UInt32;  # KV pages of the node; 0: not given
  kvPagesWanted @4 :UInt32;    # pages the waiting turns need to be admitted
  tokensPerSecond @5 :Float32; # generated over the last second or so
}

interface Peer {
  # Liveness and round trip. `sentNs` is the caller's clock, echoed back unchanged so that the
  # caller can measure the round trip on its own clock; `receivedNs` is the callee's
  # steady clock when it answered (not comparable across nodes; for diagnostics only).
  heartbeat @0 (from :NodeId, sentNs :UInt64) -> (node :NodeId, sentNs :UInt64, receivedNs :UInt64);

  retiredReplicate @1 () -> ();
  retiredLocate @2 () -> ();
  retiredFetch @3 () -> ();
  retiredHandoff @4 () -> ();
  retiredOwned @5 () -> ();

  # One message of the ownership protocol (actors/ownership.hpp, docs/actors.md "Ownership
  # protocol"): `message` is an encoded `OwnershipMsg` (actors/ownership_codec.hpp). One way in
  # effect: the answer is empty and comes at once, before the callee has handled the message;
  # the protocol's own replies are messages of their own, and it sends again what got no reply,
  # so a lost, late or repeated message changes nothing. A message that does not decode is
  # dropped and logged by the callee.
  ownership @6 (from :NodeId, message :Data) -> ();
}
