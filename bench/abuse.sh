#!/usr/bin/env bash
# The long adversarial run (issue 10): every attack of crates/callgate-server/tests/abuse at the
# sizes the issue gives (CALLGATE_ABUSE=full), in a release build, each with a canary call
# echoing in real time, plus kill -9 of a real release `callgate serve` with 100 live calls.
# The same tests `cargo test` runs in their short version: nothing here is a second harness.
#
# The canary's p99 is read against the canary's p99 with no attack in the same run (the
# baseline test, run at the start, in the suite, and at the end). Raw JSON lines (one per
# attack) and the test log go to bench/results/abuse-<stamp>/, the summary to bench/ABUSE.md.
# About 5 minutes on 2 cores, after the build.
#
# Knobs (environment): ABUSE_OUT (a results dir), ABUSE_SUMMARY (bench/ABUSE.md),
# ABUSE_FILTER (only the tests whose name contains it; for smoke runs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=${ABUSE_OUT:-bench/results/abuse-$STAMP}
SUMMARY=${ABUSE_SUMMARY:-bench/ABUSE.md}
FILTER=${ABUSE_FILTER:-}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Item 1 opens 1,100 idle sockets, both ends in the test's process.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "==> building (release)"
cargo build --release --locked -p callgate
cargo test --release --locked -p callgate-server --test abuse --test abuse_logs --no-run

export CALLGATE_ABUSE=full
export CALLGATE_BIN="$ROOT/target/release/callgate"
export CALLGATE_ABUSE_REPORT="$OUT/report.jsonl"
: >"$CALLGATE_ABUSE_REPORT"
: >"$OUT/test.log"

machine() { # label -> one JSON line of what the machine was doing
  python3 - "$1" <<'EOF' >>"$OUT/machine.jsonl"
import json, os, sys, time
load = open("/proc/loadavg").read().split()[:3]
print(json.dumps({"at": sys.argv[1], "time": time.strftime("%H:%M:%S"), "loadavg": load,
                  "cpus": os.cpu_count()}))
EOF
}

run() { # test filters... (a failing attack is reported, not fatal)
  cargo test --release --locked -p callgate-server --test abuse --test abuse_logs -- \
    --include-ignored --test-threads=1 --nocapture "$@" >>"$OUT/test.log" 2>&1 || true
}

machine start
echo "==> baseline (no attack)"
run baseline
echo "==> every attack, one at a time"
if [ -n "$FILTER" ]; then run "$FILTER"; else run; fi
echo "==> baseline again"
run baseline
machine end

{
  rustc --version
  uname -srm
  grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'
  grep MemTotal /proc/meminfo
} >"$OUT/versions.txt"
python3 bench/abuse_report.py "$OUT" "$SUMMARY"
echo "==> $SUMMARY (raw: $OUT)"
