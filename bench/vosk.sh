#!/usr/bin/env bash
# vosk's cost per live Korean call and how many one core transcribes in real time
# (bench/PIPELINE.md, "## vosk"). Fetches vosk and the Korean model (scripts/fetch-vosk),
# builds crates/callgate-kit/examples/vosk_bench.rs with the `vosk` feature (release), then:
#   - cost: CPU seconds per second of Korean audio recognised (one stream, as fast as it goes,
#     pinned to CPU 0) and the model's memory: a number that holds whatever else runs;
#   - live: 1..MAX calls speaking in real time pinned to CPU 0 (taskset), each SECONDS long;
#     a run is real time when no utterance was dropped and every text came within 1 s of its
#     last frame. This one needs the core to itself: the load average is printed with it.
# Usage: bench/vosk.sh [SECONDS=30] [MAX=8]   (results: bench/results/vosk-*.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-30}"
max="${2:-8}"
eval "$(scripts/fetch-vosk)"
export CALLGATE_VOSK_LIB CALLGATE_VOSK_MODEL
export CARGO_INCREMENTAL=0
cargo build --release --quiet -p callgate-kit --features vosk --example vosk_bench
bin=target/release/examples/vosk_bench
mkdir -p bench/results
out="bench/results/vosk-$(date -u +%Y%m%dT%H%M%SZ).jsonl"
taskset -c 0 "$bin" "$CALLGATE_VOSK_MODEL" cost 10 | tee -a "$out"
for n in $(seq 1 "$max"); do
  load="$(cut -d' ' -f1 /proc/loadavg)"
  line="$(taskset -c 0 "$bin" "$CALLGATE_VOSK_MODEL" "$n" "$seconds" | sed "s/^{/{\"cores\": 1, \"loadavg\": $load, /")"
  echo "$line" | tee -a "$out"
  case "$line" in *'"realtime": false'*) break ;; esac
done
echo "results: $out" >&2
