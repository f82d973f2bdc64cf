#!/usr/bin/env python3
"""Summarises a bench/run.sh run into bench/RESULTS.md.

  report.py --sustained FILE CALLS   exit 0 if that load run sustained CALLS calls
  report.py --write DIR RESULTS.md   write the summary of the run in DIR
"""
import glob
import json
import os
import platform
import statistics
import subprocess
import sys

SERVERS = ["callgate", "floor", "node", "python"]
P99_LIMIT_MS = 20.0
# Pacing target: callgate's playout jitter p99 at most this far above the pacing floor's.
PACING_MARGIN_MS = 2.0
PACING_TARGET_CALLS = 1000


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def sustained(r, calls):
    return (
        r is not None
        and r["calls_ok"] == calls
        and r["frames"]["lost"] == 0
        and r["frames"]["corrupt"] == 0
        and r["rtt_ms"]["p99"] <= P99_LIMIT_MS
        and not r["sender"]["fell_behind"]
    )


def machine():
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(open("/proc/meminfo").readline().split()[1])
        mem = f", {kb / 1024 / 1024:.0f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return f"{os.cpu_count()} cores ({model}){mem}, Linux {platform.release()}"


def versions():
    out = {}
    for name, cmd in {
        "rustc": ["rustc", "--version"],
        "node": ["node", "--version"],
        "python": [sys.executable, "--version"],
    }.items():
        try:
            out[name] = subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            out[name] = "?"
    return out


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec):
    return "—" if v is None else format(v, spec)


# Everything from this line on in RESULTS.md is written by hand and kept by --write.
KEEP_MARKER = "<!-- Kept by bench/report.py --write: hand-written sections follow. -->"


