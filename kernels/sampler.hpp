#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <caf/error.hpp>

namespace keel {

/// How the next token is chosen. The defaults give greedy decoding with no penalty.
struct sampling_params {
  float temperature = 0.0f;         // 0 = greedy
  int32_t top_k = 0;                // 0 = off
  float top_p = 1.0f;               // 1 = off
  float min_p = 0.0f;               // 0 = off
  float repetition_penalty = 1.0f;  // 1 = off (llama.cpp/CTRL style: divide positive logits,
                                    // multiply negative ones)
  int32_t repetition_window = 64;   // how many recent tokens the penalty looks at
  uint64_t seed = 0;
};

/// `bad_request` naming the parameter and value, e.g. "top_p must be in (0, 1], got 1.5"; no error
/// when every parameter is in range: temperature finite and >= 0, top_k >= 0, top_p in (0, 1],
/// min_p in [0, 1], repetition_penalty finite and > 0, repetition_window >= 0.
caf::error validate(const sampling_params& p);

/// Counter-based generator keyed by (seed, turn, index): three rounds of a 64-bit bijective mix
/// (splitmix64's finaliser), one per key word. The same key gives the same value on any thread, in
/// any order; there is no state. For a fixed (seed, turn), distinct indices give distinct values.
uint64_t draw_u64(uint64_t seed, uint64_t turn, uint64_t index);

/// Uniform in [0, 1) with 53 random bits, from draw_u64 of the same key.
double draw_unit(uint64_t seed, uint64_t turn, uint64_t index);

/// Buffers `sample` reuses between calls, so that a hot loop does not allocate. One per thread.
struct sampler_scratch {
  std::vector<int32_t> ids;
  std::vector<int32_t> recent;
  std::vector<float> weights;
};

/// Picks the next token. `logits` (n_vocab > 0 values) is scratch: it is modified. `recent` are
/// the most recent tokens of the sequence, oldest first; the penalty applies once to each distinct
/// id among the last repetition_window of them (ids outside [0, n_vocab) are ignored).
///
/// Order: repetition penalty (also when greedy), then greedy (temperature 0: highest logit, lowest
/// id on ties) or temperature, top-k, softmax, top-p, min-p, and one draw_unit(seed, turn, index)
/// that picks by cumulative probability over the surviving tokens in id order. Every ordering is
/// total (logit descending, then id ascending), so the result depends only on the arguments.
/// NaN logits count as -inf and +inf as the largest float; at least one token always survives.
/// Out-of-range parameters (see `validate`) are clamped rather than trusted. Returns -1 only when
/// n_vocab <= 0.
int32_t sample(const sampling_params& p, float* logits, int32_t n_vocab, const int32_t* recent,
               size_t n_recent, uint64_t turn, uint64_t index);

/// As above, reusing `scratch`'s buffers.
int32_t sample(const sampling_params& p, float* logits, int32_t n_vocab, const int32_t* recent,
               size_t n_recent, uint64_t turn, uint64_t index, sampler_scratch& scratch);

}  // namespace keel
