@0x81ab5fe6dcdba4d0;
# Keel's client API: what `keel`, client programs and (later) keel-shell speak to a keel-node.
#
# Every failure that a call reports on purpose comes back in an `Error` (classified, with a
# message naming the thing and the value). A call may also fail with a Cap'n Proto exception
# (connection lost, malformed message); clients classify those as `disconnected` or `failed`.

using Cxx = import "/capnp/c++.capnp";
$Cxx.namespace("keel::wire");

struct Error {
  kind @0 :Kind;
  message @1 :Text;
  retryAfterMs @2 :UInt32;  # with `overloaded`: when to try again

  enum Kind {
    none @0;
    failed @1;        # a bug or a request that cannot work: do not retry
    overloaded @2;    # retry after retryAfterMs, with backoff
    disconnected @3;  # reconnect (maybe to another node), then retry
    badRequest @4;    # the request is wrong; the message says how
    notFound @5;      # no such session or turn
    unimplemented @6;
  }
}

struct SamplingParams {
  temperature @0 :Float32 = 0;       # 0: greedy
  topK @1 :Int32 = 0;                # 0: off
  topP @2 :Float32 = 1;              # 1: off
  minP @3 :Float32 = 0;              # 0: off
  repetitionPenalty @4 :Float32 = 1; # 1: off
  repetitionWindow @5 :Int32 = 64;
  seed @6 :UInt64 = 0;
}

enum FinishReason {
  length @0;      # the token budget of the turn was used
  eos @1;         # the model ended its reply
  context @2;     # the context length was reached
  cancelled @3;
  overloaded @4;  # shed by admission control: see the error's retryAfterMs
  failed @5;
}

struct TokenEvent {
  turn @0 :UInt64;
  index @1 :UInt64;  # within the turn, from 0; a client drops indices it already holds
  id @2 :Int32;
  piece @3 :Data;    # the token's bytes (UTF-8 may be split across tokens)
}

# Implemented by the client: the node streams a turn's tokens into it.
interface TokenSink {
  token @0 (event :TokenEvent) -> stream;
  done @1 (turn :UInt64, reason :FinishReason, error :Error) -> ();
}

struct Turn {
  turn @0 :UInt64;
  prompt @1 :List(Int32);     # the user's tokens of this turn
  generated @2 :List(Int32);  # the reply so far
  done @3 :Bool;
  reason @4 :FinishReason;
}

struct SessionInfo {
  id @0 :Text;
  turns @1 :UInt32;
  tokens @2 :UInt64;  # prompt and generated tokens of every turn
  priority @3 :Int32;
  running @4 :Bool;   # a turn is being generated
}

interface Session {
  info @0 () -> (info :SessionInfo);
  # Starts a turn. The reply comes as soon as the turn is accepted; tokens follow into `sink`.
  send @1 (text :Text, maxTokens :UInt32, sink :TokenSink) -> (turn :UInt64, prompt :List(Int32), error :Error);
  cancel @2 (turn :UInt64) -> (error :Error);
  history @3 () -> (turns :List(Turn), error :Error);
  # Streams the turn's tokens from `fromIndex` on into `sink`: those already generated, then
  # (when the turn still runs) the rest as they come, then `done`.
  resume @4 (turn :UInt64, fromIndex :UInt64, sink :TokenSink) -> (error :Error);
}

struct NodeInfo {
  name @0 :Text;
  region @1 :Text;
  model @2 :Text;
  vocabSize @3 :UInt32;
  contextLength @4 :UInt32;
  shards @5 :UInt32;
}

interface Gateway {
  info @0 () -> (info :NodeInfo);
  openSession @1 (params :SamplingParams, priority :Int32) -> (session :Session, id :Text, error :Error);
  getSession @2 (id :Text) -> (session :Session, error :Error);
  listSessions @3 () -> (sessions :List(SessionInfo));
}
