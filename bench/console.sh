#!/usr/bin/env bash
# The console at 1,000 live calls (issue 19 §4): how long the Live page's data takes to serve,
# how many events per second per call the stream carries, and what a watching console costs
# the calls.
#
# callgate (`serve --agent echo`) takes N concurrent inbound calls from `callgate load`
# (streaming audio, echo round trips timed). Two runs of the same load, back to back:
#   1. nobody watching;
#   2. a console watching: one event stream open (`GET /api/stream`, counted) and the Live
#      page's data (`GET /api/calls?live=true&limit=1000`) read every 0.5 s, its time to
#      serve measured on each read once every call is up.
# The echo round trip p50/p99 of both runs side by side is the cost to the calls.
#
# Knobs (environment): CONSOLE_CALLS (1000), CONSOLE_DURATION (40s of audio per call; keep it
# over the ramp (CALLS / 200 s) plus the 20 s read window),
# CONSOLE_CALLGATE (target/release/callgate, built when missing; a debug binary works too and
# is labelled so), CONSOLE_PORT (14590, and the next one for the admin API), CONSOLE_OUT
# (bench/CONSOLE.md), CONSOLE_MODE (echo: the calls stream audio
# and their echo is timed; silent: `load --mode playout` against the echo agent, calls that
# are up and quiet, for sizes a debug build cannot echo in real time: the Live data figures
# then stand alone and the cost table says n/a).
set -euo pipefail
cd "$(dirname "$0")/.."
CALLS=${CONSOLE_CALLS:-1000}
DURATION=${CONSOLE_DURATION:-40s}
CALLGATE=${CONSOLE_CALLGATE:-target/release/callgate}
OUT=${CONSOLE_OUT:-bench/CONSOLE.md}
MODE=${CONSOLE_MODE:-echo}
case "$MODE" in echo) LOAD_MODE=echo ;; silent) LOAD_MODE=playout ;; *) echo "CONSOLE_MODE: echo or silent" >&2; exit 64 ;; esac
PORT=${CONSOLE_PORT:-14590}
ADMIN="http://127.0.0.1:$((PORT + 1))"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ ! -x "$CALLGATE" ]; then
  echo "==> building (release)"
  cargo build --release --locked -p callgate
fi
build=release
case "$CALLGATE" in *debug*) build=debug ;; esac

# Waits until the server holds `$1` live calls (at most 60 s).
wait_live() {
  for _ in $(seq 600); do
    n=$(curl -sf "$ADMIN/healthz" | python3 -c 'import json,sys; print(json.load(sys.stdin)["live_calls"])' || echo 0)
    [ "$n" -ge "$1" ] && return 0
    sleep 0.1
  done
  echo "only $n of $1 calls came up" >&2
  return 1
}

run() { # $1: label; $2: watch (0/1)
  rm -rf "$WORK/data"
  "$CALLGATE" serve --agent echo --listen "127.0.0.1:$PORT" --admin-listen "127.0.0.1:$((PORT + 1))" \
    --data-dir "$WORK/data" --max-calls 5000 --log warn 2>"$WORK/server-$1.log" &
  SPID=$!
  for _ in $(seq 200); do curl -sf "$ADMIN/healthz" >/dev/null && break; sleep 0.1; done
  "$CALLGATE" load --url "ws://127.0.0.1:$PORT/" --calls "$CALLS" --ramp 200 --duration "$DURATION" \
    --protocol inbound --mode "$LOAD_MODE" --server-pid "$SPID" --json >"$WORK/load-$1.json" 2>"$WORK/load-$1.log" &
  LPID=$!
  if [ "$2" = 1 ]; then
    curl -sN "$ADMIN/api/stream" >"$WORK/stream.txt" &
    CPID=$!
    wait_live "$CALLS"
    # The Live page's data, every 0.5 s, for 20 s, once every call is up.
    : >"$WORK/live.txt"
    t0=$(date +%s.%N)
    events_before=$(grep -c '^event: call\.' "$WORK/stream.txt" || true)
    for _ in $(seq 40); do
      curl -s -o /dev/null -w '%{time_total} %{size_download} %{http_code}\n' \
        "$ADMIN/api/calls?live=true&limit=1000" >>"$WORK/live.txt"
      sleep 0.5
    done
    t1=$(date +%s.%N)
    events_window=$(( $(grep -c '^event: call\.' "$WORK/stream.txt" || true) - events_before ))
    echo "$t0 $t1 $events_window" >"$WORK/window.txt"
    # The page itself and one asset, cold.
    page=$(curl -s -o /dev/null -w '%{time_total} %{size_download}' "$ADMIN/")
    echo "$page" >"$WORK/page.txt"
  fi
  wait "$LPID" || echo "load: some calls failed (see the report)" >&2
  if [ "$2" = 1 ]; then
    kill "$CPID" 2>/dev/null || true
    wait "$CPID" 2>/dev/null || true
  fi
  kill "$SPID"
  wait "$SPID" 2>/dev/null || true
}

