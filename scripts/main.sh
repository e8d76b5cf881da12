#!/usr/bin/env bash
# The main job: set up, build, synthesize the default model, and generate from it; then a local
# demo cluster: three keel-nodes in two regions, the node serving a streaming reply killed
# mid-reply, the reply finishing on another node.
set -euo pipefail
cd "$(dirname "$0")/.."

# Whatever this script starts or creates goes when it ends, however it ends.
cleanup_pids=()
cleanup_paths=()
cleanup() {
  for p in "${cleanup_pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "${cleanup_paths[@]}"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

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
cleanup_paths+=("$log")
"$build/apps/keel-node" --listen 127.0.0.1:0 --model "$model" 2>"$log" &
node_pid=$!
cleanup_pids+=("$node_pid")
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
cleanup_pids=()
echo "keel-node stopped cleanly"

# --- The demo cluster ---
echo
echo "=== A local cluster: three keel-nodes in two regions (a, b in r1; c in r2) ==="
# A model slow enough (about 3 ms per token on one thread) that a reply takes seconds.
demo_model="$build/demo.gguf"
if [ ! -f "$demo_model" ]; then
  "$build/apps/keel-model" synth -o "$demo_model" --dim 512 --layers 6 --heads 8 --kv-heads 4 \
    --ffn 1536 --ctx 2048
fi
demo=$(mktemp -d)
cleanup_paths+=("$demo")
# Six ports of 127.0.0.1 that no socket uses now (clients a b c, then peers a b c): every node
# must know the others' peer addresses before it starts.
used=" $(for f in /proc/net/tcp /proc/net/tcp6; do
  [ -r "$f" ] && tail -n +2 "$f" | while read -r _ local _; do echo $((16#${local##*:})); done
done | tr '\n' ' ') "
ports=()
while [ ${#ports[@]} -lt 6 ]; do
  p=$((20000 + RANDOM % 30000))
  case "$used ${ports[*]} " in *" $p "*) continue ;; esac
  ports+=("$p")
done
names=(a b c)
regions=(r1 r1 r2)
pids=()
endpoints=()
for i in 0 1 2; do
  peers=""
  peer_regions=""
  for j in 0 1 2; do
    [ "$j" -eq "$i" ] && continue
    peers="$peers${peers:+,}${names[$j]}=127.0.0.1:${ports[$((j + 3))]}"
    peer_regions="$peer_regions${peer_regions:+,}${names[$j]}=${regions[$j]}"
  done
  "$build/apps/keel-node" --name "${names[$i]}" --region "${regions[$i]}" \
    --listen "127.0.0.1:${ports[$i]}" --peer-listen "127.0.0.1:${ports[$((i + 3))]}" \
    --peers "$peers" --peer-regions "$peer_regions" \
    --data "$demo/${names[$i]}" --model "$demo_model" --threads 1 \
    2>"$demo/${names[$i]}.log" &
  pids+=($!)
  cleanup_pids+=($!)
  endpoints+=("127.0.0.1:${ports[$i]}")
done
node_logs() {
  for i in 0 1 2; do echo "--- node ${names[$i]} ---"; tail -n 20 "$demo/${names[$i]}.log"; done
}
# Up: each node listens, and its links to both others are up.
for _ in $(seq 1 300); do
  ready=0
  for i in 0 1 2; do
    if grep -q '^keel-node: listening on ' "$demo/${names[$i]}.log" &&
      [ "$(grep -c -- '-> up (' "$demo/${names[$i]}.log")" -ge 2 ]; then
      ready=$((ready + 1))
    fi
  done
  [ "$ready" -eq 3 ] && break
  sleep 0.1
done
[ "$ready" -eq 3 ] || { node_logs; echo "the cluster did not come up" >&2; exit 1; }
for i in 0 1 2; do
  echo "node ${names[$i]} (region ${regions[$i]}): clients ${endpoints[$i]}," \
    "peers 127.0.0.1:${ports[$((i + 3))]}, pid ${pids[$i]}, data $demo/${names[$i]}"
done

echo
echo "=== A reply streams from the cluster; its node is killed with SIGKILL mid-reply ==="
connect="${endpoints[0]},${endpoints[1]},${endpoints[2]}"
prompt="${KEEL_PROMPT:-Once upon a time}"
sampling=(--max-tokens 400 --temperature 0.8 --seed 7 --ids)
echo "keel generate --connect $connect --verbose ${sampling[*]} --prompt \"$prompt\""
"$build/apps/keel" generate --connect "$connect" --verbose --prompt "$prompt" \
  "${sampling[@]}" >"$demo/reply" 2>"$demo/client.log" &
gen_pid=$!
cleanup_pids+=("$gen_pid")
serving=""
for _ in $(seq 1 300); do
  serving=$(sed -n 's/^keel: session .* on node \([^ ]*\) at .*/\1/p' "$demo/client.log")
  [ -n "$serving" ] && break
  kill -0 "$gen_pid" 2>/dev/null || break
  sleep 0.1
done
[ -n "$serving" ] || { cat "$demo/client.log"; echo "keel did not open a session" >&2; exit 1; }
grep '^keel: session' "$demo/client.log"
victim=""
for i in 0 1 2; do [ "${names[$i]}" = "$serving" ] && victim=$i; done
[ -n "$victim" ] || { echo "keel reports an unknown node: $serving" >&2; exit 1; }
# Kill once a hundred tokens are out, three quarters of the reply still to come.
tokens=0
for _ in $(seq 1 1500); do
  tokens=$(sed -n 's/^gen://p' "$demo/reply" | wc -w)
  [ "$tokens" -ge 100 ] && break
  kill -0 "$gen_pid" 2>/dev/null || break
  sleep 0.02
done
echo "after $tokens tokens: kill -KILL node $serving (pid ${pids[$victim]})"
kill -KILL "${pids[$victim]}"
wait "${pids[$victim]}" 2>/dev/null || true
status=0
wait "$gen_pid" || status=$?
grep '^keel: failover' "$demo/client.log" || true
cat "$demo/reply"
if [ "$status" -ne 0 ]; then
  cat "$demo/client.log"
  node_logs
  echo "the reply did not finish: keel exited with status $status" >&2
  exit 1
fi
failover_ms=$(sed -n 's/^keel: failover .* in \([0-9]*\) ms (resuming.*/\1/p' "$demo/client.log")
new_node=$(sed -n 's/^keel: failover .* to node \([^ ]*\) (through .*/\1/p' "$demo/client.log")
if [ -z "$failover_ms" ]; then
  cat "$demo/client.log"
  echo "the reply finished without a failover: the kill came too late" >&2
  exit 1
fi
# The reply must be the one a fault-free run gives (same model, prompt and seed).
"$build/apps/keel" generate --model "$demo_model" --prompt "$prompt" "${sampling[@]}" \
  --threads 1 >"$demo/expected"
if ! cmp -s "$demo/reply" "$demo/expected"; then
  echo "the reply differs from a fault-free run in this process:" >&2
  cat "$demo/expected" >&2
  exit 1
fi

echo
echo "=== The reply finished on node $new_node, the session's new owner; failover took $failover_ms ms ==="
echo "$(sed -n 's/^gen://p' "$demo/reply" | wc -w) tokens, the same as a fault-free run"
# Where the session went, as the surviving nodes tell it.
for i in 0 1 2; do
  [ "$i" -eq "$victim" ] || sed -n 's/^keel-node: \(.*took over session.*\)/node \1/p' \
    "$demo/${names[$i]}.log"
done

echo
echo "=== Stopping the cluster (SIGTERM) ==="
for i in 0 1 2; do
  [ "$i" -eq "$victim" ] && continue
  kill -TERM "${pids[$i]}"
  if wait "${pids[$i]}"; then
    echo "node ${names[$i]} stopped cleanly"
  else
    node_logs
    echo "node ${names[$i]} did not stop cleanly" >&2
    exit 1
  fi
done
cleanup_pids=()
