#!/usr/bin/env bash
# Where a server's CPU per echoed frame goes, against the floor in the same run: user and
# kernel CPU time, system calls, context switches and (optionally) a user+kernel profile per
# echoed frame, for `callgate serve --agent echo` and the bare tokio-tungstenite echo floor.
#
# Each server runs pinned to CPU 0 with `callgate load` on CPU 1 (PROF_CALLS echo calls in real
# time). Once the calls are up, three windows of PROF_WINDOW seconds each are taken one after
# the other: /proc/PID/stat (user and system CPU) with `perf stat` (context switches, CPU
# migrations, system calls by tracepoint), then `strace -c -f` (system calls by name; strace
# slows the server, so its window is not used for time), then with PROF_RECORD=1
# `perf record` (a flat profile: the top symbols, user and kernel). Frames in the perf window =
# the messages the server sent in it (`sendto` + `write` + `writev`: one per echoed frame, plus
# callgate's liveness pings, 1 per 62 frames), so a generator that fell behind does not skew
# the per-frame figures.
#
# Counts per frame (system calls, switches) do not move with a noisy machine; times do.
#
# Usage: bench/profile.sh [callgate|floor ...]   (default: callgate floor)
# Knobs: PROF_CALLS (500), PROF_WINDOW (8), PROF_RECORD (0), PROF_RECORD_ARGS (what `perf
# record` samples; default `-F 2000`, user time only with call stacks:
# `-e cpu-clock:u --call-graph dwarf`), PROF_CALLGATE (a callgate binary; default
# target/release/callgate, built), PROF_OUT (a directory for the raw outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CALLS=${PROF_CALLS:-500}
WINDOW=${PROF_WINDOW:-8}
RECORD=${PROF_RECORD:-0}
read -r -a RECORD_ARGS <<<"${PROF_RECORD_ARGS:--F 2000}"
OUT=${PROF_OUT:-$(mktemp -d)}
PORT=4190
mkdir -p "$OUT"
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$WORK"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
for tool in perf strace; do
  command -v "$tool" >/dev/null || { echo "$tool is needed" >&2; exit 1; }
done

if [ -n "${PROF_CALLGATE:-}" ]; then
  CALLGATE=$(realpath "$PROF_CALLGATE")
else
  cargo build --release --locked -p callgate >&2
  CALLGATE="$ROOT/target/release/callgate"
fi
(cd bench/peers/floor && CARGO_TARGET_DIR="$ROOT/target/bench-floor" cargo build --release --locked >&2)
FLOOR="$ROOT/target/bench-floor/release/callgate-bench-floor"

# The system calls counted by tracepoint (the ones an echo makes, and the usual suspects).
SYSCALLS="read write recvfrom sendto readv writev epoll_wait epoll_pwait futex sched_yield clock_nanosleep nanosleep"
EVENTS="task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter"
for s in $SYSCALLS; do EVENTS="$EVENTS,syscalls:sys_enter_$s"; done

cpu_ticks() { # pid -> "utime stime" in clock ticks
  awk '{print $14, $15}' "/proc/$1/stat"
}

profile() { # name
  local name=$1 pid
  rm -rf "$WORK/data"
  case $name in
    callgate)
      taskset -c 0 "$CALLGATE" serve --listen "127.0.0.1:$PORT" \
        --admin-listen "127.0.0.1:$((PORT + 1))" --data-dir "$WORK/data" --agent echo \
        --max-calls 20000 --log warn 2>"$OUT/$name.server.log" &
      ;;
    floor) taskset -c 0 "$FLOOR" "127.0.0.1:$PORT" & ;;
    *) echo "unknown server $name" >&2; return 1 ;;
  esac
  pid=$!
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    sleep 0.1
  done
  local windows=$((2 + RECORD))
  local duration=$((4 + windows * WINDOW + 2))
  taskset -c 1 "$CALLGATE" load --url "ws://127.0.0.1:$PORT/" --calls "$CALLS" --ramp 500 \
    --duration "${duration}s" --server-pid "$pid" --json >"$OUT/$name.load.json" 2>/dev/null &
  local load=$!
  sleep 4
  local hz before after
  hz=$(getconf CLK_TCK)
  before=$(cpu_ticks "$pid")
  perf stat -x, -e "$EVENTS" -p "$pid" -o "$OUT/$name.perf-stat" -- sleep "$WINDOW" 2>/dev/null
  after=$(cpu_ticks "$pid")
  strace -c -f -p "$pid" -o "$OUT/$name.strace" 2>/dev/null &
  local st=$!
  sleep "$WINDOW"
  kill -INT "$st" 2>/dev/null || true
  wait "$st" 2>/dev/null || true
  if [ "$RECORD" = 1 ]; then
    perf record "${RECORD_ARGS[@]}" -o "$OUT/$name.perf.data" -p "$pid" -- sleep "$WINDOW" >/dev/null 2>&1 || true
  fi
  wait "$load" || true
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  PORT=$((PORT + 2))
  python3 - "$name" "$CALLS" "$WINDOW" "$hz" "$before" "$after" "$OUT" <<'EOF'
import json, re, sys
name, calls, window, hz = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
b = [int(x) for x in sys.argv[5].split()]
a = [int(x) for x in sys.argv[6].split()]
out = sys.argv[7]
stat = {}
for line in open(f"{out}/{name}.perf-stat"):
    f = line.strip().split(",")
    if len(f) > 2 and f[0] and f[0][0].isdigit():
        stat[f[2]] = float(f[0])
sent = sum(stat.get(f"syscalls:sys_enter_{s}", 0.0) for s in ("sendto", "write", "writev"))
frames = sent if sent > 0 else calls * 50 * window
user_us = (a[0] - b[0]) / hz * 1e6 / frames
sys_us = (a[1] - b[1]) / hz * 1e6 / frames
per = lambda k: stat.get(k, 0.0) / frames
load = json.load(open(f"{out}/{name}.load.json"))
row = {
    "server": name,
    "frames_in_window": int(frames),
    "user_us_per_frame": round(user_us, 2),
    "sys_us_per_frame": round(sys_us, 2),
    "cpu_us_per_frame_run": load.get("server", {}).get("cpu_us_per_frame"),
    "context_switches_per_frame": round(per("context-switches"), 3),
    "cpu_migrations_per_frame": round(per("cpu-migrations"), 4),
    "syscalls_per_frame": round(per("raw_syscalls:sys_enter"), 3),
    "by_syscall": {k.split("sys_enter_")[1]: round(per(k), 3) for k in stat
                   if k.startswith("syscalls:") and stat[k] > 0},
    "generator_fell_behind": load.get("sender", {}).get("fell_behind"),
    "lost": load.get("frames", {}).get("lost"),
}
print(json.dumps(row))
EOF
  echo "    strace -c ($name):" >&2
  head -25 "$OUT/$name.strace" | sed 's/^/      /' >&2
  if [ "$RECORD" = 1 ]; then
    perf report -i "$OUT/$name.perf.data" --no-children --sort comm,dso,sym --stdio 2>/dev/null \
      | grep -v '^#' | grep -v '^$' | grep '%' | head -40 >"$OUT/$name.perf-top" || true
    echo "    perf record top symbols ($name): $OUT/$name.perf-top" >&2
  fi
}

for name in "${@:-callgate floor}"; do
  for n in $name; do profile "$n"; done
done
echo "raw outputs in $OUT" >&2