echo "==> $CALLS calls, nobody watching"
run quiet 0
echo "==> $CALLS calls, a console watching"
run watched 1

python3 - "$WORK" "$CALLS" "$build" "$OUT" "$DURATION" "$MODE" <<'PY'
import json, statistics, sys
work, calls, build, out, duration, mode = sys.argv[1:7]
calls = int(calls)
quiet = json.load(open(f"{work}/load-quiet.json"))
watched = json.load(open(f"{work}/load-watched.json"))
rows = [line.split() for line in open(f"{work}/live.txt") if line.strip()]
ms = sorted(float(r[0]) * 1000 for r in rows if r[2] == "200")
size = statistics.median(int(r[1]) for r in rows)
def pct(p):
    return ms[min(len(ms) - 1, int(round(p / 100 * (len(ms) - 1))))]
t0, t1, events = open(f"{work}/window.txt").read().split()
stream = open(f"{work}/stream.txt").read()
total_events = stream.count("\nevent: call.") + stream.startswith("event: call.")
window_s = float(t1) - float(t0)
page_s, page_bytes = open(f"{work}/page.txt").read().split()
lines = [
    "# The console at %d live calls" % calls,
    "",
    "Produced by `bench/console.sh` (%s build, 2 shared cores; the server and the load on the "
    "same machine). Each call lasts %s%s." % (build, duration,
        ", streaming audio the server echoes" if mode == "echo" else ", silent (`load --mode playout` against the echo agent)"),
    "",
    "## The Live page's data",
    "",
    "`GET /api/calls?live=true&limit=1000`, read every 0.5 s while all %d calls were up "
    "(%d reads, %.0f kB each):" % (calls, len(ms), size / 1000),
    "",
    "| p50 | p90 | max | budget |",
    "| --- | --- | --- | --- |",
    "| %.1f ms | %.1f ms | %.1f ms | 50 ms |" % (pct(50), pct(90), ms[-1]),
    "",
    "The page itself (`GET /`): %.1f ms, %s bytes." % (float(page_s) * 1000, page_bytes),
    "",
    "## The event stream",
    "",
    "%d call events during the %.0f s window with all %d calls up: %.3f events per second per "
    "call (%d events in the whole run: started, answered and ended of every call, and any "
    "DTMF or transcript turn)."
    % (int(events), window_s, calls, int(events) / window_s / calls, total_events),
    "",
    "## What watching costs the calls",
    "",
    "| run | calls ok | echo round trip p50 | p99 | p99.9 | server CPU |",
    "| --- | --- | --- | --- | --- | --- |",
]
for name, r in (("nobody watching", quiet), ("a console watching", watched)):
    rtt = r["rtt_ms"]
    if not rtt["samples"]:
        lines.append("| %s | %d/%d | n/a (silent calls) | | | |" % (name, r["calls_ok"], r["calls"]))
        continue
    cpu = r.get("server") or {}
    cpu_text = ", ".join("%s %s" % (k, round(v, 2) if isinstance(v, float) else v)
                         for k, v in cpu.items() if "cpu" in k)
    lines.append("| %s | %d/%d | %.2f ms | %.2f ms | %.2f ms | %s |"
                 % (name, r["calls_ok"], r["calls"], rtt["p50"], rtt["p99"], rtt["p999"], cpu_text))
lines.append("")
open(out, "w").write("\n".join(lines))
print("\n".join(lines))
PY
