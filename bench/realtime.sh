#!/usr/bin/env bash
# The realtime agent's own latency: callgate (release) runs the `realtime` agent against the
# testkit's Realtime double in benchmark mode (a local server that answers instantly: after
# every 3 s of a caller's audio it reports a turn and sends a whole 1 s spoken answer in one
# burst), and `callgate load` places N concurrent CallBridge calls streaming audio.
#
# The figure is callgate's share of the response latency: from the answer's first audio
# arriving on callgate's socket to its first frame leaving for the phone
# (`callgate_realtime_callgate_latency_seconds`), next to the backend's share (`..._backend_...`,
# ~0 here: the double answers at once). Each size is measured against one call in the same run
# (the unloaded reference), since the machine is shared. Results: bench/REALTIME.md.
#
# Knobs (environment): RT_SIZES ("1 50 200"), RT_DURATION (30s), RT_OUT (bench/REALTIME.md).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${RT_SIZES:-"1 50 200"}
DURATION=${RT_DURATION:-30s}
OUT=${RT_OUT:-bench/REALTIME.md}
RAW=bench/results/realtime-$(date -u +%Y%m%dT%H%M%SZ)
PORT=4170
mkdir -p "$RAW"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "==> building (release)"
cargo build --release --locked -p callgate
cargo build --release --locked -p callgate-testkit --example realtime-double
CALLGATE=target/release/callgate
DOUBLE=target/release/examples/realtime-double
command -v espeak-ng >/dev/null || { echo "espeak-ng is needed (the fallback message)"; exit 1; }

export RT_BENCH_KEY=test-key   # the double's default key
rows=()
for n in $SIZES; do
  echo "==> $n calls"
  taskset -c 1 "$DOUBLE" --listen "127.0.0.1:$((PORT + 2))" \
    --answer-ms 1000 --speech-every-ms 3000 >"$WORK/double.out" 2>"$WORK/double.log" &
  DPID=$!
  cat >"$WORK/routes.toml" <<TOML
[[routes]]
name = "ai"
agent = "realtime"
[routes.settings]
url = "ws://127.0.0.1:$((PORT + 2))/v1/realtime"
api_key_env = "RT_BENCH_KEY"
greeting = false
TOML
  rm -rf "$WORK/data"
  taskset -c 0 "$CALLGATE" serve --config "$WORK/routes.toml" --listen "127.0.0.1:$PORT" \
    --admin-listen "127.0.0.1:$((PORT + 1))" --data-dir "$WORK/data" --max-calls 5000 \
    --log warn 2>"$WORK/server.log" &
  SPID=$!
  for _ in $(seq 200); do
    curl -sf "http://127.0.0.1:$((PORT + 1))/healthz" >/dev/null && break
    sleep 0.1
  done
  curl -sf "http://127.0.0.1:$((PORT + 1))/metrics" >"$WORK/before.txt"
  taskset -c 1 "$CALLGATE" load --url "ws://127.0.0.1:$PORT/" --calls "$n" --ramp 100 \
    --duration "$DURATION" --protocol callbridge --server-pid "$SPID" --json \
    >"$WORK/load-$n.json" 2>/dev/null || true
  curl -sf "http://127.0.0.1:$((PORT + 1))/metrics" >"$WORK/after-$n.txt"
  kill "$SPID" "$DPID" 2>/dev/null || true
  wait "$SPID" "$DPID" 2>/dev/null || true
  cp "$WORK/after-$n.txt" "$WORK/load-$n.json" "$RAW/"
  rows+=("$n" "$RAW/after-$n.txt" "$RAW/load-$n.json")
done

python3 - "$OUT" "$DURATION" "${rows[@]}" <<'PY'
import json, re, sys, platform, subprocess, datetime
out, duration, rows = sys.argv[1], sys.argv[2], sys.argv[3:]

def hist(text, name):
    buckets, count = [], 0.0
    for line in text.splitlines():
        m = re.match(r'%s_bucket\{le="([^"]+)"\} (\S+)' % name, line)
        if m:
            le = float("inf") if m.group(1) == "+Inf" else float(m.group(1))
            buckets.append((le, float(m.group(2))))
        m = re.match(r'%s_count (\S+)' % name, line)
        if m:
            count = float(m.group(1))
    return sorted(buckets), count

def q(buckets, count, p):
    # The upper bound of the bucket holding the p-quantile (a conservative estimate).
    if count == 0:
        return None
    for le, c in buckets:
        if c >= p * count:
            return le
    return float("inf")

lines = []
for i in range(0, len(rows), 3):
    n, metrics, load = rows[i], rows[i + 1], rows[i + 2]
    text = open(metrics).read()
    own, own_n = hist(text, "callgate_realtime_callgate_latency_seconds")
    back, _ = hist(text, "callgate_realtime_backend_latency_seconds")
    try:
        report = json.load(open(load))
    except Exception:
        report = {}
    ms = lambda v: "n/a" if v is None else ("> 10 s" if v == float("inf") else f"≤ {v*1000:g} ms")
    server = report.get("server") or {}
    cpu = server.get("cpu_share")
    rss = server.get("rss_per_call_bytes")
    cpu_s = "n/a" if cpu is None else f"{cpu * 100:.0f}%"
    rss_s = "n/a" if rss is None else f"{rss / 1024:.0f} kB"
    lines.append(f"| {n} | {int(own_n)} | {ms(q(own, own_n, 0.5))} | {ms(q(own, own_n, 0.99))} | "
                 f"{ms(q(back, own_n, 0.5))} | {ms(q(back, own_n, 0.99))} | {cpu_s} | {rss_s} |")
cpu_model = ""
try:
    cpu_model = [l for l in open("/proc/cpuinfo") if l.startswith("model name")][0].split(":")[1].strip()
except Exception:
    pass
rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
with open(out, "w") as f:
    f.write(f"""# Realtime agent latency (bench/realtime.sh)

Run {datetime.datetime.utcnow().strftime('%Y-%m-%d %H:%M')} UTC on commit {rev}, {cpu_model}, 2 cores
(server pinned to CPU 0; the double and `callgate load` share CPU 1). {duration} of audio per call;
every call gets a 1 s answer in one burst after each 3 s of its audio.

callgate's own share: from the answer's first audio arriving on callgate's socket to its first
frame leaving for the phone (the connection task reads and decodes the event, the call's task
converts µ-law to the phone's PCM and hands the frame to the playout, which sends it). The
backend's share is from the service's `speech_stopped` to that first audio (the double answers
at once). Quantiles are the upper bounds of histogram buckets (0.25, 0.5, 1, 2, 3, 4, 5,
7.5, 10 ms...), so they are conservative. Target: callgate's own p99 under 5 ms at 200 calls.

Server CPU is its share of one core over the run; memory is the server's peak RSS growth per
call. Raw metrics and load reports: the `bench/results/realtime-*` directory of the run.

| calls | answers | callgate p50 | callgate p99 | backend p50 | backend p99 | server CPU | RSS per call |
| --- | --- | --- | --- | --- | --- | --- | --- |
""" + "\n".join(lines) + "\n")
print(open(out).read())
PY
