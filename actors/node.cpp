#include "actors/node.hpp"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "actors/detail/ownership_part.hpp"
#include "actors/ownership_codec.hpp"
#include "actors/peer_server.hpp"

#include <caf/scoped_actor.hpp>

#include "actors/shard_worker.hpp"
#include "kernels/chat_prompt.hpp"
#include "kernels/digest.hpp"
#include "kernels/gguf.hpp"
#include "kernels/engine.hpp"
#include "kernels/kv_cache.hpp"
#include "wire/checkpoint.hpp"

namespace keel {

namespace {

/// Wraps a child spec so that each start records the new handle in the node context.
child_spec recording(child_spec spec, std::function<void(caf::actor)> record) {
  auto start = std::move(spec.start);
  spec.start = [start, record](caf::actor_system& sys, const std::string& path,
                               const caf::message& args) -> caf::expected<caf::actor> {
    auto a = start(sys, path, args);
    if (a) record(*a);
    return a;
  };
  return spec;
}

constexpr auto call_timeout = std::chrono::seconds(10);

/// "s-<24 base32 characters>@NAME": 120 random bits from the node's environment (the kernel's
/// generator).
caf::expected<std::string> random_session_id(const node_env& env, const std::string& node) {
  unsigned char bytes[15];
  if (auto err = env.random(bytes, sizeof bytes))
    return make_error(code_of(err), "no random bits for a session id: " + message_of(err));
  static constexpr char alphabet[] = "abcdefghijklmnopqrstuvwxyz234567";
  std::string out = "s-";
  for (size_t i = 0; i < sizeof bytes; i += 5) {  // 5 bytes: 8 characters
    uint64_t v = 0;
    for (size_t k = 0; k < 5; ++k) v = (v << 8) | bytes[i + k];
    for (int k = 7; k >= 0; --k) out += alphabet[(v >> (5 * k)) & 31];
  }
  return out + "@" + node;
}

/// Where builds before the ownership protocol kept their peers' sessions in the store's session
/// records: never this node's own.
constexpr std::string_view old_replica_prefix = "replica/";

bool old_replica(const std::string& id) { return id.rfind(old_replica_prefix, 0) == 0; }

/// Logs what the store found damaged and salvaged. Without peers nothing can restore the
/// sessions in the damaged part: each is reported as possibly lost. With peers the session
/// records are not what the node serves from (the ownership protocol's state is), and the
/// host takes each session back from its group's majority.
void report_damage(const storage::session_store& store, const std::string& name, bool peers,
                   supervision_log& log) {
  auto& d = store.damage();
  if (!d.damaged()) return;
  for (auto& f : d.findings) log.report(name + ": session store damaged: " + f);
  log.report(name + ": session store " + store.dir() + " rebuilt from " +
             std::to_string(d.records_kept) + " readable records; the damaged files are kept in " +
             d.aside);
  if (peers) {
    log.report(name + ": damage: this node's sessions are taken back from the newest copy of a "
               "majority of each one's group");
    return;
  }
  for (auto& id : d.sessions) {
    if (old_replica(id)) continue;
    log.report(name + ": damage: session " + id +
               " was in the damaged part of the store and this node has no peers to restore "
               "it from: acknowledged turns of it may be lost");
  }
}

}  // namespace

void tune_actor_system(caf::actor_system_config& cfg) {
  cfg.set("work-stealing.aggressive-poll-attempts", size_t{1});
  cfg.set("work-stealing.moderate-poll-attempts", size_t{1});
}

namespace {

/// The chat template of model `m`: its GGUF file's `tokenizer.chat_template`, or Keel's default
/// (also for a llama2.c checkpoint, which has none).
caf::expected<std::string> model_template(const model& m) {
  if (m.format().rfind("gguf", 0) != 0) return std::string(default_chat_template);
  auto file = gguf_file::open(m.path());
  if (!file) return std::move(file.error());
  auto t = chat_template_of(*file);
  if (!t) return std::move(t.error());
  return std::move(t->text);
}

}  // namespace

caf::expected<std::unique_ptr<node>> node::start(caf::actor_system& sys, node_config cfg,
                                                 std::shared_ptr<supervision_log> log,
                                                 node_env env) {
  env = env.completed();
  auto m = model::load(cfg.model_path, cfg.tokenizer_path);
  if (!m) return std::move(m.error());
  if (!cfg.cut) cfg.cut = std::make_shared<partition>();
  if (!cfg.disk) cfg.disk = std::make_shared<storage::disk_fault>();
  shard_layout layout{0, cfg.shards};
  if (cfg.shards < 1) {
    return make_error(errc::bad_request,
                      "shards must be at least 1, got " + std::to_string(cfg.shards));
  }
  if (auto err = check_sharding(**m, layout)) return err;
  std::unique_ptr<node> n(new node(sys));
  n->env_ = env;
  auto ctx = std::make_shared<node_context>();
  ctx->name = cfg.name;
  ctx->tok = std::make_shared<tokenizer>((*m)->vocabulary());
  ctx->llm = std::shared_ptr<const model>(std::move(*m));
  {
    auto digest = cfg.model_digest.empty() ? file_digest(cfg.model_path)
                                           : caf::expected<std::string>(cfg.model_digest);
    if (!digest) return std::move(digest.error());
    ctx->model_digest = std::move(*digest);
  }
  ctx->faults = std::make_shared<fault_injector>();
  ctx->log = log ? std::move(log) : std::make_shared<supervision_log>();
  ctx->guard = std::make_shared<guardrail>(cfg.guard);
  if (!cfg.chat_template.empty()) {
    if (auto t = chat_template::parse(cfg.chat_template); !t)
      return make_error(errc::bad_request, "the chat template given: " + message_of(t.error()));
    ctx->chat_template = cfg.chat_template;
  } else {
    auto t = model_template(*ctx->llm);
    if (!t) return std::move(t.error());
    ctx->chat_template = std::move(*t);
    // A template this node cannot parse refuses chat turns (naming why), not the node.
    if (auto parsed = chat_template::parse(ctx->chat_template); !parsed)
      ctx->log->report(cfg.name + ": the model's chat template does not parse; chat turns are "
                                  "refused until --chat-template gives one: " +
                       describe(parsed.error()));
  }

  auto group = std::make_shared<engine_group>();
  group->ctx = ctx;
  group->shards = cfg.shards;
  group->threads_per_shard = cfg.threads_per_shard;
  group->spawn = env.threads;
  group->kv_bytes_per_shard = cfg.kv_bytes / static_cast<uint64_t>(cfg.shards);
  kv_pool probe(kv_layout_for(*ctx->llm, layout, cfg.batching.page_tokens), 0);
  cfg.batching.shards = cfg.shards;
  // Ended soon after the lease: the majority may already serve these sessions (it takes over
  // from down_after on), and a client that comes back too early is told to retry.
  cfg.batching.quorum_grace = cfg.heartbeat_interval;
  cfg.batching.kv_pages = static_cast<int32_t>(group->kv_bytes_per_shard / probe.page_bytes());
  if (cfg.batching.kv_pages < 1) {
    return make_error(errc::bad_request, "kv_bytes " + std::to_string(cfg.kv_bytes) +
                                             " leaves no KV page per shard (a page is " +
                                             std::to_string(probe.page_bytes()) + " bytes)");
  }

  {
    // Known before the batcher's first message: a node that has just started has all its room
    // (placement would otherwise send its first sessions elsewhere).
    node_load empty;
    empty.kv_capacity = empty.kv_free = cfg.batching.kv_pages;
    ctx->metrics->load.publish(empty);
  }

  auto table = std::make_shared<session_table>(cfg.checkpoint_every);
  if (!cfg.peers.empty()) {
    // With peers the ownership protocol keeps the sessions (in the store's `ownership` column family and on the
    // group's members): the table is memory only and hands every change to the host, and the
    // batcher asks each session's lease.
    caf::error err;
    n->own_ = make_ownership_part(cfg, env, err);
    if (!n->own_) return err;
    ctx->ownership_host = [part = n->own_] { return part->current(); };
    ctx->ownership_wait = n->own_->ack_timeout + std::chrono::seconds(1);
    ctx->lost_session = [np = n.get()](const std::string& id) { np->lost(id); };
    ctx->may_serve_session = [board = n->own_->board](const std::string& id) {
      return board->may_serve(id);
    };
    table->on_change([np = n.get()](const session_record& r, change c,
                                    const std::optional<session_record>& previous) {
      return np->protocol_change(r, c, previous);
    });
  }
  std::vector<session_record> recovered;
  std::vector<std::string> corrupt;  // sessions with a corrupt record, not served
  if (!cfg.data_dir.empty()) {
    storage::store_options so;
    so.disk = cfg.disk;
    auto store = env.open_store(cfg.data_dir, so);
    if (!store) return std::move(store.error());
    report_damage(**store, cfg.name, !cfg.peers.empty(), *ctx->log);
    if (n->own_ && (*store)->damage().damaged()) {
      // Promises and copies this node gave may be gone: it is an amnesiac member from now on
      // (ownership::recover), marked in the rebuilt store before anything runs, so that no later
      // start forgets it. A node that cannot mark it does not start.
      stored_session mark;
      mark.promised = {1, ownership::amnesia_key};
      if (auto err = (*store)->put_ownership(ownership::amnesia_key, encode(mark)))
        return make_error(code_of(err), cfg.name + ": cannot mark the damaged store " +
                                            cfg.data_dir + " (" + message_of(err) +
                                            "); not starting");
      ctx->log->report(cfg.name + ": damage: this node votes on a session only after reading it "
                       "back from its group (its own promises and copies may be gone)");
    }
    auto found = (*store)->scan();
    if (!found) return std::move(found.error());
    if (n->own_) {
      // Session records are the single-node mode's (or an older build's): a store that has
      // some was written without peers, and they are left as they are.
      if (!found->sessions.empty())
        ctx->log->report(cfg.name + ": " + std::to_string(found->sessions.size()) +
                         " session record(s) in " + cfg.data_dir +
                         " were written without peers (or by an older build) and are not "
                         "served by a node with peers");
      found->sessions.clear();
      found->corrupt.clear();
    }
    for (auto& c : found->corrupt) {
      ctx->log->report(cfg.name + ": recovery: skipped corrupt record " + c.cf + " key " + c.key +
                       " in " + cfg.data_dir + ": " + c.reason);
      if (!c.session.empty() && !old_replica(c.session) &&
          std::find(corrupt.begin(), corrupt.end(), c.session) == corrupt.end())
        corrupt.push_back(c.session);
    }
    uint64_t highest = 0;
    for (auto& s : found->sessions) {
      if (old_replica(s.id)) continue;  // a peer's session, kept by an older build
      auto c = wire::decode(s.payload);
      if (c && c->id != s.id) {
        c = make_error(errc::corrupt_record,
                       "session checkpoint " + c->id + " stored under key " + s.id);
      }
      if (!c) {
        ctx->log->report(cfg.name + ": recovery: skipped corrupt record sessions key " + s.id +
                         " in " + cfg.data_dir + ": " + describe(c.error()));
        corrupt.push_back(s.id);
        continue;
      }
      if (std::find(corrupt.begin(), corrupt.end(), s.id) != corrupt.end())
        continue;  // a turn log of it is corrupt: reported above, not served half
      auto r = from_checkpoint(std::move(*c), s.turns);
      r.epoch = s.epoch;
      if (r.owner.empty()) r.owner = cfg.name;
      highest = std::max(highest, r.number);
      table->recovered(r);
      recovered.push_back(std::move(r));
    }
    auto next = (*store)->next_session_number();
    if (!next) return std::move(next.error());
    if (*next <= highest) {
      if (auto err = (*store)->set_next_session_number(highest + 1)) return err;
    }
    if (!n->own_) table->attach_store(store->get());
    n->store_ = std::move(*store);
  }
  auto engine_sup =
      recording(supervisor_child("engine", cfg.engine_flags, shard_worker_specs(group), ctx->log),
                [ctx](caf::actor a) { ctx->set_engine_sup(a); });
  child_spec batcher;
  batcher.id = "batcher";
  batcher.start = [ctx, bcfg = cfg.batching](caf::actor_system& s, const std::string&,
                                             const caf::message&) -> caf::expected<caf::actor> {
    return caf::actor_cast<caf::actor>(spawn_batcher(s, ctx, bcfg));
  };
  batcher = recording(std::move(batcher), [ctx](caf::actor a) { ctx->set_batcher(a); });
  // A restarted session supervisor starts empty: it starts again every session of the table
  // (the first start has none yet; node::start starts the recovered ones itself).
  auto session_flags = cfg.session_flags;
  session_flags.on_parked = [table, log = ctx->log](const std::string& id, const std::string& why) {
    table->park(id, why);
    log->report("session " + id + " parked (not restarted until the node restarts): " + why);
  };
  auto sessions = recording(
      supervisor_child("sessions", session_flags, {session_spec(ctx, table)}, ctx->log),
      [table, starts = std::make_shared<int>(0)](caf::actor a) {
        if ((*starts)++ == 0) return;
        auto sup = caf::actor_cast<supervisor_actor>(a);
        for (auto& id : table->ids())
          if (auto r = table->get(id); r && !table->parked(id))
            caf::anon_send(sup, start_atom::value, id, caf::make_message(*r));
      });
  std::vector<child_spec> top;
  if (n->store_ && cfg.peers.empty()) {
    // Alone with a store: the session actors' synced writes run on the `store` child's thread,
    // so that no session actor's handler waits for the disk (with peers, the ownership host's).
    top.push_back(recording(store_writer_spec(table),
                            [ctx](caf::actor a) { ctx->set_store_writer(a); }));
  }
  top.push_back(std::move(engine_sup));
  top.push_back(std::move(batcher));
  if (ctx->guard->enabled()) {
    // Its own supervisor: a crash-looping filter backs off there and never reaches the root.
    top.push_back(supervisor_child("guard", guard_flags(), {guard_spec(ctx->guard)}, ctx->log));
  }
  top.push_back(std::move(sessions));
  if (!cfg.peers.empty()) {
    if (cfg.heartbeat_interval.count() <= 0 || cfg.down_after <= cfg.heartbeat_interval) {
      return make_error(errc::bad_request,
                        "heartbeat_interval must be positive and below down_after, got " +
                            std::to_string(cfg.heartbeat_interval.count()) + " ms and " +
                            std::to_string(cfg.down_after.count()) + " ms");
    }
    for (auto& p : cfg.peers) {
      auto colon = p.rfind(':');
      auto port = colon == std::string::npos ? std::string() : p.substr(colon + 1);
      if (colon == 0 || port.empty() || port.size() > 5 ||
          port.find_first_not_of("0123456789") != std::string::npos || std::stoul(port) > 65535) {
        return make_error(errc::bad_request, "peer " + p + " is not HOST:PORT");
      }
    }
    link_config lc;
    lc.self_name = cfg.name;
    lc.self_region = cfg.region;
    lc.self_address = cfg.peer_address;
    lc.cluster = cluster_digest(cfg);
    lc.heartbeat_interval = cfg.heartbeat_interval;
    lc.down_after = cfg.down_after;
    lc.cut = cfg.cut;
    lc.tls = cfg.tls;
    lc.spawn = env.threads;
    std::vector<child_spec> links;
    for (size_t i = 0; i < cfg.peers.size(); ++i) {
      lc.peer_name = i < cfg.peer_names.size() ? cfg.peer_names[i] : std::string();
      links.push_back(link_spec(cfg.peers[i], lc, n->peers_, ctx->log));
    }
    top.push_back(supervisor_child("links", cfg.links_flags, std::move(links), ctx->log));
  }
  // What the children's start functions and callbacks read of the node (the failover actor's
  // start reads ctx_, its handlers cfg_ and sessions_) is set once, before the tree starts on
  // CAF's workers (TSan: an assignment after the spawn raced with the failover actor's start).
  n->cfg_ = cfg;
  n->ctx_ = ctx;
  n->sessions_ = table;
  if (n->own_) {
    // The protocol's host is the root's last child (after the sessions it starts): `kill
    // NODE/ownership` restarts it, and the restarted host recovers from the store. What its
    // callbacks use is in place before it starts.
    top.push_back(n->ownership_spec());
  }
  n->root_ = spawn_supervisor(sys, cfg.name, cfg.node_flags, std::move(top), ctx->log);
  n->root_->attach_functor([r = n->readiness_, log = ctx->log](const caf::error& reason) {
    std::lock_guard<std::mutex> guard(r->mu);
    if (r->stopping) return;
    r->down = "its root supervisor exited (" + (reason ? describe(reason) : std::string("normal")) +
              ")";
    log->report("node not ready: " + r->down + "; it serves nothing until restarted, and its "
                "heartbeats tell its peers so");
  });
  // Recovered sessions start under session_sup with their records (already in the table); a
  // turn that was running resubmits itself with the tokens its log holds.
  for (auto& r : recovered)
    if (auto err = n->start_session(r)) return err;
  return n;
}

node::~node() {
  stop();
}

std::string node::not_ready() const {
  std::lock_guard<std::mutex> guard(readiness_->mu);
  return readiness_->down;
}

void node::stop() {
  if (!root_) return;
  {
    std::lock_guard<std::mutex> guard(readiness_->mu);
    readiness_->stopping = true;
  }
  caf::scoped_actor self{sys_};
  self->monitor(root_);
  self->send_exit(root_, caf::exit_reason::user_shutdown);
  self->receive([](const caf::down_msg&) {}, caf::after(std::chrono::seconds(30)) >> [] {});
  root_ = supervisor_actor{};
  // The sessions (the table's only writers) are down: the store closes.
  if (sessions_) sessions_->detach_store();
  if (own_) {
    // The host stopped with the tree, before the store it writes to; nothing reaches it now.
    {
      std::lock_guard<std::mutex> guard(own_->mu);
      own_->host = nullptr;
    }
    own_->transport.reset();
  }
  if (own_) own_->storage.reset();
  store_.reset();
}

caf::actor node::child(const std::string& id) {
  caf::scoped_actor self{sys_};
  caf::actor out;
  self->request(root_, call_timeout, get_atom::value, id)
      .receive([&](caf::actor a) { out = std::move(a); }, [](caf::error&) {});
  return out;
}

caf::error node::unknown_session(const std::string& id) const {
  if (!own_) return make_error(errc::not_found, "no session " + id + " on node " + cfg_.name);
  return make_error(errc::not_found, "no node has session " + id);
}

int32_t node::context_for_new_session(int32_t priority) const {
  if (priority >= cfg_.degrade_below) return 0;
  if (load().room() >= cfg_.degrade_room) return 0;
  auto model = ctx_->llm->config().ctx_len;
  auto shorter = cfg_.degrade_context > 0 ? cfg_.degrade_context : model / 4;
  return shorter < model ? shorter : 0;
}

caf::expected<std::string> node::open_session(const sampling_params& params, int32_t priority,
                                              const std::string& tenant, int32_t context_limit) {
  if (auto err = validate(params)) return err;
  if (draining_) {
    return make_error(errc::overloaded, "node " + cfg_.name +
                                            " is draining and opens no sessions; use another node");
  }
  session_record r;
  if (store_) {
    auto number = store_->take_session_number();
    if (!number) return std::move(number.error());
    r.number = *number;
  } else {
    r.number = ++next_session_;
  }
  // Never an id that exists: not one this node holds, held (moved away) or stores, its own or
  // a replica (issue #11: a node whose log lost sessions gave their ids again).
  for (int attempt = 0;; ++attempt) {
    auto id = random_session_id(env_, cfg_.name);
    if (!id) return std::move(id.error());
    bool taken = sessions_->get(*id) || moved(*id) || (store_ && store_->get_session(*id));
    // Under the protocol a session lives in a fixed group, which must hold this node: ids are
    // drawn until it does (about members / group_size draws).
    if (own_ && !taken) {
      auto g = replica_group(*id, own_->protocol.members, own_->protocol.group_size);
      taken = std::find(g.begin(), g.end(), cfg_.name) == g.end();
    }
    if (!taken) {
      r.id = std::move(*id);
      break;
    }
    if (attempt == 255) return make_error(errc::failed, "no unused session id after 256 draws");
  }
  r.owner = cfg_.name;
  r.tenant = tenant;
  r.model = ctx_->llm->path();
  r.model_digest = ctx_->model_digest;
  r.context_limit = std::max(context_limit, 0);
  if (r.context_limit > 0) ctx_->metrics->sessions_degraded.fetch_add(1, std::memory_order_relaxed);
  r.params = params;
  r.priority = priority;
  // Durable before the id is returned: with a store, or with a majority of its group.
  if (own_) {
    std::lock_guard<std::mutex> guard(own_->mu);
    own_->opening.insert(r.id);
  }
  auto err = sessions_->put(r, change::accept);
  if (!err) err = start_session(r);
  if (own_) {
    std::lock_guard<std::mutex> guard(own_->mu);
    own_->opening.erase(r.id);
  }
  if (err) return err;
  return r.id;
}

caf::error node::start_session(const session_record& r) {
  auto sup = caf::actor_cast<supervisor_actor>(child("sessions"));
  if (!sup) return make_error(errc::disconnected, cfg_.name + ": the session supervisor is down");
  caf::scoped_actor self{sys_};
  caf::error out = make_error(errc::failed, "no reply");
  self->request(sup, call_timeout, start_atom::value, r.id, caf::make_message(r))
      .receive([&](caf::actor&) { out = caf::error{}; },
               [&](caf::error& e) { out = std::move(e); });
  return out;
}

session_actor node::session(const std::string& id) {
  auto sup = caf::actor_cast<supervisor_actor>(child("sessions"));
  if (!sup) return {};
  caf::scoped_actor self{sys_};
  session_actor out;
  self->request(sup, call_timeout, get_atom::value, id)
      .receive([&](caf::actor a) { out = caf::actor_cast<session_actor>(std::move(a)); },
               [](caf::error&) {});
  return out;
}

std::vector<session_record> node::sessions() const {
  std::vector<session_record> out;
  for (auto& id : sessions_->ids())
    if (auto r = sessions_->get(id)) out.push_back(std::move(*r));
  return out;
}

caf::expected<batcher_stats> node::stats() {
  auto b = ctx_->batcher();
  if (!b) return make_error(errc::disconnected, cfg_.name + ": the batcher is down");
  caf::scoped_actor self{sys_};
  caf::expected<batcher_stats> out = make_error(errc::failed, "no reply");
  self->request(b, call_timeout, stats_atom::value)
      .receive([&](batcher_stats& s) { out = std::move(s); },
               [&](caf::error& e) { out = std::move(e); });
  return out;
}

std::optional<placement_candidate> node::place_new_session() {
  if (cfg_.peers.empty() || cfg_.keep_room <= 0) return std::nullopt;
  auto mine = load();
  if (mine.room() >= cfg_.keep_room) return std::nullopt;  // the common case: no copy, no draw
  std::vector<placement_candidate> peers;
  for (auto& p : peers_->snapshot()) {
    if (!p.accepts_work() || p.draining || p.client_address.empty() || p.name.empty()) continue;
    if (p.model_digest != ctx_->model_digest) continue;  // sessions are pinned to the model
    peers.push_back({p.name, p.client_address, p.load});
  }
  uint64_t draw = 0;
  if (env_.random(reinterpret_cast<unsigned char*>(&draw), sizeof draw)) return std::nullopt;
  auto i = choose_placement(mine, peers, cfg_.keep_room, 0.1, draw);
  if (!i) return std::nullopt;
  return peers[*i];
}

double node::room_of(const std::string& name) const {
  if (name == cfg_.name) return load().room();
  for (auto& p : peers_->snapshot())
    if (p.name == name) return p.status == peer_status::up ? p.load.room() : 0.0;
  return 0;
}

}  // namespace keel
