@0xdd6e188b604b732b;
# The session-ownership protocol as bytes (actors/ownership.hpp; docs/actors.md, "Ownership
# protocol"): `OwnershipMsg`, the messages its members send each other, and `StoredSession`,
# what each member stores of a session (storage/ keeps it as an opaque value of its `ownership`
# column family). actors/ownership_codec.hpp converts both, one flat message each, and refuses
# hostile bytes and values out of bounds.
#
# Independent of peer.capnp: the host carries `OwnershipMsg` however it likes (as one `Data`
# field of a call, or framed on a stream of its own).

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("keel::wire");

# A lease's fencing token, ordered by epoch, then by owner. Epoch 0 and owner "": none.
struct Ballot {
  epoch @0 :UInt64;
  owner @1 :Text;  # the node's name (at most 255 bytes)
}

# One turn of a replicated session: the user's input (opaque) and the reply's tokens so far.
struct TurnEntry {
  user @0 :Data;
  tokens @1 :List(Int32);  # at most 2^20
  done @2 :Bool;           # the turn has ended
  end @3 :Data;            # with done: how it ended (the host's words, opaque)
}

# What is replicated of a session: opaque metadata (its parameters) and its turns (at most 2^16).
struct SessionData {
  meta @0 :Data;
  turns @1 :List(TurnEntry);
}

# What one member stores of one session: the highest ballot it promised, the ballot of the copy
# it accepted, and that copy.
struct StoredSession {
  promised @0 :Ballot;
  accepted @1 :Ballot;
  data @2 :SessionData;
}

# A session the sender of a heartbeat owns, with its ballot.
struct Claim {
  session @0 :Text;
  ballot @1 :Ballot;
}

# Every `sent` is the sender's monotonic clock in ns (an answer echoes its request's).

# The sender's claims on the sessions whose group has the receiver.
struct HeartbeatMsg {
  sent @0 :Int64;
  claims @1 :List(Claim);
}

# Per claim, in order: the ballot the answerer promised for that session (equal: a grant).
struct HeartbeatReply {
  sent @0 :Int64;
  promised @1 :List(Ballot);
}

# A candidate asks for `session` at ballot `b`.
struct PrepareMsg {
  session @0 :Text;
  b @1 :Ballot;
  sent @2 :Int64;
}

# The answer to a prepare: a promise (`ok`, with a wait and the answerer's copy) or a refusal
# (the higher ballot `promised`, or `starting`: the answerer restarted less than `hold` ago).
struct PromiseReply {
  session @0 :Text;
  b @1 :Ballot;           # the ballot asked for
  sent @2 :Int64;
  ok @3 :Bool;
  promised @4 :Ballot;    # refused: the higher ballot promised
  wait @5 :Int64;         # ok: wait this long (the answerer's clock) before serving
  accepted @6 :Ballot;    # the ballot of the answerer's copy (none: no copy)
  data @7 :SessionData;
  starting @8 :Bool;
}

# The owner's whole copy of `session` at ballot `b`, version `seq`; `durable`: store it synced.
struct WriteMsg {
  session @0 :Text;
  b @1 :Ballot;
  seq @2 :UInt64;
  durable @3 :Bool;
  data @4 :SessionData;
  sent @5 :Int64;
}

# The answer to a write: stored (`ok`), refused by a higher ballot (`promised`), or not stored
# because the disk failed (`diskFailed`).
struct WriteReply {
  session @0 :Text;
  b @1 :Ballot;
  seq @2 :UInt64;
  durable @3 :Bool;
  sent @4 :Int64;
  ok @5 :Bool;
  diskFailed @6 :Bool;
  promised @7 :Ballot;
}

# One message between members: exactly one of `ownership_msg`'s six alternatives.
struct OwnershipMsg {
  union {
    heartbeat @0 :HeartbeatMsg;
    heartbeatReply @1 :HeartbeatReply;
    prepare @2 :PrepareMsg;
    promise @3 :PromiseReply;
    write @4 :WriteMsg;
    writeReply @5 :WriteReply;
  }
}
