#!/usr/bin/env bash
# Set up, build, and run the whole test suite (CTest over the Boost.Test executables).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
build=${KEEL_BUILD:-build}
cd "$build"
ctest --output-on-failure -j "$(nproc)"
