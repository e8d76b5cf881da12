#!/usr/bin/env bash
# Set up, build, and run the whole test suite (CTest over the Boost.Test executables).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
build=${KEEL_BUILD:-build}
cd "$build"
# Tests that start real processes can time out on a loaded 2-core machine; a test that fails
# is run once more (a test that fails twice fails the run).
ctest --output-on-failure -j "$(nproc)" --repeat until-pass:2
