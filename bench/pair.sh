#!/usr/bin/env bash
# Paired A/B of two callgate builds: both serve at the same time on CPU 0, each with its own
# `callgate load` (PAIR_CALLS echo calls) on CPU 1, so whatever else the machine does hits both
# alike. Prints, per round, each build's server CPU microseconds per echoed frame and B/A; the
# order of the two servers' start alternates between rounds. Two runs of the same binary give
# the method's own spread (about ±2% on the 2-core machine).
#
# Usage: bench/pair.sh A_BINARY B_BINARY
# Knobs: PAIR_CALLS (500 each), PAIR_DURATION (20, seconds), PAIR_ROUNDS (3), PAIR_OUT (a
# directory for the raw JSON; default a temporary one).
set -euo pipefail
A=$(realpath "$1")
B=$(realpath "$2")
CALLS=${PAIR_CALLS:-500}
DURATION=${PAIR_DURATION:-20}
ROUNDS=${PAIR_ROUNDS:-3}
OUT=${PAIR_OUT:-$(mktemp -d)}
PORT=4800
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

serve() { # binary port data-dir
  taskset -c 0 "$1" serve --listen "127.0.0.1:$2" --admin-listen "127.0.0.1:$(($2 + 1))" \
    --data-dir "$3" --agent echo --max-calls 20000 --log warn 2>/dev/null &
}

for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) = 1 ]; then
    serve "$A" "$PORT" "$WORK/a-$round"; pa=$!
    serve "$B" $((PORT + 2)) "$WORK/b-$round"; pb=$!
  else
    serve "$B" $((PORT + 2)) "$WORK/b-$round"; pb=$!
    serve "$A" "$PORT" "$WORK/a-$round"; pa=$!
  fi
  for port in "$PORT" $((PORT + 2)); do
    for _ in $(seq 100); do
      if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
      sleep 0.1
    done
  done
  taskset -c 1 "$A" load --url "ws://127.0.0.1:$PORT/" --calls "$CALLS" --ramp 500 \
    --duration "${DURATION}s" --server-pid "$pa" --json >"$OUT/a-r$round.json" 2>/dev/null &
  la=$!
  taskset -c 1 "$A" load --url "ws://127.0.0.1:$((PORT + 2))/" --calls "$CALLS" --ramp 500 \
    --duration "${DURATION}s" --server-pid "$pb" --json >"$OUT/b-r$round.json" 2>/dev/null &
  lb=$!
  wait "$la" "$lb" || true
  kill "$pa" "$pb" 2>/dev/null || true
  wait "$pa" "$pb" 2>/dev/null || true
  PORT=$((PORT + 4))
  python3 - "$OUT" "$round" <<'PY'
import json, sys
out, r = sys.argv[1], sys.argv[2]
a = json.load(open(f"{out}/a-r{r}.json"))
b = json.load(open(f"{out}/b-r{r}.json"))
ca, cb = a["server"]["cpu_us_per_frame"], b["server"]["cpu_us_per_frame"]
behind = a["sender"]["fell_behind"] or b["sender"]["fell_behind"]
print(f"round {r}: A {ca:.2f} µs/frame, B {cb:.2f}, B/A {cb / ca:.3f}"
      + ("  (a generator fell behind)" if behind else ""))
PY
done
echo "raw results in $OUT"
