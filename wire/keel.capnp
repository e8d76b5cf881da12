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
    unauthenticated @7;  # no API key or a wrong one (a node started with --keys): log in
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
  filtered @6;    # the guardrail stopped the reply (a node older than it never sends it)
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

# One message of a chat turn.
struct Message {
  role @0 :Text;     # "system", "user", "tool"... as the model's chat template knows them
  content @1 :Text;  # plain text: control-token text in it stays text (it cannot forge a turn)
}

struct SessionInfo {
  id @0 :Text;
  turns @1 :UInt32;
  tokens @2 :UInt64;  # prompt and generated tokens of every turn
  priority @3 :Int32;
  running @4 :Bool;   # a turn is being generated
  owner @5 :Text;     # the node that serves it (the owner, when reached through another node)
  model @6 :Text;        # the model that serves it (its file), to which it is pinned
  modelDigest @7 :Text;  # that file's digest (kernels/digest.hpp); "": not pinned
  contextLength @8 :UInt32;  # the session's context length: the model's, or shorter when it
                             # was opened under load (the degradation policy); 0: not said
}

interface Session {
  info @0 () -> (info :SessionInfo);
  # Starts a turn. The reply comes as soon as the turn is accepted; tokens follow into `sink`.
  # With `turnGiven`, `turn` is the number the client expects the turn to get (the session's
  # turns so far), which makes sending again safe: a turn of that number with the same text is
  # the same turn (the reply names it and its tokens stream into `sink` from index 0), another
  # text under that number or any other number is `badRequest`. Without it, a send after one
  # whose answer was lost may add the text twice.
  # `special`: control-token text in `text` (`<|im_start|>`) is parsed as those tokens (keel
  # generate --special); otherwise it stays text. A node older than the field reads it as false.
  send @1 (text :Text, maxTokens :UInt32, sink :TokenSink, turn :UInt64, turnGiven :Bool, special :Bool) -> (turn :UInt64, prompt :List(Int32), error :Error);
  cancel @2 (turn :UInt64) -> (error :Error);
  history @3 () -> (turns :List(Turn), error :Error);
  # Streams the turn's tokens from `fromIndex` on into `sink`: those already generated, then
  # (when the turn still runs) the rest as they come, then `done`. `held`: the turn's tokens the
  # client holds, from index 0 (optional); a node that took the session over with fewer adopts
  # the rest instead of generating them again.
  resume @4 (turn :UInt64, fromIndex :UInt64, sink :TokenSink, held :List(Int32)) -> (error :Error);
  # Starts a chat turn: `messages` (a system prompt, a user turn...) instead of raw text. The
  # node renders the whole conversation (every turn's messages, each reply as an assistant
  # message, then `messages`) with the session's chat template and feeds what the rendering adds
  # after what the model was fed (docs/wire.md, "Chat turns"); the reply and `prompt` are as
  # for `send`. A session's first turn decides its kind: a chat session takes only `chat`, a
  # text session only `send` (`badRequest` otherwise). `turn`/`turnGiven` as for `send`: the
  # same messages under a number taken already are that turn again. A node older than this
  # method answers it `unimplemented`.
  chat @5 (messages :List(Message), maxTokens :UInt32, sink :TokenSink, turn :UInt64, turnGiven :Bool) -> (turn :UInt64, prompt :List(Int32), error :Error);
}

struct NodeInfo {
  name @0 :Text;
  region @1 :Text;
  model @2 :Text;
  vocabSize @3 :UInt32;
  contextLength @4 :UInt32;
  shards @5 :UInt32;
}

