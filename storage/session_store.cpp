#include "storage/session_store.hpp"

#include <map>
#include <mutex>
#include <optional>
#include <utility>

#include "storage/detail/store_impl.hpp"

namespace keel::storage {

// -- write_batch ----------------------------------------------------------------------------------

write_batch& write_batch::put_session(std::string id, uint64_t epoch, std::string payload) {
  op o;
  o.kind = op_kind::put_session;
  o.id = std::move(id);
  o.epoch = epoch;
  o.payload = std::move(payload);
  ops_.push_back(std::move(o));
  return *this;
}

write_batch& write_batch::append_turn_tokens(std::string id, uint64_t epoch, uint64_t turn,
                                             uint64_t from_index, std::vector<int32_t> tokens) {
  op o;
  o.kind = op_kind::append_turn;
  o.id = std::move(id);
  o.epoch = epoch;
  o.turn = turn;
  o.from_index = from_index;
  o.tokens = std::move(tokens);
  ops_.push_back(std::move(o));
  return *this;
}

write_batch& write_batch::erase_session(std::string id, uint64_t epoch) {
  op o;
  o.kind = op_kind::erase_session;
  o.id = std::move(id);
  o.epoch = epoch;
  ops_.push_back(std::move(o));
  return *this;
}

// -- session_store --------------------------------------------------------------------------------

session_store::session_store(std::unique_ptr<impl> p) : impl_(std::move(p)) {}

session_store::~session_store() = default;

const std::string& session_store::dir() const {
  return impl_->dir;
}

const damage_report& session_store::damage() const {
  return impl_->damage;
}

caf::error session_store::put_session(const std::string& id, uint64_t epoch,
                                      std::string_view payload, durability d) {
  write_batch b;
  b.put_session(id, epoch, std::string(payload));
  return write(b, d);
}

caf::expected<session_entry> session_store::get_session(const std::string& id) const {
  if (auto err = check_id(id)) return err;
  auto r = impl_->read_session(rocksdb::ReadOptions{}, id);
  if (!r) return r.error();
  if (!*r) return make_error(errc::not_found, "session " + id + ": no record in " + impl_->dir);
  return std::move(**r);
}

caf::expected<std::vector<std::string>> session_store::list_sessions() const {
  std::vector<std::string> ids;
  std::unique_ptr<rocksdb::Iterator> it(
      impl_->db->NewIterator(rocksdb::ReadOptions{}, impl_->sessions));
  for (it->SeekToFirst(); it->Valid(); it->Next()) ids.push_back(it->key().ToString());
  if (!it->status().ok())
    return status_error(it->status(), impl_->dir + ": listing " + sessions_cf_name);
  return ids;
}

caf::error session_store::erase_session(const std::string& id, uint64_t epoch, durability d) {
  write_batch b;
  b.erase_session(id, epoch);
  return write(b, d);
}

caf::error session_store::append_turn_tokens(const std::string& id, uint64_t epoch, uint64_t turn,
                                             uint64_t from_index,
                                             const std::vector<int32_t>& tokens, durability d) {
  write_batch b;
  b.append_turn_tokens(id, epoch, turn, from_index, tokens);
  return write(b, d);
}

caf::expected<std::vector<int32_t>> session_store::read_turn(const std::string& id,
                                                             uint64_t turn) const {
  if (auto err = check_id(id)) return err;
  auto t = impl_->read_turn(rocksdb::ReadOptions{}, id, turn);
  if (!t) return t.error();
  if (!*t)
    return make_error(errc::not_found, "session " + id + " turn " + std::to_string(turn) +
                                           ": no turn log in " + impl_->dir);
  return std::move((*t)->tokens);
}

caf::expected<std::map<uint64_t, std::vector<int32_t>>> session_store::read_turns(
    const std::string& id) const {
  if (auto err = check_id(id)) return err;
  std::map<uint64_t, std::vector<int32_t>> out;
  auto lo = turns_begin(id);
  auto hi = turns_end(id);
  rocksdb::Slice upper(hi);
  rocksdb::ReadOptions ro;
  ro.iterate_upper_bound = &upper;
  std::unique_ptr<rocksdb::Iterator> it(impl_->db->NewIterator(ro, impl_->turns));
  for (it->Seek(lo); it->Valid(); it->Next()) {
    auto key = it->key().ToStringView();
    auto parsed = parse_turn_key(key);
    auto t = impl_->decode_turn(key, it->value().ToStringView());
    if (!t) return t.error();
    if (parsed) out[parsed->second] = std::move(t->tokens);
  }
  if (!it->status().ok()) return status_error(it->status(), impl_->where(turns_cf_name, id + "/*"));
  return out;
}

caf::error session_store::write(const write_batch& b, durability d) {
  if (b.empty()) return {};
  for (auto& o : b.ops_)
    if (auto err = check_id(o.id)) return err;

  auto& p = *impl_;
  std::lock_guard<std::mutex> lock(p.write_mu);

  // The store as modified by the batch's earlier operations.
  struct pending_session {
    std::optional<uint64_t> epoch;  // nullopt: erased in this batch
    bool turns_cleared = false;     // erased in this batch: the stored turn logs are gone
  };
  std::map<std::string, pending_session> sessions;
  std::map<std::pair<std::string, uint64_t>, turn_log> turns;
  rocksdb::ReadOptions ro;

  auto session_epoch = [&](const std::string& id) -> caf::expected<std::optional<uint64_t>> {
    if (auto i = sessions.find(id); i != sessions.end()) return i->second.epoch;
    auto r = p.read_session(ro, id);
    if (!r) return r.error();
    if (!*r) return std::optional<uint64_t>{};
    return std::optional<uint64_t>{(*r)->epoch};
  };
  auto current_turn = [&](const std::string& id,
                          uint64_t turn) -> caf::expected<std::optional<turn_log>> {
    if (auto i = turns.find({id, turn}); i != turns.end())
      return std::optional<turn_log>{i->second};
    if (auto i = sessions.find(id); i != sessions.end() && i->second.turns_cleared)
      return std::optional<turn_log>{};
    return p.read_turn(ro, id, turn);
  };

  rocksdb::WriteBatch wb;
  auto apply = [&](const write_batch::op& o) -> caf::error {
    const auto& id = o.id;
    auto cur = session_epoch(id);
    if (!cur) return cur.error();
    switch (o.kind) {
      case write_batch::op_kind::put_session: {
        if (*cur && **cur > o.epoch) return stale("session " + id, o.epoch, **cur);
        wb.Put(p.sessions, id, encode_envelope(id, record_kind::session, o.epoch, o.payload));
        sessions[id].epoch = o.epoch;
        return {};
      }
      case write_batch::op_kind::erase_session: {
        if (*cur && **cur > o.epoch) return stale("session " + id, o.epoch, **cur);
        wb.Delete(p.sessions, id);
        wb.DeleteRange(p.turns, turns_begin(id), turns_end(id));
        sessions[id] = pending_session{std::nullopt, true};
        for (auto i = turns.begin(); i != turns.end();)
          i = i->first.first == id ? turns.erase(i) : std::next(i);
        return {};
      }
      case write_batch::op_kind::append_turn: {
        auto what = "session " + id + " turn " + std::to_string(o.turn);
        if (!*cur)
          return make_error(errc::not_found,
                            what + ": no session record; write the session before its turns");
        auto log = current_turn(id, o.turn);
        if (!log) return log.error();
        uint64_t fence = **cur;
        if (*log) fence = std::max(fence, (*log)->epoch);
        if (fence > o.epoch) return stale(what, o.epoch, fence);
        std::vector<int32_t> tokens = *log ? std::move((*log)->tokens) : std::vector<int32_t>{};
        uint64_t held = tokens.size();
        if (o.from_index > held)
          return make_error(errc::bad_request,
                            what + ": append at index " + std::to_string(o.from_index) +
                                " leaves a gap: the log holds " + std::to_string(held) + " tokens");
        for (uint64_t k = o.from_index; k < o.from_index + o.tokens.size(); ++k) {
          auto t = o.tokens[k - o.from_index];
          if (k < held) {
            if (tokens[k] != t)
              return make_error(errc::bad_request, what + ": token " + std::to_string(k) + " is " +
                                                       std::to_string(tokens[k]) +
                                                       " in the log, the append has " +
                                                       std::to_string(t));
          } else {
            tokens.push_back(t);
          }
        }
        // Rewritten even when nothing is new, so that a synced repeat of a buffered append
        // makes it durable.
        auto key = turn_key(id, o.turn);
        wb.Put(p.turns, key,
               encode_envelope(key, record_kind::turn_log, o.epoch, encode_tokens(tokens)));
        turns[{id, o.turn}] = turn_log{o.epoch, std::move(tokens)};
        return {};
      }
    }
    return make_error(errc::failed, "unknown batch operation");
  };

  for (size_t i = 0; i < b.ops_.size(); ++i) {
    if (auto err = apply(b.ops_[i])) {
      if (b.ops_.size() == 1) return err;
      return make_error(code_of(err), message_of(err) + " (operation " + std::to_string(i + 1) +
                                          " of " + std::to_string(b.ops_.size()) +
                                          " in a batch; nothing written)");
    }
  }
  if (p.opts.before_write) p.opts.before_write();
  return p.write_raw(wb, d, "write of " + std::to_string(b.ops_.size()) + " operation(s)");
}

caf::expected<std::string> session_store::node_id() const {
  auto v = impl_->read_meta(node_id_key);
  if (!v) return v.error();
  if (!*v) return make_error(errc::not_found, impl_->dir + ": no node id set");
  return std::move(**v);
}

caf::error session_store::set_node_id(const std::string& id) {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  return impl_->write_meta(node_id_key, id);
}

caf::expected<uint64_t> session_store::next_session_number() const {
  return impl_->read_counter();
}

caf::error session_store::set_next_session_number(uint64_t n) {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  return impl_->write_meta(next_session_key, encode_u64(n));
}

caf::expected<uint64_t> session_store::take_session_number() {
  std::lock_guard<std::mutex> lock(impl_->write_mu);
  auto n = impl_->read_counter();
  if (!n) return n;
  if (auto err = impl_->write_meta(next_session_key, encode_u64(*n + 1))) return err;
  return n;
}

}  // namespace keel::storage
