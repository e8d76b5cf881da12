@0xb4ba85ce2c53715f;

# Node to node (region links). Each node serves `Peer` on its peer endpoint (`--peer-listen`),
# a listening port of its own, apart from the client `Gateway` (keel.capnp).
#
# `heartbeat`, which region links call every `heartbeat_interval` to measure the round trip and
# to declare a silent peer down (docs/actors.md, "Region links"), and `replicate`, which copies a
# session's checkpoints to a replica (docs/actors.md, "Replication").
# TODO (issue 5): `takeover @2`
# (a replica takes a dead owner's session lease with epoch + 1) and `forward @3` (a request for a
# session that another node owns). Keep ordinals @2..@3 free for them.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("keel::wire");

struct NodeId {
  name @0 :Text;     # the node's name (`--name`)
  region @1 :Text;   # the node's region (`--region`)
  address @2 :Text;  # HOST:PORT of the node's peer endpoint
}

# A refusal, classified as base/error.hpp's `errc` (its numeric value; 0: none, success).
struct PeerError {
  code @0 :UInt8;
  message @1 :Text;
}

interface Peer {
  # Liveness and round trip. `sentNs` is the caller's clock, echoed back unchanged so that the
  # caller can measure the round trip on its own clock; `receivedNs` is the callee's
  # steady clock when it answered (not comparable across nodes; for diagnostics only).
  heartbeat @0 (from :NodeId, sentNs :UInt64) -> (node :NodeId, sentNs :UInt64, receivedNs :UInt64);

  # Stores a copy of the sender's session `session` at the sender's ownership `epoch`, in the
  # callee's session store (storage/session_store.hpp, fenced: an older epoch than the stored one
  # is refused with `stale_epoch`). `record` is the stored checkpoint (wire/checkpoint.capnp),
  # empty when only tokens advance; `tokens` are turn `turn`'s generated tokens from index
  # `fromIndex` on (may be empty). `error.code` 0: stored; `unimplemented` on a node without a
  # data directory.
  replicate @1 (from :NodeId, session :Text, epoch :UInt64, record :Data, turn :UInt64,
                fromIndex :UInt64, tokens :List(Int32)) -> (error :PeerError);
}
