@0x949c6801f09a7c5b;
# A session record as the node's store keeps it (storage/ holds it as opaque payload bytes inside
# its checksummed envelope; wire/checkpoint.hpp converts it). The generated tokens of each turn
# are not here: they live in the store's turn logs, appended as they are produced.
#
# Independent of keel.capnp on purpose: the stored format changes only with `formatVersion`, not
# with the client API.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("keel::wire::stored");

struct SessionCheckpoint {
  formatVersion @0 :UInt16;  # 1; a reader refuses versions it does not know
  id @1 :Text;
  number @2 :UInt64;
  params @3 :Sampling;
  priority @4 :Int32;
  turns @5 :List(Turn);
  owner @6 :Text;  # the node that owned the session when it wrote this record ("" before failover)
  tenant @7 :Text;  # the tenant whose key opened it ("" on a node without --keys); only that
                    # tenant may use it, on any node that holds it
  # The model that serves it: its file's name and digest (kernels/digest.hpp). A session is
  # pinned to the digest: only a node whose model has the same one serves it. "" (a record
  # written before this field): any node's model.
  model @8 :Text;
  modelDigest @9 :Text;
  # The session's own context length when it was opened shortened under load (its turns never
  # grow the conversation past it); 0: the model's.
  contextLimit @10 :UInt32;

  struct Sampling {
    temperature @0 :Float32;
    topK @1 :Int32;
    topP @2 :Float32;
    minP @3 :Float32;
    repetitionPenalty @4 :Float32;
    repetitionWindow @5 :Int32;
    seed @6 :UInt64;
  }

  struct Turn {
    turn @0 :UInt64;
    user @1 :List(Int32);
    maxTokens @2 :Int32;
    done @3 :Bool;
    reason @4 :FinishReason;
    # A chat turn (keel.capnp Session.chat): the messages it sent; `user` is what their rendering
    # added to the conversation. Empty: a text turn. Added in format version 1 (a record without
    # it reads as text turns).
    messages @5 :List(Message);
    # On the first turn of a chat session: the chat template every turn of the session renders
    # with, so that any node that takes the session over renders its next turn identically.
    chatTemplate @6 :Text;
    # A chat turn whose template rewrites earlier turns (Qwen3's drops the reasoning of earlier
    # replies): how many tokens of what was fed before it stay, `user` following them; -1: all.
    # A record with one is format version 2.
    keep @7 :Int64 = -1;
  }

  struct Message {
    role @0 :Text;
    content @1 :Text;
  }

  enum FinishReason {
    length @0;
    eos @1;
    context @2;
    cancelled @3;
    overloaded @4;
    failed @5;
    filtered @6;
  }
}
