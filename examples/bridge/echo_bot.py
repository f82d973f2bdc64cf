#!/usr/bin/env python3
"""A voice bot that speaks Twilio Media Streams, written the way a Pipecat user writes one,
put on callgate calls by a `bridge` route (docs/bridge.md). It echoes what the caller says in
200 ms replies, each followed by a mark; once its fifth reply has been heard (the mark came
back) it says goodbye and closes the socket, which makes callgate hang up after the goodbye.
Every event it sees is printed as one JSON line. Needs the `websockets` package."""
import asyncio, base64, json, sys

import websockets

GOODBYE = bytes([0x2A]) * 4000  # 500 ms of μ-law


def log(**fields):
    print(json.dumps(fields), flush=True)


async def bot(ws):
    # As Pipecat's parse_telephony_websocket: `connected`, then `start` with the ids.
    assert json.loads(await ws.recv())["event"] == "connected"
    start = json.loads(await ws.recv())["start"]
    sid = start["streamSid"]
    log(event="start", call_sid=start["callSid"], params=start["customParameters"],
        path=ws.request.path, signature=ws.request.headers.get("X-Twilio-Signature"))
    heard, replies = bytearray(), 0
    async for text in ws:
        msg = json.loads(text)
        if msg["event"] == "media":  # TwilioFrameSerializer: payload -> audio
            heard += base64.b64decode(msg["media"]["payload"])
            if len(heard) >= 1600 and replies < 5:
                replies += 1
                payload = base64.b64encode(bytes(heard[:1600])).decode()
                del heard[:1600]
                await ws.send(json.dumps({"event": "media", "streamSid": sid,
                                          "media": {"payload": payload}}))
                await ws.send(json.dumps({"event": "mark", "streamSid": sid,
                                          "mark": {"name": f"reply-{replies}"}}))
        elif msg["event"] == "dtmf":
            log(event="dtmf", digit=msg["dtmf"]["digit"])
        elif msg["event"] == "mark":  # played to the caller
            log(event="mark", name=msg["mark"]["name"])
            if msg["mark"]["name"] == "reply-5":
                await ws.send(json.dumps({"event": "media", "streamSid": sid, "media": {
                    "payload": base64.b64encode(GOODBYE).decode()}}))
                await ws.close(1000, "goodbye")  # callgate hangs up after the goodbye
        elif msg["event"] == "stop":
            log(event="stop")


async def main():
    async with websockets.serve(bot, "127.0.0.1", int(sys.argv[1]) if len(sys.argv) > 1 else 0) as server:
        log(event="listening", port=server.sockets[0].getsockname()[1])
        await asyncio.Future()


asyncio.run(main())
