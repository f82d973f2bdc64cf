#!/usr/bin/env bash
# callgate's own share of the `pipeline` agent's response latency: the caller's end of turn as
# the agent detected it → the answer's first frame handed to the call, with the testkit's
# OpenAI double answering every request at once (transcription, streamed chat completion,
# streamed PCM speech), at 1, 50 and 200 concurrent CallBridge calls (8 kHz), each saying
# "요금 문의요" (espeak-ng) in real time a few times with 2 s of silence after each.
#
# Everything runs in one release process (crates/callgate-pipeline/examples/latency.rs: the
# server, the double and the phones on one 2-thread runtime), so the figures include the
# phones' and the double's own CPU: an upper bound of callgate's share.
#
# Knobs (environment): PL_SIZES ("1,50,200"), PL_TURNS (5), PL_OUT (bench/PIPELINE.md).
# The section "## callgate's share of the response latency" of PL_OUT is replaced.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZES=${PL_SIZES:-1,50,200}
TURNS=${PL_TURNS:-5}
OUT=${PL_OUT:-bench/PIPELINE.md}
command -v espeak-ng >/dev/null || { echo "espeak-ng is needed (the caller's words)"; exit 1; }
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

echo "==> building (release)"
cargo build --release --locked -p callgate-pipeline --example latency
RAW=bench/results/pipeline-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RAW"
echo "==> measuring ($SIZES calls, $TURNS turns each)"
target/release/examples/latency --calls "$SIZES" --turns "$TURNS" | tee "$RAW/table.md"

python3 - "$OUT" "$RAW/table.md" "$TURNS" <<'PY'
import datetime, os, platform, re, subprocess, sys
out, table, turns = sys.argv[1], open(sys.argv[2]).read().strip(), sys.argv[3]
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                        text=True).stdout.strip()
cpu = "unknown CPU"
try:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
except OSError:
    pass
load = os.getloadavg()[0]
when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
section = f"""## callgate's share of the response latency

Run {when} on commit {commit}, {cpu}, {os.cpu_count()} cores (load average {load:.1f} when
the run ended: the machine is shared). Produced by `bench/pipeline.sh`.

What is measured: from the end of the caller's turn as the `pipeline` agent detected it (600
ms of silence after speech) to the answer's first frame handed to the call
(`turn_latency.first_frame_ms` in each call's record), with the testkit's OpenAI double
answering every request at once. That is callgate's own share: the turn's WAV upload and the
transcription's answer, the chat request and its event stream, the speech request and its PCM
stream resampled to the call's rate, the agent's core, and the scheduling of all of it at that
load. The columns before it are the same clock at each step (`stt_ms`: transcript back;
`llm_first_token_ms`; `tts_first_audio_ms`). Each call says "요금 문의요" (espeak-ng) {turns}
times in real time at 8 kHz, with 2 s of silence after each; the answer is one sentence.
The server, the double and every phone run in one release process on one 2-thread runtime,
so the phones' and the double's CPU is counted against callgate: the figures are an upper
bound. Values are whole milliseconds (the call clock's unit). Target: p99 under 10 ms at 200
calls.

{table}
"""
text = open(out).read() if os.path.exists(out) else "# The pipeline agent: benchmarks\n\n"
pattern = re.compile(r"## callgate's share of the response latency\n.*?(?=\n## |\Z)", re.S)
if pattern.search(text):
    text = pattern.sub(lambda _: section.rstrip("\n") + "\n", text)
else:
    text = text.rstrip("\n") + "\n\n" + section
open(out, "w").write(text)
print(f"==> {out} updated")
PY
