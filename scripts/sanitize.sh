#!/usr/bin/env bash
# Builds the tests of kernels/ (they link only the kernels: no CAF, no Cap'n Proto) with
# AddressSanitizer and UndefinedBehaviorSanitizer in a tree of their own
# (${KEEL_SANITIZE_BUILD:-build-asan}) and runs them; any report fails the run. The SIMD and
# integer kernels, the quantisers, the GGUF reader, the tokenizer and the chat-template
# interpreter are where a stray index would hide. The whole suite under ASan and TSan is run by
# hand before work on threads is resolved (bench/sanitizers.md).
set -euo pipefail
cd "$(dirname "$0")/.."
build=${KEEL_SANITIZE_BUILD:-build-asan}
tests=(ops_test quants_test engine_test tensor_parallel_test model_test gguf_test tokenizer_test
       chat_template_test kv_cache_test sampler_test thread_pool_test)
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
  flags="-fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer"
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_C_FLAGS="$flags"
fi
cmake --build "$build" -j "$(nproc)" --target "${tests[@]}"
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1:suppressions=$(pwd)/scripts/ubsan.supp
pattern="^($(IFS='|'; echo "${tests[*]}"))\$"
cd "$build"
ctest --output-on-failure -j "$(nproc)" -R "$pattern"
