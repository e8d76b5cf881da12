#pragma once

// Atoms of Keel's actor protocols (CAF 0.17: at most 10 characters each).

#include <caf/atom.hpp>

namespace keel {

using get_atom = caf::atom_constant<caf::atom("k_get")>;
using start_atom = caf::atom_constant<caf::atom("k_start")>;
using stop_atom = caf::atom_constant<caf::atom("k_stop")>;
using restart_atom = caf::atom_constant<caf::atom("k_restart")>;
using list_atom = caf::atom_constant<caf::atom("k_list")>;
using subscribe_atom = caf::atom_constant<caf::atom("k_sub")>;
using started_atom = caf::atom_constant<caf::atom("k_started")>;
using backoff_atom = caf::atom_constant<caf::atom("k_backoff")>;
using stop_timeout_atom = caf::atom_constant<caf::atom("k_stopto")>;  // supervisor-internal

}  // namespace keel

namespace keel {

// Node protocol (see actors/messages.hpp).
using step_atom = caf::atom_constant<caf::atom("k_step")>;
using submit_atom = caf::atom_constant<caf::atom("k_submit")>;
using token_atom = caf::atom_constant<caf::atom("k_token")>;
using done_atom = caf::atom_constant<caf::atom("k_done")>;
using cancel_atom = caf::atom_constant<caf::atom("k_cancel")>;
using send_atom = caf::atom_constant<caf::atom("k_send")>;
using chat_atom = caf::atom_constant<caf::atom("k_chat")>;
using check_atom = caf::atom_constant<caf::atom("k_check")>;  // guardrail.hpp
using write_atom = caf::atom_constant<caf::atom("k_write")>;
using history_atom = caf::atom_constant<caf::atom("k_history")>;
using tick_atom = caf::atom_constant<caf::atom("k_tick")>;
using stats_atom = caf::atom_constant<caf::atom("k_stats")>;

}  // namespace keel

namespace keel {

using open_atom = caf::atom_constant<caf::atom("k_open")>;
using resume_atom = caf::atom_constant<caf::atom("k_resume")>;
/// To a session: another node took it over; to a stream's sink: reconnect and resume there.
using moved_atom = caf::atom_constant<caf::atom("k_moved")>;
/// To a session: its node lost the majority; end the running turn's stream (the client resumes
/// elsewhere) but keep the turn (the node may get the majority back before anyone takes over).
using detach_atom = caf::atom_constant<caf::atom("k_detach")>;
/// To the failover actor: the ownership host gained / lost a session.
using acquired_atom = caf::atom_constant<caf::atom("k_acquired")>;
using lost_atom = caf::atom_constant<caf::atom("k_lost")>;
/// Cutting a region link is a message to the link actor rather than a check (the link runs its
/// own thread and holds no fault_injector): `(cut_atom, int64_t ms) -> bool` makes the link
/// drop its connection and fail every heartbeat and reconnect for `ms` milliseconds, as a
/// network partition in one direction would (see region_link.hpp).
using cut_atom = caf::atom_constant<caf::atom("k_cut")>;

}  // namespace keel