# The bootstrap capability of the client port. On a node started with --keys, every call of the
# bootstrap but `login` is refused with `unauthenticated`: a client logs in first and uses the
# Gateway it gets, which is its tenant's. Without --keys the bootstrap serves anyone (one tenant,
# "") and `login` returns it for any key.
#
# A tenant's Gateway sees and opens only that tenant's sessions: another tenant's session id
# gets exactly the answer of an unknown one (`notFound`). Its calls count against the key's
# limits on that node (requests and tokens per minute, sessions held): over one, `overloaded`
# naming the limit and its value, with a retry-after. A priority above the key's class is
# capped to the class's highest (batch 0, standard 10, interactive 20).
interface Gateway {
  info @0 () -> (info :NodeInfo, error :Error);
  # Opens a session. With peers, a node whose KV budget is nearly taken opens it on a peer with
  # more room and passes that node's `Session` on (the id names the node that opened it);
  # `here`: open it on this node whatever its load (what a node placing a session asks).
  openSession @1 (params :SamplingParams, priority :Int32, here :Bool) -> (session :Session, id :Text, error :Error);
  getSession @2 (id :Text) -> (session :Session, error :Error);
  listSessions @3 () -> (sessions :List(SessionInfo), error :Error);
  # The Gateway of the key's tenant. A wrong key is answered `unauthenticated` "API key
  # refused" after a pause (wrong keys are answered one at a time, 200 ms apart, across every
  # connection; while 32 wait, every login is refused as `overloaded`).
  login @4 (key :Text) -> (gateway :Gateway, tenant :Text, error :Error);
}

# -- The admin API: what keel-shell speaks (docs/shell.md) ----------------------------------------
# Served on a port of its own (`keel-node --admin-listen HOST:PORT`), apart from clients and
# peers, and only to a caller that knows the node's admin key (`--admin-key`).

interface AdminGate {
  # The node's Admin capability, for the right key. Refused (`error`, no `admin`) with
  # `badRequest` "admin key refused" for a wrong key, and `unimplemented` "admin interface
  # disabled: ..." on a node started without a key. `node` is the node's name.
  login @0 (key :Text) -> (admin :Admin, node :Text, error :Error);
}

# One actor of the node's supervision tree.
struct ActorInfo {
  path @0 :Text;               # "node/engine/shard-0"; the root is the node's name
  depth @1 :UInt32;            # 0 for the root
  kind @2 :Text;               # supervisor, shard_worker, batcher, session, region_link, ...
  state @3 :Text;              # running, restarting, stopped
  restarts @4 :UInt32;
  lastFailure @5 :Text;        # the exit reason of its last failure; "" when it never failed
  lastFailureAgeMs @6 :UInt64; # how long ago, by the node's clock
  lastFailureUnixMs @7 :Int64; # when (system clock); 0 when it never failed
}

# A peer as this node's region link sees it.
struct PeerView {
  address @0 :Text;  # its peer endpoint, as configured
  name @1 :Text;     # from its heartbeats ("" until one was answered)
  region @2 :Text;
  status @3 :Text;   # up, suspect, down
  breaker @4 :Text;  # closed, open, half-open
  roundTripUs @5 :UInt64;
  failures @6 :UInt64;
  lastFailure @7 :Text;
  clientAddress @8 :Text;  # its Gateway's HOST:PORT, from its heartbeats ("" until one)
  # Its load, from its last heartbeat answer (all 0 until one): KV pages, waiting turns and
  # the share of its KV pages free for new work (actors/load.hpp).
  kvPagesFree @9 :UInt32;
  kvPagesCapacity @10 :UInt32;
  waiting @11 :UInt32;
  room @12 :Float32;
  modelDigest @13 :Text;  # of its model file, from its heartbeats
}

struct NodeReport {
  name @0 :Text;
  region @1 :Text;
  clientAddress @2 :Text;  # the Gateway's HOST:PORT
  adminAddress @3 :Text;
  peerAddress @4 :Text;    # "" without --peer-listen
  model @5 :Text;
  shards @6 :UInt32;
  uptimeMs @7 :UInt64;
  sessions @8 :UInt32;
  runningTurns @9 :UInt32;
  queueLength @10 :UInt32;    # turns waiting for admission
  kvPagesUsed @11 :UInt32;    # of each shard (all shards hold the same pages)
  kvPagesTotal @12 :UInt32;
  tokensPerSecond @13 :Float64;  # generated tokens, over the last second
  tokens @14 :UInt64;            # generated since the batcher last started
  steps @15 :UInt64;
  groupFailures @16 :UInt64;
  preemptions @17 :UInt64;
  shed @18 :UInt64;
  lastRecoveryMs @19 :Float64;   # from the last group failure to the next token; 0: none yet
  restarts @20 :UInt32;          # restarts by every supervisor of the node
  faultsFired @21 :UInt64;
  replicated @22 :UInt64;        # session writes a replica acknowledged
  replicationFailures @23 :UInt64;
  peers @24 :List(PeerView);
  draining @25 :Bool;            # `drain` ran: the node opens no new sessions
  room @26 :Float32;             # share of the KV pages free for new work (actors/load.hpp)
  modelDigest @27 :Text;         # the digest of its model file (kernels/digest.hpp)
}

