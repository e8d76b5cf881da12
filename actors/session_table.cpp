// The session table (actors/session.hpp): every session's record, one slot each, and its
// writes to the store when the node runs alone; the stored form of a session.

#include <algorithm>
#include <optional>

#include "actors/session.hpp"

namespace keel {

struct session_table::slot {
  std::mutex mu;
  session_record rec;
  size_t logged = 0;  // tokens of the last turn in the store's turn log
  bool dropped = false;
  std::optional<std::pair<uint64_t, size_t>> group;  // with peers: sent to the group
};

void session_table::attach_store(storage::session_store* store) {
  store_.store(store);
}

void session_table::detach_store() {
  store_.store(nullptr);
}

session_table::handle& session_table::slot_for(const std::string& id) {
  auto& h = records_[id];
  if (!h) h = std::make_shared<slot>();
  return h;
}

namespace {

/// The refusal of a write to a session another node took over.
caf::error moved_away(const std::string& id) {
  return make_error(errc::stale_epoch, "session " + id + ": another node owns it now; resume there");
}

}  // namespace

caf::error session_table::write_store(slot& sl, const session_record& r, change c) {
  auto* store = store_.load();
  if (store == nullptr || c == change::memory) return {};
  const uint64_t epoch = r.epoch;
  size_t logged = sl.logged;
  const turn_record* last = r.turns.empty() ? nullptr : &r.turns.back();
  // A new turn starts a new log: `logged` counts the tokens of the last turn only.
  if (last == nullptr || logged > last->generated.size()) logged = 0;
  size_t unlogged = last ? last->generated.size() - logged : 0;
  if (c == change::tokens) {
    if (unlogged < static_cast<size_t>(std::max(checkpoint_every_, 1))) return {};
    std::vector<int32_t> tail(last->generated.begin() + static_cast<ptrdiff_t>(logged),
                              last->generated.end());
    if (auto err = store->append_turn_tokens(r.id, epoch, last->turn, logged, tail,
                                             storage::durability::buffered))
      return err;
  } else {
    storage::write_batch b;
    auto record = wire::encode(to_checkpoint(r));
    b.put_session(r.id, epoch, record);
    std::vector<int32_t> tail;
    if (unlogged > 0) {
      tail.assign(last->generated.begin() + static_cast<ptrdiff_t>(logged), last->generated.end());
      b.append_turn_tokens(r.id, epoch, last->turn, logged, tail);
    }
    if (auto err = store->write(b, storage::durability::sync)) return err;
  }
  sl.logged = last ? last->generated.size() : 0;
  return {};
}

void session_table::on_change(ownership_fn f) {
  std::lock_guard<std::mutex> guard(mu_);
  on_change_ = std::move(f);
}

caf::error session_table::put(const session_record& r, change c) {
  ownership_fn protocol;
  {
    std::lock_guard<std::mutex> guard(mu_);
    protocol = on_change_;
  }
  if (protocol && c != change::memory) {
    std::optional<session_record> previous;
    {
      std::lock_guard<std::mutex> guard(mu_);
      if (dropped_.count(r.id) > 0)
        return moved_away(r.id);
      auto& h = slot_for(r.id);
      std::lock_guard<std::mutex> g2(h->mu);
      if (!h->rec.id.empty()) previous = h->rec;
      h->rec = r;
    }
    auto err = protocol(r, c, previous);
    if (err && c == change::accept) {
      std::lock_guard<std::mutex> guard(mu_);
      if (dropped_.count(r.id) == 0) {
        if (previous) {
          auto& h = slot_for(r.id);
          std::lock_guard<std::mutex> g2(h->mu);
          h->rec = *previous;
        } else {
          records_.erase(r.id);
        }
      }
    }
    // A token checkpoint that was not sent is sent with a later one, or with the turn's end.
    return c == change::tokens ? caf::error{} : err;
  }
  std::lock_guard<std::mutex> guard(mu_);
  if (dropped_.count(r.id) > 0)
    return moved_away(r.id);
  auto& h = slot_for(r.id);
  std::lock_guard<std::mutex> g2(h->mu);
  // A new turn's log starts empty.
  if (!h->rec.id.empty() && h->rec.turns.size() != r.turns.size()) h->logged = 0;
  auto err = write_store(*h, r, c);
  // A token checkpoint that failed is retried later; memory still takes the token.
  if (err && c != change::tokens && c != change::memory) return err;
  h->rec = r;
  return err;
}

session_table::handle session_table::handle_of(const std::string& id) const {
  std::lock_guard<std::mutex> guard(mu_);
  auto i = records_.find(id);
  return i == records_.end() ? nullptr : i->second;
}

caf::error session_table::put_tokens(const handle& h, const session_record& r) {
  std::lock_guard<std::mutex> guard(h->mu);
  if (h->dropped)
    return moved_away(r.id);
  auto& mine = h->rec;
  // The usual case: the same turns, the last one longer. Only its new tokens are copied.
  bool same = !r.turns.empty() && mine.turns.size() == r.turns.size() &&
              mine.turns.back().turn == r.turns.back().turn &&
              mine.turns.back().generated.size() <= r.turns.back().generated.size();
  if (!same) {
    if (mine.turns.size() != r.turns.size()) h->logged = 0;
    mine = r;
  } else {
    auto& have = mine.turns.back().generated;
    auto& now = r.turns.back().generated;
    have.insert(have.end(), now.begin() + static_cast<ptrdiff_t>(have.size()), now.end());
    mine.from_copy = r.from_copy;
  }
  // A failed buffered checkpoint is retried with a later token; the turn's end writes all.
  (void)write_store(*h, mine, change::tokens);
  return {};
}

void session_table::sent_to_group(const handle& h, uint64_t turn, size_t tokens) {
  std::lock_guard<std::mutex> guard(h->mu);
  h->group = std::make_pair(turn, tokens);
}

std::optional<std::pair<uint64_t, size_t>> session_table::group_checkpoint(
    const std::string& id) const {
  auto h = handle_of(id);
  if (!h) return std::nullopt;
  std::lock_guard<std::mutex> guard(h->mu);
  return h->group;
}

std::optional<session_record> session_table::drop(const std::string& id, uint64_t epoch) {
  std::lock_guard<std::mutex> guard(mu_);
  dropped_[id] = epoch;
  auto i = records_.find(id);
  if (i == records_.end()) return std::nullopt;
  auto h = std::move(i->second);
  records_.erase(i);
  std::lock_guard<std::mutex> g2(h->mu);
  h->dropped = true;  // the actor's handle refuses its tokens from now on
  return std::move(h->rec);
}

bool session_table::dropped(const std::string& id) const {
  std::lock_guard<std::mutex> guard(mu_);
  return dropped_.count(id) > 0;
}

void session_table::park(const std::string& id, const std::string& why) {
  std::lock_guard<std::mutex> guard(mu_);
  parked_[id] = why;
}

std::optional<std::string> session_table::parked(const std::string& id) const {
  std::lock_guard<std::mutex> guard(mu_);
  auto i = parked_.find(id);
  if (i == parked_.end()) return std::nullopt;
  return i->second;
}

void session_table::recovered(const session_record& r) {
  std::lock_guard<std::mutex> guard(mu_);
  dropped_.erase(r.id);  // taken (back) over
  // A fresh slot: an actor of an earlier tenure holds the old one, dropped.
  auto h = std::make_shared<slot>();
  h->rec = r;
  h->logged = r.turns.empty() ? 0 : r.turns.back().generated.size();
  records_[r.id] = std::move(h);
}

wire::session_checkpoint to_checkpoint(const session_record& r) {
  wire::session_checkpoint c;
  c.id = r.id;
  c.number = r.number;
  c.params = r.params;
  c.priority = r.priority;
  c.owner = r.owner;
  c.tenant = r.tenant;
  c.model = r.model;
  c.model_digest = r.model_digest;
  c.context_limit = static_cast<uint32_t>(std::max(r.context_limit, 0));
  for (auto& t : r.turns)
    c.turns.push_back(
        {t.turn, t.user, t.max_tokens, t.done, t.reason, t.messages, t.chat_template, t.keep});
  return c;
}

session_record from_checkpoint(wire::session_checkpoint c,
                               const std::map<uint64_t, std::vector<int32_t>>& logs) {
  session_record r;
  r.id = std::move(c.id);
  r.number = c.number;
  r.params = c.params;
  r.priority = c.priority;
  r.owner = std::move(c.owner);
  r.tenant = std::move(c.tenant);
  r.model = std::move(c.model);
  r.model_digest = std::move(c.model_digest);
  r.context_limit = static_cast<int32_t>(std::min<uint32_t>(c.context_limit, 1u << 30));
  r.from_copy = true;
  for (auto& t : c.turns) {
    turn_record x;
    x.turn = t.turn;
    x.user = std::move(t.user);
    x.max_tokens = t.max_tokens;
    x.done = t.done;
    x.reason = t.reason;
    x.messages = std::move(t.messages);
    x.chat_template = std::move(t.chat_template);
    x.keep = t.keep;
    if (auto i = logs.find(t.turn); i != logs.end()) x.generated = i->second;
    r.turns.push_back(std::move(x));
  }
  return r;
}

std::optional<session_record> session_table::get(const std::string& id) const {
  auto h = handle_of(id);
  if (!h) return std::nullopt;
  std::lock_guard<std::mutex> guard(h->mu);
  return h->rec;
}

std::optional<std::string> session_table::tenant_of(const std::string& id) const {
  auto h = handle_of(id);
  if (!h) return std::nullopt;
  std::lock_guard<std::mutex> guard(h->mu);
  return h->rec.tenant;
}

size_t session_table::count_of(const std::string& tenant) const {
  std::lock_guard<std::mutex> guard(mu_);
  size_t n = 0;
  for (auto& [id, h] : records_) {
    std::lock_guard<std::mutex> g2(h->mu);
    n += h->rec.tenant == tenant ? 1 : 0;
  }
  return n;
}

std::vector<std::string> session_table::ids() const {
  std::lock_guard<std::mutex> guard(mu_);
  std::vector<std::string> out;
  for (auto& [id, h] : records_) out.push_back(id);
  return out;
}

void session_table::erase(const std::string& id) {
  std::lock_guard<std::mutex> guard(mu_);
  records_.erase(id);
}

}  // namespace keel
