#!/usr/bin/env bash
# The bridge agent's cost: inbound calls (μ-law 8 kHz, so the echo is byte-exact and every
# frame's stamp survives) placed by `callgate load`, answered by callgate (release) either with
# the `echo` agent or with a `bridge` route to a Rust Twilio echo bot
# (crates/callgate-testkit/examples/twilio-echo-bot.rs), side by side in one run: for each size,
# echo then bridge, so the ratio is measured on the same machine state.
#
# Figures: callgate's CPU µs per echoed frame (from /proc, via `load --server-pid`), the bridge's
# ratio to the echo agent's, callgate's RSS per call, frames lost, round trips; the bot's own
# CPU per frame beside it (it is the user's process, not callgate's). callgate is pinned to CPU 0,
# the load generator and the bot to CPU 1. Results: bench/BRIDGE.md.
#
# Knobs (environment): BR_SIZES ("100 500"), BR_DURATION (20s), BR_OUT (bench/BRIDGE.md),
# BR_BUILD (1; 0 uses the release binaries already built), BR_BIN_DIR (target/release: where
# the binaries are; BR_BOT: the bot, if elsewhere), BR_BOT_CPU (1: the bot shares the load generator's core; 0: callgate's),
# BR_PERF (0; 1: `perf stat -e task-clock,context-switches` on callgate during the load, per
# frame in the table), BR_STRACE (0; 1: `strace -c -f` on callgate during the load, syscalls
# per frame in the table; strace slows callgate down, so its runs' CPU figures are not the
# ones to quote), BR_RECORD (0; 1: `perf record -e cpu-clock` on callgate during the load, a
# flat profile per run in BR_PROFILE_DIR (/tmp): `perf report -i FILE --no-children`).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${BR_SIZES:-"100 500"}
DURATION=${BR_DURATION:-20s}
OUT=${BR_OUT:-bench/BRIDGE.md}
RAW=bench/results/bridge-$(date -u +%Y%m%dT%H%M%SZ)
PORT=4180
BOT_CPU=${BR_BOT_CPU:-1}
mkdir -p "$RAW"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

if [ "${BR_BUILD:-1}" = 1 ]; then
  echo "==> building (release)"
  # One invocation: the two packages share one feature set, so nothing is built twice.
  cargo build --release --locked -p callgate -p callgate-testkit --bin callgate \
    --example twilio-echo-bot
fi
BIN_DIR=${BR_BIN_DIR:-target/release}
CALLGATE=$BIN_DIR/callgate
BOT=${BR_BOT:-$BIN_DIR/examples/twilio-echo-bot}
PERF=${BR_PERF:-0}
STRACE=${BR_STRACE:-0}
RECORD=${BR_RECORD:-0}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

rows=()
for n in $SIZES; do
  for agent in echo bridge; do
    echo "==> $n calls, $agent"
    BPID=""
    if [ "$agent" = bridge ]; then
      taskset -c "$BOT_CPU" "$BOT" >"$WORK/bot.out" 2>"$WORK/bot.log" &
      BPID=$!
      for _ in $(seq 100); do grep -q listening "$WORK/bot.out" && break; sleep 0.1; done
      BOT_PORT=$(awk '/listening/ {print $2}' "$WORK/bot.out")
      cat >"$WORK/routes.toml" <<TOML
[[routes]]
name = "bot"
agent = "bridge"
[routes.settings]
url = "ws://127.0.0.1:$BOT_PORT/"
fallback = "hangup"
TOML
    else
      cat >"$WORK/routes.toml" <<TOML
[[routes]]
name = "echo"
agent = "echo"
TOML
    fi
    rm -rf "$WORK/data"
    taskset -c 0 "$CALLGATE" serve --config "$WORK/routes.toml" --listen "127.0.0.1:$PORT" \
      --admin-listen "127.0.0.1:$((PORT + 1))" --data-dir "$WORK/data" --max-calls 5000 \
      --inbound-audio-format ULAW_8000 --log warn 2>"$WORK/server.log" &
    SPID=$!
    for _ in $(seq 200); do
      curl -sf "http://127.0.0.1:$((PORT + 1))/healthz" >/dev/null && break
      sleep 0.1
    done
    bot_before=0
    [ -n "$BPID" ] && bot_before=$(cpu_ticks "$BPID")
    PPID_STAT=""
    SPID_TRACE=""
    : >"$WORK/perf-$n-$agent.txt"
    : >"$WORK/strace-$n-$agent.txt"
    if [ "$PERF" = 1 ]; then
      perf stat -e task-clock,context-switches -x, -o "$WORK/perf-$n-$agent.txt" -p "$SPID" &
      PPID_STAT=$!
    fi
    if [ "$RECORD" = 1 ]; then
      perf record -q -e cpu-clock -F 1999 -o "${BR_PROFILE_DIR:-/tmp}/profile-$n-$agent.data" \
        -p "$SPID" 2>/dev/null &
      PPID_STAT="$PPID_STAT $!"
    fi
    if [ "$STRACE" = 1 ]; then
      strace -c -f -qq -o "$WORK/strace-$n-$agent.txt" -p "$SPID" &
      SPID_TRACE=$!
      sleep 0.5
    fi
    taskset -c 1 "$CALLGATE" load --url "ws://127.0.0.1:$PORT/" --calls "$n" --ramp 100 \
      --duration "$DURATION" --protocol inbound --format ULAW_8000 --server-pid "$SPID" --json \
      >"$WORK/load-$n-$agent.json" 2>/dev/null || true
    for p in $PPID_STAT $SPID_TRACE; do kill -INT "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    bot_ticks=0
    [ -n "$BPID" ] && bot_ticks=$(( $(cpu_ticks "$BPID") - bot_before ))
    echo "{\"bot_cpu_ticks\": $bot_ticks, \"ticks_per_s\": $(getconf CLK_TCK)}" >"$WORK/bot-$n-$agent.json"
    kill "$SPID" $BPID 2>/dev/null || true
    wait "$SPID" $BPID 2>/dev/null || true
    cp "$WORK/load-$n-$agent.json" "$WORK/bot-$n-$agent.json" "$WORK/perf-$n-$agent.txt" \
      "$WORK/strace-$n-$agent.txt" "$RAW/"
    rows+=("$n" "$agent" "$RAW/load-$n-$agent.json" "$RAW/bot-$n-$agent.json")
  done
