#!/usr/bin/env bash
# A rolling restart under load, for real: two callgate nodes behind HAProxy (deploy/haproxy.cfg,
# unchanged), `callgate load --for` keeping CALLS echo calls live through HAProxy, and meanwhile
# node A drained with SIGTERM, started again once it has exited, then the same for node B.
# Reports calls refused and dropped, frames lost, and checks every record on both nodes: each
# call ended by the caller (peer_hangup), none open, none twice.
#
#   bench/rolling-restart.sh                      # 100 calls of 60 s for 4 minutes
#   CALLS=200 DURATION=60s FOR=5m bench/rolling-restart.sh
#   CALLS=20 DURATION=5s FOR=40s SETTLE=5 bench/rolling-restart.sh   # the short version (CI)
#
#   STORE_URL=postgres://... bench/rolling-restart.sh   # both nodes on one PostgreSQL (a cluster)
#
# Knobs (environment): CALLGATE_BIN (default target/debug/callgate, built if missing),
# STORE_URL (unset: each node its own SQLite; set: both nodes share that PostgreSQL store, as
# node ids `a` and `b`, and the records are read through one node's API, which serves them all),
# CALLS, DURATION (each call), FOR (the load's total), RAMP (calls per second), SETTLE (seconds
# between a restarted node being ready and the next drain), BURST (calls placed at once right
# after each SIGTERM, default 20), ROLL (0: no restart at all, the control run), OUT (where logs and the JSON
# report go; default a temporary directory), SUMMARY (a file to append the figures to).
# Ports (fixed, below 32768, as in deploy/haproxy.cfg): HAProxy 14143, stats 14404; node A
# 14243 (admin 14244), node B 14343 (admin 14344). Exit status 0 only when nothing was refused
# or dropped, no frame was lost and every record checks out.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
BIN=${CALLGATE_BIN:-target/debug/callgate}
CALLS=${CALLS:-100}
DURATION=${DURATION:-60s}
FOR=${FOR:-4m}
RAMP=${RAMP:-20}
SETTLE=${SETTLE:-20}
BURST=${BURST:-20}
ROLL=${ROLL:-1}
OUT=${OUT:-$(mktemp -d /tmp/callgate-rolling.XXXXXX)}
SUMMARY=${SUMMARY:-}
HAPROXY_CFG=$ROOT/deploy/haproxy.cfg

command -v haproxy >/dev/null || { echo "haproxy is not installed (apt-get install haproxy)" >&2; exit 1; }
command -v curl >/dev/null || { echo "curl is needed" >&2; exit 1; }
[[ $BIN = /* ]] || BIN=$ROOT/$BIN
if [[ ! -x $BIN ]]; then
    case $BIN in
        */target/release/callgate) cargo build --release -p callgate ;;
        *) cargo build -p callgate ;;
    esac
fi
mkdir -p "$OUT/a" "$OUT/b"
log() { printf '%s %s\n' "$(date -u +%H:%M:%S)" "$*" | tee -a "$OUT/timeline.txt"; }

declare -A PID CALL_PORT ADMIN_PORT
CALL_PORT[a]=14243; ADMIN_PORT[a]=14244
CALL_PORT[b]=14343; ADMIN_PORT[b]=14344
HAPROXY_PID=""
LOAD_PID=""

# Stops what this script started, by pid, whatever happened.
# (SIGINT ends a callgate node's calls now; HAProxy stops on SIGTERM.)
cleanup() {
    for p in "$LOAD_PID" "${PID[a]:-}" "${PID[b]:-}"; do
        if [[ -n $p ]] && kill -0 "$p" 2>/dev/null; then
            kill -INT "$p" 2>/dev/null || true
        fi
    done
    if [[ -n $HAPROXY_PID ]] && kill -0 "$HAPROXY_PID" 2>/dev/null; then
        kill -TERM "$HAPROXY_PID" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
}
trap cleanup EXIT

start_node() {
    local n=$1
    "$BIN" serve --agent echo \
        --listen "127.0.0.1:${CALL_PORT[$n]}" --admin-listen "127.0.0.1:${ADMIN_PORT[$n]}" \
        --data-dir "$OUT/$n" --max-calls 5000 \
        ${STORE_URL:+--store-url "$STORE_URL" --node-id "$n"} \
        >>"$OUT/$n.log" 2>&1 &
    PID[$n]=$!
    # Ready when /readyz says so (a bench script may poll: nothing here is asserted on time).
    for _ in $(seq 1 300); do
        if curl -fsS "http://127.0.0.1:${ADMIN_PORT[$n]}/readyz" >/dev/null 2>&1; then
            log "node $n ready (pid ${PID[$n]})"
            return 0
        fi
        kill -0 "${PID[$n]}" 2>/dev/null || { echo "node $n did not start: see $OUT/$n.log" >&2; exit 1; }
        sleep 0.1
    done
    echo "node $n never became ready" >&2
    exit 1
}

