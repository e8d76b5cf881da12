#pragma once

// Session ownership as a protocol between the nodes of a cluster: who may write and stream a
// session, how a write becomes durable, and how another node takes a session over without ever
// making two owners or losing an acknowledged turn. docs/actors.md, "Ownership protocol", gives
// the guarantees and why each holds.
//
// This file has no threads, no sockets and no clock of its own: `ownership` is a state machine
// driven by its host (messages in, ticks in; messages, store writes and events out through
// `ownership_env`). keel-sim hosts one per simulated node on a simulated network and clock; a
// keel-node hosts it on its real ones. The same code decides in both.

#include <cstdint>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <tuple>
#include <variant>
#include <vector>

namespace keel {

/// A lease's fencing token: the ownership epoch and the node that holds it. Ordered by epoch,
/// then by owner name, so two candidates can never hold equal ballots.
struct ballot {
  uint64_t epoch = 0;
  std::string owner;
  friend bool operator==(const ballot&, const ballot&) = default;
  friend auto operator<=>(const ballot&, const ballot&) = default;
};

std::string to_string(const ballot& b);  // "3/b"; "-" for none

/// A member of the cluster: every configured node (live or not).
struct cluster_member {
  std::string name;
  std::string region;
};

/// The fixed replica group of `session`: `size` members (at most all of them), chosen by
/// rendezvous hashing of (session, member name) over every configured member, live or not,
/// taking one member of each region before a second of any (so a group of three in three
/// regions survives the loss of any region). The same in every process. Ownership moves only
/// within the group, and every quorum is a majority of it.
std::vector<std::string> replica_group(const std::string& session,
                                       const std::vector<cluster_member>& members, size_t size);

/// A majority of `n` members.
inline size_t majority(size_t n) {
  return n / 2 + 1;
}

/// Clocks and timeouts of the protocol (nanoseconds of each node's local monotonic clock).
struct ownership_timing {
  int64_t heartbeat = 100'000'000;
  /// A member silent this long is suspected: the group's next member tries to take over.
  int64_t suspect_after = 500'000'000;
  /// A grant (a heartbeat, promise or write answered by a member) is good for this long at the
  /// owner, counted from when the owner *sent* the request.
  int64_t lease = 400'000'000;
  /// The bound on clock rate drift between any two nodes (0.01: 1%).
  double drift = 0.01;
  /// Added to every wait derived from a lease (scheduling delays, a pause shorter than this).
  int64_t margin = 50'000'000;
  /// Unanswered prepares and writes are sent again after this long.
  int64_t retry = 150'000'000;
  /// A restarted node promises nothing for this long (it forgot whom it granted leases).
  /// A member that promised a new owner waits this long after its last grant to the old one.
  int64_t hold() const {
    return static_cast<int64_t>(static_cast<double>(lease) * (1 + drift) / (1 - drift)) + margin;
  }
  /// `d` of another node's clock, as a safe wait on this node's clock.
  int64_t convert(int64_t d) const {
    return static_cast<int64_t>(static_cast<double>(d) * (1 + drift) / (1 - drift));
  }
};

/// One turn of a replicated session: the user's input (opaque bytes), the reply's tokens so far.
struct turn_entry {
  std::string user;
  std::vector<int32_t> tokens;
  bool done = false;
  /// With `done`: how the turn ended, opaque (the host's words; keel-node's finish reason).
  std::string end;
  friend bool operator==(const turn_entry&, const turn_entry&) = default;
};

/// What is replicated of a session: opaque metadata (parameters) and its turns.
struct session_data {
  std::string meta;
  std::vector<turn_entry> turns;
  friend bool operator==(const session_data&, const session_data&) = default;
};

/// Whether `a` extends `b` or equals it (a copy at one ballot only grows; used to order copies
/// of one ballot that arrive out of order).
bool extends(const session_data& a, const session_data& b);

/// What one member stores of one session: the highest ballot it promised, the ballot of the
/// copy it accepted, and that copy. Stored synced whenever `promised` or `accepted` changes.
struct stored_session {
  ballot promised;
  ballot accepted;
  session_data data;
};

// Messages between the members (one variant; the host carries them).
struct heartbeat_msg {
  int64_t sent = 0;  // the sender's clock
  /// The sessions the sender owns whose group has the receiver, with the sender's ballots.
  std::vector<std::pair<std::string, ballot>> claims;
};
struct heartbeat_reply {
  int64_t sent = 0;  // echoed
  /// For each claim, in order: the ballot the answerer has promised for that session. Equal
  /// to the claim's: a grant of the lease; higher: the claimant lost the session.
  std::vector<ballot> promised;
};
struct prepare_msg {
  std::string session;
  ballot b;
  int64_t sent = 0;
};
struct promise_reply {
  std::string session;
  ballot b;            // the ballot asked for
  int64_t sent = 0;    // echoed
  bool ok = false;
  ballot promised;     // when refused: the higher ballot it promised
  int64_t wait = 0;    // ok: wait this long (the answerer's clock) before serving
  ballot accepted;     // the answerer's copy: its ballot (none: no copy)
  session_data data;
  bool starting = false;  // refused because the answerer restarted less than `hold` ago
};
struct write_msg {
  std::string session;
  ballot b;
  uint64_t seq = 0;  // the owner's version of `data` at `b`
  bool durable = false;
  session_data data;
  int64_t sent = 0;
};
struct write_reply {
  std::string session;
  ballot b;
  uint64_t seq = 0;
  bool durable = false;
  int64_t sent = 0;
  bool ok = false;
  bool disk_failed = false;
  ballot promised;  // refused: the higher ballot
};
using ownership_msg =
    std::variant<heartbeat_msg, heartbeat_reply, prepare_msg, promise_reply, write_msg, write_reply>;

/// Why a request was refused.
enum class refusal : uint8_t {
  none,
  not_owner,    // another member owns it (see `owner_hint`) or nobody yet: ask there, retry
  no_quorum,    // this node cannot reach a majority of the session's group now: retry
  busy,         // a turn is still running
  bad_turn,     // a turn number that does not follow the session's turns
  not_in_group, // this node is not in the session's replica group
};
const char* to_string(refusal r);

/// What the protocol needs of its host. Called synchronously from `ownership`'s methods.
class ownership_env {
 public:
  virtual ~ownership_env() = default;
  /// This node's monotonic clock, ns.
  virtual int64_t now() = 0;
  virtual void send(const std::string& to, ownership_msg m) = 0;
  /// Stores `s`; `sync`: durably before returning. false: the disk failed, nothing stored.
  virtual bool store(const std::string& session, const stored_session& s, bool sync) = 0;

