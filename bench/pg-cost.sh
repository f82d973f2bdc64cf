#!/usr/bin/env bash
# What the PostgreSQL store costs against SQLite, side by side in one run: the same node
# (`serve --agent echo`) alternately on SQLite (its data dir) and on PostgreSQL (a server of
# this script's own, fsync on, as in production), ROUNDS times each in alternating order (so a
# machine whose load drifts hurts both alike). Each run measures:
#   set-up: SETUP_CALLS slots re-dialling calls of 100 ms for SETUP_FOR (`load --for`): calls
#           set up per second, the answer time, and the server's CPU per call;
#   echo:   ECHO_CALLS calls of ECHO_S streaming 20 ms frames: the server's CPU per frame and
#           the round trip.
# The machine may be shared: compare the two columns of one run (ratios), not runs. All calls
# come from one address: the node's per-address budget of pending connections is raised
# (--max-pending-per-ip 1000), or many slots re-dialling at once would be turned away (503).
#
#   bench/pg-cost.sh                                     # 2 rounds
#   CALLGATE_BIN=target/release/callgate ROUNDS=3 bench/pg-cost.sh
#
# Knobs: CALLGATE_BIN (default target/release/callgate), ROUNDS (2), SETUP_CALLS (50), SETUP_FOR
# (30s), ECHO_CALLS (200), ECHO_S (20), PG_PORT (25462), OUT. Ports: node 14643 (admin 14644).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${CALLGATE_BIN:-target/release/callgate}
ROUNDS=${ROUNDS:-2}
SETUP_CALLS=${SETUP_CALLS:-50}
SETUP_FOR=${SETUP_FOR:-30s}
ECHO_CALLS=${ECHO_CALLS:-200}
ECHO_S=${ECHO_S:-20}
PG_PORT=${PG_PORT:-25462}
OUT=${OUT:-$(mktemp -d /tmp/callgate-pg-cost.XXXXXX)}
PSQL=/usr/lib/postgresql/15/bin/psql
CALL_PORT=14643
ADMIN_PORT=14644

