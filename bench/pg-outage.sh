#!/usr/bin/env bash
# PostgreSQL stopped during live calls, for real: one callgate node (`serve --agent echo`) on a
# PostgreSQL of its own (scripts/pg-test-server), CALLS echo calls kept live by `callgate load`
# for the whole run, and three probes of PROBE_CALLS new echo calls each (PROBE_S long): before
# the outage, during it (PostgreSQL stopped with `pg_ctl stop -m fast` for OUTAGE_S seconds:
# the probe's calls start and end while it is down), and after (once the store's journal is
# written). Reports each probe's echo round trip (p50/p99), the main load's calls dropped and
# frames lost, and then checks in PostgreSQL itself that every call's record is there once,
# ended by the caller, and that no event was written twice.
#
#   bench/pg-outage.sh                                   # 200 calls, a 30 s outage
#   CALLGATE_BIN=target/release/callgate bench/pg-outage.sh
#
# Knobs (environment): CALLGATE_BIN (default target/release/callgate, built if missing),
# CALLS (200), CALL_S (each main call, s: 110, longer than the whole outage sequence),
# PROBE_CALLS (20), PROBE_S (20), OUTAGE_S (30), PG_PORT (25452), OUT (logs and JSON; default a
# temporary directory). Ports: node 14543 (admin 14544). Exit status 0 only when nothing was
# dropped or lost and every record and event checks out.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${CALLGATE_BIN:-target/release/callgate}
CALLS=${CALLS:-200}
CALL_S=${CALL_S:-110}
PROBE_CALLS=${PROBE_CALLS:-20}
PROBE_S=${PROBE_S:-20}
OUTAGE_S=${OUTAGE_S:-30}
PG_PORT=${PG_PORT:-25452}
OUT=${OUT:-$(mktemp -d /tmp/callgate-pg-outage.XXXXXX)}
PSQL=/usr/lib/postgresql/15/bin/psql
CALL_PORT=14543
ADMIN_PORT=14544

command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
[[ $BIN = /* ]] || BIN=$ROOT/$BIN
if [[ ! -x $BIN ]]; then
    case $BIN in
        */target/release/callgate) cargo build --release -p callgate ;;
        *) cargo build -p callgate ;;
    esac
fi
mkdir -p "$OUT/node"
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/timeline.txt"; }

NODE_PID=""
LOAD_PID=""
PG_DIR=""
# Stops what this script started, by pid, whatever happened.
cleanup() {
    for p in "$LOAD_PID" "$NODE_PID"; do
        if [[ -n $p ]] && kill -0 "$p" 2>/dev/null; then kill -INT "$p" 2>/dev/null || true; fi
    done
    wait 2>/dev/null || true
    if [[ -n $PG_DIR ]]; then scripts/pg-test-server stop "$PG_DIR" || true; fi
}
trap cleanup EXIT

eval "$(scripts/pg-test-server start "$PG_PORT")"
PG_DIR=$CALLGATE_TEST_PG_DIR
URL=$CALLGATE_TEST_PG
log "PostgreSQL on port $PG_PORT ($PG_DIR)"

metric() {
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/metrics" 2>/dev/null \
        | awk -v m="$1" '$1==m {print $2}' | head -n 1
}

"$BIN" serve --agent echo --listen "127.0.0.1:$CALL_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --data-dir "$OUT/node" --store-url "$URL" --node-id outage --max-calls 5000 \
    >>"$OUT/node.log" 2>&1 &
NODE_PID=$!
for _ in $(seq 1 300); do
    curl -fsS "http://127.0.0.1:$ADMIN_PORT/readyz" >/dev/null 2>&1 && break
    kill -0 "$NODE_PID" 2>/dev/null || { echo "the node did not start: see $OUT/node.log" >&2; exit 1; }
    sleep 0.1
done
log "node ready (pid $NODE_PID)"

"$BIN" load --url "ws://127.0.0.1:$CALL_PORT/" --calls "$CALLS" --ramp 50 --duration "${CALL_S}s" \
    --id-prefix main --server-pid "$NODE_PID" --json >"$OUT/main.json" 2>"$OUT/main.log" &
LOAD_PID=$!
sleep "$(python3 -c "print(int($CALLS / 50) + 2)")"
log "main load running (pid $LOAD_PID): $CALLS calls of ${CALL_S}s"

probe() {
    "$BIN" load --url "ws://127.0.0.1:$CALL_PORT/" --calls "$PROBE_CALLS" --ramp 0 \
        --duration "${PROBE_S}s" --id-prefix "$1" --json >"$OUT/probe-$1.json" 2>"$OUT/probe-$1.log"
}