struct AdminSession {
  id @0 :Text;
  owner @1 :Text;              # the node that owns it
  replicas @2 :List(Text);     # the nodes known to hold a copy (may be empty: not known)
  epoch @3 :UInt64;
  turns @4 :UInt32;
  tokens @5 :UInt64;           # prompt and generated tokens of every turn
  running @6 :Bool;
  priority @7 :Int32;
  durable @8 :Bool;            # the node has a session store (--data)
  checkpointTurn @9 :UInt64;   # with `durable`: the last turn in the store ...
  checkpointTokens @10 :UInt64;  # ... and how many of its generated tokens its log holds
  tenant @11 :Text;            # the tenant whose API key opened it ("" without --keys)
  parked @12 :Text;            # why its actor is parked (failed again and again); "" when it is not
  model @13 :Text;             # the model that serves it, and its digest ("": not pinned)
  modelDigest @14 :Text;
  contextLimit @15 :UInt32;    # its own context length when opened under load; 0: the model's
}

struct Fault {
  kind @0 :Kind;
  afterSteps @1 :UInt32;  # crash, stall: at the (afterSteps + 1)-th step from now
  durationMs @2 :UInt32;  # stall, cut, partition, diskFull
  count @3 :UInt32;       # kvFail: how many allocations fail
  peers @4 :List(Text);   # partition: the peers to cut from (node names)

  enum Kind {
    crash @0;   # a shard worker (at a step) or a session (at its next message)
    stall @1;   # a shard worker sleeps durationMs before a step
    kvFail @2;  # a shard worker's next `count` KV page allocations fail
    cut @3;     # a region link fails every heartbeat for durationMs
    clear @4;   # the node (its root path): disarm every armed fault and heal every partition
    partition @5;  # the node (its root path): cut all traffic with `peers`, both ways, for
                   # durationMs (0: until `clear`)
    diskFull @6;   # the node (its root path): every write to its session store fails with
                   # ENOSPC for durationMs (0: until `clear`), as on a full disk
  }
}

# What `drain` did with one session.
struct DrainedSession {
  id @0 :Text;
  to @1 :Text;       # the node that took it over; "" when it stayed
  epoch @2 :UInt64;  # the new owner's epoch (the old one + 1); 0 when it stayed
  error @3 :Text;    # why it stayed; "" when it moved
}

# Paths name actors of the node's tree, from its root ("node/engine/shard-0"). An unknown path is
# `notFound`, naming the children that do exist.
interface Admin {
  tree @0 () -> (actors :List(ActorInfo), error :Error);
  report @1 () -> (report :NodeReport, error :Error);
  sessions @2 () -> (sessions :List(AdminSession), error :Error);
  # Makes the actor exit with "killed by admin" (its supervisor restarts it as it would after a
  # crash); `outcome` says what the supervisor did within a short wait.
  kill @3 (path :Text) -> (outcome :Text, error :Error);
  # The supervisor stops the actor and starts it again (a manual restart).
  restart @4 (path :Text) -> (outcome :Text, error :Error);
  fault @5 (path :Text, fault :Fault) -> (outcome :Text, error :Error);
  # Drains the node: it opens no new sessions from now on (clients get `overloaded`), and hands
  # each session over to a live peer (a clean handoff: the peer takes it at epoch + 1; a running
  # turn continues there and its client resumes). `moved` has one entry per session, moved or
  # not; `remaining` is how many sessions the node still holds afterwards (0: safe to stop).
  # `unimplemented` on a node without --data and --peers. Answers once every handoff ended.
  drain @6 () -> (moved :List(DrainedSession), remaining :UInt32, error :Error);
}