done

python3 - "$OUT" "$DURATION" "$RAW" "$BOT_CPU" "${rows[@]}" <<'PY'
import json, sys, subprocess, datetime
out, duration, raw, bot_cpu, rows = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
res = {}
paths = {}
for i in range(0, len(rows), 4):
    n, agent, load, bot = rows[i:i + 4]
    paths[(n, agent)] = load
    try:
        report = json.load(open(load))
    except Exception:
        report = {}
    res[(n, agent)] = (report, json.load(open(bot)))
def perf_stat(load):
    """task-clock ms and context switches from `perf stat -x,` (None if it did not run)."""
    out = {}
    try:
        for line in open(load.replace("load-", "perf-").replace(".json", ".txt")):
            f = line.strip().split(",")
            if len(f) > 2 and f[2] in ("task-clock", "context-switches"):
                try:
                    out[f[2]] = float(f[0])
                except ValueError:
                    pass
    except OSError:
        pass
    return out

def syscalls(load):
    """Total syscalls from `strace -c` (None if it did not run)."""
    try:
        for line in open(load.replace("load-", "strace-").replace(".json", ".txt")):
            f = line.split()
            if f and f[-1] == "total":
                return int(f[3])
    except (OSError, ValueError, IndexError):
        pass
    return None

lines = []
for (n, agent), (r, b) in res.items():
    server = r.get("server") or {}
    frames = r.get("frames") or {}
    rtt = r.get("rtt_ms") or {}
    cpu = server.get("cpu_us_per_frame")
    echo_cpu = ((res.get((n, "echo")) or ({}, {}))[0].get("server") or {}).get("cpu_us_per_frame")
    ratio = "1.00" if agent == "echo" else ("n/a" if not cpu or not echo_cpu else f"{cpu / echo_cpu:.2f}")
    echoed = frames.get("received") or frames.get("echoed") or 0
    bot_us = "–"
    if agent == "bridge" and echoed:
        bot_us = f"{b['bot_cpu_ticks'] / b['ticks_per_s'] * 1e6 / echoed:.1f}"
    per = lambda v: "–" if v is None or not echoed else f"{v / echoed:.2f}"
    cs = per(perf_stat(paths[(n, agent)]).get("context-switches"))
    sc = per(syscalls(paths[(n, agent)]))
    rss = server.get("rss_per_call_bytes")
    calls_ok = r.get("calls_ok", r.get("completed", "n/a"))
    p = lambda k: rtt.get(k)
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    lines.append(
        f"| {n} | {agent} | {fmt(cpu)} | {ratio} | {'n/a' if rss is None else f'{rss / 1024:.1f} kB'} | "
        f"{frames.get('sent', 'n/a')} | {frames.get('lost', 'n/a')} | {frames.get('corrupt', 'n/a')} | "
        f"{fmt(p('p50'))} | {fmt(p('p99'))} | {bot_us} | {cs} | {sc} | {calls_ok}/{r.get('calls', n)} |")
cpu_model = ""
try:
    cpu_model = [l for l in open("/proc/cpuinfo") if l.startswith("model name")][0].split(":")[1].strip()
except Exception:
    pass
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
with open(out, "w") as f:
    f.write(f"""# The bridge agent's cost (bench/bridge.sh)

Run {datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M')} UTC on commit {rev}, {cpu_model}, 2 cores
shared with other work (ratios within one run are the figures to read, not absolute µs).
callgate (release) pinned to CPU 0, `callgate load` to CPU 1, the bot to CPU {bot_cpu}. {duration} of
μ-law 8 kHz per call, inbound protocol, 20 ms stamped frames echoed.

- **echo**: the `echo` agent sends every frame back.
- **bridge**: a `bridge` route relays each call to a Rust Twilio Media Streams echo bot
  (`crates/callgate-testkit/examples/twilio-echo-bot.rs`): per frame callgate makes a `media`
  JSON message with base64, writes it to a second socket, reads the bot's `media`, decodes it
  and plays it through the call's playout.

CPU µs/frame is callgate's CPU time over the run ÷ frames echoed (`load --server-pid`); the
ratio is against the echo agent at the same size in the same run (target ≤ 2.5). RSS per call
is callgate's peak RSS growth ÷ calls. "bot µs/frame" is the bot process's own CPU, for scale.
Raw load reports: `{raw}/`.

"cs/frame" is callgate's context switches per echoed frame (`perf stat`, with `BR_PERF=1`),
"syscalls/frame" its system calls (`strace -c -f`, with `BR_STRACE=1`); "–": not measured.

| calls | agent | CPU µs/frame | × echo | RSS/call | frames sent | lost | corrupt | p50 ms | p99 ms | bot µs/frame | cs/frame | syscalls/frame | calls ok |
| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(lines) + "\n")
print(open(out).read())
PY
