#!/usr/bin/env bash
# Set up, build, and run the whole test suite (CTest over the Boost.Test executables).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
build=${KEEL_BUILD:-build}
cd "$build"
# No retry: a test that fails is a race in the code or the test (the ownership protocol's races
# are searched by keel-sim's seeded runs, tests/sim_test.cpp).
ctest --output-on-failure -j "$(nproc)"
