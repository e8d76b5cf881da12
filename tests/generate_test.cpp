#define BOOST_TEST_MODULE generate_test
#include <boost/test/unit_test.hpp>

#include <algorithm>

#include "kernels/engine.hpp"
#include "kernels/generate.hpp"
#include "kernels/model.hpp"
#include "kernels/synth.hpp"
#include "kernels/thread_pool.hpp"
#include "tests/test_support.hpp"

// kernels/generate.hpp: the loop `keel generate --model` runs.

using namespace keel;

namespace {

/// Greedy tokens of the model at `path` after `prompt` (up to `n`).
std::vector<int32_t> greedy(const std::string& path, const std::vector<int32_t>& prompt, int32_t n,
                            bool stop_at_eos) {
  auto m = model::load(path);
  BOOST_REQUIRE_MESSAGE(m, test::why(m));
  thread_pool threads(1);
  engine eng(**m, threads);
  kv_pool kv(kv_layout_for(**m), 16ull << 20);
  generation_request r;
  r.prompt = prompt;
  r.max_tokens = n;
  r.stop_at_eos = stop_at_eos;
  auto out = generate(eng, kv, {r}, 1);
  BOOST_REQUIRE_MESSAGE(out, test::why(out));
  return out->at(0);
}

}  // namespace

BOOST_AUTO_TEST_CASE(generation_stops_after_any_end_of_generation_token) {
  // Two models with the same weights (synth draws them from the seed, the tensor names and the
  // vocabulary's size) and vocabularies that differ in one token's text: in the second, a token
  // the first generates is named <|im_end|>, which ends generation although it is not the eos.
  test::temp_dir dir("generate_eog");
  auto o = test::tiny_model();
  o.ctx = 128;
  auto v = builtin_byte_vocab();
  auto first = test::write_model(dir.path / "a.gguf", o);
  const std::vector<int32_t> prompt{v.bos, 72, 105};
  auto all = greedy(first, prompt, 24, false);
  BOOST_REQUIRE_EQUAL(all.size(), 24u);
  // The first token, after the first few, that did not come before and is no end already.
  size_t at = 3;
  while (at < all.size() && (std::find(all.begin(), all.begin() + static_cast<ptrdiff_t>(at),
                                       all[at]) != all.begin() + static_cast<ptrdiff_t>(at) ||
                             all[at] == v.eos))
    ++at;
  BOOST_REQUIRE_MESSAGE(at < all.size(), "the model repeats itself from the start");
  auto renamed = v;
  renamed.tokens[static_cast<size_t>(all[at])] = "<|im_end|>";
  auto w = synthesize(o, renamed);
  BOOST_REQUIRE_MESSAGE(w, test::why(w));
  auto second = (dir.path / "b.gguf").string();
  BOOST_REQUIRE(!w->write(second));
  // The same weights: the same tokens while nothing stops them.
  BOOST_CHECK(greedy(second, prompt, 24, false) == all);
  // Stopping: the <|im_end|> is the last token, as an eos would be.
  auto stopped = greedy(second, prompt, 24, true);
  std::vector<int32_t> want(all.begin(), all.begin() + static_cast<ptrdiff_t>(at) + 1);
  BOOST_CHECK(stopped == want);
  // The first model does not stop there (only at its eos, if it makes one).
  auto eos = std::find(all.begin(), all.end(), v.eos);
  std::vector<int32_t> until_eos(all.begin(), eos == all.end() ? eos : eos + 1);
  BOOST_CHECK(greedy(first, prompt, 24, true) == until_eos);
}
