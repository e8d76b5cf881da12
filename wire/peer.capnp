@0xb4ba85ce2c53715f;

# Node to node (region links). Each node serves `Peer` on its peer endpoint (`--peer-listen`),
# a listening port of its own, apart from the client `Gateway` (keel.capnp).
#
# `heartbeat`, which region links call every `heartbeat_interval` to measure the round trip and
# to declare a silent peer down (docs/actors.md, "Region links"); `replicate`, which copies a
# session's checkpoints to a replica (docs/actors.md, "Replication"); `locate`, which tells
# what copies of sessions a node holds (for takeover, forwarding and a restarted node's
# reconciliation); `fetch`, which hands out a copy (to repair a corrupt record); `owned`, which
# tells a restarted node which sessions it owned (those its own store may have lost).
# Takeover needs no call of its own: the new owner's first `replicate` at epoch + 1 fences every
# copy. Forwarding goes through the client API: a node passes on the owner's `Session`.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("keel::wire");

struct NodeId {
  name @0 :Text;     # the node's name (`--name`)
  region @1 :Text;   # the node's region (`--region`)
  address @2 :Text;  # HOST:PORT of the node's peer endpoint
  clientAddress @3 :Text;  # HOST:PORT of the node's client Gateway ("" when not serving yet)
  draining @4 :Bool;       # the node drains: no new sessions, no replicas, no handoffs
  notReady @5 :Text;       # why the node cannot serve (its root supervisor is down); "": it can
}

# One turn's whole log of generated tokens.
struct TurnLog {
  turn @0 :UInt64;
  tokens @1 :List(Int32);
}

# What a node holds of one session.
struct SessionCopy {
  session @0 :Text;
  role @1 :Role;
  epoch @2 :UInt64;
  owner @3 :Text;       # the owner named in the copy's record
  turns @4 :UInt32;     # turns in the record
  tokens @5 :UInt64;    # generated tokens in the turn logs, all turns
  lastDone @6 :Bool;    # the last turn has ended

  enum Role {
    none @0;     # no copy (or an unreadable one)
    owner @1;    # the node's own session
    replica @2;  # a copy kept for another node
  }
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
  # `logs`, when not empty, are whole turn logs (a full copy, sent to a replica that may lack
  # earlier updates). A replica that does not hold the session's earlier tokens refuses a
  # `tokens` update with a gap (`badRequest`), and the sender then sends a full copy. A node that
  # owns the session itself refuses an epoch not above its own with `stale_epoch`; a higher one
  # means it lost the session, which it then drops.
  replicate @1 (from :NodeId, session :Text, epoch :UInt64, record :Data, turn :UInt64,
                fromIndex :UInt64, tokens :List(Int32), logs :List(TurnLog)) -> (error :PeerError);

  # The callee's copies of `sessions`, one entry each, in order (role `none` when it has none).
  # `from` names the caller (a node partitioned from the callee is refused).
  locate @2 (sessions :List(Text), from :NodeId) -> (copies :List(SessionCopy));

  # The callee's copy of `session` (own or replica): its epoch, record and turn logs.
  # `error.code` notFound when it has none.
  fetch @3 (session :Text, from :NodeId) -> (epoch :UInt64, record :Data, logs :List(TurnLog), error :PeerError);

  # A clean handoff (drain): the caller, `session`'s owner, has stopped writing it and sent the
  # callee a full copy; the callee takes the lease with the copy's epoch + 1 and serves the
  # session from now on. `epoch` is the new one.
  handoff @4 (from :NodeId, session :Text) -> (epoch :UInt64, error :PeerError);

  # Every copy the callee holds of a session whose record names `owner` as its owner (its
  # replicas of that node's sessions), as `locate` describes them. A restarted node asks it of
  # every peer, so that it restores the sessions its damaged store lost, not only the ones it
  # still has. `from` names the caller (a node partitioned from the callee is refused).
  owned @5 (owner :Text, from :NodeId) -> (copies :List(SessionCopy));

  # One message of the ownership protocol (actors/ownership.hpp, docs/actors.md "Ownership
  # protocol"): `message` is an encoded `OwnershipMsg` (actors/ownership_codec.hpp). One way in
  # effect: the answer is empty and comes at once, before the callee has handled the message;
  # the protocol's own replies are messages of their own, and it sends again what got no reply,
  # so a lost, late or repeated message changes nothing. A message that does not decode is
  # dropped and logged by the callee.
  ownership @6 (from :NodeId, message :Data) -> ();
}
