// API keys and tenant limits of the client port (actors/tenants.hpp; issue #11).

#define BOOST_TEST_MODULE tenants
#include <boost/test/unit_test.hpp>

#include <sys/stat.h>

#include <fstream>

#include "actors/tenants.hpp"
#include "tests/test_support.hpp"

using namespace std::chrono_literals;

namespace {

const char* two_keys =
    "# keys of the test cluster\n"
    "alice-key-0123456789 tenant=alice class=interactive rpm=600 tpm=100000 sessions=10\n"
    "\n"
    "bob-key-0123456789ab   tenant=bob class=batch rpm=5 tpm=50 sessions=1  # a small one\n";

std::string refusal(std::string_view text) {
  auto t = keel::key_table::parse(text, "keys.txt");
  BOOST_REQUIRE(!t);
  return keel::message_of(t.error());
}

}  // namespace

BOOST_AUTO_TEST_CASE(a_keys_file_gives_each_key_its_tenant_class_and_limits) {
  auto t = keel::key_table::parse(two_keys, "keys.txt");
  BOOST_REQUIRE_MESSAGE(t, keel::test::why(t));
  BOOST_REQUIRE_EQUAL(t->keys().size(), 2u);
  auto* bob = t->find("bob-key-0123456789ab");
  BOOST_REQUIRE(bob != nullptr);
  BOOST_TEST(bob->tenant == "bob");
  BOOST_TEST(bob->priority_class == "batch");
  BOOST_TEST(bob->max_priority == 0);
  BOOST_TEST(bob->requests_per_minute == 5u);
  BOOST_TEST(bob->tokens_per_minute == 50u);
  BOOST_TEST(bob->max_sessions == 1u);
  BOOST_TEST(t->find("alice-key-0123456789")->max_priority == 20);
  BOOST_TEST(t->find("alice-key-012345678") == nullptr);  // a prefix is no key
  BOOST_TEST(t->find("") == nullptr);
  BOOST_TEST(t->find("alice-key-0123456789x") == nullptr);
}

BOOST_AUTO_TEST_CASE(a_bad_keys_file_is_refused_naming_file_line_and_value) {
  auto why = refusal("# ok\nalice-key-0123456789 tenant=alice class=gold rpm=1 tpm=1 sessions=1\n");
  BOOST_TEST(why.find("keys.txt:2") != std::string::npos, why);
  BOOST_TEST(why.find("'gold'") != std::string::npos, why);
  why = refusal("alice-key-0123456789 tenant=alice class=batch rpm=ten tpm=1 sessions=1\n");
  BOOST_TEST(why.find("keys.txt:1: rpm must be a whole number, got 'ten'") != std::string::npos,
             why);
  why = refusal("short tenant=alice class=batch rpm=1 tpm=1 sessions=1\n");
  BOOST_TEST(why.find("keys.txt:1: a key is at least 16 characters") != std::string::npos, why);
  BOOST_TEST(why.find("short") == std::string::npos, why);  // a key is never repeated
  why = refusal("alice-key-0123456789 tenant=alice class=batch rpm=1 tpm=1\n");
  BOOST_TEST(why.find("keys.txt:1: sessions= is missing") != std::string::npos, why);
  why = refusal(std::string(two_keys) +
                "alice-key-0123456789 tenant=carol class=batch rpm=1 tpm=1 sessions=1\n");
  BOOST_TEST(why.find("keys.txt:5") != std::string::npos, why);
  BOOST_TEST(why.find("already given to tenant alice") != std::string::npos, why);
  why = refusal("# nothing\n");
  BOOST_TEST(why.find("no keys") != std::string::npos, why);
}

BOOST_AUTO_TEST_CASE(a_keys_file_others_can_read_is_refused) {
  keel::test::temp_dir dir{"tenants_test"};
  auto path = (dir.path / "keys").string();
  std::ofstream(path) << two_keys;
  ::chmod(path.c_str(), 0644);
  auto t = keel::key_table::load(path);
  BOOST_REQUIRE(!t);
  auto why = keel::message_of(t.error());
  BOOST_TEST(why.find("mode 644") != std::string::npos, why);
  BOOST_TEST(why.find(path) != std::string::npos, why);
  ::chmod(path.c_str(), 0600);
  BOOST_TEST(static_cast<bool>(keel::key_table::load(path)));
}

BOOST_AUTO_TEST_CASE(limits_refill_over_a_minute_and_are_per_tenant) {
  auto t = keel::key_table::parse(two_keys, "keys.txt");
  BOOST_REQUIRE(t);
  auto& alice = *t->find("alice-key-0123456789");
  auto& bob = *t->find("bob-key-0123456789ab");
  keel::tenant_usage u;
  auto t0 = keel::tenant_usage::clock::now();
  for (int i = 0; i < 5; ++i) BOOST_TEST(!u.request(bob, t0));
  auto over = u.request(bob, t0);
  BOOST_REQUIRE(over);
  BOOST_TEST(keel::code_of(over) == keel::errc::overloaded);
  BOOST_TEST(keel::message_of(over) == "tenant bob: over its limit rpm=5 on this node");
  BOOST_TEST(u.retry_after_ms() == 12000u);  // one request back every 12 s
  BOOST_TEST(!u.request(alice, t0));         // another tenant is not affected
  BOOST_TEST(!u.request(bob, t0 + 12s));
  // Tokens: a turn may overrun the limit, the next waits until the bucket refilled.
  BOOST_TEST(!u.may_generate(bob, t0));
  u.charge(bob, 80, t0);
  auto tokens = u.may_generate(bob, t0 + 10s);
  BOOST_REQUIRE(tokens);
  BOOST_TEST(keel::message_of(tokens).find("tpm=50") != std::string::npos);
  BOOST_TEST(!u.may_generate(alice, t0 + 10s));
  BOOST_TEST(!u.may_generate(bob, t0 + 61s));
}
