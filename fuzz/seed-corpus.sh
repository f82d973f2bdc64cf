#!/usr/bin/env bash
# Seeds the fuzz corpora from the golden vectors: every start message, and for sessions the
# start followed by the vector's text inputs, one per line.
set -euo pipefail
cd "$(dirname "$0")"
python3 - <<'PY'
import json, glob, os, hashlib
for target in ("detect", "callbridge_session", "inbound_session", "twilio_session"):
    os.makedirs(f"corpus/{target}", exist_ok=True)
for path in sorted(glob.glob("../crates/callgate-proto/tests/vectors/*/*.json")):
    v = json.load(open(path))
    proto = os.path.basename(os.path.dirname(path))
    # A Twilio vector's start is the list of messages before the call starts.
    starts = v["start"] if isinstance(v["start"], list) else [v["start"]]
    texts = starts + [s["input"]["text"] for s in v.get("steps", []) if "text" in s.get("input", {})]
    def put(target, data):
        name = hashlib.sha1(data.encode()).hexdigest()
        open(f"corpus/{target}/{name}", "w").write(data)
    put("detect", "\n".join(starts))
    put(f"{proto}_session", "\n".join(texts))

# The config loader: every TOML block of the docs as a --config file (a leading even byte),
# every example flow as a route's flow file (a leading odd byte).
import re
os.makedirs("corpus/config", exist_ok=True)
def seed(data):
    name = hashlib.sha1(data).hexdigest()
    open(f"corpus/config/{name}", "wb").write(data)
for path in sorted(glob.glob("../docs/*.md") + ["../README.md"]):
    for block in re.findall(r"```toml\n(.*?)```", open(path).read(), re.S):
        seed(b"\x00" + block.encode())
for path in sorted(glob.glob("../examples/flows/*.toml")):
    seed(b"\x01" + open(path, "rb").read())
PY