live_calls() {
    curl -fsS "http://127.0.0.1:${ADMIN_PORT[$1]}/healthz" 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["live_calls"])' 2>/dev/null \
        || echo "?"
}

# The node's audio-loss counters (stalls of its call tasks drop late audio by design; an agent
# too slow for its queue loses frames), kept per node lifetime: the last copy read before it
# exited counts.
snapshot_metrics() {
    local n=$1 file=$2
    curl -fsS "http://127.0.0.1:${ADMIN_PORT[$n]}/metrics" 2>/dev/null \
        | grep -E '^callgate_(playout_stalls_total|playout_stall_dropped_seconds_total|agent_audio_dropped_frames_total) ' \
        >"$file.tmp" && mv "$file.tmp" "$file" || true
}
LIFE=0

# SIGTERM, then wait for the node to exit by itself; prints its exit status and how long.
# Right after the signal, a burst of BURST short calls goes through HAProxy at once: HAProxy's
# health check has not noticed the drain yet, so some reach the draining node, get its 503 and
# must be retried on the other node (counted in the node's "Drained" log line).
drain_node() {
    local n=$1
    local before
    before=$(live_calls "$n")
    log "node $n: SIGTERM with $before live calls"
    local t0
    t0=$(date +%s.%N)
    LIFE=$((LIFE + 1))
    local metrics="$OUT/metrics-$n-$LIFE.txt"
    snapshot_metrics "$n" "$metrics"
    kill -TERM "${PID[$n]}"
    # Read the counters once a second while it drains (it answers until it exits).
    ( while kill -0 "${PID[$n]}" 2>/dev/null; do snapshot_metrics "$n" "$metrics"; sleep 1; done ) &
    "$BIN" load --url ws://127.0.0.1:14143/ --calls "$BURST" --ramp 0 --duration 2s --id-prefix "burst-$n" \
        --json >"$OUT/burst-$n.json" 2>"$OUT/burst-$n.log" || true
    log "node $n: burst of $BURST calls through HAProxy placed"
    local status=0
    wait "${PID[$n]}" || status=$?
    local t1
    t1=$(date +%s.%N)
    log "node $n: exited with status $status after $(python3 -c "print(f'{$t1-$t0:.1f}')") s"
    echo "$n $before $status $(python3 -c "print(f'{$t1-$t0:.1f}')")" >>"$OUT/drains.txt"
    PID[$n]=""
    [[ $status == 0 ]] || { echo "node $n exited with $status" >&2; exit 1; }
}

log "binary $BIN; calls $CALLS of $DURATION for $FOR, ramp $RAMP/s; output in $OUT"
start_node a
start_node b
haproxy -db -f "$HAPROXY_CFG" >>"$OUT/haproxy.log" 2>&1 &
HAPROXY_PID=$!
for _ in $(seq 1 100); do
    curl -fsS http://127.0.0.1:14404/ >/dev/null 2>&1 && break
    kill -0 "$HAPROXY_PID" 2>/dev/null || { echo "haproxy did not start: see $OUT/haproxy.log" >&2; exit 1; }
    sleep 0.1
done
# Both servers UP in HAProxy before the load starts (rise 2 checks of 1 s).
for _ in $(seq 1 100); do
    up=$(curl -fsS "http://127.0.0.1:14404/;csv" 2>/dev/null | awk -F, '$1=="callgate" && ($2=="a"||$2=="b") && $18=="UP"' | wc -l)
    [[ $up == 2 ]] && break
    sleep 0.2
done
log "haproxy up (pid $HAPROXY_PID), both nodes UP"

"$BIN" load --url ws://127.0.0.1:14143/ --calls "$CALLS" --duration "$DURATION" \
    --for "$FOR" --ramp "$RAMP" --json >"$OUT/load.json" 2>"$OUT/load.log" &
LOAD_PID=$!
ramp_s=$(python3 -c "print(int($CALLS / $RAMP) + 1)")
sleep "$ramp_s"
log "load running (pid $LOAD_PID): $(live_calls a) calls on a, $(live_calls b) on b"

if [[ $ROLL == 1 ]]; then
    sleep "$SETTLE"
    drain_node a
    start_node a
    sleep "$SETTLE"
    log "before draining b: $(live_calls a) calls on a, $(live_calls b) on b"
    drain_node b
    start_node b
    log "rolling restart done; waiting for the load to finish"
else
    : >"$OUT/drains.txt"
    log "ROLL=0: no restart (the control run); waiting for the load to finish"
fi

load_status=0
wait "$LOAD_PID" || load_status=$?
LOAD_PID=""
log "load finished with status $load_status"
snapshot_metrics a "$OUT/metrics-a-end.txt"
snapshot_metrics b "$OUT/metrics-b-end.txt"

