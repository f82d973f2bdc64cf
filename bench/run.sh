#!/usr/bin/env bash
# Side-by-side benchmark: callgate vs the bare tokio-tungstenite floor vs a Node.js `ws` server
# vs a Python `websockets` server, all speaking the inbound flow with echo.
#
# The server under test is pinned to CPU 0 and `callgate load` to CPU 1. Servers alternate
# within each round, so a noisy machine hits them all alike; the stable figure is server CPU
# microseconds per echoed frame, compared as a ratio to the floor measured in the same run.
# Raw results go to bench/results/<stamp>/, the summary to bench/RESULTS.md.
#
# Knobs (environment): BENCH_SIZES ("100 500 1000"), BENCH_ROUNDS (2), BENCH_DURATION (20s),
# BENCH_CAPACITY ("250 500 1000 1500 2000 3000"), BENCH_SERVERS ("callgate floor node python"),
# BENCH_PLAYOUT ("100 500 1000": callgate --agent tone, load --mode playout),
# BENCH_SECTIONS ("fixed capacity playout"), BENCH_OUT (a results dir to add to).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${BENCH_OUT:-bench/results/$STAMP}
SECTIONS=${BENCH_SECTIONS:-"fixed capacity playout"}
PLAYOUT=${BENCH_PLAYOUT:-"100 500 1000"}
SIZES=${BENCH_SIZES:-"100 500 1000"}
ROUNDS=${BENCH_ROUNDS:-2}
DURATION=${BENCH_DURATION:-20s}
CAPACITY=${BENCH_CAPACITY:-"250 500 1000 1500 2000 3000"}
SERVERS=${BENCH_SERVERS:-"callgate floor node python"}
PORT=4160
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "==> building (release)"
cargo build --release --locked -p callgate
(cd bench/peers/floor && CARGO_TARGET_DIR="$ROOT/target/bench-floor" cargo build --release --locked)
(cd bench/peers/node && npm ci --no-audit --no-fund --silent)
if [ ! -x bench/peers/python/.venv/bin/python ]; then
  python3 -m venv bench/peers/python/.venv
fi
bench/peers/python/.venv/bin/pip install --quiet -r bench/peers/python/requirements.txt
LOAD="$ROOT/target/release/callgate"

start_server() { # name -> sets PID
  local name=$1
  case $name in
    callgate|callgate-tone)
      rm -rf "$WORK/data"
      local agent=echo
      [ "$name" = callgate-tone ] && agent=tone
      taskset -c 0 "$ROOT/target/release/callgate" serve --listen "127.0.0.1:$PORT" \
        --admin-listen "127.0.0.1:$((PORT + 1))" --data-dir "$WORK/data" --agent "$agent" \
        --max-calls 20000 --log warn 2>"$WORK/server.log" &
      ;;
    floor) taskset -c 0 "$ROOT/target/bench-floor/release/callgate-bench-floor" "127.0.0.1:$PORT" & ;;
    node) taskset -c 0 node bench/peers/node/server.js "127.0.0.1:$PORT" & ;;
    python) taskset -c 0 bench/peers/python/.venv/bin/python bench/peers/python/server.py "127.0.0.1:$PORT" & ;;
  esac
  PID=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "server $name did not start" >&2
  return 1
}

stop_server() {
  kill "$PID" 2>/dev/null || true
  wait "$PID" 2>/dev/null || true
  PORT=$((PORT + 2)) # a fresh port each time: no TIME_WAIT surprises
}

run_load() { # name calls duration out [mode]
  local name=$1 calls=$2 duration=$3 out=$4 mode=${5:-echo}
  start_server "$name"
  taskset -c 1 "$LOAD" load --url "ws://127.0.0.1:$PORT/" --calls "$calls" --ramp 500 \
    --duration "$duration" --server-pid "$PID" --mode "$mode" --json >"$out" 2>/dev/null || true
  stop_server
}

if [[ " $SECTIONS " == *" fixed "* ]]; then
echo "==> fixed sizes: $SIZES calls, $ROUNDS rounds, $DURATION each"
for round in $(seq "$ROUNDS"); do
  # Rotate the order every round so no server always runs first.
  order=$(echo $SERVERS | tr ' ' '\n' | awk -v r="$round" '{a[NR]=$0} END {for (i=0;i<NR;i++) print a[(i+r-1)%NR+1]}')
  for calls in $SIZES; do
    for name in $order; do
      echo "    round $round: $name x $calls"
      run_load "$name" "$calls" "$DURATION" "$OUT/fixed-$calls-$name-r$round.json"
    done
  done
done

fi

if [[ " $SECTIONS " == *" capacity "* ]]; then
echo "==> capacity: largest call count at p99 <= 20 ms with zero loss (10 s runs)"
for name in $SERVERS; do
  for calls in $CAPACITY; do
    echo "    $name x $calls"
    out="$OUT/capacity-$calls-$name.json"
    run_load "$name" "$calls" 10s "$out"
    if ! python3 bench/report.py --sustained "$out" "$calls"; then break; fi
  done
done

fi

if [[ " $SECTIONS " == *" playout "* ]]; then
echo "==> playout pacing: callgate --agent tone, load --mode playout, $DURATION each"
for calls in $PLAYOUT; do
  echo "    callgate-tone x $calls"
  run_load callgate-tone "$calls" "$DURATION" "$OUT/playout-$calls-callgate.json" playout
done
fi

python3 bench/report.py --write "$OUT" bench/RESULTS.md
echo "==> wrote bench/RESULTS.md (raw results in $OUT)"
