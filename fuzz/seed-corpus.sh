#!/usr/bin/env bash
# Seeds the fuzz corpora from the golden vectors: every start message, and for sessions the
# start followed by the vector's text inputs, one per line.
set -euo pipefail
cd "$(dirname "$0")"
python3 - <<'PY'
import json, glob, os, hashlib
for target in ("detect", "callbridge_session", "inbound_session"):
    os.makedirs(f"corpus/{target}", exist_ok=True)
for path in sorted(glob.glob("../crates/callgate-proto/tests/vectors/*/*.json")):
    v = json.load(open(path))
    proto = os.path.basename(os.path.dirname(path))
    texts = [v["start"]] + [s["input"]["text"] for s in v.get("steps", []) if "text" in s.get("input", {})]
    def put(target, data):
        name = hashlib.sha1(data.encode()).hexdigest()
        open(f"corpus/{target}/{name}", "w").write(data)
    put("detect", v["start"])
    put(f"{proto}_session", "\n".join(texts))
PY
