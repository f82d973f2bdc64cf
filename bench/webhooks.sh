#!/usr/bin/env bash
# Webhooks never slow calls (issue 19): `callgate load` echo round trips of N concurrent calls
# against `callgate serve --agent echo`, without webhooks and with one `[[webhooks]]` endpoint
# (every event) whose receiver never answers (it listens and never accepts: each attempt waits
# for the whole timeout, and the outbox grows), alternating within each round.
#
# Knobs (environment): BENCH_CALLS (500), BENCH_ROUNDS (3), BENCH_DURATION (20s), BENCH_OUT
# (a results dir: bench/results/webhooks-<stamp>), BENCH_CALLGATE (a callgate binary to use
# instead of building target/release/callgate). Writes the raw JSON to BENCH_OUT and prints a
# table (bench/webhooks.md keeps the figures of a run).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CALLS=${BENCH_CALLS:-500}
ROUNDS=${BENCH_ROUNDS:-3}
DURATION=${BENCH_DURATION:-20s}
OUT=${BENCH_OUT:-bench/results/webhooks-$(date -u +%Y%m%dT%H%M%SZ)}
PORT=4260
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ -n "${BENCH_CALLGATE:-}" ]; then
  CALLGATE=$(realpath "$BENCH_CALLGATE")
  echo "using $CALLGATE (BENCH_CALLGATE)"
else
  cargo build --release --locked -p callgate
  CALLGATE="$ROOT/target/release/callgate"
fi

# The receiver that never answers: a socket that listens and never accepts.
RECEIVER_PORT=4259
python3 -c "
import socket, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', $RECEIVER_PORT))
s.listen(4096)
while True:
    time.sleep(3600)
" &
export BENCH_WEBHOOK_SECRET="whsec_$(head -c 24 /dev/urandom | base64)"
cat >"$WORK/webhooks.toml" <<TOML
[[webhooks]]
url = "http://127.0.0.1:$RECEIVER_PORT/never"
events = ["*"]
secret_env = "BENCH_WEBHOOK_SECRET"
timeout = "10s"
TOML
: >"$WORK/none.toml"

run() { # variant round
  local variant=$1 round=$2
  rm -rf "$WORK/data"
  taskset -c 0 "$CALLGATE" serve --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$((PORT + 1))" \
    --data-dir "$WORK/data" --agent echo --max-calls 20000 --log warn \
    --config "$WORK/$variant.toml" 2>"$WORK/server.log" &
  local pid=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  taskset -c 1 "$CALLGATE" load --url "ws://127.0.0.1:$PORT/" --calls "$CALLS" --ramp 500 \
    --duration "$DURATION" --server-pid "$pid" --json >"$OUT/$variant-$round.json" 2>/dev/null || true
  curl -s "http://127.0.0.1:$((PORT + 1))/api/webhooks/deliveries?limit=1" >"$OUT/$variant-$round.outbox.json" || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  PORT=$((PORT + 2))
}

for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then order="none webhooks"; else order="webhooks none"; fi
  for variant in $order; do
    echo "round $round: $variant"
    run "$variant" "$round"
  done
done

python3 - "$OUT" "$ROUNDS" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
print("| round | webhooks | calls ok | p50 ms | p99 ms | max ms | lost | server CPU µs/frame | outbox pending after |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for r in range(1, rounds + 1):
    for v in ("none", "webhooks"):
        try:
            j = json.load(open(f"{out}/{v}-{r}.json"))
        except Exception as e:
            print(f"| {r} | {v} | (no report: {e}) |")
            continue
        try:
            pending = json.load(open(f"{out}/{v}-{r}.outbox.json"))["pending"]
        except Exception:
            pending = "?"
        rtt = j["rtt_ms"]
        cpu = (j.get("server") or {}).get("cpu_us_per_frame", "?")
        print(f"| {r} | {'never answers' if v == 'webhooks' else 'none'} | {j['calls_ok']} | "
              f"{rtt['p50']:.2f} | {rtt['p99']:.2f} | {rtt['max']:.1f} | {j['frames']['lost']} | "
              f"{cpu if isinstance(cpu, str) else f'{cpu:.1f}'} | {pending} |")
PY
