#!/usr/bin/env bash
# The main job: set up, build, synthesize the default model, and generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build.sh
build=${KEEL_BUILD:-build}
model="$build/default.gguf"
if [ ! -f "$model" ]; then
  "$build/apps/keel-model" synth -o "$model"
fi
"$build/apps/keel-model" info "$model"
echo "--- keel generate (greedy, ids) ---"
"$build/apps/keel" generate --model "$model" --prompt "${KEEL_PROMPT:-Once upon a time}" \
  --max-tokens 32 --ids
echo "--- keel generate (temperature 0.8, seed 7) ---"
"$build/apps/keel" generate --model "$model" --prompt "${KEEL_PROMPT:-Once upon a time}" \
  --max-tokens 32 --temperature 0.8 --seed 7