# Every record of both nodes (paged), checked against the load's own count.
python3 - "$OUT" "${STORE_URL:+shared}" "${ADMIN_PORT[a]}" "${ADMIN_PORT[b]}" <<'EOF' | tee "$OUT/figures.txt"
import json, sys, urllib.request
out, shared, ports = sys.argv[1], sys.argv[2] == "shared", sys.argv[3:]
# One shared store: any node's API lists every call of the cluster, each with its `node`.
read_from = ports[:1] if shared else ports
import glob
report = json.load(open(f"{out}/load.json"))
bursts = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/burst-*.json"))]
records = []
for port in read_from:
    before = None
    while True:
        url = f"http://127.0.0.1:{port}/api/calls?limit=1000" + (f"&before={before}" if before else "")
        page = json.load(urllib.request.urlopen(url))
        records += [r if shared else dict(r, node=port) for r in page["calls"]]
        before = page["next"]
        if not before:
            break
# Every call has its own external id (load-N, burst-a-N, burst-b-N): two records of one id
# would be a call recorded twice (say, replayed on the other node after its answer).
ids = [r["external_id"] for r in records]
twice = len(ids) - len(set(ids))
reasons = {}
for r in records:
    reasons[r["end_reason"] or "open"] = reasons.get(r["end_reason"] or "open", 0) + 1
nodes = ["a", "b"] if shared else ports
per_node = {p: sum(1 for r in records if r["node"] == p) for p in nodes}
drains = [line.split() for line in open(f"{out}/drains.txt")]
f = report["frames"]
print(f"calls placed      {report['calls']}")
print(f"calls ok          {report['calls_ok']}")
print(f"calls refused     {report['calls_refused']}")
print(f"calls dropped     {report['calls_dropped']}")
print(f"failures          {report['calls_failed']}")
print(f"frames            {f['sent']} sent, {f['received']} echoed, {f['lost']} lost, {f['corrupt']} corrupt")
print(f"round trip ms     p50 {report['rtt_ms']['p50']:.2f} p99 {report['rtt_ms']['p99']:.2f} max {report['rtt_ms']['max']:.2f}")
print(f"most at once      {report['max_concurrent']}")
behind = report['sender']['fell_behind']
print(f"generator         {report['sender']['late_frames']} late frames ({report['sender']['late_share']:.2%}), "
      f"{report['sender']['cpu_share']:.0%} of a core" + ("  FELL BEHIND: the machine, not the restart, is measured" if behind else ""))
import re
for n, live, status, secs in drains:
    refused = re.findall(r"Drained: no call left; stopping\. .*refused_draining=(\d+)", open(f"{out}/{n}.log").read())
    print(f"drain of node {n}   {live} live calls at SIGTERM, exit status {status} after {secs} s, "
          f"{refused[0] if refused else '?'} upgrades answered 503 while draining (retried by HAProxy)")
for b in bursts:
    print(f"burst at SIGTERM  {b['calls']} calls at once: {b['calls_ok']} ok, {b['calls_refused']} refused, "
          f"{b['calls_dropped']} dropped, {b['frames']['lost']} frames lost")
placed = report["calls"] + sum(b["calls"] for b in bursts)
lost_audio = {}
for path in glob.glob(f"{out}/metrics-*.txt"):
    for line in open(path):
        name, value = line.split()
        lost_audio[name] = lost_audio.get(name, 0) + float(value)
print("server audio loss " + ", ".join(f"{k.removeprefix('callgate_')} {v:g}" for k, v in sorted(lost_audio.items())))
print(f"records           {len(records)} ({', '.join(f'{k}: {v}' for k, v in sorted(reasons.items()))}); "
      + (f"in the shared store, per node {per_node}" if shared else f"per admin port {per_node}"))
print(f"records twice     {twice}")
ok = (all(r["calls_refused"] == 0 and r["calls_dropped"] == 0 and r["frames"]["lost"] == 0
          and r["frames"]["corrupt"] == 0 for r in [report] + bursts)
      and len(records) == placed and reasons == {"peer_hangup": len(records)}
      and sum(per_node.values()) == len(records)
      and twice == 0)
print("RESULT            " + ("PASS: nothing refused or dropped, no frame lost, every record ended by the caller" if ok else "FAIL"))
sys.exit(0 if ok else 1)
EOF
result=${PIPESTATUS[0]}
if [[ -n $SUMMARY ]]; then
    { echo; echo "### $(date -u +%Y-%m-%dT%H:%MZ): $CALLS calls of $DURATION for $FOR ($BIN)"; echo; echo '```'; cat "$OUT/figures.txt"; echo '```'; } >>"$SUMMARY"
fi
exit "$result"
