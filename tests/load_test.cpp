#define BOOST_TEST_MODULE load_test
#include <boost/test/unit_test.hpp>

// Load across the cluster (actors/load.hpp, actors/ownership.hpp): a node's room, where a new
// session opens, and who takes a silent owner's sessions over first; and the model digest a
// session is pinned to (kernels/digest.hpp, actors/session_copy.hpp).

#include <map>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

#include <filesystem>
#include <fstream>

#include "actors/load.hpp"
#include "actors/ownership.hpp"
#include "actors/session_copy.hpp"
#include "kernels/digest.hpp"

using namespace keel;

namespace {

node_load with_pages(int32_t free, int32_t capacity, int32_t wanted = 0) {
  node_load l;
  l.kv_free = free;
  l.kv_capacity = capacity;
  l.kv_wanted = wanted;
  return l;
}

placement_candidate peer(const std::string& name, double room) {
  return {name, name + ":1", with_pages(static_cast<int32_t>(room * 1000), 1000)};
}

}  // namespace

BOOST_AUTO_TEST_CASE(room_is_the_free_share_not_already_wanted_by_waiting_turns) {
  BOOST_TEST(with_pages(50, 100).room() == 0.5);
  BOOST_TEST(with_pages(50, 100, 20).room() == 0.3);
  BOOST_TEST(with_pages(50, 100, 80).room() == 0.0);  // more wanted than free: none
  BOOST_TEST(with_pages(50, 0).room() == 0.0);        // an unknown capacity has no room
}

BOOST_AUTO_TEST_CASE(the_gauge_keeps_the_peak_of_pages_in_use) {
  load_gauge g;
  g.publish(with_pages(100, 100));
  g.publish(with_pages(30, 100));
  g.publish(with_pages(90, 100));
  BOOST_TEST(g.peak_used() == 70);
  BOOST_TEST(g.read().kv_free == 90);
}

BOOST_AUTO_TEST_CASE(the_token_rate_counts_whole_windows_and_falls_to_zero_when_idle) {
  token_rate r(std::chrono::milliseconds(1000));
  auto t0 = std::chrono::steady_clock::time_point{} + std::chrono::hours(1);
  BOOST_TEST(r.add(10, t0) == 0.0f);  // no window complete yet
  r.add(40, t0 + std::chrono::milliseconds(500));
  BOOST_TEST(r.add(50, t0 + std::chrono::milliseconds(2000)) == 50.0f);  // 100 in 2 s
  r.idle();
  BOOST_TEST(r.rate() == 0.0f);
}

BOOST_AUTO_TEST_CASE(a_node_with_room_keeps_its_new_sessions) {
  std::vector<placement_candidate> peers = {peer("b", 0.9), peer("c", 0.9)};
  BOOST_TEST(!choose_placement(with_pages(25, 100), peers, 0.2, 0.1, 12345).has_value());
  BOOST_TEST(!choose_placement(with_pages(20, 100), peers, 0.2, 0.1, 12345).has_value());
}

BOOST_AUTO_TEST_CASE(a_full_node_places_new_sessions_on_peers_in_proportion_to_their_room) {
  // b has three times c's room; d has no more than this node plus the margin; e none.
  std::vector<placement_candidate> peers = {peer("b", 0.75), peer("c", 0.25), peer("d", 0.2),
                                            peer("e", 0.0)};
  std::map<std::string, int> chosen;
  std::mt19937_64 rng(7);
  for (int i = 0; i < 8000; ++i) {
    auto at = choose_placement(with_pages(10, 100), peers, 0.2, 0.1, rng());
    BOOST_REQUIRE(at.has_value());
    ++chosen[peers[*at].name];
  }
  BOOST_TEST(chosen.count("d") == 0u);
  BOOST_TEST(chosen.count("e") == 0u);
  // 6000 and 2000 expected; five standard deviations (39 each) either way.
  BOOST_TEST(chosen["b"] > 5800);
  BOOST_TEST(chosen["b"] < 6200);
  BOOST_TEST(chosen["b"] + chosen["c"] == 8000);
}

