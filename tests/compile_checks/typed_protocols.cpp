// The actor protocols are typed (actors/protocols.hpp), so the compiler refuses a message its
// receiver does not understand. CTest compiles this file twice: with KEEL_RIGHT (messages the
// receivers take: it must compile) and with KEEL_WRONG (each must be refused with CAF's
// "receiver does not accept given message").

#include <cstdint>
#include <string>

#include <caf/send.hpp>

#include "actors/protocols.hpp"

namespace keel {

void messages(const batcher_actor& batcher, const sequence_sink_actor& session,
              const supervisor_actor& sup, const failover_actor& failover) {
#if defined(KEEL_RIGHT)
  caf::anon_send(batcher, cancel_atom::value, seq_id{1});
  caf::anon_send(session, token_atom::value, seq_id{1}, int64_t{0}, int32_t{7});
  caf::anon_send(sup, subscribe_atom::value, supervision_observer_actor{});
  caf::anon_send(failover, lost_atom::value, std::string("s-1@a"), std::string("moved"));
#elif defined(KEEL_WRONG)
  // A token without its index, as a session would have sent it before the interfaces.
  caf::anon_send(session, token_atom::value, seq_id{1}, int32_t{7});
#else
#error "compile with KEEL_RIGHT or KEEL_WRONG"
#endif
  (void)batcher;
  (void)sup;
  (void)failover;
}

}  // namespace keel