command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
[[ $BIN = /* ]] || BIN=$ROOT/$BIN
[[ -x $BIN ]] || cargo build --release -p callgate
mkdir -p "$OUT"
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/timeline.txt"; }

NODE_PID=""
LOAD_PID=""
PG_DIR=""
cleanup() {
    for p in "$LOAD_PID" "$NODE_PID"; do
        if [[ -n $p ]] && kill -0 "$p" 2>/dev/null; then kill -INT "$p" 2>/dev/null || true; fi
    done
    wait 2>/dev/null || true
    if [[ -n $PG_DIR ]]; then scripts/pg-test-server stop "$PG_DIR" || true; fi
}
trap cleanup EXIT

eval "$(PG_TEST_FSYNC=on scripts/pg-test-server start "$PG_PORT")"
PG_DIR=$CALLGATE_TEST_PG_DIR
log "PostgreSQL on port $PG_PORT, fsync on ($PG_DIR); output in $OUT"

# CPU seconds used so far by PostgreSQL: the postmaster and its children (the node's backends
# live as long as the node's connections, so a difference over one load counts them).
pg_cpu() {
    python3 - "$CALLGATE_TEST_PG_PID" <<'PY'
import os, sys
root, tick, total = sys.argv[1], os.sysconf("SC_CLK_TCK"), 0
for pid in os.listdir("/proc"):
    if not pid.isdigit():
        continue
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        continue
    fields = stat[stat.rfind(")") + 2:].split()
    if pid == root or fields[1] == root:
        total += int(fields[11]) + int(fields[12])
print(total / tick)
PY
}

# One run of both measurements on BACKEND (sqlite or pg), named RUN.
run() {
    local backend=$1 run=$2 store=()
    mkdir -p "$OUT/$run"
    if [[ $backend == pg ]]; then
        "$PSQL" "$CALLGATE_TEST_PG" -q -c "CREATE SCHEMA $run" >/dev/null
        store=(--store-url "$CALLGATE_TEST_PG&options=-csearch_path%3D$run")
    fi
    "$BIN" serve --agent echo --listen "127.0.0.1:$CALL_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
        --data-dir "$OUT/$run" --node-id "$run" --max-calls 5000 --max-pending-per-ip 1000 "${store[@]}" \
        >>"$OUT/$run.log" 2>&1 &
    NODE_PID=$!
    for _ in $(seq 1 300); do
        curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
        kill -0 "$NODE_PID" 2>/dev/null || { echo "node $run did not start: see $OUT/$run.log" >&2; exit 1; }
        sleep 0.1
    done
    local c0 c1 c2
    c0=$(pg_cpu)
    "$BIN" load --url "ws://127.0.0.1:$CALL_PORT/" --calls "$SETUP_CALLS" --ramp 0 --duration 100ms \
        --for "$SETUP_FOR" --id-prefix setup --server-pid "$NODE_PID" --json \
        >"$OUT/$run/setup.json" 2>"$OUT/$run/setup.log" || true
    c1=$(pg_cpu)
    "$BIN" load --url "ws://127.0.0.1:$CALL_PORT/" --calls "$ECHO_CALLS" --ramp 50 \
        --duration "${ECHO_S}s" --id-prefix echo --server-pid "$NODE_PID" --json \
        >"$OUT/$run/echo.json" 2>"$OUT/$run/echo.log" || true
    c2=$(pg_cpu)
    python3 -c "print($c1 - $c0, $c2 - $c1)" >"$OUT/$run/pg_cpu.txt"
    kill -TERM "$NODE_PID"
    wait "$NODE_PID" || true
    NODE_PID=""
    echo "$backend $run" >>"$OUT/runs.txt"
    log "run $run ($backend) done; load average $(cut -d' ' -f1-3 /proc/loadavg)"
}

for r in $(seq 1 "$ROUNDS"); do
    if (( r % 2 )); then order=(sqlite pg); else order=(pg sqlite); fi
    for b in "${order[@]}"; do run "$b" "r${r}_$b"; done
done

python3 - "$OUT" <<'EOF' | tee "$OUT/figures.txt"
import json, sys
out = sys.argv[1]
runs = [l.split() for l in open(f"{out}/runs.txt")]
rows = {}
for backend, run in runs:
    s = json.load(open(f"{out}/{run}/setup.json"))
    e = json.load(open(f"{out}/{run}/echo.json"))
    pg_setup, pg_echo = map(float, open(f"{out}/{run}/pg_cpu.txt").read().split())
    rows.setdefault(backend, []).append({
        "run": run,
        "setup_per_s": s["calls"] / (s.get("steady_for_s") or s["wall_s"]),
        "setup_failed": s["calls"] - s["calls_ok"],
        "answer_p50": s["answer_ms"]["p50"], "answer_p99": s["answer_ms"]["p99"],
        "cpu_ms_per_call": 1000 * s["server"]["cpu_s"] / max(1, s["calls"]),
        "pg_ms_per_call": 1000 * pg_setup / max(1, s["calls"]),
        "echo_us_per_frame": e["server"]["cpu_us_per_frame"],
        "pg_us_per_frame": 1e6 * pg_echo / max(1, e["frames"]["received"]),
        "rtt_p50": e["rtt_ms"]["p50"], "rtt_p99": e["rtt_ms"]["p99"],
        "echo_lost": e["frames"]["lost"], "echo_failed": e["calls"] - e["calls_ok"],
    })
keys = [("setup_per_s", "calls set up per second", "{:.0f}"),
        ("answer_p50", "answer time p50, ms", "{:.2f}"),
        ("answer_p99", "answer time p99, ms", "{:.2f}"),
        ("cpu_ms_per_call", "server CPU per call (set-up run), ms", "{:.2f}"),
        ("pg_ms_per_call", "PostgreSQL's CPU per call (set-up run), ms", "{:.2f}"),
        ("echo_us_per_frame", "server CPU per echoed frame, us", "{:.2f}"),
        ("pg_us_per_frame", "PostgreSQL's CPU per echoed frame, us", "{:.2f}"),
        ("rtt_p50", "echo round trip p50, ms", "{:.2f}"),
        ("rtt_p99", "echo round trip p99, ms", "{:.2f}"),
        ("setup_failed", "set-up calls failed", "{}"),
        ("echo_failed", "echo calls failed", "{}"),
        ("echo_lost", "echo frames lost", "{}")]
print("per run:")
for backend in ("sqlite", "pg"):
    for r in rows.get(backend, []):
        print(f"  {r['run']:<10} " + "  ".join(f"{k}={fmt.format(r[k])}" for k, _, fmt in keys))
print()
print(f"{'mean of the runs':<44} {'SQLite':>10} {'PostgreSQL':>11} {'PG/SQLite':>10}")
for k, name, fmt in keys:
    a = sum(r[k] for r in rows["sqlite"]) / len(rows["sqlite"])
    b = sum(r[k] for r in rows["pg"]) / len(rows["pg"])
    ratio = f"{b / a:.2f}" if a else "-"
    print(f"{name:<44} {fmt.format(a):>10} {fmt.format(b):>11} {ratio:>10}")
EOF
