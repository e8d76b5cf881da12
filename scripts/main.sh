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
echo "--- the same through a keel-node on loopback (keel generate --connect) ---"
log=$(mktemp)
"$build/apps/keel-node" --listen 127.0.0.1:0 --model "$model" 2>"$log" &
node_pid=$!
trap 'kill "$node_pid" 2>/dev/null; rm -f "$log"' EXIT
addr=""
for _ in $(seq 1 100); do
  addr=$(sed -n 's/^keel-node: listening on //p' "$log" | head -n 1)
  [ -n "$addr" ] && break
  sleep 0.1
done
[ -n "$addr" ] || { cat "$log"; echo "keel-node did not start" >&2; exit 1; }
"$build/apps/keel" generate --connect "$addr" --prompt "${KEEL_PROMPT:-Once upon a time}" \
  --max-tokens 32 --ids
kill -TERM "$node_pid"
wait "$node_pid"
echo "keel-node stopped cleanly"