  // Events.
  /// This node owns `session` now (after an open or a takeover): serve it from `data`.
  virtual void acquired(const std::string& session) = 0;
  /// This node no longer owns `session` (another took it over): stop serving it at once. Also
  /// said of a session this node owned before it (re)started, when it learns another owns it
  /// (a host restarted while its node went on may still serve it); may come more than once.
  virtual void lost(const std::string& session) = 0;
  /// A majority of the group stored `turn` of `session` as its owner submitted it (or its end,
  /// with `finished`): the owner may acknowledge it now (it holds its lease).
  virtual void durable(const std::string& session, uint64_t turn, bool finished) = 0;

  /// The room of member `node` for new work (node_load::room: the share of its KV pages free of
  /// running and waiting turns, in [0, 1]), as this node last heard it. Orders the members that
  /// try to take a silent owner's sessions over (`takeover_rank`); it decides who tries first,
  /// never whether a takeover is safe. The same for every member (the default): group order.
  virtual double room(const std::string& /*node*/) { return 1.0; }

  /// Whether this node may own `session`, whose newest copy here is `data` (a session is
  /// pinned to a model; a node serving another model must not take it over, nor back). A member
  /// that may not still stores copies, promises and votes. The default: it may.
  virtual bool may_own(const std::string& /*session*/, const session_data& /*data*/) {
    return true;
  }
};

/// This member's place among those that may take `session` over from `owner` (0: it tries
/// first, then each next one half a suspect time later). `live`: the group's members this node
/// hears from, in group order, itself included, the owner not. When every one has the same room
/// (the default), group order. Otherwise weighted rendezvous: member m scores
/// -room(m) / ln(u(session, m)), u uniform in (0, 1) from the rendezvous hash, so that across
/// the owner's sessions each survivor comes first in proportion to its room, and every member
/// computes the same order from the same loads. Members without room (room 0) come after every
/// member with some (among themselves by the hash), but still take the session when no one else
/// does (their batcher then queues the turn, within its KV budget).
size_t takeover_rank(const std::string& session, const std::string& self,
                     const std::vector<std::string>& live, const std::vector<double>& rooms);

/// How the owner writes (the old rules are kept for keel-sim's checker test only).
enum class ownership_rule : uint8_t {
  majority,  // the protocol described here
  /// The rule before majorities (issue #10): a copy on any one peer, or on none when no peer
  /// looks live, is durable; a member that finds the owner silent takes over alone, at once.
  /// Unsafe under partitions; keel-sim --rule view shows how.
  view,
};

/// One node's part in the ownership of every session whose group it is in: acceptor (it stores
/// copies, promises ballots to candidates, grants leases in heartbeat answers) and, for the
/// sessions it owns, proposer (it writes at its ballot to the group and counts majorities).
///
/// Leases: an owner may serve a session (stream tokens, acknowledge) only while a majority of
/// its group granted it within `lease`, counted from the request's send time on its own clock.
/// A member grants a session when it answers a heartbeat that claims it, a prepare or a write,
/// and only while its (durable) promise for that session is the owner's ballot. A member that
/// promises a session to a new candidate tells the candidate to wait until its last grant to the
/// old holder is `hold()` old. So the old owner's lease has ended before the new owner serves
/// (docs/actors.md).
///
/// Not thread-safe: the host calls it from one thread (or actor) at a time.
class ownership {
 public:
  struct config {
    std::string self;
    std::vector<cluster_member> members;  // every configured member, this node included
    size_t group_size = 3;                // owner + replicas
    ownership_timing timing;
    ownership_rule rule = ownership_rule::majority;
    /// The owner sends the running turn's tokens to the group every this many tokens (not
    /// waited for); the turn's end and every new turn are waited for by a majority.
    size_t checkpoint_every = 8;
  };

