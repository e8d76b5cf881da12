// keel-sim's runs, in-process: its determinism, the scenarios of issue #10 under both rules, and
// the 1,000 seeds that CI checks on every change.

#define BOOST_TEST_MODULE sim
#include <boost/test/unit_test.hpp>

#include <set>
#include <string>

#include "apps/sim/sim.hpp"

namespace {

keel::sim::result run(uint64_t seed, keel::ownership_rule rule = keel::ownership_rule::majority,
                      const std::string& scenario = {}) {
  keel::sim::options o;
  o.seed = seed;
  o.rule = rule;
  o.scenario = scenario;
  return keel::sim::run(o);
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_seed_replays_event_for_event) {
  auto a = run(42), b = run(42), c = run(43);
  BOOST_TEST(a.digest == b.digest);
  BOOST_TEST(a.messages == b.messages);
  BOOST_TEST(a.turns_acknowledged == b.turns_acknowledged);
  BOOST_TEST(a.digest != c.digest);
}

BOOST_AUTO_TEST_CASE(the_partitions_of_issue_10_keep_every_guarantee_under_majorities) {
  for (auto scenario : {"partition-minority", "partition-isolated"}) {
    auto r = run(1, keel::ownership_rule::majority, scenario);
    BOOST_TEST(r.ok, scenario << ": " << r.guarantee << ": " << r.detail);
    // The client finished all its 12 turns: the majority side served it through the partition.
    BOOST_TEST(r.turns_acknowledged == 12u, scenario);
  }
}

BOOST_AUTO_TEST_CASE(the_checker_catches_the_old_rule_in_both_partitions) {
  for (auto scenario : {"partition-minority", "partition-isolated"}) {
    auto r = run(1, keel::ownership_rule::view, scenario);
    BOOST_TEST(!r.ok, scenario << ": the old rule passed");
    BOOST_TEST(r.guarantee == "one owner at a time", scenario << ": " << r.guarantee);
  }
}

BOOST_AUTO_TEST_CASE(the_checker_finds_lost_acknowledged_turns_under_the_old_rule) {
  // Drawn faults: the old rule loses acknowledged turns or splits ownership within a few seeds.
  std::set<std::string> broken;
  for (uint64_t seed = 1; seed <= 200 && broken.size() < 2; ++seed) {
    auto r = run(seed, keel::ownership_rule::view);
    if (!r.ok) broken.insert(r.guarantee);
  }
  BOOST_TEST(broken.count("one owner at a time") == 1u);
  BOOST_TEST(broken.count("acknowledged turns are never lost") == 1u);
}

BOOST_AUTO_TEST_CASE(a_thousand_seeds_keep_every_guarantee) {
  uint64_t turns = 0, faults = 0, tokens = 0;
  for (uint64_t seed = 1; seed <= 1000; ++seed) {
    auto r = run(seed);
    BOOST_REQUIRE_MESSAGE(r.ok, "seed " << seed << ": " << r.guarantee << ": " << r.detail
                                        << " (replay: keel-sim --seed " << seed << " --trace)");
    turns += r.turns_acknowledged;
    faults += r.faults;
    tokens += r.tokens_checked;
  }
  BOOST_TEST_MESSAGE("1000 seeds: " << faults << " faults, " << turns << " turns acknowledged, "
                                    << tokens << " tokens checked");
  // The runs did work: faults were injected and conversations went on through them.
  BOOST_TEST(faults > 5000u);
  BOOST_TEST(turns > 5000u);
}

BOOST_AUTO_TEST_CASE(seeds_that_once_broke_a_guarantee_keep_it) {
  // Each found a real bug; the run is the same event for event, so it stays a regression test.
  struct found {
    uint64_t seed;
    const char* what;
  };
  const found seeds[] = {
      // A member that learned a higher ballot kept the promise in memory when its disk failed
      // to store it, answered a prepare for that ballot from memory, crashed and forgot it; a
      // lower ballot then won a majority and its acknowledged turns were lost to the higher one.
      {782548, "a promise learned but not stored"},
  };
  for (auto& f : seeds) {
    auto r = run(f.seed);
    BOOST_TEST(r.ok, "seed " << f.seed << " (" << f.what << "): " << r.guarantee << ": " << r.detail);
    BOOST_TEST(r.turns_acknowledged > 0u, f.seed);
  }
}

BOOST_AUTO_TEST_CASE(a_member_whose_store_was_damaged_votes_only_after_reading_back) {
  // keel-sim --damage: one crash per run restarts on a store that lost part of what it synced.
  // Before amnesiac members read sessions back before voting, seeds 161, 454 and 529 lost
  // acknowledged turns this way (and others split ownership): the damaged member's forgotten
  // promise and copy let a candidate win a majority without the newest copy. Now 600 seeds,
  // those among them, keep every guarantee.
  uint64_t turns = 0, faults = 0;
  for (uint64_t seed = 1; seed <= 600; ++seed) {
    keel::sim::options o;
    o.seed = seed;
    o.damage = true;
    auto r = keel::sim::run(o);
    BOOST_REQUIRE_MESSAGE(r.ok, "seed " << seed << ": " << r.guarantee << ": " << r.detail
                                        << " (replay: keel-sim --seed " << seed
                                        << " --damage --trace)");
    turns += r.turns_acknowledged;
    faults += r.faults;
  }
  BOOST_TEST(faults > 3000u);
  BOOST_TEST(turns > 3000u);
  // With members refusing candidates while the owner is alive, a member that had granted the
  // owner and learned the new ballot from a refusal answered the new owner's prepare as a
  // repeat, with no wait: two owners at once. A learned promise owes the same wait as a
  // promise given (ownership::learn).
  keel::sim::options o;
  o.seed = 302406;
  o.damage = true;
  auto r = keel::sim::run(o);
  BOOST_TEST(r.ok, "seed 302406 --damage: " << r.guarantee << ": " << r.detail);
}