probe before
log "probe before: done"
t_stop=$(date +%s.%N)
scripts/pg-test-server pause "$PG_DIR"
log "PostgreSQL stopped"
probe during
log "probe during: done (journaled batches so far: $(metric callgate_store_journaled_batches_total))"
rest=$(python3 -c "print(max(0.0, $OUTAGE_S - ($(date +%s.%N) - $t_stop)))")
sleep "$rest"
scripts/pg-test-server resume "$PG_DIR"
t_back=$(date +%s.%N)
log "PostgreSQL started again after $(python3 -c "print(f'{$t_back - $t_stop:.1f}')") s; backlog $(metric callgate_store_backlog)"
# The writer retries with backoff (up to 30 s): wait for the journal to be written.
for _ in $(seq 1 1200); do
    [[ $(metric callgate_store_backlog) == 0 ]] && break
    sleep 0.1
done
log "journal written $(python3 -c "print(f'{$(date +%s.%N) - $t_back:.1f}')") s after PostgreSQL was back"
probe after
log "probe after: done"

wait "$LOAD_PID" || true
LOAD_PID=""
log "main load finished"
for m in callgate_store_journaled_batches_total callgate_store_write_failures_total callgate_store_backlog; do
    echo "$m $(metric "$m")" >>"$OUT/metrics.txt"
done
# A clean stop writes everything and closes the store.
kill -TERM "$NODE_PID"
wait "$NODE_PID" || true
NODE_PID=""
log "node stopped"

"$PSQL" "$URL" -At -F ' ' -c "
  SELECT 'calls', count(*), count(*) FILTER (WHERE ended_at IS NULL),
         count(*) FILTER (WHERE end_reason = 'peer_hangup'), count(DISTINCT external_id) FROM calls;
  SELECT 'events', count(*), count(DISTINCT call_id) FROM call_events;
  SELECT 'events_twice', count(*) FROM (SELECT 1 FROM call_events
         GROUP BY call_id, kind, at, detail HAVING count(*) > 1) t;
  SELECT 'events_per_call', min(n), max(n) FROM (SELECT call_id, count(*) n FROM call_events GROUP BY call_id) t;
" >"$OUT/pg.txt"

python3 - "$OUT" "$CALLS" "$PROBE_CALLS" <<'EOF' | tee "$OUT/figures.txt"
import json, os, sys
out, calls, probe_calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
main = json.load(open(f"{out}/main.json"))
probes = {p: json.load(open(f"{out}/probe-{p}.json")) for p in ("before", "during", "after")}
pg = {l.split()[0]: l.split()[1:] for l in open(f"{out}/pg.txt") if l.strip()}
metrics = dict(l.split() for l in open(f"{out}/metrics.txt") if len(l.split()) == 2)
ok = True
def row(name, r):
    f = r["frames"]
    return (f"{name:<16} calls {r['calls']:>4} ok {r['calls_ok']:>4} dropped {r['calls_dropped']} "
            f"refused {r['calls_refused']}  rtt ms p50 {r['rtt_ms']['p50']:.2f} p99 {r['rtt_ms']['p99']:.2f} "
            f"max {r['rtt_ms']['max']:.2f}  frames lost {f['lost']}")
print(row("main (all along)", main))
for p, r in probes.items():
    print(row(f"probe {p}", r))
    ok &= r["calls_ok"] == r["calls"] == probe_calls and r["frames"]["lost"] == 0
ok &= main["calls_ok"] == main["calls"] == calls and main["frames"]["lost"] == 0
if main.get("server"):
    s = main["server"]
    print(f"server           cpu {s['cpu_s']:.1f} s ({s['cpu_share']*100:.0f}% of a core), "
          f"{s['cpu_us_per_frame']:.1f} us per frame")
print(f"generator        late frames {main['sender'].get('late_frames', '?')}, fell behind {main['sender'].get('fell_behind', '?')}")
print("store metrics   ", ", ".join(f"{k} {v}" for k, v in metrics.items()))
total, open_, peer, distinct = map(int, pg["calls"])
events, with_events = map(int, pg["events"])
twice = int(pg["events_twice"][0])
per = pg.get("events_per_call", ["?", "?"])
want = calls + 3 * probe_calls
print(f"records          {total} (want {want}), open {open_}, peer_hangup {peer}, distinct ids {distinct}")
print(f"events           {events} in {with_events} calls ({per[0]}..{per[1]} per call), written twice {twice}")
journal = os.path.join(out, "node", "store-journal.jsonl")
left = os.path.getsize(journal) if os.path.exists(journal) else 0
print(f"journal left     {left} bytes")
ok &= total == want == distinct == peer and open_ == 0 and twice == 0 and left == 0
ok &= float(metrics.get("callgate_store_write_failures_total", "1")) == 0
ok &= float(metrics.get("callgate_store_journaled_batches_total", "0")) > 0
print("RESULT           " + ("PASS" if ok else "FAIL"))
sys.exit(0 if ok else 1)
EOF