  ownership(config cfg, ownership_env& env);

  /// After a (re)start: what the store kept. A restarted node promises nothing for `hold()`,
  /// and takes its own sessions back (a new ballot) before serving them.
  ///
  /// `damaged`: the store lost part of what it had synced (docs/actors.md, "A damaged store").
  /// Promises and copies this node gave may be gone, so its vote could let a candidate miss an
  /// acknowledged turn. From then on (it is stored, and holds across restarts) the node is an
  /// amnesiac member: after every start it votes on a session (promises, acknowledges writes,
  /// grants leases) only once it has read the session back from enough other members to meet
  /// every majority it could have been part of (`recovery_reads`), and taken their highest
  /// promise and newest copy as its own.
  void recover(std::map<std::string, stored_session> stored, bool damaged = false);
  /// Whether this node votes on `session` now (always, unless it is an amnesiac member that has
  /// not read the session back since it started).
  bool votes(const std::string& session) const {
    return !amnesia_ || trusted_.count(session) > 0;
  }
  /// Members an amnesiac member reads a session back from before it votes: enough to share one
  /// with every majority of the group that holds this node (n - majority + 1 of the others).
  static size_t recovery_reads(size_t group_size) {
    return group_size <= 1 ? 0 : group_size - majority(group_size) + 1;
  }
  /// Where the amnesiac mark is stored (not a session id: ids are "s-...@NODE").
  static constexpr const char* amnesia_key = "~amnesia";
  /// Call every `heartbeat / 4` or so: heartbeats, retries, takeovers of silent owners.
  void tick();
  void receive(const std::string& from, const ownership_msg& m);

