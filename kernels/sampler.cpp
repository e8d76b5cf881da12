#include "kernels/sampler.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <limits>
#include <numeric>
#include <string>

#include "base/error.hpp"

namespace keel {

namespace {

std::string num(double x) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// splitmix64's finaliser: a bijection with full avalanche.
constexpr uint64_t mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

constexpr uint64_t golden = 0x9e3779b97f4a7c15ULL;

constexpr float neg_inf = -std::numeric_limits<float>::infinity();

// NaN sorts as -inf and +inf as the largest float, so that every comparison is a total order and
// the softmax never sees inf - inf.
inline float clean(float x) {
  if (std::isnan(x)) return neg_inf;
  if (x > FLT_MAX) return FLT_MAX;
  return x;
}

int32_t argmax(const float* logits, int32_t n) {
  int32_t best = 0;
  for (int32_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

void apply_penalty(const sampling_params& p, float* logits, int32_t n, const int32_t* recent,
                   size_t n_recent, std::vector<int32_t>& distinct) {
  const float pen = p.repetition_penalty;
  if (!(pen > 0.0f) || pen == 1.0f || !std::isfinite(pen) || p.repetition_window <= 0 ||
      recent == nullptr || n_recent == 0)
    return;
  size_t w = std::min(n_recent, static_cast<size_t>(p.repetition_window));
  distinct.assign(recent + (n_recent - w), recent + n_recent);
  std::sort(distinct.begin(), distinct.end());
  distinct.erase(std::unique(distinct.begin(), distinct.end()), distinct.end());
  for (int32_t id : distinct) {
    if (id < 0 || id >= n) continue;
    float& l = logits[id];
    l = clean(l > 0.0f ? l / pen : l * pen);
  }
}

// The length of the smallest best-first prefix of `ids` whose weight reaches `target` (all of
// them if none does), moving that prefix to the front in no particular order. A quickselect that
// halves the range each round, so a nucleus of most of a 150k vocabulary costs O(n), not a sort.
template <class Better, class Weight>
size_t nucleus(std::vector<int32_t>& ids, double target, Better better, Weight weight) {
  auto at = [&](size_t j) { return ids.begin() + static_cast<std::ptrdiff_t>(j); };
  size_t lo = 0, hi = ids.size();
  double before = 0.0;  // weight of ids[0, lo), each better than all of ids[lo, hi)
  while (hi - lo > 32) {
    size_t mid = lo + (hi - lo) / 2;
    std::nth_element(at(lo), at(mid), at(hi), better);
    double s = 0.0;
    for (size_t j = lo; j <= mid; ++j) s += weight(ids[j]);
    if (before + s >= target) {
      hi = mid + 1;
    } else {
      before += s;
      lo = mid + 1;
    }
  }
  std::sort(at(lo), at(hi), better);
  for (; lo < hi; ++lo) {
    before += weight(ids[lo]);
    if (before >= target) return lo + 1;
  }
  return hi;
}

// Picks by cumulative weight: the first of `count` candidates whose running sum exceeds u times
// the total. Candidates of weight 0 are never picked.
template <class IdOf, class WeightOf>
int32_t draw(size_t count, IdOf id_of, WeightOf weight_of, double u) {
  double total = 0.0;
  for (size_t j = 0; j < count; ++j) total += weight_of(j);
  const double target = u * total;
  double cum = 0.0;
  int32_t last = -1;
  for (size_t j = 0; j < count; ++j) {
    float w = weight_of(j);
    if (w <= 0.0f) continue;
    cum += w;
    last = id_of(j);
    if (cum > target) return last;
  }
  return last;  // only reached through rounding in the last place
}

}  // namespace

caf::error validate(const sampling_params& p) {
  if (!(std::isfinite(p.temperature) && p.temperature >= 0.0f))
    return make_error(errc::bad_request,
                      "temperature must be finite and >= 0, got " + num(p.temperature));
  if (p.top_k < 0)
    return make_error(errc::bad_request, "top_k must be >= 0, got " + std::to_string(p.top_k));
  if (!(p.top_p > 0.0f && p.top_p <= 1.0f))
    return make_error(errc::bad_request, "top_p must be in (0, 1], got " + num(p.top_p));
  if (!(p.min_p >= 0.0f && p.min_p <= 1.0f))
    return make_error(errc::bad_request, "min_p must be in [0, 1], got " + num(p.min_p));
  if (!(std::isfinite(p.repetition_penalty) && p.repetition_penalty > 0.0f))
    return make_error(errc::bad_request, "repetition_penalty must be finite and > 0, got " +
                                             num(p.repetition_penalty));
  if (p.repetition_window < 0)
    return make_error(errc::bad_request,
                      "repetition_window must be >= 0, got " + std::to_string(p.repetition_window));
  return {};
}

uint64_t draw_u64(uint64_t seed, uint64_t turn, uint64_t index) {
  uint64_t h = mix(seed ^ 0x6a09e667f3bcc909ULL);
  h = mix(h + (turn + 1) * golden);
  return mix(h + (index + 1) * golden);
}

double draw_unit(uint64_t seed, uint64_t turn, uint64_t index) {
  return static_cast<double>(draw_u64(seed, turn, index) >> 11) * 0x1.0p-53;
}

int32_t sample(const sampling_params& p, float* logits, int32_t n_vocab, const int32_t* recent,
               size_t n_recent, uint64_t turn, uint64_t index) {
  sampler_scratch scratch;
  return sample(p, logits, n_vocab, recent, n_recent, turn, index, scratch);
}

int32_t sample(const sampling_params& p, float* logits, int32_t n_vocab, const int32_t* recent,
               size_t n_recent, uint64_t turn, uint64_t index, sampler_scratch& s) {
  const int32_t n = n_vocab;
  if (n <= 0 || logits == nullptr) return -1;
  for (int32_t i = 0; i < n; ++i) logits[i] = clean(logits[i]);
  apply_penalty(p, logits, n, recent, n_recent, s.recent);
  if (!(p.temperature > 0.0f)) return argmax(logits, n);

  auto better = [logits](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  const int32_t top_k = p.top_k > 0 && p.top_k < n ? p.top_k : 0;
  const bool use_top_p = p.top_p < 1.0f;  // false for NaN
  const double top_p = std::max(0.0, static_cast<double>(p.top_p));
  const bool use_min_p = p.min_p > 0.0f;
  const float min_p = std::min(p.min_p, 1.0f);

  // Candidates: `ids` when `explicit_ids`, else the whole vocabulary. `sorted` means best first,
  // `by_id` means ascending id.
  auto& ids = s.ids;
  ids.clear();
  bool explicit_ids = false;
  bool sorted = false;
  bool by_id = true;
  if (top_k > 0) {
    // Bounded heap whose front is the worst of the best top_k seen so far: O(n) for small k.
    ids.resize(top_k);
    std::iota(ids.begin(), ids.end(), 0);
    std::make_heap(ids.begin(), ids.end(), better);
    for (int32_t i = top_k; i < n; ++i) {
      if (!better(i, ids.front())) continue;
      std::pop_heap(ids.begin(), ids.end(), better);
      ids.back() = i;
      std::push_heap(ids.begin(), ids.end(), better);
    }
    std::sort_heap(ids.begin(), ids.end(), better);
    explicit_ids = sorted = true;
    by_id = false;
  }
  const float lmax = sorted ? logits[ids[0]] : logits[argmax(logits, n)];
  if (lmax == neg_inf) return sorted ? ids[0] : argmax(logits, n);  // everything is masked

  // Unnormalised probabilities: the best token weighs 1, so min-p keeps weight >= min_p.
  const float inv_t = static_cast<float>(1.0 / static_cast<double>(p.temperature));
  if (!std::isfinite(inv_t)) return sorted ? ids[0] : argmax(logits, n);  // subnormal temperature
  auto weight = [&](int32_t i) { return std::exp((logits[i] - lmax) * inv_t); };

  // The softmax normaliser over the top-k set, which top-p measures against.
  double z = 0.0;
  if (use_top_p) {
    if (explicit_ids) {
      for (int32_t i : ids) z += weight(i);
    } else {
      for (int32_t i = 0; i < n; ++i) z += weight(i);
    }
  }

  // Top-p and min-p each keep a prefix of the sorted candidates, and top-p's normaliser does not
  // depend on min-p, so applying min-p first gives the same set and shrinks the selection.
  if (use_min_p) {
    if (explicit_ids) {
      auto cut = std::find_if(ids.begin(), ids.end(), [&](int32_t i) { return weight(i) < min_p; });
      ids.erase(cut, ids.end());
    } else {
      for (int32_t i = 0; i < n; ++i)
        if (weight(i) >= min_p) ids.push_back(i);
      explicit_ids = true;
    }
  }

  if (use_top_p) {
    if (!explicit_ids) {
      ids.resize(n);
      std::iota(ids.begin(), ids.end(), 0);
      explicit_ids = true;
    }
    const double target = top_p * z;
    size_t cut = ids.size();
    if (sorted) {
      double cum = 0.0;
      for (size_t j = 0; j < ids.size(); ++j) {
        cum += weight(ids[j]);
        if (cum >= target) {
          cut = j + 1;
          break;
        }
      }
    } else {
      cut = nucleus(ids, target, better, weight);
    }
    ids.resize(cut);
    by_id = false;
  }

  // Draw over the survivors in id order, so the pick does not depend on which filter ran. A small
  // survivor set is sorted by id; a large one is marked in a dense weight array instead.
  const double u = draw_unit(p.seed, turn, index);
  if (explicit_ids && !by_id && ids.size() * 16 < static_cast<size_t>(n)) {
    std::sort(ids.begin(), ids.end());
    by_id = true;
  }
  if (explicit_ids && by_id) {
    for (int32_t i : ids) logits[i] = weight(i);  // no comparison follows
    return draw(
        ids.size(), [&](size_t j) { return ids[j]; }, [&](size_t j) { return logits[ids[j]]; }, u);
  }
  float* w = logits;
  if (explicit_ids) {
    s.weights.assign(static_cast<size_t>(n), 0.0f);
    for (int32_t i : ids) s.weights[i] = weight(i);
    w = s.weights.data();
  } else {
    for (int32_t i = 0; i < n; ++i) logits[i] = weight(i);
  }
  return draw(
      static_cast<size_t>(n), [](size_t j) { return static_cast<int32_t>(j); },
      [w](size_t j) { return w[j]; }, u);
}

}  // namespace keel
