#!/usr/bin/env bash
# User-space instructions per echoed frame, counted by valgrind's callgrind: a figure that a
# noisy, shared machine does not move (CPU time does). Each server runs twice under callgrind
# with 10 echo calls (`callgate load`, real time), for SHORT and LONG seconds; the difference
# divided by the difference in frames cancels start-up and shutdown.
#
# Usage: bench/instructions.sh [CALLGATE_BIN ...]   (default: target/release/callgate)
# Needs valgrind (Debian: apt-get install valgrind). Kernel time is not counted: this is the
# user-space share of the per-frame cost, to compare builds and servers, not total CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SHORT=${SHORT:-4}
LONG=${LONG:-12}
PORT=4174
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
cargo build --release --locked -p callgate >&2
(cd bench/peers/floor && CARGO_TARGET_DIR="$ROOT/target/bench-floor" cargo build --release --locked >&2)
LOAD="$ROOT/target/release/callgate"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT

count() { # name seconds cmd... -> "frames instructions"
  local name=$1 secs=$2
  shift 2
  valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.$name.$secs" "$@" >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  local frames
  frames=$("$LOAD" load --url "ws://127.0.0.1:$PORT/" --calls 10 --ramp 100 --duration "${secs}s" \
    --json 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["frames"]["received"])')
  kill -TERM "$pid"
  wait "$pid" 2>/dev/null || true
  echo "$frames $(awk '/^summary:/ {print $2}' "$WORK/cg.$name.$secs")"
}

per_frame() { # name cmd... -> instructions per frame
  local name=$1
  shift
  read -r f1 i1 < <(count "$name" "$SHORT" "$@")
  read -r f2 i2 < <(count "$name" "$LONG" "$@")
  python3 -c "print(round(($i2 - $i1) / ($f2 - $f1)))"
}

printf '| server | instructions per echoed frame |\n| --- | --- |\n'
floor=$(per_frame floor "$ROOT/target/bench-floor/release/callgate-bench-floor" "127.0.0.1:$PORT")
printf '| floor | %s |\n' "$floor"
for bin in "${@:-$ROOT/target/release/callgate}"; do
  rm -rf "$WORK/data"
  n=$(per_frame callgate "$bin" serve --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$((PORT + 1))" \
    --data-dir "$WORK/data" --agent echo --log warn)
  printf '| %s | %s (%.2fx the floor) |\n' "$bin" "$n" "$(python3 -c "print($n / $floor)")"
done
