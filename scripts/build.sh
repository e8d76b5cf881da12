#!/usr/bin/env bash
# Installs missing Debian packages, then configures and builds Keel into ${KEEL_BUILD:-build}.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-deps.sh
build=${KEEL_BUILD:-build}
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
if [ ! -f "$build/CMakeCache.txt" ]; then
  cmake -S . -B "$build" "${generator[@]}" -DCMAKE_BUILD_TYPE=Release
fi
cmake --build "$build" -j "$(nproc)"