  /// Opens `session` here with `meta` (idempotent: an existing session is adopted as it is).
  /// `acquired` follows once this node owns it; `not_in_group` when this node is not a member.
  refusal open(const std::string& session, const std::string& meta);
  /// Whether a majority of `session`'s group (this node included) was heard from within
  /// `suspect_after` (true in the first `suspect_after` after a start): a host refuses an open
  /// at once when not (a minority cannot open), rather than after a candidacy's timeout.
  bool reaches_majority(const std::string& session);
  /// Appends turn `turn` (idempotent for the same `user`): `durable(session, turn, false)` once
  /// a majority stored it (at once when it already had).
  refusal submit_turn(const std::string& session, uint64_t turn, const std::string& user);
  /// The owner's generated tokens, `tokens[from..]` of the running turn; sent to the group
  /// every `checkpoint_every` tokens.
  void append_tokens(const std::string& session, uint64_t turn, size_t from,
                     const std::vector<int32_t>& tokens);
  /// Ends the running turn, with `end` saying how (kept in its `turn_entry`):
  /// `durable(session, turn, true)` once a majority stored the end.
  void finish_turn(const std::string& session, uint64_t turn, const std::string& end = {});

  /// Gives `session` up (a drain): this node stops serving and claiming it at once (no `lost`
  /// event: the host asked), and does not take it back as its own; the group's next member
  /// finds it unclaimed after `suspect_after` and takes it over as from a dead owner. Waiting
  /// acknowledgements are dropped. A no-op when this node does not own it.
  void resign(const std::string& session);
  /// Whether this node owns `session` and holds its lease now: it may stream and acknowledge.
  bool may_serve(const std::string& session);
  /// Until when (this node's clock) `may_serve(session)` stays true if no grant arrives meanwhile:
  /// may_serve() is `now() < serve_until()`. INT64_MIN when it may not serve now or later without
  /// new grants. For a host whose token path reads a published copy of the lease rather than
  /// asking this object (keel-node's batcher, actors/ownership_host.hpp).
  int64_t serve_until(const std::string& session);
  bool owns(const std::string& session) const { return owned_.count(session) > 0; }
  /// The sessions this node owns (serving or taking over), ordered.
  std::vector<std::string> owned_sessions() const;
  /// How many sessions this node stores a copy of for another owner (a member of their group).
  size_t copies_for_others() const;
  /// The owner's data (null when not owned here).
  const session_data* data(const std::string& session) const;
  /// This node's stored copy of `session` (null when none).
  const stored_session* copy(const std::string& session) const;
  /// Who owns `session` as far as this node knows ("" when unknown).
  std::string owner_hint(const std::string& session) const;
  const std::vector<std::string>& group(const std::string& session);
  const config& settings() const { return cfg_; }

 private:
  struct owned_session {
    ballot b;
    session_data data;
    uint64_t seq = 0;          // version of `data`
    uint64_t durable_seq = 0;  // the newest version written durably
    std::map<std::string, uint64_t> acked;          // per member: highest seq stored
    std::map<std::string, uint64_t> durable_acked;  // per member: highest seq stored synced
    std::map<std::string, int64_t> last_sent;       // per member: when a write last went out
    std::map<std::string, int64_t> granted;         // per member: send time of its newest grant
    // Events waiting for a majority: (seq, turn, finished).
    std::vector<std::tuple<uint64_t, uint64_t, bool>> pending;
    std::map<uint64_t, uint64_t> turn_seq;  // turn -> the version that added it
    size_t unsent_tokens = 0;
    bool ready = false;  // the takeover's first write is on a majority
  };
  struct candidacy {
    ballot b;
    bool open = false;
    std::string meta;
    int64_t started = 0;
    std::map<std::string, promise_reply> promises;  // ok ones, by member
    std::map<std::string, int64_t> received;        // when each promise arrived
    int64_t last_sent = 0;
  };