BOOST_AUTO_TEST_CASE(a_full_node_keeps_its_sessions_when_no_peer_has_more_room) {
  std::vector<placement_candidate> peers = {peer("b", 0.12), peer("c", 0.05)};
  BOOST_TEST(!choose_placement(with_pages(5, 100), peers, 0.2, 0.1, 99).has_value());
  BOOST_TEST(!choose_placement(with_pages(5, 100), {}, 0.2, 0.1, 99).has_value());
}

BOOST_AUTO_TEST_CASE(takeovers_follow_group_order_when_every_member_has_the_same_room) {
  std::vector<std::string> live = {"b", "c", "d"};
  for (size_t i = 0; i < live.size(); ++i)
    BOOST_TEST(takeover_rank("s-1@a", live[i], live, {0.3, 0.3, 0.3}) == i);
}

BOOST_AUTO_TEST_CASE(takeovers_go_first_to_members_in_proportion_to_their_room) {
  std::vector<std::string> live = {"b", "c"};
  std::vector<double> rooms = {0.6, 0.2};
  int b_first = 0;
  const int sessions = 4000;
  for (int i = 0; i < sessions; ++i) {
    auto id = "s-" + std::to_string(i) + "@a";
    auto rb = takeover_rank(id, "b", live, rooms);
    auto rc = takeover_rank(id, "c", live, rooms);
    BOOST_REQUIRE(rb + rc == 1);  // every member computes the same order: one is first
    b_first += rb == 0 ? 1 : 0;
  }
  // Weighted rendezvous: b first with probability 0.6 / (0.6 + 0.2) = 3/4 (3000 +- 5 sd of 27).
  BOOST_TEST(b_first > 2860);
  BOOST_TEST(b_first < 3140);
}

BOOST_AUTO_TEST_CASE(a_member_without_room_takes_a_session_over_last_but_still_takes_it) {
  std::vector<std::string> live = {"b", "c", "d"};
  for (int i = 0; i < 200; ++i) {
    auto id = "s-" + std::to_string(i) + "@a";
    BOOST_TEST(takeover_rank(id, "c", live, {0.01, 0.0, 0.02}) == 2u);
    // Alone, it is first: a session is never left without an owner for want of room.
    BOOST_TEST(takeover_rank(id, "c", {"c"}, {0.0}) == 0u);
  }
}

BOOST_AUTO_TEST_CASE(a_files_digest_depends_on_every_byte_and_nothing_else) {
  auto dir = std::filesystem::temp_directory_path() / ("load_test-" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  std::string bytes(1 << 20, '\0');
  for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = static_cast<char>((i * 2654435761u) >> 13);
  auto write = [&](const std::string& name, const std::string& b) {
    std::ofstream(dir / name, std::ios::binary) << b;
    return (dir / name).string();
  };
  auto a = file_digest(write("a", bytes));
  auto same = file_digest(write("same", bytes));
  auto flipped = bytes;
  flipped[777777] ^= 1;
  auto b = file_digest(write("b", flipped));
  auto longer = file_digest(write("c", bytes + '\0'));
  BOOST_REQUIRE(a && same && b && longer);
  BOOST_TEST(a->size() == 32u);
  BOOST_TEST(*a == *same);
  BOOST_TEST(*a == bytes_digest(bytes));  // the file's contents, read in chunks, or at once
  BOOST_TEST(*a != *b);
  BOOST_TEST(*a != *longer);
  BOOST_TEST(!file_digest((dir / "missing").string()));
  std::filesystem::remove_all(dir);
}

BOOST_AUTO_TEST_CASE(a_node_serves_only_sessions_pinned_to_its_model_or_to_none) {
  session_record r;
  r.id = "s-x@a";
  r.model_digest = "0123456789abcdef0123456789abcdef";
  session_data pinned{session_meta(r), {}};
  BOOST_TEST(serves_model("0123456789abcdef0123456789abcdef", pinned));
  BOOST_TEST(!serves_model("ffffffffffffffffffffffffffffffff", pinned));
  r.model_digest.clear();
  session_data unpinned{session_meta(r), {}};
  BOOST_TEST(serves_model("ffffffffffffffffffffffffffffffff", unpinned));
}
