// The ownership protocol's amnesiac members (actors/ownership.hpp, `recover` with `damaged`):
// a member whose store lost promises reads each session back from its group before it votes on
// it. docs/actors.md, "A damaged store".

#include <algorithm>

#include "actors/ownership.hpp"

namespace keel {

void ownership::mark_amnesia() {
  if (!amnesia_ || amnesia_marked_) return;
  stored_session mark;
  mark.promised = {1, amnesia_key};
  amnesia_marked_ = env_.store(amnesia_key, mark, true);
}

void ownership::need_read(const std::string& session) {
  if (votes(session) || session == amnesia_key) return;
  if (recovery_reads(group(session).size()) == 0) {
    trusted_.insert(session);  // a group of one: its own copy is all there is
    return;
  }
  to_read_.insert(session);
}

void ownership::send_reads() {
  auto now = env_.now();
  for (auto& s : to_read_) {
    auto& last = read_sent_[s];
    if (last != 0 && now - last < cfg_.timing.retry) continue;
    last = now;
    // A prepare at epoch 0: a read, which no member promises (on_prepare).
    prepare_msg m{s, ballot{0, cfg_.self}, now};
    for (auto& g : group(s))
      if (g != cfg_.self) env_.send(g, m);
  }
}

void ownership::on_read_reply(const std::string& from, const promise_reply& m) {
  if (votes(m.session) || to_read_.count(m.session) == 0) return;
  auto& got = reads_[m.session];
  got[from] = m;
  if (got.size() < recovery_reads(group(m.session).size())) return;
  // Every majority this node was part of shares a member with these: their highest promise
  // bounds any this node gave, and their newest copy holds every acknowledged write.
  auto& st = stored(m.session);
  auto saved = st;
  ballot promised = st.promised;
  const promise_reply* newest = nullptr;
  for (auto& [g, r] : got) {
    promised = std::max(promised, r.promised);
    if (r.accepted.epoch == 0) continue;
    if (!newest || r.accepted > newest->accepted ||
        (r.accepted == newest->accepted && extends(r.data, newest->data)))
      newest = &r;
  }
  if (newest && (newest->accepted > st.accepted ||
                 (newest->accepted == st.accepted && extends(newest->data, st.data)))) {
    st.accepted = newest->accepted;
    st.data = newest->data;
  }
  if (promised > st.promised) promise_to(m.session, promised);
  if (!persist(m.session, true)) {
    stored(m.session) = saved;
    got.clear();
    return;  // asked again at the next tick
  }
  trusted_.insert(m.session);
  to_read_.erase(m.session);
  read_sent_.erase(m.session);
  reads_.erase(m.session);
}

}  // namespace keel
