#!/usr/bin/env bash
# Builds the libFuzzer targets of tests/fuzz with clang (a tree of its own, ${KEEL_FUZZ_BUILD:-
# build-fuzz}) and runs each for a bounded time (docs/wire.md, "Fuzzing").
#
#   scripts/fuzz.sh [--seconds N] [--target NAME]...
#
# --seconds N: each target runs N seconds (default 60), all side by side, so the whole run takes
# N seconds however many targets there are. --target: only the named targets (checkpoint, peer,
# ownership; default all). The corpus each run grows is kept in BUILD/corpus/NAME and seeded from
# tests/fuzz/corpus/NAME and the seeds the target writes itself; an input that breaks a target is
# saved as BUILD/artifacts/NAME-crash-... and the script fails. Without clang++ and libFuzzer it
# says so and exits 0 (nothing is fuzzed).
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=60
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) seconds="$2"; shift 2 ;;
    --target) targets+=("$2"); shift 2 ;;
    *) echo "fuzz.sh: unknown argument $1 (--seconds N, --target NAME)" >&2; exit 2 ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=(checkpoint peer ownership)

cxx=${KEEL_FUZZ_CXX:-clang++}
cc=${KEEL_FUZZ_CC:-clang}
probe=$(mktemp -d)
# Where peer_fuzz keeps its store (tmpfs when there is one), removed even after a crash.
KEEL_FUZZ_TMP=$(mktemp -d -p "$( [ -d /dev/shm ] && echo /dev/shm || echo "${TMPDIR:-/tmp}")" keel-fuzz-XXXXXX)
export KEEL_FUZZ_TMP
trap 'rm -rf "$probe" "$KEEL_FUZZ_TMP"' EXIT
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' \
  > "$probe/p.cpp"
if ! command -v "$cxx" >/dev/null || ! command -v "$cc" >/dev/null ||
   ! "$cxx" -fsanitize=fuzzer,address,undefined "$probe/p.cpp" -o "$probe/p" 2>/dev/null; then
  echo "fuzz.sh: skipped: $cxx with libFuzzer (-fsanitize=fuzzer) is not available"
  exit 0
fi

build=${KEEL_FUZZ_BUILD:-build-fuzz}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" "${generator[@]}" -DKEEL_FUZZ=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DCMAKE_CXX_COMPILER="$cxx" -DCMAKE_C_COMPILER="$cc" >/dev/null
fi
# The build's output only when it fails (clang warns about capnp headers and our code alike).
if ! cmake --build "$build" -j "$(nproc)" --target "${targets[@]/%/_fuzz}" > "$build/build.log" 2>&1
then
  tail -n 80 "$build/build.log"
  echo "fuzz.sh: the build failed (log: $build/build.log)" >&2
  exit 1
fi

# The targets run side by side (one process each, as many as there are targets).
run() {
  local t=$1
  local exe="$build/tests/fuzz/${t}_fuzz"
  local corpus="$build/corpus/$t"
  local seeds=tests/fuzz/corpus/$t
  mkdir -p "$corpus" "$seeds"
  "$exe" --write-corpus="$corpus" 2>/dev/null
  # -timeout: one input may take 10 s (a connection that never ends is a finding);
  # -rss_limit_mb: the process may hold 2 GiB; -malloc_limit_mb: one allocation over 64 MiB
  # (4 times the largest message a port takes) is a finding; UBSan and ASan reports abort.
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$exe" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=64 \
      -print_final_stats=1 -artifact_prefix="$build/artifacts/$t-" "$corpus" "$seeds" \
      > "$build/fuzz-$t.log" 2>&1
}
mkdir -p "$build/artifacts"
echo "fuzz.sh: ${targets[*]} for ${seconds}s each, side by side"
pids=()
for t in "${targets[@]}"; do
  run "$t" &
  pids+=($!)
done
failed=()
for i in "${!targets[@]}"; do
  t=${targets[$i]}
  if ! wait "${pids[$i]}"; then
    failed+=("$t")
    tail -n 60 "$build/fuzz-$t.log"
  fi
  grep -E 'stat::number_of_executed_units|stat::average_exec_per_sec|stat::new_units_added|stat::peak_rss_mb' \
    "$build/fuzz-$t.log" | sed "s/^/fuzz.sh: $t: /" || true
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz.sh: FAILED: ${failed[*]} (inputs in $build/artifacts, logs in $build/fuzz-*.log)" >&2
  exit 1
fi
echo "fuzz.sh: ok: ${targets[*]}, ${seconds}s each"