  stored_session& stored(const std::string& session);
  bool persist(const std::string& session, bool sync);
  // Acceptor side.
  void on_heartbeat(const std::string& from, const heartbeat_msg& m);
  void on_prepare(const std::string& from, const prepare_msg& m);
  /// Whether promising `b` for `session` now would take it from an owner that is alive: this
  /// node's promised owner (not b's) holds the lease here, or claimed it here within
  /// suspect_after.
  bool disturbs(const std::string& session, const ballot& b, int64_t now);
  void on_write(const std::string& from, const write_msg& m);
  /// Another member's answer shows a promise `b` above this node's: promise it too.
  void learn(const std::string& session, const ballot& b);
  /// Moves `session`'s promise to `b`: fences the previous holder, drops own ownership.
  void promise_to(const std::string& session, const ballot& b);
  // Owner side.
  void on_heartbeat_reply(const std::string& from, const heartbeat_reply& m);
  void on_promise(const std::string& from, const promise_reply& m);
  void on_write_reply(const std::string& from, const write_reply& m);
  void acquire(const std::string& session, bool open, const std::string& meta);
  void try_complete(const std::string& session);
  void become_owner(const std::string& session, candidacy& c);
  void send_writes(const std::string& session, bool force);
  void write_to(const std::string& session, owned_session& o, const std::string& member);
  void write_own(const std::string& session, owned_session& o, bool sync);
  bool lease_valid(const std::string& session, owned_session& o);
  /// The newest version stored synced on a majority of the group.
  uint64_t durable_through(const std::string& session, owned_session& o);
  void fire_pending(const std::string& session);
  void lose(const std::string& session);
  void takeovers();
  bool alive(const std::string& member) const;
  // An amnesiac member's reads (`recover` with `damaged`).
  void need_read(const std::string& session);
  void mark_amnesia();
  void send_reads();
  void on_read_reply(const std::string& from, const promise_reply& m);

  config cfg_;
  ownership_env& env_;
  int64_t started_at_ = 0;
  std::map<std::string, stored_session> stored_;
  std::map<std::string, std::vector<std::string>> groups_;
  // Acceptor: the last grant to each requester (this node's clock; any session).
  std::map<std::string, int64_t> last_grant_;
  /// Per session: when its promised owner last claimed it here (heartbeat, prepare, write).
  std::map<std::string, int64_t> claimed_;
  /// Per session: when its promised owner last claimed it here as its owner (a heartbeat this
  /// node granted, or a write): what `disturbs` asks.
  std::map<std::string, int64_t> serving_;
  /// Per session: until when (this node's clock) a promise must make its candidate wait.
  std::map<std::string, int64_t> hold_until_;
  std::map<std::string, uint64_t> seen_;  // session -> highest epoch heard of
  // Owner side.
  std::map<std::string, owned_session> owned_;
  std::map<std::string, candidacy> candidacies_;
  std::map<std::string, int64_t> retry_after_;  // session -> no new candidacy before this
  /// Sessions given up by `resign` whose promise still names this node: not taken back.
  std::set<std::string> resigned_;
  std::map<std::string, int64_t> heard_;        // member -> last message from it
  int64_t last_heartbeat_ = 0;
  /// An amnesiac member (see `recover`): the sessions it votes on again (read back since the
  /// start), those it must read, when it last asked, and the answers so far.
  bool amnesia_ = false;
  bool amnesia_marked_ = true;  // the mark is in the store
  std::set<std::string> trusted_;
  std::set<std::string> to_read_;
  std::map<std::string, int64_t> read_sent_;
  std::map<std::string, std::map<std::string, promise_reply>> reads_;
  /// Per member: the claims of each heartbeat sent to it within the last `lease`, by send time.
  std::map<std::string, std::map<int64_t, std::vector<std::pair<std::string, ballot>>>> claims_sent_;
};

}  // namespace keel