def write(run_dir, target):
    fixed = {}
    for path in glob.glob(os.path.join(run_dir, "fixed-*.json")):
        _, calls, name, _round = os.path.basename(path)[:-5].split("-")
        fixed.setdefault((int(calls), name), []).append(load(path))
    sizes = sorted({c for c, _ in fixed})
    lines = []
    stamp = os.path.basename(run_dir.rstrip("/"))
    v = versions()
    lines += [
        "# Benchmark results",
        "",
        f"Run `{stamp}` on {machine()}; {v['rustc']}, Node {v['node']}, {v['python']}.",
        "Produced by `bench/run.sh` (raw JSON in `bench/results/" + stamp + "/`).",
        "",
        "## Method",
        "",
        "- Every server speaks the inbound flow (`incoming_call` → `answer`, echo audio, `hangup`",
        "  + `cdr` → close) and echoes 20 ms PCM_8000 frames (320 bytes) sent in real time by",
        "  `callgate load`, which stamps each frame so round-trip time, loss, corruption and",
        "  reordering are exact per frame.",
        "- The server is pinned to CPU 0 (`taskset -c 0`), the load generator to CPU 1. Servers",
        "  alternate within each round and the order rotates between rounds.",
        "- **CPU µs per echoed frame** = server CPU time (from `/proc/PID/stat`) over the run ÷",
        "  frames echoed: the stable figure on a shared machine. Ratios are against the floor",
        "  measured in the same run. RSS per call = (peak RSS − RSS before the first call) ÷",
        "  most concurrent calls.",
        "- Servers: **callgate** `serve --agent echo` (records in SQLite, protocol detection,",
        "  metrics, agent task per call); **floor**: a bare tokio-tungstenite echo loop with the",
        "  same read buffer as callgate (`bench/peers/floor`); **node**: a typical `ws` server",
        "  (`bench/peers/node`); **python**: a typical `websockets` server (`bench/peers/python`).",
        "- Values are medians over rounds. A run where the generator fell behind (>1% frames",
        "  sent late, or its core saturated) is marked †: it measured the generator.",
        "",
        "## Fixed sizes",
        "",
        "| calls | server | CPU µs/frame | × floor | server CPU | p50 ms | p99 ms | max ms | lost | RSS/call | calls ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for calls in sizes:
        floor = median(
            [r["server"]["cpu_us_per_frame"] for r in fixed.get((calls, "floor"), []) if r and r.get("server")]
        )
        for name in SERVERS:
            runs = [r for r in fixed.get((calls, name), []) if r]
            if not runs:
                continue
            cpu = median([r["server"]["cpu_us_per_frame"] for r in runs if r.get("server")])
            share = median([r["server"]["cpu_share"] * 100 for r in runs if r.get("server")])
            p50 = median([r["rtt_ms"]["p50"] for r in runs])
            p99 = median([r["rtt_ms"]["p99"] for r in runs])
            mx = median([r["rtt_ms"]["max"] for r in runs])
            lost = sum(r["frames"]["lost"] + r["frames"]["corrupt"] for r in runs)
            rss = median([r["server"]["rss_per_call_bytes"] / 1024 for r in runs if r.get("server")])
            ok = min(r["calls_ok"] for r in runs)
            behind = " †" if any(r["sender"]["fell_behind"] for r in runs) else ""
            ratio = f"{cpu / floor:.2f}" if cpu and floor else "—"
            lines.append(
                f"| {calls} | {name}{behind} | {fmt(cpu, '.1f')} | {ratio} | {fmt(share, '.0f')}% | "
                f"{fmt(p50, '.2f')} | {fmt(p99, '.2f')} | {fmt(mx, '.1f')} | {lost} | "
                f"{fmt(rss, '.1f')} kB | {ok}/{calls} |"
            )
    lines += ["", "## Capacity", "", f"Largest call count sustained for 10 s at p99 ≤ {P99_LIMIT_MS:.0f} ms with zero loss (steps tried in order; the first failure ends the search).", "",
              "| server | sustained | first failure |", "| --- | --- | --- |"]
    for name in SERVERS:
        runs = []
        for path in glob.glob(os.path.join(run_dir, f"capacity-*-{name}.json")):
            calls = int(os.path.basename(path).split("-")[1])
            runs.append((calls, load(path)))
        runs.sort()
        best, failure = None, None
        for calls, r in runs:
            if sustained(r, calls):
                best = calls
            else:
                why = "no result" if r is None else (
                    f"p99 {r['rtt_ms']['p99']:.1f} ms, {r['frames']['lost']} lost, "
                    f"{r['calls_ok']}/{calls} calls ok" + (", generator fell behind" if r["sender"]["fell_behind"] else "")
                )
                failure = f"{calls}: {why}"
                break
        if runs:
            lines.append(f"| {name} | {best if best else '< ' + str(runs[0][0])} | {failure or 'none up to ' + str(runs[-1][0])} |")
    lines += playout_section(run_dir)
    lines.append("")
    # Hand-written sections after the marker (the step-by-step record of a change) are kept.
    kept = ""
    if os.path.exists(target):
        with open(target) as f:
            previous = f.read()
        at = previous.find(KEEP_MARKER)
        if at >= 0:
            kept = "\n" + previous[at:]
    with open(target, "w") as f:
        f.write("\n".join(lines) + kept)


def playout_runs(run_dir):
    """{(calls, name): {round: report}} from playout-CALLS-NAME[-rROUND].json (older runs wrote
    callgate only, without a round)."""
    runs = {}
    for path in glob.glob(os.path.join(run_dir, "playout-*.json")):
        parts = os.path.basename(path)[:-5].split("-")
        calls, name = int(parts[1]), parts[2]
        round_ = parts[3] if len(parts) > 3 else None
        runs.setdefault((calls, name), {})[round_] = load(path)
    return runs


def jitter(r):
    return r.get("playout_jitter_ms") if r else None


def paired_excess(runs, calls, key):
    """Median over rounds of callgate's jitter percentile minus the floor's in the same round."""
    ours, floor = runs.get((calls, "callgate"), {}), runs.get((calls, "floor"), {})
    diffs = []
    for round_, r in ours.items():
        f = floor.get(round_) if round_ is not None else None
        if jitter(r) and jitter(f) and jitter(r)["samples"] and jitter(f)["samples"]:
            diffs.append(jitter(r)[key] - jitter(f)[key])
    return median(diffs)


def playout_section(run_dir):
    runs = playout_runs(run_dir)
    if not runs:
        return []
    lines = [
        "",
        "## Playout pacing",
        "",
        "`callgate load --mode playout` on CPU 1 stays silent and times how late each frame arrives against",
        "an ideal 20 ms grid anchored at the call's first frame (early is on time); the server on CPU 0 plays to",
        "every call. **callgate**: `serve --agent tone` (a steady tone through its playout clock).",
        "**floor**: the pacing floor, `callgate-bench-floor --pace` (one task per call, a tokio",
        "interval writing one 320-byte frame per 20 ms tick, nothing else). Both include the",
        "generator's own scheduling delay; the same generator measures both, alternating within",
        "each round, so the difference is what callgate adds to pacing. Values are medians over",
        "rounds; *p99 − floor* and *p99.9 − floor* are medians of the per-round differences. †: the",
        "generator fell behind in a run.",
        "",
        "| calls | server | frames | jitter p50 ms | p90 | p99 | p99.9 | max | p99 − floor | p99.9 − floor "
        "| longest gap ms | CPU µs/frame | server CPU | calls ok |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    sizes = sorted({c for c, _ in runs})
    for calls in sizes:
        for name in ["callgate", "floor"]:
            if not runs.get((calls, name)):
                continue
            rs = [r for r in runs[(calls, name)].values() if jitter(r) and jitter(r)["samples"]]
            if not rs:
                lines.append(f"| {calls} | {name} | no result | | | | | | | | | | | |")
                continue
            keys = ["samples", "p50", "p90", "p99", "p999", "max"]
            j = {k: median([jitter(r)[k] for r in rs]) for k in keys}
            gap = median([r.get("longest_gap_ms") for r in rs])
            cpu = median([r["server"]["cpu_us_per_frame"] for r in rs if r.get("server")])
            share = median([r["server"]["cpu_share"] * 100 for r in rs if r.get("server")])
            ok = min(r["calls_ok"] for r in rs)
            behind = " †" if any(r["sender"]["fell_behind"] for r in rs) else ""
            if name == "callgate":
                d99 = fmt(paired_excess(runs, calls, "p99"), "+.2f")
                d999 = fmt(paired_excess(runs, calls, "p999"), "+.2f")
            else:
                d99 = d999 = ""
            lines.append(
                f"| {calls} | {name}{behind} | {j['samples']:.0f} | {j['p50']:.2f} | {j['p90']:.2f} | "
                f"{j['p99']:.2f} | {j['p999']:.2f} | {j['max']:.1f} | {d99} | {d999} | "
                f"{fmt(gap, '.1f')} | {fmt(cpu, '.1f')} | {fmt(share, '.0f')}% | {ok}/{calls} |"
            )
    excess = paired_excess(runs, PACING_TARGET_CALLS, "p99")
    verdict = "not measured in this run" if excess is None else (
        f"{'met' if excess <= PACING_MARGIN_MS else 'missed'}: {excess:+.2f} ms"
    )
    lines += [
        "",
        f"Target: at {PACING_TARGET_CALLS} calls, callgate's jitter p99 at most "
        f"{PACING_MARGIN_MS:.0f} ms above the pacing floor's: {verdict}.",
    ]
    return lines


def main():
    if sys.argv[1] == "--sustained":
        r = load(sys.argv[2])
        sys.exit(0 if sustained(r, int(sys.argv[3])) else 1)
    if sys.argv[1] == "--write":
        write(sys.argv[2], sys.argv[3])
        return
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
