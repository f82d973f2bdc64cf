#!/usr/bin/env bash
# Side-by-side benchmark: callgate vs the bare tokio-tungstenite floor vs a Node.js `ws` server
# vs a Python `websockets` server, all speaking the inbound flow with echo; then playout pacing:
# callgate --agent tone vs the pacing floor (the floor's --pace: a tokio interval writing frames).
#
# The server under test is pinned to CPU 0 and `callgate load` to CPU 1. Servers alternate
# within each round, so a noisy machine hits them all alike; the stable figure is server CPU
# microseconds per echoed frame, compared as a ratio to the floor measured in the same run.
# Raw results go to bench/results/<stamp>/, the summary to bench/RESULTS.md.
#
# Knobs (environment): BENCH_SIZES ("100 500 1000"), BENCH_ROUNDS (2), BENCH_DURATION (20s),
# BENCH_CAPACITY ("250 500 1000 1500 2000 3000"), BENCH_SERVERS ("callgate floor node python"),
# BENCH_PLAYOUT ("100 500 1000": load --mode playout against callgate --agent tone and the
# pacing floor, those of BENCH_SERVERS that can play), BENCH_SECTIONS ("fixed capacity playout"),
# BENCH_OUT (a results dir to add to), BENCH_SUMMARY (bench/RESULTS.md), BENCH_CALLGATE (a
# callgate binary to use instead of building target/release/callgate: for smoke runs only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${BENCH_OUT:-bench/results/$STAMP}
SUMMARY=${BENCH_SUMMARY:-bench/RESULTS.md}
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

has() { [[ " $SERVERS " == *" $1 "* ]]; }

echo "==> building (release)"
if [ -n "${BENCH_CALLGATE:-}" ]; then
  CALLGATE=$(realpath "$BENCH_CALLGATE")
  echo "    using $CALLGATE (BENCH_CALLGATE): not a release build of this tree"
else
  cargo build --release --locked -p callgate
  CALLGATE="$ROOT/target/release/callgate"
fi
(cd bench/peers/floor && CARGO_TARGET_DIR="$ROOT/target/bench-floor" cargo build --release --locked)
if has node; then (cd bench/peers/node && npm ci --no-audit --no-fund --silent); fi
if has python; then
  if [ ! -x bench/peers/python/.venv/bin/python ]; then
    python3 -m venv bench/peers/python/.venv
  fi
  bench/peers/python/.venv/bin/pip install --quiet -r bench/peers/python/requirements.txt
fi
LOAD="$CALLGATE"

start_server() { # name mode -> sets PID
  local name=$1 mode=$2
  case $name in
    callgate)
      rm -rf "$WORK/data"
      local agent=echo
      [ "$mode" = playout ] && agent=tone
      taskset -c 0 "$CALLGATE" serve --listen "127.0.0.1:$PORT" \
        --admin-listen "127.0.0.1:$((PORT + 1))" --data-dir "$WORK/data" --agent "$agent" \
        --max-calls 20000 --log warn 2>"$WORK/server.log" &
      ;;
    floor)
      local pace=()
      [ "$mode" = playout ] && pace=(--pace)
      taskset -c 0 "$ROOT/target/bench-floor/release/callgate-bench-floor" "127.0.0.1:$PORT" \
        "${pace[@]}" &
      ;;
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
  start_server "$name" "$mode"
  taskset -c 1 "$LOAD" load --url "ws://127.0.0.1:$PORT/" --calls "$calls" --ramp 500 \
    --duration "$duration" --server-pid "$PID" --mode "$mode" --json >"$out" 2>/dev/null || true
  stop_server
}

rotate() { # round names... -> the names, rotated by round - 1 (no server always runs first)
  local round=$1
  shift
  echo "$@" | tr ' ' '\n' | awk -v r="$round" '{a[NR]=$0} END {for (i=0;i<NR;i++) print a[(i+r-1)%NR+1]}'
}

if [[ " $SECTIONS " == *" fixed "* ]]; then
echo "==> fixed sizes: $SIZES calls, $ROUNDS rounds, $DURATION each"
for round in $(seq "$ROUNDS"); do
  order=$(rotate "$round" $SERVERS)
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
# callgate plays through --agent tone, the floor through --pace; node and python do not play.
PLAYERS=""
for name in callgate floor; do
  if has "$name"; then PLAYERS="$PLAYERS $name"; fi
done
echo "==> playout pacing:$PLAYERS x $PLAYOUT calls, $ROUNDS rounds, $DURATION each"
for round in $(seq "$ROUNDS"); do
  order=$(rotate "$round" $PLAYERS)
  for calls in $PLAYOUT; do
    for name in $order; do
      echo "    round $round: $name x $calls"
      run_load "$name" "$calls" "$DURATION" "$OUT/playout-$calls-$name-r$round.json" playout
    done
  done
done
fi

python3 bench/report.py --write "$OUT" "$SUMMARY"
echo "==> wrote $SUMMARY (raw results in $OUT)"
